"""Traces across the hops, at a test OTLP receiver: gRPC gateway -> OIP front (nginx) -> TorchServe -> worker stages.

A real TorchServe started with an OTLP endpoint (``otlp_endpoint``, what ``servekit_otlp_endpoint`` in
config.properties sets): the gateway and the workers export their spans to ``tests/otlp_receiver.py``.
The nginx front carries the W3C trace context (and starts one for a request without it) and stamps
``X-Request-Start``, from which the worker measures each request's queue wait.
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
        return {"worker", *STAGES} <= names and (trace_id != TRACE_ID or "gateway ModelInfer" in names)

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
    worker = next(s for s in spans if s.name == "worker")
    assert (gateway.service, gateway.parent_id) == ("servekit-gateway", PARENT[36:52])  # the client's span
    # The front and TorchServe carry the gateway's context on: the worker's parent is the gateway's span.
    assert (worker.service, worker.parent_id) == ("servekit-worker", gateway.span_id)
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
    spans = receiver.wait_for(lambda spans: any(s.name == "worker" and s.trace_id not in before for s in spans))
    worker = next(s for s in spans if s.name == "worker" and s.trace_id not in before)
    assert re.fullmatch(r"[0-9a-f]{32}", worker.trace_id)
    assert worker.parent_id == worker.trace_id[:16]  # nginx started it: $request_id, its first 16 digits the parent
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
