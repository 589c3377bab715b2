"""A real TorchServe per test module, on free loopback ports, always stopped in teardown."""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from servekit.serving.client import TorchServeClient
from servekit.serving.server import ADDRESS_KEYS, TorchServeProcess, free_port
from servekit.serving.store import archive_name


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

    def worker_pids(self, model: str, version: str) -> list[int]:
        described = self.manage("GET", f"/models/{model}/{version}").json()
        return sorted(int(w["pid"]) for w in described[0]["workers"])

    @contextlib.contextmanager
    def one_batch_copy(self, archive: str, name: str, version: str, batch: int) -> Iterator[None]:
        """``archive`` registered again as ``name``: one worker, ``batch`` per batch, a 5 s batch delay; removed after.

        Requests sent together (``send_together``) then reach the worker as one server-side batch.
        On leaving without an error, the worker must be the one it started with (no restart).
        """
        params = {"url": archive, "model_name": name, "batch_size": batch, "max_batch_delay": 5000,
                  "initial_workers": 1, "synchronous": "true"}  # fmt: skip
        response = self.manage("POST", "/models", params=params)
        assert response.status_code == 200, response.text
        try:
            pids = self.worker_pids(name, version)
            yield
            assert self.worker_pids(name, version) == pids, "a worker restarted"
        finally:
            self.manage("DELETE", f"/models/{name}/{version}")


BATCH_DELAY_BOUND_S = 4  # requests of one server-side batch are all answered well inside its 5 s delay


def send_together(items: list, send: Callable[..., requests.Response]) -> list[requests.Response]:
    """``send`` every item at once (one thread each); the answers in order, all inside ``BATCH_DELAY_BOUND_S``."""
    with ThreadPoolExecutor(len(items)) as pool:
        responses = list(pool.map(send, items))
    slowest = max(r.elapsed.total_seconds() for r in responses)
    assert slowest < BATCH_DELAY_BOUND_S, f"{len(items)} requests did not form one batch ({slowest:.1f} s)"
    return responses


def operator_cli(
    server: TorchServeProcess, store: Path, repo_root: Path, state: Path
) -> Callable[..., subprocess.CompletedProcess]:
    """``servekit ...`` against ``server`` and ``store``, its history and proxy files under ``state``."""

    def run(*args: str) -> subprocess.CompletedProcess:
        command = [
            sys.executable, "-m", "servekit.cli",
            "--management-url", server.url("management"), "--inference-url", server.url("inference"),
            "--key-file", str(server.key_file), "--store", str(store),
            "--history", str(state / "deployments.jsonl"), "--proxy-dir", str(state / "proxy"),
            *args,
        ]  # fmt: skip
        return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False, cwd=repo_root)

    return run


def ok(result: subprocess.CompletedProcess) -> str:
    """The output of a ``servekit`` command that must have succeeded."""
    assert result.returncode == 0, result.stderr
    return result.stdout


def default_version(cli: Callable[..., subprocess.CompletedProcess], model: str) -> str:
    """``model``'s default version, as ``servekit status --json`` reports it."""
    return next(s["version"] for s in json.loads(ok(cli("status", "--json"))) if s["model"] == model and s["default"])


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
