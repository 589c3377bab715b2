"""Hostile OIP v2 and KServe v1 requests against a real TorchServe: each one costs a clear 4xx, alone.

Every case of ``tests/hostile_corpus_oip.py`` is sent on TorchServe's own protocol routes
(``POST /v2/models/NAME/infer``, ``POST /v1/models/NAME:predict``, inference token):

1. alone, to the default registration ``digits`` (1.0): the exact status, a JSON body whose
   ``error`` holds the case's phrase (``code`` and ``type`` matching the status);
2. mixed into real batches: four hostile requests and four good ones (``good_request``: JSON and
   binary images, three images in one request, FP32 pixels in JSON and binary, KServe v1) at once,
   from a bounded thread pool, to a second registration of the same archive with
   ``batch_size=8&max_batch_delay=20000``. The batch can only be dispatched once all 8 have arrived,
   so 8 answers well within 20 s mean one batch: every good request must still read its digits
   and every hostile one get its own 4xx.

Finally the worker processes must be the ones of the baseline (no crash, no restart), their memory
bounded, and no request may have been lost (no answer, or a 5xx). The counts are printed (visible
with ``-s``) and written to ``oip_hostile_summary.json`` in pytest's base temp directory, like
``test_hostile_inputs.py``'s summary.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import requests

from servekit.serving.server import TorchServeProcess
from tests.hostile_corpus_oip import BINARY_HEADER, V1, GoodRequest, OipCase, corpus, good_request, summary
from tests.integration import survival
from tests.integration.conftest import Client, running_torchserve
from tests.integration.survival import Workers, publish, survival_report

pytestmark = pytest.mark.integration

MODEL = "digits"
BATCH_MODEL = "digits_oip_batch"
VERSION = "1.0"
BATCH_SIZE = 8
BATCH_DELAY_MS = 20_000
HOSTILE_PER_BATCH = 4
DEFAULT_TOPK = 3  # models.yaml: digits topk
MEMORY_GROWTH_LIMIT_MB = 150
REQUEST_TIMEOUT_S = 60

Request = OipCase | GoodRequest


# ------------------------------------------------------------------------------------ checking
def problems_with(case: OipCase, response: requests.Response) -> list[str]:
    """What is wrong with ``response`` as the answer to ``case`` (empty: it is right)."""
    if response.status_code != case.status:
        return [f"status {response.status_code}, expected {case.status}: {response.text[:300]!r}"]
    found = []
    if not response.headers.get("Content-Type", "").startswith("application/json"):
        found.append(f"Content-Type {response.headers.get('Content-Type')!r}, expected application/json")
    try:
        body = response.json()
    except ValueError:
        return [*found, f"body is not JSON: {response.content[:200]!r}"]
    if not isinstance(body, dict):
        return [*found, f"body is not a JSON object: {body!r}"]
    error = body.get("error")
    if (body.get("code"), body.get("type")) != (case.status, case.error_type):
        found.append(f"body {body!r}, expected code {case.status} type {case.error_type}")
    if not isinstance(error, str) or case.phrase.lower() not in error.lower():
        found.append(f"error {error!r} does not say {case.phrase!r}")
    elif not error.isascii() or len(error) > 1000:
        found.append(f"error is not short ASCII: {len(error)} chars")
    return found


def labels_of(good: GoodRequest, response: requests.Response) -> tuple[list[list[str]], dict]:
    """The top-k labels of each element of the answer to ``good``, and the answer's JSON document."""
    if good.route == V1:
        body = response.json()
        return [[p["label"] for p in element] for element in body["predictions"]], body
    if good.binary_output:
        length = int(response.headers[BINARY_HEADER])
        document = json.loads(response.content[:length])
        offset, blobs = length, {}
        for output in document["outputs"]:
            size = output["parameters"]["binary_data_size"]
            blobs[output["name"]] = response.content[offset : offset + size]
            offset += size
        assert offset == len(response.content), "bytes left after the last binary output"
        raw, flat = blobs["labels"], []
        while raw:
            (size,) = struct.unpack_from("<I", raw)
            flat.append(raw[4 : 4 + size].decode())
            raw = raw[4 + size :]
    else:
        document = response.json()
        flat = next(o for o in document["outputs"] if o["name"] == "labels")["data"]
    labels = next(o for o in document["outputs"] if o["name"] == "labels")
    rows, k = labels["shape"]
    assert len(flat) == rows * k, labels
    return [flat[i * k : (i + 1) * k] for i in range(rows)], document


def good_problems(good: GoodRequest, response: requests.Response) -> list[str]:
    if response.status_code != 200:
        return [f"status {response.status_code}: {response.text[:300]!r}"]
    try:
        rows, document = labels_of(good, response)
    except (ValueError, KeyError, StopIteration, AssertionError, struct.error) as exc:
        return [f"unreadable answer ({type(exc).__name__}: {exc}): {response.content[:300]!r}"]
    expected_k = 2 if "images_3" in good.label else DEFAULT_TOPK
    top = [row[0] if row else None for row in rows]
    if top != [str(d) for d in good.digits] or any(len(row) != expected_k for row in rows):
        return [f"expected digits {list(good.digits)} (top {expected_k}), got {rows}"]
    if document.get("model_version") != VERSION:
        return [f"model_version {document.get('model_version')!r}, expected {VERSION}"]
    return []


# ------------------------------------------------------------------------------------ bookkeeping
@dataclass
class Ledger(survival.Ledger):
    """Every request this module sends, and what became of it."""

    cases: set[str] = field(default_factory=set)


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> Iterator[TorchServeProcess]:
    """A TorchServe of this module's own; its OIP front is not needed (TorchServe's own routes are sent to)."""
    workdir = tmp_path_factory.mktemp("torchserve_oip_hostile")
    with running_torchserve(workdir, model_store, load_models=f"digits_v{VERSION}.mar", oip=False) as process:
        yield process


@pytest.fixture(scope="module")
def client(server: TorchServeProcess) -> Client:
    client = Client(server)
    response = client.manage(
        "POST",
        f"/models?url=digits_v{VERSION}.mar&model_name={BATCH_MODEL}&batch_size={BATCH_SIZE}"
        f"&max_batch_delay={BATCH_DELAY_MS}&initial_workers=1&synchronous=true",
    )
    assert response.status_code == 200, response.text
    described = client.manage("GET", f"/models/{BATCH_MODEL}/{VERSION}").json()[0]
    assert (described["batchSize"], described["maxBatchDelay"]) == (BATCH_SIZE, BATCH_DELAY_MS)
    return client


def send(client: Client, model: str, request: Request) -> requests.Response:
    return client.api.send(
        "inference",
        "POST",
        request.path(model),
        timeout=REQUEST_TIMEOUT_S,
        data=request.body,
        headers=dict(request.headers),
    )


def send_batch(client: Client, batch: list[Request]) -> tuple[list[requests.Response | BaseException], float]:
    """Send all at once (one thread each, at most ``BATCH_SIZE``) to the batch registration."""

    def post(request: Request) -> requests.Response | BaseException:
        try:
            return send(client, BATCH_MODEL, request)
        except requests.RequestException as exc:
            return exc

    assert len(batch) <= BATCH_SIZE
    started = time.monotonic()
    with ThreadPoolExecutor(len(batch)) as pool:
        answers = list(pool.map(post, batch))
    return answers, time.monotonic() - started


def worker_pids(client: Client, model: str) -> list[int]:
    described = client.manage("GET", f"/models/{model}/{VERSION}").json()[0]
    assert all(w["status"] == "READY" for w in described["workers"]), described["workers"]
    return sorted(int(w["pid"]) for w in described["workers"])


def snapshot(client: Client) -> Workers:
    pids = {model: worker_pids(client, model) for model in (MODEL, BATCH_MODEL)}
    rss = {pid: psutil.Process(pid).memory_info().rss for model_pids in pids.values() for pid in model_pids}
    return Workers(pids, rss)


@pytest.fixture(scope="module")
def baseline(client: Client) -> Workers:
    """Worker pids and memory after warm-up: every good form alone, then full batches of good ones."""
    for index in range(10):
        good = good_request(index)
        assert good_problems(good, send(client, MODEL, good)) == [], good.label
    for first in (0, BATCH_SIZE):
        goods = [good_request(first + i) for i in range(BATCH_SIZE)]
        answers, _ = send_batch(client, goods)
        for good, answer in zip(goods, answers, strict=True):
            assert not isinstance(answer, BaseException), answer
            assert good_problems(good, answer) == [], good.label
    return snapshot(client)


@pytest.fixture(scope="module")
def ledger() -> Ledger:
    return Ledger()


CASES = corpus()
BATCH_GROUPS = [list(CASES[i : i + HOSTILE_PER_BATCH]) for i in range(0, len(CASES), HOSTILE_PER_BATCH)]


# ------------------------------------------------------------------------------------ the tests
@pytest.mark.parametrize("case", [pytest.param(case, id=case.name) for case in CASES])
def test_single_request(client: Client, baseline: Workers, ledger: Ledger, case: OipCase) -> None:
    ledger.cases.add(case.name)
    ledger.single += 1
    label = f"single {case.route} {case.name}"
    try:
        response = send(client, MODEL, case)
    except requests.RequestException as exc:
        ledger.record(label, exc, [])
        raise
    problems = problems_with(case, response)
    ledger.record(label, response, problems)
    assert problems == []
    assert worker_pids(client, MODEL) == baseline.pids[MODEL], f"a worker restarted after {case.name}"


@pytest.mark.parametrize(
    "group",
    BATCH_GROUPS,
    ids=[f"{i:02d}-" + "+".join(case.name for case in g)[:80] for i, g in enumerate(BATCH_GROUPS)],
)
def test_mixed_batch(client: Client, baseline: Workers, ledger: Ledger, group: list[OipCase]) -> None:
    # Alternate hostile and good requests; fill up to exactly BATCH_SIZE with good ones.
    goods = iter(range(ledger.in_batches, ledger.in_batches + BATCH_SIZE))
    batch: list[Request] = []
    for case in group:
        batch += [case, good_request(next(goods))]
    while len(batch) < BATCH_SIZE:
        batch.append(good_request(next(goods)))

    answers, elapsed = send_batch(client, batch)

    ledger.batches += 1
    ledger.in_batches += len(batch)
    failures = []
    for request, answer in zip(batch, answers, strict=True):
        label = f"batch {request.route} {request.name}" if isinstance(request, OipCase) else f"batch {request.label}"
        if isinstance(answer, BaseException):
            problems = [f"no answer: {answer!r}"]
        elif isinstance(request, OipCase):
            problems = problems_with(request, answer)
        else:
            problems = good_problems(request, answer)
        ledger.record(label, answer, problems)
        failures += [f"{label}: {p}" for p in problems]
    assert failures == []
    assert elapsed < BATCH_DELAY_MS / 1000 * 0.75, f"the {BATCH_SIZE} requests did not form one batch ({elapsed:.1f}s)"
    assert worker_pids(client, BATCH_MODEL) == baseline.pids[BATCH_MODEL], "a batch worker restarted"


def test_workers_survived_with_bounded_memory(
    client: Client, baseline: Workers, ledger: Ledger, tmp_path_factory: pytest.TempPathFactory
) -> None:
    after = snapshot(client)
    server_errors = {str(code): n for code, n in ledger.statuses.items() if code >= 500}
    report = survival_report(
        ledger, baseline, after,
        cases=len(CASES), cases_tried=len(ledger.cases), cases_by_route_and_status=summary(),
    )  # fmt: skip
    headline = f"OIP / KServe v1 hostile requests: {report['cases_tried']} of {report['cases']} cases"
    publish(report, "oip_hostile_summary.json", tmp_path_factory, headline, BATCH_SIZE)
    growth_mb = report["worker_rss_growth_mb"]

    assert after.pids == baseline.pids, "a worker died or restarted"
    assert server_errors == {}, f"5xx answers: {server_errors}"
    assert ledger.lost == []
    assert ledger.mismatched == []
    for pid, mb in growth_mb.items():
        assert mb < MEMORY_GROWTH_LIMIT_MB, f"worker {pid} grew by {mb:.0f} MB"
    # And it still serves, on both routes.
    for index in (0, 5):
        good = good_request(index)
        assert good_problems(good, send(client, MODEL, good)) == [], good.label
