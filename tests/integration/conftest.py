"""A real TorchServe per test module, on free loopback ports, always stopped in teardown."""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml

from servekit.deploy.proxy import NginxProxy
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


@dataclass(frozen=True)
class OperatorCli:
    """The ``servekit`` command line of a test: against ``server`` (None: a command that needs none, such as
    ``bundle``) and ``store``, with its history, state lock and proxy files under ``state``, never the
    repository's ``var/``.

    ``options``: more of the command's own flags, given before every subcommand (``--metrics-url``);
    a call's ``options`` come after them and win (argparse keeps the last one). ``proxy_port``: where
    ``servekit proxy start`` listens; ``proxy`` is that nginx, for the test to read and stop.

        cli = operator_cli(server, store, repo_root, tmp_path, "--metrics-url", url, proxy_port=free_port())
        cli("status", "--json")                                   # a CompletedProcess (text, never raises)
        cli("register", "digits", "2.0", options=["--store", str(other)])
        process = cli.start("rollout", "digits", "2.0")           # a Popen with stdout/stderr piped
    """

    server: TorchServeProcess | None
    store: Path
    repo_root: Path
    state: Path
    options: tuple[str, ...] = ()
    proxy_port: int | None = None

    @property
    def history(self) -> Path:
        return self.state / "deployments.jsonl"

    @property
    def proxy_dir(self) -> Path:
        return self.state / "proxy"

    @property
    def proxy(self) -> NginxProxy:
        assert self.server is not None, "a proxy needs the server it forwards to"
        assert self.proxy_port is not None, "operator_cli(..., proxy_port=PORT)"
        return NginxProxy(self.proxy_dir, self.proxy_port, self.server.url("inference").split("//")[1])

    def argv(self, *args: str, options: Sequence[str] = ()) -> list[str]:
        server = self.server
        address = [] if server is None else [
            "--management-url", server.url("management"), "--inference-url", server.url("inference"),
            "--key-file", str(server.key_file),
        ]  # fmt: skip
        proxy = [] if self.proxy_port is None else ["--proxy-port", str(self.proxy_port)]
        return [
            sys.executable, "-m", "servekit.cli", *address, "--store", str(self.store), "--history", str(self.history),
            "--proxy-dir", str(self.proxy_dir), *proxy, *self.options, *options, *args,
        ]  # fmt: skip

    def __call__(self, *args: str, options: Sequence[str] = (), timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*args, options=options), capture_output=True, text=True, timeout=timeout,
                              check=False, cwd=self.repo_root)  # fmt: skip

    def start(self, *args: str, options: Sequence[str] = ()) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*args, options=options), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=self.repo_root)  # fmt: skip


def operator_cli(
    server: TorchServeProcess | None,
    store: Path,
    repo_root: Path,
    state: Path,
    *options: str,
    proxy_port: int | None = None,
) -> OperatorCli:
    """``servekit ...`` against ``server`` and ``store``, its files under ``state``: see ``OperatorCli``."""
    return OperatorCli(server, store, repo_root, state, options, proxy_port)


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


def drill_store(store: Path, model_store: Path, repo_root: Path, drills: dict[str, dict], spec_name: str) -> Path:
    """``store`` with digits 1.0 and 2.0 as built, plus drill versions of 1.0 whose ``faults:`` differ.

    ``drills``: version -> its ``faults`` section (``{"delay_ms": 200}``); built with 1.0's cached weights
    from a spec variant ``build/{spec_name}_models.yaml`` (one name per test module: modules run in parallel).
    """
    from servekit.build.archive import build_all  # torch: only the modules that build import it
    from servekit.build.spec import load_spec

    for name in ("digits_v1.0.mar", "digits_v2.0.mar", "manifest.json"):
        shutil.copyfile(model_store / name, store / name)
    spec = yaml.safe_load((repo_root / "models.yaml").read_text())
    spec["models"] = {"digits": spec["models"]["digits"]}  # the other models' relative paths stay out of it
    versions = spec["models"]["digits"]["versions"]
    for version, faults in drills.items():  # 1.0's weights (cached by the build): only the faults differ
        versions[version] = {**versions["1.0"], "faults": faults}
    spec_path = repo_root / "build" / f"{spec_name}_models.yaml"  # beside models.yaml's relative paths' root
    spec_path.parent.mkdir(exist_ok=True)
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False).replace("samples/golden.json", "../samples/golden.json"))
    built = [s for s in load_spec(spec_path) if s.version in drills]
    build_all(built, store, repo_root / "build" / "cache")
    return store


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()
