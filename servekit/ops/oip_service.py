"""Starting and stopping the OIP address beside a TorchServe: the nginx front and the gateway process.

``render_front_config`` is a pure function: on ``listen`` (8000 by default),

* ``POST /v2/models/NAME/infer`` and ``POST /v1/models/NAME:predict`` pass straight to TorchServe
  (nginx in C, so the protocol costs no Python hop on the data path);
* ``POST /v2/models/NAME/versions/V/infer`` goes to ``/predictions/NAME/V`` (TorchServe answers
  501 on its own versioned route; the handler reads the OIP body on any route);
* TorchServe's own 404 and 503 answers (no such model, queue full), which are not OIP-shaped, are
  rewritten to ``{"error": ...}``; the handler's own 4xx errors already are and pass untouched (a 503
  from the handler, such as an injected fault, is rewritten too: nginx cannot tell it from TorchServe's);
* every other ``/v2`` and ``/v1`` path (metadata, readiness, server metadata) goes to the gateway
  (``servekit.ops.oip``), which also serves gRPC.

``OipService`` starts the gateway (its pid file is checked before any signal, as for every process
of ours) and the front; ``TorchServeProcess`` starts and stops it with TorchServe.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from servekit.ops.nginx import NginxError, NginxInstance, config_head
from servekit.ops.processes import free_port, owned_pid, signal_if_matches
from servekit.ops.store import NAME_PATTERN, VERSION_PATTERN

DEFAULT_HTTP_PORT = 8000
DEFAULT_GRPC_PORT = 8001


class OipServiceError(NginxError):
    """The OIP front or gateway could not be started."""


def render_front_config(prefix: Path, listen: str, torchserve: str, gateway: str, tokens: bool = True) -> str:
    """The whole nginx.conf of the OIP front (see module docstring); ``tokens``: TorchServe checks tokens."""
    name, version = NAME_PATTERN, VERSION_PATTERN
    missing_token = (
        '            if ($http_authorization = "") {\n'
        '                return 401 \'{"error": "missing token: send Authorization: Bearer <inference key>"}\';\n'
        "            }\n"
    )
    oip_errors = (
        (missing_token if tokens else "")
        + "            proxy_intercept_errors on;\n"
        + "            error_page 404 = @not_found;\n"
        + "            error_page 503 = @unavailable;\n"
    )
    return f"""# Written by servekit.ops.oip_service: the Open Inference Protocol address (see that module).
{config_head(prefix, 1024)}    client_max_body_size 7m;
    client_body_buffer_size 7m;
    server_tokens off;
    access_log off;  # one line per inference would grow without bound (a pod's emptyDir); TorchServe logs requests
    upstream torchserve {{
        server {torchserve};
        keepalive 32;
    }}
    upstream gateway {{
        server {gateway};
        keepalive 8;
    }}
    server {{
        listen {listen};
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_read_timeout 120s;
        default_type application/json;
        location ~ "^/v2/models/(?<model>{name})/infer$" {{
{oip_errors}            proxy_pass http://torchserve;
        }}
        location ~ "^/v2/models/(?<model>{name})/versions/(?<version>{version})/infer$" {{
{oip_errors}            proxy_pass http://torchserve/predictions/$model/$version;
        }}
        location ~ "^/v1/models/(?<model>{name}):predict$" {{
{oip_errors}            proxy_pass http://torchserve;
        }}
        location @not_found {{
            return 404 '{{"error": "no model or version named in $uri is being served"}}';
        }}
        location @unavailable {{
            return 503 '{{"error": "the model cannot take this request now (no worker, or its queue is full)"}}';
        }}
        location = /metrics {{
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_pass http://gateway;
        }}
        location /v2 {{
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_pass http://gateway;
        }}
        location /v1 {{
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_pass http://gateway;
        }}
        location / {{
            return 404 '{{"error": "not an Open Inference Protocol or KServe v1 path"}}';
        }}
    }}
}}
"""


@dataclass
class OipFront(NginxInstance):
    listen: str = f"127.0.0.1:{DEFAULT_HTTP_PORT}"
    torchserve: str = "127.0.0.1:8080"
    gateway: str = "127.0.0.1:8002"
    tokens: bool = True  # False: TorchServe runs without token authorization (a bundle's pod)
    label = "the OIP front"
    error = OipServiceError

    def start(self, timeout: float = 10.0) -> None:
        self.refuse_if_running()
        self.install(render_front_config(self.prefix, self.listen, self.torchserve, self.gateway, self.tokens))
        self.launch(self.listen, timeout)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class OipService:
    """The gateway process and the nginx front, their files under ``prefix``."""

    prefix: Path
    inference_url: str
    management_url: str
    key_file: Path | None  # None: TorchServe runs without token authorization
    model_store: Path
    http_port: int = DEFAULT_HTTP_PORT
    grpc_port: int = DEFAULT_GRPC_PORT
    host: str = "127.0.0.1"  # where the front and gRPC listen ("0.0.0.0" in a pod)
    metrics_dir: Path | None = None  # the workers' PROMETHEUS_MULTIPROC_DIR: GET /metrics (servekit.ops.exporter)
    metrics_port: int | None = None  # also a listener on host:port with GET /metrics only (a pod's scrape port)

    def __post_init__(self) -> None:
        self.prefix = Path(self.prefix).resolve()

    @property
    def pid_file(self) -> Path:
        return self.prefix / "gateway.pid"

    @property
    def front(self) -> OipFront:
        return OipFront(
            self.prefix / "front",
            listen=f"{self.host}:{self.http_port}",
            torchserve=self.inference_url.split("://", 1)[-1],
            gateway=self._gateway_address(),
            tokens=self.key_file is not None,
        )

    def _gateway_address(self) -> str:
        path = self.prefix / "gateway.address"
        return path.read_text().strip() if path.is_file() else "127.0.0.1:1"

    def _fragments(self) -> tuple[str, ...]:
        return ("servekit.ops.oip", "--prefix", str(self.prefix))

    def running_pid(self) -> int | None:
        return owned_pid(self.pid_file, self._fragments())

    def start(self, timeout: float = 15.0) -> None:
        listeners = [("OIP HTTP", self.http_port), ("OIP gRPC", self.grpc_port)]
        if self.metrics_port is not None:
            listeners.append(("servekit metrics", self.metrics_port))
        for kind, port in listeners:
            if _listening(port):
                raise OipServiceError(f"port {port} ({kind}) is already in use: is another server running? (make stop)")
        self.prefix.mkdir(parents=True, exist_ok=True)
        internal = f"127.0.0.1:{free_port()}"
        (self.prefix / "gateway.address").write_text(internal)
        command = [
            sys.executable, "-m", "servekit.ops.oip", "--http", internal, "--grpc", f"{self.host}:{self.grpc_port}",
            "--inference", self.inference_url, "--management", self.management_url,
            "--model-store", str(self.model_store), "--prefix", str(self.prefix),
        ]  # fmt: skip
        if self.key_file is not None:
            command += ["--key-file", str(self.key_file)]
        if self.metrics_dir is not None:
            command += ["--metrics-dir", str(self.metrics_dir)]
        if self.metrics_port is not None:
            command += ["--metrics-listen", f"{self.host}:{self.metrics_port}"]
        log = open(self.prefix / "gateway.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                       cwd=Path(__file__).resolve().parents[2])  # fmt: skip
        finally:
            log.close()
        self.pid_file.write_text(str(process.pid))
        deadline = time.monotonic() + timeout
        port = int(internal.rsplit(":", 1)[1])
        while not (_listening(port) and _listening(self.grpc_port)
                   and (self.metrics_port is None or _listening(self.metrics_port))):  # fmt: skip
            if process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (self.prefix / "gateway.log").read_text(errors="replace")[-500:]
                raise OipServiceError(f"the OIP gateway did not start: {' '.join(tail.split())}")
            time.sleep(0.1)
        try:
            self.front.start()
        except NginxError:
            self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> None:
        self.front.stop()
        pid = self.running_pid()
        if pid is not None:
            signal_if_matches(pid, self._fragments(), signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.running_pid() == pid:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                time.sleep(0.1)
            if self.running_pid() == pid:
                signal_if_matches(pid, self._fragments(), signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
