"""The one TorchServe client against a tiny fake TorchServe on 127.0.0.1: tokens, refresh, errors."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from servekit.serving.client import TorchServeClient, TorchServeError, read_keys, token_refused
from servekit.serving.server import free_port
from tests.fake_server import serving

REFUSAL = {"code": 400, "type": "InvalidKeyException", "message": "Token Authorization failed. Token either incorrect"}


class FakeTorchServe(ThreadingHTTPServer):
    """Answers like TorchServe's token check: a refused token gets 400, ``GET /token`` rewrites the key file."""

    daemon_threads = True

    def __init__(self, key_file: Path) -> None:
        super().__init__(("127.0.0.1", 0), FakeHandler)
        self.key_file = key_file
        self.valid = {"inference": "inference-1", "management": "management-1"}
        self.api_key = "api-key"
        self.refreshes: list[str] = []
        self.lock = threading.Lock()
        self.write_keys()

    def write_keys(self, api: bool = True) -> None:
        keys = {kind: {"key": key, "expiration time": "later"} for kind, key in self.valid.items()}
        if api:
            keys["API"] = {"key": self.api_key}
        self.key_file.write_text(json.dumps(keys))

    def expire(self, kind: str) -> None:
        """The token in the key file no longer counts (TorchServe's 60-minute expiry)."""
        self.valid[kind] = f"{kind}-expired"

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that gave up (the timeout test) is not an error here

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class FakeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as TorchServe's frontend
    server: FakeTorchServe

    def log_message(self, *args: object) -> None:
        pass

    def _answer(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        address = urlsplit(self.path)
        token = self.headers.get("Authorization", "").removeprefix("Bearer ")
        if address.path == "/token":
            kind = parse_qs(address.query)["type"][0]
            if token != self.server.api_key:
                return self._answer(400, REFUSAL)
            with self.server.lock:
                self.server.refreshes.append(kind)
                self.server.valid[kind] = f"{kind}-{len(self.server.refreshes) + 1}"
                self.server.write_keys()
            return self._answer(200, {"message": "refreshed"})
        if address.path == "/slow":
            time.sleep(2)
        kind = "management" if address.path.startswith("/models") else "inference"
        if token != self.server.valid[kind]:
            return self._answer(400, REFUSAL)
        if address.path == "/models/missing":
            return self._answer(404, {"code": 404, "type": "ModelNotFound", "message": "Model not found: missing"})
        return self._answer(200, {"kind": kind, "path": address.path, "token": token})

    do_GET = do_POST = do_PUT = do_DELETE = _handle  # noqa: N815


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeTorchServe]:
    with serving(FakeTorchServe(tmp_path / "key_file.json")) as server:
        yield server


@pytest.fixture
def client(fake: FakeTorchServe) -> TorchServeClient:
    return TorchServeClient(fake.url + "/", fake.url, fake.key_file, timeout=5)


# ------------------------------------------------------------------------------------------ keys
def test_read_keys_lowercases_the_kinds(fake: FakeTorchServe) -> None:
    assert read_keys(fake.key_file) == {"inference": "inference-1", "management": "management-1", "api": "api-key"}


def test_a_missing_or_damaged_key_file_is_one_line(tmp_path: Path) -> None:
    missing = r"^no TorchServe key file at .*key\.json \(is TorchServe running\? --key-file\)$"
    with pytest.raises(TorchServeError, match=missing):
        read_keys(tmp_path / "key.json")
    (tmp_path / "key.json").write_text('{"inference": ')
    with pytest.raises(TorchServeError, match=r"^cannot read TorchServe key file .*key\.json: "):
        read_keys(tmp_path / "key.json")
    (tmp_path / "key.json").write_text("[]")
    with pytest.raises(TorchServeError, match=r"not a JSON object$"):
        read_keys(tmp_path / "key.json")


def test_token_refused_only_for_the_token_message() -> None:
    assert token_refused(400, json.dumps(REFUSAL))
    assert token_refused(401, json.dumps(REFUSAL).encode())
    assert not token_refused(400, '{"message": "bad image"}')
    assert not token_refused(200, json.dumps(REFUSAL))


# ------------------------------------------------------------------------------------------ refresh
def test_an_expired_token_is_refreshed_once_and_the_call_repeated(client: TorchServeClient, fake) -> None:
    fake.expire("inference")
    answer = client.call("inference", "POST", "/predictions/digits", data=b"png")
    assert answer.status_code == 200
    assert answer.json()["token"] == "inference-2"
    assert fake.refreshes == ["inference"]
    assert read_keys(fake.key_file)["inference"] == "inference-2"  # TorchServe rewrote the file
    assert client.call("inference", "GET", "/ping").status_code == 200
    assert fake.refreshes == ["inference"]  # the new token is read from the file: no second refresh


def test_threads_refused_at_once_refresh_once(client: TorchServeClient, fake) -> None:
    fake.expire("management")
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: client.call("management", "GET", "/models").status_code, range(8)))
    assert statuses == [200] * 8
    assert fake.refreshes == ["management"]


def test_a_refresh_already_done_by_someone_else_is_not_repeated(client: TorchServeClient, fake) -> None:
    client.refresh("inference", refused="a-token-that-is-no-longer-in-the-file")
    assert fake.refreshes == []
    client.refresh("inference", refused="inference-1")
    assert fake.refreshes == ["inference"]


def test_without_an_api_key_a_refusal_is_one_line(client: TorchServeClient, fake) -> None:
    fake.write_keys(api=False)
    fake.expire("inference")
    with pytest.raises(TorchServeError, match=r"^token for inference refused and no API key in .*key_file\.json"):
        client.call("inference", "GET", "/ping")


def test_a_refused_refresh_is_one_line(client: TorchServeClient, fake) -> None:
    fake.api_key = "rotated"
    fake.expire("inference")
    with pytest.raises(TorchServeError, match=r"^refreshing the inference token failed: 400 .*Token Authorization"):
        client.call("inference", "GET", "/ping")


def test_the_keep_alive_sender_refreshes_too(client: TorchServeClient, fake) -> None:
    sender = client.keep_alive("/predictions/digits")
    assert sender.post(b"png")[0] == 200
    fake.expire("inference")
    status, body = sender.post(b"png")
    assert status == 200
    assert json.loads(body)["token"] == "inference-2"
    assert fake.refreshes == ["inference"]


# ------------------------------------------------------------------------------------------ errors
def test_manage_returns_json_or_a_one_line_refusal(client: TorchServeClient) -> None:
    answer = client.manage("GET", "/models/digits")
    assert answer == {"kind": "management", "path": "/models/digits", "token": "management-1"}
    with pytest.raises(TorchServeError) as refused:
        client.manage("GET", "/models/missing")
    assert str(refused.value) == "TorchServe refused GET /models/missing: 404 Model not found: missing"


def test_describe_names_what_is_not_registered(client: TorchServeClient) -> None:
    with pytest.raises(TorchServeError, match=r"^model 'missing' is not registered$"):
        client.describe("missing", "")


def test_an_unreachable_server_is_one_line(tmp_path: Path, fake) -> None:
    port = free_port()
    client = TorchServeClient(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}", fake.key_file)
    with pytest.raises(TorchServeError) as refused:
        client.call("management", "GET", "/models")
    assert str(refused.value) == f"TorchServe is not reachable at http://127.0.0.1:{port} (is it running?)"
    with pytest.raises(requests.ConnectionError):  # send lets the transport error through, for callers that count
        client.send("management", "GET", "/models")


def test_a_silent_server_is_one_line(client: TorchServeClient, fake) -> None:
    silent = r"^TorchServe did not answer GET http://127\.0\.0\.1:\d+/slow within 0\.5s$"
    with pytest.raises(TorchServeError, match=silent):
        client.call("inference", "GET", "/slow", timeout=0.5)


def test_extra_headers_are_sent_beside_the_token(client: TorchServeClient) -> None:
    answer = client.send("inference", "POST", "/predictions/digits", data=b"x", headers={"Content-Type": "image/png"})
    assert answer.json()["token"] == "inference-1"
