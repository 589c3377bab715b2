"""The OIP gateway against hostile or careless callers: names outside the store's grammar (HTTP, gRPC and
``Gateway`` itself), malformed HTTP, bursts of probes and scrapes, and clients that hang up mid-answer.

Every test counts what reached the TorchServe stand-ins (``RecordingTorchServe`` for the management
side, ``upstream`` for inference): a refused name must cost TorchServe nothing.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import requests

from servekit.serving.oip import (
    INTERNAL_ERROR,
    Gateway,
    OipError,
    grpc_server,
    http_server,
    log_handler,
    main,
)
from servekit.serving.oip_service import OipService
from servekit.serving.server import free_port
from tests.fake_server import loopback, serving
from tests.unit.test_oip_gateway import GRPC_AUTH, KEY, FakeTorchServe, _UpstreamHandler

pytestmark = pytest.mark.unit

AUTH = {"Authorization": f"Bearer {KEY}"}
# Each a name TorchServe's URLs would read as something else, or that the store's grammar refuses.
BAD_NAMES = [
    "../digits", "digits/../other", "digits/1.0", "a/b", "digits?x=1", "digits#frag", "%2e%2e", "digits%2F1.0",
    "di gits", "digits\x00", "digits\n", "", ".", "..", "/digits", "digits/", "1digits", "a" * 65, "x" * 5000,
]  # fmt: skip
BAD_VERSIONS = [
    "../2.0", "2.0/../1.0", "2.0/", "/2.0", "2.0?x=1", "2.0#frag", "%32.0", "2.0%2F..", "2 .0", "2.0\x00",
    "2.0\n", ".", "..", "1.0.0.0", "v2", "2.", "9" * 5000,
]  # fmt: skip


def short_id(value: str) -> str:
    text = ascii(value)
    return text if len(text) <= 24 else f"{text[:16]}...({len(value)})"


class RecordingTorchServe(FakeTorchServe):
    """``FakeTorchServe`` that records every call it gets, optionally slow, and how many ran at once."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.calls: list[tuple] = []
        self.delay = delay
        self.in_flight = 0
        self.most_in_flight = 0
        self.lock = threading.Lock()
        self.fail_with: Exception | None = None  # raised by describe and url: a failure the gateway did not foresee

    def _record(self, *call: Any) -> None:
        with self.lock:
            self.calls.append(call)

    def count(self, kind: str) -> int:
        return sum(1 for call in self.calls if call[0] == kind)

    def models(self) -> list[str]:
        self._record("models")
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            time.sleep(self.delay)
            return super().models()
        finally:
            with self.lock:
                self.in_flight -= 1

    def describe(self, model: str, version: str = "all", timeout: float | None = None) -> list[dict]:
        self._record("describe", model, version)
        if self.fail_with is not None:
            raise self.fail_with
        return super().describe(model, version, timeout)

    def send(self, kind: str, method: str, path: str, *, timeout: float | None = None, **kwargs: Any):
        self._record("send", kind, method, path)
        return super().send(kind, method, path, timeout=timeout, **kwargs)

    def url(self, kind: str, path: str = "") -> str:
        self._record("url", kind, path)
        if self.fail_with is not None:
            raise self.fail_with
        return super().url(kind, path)


def recording(delay: float = 0.0) -> RecordingTorchServe:
    fake = RecordingTorchServe(delay)
    fake.register("digits", "1.0", "READY").register("digits", "2.0", "READY", default=True)
    return fake


@pytest.fixture(scope="module")
def upstream_stub() -> Iterator[SimpleNamespace]:
    """TorchServe's inference API stood in for (as ``test_oip_gateway.upstream``), shared by the module."""
    seen: list[dict] = []
    with serving(loopback(type("Upstream", (_UpstreamHandler,), {"seen": seen}))) as server:
        yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_address[1]}", seen=seen)


@pytest.fixture(scope="module")
def grpc_side(upstream_stub: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """The gRPC service over a recording stand-in, for the whole module (each test starts with no calls)."""
    from tritonclient.grpc import InferenceServerClient

    fake = recording()
    fake.inference_url = upstream_stub.url
    port = free_port()
    server = grpc_server(Gateway(fake, tmp_path_factory.mktemp("store"), view_ttl=0), f"127.0.0.1:{port}", workers=4)
    server.start()
    client = InferenceServerClient(f"127.0.0.1:{port}")
    try:
        yield SimpleNamespace(client=client, fake=fake, seen=upstream_stub.seen)
    finally:
        client.close()
        server.stop(grace=0).wait(5)


@pytest.fixture
def grpc(grpc_side: SimpleNamespace) -> SimpleNamespace:
    grpc_side.fake.calls.clear()
    grpc_side.fake.fail_with = None
    grpc_side.seen.clear()
    return grpc_side


def grpc_call(client: Any, method: str, name: str, version: str) -> None:
    from tritonclient.grpc import InferInput

    if method == "ModelReady":
        client.is_model_ready(name, version, headers=GRPC_AUTH)
    elif method == "ModelMetadata":
        client.get_model_metadata(name, version, headers=GRPC_AUTH)
    else:
        images = InferInput("image", [1], "BYTES")
        images.set_data_from_numpy(np.array([b"abc"], dtype=np.object_))
        client.infer(name, [images], model_version=version, headers=GRPC_AUTH)


def grpc_error(client: Any, method: str, name: str, version: str = "") -> tuple[str, str]:
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as info:
        grpc_call(client, method, name, version)
    return str(info.value.status()), info.value.message()


GRPC_METHODS = ["ModelReady", "ModelMetadata", "ModelInfer"]


# ------------------------------------------------------------------------------------------ names: gRPC
@pytest.mark.parametrize("method", GRPC_METHODS)
@pytest.mark.parametrize("name", BAD_NAMES, ids=short_id)
def test_grpc_refuses_a_model_name_outside_the_grammar_before_any_call(
    grpc: SimpleNamespace, method: str, name: str
) -> None:
    status, message = grpc_error(grpc.client, method, name, "2.0")
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert message.startswith("model name ")
    assert "is not a valid model name: letters, digits, '_' and '-', starting with a letter" in message
    if len(name) < 60:
        assert message.startswith(f"model name {name!r} is not")
    assert len(message) < 300
    assert (grpc.fake.calls, grpc.seen) == ([], [])  # neither the management nor the inference API was called


@pytest.mark.parametrize("method", GRPC_METHODS)
@pytest.mark.parametrize("version", BAD_VERSIONS, ids=short_id)
def test_grpc_refuses_a_model_version_outside_the_grammar_before_any_call(
    grpc: SimpleNamespace, method: str, version: str
) -> None:
    status, message = grpc_error(grpc.client, method, "digits", version)
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert "is not a valid model version: one to three numbers joined by dots" in message
    if len(version) < 60:
        assert message.startswith(f"model version {version!r} is not")
    assert len(message) < 300
    assert (grpc.fake.calls, grpc.seen) == ([], [])


@pytest.mark.parametrize("method", GRPC_METHODS)
def test_grpc_valid_names_still_reach_torchserve(grpc: SimpleNamespace, method: str) -> None:
    """The positive control of the two tests above: the same calls with good names are made."""
    if method == "ModelMetadata":
        status, _ = grpc_error(grpc.client, method, "digits", "2.0")  # no archive in this store: 404 after describe
        assert status == "StatusCode.NOT_FOUND"
    else:
        grpc_call(grpc.client, method, "digits", "2.0")
    assert grpc.fake.count("describe") + len(grpc.seen) > 0


@pytest.mark.parametrize("method", GRPC_METHODS)
def test_an_unexpected_failure_is_grpc_internal_with_a_generic_message(
    grpc: SimpleNamespace, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    grpc.fake.fail_with = RuntimeError("secret detail: http://127.0.0.1:8081/models/digits?x")
    with caplog.at_level(logging.ERROR, logger="servekit.serving.oip"):
        status, message = grpc_error(grpc.client, method, "digits", "2.0")
    assert (status, message) == ("StatusCode.INTERNAL", INTERNAL_ERROR)
    assert any("secret detail" in r.getMessage() or "secret detail" in (r.exc_text or "") for r in caplog.records)


# ------------------------------------------------------------------------------------------ names: Gateway and HTTP
@pytest.mark.parametrize("name", BAD_NAMES, ids=short_id)
def test_the_gateway_itself_refuses_a_bad_name_before_any_call(tmp_path: Path, name: str) -> None:
    fake = recording()
    gateway = Gateway(fake, tmp_path)
    for call in (
        lambda: gateway.model_ready(name),
        lambda: gateway.model_ready(name, "2.0"),
        lambda: gateway.model_metadata(name),
        lambda: gateway.infer(name, None, b"{}", {}),
        lambda: gateway.infer(name, "2.0", b"{}", {}),
    ):
        with pytest.raises(OipError, match="is not a valid model name") as info:
            call()
        assert info.value.status == 400
    assert fake.calls == []


@pytest.mark.parametrize("version", [*BAD_VERSIONS, ""], ids=short_id)
def test_the_gateway_itself_refuses_a_bad_version_before_any_call(tmp_path: Path, version: str) -> None:
    fake = recording()
    gateway = Gateway(fake, tmp_path)
    for call in (
        lambda: gateway.model_ready("digits", version),
        lambda: gateway.model_metadata("digits", version),
        lambda: gateway.infer("digits", version, b"{}", {}),
    ):
        with pytest.raises(OipError, match="is not a valid model version") as info:
            call()
        assert info.value.status == 400
    assert fake.calls == []


def test_a_version_is_at_most_three_numbers_of_nine_digits(tmp_path: Path) -> None:
    """The store's grammar bounds a version (29 characters at most): a longer one is refused before any call."""
    fake = recording()
    gateway = Gateway(fake, tmp_path)
    longest = ".".join(["9" * 9] * 3)
    with pytest.raises(OipError, match="has no version") as info:  # asked, and TorchServe has no such version
        gateway.model_ready("digits", longest)
    assert info.value.status == 404
    asked = len(fake.calls)
    assert asked > 0
    for longer in ("1" * 10, longest + "9", "1" * 300):
        with pytest.raises(OipError, match=r"is not a valid model version: .*, each of at most 9 digits") as info:
            gateway.model_ready("digits", longer)
        assert (info.value.status, len(fake.calls)) == (400, asked)


@pytest.mark.parametrize(
    "path",
    ["/v2/models/..%2fdigits/ready", "/v2/models/digits%2f..%2fx", "/v2/models/digits/versions/2.0%2f..%2f/ready",
     "/v2/models/digits/versions/2.0/../ready", "/v1/models/digits%3Fx", "/v2/models/%00/ready",
     f"/v2/models/{'a' * 65}", "/v2/models/digits/versions/1.0.0.0"],
)  # fmt: skip
def test_http_paths_with_bad_names_are_404_json_without_any_call(tmp_path: Path, path: str) -> None:
    fake = recording()
    port = free_port()
    with serving(http_server(Gateway(fake, tmp_path), f"127.0.0.1:{port}")):
        answer = requests.get(f"http://127.0.0.1:{port}{path}", headers=AUTH, timeout=10)
    assert (answer.status_code, answer.headers["Content-Type"]) == (404, "application/json")
    assert answer.json()["error"].startswith("no such OIP endpoint: GET ")
    assert fake.calls == []


def test_an_unexpected_failure_over_http_is_a_json_500(tmp_path: Path) -> None:
    fake = recording()
    fake.fail_with = RuntimeError("secret detail")
    port = free_port()
    with serving(http_server(Gateway(fake, tmp_path), f"127.0.0.1:{port}")), requests.Session() as session:
        answer = session.get(f"http://127.0.0.1:{port}/v2/models/digits/ready", headers=AUTH, timeout=10)
        assert (answer.status_code, answer.json()) == (500, {"error": INTERNAL_ERROR})
        assert answer.headers["Content-Type"] == "application/json"
        assert session.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=10).json() == {"live": True}


# ------------------------------------------------------------------------------------------ raw HTTP
@pytest.fixture
def raw_port(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    with serving(http_server(Gateway(recording(), tmp_path, tokens=False), f"127.0.0.1:{port}")):
        yield port


def exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` as is and read until the server closes the connection (a timeout fails the test)."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    return received


def parse(received: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    version, status, _ = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    headers = dict(line.split(": ", 1) for line in lines)
    return int(status), headers, body


def assert_json_error(received: bytes, status: int, error: str) -> None:
    assert received.count(b"HTTP/1.1 ") == 1, received[:500]  # one answer, then the connection closed
    code, headers, body = parse(received)
    assert code == status
    assert headers["Content-Type"] == "application/json"
    assert headers["Content-Length"] == str(len(body))
    assert headers["Connection"] == "close"
    assert b"<" not in body
    assert json.loads(body) == {"error": error}


HIDDEN = b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "BREW", "get"])
def test_an_unknown_method_is_a_501_json_error_and_the_connection_closes(raw_port: int, method: str) -> None:
    body = b"x" * 10 + HIDDEN  # a request hidden in the unread body must not be answered
    request = f"{method} /v2 HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    error = f"method {method!r} is not supported: this gateway answers GET and POST"
    assert_json_error(exchange(raw_port, request), 501, error)


def test_head_gets_the_json_errors_headers_and_no_body(raw_port: int) -> None:
    received = exchange(raw_port, b"HEAD /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
    code, headers, body = parse(received)
    assert (code, headers["Content-Type"], headers["Connection"], body) == (501, "application/json", "close", b"")
    error = {"error": "method 'HEAD' is not supported: this gateway answers GET and POST"}
    assert int(headers["Content-Length"]) == len(json.dumps(error))


@pytest.mark.parametrize(
    ("request_bytes", "status", "error"),
    [
        (b"GARBAGE\r\n\r\n", 400, "Bad request syntax ('GARBAGE')"),
        (b"GET / HTTP/1.1 extra\r\n\r\n", 400, "Bad request version ('extra')"),
        (b"GET / FTP/1.1\r\n\r\n", 400, "Bad request version ('FTP/1.1')"),
        (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505, "Invalid HTTP version (2.0)"),
        (b"POST /v2\r\n\r\n", 400, "Bad HTTP/0.9 request type ('POST')"),
        (b"GET /v2/health/live\r\n\r\n", 400, "HTTP/0.9 requests are not served: send HTTP/1.0 or 1.1"),
        (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414, "Request-URI Too Long"),
        (b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431, "Too many headers"),
        (b"GET / HTTP/1.1\r\nX-A: " + b"b" * 70_000 + b"\r\n\r\n", 431, "Line too long"),
    ],
    ids=["syntax", "four-words", "not-http", "http2", "http09-post", "http09-get", "uri-414", "headers", "line"],
)
def test_malformed_requests_get_json_errors_and_the_connection_closes(
    raw_port: int, request_bytes: bytes, status: int, error: str
) -> None:
    assert_json_error(exchange(raw_port, request_bytes + HIDDEN), status, error)


def test_valid_requests_keep_their_connection(raw_port: int) -> None:
    """The positive control: valid traffic is unchanged (keep-alive, JSON, 404 for an unknown path)."""
    with socket.create_connection(("127.0.0.1", raw_port), timeout=10) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\nGET /nothing HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.3)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    first, second = received.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200 OK")
    assert first.endswith(b'{"live": true}')
    assert b"Connection: close" not in first
    assert second.startswith(b"404 Not Found")
    assert b'"error": "no such OIP endpoint: GET /nothing"' in second


# ------------------------------------------------------------------------------------------ the cache
def concurrently(count: int, call: Any) -> list[Any]:
    barrier = threading.Barrier(count)

    def one(i: int) -> Any:
        barrier.wait()
        return call(i)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def test_fifty_concurrent_probes_and_scrapes_cost_one_round_of_management_calls(tmp_path: Path) -> None:
    fake = recording(delay=0.1)
    fake.register("other", "1.0", "READY")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with serving(http_server(Gateway(fake, tmp_path, view_ttl=30), f"127.0.0.1:{port}")):
        answers = concurrently(50, lambda i: requests.get(base + ("/metrics", "/v2/health/ready")[i % 2], timeout=30))
    assert [a.status_code for a in answers] == [200] * 50
    assert all(a.json() == {"ready": True} for a in answers[1::2])
    assert all("servekit_exporter_up 1.0" in a.text.splitlines() for a in answers[::2])
    assert all('servekit_workers_ready{model="other",version="1.0"} 1.0' in a.text for a in answers[::2])
    # one round: the model list, then each model's default and its versions
    assert sorted(fake.calls) == sorted([("models",), *[("describe", m, v) for m in ("digits", "other")
                                                          for v in ("", "all")]])  # fmt: skip


def test_one_refresh_at_a_time_even_without_a_ttl(tmp_path: Path) -> None:
    fake = recording(delay=0.05)
    gateway = Gateway(fake, tmp_path, view_ttl=0)
    assert concurrently(50, lambda i: gateway.server_ready()) == [True] * 50
    assert fake.most_in_flight == 1  # waiters take the reading in flight instead of starting their own
    assert fake.count("models") < 50


def test_a_torchserve_that_does_not_answer_is_asked_once_per_ttl(tmp_path: Path) -> None:
    fake = recording(delay=0.1)
    fake.unreachable = True
    gateway = Gateway(fake, tmp_path, view_ttl=30)
    assert concurrently(50, lambda i: gateway.server_ready()) == [False] * 50
    assert fake.calls == [("models",)]


def test_readiness_follows_torchserve_within_the_ttl_and_draining_at_once(tmp_path: Path) -> None:
    fake = recording()
    draining = tmp_path / "draining"
    gateway = Gateway(fake, tmp_path, draining_file=draining, view_ttl=1.0)
    assert gateway.server_ready() is True
    rounds = fake.count("models")
    draining.touch()
    assert gateway.server_ready() is False  # the draining file is read on every call
    draining.unlink()
    assert gateway.server_ready() is True
    fake.registered["digits"][1]["workers"] = []  # the default, 2.0, loses its worker
    assert fake.count("models") == rounds  # still the cached view
    time.sleep(1.05)
    assert gateway.server_ready() is False
    assert fake.count("models") == rounds + 1


def test_the_default_ttl_is_short() -> None:
    assert 0 < Gateway(recording(), Path("unused")).view_ttl <= 1


# ------------------------------------------------------------------------------------------ the log
def test_the_log_file_rotates_at_its_cap(tmp_path: Path) -> None:
    path = tmp_path / "gateway.log"
    handler = log_handler(path, max_bytes=4096, backups=2)
    log = logging.getLogger("tests.oip.rotation")
    log.propagate = False
    log.addHandler(handler)
    try:
        for i in range(1000):  # about 100 kB
            log.warning("line %04d %s", i, "x" * 60)
    finally:
        log.removeHandler(handler)
        handler.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["gateway.log", "gateway.log.1", "gateway.log.2"]
    assert all((tmp_path / name).stat().st_size <= 4096 for name in files)
    assert "line 0999" in path.read_text()


@pytest.mark.parametrize("argv", [["--log-max-bytes", "0"], ["--log-max-bytes", "100"], ["--log-backups", "0"]])
def test_an_unbounded_log_is_refused(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    required = ["--http", "127.0.0.1:1", "--grpc", "127.0.0.1:2", "--inference", "http://x", "--management",
                "http://x", "--model-store", "store"]  # fmt: skip
    with pytest.raises(SystemExit) as info:
        main([*required, *argv])
    assert info.value.code == 2
    assert "the log must stay bounded" in capsys.readouterr().err


def hang_up(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0), as a scraper that gives up does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Gate(RecordingTorchServe):
    """``models()`` waits until the test has hung up, so the answer is written to a reset connection."""

    def __init__(self) -> None:
        super().__init__()
        self.register("digits", "1.0", "READY")
        self.hung_up = threading.Event()

    def models(self) -> list[str]:
        self.hung_up.wait(10)
        return super().models()


def test_an_aborted_scrape_costs_one_short_line_and_no_traceback(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    path = tmp_path / "gateway.log"
    handler = log_handler(path)
    oip_logger = logging.getLogger("servekit.serving.oip")
    oip_logger.addHandler(handler)
    oip_logger.setLevel(logging.INFO)  # as main() sets the root logger
    fake = _Gate()
    port = free_port()
    try:
        with serving(http_server(Gateway(fake, tmp_path, view_ttl=0), f"127.0.0.1:{port}")):
            for _ in range(3):
                fake.hung_up.clear()
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                time.sleep(0.2)  # the request is read, the gateway is asking TorchServe
                hang_up(sock)
                time.sleep(0.2)  # the reset has arrived
                fake.hung_up.set()
                time.sleep(0.3)  # the answer meets the reset
            fake.hung_up.set()
            answer = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)  # the gateway still serves
            assert answer.status_code == 200
    finally:
        oip_logger.removeHandler(handler)
        oip_logger.setLevel(logging.NOTSET)
        handler.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 3, lines
    assert all("went away" in line and len(line) < 200 for line in lines)
    captured = capfd.readouterr()
    for text in (path.read_text(), captured.err, captured.out):
        assert "Traceback" not in text
        assert "Exception occurred" not in text


class _SlowManagement(BaseHTTPRequestHandler):
    """TorchServe's management and inference APIs, as little as the gateway asks, slowly (an aborted scrape)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        time.sleep(0.5 if self.path.startswith("/models") else 0)
        body = b'{"models": []}' if self.path.startswith("/models") else b'{"status": "Healthy"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def slow_torchserve() -> Iterator[str]:
    with serving(loopback(_SlowManagement)) as server:
        yield f"http://127.0.0.1:{server.server_address[1]}"


def wait_listening(port: int, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert process is None or process.poll() is None, "the gateway exited"
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


def test_the_gateway_process_keeps_its_log_bounded_whatever_clients_do(tmp_path: Path, slow_torchserve: str) -> None:
    """The real process: aborted scrapes and connections reset mid-request rotate a capped log, no traceback."""
    http_port, grpc_port = free_port(), free_port()
    log = tmp_path / "gateway.log"
    startup = tmp_path / "start.log"
    command = [sys.executable, "-m", "servekit.serving.oip", "--http", f"127.0.0.1:{http_port}",
               "--grpc", f"127.0.0.1:{grpc_port}", "--inference", slow_torchserve, "--management", slow_torchserve,
               "--model-store", str(tmp_path), "--log-file", str(log), "--log-max-bytes", "1024",
               "--log-backups", "1"]  # fmt: skip
    with startup.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2])
    try:
        wait_listening(http_port, process)
        sock = socket.create_connection(("127.0.0.1", http_port), timeout=10)
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.2)
        hang_up(sock)  # while the gateway waits for /models
        time.sleep(0.6)
        for _ in range(40):  # a reset while the gateway reads the request line
            sock = socket.create_connection(("127.0.0.1", http_port), timeout=10)
            sock.sendall(b"GET /metr")
            time.sleep(0.02)
            hang_up(sock)
        time.sleep(0.5)
        answer = requests.get(f"http://127.0.0.1:{http_port}/v2/health/live", timeout=10)
        assert (answer.status_code, answer.json()) == (200, {"live": True})
    finally:
        process.terminate()
        process.wait(10)
    rotated = log.with_name("gateway.log.1")
    assert rotated.exists()
    assert not log.with_name("gateway.log.2").exists()
    assert log.stat().st_size <= 1024
    assert rotated.stat().st_size <= 1024
    text = rotated.read_text() + log.read_text()
    assert "went away" in text
    for content in (text, startup.read_text()):
        assert "Traceback" not in content
    assert startup.read_text().strip() == f"oip gateway: http 127.0.0.1:{http_port}, grpc 127.0.0.1:{grpc_port}"


def test_oip_service_gives_the_gateway_a_rotating_log_and_a_fresh_start_up_file(
    tmp_path: Path, slow_torchserve: str
) -> None:
    service = OipService(tmp_path / "oip", slow_torchserve, slow_torchserve, None, tmp_path / "store",
                         http_port=free_port(), grpc_port=free_port())  # fmt: skip
    service.prefix.mkdir(parents=True)
    startup = service.prefix / "gateway.start.log"
    startup.write_text("what an earlier start said\n" * 1000)
    service.start(timeout=30)
    try:
        pid = service.running_pid()
        assert pid is not None
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert command[command.index(b"--log-file") + 1] == str(service.prefix / "gateway.log").encode()
        assert "what an earlier start said" not in startup.read_text()  # emptied at each start
        deadline = time.monotonic() + 10
        while "oip gateway: http" not in (service.prefix / "gateway.log").read_text(errors="replace"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        service.stop()
    assert service.running_pid() is None
