"""Traces and the queue wait: header parsing, spans sent with OTLP to a real (test) receiver, and tracing off;
the nginx hops with spans of their own (the OIP front, the canary proxy): rendered, checked by nginx, their logs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from handlers import tracing
from servekit.deploy.proxy import SPAN_CONTEXT_MAPS as PROXY_SPAN_CONTEXT_MAPS
from servekit.deploy.proxy import SPAN_LOG_FORMAT as PROXY_SPAN_LOG_FORMAT
from servekit.deploy.proxy import NginxProxy, ProxyError, render_config
from servekit.deploy.state import DeploymentState
from servekit.serving.nginx import TEMP_DIRS, nginx_binary
from servekit.serving.oip_service import render_front_config
from servekit.serving.tracing import (
    PROXY_HOP,
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


# ------------------------------------------------------------------------------------------ the canary proxy's span
def routed_state() -> DeploymentState:
    """digits: a canary and a shadow (every kind of location the proxy renders); letters: no routes of its own."""
    state = DeploymentState(listen="127.0.0.1:18090", upstream="127.0.0.1:18080")
    state.model("digits").set_canary("2.0", 20)
    state.model("digits").set_shadow("3.0")
    state.model("digits").observe("1.0", ["1.0", "2.0", "3.0"])
    state.model("letters").observe("1.0", ["1.0"])
    return state


def location_blocks(text: str) -> dict[str, str]:
    """Each location of a rendered configuration, by its path: the text between its braces."""
    return dict(re.findall(r"location (?:= )?(\S+) \{\n(.*?)\n        \}", text, re.DOTALL))


def test_with_span_export_the_proxy_is_a_hop_of_its_own_on_every_route_and_passes_nginx_check(tmp_path: Path) -> None:
    proxy = NginxProxy(tmp_path / "proxy", 18090, "127.0.0.1:18080")
    text = render_config(routed_state(), proxy.prefix, spans=True)
    assert PROXY_SPAN_CONTEXT_MAPS in text
    assert SPAN_CONTEXT_MAPS not in text  # the front's variables: none of the proxy's
    assert TRACE_CONTEXT_MAPS not in text
    assert '"00-${servekitspan_trace_id}-${servekitspan_own_span}-01"' in text  # what goes on: the proxy's span
    server = text.split("    server {\n", 1)[1].split("        location ", 1)[0]
    assert "proxy_set_header traceparent $servekitspan_traceparent;" in server
    assert f"access_log {proxy.prefix / SPAN_LOG} servekit_spans;" in server  # one line per request, every route
    assert text.count("servekit_spans;") == 1
    assert '"target":"$servekitlog_target","served":"$upstream_http_x_model_version"}' in text
    blocks = location_blocks(text)
    assert {"/predictions/digits", "/explanations/digits", "/_shadow/digits", "/"} <= set(blocks)
    for path, block in blocks.items():
        assert "proxy_pass http://torchserve" in block, path
        # A location with headers of its own inherits none of the server's: it must send the proxy's span itself.
        assert "proxy_set_header" not in block or "traceparent $servekitspan_traceparent;" in block, path
    assert "proxy_set_header traceparent $servekitspan_traceparent;" in blocks["/_shadow/digits"]
    proxy.install(text)  # checked with nginx -t first
    check = subprocess.run([nginx_binary(), "-t", "-p", str(proxy.prefix), "-c", str(proxy.conf)],
                           capture_output=True, text=True)  # fmt: skip
    assert check.returncode == 0, check.stderr


def test_without_span_export_the_proxy_passes_the_context_through_and_logs_no_spans(tmp_path: Path) -> None:
    state = routed_state()
    text = render_config(state, tmp_path)
    assert text == render_config(state, tmp_path, spans=False)
    for absent in ("traceparent", "servekitspan", "servekit_spans", SPAN_LOG):
        assert absent not in text, absent
    assert TRACE_CONTEXT_MAPS not in text  # the client's traceparent goes on untouched (nginx passes its headers)


def test_the_proxy_records_its_span_export_for_apply_and_rotates_its_span_log(tmp_path: Path) -> None:
    on = NginxProxy(tmp_path / "proxy", 18090, "127.0.0.1:18080", otlp_endpoint="http://127.0.0.1:4318/v1/traces")
    assert on.span_log in on.log_keeper.logs
    off = NginxProxy(tmp_path / "proxy", 18090, "127.0.0.1:18080")
    assert off.span_log not in off.log_keeper.logs
    # servekit canary/shadow build a proxy without an endpoint: apply renders what the running proxy started with.
    assert off.started_endpoint() is None
    off.apply(routed_state())
    assert "servekit_spans" not in off.conf.read_text()
    off.spans_file.write_text("http://127.0.0.1:4318/v1/traces\n")  # what start writes with span export on
    assert off.started_endpoint() == "http://127.0.0.1:4318/v1/traces"
    off.apply(routed_state())
    assert f"access_log {off.span_log} servekit_spans;" in off.conf.read_text()


def test_an_invalid_span_endpoint_fails_the_proxy_start_before_anything_starts(tmp_path: Path) -> None:
    proxy = NginxProxy(tmp_path / "proxy", 18090, "127.0.0.1:18080", otlp_endpoint="127.0.0.1:4318")
    with pytest.raises(ProxyError, match=r"must be an OTLP/HTTP traces URL \(http://...\), got '127.0.0.1:4318'"):
        proxy.start()
    assert not proxy.conf.exists()
    assert proxy.running_pid() is None


def proxy_log_line(**values: str) -> bytes:
    """A line as nginx writes it with the proxy's span log format (its variables replaced by ``values``)."""
    body = "".join(re.findall(r"'([^']*)'", PROXY_SPAN_LOG_FORMAT))
    return re.sub(r"\$([a-z_]+)", lambda m: values[m.group(1)], body).encode()


PROXY_VALUES = {
    "servekitspan_trace_id": PARENT[3:35], "servekitspan_own_span": "2" * 16, "servekitspan_parent_id": "1" * 16,
    "msec": "1700000000.250", "request_time": "0.040", "status": "200", "request_method": "POST",
    "uri": "/predictions/digits", "upstream_response_time": "0.039", "servekitlog_target": "/2.0",
    "upstream_http_x_model_version": "2.0",
}  # fmt: skip


def test_a_proxy_span_log_line_becomes_the_proxy_span_with_its_ids_parent_times_and_versions() -> None:
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create({"service.name": PROXY_HOP.service})
    span = hop_span(span_record(proxy_log_line(**PROXY_VALUES)), resource, PROXY_HOP)
    assert (span.name, span.instrumentation_scope.name) == ("proxy", "servekit.deploy.proxy")
    assert (f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}") == (PARENT[3:35], "2" * 16)
    assert f"{span.parent.span_id:016x}" == "1" * 16  # the front's span, which sent the request here
    assert (span.start_time, span.end_time) == (1_700_000_000_210_000_000, 1_700_000_000_250_000_000)
    assert span.attributes["servekit.target_version"] == "2.0"  # the split's choice, logged "/2.0"
    assert span.attributes["servekit.served_version"] == "2.0"
    assert span.attributes["http.response.status_code"] == 200
    line = proxy_log_line(**{**PROXY_VALUES, "servekitlog_target": "", "upstream_http_x_model_version": "1.0"})
    default = hop_span(span_record(line), resource, PROXY_HOP)  # the default's share (or no split at all)
    assert (default.attributes["servekit.target_version"], default.attributes["servekit.served_version"]) == ("", "1.0")
    front = hop_span(span_record(front_line()), resource)  # the front's spans keep their name and no versions
    assert front.name == "front"
    assert "servekit.target_version" not in front.attributes


def test_the_proxy_s_shipper_exports_proxy_spans_from_the_offset_it_is_given(tmp_path: Path) -> None:
    log = tmp_path / SPAN_LOG
    log.write_bytes(proxy_log_line(**{**PROXY_VALUES, "servekitspan_own_span": "0" * 16}) + b"\n")
    offset = log.stat().st_size  # what was there before nginx started: not this shipper's
    with log.open("ab") as out:  # written by nginx before the shipper had started
        out.write(proxy_log_line(**PROXY_VALUES) + b"\n")
    with otlp_receiver() as receiver:
        shipper = SpanLogShipper(log, receiver.url, interval=3600, hop=PROXY_HOP, offset=offset)
        assert shipper.ship() == 1
        shipper.stop()
        spans = receiver.wait_for(lambda spans: len(spans) == 1)
    assert [(s.service, s.name, s.span_id, s.parent_id) for s in spans] == [
        ("servekit-proxy", "proxy", "2" * 16, "1" * 16)
    ]
    assert (spans[0].attributes["servekit.target_version"], spans[0].attributes["servekit.served_version"]) == (
        "2.0",
        "2.0",
    )


def test_the_proxy_with_span_export_off_imports_nothing_of_opentelemetry(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; import servekit.cli\n"
        "from servekit.deploy.proxy import NginxProxy, render_config\n"
        "proxy = NginxProxy(Path(sys.argv[1]), 18090, '127.0.0.1:18080')\n"
        "render_config(proxy.current(), proxy.prefix); proxy.log_keeper; proxy.stop()\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "proxy")], capture_output=True, text=True,
                            check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_hand_encoded_spans_decode_as_otlp_with_every_field() -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    trace_id, span_id, parent_id = bytes(range(16)), bytes(range(8)), bytes(range(8, 16))
    attributes = b"".join(tracing._field(9, tracing._attribute(k, v)) for k, v in
                          (("code", 200), ("negative", -3), ("ok", True), ("path", "/v2/ü")))  # fmt: skip
    span = tracing.encode_span(trace_id, span_id, parent_id, "worker", tracing.SPAN_KIND_SERVER, 2**62, 2**62 + 5,
                               attributes)  # fmt: skip
    body = tracing.encode_request({"service.name": "servekit-worker", "servekit.version": "2.0"}, "scope", [span])
    (resource_spans,) = ExportTraceServiceRequest.FromString(body).resource_spans
    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert resource == {"service.name": "servekit-worker", "servekit.version": "2.0"}
    (scope_spans,) = resource_spans.scope_spans
    assert scope_spans.scope.name == "scope"
    (decoded,) = scope_spans.spans
    assert (decoded.trace_id, decoded.span_id, decoded.parent_span_id) == (trace_id, span_id, parent_id)
    assert (decoded.name, decoded.kind) == ("worker", decoded.SPAN_KIND_SERVER)
    assert (decoded.start_time_unix_nano, decoded.end_time_unix_nano) == (2**62, 2**62 + 5)
    values = {a.key: a.value for a in decoded.attributes}
    assert (values["code"].int_value, values["negative"].int_value) == (200, -3)
    assert (values["ok"].bool_value, values["path"].string_value) == (True, "/v2/ü")


def test_a_collector_that_is_down_costs_dropped_spans_never_an_error() -> None:
    tracer = tracing.Tracer("http://127.0.0.1:9/v1/traces", "servekit-worker", "digits", "1.0", interval=60)
    base = 1_700_000_000 * 10**9
    trace_id = tracer.request(None, base, base + 10, [("decode", base, base + 5)])
    assert len(trace_id) == 32
    assert int(trace_id, 16) != 0
    assert tracer.flush() == 0  # connection refused: nothing exported, nothing raised
    assert (tracer.exported, tracer.dropped) == (0, 2)
    tracer.shutdown()


def test_the_queue_is_bounded_while_the_collector_is_away(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracing, "MAX_QUEUED_SPANS", 10)
    tracer = tracing.Tracer("http://127.0.0.1:9/v1/traces", "servekit-worker", "digits", "1.0", interval=60)
    stages = [("decode", 1, 2), ("inference", 2, 3)]  # 3 spans per request
    for _ in range(5):
        tracer.request(None, 1, 3, stages)
    assert (tracer._count, tracer.dropped) == (9, 6)  # 3 requests queued, 2 dropped whole
    tracer.shutdown()
