"""A real TorchServe per test module, on free loopback ports, always stopped in teardown."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from servekit.ops.server import ADDRESS_KEYS, TorchServeProcess, free_port

ARCHIVES = ("digits_v1.0.mar", "digits_v2.0.mar")


@pytest.fixture(scope="session")
def model_store(repo_root: Path) -> Path:
    """The repo's model store, built from models.yaml if `make archive` has not run."""
    store = repo_root / "model_store"
    if not all((store / name).is_file() for name in ARCHIVES):
        from servekit.build.archive import build_all
        from servekit.build.spec import load_spec

        build_all(load_spec(repo_root / "models.yaml"), store, repo_root / "build" / "cache")
    return store


@contextlib.contextmanager
def running_torchserve(workdir: Path, model_store: Path, **kwargs) -> Iterator[TorchServeProcess]:
    """A TorchServe on free loopback ports, loading digits 1.0 unless told otherwise; always stopped."""
    kwargs.setdefault("load_models", "digits_v1.0.mar")
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
    """Thin requests wrapper that adds the right token for each API."""

    def __init__(self, server: TorchServeProcess) -> None:
        self.server = server

    def predict(self, path: str, timeout: float = 60, **kwargs) -> requests.Response:
        return requests.post(
            self.server.url("inference", f"/predictions/{path}"),
            headers={**self.server.headers("inference"), **kwargs.pop("headers", {})},
            timeout=timeout,
            **kwargs,
        )

    def manage(self, method: str, path: str, timeout: float = 120, **kwargs) -> requests.Response:
        return requests.request(
            method,
            self.server.url("management", path),
            headers=self.server.headers("management"),
            timeout=timeout,
            **kwargs,
        )

    def ensure_registered(self, version: str, workers: int = 1) -> None:
        described = self.manage("GET", f"/models/digits/{version}")
        if described.status_code == 200:
            return
        response = self.manage("POST", f"/models?url=digits_v{version}.mar&initial_workers={workers}&synchronous=true")
        assert response.status_code == 200, response.text

    def metrics(self) -> str:
        return requests.get(self.server.url("metrics", "/metrics"), timeout=10).text


@pytest.fixture(scope="module")
def client(torchserve: TorchServeProcess) -> Client:
    return Client(torchserve)


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()
