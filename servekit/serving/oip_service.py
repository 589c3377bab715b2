"""Starting and stopping the OIP address beside a TorchServe: the nginx front and the gateway process.

``render_front_config`` is a pure function: on ``listen`` (8000 by default),

* ``POST /v2/models/NAME/infer`` and ``POST /v1/models/NAME:predict`` pass straight to TorchServe
  (nginx in C, so the protocol costs no Python hop on the data path), and so do their explanation
  forms ``POST /v2/models/NAME/explain`` and ``POST /v1/models/NAME:explain`` (``handlers.explain``);
  with a ``router`` (the canary/shadow proxy's address, ``servekit.deploy.proxy``) they go through it,
  so the deployment state's canary and shadow apply, and to TorchServe directly while it is stopped;
  the gateway sends gRPC inference to this front, so gRPC takes the same route;
* ``POST /v2/models/NAME/versions/V/infer`` goes to ``/predictions/NAME/V`` (TorchServe answers
  501 on its own versioned route; the handler reads the OIP body on any route);
* TorchServe's own 404 and 503 answers (no such model, queue full), which are not OIP-shaped, are
  rewritten to ``{"error": ...}``; the handler's own 4xx errors already are and pass untouched (a 503
  from the handler, such as an injected fault, is rewritten too: nginx cannot tell it from TorchServe's);
* every other ``/v2`` and ``/v1`` path (metadata, readiness, server metadata) goes to the gateway
  (``servekit.serving.oip``), which also serves gRPC;
* only POST reaches an inference location (any other method: 405 with ``Allow: POST``), with a body
  of at most TorchServe's ``max_request_size``, and at most ``CLIENT_LIMIT`` in progress per client
  address (beyond: 429);
* every answer nginx writes by itself (a bad request line, a header too large, a %00 in the path, a
  body too large, an upstream down...) is ``{"error": ...}`` JSON; HTTP/0.9 is closed unanswered;
* slow clients are bounded: short header, body, send and keep-alive timeouts, and enough connections
  (``WORKER_CONNECTIONS``) that a thousand idle sockets cannot crowd out the probes or inference.

With ``health`` it also listens there for ``GET /v2/health/live`` and ``/ready`` only (proxied to the
gateway, 404 JSON for anything else, limits of its own): a pod's probes, apart from the inference port.

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
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from servekit.serving.logkeeper import LogKeeperError, LogKeeperProcess
from servekit.serving.nginx import NginxError, NginxInstance, config_head
from servekit.serving.processes import free_port, owned_pid, signal_if_matches
from servekit.serving.router import router_address
from servekit.serving.store import NAME_PATTERN, VERSION_PATTERN
from servekit.serving.tracing import (
    SPAN_CONTEXT_MAPS,
    SPAN_LOG,
    SPAN_LOG_FORMAT,
    TRACE_CONTEXT_MAPS,
    TRACE_HEADERS,
)

DEFAULT_HTTP_PORT = 8000
DEFAULT_GRPC_PORT = 8001
# The front's limits. The benchmarks drive up to ~64 concurrent connections from one address (127.0.0.1)
# with `hey`; every number below leaves them at least 2x headroom, and none applies to a request that flows.
DEFAULT_MAX_BODY = 6_553_600  # TorchServe's max_request_size (config.properties): over it TorchServe answers an
# empty 413 itself, so the front refuses such a body first, with JSON, and TorchServe never sees one
WORKER_CONNECTIONS = 8192  # client and upstream connections of the one worker: 1,024 was exhausted by ~1,200 idle
# sockets; 8,192 costs a few MB and makes a starving attacker hold thousands, each for at most HEADER_TIMEOUT
RLIMIT_NOFILE = 16384  # two descriptors per proxied request (client + upstream); under this machine's hard 20,000
HEADER_TIMEOUT = "10s"  # the request line and headers must arrive within this (nginx's default: 60 s)
BODY_TIMEOUT = "10s"  # between two reads of a body, and between two writes of an answer (not the whole transfer)
KEEPALIVE_TIMEOUT = "15s"  # an idle keep-alive connection is closed after this (nginx's default: 75 s)
CLIENT_LIMIT = 128  # inference requests in progress per client address: 2x the benchmark's 64; the excess gets
# 429 at once instead of joining TorchServe's queue (job_queue_size 256), so one address cannot take all of it
HEALTH_CLIENT_LIMIT = 16  # probes in progress per address on the health port (a kubelet sends one at a time)
HEALTH_MAX_BODY = 1024  # bytes: a probe sends no body
HEALTH_TIMEOUT = "5s"  # header, body, send and keep-alive timeouts of the health port (a probe sends at once)
ROUTER_FAILS = 3  # failed connections to the routing plane (stopped) before the front bypasses it ...
ROUTER_RETRY = "5s"  # ... for this long (TorchServe directly), then tries it again
HEADER_BUFFERS = "4 8k"  # one header line (or the request line) over 8 KB: 431 (414); the whole header <= ~32 KB

# What the front itself answers for each status it can produce (every answer is {"error": ...} JSON).
_ERRORS = {
    400: "bad request: the request line, a header or the URL is malformed",
    401: "unauthorized",
    403: "forbidden",
    404: "not found",
    405: "method not allowed",
    408: "the request was not received in time",
    413: "the request body is over {max_body} bytes (the limit)",
    414: "the request line is over 8 KB (the limit)",
    429: "too many requests in progress from this client address (the limit is {limit}); retry later",
    431: "a request header line is over 8 KB, or all headers over 32 KB (the limits)",
    500: "internal error in the front",
    501: "not implemented: the method or transfer encoding is not supported",
    502: "the upstream server could not be reached",
    503: "the service is unavailable",
    504: "the upstream server did not answer in time",
    505: "HTTP version not supported: send HTTP/1.0 or 1.1",
}


class OipServiceError(NginxError):
    """The OIP front or gateway could not be started."""


# A chunked request's 400/413 from the handler, caught with nginx's own (see @torchserve_chunked).
_REFUSED_CHUNKED = "the model refused the request ({code}): send it with a Content-Length to read why"

ERROR_URI = "/_servekit/error"  # the front's own error answers, internal locations (never reachable from outside)


def _error_pages(indent: str, codes: Iterable[int] = _ERRORS) -> str:
    """``error_page`` lines sending each status nginx may produce by itself to its JSON answer."""
    lines = [f"{indent}error_page {code} = {ERROR_URI}/{code};\n" for code in codes]
    if 431 in codes:  # 494: nginx's own "request header too large" (a line over a buffer), answered as 431
        lines.append(f"{indent}error_page 494 = {ERROR_URI}/431;\n")
    return "".join(lines)


def _error_locations(max_body: int, client_limit: int, allow: str) -> str:
    """The internal locations answering ``{"error": ...}`` for each status of ``_ERRORS`` (``Content-Type``
    from the server's ``default_type``); ``allow``: the ``Allow`` header of nginx's own 405 (TRACE).

    URIs, not named locations: nginx refuses a named location for a request without a URI (a bad request
    line, one too long, a %00 in the path), and answers 500 instead.
    """
    blocks = []
    for code, message in _ERRORS.items():
        text = message.format(max_body=max_body, limit=client_limit)
        allow_header = f'                add_header Allow "{allow}" always;\n' if code == 405 else ""
        blocks.append(
            f"            location = {ERROR_URI}/{code} {{\n{allow_header}"
            f'                return {code} \'{{"error": "{text}"}}\';\n'
            "            }\n"
        )
    return (
        f"        location ^~ {ERROR_URI}/ {{\n"
        "            internal;\n"
        "            client_max_body_size 0;  # the request's own body is being discarded: not checked again\n"
        + "".join(blocks)
        + "        }\n"
    )


def render_front_config(
    prefix: Path,
    listen: str,
    torchserve: str,
    gateway: str,
    tokens: bool = True,
    *,
    health: str | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    client_limit: int = CLIENT_LIMIT,
    router: str | None = None,
    spans: bool = False,
) -> str:
    """The whole nginx.conf of the OIP front (see module docstring); ``tokens``: TorchServe checks tokens;
    ``health``: host:port of the health-only listener; ``max_body``: TorchServe's ``max_request_size``;
    ``router``: host:port or ``unix:PATH`` of the routing plane (the canary/shadow proxy), TorchServe itself while it
    is down."""
    name, version = NAME_PATTERN, VERSION_PATTERN
    missing_token = (
        '            if ($http_authorization = "") {\n'
        '                return 401 \'{"error": "missing token: send Authorization: Bearer <inference key>"}\';\n'
        "            }\n"
    )
    # An inference location only checks (method, token, body size on its Content-Length) and hands the request
    # to @torchserve (418, the server's error_page), which reads the body and proxies. Two locations because
    # error_page is per location and, with proxy_intercept_errors on, would catch TorchServe's answers too: here
    # every error of nginx's own is JSON, there only TorchServe's 404/503 (not OIP-shaped) are rewritten, so the
    # handler's own 400, 413 and 500 pass untouched. The hand-over is an internal redirect (no second
    # connection, no copy of the body).
    checks = (
        '            if ($request_method != "POST") {\n'
        "                add_header Allow POST always;\n"
        '                return 405 \'{"error": "method $request_method is not allowed here: send POST"}\';\n'
        "            }\n"
        + (missing_token if tokens else "")
        + "            if ($http_transfer_encoding) {\n"
        + "                return 419;\n"
        + "            }\n"
        + "            return 418;\n"
    )
    retry = "            proxy_next_upstream error non_idempotent;\n" if router is not None else ""
    proxied = (
        f"{retry}            limit_conn servekit_clients {client_limit};\n"
        "            proxy_intercept_errors on;\n"
        "            error_page 404 = @not_found;\n"
        "            error_page 503 = @unavailable;\n"
        f"{_error_pages('            ', (429, 502, 504))}"
    )
    health_zone = "    limit_conn_zone $binary_remote_addr zone=servekit_health:1m;\n" if health is not None else ""
    # Span export on: the front is a hop of its own (servekit.serving.tracing), one span-log line per inference.
    context_maps = SPAN_CONTEXT_MAPS + SPAN_LOG_FORMAT if spans else TRACE_CONTEXT_MAPS
    if spans:
        proxied += f"            access_log {Path(prefix).resolve() / SPAN_LOG} servekit_spans;\n"
    return f"""# Written by servekit.serving.oip_service: the Open Inference Protocol address (see that module).
{config_head(prefix, WORKER_CONNECTIONS, rlimit_nofile=RLIMIT_NOFILE)}    client_max_body_size {max_body};
    client_body_buffer_size {max_body};  # a body stays in memory, never in a temporary file
    server_tokens off;
    access_log off;  # one line per inference would grow without bound (a pod's emptyDir); TorchServe logs requests
    # Slow or idle clients must not hold connections: nginx's defaults (60 s header and body, 75 s keep-alive)
    # let ~1,200 sockets that send nothing starve the probes. A client that stops sending or reading for
    # these times is dropped, and reset (its buffers freed at once, no FIN_WAIT).
    client_header_timeout {HEADER_TIMEOUT};
    client_body_timeout {BODY_TIMEOUT};
    send_timeout {BODY_TIMEOUT};
    keepalive_timeout {KEEPALIVE_TIMEOUT};
    reset_timedout_connection on;
    large_client_header_buffers {HEADER_BUFFERS};
    # Inference requests in progress per client address (counted once its header is read), beyond: 429 JSON.
    limit_conn_zone $binary_remote_addr zone=servekit_clients:1m;
{health_zone}    limit_conn_status 429;
    limit_conn_log_level warn;
    # "GET /path" alone (HTTP/0.9): a URI and no protocol (a malformed request line has neither: it gets its 400).
    map "$server_protocol $request_uri" $servekit_http09 {{
        "~^ /" 1;
        default 0;
    }}
    # An inference location hands over to @torchserve through error_page; TorchServe's 404/503 there go
    # through error_page again.
    recursive_error_pages on;
{context_maps}    upstream torchserve {{
{_upstream_servers(torchserve, router)}        keepalive 32;
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
{TRACE_HEADERS}        default_type application/json;
        if ($servekit_http09) {{
            return 444;  # an HTTP/0.9 answer has no status line and no headers: close without one
        }}
        # Every status nginx writes by itself, here or before a location is chosen (bad request line, header
        # too large, %00 in the path, TRACE, an unknown Transfer-Encoding): {{"error": ...}} JSON.
{_error_pages("        ")}        error_page 418 = @torchserve;  # from the inference locations: checked, now proxy
        error_page 419 = @torchserve_chunked;
        location ~ "^/v2/models/(?<model>{name})/(?:infer|explain)$" {{
            set $servekit_uri $request_uri;
{checks}        }}
        location ~ "^/v2/models/(?<model>{name})/versions/(?<version>{version})/infer$" {{
            set $servekit_uri /predictions/$model/$version;
{checks}        }}
        location ~ "^/v1/models/(?<model>{name}):(?:predict|explain)$" {{
            set $servekit_uri $request_uri;
{checks}        }}
        location @torchserve {{
{proxied}            proxy_pass http://torchserve$servekit_uri;
        }}
        location @torchserve_chunked {{
            # A chunked body is read here, so its own 400 (malformed) and 413 (over the limit) must be JSON too:
            # they are caught with TorchServe's (then the handler's reason is lost; a Content-Length keeps it).
{proxied}            error_page 400 = @chunked_400;
            error_page 413 = @chunked_413;
            proxy_pass http://torchserve$servekit_uri;
        }}
        location @not_found {{
            return 404 '{{"error": "no model or version named in $uri is being served"}}';
        }}
        location @unavailable {{
            return 503 '{{"error": "the model cannot take this request now (no worker, or its queue is full)"}}';
        }}
        location @chunked_400 {{
            if ($upstream_status) {{
                return 400 '{{"error": "{_REFUSED_CHUNKED.format(code=400)}"}}';
            }}
            return 400 '{{"error": "the chunked request body is malformed"}}';
        }}
        location @chunked_413 {{
            if ($upstream_status) {{
                return 413 '{{"error": "{_REFUSED_CHUNKED.format(code=413)}"}}';
            }}
            return 413 '{{"error": "the request body is over {max_body} bytes (the limit)"}}';
        }}
{_error_locations(max_body, client_limit, "GET, POST")}        location = /metrics {{
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
{_health_server(health, HEALTH_CLIENT_LIMIT) if health is not None else ""}}}
"""


def default_router(workdir: Path) -> str:
    """make serve's router: the socket of ``servekit proxy``'s default folder (``WORKDIR/proxy``, servekit.cli),
    never its TCP port, which another program could hold while the proxy is stopped (servekit.deploy.proxy)."""
    return router_address(Path(workdir) / "proxy")


def _upstream_servers(torchserve: str, router: str | None) -> str:
    """Where inference goes: the routing plane when there is one (TorchServe is then its backup), else TorchServe.

    The routing plane (``servekit proxy start``, ``servekit.deploy.proxy``) applies the deployment state's
    canary and shadow to the OIP paths as to ``/predictions``. While it is stopped its port refuses
    connections and nginx passes the request to TorchServe; after ``ROUTER_FAILS`` such failures within
    ``ROUTER_RETRY`` it goes straight to TorchServe for that long, then tries the router again. A request
    whose connection to the router fails (a keep-alive connection closed by a reload) is passed to
    TorchServe too (``non_idempotent``: inference has no side effect), so no client sees the failure.
    """
    if router is None:
        return f"        server {torchserve};\n"
    return (
        f"        server {router} max_fails={ROUTER_FAILS} fail_timeout={ROUTER_RETRY};\n"
        f"        server {torchserve} backup;\n"
    )


def _health_server(listen: str, client_limit: int) -> str:
    """The health-only listener: GET /v2/health/live and /ready, proxied to the gateway; 404 JSON for the rest."""
    health = (
        '            if ($request_method != "GET") {\n'
        "                add_header Allow GET always;\n"
        '                return 405 \'{"error": "method $request_method is not allowed here: send GET"}\';\n'
        "            }\n"
        "            proxy_pass http://gateway;\n"
    )
    return f"""    server {{
        # The probes' own port: the inference port's clients cannot fill its requests (a limit of its own,
        # short timeouts); the connections are the worker's, sized for that (WORKER_CONNECTIONS).
        listen {listen};
        client_header_timeout {HEALTH_TIMEOUT};
        client_body_timeout {HEALTH_TIMEOUT};
        send_timeout {HEALTH_TIMEOUT};
        keepalive_timeout {HEALTH_TIMEOUT};
        client_max_body_size {HEALTH_MAX_BODY};  # a probe sends no body
        limit_conn servekit_health {client_limit};
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_pass_request_headers off;  # the gateway needs none of the probe's headers
        proxy_pass_request_body off;
        proxy_read_timeout {HEALTH_TIMEOUT};
        default_type application/json;
        if ($servekit_http09) {{
            return 444;
        }}
{_error_pages("        ")}        location = /v2/health/live {{
{health}        }}
        location = /v2/health/ready {{
{health}        }}
        location / {{
            return 404 '{{"error": "this port serves GET /v2/health/live and /v2/health/ready only"}}';
        }}
{_error_locations(HEALTH_MAX_BODY, client_limit, "GET")}    }}
"""


@dataclass
class OipFront(NginxInstance):
    listen: str = f"127.0.0.1:{DEFAULT_HTTP_PORT}"
    torchserve: str = "127.0.0.1:8080"
    gateway: str = "127.0.0.1:8002"
    tokens: bool = True  # False: TorchServe runs without token authorization (a bundle's pod)
    health_listen: str | None = None  # host:port of the health-only listener (a pod's probes), or none
    max_body: int = DEFAULT_MAX_BODY  # TorchServe's max_request_size
    router: str | None = None  # host:port of the routing plane (the proxy); None: straight to TorchServe
    spans: bool = False  # span export on: a span log of the front's own hop (servekit.serving.tracing)
    label = "the OIP front"
    error = OipServiceError

    def start(self, timeout: float = 10.0) -> None:
        self.refuse_if_running()
        self.install(
            render_front_config(
                self.prefix,
                self.listen,
                self.torchserve,
                self.gateway,
                self.tokens,
                health=self.health_listen,
                max_body=self.max_body,
                router=self.router,
                spans=self.spans,
            )
        )
        self.launch(self.listen, timeout)  # nginx binds every listener or none: the health one is up too


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
    metrics_dir: Path | None = None  # the workers' PROMETHEUS_MULTIPROC_DIR: GET /metrics (servekit.serving.exporter)
    metrics_port: int | None = None  # also a listener on host:port with GET /metrics only (a pod's scrape port)
    health_port: int | None = None  # also a front listener on host:port with GET /v2/health/live|ready only (probes)
    max_body: int = DEFAULT_MAX_BODY  # TorchServe's max_request_size: the front refuses larger bodies itself
    otlp_endpoint: str | None = None  # the gateway's spans go there (OTLP/HTTP); None: tracing off
    router: str | None = None  # host:port of the routing plane (servekit proxy): OIP HTTP and gRPC inference go
    # through it when it runs, so its canary and shadow apply to them (None: straight to TorchServe)

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
            health_listen=None if self.health_port is None else f"{self.host}:{self.health_port}",
            max_body=self.max_body,
            router=self.router,
            spans=bool(self.otlp_endpoint),
        )

    @property
    def front_url(self) -> str:
        """Where the gateway sends gRPC inference: the front, so it takes the same route as OIP HTTP."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.http_port}"

    def _gateway_address(self) -> str:
        path = self.prefix / "gateway.address"
        return path.read_text().strip() if path.is_file() else "127.0.0.1:1"

    def _fragments(self) -> tuple[str, ...]:
        return ("servekit.serving.oip", "--prefix", str(self.prefix))

    def running_pid(self) -> int | None:
        return owned_pid(self.pid_file, self._fragments())

    def start(self, timeout: float = 15.0) -> None:
        listeners = [("OIP HTTP", self.http_port), ("OIP gRPC", self.grpc_port)]
        if self.metrics_port is not None:
            listeners.append(("servekit metrics", self.metrics_port))
        if self.health_port is not None:
            listeners.append(("OIP health", self.health_port))
        for kind, port in listeners:
            if _listening(port):
                raise OipServiceError(f"port {port} ({kind}) is already in use: is another server running? (make stop)")
        self.prefix.mkdir(parents=True, exist_ok=True)
        internal = f"127.0.0.1:{free_port()}"
        (self.prefix / "gateway.address").write_text(internal)
        command = [
            sys.executable, "-m", "servekit.serving.oip", "--http", internal, "--grpc", f"{self.host}:{self.grpc_port}",
            "--inference", self.inference_url, "--management", self.management_url,
            "--model-store", str(self.model_store), "--prefix", str(self.prefix), "--router", self.front_url,
        ]  # fmt: skip
        if self.key_file is not None:
            command += ["--key-file", str(self.key_file)]
        if self.metrics_dir is not None:
            command += ["--metrics-dir", str(self.metrics_dir)]
        if self.otlp_endpoint:
            command += ["--otlp-endpoint", self.otlp_endpoint, "--span-log", str(self.prefix / "front" / SPAN_LOG)]
        if self.metrics_port is not None:
            command += ["--metrics-listen", f"{self.host}:{self.metrics_port}"]
        # The gateway writes its own log, rotated by size (gateway.log); its standard output and error go to
        # a start-up file emptied at each start: what a failing start said, read below.
        command += ["--log-file", str(self.prefix / "gateway.log")]
        startup = self.prefix / "gateway.start.log"
        log = open(startup, "wb")  # noqa: SIM115 - handed to the child
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
                tail = startup.read_text(errors="replace")[-500:]
                raise OipServiceError(f"the OIP gateway did not start: {' '.join(tail.split())}")
            time.sleep(0.1)
        try:
            self.front.start()
            if self.otlp_endpoint:
                self.span_log_keeper.start()  # the span log, bounded like the proxy's logs
        except (NginxError, LogKeeperError):
            self.stop()
            raise

    @property
    def span_log_keeper(self) -> LogKeeperProcess:
        """Rotates the front's span log by size (``servekit.serving.logkeeper``; the gateway reads across it)."""
        return LogKeeperProcess(self.prefix / "front", (self.prefix / "front" / SPAN_LOG,))

    def stop(self, timeout: float = 10.0) -> None:
        self.span_log_keeper.stop()
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
