"""README's "Try it" and docs/operating.md's "The same steps through TorchServe's own API", against a real
TorchServe: predict, register, scale, set-default, metrics."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.integration.conftest import Client, b64

DIGITS = range(10)


def sample(samples_dir: Path, digit: int) -> bytes:
    return (samples_dir / f"digit_{digit}.png").read_bytes()


def top1(response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["predictions"][0]["label"]


def test_default_version_predicts_every_shipped_digit(client: Client, samples_dir: Path) -> None:
    for digit in DIGITS:
        response = client.predict("digits", data=sample(samples_dir, digit))
        assert top1(response) == str(digit)
        body = response.json()
        assert body["version"] == "1.0"
        assert len(body["predictions"]) == 3
        probabilities = [p["probability"] for p in body["predictions"]]
        assert probabilities == sorted(probabilities, reverse=True)


def test_version_registered_at_runtime_answers_on_its_url(client: Client, samples_dir: Path) -> None:
    client.ensure_registered("2.0")
    for digit in DIGITS:
        response = client.predict("digits/2.0", data=sample(samples_dir, digit))
        assert top1(response) == str(digit)
        assert response.json()["version"] == "2.0"


def test_multipart_and_json_base64_forms(client: Client, samples_dir: Path) -> None:
    multipart = client.predict("digits/1.0", files={"data": ("d.png", sample(samples_dir, 4), "image/png")})
    assert top1(multipart) == "4"
    as_json = client.predict("digits/1.0", json={"data": b64(samples_dir / "digit_6.png"), "topk": 1})
    assert top1(as_json) == "6"
    assert len(as_json.json()["predictions"]) == 1


def test_bad_image_gets_json_4xx(client: Client) -> None:
    response = client.predict("digits/1.0", data=b"%PDF-1.7 not an image", headers={"Content-Type": "image/png"})
    assert response.status_code == 415
    assert response.json()["type"] == "UnsupportedMediaType"
    assert "PDF" in response.json()["error"]


def _worker_pids(client: Client, name: str, version: str) -> list[int]:
    described = client.manage("GET", f"/models/{name}/{version}").json()
    return sorted(int(w["pid"]) for w in described[0]["workers"])


def test_bad_requests_in_a_batch_fail_alone(client: Client, samples_dir: Path, model_store: Path) -> None:
    # A separate registration whose batch waits up to 20 s for 8 requests: when all 8 answer well
    # before that, they were served as one batch.
    response = client.manage(
        "POST",
        "/models?url=digits_v1.0.mar&model_name=digits_batch&batch_size=8&max_batch_delay=20000"
        "&initial_workers=1&synchronous=true",
    )
    assert response.status_code == 200, response.text
    try:
        described = client.manage("GET", "/models/digits_batch/1.0").json()[0]
        assert (described["batchSize"], described["maxBatchDelay"]) == (8, 20000)
        pids_before = _worker_pids(client, "digits_batch", "1.0")
        png = sample(samples_dir, 2)
        payloads = [
            ("good", 3, {"data": sample(samples_dir, 3)}),
            ("bad", 415, {"data": b"this is a text file, not an image"}),
            ("good", 8, {"data": sample(samples_dir, 8)}),
            ("bad", 400, {"data": png[: len(png) // 2], "headers": {"Content-Type": "image/png"}}),
            ("good", 5, {"data": sample(samples_dir, 5)}),
            ("bad", 400, {"data": b'{"data": ', "headers": {"Content-Type": "application/json"}}),
            ("good", 0, {"json": {"data": b64(samples_dir / "digit_0.png")}}),
            ("bad", 400, {"json": {"data": "!!not base64!!"}}),
        ]
        with ThreadPoolExecutor(len(payloads)) as pool:
            futures = [pool.submit(client.predict, "digits_batch", 60, **kwargs) for _, _, kwargs in payloads]
            responses = [f.result() for f in futures]
        for (kind, expected, _), response in zip(payloads, responses, strict=True):
            if kind == "good":
                assert top1(response) == str(expected)
            else:
                assert response.status_code == expected, response.text
                assert response.json()["code"] == expected
                assert response.json()["error"]
        elapsed = max(r.elapsed.total_seconds() for r in responses)
        assert elapsed < 15, f"the 8 requests did not form one batch ({elapsed:.1f}s)"
        assert _worker_pids(client, "digits_batch", "1.0") == pids_before, "a worker restarted"
    finally:
        client.manage("DELETE", "/models/digits_batch/1.0")


def test_scaling_changes_the_worker_count(client: Client) -> None:
    assert len(_worker_pids(client, "digits", "1.0")) == 1
    response = client.manage("PUT", "/models/digits/1.0?min_worker=2&max_worker=2&synchronous=true")
    assert response.status_code == 200, response.text
    try:
        described = client.manage("GET", "/models/digits/1.0").json()[0]
        assert described["minWorkers"] == 2
        assert len(described["workers"]) == 2
        assert all(w["status"] == "READY" for w in described["workers"])
    finally:
        client.manage("PUT", "/models/digits/1.0?min_worker=1&max_worker=1&synchronous=true")
    assert len(_worker_pids(client, "digits", "1.0")) == 1


def test_set_default_switches_the_unversioned_url(client: Client, samples_dir: Path) -> None:
    client.ensure_registered("2.0")
    assert client.predict("digits", data=sample(samples_dir, 1)).json()["version"] == "1.0"
    assert client.manage("PUT", "/models/digits/2.0/set-default").status_code == 200
    try:
        response = client.predict("digits", data=sample(samples_dir, 1))
        assert top1(response) == "1"
        assert response.json()["version"] == "2.0"
    finally:
        assert client.manage("PUT", "/models/digits/1.0/set-default").status_code == 200
    assert client.predict("digits", data=sample(samples_dir, 1)).json()["version"] == "1.0"


def _inference_count(metrics: str, model: str, version: str) -> float:
    pattern = rf'^ts_inference_requests_total\{{model_name="{model}",model_version="{version}",[^}}]*\}} (\S+)$'
    match = re.search(pattern, metrics, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@pytest.mark.parametrize("requests_sent", [5])
def test_metrics_count_inferences_per_model_version(client: Client, samples_dir: Path, requests_sent: int) -> None:
    client.ensure_registered("2.0")
    before = _inference_count(client.metrics(), "digits", "2.0")
    for _ in range(requests_sent):
        assert client.predict("digits/2.0", data=sample(samples_dir, 7)).status_code == 200
    after = _inference_count(client.metrics(), "digits", "2.0")
    assert after - before == requests_sent


def test_requests_without_a_token_are_refused(torchserve, samples_dir: Path) -> None:
    import requests

    inference = requests.post(torchserve.url("inference", "/predictions/digits"), data=sample(samples_dir, 1))
    management = requests.get(torchserve.url("management", "/models"))
    assert inference.status_code == 400
    assert management.status_code == 400
    assert "Token Authorization failed" in inference.json()["message"]
