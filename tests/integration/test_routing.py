"""One routing plane for every protocol: canary, shadow and rollout for OIP HTTP, KServe v1 and gRPC clients.

A real TorchServe whose OIP address (nginx front + gRPC gateway) sends inference through the real proxy
(``router``: the proxy's Unix socket, as ``make serve`` does with ``servekit proxy``'s default folder), and the
``servekit`` command line changing the one deployment state. Clients are real ``tritonclient`` HTTP and
gRPC clients and KServe v1 JSON; every answer says which version served it (``model_version``, and
``X-Model-Version`` on ``/predictions``). The store also holds 4.0, a drill version of 1.0 that sleeps
1 s per batch (``faults.delay_ms``): the bad version a rollout must roll back, slow beside a default whose
p99 reaches 300 ms on a loaded CI machine (200 ms was promoted once at a p99 ratio of 1.28).
"""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http

from servekit.deploy.rollout import RequestLog
from servekit.serving.router import router_address
from servekit.serving.server import TorchServeProcess, free_port
from tests.integration.conftest import drill_store, ok, operator_cli, running_torchserve

pytestmark = pytest.mark.integration

REQUESTS = 300
CANARY_PERCENT = 30
DRILLS = {"4.0": {"delay_ms": 1000}}
ROLLOUT = ("--steps", "25,100", "--step-seconds", "5", "--min-requests", "10", "--source", "proxy-log")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, model_store: Path, repo_root: Path) -> Path:
    return drill_store(tmp_path_factory.mktemp("store"), model_store, repo_root, DRILLS, "test_routing")


@pytest.fixture(scope="module")
def proxy_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def deploy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("deploy")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, store: Path, deploy_dir: Path) -> Iterator[TorchServeProcess]:
    # As make serve: the front reaches the proxy through its socket (servekit.serving.router.router_address).
    router = router_address(deploy_dir / "proxy")
    with running_torchserve(tmp_path_factory.mktemp("torchserve"), store, router=router) as ts:
        yield ts


@pytest.fixture(scope="module")
def cli(server: TorchServeProcess, store: Path, repo_root: Path, deploy_dir: Path, proxy_port: int):
    run = operator_cli(server, store, repo_root, deploy_dir, proxy_port=proxy_port)
    ok(run("register", "digits", "2.0"))
    ok(run("register", "digits", "4.0"))
    ok(run("proxy", "start"))
    try:
        yield run
    finally:
        run.proxy.stop()


@pytest.fixture(scope="module")
def digit(samples_dir: Path) -> bytes:
    return (samples_dir / "digit_3.png").read_bytes()


def token(server: TorchServeProcess) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.keys()['inference']}"}


def grpc_token(server: TorchServeProcess) -> dict[str, str]:
    return {"authorization": f"Bearer {server.keys()['inference']}"}


def image_input(module, image: bytes):
    tensor = module.InferInput("image", [1], "BYTES")
    if module is triton_http:
        tensor.set_data_from_numpy(np.array([image], dtype=np.object_), binary_data=True)
    else:
        tensor.set_data_from_numpy(np.array([image], dtype=np.object_))
    return tensor


def oip_http_sender(server: TorchServeProcess, image: bytes, version: str = "") -> Callable[[], str]:
    """One tritonclient.http inference (its own client: one per thread); the version that answered."""
    local = threading.local()

    def send() -> str:
        if not hasattr(local, "client"):
            local.client = triton_http.InferenceServerClient(server.url("oip_http").split("://", 1)[1])
        result = local.client.infer("digits", [image_input(triton_http, image)], model_version=version,
                                    headers=token(server))  # fmt: skip
        assert result.as_numpy("labels")[0][0] in (b"3", "3")
        return result.get_response()["model_version"]

    return send


_GRPC_CLIENTS: list[triton_grpc.InferenceServerClient] = []  # closed at the module's end (grpc_clients_closed)


@pytest.fixture(scope="module", autouse=True)
def grpc_clients_closed() -> Iterator[None]:
    """Close every gRPC client explicitly: a channel closed from a finalizer, at a random later point, can hang."""
    yield
    while _GRPC_CLIENTS:
        _GRPC_CLIENTS.pop().close()


def oip_grpc_sender(server: TorchServeProcess, image: bytes, version: str = "") -> Callable[[], str]:
    client = triton_grpc.InferenceServerClient(server.grpc_address)
    _GRPC_CLIENTS.append(client)

    def send() -> str:
        result = client.infer("digits", [image_input(triton_grpc, image)], model_version=version,
                              headers=grpc_token(server))  # fmt: skip
        assert result.as_numpy("labels")[0][0] in (b"3", "3")
        return result.get_response().model_version

    return send


def kserve_v1_sender(server: TorchServeProcess, image: bytes) -> Callable[[], str]:
    url = server.url("oip_http", "/v1/models/digits:predict")
    body = {"instances": [{"data": base64.b64encode(image).decode()}]}

    def send() -> str:
        response = requests.post(url, json=body, headers=token(server), timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["predictions"][0][0]["label"] == "3"
        return response.json()["model_version"]

    return send


SENDERS = {
    "oip-http": lambda server, image: oip_http_sender(server, image),
    "oip-grpc": lambda server, image: oip_grpc_sender(server, image),
    "kserve-v1": kserve_v1_sender,
}


def send_many(send: Callable[[], str], count: int, workers: int = 8) -> Counter:
    with ThreadPoolExecutor(workers) as pool:
        return Counter(pool.map(lambda _: send(), range(count)))


def inference_count(server: TorchServeProcess, version: str) -> float:
    metrics = requests.get(server.url("metrics", "/metrics"), timeout=10).text
    pattern = rf'^ts_inference_requests_total\{{model_name="digits",model_version="{version}",[^}}]*\}} (\S+)$'
    match = re.search(pattern, metrics, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


# ------------------------------------------------------------------------------------------ canary
@pytest.mark.parametrize("protocol", list(SENDERS))
def test_a_thirty_percent_canary_answers_a_share_of_every_protocol(cli, server, digit: bytes, protocol: str) -> None:
    log = RequestLog(cli.proxy.request_log)
    log.start()
    ok(cli("canary", "digits", "2.0", "--percent", str(CANARY_PERCENT)))
    try:
        started = time.time()
        counts = send_many(SENDERS[protocol](server, digit), REQUESTS)
    finally:
        ok(cli("canary", "digits", "2.0", "--percent", "0"))
    print(f"{protocol}: {dict(counts)} of {REQUESTS} at a {CANARY_PERCENT} % canary")  # the report's figures
    assert sum(counts.values()) == REQUESTS
    assert set(counts) == {"1.0", "2.0"}, counts
    assert 0.2 * REQUESTS <= counts["2.0"] <= 0.4 * REQUESTS, counts
    # The proxy logged every one of them, split as the clients saw it (X-Model-Version: the version that answered).
    path = "/v1/models/digits:predict" if protocol == "kserve-v1" else "/v2/models/digits/infer"
    records = [r for r in log.records(started - 1, time.time() + 60) if r.uri == path]
    assert len(records) == REQUESTS
    assert Counter(r.served for r in records) == counts
    assert all(r.served == (r.target[1:] or "1.0") for r in records)


def explanation_sender(server: TorchServeProcess, proxy_url: Callable[[str], str], image: bytes, protocol: str):
    """One explanation of ``image`` through the routing plane in ``protocol``; the version that answered."""
    headers = token(server)
    if protocol == "native":
        url = proxy_url("/explanations/digits")
        options = {"data": image, "headers": {**headers, "Content-Type": "application/octet-stream"}}
    elif protocol == "oip-v2":  # tritonclient's binary body, posted to the explain route tritonclient lacks
        body, json_size = triton_http.InferenceServerClient.generate_request_body([image_input(triton_http, image)])
        url = server.url("oip_http", "/v2/models/digits/explain")
        options = {"data": body, "headers": {**headers, "Inference-Header-Content-Length": str(json_size)}}
    else:
        url = server.url("oip_http", "/v1/models/digits:explain")
        options = {"json": {"instances": [{"b64": base64.b64encode(image).decode()}]}, "headers": headers}

    def send() -> str:
        for _ in range(40):  # the model's share of explanation time: a 429 says wait a moment
            response = requests.post(url, timeout=60, **options)
            if response.status_code != 429:
                break
            time.sleep(0.25)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["explanations"][0]["target"]["label"] == "3"
        return answer["version"] if protocol == "native" else answer["model_version"]

    return send


@pytest.mark.parametrize("protocol", ["native", "oip-v2", "kserve-v1"])
def test_explanations_of_every_protocol_come_from_the_version_the_canary_chose(cli, server, digit, protocol) -> None:
    send = explanation_sender(server, cli.proxy.url, digit, protocol)
    log = RequestLog(cli.proxy.request_log)
    log.start()
    started = time.time()
    ok(cli("canary", "digits", "2.0", "--percent", "100"))
    try:
        assert [send() for _ in range(3)] == ["2.0"] * 3
    finally:
        ok(cli("canary", "digits", "2.0", "--percent", "0"))
    assert [send() for _ in range(2)] == ["1.0"] * 2  # no canary: the default explains
    paths = {"/explanations/digits", "/v2/models/digits/explain", "/v1/models/digits:explain"}
    time.sleep(0.5)  # nginx logs a request once its answer is sent
    explained = [r for r in log.records(started - 1, time.time() + 60) if r.uri in paths and r.status == 200]
    assert [(r.target, r.served) for r in explained] == [("/2.0", "2.0")] * 3 + [("", "1.0")] * 2


def test_explicit_versions_still_pin_and_predictions_name_the_version_in_a_header(cli, server, digit) -> None:
    ok(cli("canary", "digits", "2.0", "--percent", "50"))
    try:
        assert send_many(oip_http_sender(server, digit, "1.0"), 20) == Counter({"1.0": 20})
        assert send_many(oip_grpc_sender(server, digit, "1.0"), 20) == Counter({"1.0": 20})
        assert send_many(oip_grpc_sender(server, digit, "4.0"), 4) == Counter({"4.0": 4})
        headers = {**token(server), "Content-Type": "application/octet-stream"}
        for path, pinned in (("/predictions/digits/1.0", True), ("/predictions/digits", False)):
            seen = set()
            for _ in range(20):
                response = requests.post(cli.proxy.url(path), data=digit, headers=headers, timeout=60)
                assert response.status_code == 200, response.text
                assert response.headers["X-Model-Version"] == response.json()["version"]
                seen.add(response.headers["X-Model-Version"])
            assert seen == ({"1.0"} if pinned else {"1.0", "2.0"}), (path, seen)
    finally:
        ok(cli("canary", "digits", "2.0", "--percent", "0"))


# ------------------------------------------------------------------------------------------ shadow
def test_a_shadow_gets_a_copy_of_oip_traffic_and_clients_see_only_the_default(cli, server, digit: bytes) -> None:
    before = inference_count(server, "2.0")
    ok(cli("shadow", "digits", "2.0"))
    try:
        counts = Counter()
        for send in SENDERS.values():
            counts += send_many(send(server, digit), 30)
        deadline = time.monotonic() + 20
        while inference_count(server, "2.0") - before < 90 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        ok(cli("shadow", "digits", "2.0", "--off"))
    assert counts == Counter({"1.0": 90})
    assert inference_count(server, "2.0") - before == 90


# ------------------------------------------------------------------------------------------ rollout
class GrpcTraffic:
    """About 20 tritonclient gRPC inferences a second from one thread, every answer kept; stops on leaving."""

    def __init__(self, server: TorchServeProcess, image: bytes) -> None:
        self.client = triton_grpc.InferenceServerClient(server.grpc_address)
        self.inputs, self.headers = [image_input(triton_grpc, image)], grpc_token(server)
        self.versions: Counter = Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._send, daemon=True)

    def _send(self) -> None:
        while not self._stop.is_set():
            try:
                self.versions[
                    self.client.infer("digits", self.inputs, headers=self.headers).get_response().model_version
                ] += 1
            except Exception as exc:  # noqa: BLE001 - every failure a client would see is counted
                self.failures.append(repr(exc))
            self._stop.wait(0.05)

    def __enter__(self) -> GrpcTraffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self.client.close()


def step_events(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines() if '"rollout-step"' in line]


def test_rollout_judges_grpc_traffic_rolls_back_a_slow_version_and_promotes_a_good_one(cli, server, digit) -> None:
    log = RequestLog(cli.proxy.request_log)
    log.start()
    started = time.time()
    with GrpcTraffic(server, digit) as traffic:
        # One gRPC client sends about 3 requests a second while a quarter of them take 1 s: 5 canary requests.
        bad = cli("rollout", "digits", "4.0", *ROLLOUT, "--min-requests", "5", "--json")
        print(bad.stdout + bad.stderr)
        assert bad.returncode == 1, bad.stdout
        assert "rollout of digits 4.0 aborted at 25%: step 1 (25%): p99 ratio" in bad.stderr, bad.stderr
        assert cli.proxy.state()["routes"] == {}
        # Two copies of one model: the p99 of 10-30 requests from one client is their slowest, and one stall
        # of a loaded machine (a default's p99 of 299 ms against 384) must not roll a good version back.
        good = cli("rollout", "digits", "2.0", *ROLLOUT, "--max-p99-ratio", "3", "--json")
        print(good.stdout + good.stderr)
        assert good.returncode == 0, good.stderr
    print(f"gRPC clients: {dict(traffic.versions)}, {len(traffic.failures)} failed")  # the report's figures
    assert traffic.failures == []
    states = json.loads(ok(cli("status", "--json")))
    assert next(s["version"] for s in states if s["model"] == "digits" and s["default"]) == "2.0"
    assert cli.proxy.state()["routes"] == {}
    aborted = step_events(bad)
    assert [e["verdict"] for e in aborted] == ["abort"]
    assert aborted[0]["canary"]["requests"] >= 5
    assert aborted[0]["canary"]["p99_ms"] >= 1000
    promoted = step_events(good)
    assert [(e["percent"], e["verdict"]) for e in promoted] == [(25, "advance"), (100, "promote")]
    assert all(e["canary"]["requests"] >= 10 and e["canary"]["errors"] == 0 for e in promoted)
    # What was judged is gRPC traffic: every request of the model the proxy logged came through the gateway.
    records = log.records(started - 1, time.time() + 60)
    routed = {"/predictions/digits", "/v2/models/digits/infer", "/v1/models/digits:predict"}
    assert {r.uri for r in records if r.uri in routed} == {"/v2/models/digits/infer"}
    assert {"1.0", "2.0", "4.0"} <= set(traffic.versions)  # the slow canary, then the good one, then promoted


def test_with_the_proxy_stopped_oip_and_grpc_go_straight_to_the_default(cli, server, digit: bytes) -> None:
    default = next(
        s["version"] for s in json.loads(ok(cli("status", "--json"))) if s["model"] == "digits" and s["default"]
    )
    ok(cli("canary", "digits", "4.0", "--percent", "100"))  # would send everything to 4.0 through the proxy
    cli.proxy.stop()
    # Another program takes the proxy's free TCP port: the front never talks to it (inference tokens included).
    squatter = socket.create_server(("127.0.0.1", cli.proxy_port))
    squatter.settimeout(0.5)
    try:
        for protocol, send in SENDERS.items():
            assert send_many(send(server, digit), 20, workers=4) == Counter({default: 20}), protocol
        with pytest.raises(TimeoutError):
            squatter.accept()
    finally:
        squatter.close()
        ok(cli("proxy", "start"))
        ok(cli("canary", "digits", "4.0", "--percent", "0"))
    # Back in the path as soon as it listens again (the front retries it after at most ROUTER_RETRY, 5 s).
    ok(cli("canary", "digits", "4.0", "--percent", "100"))
    try:
        deadline = time.monotonic() + 15
        while send_many(oip_grpc_sender(server, digit), 1) != Counter({"4.0": 1}):
            assert time.monotonic() < deadline, "the front did not go back to the proxy"
            time.sleep(0.5)
    finally:
        ok(cli("canary", "digits", "4.0", "--percent", "0"))
