"""Requests that would cost a worker its life, its memory or its probes, against a real TorchServe: each fails alone.

One TorchServe with the three shipped models (digits, breast_cancer, digit_pages) and its OIP front,
started with a small ``max_response_size`` (``RESPONSE_LIMIT``) so that answers over it are cheap to
ask for. Each hostile request goes to TorchServe's own port (8080's route) and to the OIP front (8000's):

1. **Echo amplification**: an OIP request whose ``id`` is 2.4 MB (under ``max_request_size``), in
   JSON and in the binary extension, to every model: 400 JSON naming the id; its answer would have
   been larger than the frontend takes, which drops the worker and fails the whole batch.
2. **Answers over the limit**: requests whose answers are larger than ``max_response_size`` (32
   images with ``top_k`` 10; 256 tabular records): 413 JSON ``ResponseTooLarge`` from the handler,
   alone, while good requests sent at the same time are answered right.
3. **JSON container bombs**: 8 concurrent 6.4 MB bodies of empty lists per model, as
   ``application/json``: 413 JSON before anything is parsed (``handlers.json_body``); each worker's
   peak resident memory over the bombs (``VmHWM`` after resetting it through ``clear_refs``) grows by
   less than ``PEAK_GROWTH_LIMIT_MB``.

4. **gRPC names**: model names and versions with path characters on ModelReady, ModelMetadata and
   ModelInfer (raw stubs, no client-side checks): INVALID_ARGUMENT with a short message, and no
   request reaches TorchServe (its ``access_log.log`` holds none after them, while a valid call
   made last is there).
5. **Errors nginx writes itself** (``tests/integration/test_front_hardening.py``'s cases: unknown
   methods, 101 headers, ``%00``, bodies over the limit, garbage) are JSON 4xx on the real front.
6. **Slow clients**: while 1,200 idle connections are held to the front, ``/v2/health/live``
   answers within 1 s there and on the health-only port, and an inference is answered.

Every hostile answer comes within ``ANSWER_WITHIN_S``; at the end the worker pids are the ones of the
start (no crash, no restart) and the summary is written to ``protocol_hardening_summary.json`` in
pytest's base temp directory (``tests/integration/survival.py``).
"""

from __future__ import annotations

import base64
import json
import re
import resource
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import requests

from servekit.serving.server import TorchServeProcess, free_port
from tests.integration import survival
from tests.integration import test_front_hardening as front_cases
from tests.integration.conftest import Client, running_torchserve
from tests.integration.survival import Workers, publish, survival_report

pytestmark = pytest.mark.integration

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
MODELS = ("digits", "breast_cancer", "digit_pages")
VERSION = "1.0"
RESPONSE_LIMIT = 16_384  # max_response_size of this module's server: every good answer fits, big ones do not
ID_CHARS = 2_400_000
BOMB_BYTES = 6_400_000  # under max_request_size (6,553,600) and the front's client_max_body_size
BOMBS_AT_ONCE = 8
PEAK_GROWTH_LIMIT_MB = 400
ANSWER_WITHIN_S = 3.0
ROUTES = ("torchserve", "front")  # TorchServe's 8080 route, the OIP front's 8000


# ------------------------------------------------------------------------------------ bookkeeping
@dataclass
class Ledger(survival.Ledger):
    """Every request this module sends, and what became of it; an answer later than ANSWER_WITHIN_S
    is a problem of its request (``json_error_problems``)."""

    grpc_codes: Counter = field(default_factory=Counter)
    slowest_s: float = 0.0

    def record_timed(
        self, label: str, answer: requests.Response | BaseException, seconds: float, problems: list[str]
    ) -> None:
        self.slowest_s = max(self.slowest_s, seconds)
        self.record(label, answer, problems)


@dataclass(frozen=True)
class Hostile:
    label: str
    model: str
    body: bytes
    headers: dict[str, str]
    status: int
    error_type: str
    phrase: str


def json_error_problems(case: Hostile, answer: requests.Response, seconds: float) -> list[str]:
    """What is wrong with ``answer`` to ``case`` (empty: a JSON error with the right status, in time)."""
    found = []
    if seconds > ANSWER_WITHIN_S:
        found.append(f"answered in {seconds:.1f} s (limit {ANSWER_WITHIN_S} s)")
    if answer.status_code != case.status:
        return [*found, f"status {answer.status_code}, expected {case.status}: {answer.text[:300]!r}"]
    if not answer.headers.get("Content-Type", "").startswith("application/json"):
        found.append(f"Content-Type {answer.headers.get('Content-Type')!r}")
    try:
        body = answer.json()
    except ValueError:
        return [*found, f"not JSON: {answer.content[:200]!r}"]
    if not isinstance(body, dict) or body.get("type") != case.error_type or body.get("code") != case.status:
        found.append(f"body {str(body)[:300]}, expected code {case.status} type {case.error_type}")
    elif case.phrase not in str(body.get("error")):
        found.append(f"error {body.get('error')!r} does not say {case.phrase!r}")
    return found


# ------------------------------------------------------------------------------------ requests
def png(digit: int) -> bytes:
    return (SAMPLES / f"digit_{digit}.png").read_bytes()


def oip_json(document: dict) -> tuple[bytes, dict[str, str]]:
    return json.dumps(document).encode(), {"Content-Type": "application/json"}


def oip_binary(document: dict, tail: bytes) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(document).encode()
    return header + tail, {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }


def image_tail(image: bytes) -> bytes:
    return struct.pack("<I", len(image)) + image


def long_id_cases() -> list[Hostile]:
    """A 2.4 MB ``id`` in an otherwise ordinary request to each model, JSON and binary."""
    huge = "i" * ID_CHARS
    phrase = f"'id' is {ID_CHARS} characters long"
    page = (SAMPLES / "pages" / "page_0.png").read_bytes()
    record = json.loads((SAMPLES / "breast_cancer" / "benign_0.json").read_text())
    cases = []
    for model, image in (("digits", png(3)), ("digit_pages", page)):
        document = {"id": huge, "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                            "data": [base64.b64encode(image).decode()]}]}  # fmt: skip
        cases.append(Hostile(f"{model}_long_id_json", model, *oip_json(document), 400, "InvalidInput", phrase))
        tensor = {"name": "image", "datatype": "BYTES", "shape": [1],
                  "parameters": {"binary_data_size": len(image) + 4}}  # fmt: skip
        body, headers = oip_binary({"id": huge, "inputs": [tensor]}, image_tail(image))
        cases.append(Hostile(f"{model}_long_id_binary", model, body, headers, 400, "InvalidInput", phrase))
    values = [float(v) for v in record.values()]
    document = {"id": huge, "inputs": [{"name": "features", "datatype": "FP32", "shape": [1, len(values)],
                                        "data": values}]}  # fmt: skip
    cases.append(
        Hostile("breast_cancer_long_id_json", "breast_cancer", *oip_json(document), 400, "InvalidInput", phrase)
    )
    raw = struct.pack(f"<{len(values)}f", *values)
    tensor = {
        "name": "features",
        "datatype": "FP32",
        "shape": [1, len(values)],
        "parameters": {"binary_data_size": len(raw)},
    }
    body, headers = oip_binary({"id": huge, "inputs": [tensor]}, raw)
    cases.append(Hostile("breast_cancer_long_id_binary", "breast_cancer", body, headers, 400, "InvalidInput", phrase))
    return cases


def over_limit_cases() -> list[Hostile]:
    """Answers larger than the server sends: 32 images at top_k 10, 256 tabular records."""
    images = [base64.b64encode(png(i % 10)).decode() for i in range(32)]
    document = {"id": "x" * 200, "inputs": [{"name": "image", "datatype": "BYTES", "shape": [32], "data": images}],
                "parameters": {"top_k": 10}}  # fmt: skip
    record = json.loads((SAMPLES / "breast_cancer" / "benign_0.json").read_text())
    phrase = "the answer would be"
    return [
        Hostile("digits_answer_over_limit", "digits", *oip_json(document), 413, "ResponseTooLarge", phrase),
        Hostile("breast_cancer_answer_over_limit", "breast_cancer", json.dumps([record] * 256).encode(),
                {"Content-Type": "application/json"}, 413, "ResponseTooLarge", phrase),
    ]  # fmt: skip


def bomb_case(model: str, index: int) -> Hostile:
    count = (BOMB_BYTES - 2) // 3
    body = b"[" + b"[]," * (count - 1) + b"[]]"
    return Hostile(f"{model}_bomb_{index}", model, body, {"Content-Type": "application/json"}, 413,
                   "PayloadTooLarge", "arrays and objects; the limit is")  # fmt: skip


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> Iterator[TorchServeProcess]:
    workdir = tmp_path_factory.mktemp("torchserve_amplification")
    archives = ",".join(f"{model}_v{VERSION}.mar" for model in MODELS)
    overrides = {"max_response_size": str(RESPONSE_LIMIT)}
    ports = {"oip_http": free_port(), "oip_grpc": free_port(), "oip_health": free_port()}
    with running_torchserve(
        workdir, model_store, load_models=archives, overrides=overrides, oip_ports=ports
    ) as process:
        yield process


@pytest.fixture(scope="module")
def client(server: TorchServeProcess) -> Client:
    return Client(server)


@pytest.fixture(scope="module")
def ledger() -> Ledger:
    return Ledger()


def snapshot(client: Client) -> Workers:
    pids: dict[str, list[int]] = {}
    for model in MODELS:
        described = client.manage("GET", f"/models/{model}/{VERSION}").json()[0]
        assert all(w["status"] == "READY" for w in described["workers"]), described["workers"]
        pids[model] = sorted(int(w["pid"]) for w in described["workers"])
    rss = {pid: psutil.Process(pid).memory_info().rss for model_pids in pids.values() for pid in model_pids}
    return Workers(pids, rss)


@pytest.fixture(scope="module")
def baseline(client: Client, server: TorchServeProcess) -> Workers:
    """Workers after every good request was answered once on both routes."""
    for route in ROUTES:
        for model, (body, headers), _ in good_requests():
            answer = post(server, route, model, body, headers)
            assert answer.status_code == 200, f"{model} via {route}: {answer.status_code} {answer.text[:300]}"
    return snapshot(client)


def url(server: TorchServeProcess, route: str, model: str) -> str:
    kind = "inference" if route == "torchserve" else "oip_http"
    return server.url(kind, f"/v2/models/{model}/infer")


def post(server: TorchServeProcess, route: str, model: str, body: bytes, headers: dict[str, str]) -> requests.Response:
    token = {"Authorization": f"Bearer {server.keys()['inference']}"}
    return requests.post(url(server, route, model), data=body, headers={**headers, **token}, timeout=60)


def timed_post(server: TorchServeProcess, route: str, case: Hostile) -> tuple[requests.Response | BaseException, float]:
    started = time.monotonic()
    try:
        answer: requests.Response | BaseException = post(server, route, case.model, case.body, case.headers)
    except requests.RequestException as exc:
        answer = exc
    return answer, time.monotonic() - started


def good_requests() -> list[tuple[str, tuple[bytes, dict[str, str]], str]]:
    """(model, (body, headers), what the answer must hold) for one ordinary request per model."""
    page = (SAMPLES / "pages" / "page_0.png").read_bytes()
    record = json.loads((SAMPLES / "breast_cancer" / "benign_0.json").read_text())
    digits = {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(png(7)).decode()]}]
    }
    pages = {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(page).decode()]}]
    }
    values = [float(v) for v in record.values()]
    tabular = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, len(values)], "data": values}]}
    return [
        ("digits", oip_json(digits), "7"),
        ("digit_pages", oip_json(pages), ""),
        ("breast_cancer", oip_json(tabular), "benign"),
    ]


def good_problems(expected: str, answer: requests.Response) -> list[str]:
    if answer.status_code != 200:
        return [f"status {answer.status_code}: {answer.text[:300]!r}"]
    document = answer.json()
    labels = next((o for o in document.get("outputs", []) if o["datatype"] == "BYTES"), None)
    if labels is None or (expected and labels["data"][0] != expected):
        return [f"expected {expected!r} first, got {str(document)[:300]}"]
    return []


# ------------------------------------------------------------------------------------ the tests
@pytest.mark.parametrize("route", ROUTES)
def test_an_echoed_id_of_megabytes_is_refused_alone_for_every_model(
    server: TorchServeProcess, baseline: Workers, ledger: Ledger, route: str
) -> None:
    problems = []
    for case in long_id_cases():
        answer, seconds = timed_post(server, route, case)
        found = ["no answer"] if isinstance(answer, BaseException) else json_error_problems(case, answer, seconds)
        ledger.record_timed(f"{route} {case.label}", answer, seconds, found)
        ledger.single += 1
        problems += [f"{case.label}: {p}" for p in found]
    assert not problems, problems


@pytest.mark.parametrize("route", ROUTES)
def test_answers_over_the_response_limit_fail_alone_beside_good_requests(
    server: TorchServeProcess, baseline: Workers, ledger: Ledger, route: str
) -> None:
    """Each over-limit request goes together with a good request for every model, all at once."""
    hostile = over_limit_cases()
    goods = good_requests()
    jobs = [("hostile", case) for case in hostile] + [("good", good) for good in goods]

    def run(job: tuple) -> tuple[requests.Response | BaseException, float]:
        kind, item = job
        if kind == "hostile":
            return timed_post(server, route, item)
        model, (body, headers), _ = item
        started = time.monotonic()
        try:
            return post(server, route, model, body, headers), time.monotonic() - started
        except requests.RequestException as exc:
            return exc, time.monotonic() - started

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(run, jobs))
    ledger.batches += 1
    ledger.in_batches += len(jobs)
    problems = []
    for (kind, item), (answer, seconds) in zip(jobs, answers, strict=True):
        if isinstance(answer, BaseException):
            found = ["no answer"]
        elif kind == "hostile":
            found = json_error_problems(item, answer, seconds)
        else:
            found = good_problems(item[2], answer)
        label = item.label if kind == "hostile" else f"good {item[0]}"
        ledger.record_timed(f"{route} {label}", answer, seconds, found)
        problems += [f"{label}: {p}" for p in found]
    assert not problems, problems


def peak_rss_reset(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current resident size


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


@pytest.mark.parametrize("model", MODELS)
def test_a_batch_of_json_container_bombs_is_refused_before_parsing(
    server: TorchServeProcess, client: Client, baseline: Workers, ledger: Ledger, model: str
) -> None:
    pids = baseline.pids[model]
    resident = {pid: psutil.Process(pid).memory_info().rss for pid in pids}
    for pid in pids:
        peak_rss_reset(pid)
    cases = [bomb_case(model, i) for i in range(BOMBS_AT_ONCE)]
    routes = [ROUTES[i % 2] for i in range(BOMBS_AT_ONCE)]
    with ThreadPoolExecutor(BOMBS_AT_ONCE) as pool:
        answers = list(pool.map(lambda pair: timed_post(server, pair[0], pair[1]), zip(routes, cases, strict=True)))
    ledger.batches += 1
    ledger.in_batches += len(cases)
    growth_mb = {pid: (peak_rss(pid) - resident[pid]) / 2**20 for pid in pids}
    problems = []
    for route, case, (answer, seconds) in zip(routes, cases, answers, strict=True):
        found = ["no answer"] if isinstance(answer, BaseException) else json_error_problems(case, answer, seconds)
        ledger.record_timed(f"{route} {case.label}", answer, seconds, found)
        problems += [f"{route} {case.label}: {p}" for p in found]
    assert not problems, problems
    assert all(mb < PEAK_GROWTH_LIMIT_MB for mb in growth_mb.values()), f"peak RSS growth (MB): {growth_mb}"
    print(f"\n{model}: {BOMBS_AT_ONCE} bombs of {BOMB_BYTES} bytes, worker peak RSS growth (MB) "
          f"{ {pid: round(mb, 1) for pid, mb in growth_mb.items()} }")  # fmt: skip


# ------------------------------------------------------------------------------------ gRPC names
BAD_NAMES = ["../digits", "digits/../breast_cancer", "digits?x=1", "digits#frag", "a/b", "digits%2F..", "digits\x00",
             " digits", "digits/", "d" * 300]  # fmt: skip
BAD_VERSIONS = ["../1.0", "1.0/../2.0", "1.0?x", "1.0#x", "1/0", "1.0%2F", "9" * 300]


def access_lines(server: TorchServeProcess) -> list[str]:
    path = server.workdir / "logs" / "access_log.log"
    return path.read_text(errors="replace").splitlines() if path.is_file() else []


def test_grpc_names_outside_the_grammar_are_refused_before_any_call_to_torchserve(
    server: TorchServeProcess, baseline: Workers, ledger: Ledger
) -> None:
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    metadata = (("authorization", f"Bearer {server.keys()['inference']}"),)
    channel = grpc.insecure_channel(server.grpc_address)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    image = png(4)

    def calls(name: str, version: str) -> dict:
        tensor = service_pb2.ModelInferRequest().InferInputTensor(name="image", datatype="BYTES", shape=[1])
        infer = service_pb2.ModelInferRequest(model_name=name, model_version=version, inputs=[tensor],
                                              raw_input_contents=[image_tail(image)])  # fmt: skip
        return {
            "ModelReady": (stub.ModelReady, service_pb2.ModelReadyRequest(name=name, version=version)),
            "ModelMetadata": (stub.ModelMetadata, service_pb2.ModelMetadataRequest(name=name, version=version)),
            "ModelInfer": (stub.ModelInfer, infer),
        }

    before = len(access_lines(server))
    problems, count = [], 0
    try:
        for name, version in [(n, "") for n in BAD_NAMES] + [("digits", v) for v in BAD_VERSIONS]:
            for method, (call, request) in calls(name, version).items():
                label = f"grpc {method} {name[:20]!r} {version[:20]!r}"
                started = time.monotonic()
                try:
                    call(request, metadata=metadata, timeout=ANSWER_WITHIN_S * 2)
                    found = ["answered OK"]
                except grpc.RpcError as exc:
                    details = exc.details() or ""
                    found = [] if exc.code() == grpc.StatusCode.INVALID_ARGUMENT else [f"code {exc.code()}"]
                    if len(details) > 300 or not details.isascii() or "http" in details.lower():
                        found.append(f"details {details[:300]!r}")
                seconds = time.monotonic() - started
                if seconds > ANSWER_WITHIN_S:
                    found.append(f"answered in {seconds:.1f} s")
                count += 1
                ledger.sent += 1
                ledger.single += 1
                ledger.grpc_codes["INVALID_ARGUMENT" if not found else "other"] += 1
                if found:
                    ledger.mismatched.append(f"{label}: {'; '.join(found)}")
                problems += [f"{label}: {p}" for p in found]
        # A valid call last: its line in the access log shows the log was written up to here.
        answer = stub.ModelReady(service_pb2.ModelReadyRequest(name="digits", version=VERSION), metadata=metadata)
        assert answer.ready
    finally:
        channel.close()
    deadline = time.monotonic() + 15  # TorchServe writes its access log asynchronously
    while time.monotonic() < deadline and not any("/models/digits" in line for line in access_lines(server)[before:]):
        time.sleep(0.2)
    new = access_lines(server)[before:]
    assert any("/models/digits" in line for line in new), f"the valid call never reached the access log: {new}"
    reached = [line for line in new if not re.search(rf'"GET /models/digits(/{re.escape(VERSION)}|/all)? HTTP', line)]
    assert not reached, f"requests other than the valid call's reached TorchServe: {reached}"
    assert count == 3 * (len(BAD_NAMES) + len(BAD_VERSIONS))
    assert not problems, problems


# ------------------------------------------------------------------------------------ errors nginx writes
@pytest.mark.parametrize("case", list(front_cases.HOSTILE))
def test_the_real_front_writes_every_error_of_its_own_as_json(
    server: TorchServeProcess, baseline: Workers, ledger: Ledger, case: str
) -> None:
    data, expected = front_cases.HOSTILE[case]
    started = time.monotonic()
    status, headers, body = front_cases.exchange(server.oip_ports["oip_http"], data)
    seconds = time.monotonic() - started
    ledger.sent += 1
    ledger.single += 1
    ledger.statuses[status] += 1
    front_cases.assert_json_error(status, headers, body, expected)
    assert seconds < ANSWER_WITHIN_S


# ------------------------------------------------------------------------------------ slow clients
def test_idle_connections_do_not_starve_liveness_or_inference_on_the_real_front(
    server: TorchServeProcess, baseline: Workers, ledger: Ledger
) -> None:
    soft = front_cases.raised_nofile(front_cases.IDLE_CONNECTIONS + 512)
    port, health = server.oip_ports["oip_http"], server.oip_ports["oip_health"]
    idle: list[socket.socket] = []
    try:
        for i in range(front_cases.IDLE_CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            idle.append(sock)
            if i % 2:
                sock.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n")  # a header never finished
        for probe_port in (port, health):
            started = time.monotonic()
            answer = requests.get(f"http://127.0.0.1:{probe_port}/v2/health/live", timeout=5)
            assert time.monotonic() - started < 1.0
            assert (answer.status_code, answer.json()) == (200, {"live": True})
        model, (body, headers), expected = good_requests()[0]
        started = time.monotonic()
        answer = post(server, "front", model, body, headers)
        ledger.record_timed("front good request beside 1,200 idle connections", answer, time.monotonic() - started,
                      good_problems(expected, answer))  # fmt: skip
        assert good_problems(expected, answer) == []
    finally:
        for sock in idle:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


def test_every_worker_survived_and_the_summary_is_written(
    client: Client, baseline: Workers, ledger: Ledger, tmp_path_factory: pytest.TempPathFactory
) -> None:
    after = snapshot(client)
    report = survival_report(
        ledger,
        baseline,
        after,
        response_limit=RESPONSE_LIMIT,
        slowest_answer_s=round(ledger.slowest_s, 3),
        grpc_codes=dict(ledger.grpc_codes),
    )
    headline = "protocol hardening: echo, over-limit answers, JSON bombs, gRPC names, front errors, idle connections"
    publish(report, "protocol_hardening_summary.json", tmp_path_factory, headline, batch_size=BOMBS_AT_ONCE)
    assert ledger.sent >= 2 * (len(long_id_cases()) + 5) + len(MODELS) * BOMBS_AT_ONCE
    assert after.pids == baseline.pids, f"workers restarted: {baseline.pids} -> {after.pids}"
    assert not ledger.lost, ledger.lost
    assert not ledger.mismatched, ledger.mismatched
