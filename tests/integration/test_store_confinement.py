"""Registration is confined to the model store; restarts apply today's configuration; tampered archives never serve.

Against a real TorchServe behind the management guard (servekit.serving.guard, a real nginx):

- every escape the review found is refused with a JSON 4xx: a ``model_store`` folder elsewhere,
  ``?`` and ``#`` tricks that made TorchServe copy any readable file into the store, percent-encoded
  ``..``, ``file://HOST/`` (FTP) and ``http://`` to a local listener, bare absolute and relative
  directories, a JSON body, ``handler=`` overrides. After each: the store is byte-for-byte the same,
  the registrations are the same, no connection reached the listener, no planted code ran;
- the same directory escapes sent straight to TorchServe's own management socket (what its gRPC
  management API, which the guard cannot filter, would allow) and through TorchServe's real gRPC
  management port: the worker guard stops the planted code before it runs;
- a restart restores the registered versions but enforces today's config.properties, and reports
  the settings that differ from the snapshot;
- an archive whose program has one byte changed is refused at start (manifest check) and never
  serves when registered through the raw management API (the worker checks the program's sha256).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from servekit.serving.server import ADDRESS_KEYS, ServerError, TorchServeProcess, free_port
from tests.integration.conftest import Client, running_torchserve

MARKER_CODE = "\nimport pathlib\npathlib.Path({marker!r}).write_text('planted code ran')\n"


class Listener:
    """A TCP listener on a free loopback port that records every connection it accepts."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def store_state(store: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(store.iterdir())}


def planted_model(source: Path, target: Path, marker: Path) -> Path:
    """``source`` unpacked into a directory whose handler writes ``marker`` when imported."""
    with zipfile.ZipFile(source) as archive:
        archive.extractall(target)
    handler = target / "image_classifier.py"
    handler.write_text(handler.read_text() + MARKER_CODE.format(marker=str(marker)))
    return target


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> Path:
    store = tmp_path_factory.mktemp("confined") / "model_store"
    store.mkdir()
    for name in ("digits_v1.0.mar", "digits_v2.0.mar", "manifest.json"):
        shutil.copyfile(model_store / name, store / name)
    return store


@pytest.fixture(scope="module")
def bait(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> dict[str, Path]:
    """What an attacker would aim at: a private file, a store look-alike, planted model directories."""
    root = tmp_path_factory.mktemp("bait")
    secret = root / "secret.txt"
    secret.write_text("operator's private data\n")
    secret.chmod(0o600)
    elsewhere = root / "elsewhere" / "model_store"
    elsewhere.mkdir(parents=True)
    shutil.copyfile(model_store / "digits_v2.0.mar", elsewhere / "digits_v2.0.mar")
    marker = root / "planted.txt"
    planted = planted_model(model_store / "digits_v2.0.mar", root / "planted_model", marker)
    return {"root": root, "secret": secret, "elsewhere": elsewhere, "marker": marker, "planted": planted}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, store: Path, bait: dict[str, Path]) -> Iterator[TorchServeProcess]:
    with running_torchserve(tmp_path_factory.mktemp("torchserve"), store) as process:
        # A planted directory next to TorchServe's working directory: a relative path would find it.
        shutil.copytree(bait["planted"], process.workdir / "planted_rel")
        yield process


@pytest.fixture
def listener() -> Iterator[Listener]:
    listener = Listener()
    try:
        yield listener
    finally:
        listener.close()


def escapes(bait: dict[str, Path], store: Path, port: int) -> dict[str, dict]:
    """Registration requests that must all be refused: name -> requests keyword arguments."""
    secret, elsewhere, planted = bait["secret"], bait["elsewhere"], bait["planted"]

    def query(url: str, **extra: str) -> dict:
        return {"params": {"url": url, "initial_workers": "1", "synchronous": "true", **extra}}

    return {
        "store look-alike elsewhere": query(f"file://{elsewhere}/digits_v2.0.mar"),
        "question-mark file read": query(f"file://{secret}?/model_store/digits_v2.0.mar"),
        "hash file read": query(f"file://{secret}#/model_store/digits_v2.0.mar"),
        "percent-encoded dot-dot": query(f"file://{store}/%2e%2e/%2e%2e{elsewhere}/digits_v2.0.mar"),
        "file://HOST is FTP": query(f"file://127.0.0.1:{port}/model_store/digits_v2.0.mar"),
        "http to a local listener": query(f"http://127.0.0.1:{port}/digits_v2.0.mar"),
        "bare absolute directory": query(str(planted), model_name="planted"),
        "bare relative directory": query("planted_rel", model_name="planted"),
        "handler override": query("digits_v2.0.mar", handler=str(planted / "image_classifier.py")),
        "percent-encoded bare name": {"params": "url=digits_v2.0.mar%00&initial_workers=1"},
        "json body with a directory": {
            "params": {"url": "digits_v2.0.mar"},
            "data": json.dumps({"url": str(planted), "model_name": "planted", "initial_workers": 1}),
            "headers": {"Content-Type": "application/json"},
            "expect_registered": "2.0",  # the guard drops the body: only the query's bare name is seen
        },
    }


ESCAPE_NAMES = list(escapes({k: Path("/x") for k in ("secret", "elsewhere", "planted")}, Path("/x"), 1))


@pytest.mark.parametrize("name", ESCAPE_NAMES)
def test_registration_escape_is_refused_and_changes_nothing(
    server: TorchServeProcess, store: Path, bait: dict[str, Path], listener: Listener, name: str
) -> None:
    client = Client(server)
    kwargs = escapes(bait, store, listener.port)[name]
    expect_registered = kwargs.pop("expect_registered", None)
    before = store_state(store)
    headers = {**server.headers("management"), **kwargs.pop("headers", {})}
    response = requests.post(server.url("management", "/models"), headers=headers, timeout=120, **kwargs)
    try:
        if expect_registered:
            assert response.status_code == 200, response.text
            assert "planted" not in response.text
        else:
            assert 400 <= response.status_code < 500, response.text
            assert response.json()["message"], response.text
        assert store_state(store) == before, "the model store changed"
        assert listener.connections == 0, "TorchServe connected to the listener"
        assert not bait["marker"].exists(), "planted code ran"
        models = client.manage("GET", "/models").json()["models"]
        assert [m["modelName"] for m in models] == ["digits"]
        versions = {v["modelVersion"] for v in client.manage("GET", "/models/digits/all").json()}
        assert versions == {"1.0", expect_registered} - {None}
    finally:
        if expect_registered:
            client.manage("DELETE", f"/models/digits/{expect_registered}")


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/workflows?url=x.war"), ("POST", "/models/digits/1.0"), ("PATCH", "/models/digits")],
)
def test_guard_refuses_routes_it_does_not_know(server: TorchServeProcess, method: str, path: str) -> None:
    response = requests.request(method, server.url("management", path), headers=server.headers("management"))
    assert response.status_code == 403
    assert response.json() == {
        "code": 403,
        "type": "GuardRefusal",
        "message": "this method and path are not allowed through the management API guard",
    }


def test_torchserve_itself_refuses_every_url_form(
    server: TorchServeProcess, store: Path, bait: dict[str, Path], listener: Listener
) -> None:
    """Behind the guard, allowed_urls is the second wall: straight at TorchServe's socket, URLs still fail."""
    before = store_state(store)
    for name in (
        "store look-alike elsewhere",
        "question-mark file read",
        "file://HOST is FTP",
        "http to a local listener",
    ):
        url = escapes(bait, store, listener.port)[name]["params"]["url"]
        answer = socket_post(server, f"/models?url={requests.utils.quote(url, safe='')}&initial_workers=1")
        assert answer["code"] == 404, (name, answer)
        assert "does not match any allowed URL" in answer["message"], (name, answer)
    assert store_state(store) == before
    assert listener.connections == 0


def socket_post(server: TorchServeProcess, path: str) -> dict:
    """POST straight to TorchServe's management socket (bypassing the guard), as its owner could."""
    result = subprocess.run(
        ["curl", "-s", "-m", "120", "--unix-socket", str(server.management_socket), "-X", "POST"]
        + ["-H", f"Authorization: Bearer {server.keys()['management']}", f"http://localhost{path}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout)


def test_directory_registration_past_the_guard_never_runs_its_code(
    server: TorchServeProcess, bait: dict[str, Path]
) -> None:
    answer = socket_post(server, f"/models?url={bait['planted']}&model_name=planted&initial_workers=1")
    assert answer["code"] == 500, answer
    assert not bait["marker"].exists(), "planted code ran"
    assert Client(server).manage("GET", "/models/planted").status_code == 404
    refusal = f"servekit worker guard: refusing to start this worker: model directory {bait['planted']}"
    deadline = time.monotonic() + 15  # the frontend writes the worker's output to the log file asynchronously
    while refusal not in (log := (server.workdir / "logs" / "model_log.log").read_text(errors="replace")):
        assert time.monotonic() < deadline, log[-2000:]
        time.sleep(0.2)


def grpc_register(server: TorchServeProcess, url: str, model_name: str) -> str:
    """RegisterModel on TorchServe's gRPC management port; returns the gRPC status name."""
    import grpc  # a dev dependency (pyproject.toml)

    def field(number: int, value: str | int) -> bytes:
        if isinstance(value, int):
            return bytes([number << 3]) + bytes([value])
        data = value.encode()
        return bytes([number << 3 | 2]) + _varint(len(data)) + data

    # management.proto: initial_workers = 3, model_name = 5, synchronous = 8, url = 9
    request = field(3, 1) + field(5, model_name) + field(8, 1) + field(9, url)
    port = int(server.props["grpc_management_port"])
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(
            "/org.pytorch.serve.grpc.management.ManagementAPIsService/RegisterModel",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        try:
            call(request, metadata=[("authorization", f"Bearer {server.keys()['management']}")], timeout=120)
        except grpc.RpcError as exc:
            return exc.code().name
    return "OK"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def test_grpc_management_directory_registration_never_runs_its_code(
    server: TorchServeProcess, bait: dict[str, Path]
) -> None:
    status = grpc_register(server, str(bait["planted"]), "planted_grpc")
    assert status != "OK"
    assert not bait["marker"].exists(), "planted code ran"
    assert Client(server).manage("GET", "/models/planted_grpc").status_code == 404


# ------------------------------------------------------------------------------------ restarts
def test_restart_restores_versions_under_todays_configuration(tmp_path: Path, store: Path, samples_dir: Path) -> None:
    workdir = tmp_path / "ts"
    ports = {kind: free_port() for kind in ADDRESS_KEYS}
    lax = {"max_request_size": "20000000"}
    first = TorchServeProcess(workdir, store, ports=ports, load_models="digits_v1.0.mar", snapshots=True, overrides=lax)
    first.start()
    try:
        client = Client(first)
        client.ensure_registered("2.0")
        assert client.manage("PUT", "/models/digits/2.0/set-default").status_code == 200
    finally:
        first.stop()
    big = b"\x89PNG\r\n\x1a\n" + b"\0" * 7_000_000

    second = TorchServeProcess(workdir, store, ports=ports, load_models="", snapshots=True, restore=True)
    second.start()
    try:
        client = Client(second)
        assert client.manage("GET", "/models/digits").json()[0]["modelVersion"] == "2.0"
        assert {v["modelVersion"] for v in client.manage("GET", "/models/digits/all").json()} == {"1.0", "2.0"}
        answer = client.predict("digits", data=(samples_dir / "digit_4.png").read_bytes())
        assert answer.status_code == 200
        assert answer.json()["version"] == "2.0"
        # The snapshot was written with max_request_size=20000000; today's file says 6553600.
        assert client.predict("digits", data=big).status_code == 413
        assert "max_request_size: snapshot '20000000', config.properties '6553600'" in second.snapshot_differences
        assert "restored registrations from" in (workdir / "restore.log").read_text()
    finally:
        second.stop()


# ------------------------------------------------------------------------------------ integrity
def tampered_copy(source: Path, target: Path) -> None:
    """``source`` with one byte of its program (model.pt) changed; everything else identical."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            body = zin.read(item.filename)
            if item.filename == "model.pt":
                changed = bytearray(body)
                changed[len(changed) // 2] ^= 0x01
                body = bytes(changed)
            zout.writestr(item, body)


@pytest.fixture
def tampered_store(tmp_path: Path, store: Path) -> Path:
    tampered = tmp_path / "model_store"
    tampered.mkdir()
    for name in ("digits_v1.0.mar", "manifest.json"):
        shutil.copyfile(store / name, tampered / name)
    tampered_copy(store / "digits_v2.0.mar", tampered / "digits_v2.0.mar")
    return tampered


def test_tampered_archive_is_refused_at_start(tmp_path: Path, tampered_store: Path) -> None:
    server = TorchServeProcess(
        tmp_path / "ts", tampered_store, ports={k: free_port() for k in ADDRESS_KEYS}, load_models="digits_v2.0.mar"
    )
    with pytest.raises(ServerError, match=r"refusing to start: sha256 mismatch for digits_v2\.0\.mar"):
        server.start()
    assert server.process is None
    assert not server.pid_file.exists()


def test_tampered_archive_registered_through_the_api_never_serves(
    tmp_path: Path, tampered_store: Path, samples_dir: Path
) -> None:
    digit = (samples_dir / "digit_5.png").read_bytes()
    with running_torchserve(tmp_path / "ts", tampered_store) as server:
        client = Client(server)
        response = client.manage("POST", "/models?url=digits_v2.0.mar&initial_workers=1&synchronous=true")
        assert response.status_code == 500, response.text
        assert client.predict("digits/2.0", data=digit, timeout=30).status_code != 200
        log = (server.workdir / "logs" / "model_log.log").read_text(errors="replace")
        assert "refusing to serve: model.pt has sha256" in log
        # Nothing else disturbed: the default still answers.
        answer = client.predict("digits", data=digit)
        assert answer.status_code == 200
        assert answer.json()["predictions"][0]["label"] == "5"
