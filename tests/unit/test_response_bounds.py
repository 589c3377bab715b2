"""Answers bounded by the server's response limit, and JSON bodies parsed only when bounded.

The base handler checks every answer against ``max_response_size`` (as ``servekit.serving.server``
passes it, ``SERVEKIT_MAX_RESPONSE_SIZE``) with the size TorchServe's own worker code would send,
and fails only that request with 413; the OIP ``id`` it echoes is bounded; JSON bodies come to the
handler as bytes (``TS_DECODE_INPUT_REQUEST=false``) and are parsed only after their arrays and
objects are counted.
"""

from __future__ import annotations

import io
import json
import struct
import time
import tracemalloc
from dataclasses import dataclass
from typing import Any

import pytest
from ts.protocol import otf_message_handler

from handlers import base, json_body, protocols
from handlers.base import BatchHandler, reply_size, response_limit
from handlers.errors import InvalidInput, PayloadTooLarge
from handlers.protocols import ProtocolConfig, Reply
from tests.fake_context import FakeContext


# ------------------------------------------------------------------------------------ a handler of our own
@dataclass
class _EchoCall:
    text: str
    size: int = 1


class EchoHandler(BatchHandler):
    """Answers each request with its own text repeated: the test decides how large each answer is."""

    def decode(self, request: dict, headers: dict[str, str]) -> _EchoCall:
        body = request["body"]
        return _EchoCall(body.decode() if isinstance(body, bytes) else str(body))

    def prepare(self, call: _EchoCall) -> list[Any]:
        return [call.text]

    def inference(self, items: list[Any]) -> list[Any]:
        return items

    def postprocess(self, outputs: Any, items: list[Any]) -> list[Any]:
        return list(outputs)

    def encode(self, call: _EchoCall, results: list[Any]) -> Reply:
        return Reply({"echo": results[0]})


def echo_handler(limit: int, monkeypatch: pytest.MonkeyPatch) -> EchoHandler:
    monkeypatch.setenv(base.MAX_RESPONSE_ENV, str(limit))
    handler = EchoHandler()
    assert handler.max_response == limit - base.RESPONSE_MARGIN
    return handler


def test_an_answer_over_the_limit_fails_only_its_own_request_with_413_json(monkeypatch: pytest.MonkeyPatch) -> None:
    handler = echo_handler(20_000, monkeypatch)
    context = FakeContext()
    small, large = b"a" * 100, b"b" * 15_000  # under the 15,904 bytes left once the margin is kept
    over = "é" * 3_000  # 3,000 characters, 18,000 bytes once TorchServe escapes them to \\u00e9
    answers = handler.handle([{"body": small}, {"body": over.encode()}, {"body": large}], context)
    assert answers[0] == {"echo": small.decode()}
    assert answers[2] == {"echo": large.decode()}
    assert 0 not in context.statuses
    assert 2 not in context.statuses
    code, phrase = context.statuses[1]
    assert code == 413
    assert phrase.isascii()
    assert "answer would be" in phrase
    assert answers[1]["code"] == 413
    assert answers[1]["type"] == "ResponseTooLarge"
    assert context.content_types[1] == "application/json"
    assert reply_size(answers[1]) < 1000


def test_reply_size_is_what_torchserve_worker_writes_for_the_reply() -> None:
    """The size checked is the one ``ts.protocol.otf_message_handler`` frames the answer with."""
    bodies = [{"echo": "é\u2603" * 50, "n": [1.5, 2, None]}, b"\x00binary", "text ☃", ["a", {"b": 1}]]
    context = FakeContext()
    message = otf_message_handler.create_predict_response(
        bodies, {i: f"req-{i}" for i in range(len(bodies))}, "ok", 200, context
    )
    stream = io.BytesIO(bytes(message))
    stream.read(8 + len(b"ok"))  # code, message length, message
    for i, body in enumerate(bodies):
        for _ in range(2):  # request id, content type
            (length,) = struct.unpack("!i", stream.read(4))
            stream.read(length)
        stream.read(4)  # status
        (length,) = struct.unpack("!i", stream.read(4))
        stream.read(length)  # phrase
        (headers,) = struct.unpack("!i", stream.read(4))
        assert headers == 0
        (length,) = struct.unpack("!i", stream.read(4))
        assert length == reply_size(body), f"body {i}"
        stream.read(length)


def test_response_limit_follows_the_environment_and_falls_back_to_torchserves_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(base.MAX_RESPONSE_ENV, raising=False)
    assert response_limit() == base.TORCHSERVE_MAX_RESPONSE_SIZE - base.RESPONSE_MARGIN
    monkeypatch.setenv(base.MAX_RESPONSE_ENV, "")
    assert response_limit() == base.TORCHSERVE_MAX_RESPONSE_SIZE - base.RESPONSE_MARGIN
    monkeypatch.setenv(base.MAX_RESPONSE_ENV, "many")
    assert response_limit() == base.TORCHSERVE_MAX_RESPONSE_SIZE - base.RESPONSE_MARGIN
    monkeypatch.setenv(base.MAX_RESPONSE_ENV, "1000000")
    assert response_limit() == 1_000_000 - base.RESPONSE_MARGIN


# ------------------------------------------------------------------------------------ the echoed OIP id
def _oip_request(request_id: Any) -> dict:
    return {"id": request_id, "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 1], "data": [0.5]}]}


def test_an_oip_id_of_the_largest_allowed_length_is_accepted_and_a_longer_one_refused() -> None:
    limit = protocols.MAX_REQUEST_ID_CHARS
    assert protocols.oip_input(_oip_request("x" * limit), b"", ["pixels"]).request_id == "x" * limit
    with pytest.raises(InvalidInput, match=f"'id' is {limit + 1} characters long; the limit is {limit}"):
        protocols.oip_input(_oip_request("x" * (limit + 1)), b"", ["pixels"])


def test_an_id_of_megabytes_is_refused_on_the_binary_path_too() -> None:
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 8}}
    header = json.dumps({"id": "i" * 2_400_000, "inputs": [tensor]}).encode()
    body = header + struct.pack("<I", 4) + b"\x89PNG"
    headers = {protocols.BINARY_HEADER: str(len(header))}
    with pytest.raises(InvalidInput, match="'id' is 2400000 characters long"):
        protocols.decode({"body": body}, headers, ProtocolConfig(), (1, 8, 8))


# ------------------------------------------------------------------------------------ JSON container bombs
def _bomb(size: int) -> bytes:
    """``size`` bytes of one JSON list of empty lists: about ``size / 3`` containers."""
    count = (size - 2) // 3
    return b"[" + b"[]," * (count - 1) + b"[]]"


def test_a_container_bomb_is_refused_before_parsing_in_little_time_and_memory() -> None:
    body = _bomb(6_400_000)
    count = body.count(b"[")
    tracemalloc.start()
    try:
        started = time.perf_counter()
        with pytest.raises(PayloadTooLarge, match=f"holds {count} arrays and objects; the limit is 100000"):
            json_body.parse_json(body)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes allocated to refuse the body"
    assert elapsed < 1.0


@pytest.mark.parametrize("opener", [b"{", b"["])
def test_objects_and_arrays_count_alike_and_the_limit_itself_is_accepted(opener: bytes) -> None:
    element = b'{"k":1}' if opener == b"{" else b"[1]"
    limit = 1000
    document = b"[" + b",".join([element] * (limit - 1)) + b"]"
    assert len(json_body.parse_json(document, limit=limit)) == limit - 1
    with pytest.raises(PayloadTooLarge):
        json_body.parse_json(b"[" + b",".join([element] * limit) + b"]", limit=limit)


def test_a_large_legitimate_tensor_in_nested_json_is_under_the_limit() -> None:
    """32 preprocessed ResNet inputs as nested JSON lists: 21,637 arrays and objects, under the limit."""
    image = [[[0.0] * 224 for _ in range(224)] for _ in range(3)]
    document = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [32, 3, 224, 224],
                                       "data": [image] * 32}]}).encode()  # fmt: skip
    assert json_body.container_count(document) == 5 + 32 * (1 + 3 + 3 * 224)  # the envelope, then per image
    assert json_body.parse_json(document)["inputs"][0]["shape"] == [32, 3, 224, 224]


@pytest.mark.parametrize(
    ("text", "error", "phrase"),
    [
        (b'{"a": ', InvalidInput, "malformed JSON body"),
        (b"\xff{}", InvalidInput, "not valid UTF-8"),
        (b"[" * 50_000 + b"]" * 50_000, InvalidInput, "nested too deeply"),
        (b"[" * 100_001, PayloadTooLarge, "the limit is 100000"),
    ],
)
def test_malformed_bodies_fail_with_one_clear_error(text: bytes, error: type, phrase: str) -> None:
    with pytest.raises(error, match=phrase):
        json_body.parse_json(text)


def test_every_task_parses_its_json_bodies_with_the_bound() -> None:
    """The image, tabular and detector protocols all reach ``json_body.parse_json``."""
    from handlers import detection, image_io, tabular

    bomb = _bomb(400_000)
    with pytest.raises(PayloadTooLarge):
        protocols.decode({"body": b'{"inputs": ' + bomb + b"}"}, {}, ProtocolConfig(), (1, 8, 8))
    with pytest.raises(PayloadTooLarge):
        image_io.extract_image_request({"body": b'{"data": ' + bomb + b"}"})
    assert protocols.parse_json is not json_body.parse_json  # a thin wrapper, the bound inside
    for module in (tabular, detection):
        assert module.protocols.parse_json is protocols.parse_json


# ------------------------------------------------------------------------------------ the worker's decoding
class _Connection:
    """A socket-like reader over the bytes of one input frame of TorchServe's worker protocol."""

    def __init__(self, data: bytes) -> None:
        self.stream = io.BytesIO(data)

    def recv(self, size: int) -> bytes:
        return self.stream.read(size)


def _input_frame(content_type: str, value: bytes) -> bytes:
    name = b"body"
    parts = [struct.pack("!i", len(name)), name, struct.pack("!i", len(content_type)), content_type.encode()]
    return b"".join([*parts, struct.pack("!i", len(value)), value])


def test_after_initialize_torchserves_worker_hands_json_bodies_over_as_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TorchServe's own frame reader, after a handler's ``initialize``: the body is not parsed."""
    monkeypatch.setenv(json_body.DECODE_ENV, "true")  # TorchServe's default; restored after the test
    frame = _input_frame("application/json", b'{"instances": [[]]}')
    parsed = otf_message_handler._retrieve_input_data(_Connection(frame))
    assert parsed["value"] == {"instances": [[]]}  # TorchServe's default: parsed in full, in the worker

    class Stop(Exception):
        pass

    class Ready(EchoHandler):
        def load(self, context: Any, config: Any) -> None:
            raise Stop  # everything after the first lines of initialize is not this test's business

    context = FakeContext(manifest={"model": {"modelName": "echo"}})
    monkeypatch.setattr(base, "CpuBudget", _NoBudget)
    with pytest.raises(Stop):
        Ready().initialize(context)
    parsed = otf_message_handler._retrieve_input_data(_Connection(frame))
    assert parsed["value"] == b'{"instances": [[]]}'
    text = otf_message_handler._retrieve_input_data(_Connection(_input_frame("text/plain", b"[[[]]]")))
    assert text["value"] == b"[[[]]]"


class _NoBudget:
    def __init__(self, **kwargs: Any) -> None:
        pass

    def register(self) -> None:
        pass

    def refresh(self, force: bool = False) -> tuple[int, None]:
        return 1, None

    def spin_advice(self) -> None:
        return None


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b'{"data": "aGk=", "topk": 2}'),
        ("application/json", b"null"),
        ("application/json", b'"a string"'),
        ("application/json", b"{not json"),
        ("application/json", b"\xff\xfe"),
        ("text/plain", b"some text"),
        ("text/plain", b"\xff\xfe"),
        ("application/octet-stream", b"\x89PNG...."),
        ("", b"[1, 2]"),
    ],
)
def test_the_handler_sees_what_torchserves_default_decoding_gives(content_type: str, body: bytes) -> None:
    """``as_torchserve_decodes`` over raw bytes == TorchServe's own frame reader with decoding on."""
    import os

    previous = os.environ.get(json_body.DECODE_ENV)
    os.environ[json_body.DECODE_ENV] = "true"
    try:
        expected = otf_message_handler._retrieve_input_data(_Connection(_input_frame(content_type, body)))["value"]
    finally:
        if previous is None:
            del os.environ[json_body.DECODE_ENV]
        else:
            os.environ[json_body.DECODE_ENV] = previous
    assert json_body.as_torchserve_decodes({"body": body}, {"content-type": content_type}) == {"body": expected}


def test_decoding_in_the_handler_is_bounded_and_leaves_binary_oip_bodies_alone() -> None:
    bomb = _bomb(400_000)
    with pytest.raises(PayloadTooLarge):
        json_body.as_torchserve_decodes({"body": bomb}, {"content-type": "application/json"})
    binary = {"body": b'{"inputs": []}' + bomb}
    headers = {"content-type": "application/json", json_body.BINARY_HEADER: "14"}
    assert json_body.as_torchserve_decodes(binary, headers) is binary


def test_a_bomb_in_a_batch_fails_only_its_own_request(monkeypatch: pytest.MonkeyPatch) -> None:
    handler = echo_handler(100_000, monkeypatch)

    context = FakeContext()
    context.reset(headers=[{"Content-Type": "application/json"}] * 3)
    answers = handler.handle([{"body": b'"fine"'}, {"body": _bomb(400_000)}, {"body": b'"also fine"'}], context)
    assert answers[0] == {"echo": "fine"}
    assert answers[2] == {"echo": "also fine"}
    assert context.statuses[1][0] == 413
    assert answers[1]["type"] == "PayloadTooLarge"
