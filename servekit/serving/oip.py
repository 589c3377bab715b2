"""The Open Inference Protocol address: what TorchServe's frontend lacks, served beside it.

The handler itself speaks OIP v2 and KServe v1 (``handlers.protocols``) on TorchServe's routes
``POST /v2/models/NAME/infer`` and ``POST /v1/models/NAME:predict``. What real clients also call,
TorchServe 0.12 does not give, or gives wrong:

* model metadata (``GET /v2/models/NAME``): not implemented; here generated from the archive's
  ``metadata.json`` (written by the build from the spec) and the registered versions;
* readiness: TorchServe's ``/v2/health/ready`` answers ready with no model loaded; here ready
  means a READY worker (server: every model's default version; model: that model or version);
* versioned routes (``/v2/models/NAME/versions/V/infer``): TorchServe answers 501; here they go
  to ``/predictions/NAME/V``, where the same handler answers;
* gRPC: TorchServe's OIP service is registered as ``org.pytorch.serve.grpc.openinference``, not
  the standard ``inference.GRPCInferenceService`` that clients call, and drops
  ``raw_input_contents`` (what ``tritonclient.grpc`` sends); here a standard service forwards each
  call to the HTTP route as a binary OIP request.

Two processes make one address (``make serve`` starts both, ``OipService``): an nginx front on
the OIP HTTP port (8000 by default, as Triton) that passes inference straight to TorchServe, and
this module's gateway for everything else plus the gRPC port (8001). Tokens: every call needs
TorchServe's inference key (``Authorization: Bearer``, gRPC metadata ``authorization``), except
``/v2/health/live`` and ``/v2/health/ready``, which say only yes or no (for probes), and
``GET /metrics`` (the handler metrics and serving state for Prometheus: ``servekit.serving.exporter``). Started without
``--key-file`` (TorchServe runs with token authorization off, as in a bundle's pod) it checks none.

What a caller cannot do through it:

* reach another TorchServe route: every model name and version (HTTP path, gRPC field, or a direct
  call to ``Gateway``) must match the store's grammar (``servekit.serving.store`` ``NAME_PATTERN`` /
  ``VERSION_PATTERN``) before any call to TorchServe is made; anything else is 400 /
  ``INVALID_ARGUMENT`` naming the field. An unexpected failure is 500 / ``INTERNAL`` with a generic
  message (the details go to the log), never gRPC's ``UNKNOWN`` with the exception's text;
* make TorchServe work per probe or scrape: ``/v2/health/ready``, gRPC ``ServerReady`` and
  ``GET /metrics`` read TorchServe's view (models, default versions, descriptions) from a cache of
  ``Gateway.view_ttl`` seconds (1 s), refreshed by one caller at a time while the others wait for
  its result; the draining file is still checked on every call;
* get an HTML error: every error the HTTP side writes, the ones ``http.server`` writes itself (bad
  request line, unknown method, too many headers) included, is ``{"error": ...}`` JSON;
* grow the log without bound: the process logs through ``logging`` into ``--log-file``, a rotating
  file of ``--log-max-bytes`` (5 MiB) with ``--log-backups`` (2) old files, and a client that goes
  away mid-answer costs one short line, not a traceback.

    python -m servekit.serving.oip --http 127.0.0.1:8002 --grpc 127.0.0.1:8001 \\
        --inference http://127.0.0.1:8080 --management http://127.0.0.1:8081 \\
        --key-file var/key_file.json --model-store model_store
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import json
import logging
import logging.handlers
import re
import signal
import struct
import sys
import threading
import time
import zipfile
from concurrent import futures
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

import servekit
from servekit.errors import ServekitError, one_line
from servekit.serving import exporter
from servekit.serving.client import TorchServeClient, TorchServeError
from servekit.serving.store import NAME_PATTERN, NAME_RE, VERSION_PATTERN, VERSION_RE, archive_name, version_key
from servekit.serving.tracing import (
    TRACEPARENT,
    GatewayTracer,
    SpanLogShipper,
    gateway_tracer,
    valid_traceparent,
)

logger = logging.getLogger(__name__)
BINARY_HEADER = "Inference-Header-Content-Length"
_MODEL = re.compile(rf"/v2/models/({NAME_PATTERN})(?:/versions/({VERSION_PATTERN}))?(/ready)?\Z")
_V1_MODEL = re.compile(rf"/v1/models/({NAME_PATTERN})\Z")
# OIP: "a 4xx status code indicating false" for readiness.
NOT_READY = HTTPStatus.BAD_REQUEST
# A client that hangs up before (or while) its answer is written: normal traffic, not an error.
CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)
INTERNAL_ERROR = "internal error in the OIP gateway (the details are in its log)"
LOG_MAX_BYTES = 5 << 20
LOG_BACKUPS = 2


class OipError(ServekitError):
    """A call the gateway answers with an error: ``status`` is its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:72]}... ({len(value) if isinstance(value, str) else '?'} characters)"


def check_model(name: object, version: object = None) -> None:
    """Refuse (400) a model name or version outside the store's grammar, so none reaches a URL."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise OipError(
            HTTPStatus.BAD_REQUEST,
            f"model name {_shown(name)} is not a valid model name: letters, digits, '_' and '-', "
            "starting with a letter, at most 64 characters",
        )
    if version is not None and (not isinstance(version, str) or not VERSION_RE.match(version)):
        raise OipError(
            HTTPStatus.BAD_REQUEST,
            f"model version {_shown(version)} is not a valid model version: one to three numbers joined by "
            "dots, such as 2.0, each of at most 9 digits (none for the default version)",
        )


@dataclass(frozen=True)
class ServingView:
    """TorchServe's view at one moment: per model, its default version and every version's description."""

    models: dict[str, tuple[str, list[dict]]]
    error: str | None  # TorchServe did not answer in full: why (``models`` is then empty)
    taken: float  # time.monotonic() when the reading ended


# ------------------------------------------------------------------------------------------ the logic
@dataclass
class Gateway:
    """Metadata, readiness and inference forwarding over one TorchServe (protocol-neutral)."""

    client: TorchServeClient
    model_store: Path
    draining_file: Path | None = None  # while it exists the server is not ready (``server.py run`` drains)
    tokens: bool = True  # False: TorchServe runs without token authorization, so neither does the gateway
    metrics_dir: Path | None = None  # the workers' PROMETHEUS_MULTIPROC_DIR (servekit.serving.exporter)
    view_ttl: float = 1.0  # seconds a reading of TorchServe's view serves readiness and /metrics (0: every call)
    tracer: GatewayTracer | None = None  # --otlp-endpoint: a span per gRPC inference (servekit.serving.tracing)
    router_url: str | None = None  # where inference goes (the OIP front: the routing plane's canary and shadow
    # apply); None: TorchServe's inference address itself
    _metadata: dict[tuple[str, float], dict] = field(default_factory=dict, repr=False)
    _local: threading.local = field(default_factory=threading.local, repr=False)
    _view: ServingView | None = field(default=None, repr=False)
    _view_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # -------------------------------------------------------------- tokens
    def check_token(self, authorization: str | None) -> None:
        """The caller must hold TorchServe's current inference key (unless token authorization is off)."""
        if not self.tokens:
            return
        try:
            expected = self.client.token("inference")
        except TorchServeError as exc:
            raise OipError(HTTPStatus.SERVICE_UNAVAILABLE, f"no inference key yet: {exc}") from None
        given = (authorization or "").strip()
        if given.lower().startswith("bearer "):
            given = given[7:].strip()
        if not given or not hmac.compare_digest(given.encode(), expected.encode()):
            raise OipError(
                HTTPStatus.UNAUTHORIZED,
                "missing or wrong token: send 'Authorization: Bearer <inference key>' "
                "(python -m servekit.serving.server key inference)",
            )

    # -------------------------------------------------------------- TorchServe's view
    def _describe(self, name: str, version: str) -> list[dict]:
        try:
            return self.client.describe(name, version, timeout=10)
        except TorchServeError as exc:
            if "not registered" in str(exc):
                raise OipError(HTTPStatus.NOT_FOUND, f"no model named {name!r} is registered") from None
            raise OipError(HTTPStatus.SERVICE_UNAVAILABLE, f"TorchServe did not answer: {exc}") from None
        except requests.RequestException as exc:
            raise OipError(HTTPStatus.SERVICE_UNAVAILABLE, f"TorchServe did not answer: {exc}") from None

    def _version(self, name: str, version: str | None) -> tuple[dict, list[dict]]:
        check_model(name, version)  # every per-model call (readiness, metadata) comes through here
        versions = self._describe(name, "all")
        if version is None:
            default = self._describe(name, "")[0].get("modelVersion")
            chosen = [v for v in versions if v.get("modelVersion") == default]
        else:
            chosen = [v for v in versions if v.get("modelVersion") == version]
        if not chosen:
            raise OipError(HTTPStatus.NOT_FOUND, f"model {name!r} has no version {version!r}")
        return chosen[0], versions

    @staticmethod
    def _ready(description: dict) -> bool:
        return any(w.get("status") == "READY" for w in description.get("workers", []))

    def live(self) -> bool:
        try:
            response = self.client.send("inference", "GET", "/ping", timeout=5)
        except (TorchServeError, requests.RequestException):
            return False
        return response.status_code in (200, 500)  # 500: up, but a model is not healthy

    def serving_view(self) -> ServingView:
        """TorchServe's view, read at most once per ``view_ttl`` whatever the number of callers.

        One caller reads while the others wait on the lock and take its reading (one in flight at a
        time, so a burst of probes or scrapes costs one round of management calls, not one each).
        A failed reading is kept for the same time: a TorchServe that does not answer is not asked again
        by every caller in turn.
        """
        asked = time.monotonic()
        view = self._view
        if view is not None and asked - view.taken < self.view_ttl:
            return view
        with self._view_lock:
            view = self._view
            if view is not None and (view.taken >= asked or time.monotonic() - view.taken < self.view_ttl):
                return view  # read while this caller waited
            view = self._view = self._read_view()
            return view

    def _read_view(self) -> ServingView:
        models: dict[str, tuple[str, list[dict]]] = {}
        try:
            for name in self.client.models():
                default = str(self.client.describe(name, "", timeout=10)[0].get("modelVersion"))
                models[name] = (default, self.client.describe(name, "all", timeout=10))
        except Exception as exc:  # noqa: BLE001 - whatever the failure, the view is incomplete: not ready, up 0
            if not isinstance(exc, (TorchServeError, requests.RequestException)):
                logger.warning("reading TorchServe's view failed", exc_info=True)
            return ServingView({}, one_line(exc), time.monotonic())
        return ServingView(models, None, time.monotonic())

    def server_ready(self) -> bool:
        """Every model's default version has a READY worker, and the server is not draining."""
        if self.draining_file is not None and self.draining_file.exists():
            return False  # checked on every call, never cached
        view = self.serving_view()
        if view.error is not None or not view.models:
            return False
        for default, versions in view.models.values():
            chosen = [v for v in versions if str(v.get("modelVersion")) == default]
            if not chosen or not self._ready(chosen[0]):
                return False
        return True

    def model_ready(self, name: str, version: str | None = None) -> bool:
        return self._ready(self._version(name, version)[0])

    # -------------------------------------------------------------- metadata
    def archive_metadata(self, mar_name: str) -> dict:
        path = (self.model_store / Path(mar_name).name).resolve()
        if path.parent != self.model_store.resolve() or not path.is_file():
            raise OipError(HTTPStatus.NOT_FOUND, f"archive {mar_name!r} is not in the model store")
        key = (str(path), path.stat().st_mtime)
        if key not in self._metadata:
            self._metadata[key] = read_archive_metadata(path)
        return self._metadata[key]

    def model_metadata(self, name: str, version: str | None = None) -> dict:
        chosen, versions = self._version(name, version)
        metadata = self.archive_metadata(str(chosen.get("modelUrl") or chosen.get("marName") or ""))
        oip = metadata.get("oip")
        if not oip:
            raise OipError(
                HTTPStatus.NOT_FOUND,
                f"{name} {chosen.get('modelVersion')}: the archive has no OIP metadata (rebuild it)",
            )
        registered = sorted((str(v.get("modelVersion")) for v in versions), key=version_key)
        return {**oip, "name": name, "versions": registered}

    @staticmethod
    def server_metadata() -> dict:
        return {"name": "servekit", "version": servekit.__version__, "extensions": ["binary_tensor_data"]}

    # -------------------------------------------------------------- inference
    def infer(self, name: str, version: str | None, body: bytes, headers: dict[str, str]) -> requests.Response:
        """POST one OIP request through the router (the OIP front), else to TorchServe (the versioned route
        goes to /predictions/NAME/V); without a version the deployment state's canary and shadow apply."""
        check_model(name, version)
        if self.router_url is not None:
            path = f"/v2/models/{name}/infer" if version is None else f"/v2/models/{name}/versions/{version}/infer"
            url = self.router_url.rstrip("/") + path
        else:
            path = f"/v2/models/{name}/infer" if version is None else f"/predictions/{name}/{version}"
            url = self.client.url("inference", path)
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        try:
            return session.post(url, data=body, headers=headers, timeout=120)
        except requests.RequestException as exc:
            raise OipError(HTTPStatus.SERVICE_UNAVAILABLE, f"TorchServe did not answer: {exc}") from None


def read_archive_metadata(path: Path) -> dict:
    """``metadata.json`` of a built archive (what the build recorded, the ``oip`` block included)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("metadata.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise OipError(HTTPStatus.INTERNAL_SERVER_ERROR, f"cannot read metadata.json in {path.name}: {exc}") from None


def store_metadata(store: Path, name: str, version: str | None = None) -> dict:
    """OIP metadata of a model as built in ``store`` (no server needed): ``version``, or the newest."""
    from servekit.serving.store import read_manifest, verify_archive

    built = [r for r in read_manifest(store)["archives"].values() if r.get("model") == name]
    versions = sorted((str(r.get("version")) for r in built), key=version_key)
    if not versions:
        raise OipError(HTTPStatus.NOT_FOUND, f"no archive of a model named {name!r} in {store} (make archive)")
    chosen = version or versions[-1]
    if chosen not in versions:
        raise OipError(HTTPStatus.NOT_FOUND, f"{name} has no built version {chosen!r} (built: {', '.join(versions)})")
    metadata = read_archive_metadata(verify_archive(store, archive_name(name, chosen)))
    if not metadata.get("oip"):
        raise OipError(HTTPStatus.NOT_FOUND, f"{name} {chosen}: the archive has no OIP metadata (rebuild it)")
    return {**metadata["oip"], "name": name, "versions": versions, "version": chosen}


def error_text(response: requests.Response) -> str:
    """The message of an error answer, whoever wrote it (the handler: ``error``; TorchServe: ``message``)."""
    try:
        document = response.json()
    except ValueError:
        return one_line(response.text)[:500] or f"HTTP {response.status_code}"
    if isinstance(document, dict):
        return str(document.get("error") or document.get("message") or document)[:1000]
    return str(document)[:1000]


# ------------------------------------------------------------------------------------------ HTTP
class _HttpHandler(BaseHTTPRequestHandler):
    gateway: Gateway
    server_version = "servekit-oip"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass  # one line per request would grow the log with the traffic

    def _send(self, status: int, document: dict | None = None, raw: bytes | None = None,
              content_type: str = "application/json") -> None:  # fmt: skip
        body = raw if raw is not None else json.dumps(document).encode() if document is not None else b""
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except CLIENT_GONE as exc:
            self.close_connection = True
            logger.info("%s went away before its answer was written (%s)", self.client_address[0], type(exc).__name__)

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":  # an answer without status line or headers: not for this gateway
            self.send_error(HTTPStatus.BAD_REQUEST, "HTTP/0.9 requests are not served: send HTTP/1.0 or 1.1")
            return False
        return True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Every error ``http.server`` answers by itself (bad request line, unknown method, too many headers,
        request line too long) as ``{"error": ...}`` JSON; the connection closes, since the request may
        not have been read in full (an unread body would be taken for the next request).

        An unknown method (PUT, DELETE, BREW...) keeps ``http.server``'s 501: RFC 9110 gives 501 to a method
        the server does not implement for any resource, and 405 to one a resource refuses, which must
        then list its ``Allow`` methods per path; this gateway implements GET and POST and nothing else.
        """
        short = self.responses.get(code, ("Error", ""))[0]
        text = one_line(message or short, 200)
        if code == HTTPStatus.NOT_IMPLEMENTED:
            text = f"method {one_line(self.command, 40)!r} is not supported: this gateway answers GET and POST"
        self.close_connection = True
        if self.request_version not in ("HTTP/1.0", "HTTP/1.1"):
            self.request_version = "HTTP/1.0"  # whatever the request line said, write a status line and headers
        self._send(code, {"error": text})

    def _route(self, method: str) -> None:
        try:
            self._answer(method)
        except Exception:  # noqa: BLE001 - a bug must cost one JSON 500, not an HTML page or a dropped connection
            logger.exception("answering %s %s failed", method, self.path[:200])
            self.close_connection = True
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": INTERNAL_ERROR})

    def _answer(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if method == "GET" and path in ("/v2/health/live", "/v2/health/ready"):
                ok = self.gateway.live() if path.endswith("live") else self.gateway.server_ready()
                key = "live" if path.endswith("live") else "ready"
                self._send(HTTPStatus.OK if ok else NOT_READY, {key: ok})
                return
            if method == "GET" and path == "/metrics":  # no token, like TorchServe's metrics port
                page = exporter.render(self.gateway, self.gateway.metrics_dir)
                self._send(HTTPStatus.OK, raw=page, content_type=exporter.CONTENT_TYPE)
                return
            self.gateway.check_token(self.headers.get("Authorization"))
            if method == "GET" and path == "/v2":
                self._send(HTTPStatus.OK, self.gateway.server_metadata())
            elif method == "GET" and (match := _MODEL.match(path)):
                name, version, ready = match.groups()
                if ready:
                    ok = self.gateway.model_ready(name, version)
                    self._send(HTTPStatus.OK if ok else NOT_READY, {"name": name, "ready": ok})
                else:
                    self._send(HTTPStatus.OK, self.gateway.model_metadata(name, version))
            elif method == "GET" and (match := _V1_MODEL.match(path)):
                name = match.group(1)
                self._send(HTTPStatus.OK, {"name": name, "ready": self.gateway.model_ready(name)})
            else:
                raise OipError(HTTPStatus.NOT_FOUND, f"no such OIP endpoint: {method} {path[:100]}")
        except OipError as exc:
            self._send(exc.status, {"error": str(exc)})

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        # A GET with a body: the body is never read, so the connection must not be reused (the
        # unread bytes would be taken for the next request on it).
        if self.headers.get("Content-Length", "0").strip() not in ("", "0") or self.headers.get("Transfer-Encoding"):
            self.close_connection = True
        self._route("GET")

    def do_POST(self) -> None:  # noqa: N802
        # Nothing here takes a body (inference goes from the front to TorchServe): answer, and close
        # the connection instead of reading a body of any size, so no unread byte is taken for the
        # next request on it.
        self.close_connection = True
        self._route("POST")


class _MetricsOnlyHandler(_HttpHandler):
    """The dedicated metrics listener (``--metrics-listen``, a pod's scrape port): ``GET /metrics`` only."""

    def _answer(self, method: str) -> None:
        if method == "GET" and self.path.split("?", 1)[0] == "/metrics":
            page = exporter.render(self.gateway, self.gateway.metrics_dir)
            self._send(HTTPStatus.OK, raw=page, content_type=exporter.CONTENT_TYPE)
        else:
            self._send(HTTPStatus.NOT_FOUND, {"error": "this port serves GET /metrics only"})


class GatewayHttpServer(ThreadingHTTPServer):
    """The gateway's HTTP listener: a client that hangs up is one short log line, anything else one logged error."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, CLIENT_GONE):
            logger.info("%s went away (%s)", client_address[0], type(exc).__name__)
        else:
            logger.error("unexpected error answering %s", client_address[0], exc_info=True)


def http_server(gateway: Gateway, listen: str, metrics_only: bool = False) -> GatewayHttpServer:
    host, port = listen.rsplit(":", 1)
    handler = type("OipHttpHandler", (_MetricsOnlyHandler if metrics_only else _HttpHandler,), {"gateway": gateway})
    return GatewayHttpServer((host, int(port)), handler)


# ------------------------------------------------------------------------------------------ gRPC
_GRPC_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
               413: "RESOURCE_EXHAUSTED", 415: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 501: "UNIMPLEMENTED",
               502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED", 507: "RESOURCE_EXHAUSTED"}  # fmt: skip


def grpc_server(gateway: Gateway, listen: str, workers: int = 8):
    """The standard ``inference.GRPCInferenceService`` on ``listen`` (message classes from tritonclient)."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    def abort(context: Any, status: int, message: str) -> None:
        context.abort(getattr(grpc.StatusCode, _GRPC_CODES.get(status, "INTERNAL")), message)

    def guarded(method):
        def call(self: Any, request: Any, context: Any) -> Any:
            try:
                if method.__name__ not in ("ServerLive", "ServerReady"):
                    metadata = dict(context.invocation_metadata())
                    gateway.check_token(metadata.get("authorization"))
                return method(self, request, context)
            except OipError as exc:
                abort(context, exc.status, str(exc))
            except Exception:  # noqa: BLE001 - never UNKNOWN with the exception's text: INTERNAL, details logged
                logger.exception("gRPC %s failed", method.__name__)
                context.abort(grpc.StatusCode.INTERNAL, INTERNAL_ERROR)

        call.__name__ = method.__name__
        return call

    def parameter_value(parameter: Any) -> Any:
        choice = parameter.WhichOneof("parameter_choice")
        return getattr(parameter, choice) if choice else None

    class Service(service_pb2_grpc.GRPCInferenceServiceServicer):
        @guarded
        def ServerLive(self, request, context):  # noqa: N802 - the protocol's names
            return service_pb2.ServerLiveResponse(live=gateway.live())

        @guarded
        def ServerReady(self, request, context):  # noqa: N802
            return service_pb2.ServerReadyResponse(ready=gateway.server_ready())

        @guarded
        def ModelReady(self, request, context):  # noqa: N802
            return service_pb2.ModelReadyResponse(ready=gateway.model_ready(request.name, request.version or None))

        @guarded
        def ServerMetadata(self, request, context):  # noqa: N802
            meta = gateway.server_metadata()
            return service_pb2.ServerMetadataResponse(
                name=meta["name"], version=meta["version"], extensions=meta["extensions"]
            )

        @guarded
        def ModelMetadata(self, request, context):  # noqa: N802
            meta = gateway.model_metadata(request.name, request.version or None)
            tensor = service_pb2.ModelMetadataResponse.TensorMetadata
            return service_pb2.ModelMetadataResponse(
                name=meta["name"],
                versions=meta["versions"],
                platform=meta.get("platform", ""),
                inputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["inputs"]],
                outputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["outputs"]],
            )

        @guarded
        def ModelInfer(self, request, context):  # noqa: N802
            body, header_length = grpc_request_to_http(request, parameter_value)
            headers = {BINARY_HEADER: str(header_length), "Content-Type": "application/octet-stream"}
            metadata = dict(context.invocation_metadata())
            if given := metadata.get("authorization", "").strip():
                headers["Authorization"] = given if given.lower().startswith("bearer ") else f"Bearer {given}"
            parent = valid_traceparent(metadata.get(TRACEPARENT))
            traced = (
                gateway.tracer.span("gateway ModelInfer", parent, **{"servekit.model": request.model_name})
                if gateway.tracer is not None
                else contextlib.nullcontext(parent)
            )
            with traced as sent:  # the trace context goes on to the front, the proxy, TorchServe and the worker
                if sent is not None:
                    headers["traceparent"] = sent
                response = gateway.infer(request.model_name, request.model_version or None, body, headers)
            if response.status_code != 200:
                raise OipError(response.status_code, error_text(response))
            return http_response_to_grpc(response, service_pb2)

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        options=[("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)],
    )
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Service(), server)
    if server.add_insecure_port(listen) == 0:
        raise ServekitError(f"cannot listen on {listen} for gRPC")
    return server


_CONTENTS = {"BYTES": "bytes_contents", "FP32": "fp32_contents", "INT64": "int64_contents"}


def bytes_elements(values: list[bytes]) -> bytes:
    """A BYTES tensor as raw data: per element a uint32 little-endian length, then the bytes."""
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def grpc_request_to_http(request: Any, parameter_value) -> tuple[bytes, int]:
    """A ``ModelInferRequest`` as an OIP binary HTTP body (JSON header + raw tensors) and its header length."""
    import numpy as np  # here, not at the top: the torch-free CLI imports this module and starts fast

    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise OipError(
            HTTPStatus.BAD_REQUEST,
            f"{len(request.raw_input_contents)} raw_input_contents for {len(request.inputs)} inputs",
        )
    inputs, blobs = [], []
    for i, tensor in enumerate(request.inputs):
        if request.raw_input_contents:
            raw = bytes(request.raw_input_contents[i])
        elif tensor.datatype == "BYTES":
            raw = bytes_elements(list(tensor.contents.bytes_contents))
        elif tensor.datatype == "FP32":
            raw = np.asarray(tensor.contents.fp32_contents, dtype="<f4").tobytes()
        else:
            raise OipError(HTTPStatus.BAD_REQUEST, f"input {tensor.name!r}: datatype {tensor.datatype!r} not accepted")
        entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        params = {k: parameter_value(v) for k, v in tensor.parameters.items()}
        entry["parameters"] = {**params, "binary_data_size": len(raw)}
        inputs.append(entry)
        blobs.append(raw)
    document: dict[str, Any] = {"inputs": inputs}
    if request.id:
        document["id"] = request.id
    params = {k: parameter_value(v) for k, v in request.parameters.items()}
    document["parameters"] = {**params, "binary_data_output": True}
    if request.outputs:
        document["outputs"] = [{"name": o.name, "parameters": {"binary_data": True}} for o in request.outputs]
    header = json.dumps(document).encode()
    return header + b"".join(blobs), len(header)


def http_response_to_grpc(response: requests.Response, service_pb2: Any) -> Any:
    """A binary (or JSON) OIP HTTP answer as a ``ModelInferResponse`` with ``raw_output_contents``."""
    import numpy as np

    body = response.content
    length = response.headers.get(BINARY_HEADER)
    header_length = int(length) if length is not None else len(body)
    document = json.loads(body[:header_length])
    tail, offset = body[header_length:], 0
    result = service_pb2.ModelInferResponse(
        model_name=document.get("model_name", ""), model_version=document.get("model_version", ""),
        id=document.get("id", ""),
    )  # fmt: skip
    for output in document.get("outputs", []):
        result.outputs.add(name=output["name"], datatype=output["datatype"], shape=output["shape"])
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            raw, offset = tail[offset : offset + size], offset + size
        elif output["datatype"] == "BYTES":
            raw = bytes_elements([str(v).encode() for v in output["data"]])
        else:
            raw = np.asarray(output["data"], dtype={"FP32": "<f4", "INT64": "<i8"}[output["datatype"]]).tobytes()
        result.raw_output_contents.append(raw)
    return result


# ------------------------------------------------------------------------------------------ the process
def log_handler(log_file: Path | None, max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS) -> logging.Handler:
    """The gateway's log: ``log_file`` rotated at ``max_bytes`` with ``backups`` old files, or standard error."""
    if log_file is None:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.handlers.RotatingFileHandler(log_file, maxBytes=max_bytes, backupCount=backups,
                                                       encoding="utf-8")  # fmt: skip
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


def configure_logging(handler: logging.Handler) -> None:
    """Send the root logger (grpc's loggers and warnings propagate to it) to ``handler`` alone (the process's own)."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("grpc").propagate = True
    logging.captureWarnings(True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The OIP gateway beside one TorchServe (see servekit/serving/oip.py).")
    parser.add_argument("--http", required=True, help="host:port for metadata and readiness (behind the nginx front)")
    parser.add_argument("--grpc", required=True, help="host:port of the inference.GRPCInferenceService")
    parser.add_argument("--inference", required=True)
    parser.add_argument("--management", required=True)
    parser.add_argument("--key-file", help="TorchServe's key_file.json; omit when token authorization is off")
    parser.add_argument("--model-store", required=True)
    parser.add_argument("--otlp-endpoint", help="OTLP/HTTP traces URL for the gateway's spans (default: no tracing)")
    parser.add_argument("--span-log", help="with --otlp-endpoint: the OIP front's span log, exported as its spans")
    parser.add_argument("--router", help="URL gRPC inference is sent to (the OIP front); default: --inference")
    parser.add_argument("--prefix", help="the service's directory (names this process for its pid file)")
    parser.add_argument("--metrics-dir", help="the workers' PROMETHEUS_MULTIPROC_DIR, served on GET /metrics")
    parser.add_argument("--metrics-listen", help="host:port serving GET /metrics only (a pod's scrape port)")
    parser.add_argument("--log-file", help="the gateway's log, rotated by size (default: standard error)")
    parser.add_argument("--log-max-bytes", type=int, default=LOG_MAX_BYTES, help="size at which --log-file rotates")
    parser.add_argument("--log-backups", type=int, default=LOG_BACKUPS, help="rotated files kept beside --log-file")
    args = parser.parse_args(argv)
    if args.log_max_bytes < 1024 or args.log_backups < 1:
        parser.error("--log-max-bytes must be at least 1024 and --log-backups at least 1 (the log must stay bounded)")
    configure_logging(log_handler(Path(args.log_file) if args.log_file else None, args.log_max_bytes, args.log_backups))
    key_file = Path(args.key_file) if args.key_file else None
    client = TorchServeClient(args.management, args.inference, key_file, timeout=10)
    draining = Path(args.prefix).parent / "draining" if args.prefix else None
    gateway = Gateway(client, Path(args.model_store), draining_file=draining, tokens=key_file is not None,
                      metrics_dir=Path(args.metrics_dir) if args.metrics_dir else None,
                      router_url=args.router, tracer=gateway_tracer(args.otlp_endpoint))  # fmt: skip
    http = http_server(gateway, args.http)
    grpc_srv = grpc_server(gateway, args.grpc)
    grpc_srv.start()
    shipper = None
    if gateway.tracer is not None and args.span_log:  # the front's own hop (servekit.serving.tracing)
        shipper = SpanLogShipper(Path(args.span_log), args.otlp_endpoint).start()
    scrape = http_server(gateway, args.metrics_listen, metrics_only=True) if args.metrics_listen else None
    if scrape is not None:
        threading.Thread(target=scrape.serve_forever, kwargs={"poll_interval": 0.5}, daemon=True).start()
    stopping = threading.Event()

    def stop(signum: int, frame: Any) -> None:
        stopping.set()
        threading.Thread(target=http.shutdown, daemon=True).start()
        if scrape is not None:
            threading.Thread(target=scrape.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"oip gateway: http {args.http}, grpc {args.grpc}", flush=True)  # to the start-up file
    logger.info("oip gateway: http %s, grpc %s", args.http, args.grpc)
    http.serve_forever(poll_interval=0.5)
    grpc_srv.stop(grace=2).wait(5)
    if shipper is not None:
        shipper.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
