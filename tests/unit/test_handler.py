"""The ImageClassifier handler, loaded from the built archives with a fake TorchServe context."""

from __future__ import annotations

import base64
import importlib
import json
import os
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import torch
from ts.utils.util import list_classes_from_module

from handlers import cpu_budget
from handlers.cpu_budget import ENV_REGISTRY
from handlers.image_classifier import ImageClassifier
from servekit.serving.store import archive_name
from tests.fake_context import FakeContext

VERSIONS = {"1.0": "fp32", "2.0": "int8"}


def extract(store: Path, version: str, into: Path) -> Path:
    archive = store / archive_name("digits", version)
    target = into / f"digits_v{version}"
    with zipfile.ZipFile(archive) as mar:
        mar.extractall(target)
    return target


def make_context(model_dir: Path, batch_size: int | None = None, **yaml_overrides) -> FakeContext:
    return FakeContext.from_archive(model_dir, batch_size, **yaml_overrides)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mar")
    return {version: extract(model_store, version, root) for version in VERSIONS}


@pytest.fixture(scope="module", params=list(VERSIONS))
def loaded(request: pytest.FixtureRequest, model_dirs: dict[str, Path]) -> tuple[ImageClassifier, FakeContext]:
    context = make_context(model_dirs[request.param])
    handler = ImageClassifier()
    handler.initialize(context)
    return handler, context


@pytest.fixture
def handler(loaded: tuple[ImageClassifier, FakeContext]) -> ImageClassifier:
    return loaded[0]


@pytest.fixture
def context(loaded: tuple[ImageClassifier, FakeContext]) -> FakeContext:
    loaded[1].reset()
    return loaded[1]


def sample(n: int) -> bytes:
    return (Path(__file__).resolve().parents[2] / "samples" / f"digit_{n}.png").read_bytes()


# ------------------------------------------------------------------------------------ initialize
@pytest.mark.parametrize("version", list(VERSIONS))
def test_initialize_loads_the_archive_and_warms_up_every_batch_size(
    model_dirs: dict[str, Path], version: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    context = make_context(model_dirs[version], batch_size=4)
    handler = ImageClassifier()
    warmed: list[int] = []
    real_inference = handler.inference

    def spy(items):
        warmed.append(len(items))
        return real_inference(items)

    monkeypatch.setattr(handler, "inference", spy)
    assert not handler.initialized

    handler.initialize(context)

    assert handler.initialized
    assert handler.warmup_rounds >= 1
    # Every batch size on the model alone, then the warm-up requests (a JPEG and a PNG) through handle.
    tensors = [size for size in (1, 2, 3, 4) for _ in range(handler.warmup_rounds)]
    assert warmed == tensors + [2] * handler.warmup_rounds
    assert (handler.model_name, handler.model_version) == ("digits", version)
    assert handler.settings.precision == VERSIONS[version]
    assert handler.labels == [str(i) for i in range(10)]
    assert handler.topk == 3
    assert handler.batch_size == 4
    assert handler.preprocessing.input_shape == (1, 16, 16)
    assert context.statuses == {}  # warm-up sends no responses


def test_the_two_versions_really_differ_in_precision(model_dirs: dict[str, Path]) -> None:
    fp32, int8 = (make_context(model_dirs[v]).model_yaml_config["handler"] for v in VERSIONS)

    assert (fp32["precision"], int8["precision"]) == ("fp32", "int8")
    assert int8["quantized_engine"] == "x86"
    assert (model_dirs["2.0"] / "model.pt").stat().st_size < (model_dirs["1.0"] / "model.pt").stat().st_size / 2


# ------------------------------------------------------------------------------------ predictions
@pytest.mark.parametrize("digit", range(10))
def test_every_sample_digit_is_recognised(handler: ImageClassifier, context: FakeContext, digit: int) -> None:
    (response,) = handler.handle([{"body": sample(digit)}], context)

    assert context.statuses == {}
    assert response["predictions"][0]["label"] == str(digit)
    assert response["predictions"][0]["index"] == digit


def test_response_shape(handler: ImageClassifier, context: FakeContext) -> None:
    (response,) = handler.handle([{"data": bytearray(sample(7))}], context)

    assert set(response) == {"predictions", "model", "version"}
    assert response["model"] == "digits"
    assert response["version"] == handler.model_version
    predictions = response["predictions"]
    assert len(predictions) == 3  # topk from model-config.yaml
    for prediction in predictions:
        assert set(prediction) == {"label", "index", "probability"}
        assert prediction["label"] == str(prediction["index"])
        assert isinstance(prediction["probability"], float)
        assert 0.0 <= prediction["probability"] <= 1.0
    probabilities = [p["probability"] for p in predictions]
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) <= 1.0 + 1e-5
    assert len({p["index"] for p in predictions}) == 3
    assert context.content_types == {0: "application/json"}
    assert json.loads(json.dumps(response)) == response  # JSON-serialisable as is


def test_topk_override_per_request(handler: ImageClassifier, context: FakeContext) -> None:
    encoded = base64.b64encode(sample(3)).decode()
    requests = [
        {"body": {"data": encoded, "topk": 5}},  # JSON field
        {"data": sample(3), "topk": bytearray(b"1")},  # multipart field
        {"body": sample(3)},  # the default
        {"body": {"data": encoded, "topk": 10}},
    ]

    responses = handler.handle(requests, context)

    assert [len(r["predictions"]) for r in responses] == [5, 1, 3, 10]
    assert context.statuses == {}
    # A longer list extends a shorter one: same ranking whatever k is.
    assert responses[0]["predictions"][:3] == responses[2]["predictions"]
    assert responses[1]["predictions"] == responses[2]["predictions"][:1]
    assert responses[3]["predictions"][0]["label"] == "3"


def test_bad_topk_fails_only_its_request(handler: ImageClassifier, context: FakeContext) -> None:
    responses = handler.handle([{"body": sample(1)}, {"data": sample(1), "topk": b"11"}], context)

    assert responses[0]["predictions"][0]["label"] == "1"
    assert responses[1] == {"error": "topk must be between 1 and 10, got 11", "code": 400, "type": "InvalidInput"}
    assert context.statuses == {1: (400, "topk must be between 1 and 10, got 11")}


def test_a_batch_with_bad_requests_fails_only_those(handler: ImageClassifier, context: FakeContext) -> None:
    requests = [
        {"body": sample(4)},
        {"body": bytes(range(256)) * 4},  # garbage bytes
        {"body": sample(8)},
        {"body": b'{"data": "iVBOR'},  # malformed JSON
        {"body": b""},
    ]

    responses = handler.handle(requests, context)

    assert len(responses) == 5
    assert responses[0]["predictions"][0]["label"] == "4"
    assert responses[2]["predictions"][0]["label"] == "8"
    assert responses[1]["code"] == 415
    assert responses[1]["type"] == "UnsupportedMediaType"
    assert responses[1]["error"].startswith("body is not an image in a supported format")
    assert responses[3]["code"] == 400
    assert responses[3]["type"] == "InvalidInput"
    assert responses[3]["error"].startswith("malformed JSON body: ")
    assert responses[4] == {
        "error": "request body is empty: send the image bytes, a multipart file or JSON",
        "code": 400,
        "type": "InvalidInput",
    }
    assert {idx: code for idx, (code, _) in context.statuses.items()} == {1: 415, 3: 400, 4: 400}
    for idx in (1, 3, 4):
        code, phrase = context.statuses[idx]
        assert 400 <= code < 500
        assert "\n" not in phrase
        assert phrase == " ".join(responses[idx]["error"].split())[:200]
    assert context.content_types == dict.fromkeys(range(5), "application/json")
    # Every answer, failed or not, names the version that served it (the routing plane's canary is visible).
    assert context.response_headers == {i: {"X-Model-Version": handler.model_version} for i in range(5)}


def test_model_failure_gives_every_request_of_the_batch_a_500(
    handler: ImageClassifier, context: FakeContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_model(batch: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(handler, "model", broken_model)
    requests = [{"body": sample(0)}, {"body": b""}, {"body": sample(1)}, {"body": sample(2)}]

    responses = handler.handle(requests, context)

    assert len(responses) == 4
    expected = {"error": "internal error: RuntimeError: kernel exploded", "code": 500, "type": "InferenceError"}
    assert [responses[i] for i in (0, 2, 3)] == [expected] * 3
    assert responses[1]["code"] == 400  # its own failure, from before inference
    assert context.statuses == {
        0: (500, expected["error"]),
        1: (400, responses[1]["error"]),
        2: (500, expected["error"]),
        3: (500, expected["error"]),
    }


def test_model_returning_wrong_batch_size_is_a_500(
    handler: ImageClassifier, context: FakeContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(handler, "model", lambda batch: torch.zeros((1, 10)))

    responses = handler.handle([{"body": sample(0)}, {"body": sample(1)}], context)

    assert [(r["code"], r["type"]) for r in responses] == [(500, "InferenceError")] * 2
    assert responses[0]["error"].startswith("internal error: ")
    assert {idx: code for idx, (code, _) in context.statuses.items()} == {0: 500, 1: 500}


def test_an_empty_batch_gives_no_responses(handler: ImageClassifier, context: FakeContext) -> None:
    assert handler.handle([], context) == []


# ------------------------------------------------------------------------------------ threads
def test_initialize_joins_the_cpu_budget_and_sets_torch_threads(
    model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[int] = []
    monkeypatch.setenv(ENV_REGISTRY, str(tmp_path / "registry"))
    monkeypatch.setattr(cpu_budget, "affinity_cpus", lambda: 12)
    monkeypatch.setattr(cpu_budget, "cgroup_cpu_limit", lambda root=None: None)
    monkeypatch.setattr(torch, "set_num_threads", calls.append)

    ImageClassifier().initialize(make_context(model_dirs["1.0"], batch_size=1, minWorkers=3))
    context = make_context(model_dirs["1.0"], batch_size=1, minWorkers=3)
    context.model_yaml_config["handler"]["threads"] = 2
    ImageClassifier().initialize(context)

    # One live worker (this process) gets the whole budget; serving.threads pins its value.
    assert calls == [12, 2]
    records = [json.loads(p.read_text()) for p in (tmp_path / "registry").glob("*.json")]
    assert [(r["pid"], r["threads"], r["pinned"]) for r in records] == [(os.getpid(), 2, 2)]


def test_a_worker_resizes_between_batches_when_another_joins(
    model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    registry = tmp_path / "registry"
    monkeypatch.setenv(ENV_REGISTRY, str(registry))
    monkeypatch.setattr(cpu_budget, "affinity_cpus", lambda: 4)
    monkeypatch.setattr(cpu_budget, "cgroup_cpu_limit", lambda root=None: None)
    monkeypatch.setattr(cpu_budget, "REFRESH_SECONDS", 0.0)
    monkeypatch.setenv(cpu_budget.ENV_LEND, "1")
    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    handler = ImageClassifier()
    context = make_context(model_dirs["1.0"], batch_size=1)
    handler.initialize(context)
    assert calls == [4]

    other = subprocess.Popen(["sleep", "30"])  # stands in for a second worker process
    try:
        deadline = time.monotonic() + 10
        while cpu_budget.process_start_time(other.pid) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        peer = cpu_budget.CpuBudget("peer", registry=registry, pid=other.pid, lend=True)
        peer.register()
        handler.handle([{"body": sample(3)}], context)
        assert calls == [4]  # a lone request while the peer idles: it borrows the peer's CPUs
        assert peer.claim(requests=4, force=True)[0] == 2  # the peer runs a batch on its own two CPUs
        handler.handle([{"body": sample(3)}], context)
        assert calls == [4, 2]
        peer.release()
        handler.handle([{"body": sample(3)}], context)
        assert calls == [4, 2, 4]  # the peer's batch is over: the lone request borrows again
        peer.claim(requests=4)
        handler.handle([{"body": sample(3)}], context)
        assert calls == [4, 2, 4, 2]
    finally:
        other.kill()
        other.wait()
        peer.unregister()  # the kernel drops a dead worker's locks; the stand-in's are in this process
    handler.handle([{"body": sample(3)}], context)  # the peer died in a batch
    assert calls == [4, 2, 4, 2, 4]


# ------------------------------------------------------------------------------------ TorchServe's contract
def test_handler_module_defines_exactly_one_class() -> None:
    module = importlib.import_module("handlers.image_classifier")

    classes = list_classes_from_module(module)

    assert classes == [ImageClassifier]
    assert ImageClassifier.__module__ == module.__name__


@pytest.mark.parametrize("environ", [{}, {"GOMP_SPINCOUNT": "100000"}, {"OMP_WAIT_POLICY": "PASSIVE"}])
def test_a_lending_worker_without_a_spin_count_says_how_to_start_torchserve(
    environ: dict[str, str],
    model_dirs: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bare ``torchserve --start`` leaves libgomp's long spin: the worker's log says what to set."""
    if cpu_budget.cpu_budget().cpus < 2:
        pytest.skip("nothing is lent on a budget of one CPU")
    for key in cpu_budget.WAIT_ENVS:
        monkeypatch.delenv(key, raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(ENV_REGISTRY, str(tmp_path / "registry"))
    monkeypatch.setenv(cpu_budget.ENV_LEND, "1")
    handler = ImageClassifier()
    with caplog.at_level("WARNING", logger="handlers.base"):
        handler.initialize(make_context(model_dirs["2.0"]))
    handler.cpu.unregister()
    advice = [r.getMessage() for r in caplog.records if "GOMP_SPINCOUNT is not set" in r.getMessage()]
    if environ:
        assert advice == []
    else:
        assert len(advice) == 1
        assert "GOMP_SPINCOUNT=100000" in advice[0]
