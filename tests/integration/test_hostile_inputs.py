"""Hostile inputs against a real TorchServe: bad input never costs more than a clear 4xx.

Every payload of ``tests/hostile_corpus.py`` is sent through every form that applies to it (raw
body, multipart file field ``data``, JSON ``{"data": base64}``; and every image file also as
the one element of a binary OIP BYTES tensor to ``/v2/models/NAME/infer``, expecting the same
answer as the raw form, see ``tests.hostile_corpus.OIP_FORM``):

1. alone, to the default registration ``digits`` (1.0);
2. mixed into real batches: four hostile requests and four good ones at once to a second
   registration of the same archive with ``batch_size=8&max_batch_delay=20000``. The batch can
   only be dispatched when all 8 have arrived, so 8 answers well within 20 s mean one batch.

Each request must get its exact expected status and body (JSON ``error`` saying what was wrong,
or the right digit); good requests in a batch must still read their digit; the worker processes
must be the same ones at the end (no crash, no restart) and their memory must stay bounded.

The counts (payloads, requests, lost) and the memory figures are printed (visible with ``-s``)
and written to ``hostile_inputs_summary.json`` in pytest's base temp directory.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import requests

from servekit.serving.server import TorchServeProcess
from tests.hostile_corpus import JSON_FORM, MULTIPART, OIP_FORM, RAW, Case, corpus, digit_png
from tests.hostile_corpus_oip import oip_image_body
from tests.integration import survival
from tests.integration.conftest import Client, running_torchserve
from tests.integration.survival import Workers, publish, survival_report

MODEL = "digits"
BATCH_MODEL = "digits_hostile_batch"
VERSION = "1.0"
BATCH_SIZE = 8
BATCH_DELAY_MS = 20_000
HOSTILE_PER_BATCH = 4
MEMORY_GROWTH_LIMIT_MB = 150
REQUEST_TIMEOUT_S = 60


# ------------------------------------------------------------------------------------ sending
def case_forms(case: Case) -> tuple[str, ...]:
    """The forms ``case`` is sent in: its own, and the OIP form for image files."""
    return case.forms + ((OIP_FORM,) if case.oip_applies else ())


def request_kwargs(case: Case, form: str) -> dict:
    """``requests.post`` arguments that send ``case`` in ``form``."""
    if form == OIP_FORM:
        body, headers = oip_image_body(case.payload)
        return {"data": body, "headers": headers}
    if form == RAW:
        kwargs: dict = {"data": case.payload}
        if case.content_type is not None:
            kwargs["headers"] = {"Content-Type": case.content_type}
        if case.query:
            kwargs["params"] = case.query
        return kwargs
    if form == MULTIPART:
        return {
            "files": {case.multipart_field: ("payload.bin", case.payload, "application/octet-stream")},
            "data": {key: str(value) for key, value in case.options.items()},
        }
    if form == JSON_FORM:
        document = {"data": base64.b64encode(case.payload).decode(), **case.options}
        return {"data": json.dumps(document).encode(), "headers": {"Content-Type": "application/json"}}
    raise ValueError(form)


GOOD_FORMS = (RAW, MULTIPART, JSON_FORM, OIP_FORM)


def good_request(index: int, forms: tuple[str, ...] = GOOD_FORMS) -> tuple[int, str, dict]:
    """The ``index``-th good request: a shipped digit, cycling through digits and ``forms``."""
    digit, form = index % 10, forms[index % len(forms)]
    png = digit_png(digit)
    if form == OIP_FORM:
        body, headers = oip_image_body(png)
        return digit, form, {"data": body, "headers": headers}
    if form == RAW:
        return digit, form, {"data": png}
    if form == MULTIPART:
        return digit, form, {"files": {"data": ("digit.png", png, "image/png")}}
    return digit, form, {"json": {"data": base64.b64encode(png).decode()}}


def post(client: Client, model: str, form: str, kwargs: dict) -> requests.Response:
    """Send ``kwargs`` in ``form`` to ``model`` 1.0: OIP on TorchServe's v2 route, the others to /predictions."""
    if form == OIP_FORM:
        path = f"/v2/models/{model}/infer"  # the default version: 1.0, the only one registered
        return client.api.send("inference", "POST", path, timeout=REQUEST_TIMEOUT_S, **kwargs)
    return client.predict(f"{model}/{VERSION}", REQUEST_TIMEOUT_S, **kwargs)


# ------------------------------------------------------------------------------------ checking
def problems_with(case: Case, response: requests.Response, form: str = RAW) -> list[str]:
    """What is wrong with ``response`` as the answer to ``case`` sent in ``form`` (empty: it is right)."""
    expect = case.expect
    found = []
    if response.status_code != expect.status:
        found.append(f"status {response.status_code}, expected {expect.status}: {response.text[:300]!r}")
        return found
    if expect.source == "frontend":
        if not expect.frontend_error:
            if response.content:
                found.append(f"expected an empty body from the frontend, got {response.content[:200]!r}")
        else:
            body = _json(response, found)
            if body is not None and (body.get("type"), body.get("code")) != (expect.frontend_error, expect.status):
                found.append(f"frontend body {body!r}, expected type {expect.frontend_error}")
        return found
    if not response.headers.get("Content-Type", "").startswith("application/json"):
        found.append(f"Content-Type {response.headers.get('Content-Type')!r}, expected application/json")
    body = _json(response, found)
    if body is None:
        return found
    if expect.status == 200:
        return found + answer_problems(form, body, expect.digit)
    error = body.get("error")
    if (body.get("code"), body.get("type")) != (expect.status, expect.error_type):
        found.append(f"body {body!r}, expected code {expect.status} type {expect.error_type}")
    if not isinstance(error, str) or expect.message.lower() not in error.lower():
        found.append(f"error {error!r} does not say {expect.message!r}")
    elif not error.isascii() or len(error) > 1000:
        found.append(f"error is not short ASCII: {len(error)} chars")
    return found


def prediction_problems(body: dict, digit: int | None) -> list[str]:
    predictions = body.get("predictions") or [{}]
    if predictions[0].get("label") != str(digit) or len(predictions) != 3 or body.get("version") != VERSION:
        return [f"expected digit {digit} (top 3, version {VERSION}), got {body!r}"]
    return []


def oip_prediction_problems(body: dict, digit: int | None) -> list[str]:
    """An OIP v2 JSON answer: its ``labels`` tensor [1, 3] starts with ``digit``."""
    labels = next((o for o in body.get("outputs") or [] if isinstance(o, dict) and o.get("name") == "labels"), {})
    data = labels.get("data") or [None]
    if data[0] != str(digit) or labels.get("shape") != [1, 3] or body.get("model_version") != VERSION:
        return [f"expected digit {digit} (labels [1, 3], version {VERSION}), got {body!r}"]
    return []


def answer_problems(form: str, body: dict, digit: int | None) -> list[str]:
    return (oip_prediction_problems if form == OIP_FORM else prediction_problems)(body, digit)


def _json(response: requests.Response, found: list[str]) -> dict | None:
    try:
        body = response.json()
    except ValueError:
        found.append(f"body is not JSON: {response.content[:200]!r}")
        return None
    if not isinstance(body, dict):
        found.append(f"body is not a JSON object: {body!r}")
        return None
    return body


# ------------------------------------------------------------------------------------ bookkeeping
@dataclass
class Ledger(survival.Ledger):
    """Every request this module sends, and what became of it."""

    payloads: set[str] = field(default_factory=set)
    pairs: set[tuple[str, str]] = field(default_factory=set)

    def lost_to(self, response: requests.Response, problems: list[str]) -> bool:
        """A 5xx is lost only when not expected (the frontend's own 500s are, for two payloads)."""
        return bool(problems) and response.status_code >= 500


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> Iterator[TorchServeProcess]:
    """A TorchServe of this module's own (so nothing another module did changes what we see)."""
    workdir = tmp_path_factory.mktemp("torchserve_hostile")
    with running_torchserve(workdir, model_store, load_models=f"digits_v{VERSION}.mar") as process:
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


def worker_pids(client: Client, model: str) -> list[int]:
    described = client.manage("GET", f"/models/{model}/{VERSION}").json()[0]
    assert all(w["status"] == "READY" for w in described["workers"]), described["workers"]
    return sorted(int(w["pid"]) for w in described["workers"])


def snapshot(client: Client) -> Workers:
    pids = {model: worker_pids(client, model) for model in (MODEL, BATCH_MODEL)}
    rss = {pid: psutil.Process(pid).memory_info().rss for model_pids in pids.values() for pid in model_pids}
    return Workers(pids, rss)


def send_batch(
    client: Client, requests_list: list[tuple[str, dict]]
) -> tuple[list[requests.Response | BaseException], float]:
    """Send (form, kwargs) all at once to the batch registration; the answers and the slowest answer's seconds."""

    def send(request: tuple[str, dict]) -> requests.Response | BaseException:
        try:
            return post(client, BATCH_MODEL, *request)
        except requests.RequestException as exc:
            return exc

    started = time.monotonic()
    with ThreadPoolExecutor(len(requests_list)) as pool:
        answers = list(pool.map(send, requests_list))
    return answers, time.monotonic() - started


@pytest.fixture(scope="module")
def baseline(client: Client) -> Workers:
    """Worker pids and memory after warm-up: every digit in every form, alone and in full batches."""
    for index in range(10):
        digit, form, kwargs = good_request(index)
        response = post(client, MODEL, form, kwargs)
        assert answer_problems(form, response.json(), digit) == []
    for first in (0, BATCH_SIZE):
        goods = [good_request(first + i) for i in range(BATCH_SIZE)]
        answers, _ = send_batch(client, [(form, kwargs) for _, form, kwargs in goods])
        for (digit, form, _), answer in zip(goods, answers, strict=True):
            assert not isinstance(answer, BaseException), answer
            assert answer_problems(form, answer.json(), digit) == []
    return snapshot(client)


@pytest.fixture(scope="module")
def ledger() -> Ledger:
    return Ledger()


# ------------------------------------------------------------------------------------ parameters
def single_params() -> list:
    """Every (case, form) that means something: a case says why a form does not apply to it
    (``case.skip``), and such pairs are not generated at all rather than reported as skipped."""
    return [
        pytest.param(case, form, id=f"{form}-{case.name}")
        for case in corpus()
        for form in (RAW, MULTIPART, JSON_FORM, OIP_FORM)
        if form in case_forms(case)
    ]


def batch_groups() -> list[list[tuple[Case, str]]]:
    """Every (case, form) that reaches the handler, in groups of ``HOSTILE_PER_BATCH``.

    Cases the frontend answers itself (over max_request_size, form-decoding errors) never reach
    the batch queue: they would leave the batch short and it would wait the whole 20 s.
    """
    pairs = [(case, form) for case in corpus() if case.reaches_handler for form in case_forms(case)]
    return [pairs[i : i + HOSTILE_PER_BATCH] for i in range(0, len(pairs), HOSTILE_PER_BATCH)]


BATCH_GROUPS = batch_groups()


# ------------------------------------------------------------------------------------ the tests
@pytest.mark.parametrize(("case", "form"), single_params())
def test_single_request(client: Client, baseline: Workers, ledger: Ledger, case: Case, form: str) -> None:
    ledger.payloads.add(case.name)
    ledger.pairs.add((case.name, form))
    ledger.single += 1
    try:
        response = post(client, MODEL, form, request_kwargs(case, form))
    except requests.RequestException as exc:
        ledger.record(f"single {form} {case.name}", exc, [])
        raise
    problems = problems_with(case, response, form)
    ledger.record(f"single {form} {case.name}", response, problems)
    assert problems == []
    if not case.reaches_handler:
        # The frontend refused it: the server must go on serving.
        digit, good_form, kwargs = good_request(7)
        after = post(client, MODEL, good_form, kwargs)
        assert answer_problems(good_form, after.json(), digit) == []
    assert worker_pids(client, MODEL) == baseline.pids[MODEL], f"a worker restarted after {case.name} ({form})"


@pytest.mark.parametrize(
    "group",
    BATCH_GROUPS,
    ids=[f"{i:02d}-" + "+".join(f"{form}:{case.name}" for case, form in g)[:80] for i, g in enumerate(BATCH_GROUPS)],
)
def test_mixed_batch(client: Client, baseline: Workers, ledger: Ledger, group: list[tuple[Case, str]]) -> None:
    # Alternate hostile and good requests; fill up to exactly BATCH_SIZE with good ones.
    slots: list[tuple[str, Case | int, str, dict]] = []
    goods = iter(range(ledger.in_batches, ledger.in_batches + BATCH_SIZE))
    for case, form in group:
        slots.append((f"{form}:{case.name}", case, form, request_kwargs(case, form)))
        digit, good_form, kwargs = good_request(next(goods))
        slots.append((f"good {good_form}:{digit}", digit, good_form, kwargs))
    while len(slots) < BATCH_SIZE:
        digit, good_form, kwargs = good_request(next(goods))
        slots.append((f"good {good_form}:{digit}", digit, good_form, kwargs))

    answers, elapsed = send_batch(client, [(form, kwargs) for _, _, form, kwargs in slots])

    ledger.batches += 1
    ledger.in_batches += len(slots)
    failures = []
    for (label, expected, form, _), answer in zip(slots, answers, strict=True):
        if isinstance(answer, BaseException):
            problems = [f"no answer: {answer!r}"]
        elif isinstance(expected, Case):
            problems = problems_with(expected, answer, form)
        else:
            problems = [f"status {answer.status_code}"] if answer.status_code != 200 else []
            problems = problems or answer_problems(form, answer.json(), expected)
        ledger.record(f"batch {label}", answer, problems)
        failures += [f"{label}: {p}" for p in problems]
    assert failures == []
    assert elapsed < BATCH_DELAY_MS / 1000 * 0.75, f"the {BATCH_SIZE} requests did not form one batch ({elapsed:.1f}s)"
    assert worker_pids(client, BATCH_MODEL) == baseline.pids[BATCH_MODEL], "a batch worker restarted"


def test_workers_survived_with_bounded_memory(
    client: Client, baseline: Workers, ledger: Ledger, tmp_path_factory: pytest.TempPathFactory
) -> None:
    after = snapshot(client)
    summary = survival_report(
        ledger, baseline, after,
        payloads=len(corpus()), payloads_tried=len(ledger.payloads), case_form_pairs=len(ledger.pairs),
    )  # fmt: skip
    headline = (
        f"hostile inputs: {summary['payloads_tried']} of {summary['payloads']} payloads, "
        f"{summary['case_form_pairs']} payload x form pairs"
    )
    publish(summary, "hostile_inputs_summary.json", tmp_path_factory, headline, BATCH_SIZE)
    growth_mb = summary["worker_rss_growth_mb"]

    assert after.pids == baseline.pids, "a worker died or restarted"
    assert ledger.lost == []
    assert ledger.mismatched == []
    for pid, mb in growth_mb.items():
        assert mb < MEMORY_GROWTH_LIMIT_MB, f"worker {pid} grew by {mb:.0f} MB"
    # And it still serves.
    for index in (4, 7):  # one raw, one OIP
        digit, form, kwargs = good_request(index)
        assert answer_problems(form, post(client, MODEL, form, kwargs).json(), digit) == []
