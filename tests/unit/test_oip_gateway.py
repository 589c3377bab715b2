"""The OIP address without TorchServe: the gateway's readiness, tokens and metadata, its HTTP and gRPC sides,
the gRPC <-> HTTP conversions, the nginx front, ``servekit metadata`` and stopping the service.

TorchServe is stood in for twice: ``FakeTorchServe`` replaces ``TorchServeClient`` (describe, models,
tokens, ping), and ``Upstream`` answers inference calls over HTTP with the handler's own protocol code
(``handlers.protocols``), so the gRPC service and the nginx front run end to end on loopback.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import resource
import socket
import struct
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import requests
from requests.structures import CaseInsensitiveDict

import servekit
from handlers.protocols import Call, Classification, ProtocolConfig, decode
from servekit.cli import main
from servekit.serving import exporter
from servekit.serving import server as server_module
from servekit.serving.client import TorchServeError
from servekit.serving.nginx import TEMP_DIRS, config_head, nginx_binary
from servekit.serving.oip import (
    BINARY_HEADER,
    Gateway,
    OipError,
    grpc_request_to_http,
    grpc_server,
    http_response_to_grpc,
    http_server,
    read_archive_metadata,
)
from servekit.serving.oip_service import OipFront, OipService, OipServiceError, render_front_config
from servekit.serving.processes import command_line
from servekit.serving.server import free_port
from servekit.serving.store import file_sha256
from tests.fake_server import loopback, serving

pytestmark = pytest.mark.unit

KEY = "inference-key-1"
AUTH = {"Authorization": f"Bearer {KEY}"}
GRPC_AUTH = {"authorization": f"Bearer {KEY}"}  # gRPC metadata keys are lower case
CONFIG = ProtocolConfig()
INPUT_SHAPE = (1, 16, 16)


# ------------------------------------------------------------------------------------------ stand-ins
def version_entry(name: str, version: str, *statuses: str, url: str | None = None) -> dict:
    """One element of TorchServe's describe answer."""
    return {
        "modelName": name,
        "modelVersion": version,
        "modelUrl": f"{name}_v{version}.mar" if url is None else url,
        "minWorkers": 1,
        "maxWorkers": 1,
        "batchSize": 8,
        "workers": [{"id": str(9000 + i), "status": status, "gpu": False} for i, status in enumerate(statuses)],
    }


class FakeTorchServe:
    """Stands in for ``TorchServeClient``: what the gateway calls, answered like TorchServe 0.12."""

    def __init__(self, inference_url: str = "http://127.0.0.1:1") -> None:
        self.registered: dict[str, list[dict]] = {}
        self.defaults: dict[str, str] = {}
        self.key: str | None = KEY
        self.inference_url = inference_url
        self.ping_status: int | None = 200  # None: TorchServe does not answer
        self.unreachable = False
        self.timeouts: list[float | None] = []

    def register(self, name: str, version: str, *statuses: str, default: bool = False, url: str | None = None):
        self.registered.setdefault(name, []).append(version_entry(name, version, *statuses, url=url))
        if default or name not in self.defaults:
            self.defaults[name] = version
        return self

    def _reachable(self) -> None:
        if self.unreachable:
            raise TorchServeError("TorchServe is not reachable at http://127.0.0.1:8081 (is it running?)")

    def token(self, kind: str) -> str:
        if kind != "inference" or self.key is None:
            raise TorchServeError(f"no {kind!r} key in var/key_file.json (have: management)")
        return self.key

    def models(self) -> list[str]:
        self._reachable()
        return list(self.registered)

    def describe(self, model: str, version: str = "all", timeout: float | None = None) -> list[dict]:
        self.timeouts.append(timeout)
        self._reachable()
        if model not in self.registered:
            raise TorchServeError(f"model {model!r} is not registered")
        entries = copy.deepcopy(self.registered[model])
        if version == "all":
            return entries
        wanted = self.defaults[model] if version == "" else version
        chosen = [entry for entry in entries if entry["modelVersion"] == wanted]
        if not chosen:
            raise TorchServeError(f"{model} has no registered version {version!r}")
        return chosen

    def send(self, kind: str, method: str, path: str, *, timeout: float | None = None, **kwargs: Any):
        assert (kind, method, path) == ("inference", "GET", "/ping")
        if self.ping_status is None:
            raise requests.ConnectionError("connection refused")
        return SimpleNamespace(status_code=self.ping_status)

    def url(self, kind: str, path: str = "") -> str:
        assert kind == "inference"
        return f"{self.inference_url}{path}"


def classify(call: Call) -> list[Classification]:
    """Deterministic top-k answers: the 'digit' of an element is its length (image) or its sum (tensor) mod 10."""
    k = int(call.topk or 1)
    results = []
    for element in call.images or call.tensors:
        digit = (len(element) if isinstance(element, bytes) else int(round(float(element.sum())))) % 10
        top = [(digit + j) % 10 for j in range(k)]
        results.append(Classification([str(d) for d in top], top, [0.5, 0.25, 0.125, 0.0625][:k]))
    return results


_INFER_PATHS = re.compile(r"/v2/models/(\w+)/infer|/predictions/(\w+)/([\d.]+)|/v1/models/(\w+):predict")


class _UpstreamHandler(BaseHTTPRequestHandler):
    """TorchServe's inference API as the handler answers it (and TorchServe's own 404/503 for some names)."""

    protocol_version = "HTTP/1.1"
    seen: list[dict]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass

    def _answer(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.seen.append({"method": "GET", "path": self.path, "headers": headers})
        self._answer(200, b'{"status": "Healthy"}', "application/json")

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.seen.append({"method": "POST", "path": self.path, "headers": headers, "body": body})
        match = _INFER_PATHS.fullmatch(self.path)
        model = next((group for group in match.groups() if group), "") if match else ""
        if model in ("", "nope"):
            torchserve = {"code": 404, "type": "ModelNotFoundException", "message": f"Model not found: {model}"}
            self._answer(404, json.dumps(torchserve).encode(), "application/json")
            return
        if model == "busy":
            torchserve = {"code": 503, "type": "ServiceUnavailableException", "message": "no worker"}
            self._answer(503, json.dumps(torchserve).encode(), "application/json")
            return
        try:
            call = decode({"body": body}, headers, CONFIG, INPUT_SHAPE)
        except Exception as exc:  # the handler's own error answer
            self._answer(400, json.dumps({"error": str(exc)}).encode(), "application/json")
            return
        version = match.group(3) or "2.0"
        reply = call.encode(classify(call), model, version, CONFIG)
        payload = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
        self._answer(200, payload, reply.content_type, reply.headers)


@pytest.fixture
def upstream() -> Iterator[SimpleNamespace]:
    """A stand-in for TorchServe's inference API on a free port; ``seen`` lists the calls it got."""
    seen: list[dict] = []
    with serving(loopback(type("Upstream", (_UpstreamHandler,), {"seen": seen}))) as server:
        port = server.server_address[1]
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", address=f"127.0.0.1:{port}", seen=seen)


@pytest.fixture
def fake() -> FakeTorchServe:
    """digits 1.0 and 2.0 registered, each with a READY worker; 2.0 the default."""
    return FakeTorchServe().register("digits", "1.0", "READY").register("digits", "2.0", "READY", default=True)


# ------------------------------------------------------------------------------------------ archives
def write_archive(store: Path, name: str, metadata: dict | None) -> Path:
    store.mkdir(parents=True, exist_ok=True)
    path = store / name
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("MAR-INF/MANIFEST.json", "{}")
        if metadata is not None:
            archive.writestr("metadata.json", json.dumps(metadata))
    return path


def oip_block(platform: str, versions: list[str]) -> dict:
    tensor = {"name": "image", "datatype": "BYTES", "shape": [-1]}
    return {"name": "m", "versions": versions, "platform": platform, "inputs": [tensor], "outputs": [tensor]}


# ------------------------------------------------------------------------------------------ readiness
def test_a_model_is_ready_only_with_a_ready_worker_per_version() -> None:
    fake = FakeTorchServe()
    fake.register("digits", "1.0", "UNLOADING", "STARTING").register("digits", "2.0", "STARTING", "READY")
    fake.register("digits", "3.0")  # no workers at all
    gateway = Gateway(fake, Path("unused"))
    assert gateway.model_ready("digits") is False  # the default, 1.0
    assert gateway.model_ready("digits", "1.0") is False
    assert gateway.model_ready("digits", "2.0") is True
    assert gateway.model_ready("digits", "3.0") is False
    fake.defaults["digits"] = "2.0"
    assert gateway.model_ready("digits") is True
    assert set(fake.timeouts) == {10}  # every describe is bounded


def test_the_server_is_not_ready_without_models() -> None:
    assert Gateway(FakeTorchServe(), Path("unused")).server_ready() is False


def test_the_server_is_ready_only_when_every_default_version_has_a_ready_worker(fake: FakeTorchServe) -> None:
    gateway = Gateway(fake, Path("unused"), view_ttl=0)  # no cache: the fake changes between calls
    assert gateway.server_ready() is True
    fake.register("other", "1.0", "READY").register("other", "2.0", "UNLOADING", default=True)
    assert gateway.model_ready("other", "1.0") is True
    assert gateway.server_ready() is False  # other's default has no READY worker, though 1.0 has one
    fake.defaults["other"] = "1.0"
    assert gateway.server_ready() is True
    fake.registered["digits"][1]["workers"] = []  # digits 2.0, the default
    assert gateway.server_ready() is False


def test_readiness_when_torchserve_does_not_answer(fake: FakeTorchServe) -> None:
    gateway = Gateway(fake, Path("unused"))
    fake.unreachable = True
    assert gateway.server_ready() is False
    with pytest.raises(OipError, match="TorchServe did not answer") as info:
        gateway.model_ready("digits")
    assert info.value.status == 503


@pytest.mark.parametrize(("name", "version"), [("nope", None), ("nope", "1.0"), ("digits", "3.0"), ("digits", "1")])
def test_an_unknown_model_or_version_is_404(fake: FakeTorchServe, name: str, version: str | None) -> None:
    gateway = Gateway(fake, Path("unused"))
    with pytest.raises(OipError) as info:
        gateway.model_ready(name, version)
    assert info.value.status == 404
    with pytest.raises(OipError) as info:
        gateway.model_metadata(name, version)
    assert info.value.status == 404


@pytest.mark.parametrize(("status", "live"), [(200, True), (500, True), (503, False), (None, False)])
def test_live_means_torchserve_answers_its_ping(fake: FakeTorchServe, status: int | None, live: bool) -> None:
    fake.ping_status = status
    assert Gateway(fake, Path("unused")).live() is live


# ------------------------------------------------------------------------------------------ tokens
@pytest.mark.parametrize("header", [f"Bearer {KEY}", f"bearer {KEY}", f"BEARER {KEY}", f"  Bearer   {KEY}  "])
def test_the_inference_key_as_a_bearer_token_is_accepted(fake: FakeTorchServe, header: str) -> None:
    Gateway(fake, Path("unused")).check_token(header)


@pytest.mark.parametrize(
    "header", [None, "", "Bearer", "Bearer ", "Bearer wrong", f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", f"Basic {KEY}"]
)
def test_a_missing_or_wrong_token_is_401(fake: FakeTorchServe, header: str | None) -> None:
    with pytest.raises(OipError, match="missing or wrong token") as info:
        Gateway(fake, Path("unused")).check_token(header)
    assert info.value.status == 401


def test_no_inference_key_yet_is_503(fake: FakeTorchServe) -> None:
    fake.key = None
    with pytest.raises(OipError, match="no inference key yet") as info:
        Gateway(fake, Path("unused")).check_token(f"Bearer {KEY}")
    assert info.value.status == 503


# ------------------------------------------------------------------------------------------ metadata
def test_model_metadata_is_the_archives_oip_block_with_the_registered_versions(
    fake: FakeTorchServe, model_store: Path
) -> None:
    gateway = Gateway(fake, model_store)
    for version, archive in ((None, "digits_v2.0.mar"), ("2.0", "digits_v2.0.mar"), ("1.0", "digits_v1.0.mar")):
        oip = read_archive_metadata(model_store / archive)["oip"]
        metadata = gateway.model_metadata("digits", version)
        assert metadata == {**oip, "name": "digits", "versions": ["1.0", "2.0"]}
    assert [t["name"] for t in metadata["inputs"]] == ["image", "pixels"]
    assert [(t["name"], t["datatype"]) for t in metadata["outputs"]] == [
        ("labels", "BYTES"), ("scores", "FP32"), ("indices", "INT64"),
    ]  # fmt: skip


def test_model_metadata_lists_the_registered_versions_sorted(model_store: Path) -> None:
    fake = FakeTorchServe().register("digits", "2.0", "READY").register("digits", "1.0")
    assert Gateway(fake, model_store).model_metadata("digits")["versions"] == ["1.0", "2.0"]


def test_model_metadata_reads_the_archive_of_the_version_asked(tmp_path: Path) -> None:
    store = tmp_path / "store"
    write_archive(store, "m_v1.0.mar", {"oip": oip_block("first", ["1.0"])})
    write_archive(store, "m_v2.0.mar", {"oip": oip_block("second", ["2.0"])})
    fake = FakeTorchServe().register("m", "1.0", "READY").register("m", "2.0", "READY")
    gateway = Gateway(fake, store)
    assert gateway.model_metadata("m")["platform"] == "first"
    assert gateway.model_metadata("m", "2.0")["platform"] == "second"
    assert gateway.model_metadata("m", "2.0")["versions"] == ["1.0", "2.0"]


def test_model_metadata_sorts_versions_as_numbers_like_servekit_metadata(tmp_path: Path) -> None:
    store = tmp_path / "store"
    write_archive(store, "m_v10.0.mar", {"oip": oip_block("p", ["10.0"])})
    fake = FakeTorchServe().register("m", "10.0", "READY").register("m", "2.0").register("m", "1.0")
    assert Gateway(fake, store).model_metadata("m")["versions"] == ["1.0", "2.0", "10.0"]


@pytest.mark.parametrize("url", ["", "missing_v9.0.mar", "/etc/passwd", "outside_v1.0.mar", "store"])
def test_an_archive_outside_the_store_or_missing_is_404(tmp_path: Path, url: str) -> None:
    store = tmp_path / "store"
    outside = write_archive(tmp_path / "elsewhere", "outside_v1.0.mar", {"oip": oip_block("p", ["1.0"])})
    write_archive(store, "m_v1.0.mar", {"oip": oip_block("p", ["1.0"])})
    (store / "outside_v1.0.mar").symlink_to(outside)  # in the store by name, outside it in fact
    (store / "store").mkdir()  # a directory, not an archive
    fake = FakeTorchServe().register("m", "1.0", "READY", url=url)
    with pytest.raises(OipError, match="is not in the model store") as info:
        Gateway(fake, store).model_metadata("m")
    assert info.value.status == 404


def test_a_directory_in_the_url_is_dropped_to_the_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    write_archive(store, "m_v1.0.mar", {"oip": oip_block("in the store", ["1.0"])})
    write_archive(tmp_path, "m_v1.0.mar", {"oip": oip_block("beside the store", ["1.0"])})
    fake = FakeTorchServe().register("m", "1.0", "READY", url="../m_v1.0.mar")
    assert Gateway(fake, store).model_metadata("m")["platform"] == "in the store"


def test_an_archive_without_oip_metadata_is_404_and_says_rebuild(tmp_path: Path) -> None:
    store = tmp_path / "store"
    write_archive(store, "m_v1.0.mar", {"model": "m", "version": "1.0"})
    fake = FakeTorchServe().register("m", "1.0", "READY")
    with pytest.raises(OipError, match=r"m 1\.0: the archive has no OIP metadata \(rebuild it\)") as info:
        Gateway(fake, store).model_metadata("m")
    assert info.value.status == 404


def test_an_archive_without_metadata_json_is_500(tmp_path: Path) -> None:
    write_archive(tmp_path / "store", "m_v1.0.mar", None)
    fake = FakeTorchServe().register("m", "1.0", "READY")
    with pytest.raises(OipError, match=r"cannot read metadata\.json in m_v1\.0\.mar") as info:
        Gateway(fake, tmp_path / "store").model_metadata("m")
    assert info.value.status == 500


# ------------------------------------------------------------------------------------------ HTTP
@pytest.fixture
def gateway_http(fake: FakeTorchServe, model_store: Path) -> Iterator[str]:
    port = free_port()
    # view_ttl=0: these tests change the fake between calls (the cache has its own tests)
    with serving(http_server(Gateway(fake, model_store, view_ttl=0), f"127.0.0.1:{port}")):
        yield f"http://127.0.0.1:{port}"


def get(url: str, headers: dict[str, str] | None = None) -> requests.Response:
    return requests.get(url, headers=headers, timeout=10)


def test_health_needs_no_token_and_answers_200_or_400(gateway_http: str, fake: FakeTorchServe) -> None:
    answer = get(f"{gateway_http}/v2/health/ready")
    assert (answer.status_code, answer.json()) == (200, {"ready": True})
    assert answer.headers["Content-Type"] == "application/json"
    answer = get(f"{gateway_http}/v2/health/live")
    assert (answer.status_code, answer.json()) == (200, {"live": True})  # OIP: {"live": bool}
    fake.registered["digits"][1]["workers"] = [{"status": "UNLOADING"}]  # 2.0, the default
    fake.ping_status = None
    answer = get(f"{gateway_http}/v2/health/ready?probe=1")
    assert (answer.status_code, answer.json()) == (400, {"ready": False})
    answer = get(f"{gateway_http}/v2/health/live")
    assert (answer.status_code, answer.json()) == (400, {"live": False})
    fake.registered.clear()
    answer = get(f"{gateway_http}/v2/health/ready")
    assert (answer.status_code, answer.json()) == (400, {"ready": False})


PROTECTED = ["/v2", "/v2/models/digits", "/v2/models/digits/versions/2.0", "/v2/models/digits/ready",
             "/v2/models/digits/versions/1.0/ready", "/v1/models/digits"]  # fmt: skip


@pytest.mark.parametrize("path", PROTECTED)
@pytest.mark.parametrize("headers", [None, {"Authorization": "Bearer wrong"}, {"Authorization": KEY + "x"}])
def test_everything_else_needs_the_token(gateway_http: str, path: str, headers: dict[str, str] | None) -> None:
    answer = get(gateway_http + path, headers)
    assert answer.status_code == 401
    assert answer.headers["Content-Type"] == "application/json"
    assert "missing or wrong token" in answer.json()["error"]


def test_server_metadata(gateway_http: str) -> None:
    answer = get(f"{gateway_http}/v2", AUTH)
    assert (answer.status_code, answer.json()) == (
        200,
        {"name": "servekit", "version": servekit.__version__, "extensions": ["binary_tensor_data"]},
    )


def test_model_metadata_over_http(gateway_http: str, model_store: Path) -> None:
    oip = read_archive_metadata(model_store / "digits_v2.0.mar")["oip"]
    for path in ("/v2/models/digits", "/v2/models/digits/versions/2.0", "/v2/models/digits/versions/1.0"):
        answer = get(gateway_http + path, AUTH)
        assert answer.status_code == 200, answer.text
        document = answer.json()
        assert (document["name"], document["versions"]) == ("digits", ["1.0", "2.0"])
        assert (document["inputs"], document["outputs"]) == (oip["inputs"], oip["outputs"])


def test_model_readiness_over_http(gateway_http: str, fake: FakeTorchServe) -> None:
    answer = get(f"{gateway_http}/v2/models/digits/ready", AUTH)
    assert (answer.status_code, answer.json()) == (200, {"name": "digits", "ready": True})
    fake.registered["digits"][0]["workers"] = [{"status": "UNLOADING"}]  # 1.0
    answer = get(f"{gateway_http}/v2/models/digits/versions/1.0/ready", AUTH)
    assert (answer.status_code, answer.json()) == (400, {"name": "digits", "ready": False})
    answer = get(f"{gateway_http}/v2/models/digits/versions/2.0/ready", AUTH)
    assert (answer.status_code, answer.json()) == (200, {"name": "digits", "ready": True})
    answer = get(f"{gateway_http}/v1/models/digits", AUTH)
    assert (answer.status_code, answer.json()) == (200, {"name": "digits", "ready": True})


@pytest.mark.parametrize(
    ("path", "status", "error"),
    [
        ("/v2/models/nope", 404, "no model named 'nope' is registered"),
        ("/v2/models/nope/ready", 404, "no model named 'nope' is registered"),
        ("/v1/models/nope", 404, "no model named 'nope' is registered"),
        ("/v2/models/digits/versions/3.0", 404, "model 'digits' has no version '3.0'"),
        ("/v2/models/digits/versions/3.0/ready", 404, "model 'digits' has no version '3.0'"),
        ("/v2/repository/index", 404, "no such OIP endpoint: GET /v2/repository/index"),
        ("/v2/models/digits/stats", 404, "no such OIP endpoint"),
        ("/v2/models/1digit", 404, "no such OIP endpoint"),
        ("/", 404, "no such OIP endpoint: GET /"),
    ],
)
def test_unknown_models_versions_and_paths_are_json_errors(
    gateway_http: str, path: str, status: int, error: str
) -> None:
    answer = get(gateway_http + path, AUTH)
    assert answer.status_code == status
    assert answer.headers["Content-Type"] == "application/json"
    assert error in answer.json()["error"]


def test_torchserve_down_is_a_503_json_error(gateway_http: str, fake: FakeTorchServe) -> None:
    fake.unreachable = True
    answer = get(f"{gateway_http}/v2/models/digits", AUTH)
    assert answer.status_code == 503
    assert answer.json()["error"].startswith("TorchServe did not answer")
    fake.key = None
    answer = get(f"{gateway_http}/v2", AUTH)
    assert (answer.status_code, answer.json()["error"][:20]) == (503, "no inference key yet")


def test_a_large_post_body_does_not_spoil_the_next_request_on_the_connection(gateway_http: str) -> None:
    with requests.Session() as session:
        answer = session.post(f"{gateway_http}/v2/repository/index", data=b"x" * 100_000, headers=AUTH, timeout=10)
        assert answer.status_code == 404
        answer = session.get(f"{gateway_http}/v2/health/ready", timeout=10)
        assert (answer.status_code, answer.json()) == (200, {"ready": True})


def test_one_post_gets_one_answer_whatever_its_body(gateway_http: str) -> None:
    hidden = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    body = b"x" * 65536 + hidden
    head = f"POST /v2/nothing HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    port = int(gateway_http.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + body)
        # The server sees the end once it has read all we sent; under load it may have answered and closed
        # already (ENOTCONN here), which is as good: the answer is still in our receive buffer.
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.count(b"HTTP/1.1 ") == 1, received.decode(errors="replace")


# ------------------------------------------------------------------------------------------ gRPC <-> HTTP
def parameter_value(parameter: Any) -> Any:
    """What grpc_server hands grpc_request_to_http: the value of an InferParameter, whichever it holds."""
    choice = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, choice) if choice else None


def bytes_tensor(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def split_http(body: bytes, header_length: int) -> tuple[dict, bytes]:
    return json.loads(body[:header_length]), body[header_length:]


def test_raw_bytes_input_becomes_a_binary_oip_request() -> None:
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name="digits", model_version="2.0", id="req-7")
    request.inputs.add(name="image", datatype="BYTES", shape=[2])
    raw = bytes_tensor(b"\x89PNG one", b"\xff\xd8 two")
    request.raw_input_contents.append(raw)
    request.parameters["top_k"].int64_param = 3
    for name in ("labels", "scores"):
        request.outputs.add(name=name)
    body, header_length = grpc_request_to_http(request, parameter_value)
    document, tail = split_http(body, header_length)
    assert document == {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(raw)}}],
        "id": "req-7",
        "parameters": {"top_k": 3, "binary_data_output": True},
        "outputs": [{"name": "labels", "parameters": {"binary_data": True}},
                    {"name": "scores", "parameters": {"binary_data": True}}],
    }  # fmt: skip
    assert tail == raw
    call = decode({"body": body}, {BINARY_HEADER.lower(): str(header_length)}, CONFIG, INPUT_SHAPE)
    assert (call.protocol, call.images, call.topk, call.request_id) == (
        "oip_v2", [b"\x89PNG one", b"\xff\xd8 two"], 3, "req-7",
    )  # fmt: skip
    assert call.outputs == [("labels", True), ("scores", True)]


def test_bytes_contents_are_serialised_like_raw_contents() -> None:
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add(name="image", datatype="BYTES", shape=[2, 1])
    tensor.contents.bytes_contents.extend([b"first image", b"2nd"])
    body, header_length = grpc_request_to_http(request, parameter_value)
    document, tail = split_http(body, header_length)
    assert tail == bytes_tensor(b"first image", b"2nd")
    assert document["inputs"][0]["parameters"] == {"binary_data_size": len(tail)}
    assert document["inputs"][0]["shape"] == [2, 1]
    assert "id" not in document
    assert "outputs" not in document
    assert document["parameters"] == {"binary_data_output": True}
    call = decode({"body": body}, {BINARY_HEADER.lower(): str(header_length)}, CONFIG, INPUT_SHAPE)
    assert call.images == [b"first image", b"2nd"]
    assert call.outputs == [(name, True) for name in CONFIG.outputs]


@pytest.mark.parametrize("raw", [True, False])
def test_fp32_input_raw_or_in_contents(raw: bool) -> None:
    from tritonclient.grpc import service_pb2

    pixels = np.linspace(-1.0, 1.0, 2 * 256, dtype=np.float32).reshape(2, *INPUT_SHAPE)
    request = service_pb2.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add(name="pixels", datatype="FP32", shape=[2, *INPUT_SHAPE])
    tensor.parameters["note"].string_param = "kept"
    if raw:
        request.raw_input_contents.append(pixels.astype("<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(pixels.ravel().tolist())
    body, header_length = grpc_request_to_http(request, parameter_value)
    document, tail = split_http(body, header_length)
    assert document["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [2, 1, 16, 16],
                                   "parameters": {"note": "kept", "binary_data_size": 2 * 256 * 4}}]  # fmt: skip
    assert tail == pixels.astype("<f4").tobytes()
    call = decode({"body": body}, {BINARY_HEADER.lower(): str(header_length)}, CONFIG, INPUT_SHAPE)
    assert np.array_equal(np.stack(call.tensors), pixels)


def test_the_raw_contents_of_several_inputs_follow_the_header_in_order() -> None:
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name="m")
    request.inputs.add(name="a", datatype="BYTES", shape=[1])
    request.inputs.add(name="b", datatype="FP32", shape=[2])
    request.raw_input_contents.extend([bytes_tensor(b"abc"), np.array([1.5, 2.5], "<f4").tobytes()])
    body, header_length = grpc_request_to_http(request, parameter_value)
    document, tail = split_http(body, header_length)
    sizes = [t["parameters"]["binary_data_size"] for t in document["inputs"]]
    assert sizes == [7, 8]
    assert tail == bytes_tensor(b"abc") + np.array([1.5, 2.5], "<f4").tobytes()


@pytest.mark.parametrize(("inputs", "raws"), [(2, 1), (1, 2)])
def test_a_mismatched_count_of_raw_contents_is_400(inputs: int, raws: int) -> None:
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name="digits")
    for i in range(inputs):
        request.inputs.add(name=f"in{i}", datatype="BYTES", shape=[1])
    request.raw_input_contents.extend([bytes_tensor(b"x")] * raws)
    with pytest.raises(OipError, match=f"{raws} raw_input_contents for {inputs} inputs") as info:
        grpc_request_to_http(request, parameter_value)
    assert info.value.status == 400


def test_other_datatypes_without_raw_contents_are_400() -> None:
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name="digits")
    request.inputs.add(name="pixels", datatype="INT64", shape=[1]).contents.int64_contents.append(3)
    with pytest.raises(OipError, match="input 'pixels': datatype 'INT64' not accepted") as info:
        grpc_request_to_http(request, parameter_value)
    assert info.value.status == 400


def handler_answer(outputs: list[tuple[str, bool]], request_id: str | None = "req-7"):
    """What the handler answers (through TorchServe) for two images, as a requests.Response-like object."""
    results = [Classification(["7", "1"], [7, 1], [0.75, 0.25]), Classification(["3", "8"], [3, 8], [0.5, 0.125])]
    call = Call("oip_v2", [b"one", b"two"], [], request_id=request_id, outputs=outputs)
    reply = call.encode(results, "digits", "2.0", CONFIG)
    body = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
    headers = CaseInsensitiveDict({"Content-Type": reply.content_type, **(reply.headers or {})})
    return SimpleNamespace(status_code=200, content=body, headers=headers)


EXPECTED_RAW = [
    bytes_tensor(b"7", b"1", b"3", b"8"),
    np.array([0.75, 0.25, 0.5, 0.125], "<f4").tobytes(),
    np.array([7, 1, 3, 8], "<i8").tobytes(),
]


@pytest.mark.parametrize(
    "binary", [(True, True, True), (False, False, False), (True, False, True), (False, True, False)]
)
def test_a_binary_json_or_mixed_answer_becomes_the_same_raw_output_contents(binary: tuple[bool, ...]) -> None:
    from tritonclient.grpc import InferResult, service_pb2

    response = handler_answer(list(zip(CONFIG.outputs, binary)))
    if all(binary):
        assert BINARY_HEADER in response.headers
    if not any(binary):
        assert BINARY_HEADER not in response.headers
    converted = http_response_to_grpc(response, service_pb2)
    assert (converted.model_name, converted.model_version, converted.id) == ("digits", "2.0", "req-7")
    assert [(o.name, o.datatype, list(o.shape)) for o in converted.outputs] == [
        ("labels", "BYTES", [2, 2]), ("scores", "FP32", [2, 2]), ("indices", "INT64", [2, 2]),
    ]  # fmt: skip
    assert list(converted.raw_output_contents) == EXPECTED_RAW
    result = InferResult(converted)  # what tritonclient.grpc makes of it
    assert result.as_numpy("labels").tolist() == [[b"7", b"1"], [b"3", b"8"]]
    assert result.as_numpy("scores").tolist() == [[0.75, 0.25], [0.5, 0.125]]
    assert result.as_numpy("indices").tolist() == [[7, 1], [3, 8]]


def test_the_answer_follows_the_requested_outputs_and_its_header_case() -> None:
    from tritonclient.grpc import service_pb2

    response = handler_answer([("indices", True), ("labels", True)], request_id=None)
    response.headers = CaseInsensitiveDict({BINARY_HEADER.lower(): response.headers[BINARY_HEADER]})  # as TorchServe
    converted = http_response_to_grpc(response, service_pb2)
    assert [o.name for o in converted.outputs] == ["indices", "labels"]
    assert list(converted.raw_output_contents) == [EXPECTED_RAW[2], EXPECTED_RAW[0]]
    assert converted.id == ""


# ------------------------------------------------------------------------------------------ gRPC end to end
@pytest.fixture
def grpc_gateway(fake: FakeTorchServe, upstream: SimpleNamespace, model_store: Path) -> Iterator[Any]:
    """The standard gRPC service on a free port, inference forwarded to the ``upstream`` stand-in."""
    from tritonclient.grpc import InferenceServerClient

    fake.inference_url = upstream.url
    port = free_port()
    server = grpc_server(Gateway(fake, model_store, view_ttl=0), f"127.0.0.1:{port}", workers=4)
    server.start()
    client = InferenceServerClient(f"127.0.0.1:{port}")
    try:
        yield client
    finally:
        client.close()
        server.stop(grace=0).wait(5)


def grpc_status(exc: Exception) -> str:
    return str(exc.status())  # type: ignore[attr-defined]


def test_grpc_health_needs_no_token_and_the_rest_does(grpc_gateway: Any, fake: FakeTorchServe) -> None:
    from tritonclient.utils import InferenceServerException

    assert grpc_gateway.is_server_live() is True
    assert grpc_gateway.is_server_ready() is True
    assert grpc_gateway.is_model_ready("digits", headers=GRPC_AUTH) is True
    for call in (
        lambda: grpc_gateway.is_model_ready("digits"),
        lambda: grpc_gateway.get_server_metadata(headers={"authorization": "Bearer wrong"}),
        lambda: grpc_gateway.get_model_metadata("digits"),
    ):
        with pytest.raises(InferenceServerException) as info:
            call()
        assert grpc_status(info.value) == "StatusCode.UNAUTHENTICATED"
        assert "missing or wrong token" in info.value.message()
    fake.registered["digits"][1]["workers"] = []  # the default, 2.0
    assert grpc_gateway.is_server_ready() is False
    assert grpc_gateway.is_model_ready("digits", "1.0", headers=GRPC_AUTH) is True
    assert grpc_gateway.is_model_ready("digits", "2.0", headers=GRPC_AUTH) is False


def test_grpc_metadata(grpc_gateway: Any, model_store: Path) -> None:
    from tritonclient.utils import InferenceServerException

    oip = read_archive_metadata(model_store / "digits_v1.0.mar")["oip"]
    metadata = grpc_gateway.get_model_metadata("digits", "1.0", headers=GRPC_AUTH, as_json=True)
    assert (metadata["name"], metadata["versions"], metadata["platform"]) == ("digits", ["1.0", "2.0"], oip["platform"])
    shapes = [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in metadata["inputs"]]
    assert shapes == [(t["name"], t["datatype"], t["shape"]) for t in oip["inputs"]]
    server = grpc_gateway.get_server_metadata(headers=GRPC_AUTH, as_json=True)
    assert (server["name"], server["version"]) == ("servekit", servekit.__version__)
    with pytest.raises(InferenceServerException) as info:
        grpc_gateway.get_model_metadata("nope", headers=GRPC_AUTH)
    assert grpc_status(info.value) == "StatusCode.NOT_FOUND"


def test_grpc_infer_from_tritonclient_through_the_gateway(grpc_gateway: Any, upstream: SimpleNamespace) -> None:
    from tritonclient.grpc import InferInput, InferRequestedOutput

    images = InferInput("image", [2], "BYTES")
    images.set_data_from_numpy(np.array([b"abc", b"defgh"], dtype=np.object_))
    outputs = [InferRequestedOutput(name) for name in ("labels", "scores", "indices")]
    result = grpc_gateway.infer("digits", [images], model_version="2.0", outputs=outputs, request_id="r-1",
                                parameters={"top_k": 2}, headers=GRPC_AUTH)  # fmt: skip
    assert result.as_numpy("labels").tolist() == [[b"3", b"4"], [b"5", b"6"]]
    assert result.as_numpy("indices").tolist() == [[3, 4], [5, 6]]
    assert result.as_numpy("scores").tolist() == [[0.5, 0.25], [0.5, 0.25]]
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("digits", "2.0", "r-1")
    (call,) = upstream.seen
    assert call["path"] == "/predictions/digits/2.0"  # the versioned route, not TorchServe's 501
    assert call["headers"]["authorization"] == f"Bearer {KEY}"
    assert call["headers"]["content-type"] == "application/octet-stream"

    pixels = InferInput("pixels", [1, *INPUT_SHAPE], "FP32")
    pixels.set_data_from_numpy(np.full((1, *INPUT_SHAPE), 0.03125, dtype=np.float32))  # sums to 8
    result = grpc_gateway.infer("digits", [pixels], headers=GRPC_AUTH)
    assert result.as_numpy("labels").tolist() == [[b"8"]]
    assert upstream.seen[-1]["path"] == "/v2/models/digits/infer"


@pytest.mark.parametrize(
    ("model", "status", "message"),
    [("nope", "StatusCode.NOT_FOUND", "Model not found: nope"), ("busy", "StatusCode.UNAVAILABLE", "no worker")],
)
def test_grpc_infer_errors_keep_torchserves_words(grpc_gateway: Any, model: str, status: str, message: str) -> None:
    from tritonclient.grpc import InferInput
    from tritonclient.utils import InferenceServerException

    images = InferInput("image", [1], "BYTES")
    images.set_data_from_numpy(np.array([b"abc"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as info:
        grpc_gateway.infer(model, [images], headers=GRPC_AUTH)
    assert grpc_status(info.value) == status
    assert message in info.value.message()


def test_grpc_infer_handler_errors_are_invalid_argument(grpc_gateway: Any) -> None:
    from tritonclient.grpc import InferInput
    from tritonclient.utils import InferenceServerException

    wrong = InferInput("pixels", [1, 3, 16, 16], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 3, 16, 16), dtype=np.float32))
    with pytest.raises(InferenceServerException) as info:
        grpc_gateway.infer("digits", [wrong], headers=GRPC_AUTH)
    assert grpc_status(info.value) == "StatusCode.INVALID_ARGUMENT"
    assert "input 'pixels'.shape must be [N, 1, 16, 16]" in info.value.message()


# ------------------------------------------------------------------------------------------ nginx front
LOCATION = re.compile(
    r'^        location ~ "(?P<pattern>[^"]+)" \{\n(?P<body>.*?)^        \}$', re.MULTILINE | re.DOTALL
)


def front_locations(text: str) -> dict[str, tuple[re.Pattern[str], str]]:
    """The regex locations of a rendered front, keyed by the URI they send to TorchServe, as Python patterns."""
    found = {}
    for match in LOCATION.finditer(text):
        pattern = re.sub(r"\(\?<(?=\w)", "(?P<", match["pattern"])  # PCRE's (?<name> is Python's (?P<name>
        target = re.search(r"set \$servekit_uri (\S+);", match["body"])[1]
        found[match["pattern"].split("(")[0] + target] = (re.compile(pattern), match["body"])
    return found


def named_location(text: str, name: str) -> str:
    """The body of ``location @name`` in the front's main server."""
    return re.search(rf"^        location @{name} \{{\n(.*?)^        \}}$", text, re.MULTILINE | re.DOTALL)[1]


@pytest.fixture
def front_text(tmp_path: Path) -> str:
    return render_front_config(tmp_path / "front", "127.0.0.1:18000", "127.0.0.1:8080", "127.0.0.1:18002")


def test_the_front_passes_nginx_check(tmp_path: Path, front_text: str) -> None:
    prefix = tmp_path / "front"
    for sub in TEMP_DIRS:
        (prefix / "tmp" / sub).mkdir(parents=True)
    conf = prefix / "nginx.conf"
    conf.write_text(front_text)
    result = subprocess.run([nginx_binary(), "-t", "-p", str(prefix), "-c", str(conf)], capture_output=True)
    assert result.returncode == 0, result.stderr
    assert re.findall(r"^\s*listen (.*);$", front_text, re.MULTILINE) == ["127.0.0.1:18000"]
    assert re.findall(r"^\s*server (\S+);$", front_text, re.MULTILINE) == ["127.0.0.1:8080", "127.0.0.1:18002"]


def test_the_front_routes(front_text: str) -> None:
    locations = front_locations(front_text)
    assert sorted(locations) == [
        "^/v1/models/$request_uri",
        "^/v2/models/$request_uri",
        "^/v2/models//predictions/$model/$version",
    ]
    infer, _ = locations["^/v2/models/$request_uri"]
    versioned, _ = locations["^/v2/models//predictions/$model/$version"]
    predict, _ = locations["^/v1/models/$request_uri"]
    for name in ("digits", "d", "resnet-18", "Model_2", "a" * 64):
        assert infer.search(f"/v2/models/{name}/infer")["model"] == name
        assert predict.search(f"/v1/models/{name}:predict")["model"] == name
        assert infer.search(f"/v2/models/{name}/explain")["model"] == name  # explanations (handlers.explain)
        assert predict.search(f"/v1/models/{name}:explain")["model"] == name
        for version in ("2", "2.0", "10.0.1"):
            match = versioned.search(f"/v2/models/{name}/versions/{version}/infer")
            assert (match["model"], match["version"]) == (name, version)
    for path in ("/v2/models/../infer", "/v2/models/digits/../infer", "/v2/models/../../etc/infer",
                 "/v2/models/digits/../../x/infer", "/v2/models/./infer", "/v2/models/%2e%2e/infer",
                 "/v2/models//infer", "/v2/models/1digits/infer", f"/v2/models/{'a' * 65}/infer",
                 "/v2/models/digits/infer/..", "/x/v2/models/digits/infer", "/v2/models/di gits/infer"):  # fmt: skip
        assert not infer.search(path), path
    for path in ("/v2/models/digits/versions/../infer", "/v2/models/digits/versions/2.0/../infer",
                 "/v2/models/../versions/2.0/infer", "/v2/models/digits/versions/2.0.0.0/infer",
                 "/v2/models/digits/versions/v2/infer", "/v2/models/digits/versions//infer"):  # fmt: skip
        assert not versioned.search(path), path
    assert not predict.search("/v1/models/../x:predict")
    assert not predict.search("/v1/models/digits:explainx")
    assert not infer.search("/v2/models/digits/explained")


def test_inference_locations_answer_a_missing_token_with_401_json(front_text: str) -> None:
    for _, body in front_locations(front_text).values():
        assert 'if ($http_authorization = "") {' in body
        assert re.search(r"return 401 '\{\"error\": \"missing token[^']*\"\}';", body)
        assert "proxy_pass" not in body  # checks only: @torchserve proxies
        assert body.endswith("            return 418;\n")
    assert "\n        error_page 418 = @torchserve;" in front_text
    assert "\n        error_page 419 = @torchserve_chunked;\n" in front_text
    for name in ("torchserve", "torchserve_chunked"):
        body = named_location(front_text, name)
        assert "proxy_intercept_errors on;" in body
        assert "error_page 404 = @not_found;" in body
        assert "error_page 503 = @unavailable;" in body
        assert "proxy_pass http://torchserve$servekit_uri;" in body
    gateway_routes = re.findall(
        r'location (/v\d) \{\n\s*proxy_pass_request_body off;\n\s*proxy_set_header Content-Length "";\n'
        r"\s*proxy_pass http://gateway;",
        front_text,
    )
    assert gateway_routes == ["/v2", "/v1"]  # no request body ever reaches the gateway
    assert "default_type application/json;" in front_text


# What the security issue's finding B named: every one of these, when nginx writes it, is JSON.
FRONT_STATUSES = (400, 401, 403, 404, 405, 408, 413, 414, 429, 431, 494, 500, 501, 502, 503, 504)


def error_answers(text: str) -> dict[int, tuple[int, dict]]:
    """Each status with a server-level error_page in the main server: the status and JSON body it answers."""
    main_server = text.split("\n    server {\n")[1]
    answers = {}
    for code, uri in re.findall(r"^        error_page (\d+) = (/\S+);$", main_server, re.MULTILINE):
        block = re.search(rf"location = {re.escape(uri)} \{{\n(.*?)\}}\n", main_server, re.DOTALL)[1]
        status, body = re.search(r"return (\d+) '(.*)';", block).groups()
        answers[int(code)] = (int(status), json.loads(body))
    return answers


def test_every_status_the_front_writes_is_a_json_error(front_text: str) -> None:
    answers = error_answers(front_text)
    assert set(FRONT_STATUSES) <= set(answers)
    for code, (status, document) in answers.items():
        assert status == (431 if code == 494 else code)  # 494: nginx's own "header too large"
        assert list(document) == ["error"]
        assert document["error"]
    assert answers[413][1] == {"error": "the request body is over 6553600 bytes (the limit)"}
    assert "location ^~ /_servekit/error/ {\n            internal;" in front_text
    assert "default_type application/json;" in front_text
    # TorchServe's answers: only its 404/503 (and nginx's own 429/502/504) are intercepted, never the handler's
    # 400/413/500 on a body with a Content-Length; a chunked body's own 400/413 are answered as JSON too.
    plain = re.findall(r"error_page (\d+) ", named_location(front_text, "torchserve"))
    chunked = re.findall(r"error_page (\d+) ", named_location(front_text, "torchserve_chunked"))
    assert (sorted(plain), sorted(chunked)) == (["404", "429", "502", "503", "504"],
                                                ["400", "404", "413", "429", "502", "503", "504"])  # fmt: skip


def test_inference_locations_refuse_every_method_but_post_with_405_json(front_text: str) -> None:
    for _, body in front_locations(front_text).values():
        assert body.split("\n", 1)[1].startswith(  # after "set $servekit_uri ...;"
            '            if ($request_method != "POST") {\n'
            "                add_header Allow POST always;\n"
            '                return 405 \'{"error": "method $request_method is not allowed here: send POST"}\';\n'
            "            }\n"
        )


def test_the_front_bounds_slow_clients_and_each_address(front_text: str) -> None:
    settings: dict[str, str] = {}
    for key, value in re.findall(r"^\s*(\w+) ([^;{]+);", front_text, re.MULTILINE):
        settings.setdefault(key, value)  # the first: the http block's
    assert (settings["worker_processes"], settings["worker_rlimit_nofile"]) == ("1", "16384")
    assert re.search(r"^events \{ worker_connections 8192; \}$", front_text, re.MULTILINE)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert hard == resource.RLIM_INFINITY or int(settings["worker_rlimit_nofile"]) <= hard
    for key, value in {"client_header_timeout": "10s", "client_body_timeout": "10s", "send_timeout": "10s",
                       "keepalive_timeout": "15s", "reset_timedout_connection": "on",
                       "large_client_header_buffers": "4 8k", "limit_conn_status": "429",
                       "client_max_body_size": "6553600"}.items():  # fmt: skip
        assert settings[key] == value, key
    assert "limit_conn_zone $binary_remote_addr zone=servekit_clients:1m;" in front_text
    for name in ("torchserve", "torchserve_chunked"):
        assert "limit_conn servekit_clients 128;" in named_location(front_text, name)
    assert front_text.count("limit_conn servekit_clients") == 2  # inference only, not the gateway's paths


def test_the_health_listener_answers_only_the_two_probes(tmp_path: Path) -> None:
    text = render_front_config(tmp_path / "front", "0.0.0.0:8000", "127.0.0.1:8080", "127.0.0.1:8002",
                               tokens=False, health="0.0.0.0:8004")  # fmt: skip
    assert re.findall(r"^\s*listen (.*);$", text, re.MULTILINE) == ["0.0.0.0:8000", "0.0.0.0:8004"]
    health = text[text.index("        listen 0.0.0.0:8004;") :]
    assert re.findall(r"^        location (.*) \{$", health, re.MULTILINE) == [
        "= /v2/health/live", "= /v2/health/ready", "/", "^~ /_servekit/error/"]  # fmt: skip
    for path in ("live", "ready"):
        block = re.search(rf"location = /v2/health/{path} \{{\n(.*?)^        \}}", health, re.DOTALL | re.MULTILINE)[1]
        assert block == (
            '            if ($request_method != "GET") {\n'
            "                add_header Allow GET always;\n"
            '                return 405 \'{"error": "method $request_method is not allowed here: send GET"}\';\n'
            "            }\n"
            "            proxy_pass http://gateway;\n"
        )
    assert 'return 404 \'{"error": "this port serves GET /v2/health/live and /v2/health/ready only"}\';' in health
    for line in ("limit_conn servekit_health 16;", "proxy_pass_request_headers off;", "proxy_pass_request_body off;",
                 "client_header_timeout 5s;", "keepalive_timeout 5s;", "client_max_body_size 1024;"):  # fmt: skip
        assert f"\n        {line}" in health, line
    assert "servekit_health" not in render_front_config(tmp_path, "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3")
    prefix = tmp_path / "front"
    for sub in TEMP_DIRS:
        (prefix / "tmp" / sub).mkdir(parents=True)
    (prefix / "nginx.conf").write_text(text)
    check = subprocess.run([nginx_binary(), "-t", "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
                           capture_output=True)  # fmt: skip
    assert check.returncode == 0, check.stderr


def test_config_head_sets_the_open_file_limit_only_when_asked(tmp_path: Path) -> None:
    """The guard and the proxy call ``config_head`` without it: their configuration is unchanged."""
    assert "worker_rlimit_nofile" not in config_head(tmp_path, 256, "user root root;\n")
    assert config_head(tmp_path, 1024).startswith(f"worker_processes 1;\npid {tmp_path / 'nginx.pid'};\n")
    assert config_head(tmp_path, 8192, rlimit_nofile=16384).startswith(
        "worker_processes 1;\nworker_rlimit_nofile 16384;\n"
    )


def test_the_service_gives_its_front_the_health_listener_and_checks_the_port(tmp_path: Path) -> None:
    def service(**kwargs: Any) -> OipService:
        return OipService(tmp_path / "oip", "http://127.0.0.1:1", "http://127.0.0.1:2", None, tmp_path,
                          http_port=free_port(), grpc_port=free_port(), **kwargs)  # fmt: skip

    assert service().front.health_listen is None
    assert service(health_port=8004, host="0.0.0.0").front.health_listen == "0.0.0.0:8004"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OipServiceError, match=rf"port {port} \(OIP health\) is already in use"):
            service(health_port=port).start()
    assert not (tmp_path / "oip" / "gateway.pid").exists()  # refused before anything started


def test_server_run_passes_health_port_to_the_oip_service(monkeypatch: pytest.MonkeyPatch) -> None:
    started = []
    monkeypatch.setattr(server_module, "_run", lambda server, args: started.append(server) or 0)
    assert server_module.main(["run", "--health-port", "18004", "--metrics-port", "18083"]) == 0
    (server,) = started
    assert (server.oip_ports["oip_health"], server.oip_service.health_port) == (18004, 18004)
    assert server.oip_service.front.health_listen == "127.0.0.1:18004"
    assert server_module.main(["run"]) == 0
    assert "oip_health" not in started[1].oip_ports
    assert started[1].oip_service.health_port is None


def test_the_front_for_real(tmp_path: Path, upstream: SimpleNamespace, fake: FakeTorchServe, model_store: Path) -> None:
    """nginx in front of the TorchServe stand-in and the real gateway: routes, 401, rewritten errors."""
    gateway_port, port = free_port(), free_port()
    front = OipFront(tmp_path / "front", listen=f"127.0.0.1:{port}", torchserve=upstream.address,
                     gateway=f"127.0.0.1:{gateway_port}")  # fmt: skip
    body = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["YWJj"]}]})
    base = f"http://127.0.0.1:{port}"
    with serving(http_server(Gateway(fake, model_store), f"127.0.0.1:{gateway_port}")):
        front.start()
        try:
            missing = requests.post(f"{base}/v2/models/digits/versions/2.0/infer", data=body, timeout=10)
            assert (missing.status_code, missing.headers["Content-Type"]) == (401, "application/json")
            assert missing.json()["error"].startswith("missing token")
            assert upstream.seen == []
            for path, reached in (
                ("/v2/models/digits/versions/1.0/infer", "/predictions/digits/1.0"),
                ("/v2/models/digits/infer", "/v2/models/digits/infer"),
            ):
                answer = requests.post(base + path, data=body, headers=AUTH, timeout=10)
                assert answer.status_code == 200, answer.text
                assert answer.json()["outputs"][0]["data"] == ["3"]
                assert upstream.seen[-1]["path"] == reached
                assert upstream.seen[-1]["headers"]["authorization"] == AUTH["Authorization"]
            answer = requests.post(f"{base}/v1/models/digits:predict", json={"instances": ["YWJj"]}, headers=AUTH,
                                   timeout=10)  # fmt: skip
            assert (answer.status_code, upstream.seen[-1]["path"]) == (200, "/v1/models/digits:predict")
            answer = requests.post(f"{base}/v2/models/nope/infer", data=body, headers=AUTH, timeout=10)
            assert answer.status_code == 404
            assert answer.json() == {"error": "no model or version named in /v2/models/nope/infer is being served"}
            answer = requests.post(f"{base}/v2/models/busy/versions/2.0/infer", data=body, headers=AUTH, timeout=10)
            assert answer.status_code == 503
            assert "cannot take this request now" in answer.json()["error"]
            answer = requests.post(f"{base}/v2/models/digits/infer", data='{"inputs": []}', headers=AUTH, timeout=10)
            assert answer.status_code == 400
            assert answer.json() == {"error": "'inputs' must be a non-empty list of tensors"}  # the handler's own
            assert requests.get(f"{base}/v2/health/ready", timeout=10).json() == {"ready": True}
            assert requests.get(f"{base}/v2/models/digits", timeout=10).status_code == 401
            assert requests.get(f"{base}/v2/models/digits", headers=AUTH, timeout=10).json()["name"] == "digits"
            assert requests.get(f"{base}/v1/models/digits", headers=AUTH, timeout=10).json()["ready"] is True
            answer = requests.get(f"{base}/metrics", timeout=10)  # no token: the exporter's page
            assert (answer.status_code, answer.headers["Content-Type"]) == (200, exporter.CONTENT_TYPE)
            assert "servekit_exporter_up 1.0" in answer.text.splitlines()
            answer = requests.get(f"{base}/metrics/other", timeout=10)
            assert answer.status_code == 404
            assert answer.json() == {"error": "not an Open Inference Protocol or KServe v1 path"}
        finally:
            front.stop()
    assert front.running_pid() is None


def test_the_front_survives_a_large_post_to_the_gateway(
    tmp_path: Path, fake: FakeTorchServe, model_store: Path
) -> None:
    gateway_port, port = free_port(), free_port()
    front = OipFront(tmp_path / "front", listen=f"127.0.0.1:{port}", torchserve="127.0.0.1:1",
                     gateway=f"127.0.0.1:{gateway_port}")  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    with serving(http_server(Gateway(fake, model_store), f"127.0.0.1:{gateway_port}")):
        front.start()
        try:
            assert requests.get(f"{base}/v2/health/ready", timeout=10).status_code == 200
            assert requests.post(f"{base}/v2/repository/index", data=b"x" * 100_000, timeout=10).status_code == 401
            answer = requests.get(f"{base}/v2/health/ready", timeout=10)
            assert (answer.status_code, answer.text) == (200, '{"ready": true}')
        finally:
            front.stop()


# ------------------------------------------------------------------------------------------ servekit metadata
def test_servekit_metadata_of_the_newest_or_a_given_version(model_store: Path, capsys: pytest.CaptureFixture) -> None:
    oip = read_archive_metadata(model_store / "digits_v2.0.mar")["oip"]
    for argv, version in ((["digits"], "2.0"), (["digits", "1.0"], "1.0"), (["digits", "2.0"], "2.0")):
        assert main(["--store", str(model_store), "metadata", *argv]) == 0
        captured = capsys.readouterr()
        assert captured.err == ""
        document = json.loads(captured.out)
        assert (document["name"], document["version"], document["versions"]) == ("digits", version, ["1.0", "2.0"])
        assert (document["inputs"], document["outputs"]) == (oip["inputs"], oip["outputs"])


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["nope"], "no archive of a model named 'nope' in {store} (make archive)"),
        (["digits", "3.0"], "digits has no built version '3.0' (built: 1.0, 2.0)"),
        (["digits", "../digits_v1.0"], "digits has no built version '../digits_v1.0' (built: 1.0, 2.0)"),
    ],
)
def test_servekit_metadata_of_an_unknown_model_or_version_is_one_line(
    model_store: Path, capsys: pytest.CaptureFixture, argv: list[str], error: str
) -> None:
    assert main(["--store", str(model_store), "metadata", *argv]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"servekit: error: {error.format(store=model_store)}\n"


def test_servekit_metadata_of_an_archive_without_oip_says_rebuild(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    store = tmp_path / "store"
    path = write_archive(store, "m_v1.0.mar", {"model": "m", "version": "1.0"})
    record = {"model": "m", "version": "1.0", "sha256": file_sha256(path)}
    (store / "manifest.json").write_text(json.dumps({"format": 1, "archives": {"m_v1.0.mar": record}}))
    assert main(["--store", str(store), "metadata", "m"]) == 1
    assert capsys.readouterr().err == "servekit: error: m 1.0: the archive has no OIP metadata (rebuild it)\n"


# ------------------------------------------------------------------------------------------ stopping
def started(argv: list[str], expected: str) -> subprocess.Popen:
    process = subprocess.Popen(argv)
    deadline = time.monotonic() + 10
    while expected not in " ".join(command_line(process.pid)) and time.monotonic() < deadline:
        time.sleep(0.01)  # until the child has exec'd
    return process


@pytest.mark.parametrize("whose", ["a sleeper", "this test process"])
def test_stop_with_stale_pid_files_signals_nothing(tmp_path: Path, capsys: pytest.CaptureFixture, whose: str) -> None:
    sleeper = started(["sleep", "30"], "sleep 30")
    try:
        pid = sleeper.pid if whose == "a sleeper" else os.getpid()
        service = OipService(tmp_path / "oip", "http://127.0.0.1:1", "http://127.0.0.1:2", tmp_path / "key_file.json",
                             tmp_path / "store", http_port=free_port(), grpc_port=free_port())  # fmt: skip
        (service.prefix / "front").mkdir(parents=True)
        service.pid_file.write_text(str(pid))
        (service.prefix / "front" / "nginx.pid").write_text(str(pid))
        assert service.running_pid() is None
        service.stop(timeout=1)
        assert sleeper.poll() is None  # neither SIGTERM nor nginx's SIGQUIT reached it
        assert not service.pid_file.exists()
        assert not (service.prefix / "front" / "nginx.pid").exists()
        assert "removed the stale pid file, nothing signalled" in capsys.readouterr().err
    finally:
        sleeper.kill()
        sleeper.wait()


def test_stop_signals_the_gateway_it_started(tmp_path: Path) -> None:
    """The positive control: a process whose command line is the gateway's for this service's prefix is stopped."""
    key_file = tmp_path / "key_file.json"
    code = "import time; time.sleep(30)"
    prefix = (tmp_path / "oip").resolve()
    other = started([sys.executable, "-c", code, "servekit.serving.oip", "--prefix", str(tmp_path / "other")],
                    str(tmp_path / "other"))  # fmt: skip
    ours = started([sys.executable, "-c", code, "servekit.serving.oip", "--prefix", str(prefix)], str(prefix))
    try:
        service = OipService(tmp_path / "oip", "http://127.0.0.1:1", "http://127.0.0.1:2", key_file, tmp_path,
                             http_port=free_port(), grpc_port=free_port())  # fmt: skip
        service.prefix.mkdir()
        service.pid_file.write_text(str(other.pid))
        service.stop(timeout=1)
        assert other.poll() is None  # the gateway of another key file: not ours
        service.pid_file.write_text(str(ours.pid))
        assert service.running_pid() == ours.pid
        service.stop(timeout=5)
        assert ours.wait(5) is not None
        assert not service.pid_file.exists()
        assert other.poll() is None
    finally:
        for process in (other, ours):
            process.kill()
            process.wait()


def test_a_get_with_a_body_gets_one_answer_and_the_connection_closes(gateway_http: str) -> None:
    """The body of a GET is never read: a request hidden in it must not be answered on the same connection."""
    port = int(gateway_http.rsplit(":", 1)[1])
    hidden = b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n"
    request = (
        b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nContent-Length: "
        + str(len(hidden)).encode()
        + b"\r\n\r\n"
        + hidden
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):  # the server closes: recv returns b""
            received += chunk
    assert received.count(b"HTTP/1.1 ") == 1
    assert b'{"live": true}' in received
    assert b"Connection: close" in received


def test_free_ports_are_never_handed_out_twice() -> None:
    """A server's listeners (TorchServe's, the front's, the gateway's) are chosen one by one and bound later."""
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)


# ------------------------------------------------------------------------------------------ the routing plane
def test_with_a_router_the_front_sends_inference_to_it_and_to_torchserve_while_it_is_down(tmp_path: Path) -> None:
    text = render_front_config(tmp_path / "front", "127.0.0.1:18000", "127.0.0.1:8080", "127.0.0.1:18002",
                               router="127.0.0.1:18090")  # fmt: skip
    upstream = text.split("upstream torchserve {\n", 1)[1].split("}", 1)[0]
    assert upstream == (
        "        server 127.0.0.1:18090 max_fails=3 fail_timeout=5s;\n"
        "        server 127.0.0.1:8080 backup;\n"
        "        keepalive 32;\n    "
    )
    assert text.count("proxy_next_upstream error non_idempotent;") == 2  # @torchserve and @torchserve_chunked
    assert "proxy_next_upstream" not in render_front_config(tmp_path, "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3")
    prefix = tmp_path / "front"
    for sub in TEMP_DIRS:
        (prefix / "tmp" / sub).mkdir(parents=True)
    (prefix / "nginx.conf").write_text(text)
    check = subprocess.run([nginx_binary(), "-t", "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
                           capture_output=True)  # fmt: skip
    assert check.returncode == 0, check.stderr


def test_grpc_inference_goes_through_the_router_on_the_oip_paths(fake: FakeTorchServe, upstream) -> None:
    gateway = Gateway(fake, Path("unused"), tokens=False, router_url=upstream.url)
    body, headers = json.dumps({"inputs": []}).encode(), {"Content-Type": "application/json"}
    gateway.infer("digits", None, body, headers)
    gateway.infer("digits", "1.0", body, headers)
    assert [s["path"] for s in upstream.seen] == ["/v2/models/digits/infer", "/v2/models/digits/versions/1.0/infer"]


def test_the_service_points_the_gateway_at_its_own_front(tmp_path: Path) -> None:
    service = OipService(tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2", None, tmp_path, http_port=18000,
                         host="0.0.0.0", router="127.0.0.1:18090")  # fmt: skip
    assert service.front_url == "http://127.0.0.1:18000"
    assert service.front.router == "127.0.0.1:18090"
