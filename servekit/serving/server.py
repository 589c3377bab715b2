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

    python -m servekit.serving.server start [--workdir var]   # background, returns when /ping is Healthy
    python -m servekit.serving.server stop  [--workdir var]
    python -m servekit.serving.server run --config C --model-store S --bind 0.0.0.0   # in the foreground

``run`` stays in the foreground (a container's main process; a bundle's pods run it through
``servekit.deploy.pod``, which adds the routing proxy): it starts TorchServe from ``--config``
(a bundle's, no snapshots: a pod is immutable), then waits for SIGTERM. On SIGTERM it drains: the
OIP readiness turns false at once (``/v2/health/ready``: the gateway sees ``workdir/draining``),
it waits until no request is queued (at most ``--drain-timeout`` s), and only then stops.
``--metrics-port`` and ``--health-port`` add listeners that serve only ``GET /metrics`` and only
``GET /v2/health/live|ready`` (a pod's scrape and probe ports; ``servekit.serving.oip_service``).
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from servekit.errors import ServekitError
from servekit.serving.client import TorchServeClient, TorchServeError, read_keys
from servekit.serving.exporter import clear as clear_metrics
from servekit.serving.guard import ManagementGuard
from servekit.serving.oip_service import (
    DEFAULT_GRPC_PORT,
    DEFAULT_HTTP_PORT,
    DEFAULT_MAX_BODY,
    OipService,
    default_router,
)
from servekit.serving.processes import free_port, group_alive, owned_pid, read_pid
from servekit.serving.store import verify_store
from servekit.serving.tracing import CONFIG_KEY as OTLP_CONFIG_KEY
from servekit.serving.tracing import WORKER_ENV as OTLP_WORKER_ENV
from servekit.serving.worker_guard import ENV_ROOT, ensure_installed

__all__ = ["ServerError", "TorchServeProcess", "free_port", "read_properties"]

REPO_ROOT = Path(__file__).resolve().parents[2]
BASE_CONFIG = REPO_ROOT / "config.properties"
ADDRESS_KEYS = {"inference": "inference_address", "management": "management_address", "metrics": "metrics_address"}


# libgomp's idle threads spin after every parallel region before they sleep: 300,000 turns by
# default, several ms of a core. When a lone request ended, the worker's helper thread went on
# spinning on the core the CPU budget had just lent it (handlers.cpu_budget), while the next
# request, in the other worker, needed that core: a lone request on a two-worker model answered
# about 1.2 ms later than on one worker. 100,000 turns end soon enough; 20,000 were as fast at c=1
# but made the first answer after registration slower (docs/performance.md, "Why a second worker
# cost a lone request 1.5 ms"). A GOMP_SPINCOUNT or OMP_WAIT_POLICY in the environment wins.
# The operator side imports nothing of handlers/: the workers' copy, handlers.cpu_budget.SHORT_SPIN
# (what a worker started without it advises), is checked against this one by a unit test.
OPENMP_ENV = {"GOMP_SPINCOUNT": "100000"}
OPENMP_USER_KEYS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def openmp_env(environ: dict[str, str]) -> dict[str, str]:
    """The OpenMP settings the workers get: ours, unless ``environ`` already sets how its threads wait."""
    if any(key in environ for key in OPENMP_USER_KEYS):
        return {}
    return dict(OPENMP_ENV)


class ServerError(ServekitError):
    """TorchServe could not be started or stopped; the message says why."""


def read_properties(path: Path) -> dict[str, str]:
    props: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def _unescape_java(value: str) -> str:
    """A value as ``java.util.Properties`` stores it (``\\:`` for ``:``, ``\\uXXXX``) back to text."""
    out, i = [], 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            nxt = value[i + 1]
            if nxt == "u" and i + 5 < len(value):
                out.append(chr(int(value[i + 2 : i + 6], 16)))
                i += 6
                continue
            out.append({"t": "\t", "n": "\n", "r": "\r", "f": "\f"}.get(nxt, nxt))
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def read_snapshot(path: Path) -> tuple[dict[str, str], dict]:
    """A TorchServe snapshot file: its settings (unescaped) and its parsed ``model_snapshot``."""
    props = {key: _unescape_java(value) for key, value in read_properties(path).items()}
    try:
        models = json.loads(props.get("model_snapshot", "{}"))
    except ValueError as exc:
        raise ServerError(f"snapshot {path} has an unreadable model_snapshot: {exc}") from exc
    if not isinstance(models, dict):
        raise ServerError(f"snapshot {path}: model_snapshot is not a JSON object")
    return props, models


def snapshot_archives(models: dict) -> list[str]:
    """The archive of every version a snapshot would restore (``marName``)."""
    names = []
    for versions in (models.get("models") or {}).values():
        for version in (versions or {}).values():
            names.append(str(version.get("marName", "")))
    return names


def load_models_archives(value: str | None, store: Path) -> list[str]:
    """The archives that ``load_models`` names (``all`` = every archive in the store)."""
    if not value:
        return []
    if value.strip().lower() == "all":
        return sorted(p.name for p in store.glob("*.mar"))
    return [part.split("=", 1)[-1].strip() for part in value.split(",") if part.strip()]


# Keys that describe where a server runs, not how it behaves: they differ between snapshots and
# today's file by design (the launcher chooses them), so they are not reported as differences.
_LOCATION_KEYS = {"model_store", "model_snapshot", "load_models", "tsConfigFile", *ADDRESS_KEYS.values()}


@dataclass
class TorchServeProcess:
    """One TorchServe, its files under ``workdir``; ports from ``config.properties`` or chosen free.

    The management API is reached through the guard (``servekit.serving.guard``) on ``ports["management"]``;
    TorchServe's own management listener is a Unix socket in ``workdir/run`` (mode 0700).
    """

    workdir: Path
    model_store: Path = REPO_ROOT / "model_store"
    ports: dict[str, int] | None = None
    load_models: str | None = None
    snapshots: bool = False
    restore: bool = False  # re-register what the latest snapshot in workdir/logs/config holds (needs snapshots)
    overrides: dict[str, str] = field(default_factory=dict)
    verify: bool = True  # check every archive to be loaded against model_store/manifest.json first
    oip: bool = True  # the Open Inference Protocol address beside it (servekit.serving.oip_service)
    # {"oip_http": .., "oip_grpc": .., "servekit_metrics": .., "oip_health": .. (both optional)}; default
    # 8000/8001, free with ports
    oip_ports: dict[str, int] | None = None
    config: Path = BASE_CONFIG  # the TorchServe configuration to start from (a bundle's, in a pod)
    bind: str = "127.0.0.1"  # host of the inference, metrics and OIP listeners ("0.0.0.0" in a pod)
    # Listeners on 127.0.0.1 whatever ``bind`` says: ("inference",) in a pod, whose routing proxy takes the
    # inference port's traffic first (servekit.deploy.pod).
    loopback: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)  # more environment for TorchServe and its workers
    router: str | None = None  # host:port of the routing plane (servekit proxy) OIP inference goes through
    otlp_endpoint: str | None = None  # traces (OTLP/HTTP URL); default: config.properties' servekit_otlp_endpoint
    process: subprocess.Popen | None = None
    snapshot_differences: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.model_store = Path(self.model_store).resolve()
        self.config = Path(self.config)
        self.props = read_properties(self.config)
        if self.ports is None:
            self.ports = {kind: int(self.props[key].rsplit(":", 1)[1]) for kind, key in ADDRESS_KEYS.items()}
            self.oip_ports = self.oip_ports or {"oip_http": DEFAULT_HTTP_PORT, "oip_grpc": DEFAULT_GRPC_PORT}
        else:
            self.oip_ports = self.oip_ports or {"oip_http": free_port(), "oip_grpc": free_port()}
            # A server on chosen ports (tests, bench) must not collide with another one's gRPC ports.
            self.props.setdefault("grpc_inference_port", str(free_port()))
            self.props.setdefault("grpc_management_port", str(free_port()))
        for kind, key in ADDRESS_KEYS.items():
            host = "127.0.0.1" if kind in self.loopback else self.bind
            self.props[key] = f"http://{host}:{self.ports[kind]}"
        self.props["management_address"] = f"unix:{self.management_socket}"
        self.props["model_store"] = str(self.model_store)
        if self.restore and not self.snapshots:
            raise ValueError("restore=True needs snapshots=True")
        if self.load_models is not None:
            if self.load_models:
                self.props["load_models"] = self.load_models
            else:
                self.props.pop("load_models", None)
        self.props.update(self.overrides)
        # Ours, not TorchServe's: the collector for the gateway's and the workers' spans (off when absent).
        configured = self.props.pop(OTLP_CONFIG_KEY, "").strip()
        self.otlp_endpoint = self.otlp_endpoint or configured or None
        self.guard = ManagementGuard(
            self.workdir / "guard", f"127.0.0.1:{self.ports['management']}", self.management_socket
        )
        self.oip_service = OipService(
            self.workdir / "oip", self.url("inference"), self.url("management"),
            self.key_file if self.tokens else None, self.model_store,
            http_port=self.oip_ports["oip_http"], grpc_port=self.oip_ports["oip_grpc"], host=self.bind,
            metrics_dir=self.metrics_dir, metrics_port=self.oip_ports.get("servekit_metrics"),
            health_port=self.oip_ports.get("oip_health"),
            max_body=int(self.props.get("max_request_size") or DEFAULT_MAX_BODY), router=self.router,
            otlp_endpoint=self.otlp_endpoint,
        )  # fmt: skip

    # ------------------------------------------------------------------ addresses and keys
    def url(self, kind: str, path: str = "") -> str:
        """``kind``: inference, management, metrics or oip_http (``oip_grpc`` is host:port, see ``grpc_address``)."""
        port = self.oip_ports[kind] if kind in self.oip_ports else self.ports[kind]
        return f"http://127.0.0.1:{port}{path}"

    @property
    def grpc_address(self) -> str:
        """Where the standard OIP gRPC service (``inference.GRPCInferenceService``) listens."""
        return f"127.0.0.1:{self.oip_ports['oip_grpc']}"

    @property
    def management_socket(self) -> Path:
        return self.workdir / "run" / "management.sock"

    @property
    def metrics_dir(self) -> Path:
        """Where the workers write their handler metrics (``PROMETHEUS_MULTIPROC_DIR``; emptied at start)."""
        return self.workdir / "metrics"

    @property
    def key_file(self) -> Path:
        return self.workdir / "key_file.json"

    @property
    def tokens(self) -> bool:
        """Whether TorchServe checks tokens (a bundle's pod configuration turns them off)."""
        return self.props.get("disable_token_authorization", "false").strip().lower() != "true"

    @property
    def pid_file(self) -> Path:
        return self.workdir / "torchserve.pid"

    @property
    def launcher(self) -> Path:
        """TorchServe's launcher script in this interpreter's environment (its command line names it)."""
        return Path(sys.executable).with_name("torchserve")

    def client(self, timeout: float = 120.0) -> TorchServeClient:
        """The TorchServe client for this server: its addresses and its key file."""
        return TorchServeClient(
            self.url("management"),
            self.url("inference"),
            self.key_file if self.tokens else None,
            timeout,
            metrics_url=self.url("metrics"),
        )

    def keys(self) -> dict[str, str]:
        return read_keys(self.key_file)

    def headers(self, kind: str = "inference") -> dict[str, str]:
        return self.client().headers(kind)

    def running_pid(self) -> int | None:
        """The launcher recorded in the pid file, only if it is still our TorchServe in ``workdir``."""
        return owned_pid(self.pid_file, (str(self.launcher), "--foreground"), cwd=self.workdir)

    # ------------------------------------------------------------------ lifecycle
    def write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "config.properties"
        lines = [f"# generated from {BASE_CONFIG} by servekit.serving.server"]
        lines += [f"{key}={value}" for key, value in self.props.items()]
        path.write_text("\n".join(lines) + "\n")
        return path

    def apply_snapshot(self) -> Path | None:
        """Carry the latest snapshot's registrations (only them) into today's configuration.

        TorchServe restores a snapshot only when started without ``--ts-config``, and then the
        snapshot's copy of every setting wins over today's config.properties: a hardened
        ``allowed_urls`` or limit would be silently undone by a restart. Instead the snapshot's
        ``model_snapshot`` (versions, workers, default) is put into today's configuration, and
        every other setting that differs is listed in ``snapshot_differences``.
        """
        snapshot = self.latest_snapshot()
        if snapshot is None:
            return None
        saved, models = read_snapshot(snapshot)
        if not models.get("models"):
            return None
        self.props.pop("load_models", None)
        self.props["model_snapshot"] = json.dumps(models, separators=(",", ":"), sort_keys=True)
        self.snapshot_differences = [
            f"{key}: snapshot {saved.get(key, '(unset)')!r}, config.properties {value!r}"
            for key, value in sorted(self.props.items())
            if key not in _LOCATION_KEYS and saved.get(key) != value
        ]
        return snapshot

    def archives_to_load(self) -> list[str]:
        names = load_models_archives(self.props.get("load_models"), self.model_store)
        if "model_snapshot" in self.props:
            names += snapshot_archives(json.loads(self.props["model_snapshot"]))
        return sorted(set(names))

    def environment(self) -> dict[str, str]:
        """The environment of TorchServe and (inherited) its workers."""
        return {
            **os.environ,
            **openmp_env({**os.environ, **self.env}),
            "TMPDIR": str(self.workdir / "tmp"),
            "TEMP": str(self.workdir / "tmp"),
            "LOG_LOCATION": str(self.workdir / "logs"),
            "METRICS_LOCATION": str(self.workdir / "logs"),
            # Workers run only code unpacked from archives here (servekit.serving.worker_guard).
            ENV_ROOT: str(self.workdir / "tmp" / "models"),
            # Every worker's handler metrics, summed by the exporter (servekit.serving.exporter).
            "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
            # The handlers fail an answer over this alone, before the frontend would drop the worker for it.
            "SERVEKIT_MAX_RESPONSE_SIZE": str(self.props.get("max_response_size", "")),
            # The workers' spans (handlers.tracing); empty: tracing off.
            OTLP_WORKER_ENV: self.otlp_endpoint or "",
            **self.env,
        }

    def start(self, timeout: float = 180.0) -> None:
        snapshot = self.apply_snapshot() if self.restore else None
        if self.verify:
            try:
                verify_store(self.model_store, self.archives_to_load())
            except ServekitError as exc:
                raise ServerError(f"refusing to start: {exc}") from exc
        self.check_ports()
        config = self.write_config()
        self.draining_file.unlink(missing_ok=True)  # left by a run that was killed: would say "not ready" forever
        (self.workdir / "tmp").mkdir(exist_ok=True)
        self.management_socket.parent.mkdir(mode=0o700, exist_ok=True)
        self.management_socket.parent.chmod(0o700)
        self.management_socket.unlink(missing_ok=True)
        self.key_file.unlink(missing_ok=True)
        env = self.environment()
        clear_metrics(self.metrics_dir)
        ensure_installed()
        env.pop("TS_CONFIG_FILE", None)  # would win over --ts-config
        command = [str(self.launcher), "--start", "--foreground"]
        command += ["--ts-config", str(config), "--model-store", str(self.model_store)]
        if not self.snapshots:
            command.append("--ncs")
        try:
            self.guard.start()
        except ServekitError as exc:
            raise ServerError(str(exc)) from exc
        log = open(self.workdir / "torchserve.out", "ab")  # noqa: SIM115 - handed to the child
        try:
            self.process = subprocess.Popen(
                command, cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        except OSError:
            self.guard.stop()
            raise
        finally:
            log.close()
        self.pid_file.write_text(str(self.process.pid))
        if snapshot is not None:
            restored = f"restored registrations from {snapshot.name} under today's {BASE_CONFIG.name}"
            (self.workdir / "restore.log").write_text(
                "\n".join([restored, *self.snapshot_differences]) + "\n", encoding="utf-8"
            )
        try:
            self.wait_healthy(timeout)
            if self.oip:
                self.oip_service.start()
            self.wait_models_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def check_ports(self) -> None:
        """Refuse ports another process listens on (make serve checks before building anything)."""
        for kind, port in {**self.ports, **(self.oip_ports if self.oip else {})}.items():
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    raise ServerError(f"port {port} ({kind}) is already in use: is a TorchServe running? (make stop)")

    def latest_snapshot(self) -> Path | None:
        """The newest ``<timestamp>-<kind>.cfg`` that TorchServe wrote under ``workdir/logs/config``."""
        snapshots = sorted((self.workdir / "logs" / "config").glob("*.cfg"))
        return snapshots[-1] if snapshots else None

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        client = self.client(timeout=5)
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(f"TorchServe exited with {self.process.returncode}; see {self.log_tail()}")
            if self.key_file.is_file() or not self.tokens:
                try:
                    response = client.call("inference", "GET", "/ping")
                    if response.status_code == 200 and response.json().get("status") == "Healthy":
                        return
                    last = f"{response.status_code} {response.text.strip()[:200]}"
                except (TorchServeError, ValueError) as exc:  # the key file half-written, no answer yet
                    last = str(exc)
            time.sleep(0.5)
        raise ServerError(f"TorchServe not Healthy after {timeout:.0f}s (last: {last}); see {self.log_tail()}")

    def wait_models_ready(self, timeout: float) -> None:
        """Wait until every registered model version has a READY worker (a failed load never does)."""
        deadline = time.monotonic() + timeout
        client = self.client(timeout=5)
        pending: list[str] = []
        while time.monotonic() < deadline:
            pending = [
                f"{name} {version.get('modelVersion')}"
                for name in client.models()
                for version in client.describe(name)
                if not any(w.get("status") == "READY" for w in version.get("workers", []))
            ]
            if not pending:
                return
            time.sleep(0.5)
        raise ServerError(f"no READY worker after {timeout:.0f}s for: {', '.join(pending)}; see {self.log_tail()}")

    @property
    def draining_file(self) -> Path:
        """While it exists, the OIP readiness says not ready (the gateway checks it on every probe)."""
        return self.workdir / "draining"

    def drain(self, timeout: float, settle: float = 1.0) -> bool:
        """Say not ready, then wait until no version has a queued request twice in a row (at most ``timeout`` s).

        ``settle`` more seconds let the batch a worker holds finish. False: requests were still queued.
        """
        self.draining_file.write_text("draining\n")
        client = self.client(timeout=5)
        deadline, quiet = time.monotonic() + timeout, 0
        while time.monotonic() < deadline:
            try:
                pending = sum(
                    int((version.get("jobQueueStatus") or {}).get("pendingRequests") or 0)
                    for name in client.models()
                    for version in client.describe(name)
                )
            except (TorchServeError, ValueError):
                pending = 0  # TorchServe is not answering: nothing more will be served
            quiet = quiet + 1 if pending == 0 else 0
            if quiet >= 2:
                time.sleep(settle)
                return True
            time.sleep(0.25)
        return False

    def log_tail(self) -> str:
        return str(self.workdir / "logs" / "ts_log.log")

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the process group this object started (or the one its pid file still names), and the guard.

        A pid file whose process is gone or is no longer our TorchServe (pids are reused) is
        removed without signalling anything.
        """
        pid = self.process.pid if self.process is not None else self.running_pid()
        if pid is not None:
            self._stop_group(pid, timeout)
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
        self.pid_file.unlink(missing_ok=True)
        self.oip_service.stop()
        self.guard.stop()

    def _stop_group(self, pid: int, timeout: float) -> None:
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            exited = self.process is None or self.process.poll() is not None
            if exited and not group_alive(pid):
                return
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of a container's foreground server (``run`` here, and ``servekit.deploy.pod``)."""
    parser.add_argument("--workdir", default=str(REPO_ROOT / "var"))
    parser.add_argument("--model-store", default=str(REPO_ROOT / "model_store"))
    parser.add_argument("--config", default=str(BASE_CONFIG), help="run: the TorchServe configuration")
    parser.add_argument("--bind", default="127.0.0.1", help="run: host of the inference, metrics and OIP listeners")
    parser.add_argument("--drain-timeout", type=float, default=25.0, help="run: seconds to wait for queued requests")
    parser.add_argument("--oip-http-port", type=int, default=DEFAULT_HTTP_PORT, help="run: the OIP HTTP port")
    parser.add_argument("--oip-grpc-port", type=int, default=DEFAULT_GRPC_PORT, help="run: the OIP gRPC port")
    parser.add_argument("--metrics-port", type=int, help="run: a port serving only servekit's GET /metrics")
    parser.add_argument(
        "--health-port", type=int, help="run: a port of the OIP front serving only GET /v2/health/live and /ready"
    )


def run_server(args: argparse.Namespace, **extra: object) -> TorchServeProcess:
    """The foreground server that ``add_run_arguments``' ``args`` describe (``extra``: more fields)."""
    oip_ports = {"oip_http": args.oip_http_port, "oip_grpc": args.oip_grpc_port}
    if args.metrics_port is not None:
        oip_ports["servekit_metrics"] = args.metrics_port
    if args.health_port is not None:
        oip_ports["oip_health"] = args.health_port
    return TorchServeProcess(Path(args.workdir), Path(args.model_store), config=Path(args.config), bind=args.bind,
                             oip_ports=oip_ports, **extra)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Start or stop the toolkit's TorchServe.")
    parser.add_argument("action", choices=["start", "stop", "key", "run"])
    parser.add_argument("kind", nargs="?", default="inference", help="for key: inference, management or api")
    parser.add_argument(
        "--fresh", action="store_true", help="start from config.properties, ignoring the saved snapshot of versions"
    )
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    if args.action == "run":
        server = run_server(args)
    else:
        # Versions registered at runtime, their workers and the default come back after make stop / make serve.
        server = TorchServeProcess(Path(args.workdir), Path(args.model_store), snapshots=True, restore=not args.fresh,
                                   router=default_router(Path(args.workdir)))  # fmt: skip
    actions = {"key": _print_key, "stop": _stop, "start": _start, "run": _run}
    try:
        return actions[args.action](server, args)
    except ServekitError as exc:
        print(f"serve: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.exit_code


def _print_key(server: TorchServeProcess, args: argparse.Namespace) -> int:
    if not server.key_file.is_file():
        raise ServerError(f"no key file at {server.key_file}: is TorchServe running?")
    keys = server.keys()
    if args.kind.lower() not in keys:
        raise ServerError(f"no {args.kind!r} key (have: {', '.join(sorted(keys))})")
    print(keys[args.kind.lower()])
    return 0


def _stop(server: TorchServeProcess, args: argparse.Namespace) -> int:
    recorded = read_pid(server.pid_file)
    running = server.running_pid()
    if recorded is not None and running is None:
        print(f"pid file {server.pid_file} named {recorded}, which is not our TorchServe: removed, nothing signalled")
    server.stop()
    print("TorchServe stopped" if running is not None else "TorchServe (started by make serve) is not running")
    return 0


def _run(server: TorchServeProcess, args: argparse.Namespace) -> int:
    return serve_in_foreground(server, args.drain_timeout)


def serve_in_foreground(
    server: TorchServeProcess,
    drain_timeout: float,
    before_start: Callable[[], None] | None = None,
    tick: Callable[[], None] | None = None,
    drained: Callable[[], None] | None = None,
) -> int:
    """Start, serve until SIGTERM or SIGINT, drain, stop (see the module docstring).

    The hooks of a pod's launcher (``servekit.deploy.pod``): ``before_start`` before TorchServe starts
    (what must run before the readiness probe can pass), ``tick`` about five times a second while
    serving (a ``ServekitError`` from it ends the run), ``drained`` after the drain, before TorchServe
    stops (and also when the run fails).
    """
    stopping: list[int] = []
    clock: list[float] = []  # when the drain began, ended, and the hook returned

    def on_signal(signum: int, frame: object) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.draining_file.unlink(missing_ok=True)
    if before_start is None:
        server.start()
    try:
        if before_start is not None:
            before_start()
            server.start()
        print(f"serving: inference {server.url('inference')}, OIP {server.url('oip_http')}, gRPC "
              f"{server.grpc_address}", flush=True)  # fmt: skip
        while not stopping:
            if server.process is not None and server.process.poll() is not None:
                raise ServerError(f"TorchServe exited with {server.process.returncode}; see {server.log_tail()}")
            if tick is not None:
                tick()
            time.sleep(0.2)
        print(f"signal {stopping[0]}: draining (at most {drain_timeout:g} s)", flush=True)
        clock.append(time.monotonic())
        server.drain(drain_timeout)
        clock.append(time.monotonic())
    finally:
        try:
            if drained is not None:
                drained()
        finally:
            clock.append(time.monotonic())
            server.stop()
    # Where a stop's time goes (the termination grace must cover it): drain, the launcher's hook, TorchServe.
    steps = [f"{b - a:.1f}" for a, b in zip(clock, [*clock[1:], time.monotonic()], strict=True)]
    print(f"stopped (drain, hook, TorchServe: {', '.join(steps)} s)" if len(steps) == 3 else "stopped", flush=True)
    return 0


def _start(server: TorchServeProcess, args: argparse.Namespace) -> int:
    if (pid := server.running_pid()) is not None:
        raise ServerError(f"TorchServe is already running (pid {pid}); make stop first")
    server.start()
    announce(server)
    return 0


def announce(server: TorchServeProcess) -> None:
    """Leave the started server running in the background; say what differs from its snapshot and how to call it."""
    server.process = None
    if server.snapshot_differences:
        print(
            "note: restored the registered versions from the last snapshot; these settings differ from it and "
            "today's config.properties applies:\n  " + "\n  ".join(server.snapshot_differences)
        )
    print_usage(server)


def print_usage(server: TorchServeProcess) -> None:
    inference, management = server.url("inference"), server.url("management")
    print(
        f"""TorchServe is Healthy: inference {inference}, management {management}, metrics {server.url("metrics")}
Keys are in {server.key_file}. Try:

  INF=$(.venv/bin/python -m servekit.serving.server key inference)
  MGT=$(.venv/bin/python -m servekit.serving.server key management)
  curl -H "Authorization: Bearer $INF" {inference}/predictions/digits -T samples/digit_7.png
  curl -H "Authorization: Bearer $MGT" -X POST \\
       "{management}/models?url=digits_v2.0.mar&initial_workers=1&synchronous=true"
  curl -H "Authorization: Bearer $INF" {inference}/predictions/digits/2.0 -T samples/digit_7.png
  curl -H "Authorization: Bearer $MGT" -X PUT "{management}/models/digits/2.0?min_worker=2&synchronous=true"
  curl -H "Authorization: Bearer $MGT" {management}/models/digits/all
  curl -H "Authorization: Bearer $INF" -H 'Content-Type: application/json' {inference}/predictions/breast_cancer \\
       --data-binary @samples/breast_cancer/malignant_0.json
  curl -H "Authorization: Bearer $INF" {inference}/predictions/digit_pages \\
       -F data=@samples/pages/page_2.png -F score_threshold=0.5

Open Inference Protocol (Triton / KServe v2 clients): HTTP {server.url("oip_http")}, gRPC {server.grpc_address}
  curl -H "Authorization: Bearer $INF" {server.url("oip_http")}/v2/models/digits
  make stop"""
    )


if __name__ == "__main__":
    sys.exit(main())
