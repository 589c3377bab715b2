"""Hostile Open Inference Protocol v2 and KServe v1 requests for the digits model, built in memory.

``corpus()`` returns ``OipCase`` objects: a name, the route (``v2``: ``POST /v2/models/NAME/infer``;
``v1``: ``POST /v1/models/NAME:predict``), the exact body bytes and extra HTTP headers a client
sends, and the answer the served digits model must give: an exact 4xx status and a phrase the JSON
``error`` text contains (case-insensitive). Every case reaches the handler (none is refused by the
frontend), so every answer is the handler's JSON error body (``{"error", "code", "type"}``).

The requests are what KServe / Triton clients send: a JSON document with Content-Type
``application/json`` (TorchServe's worker parses it before the handler sees it, or forwards the
bytes when that fails), or the binary tensor extension: a JSON header, then raw tensor bytes, the
header's length in ``Inference-Header-Content-Length`` (Content-Type ``application/octet-stream``).
``BYTES`` tensors in binary are, per element, a uint32 little-endian length and the bytes.

``stage`` says which part of the handler refuses a case: ``decode`` (``handlers.protocols.decode``,
before any image is looked at) or ``element`` (the handler's ``prepare``: one element's image, or
the ``top_k`` option, validated against the model's classes). ``handler_request`` models what
TorchServe 0.12 hands the handler for a case, so the decode-stage expectations can be checked in
process (``protocols.decode(request, headers, ProtocolConfig(), (1, 16, 16))``).

The statuses are exactly those ``handlers/protocols.py`` and ``handlers/image_io.py`` produce: 400
for a malformed request, 413 for more elements than ``max_images`` (32) in one request, and for an
element that is not an image, the image status (415), its message prefixed with where the element
is (``input[1]: ...`` / ``instances[1]: ...``). Everything is deterministic and small (the largest
body is 33 tiny KServe v1 instances).

``good_request(index)`` builds the valid requests the mixed batches interleave with the hostile
ones, cycling through the protocol forms (JSON and binary BYTES images, several images in one
request, FP32 pixels, KServe v1), each with the digits it must read.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np

from tests.hostile_corpus import ERROR_TYPES, _ts_decode, digit_png

V2, V1 = "v2", "v1"
DECODE, ELEMENT = "decode", "element"
BAD_REQUEST, TOO_LARGE, UNSUPPORTED = 400, 413, 415

JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
BINARY_HEADER = "Inference-Header-Content-Length"

MAX_IMAGES = 32  # handlers.protocols.ProtocolConfig.max_images (the digits spec keeps the default)
NUM_CLASSES = 10
INPUT_SHAPE = (1, 16, 16)
PIXELS_PER_IMAGE = 256

NOT_AN_IMAGE_BYTES = b"this is plain text, not an image at all\n"


def route_path(route: str, model: str) -> str:
    """The HTTP path of ``route`` for ``model`` on TorchServe's inference port."""
    if route == V2:
        return f"/v2/models/{model}/infer"
    if route == V1:
        return f"/v1/models/{model}:predict"
    raise ValueError(f"unknown route {route!r}")


@dataclass(frozen=True)
class OipCase:
    """One hostile protocol request and the 4xx it must get."""

    name: str
    route: str  # V2 | V1
    body: bytes
    headers: Mapping[str, str]
    status: int
    phrase: str  # contained in the JSON ``error`` text (case-insensitive)
    stage: str = DECODE  # DECODE | ELEMENT (see module docstring)

    @property
    def error_type(self) -> str:
        return ERROR_TYPES[self.status]

    def path(self, model: str) -> str:
        return route_path(self.route, model)


# ------------------------------------------------------------------------------------ building blocks
def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def bytes_tensor(elements: list[bytes]) -> bytes:
    """The binary BYTES serialisation (tritonclient's ``serialize_byte_tensor``)."""
    return b"".join(struct.pack("<I", len(element)) + element for element in elements)


def image_input(images: list[bytes], shape: list[int] | None = None, **fields: Any) -> dict:
    """An ``image`` BYTES input with base64 JSON data; ``fields`` override or add keys."""
    tensor = {"name": "image", "datatype": "BYTES", "shape": shape or [len(images)], "data": [b64(i) for i in images]}
    return {**tensor, **fields}


def binary_input(name: str, datatype: str, shape: list[int], size: Any) -> dict:
    """An input whose data follows the JSON header (``binary_data_size`` is ``size``, any type)."""
    return {"name": name, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": size}}


def oip_image_body(payload: bytes) -> tuple[bytes, dict[str, str]]:
    """``payload`` as the one element of a binary BYTES ``image`` tensor: the body and its headers."""
    raw = bytes_tensor([payload])
    header = json.dumps({"inputs": [binary_input("image", "BYTES", [1], len(raw))]}).encode()
    return header + raw, {"Content-Type": BINARY_TYPE, BINARY_HEADER: str(len(header))}


def pixels_input(values: list, shape: list[int] | None = None, datatype: str = "FP32") -> dict:
    return {"name": "pixels", "datatype": datatype, "shape": shape or [1, *INPUT_SHAPE], "data": values}


def v2_json(name: str, document: Any, status: int, phrase: str, stage: str = DECODE) -> OipCase:
    """An OIP request in JSON (``json.dumps``: NaN and Infinity are written as Python does)."""
    body = json.dumps(document).encode()
    return OipCase(name, V2, body, {"Content-Type": JSON_TYPE}, status, phrase, stage)


def v2_text(name: str, text: bytes, status: int, phrase: str) -> OipCase:
    """An OIP request whose body is ``text`` verbatim, labelled application/json."""
    return OipCase(name, V2, text, {"Content-Type": JSON_TYPE}, status, phrase)


def v2_binary(
    name: str,
    header: Any,
    tail: bytes,
    status: int,
    phrase: str,
    header_length: str | None = None,
    stage: str = DECODE,
) -> OipCase:
    """A binary-extension request: ``header`` (a document, or bytes verbatim), then ``tail``."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = str(len(head)) if header_length is None else header_length
    headers = {"Content-Type": BINARY_TYPE, BINARY_HEADER: length}
    return OipCase(name, V2, head + tail, headers, status, phrase, stage)


def v1_json(name: str, document: Any, status: int, phrase: str, stage: str = DECODE) -> OipCase:
    return OipCase(name, V1, json.dumps(document).encode(), {"Content-Type": JSON_TYPE}, status, phrase, stage)


def fp32(values: list[float]) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


# ------------------------------------------------------------------------------------ the corpus
BYTES_REQUIRED = "must have datatype BYTES"
FP32_REQUIRED = "must have datatype FP32"
INPUTS_REQUIRED = "'inputs' must be a non-empty list of tensors"
OVER_LIMIT = f"images in one request; the limit is {MAX_IMAGES}"
TOPK_RANGE = f"topk must be between 1 and {NUM_CLASSES}"
HEADER_LENGTH = "Inference-Header-Content-Length is"
NAN = "holds NaN or infinite values"
NOT_AN_IMAGE = "body is not an image"  # handlers.image_io, prefixed with the element's place
CORRUPT = "image data is corrupt or truncated"


def _cases() -> list[OipCase]:
    png, png2 = digit_png(3), digit_png(5)
    one = [image_input([png])]
    raw1 = bytes_tensor([png])
    raw2 = bytes_tensor([png, png2])
    bin1 = [binary_input("image", "BYTES", [1], len(raw1))]
    zeros = [0.0] * PIXELS_PER_IMAGE
    header1 = json.dumps({"inputs": bin1}).encode()
    return [
        # --- wrong datatype ---------------------------------------------------------------------------
        v2_json("image_datatype_fp64", {"inputs": [image_input([png], datatype="FP64")]}, 400, BYTES_REQUIRED),
        v2_json("image_datatype_int32", {"inputs": [image_input([png], datatype="INT32")]}, 400, BYTES_REQUIRED),
        v2_json("image_datatype_missing", {"inputs": [{**one[0], "datatype": None}]}, 400, BYTES_REQUIRED),
        v2_binary(
            "binary_image_datatype_fp32",
            {"inputs": [binary_input("image", "FP32", [1], len(raw1))]},
            raw1,
            400,
            BYTES_REQUIRED,
        ),
        v2_json(
            "pixels_datatype_bytes", {"inputs": [pixels_input([b64(png)] * 256, datatype="BYTES")]}, 400, FP32_REQUIRED
        ),
        v2_json("pixels_datatype_fp64", {"inputs": [pixels_input(zeros, datatype="FP64")]}, 400, FP32_REQUIRED),
        # --- shape and data disagree --------------------------------------------------------------------
        v2_json(
            "image_shape_2_with_one_element",
            {"inputs": [image_input([png], shape=[2])]},
            400,
            "holds 1 elements; its shape [2] needs 2",
        ),
        v2_json(
            "image_shape_1_with_two_elements",
            {"inputs": [image_input([png, png2], shape=[1])]},
            400,
            "holds more elements than its shape (1)",
        ),
        v2_binary(
            "binary_image_shape_3_with_data_for_2",
            {"inputs": [binary_input("image", "BYTES", [3], len(raw2))]},
            raw2,
            400,
            "binary data ends before element 2 of 3",
        ),
        v2_json("image_shape_1x2", {"inputs": [image_input([png, png2], shape=[1, 2])]}, 400, "must be [N] or [N, 1]"),
        v2_json(
            "image_shape_not_a_list", {"inputs": [image_input([png], shape=1)]}, 400, "a list of 1 to 8 dimensions"
        ),
        v2_json("image_shape_empty", {"inputs": [{**one[0], "shape": []}]}, 400, "a list of 1 to 8 dimensions"),
        v2_json("image_shape_negative", {"inputs": [image_input([png], shape=[-1])]}, 400, "non-negative integers"),
        v2_json("image_shape_float", {"inputs": [image_input([png], shape=[1.0])]}, 400, "non-negative integers"),
        v2_json("image_shape_zero", {"inputs": [image_input([], shape=[0])]}, 400, "no images in the request"),
        v2_json(
            "image_data_not_base64",
            {"inputs": [image_input([png], data=["!!not base64!!"])]},
            400,
            "data[0] is not valid base64",
        ),
        v2_json("image_data_number", {"inputs": [image_input([png], data=[12345])]}, 400, "must be a base64 string"),
        v2_json("image_data_empty_string", {"inputs": [image_input([png], data=[""])]}, 400, "data[0] is empty"),
        v2_json(
            "pixels_shape_1x1x16x16_with_10_numbers",
            {"inputs": [pixels_input([0.5] * 10)]},
            400,
            "holds 10 numbers; its shape [1, 1, 16, 16] needs 256",
        ),
        v2_json(
            "pixels_shape_1x3x16x16",
            {"inputs": [pixels_input(zeros * 3, shape=[1, 3, 16, 16])]},
            400,
            "shape must be [N, 1, 16, 16], got [1, 3, 16, 16]",
        ),
        v2_json(
            "pixels_shape_without_batch",
            {"inputs": [pixels_input(zeros, shape=[1, 16, 16])]},
            400,
            "shape must be [N, 1, 16, 16], got [1, 16, 16]",
        ),
        v2_json(
            "pixels_data_strings",
            {"inputs": [pixels_input(["0.5"] * PIXELS_PER_IMAGE)]},
            400,
            "must hold numbers only",
        ),
        v2_json(
            "pixels_data_nested_too_deep",
            {"inputs": [pixels_input([[[[[[[[[[0.0]]]]]]]]]])]},
            400,
            "nested deeper than its shape allows",
        ),
        v2_binary(
            "binary_pixels_1000_bytes_for_1024",
            {"inputs": [binary_input("pixels", "FP32", [1, 1, 16, 16], 1000)]},
            b"\0" * 1000,
            400,
            "needs 1024 bytes of FP32, got 1000",
        ),
        # --- missing, extra or unknown tensors ----------------------------------------------------------
        # A JSON object with neither "inputs" nor "instances" is read as servekit's own form.
        v2_json("no_inputs_key", {"id": "a", "outputs": [{"name": "labels"}]}, 400, "JSON body has no image"),
        v2_binary("binary_no_inputs_key", {"id": "a"}, b"", 400, INPUTS_REQUIRED),
        v2_json("inputs_empty_list", {"inputs": []}, 400, INPUTS_REQUIRED),
        v2_json("inputs_not_a_list", {"inputs": one[0]}, 400, INPUTS_REQUIRED),
        v2_json("inputs_null", {"inputs": None}, 400, INPUTS_REQUIRED),
        v2_json("input_not_an_object", {"inputs": ["abc"]}, 400, "each input must be an object"),
        v2_json(
            "input_without_data",
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1]}]},
            400,
            "input 'image' has no data",
        ),
        v2_json("two_inputs", {"inputs": [one[0], pixels_input(zeros)]}, 400, "expected exactly one input tensor"),
        v2_json("two_image_inputs", {"inputs": [one[0], one[0]]}, 400, "one of ['image', 'pixels']; got 2"),
        v2_json(
            "unknown_input_name", {"inputs": [image_input([png], name="input__0")]}, 400, "unknown input 'input__0'"
        ),
        v2_json(
            "input_name_missing", {"inputs": [{k: v for k, v in one[0].items() if k != "name"}]}, 400, "unknown input"
        ),
        v2_json(
            "unknown_output_name",
            {"inputs": one, "outputs": [{"name": "probabilities"}]},
            400,
            "unknown output 'probabilities'",
        ),
        v2_json(
            "duplicate_outputs",
            {"inputs": one, "outputs": [{"name": "labels"}, {"name": "labels"}]},
            400,
            "output 'labels' is requested twice",
        ),
        v2_json("outputs_empty_list", {"inputs": one, "outputs": []}, 400, "'outputs' must be a non-empty list"),
        v2_json("output_not_an_object", {"inputs": one, "outputs": ["labels"]}, 400, "unknown output"),
        v2_json(
            "output_binary_data_yes",
            {"inputs": one, "outputs": [{"name": "scores", "parameters": {"binary_data": "yes"}}]},
            400,
            "parameters.binary_data must be true or false",
        ),
        # --- not an OIP document ----------------------------------------------------------------------
        v2_json("json_array_of_inputs", one, 400, "must be an object"),
        v2_binary("binary_header_json_array", b"[1, 2, 3]", b"", 400, "must be a JSON object with 'inputs'"),
        v2_binary("binary_header_json_number", b"12345", b"", 400, "must be a JSON object with 'inputs'"),
        v2_text("malformed_json", b'{"inputs": [{"name": "image", ', 400, "malformed JSON"),
        v2_text("json_trailing_garbage", json.dumps({"inputs": one}).encode() + b" and more", 400, "malformed JSON"),
        v2_binary("binary_header_malformed_json", b'{"inputs": [', b"", 400, "are not a JSON header"),
        v2_binary("binary_header_not_utf8", b'{"inputs": "\xff\xfe"}', b"", 400, "not valid UTF-8"),
        # --- request-level fields of the wrong type ---------------------------------------------------
        v2_json("id_is_a_number", {"id": 5, "inputs": one}, 400, "'id' must be a string, got int"),
        v2_json("id_is_an_object", {"id": {"x": 1}, "inputs": one}, 400, "'id' must be a string, got dict"),
        v2_json("parameters_not_an_object", {"inputs": one, "parameters": [1]}, 400, "'parameters' must be an object"),
        v2_json(
            "input_parameters_not_an_object",
            {"inputs": [{**one[0], "parameters": "binary"}]},
            400,
            "input 'image'.parameters must be an object",
        ),
        v2_json(
            "binary_data_output_yes",
            {"inputs": one, "parameters": {"binary_data_output": "yes"}},
            400,
            "parameters.binary_data_output must be true or false",
        ),
        v2_json("top_k_0", {"inputs": one, "parameters": {"top_k": 0}}, 400, f"{TOPK_RANGE}, got 0", stage=ELEMENT),
        v2_json("top_k_11", {"inputs": one, "parameters": {"top_k": 11}}, 400, f"{TOPK_RANGE}, got 11", stage=ELEMENT),
        v2_json(
            "top_k_x", {"inputs": one, "parameters": {"top_k": "x"}}, 400, "topk must be an integer", stage=ELEMENT
        ),
        v2_json(
            "top_k_float", {"inputs": one, "parameters": {"top_k": 2.5}}, 400, "topk must be an integer", stage=ELEMENT
        ),
        # --- the binary extension's lengths -----------------------------------------------------------
        v2_binary("header_length_not_an_integer", header1, raw1, 400, "must be an integer, got 'abc'", "abc"),
        v2_binary("header_length_float", header1, raw1, 400, "must be an integer", "12.5"),
        v2_binary("header_length_empty", header1, raw1, 400, "must be an integer", ""),
        v2_binary("header_length_negative", header1, raw1, 400, f"{HEADER_LENGTH} -5 but the body has", "-5"),
        v2_binary("header_length_0", header1, raw1, 400, f"{HEADER_LENGTH} 0 but the body has", "0"),
        v2_binary("header_length_1", header1, raw1, 400, f"{HEADER_LENGTH} 1 but the body has", "1"),
        v2_binary(
            "header_length_longer_than_body",
            header1,
            raw1,
            400,
            f"{HEADER_LENGTH} {len(header1) + len(raw1) + 1} but the body has {len(header1) + len(raw1)} bytes",
            str(len(header1) + len(raw1) + 1),
        ),
        v2_binary("header_length_huge", header1, raw1, 400, f"{HEADER_LENGTH} {2**63} but", str(2**63)),
        v2_binary("header_length_splits_json", header1, raw1, 400, "are not a JSON header", str(len(header1) // 2)),
        v2_binary(
            "header_length_reaches_into_tensor", header1, raw1, 400, "are not a JSON header", str(len(header1) + 3)
        ),
        v2_binary(
            "binary_data_size_larger_than_tail",
            {"inputs": [binary_input("image", "BYTES", [1], len(raw1) + 50)]},
            raw1,
            400,
            f"binary_data_size is {len(raw1) + 50} but {len(raw1)} bytes follow the header",
        ),
        v2_binary(
            "binary_data_size_smaller_than_tail",
            {"inputs": [binary_input("image", "BYTES", [1], 10)]},
            raw1,
            400,
            f"binary_data_size is 10 but {len(raw1)} bytes follow the header",
        ),
        v2_binary(
            "binary_data_size_negative",
            {"inputs": [binary_input("image", "BYTES", [1], -1)]},
            raw1,
            400,
            "binary_data_size must be a non-negative integer",
        ),
        v2_binary(
            "binary_data_size_string",
            {"inputs": [binary_input("image", "BYTES", [1], str(len(raw1)))]},
            raw1,
            400,
            "binary_data_size must be a non-negative integer",
        ),
        v2_binary(
            "binary_tail_without_binary_data_size",
            {"inputs": one},
            raw1,
            400,
            f"{len(raw1)} binary bytes follow the header but no input declares binary_data_size",
        ),
        v2_binary(
            "binary_and_json_data_together",
            {"inputs": [{**bin1[0], "data": one[0]["data"]}]},
            raw1,
            400,
            "has both data and binary_data_size",
        ),
        v2_binary(
            "bytes_element_length_overruns",
            {"inputs": [binary_input("image", "BYTES", [1], len(raw1))]},
            struct.pack("<I", len(png) + 100) + png,
            400,
            f"element 0 declares {len(png) + 100} bytes but only",
        ),
        v2_binary(
            "bytes_leftover_after_elements",
            {"inputs": [binary_input("image", "BYTES", [1], len(raw1) + 7)]},
            raw1 + b"leftovr",
            400,
            "7 bytes left over after 1 elements",
        ),
        v2_binary(
            "bytes_zero_length_element",
            {"inputs": [binary_input("image", "BYTES", [2], 4 + len(raw1))]},
            struct.pack("<I", 0) + raw1,
            400,
            "element 0 is empty",
        ),
        v2_binary(
            "bytes_length_prefix_cut",
            {"inputs": [binary_input("image", "BYTES", [1], 2)]},
            b"\x10\x00",
            400,
            "binary data ends before element 0 of 1",
        ),
        # --- huge declared sizes: refused from the numbers, nothing allocated ---------------------------
        v2_json("image_shape_10e12", {"inputs": [image_input([png], shape=[10**12])]}, 413, OVER_LIMIT),
        v2_json("image_shape_100", {"inputs": [image_input([png], shape=[100])]}, 413, f"100 {OVER_LIMIT}"),
        v2_json("image_shape_33", {"inputs": [image_input([png] * 33)]}, 413, f"33 {OVER_LIMIT}"),
        v2_json("pixels_shape_10e12", {"inputs": [pixels_input(zeros, shape=[10**12, 1, 16, 16])]}, 413, OVER_LIMIT),
        v2_binary(
            "binary_image_shape_10e12",
            {"inputs": [binary_input("image", "BYTES", [10**12], len(raw1))]},
            raw1,
            413,
            OVER_LIMIT,
        ),
        v2_binary(
            "binary_data_size_2_pow_40",
            {"inputs": [binary_input("image", "BYTES", [1], 2**40)]},
            raw1,
            400,
            f"binary_data_size is {2**40} but {len(raw1)} bytes follow",
        ),
        v2_binary(
            "bytes_element_length_0xffffffff",
            {"inputs": [binary_input("image", "BYTES", [1], len(raw1))]},
            struct.pack("<I", 0xFFFFFFFF) + png,
            400,
            "element 0 declares 4294967295 bytes but only",
        ),
        # --- values that are not numbers ----------------------------------------------------------------
        v2_binary(
            "binary_pixels_nan",
            {"inputs": [binary_input("pixels", "FP32", [1, 1, 16, 16], 1024)]},
            fp32([0.0] * 100 + [float("nan")] + [0.0] * 155),
            400,
            NAN,
        ),
        v2_binary(
            "binary_pixels_inf",
            {"inputs": [binary_input("pixels", "FP32", [1, 1, 16, 16], 1024)]},
            fp32([float("inf")] + [0.0] * 255),
            400,
            NAN,
        ),
        # Not standard JSON, but json.loads (TorchServe's worker, and the handler) reads NaN / -Infinity.
        v2_json("json_pixels_nan", {"inputs": [pixels_input([float("nan")] * PIXELS_PER_IMAGE)]}, 400, NAN),
        v2_json("json_pixels_minus_inf", {"inputs": [pixels_input([float("-inf")] + zeros[1:])]}, 400, NAN),
        # --- one bad element among good ones: the message says which ----------------------------------
        v2_json(
            "non_image_element_among_good",
            {"inputs": [image_input([png, NOT_AN_IMAGE_BYTES, png2])]},
            415,
            f"input[1]: {NOT_AN_IMAGE}",
            stage=ELEMENT,
        ),
        v2_binary(
            "binary_truncated_png_among_good",
            {"inputs": [binary_input("image", "BYTES", [3], len(bytes_tensor([png, png[:200], png2])))]},
            bytes_tensor([png, png[:200], png2]),
            400,
            f"input[1]: {CORRUPT}",
            stage=ELEMENT,
        ),
        v2_json(
            "bad_base64_element_among_good",
            {"inputs": [image_input([png, png2], data=[b64(png), "%%%", b64(png2)], shape=[3])]},
            400,
            "data[1] is not valid base64",
        ),
        # --- KServe v1 ------------------------------------------------------------------------------------
        v1_json("v1_instances_not_a_list", {"instances": {"data": b64(png)}}, 400, "'instances' must be a list"),
        v1_json("v1_instances_string", {"instances": b64(png)}, 400, "'instances' must be a list of images, got str"),
        v1_json("v1_instances_empty", {"instances": []}, 400, "no images in the request"),
        v1_json(
            "v1_instance_without_data",
            {"instances": [{"data": b64(png)}, {"picture": b64(png)}]},
            400,
            "instances[1]: expected an object with a base64 image",
        ),
        v1_json(
            "v1_bad_base64_second",
            {"instances": [{"data": b64(png)}, {"data": "!!not base64!!"}]},
            400,
            "instances[1].data is not valid base64",
        ),
        v1_json(
            "v1_bare_bad_base64_second", {"instances": [b64(png), "@@@@"]}, 400, "instances[1] is not valid base64"
        ),
        v1_json("v1_instance_number", {"instances": [7]}, 400, "instances[0] must be a base64 string, got int"),
        v1_json(
            "v1_instance_data_null", {"instances": [{"b64": None}]}, 400, "instances[0].b64 must be a base64 string"
        ),
        v1_json(
            "v1_non_image_second",
            {"instances": [{"data": b64(png)}, {"data": b64(NOT_AN_IMAGE_BYTES)}]},
            415,
            f"instances[1]: {NOT_AN_IMAGE}",
            stage=ELEMENT,
        ),
        v1_json("v1_33_instances", {"instances": [{"data": b64(png)}] * 33}, 413, f"instances: 33 {OVER_LIMIT}"),
        v1_json(
            "v1_parameters_not_an_object",
            {"instances": [b64(png)], "parameters": "x"},
            400,
            "'parameters' must be an object",
        ),
        v1_json(
            "v1_top_k_0",
            {"instances": [b64(png)], "parameters": {"top_k": 0}},
            400,
            f"{TOPK_RANGE}, got 0",
            stage=ELEMENT,
        ),
        v1_json(
            "v1_topk_text", {"instances": [b64(png)], "topk": "many"}, 400, "topk must be an integer", stage=ELEMENT
        ),
    ]


@cache
def corpus() -> tuple[OipCase, ...]:
    cases = tuple(_cases())
    names = [case.name for case in cases]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    assert not duplicates, f"duplicate case names: {duplicates}"
    return cases


def handler_request(case: OipCase) -> tuple[dict, dict[str, str]]:
    """The request dict and lower-cased headers TorchServe 0.12 hands the handler for ``case``."""
    headers = {name.lower(): value for name, value in case.headers.items()}
    return {"body": _ts_decode(case.body, headers.get("content-type", ""))}, headers


def summary() -> dict[str, int]:
    """Counts by route and expected status, for reports."""
    counts: dict[str, int] = {}
    for case in corpus():
        key = f"{case.route} {case.status}"
        counts[key] = counts.get(key, 0) + 1
    return counts


# ------------------------------------------------------------------------------------ good requests
@dataclass(frozen=True)
class GoodRequest:
    """A valid protocol request and the digit each of its elements must read."""

    label: str
    route: str
    body: bytes
    headers: Mapping[str, str]
    digits: tuple[int, ...]
    binary_output: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    def path(self, model: str) -> str:
        return route_path(self.route, model)


GOOD_FORMS = ("json_image", "binary_image", "json_images_3", "json_pixels", "binary_pixels", "v1_instances")


@cache
def digit_pixels(digit: int) -> np.ndarray:
    """The digits model's input tensor for the shipped sample of ``digit``, as the handler makes it."""
    from pathlib import Path

    from handlers.image_io import decode_image
    from handlers.transforms import ImagePreprocessor
    from servekit.build.spec import load_spec

    spec = next(s for s in load_spec(Path(__file__).resolve().parent.parent / "models.yaml") if s.name == "digits")
    config = spec.handler_config()
    transform = ImagePreprocessor(config.preprocessing)
    image = decode_image(digit_png(digit), config.limits, transform.min_decode_side)
    array = transform(image).numpy().astype("<f4")
    assert array.shape == INPUT_SHAPE, array.shape
    return array


def good_request(index: int) -> GoodRequest:
    """The ``index``-th good request: cycles through digits and ``GOOD_FORMS``."""
    digit, form = index % 10, GOOD_FORMS[index % len(GOOD_FORMS)]
    png = digit_png(digit)
    label = f"good {form}:{digit}"
    json_headers = {"Content-Type": JSON_TYPE}
    if form == "json_image":
        document = {"id": f"good-{index}", "inputs": [image_input([png])]}
        return GoodRequest(label, V2, json.dumps(document).encode(), json_headers, (digit,))
    if form == "binary_image":
        raw = bytes_tensor([png])
        header = json.dumps(
            {"inputs": [binary_input("image", "BYTES", [1], len(raw))], "parameters": {"binary_data_output": True}}
        ).encode()
        headers = {"Content-Type": BINARY_TYPE, BINARY_HEADER: str(len(header))}
        return GoodRequest(label, V2, header + raw, headers, (digit,), binary_output=True)
    if form == "json_images_3":
        digits = (digit, (digit + 3) % 10, (digit + 6) % 10)
        document = {"inputs": [image_input([digit_png(d) for d in digits])], "parameters": {"top_k": 2}}
        return GoodRequest(label, V2, json.dumps(document).encode(), json_headers, digits)
    if form == "json_pixels":
        document = {"inputs": [pixels_input(digit_pixels(digit).ravel().tolist())]}
        return GoodRequest(label, V2, json.dumps(document).encode(), json_headers, (digit,))
    if form == "binary_pixels":
        raw = digit_pixels(digit).tobytes()
        header = json.dumps({"inputs": [binary_input("pixels", "FP32", [1, *INPUT_SHAPE], len(raw))]}).encode()
        headers = {"Content-Type": BINARY_TYPE, BINARY_HEADER: str(len(header))}
        return GoodRequest(label, V2, header + raw, headers, (digit,))
    document = {"instances": [{"data": b64(png)}, b64(digit_png((digit + 1) % 10))]}
    return GoodRequest(label, V1, json.dumps(document).encode(), json_headers, (digit, (digit + 1) % 10))
