"""Starting and stopping a TorchServe of our own: for ``make serve`` / ``make stop`` and test fixtures.

``TorchServeProcess`` runs ``torchserve --foreground`` in its own process group inside a working
directory that holds everything the server writes: the effective config.properties, key_file.json,
logs, config snapshots and the launcher's pid file (TMPDIR points there, so a second server, such
as a test's, never collides with ``make serve``). Stopping signals only that process group.

Snapshots: with ``snapshots=True`` TorchServe writes its state (registered versions, worker counts,
the default version) to ``workdir/logs/config/*.cfg`` after every change and at shutdown. TorchServe
restores the latest one only when started WITHOUT ``--ts-config`` (a ``--ts-config`` file wins over
every snapshot), so ``restore=True`` starts it that way when a snapshot exists: the addresses and
all other settings then come from the snapshot (``ports`` is set from it), the model store from
``model_store``.

    python -m servekit.server start [--workdir var]   # background, returns when /ping is Healthy
    python -m servekit.server stop  [--workdir var]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIG = REPO_ROOT / "config.properties"
ADDRESS_KEYS = {"inference": "inference_address", "management": "management_address", "metrics": "metrics_address"}


class ServerError(RuntimeError):
    """TorchServe could not be started or stopped; the message says why."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_properties(path: Path) -> dict[str, str]:
    props: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def read_keys(key_file: Path) -> dict[str, str]:
    """``{"inference": ..., "management": ..., "api": ...}`` from TorchServe's key_file.json."""
    data = json.loads(key_file.read_text())
    return {kind.lower(): entry["key"] for kind, entry in data.items() if isinstance(entry, dict) and "key" in entry}


@dataclass
class TorchServeProcess:
    """One TorchServe, its files under ``workdir``; ports from ``config.properties`` or chosen free."""

    workdir: Path
    model_store: Path = REPO_ROOT / "model_store"
    ports: dict[str, int] | None = None
    load_models: str | None = None
    snapshots: bool = False
    restore: bool = False  # start from the latest snapshot in workdir/logs/config, if any (needs snapshots)
    overrides: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.model_store = Path(self.model_store).resolve()
        self.props = read_properties(BASE_CONFIG)
        if self.ports is None:
            self.ports = {kind: int(self.props[key].rsplit(":", 1)[1]) for kind, key in ADDRESS_KEYS.items()}
        else:
            # A server on chosen ports (tests, bench) must not collide with another one's gRPC ports.
            self.props.setdefault("grpc_inference_port", str(free_port()))
            self.props.setdefault("grpc_management_port", str(free_port()))
        for kind, key in ADDRESS_KEYS.items():
            self.props[key] = f"http://127.0.0.1:{self.ports[kind]}"
        self.props["model_store"] = str(self.model_store)
        if self.restore and not self.snapshots:
            raise ValueError("restore=True needs snapshots=True")
        if self.load_models is not None:
            if self.load_models:
                self.props["load_models"] = self.load_models
            else:
                self.props.pop("load_models", None)
        self.props.update(self.overrides)

    # ------------------------------------------------------------------ addresses and keys
    def url(self, kind: str, path: str = "") -> str:
        return f"http://127.0.0.1:{self.ports[kind]}{path}"

    @property
    def key_file(self) -> Path:
        return self.workdir / "key_file.json"

    @property
    def pid_file(self) -> Path:
        return self.workdir / "torchserve.pid"

    def keys(self) -> dict[str, str]:
        return read_keys(self.key_file)

    def headers(self, kind: str = "inference") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys()[kind]}"}

    # ------------------------------------------------------------------ lifecycle
    def write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "config.properties"
        lines = [f"# generated from {BASE_CONFIG} by servekit.server"]
        lines += [f"{key}={value}" for key, value in self.props.items()]
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, timeout: float = 180.0) -> None:
        snapshot = self.latest_snapshot() if self.restore else None
        if snapshot is not None:  # Java properties escape ':' as '\:'
            saved = read_properties(snapshot)
            self.ports = {
                kind: int(saved[key].replace("\\", "").rsplit(":", 1)[1]) for kind, key in ADDRESS_KEYS.items()
            }
        for kind, port in self.ports.items():
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    raise ServerError(f"port {port} ({kind}) is already in use: is a TorchServe running? (make stop)")
        config = self.write_config()
        (self.workdir / "tmp").mkdir(exist_ok=True)
        self.key_file.unlink(missing_ok=True)
        env = {
            **os.environ,
            "TMPDIR": str(self.workdir / "tmp"),
            "TEMP": str(self.workdir / "tmp"),
            "LOG_LOCATION": str(self.workdir / "logs"),
            "METRICS_LOCATION": str(self.workdir / "logs"),
        }
        command = [str(Path(sys.executable).with_name("torchserve")), "--start", "--foreground"]
        if snapshot is not None:
            env.pop("TS_CONFIG_FILE", None)  # TorchServe reads the latest snapshot itself
        else:
            command += ["--ts-config", str(config)]
        command += ["--model-store", str(self.model_store)]
        if not self.snapshots:
            command.append("--ncs")
        log = open(self.workdir / "torchserve.out", "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(
            command, cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.pid_file.write_text(str(self.process.pid))
        try:
            self.wait_healthy(timeout)
            self.wait_models_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def latest_snapshot(self) -> Path | None:
        """The snapshot TorchServe restores at start: the newest ``<timestamp>-<kind>.cfg``."""
        snapshots = sorted((self.workdir / "logs" / "config").glob("*.cfg"))
        return snapshots[-1] if snapshots else None

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(f"TorchServe exited with {self.process.returncode}; see {self.log_tail()}")
            if self.key_file.is_file():
                try:
                    response = requests.get(self.url("inference", "/ping"), headers=self.headers(), timeout=5)
                    if response.status_code == 200 and response.json().get("status") == "Healthy":
                        return
                    last = f"{response.status_code} {response.text.strip()[:200]}"
                except (requests.RequestException, ValueError, KeyError) as exc:
                    last = str(exc)
            time.sleep(0.5)
        raise ServerError(f"TorchServe not Healthy after {timeout:.0f}s (last: {last}); see {self.log_tail()}")

    def wait_models_ready(self, timeout: float) -> None:
        """Wait until every registered model version has a READY worker (a failed load never does)."""
        deadline = time.monotonic() + timeout
        pending: list[str] = []
        while time.monotonic() < deadline:
            headers = self.headers("management")
            models = requests.get(self.url("management", "/models"), headers=headers, timeout=5).json()["models"]
            pending = []
            for model in models:
                name = model["modelName"]
                described = requests.get(self.url("management", f"/models/{name}/all"), headers=headers, timeout=5)
                for version in described.json():
                    if not any(w.get("status") == "READY" for w in version.get("workers", [])):
                        pending.append(f"{name} {version.get('modelVersion')}")
            if not pending:
                return
            time.sleep(0.5)
        raise ServerError(f"no READY worker after {timeout:.0f}s for: {', '.join(pending)}; see {self.log_tail()}")

    def log_tail(self) -> str:
        return str(self.workdir / "logs" / "ts_log.log")

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the process group this object started (or the one recorded in the pid file)."""
        pid = self.process.pid if self.process is not None else _read_pid(self.pid_file)
        if pid is None:
            return
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pid = None
        deadline = time.monotonic() + timeout
        while pid is not None and time.monotonic() < deadline:
            if self.process is not None:
                if self.process.poll() is not None and not _group_alive(pid):
                    break
            elif not _group_alive(pid):
                break
            time.sleep(0.2)
        else:
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
        self.pid_file.unlink(missing_ok=True)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def process_table() -> list[tuple[int, str, int, int]]:
    """``(pid, state, parent pid, process group)`` of every process, from /proc."""
    table = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table.append((int(proc.name), fields[0], int(fields[1]), int(fields[2])))
    return table


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A group whose members are all zombies still answers; look for a live member.
    return any(group == pgid and state != "Z" for _, state, _, group in process_table())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Start or stop the toolkit's TorchServe.")
    parser.add_argument("action", choices=["start", "stop", "key"])
    parser.add_argument("kind", nargs="?", default="inference", help="for key: inference, management or api")
    parser.add_argument("--workdir", default=str(REPO_ROOT / "var"))
    parser.add_argument("--model-store", default=str(REPO_ROOT / "model_store"))
    parser.add_argument(
        "--fresh", action="store_true", help="start from config.properties, ignoring the saved snapshot of versions"
    )
    args = parser.parse_args(argv)
    # Versions registered at runtime, their workers and the default come back after make stop / make serve.
    server = TorchServeProcess(Path(args.workdir), Path(args.model_store), snapshots=True, restore=not args.fresh)
    try:
        if args.action == "key":
            if not server.key_file.is_file():
                print(f"serve: error: no key file at {server.key_file}: is TorchServe running?", file=sys.stderr)
                return 1
            keys = server.keys()
            if args.kind.lower() not in keys:
                print(f"serve: error: no {args.kind!r} key (have: {', '.join(sorted(keys))})", file=sys.stderr)
                return 1
            print(keys[args.kind.lower()])
            return 0
        if args.action == "stop":
            if _read_pid(server.pid_file) is None:
                print("TorchServe (started by make serve) is not running")
                return 0
            server.stop()
            print("TorchServe stopped")
            return 0
        if (pid := _read_pid(server.pid_file)) is not None and _group_alive(pid):
            print(f"TorchServe is already running (pid {pid}); make stop first", file=sys.stderr)
            return 1
        server.start()
    except ServerError as exc:
        print(f"serve: error: {exc}", file=sys.stderr)
        return 1
    server.process = None  # leave it running in the background
    print_usage(server)
    return 0


def print_usage(server: TorchServeProcess) -> None:
    inference, management = server.url("inference"), server.url("management")
    print(
        f"""TorchServe is Healthy: inference {inference}, management {management}, metrics {server.url("metrics")}
Keys are in {server.key_file}. Try:

  INF=$(.venv/bin/python -m servekit.server key inference)
  MGT=$(.venv/bin/python -m servekit.server key management)
  curl -H "Authorization: Bearer $INF" {inference}/predictions/digits -T samples/digit_7.png
  curl -H "Authorization: Bearer $MGT" -X POST \\
       "{management}/models?url=digits_v2.0.mar&initial_workers=1&synchronous=true"
  curl -H "Authorization: Bearer $INF" {inference}/predictions/digits/2.0 -T samples/digit_7.png
  curl -H "Authorization: Bearer $MGT" -X PUT "{management}/models/digits/2.0?min_worker=2&synchronous=true"
  curl -H "Authorization: Bearer $MGT" {management}/models/digits/all
  make stop"""
    )


if __name__ == "__main__":
    sys.exit(main())
