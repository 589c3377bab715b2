"""The text classifier example (``examples/text_classifier``): a task and a handler of the user's own.

Neither is in the toolkit: ``text_task.py`` is a ``servekit.build.tasks.Task`` (data, model,
training, INT8, metric, archive files), ``text_handler.py`` a ``handlers.base.BatchHandler``. The
example's spec is built as it is into a temporary store (FP32, and INT8 gated on the held-out
tickets), served by a real TorchServe with the OIP front, and:

* every protocol answers held-out tickets as the archive's program does in this process;
* the base's guarantees hold for the user's handler: a bad request is a 4xx JSON naming the field,
  and fails only itself inside a server-side batch, without a worker restart;
* ``servekit promote`` sends the example's golden tickets (text files) before switching the default.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import torch

from servekit.serving.server import TorchServeProcess
from tests.integration.conftest import Client, default_version, ok, operator_cli, running_torchserve, send_together

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "text_classifier"
TOLERANCE = 1e-4


@dataclass
class Served:
    store: Path
    server: TorchServeProcess
    cli: Callable[..., subprocess.CompletedProcess]
    build_output: str


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    store, cache = tmp_path_factory.mktemp("text_store"), tmp_path_factory.mktemp("text_cache")
    build = subprocess.run(
        [sys.executable, "build_mar.py", "--spec", str(EXAMPLE / "models.yaml"), "--store", str(store),
         "--cache", str(cache)],
        capture_output=True, text=True, timeout=600, check=False, cwd=REPO,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    with running_torchserve(tmp_path_factory.mktemp("text_server"), store, load_models="") as server:
        cli = operator_cli(server, store, REPO, tmp_path_factory.mktemp("text_state"))
        for version in ("1.0", "2.0"):
            ok(cli("register", "tickets", version))
        yield Served(store, server, cli, build.stdout + build.stderr)


@pytest.fixture(scope="module")
def client(served: Served) -> Client:
    return Client(served.server)


def holdout() -> tuple[list[str], list[int]]:
    sys.path.insert(0, str(EXAMPLE))
    try:
        from tickets import tickets
    finally:
        sys.path.remove(str(EXAMPLE))
    return tickets("holdout")


def program_answers(store: Path, version: str, texts: list[str]) -> tuple[list[str], list[float]]:
    """What the archive's own program answers, tokenized with the archive's vocab.json in this process."""
    with zipfile.ZipFile(store / f"tickets_v{version}.mar") as archive:
        program = torch.jit.load(io.BytesIO(archive.read("model.pt")))
        vocab = json.loads(archive.read("vocab.json"))
        labels = json.loads(archive.read("labels.json"))
        support = archive.read("text_support.py").decode()
    namespace: dict = {}
    exec(compile(support, "text_support.py", "exec"), namespace)  # the archive's own tokenizer
    ids = torch.tensor([namespace["encode"](t, vocab, 32) for t in texts])
    with torch.inference_mode():
        probabilities = torch.softmax(program(ids).float(), dim=1)
    scores, indices = probabilities.max(dim=1)
    return [labels[i] for i in indices.tolist()], scores.tolist()


def test_both_versions_are_built_and_int8_is_gated_on_the_held_out_tickets(served: Served) -> None:
    with zipfile.ZipFile(served.store / "tickets_v2.0.mar") as archive:
        metadata = json.loads(archive.read("metadata.json"))
        names = set(archive.namelist())
    accuracy = metadata["accuracy"]
    assert {"text_handler.py", "vocab.json", "text_support.py", "labels.json"} <= names
    assert accuracy["texts"] == len(holdout()[0])
    assert accuracy["accuracy"] >= 90.0
    assert accuracy["fp32_accuracy"] - accuracy["accuracy"] <= accuracy["gate"]["max_accuracy_drop"]
    assert "accuracy gate passed" in served.build_output


@pytest.mark.parametrize("version", ["1.0", "2.0"])
def test_predictions_answer_held_out_tickets_as_the_archives_program(
    served: Served, client: Client, version: str
) -> None:
    texts, labels = holdout()
    texts, labels = texts[:40], labels[:40]
    expected_labels, expected_scores = program_answers(served.store, version, texts)
    answers = [client.predict(f"tickets/{version}", data=text.encode()) for text in texts[:8]]
    for answer, label, score in zip(answers, expected_labels, expected_scores, strict=False):
        assert answer.status_code == 200, answer.text
        top = answer.json()["predictions"][0]
        assert top["label"] == label
        assert abs(top["probability"] - score) < TOLERANCE
    many = client.predict(f"tickets/{version}", json={"texts": texts})
    assert many.status_code == 200, many.text
    got = [p["label"] for p in many.json()["predictions"]]
    assert got == expected_labels
    queues = ["billing", "delivery", "technical", "account"]
    right = sum(g == queues[y] for g, y in zip(got, labels, strict=True))
    assert right >= 0.85 * len(texts)


def test_kserve_v1_and_oip_give_the_same_answers(served: Served, client: Client) -> None:
    texts = holdout()[0][:10]
    expected, _ = program_answers(served.store, "1.0", texts)
    v1 = requests.post(
        served.server.url("oip_http", "/v1/models/tickets:predict"),
        json={"instances": [texts[0], *({"text": t} for t in texts[1:])]},
        headers=served.server.headers("inference"), timeout=60,
    )  # fmt: skip
    default = default_version(served.cli, "tickets")
    assert v1.status_code == 200, v1.text
    assert [p["label"] for p in v1.json()["predictions"]] == program_answers(served.store, default, texts)[0]
    oip = requests.post(
        served.server.url("oip_http", "/v2/models/tickets/versions/1.0/infer"),
        json={"id": "t-1", "inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]},
        headers=served.server.headers("inference"), timeout=60,
    )  # fmt: skip
    assert oip.status_code == 200, oip.text
    outputs = {o["name"]: o["data"] for o in oip.json()["outputs"]}
    assert outputs["label"] == expected
    assert oip.json()["id"] == "t-1"


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"texts": []}, 400, "texts must be a non-empty list"),
        ({"texts": ["ok"] * 65}, 413, "the limit is 64"),
        ({"text": "x" * 4001}, 413, "4001 characters"),
        ({"message": "hello"}, 400, '{"text": "..."}'),
        ({"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, 400, "must be BYTES"),
        ({"inputs": [{"name": "words", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}, 400, "unknown input"),
    ],
)
def test_a_bad_request_fails_alone_in_its_batch_without_a_restart(
    client: Client, body: dict, status: int, words: str
) -> None:
    pids = client.worker_pids("tickets", "1.0")
    good = {"text": "my parcel has not arrived"}
    answers = send_together([body, good, good], lambda b: client.predict("tickets/1.0", json=b))
    assert answers[0].status_code == status, answers[0].text
    assert answers[0].json()["code"] == status
    assert words in answers[0].json()["error"]
    assert [a.status_code for a in answers[1:]] == [200, 200]
    assert all(a.json()["predictions"][0]["label"] == "delivery" for a in answers[1:])
    assert client.worker_pids("tickets", "1.0") == pids


def test_promote_sends_the_golden_tickets_first(served: Served) -> None:
    out = ok(served.cli("promote", "tickets", "2.0"))
    assert "golden set 4/4 correct" in out
    assert default_version(served.cli, "tickets") == "2.0"
