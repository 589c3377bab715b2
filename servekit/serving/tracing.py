"""Trace context and spans of the operator side's hops: the OIP gateway's gRPC calls and the nginx hops (OTLP).

The nginx hops (OIP front, canary proxy) carry W3C ``traceparent`` through and start a trace for a
request without one (``TRACE_CONTEXT_MAPS``: its trace ID is nginx's ``$request_id``). Debian's nginx
has no OpenTelemetry module, so with span export on each nginx hop is a hop of its own another way
(``span_context_maps``, ``span_log_format``): it sends its own span ID (the last 16 digits of its
``$request_id``) on as the parent and writes one JSON line per request (trace, span and parent IDs,
end time, duration, status, and the hop's own fields) to a span log, which ``SpanLogShipper`` turns
into that hop's spans (``SpanHop``: name, service, scope, version attributes) and exports. The OIP
front's ``front`` spans (``FRONT_HOP``, service ``servekit-front``) are shipped by the gateway; the
canary proxy's ``proxy`` spans (``PROXY_HOP``, service ``servekit-proxy``, with the version its
split chose and the version that answered) by a shipper process started with the proxy
(``servekit.serving.span_shipper``). Without span export the front uses ``TRACE_CONTEXT_MAPS`` and
the proxy passes the incoming context through untouched, and neither writes a span log. The gateway
reads ``traceparent`` from the gRPC metadata and, with an OTLP endpoint configured
(``servekit_otlp_endpoint`` in config.properties, ``--otlp-endpoint``), exports a ``gateway
ModelInfer`` span and passes its own context on; without one it passes the caller's ``traceparent``
on unchanged and imports nothing of OpenTelemetry. The workers' spans: ``handlers.tracing``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
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


# With span export on, instead of TRACE_CONTEXT_MAPS: the trace ID is the client's (or a new one from
# $request_id), the parent the client's span (none: this hop's span is the trace's root), the hop's own span
# ID the last 16 digits of $request_id, and what goes on is the hop's span as the parent. ``var`` prefixes every
# variable it defines ($VAR_trace_id, $VAR_parent_id, $VAR_own_span, $VAR_traceparent, and the regex captures
# $VAR_tid, $VAR_pid, $VAR_last): a hop picks one that none of its own variables can take.
def span_context_maps(var: str = "servekit") -> str:
    """The http-level maps of a hop with a span of its own (see above)."""
    return (
        f"    map $http_traceparent ${var}_trace_id {{\n"
        f'        "~^00-(?<{var}_tid>[0-9a-f]{{32}})-[0-9a-f]{{16}}-[0-9a-f]{{2}}$" ${var}_tid;\n'
        "        default $request_id;\n"
        "    }\n"
        f"    map $http_traceparent ${var}_parent_id {{\n"
        f'        "~^00-[0-9a-f]{{32}}-(?<{var}_pid>[0-9a-f]{{16}})-[0-9a-f]{{2}}$" ${var}_pid;\n'
        '        default "";\n'
        "    }\n"
        f"    map $request_id ${var}_own_span {{\n"
        f'        "~(?<{var}_last>[0-9a-f]{{16}})$" ${var}_last;\n'
        "    }\n"
        f"    map $request_id ${var}_traceparent {{\n"
        f'        default "00-${{{var}_trace_id}}-${{{var}_own_span}}-01";\n'
        "    }\n"
    )


def span_log_format(name: str = "servekit_spans", var: str = "servekit", fields: dict[str, str] | None = None) -> str:
    """The ``log_format`` ``name`` of a hop's span log: one JSON line per request (IDs from ``span_context_maps(var)``),
    and ``fields`` (JSON name: nginx variable, logged as strings) after the common ones."""
    extra = "".join(f',"{key}":"{value}"' for key, value in (fields or {}).items())
    return (
        f"    log_format {name} escape=json\n"
        f'        \'{{"trace":"${var}_trace_id","span":"${var}_own_span","parent":"${var}_parent_id",\'\n'
        '        \'"end":$msec,"seconds":$request_time,"status":$status,"method":"$request_method","uri":"$uri",\'\n'
        f'        \'"upstream_seconds":"$upstream_response_time"{extra}}}\';\n'
    )


SPAN_CONTEXT_MAPS = span_context_maps()  # the OIP front's
# One JSON line per request that passes the front (http level; its access_log is in the proxying locations).
SPAN_LOG_FORMAT = span_log_format()
SPAN_LOG = "spans.jsonl"  # under the hop's nginx prefix (the front's, the proxy's)


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


# ------------------------------------------------------------------------------------------ the nginx hops' spans
_HEX16, _HEX32 = re.compile(r"[0-9a-f]{16}\Z"), re.compile(r"[0-9a-f]{32}\Z")


@dataclass(frozen=True)
class SpanHop:
    """An nginx hop whose span log becomes spans: the spans' name, their ``service.name`` and instrumentation
    scope, and the log fields that name a model version, each with its span attribute (a leading ``/`` dropped:
    the canary proxy logs its split's choice as ``/2.0``)."""

    name: str
    service: str
    scope: str
    versions: tuple[tuple[str, str], ...] = ()


FRONT_HOP = SpanHop("front", "servekit-front", "servekit.serving.front")
# The canary proxy (servekit.deploy.proxy): which version its split chose ("": TorchServe's default route, or no
# split) and which version answered (the handler's X-Model-Version; "" when no handler answered).
PROXY_HOP = SpanHop("proxy", "servekit-proxy", "servekit.deploy.proxy",
                    (("target", "servekit.target_version"), ("served", "servekit.served_version")))  # fmt: skip
HOPS = {hop.name: hop for hop in (FRONT_HOP, PROXY_HOP)}


def span_record(line: bytes) -> dict | None:
    """One line of a hop's span log (``span_log_format``), checked; None for a line that is not one."""
    try:
        record = json.loads(line)
        ok = (_HEX32.match(record["trace"]) and _HEX16.match(record["span"])
              and (record["parent"] == "" or _HEX16.match(record["parent"])))  # fmt: skip
        float(record["end"]), float(record["seconds"]), int(record["status"])
    except (ValueError, KeyError, TypeError):
        return None
    return record if ok else None


def hop_span(record: dict, resource: Any, hop: SpanHop = FRONT_HOP) -> Any:
    """The ``hop.name`` span of one request (an OpenTelemetry ``ReadableSpan``) with the IDs nginx sent on."""
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

    trace_id, sampled = int(record["trace"], 16), TraceFlags(TraceFlags.SAMPLED)
    parent = None
    if record["parent"]:
        parent = SpanContext(trace_id, int(record["parent"], 16), is_remote=True, trace_flags=sampled)
    end = round(float(record["end"]) * 1000) * 1_000_000  # nginx's clock: milliseconds (exact in integers)
    status = int(record["status"])
    upstream = str(record.get("upstream_seconds") or "")
    versions = {attribute: str(record.get(key) or "").removeprefix("/") for key, attribute in hop.versions}
    return ReadableSpan(
        name=hop.name,
        context=SpanContext(trace_id, int(record["span"], 16), is_remote=False, trace_flags=sampled),
        parent=parent,
        resource=resource,
        attributes={
            "http.request.method": str(record.get("method", "")),
            "url.path": str(record.get("uri", "")),
            "http.response.status_code": status,
            **({"servekit.upstream_seconds": upstream} if upstream else {}),
            **versions,
        },
        kind=SpanKind.SERVER,
        status=Status(StatusCode.ERROR) if status >= 500 else Status(StatusCode.UNSET),
        start_time=end - round(float(record["seconds"]) * 1000) * 1_000_000,
        end_time=end,
        instrumentation_scope=InstrumentationScope(hop.scope),
    )


class SpanLogShipper:
    """A thread that turns an nginx hop's span log into its spans and exports them every ``interval`` s.

    ``hop``: whose log it is (``FRONT_HOP``, shipped by the OIP gateway; ``PROXY_HOP``, by the canary proxy's
    ``python -m servekit.serving.span_shipper``). The log is read from where it ends when the shipper
    starts (or from ``offset``: see ``LogFollower.start``), across the log keeper's rotations
    (``servekit.serving.logkeeper.LogFollower``); a failed export is logged and its spans dropped.
    """

    def __init__(self, path: Path, endpoint: str, interval: float = 1.0, hop: SpanHop = FRONT_HOP,
                 offset: int | None = None) -> None:  # fmt: skip
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource

        from servekit.serving.logkeeper import LogFollower

        self.hop = hop
        self.log = LogFollower(Path(path), span_record)
        self.log.start(offset)
        self.exporter = OTLPSpanExporter(endpoint=endpoint)
        self.resource = Resource.create({"service.name": hop.service})
        self.interval = interval
        self.shipped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{hop.name}-spans", daemon=True)

    def start(self) -> SpanLogShipper:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.ship()
        self.ship()

    def ship(self) -> int:
        """Export what the hop logged since the last call; the number of spans sent."""
        spans = [hop_span(record, self.resource, self.hop) for record in self.log.new_records()]
        if spans:
            try:
                result = self.exporter.export(spans)
            except Exception as exc:  # noqa: BLE001 - tracing never takes the gateway or the proxy down
                result = exc
            if getattr(result, "name", "") == "SUCCESS":
                self.shipped += len(spans)
            else:
                logger.warning("%s spans: export of %d spans failed (%s)", self.hop.name, len(spans), result)
        return len(spans)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # started: its last round ships what is left
            self._thread.join(timeout=10)
        else:
            self.ship()
        self.exporter.shutdown()


def gateway_tracer(endpoint: str | None) -> GatewayTracer | None:
    if not endpoint:
        return None
    try:
        return GatewayTracer(endpoint)
    except ImportError as exc:
        logger.warning("--otlp-endpoint given but OpenTelemetry is not installed (%s): no traces", exc)
        return None
