"""The OIP front (nginx) under hostile clients: idle connections cannot starve the probes or inference,
one address cannot take every request slot, and every answer the front writes itself is ``{"error": ...}`` JSON.

The front is what is under test, so it runs for real (``OipFront``: nginx, its own health listener)
in front of the gateway's real HTTP side (``servekit.serving.oip.http_server``, over a stand-in TorchServe
client) and a small stand-in for TorchServe's inference API, all on loopback: no TorchServe and no
model, so the module starts in about a second. Hostile requests are written on plain sockets (no
HTTP client sends a NUL, a garbage request line or 101 headers), and every answer is read within a
deadline.
"""

from __future__ import annotations

import contextlib
import json
import resource
import select
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import requests

from servekit.serving.oip import Gateway, http_server
from servekit.serving.oip_service import CLIENT_LIMIT, DEFAULT_MAX_BODY, HEADER_TIMEOUT, OipFront
from servekit.serving.processes import free_port
from tests.fake_server import serving

pytestmark = pytest.mark.integration

IDLE_CONNECTIONS = 1200  # more than the 1,024 worker connections the front had
PROBE_DEADLINE_S = 1.0
HOSTILE_DEADLINE_S = 3.0
HEADER_TIMEOUT_S = int(HEADER_TIMEOUT.removesuffix("s"))
AUTH = b"Authorization: Bearer inference-key\r\n"
INFER = "/v2/models/digits/infer"


# ------------------------------------------------------------------------------------------ stand-ins
class _TorchServe(BaseHTTPRequestHandler):
    """TorchServe's inference API as the front sees it: the handler's JSON answers, TorchServe's own 404/503."""

    protocol_version = "HTTP/1.1"
    release: threading.Event
    in_flight: list[int]
    lock: threading.Lock

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
        pass

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        model = self.path.split("/")[3] if self.path.startswith(("/v2/models/", "/v1/models/")) else self.path
        if model == "slow":  # held until the test releases it: requests in progress
            with self.lock:
                self.in_flight[0] += 1
            self.release.wait(30)
        status, document = {
            "nope": (404, {"code": 404, "type": "ModelNotFoundException", "message": "Model not found: nope"}),
            "busy": (503, {"code": 503, "type": "ServiceUnavailableException", "message": "queue is full"}),
            "bad": (400, {"error": "'inputs' must be a non-empty list of tensors"}),
            "big": (413, {"error": "image is 9999x9999 = 99980001 pixels; the limit is 16777216"}),
            "boom": (500, {"error": "inference failed"}),
        }.get(model, (200, {"path": self.path, "bytes": len(body)}))
        data = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 4 * CLIENT_LIMIT  # nginx opens up to CLIENT_LIMIT connections to it at once


class _Client:
    """The part of ``TorchServeClient`` the gateway's liveness uses: TorchServe's /ping answers."""

    def send(self, kind: str, method: str, path: str, **kwargs: object) -> SimpleNamespace:
        assert (kind, method, path) == ("inference", "GET", "/ping")
        return SimpleNamespace(status_code=200)


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """The front on free loopback ports (inference and health), its upstreams, stopped in teardown."""
    state = SimpleNamespace(release=threading.Event(), in_flight=[0], lock=threading.Lock())
    handler = type("TorchServe", (_TorchServe,), vars(state))
    torchserve = _Server(("127.0.0.1", free_port()), handler)
    gateway_address = f"127.0.0.1:{free_port()}"
    gateway = http_server(Gateway(_Client(), tmp_path_factory.mktemp("store")), gateway_address)
    port, health_port = free_port(), free_port()
    nginx = OipFront(
        tmp_path_factory.mktemp("front"),
        listen=f"127.0.0.1:{port}",
        torchserve=f"127.0.0.1:{torchserve.server_address[1]}",
        gateway=gateway_address,
        health_listen=f"127.0.0.1:{health_port}",
    )
    with serving(torchserve), serving(gateway):
        nginx.start()
        try:
            yield SimpleNamespace(port=port, health_port=health_port, nginx=nginx, **vars(state))
        finally:
            state.release.set()
            nginx.stop()
    assert nginx.running_pid() is None


# ------------------------------------------------------------------------------------------ raw HTTP
def exchange(port: int, request: bytes, deadline: float = HOSTILE_DEADLINE_S) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` on a new connection; the status, headers and body of the answer, read within ``deadline``.

    The body is read up to its Content-Length, not to the close: after a 413 nginx keeps reading (and
    discarding) the rest of the body before it closes.
    """
    end = time.monotonic() + deadline
    with socket.create_connection(("127.0.0.1", port), timeout=deadline) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the answer may come before the body
            sock.sendall(request)
        received = b""
        while True:
            head, separator, body = received.partition(b"\r\n\r\n")
            if separator:
                lines = head.decode("latin-1").split("\r\n")
                headers = dict(line.split(": ", 1) for line in lines[1:])
                if len(body) >= int(headers.get("Content-Length", "0")):
                    return int(lines[0].split()[1]), headers, body[: int(headers.get("Content-Length", "0"))]
            sock.settimeout(max(end - time.monotonic(), 0.001))
            chunk = sock.recv(65536)
            if not chunk:
                raise AssertionError(f"connection closed before a whole answer: {received[:300]!r}")
            received += chunk


def request(method: str, path: str, *headers: bytes, body: bytes = b"") -> bytes:
    length = b"Content-Length: %d\r\n" % len(body) if body or method == "POST" else b""
    return (
        b"%s %s HTTP/1.1\r\nHost: front\r\n%s%s\r\n" % (method.encode(), path.encode(), b"".join(headers), length)
        + body
    )


def assert_json_error(status: int, headers: dict[str, str], body: bytes, expected: int) -> str:
    """Assert an answer is ``expected`` with a JSON object holding a non-empty "error" string; that string."""
    assert status == expected, body[:300]
    assert headers["Content-Type"] == "application/json"
    document = json.loads(body)
    assert isinstance(document, dict)
    assert isinstance(document["error"], str)
    assert document["error"]
    return document["error"]


def raised_nofile(needed: int) -> int:
    """Raise this process's soft open-file limit to ``needed``; the previous soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"the open-file limit ({hard}) is under the {needed} this test needs")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return soft


# ------------------------------------------------------------------------------------------ slow clients
def test_idle_connections_do_not_starve_the_probes_or_inference(front: SimpleNamespace) -> None:
    """1,200 connections that send nothing or half a header: none is dropped, and liveness (both ports) and
    inference answer at once."""
    soft = raised_nofile(IDLE_CONNECTIONS + 512)
    idle: list[socket.socket] = []
    try:
        for i in range(IDLE_CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", front.port), timeout=5)
            idle.append(sock)
            if i % 2:
                sock.sendall(f"POST {INFER} HTTP/1.1\r\nHost: front\r\n".encode())  # a header never finished
        for port in (front.port, front.health_port):
            started = time.monotonic()
            answer = requests.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=PROBE_DEADLINE_S)
            assert time.monotonic() - started < PROBE_DEADLINE_S
            assert (answer.status_code, answer.json()) == (200, {"live": True})
        started = time.monotonic()
        answer = requests.post(f"http://127.0.0.1:{front.port}{INFER}", data=b"{}", timeout=PROBE_DEADLINE_S,
                               headers={"Authorization": "Bearer k", "Content-Type": "application/json"})  # fmt: skip
        assert time.monotonic() - started < PROBE_DEADLINE_S
        assert (answer.status_code, answer.json()) == (200, {"path": INFER, "bytes": 2})
        # The front still holds every one: none was answered, closed or reset to make room (nginx closes idle
        # connections when its pool is full: with 1,024 worker connections it dropped ~250 of these).
        poll = select.poll()
        for sock in idle:
            poll.register(sock, select.POLLIN)
        assert poll.poll(0) == []
    finally:
        for sock in idle:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


def test_a_connection_that_never_finishes_its_header_is_dropped(front: SimpleNamespace) -> None:
    """After the header timeout, with nothing written (nginx's default waited 60 s)."""
    with socket.create_connection(("127.0.0.1", front.port), timeout=HEADER_TIMEOUT_S + 5) as sock:
        sock.sendall(f"POST {INFER} HTTP/1.1\r\nHost: front\r\n".encode())
        started = time.monotonic()
        try:
            received = sock.recv(65536)
        except ConnectionResetError:  # reset_timedout_connection
            received = b""
        assert received == b""  # closed, nothing written
        assert HEADER_TIMEOUT_S - 1 < time.monotonic() - started < HEADER_TIMEOUT_S + 5


def test_one_address_past_its_limit_gets_429_json_while_its_requests_in_progress_finish(
    front: SimpleNamespace,
) -> None:
    """CLIENT_LIMIT requests in progress (twice the benchmarks' 64) all succeed; one more is refused at once."""
    front.release.clear()
    front.in_flight[0] = 0
    held = [socket.create_connection(("127.0.0.1", front.port), timeout=30) for _ in range(CLIENT_LIMIT)]
    try:
        for sock in held:
            sock.sendall(request("POST", "/v2/models/slow/infer", AUTH, body=b"{}"))
        deadline = time.monotonic() + 10
        while front.in_flight[0] < CLIENT_LIMIT and time.monotonic() < deadline:
            time.sleep(0.02)
        assert front.in_flight[0] == CLIENT_LIMIT
        error = assert_json_error(*exchange(front.port, request("POST", INFER, AUTH, body=b"{}")), 429)
        assert f"the limit is {CLIENT_LIMIT}" in error
        answer = requests.get(f"http://127.0.0.1:{front.health_port}/v2/health/live", timeout=PROBE_DEADLINE_S)
        assert answer.status_code == 200  # the health port has its own limit
        front.release.set()
        for sock in held:
            sock.settimeout(10)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")
    finally:
        front.release.set()
        for sock in held:
            sock.close()


# ------------------------------------------------------------------------------------------ hostile requests
HUGE = b"a" * 9000
HOSTILE = {
    "PUT": (request("PUT", INFER, AUTH, body=b"{}"), 405),
    "DELETE": (request("DELETE", "/v2/models/digits/versions/1.0/infer", AUTH), 405),
    "BREW": (request("BREW", "/v1/models/digits:predict", AUTH), 405),
    "TRACE": (request("TRACE", INFER), 405),
    "lower-case method": (request("brew", INFER), 400),
    "101 headers": (request("GET", "/v2", *(b"X-H%d: v\r\n" % i for i in range(101))), 431),
    "a header line over 8 KB": (request("POST", INFER, AUTH, b"X-Big: " + HUGE + b"\r\n", body=b"{}"), 431),
    "headers over 32 KB": (request("GET", "/v2", *(b"X-B%d: %s\r\n" % (i, b"a" * 7000) for i in range(6))), 431),
    "a request line over 8 KB": (request("GET", "/v2/health/live?" + HUGE.decode()), 414),
    "%00 in the path": (request("POST", "/v2/models/di%00gits/infer", AUTH, body=b"{}"), 400),
    "%00 at the end": (request("GET", "/v2/health/live%00"), 400),
    "a body just over the limit": (request("POST", INFER, AUTH, body=b"x" * (DEFAULT_MAX_BODY + 1)), 413),
    "a body far over the limit": (
        b"POST %s HTTP/1.1\r\nHost: front\r\n%sContent-Length: 100000000\r\n\r\n" % (INFER.encode(), AUTH)
        + b"x" * 1_000_000,
        413,
    ),
    "a chunked body over the limit": (
        b"POST %s HTTP/1.1\r\nHost: front\r\n%sTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
        % (INFER.encode(), AUTH, DEFAULT_MAX_BODY + 1, b"x" * (DEFAULT_MAX_BODY + 1)),
        413,
    ),
    "a malformed chunked body": (
        b"POST %s HTTP/1.1\r\nHost: front\r\n%sTransfer-Encoding: chunked\r\n\r\nZZ\r\n{}\r\n0\r\n\r\n"
        % (INFER.encode(), AUTH),
        400,
    ),
    "an unknown transfer encoding": (request("POST", INFER, AUTH, b"Transfer-Encoding: gzip\r\n"), 501),
    "HTTP/2.0 in the request line": (b"GET /v2/health/live HTTP/2.0\r\nHost: front\r\n\r\n", 505),
    "a garbage request line": (b"\x16\x03\x01\x02\x00\x01\xff\xfe garbage\r\n\r\n", 400),
    "a request line with no method": (b"NOT A REQUEST LINE AT ALL\r\n\r\n", 400),
    "an internal error URI": (request("GET", "/_servekit/error/500"), 404),
    "no token": (request("POST", INFER, body=b"{}"), 401),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_every_hostile_request_gets_a_json_error(front: SimpleNamespace, case: str) -> None:
    data, expected = HOSTILE[case]
    status, headers, body = exchange(front.port, data)
    assert_json_error(status, headers, body, expected)
    if expected == 405:  # TRACE is refused by nginx before a location is chosen: on every path
        assert headers["Allow"] == ("GET, POST" if case == "TRACE" else "POST")


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (request("PUT", "/v2/health/live"), 405),
        (request("GET", "/v2/models/digits"), 404),
        (request("GET", "/v2/health/live", b"X-Big: " + HUGE + b"\r\n"), 431),
        (request("GET", "/v2/health/ready%00"), 400),
        (request("POST", "/v2/health/live", body=b"x" * 2048), 413),
        (b"\x16\x03\x01\x02\x00\x01\xff\xfe garbage\r\n\r\n", 400),
    ],
    ids=["PUT", "another path", "a header line over 8 KB", "%00", "a body", "garbage"],
)
def test_the_health_port_answers_only_its_two_probes(front: SimpleNamespace, data: bytes, status: int) -> None:
    answer_status, headers, body = exchange(front.health_port, data)
    assert_json_error(answer_status, headers, body, status)
    if status == 405:
        assert headers["Allow"] == "GET"


def test_the_health_port_ignores_the_probes_headers(front: SimpleNamespace) -> None:
    """101 headers never reach the gateway from the health port: the probe is answered."""
    many = (b"X-H%d: v\r\n" % i for i in range(101))
    status, headers, body = exchange(front.health_port, request("GET", "/v2/health/live", *many))
    assert (status, headers["Content-Type"], json.loads(body)) == (200, "application/json", {"live": True})


def test_an_http_0_9_request_is_closed_without_an_answer(front: SimpleNamespace) -> None:
    """HTTP/0.9 has no status line and no headers, so no JSON error can be written: the connection closes."""
    for port in (front.port, front.health_port):
        with socket.create_connection(("127.0.0.1", port), timeout=HOSTILE_DEADLINE_S) as sock:
            sock.sendall(b"GET /v2/health/live\r\n")
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(65536) == b""


# ------------------------------------------------------------------------------------------ valid traffic
@pytest.mark.parametrize(
    ("path", "status", "document"),
    [
        (INFER, 200, {"path": INFER, "bytes": 2}),
        ("/v2/models/digits/infer?x=1", 200, {"path": "/v2/models/digits/infer?x=1", "bytes": 2}),
        ("/v2/models/digits/versions/2.0/infer", 200, {"path": "/predictions/digits/2.0", "bytes": 2}),
        ("/v1/models/digits:predict", 200, {"path": "/v1/models/digits:predict", "bytes": 2}),
        ("/v2/models/bad/infer", 400, {"error": "'inputs' must be a non-empty list of tensors"}),
        ("/v2/models/big/infer", 413, {"error": "image is 9999x9999 = 99980001 pixels; the limit is 16777216"}),
        ("/v2/models/boom/infer", 500, {"error": "inference failed"}),
        ("/v2/models/nope/infer", 404, {"error": "no model or version named in /v2/models/nope/infer is being served"}),
        (
            "/v2/models/busy/infer",
            503,
            {"error": "the model cannot take this request now (no worker, or its queue is full)"},
        ),
    ],
)
def test_answers_from_torchserve_pass_or_are_rewritten_as_before(
    front: SimpleNamespace, path: str, status: int, document: dict
) -> None:
    """The handler's own JSON errors pass untouched; TorchServe's 404 and 503 are rewritten, as before."""
    answer = requests.post(f"http://127.0.0.1:{front.port}{path}", data=b"{}", timeout=10,
                           headers={"Authorization": "Bearer k", "Content-Type": "application/json"})  # fmt: skip
    assert (answer.status_code, answer.headers["Content-Type"], answer.json()) == (status, "application/json", document)
    assert "Allow" not in answer.headers


def test_bodies_up_to_the_limit_pass_chunked_or_not(front: SimpleNamespace) -> None:
    body = b"x" * DEFAULT_MAX_BODY
    status, _, answer = exchange(front.port, request("POST", INFER, AUTH, body=body), deadline=10)
    assert (status, json.loads(answer)) == (200, {"path": INFER, "bytes": DEFAULT_MAX_BODY})
    chunked = b"POST %s HTTP/1.1\r\nHost: front\r\n%sTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (
        INFER.encode(),
        AUTH,
        len(body),
        body,
    )
    status, _, answer = exchange(front.port, chunked, deadline=10)
    assert (status, json.loads(answer)) == (200, {"path": INFER, "bytes": DEFAULT_MAX_BODY})
