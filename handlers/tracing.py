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
  ``inference`` and ``postprocess`` (the last two are the batch's, shared by its requests), exported
  with OTLP over HTTP to that address by a background thread (``BatchSpanProcessor``).

Off (the default), nothing of OpenTelemetry is imported and a request costs one ``None`` check; the
spans are built after the batch from timestamps the handler takes anyway, never on the inference path.
"""

from __future__ import annotations

import logging
import os
import re
import time
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


class Tracer:
    """Spans for finished requests, exported with OTLP/HTTP to ``endpoint`` (``.../v1/traces``)."""

    def __init__(self, endpoint: str, service: str, model: str, version: str) -> None:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        resource = Resource.create({"service.name": service, "servekit.model": model, "servekit.version": version})
        self.provider = TracerProvider(resource=resource)
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        self.tracer = self.provider.get_tracer("servekit.handlers")
        self._trace, self._propagator = trace, TraceContextTextMapPropagator()
        self.attributes = {"servekit.model": model, "servekit.version": version}

    def request(self, parent: str | None, begun_ns: int, ended_ns: int, stages: list[tuple[str, int, int]],
                **attributes: Any) -> str:  # fmt: skip
        """One request's ``worker`` span and its stage spans ((name, start ns, end ns), epoch); its trace ID."""
        context = self._propagator.extract({TRACEPARENT: parent}) if parent else None
        kind = self._trace.SpanKind.SERVER
        span = self.tracer.start_span("worker", context=context, kind=kind, start_time=begun_ns,
                                      attributes={**self.attributes, **attributes})  # fmt: skip
        inside = self._trace.set_span_in_context(span)
        for name, start, end in stages:
            self.tracer.start_span(name, context=inside, start_time=start).end(end_time=max(start, end))
        span.end(end_time=max(begun_ns, ended_ns))
        return format(span.get_span_context().trace_id, "032x")

    def shutdown(self) -> None:
        self.provider.shutdown()


def tracer_from_env(model: str, version: str, environ: dict[str, str] | None = None) -> Tracer | None:
    """A ``Tracer`` when ``SERVEKIT_OTLP_ENDPOINT`` is set, else None (tracing off: nothing imported)."""
    endpoint = (environ if environ is not None else os.environ).get(ENDPOINT_ENV, "").strip()
    if not endpoint:
        return None
    try:
        return Tracer(endpoint, "servekit-worker", model, version)
    except ImportError as exc:  # the option is set but the package is missing: say so once, serve anyway
        logger.warning("%s is set but OpenTelemetry is not installed (%s): no traces", ENDPOINT_ENV, exc)
        return None


def epoch_ns(perf: float, offset: float) -> int:
    """A ``time.perf_counter()`` reading as epoch nanoseconds, ``offset`` = ``time.time() - time.perf_counter()``."""
    return int((perf + offset) * 1e9)


def clock_offset() -> float:
    return time.time() - time.perf_counter()
