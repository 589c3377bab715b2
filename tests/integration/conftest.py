"""A real TorchServe per test module, on free loopback ports, always stopped in teardown."""

from __future__ import annotations

import base64
import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from servekit.ops.client import TorchServeClient
from servekit.ops.server import ADDRESS_KEYS, TorchServeProcess, free_port
from servekit.ops.store import archive_name


@contextlib.contextmanager
def running_torchserve(workdir: Path, model_store: Path, **kwargs) -> Iterator[TorchServeProcess]:
    """A TorchServe on free loopback ports, loading digits 1.0 unless told otherwise; always stopped."""
    kwargs.setdefault("load_models", archive_name("digits", "1.0"))
    server = TorchServeProcess(
        workdir=workdir, model_store=model_store, ports={kind: free_port() for kind in ADDRESS_KEYS}, **kwargs
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def torchserve(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> Iterator[TorchServeProcess]:
    with running_torchserve(tmp_path_factory.mktemp("torchserve"), model_store) as server:
        yield server


class Client:
    """The tests' short forms over servekit's TorchServe client: answers come back whatever their status.

    Transport failures raise ``requests.RequestException`` (``TorchServeClient.send``), so tests can count them.
    """

    def __init__(self, server: TorchServeProcess) -> None:
        self.api: TorchServeClient = server.client()

    def predict(self, path: str, timeout: float = 60, **kwargs) -> requests.Response:
        return self.api.send("inference", "POST", f"/predictions/{path}", timeout=timeout, **kwargs)

    def manage(self, method: str, path: str, timeout: float = 120, **kwargs) -> requests.Response:
        return self.api.send("management", method, path, timeout=timeout, **kwargs)

    def ensure_registered(self, version: str, workers: int = 1) -> None:
        if self.manage("GET", f"/models/digits/{version}").status_code == 200:
            return
        params = {"url": archive_name("digits", version), "initial_workers": workers, "synchronous": "true"}
        response = self.manage("POST", "/models", params=params)
        assert response.status_code == 200, response.text

    def metrics(self) -> str:
        return self.api.metrics()


@pytest.fixture(scope="module")
def client(torchserve: TorchServeProcess) -> Client:
    return Client(torchserve)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The one ``servekit: error:`` line of a command that failed as the CLI promises (status 1)."""
    assert result.returncode == 1, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("servekit: error: ")
    return lines[0]


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()
