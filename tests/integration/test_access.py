"""Access: token authorization on every API, allowed_urls, and the key file's refresh path."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from servekit.serving.client import TorchServeClient
from tests.integration.conftest import Client

MANAGEMENT_CALLS = [
    ("GET", "/models"),
    ("GET", "/models/digits"),
    ("POST", "/models?url=digits_v2.0.mar&initial_workers=1&synchronous=true"),
    ("PUT", "/models/digits/1.0?min_worker=1&synchronous=true"),
    ("PUT", "/models/digits/1.0/set-default"),
    ("DELETE", "/models/digits/1.0"),
]
INFERENCE_CALLS = [("GET", "/ping"), ("POST", "/predictions/digits"), ("POST", "/predictions/digits/1.0")]


def _refused(response: requests.Response) -> None:
    assert response.status_code == 400, response.text
    assert response.json()["type"] == "InvalidKeyException"


@pytest.mark.parametrize(("method", "path"), INFERENCE_CALLS + MANAGEMENT_CALLS)
@pytest.mark.parametrize("token", [None, "not-a-key", "wrong-api"])
def test_every_call_without_a_valid_key_is_refused(
    torchserve, client: Client, samples_dir: Path, method: str, path: str, token: str | None
) -> None:
    api = "management" if (method, path) in MANAGEMENT_CALLS else "inference"
    headers = {}
    if token == "not-a-key":
        headers["Authorization"] = "Bearer not-a-key"
    elif token == "wrong-api":  # a valid key, but for the other API
        other = "inference" if api == "management" else "management"
        headers["Authorization"] = f"Bearer {torchserve.keys()[other]}"
    data = (samples_dir / "digit_1.png").read_bytes() if method == "POST" else None
    _refused(requests.request(method, torchserve.url(api, path), headers=headers, data=data, timeout=30))
    # Nothing changed: the model is still there with its default, and answers with a valid key.
    assert client.manage("GET", "/models/digits").json()[0]["modelVersion"] == "1.0"
    assert client.predict("digits", data=(samples_dir / "digit_1.png").read_bytes()).status_code == 200


def test_metrics_api_needs_no_key_and_is_loopback_only(torchserve) -> None:
    assert torchserve.props["metrics_address"].startswith("http://127.0.0.1:")
    assert requests.get(torchserve.url("metrics", "/metrics"), timeout=10).status_code == 200


def test_an_expired_or_rotated_token_is_refreshed_by_the_client(torchserve, samples_dir: Path) -> None:
    old = torchserve.keys()["inference"]
    api = torchserve.keys()["api"]
    response = requests.get(
        torchserve.url("management", "/token?type=inference"), headers={"Authorization": f"Bearer {api}"}, timeout=30
    )
    assert response.status_code == 200
    new = torchserve.keys()["inference"]
    assert new != old
    _refused(
        requests.post(
            torchserve.url("inference", "/predictions/digits"),
            headers={"Authorization": f"Bearer {old}"},
            data=(samples_dir / "digit_2.png").read_bytes(),
            timeout=30,
        )
    )
    # servekit's client reads the key file on every call and refreshes on refusal.
    client = TorchServeClient(torchserve.url("management"), torchserve.url("inference"), torchserve.key_file)
    answer = client.call("inference", "POST", "/predictions/digits", data=(samples_dir / "digit_2.png").read_bytes())
    assert answer.status_code == 200
    assert answer.json()["predictions"][0]["label"] == "2"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/digits_v2.0.mar",  # remote URLs are refused before any connection is made
        "https://127.0.0.1:9/digits_v2.0.mar",
        "file:///etc/passwd",
        "file:///tmp/elsewhere/digits_v2.0.mar",
        "../digits_v2.0.mar",
        "../model_store/digits_v2.0.mar",
        "file:///work/model_store/../model_store/digits_v2.0.mar",
    ],
)
def test_registration_outside_the_model_store_is_refused(client: Client, url: str) -> None:
    response = client.manage("POST", "/models", params={"url": url, "initial_workers": 1, "synchronous": "true"})
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["message"]
    registered = client.manage("GET", "/models").json()["models"]
    assert [m["modelName"] for m in registered] == ["digits"]
    assert [v["modelVersion"] for v in client.manage("GET", "/models/digits/all").json()] == ["1.0"]
