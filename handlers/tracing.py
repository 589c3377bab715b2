"""Where one request's time went, per request: the queue wait, and trace spans for each stage (OpenTelemetry).

Two inputs come with each request's HTTP headers (TorchServe hands them to the handler):

* ``X-Request-Start: t=<epoch seconds>``: when the nearest nginx (the OIP front or the canary proxy)
  passed the request on to TorchServe. The time from then to the batch's start in this worker is the
  request's queue wait: TorchServe's frontend, its job queue and the batch delay (Triton's
  ``nv_inference_queue_duration_us``, per request). It becomes ``servekit_queue_seconds`` per model
  and version (``handlers.metrics``); a request without the header (straight to TorchServe) has none.
* ``traceparent`` (W3C trace context): the caller's trace. With ``SERVEKIT_OTLP_ENDPOINT`` set in
  the worker's environment (``servekit_otlp_endpoint`` in config.properties, see
  ``servekit.serving.server``), every request gets a ``worker`` span, a child of the caller's span
  (a new trace without one), with a child per stage: ``queue``, ``decode``, ``preprocess``,
  ``inference`` and ``postprocess`` (the last two are the batch's, shared by its requests), encoded as
  OTLP protobuf here (``encode_span``: no OpenTelemetry package in the worker) and posted to that
  address (OTLP over HTTP) by a background thread.

Off (the default), no thread runs and a request costs two ``None`` checks; the spans are built after
the batch from timestamps the handler takes anyway, never on the inference path.
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
import time
import urllib.request
from typing import Any

logger = logging.getLogger(__name__)

ENDPOINT_ENV = "SERVEKIT_OTLP_ENDPOINT"
REQUEST_START = "x-request-start"
TRACEPARENT = "traceparent"
_TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}\Z")
_START = re.compile(r"t=(\d{9,10}(?:\.\d{1,6})?)\Z")
MAX_QUEUE_SECONDS = 3600.0  # a header older than this (a clock jump, a forged header) is ignored


def queue_seconds(headers: dict[str, str], started_epoch: float) -> float | None:
    """The queue wait of one request: from its ``X-Request-Start`` to ``started_epoch``; None without one."""
    match = _START.match((headers.get(REQUEST_START) or "").strip())
    if match is None:
        return None
    waited = started_epoch - float(match.group(1))
    return max(0.0, waited) if waited < MAX_QUEUE_SECONDS else None


def traceparent(headers: dict[str, str]) -> str | None:
    """The request's W3C ``traceparent`` when it is well formed (version 00), else None (a new trace)."""
    value = (headers.get(TRACEPARENT) or "").strip().lower()
    return value if _TRACEPARENT.match(value) and value[3:35] != "0" * 32 and value[36:52] != "0" * 16 else None


# ---------------------------------------------------------------------------------- OTLP, encoded by hand
# A worker's spans have one fixed shape, so they are written in protobuf's wire format here (OTLP's
# ``ExportTraceServiceRequest``: opentelemetry-proto's trace.proto and common.proto field numbers) and
# posted by one thread. Through the SDK (live spans, then its encoder) the six spans of a request cost a
# worker about 380 µs of CPU, 150 µs of it on the request's own thread; written here, about 55 µs, 2-3 µs
# of it on the request's thread (Intel Xeon, 2026-12-06). tests/unit/test_tracing.py decodes them with
# OTLP's own protobuf classes.
SPAN_KIND_INTERNAL, SPAN_KIND_SERVER = 1, 2
MAX_QUEUED_SPANS = 20_000  # beyond this (a collector down for minutes) spans are dropped and counted


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, data: bytes) -> bytes:
    """A length-delimited field (bytes, string, message)."""
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _fixed64(number: int, value: int) -> bytes:
    return _varint(number << 3 | 1) + value.to_bytes(8, "little")


def _number(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value & 0xFFFFFFFFFFFFFFFF)  # int64 as two's complement


def _attribute(key: str, value: Any) -> bytes:
    """A ``KeyValue``: strings, booleans and integers (``AnyValue`` fields 1, 2, 3), anything else as its text."""
    if isinstance(value, bool):
        any_value = _number(2, int(value))
    elif isinstance(value, int):
        any_value = _number(3, value)
    else:
        any_value = _field(1, str(value).encode())
    return _field(1, key.encode()) + _field(2, any_value)


def encode_span(trace_id: bytes, span_id: bytes, parent_id: bytes | None, name: str, kind: int, start_ns: int,
                end_ns: int, attributes: bytes = b"") -> bytes:  # fmt: skip
    """One OTLP ``Span`` message (``attributes``: its ``KeyValue`` fields, already encoded)."""
    return (
        _field(1, trace_id) + _field(2, span_id) + (_field(4, parent_id) if parent_id else b"")
        + _field(5, name.encode()) + _number(6, kind) + _fixed64(7, start_ns) + _fixed64(8, end_ns) + attributes
    )  # fmt: skip


def encode_request(resource: dict[str, Any], scope: str, spans: list[bytes]) -> bytes:
    """An ``ExportTraceServiceRequest`` of ``spans`` (encoded ``Span`` messages) from one resource and scope."""
    encoded_resource = b"".join(_field(1, _attribute(key, value)) for key, value in resource.items())
    scope_spans = _field(1, _field(1, scope.encode())) + b"".join(_field(2, span) for span in spans)
    return _field(1, _field(1, encoded_resource) + _field(2, scope_spans))


class Tracer:
    """Spans for finished requests, exported with OTLP/HTTP (protobuf) to ``endpoint`` (``.../v1/traces``).

    A request queues the timestamps the handler took; a thread encodes its spans and posts what is
    queued every ``interval`` seconds. A failed export is logged (once a minute at most)
    and its spans dropped: tracing never holds a request up or grows the worker without bound.
    """

    def __init__(self, endpoint: str, service: str, model: str, version: str, interval: float = 1.0) -> None:
        self.endpoint = endpoint
        self.resource = {"service.name": service, "servekit.model": model, "servekit.version": version}
        self.attributes = b"".join(_field(9, _attribute(k, v)) for k, v in (("servekit.model", model),
                                                                           ("servekit.version", version)))  # fmt: skip
        self.interval = interval
        self.exported = self.dropped = 0
        self._queued: list[tuple] = []  # per request: what _encode needs
        self._count = 0  # spans queued
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._warned = 0.0
        self._thread = threading.Thread(target=self._run, name="servekit-spans", daemon=True)
        self._thread.start()

    def request(self, parent: str | None, begun_ns: int, ended_ns: int, stages: list[tuple[str, int, int]],
                **attributes: Any) -> str:  # fmt: skip
        """One request's ``worker`` span and its stage spans ((name, start ns, end ns), epoch); its trace ID.

        ``parent``: a checked ``traceparent`` (``traceparent``) whose span is the worker's parent; None
        starts a new trace."""
        if parent:
            trace_hex, caller = parent[3:35], bytes.fromhex(parent[36:52])
        else:
            trace_hex, caller = format(random.getrandbits(128) or 1, "032x"), None
        with self._lock:  # encoded by the export thread: the request path only queues its timestamps
            if self._count + 1 + len(stages) <= MAX_QUEUED_SPANS:
                self._queued.append((trace_hex, caller, begun_ns, ended_ns, stages, attributes))
                self._count += 1 + len(stages)
            else:
                self.dropped += 1 + len(stages)
        return trace_hex

    def _encode(self, trace_hex: str, caller: bytes | None, begun_ns: int, ended_ns: int,
                stages: list[tuple[str, int, int]], attributes: dict[str, Any]) -> list[bytes]:  # fmt: skip
        trace_id, worker = bytes.fromhex(trace_hex), (random.getrandbits(64) or 1).to_bytes(8, "big")
        extra = b"".join(_field(9, _attribute(key, value)) for key, value in attributes.items())
        spans = [encode_span(trace_id, worker, caller, "worker", SPAN_KIND_SERVER, begun_ns, max(begun_ns, ended_ns),
                             self.attributes + extra)]  # fmt: skip
        for name, start, end in stages:
            own = (random.getrandbits(64) or 1).to_bytes(8, "big")
            spans.append(encode_span(trace_id, own, worker, name, SPAN_KIND_INTERNAL, start, max(start, end)))
        return spans

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()

    def flush(self) -> int:
        """Post what is queued; the number of spans exported."""
        with self._lock:
            requests, self._queued, self._count = self._queued, [], 0
        if not requests:
            return 0
        spans = [span for request in requests for span in self._encode(*request)]
        body = encode_request(self.resource, "servekit.handlers", spans)
        request = urllib.request.Request(self.endpoint, data=body, method="POST",
                                         headers={"Content-Type": "application/x-protobuf"})  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 - the configured collector
                answer.read()
        except (OSError, ValueError) as exc:
            self.dropped += len(spans)
            if time.monotonic() - self._warned > 60:
                self._warned = time.monotonic()
                logger.warning("span export to %s failed (%s): %d spans dropped so far", self.endpoint, exc,
                               self.dropped)  # fmt: skip
            return 0
        self.exported += len(spans)
        return len(spans)

    def shutdown(self) -> None:
        """Stop the thread and post what is left."""
        self._stop.set()
        self._thread.join(timeout=15)
        self.flush()


def tracer_from_env(model: str, version: str, environ: dict[str, str] | None = None) -> Tracer | None:
    """A ``Tracer`` when ``SERVEKIT_OTLP_ENDPOINT`` is set, else None (tracing off: nothing imported)."""
    endpoint = (environ if environ is not None else os.environ).get(ENDPOINT_ENV, "").strip()
    if not endpoint:
        return None
    return Tracer(endpoint, "servekit-worker", model, version)


def epoch_ns(perf: float, offset: float) -> int:
    """A ``time.perf_counter()`` reading as epoch nanoseconds, ``offset`` = ``time.time() - time.perf_counter()``."""
    return int((perf + offset) * 1e9)


def clock_offset() -> float:
    return time.time() - time.perf_counter()
