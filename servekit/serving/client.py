"""The one TorchServe client: addresses, tokens from the key file, refresh on refusal, timeouts, errors.

Everything in servekit that speaks HTTP to TorchServe goes through ``TorchServeClient``: the
``servekit`` workflows, the launcher's readiness checks (``servekit.serving.server``), the benchmark,
the soak and the integration tests. TorchServe 0.12 keeps token authorization on: the
``inference``, ``management`` and ``API`` keys are in ``key_file.json`` (written where TorchServe
starts); inference and management tokens expire, and ``GET /token?type=KIND`` with the API key
rewrites the file with a new one. So the key file is read on every call, and a call refused with
"Token Authorization failed" is sent once more after a refresh.

    client = TorchServeClient("http://127.0.0.1:8081", "http://127.0.0.1:8080", Path("var/key_file.json"))
    client.manage("GET", "/models")                                      # JSON, or TorchServeError
    client.call("inference", "POST", "/predictions/digits", data=png)     # a response; one-line errors
    client.send("inference", "POST", "/predictions/digits", data=png)     # a response; requests' errors

``call`` and ``manage`` turn an unreachable or silent server into a one-line ``TorchServeError``;
``send`` lets ``requests``' exceptions through for callers that count them (tests, load loops).
``keep_alive`` gives a load generator keep-alive connections with little CPU per request.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from servekit.errors import ServekitError, one_line

__all__ = ["KeepAliveSender", "TorchServeClient", "TorchServeError", "error_message", "read_keys", "token_refused"]

TOKEN_REFUSAL = "Token Authorization failed"
TOKEN_KINDS = ("inference", "management")


class TorchServeError(ServekitError):
    """TorchServe could not be reached, refused a call, or its key file is unusable."""


KEY_FILE_READS = 5  # TorchServe rewrites the key file in place on a refresh: a reader can catch it half written


def read_keys(key_file: Path) -> dict[str, str]:
    """``{"inference": ..., "management": ..., "api": ...}`` from TorchServe's ``key_file.json``."""
    for attempt in range(KEY_FILE_READS):
        try:
            data = json.loads(Path(key_file).read_text())
            break
        except FileNotFoundError:
            raise TorchServeError(f"no TorchServe key file at {key_file} (is TorchServe running? --key-file)") from None
        except (OSError, ValueError) as exc:
            if attempt == KEY_FILE_READS - 1:
                raise TorchServeError(f"cannot read TorchServe key file {key_file}: {exc}") from exc
            time.sleep(0.05 * (attempt + 1))  # being rewritten (a refresh): read it again
    if not isinstance(data, dict):
        raise TorchServeError(f"cannot read TorchServe key file {key_file}: not a JSON object")
    return {kind.lower(): entry["key"] for kind, entry in data.items() if isinstance(entry, dict) and "key" in entry}


def token_refused(status: int, body: str | bytes) -> bool:
    """Whether an answer is TorchServe refusing the token (expired, rotated or wrong): 400, or 401."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    return status in (400, 401) and TOKEN_REFUSAL in text


def error_message(response: requests.Response) -> str:
    """TorchServe's own words from an error answer, on one line."""
    try:
        body = response.json()
    except ValueError:
        return one_line(response.text) or response.reason
    if isinstance(body, dict):
        return one_line(body.get("message") or body.get("error") or body)
    return one_line(body)


@dataclass
class TorchServeClient:
    """Calls to one TorchServe's inference, management (and metrics) APIs with tokens from ``key_file``.

    ``key_file=None``: TorchServe runs with token authorization disabled (a pod behind a
    NetworkPolicy, see the bundle): calls carry no ``Authorization`` header.
    """

    management_url: str
    inference_url: str
    key_file: Path | None
    timeout: float = 120.0
    metrics_url: str | None = None
    _refreshing: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.management_url = self.management_url.rstrip("/")
        self.inference_url = self.inference_url.rstrip("/")
        self.metrics_url = self.metrics_url.rstrip("/") if self.metrics_url else None
        self.key_file = Path(self.key_file) if self.key_file is not None else None

    # ------------------------------------------------------------------ addresses and tokens
    def url(self, kind: str, path: str = "") -> str:
        base = {"management": self.management_url, "inference": self.inference_url, "metrics": self.metrics_url}
        if kind not in base or base[kind] is None:
            raise TorchServeError(f"no {kind} address for this TorchServe")
        return f"{base[kind]}{path}"

    def keys(self) -> dict[str, str]:
        if self.key_file is None:
            raise TorchServeError("this TorchServe runs without token authorization: there are no keys")
        return read_keys(self.key_file)

    def token(self, kind: str) -> str:
        """The current ``kind`` key; ``""`` when token authorization is off."""
        if self.key_file is None:
            return ""
        keys = self.keys()
        if kind not in keys:
            raise TorchServeError(f"no {kind!r} key in {self.key_file} (have: {', '.join(sorted(keys))})")
        return keys[kind]

    def headers(self, kind: str) -> dict[str, str]:
        token = self.token(kind)
        return {"Authorization": f"Bearer {token}"} if token else {}

    def refresh(self, kind: str, refused: str | None = None) -> None:
        """Ask TorchServe for a new ``kind`` token with the API key; TorchServe rewrites the key file.

        ``refused`` is the token that was refused: when the key file already holds another one (a
        thread beside this one refreshed it meanwhile), nothing is asked.
        """
        with self._refreshing:
            keys = self.keys()
            if refused is not None and keys.get(kind) not in (None, refused):
                return
            api_key = keys.get("api")
            if not api_key:
                raise TorchServeError(f"token for {kind} refused and no API key in {self.key_file} to refresh it")
            response = self._request("management", "GET", f"/token?type={kind}", api_key, {}, None)
        if response.status_code != 200:
            raise TorchServeError(
                f"refreshing the {kind} token failed: {response.status_code} {one_line(response.text)}"
            )

    # ------------------------------------------------------------------ calls
    def send(self, kind: str, method: str, path: str, *, timeout: float | None = None, **kwargs: Any):
        """One call to the ``kind`` API (``inference`` or ``management``), refreshed once if the token is refused.

        Returns the ``requests.Response`` whatever its status; transport failures raise
        ``requests.RequestException``. ``kwargs`` go to ``requests.request`` (``data``, ``json``,
        ``files``, ``params``, ``headers``: merged under the ``Authorization`` header).
        """
        token = self.token(kind)
        response = self._request(kind, method, path, token, dict(kwargs), timeout)
        if token and token_refused(response.status_code, response.text):
            self.refresh(kind, refused=token)
            response = self._request(kind, method, path, self.token(kind), dict(kwargs), timeout)
        return response

    def call(self, kind: str, method: str, path: str, **kwargs: Any):
        """``send``, with an unreachable or silent TorchServe as a one-line ``TorchServeError``."""
        try:
            return self.send(kind, method, path, **kwargs)
        except requests.ConnectionError:
            raise TorchServeError(f"TorchServe is not reachable at {self.url(kind)} (is it running?)") from None
        except requests.Timeout:
            limit = kwargs.get("timeout") or self.timeout
            raise TorchServeError(
                f"TorchServe did not answer {method} {self.url(kind, path)} within {limit:g}s"
            ) from None

    def manage(self, method: str, path: str, ok: tuple[int, ...] = (200,), **kwargs: Any) -> Any:
        """A management call whose status must be in ``ok``; its JSON body (``{}`` when it has none)."""
        response = self.call("management", method, path, **kwargs)
        if response.status_code not in ok:
            raise TorchServeError(
                f"TorchServe refused {method} {path}: {response.status_code} {error_message(response)}"
            )
        try:
            return response.json()
        except ValueError:
            return {}

    def metrics(self, timeout: float = 10.0) -> str:
        """The Prometheus metrics page (the metrics API takes no token)."""
        return requests.get(self.url("metrics", "/metrics"), timeout=timeout).text

    def _request(self, kind: str, method: str, path: str, token: str, kwargs: dict, timeout: float | None):
        headers = {**(kwargs.pop("headers", None) or {}), **({"Authorization": f"Bearer {token}"} if token else {})}
        return requests.request(
            method, self.url(kind, path), headers=headers, timeout=timeout or self.timeout, **kwargs
        )

    # ------------------------------------------------------------------ the describe API
    def models(self) -> list[str]:
        """The names of every registered model."""
        return [model["modelName"] for model in self.manage("GET", "/models").get("models", [])]

    def describe(self, model: str, version: str = "all", timeout: float | None = None) -> list[dict]:
        """TorchServe's description of ``model`` (``version``: ``all``, one version, or ``""`` for the default)."""
        path = f"/models/{model}" + (f"/{version}" if version else "")
        response = self.call("management", "GET", path, timeout=timeout)
        if response.status_code == 404:
            if version in ("all", ""):
                raise TorchServeError(f"model {model!r} is not registered")
            raise TorchServeError(f"{model} has no registered version {version!r}")
        if response.status_code != 200:
            raise TorchServeError(f"describing {model} failed: {response.status_code} {error_message(response)}")
        return response.json()

    def default_version(self, model: str) -> str:
        return self.describe(model, "")[0]["modelVersion"]

    def keep_alive(self, path: str, content_type: str = "application/octet-stream") -> KeepAliveSender:
        """A sender of inference POSTs to ``path`` over keep-alive connections (see ``KeepAliveSender``)."""
        return KeepAliveSender(self, path, content_type)


class KeepAliveSender:
    """POSTs to one inference path over keep-alive HTTP/1.1 connections, one per thread.

    ``http.client`` rather than ``requests``: a load generator shares the machine with the server,
    and this costs a fraction of the CPU per request. The token is read once and refreshed (once
    per refusal) through the client that made the sender.
    """

    def __init__(self, client: TorchServeClient, path: str, content_type: str) -> None:
        address = urlsplit(client.inference_url)
        self.client, self.path = client, path
        self.host, self.port = address.hostname or "127.0.0.1", address.port or 80
        self.content_type = content_type
        self.headers = self._headers()
        self.local = threading.local()

    def _headers(self) -> dict[str, str]:
        return {**self.client.headers("inference"), "Content-Type": self.content_type}

    def post(self, body: bytes) -> tuple[int, bytes]:
        """The status and body of one answer; ``OSError`` or ``http.client.HTTPException`` when there is none."""
        headers = self.headers
        status, answer = self._post(body)
        if "Authorization" in headers and token_refused(status, answer):
            self.client.refresh("inference", refused=headers["Authorization"].removeprefix("Bearer "))
            self.headers = self._headers()
            status, answer = self._post(body)
        return status, answer

    def _post(self, body: bytes) -> tuple[int, bytes]:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.client.timeout)
        try:
            conn.request("POST", self.path, body=body, headers=self.headers)
            response = conn.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            self.local.conn = None
            raise
