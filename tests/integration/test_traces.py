"""Traces across the hops, at a test OTLP receiver: gRPC gateway -> OIP front (nginx) -> TorchServe -> worker stages.

A real TorchServe started with an OTLP endpoint (``otlp_endpoint``, what ``servekit_otlp_endpoint`` in
config.properties sets): the gateway and the workers export their spans to ``tests/otlp_receiver.py``.
The nginx front is a hop with a span of its own (its span log, exported by the gateway), carries the W3C
trace context on (and starts one for a request without it) and stamps ``X-Request-Start``, from which the
worker measures each request's queue wait.
"""

from __future__ import annotations

import base64
import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as triton_grpc

from servekit.serving.server import TorchServeProcess
from tests.integration.conftest import running_torchserve
from tests.otlp_receiver import Receiver, otlp_receiver

pytestmark = pytest.mark.integration

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
STAGES = {"queue", "decode", "preprocess", "inference", "postprocess"}


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with otlp_receiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_store: Path, receiver: Receiver):
    with running_torchserve(tmp_path_factory.mktemp("traced"), model_store, otlp_endpoint=receiver.url) as ts:
        yield ts


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
