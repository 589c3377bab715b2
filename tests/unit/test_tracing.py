"""Traces and the queue wait: header parsing, spans sent with OTLP to a real (test) receiver, and tracing off."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from handlers import tracing
from servekit.serving.nginx import TEMP_DIRS, nginx_binary
from servekit.serving.oip_service import render_front_config
from servekit.serving.tracing import (
    SPAN_CONTEXT_MAPS,
    SPAN_LOG,
    TRACE_CONTEXT_MAPS,
    GatewayTracer,
    SpanLogShipper,
    gateway_tracer,
    hop_span,
    span_record,
    valid_traceparent,
)
from tests.otlp_receiver import otlp_receiver

pytestmark = pytest.mark.unit

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_the_queue_wait_is_from_the_nearest_nginx_to_the_batch() -> None:
    assert tracing.queue_seconds({"x-request-start": "t=1700000000.250"}, 1700000000.300) == pytest.approx(0.05)
    assert tracing.queue_seconds({"x-request-start": "t=1700000001.000"}, 1700000000.0) == 0.0  # clocks: never < 0
    for bad in ("", "1700000000.25", "t=abc", "t=1700000000.25; x", "t=17"):
        assert tracing.queue_seconds({"x-request-start": bad}, 1700000000.3) is None, bad
    assert tracing.queue_seconds({}, 1700000000.3) is None
    assert tracing.queue_seconds({"x-request-start": "t=1600000000"}, 1700000000.0) is None  # older than an hour


def test_only_a_well_formed_traceparent_is_taken() -> None:
    assert tracing.traceparent({"traceparent": PARENT}) == PARENT
    assert tracing.traceparent({"traceparent": PARENT.upper()}) == PARENT
    for bad in ("", "01-" + PARENT[3:], PARENT[:-1], "00-" + "0" * 32 + PARENT[35:], PARENT + "-x"):
        assert tracing.traceparent({"traceparent": bad}) is None, bad
    assert valid_traceparent(PARENT) == PARENT
    assert valid_traceparent("nonsense") is None


def test_tracing_off_imports_nothing_of_opentelemetry() -> None:
    code = (
        "import sys; from handlers import tracing; import handlers.base; import servekit.serving.oip\n"
        "assert tracing.tracer_from_env('m', '1.0', {}) is None\n"
        "from servekit.serving.tracing import gateway_tracer; assert gateway_tracer(None) is None\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_worker_spans_are_children_of_the_callers_span_and_reach_the_collector() -> None:
    with otlp_receiver() as receiver:
        tracer = tracing.tracer_from_env("digits", "2.0", {tracing.ENDPOINT_ENV: receiver.url})
        base = 1_700_000_000 * 10**9
        stages = [("queue", base, base + 10), ("decode", base + 10, base + 20), ("inference", base + 20, base + 40)]
        trace_id = tracer.request(PARENT, base, base + 50, stages, **{"http.status_code": 200})
        tracer.shutdown()  # flushes
        spans = receiver.wait_for(lambda spans: len(spans) == 4)
    assert trace_id == PARENT[3:35]
    worker = next(s for s in spans if s.name == "worker")
    assert (worker.trace_id, worker.parent_id, worker.service) == (trace_id, PARENT[36:52], "servekit-worker")
    assert worker.attributes["servekit.version"] == "2.0"
    children = {s.name: s for s in spans if s.name != "worker"}
    assert set(children) == {"queue", "decode", "inference"}
    assert all(s.trace_id == trace_id and s.parent_id == worker.span_id for s in children.values())
    assert (children["queue"].start_ns, children["inference"].end_ns) == (base, base + 40)


def test_the_gateway_span_continues_the_callers_trace_and_sends_its_own_context_on() -> None:
    with otlp_receiver() as receiver:
        tracer = gateway_tracer(receiver.url)
        assert isinstance(tracer, GatewayTracer)
        with tracer.span("gateway ModelInfer", PARENT, **{"servekit.model": "digits"}) as sent:
            pass
        fresh = tracer.span("gateway ModelInfer", None)
        with fresh as started:
            pass
        tracer.shutdown()
        spans = receiver.wait_for(lambda spans: len(spans) == 2)
    mine = next(s for s in spans if s.trace_id == PARENT[3:35])
    assert mine.parent_id == PARENT[36:52]
    assert sent == f"00-{PARENT[3:35]}-{mine.span_id}-01"  # the next hop's parent is the gateway's span
    assert valid_traceparent(started) is not None
    assert started[3:35] != PARENT[3:35]  # no traceparent: a new trace


def test_nginx_starts_a_trace_for_a_request_without_one_from_its_request_id() -> None:
    assert '"" "00-${request_id}-${servekit_span_id}-01";' in TRACE_CONTEXT_MAPS
    assert "default $http_traceparent;" in TRACE_CONTEXT_MAPS


def test_the_collector_address_comes_from_the_configuration_and_is_off_by_default(tmp_path) -> None:
    from servekit.serving.server import TorchServeProcess

    off = TorchServeProcess(tmp_path / "a", tmp_path)
    assert (off.otlp_endpoint, off.oip_service.otlp_endpoint) == (None, None)
    url = "http://127.0.0.1:4318/v1/traces"
    on = TorchServeProcess(tmp_path / "b", tmp_path, overrides={"servekit_otlp_endpoint": url})
    assert (on.otlp_endpoint, on.oip_service.otlp_endpoint) == (url, url)
    assert "servekit_otlp_endpoint" not in on.props  # ours, not written into TorchServe's configuration


# ------------------------------------------------------------------------------------------ the front's own span
def front_line(**fields) -> bytes:
    record = {"trace": PARENT[3:35], "span": "1" * 16, "parent": PARENT[36:52], "end": 1_700_000_000.25,
              "seconds": 0.05, "status": 200, "method": "POST", "uri": "/v2/models/digits/infer",
              "upstream_seconds": "0.049", **fields}  # fmt: skip
    return json.dumps(record).encode()


def test_with_span_export_the_front_logs_its_own_span_and_sends_it_on_as_the_parent(tmp_path: Path) -> None:
    text = render_front_config(tmp_path / "front", "127.0.0.1:18000", "127.0.0.1:8080", "127.0.0.1:18002",
                               spans=True)  # fmt: skip
    assert SPAN_CONTEXT_MAPS in text
    assert TRACE_CONTEXT_MAPS not in text
    assert '"00-${servekit_trace_id}-${servekit_own_span}-01"' in text  # what goes on: the front's span
    assert text.count(f"access_log {(tmp_path / 'front').resolve() / SPAN_LOG} servekit_spans;") == 2  # both proxies
    prefix = tmp_path / "front"
    for sub in TEMP_DIRS:
        (prefix / "tmp" / sub).mkdir(parents=True)
    (prefix / "nginx.conf").write_text(text)
    check = subprocess.run([nginx_binary(), "-t", "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
                           capture_output=True, text=True)  # fmt: skip
    assert check.returncode == 0, check.stderr
    off = render_front_config(tmp_path / "off", "127.0.0.1:18000", "127.0.0.1:8080", "127.0.0.1:18002")
    assert "servekit_spans" not in off  # tracing off: no span log at all


def test_a_span_log_line_becomes_the_front_span_with_the_ids_nginx_sent_on() -> None:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.trace import StatusCode

    resource = Resource.create({"service.name": "servekit-front"})
    span = hop_span(span_record(front_line()), resource)
    assert (f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}") == (PARENT[3:35], "1" * 16)
    assert f"{span.parent.span_id:016x}" == PARENT[36:52]
    assert (span.start_time, span.end_time) == (1_700_000_000_200_000_000, 1_700_000_000_250_000_000)
    assert span.attributes["url.path"] == "/v2/models/digits/infer"
    root = hop_span(span_record(front_line(parent="", status=502)), resource)
    assert root.parent is None  # nginx started the trace: the front's span is its root
    assert root.status.status_code is StatusCode.ERROR


@pytest.mark.parametrize(
    "line",
    [b"not json", front_line(trace="xyz"), front_line(span="1" * 15), front_line(parent="g" * 16),
     front_line(end="soon"), json.dumps({"trace": PARENT[3:35]}).encode()],
)  # fmt: skip
def test_a_span_log_line_that_is_not_one_is_skipped(line: bytes) -> None:
    assert span_record(line) is None


def test_the_shipper_exports_each_logged_request_once_across_a_rotation(tmp_path: Path) -> None:
    log = tmp_path / SPAN_LOG
    log.write_bytes(front_line(span="0" * 16) + b"\n")  # before the shipper started: not its to send
    with otlp_receiver() as receiver:
        shipper = SpanLogShipper(log, receiver.url, interval=3600)
        with log.open("ab") as out:
            out.write(front_line(span="1" * 16) + b"\n")
        log.rename(tmp_path / f"{SPAN_LOG}.1")  # the log keeper's rotation; nginx opens a new file
        log.write_bytes(front_line(span="2" * 16) + b"\n" + front_line(span="3" * 16)[:20])  # the last: half written
        assert shipper.ship() == 2
        assert shipper.ship() == 0
        shipper.stop()
        spans = receiver.wait_for(lambda spans: len(spans) == 2)
    assert sorted(s.span_id for s in spans) == ["1" * 16, "2" * 16]
    assert {(s.service, s.name) for s in spans} == {("servekit-front", "front")}
