"""Request bodies as JSON, parsed only when their size in objects and arrays is bounded.

TorchServe's worker would parse every ``application/json`` body itself, in full, before any
handler limit applies: a few megabytes of ``[[],[],...]`` become millions of Python lists (about
150 MB per 6 MB body, for each request of a batch at once). ``BatchHandler.initialize`` therefore
turns that decoding off for its worker (``TS_DECODE_INPUT_REQUEST=false``, read by TorchServe per
request), and every handler parses its JSON here: the objects and arrays are counted on the raw
bytes first (a C-speed scan, no allocation), and a body with more than ``MAX_JSON_CONTAINERS`` is
refused before ``json.loads`` builds anything.

The count is of ``[`` and ``{`` bytes, strings included, so it can only over-count: no request this
project's tasks accept comes near the limit (an OIP FP32 tensor of 32 ResNet inputs in nested JSON
lists holds 21,637 arrays and objects; a tabular request is bounded by its record limit).
"""

from __future__ import annotations

import json
from typing import Any

from handlers.errors import InvalidInput, PayloadTooLarge

# Objects and arrays one JSON body may hold: 100,000 empty lists take about 6 MB of Python objects.
MAX_JSON_CONTAINERS = 100_000
# What TorchServe's worker is told (an environment variable it reads for every request).
DECODE_ENV = "TS_DECODE_INPUT_REQUEST"
BINARY_HEADER = "inference-header-content-length"  # the OIP binary extension (handlers.protocols)


def container_count(text: bytes | str) -> int:
    """How many ``[`` and ``{`` the text holds: an upper bound on its JSON arrays and objects."""
    return text.count(b"[") + text.count(b"{") if isinstance(text, bytes) else text.count("[") + text.count("{")


def parse_json(text: bytes | bytearray | memoryview | str, limit: int = MAX_JSON_CONTAINERS) -> Any:
    """``json.loads(text)`` for a request body: malformed, non-UTF-8, too deep or too many containers -> 4xx."""
    if isinstance(text, bytearray | memoryview):
        text = bytes(text)
    count = container_count(text)
    if count > limit:
        raise PayloadTooLarge(f"JSON body holds {count} arrays and objects; the limit is {limit}")
    try:
        return json.loads(text)
    except UnicodeDecodeError as exc:
        raise InvalidInput("JSON body is not valid UTF-8") from exc
    except RecursionError as exc:
        raise InvalidInput("malformed JSON body: nested too deeply") from exc
    except ValueError as exc:  # JSONDecodeError, and integers of more than 4300 digits
        raise InvalidInput(f"malformed JSON body: {exc}") from exc


def as_torchserve_decodes(request: dict, headers: dict[str, str]) -> dict:
    """``request`` with its body decoded as TorchServe's worker decodes by default, but bounded.

    With ``TS_DECODE_INPUT_REQUEST=false`` the worker hands every body over as bytes; this gives the
    handler what it would otherwise have received (``ts.protocol.otf_message_handler``): an
    ``application/json`` body parsed (left as bytes if it is not JSON), a ``text/*`` body as a
    string (left as bytes if it is not UTF-8), anything else untouched. The difference is the
    bound: a body with more than ``MAX_JSON_CONTAINERS`` arrays and objects raises ``PayloadTooLarge``.
    ``headers``: the request's, names in lower case. A body in the OIP binary extension stays bytes
    (its JSON header is followed by raw tensors: TorchServe could not have parsed it either).
    """
    content_type = headers.get("content-type", "")
    if BINARY_HEADER in headers:
        return request
    key = "body" if request.get("body") is not None else "data"
    value = request.get(key)
    if not isinstance(value, bytes | bytearray):
        return request
    if content_type == "application/json":
        try:
            return {**request, key: parse_json(value)}
        except InvalidInput:  # TorchServe forwards what it cannot parse; the handler says what is wrong
            return request
    if content_type.startswith("text"):
        try:
            return {**request, key: bytes(value).decode("utf-8")}
        except UnicodeDecodeError:
            return request
    return request
