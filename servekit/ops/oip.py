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
``GET /metrics`` (the handler metrics and serving state for Prometheus: ``servekit.ops.exporter``). Started without
``--key-file`` (TorchServe runs with token authorization off, as in a bundle's pod) it checks none.

    python -m servekit.ops.oip --http 127.0.0.1:8002 --grpc 127.0.0.1:8001 \\
        --inference http://127.0.0.1:8080 --management http://127.0.0.1:8081 \\
        --key-file var/key_file.json --model-store model_store
"""

from __future__ import annotations

import argparse
import hmac
import json
import re
import signal
import struct
import sys
import threading
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
from servekit.ops import exporter
from servekit.ops.client import TorchServeClient, TorchServeError
from servekit.ops.state import version_key
from servekit.ops.store import NAME_PATTERN, VERSION_PATTERN

BINARY_HEADER = "Inference-Header-Content-Length"
_MODEL = re.compile(rf"/v2/models/({NAME_PATTERN})(?:/versions/({VERSION_PATTERN}))?(/ready)?\Z")
_V1_MODEL = re.compile(rf"/v1/models/({NAME_PATTERN})\Z")
# OIP: "a 4xx status code indicating false" for readiness.
NOT_READY = HTTPStatus.BAD_REQUEST


class OipError(ServekitError):
    """A call the gateway answers with an error: ``status`` is its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------------------ the logic
@dataclass
class Gateway:
    """Metadata, readiness and inference forwarding over one TorchServe (protocol-neutral)."""

    client: TorchServeClient
    model_store: Path
    draining_file: Path | None = None  # while it exists the server is not ready (``server.py run`` drains)
    tokens: bool = True  # False: TorchServe runs without token authorization, so neither does the gateway
    metrics_dir: Path | None = None  # the workers' PROMETHEUS_MULTIPROC_DIR (servekit.ops.exporter)
    _metadata: dict[tuple[str, float], dict] = field(default_factory=dict, repr=False)
    _local: threading.local = field(default_factory=threading.local, repr=False)

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
                "(python -m servekit.ops.server key inference)",
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

    def server_ready(self) -> bool:
        if self.draining_file is not None and self.draining_file.exists():
            return False
        try:
            models = self.client.models()
            return bool(models) and all(self._ready(self._version(name, None)[0]) for name in models)
        except (OipError, TorchServeError, requests.RequestException):
            return False

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
        """POST one OIP request to TorchServe (the versioned route goes to /predictions/NAME/V)."""
        path = f"/v2/models/{name}/infer" if version is None else f"/predictions/{name}/{version}"
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        try:
            return session.post(self.client.url("inference", path), data=body, headers=headers, timeout=120)
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
    from servekit.ops.store import archive_name, read_manifest, verify_archive

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
        pass

    def _send(self, status: int, document: dict | None = None, raw: bytes | None = None,
              content_type: str = "application/json") -> None:  # fmt: skip
        body = raw if raw is not None else json.dumps(document).encode() if document is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _route(self, method: str) -> None:
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

    def _route(self, method: str) -> None:
        if method == "GET" and self.path.split("?", 1)[0] == "/metrics":
            page = exporter.render(self.gateway, self.gateway.metrics_dir)
            self._send(HTTPStatus.OK, raw=page, content_type=exporter.CONTENT_TYPE)
        else:
            self._send(HTTPStatus.NOT_FOUND, {"error": "this port serves GET /metrics only"})


def http_server(gateway: Gateway, listen: str, metrics_only: bool = False) -> ThreadingHTTPServer:
    host, port = listen.rsplit(":", 1)
    handler = type("OipHttpHandler", (_MetricsOnlyHandler if metrics_only else _HttpHandler,), {"gateway": gateway})
    server = ThreadingHTTPServer((host, int(port)), handler)
    server.daemon_threads = True
    return server


# ------------------------------------------------------------------------------------------ gRPC
_GRPC_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
               413: "RESOURCE_EXHAUSTED", 415: "INVALID_ARGUMENT", 501: "UNIMPLEMENTED", 503: "UNAVAILABLE",
               507: "RESOURCE_EXHAUSTED"}  # fmt: skip


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
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The OIP gateway beside one TorchServe (see servekit/ops/oip.py).")
    parser.add_argument("--http", required=True, help="host:port for metadata and readiness (behind the nginx front)")
    parser.add_argument("--grpc", required=True, help="host:port of the inference.GRPCInferenceService")
    parser.add_argument("--inference", required=True)
    parser.add_argument("--management", required=True)
    parser.add_argument("--key-file", help="TorchServe's key_file.json; omit when token authorization is off")
    parser.add_argument("--model-store", required=True)
    parser.add_argument("--prefix", help="the service's directory (names this process for its pid file)")
    parser.add_argument("--metrics-dir", help="the workers' PROMETHEUS_MULTIPROC_DIR, served on GET /metrics")
    parser.add_argument("--metrics-listen", help="host:port serving GET /metrics only (a pod's scrape port)")
    args = parser.parse_args(argv)
    key_file = Path(args.key_file) if args.key_file else None
    client = TorchServeClient(args.management, args.inference, key_file, timeout=10)
    draining = Path(args.prefix).parent / "draining" if args.prefix else None
    gateway = Gateway(client, Path(args.model_store), draining_file=draining, tokens=key_file is not None,
                      metrics_dir=Path(args.metrics_dir) if args.metrics_dir else None)  # fmt: skip
    http = http_server(gateway, args.http)
    grpc_srv = grpc_server(gateway, args.grpc)
    grpc_srv.start()
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
    print(f"oip gateway: http {args.http}, grpc {args.grpc}", flush=True)
    http.serve_forever(poll_interval=0.5)
    grpc_srv.stop(grace=2).wait(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
