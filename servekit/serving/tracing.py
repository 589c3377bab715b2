"""Trace context and spans of the operator side's hops: the OIP gateway's gRPC calls (OpenTelemetry, OTLP).

The nginx hops (OIP front, canary proxy) carry W3C ``traceparent`` through and start a trace for a
request without one (``TRACE_CONTEXT_MAPS``: its trace ID is nginx's ``$request_id``); they export no
span of their own (Debian's nginx has no OpenTelemetry module). The gateway reads ``traceparent`` from
the gRPC metadata and, with an OTLP endpoint configured (``servekit_otlp_endpoint`` in
config.properties, ``--otlp-endpoint``), exports a ``gateway ModelInfer`` span and passes its own
context on; without one it passes the caller's ``traceparent`` on unchanged and imports nothing of
OpenTelemetry. The workers' spans: ``handlers.tracing``.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
CONFIG_KEY = "servekit_otlp_endpoint"  # config.properties: the collector's OTLP/HTTP traces URL (off when absent)
WORKER_ENV = "SERVEKIT_OTLP_ENDPOINT"  # how the workers get it (handlers.tracing)
_TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}\Z")

# nginx (http level): ``$servekit_traceparent`` is the client's traceparent, or a new one (trace ID: $request_id,
# 32 hex digits; parent: its first 16) for a request without one. The inference locations send it on.
TRACE_CONTEXT_MAPS = (
    "    map $request_id $servekit_span_id {\n"
    '        "~^(?<first>[0-9a-f]{16})" $first;\n'
    "    }\n"
    "    map $http_traceparent $servekit_traceparent {\n"
    '        "" "00-${request_id}-${servekit_span_id}-01";\n'
    "        default $http_traceparent;\n"
    "    }\n"
)
# nginx (server level): the trace context and when this hop passed the request on (the worker's queue wait).
TRACE_HEADERS = (
    "        proxy_set_header traceparent $servekit_traceparent;\n"
    '        proxy_set_header X-Request-Start "t=${msec}";\n'
)


def valid_traceparent(value: str | None) -> str | None:
    value = (value or "").strip().lower()
    return value if _TRACEPARENT.match(value) else None


class GatewayTracer:
    """Spans for the gateway's calls, exported with OTLP/HTTP to ``endpoint``; ``None``-safe use via ``span``."""

    def __init__(self, endpoint: str) -> None:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = TracerProvider(resource=Resource.create({"service.name": "servekit-gateway"}))
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        self.tracer = self.provider.get_tracer("servekit.serving")
        self._trace, self._propagator = trace, TraceContextTextMapPropagator()

    @contextlib.contextmanager
    def span(self, name: str, parent: str | None, **attributes: Any) -> Iterator[str]:
        """A server span child of ``parent`` (a traceparent; none: a new trace); yields the traceparent to send on."""
        context = self._propagator.extract({TRACEPARENT: parent}) if parent else None
        with self.tracer.start_as_current_span(name, context=context, kind=self._trace.SpanKind.SERVER,
                                               attributes=attributes) as span:  # fmt: skip
            carrier: dict[str, str] = {}
            self._propagator.inject(carrier, context=self._trace.set_span_in_context(span))
            yield carrier[TRACEPARENT]

    def shutdown(self) -> None:
        self.provider.shutdown()


def gateway_tracer(endpoint: str | None) -> GatewayTracer | None:
    if not endpoint:
        return None
    try:
        return GatewayTracer(endpoint)
    except ImportError as exc:
        logger.warning("--otlp-endpoint given but OpenTelemetry is not installed (%s): no traces", exc)
        return None
