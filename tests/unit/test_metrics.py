"""Handler metrics, request IDs, the prediction log, the exporter and the archive's drift reference."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from handlers import metrics as handler_metrics_module
from handlers.config import HandlerConfig
from handlers.image_classifier import ImageClassifier
from handlers.metrics import (
    BRIGHTNESS_BUCKETS,
    CONFIDENCE_BUCKETS,
    MEGAPIXEL_BUCKETS,
    NullMetrics,
    PredictionLog,
    PredictionLogConfig,
    bin_counts,
    handler_metrics,
)
from servekit.build.spec import Monitoring
from servekit.serving import exporter
from servekit.serving.store import archive_name
from tests.unit.test_handler import extract, make_context, sample

V1 = {"model": "digits", "version": "1.0"}


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> Path:
    return extract(model_store, "1.0", tmp_path_factory.mktemp("mar"))


@pytest.fixture(scope="module")
def classifier(digits_dir: Path) -> tuple[ImageClassifier, object]:
    context = make_context(digits_dir)
    handler = ImageClassifier()
    handler.initialize(context)
    return handler, context


# ------------------------------------------------------------------------------------------ bins
def test_bin_counts_uses_the_bins_of_prometheus_le_buckets() -> None:
    # bin i is (edges[i-1], edges[i]]: a value on an edge belongs to the bin below it, as le= counts it
    assert bin_counts([0.05, 0.1, 0.10001, 0.5, 0.99, 0.995, 2.0], CONFIDENCE_BUCKETS) == [
        2, 1, 0, 0, 1, 0, 0, 0, 0, 0, 1, 2
    ]  # fmt: skip
    assert len(bin_counts([], MEGAPIXEL_BUCKETS)) == len(MEGAPIXEL_BUCKETS) + 1


# ------------------------------------------------------------------------------------------ the handler counts
def test_a_batch_is_counted_per_request_stage_class_and_real_version(classifier) -> None:
    handler, context = classifier
    names = {
        "ok": ("servekit_requests_total", {**V1, "code": "200"}),
        "bad": ("servekit_requests_total", {**V1, "code": "415"}),
        "error": ("servekit_errors_total", {**V1, "type": "UnsupportedMediaType", "code": "415"}),
        "decode": ("servekit_stage_seconds_count", {**V1, "stage": "decode"}),
        "preprocess": ("servekit_stage_seconds_count", {**V1, "stage": "preprocess"}),
        "inference": ("servekit_stage_seconds_count", {**V1, "stage": "inference"}),
        "postprocess": ("servekit_stage_seconds_count", {**V1, "stage": "postprocess"}),
        "requests": ("servekit_request_seconds_count", V1),
        "batches": ("servekit_batch_inputs_count", V1),
        "batch_inputs": ("servekit_batch_inputs_sum", V1),
        "three": ("servekit_predictions_total", {**V1, "class": "3"}),
        "confidence": ("servekit_confidence_count", V1),
        "brightness": ("servekit_input_brightness_count", V1),
        "megapixels": ("servekit_input_megapixels_sum", V1),
    }
    before = {key: value(name, **labels) for key, (name, labels) in names.items()}
    responses = handler.handle([{"body": sample(3)}, {"body": b"not an image"}, {"body": sample(3)}], context)
    after = {key: value(name, **labels) for key, (name, labels) in names.items()}
    delta = {key: round(after[key] - before[key], 6) for key in names}

    assert [r["predictions"][0]["label"] if "predictions" in r else r["code"] for r in responses] == ["3", 415, "3"]
    assert delta == {
        "ok": 2, "bad": 1, "error": 1, "requests": 3,
        "decode": 3, "preprocess": 2,  # the unreadable body failed in decoding: not counted as preprocessed
        "inference": 1, "postprocess": 1,  # two inputs, one model call (batch size 8)
        "batches": 1, "batch_inputs": 2,
        "three": 2, "confidence": 2, "brightness": 2,
        "megapixels": round(2 * 128 * 128 / 1e6, 6),  # the sample PNGs are 128x128
    }  # fmt: skip


def test_warm_up_is_not_counted(digits_dir: Path) -> None:
    before = (
        value("servekit_request_seconds_count", **V1),
        value("servekit_stage_seconds_count", **V1, stage="inference"),
    )
    ImageClassifier().initialize(make_context(digits_dir))  # warms up through handle() at every batch size
    assert (value("servekit_request_seconds_count", **V1),
            value("servekit_stage_seconds_count", **V1, stage="inference")) == before  # fmt: skip


def test_every_request_is_logged_with_torchserve_request_id(classifier, caplog: pytest.LogCaptureFixture) -> None:
    handler, context = classifier
    context.reset(headers=[{}, {"X-Request-ID": "client-42\nforged line"}], request_ids=["id-a", "id-b"])
    with caplog.at_level(logging.INFO, logger="handlers.base"):
        handler.handle([{"body": sample(1)}, {"body": b"??"}], context)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request ")]
    assert lines[0].startswith("request id-a digits 1.0: 200 in ")
    assert lines[1].startswith("request id-b digits 1.0: 415 in ")
    assert lines[1].endswith("(client id client-42?forged?line)")  # one line, whatever the client sends


def test_an_oip_answer_carries_the_request_id(classifier) -> None:
    handler, context = classifier
    image = {
        "name": "image",
        "datatype": "BYTES",
        "shape": [1],
        "data": [__import__("base64").b64encode(sample(2)).decode()],
    }
    for document, expected in (({"inputs": [image]}, "ts-id"), ({"id": "mine", "inputs": [image]}, "mine")):
        context.reset(request_ids=["ts-id"])
        (answer,) = handler.handle([{"body": json.dumps(document).encode()}], context)
        assert answer["id"] == expected


def test_the_switch_turns_handler_metrics_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(handler_metrics_module.SWITCH, "off")
    assert isinstance(handler_metrics("digits", "1.0"), NullMetrics)
    monkeypatch.setenv(handler_metrics_module.SWITCH, "on")
    assert not isinstance(handler_metrics("digits", "1.0"), NullMetrics)


# ------------------------------------------------------------------------------------------ prediction log
def test_the_prediction_log_writes_sampled_answers_without_the_input(classifier, tmp_path: Path) -> None:
    handler, context = classifier
    context.reset(request_ids=["a", "b"])
    handler.prediction_log = PredictionLog(PredictionLogConfig(sample_rate=1.0, path=str(tmp_path / "p.jsonl")),
                                           "digits", "1.0")  # fmt: skip
    try:
        handler.handle([{"body": sample(7)}, {"body": b"junk"}], context)
    finally:
        handler.prediction_log = None
    records = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [(r["request_id"], r["code"]) for r in records] == [("a", 200), ("b", 415)]
    assert records[0]["input_sha256"] == hashlib.sha256(sample(7)).hexdigest()
    assert records[0]["answers"][0]["labels"][0] == "7"
    assert records[1]["answers"][0]["type"] == "UnsupportedMediaType"
    assert all("input_base64" not in r and r["latency_ms"] > 0 for r in records)


def test_the_prediction_log_samples_at_its_rate_and_writes_the_input_only_when_asked(tmp_path: Path) -> None:
    log = PredictionLog(PredictionLogConfig(sample_rate=0.1, include_input=True, path=str(tmp_path / "p.jsonl")),
                        "m", "1", rng=random.Random(7))  # fmt: skip
    assert 60 < sum(log.sampled() for _ in range(1000)) < 140
    log.write("r", b"\x00bytes", [], 0.001, 200)
    assert json.loads((tmp_path / "p.jsonl").read_text())["input_base64"] == "AGJ5dGVz"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"sample_rate": 2}, "prediction_log.sample_rate: must be a number from 0.0 to 1.0"),
        ({"sample_rate": 0.1, "raw": True}, "prediction_log.raw: unknown key"),
        ({"include_input": "yes"}, "prediction_log.include_input: must be true or false"),
        ({"max_bytes": 100}, r"prediction_log.max_bytes: must be a whole number of bytes from 4096 to \d+, got 100"),
        ({"max_bytes": "64M"}, "prediction_log.max_bytes: must be a whole number of bytes from 4096"),
        ({"backups": -1}, "prediction_log.backups: must be a whole number of rotated files kept from 0 to 100"),
        ({"backups": True}, "prediction_log.backups: must be a whole number"),
    ],
)
def test_prediction_log_settings_are_validated(data: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HandlerConfig.from_dict({"prediction_log": data})


# ------------------------------------------------------------------------------------------ prediction log: bounds
def small_log(tmp_path: Path, max_bytes: int = 4096, backups: int = 2, name: str = "p.jsonl") -> PredictionLog:
    config = PredictionLogConfig(sample_rate=1.0, path=str(tmp_path / name), max_bytes=max_bytes, backups=backups)
    return PredictionLog(config, "m", "1")


def log_files(log: PredictionLog) -> list[Path]:
    """The current file, then the backups from the newest: those that exist."""
    return [p for p in (log.path, *(log.backup(n) for n in range(1, 200))) if p.exists()]


def logged_ids(log: PredictionLog) -> list[str]:
    """Request IDs in the order written (oldest backup first); every line must be whole JSON."""
    ids = []
    for path in reversed(log_files(log)):
        data = path.read_bytes()
        assert data.endswith(b"\n")
        ids += [json.loads(line)["request_id"] for line in data.splitlines()]
    return ids


def test_the_prediction_log_rotates_at_its_cap_and_keeps_its_backups(tmp_path: Path) -> None:
    log = small_log(tmp_path, max_bytes=4096, backups=2)
    for i in range(200):  # about 250 bytes each: 50 KB through a 4 KiB cap
        log.write(f"r{i:04d}", b"body", [{"label": "7", "score": 0.9}], 0.001, 200)
    files = log_files(log)
    assert files == [log.path, log.backup(1), log.backup(2)]  # the oldest beyond 2 backups were dropped
    assert all(4096 - 300 < p.stat().st_size <= 4096 for p in files[1:])
    assert sum(p.stat().st_size for p in files) <= 4096 * 3
    ids = logged_ids(log)
    assert ids == [f"r{i:04d}" for i in range(200 - len(ids), 200)]  # only the oldest are gone, in order
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in files)


def test_a_prediction_log_without_backups_starts_over_and_a_record_over_the_cap_is_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = small_log(tmp_path, max_bytes=4096, backups=0)
    for i in range(40):
        log.write(f"r{i}", b"body", [], 0.001, 200)
    assert log_files(log) == [log.path]
    assert log.path.stat().st_size <= 4096
    size = log.path.stat().st_size
    with caplog.at_level(logging.WARNING, logger="handlers.metrics"):
        log.write("huge", b"x" * 5000, ["y" * 5000], 0.001, 200)
        log.write("huge2", b"x" * 5000, ["y" * 5000], 0.001, 200)
    assert log.path.stat().st_size == size
    assert len(caplog.records) == 1  # once, not per record
    assert re.fullmatch(r"prediction log \S+: a record of 5\d\d\d bytes is larger than max_bytes \(4096\): "
                        r"such records are skipped", caplog.records[0].getMessage())  # fmt: skip


ROTATING_WRITER = """
import sys, time
from handlers.metrics import PredictionLog, PredictionLogConfig
path, writer, count, start = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
log = PredictionLog(PredictionLogConfig(sample_rate=1.0, path=path, max_bytes=8192, backups=int(sys.argv[5])), "m", "1")
while time.time() < start:
    pass
for i in range(count):
    log.write(f"{writer}-{i:05d}", b"body", [{"label": writer * (1 + i % 40)}], 0.001, 200)
"""


@pytest.mark.parametrize("backups", [60, 3])
def test_two_processes_share_a_rotating_prediction_log_without_tearing_or_losing_lines(
    tmp_path: Path, repo_root: Path, backups: int
) -> None:
    count, path = 800, tmp_path / "p.jsonl"  # about 200 KB through an 8 KiB cap: some 25 rotations
    start = time.time() + 1.0  # both start writing at once, after their imports
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", ROTATING_WRITER, str(path), name, str(count), str(start), str(backups)],
            cwd=repo_root,
        )  # fmt: skip
        for name in ("a", "b")
    ]
    for writer in writers:
        assert writer.wait(timeout=120) == 0
    log = small_log(tmp_path, max_bytes=8192, backups=backups)
    files = log_files(log)
    assert all(p.stat().st_size <= 8192 for p in files)
    assert len(files) <= backups + 1
    ids = logged_ids(log)  # every line whole JSON
    assert len(ids) == len(set(ids))
    for name in ("a", "b"):
        mine = [int(i.split("-")[1]) for i in ids if i.startswith(name + "-")]
        # Nothing is lost but the oldest lines, in the files rotation dropped on purpose.
        assert mine == list(range(count - len(mine), count))
        if backups == 60:
            assert len(mine) == count
    if backups == 3:
        assert len(files) == 4
        assert len(ids) > 4 * 8192 // 400


def test_the_prediction_log_never_follows_a_symlink(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    target = tmp_path / "secret"
    target.write_text("keep me\n")
    target.chmod(0o644)
    log = small_log(tmp_path)
    log.path.symlink_to(target)
    with caplog.at_level(logging.WARNING, logger="handlers.metrics"):
        for i in range(3):
            log.write(f"r{i}", b"body", [], 0.001, 200)  # no exception: the request is never failed
    assert target.read_text() == "keep me\n"
    assert target.stat().st_mode & 0o777 == 0o644
    assert log.path.is_symlink()
    assert [r.getMessage() for r in caplog.records] == [
        f"prediction log {log.path}: is a symbolic link: not followed, records are skipped"
    ]


def test_the_prediction_log_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    fifo = small_log(tmp_path, name="fifo")
    os.mkfifo(fifo.path)
    fifo.write("r", b"body", [], 0.001, 200)  # would block forever if opened without O_NONBLOCK
    directory = small_log(tmp_path, name="dir")
    directory.path.mkdir()
    directory.write("r", b"body", [], 0.001, 200)
    linked = small_log(tmp_path, name="linked")
    (tmp_path / "elsewhere").write_text("")
    os.link(tmp_path / "elsewhere", linked.path)
    linked.write("r", b"body", [], 0.001, 200)
    assert (tmp_path / "elsewhere").read_text() == ""
    assert [sorted(log._warned) for log in (fifo, directory, linked)] == [["special"], ["special"], ["links"]]


def test_the_prediction_log_is_created_0600_and_an_open_one_of_ours_is_closed_to_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old_umask = os.umask(0)
    try:
        fresh = small_log(tmp_path, name="fresh.jsonl")
        fresh.write("r", b"body", [], 0.001, 200)
    finally:
        os.umask(old_umask)
    assert fresh.path.stat().st_mode & 0o777 == 0o600
    opened = small_log(tmp_path, name="open.jsonl")
    opened.path.write_text("")
    opened.path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="handlers.metrics"):
        opened.write("r", b"body", [], 0.001, 200)
    assert opened.path.stat().st_mode & 0o777 == 0o600
    assert json.loads(opened.path.read_text())["request_id"] == "r"
    assert caplog.records[0].getMessage().endswith(": had mode 0644: set to 0600")


def test_a_prediction_log_that_cannot_be_written_never_fails_the_request(tmp_path: Path) -> None:
    log = small_log(tmp_path / "missing-directory")
    log.write("r", b"body", [], 0.001, 200)
    assert sorted(log._warned) == [f"errno {errno.ENOENT}"]


def test_the_spec_takes_the_prediction_log_cap_and_checks_it() -> None:
    monitoring = Monitoring.from_dict({"prediction_log": {"sample_rate": 0.5, "max_bytes": 1 << 20, "backups": 1}})
    assert monitoring.to_dict()["prediction_log"] == {"sample_rate": 0.5, "include_input": False,
                                                      "path": "servekit_predictions.jsonl", "max_bytes": 1 << 20,
                                                      "backups": 1}  # fmt: skip
    assert PredictionLogConfig().max_bytes * (PredictionLogConfig().backups + 1) == 256 * 1024 * 1024
    with pytest.raises(ValueError, match="prediction_log.backups: must be a whole number of rotated files kept"):
        Monitoring.from_dict({"prediction_log": {"backups": 101}})


def test_monitoring_settings_are_validated() -> None:
    assert Monitoring.from_dict(None).to_dict() == {"slo_p99_ms": 250.0, "drift_threshold": 0.25,
                                                    "drift_min_samples": 100}  # fmt: skip
    with pytest.raises(ValueError, match="slo_p99_ms: must be a number > 0"):
        Monitoring.from_dict({"slo_p99_ms": 0})
    with pytest.raises(ValueError, match="drift_window: unknown key in monitoring"):
        Monitoring.from_dict({"drift_window": "1h"})


# ------------------------------------------------------------------------------------------ the exporter
WORKER = """
import sys
from handlers.metrics import HandlerMetrics
m = HandlerMetrics("digits", "1.0")
for _ in range(int(sys.argv[1])):
    m.request(200, 0.004)
    m.prediction("3", 0.97)
m.request(400, 0.001, "InvalidInput")
"""


class FakeManagement:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def models(self) -> list[str]:
        if self.fail:
            raise requests.ConnectionError("refused")
        return ["digits"]

    def describe(self, name: str, version: str, timeout: float = 10) -> list[dict]:
        versions = [
            {"modelVersion": "1.0", "modelUrl": "digits_v1.0.mar", "jobQueueStatus": {"pendingRequests": 3},
             "workers": [{"status": "READY"}, {"status": "READY"}, {"status": "UNLOADING"}]},
            {"modelVersion": "2.0", "modelUrl": "digits_v2.0.mar", "jobQueueStatus": {"pendingRequests": 0},
             "workers": []},
        ]  # fmt: skip
        return versions if version == "all" else versions[:1]


def scrape(page: bytes) -> dict[tuple, float]:
    samples = {}
    for family in text_string_to_metric_families(page.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_workers_in_separate_processes_are_summed_by_the_exporter(tmp_path: Path, repo_root: Path) -> None:
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(repo_root), "PATH": "/usr/bin:/bin"}
    for count in (5, 7):  # two workers of one version, each its own process (and both gone now)
        subprocess.run([sys.executable, "-c", WORKER, str(count)], env=env, check=True, timeout=60)
    gateway = SimpleNamespace(client=FakeManagement(fail=True))
    samples = scrape(exporter.render(gateway, tmp_path))
    labels = (("model", "digits"), ("version", "1.0"))
    assert samples[("servekit_requests_total", (("code", "200"), *labels))] == 12
    assert samples[("servekit_errors_total", (("code", "400"), *labels[:1], ("type", "InvalidInput"), labels[1]))] == 2
    assert samples[("servekit_request_seconds_count", labels)] == 14
    assert samples[("servekit_request_seconds_bucket", (("le", "0.005"), *labels))] == 14
    assert samples[("servekit_predictions_total", (("class", "3"), *labels))] == 12
    assert samples[("servekit_confidence_bucket", (("le", "0.95"), *labels))] == 0
    assert samples[("servekit_confidence_bucket", (("le", "0.99"), *labels))] == 12
    assert samples[("servekit_exporter_up", ())] == 0  # TorchServe did not answer: the handler metrics still come


def test_the_exporter_publishes_the_serving_state_and_each_archive_reference(model_store: Path) -> None:
    from servekit.serving.oip import Gateway

    gateway = Gateway(FakeManagement(), model_store)
    samples = scrape(exporter.render(gateway, None))
    v1, v2 = (("model", "digits"), ("version", "1.0")), (("model", "digits"), ("version", "2.0"))
    assert samples[("servekit_exporter_up", ())] == 1
    assert samples[("servekit_workers", (("model", "digits"), ("status", "READY"), ("version", "1.0")))] == 2
    assert samples[("servekit_workers", (("model", "digits"), ("status", "UNLOADING"), ("version", "1.0")))] == 1
    assert (samples[("servekit_workers_ready", v1)], samples[("servekit_workers_ready", v2)]) == (2, 0)
    assert (samples[("servekit_queue_pending", v1)], samples[("servekit_queue_pending", v2)]) == (3, 0)
    assert (samples[("servekit_default_version", v1)], samples[("servekit_default_version", v2)]) == (1, 0)
    assert samples[("servekit_slo_p99_seconds", v1)] == 0.25
    assert samples[("servekit_drift_threshold", v2)] == 0.25
    with zipfile.ZipFile(model_store / archive_name("digits", "2.0")) as mar:
        reference = json.loads(mar.read("metadata.json"))["drift_reference"]["classes"]
    for label, share in reference.items():
        assert samples[("servekit_drift_reference_ratio", (("class", label), *v2))] == share


def test_clear_removes_only_metric_files(tmp_path: Path) -> None:
    (tmp_path / "counter_12.db").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("keep")
    exporter.clear(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# ------------------------------------------------------------------------------------------ the reference
@pytest.mark.parametrize("version", ["1.0", "2.0"])
def test_every_archive_carries_a_drift_reference_in_the_handler_bins(model_store: Path, version: str) -> None:
    with zipfile.ZipFile(model_store / archive_name("digits", version)) as mar:
        metadata = json.loads(mar.read("metadata.json"))
    reference = metadata["drift_reference"]
    assert reference["source"] == "digits holdout"
    assert reference["samples"] == metadata["accuracy"]["images"]
    assert sorted(reference["classes"]) == [str(d) for d in range(10)]
    assert sum(reference["classes"].values()) == pytest.approx(1.0, abs=1e-4)
    assert max(reference["classes"].values()) < 0.12  # the held-out split is stratified: about 10 % each
    for key, edges in (("confidence", CONFIDENCE_BUCKETS), ("brightness", BRIGHTNESS_BUCKETS),
                       ("megapixels", MEGAPIXEL_BUCKETS)):  # fmt: skip
        assert reference[key]["edges"] == list(edges)
        assert len(reference[key]["counts"]) == len(edges) + 1
        assert sum(reference[key]["counts"]) == reference["samples"]
    assert metadata["monitoring"] == {"slo_p99_ms": 250.0, "drift_threshold": 0.25, "drift_min_samples": 100}
