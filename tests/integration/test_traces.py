"""Traces across the hops, at a test OTLP receiver: gRPC gateway -> OIP front (nginx) -> [canary proxy (nginx)]
-> TorchServe -> worker stages.

A real TorchServe started with an OTLP endpoint (``otlp_endpoint``, what ``servekit_otlp_endpoint`` in
config.properties sets): the gateway and the workers export their spans to ``tests/otlp_receiver.py``.
The nginx front is a hop with a span of its own (its span log, exported by the gateway), carries the W3C
trace context on (and starts one for a request without it) and stamps ``X-Request-Start``, from which the
worker measures each request's queue wait. The front's routing plane is the canary proxy's socket (as
``make serve`` does): while the proxy is stopped the front goes to TorchServe directly; the proxy tests
start it with the same endpoint, and it is then a hop with a span of its own too (its span log, exported
by its span shipper).
"""

from __future__ import annotations

import base64
import contextlib
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as triton_grpc

from servekit.deploy.proxy import NginxProxy
from servekit.serving.router import router_address
from servekit.serving.server import TorchServeProcess, free_port
from tests.integration.conftest import Client, running_torchserve
from tests.otlp_receiver import ReceivedSpan, Receiver, otlp_receiver

pytestmark = pytest.mark.integration

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
STAGES = {"queue", "decode", "preprocess", "inference", "postprocess"}


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with otlp_receiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def proxy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("deploy") / "proxy"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_store: Path, receiver: Receiver, proxy_dir: Path):
    with running_torchserve(tmp_path_factory.mktemp("traced"), model_store, otlp_endpoint=receiver.url,
                            router=router_address(proxy_dir)) as ts:  # fmt: skip
        yield ts


@pytest.fixture
def proxy(server: TorchServeProcess, receiver: Receiver, proxy_dir: Path, digit: bytes) -> Iterator[NginxProxy]:
    """The canary proxy between the front and TorchServe, with span export on; stopped after the test."""
    proxy = NginxProxy(proxy_dir, free_port(), server.url("inference").split("//")[1], otlp_endpoint=receiver.url)
    routed = lambda: proxy.request_log.read_text().count("/v2/models/digits/infer")  # noqa: E731
    proxy.start()
    try:
        # The front may still be sending to TorchServe directly after failing to reach the stopped proxy
        # (servekit.serving.oip_service, ROUTER_RETRY): on once one of its requests shows in the proxy's log.
        before, deadline = routed(), time.monotonic() + 30
        while routed() == before:
            assert time.monotonic() < deadline, "the front never sent a request through the proxy"
            infer_over_http(server, digit, {})
            time.sleep(0.2)
        yield proxy
    finally:
        proxy.stop()


def infer_over_http(server: TorchServeProcess, digit: bytes, headers: dict[str, str]) -> requests.Response:
    response = requests.post(server.url("oip_http", "/v2/models/digits/infer"),
                             json={"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                               "data": [base64.b64encode(digit).decode()]}]},
                             headers={**server.headers("inference"), **headers}, timeout=60)  # fmt: skip
    assert response.status_code == 200, response.text
    return response


@pytest.fixture(scope="module")
def digit(samples_dir: Path) -> bytes:
    return (samples_dir / "digit_3.png").read_bytes()


def of_trace(trace_id: str):
    def done(spans) -> bool:
        names = {s.name for s in spans if s.trace_id == trace_id}
        return {"front", "worker", *STAGES} <= names and (trace_id != TRACE_ID or "gateway ModelInfer" in names)

    return done


def test_a_grpc_request_s_spans_share_one_trace_id_from_the_gateway_to_the_worker_stages(
    server: TorchServeProcess, receiver: Receiver, digit: bytes
) -> None:
    tensor = triton_grpc.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([digit], dtype=np.object_))
    headers = {"authorization": f"Bearer {server.keys()['inference']}", "traceparent": PARENT}
    # Closed here, not by the garbage collector at some later point (a gRPC channel closed from a finalizer can hang).
    with contextlib.closing(triton_grpc.InferenceServerClient(server.grpc_address)) as client:
        result = client.infer("digits", [tensor], headers=headers)
    assert result.as_numpy("labels")[0][0] in (b"3", "3")
    spans = [s for s in receiver.wait_for(of_trace(TRACE_ID)) if s.trace_id == TRACE_ID]
    print(sorted((s.service, s.name) for s in spans))  # the report's figures
    gateway = next(s for s in spans if s.name == "gateway ModelInfer")
    front = next(s for s in spans if s.name == "front")
    worker = next(s for s in spans if s.name == "worker")
    assert (gateway.service, gateway.parent_id) == ("servekit-gateway", PARENT[36:52])  # the client's span
    # The gateway sends gRPC inference through the OIP front (nginx), a hop with a span of its own, and
    # TorchServe carries the front's context on to the worker.
    assert (front.service, front.parent_id) == ("servekit-front", gateway.span_id)
    assert front.attributes["url.path"] == "/v2/models/digits/infer"
    assert front.attributes["http.response.status_code"] == 200
    assert (worker.service, worker.parent_id) == ("servekit-worker", front.span_id)
    ms = 2_000_000  # nginx's clock has millisecond resolution (and the worker's queue start comes from it)
    assert gateway.start_ns <= front.start_ns + ms
    assert front.start_ns <= worker.start_ns + ms
    assert worker.end_ns <= front.end_ns + ms
    stages = {s.name: s for s in spans if s.parent_id == worker.span_id}
    assert set(stages) == STAGES
    assert gateway.start_ns <= stages["queue"].start_ns <= stages["decode"].start_ns <= stages["inference"].start_ns
    assert stages["postprocess"].end_ns <= worker.end_ns <= gateway.end_ns


def test_an_http_request_without_trace_context_gets_one_from_the_front(
    server: TorchServeProcess, receiver: Receiver, digit: bytes
) -> None:
    before = {s.trace_id for s in receiver.spans}
    response = requests.post(server.url("oip_http", "/v1/models/digits:predict"),
                             json={"instances": [{"data": base64.b64encode(digit).decode()}]},
                             headers=server.headers("inference"), timeout=60)  # fmt: skip
    assert response.status_code == 200, response.text
    new = lambda spans: [s for s in spans if s.trace_id not in before]  # noqa: E731
    spans = new(receiver.wait_for(lambda spans: {"front", "worker"} <= {s.name for s in new(spans)}))
    front = next(s for s in spans if s.name == "front")
    worker = next(s for s in spans if s.name == "worker")
    assert re.fullmatch(r"[0-9a-f]{32}", worker.trace_id)
    # nginx started the trace ($request_id) with its own span as the root, the worker's parent.
    assert (front.trace_id, front.parent_id, front.span_id) == (worker.trace_id, "", worker.trace_id[16:])
    assert worker.parent_id == front.span_id
    assert {s.name for s in spans if s.parent_id == worker.span_id} == STAGES


def test_the_queue_wait_has_a_histogram_per_version(server: TorchServeProcess, digit: bytes) -> None:
    response = requests.post(server.url("oip_http", "/v2/models/digits/infer"),
                             json={"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                               "data": [base64.b64encode(digit).decode()]}]},
                             headers=server.headers("inference"), timeout=60)  # fmt: skip
    assert response.status_code == 200, response.text
    page = requests.get(server.url("oip_http", "/metrics"), timeout=10).text
    count = re.search(r'^servekit_queue_seconds_count\{model="digits",version="1.0"\} (\S+)$', page, re.MULTILINE)
    assert count is not None, page[:2000]
    assert float(count.group(1)) >= 1


# ------------------------------------------------------------------------------------------ through the canary proxy
def one(spans: list[ReceivedSpan], name: str, **where: str) -> ReceivedSpan:
    found = [s for s in spans if s.name == name and all(s.attributes.get(k) == v for k, v in where.items())]
    assert len(found) == 1, [(s.service, s.name, s.attributes) for s in spans]
    return found[0]


def test_a_grpc_request_through_the_canary_proxy_has_a_span_per_hop_each_the_parent_of_the_next(
    server: TorchServeProcess, receiver: Receiver, digit: bytes, proxy: NginxProxy
) -> None:
    trace_id, client_span = "5ce0e9a56015fec5aadfa328ae398115", "ab0b2c3d4e5f6a7b"
    tensor = triton_grpc.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([digit], dtype=np.object_))
    headers = {
        "authorization": f"Bearer {server.keys()['inference']}",
        "traceparent": f"00-{trace_id}-{client_span}-01",
    }
    with contextlib.closing(triton_grpc.InferenceServerClient(server.grpc_address)) as client:
        result = client.infer("digits", [tensor], headers=headers)
    assert result.as_numpy("labels")[0][0] in (b"3", "3")
    hops = {"gateway ModelInfer", "front", "proxy", "worker", *STAGES}
    spans = [s for s in receiver.wait_for(lambda got: hops <= {s.name for s in got if s.trace_id == trace_id})
             if s.trace_id == trace_id]  # fmt: skip
    print(sorted((s.service, s.name) for s in spans))
    gateway, front, hop, worker = (one(spans, name) for name in ("gateway ModelInfer", "front", "proxy", "worker"))
    # client -> gateway -> front -> proxy -> worker: each hop's parent is the span of the hop before it.
    assert (gateway.service, gateway.parent_id) == ("servekit-gateway", client_span)
    assert (front.service, front.parent_id) == ("servekit-front", gateway.span_id)
    assert (hop.service, hop.parent_id) == ("servekit-proxy", front.span_id)
    assert (worker.service, worker.parent_id) == ("servekit-worker", hop.span_id)
    assert len({gateway.span_id, front.span_id, hop.span_id, worker.span_id}) == 4
    assert hop.attributes["url.path"] == "/v2/models/digits/infer"
    assert hop.attributes["http.response.status_code"] == 200
    assert not hop.attributes["servekit.target_version"]  # "" (read back as 0 by the receiver): no canary split
    assert hop.attributes["servekit.served_version"] == "1.0"
    ms = 2_000_000  # nginx's clock has millisecond resolution
    assert gateway.start_ns <= front.start_ns + ms
    assert front.start_ns <= hop.start_ns + ms <= worker.start_ns + 2 * ms
    assert worker.end_ns <= hop.end_ns + ms <= front.end_ns + 2 * ms
    assert {s.name for s in spans if s.parent_id == worker.span_id} == STAGES


def test_the_proxy_span_is_the_parent_of_the_canary_and_the_shadow_and_names_the_split_s_choice(
    server: TorchServeProcess, receiver: Receiver, digit: bytes, proxy: NginxProxy
) -> None:
    Client(server).ensure_registered("2.0")
    state = proxy.current()
    state.model("digits").set_canary("2.0", 100)  # every request to the canary ...
    state.model("digits").set_shadow("1.0")  # ... and a copy of it to the default
    state.model("digits").observe("1.0", ["1.0", "2.0"])
    proxy.apply(state)  # as servekit canary and shadow do: the proxy started with spans keeps them
    trace_id, front_parent = "6ce0e9a56015fec5aadfa328ae398116", "bb0b2c3d4e5f6a7b"
    try:
        response = infer_over_http(server, digit, {"traceparent": f"00-{trace_id}-{front_parent}-01"})
    finally:
        state.model("digits").set_canary("2.0", 0)
        state.model("digits").set_shadow(None)
        proxy.apply(state)
    assert response.json()["model_version"] == "2.0"

    def done(got: list[ReceivedSpan]) -> bool:
        mine = [s for s in got if s.trace_id == trace_id]
        return {"front", "proxy"} <= {s.name for s in mine} and sum(s.name == "worker" for s in mine) == 2

    spans = [s for s in receiver.wait_for(done) if s.trace_id == trace_id]
    front, hop = one(spans, "front"), one(spans, "proxy")
    canary, shadow = (
        one(spans, "worker", **{"servekit.version": "2.0"}),
        one(spans, "worker", **{"servekit.version": "1.0"}),
    )
    assert front.parent_id == front_parent
    assert hop.parent_id == front.span_id
    assert (canary.parent_id, shadow.parent_id) == (hop.span_id, hop.span_id)  # the mirror carries the proxy's span
    assert (hop.attributes["servekit.target_version"], hop.attributes["servekit.served_version"]) == ("2.0", "2.0")
    assert f"access_log {proxy.span_log} servekit_spans;" in proxy.conf.read_text()
