"""Pods on one machine: a bundle's container entrypoint run as the kubelet would, and an nginx as its Service.

``Pod`` copies a bundle's ``config/`` and ``model-store/`` into a fresh "home" (the container's
``/home/model-server``, with an empty ``var/`` for the pod's emptyDir), and runs bundle.json's
``entrypoint`` argv with only these changes:

* ``python`` is this interpreter (``sys.executable``), where servekit is installed as in the image;
* every ``/home/model-server`` path points into the home;
* ``--bind 0.0.0.0`` becomes ``--bind 127.0.0.1``: the same listeners on the loopback interface only,
  so a test never exposes a server on a shared machine;
* ports: a pod's are fixed (8080/8082/8081 in config.properties, OIP 8000/8001 on the launcher's
  defaults, TorchServe's gRPC 7070/7071); two pods on one machine cannot share them, so the home's
  config.properties gets free loopback ports in its addresses and ``grpc_*_port`` lines, and the argv
  gets ``--oip-http-port``/``--oip-grpc-port`` (the launcher's own flags; the only added arguments).

The environment is what a container gets: PATH (java, nginx), HOME, the locale and JAVA_HOME from
this machine, plus bundle.json's ``env`` (the Deployment's), and nothing else of the test's.
The launcher is signalled as the kubelet signals a container: SIGTERM to its main process only.
Teardown (``Pod.kill``) always ends what the pod started: SIGTERM, then the launcher's own stop
paths (``TorchServeProcess.stop`` on the same files), then SIGKILL by pid for anything left whose
command line names the home or that is in a process group the pod was seen to own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import requests
import yaml

from servekit.serving.nginx import NginxError, NginxInstance, config_head
from servekit.serving.processes import children, command_line, process_table
from servekit.serving.server import TorchServeProcess
from tests.integration.conftest import operator_cli

CONTAINER_HOME = "/home/model-server"
REPO = Path(__file__).resolve().parents[2]
# The pod's listeners: config.properties' addresses and gRPC ports, and the launcher's OIP ports.
ADDRESS_KEYS = {"inference": "inference_address", "management": "management_address", "metrics": "metrics_address"}
PORT_KEYS = {"grpc_inference": "grpc_inference_port", "grpc_management": "grpc_management_port"}
# "http": the pod's routing proxy (the launcher's --http-port, the Service's http port); "inference": TorchServe's
# own inference listener behind it.
PORT_NAMES = (*ADDRESS_KEYS, *PORT_KEYS, "oip_http", "oip_grpc", "servekit_metrics", "oip_health", "http")
# What a container inherits from the image rather than from the Deployment (the image sets them too).
HOST_ENV = ("PATH", "LANG", "LC_ALL", "JAVA_HOME", "TZ")


_HANDED_OUT: set[int] = set()  # never the same port twice in one test session (pods start at different times)


def free_ports(count: int) -> list[int]:
    """``count`` free loopback ports, distinct from each other and from every port handed out before."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(count * 20):
            sock = stack.enter_context(socket.socket())  # held open until all are chosen
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            if port not in _HANDED_OUT:
                ports.append(port)
                _HANDED_OUT.add(port)
                if len(ports) == count:
                    return ports
    raise RuntimeError(f"could not find {count} free loopback ports")


def make_bundle(out: Path, model_store: Path, *options: str) -> dict:
    """``servekit bundle --out OUT`` from ``model_store`` (``options``: the generator's selection flags).

    No server; the deployment state it maps canaries from is an empty one beside ``out``, never ``var/proxy``.
    """
    cli = operator_cli(None, model_store, REPO, out.with_name(f"{out.name}.state"))
    result = cli("bundle", "--out", str(out), *options, timeout=120)
    assert result.returncode == 0, f"bundle --out {out} {' '.join(options)} failed: {result.stderr}"
    return record_of(out)


def pod_timing(record: dict) -> dict[str, float]:
    """From bundle.json: the startup probe's budget, the preStop sleep and the termination grace, in seconds."""
    probes = record["probes"]
    startup = probes["startup"]
    return {
        "startup_s": float(startup["periodSeconds"]) * float(startup["failureThreshold"]),
        "prestop_s": float(record["preStopSeconds"]),
        "grace_s": float(record["terminationGracePeriodSeconds"]),
    }


def record_of(bundle: Path) -> dict:
    return json.loads((bundle / "bundle.json").read_text())


def in_home(value: str, home: Path) -> str:
    return value.replace(CONTAINER_HOME, str(home))


def deployment_env(record: dict) -> dict[str, str]:
    """bundle.json's ``env``: a mapping, or the Deployment's list of ``{"name", "value"}``."""
    env = record.get("env") or {}
    if isinstance(env, list):
        env = {item["name"]: str(item.get("value", "")) for item in env}
    return {str(name): str(value) for name, value in env.items()}


def live_processes() -> dict[int, tuple[int, str]]:
    """pid -> (process group, command line) of every process that is not a zombie."""
    table = {}
    for pid, state, _, group in process_table():
        if state != "Z":
            line = " ".join(command_line(pid))
            if line:
                table[pid] = (group, line)
    return table


def on_ports(config_text: str, ports: dict[str, int], home: Path | None = None) -> str:
    """config.properties with its addresses and gRPC ports on ``ports`` (loopback), paths moved into ``home``."""
    lines = []
    for line in config_text.splitlines():
        key, sep, value = line.partition("=")
        name = key.strip()
        if sep and not line.lstrip().startswith("#"):
            if name in ADDRESS_KEYS.values():
                kind = next(k for k, v in ADDRESS_KEYS.items() if v == name)
                value = f"http://127.0.0.1:{ports[kind]}"
            elif name in PORT_KEYS.values():
                value = str(ports[next(k for k, v in PORT_KEYS.items() if v == name)])
            elif home is not None:
                value = in_home(value, home)
            line = f"{key}={value}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def on_loopback(command: list[str], ports: dict[str, int], bind: str = "127.0.0.1") -> list[str]:
    """The launcher's argv bound to ``bind`` instead of 0.0.0.0, its OIP, scrape and probe ports on ``ports``."""
    command = list(command)
    at = command.index("--bind") + 1
    assert command[at] == "0.0.0.0", f"the pod's entrypoint binds {command[at]}"
    command[at] = bind
    assert "--oip-http-port" not in command, "the entrypoint sets OIP ports: adjust the substitution"
    command += ["--oip-http-port", str(ports["oip_http"]), "--oip-grpc-port", str(ports["oip_grpc"])]
    command[command.index("--metrics-port") + 1] = str(ports["servekit_metrics"])  # the scrape port, a free one
    command[command.index("--health-port") + 1] = str(ports["oip_health"])  # the probes' port, a free one
    command[command.index("--http-port") + 1] = str(ports["http"])  # the routing proxy's (the Service's) port
    return command


@dataclass
class Pod:
    """One replica: a bundle's entrypoint run in its own home (see the module docstring)."""

    bundle: Path
    home: Path
    bind: str = "127.0.0.1"
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    groups: set[int] = field(default_factory=set)  # process groups seen owning the pod's processes
    image_snapshot: dict[str, str] = field(default_factory=dict)  # image_files() as prepared

    def __post_init__(self) -> None:
        self.bundle, self.home = Path(self.bundle), Path(self.home)
        self.record = record_of(self.bundle)
        self.ports = self.ports or dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES))))

    # ------------------------------------------------------------------ what the container gets
    @property
    def config(self) -> Path:
        return self.home / "config" / "config.properties"

    @property
    def workdir(self) -> Path:
        return self.home / "var"

    def prepare(self) -> None:
        """A fresh home: the bundle's config/ and model-store/ copied, an empty var/; ports rewritten."""
        self.home.mkdir(parents=True)
        shutil.copytree(self.bundle / "config", self.home / "config")
        shutil.copytree(self.bundle / "model-store", self.home / "model-store")
        self.workdir.mkdir()
        self.config.write_text(on_ports(self.config.read_text(), self.ports, self.home))
        self.image_snapshot = self.image_files()
        # The routing ConfigMap that k8s/servekit.yaml mounts at the launcher's --routing file.
        documents = yaml.safe_load_all((self.bundle / "k8s" / "servekit.yaml").read_text())
        (configmap,) = [d for d in documents if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("routing")]
        self.write_routes(next(iter(configmap["data"].values())))

    def image_files(self) -> dict[str, str]:
        """config/ and model-store/ (read-only in the pod: they are in the image): each file's sha256."""
        return {
            str(path.relative_to(self.home)): hashlib.sha256(path.read_bytes()).hexdigest()
            for folder in ("config", "model-store")
            for path in sorted((self.home / folder).rglob("*"))
            if path.is_file()
        }

    def argv(self) -> list[str]:
        entrypoint = self.record["entrypoint"]
        assert isinstance(entrypoint, list), f"bundle.json entrypoint is not an argv: {entrypoint!r}"
        assert entrypoint[0] in ("python", "python3"), entrypoint
        command = [sys.executable, *(in_home(arg, self.home) for arg in entrypoint[1:])]
        return on_loopback(command, self.ports, self.bind)

    def env(self) -> dict[str, str]:
        env = {name: os.environ[name] for name in HOST_ENV if name in os.environ}
        env["HOME"] = str(self.home)
        env.update({name: in_home(value, self.home) for name, value in deployment_env(self.record).items()})
        return env

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        log = open(self.home / "pod.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            self.process = subprocess.Popen(
                self.argv(), cwd=self.home, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        finally:
            log.close()
        self.groups.add(self.process.pid)

    def url(self, kind: str, path: str = "") -> str:
        return f"http://127.0.0.1:{self.ports[kind]}{path}"

    @property
    def backend(self) -> str:
        """Where the Service sends traffic: the pod's ``http`` port (its routing proxy, in front of TorchServe)."""
        return f"127.0.0.1:{self.ports['http']}"

    @property
    def routing_file(self) -> Path:
        """The launcher's ``--routing`` file in the home: where the Deployment mounts the routing ConfigMap."""
        command = self.record["entrypoint"]
        return Path(in_home(command[command.index("--routing") + 1], self.home))

    def write_routes(self, routes: dict | str) -> None:
        """Replace the routing file whole (``routes``: the JSON object, or raw text), as the kubelet swaps a mount."""
        text = routes if isinstance(routes, str) else json.dumps({"routes": routes})
        self.routing_file.parent.mkdir(parents=True, exist_ok=True)
        staged = self.routing_file.with_name(f".{self.routing_file.name}.new")
        staged.write_text(text)
        staged.replace(self.routing_file)

    @property
    def readiness_path(self) -> str:
        """The Deployment's readiness probe (bundle.json ``probes``), which targets the health-only port."""
        probe = self.record["probes"]["readiness"]["httpGet"]
        assert probe["port"] == self.record["ports"]["health"], probe
        return probe["path"]

    def readiness(self) -> int | None:
        """The readiness probe's answer (HTTP status), None when nothing answers."""
        try:
            return requests.get(self.url("oip_health", self.readiness_path), timeout=2).status_code
        except requests.RequestException:
            return None

    def log_tail(self, chars: int = 3000) -> str:
        text = ""
        for path in (self.home / "pod.log", self.workdir / "logs" / "ts_log.log"):
            if path.is_file():
                text += f"\n--- {path}\n" + path.read_text(errors="replace")[-chars:]
        return text

    def wait_ready(self, timeout: float) -> float:
        """Wait for the readiness probe to say 200 (the startup probe's budget); returns the seconds taken."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise AssertionError(f"the pod's launcher exited with {self.process.returncode}:{self.log_tail()}")
            if self.readiness() == 200:
                self.note_processes()
                return time.monotonic() - started
            time.sleep(0.25)
        raise AssertionError(f"not ready after {timeout:.0f}s:{self.log_tail()}")

    def terminate(self) -> None:
        """SIGTERM to the container's main process only, as the kubelet sends it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def owned(self) -> dict[int, tuple[int, str]]:
        """Live processes of this pod: the command line names its home, or a group it owns holds them."""
        table = live_processes()
        mine = {pid: row for pid, row in table.items() if str(self.home) in row[1] or row[0] in self.groups}
        for pid in list(mine):  # nginx workers ("nginx: worker process") name nothing: their master does
            for child in children(pid):
                if child in table:
                    mine[child] = table[child]
        return mine

    def wait_gone(self, timeout: float) -> dict[int, tuple[int, str]]:
        """What of this pod is still running after ``timeout`` s (exited processes may take a moment)."""
        deadline = time.monotonic() + timeout
        while (left := self.owned()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left

    def note_processes(self) -> None:
        self.groups |= {group for group, _ in self.owned().values()}

    def kill(self, grace: float = 30.0) -> None:
        """Always leaves nothing of this pod running (see the module docstring)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.note_processes()
            self.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=grace)
        if self.config.is_file():
            with contextlib.suppress(Exception):
                self.launcher_server().stop(timeout=15)
        for pid in self.owned():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def launcher_server(self) -> TorchServeProcess:
        """The launcher's view of this pod's files, for its own stop paths (pid files checked before signals)."""
        return TorchServeProcess(
            self.workdir, self.home / "model-store", config=self.config, bind=self.bind,
            oip_ports={"oip_http": self.ports["oip_http"], "oip_grpc": self.ports["oip_grpc"]},
        )  # fmt: skip


# ------------------------------------------------------------------------------------------ the Service
@dataclass
class ServiceStandIn(NginxInstance):
    """nginx on a loopback port, round-robin over the ready replicas' inference ports: the Service's part.

    * ``proxy_next_upstream off``: a Kubernetes Service (kube-proxy) never retries a request on
      another endpoint, so neither does this one: a replica that refuses, resets or drops a request
      shows up as a failed request in the load's count, which is what the rehearsal must be honest about.
    * ``keepalive_timeout 0`` toward clients (one request per client connection): kube-proxy steers
      connections, not requests, so each request here meets the endpoints of its moment, as a new
      connection to a Service does. It also avoids an artifact of the stand-in that a Service does not
      have: an nginx reload closes idle client keep-alive connections, and a client that reuses one
      at that instant gets a reset (seen once in ~2,500 requests with hey's keep-alive), which would be
      counted against the replicas. Connections from here to the replicas are kept alive as usual.
    * Endpoint changes are whole-configuration reloads; ``route_to`` returns once the old nginx
      workers have finished the requests they held, so nothing goes to a removed replica afterwards.
    """

    port: int = 0
    backends: tuple[str, ...] = ()
    label: ClassVar[str] = "the stand-in Service"
    error: ClassVar[type[NginxError]] = NginxError

    def render(self) -> str:
        servers = "".join(f"        server {backend};\n" for backend in self.backends)
        return f"""# the Service of a rolling-update rehearsal (tests/integration/pods.py)
{config_head(self.prefix, 1024)}    client_max_body_size 7m;
    client_body_buffer_size 7m;
    upstream service {{
{servers}        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{self.port};
        keepalive_timeout 0;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_read_timeout 60s;
        proxy_next_upstream off;
        location / {{
            proxy_pass http://service;
        }}
    }}
}}
"""

    def start(self, backends: list[str]) -> None:
        self.refuse_if_running()
        self.backends = tuple(backends)
        self.install(self.render())
        self.launch(f"127.0.0.1:{self.port}")

    def route_to(self, backends: list[str]) -> None:
        """The endpoints change: install the new upstream and reload (returns once old workers are gone)."""
        self.backends = tuple(backends)
        self.install(self.render())
        self.reload(drain_timeout=30)

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"
