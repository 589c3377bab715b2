"""Real Triton clients (HTTP and gRPC) and KServe v1 JSON against a real TorchServe and its OIP address.

Every shipped digit must get the same top-k labels and probabilities in every protocol as through
``/predictions``; metadata and readiness come from the OIP address (nginx front + gateway) that the
launcher starts beside TorchServe, exactly as ``make serve`` does.
"""

from __future__ import annotations

import base64
import io
import re
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from PIL import Image
from tritonclient.utils import InferenceServerException

from handlers.transforms import ImagePreprocessor
from servekit.build.spec import load_spec
from servekit.serving.server import TorchServeProcess
from tests.integration.conftest import Client, running_torchserve

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples"
DIGITS = [(str(d), (SAMPLES / f"digit_{d}.png").read_bytes()) for d in range(10)]
TOPK = 3  # models.yaml: digits topk


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> Iterator[TorchServeProcess]:
    with running_torchserve(tmp_path_factory.mktemp("oip"), model_store) as torchserve:
        Client(torchserve).ensure_registered("2.0")
        yield torchserve


def token(server: TorchServeProcess) -> dict[str, str]:
    """A fresh headers dict per call: tritonclient writes its own headers into the dict it is given."""
    return {"Authorization": f"Bearer {server.keys()['inference']}"}


def grpc_token(server: TorchServeProcess) -> dict[str, str]:
    """gRPC metadata keys are lower case."""
    return {"authorization": f"Bearer {server.keys()['inference']}"}


@pytest.fixture(scope="module")
def http(server: TorchServeProcess) -> triton_http.InferenceServerClient:
    return triton_http.InferenceServerClient(server.url("oip_http").split("://", 1)[1], concurrency=16)


@pytest.fixture(scope="module")
def grpc(server: TorchServeProcess) -> triton_grpc.InferenceServerClient:
    return triton_grpc.InferenceServerClient(server.grpc_address)


@pytest.fixture(scope="module")
def reference(server: TorchServeProcess) -> dict[str, list[dict]]:
    """Each digit's top-k through servekit's own /predictions."""
    client = Client(server)
    answers = {}
    for label, image in DIGITS:
        response = client.predict("digits", data=image, headers={"Content-Type": "application/octet-stream"})
        assert response.status_code == 200, response.text
        answers[label] = response.json()["predictions"]
    return answers


def images_tensor(module, images: list[bytes], binary: bool = True):
    tensor = module.InferInput("image", [len(images)], "BYTES")
    if module is triton_http:
        data = images if binary else [base64.b64encode(i) for i in images]
        tensor.set_data_from_numpy(np.array(data, dtype=np.object_), binary_data=binary)
    else:
        tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    return tensor


def assert_same_as_reference(labels: np.ndarray, scores: np.ndarray, expected: list[dict]) -> None:
    decoded = [x.decode() if isinstance(x, bytes) else str(x) for x in labels]
    assert decoded == [p["label"] for p in expected]
    assert np.allclose(scores.astype(float), [p["probability"] for p in expected], atol=1e-6)


# ------------------------------------------------------------------------------------------ every digit, every protocol
@pytest.mark.parametrize(("label", "image"), DIGITS, ids=[d for d, _ in DIGITS])
def test_every_digit_same_answer_in_every_protocol(
    server: TorchServeProcess, http, grpc, reference: dict[str, list[dict]], label: str, image: bytes
) -> None:
    expected = reference[label]
    assert expected[0]["label"] == label

    for binary in (True, False):  # tritonclient.http: binary tensors, then base64 JSON strings
        outputs = [triton_http.InferRequestedOutput(n, binary_data=binary) for n in ("labels", "scores")]
        tensors = [images_tensor(triton_http, [image], binary)]
        result = http.infer("digits", tensors, outputs=outputs, headers=token(server))
        assert result.as_numpy("labels").shape == (1, TOPK)
        assert_same_as_reference(result.as_numpy("labels")[0], result.as_numpy("scores")[0], expected)

    result = grpc.infer("digits", [images_tensor(triton_grpc, [image])], headers=grpc_token(server))
    assert_same_as_reference(result.as_numpy("labels")[0], result.as_numpy("scores")[0], expected)

    v1 = requests.post(
        server.url("oip_http", "/v1/models/digits:predict"),
        json={"instances": [{"data": base64.b64encode(image).decode()}]},
        headers=token(server),
        timeout=60,
    )
    assert v1.status_code == 200, v1.text
    assert v1.json()["predictions"] == [expected]


def test_multi_image_requests_answer_each_image(server: TorchServeProcess, http, grpc) -> None:
    images = [image for _, image in DIGITS]
    truth = [label for label, _ in DIGITS]
    http_result = http.infer("digits", [images_tensor(triton_http, images)], headers=token(server))
    grpc_result = grpc.infer("digits", [images_tensor(triton_grpc, images)], headers=grpc_token(server))
    for result in (http_result, grpc_result):
        labels = result.as_numpy("labels")
        assert labels.shape == (10, TOPK)
        assert [row[0].decode() for row in labels] == truth
        assert result.as_numpy("indices")[:, 0].tolist() == [int(t) for t in truth]
    v1 = requests.post(
        server.url("oip_http", "/v1/models/digits:predict"),
        json={"instances": [base64.b64encode(i).decode() for i in images]},
        headers=token(server),
        timeout=60,
    ).json()
    assert [p[0]["label"] for p in v1["predictions"]] == truth


def test_preprocessed_fp32_input_gives_the_image_answer(server: TorchServeProcess, http, grpc, reference) -> None:
    spec = next(s for s in load_spec(REPO / "models.yaml") if s.name == "digits" and s.version == "1.0")
    transform = ImagePreprocessor(spec.preprocessing)
    label, image = DIGITS[3]
    pixels = transform(Image.open(io.BytesIO(image))).numpy()[None].astype(np.float32)
    for module, client in ((triton_http, http), (triton_grpc, grpc)):
        tensor = module.InferInput("pixels", list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels)
        headers = token(server) if module is triton_http else grpc_token(server)
        result = client.infer("digits", [tensor], headers=headers)
        assert_same_as_reference(result.as_numpy("labels")[0], result.as_numpy("scores")[0], reference[label])


def test_request_options_outputs_top_k_and_id(server: TorchServeProcess, http, grpc) -> None:
    image = DIGITS[7][1]
    result = http.infer(
        "digits",
        [images_tensor(triton_http, [image])],
        outputs=[triton_http.InferRequestedOutput("labels")],
        request_id="req-42",
        parameters={"top_k": 5},
        headers=token(server),
    )
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["labels"]
    assert response["id"] == "req-42"
    assert result.as_numpy("labels").shape == (1, 5)
    tensors = [images_tensor(triton_grpc, [image])]
    result = grpc.infer("digits", tensors, request_id="g-1", parameters={"top_k": 1}, headers=grpc_token(server))
    assert result.get_response().id == "g-1"
    assert result.as_numpy("scores").shape == (1, 1)


def test_versioned_routes_reach_that_version(server: TorchServeProcess, http, grpc) -> None:
    image = DIGITS[5][1]
    for version in ("1.0", "2.0"):
        tensors = [images_tensor(triton_http, [image])]
        result = http.infer("digits", tensors, model_version=version, headers=token(server))
        assert result.get_response()["model_version"] == version
        assert result.as_numpy("labels")[0][0] == b"5"
        tensors = [images_tensor(triton_grpc, [image])]
        result = grpc.infer("digits", tensors, model_version=version, headers=grpc_token(server))
        assert result.get_response().model_version == version
    default = http.infer("digits", [images_tensor(triton_http, [image])], headers=token(server))
    assert default.get_response()["model_version"] == "1.0"


# ------------------------------------------------------------------------------------------ metadata and readiness
def test_metadata_from_the_spec_and_the_registered_versions(server: TorchServeProcess, http, grpc) -> None:
    metadata = http.get_model_metadata("digits", headers=token(server))
    assert metadata["name"] == "digits"
    assert metadata["versions"] == ["1.0", "2.0"]
    assert metadata["inputs"] == [
        {"name": "image", "datatype": "BYTES", "shape": [-1]},
        {"name": "pixels", "datatype": "FP32", "shape": [-1, 1, 16, 16]},
    ]
    assert [(o["name"], o["datatype"]) for o in metadata["outputs"]] == [
        ("labels", "BYTES"),
        ("scores", "FP32"),
        ("indices", "INT64"),
    ]
    grpc_metadata = grpc.get_model_metadata("digits", model_version="2.0", headers=grpc_token(server))
    assert list(grpc_metadata.versions) == ["1.0", "2.0"]
    assert [i.name for i in grpc_metadata.inputs] == ["image", "pixels"]
    assert list(grpc_metadata.inputs[1].shape) == [-1, 1, 16, 16]
    with pytest.raises(InferenceServerException, match="no model named 'nope'"):
        http.get_model_metadata("nope", headers=token(server))
    with pytest.raises(InferenceServerException, match="NOT_FOUND"):
        grpc.get_model_metadata("nope", headers=grpc_token(server))


def scale(server: TorchServeProcess, version: str, workers: int) -> None:
    response = Client(server).manage(
        "PUT", f"/models/digits/{version}", params={"min_worker": workers, "max_worker": workers, "synchronous": "true"}
    )
    assert response.status_code == 200, response.text


def wait_for(condition, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False


def test_readiness_means_a_ready_worker(server: TorchServeProcess, http, grpc) -> None:
    assert http.is_server_live()
    assert http.is_server_ready()
    assert grpc.is_server_ready()
    assert http.is_model_ready("digits", headers=token(server))
    assert http.is_model_ready("digits", "2.0", headers=token(server))

    scale(server, "2.0", 0)
    try:
        assert wait_for(lambda: not http.is_model_ready("digits", "2.0", headers=token(server)))
        assert not grpc.is_model_ready("digits", "2.0", headers=grpc_token(server))
        assert http.is_model_ready("digits", headers=token(server))  # the default version still has its worker
        assert http.is_server_ready()
    finally:
        scale(server, "2.0", 1)
    scale(server, "1.0", 0)
    try:
        assert wait_for(lambda: not http.is_server_ready())
        ready = requests.get(server.url("oip_http", "/v2/health/ready"), timeout=10)
        assert ready.status_code == 400
        assert ready.json() == {"ready": False}
        assert not grpc.is_server_ready()
        # TorchServe's own route would still say ready; the inference route answers an OIP error.
        answer = requests.post(
            server.url("oip_http", "/v2/models/digits/infer"),
            json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["x"]}]},
            headers=token(server),
            timeout=30,
        )
        assert answer.status_code == 503
        assert "error" in answer.json()
    finally:
        scale(server, "1.0", 1)
    assert wait_for(lambda: http.is_server_ready())
    assert http.is_model_ready("digits", headers=token(server))


def test_tokens_are_required(server: TorchServeProcess, http, grpc) -> None:
    with pytest.raises(InferenceServerException, match="missing or wrong token"):
        http.get_model_metadata("digits")
    with pytest.raises(InferenceServerException, match="missing token"):
        http.infer("digits", [images_tensor(triton_http, [DIGITS[1][1]])])
    with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
        grpc.infer("digits", [images_tensor(triton_grpc, [DIGITS[1][1]])], headers={"authorization": "Bearer wrong"})
    with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
        grpc.is_model_ready("digits")


# ------------------------------------------------------------------------------------------ batching
def test_concurrent_oip_requests_are_batched_and_answered_each(server: TorchServeProcess, http, grpc) -> None:
    """tritonclient's own concurrency (async_infer): 24 HTTP and 24 gRPC requests in flight at once."""
    log = server.workdir / "logs" / "model_log.log"
    before = log.read_text(errors="replace") if log.exists() else ""
    grpc_answers: dict[int, object] = {}
    done = threading.Event()

    def collect(i: int, result, error) -> None:
        grpc_answers[i] = error if error is not None else result
        if len(grpc_answers) == 24:
            done.set()

    pending = []
    for i in range(24):
        image = DIGITS[i % 10][1]
        pending.append(http.async_infer("digits", [images_tensor(triton_http, [image])], headers=token(server)))
        grpc.async_infer(
            "digits", [images_tensor(triton_grpc, [image])], partial(collect, i), headers=grpc_token(server)
        )
    http_labels = [request.get_result(timeout=120).as_numpy("labels")[0][0].decode() for request in pending]
    assert done.wait(120), f"{24 - len(grpc_answers)} gRPC answers missing"
    failures = [a for a in grpc_answers.values() if isinstance(a, BaseException)]
    assert not failures, failures[:3]
    grpc_labels = [grpc_answers[i].as_numpy("labels")[0][0].decode() for i in range(24)]
    truth = [DIGITS[i % 10][0] for i in range(24)]
    assert http_labels == truth
    assert grpc_labels == truth
    assert wait_for(lambda: log.exists() and len(log.read_text(errors="replace")) > len(before), 10)
    batches = [int(n) for n in re.findall(r"batch: (\d+) requests", log.read_text(errors="replace")[len(before) :])]
    assert batches, f"no batch line in {log}"
    assert max(batches) > 1, f"no server-side batch of several requests in {log}"


def test_the_server_metadata_names_the_toolkit(server: TorchServeProcess, http) -> None:
    metadata = http.get_server_metadata(headers=token(server))
    assert metadata["name"] == "servekit"
    assert "binary_tensor_data" in metadata["extensions"]
