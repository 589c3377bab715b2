"""Explanations through a real TorchServe (handlers.explain): the shipped digits and breast_cancer examples,
FP32 and INT8, answer ``POST /explanations/NAME/VERSION`` and KServe v1 ``:explain`` (on TorchServe and on
the OIP address), with completeness checked in every answer; a bad explanation request gets a 4xx JSON
error while predictions sent with it keep being answered. The commands of docs/explanations.md are these requests."""

from __future__ import annotations

import base64
import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from PIL import Image

from servekit.serving.server import TorchServeProcess
from servekit.serving.store import archive_name
from tests.integration.conftest import Client, running_torchserve, send_together

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DIGIT_7 = (REPO / "samples" / "digit_7.png").read_bytes()
CANCER = REPO / "samples" / "breast_cancer"
PNG = {"Content-Type": "image/png"}
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> Iterator[TorchServeProcess]:
    with running_torchserve(tmp_path_factory.mktemp("explain"), model_store) as torchserve:
        client = Client(torchserve)
        client.ensure_registered("2.0")
        for version in ("1.0", "2.0"):
            params = {"url": archive_name("breast_cancer", version), "initial_workers": 1, "synchronous": "true"}
            response = client.manage("POST", "/models", params=params)
            assert response.status_code == 200, response.text
        yield torchserve


@pytest.fixture(scope="module")
def client(server: TorchServeProcess) -> Client:
    return Client(server)


def record(name: str) -> dict:
    return json.loads((CANCER / name).read_text())


def explained(send, attempts: int = 40) -> requests.Response:
    """Send until the model's share of explanation time lets it through (429 says how long to wait)."""
    for _ in range(attempts):
        response = send()
        if response.status_code != 429:
            return response
        time.sleep(0.25)
    return response


def inference(client: Client, path: str, **kwargs) -> requests.Response:
    return client.api.send("inference", "POST", path, timeout=60, **kwargs)


@pytest.mark.parametrize(("version", "program"), [("1.0", "the served FP32 program"), ("2.0", "the FP32 reference")])
def test_digits_explanations_name_the_digit_and_keep_completeness(client: Client, version: str, program: str) -> None:
    response = explained(lambda: inference(client, f"/explanations/digits/{version}", data=DIGIT_7, headers=PNG))
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"], body["version"]) == ("digits", version)
    [answer] = body["explanations"]
    assert answer["prediction"]["label"] == "7"
    assert answer["target"] == {"label": "7", "index": 7}
    assert answer["method"] == "integrated_gradients"
    assert answer["program"].startswith(program)
    if version == "2.0":
        assert "INT8 programs have no gradients" in answer["program"]
    assert answer["attributions_shape"] == [16, 16]
    assert answer["completeness"]["within_tolerance"] is True
    total = sum(map(sum, answer["attributions"]))
    assert total == pytest.approx(answer["completeness"]["attribution_sum"], abs=1e-3)


def test_digits_kserve_v1_explain_on_torchserve_and_on_the_oip_address(server: TorchServeProcess, client: Client):
    b64 = base64.b64encode(DIGIT_7).decode()
    document = {"instances": [{"b64": b64}]}
    headers = {"Authorization": f"Bearer {server.keys()['inference']}", "X-Explain-Heatmap": "png"}
    direct = explained(lambda: inference(client, "/v1/models/digits:explain", json=document, headers=headers))
    assert direct.status_code == 200, direct.text
    assert set(direct.json()) == {"explanations", "model_name", "model_version"}
    heatmap = direct.json()["explanations"][0]["heatmap_png"]
    assert Image.open(io.BytesIO(base64.b64decode(heatmap))).format == "PNG"
    front = server.url("oip_http", "/v1/models/digits:explain")
    via_front = explained(lambda: requests.post(front, json=document, headers=headers, timeout=60))
    assert via_front.status_code == 200, via_front.text
    assert via_front.json()["explanations"][0]["target"]["label"] == "7"
    predicted = requests.post(server.url("oip_http", "/v1/models/digits:predict"), json=document, headers=headers)
    assert predicted.status_code == 200
    assert "predictions" in predicted.json()


@pytest.mark.parametrize("version", ["1.0", "2.0"])
def test_breast_cancer_explains_every_feature_in_the_schema_order(client: Client, version: str) -> None:
    case = record("malignant_0.json")
    response = explained(lambda: inference(client, f"/explanations/breast_cancer/{version}", json=case))
    assert response.status_code == 200, response.text
    [answer] = response.json()["explanations"]
    assert answer["prediction"]["label"] == "malignant"
    assert [feature["name"] for feature in answer["features"]] == list(case)
    assert [feature["value"] for feature in answer["features"]] == pytest.approx(list(case.values()), rel=1e-6)
    assert sorted(answer["ranking"]) == sorted(case)
    assert answer["completeness"]["within_tolerance"] is True
    total = sum(feature["attribution"] for feature in answer["features"])
    assert total == pytest.approx(answer["completeness"]["attribution_sum"], abs=1e-3)


def test_breast_cancer_kserve_v1_explain_through_the_oip_address(server: TorchServeProcess) -> None:
    cases = [record("malignant_0.json"), record("benign_0.json")]
    headers = {"Authorization": f"Bearer {server.keys()['inference']}"}
    url = server.url("oip_http", "/v1/models/breast_cancer:explain")
    response = explained(lambda: requests.post(url, json={"instances": cases}, headers=headers, timeout=60))
    assert response.status_code == 200, response.text
    labels = [answer["target"]["label"] for answer in response.json()["explanations"]]
    assert labels == ["malignant", "benign"]


def test_a_bad_explanation_gets_a_4xx_json_error_and_predictions_keep_working(client: Client) -> None:
    too_many_steps = {**PNG, "X-Explain-Steps": "100000"}
    bad_target = {**JSON, "X-Explain-Target": "no such label"}
    requests_ = [("explain", too_many_steps, DIGIT_7), ("predict", PNG, DIGIT_7)] * 4
    answers = send_together(
        requests_,
        lambda item: inference(
            client,
            f"/{'explanations' if item[0] == 'explain' else 'predictions'}/digits/1.0",
            data=item[2],
            headers=item[1],
        ),
    )
    for (kind, _, _), answer in zip(requests_, answers, strict=True):
        if kind == "explain":
            assert answer.status_code == 413
            assert answer.json()["type"] == "PayloadTooLarge"
            assert "X-Explain-Steps" in answer.json()["error"]
        else:
            assert answer.status_code == 200
            assert answer.json()["predictions"][0]["label"] == "7"
    refused = explained(
        lambda: inference(client, "/explanations/breast_cancer/1.0", json=record("benign_0.json"), headers=bad_target)
    )
    assert refused.status_code == 400
    assert "not a label" in refused.json()["error"]
    after = inference(client, "/predictions/breast_cancer/1.0", json=record("benign_0.json"))
    assert after.status_code == 200
    assert after.json()["predictions"][0]["label"] == "benign"


def test_an_explanation_pool_answers_explanations_on_idle_cpu_and_refuses_predictions(client: Client) -> None:
    # The same archive as digits 2.0, registered as the pool of digits (handlers.explain: NAME-explainer).
    params = {"url": archive_name("digits", "2.0"), "model_name": "digits-explainer", "initial_workers": 1,
              "synchronous": "true"}  # fmt: skip
    response = client.manage("POST", "/models", params=params)
    assert response.status_code == 200, response.text
    try:
        answer = explained(lambda: inference(client, "/explanations/digits-explainer/2.0", data=DIGIT_7, headers=PNG))
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert (body["model"], body["version"]) == ("digits", "2.0")
        [explanation] = body["explanations"]
        assert explanation["target"]["label"] == "7"
        assert explanation["completeness"]["within_tolerance"] is True
        predicted = inference(client, "/predictions/digits-explainer", data=DIGIT_7, headers=PNG)
        assert predicted.status_code == 400
        assert "answers explanations only" in predicted.json()["error"]
        # Every thread of the pool's worker runs only on idle CPU time; the prediction workers' do not.
        pools = client.manage("GET", "/models/digits-explainer").json()[0]["workers"]
        served = client.manage("GET", "/models/digits/2.0").json()[0]["workers"]
        for worker, policy in [(w, os.SCHED_IDLE) for w in pools] + [(w, os.SCHED_OTHER) for w in served]:
            pid = int(worker["pid"])
            threads = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
            assert {os.sched_getscheduler(t) for t in threads} == {policy}, (pid, policy)
    finally:
        client.manage("DELETE", "/models/digits-explainer/2.0")
