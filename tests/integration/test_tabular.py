"""The tabular model (``breast_cancer``) against a real TorchServe: every input form, hostile records, promotion.

* a JSON record, a list of records, KServe v1 and OIP (JSON and binary tensors) answer exactly what
  the archive's program computes in this process, FP32 and INT8;
* every case of ``tests/hostile_corpus_tabular.py`` gets its 4xx naming the record and the
  feature, alone and in server-side batches beside good requests (which are answered right), and
  no worker restarts;
* ``servekit promote`` sends the archive's JSON golden records before switching the default, and
  ``servekit rollback`` goes back through the same gate.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from handlers.model_loading import load_model
from handlers.tabular import TabularConfig
from servekit.build.tabular import breast_cancer
from servekit.serving.server import TorchServeProcess
from servekit.serving.store import archive_name
from tests import hostile_corpus_tabular as corpus
from tests.integration.conftest import Client, default_version, ok, operator_cli, running_torchserve, send_together

pytestmark = pytest.mark.integration

MODEL = "breast_cancer"
BATCH_MODEL = "breast_cancer_batch"  # the same archive registered again with a long batch delay
BATCH = 8
TOLERANCE = 2e-6  # answers are rounded to 6 decimals
# The worker calls the model on at most batchSize records at a time (models.yaml: serving.batch_size); INT8
# (dynamic quantization) picks its activation scale per call, so the same records must share the same calls.
CHUNK = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> Iterator[TorchServeProcess]:
    workdir = tmp_path_factory.mktemp("tabular")
    with running_torchserve(workdir, model_store, load_models=archive_name(MODEL, "1.0"), oip=False) as torchserve:
        yield torchserve


@pytest.fixture(scope="module")
def client(server: TorchServeProcess) -> Client:
    return Client(server)


@pytest.fixture(scope="module")
def programs(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Each version's program as its worker loads it."""
    import zipfile

    loaded = {}
    for version in ("1.0", "2.0"):
        folder = tmp_path_factory.mktemp(f"program{version}")
        with zipfile.ZipFile(model_store / archive_name(MODEL, version)) as mar:
            mar.extractall(folder)
        config = TabularConfig.from_dict(yaml.safe_load((folder / "model-config.yaml").read_text())["handler"])
        loaded[version] = load_model(folder / "model.pt", config)
    return loaded


def held_out(count: int = 40) -> list[dict]:
    data = breast_cancer("holdout")
    return [dict(zip(data.feature_names, map(float, row), strict=True)) for row in data.x[:count]]


def expected(program, records: list[dict]) -> tuple[list[int], list[float]]:
    """Top-1 index and probability of each record, in the model calls the worker makes for one request."""
    indices, probabilities = [], []
    for start in range(0, len(records), CHUNK):
        rows = torch.tensor(corpus.as_rows(records[start : start + CHUNK]), dtype=torch.float32)
        with torch.inference_mode():
            p, i = torch.softmax(program(rows), 1).max(1)
        indices += i.tolist()
        probabilities += p.tolist()
    return indices, probabilities


def send(client: Client, case: corpus.TabularCase, model: str = MODEL, version: str | None = None):
    return client.api.send("inference", "POST", corpus.route(case, model, version), data=case.body,
                           headers=case.headers, timeout=60)  # fmt: skip


def answers(response, route: str) -> tuple[list[int], list[float]]:
    """(indices, probabilities) of a servekit or KServe v1 answer, or of an OIP one (JSON or binary)."""
    assert response.status_code == 200, response.text
    if route == corpus.V2:
        return oip_answers(response.content, dict(response.headers))
    predictions = response.json()["predictions"]
    return [p["index"] for p in predictions], [p["probability"] for p in predictions]


def oip_answers(body: bytes, headers: dict[str, str]) -> tuple[list[int], list[float]]:
    length = {k.lower(): v for k, v in headers.items()}.get("inference-header-content-length")
    header_length = int(length) if length is not None else len(body)
    document = json.loads(body[:header_length])
    offset, found = header_length, {}
    for output in document["outputs"]:
        assert output["shape"][1] == 1
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is None:
            found[output["name"]] = output["data"]
            continue
        raw, offset = body[offset : offset + size], offset + size
        if output["datatype"] == "FP32":
            found[output["name"]] = np.frombuffer(raw, "<f4").tolist()
        elif output["datatype"] == "INT64":
            found[output["name"]] = np.frombuffer(raw, "<i8").tolist()
    return found["indices"], found["scores"]


def check_agreement(client: Client, programs: dict, version: str, route_version: str | None) -> int:
    """Every form against ``version``'s program in process; returns the number of records compared."""
    records = held_out()
    indices, probabilities = expected(programs[version], records)
    tolerance = TOLERANCE
    forms = {
        "list": (corpus.PREDICTIONS, corpus.dumps(records), {"Content-Type": corpus.JSON_TYPE}),
        "list-no-content-type": (corpus.PREDICTIONS, corpus.dumps(records), {}),
    }
    if route_version is None:  # KServe v1 and OIP reach the default version
        body, headers = corpus.oip_binary(np.array(corpus.as_rows(records), dtype=np.float32))
        forms |= {
            "kserve-v1": (corpus.V1, corpus.dumps({"instances": records}), {"Content-Type": corpus.JSON_TYPE}),
            "kserve-v1-lists": (
                corpus.V1,
                corpus.dumps({"instances": corpus.as_rows(records)}),
                {"Content-Type": corpus.JSON_TYPE},
            ),  # fmt: skip
            "oip-json": (corpus.V2, corpus.oip_json(corpus.as_rows(records)), {"Content-Type": corpus.JSON_TYPE}),
            "oip-binary": (corpus.V2, body, headers),
        }
    for name, (route, body, headers) in forms.items():
        case = corpus.TabularCase(name, route, body, headers, 200)
        got_indices, got_probabilities = answers(send(client, case, version=route_version), route)
        assert got_indices == indices, name
        assert got_probabilities == pytest.approx(probabilities, abs=tolerance), name
    for record in records[:5]:
        (index,), (probability,) = expected(programs[version], [record])
        case = corpus.TabularCase(
            "record", corpus.PREDICTIONS, corpus.dumps(record), {"Content-Type": corpus.JSON_TYPE}
        )
        response = send(client, case, version=route_version)
        assert response.json()["predictions"] == [
            {
                "label": ["malignant", "benign"][index],
                "index": index,
                "probability": pytest.approx(probability, abs=tolerance),
            }
        ]
        assert response.json()["version"] == version
    return len(records)


# ------------------------------------------------------------------------------------------ answers
def test_every_form_answers_what_the_fp32_program_computes(client: Client, programs: dict) -> None:
    assert check_agreement(client, programs, "1.0", None) == 40
    assert check_agreement(client, programs, "1.0", "1.0") == 40


# ------------------------------------------------------------------------------------------ hostile
def test_every_hostile_request_fails_alone_and_no_worker_restarts(client: Client) -> None:
    pids = client.worker_pids(MODEL, "1.0")
    for case in corpus.corpus():
        response = send(client, case)
        assert response.status_code == case.status, (case.name, response.status_code, response.text)
        body = response.json()
        assert body["code"] == case.status, case.name
        assert case.phrase in body["error"], (case.name, body["error"])
    assert client.worker_pids(MODEL, "1.0") == pids


def test_hostile_requests_in_server_side_batches_fail_alone(client: Client) -> None:
    with client.one_batch_copy(archive_name(MODEL, "1.0"), BATCH_MODEL, "1.0", BATCH):
        good, hostile = corpus.good_requests(), list(corpus.corpus())
        groups = [hostile[i : i + BATCH // 2] for i in range(0, len(hostile), BATCH // 2)]
        for group in groups:
            batch = [case for pair in zip(group, good[: len(group)], strict=True) for case in pair]
            batch += good[: BATCH - len(batch)]  # the last group: fill the batch with good requests
            responses = send_together(batch, lambda case: send(client, case, BATCH_MODEL))
            for case, response in zip(batch, responses, strict=True):
                assert response.status_code == case.status, (case.name, response.text)
                if case.status != 200:
                    assert case.phrase in response.json()["error"], case.name
                elif case.route == corpus.V2:
                    assert corpus.oip_labels(response.content, dict(response.headers)) == list(case.labels)
                else:
                    assert [p["label"] for p in response.json()["predictions"]] == list(case.labels), case.name


# ------------------------------------------------------------------------------------------ promotion
@pytest.fixture
def cli(server: TorchServeProcess, model_store: Path, repo_root: Path, tmp_path: Path):
    return operator_cli(server, model_store, repo_root, tmp_path)


def test_promote_and_rollback_pass_the_json_golden_set(cli, client: Client, programs: dict) -> None:
    golden = len(corpus.golden())
    assert "registered breast_cancer 2.0" in ok(cli("register", MODEL, "2.0"))
    started = time.monotonic()
    assert f"golden set {golden}/{golden} correct" in ok(cli("promote", MODEL, "2.0"))
    assert default_version(cli, MODEL) == "2.0"
    assert time.monotonic() - started < 30
    # Now the default: every form, KServe v1 and OIP included, reaches the INT8 version.
    assert check_agreement(client, programs, "2.0", None) == 40
    rolled = ok(cli("rollback", MODEL))
    assert f"rolled back breast_cancer: default is 1.0 again (was 2.0; golden set {golden}/{golden} correct)" in rolled
    assert default_version(cli, MODEL) == "1.0"
