"""handlers.protocols: reading native, KServe v1 and OIP v2 requests, and answering them.

Binary OIP bodies are built exactly as ``tritonclient.http`` builds them (``_get_inference_request``):
the JSON header with ``json.dumps`` defaults, then every binary input's raw data, and the JSON
part's length in ``Inference-Header-Content-Length``.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import struct
import tracemalloc

import numpy as np
import pytest

from handlers import protocols
from handlers.errors import InvalidInput, PayloadTooLarge
from handlers.protocols import (
    BINARY_HEADER,
    Call,
    Classification,
    ProtocolConfig,
    Reply,
    decode,
    element_error,
    oip_metadata,
)

pytestmark = pytest.mark.unit

CONFIG = ProtocolConfig()
SHAPE = (1, 4, 4)  # a small model input: the FP32 tensor input is [N, 1, 4, 4]
PER = 16  # elements of one SHAPE tensor

# Encoded "images": the protocols never decode them, so any bytes that do not look like JSON do.
IMG1 = b"\x89PNG\r\n\x1a\n" + bytes(range(48))
IMG2 = b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(range(200, 256))
IMG3 = b"GIF89a" + b"\x00\x01\x02\x03" * 7


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_json(document: object, config: ProtocolConfig = CONFIG, *, parsed: bool = False) -> Call:
    """Decode ``document`` as TorchServe hands it over: JSON bytes, or already parsed."""
    body = document if parsed else json.dumps(document).encode()
    return decode({"body": body}, {}, config, SHAPE)


def image_input(images: list[bytes], shape: list[int] | None = None, name: str = "image") -> dict:
    return {"name": name, "datatype": "BYTES", "shape": shape or [len(images)], "data": [b64(i) for i in images]}


def pixel_input(array: np.ndarray, nested: bool = False) -> dict:
    data = array.tolist() if nested else array.ravel().tolist()
    return {"name": "pixels", "datatype": "FP32", "shape": list(array.shape), "data": data}


# ------------------------------------------------------------------------------ tritonclient bodies
def serialize_bytes_tensor(elements: list[bytes]) -> bytes:
    """tritonclient.utils.serialize_byte_tensor: per element a uint32 LE length, then the bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def triton_body(
    inputs: list[tuple[str, list[int], str, bytes]],
    outputs: list[dict] | None = None,
    request_id: str = "",
    parameters: dict | None = None,
) -> tuple[bytes, str]:
    """A request body and its Inference-Header-Content-Length, as tritonclient.http makes them.

    ``inputs``: (name, shape, datatype, raw binary data) per input.
    """
    request: dict = {}
    params = dict(parameters or {})
    if request_id != "":
        request["id"] = request_id
    request["inputs"] = [
        {"name": name, "shape": shape, "datatype": dtype, "parameters": {"binary_data_size": len(raw)}}
        for name, shape, dtype, raw in inputs
    ]
    if outputs:
        request["outputs"] = outputs
    else:
        params["binary_data_output"] = True
    if params:
        request["parameters"] = params
    header = json.dumps(request)
    raw = b"".join(data for *_, data in inputs)
    body = struct.pack(f"{len(header)}s{len(raw)}s", header.encode(), raw)
    return body, str(len(header))


def decode_binary(body: object, header_length: str, config: ProtocolConfig = CONFIG) -> Call:
    return decode({"body": body}, {BINARY_HEADER: header_length}, config, SHAPE)


def binary_images_body(images: list[bytes], shape: list[int] | None = None, **kwargs) -> tuple[bytes, str]:
    raw = serialize_bytes_tensor(images)
    return triton_body([("image", shape or [len(images)], "BYTES", raw)], **kwargs)


def binary_tail_body(document: dict, tail: bytes) -> tuple[bytes, str]:
    """A hand-made binary body: ``document`` as the JSON header, then ``tail``."""
    header = json.dumps(document).encode()
    return header + tail, str(len(header))


def parse_bytes_tensor(raw: bytes) -> list[bytes]:
    """tritonclient.utils.deserialize_bytes_tensor."""
    out, offset = [], 0
    while offset < len(raw):
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        out.append(raw[offset : offset + length])
        offset += length
    return out


def parse_binary_reply(reply: Reply) -> tuple[dict, dict[str, bytes]]:
    """The JSON header and each binary output's bytes, as tritonclient.http.InferResult reads them."""
    length = int(reply.headers["Inference-Header-Content-Length"])
    header = json.loads(reply.body[:length])
    blobs, offset = {}, length
    for output in header["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        if size is not None:
            blobs[output["name"]] = reply.body[offset : offset + size]
            offset += size
    assert offset == len(reply.body), "bytes left after the last binary output"
    return header, blobs


def raises_invalid(match: str):
    return pytest.raises(InvalidInput, match=match)


# ============================================================================ protocol detection
class TestProtocolDetection:
    def test_raw_image_bytes_are_native(self) -> None:
        call = decode({"body": IMG1}, {}, CONFIG, SHAPE)
        assert call.protocol == "native"
        assert call.images == [IMG1]
        assert call.tensors == []
        assert call.topk is None

    def test_raw_image_bytearray_is_native(self) -> None:
        call = decode({"body": bytearray(IMG2)}, {}, CONFIG, SHAPE)
        assert call.protocol == "native"
        assert call.images == [IMG2]

    def test_image_in_data_field_is_native(self) -> None:
        call = decode({"data": IMG2}, {}, CONFIG, SHAPE)
        assert call.protocol == "native"
        assert call.images == [IMG2]

    def test_json_data_base64_as_bytes_is_native_with_topk(self) -> None:
        call = decode_json({"data": b64(IMG1), "topk": 3})
        assert call.protocol == "native"
        assert call.images == [IMG1]
        assert call.topk == 3

    def test_json_data_base64_already_parsed_is_native(self) -> None:
        call = decode_json({"data": b64(IMG2), "topk": 2}, parsed=True)
        assert call.protocol == "native"
        assert call.images == [IMG2]
        assert call.topk == 2

    def test_json_data_with_leading_whitespace_is_native(self) -> None:
        call = decode({"body": b"  \n" + json.dumps({"data": b64(IMG1)}).encode()}, {}, CONFIG, SHAPE)
        assert call.protocol == "native"
        assert call.images == [IMG1]

    def test_native_call_has_no_oip_fields(self) -> None:
        call = decode({"body": IMG1}, {}, CONFIG, SHAPE)
        assert call.request_id is None
        assert call.outputs is None

    @pytest.mark.parametrize("parsed", [False, True], ids=["bytes", "dict"])
    def test_instances_are_kserve_v1(self, parsed: bool) -> None:
        call = decode_json({"instances": [{"data": b64(IMG1)}]}, parsed=parsed)
        assert call.protocol == "kserve_v1"
        assert call.images == [IMG1]

    @pytest.mark.parametrize("form", ["bytes", "dict", "str"])
    def test_inputs_are_oip_v2(self, form: str) -> None:
        document = {"inputs": [image_input([IMG1])]}
        body = {"bytes": json.dumps(document).encode(), "dict": document, "str": json.dumps(document)}[form]
        call = decode({"body": body}, {}, CONFIG, SHAPE)
        assert call.protocol == "oip_v2"
        assert call.images == [IMG1]

    def test_inputs_win_over_instances(self) -> None:
        call = decode_json({"inputs": [image_input([IMG1])], "instances": [b64(IMG2)]})
        assert call.protocol == "oip_v2"
        assert call.images == [IMG1]

    def test_binary_header_selects_oip_binary_decoding(self) -> None:
        body, length = binary_images_body([IMG1])
        call = decode_binary(body, length)
        assert call.protocol == "oip_v2"
        assert call.images == [IMG1]

    def test_binary_header_with_json_only_body_is_oip(self) -> None:
        header = json.dumps({"inputs": [image_input([IMG3])]}).encode()
        call = decode_binary(header, str(len(header)))
        assert call.protocol == "oip_v2"
        assert call.images == [IMG3]

    def test_binary_header_makes_a_raw_image_an_error_not_native(self) -> None:
        # Once the header is there the body is read as OIP: an image is not a JSON header.
        with raises_invalid("not valid UTF-8|malformed JSON"):
            decode_binary(IMG1, "10")

    def test_malformed_json_body_is_invalid_input(self) -> None:
        with raises_invalid("malformed JSON body"):
            decode({"body": b'{"instances": [1, }'}, {}, CONFIG, SHAPE)

    def test_json_body_not_utf8_is_invalid_input(self) -> None:
        with raises_invalid("not valid UTF-8"):
            decode({"body": b'{"inputs": "\xff\xfe"}'}, {}, CONFIG, SHAPE)


# ============================================================================ KServe v1
class TestKServeV1:
    @pytest.mark.parametrize(
        "instance",
        [
            {"data": b64(IMG1)},
            {"b64": b64(IMG1)},
            {"image": b64(IMG1)},
            b64(IMG1),
            "data:image/png;base64," + b64(IMG1),
            b64(IMG1)[:20] + "\n" + b64(IMG1)[20:],
        ],
        ids=["data", "b64", "image", "bare", "data-uri", "wrapped"],
    )
    def test_instance_forms_give_the_image(self, instance: object) -> None:
        call = decode_json({"instances": [instance]})
        assert call.images == [IMG1]
        assert call.tensors == []

    def test_several_instances_keep_their_order(self) -> None:
        call = decode_json({"instances": [{"data": b64(IMG2)}, b64(IMG1), {"b64": b64(IMG3)}]})
        assert call.images == [IMG2, IMG1, IMG3]
        assert call.size == 3

    def test_parameters_top_k_is_carried(self) -> None:
        call = decode_json({"instances": [b64(IMG1)], "parameters": {"top_k": 4}})
        assert call.topk == 4

    def test_top_level_topk_is_carried_when_no_parameter(self) -> None:
        assert decode_json({"instances": [b64(IMG1)], "topk": 2}).topk == 2

    def test_parameters_top_k_wins_over_topk(self) -> None:
        call = decode_json({"instances": [b64(IMG1)], "topk": 2, "parameters": {"top_k": 5}})
        assert call.topk == 5

    def test_no_top_k_leaves_topk_none(self) -> None:
        assert decode_json({"instances": [b64(IMG1)]}).topk is None

    def test_kserve_call_has_no_oip_fields(self) -> None:
        call = decode_json({"instances": [b64(IMG1)]})
        assert call.request_id is None
        assert call.outputs is None

    def test_bad_base64_names_the_instance_index(self) -> None:
        with raises_invalid(r"instances\[1\] is not valid base64"):
            decode_json({"instances": [b64(IMG1), "not*base64!", b64(IMG2)]})

    def test_bad_base64_in_object_names_index_and_key(self) -> None:
        with raises_invalid(r"instances\[2\]\.b64 is not valid base64"):
            decode_json({"instances": [b64(IMG1), b64(IMG2), {"b64": "%%%"}]})

    def test_instance_object_without_image_key_names_the_index(self) -> None:
        with raises_invalid(r"instances\[1\]: expected an object with a base64 image"):
            decode_json({"instances": [b64(IMG1), {"picture": b64(IMG2)}]})

    @pytest.mark.parametrize("instance", [7, None, [b64(IMG1)], True])
    def test_instance_that_is_not_a_string_is_invalid(self, instance: object) -> None:
        with raises_invalid(r"instances\[0\] must be a base64 string"):
            decode_json({"instances": [instance]})

    def test_empty_base64_instance_is_invalid(self) -> None:
        with raises_invalid(r"instances\[0\]\.data is empty"):
            decode_json({"instances": [{"data": ""}]})

    def test_more_instances_than_max_images_is_payload_too_large(self) -> None:
        config = ProtocolConfig(max_images=2)
        with pytest.raises(PayloadTooLarge, match="3 images in one request; the limit is 2") as info:
            decode_json({"instances": [b64(IMG1)] * 3}, config)
        assert info.value.status == 413

    def test_exactly_max_images_instances_pass(self) -> None:
        config = ProtocolConfig(max_images=2)
        assert decode_json({"instances": [b64(IMG1), b64(IMG2)]}, config).images == [IMG1, IMG2]

    def test_too_many_instances_refused_before_any_decoding(self) -> None:
        # The count is checked first: garbage in the instances does not turn 413 into 400.
        with pytest.raises(PayloadTooLarge):
            decode_json({"instances": ["%%%"] * 33})

    def test_empty_instances_is_invalid_input(self) -> None:
        with raises_invalid("no images in the request") as info:
            decode_json({"instances": []})
        assert info.value.status == 400

    @pytest.mark.parametrize("instances", [{"data": b64(IMG1)}, b64(IMG1), None, 3])
    def test_instances_that_is_not_a_list_is_invalid_input(self, instances: object) -> None:
        with raises_invalid("'instances' must be a list of images"):
            decode_json({"instances": instances})

    @pytest.mark.parametrize("parameters", [[1], "top_k=3", 5])
    def test_parameters_that_is_not_an_object_is_invalid(self, parameters: object) -> None:
        with raises_invalid("'parameters' must be an object"):
            decode_json({"instances": [b64(IMG1)], "parameters": parameters})


# ============================================================================ OIP JSON, image input
class TestOipJsonImages:
    def test_bytes_input_with_shape_n(self) -> None:
        call = decode_json({"inputs": [image_input([IMG1, IMG2])]})
        assert call.protocol == "oip_v2"
        assert call.images == [IMG1, IMG2]
        assert call.tensors == []
        assert call.size == 2

    def test_bytes_input_with_shape_n_1_flat_data(self) -> None:
        call = decode_json({"inputs": [image_input([IMG1, IMG2, IMG3], shape=[3, 1])]})
        assert call.images == [IMG1, IMG2, IMG3]

    def test_bytes_input_with_shape_n_1_nested_data(self) -> None:
        tensor = {"name": "image", "datatype": "BYTES", "shape": [2, 1], "data": [[b64(IMG2)], [b64(IMG1)]]}
        assert decode_json({"inputs": [tensor]}).images == [IMG2, IMG1]

    def test_single_image_data_may_be_a_bare_string(self) -> None:
        tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "data": b64(IMG3)}
        assert decode_json({"inputs": [tensor]}).images == [IMG3]

    def test_data_uri_element_is_accepted(self) -> None:
        tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "data": ["data:image/gif;base64," + b64(IMG3)]}
        assert decode_json({"inputs": [tensor]}).images == [IMG3]

    def test_shape_n_2_is_invalid(self) -> None:
        tensor = image_input([IMG1, IMG2, IMG1, IMG2], shape=[2, 2])
        with raises_invalid(r"shape must be \[N\] or \[N, 1\]"):
            decode_json({"inputs": [tensor]})

    def test_three_dimensional_shape_is_invalid(self) -> None:
        tensor = image_input([IMG1], shape=[1, 1, 1])
        with raises_invalid(r"shape must be \[N\] or \[N, 1\]"):
            decode_json({"inputs": [tensor]})

    def test_fewer_data_elements_than_shape_is_invalid(self) -> None:
        tensor = image_input([IMG1], shape=[2])
        with raises_invalid(r"data holds 1 elements; its shape \[2\] needs 2") as info:
            decode_json({"inputs": [tensor]})
        assert info.value.status == 400

    def test_more_data_elements_than_shape_is_invalid(self) -> None:
        tensor = image_input([IMG1, IMG2, IMG3], shape=[2])
        with raises_invalid(r"holds more elements than its shape \(2\)"):
            decode_json({"inputs": [tensor]})

    def test_bad_base64_element_names_its_index(self) -> None:
        tensor = {"name": "image", "datatype": "BYTES", "shape": [2], "data": [b64(IMG1), "!!"]}
        with raises_invalid(r"input 'image'\.data\[1\] is not valid base64"):
            decode_json({"inputs": [tensor]})

    def test_non_string_element_is_invalid(self) -> None:
        tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [12]}
        with raises_invalid(r"data\[0\] must be a base64 string, got int"):
            decode_json({"inputs": [tensor]})

    @pytest.mark.parametrize("datatype", ["FP32", "UINT8", "bytes", None])
    def test_wrong_datatype_names_the_datatype(self, datatype: str | None) -> None:
        tensor = {**image_input([IMG1]), "datatype": datatype}
        expected = repr(datatype) if datatype is not None else "'null'"
        with raises_invalid("must have datatype BYTES") as info:
            decode_json({"inputs": [tensor]})
        assert f"got {expected}" in str(info.value)

    def test_unknown_input_name_lists_the_known_inputs(self) -> None:
        tensor = image_input([IMG1], name="photo")
        with raises_invalid("unknown input 'photo'") as info:
            decode_json({"inputs": [tensor]})
        assert "['image', 'pixels']" in str(info.value)

    def test_without_tensor_input_only_the_image_input_is_known(self) -> None:
        config = ProtocolConfig(tensor_input=None)
        tensor = pixel_input(np.zeros((1, *SHAPE), np.float32))
        with raises_invalid("unknown input 'pixels'") as info:
            decode_json({"inputs": [tensor]}, config)
        assert "['image']" in str(info.value)

    def test_custom_input_name_is_used(self) -> None:
        config = ProtocolConfig(image_input="jpeg_bytes")
        assert decode_json({"inputs": [image_input([IMG1], name="jpeg_bytes")]}, config).images == [IMG1]
        with raises_invalid("unknown input 'image'"):
            decode_json({"inputs": [image_input([IMG1])]}, config)

    def test_two_inputs_are_invalid(self) -> None:
        with raises_invalid("expected exactly one input tensor") as info:
            decode_json({"inputs": [image_input([IMG1]), image_input([IMG2])]})
        assert "got 2" in str(info.value)

    @pytest.mark.parametrize("inputs", [[], {}, "image", None])
    def test_inputs_not_a_non_empty_list_is_invalid(self, inputs: object) -> None:
        with raises_invalid("'inputs' must be a non-empty list of tensors"):
            decode_json({"inputs": inputs})

    def test_input_not_an_object_is_invalid(self) -> None:
        with raises_invalid("each input must be an object"):
            decode_json({"inputs": [b64(IMG1)]})

    def test_missing_data_is_invalid(self) -> None:
        tensor = {"name": "image", "datatype": "BYTES", "shape": [1]}
        with raises_invalid("has no data"):
            decode_json({"inputs": [tensor]})

    @pytest.mark.parametrize(
        "shape",
        [None, [], "1", [-1], [1.0], [True], [1] * 9, [None]],
        ids=["missing", "empty", "string", "negative", "float", "bool", "nine-dims", "null-dim"],
    )
    def test_malformed_shape_is_invalid(self, shape: object) -> None:
        tensor = {"name": "image", "datatype": "BYTES", "shape": shape, "data": [b64(IMG1)]}
        with raises_invalid(r"input 'image'\.shape must"):
            decode_json({"inputs": [tensor]})

    def test_shape_zero_is_invalid_input(self) -> None:
        tensor = {"name": "image", "datatype": "BYTES", "shape": [0], "data": []}
        with raises_invalid("no images in the request"):
            decode_json({"inputs": [tensor]})

    def test_more_images_than_max_images_is_payload_too_large(self) -> None:
        config = ProtocolConfig(max_images=2)
        with pytest.raises(PayloadTooLarge, match="the limit is 2"):
            decode_json({"inputs": [image_input([IMG1, IMG2, IMG3])]}, config)

    def test_id_is_echoed_as_request_id(self) -> None:
        call = decode_json({"id": "req-42", "inputs": [image_input([IMG1])]})
        assert call.request_id == "req-42"

    def test_no_id_gives_no_request_id(self) -> None:
        assert decode_json({"inputs": [image_input([IMG1])]}).request_id is None

    @pytest.mark.parametrize("request_id", [42, ["a"], {"id": "a"}, True])
    def test_non_string_id_is_invalid(self, request_id: object) -> None:
        with raises_invalid("'id' must be a string") as info:
            decode_json({"id": request_id, "inputs": [image_input([IMG1])]})
        assert type(request_id).__name__ in str(info.value)

    def test_parameters_top_k_is_carried_in_topk(self) -> None:
        call = decode_json({"inputs": [image_input([IMG1])], "parameters": {"top_k": 3}})
        assert call.topk == 3

    def test_top_k_is_passed_raw_for_the_handler_to_validate(self) -> None:
        call = decode_json({"inputs": [image_input([IMG1])], "parameters": {"top_k": "many"}})
        assert call.topk == "many"

    def test_no_parameters_leaves_topk_none(self) -> None:
        assert decode_json({"inputs": [image_input([IMG1])]}).topk is None

    @pytest.mark.parametrize("parameters", [[1], "x", 3])
    def test_parameters_not_an_object_is_invalid(self, parameters: object) -> None:
        with raises_invalid("'parameters' must be an object"):
            decode_json({"inputs": [image_input([IMG1])], "parameters": parameters})

    def test_input_parameters_not_an_object_is_invalid(self) -> None:
        tensor = {**image_input([IMG1]), "parameters": [1]}
        with raises_invalid(r"input 'image'\.parameters must be an object"):
            decode_json({"inputs": [tensor]})

    def test_binary_data_size_without_binary_tail_is_invalid(self) -> None:
        tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 10}}
        with raises_invalid("binary_data_size is 10 but 0 bytes follow the header"):
            decode_json({"inputs": [tensor]})


# ============================================================================ OIP output selection
class TestOipOutputs:
    def test_default_is_every_output_in_config_order_as_json(self) -> None:
        call = decode_json({"inputs": [image_input([IMG1])]})
        assert call.outputs == [("labels", False), ("scores", False), ("indices", False)]

    def test_selection_keeps_the_requested_order(self) -> None:
        outputs = [{"name": "indices"}, {"name": "labels"}]
        call = decode_json({"inputs": [image_input([IMG1])], "outputs": outputs})
        assert call.outputs == [("indices", False), ("labels", False)]

    def test_unknown_output_is_invalid_and_named(self) -> None:
        outputs = [{"name": "labels"}, {"name": "probabilities"}]
        with raises_invalid("unknown output 'probabilities'") as info:
            decode_json({"inputs": [image_input([IMG1])], "outputs": outputs})
        assert "['labels', 'scores', 'indices']" in str(info.value)

    def test_output_without_name_is_invalid(self) -> None:
        with raises_invalid("unknown output 'null'"):
            decode_json({"inputs": [image_input([IMG1])], "outputs": [{"parameters": {}}]})

    def test_output_not_an_object_is_invalid(self) -> None:
        with raises_invalid("unknown output 'null'"):
            decode_json({"inputs": [image_input([IMG1])], "outputs": ["labels"]})

    def test_duplicate_output_is_invalid(self) -> None:
        outputs = [{"name": "scores"}, {"name": "labels"}, {"name": "scores"}]
        with raises_invalid("output 'scores' is requested twice"):
            decode_json({"inputs": [image_input([IMG1])], "outputs": outputs})

    @pytest.mark.parametrize("outputs", [[], {"name": "labels"}, "labels"])
    def test_outputs_not_a_non_empty_list_is_invalid(self, outputs: object) -> None:
        with raises_invalid("'outputs' must be a non-empty list"):
            decode_json({"inputs": [image_input([IMG1])], "outputs": outputs})

    def test_binary_data_output_sets_the_default_for_every_output(self) -> None:
        call = decode_json({"inputs": [image_input([IMG1])], "parameters": {"binary_data_output": True}})
        assert call.outputs == [("labels", True), ("scores", True), ("indices", True)]

    def test_binary_data_output_applies_to_selected_outputs(self) -> None:
        document = {
            "inputs": [image_input([IMG1])],
            "outputs": [{"name": "scores"}],
            "parameters": {"binary_data_output": True},
        }
        assert decode_json(document).outputs == [("scores", True)]

    def test_per_output_binary_data_overrides_the_default(self) -> None:
        document = {
            "inputs": [image_input([IMG1])],
            "outputs": [
                {"name": "labels", "parameters": {"binary_data": False}},
                {"name": "scores"},
                {"name": "indices", "parameters": {"binary_data": True}},
            ],
            "parameters": {"binary_data_output": True},
        }
        assert decode_json(document).outputs == [("labels", False), ("scores", True), ("indices", True)]

    def test_per_output_binary_data_true_without_default(self) -> None:
        document = {
            "inputs": [image_input([IMG1])],
            "outputs": [{"name": "labels", "parameters": {"binary_data": True}}],
        }
        assert decode_json(document).outputs == [("labels", True)]

    @pytest.mark.parametrize("value", [1, "true", None])
    def test_binary_data_output_not_a_boolean_is_invalid(self, value: object) -> None:
        document = {"inputs": [image_input([IMG1])], "parameters": {"binary_data_output": value}}
        with raises_invalid("parameters.binary_data_output must be true or false"):
            decode_json(document)

    def test_per_output_binary_data_not_a_boolean_is_invalid(self) -> None:
        document = {"inputs": [image_input([IMG1])], "outputs": [{"name": "scores", "parameters": {"binary_data": 1}}]}
        with raises_invalid("output 'scores': parameters.binary_data must be true or false"):
            decode_json(document)

    def test_output_parameters_not_an_object_is_invalid(self) -> None:
        document = {"inputs": [image_input([IMG1])], "outputs": [{"name": "scores", "parameters": [True]}]}
        with raises_invalid("output 'scores': parameters must be an object"):
            decode_json(document)

    def test_custom_output_names_are_used(self) -> None:
        config = ProtocolConfig(labels_output="classes", scores_output="probs", indices_output="ids")
        document = {"inputs": [image_input([IMG1])], "outputs": [{"name": "probs"}, {"name": "classes"}]}
        assert decode_json(document, config).outputs == [("probs", False), ("classes", False)]
        with raises_invalid("unknown output 'labels'"):
            decode_json({**document, "outputs": [{"name": "labels"}]}, config)


# ============================================================================ OIP FP32 tensor input
class TestOipTensorInput:
    @staticmethod
    def pixels(n: int) -> np.ndarray:
        return (np.arange(n * PER, dtype=np.float32) / 8 - 3).reshape(n, *SHAPE)

    def test_flat_json_data_gives_tensors_of_input_shape(self) -> None:
        array = self.pixels(2)
        call = decode_json({"inputs": [pixel_input(array)]})
        assert call.protocol == "oip_v2"
        assert call.images == []
        assert len(call.tensors) == 2
        for i, tensor in enumerate(call.tensors):
            assert tensor.shape == SHAPE
            assert tensor.dtype == np.float32
            np.testing.assert_array_equal(tensor, array[i])

    def test_nested_json_data_gives_the_same_tensors(self) -> None:
        array = self.pixels(3)
        call = decode_json({"inputs": [pixel_input(array, nested=True)]})
        assert call.size == 3
        np.testing.assert_array_equal(np.stack(call.tensors), array)

    def test_integers_are_accepted_as_numbers(self) -> None:
        tensor = {"name": "pixels", "datatype": "FP32", "shape": [1, *SHAPE], "data": list(range(PER))}
        call = decode_json({"inputs": [tensor]})
        np.testing.assert_array_equal(call.tensors[0], np.arange(PER, dtype=np.float32).reshape(SHAPE))

    def test_tensor_call_carries_id_top_k_and_outputs(self) -> None:
        document = {
            "id": "t1",
            "inputs": [pixel_input(self.pixels(1))],
            "outputs": [{"name": "scores"}],
            "parameters": {"top_k": 2},
        }
        call = decode_json(document)
        assert (call.request_id, call.topk, call.outputs) == ("t1", 2, [("scores", False)])

    @pytest.mark.parametrize(
        "shape",
        [[1, 4, 4], [1, 1, 4, 5], [1, 3, 4, 4], [1, 1, 16], [1, 1, 4, 4, 1], [16]],
        ids=["no-batch", "wrong-width", "wrong-channels", "flattened", "extra-dim", "flat"],
    )
    def test_wrong_shape_is_invalid(self, shape: list[int]) -> None:
        tensor = {"name": "pixels", "datatype": "FP32", "shape": shape, "data": [0.0] * PER}
        with raises_invalid(r"input 'pixels'\.shape must be \[N, 1, 4, 4\]"):
            decode_json({"inputs": [tensor]})

    @pytest.mark.parametrize("count", [PER - 1, 2 * PER - 1])
    def test_too_few_numbers_is_invalid(self, count: int) -> None:
        tensor = {"name": "pixels", "datatype": "FP32", "shape": [2, *SHAPE], "data": [0.5] * count}
        with raises_invalid(rf"data holds {count} numbers; its shape \[2, 1, 4, 4\] needs 32"):
            decode_json({"inputs": [tensor]})

    def test_too_many_numbers_is_invalid(self) -> None:
        tensor = {"name": "pixels", "datatype": "FP32", "shape": [1, *SHAPE], "data": [0.5] * (PER + 1)}
        with raises_invalid(r"holds more elements than its shape \(16\)"):
            decode_json({"inputs": [tensor]})

    def test_nesting_deeper_than_a_shape_can_is_invalid(self) -> None:
        data: list = [0.0]
        for _ in range(12):
            data = [data]
        tensor = {"name": "pixels", "datatype": "FP32", "shape": [1, *SHAPE], "data": data}
        with raises_invalid("nested deeper than its shape allows"):
            decode_json({"inputs": [tensor]})

    @pytest.mark.parametrize("bad", [True, False, "0.5", None, {"v": 1}], ids=["true", "false", "str", "null", "obj"])
    def test_non_numbers_in_data_are_invalid(self, bad: object) -> None:
        data: list = [0.0] * PER
        data[5] = bad
        tensor = {"name": "pixels", "datatype": "FP32", "shape": [1, *SHAPE], "data": data}
        with raises_invalid("data must hold numbers only"):
            decode_json({"inputs": [tensor]})

    @pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
    def test_non_finite_values_in_binary_data_are_invalid(self, value: float) -> None:
        array = self.pixels(2)
        array[1, 0, 2, 3] = value
        body, length = triton_body([("pixels", [2, *SHAPE], "FP32", array.astype("<f4").tobytes())])
        with raises_invalid("holds NaN or infinite values"):
            decode_binary(body, length)

    def test_nan_literal_in_json_data_is_invalid(self) -> None:
        # Python's json (and so TorchServe) accepts the non-standard NaN literal.
        body = b'{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 1, 4, 4], "data": [NaN'
        body += b", 0.0" * (PER - 1) + b"]}]}"
        with raises_invalid("holds NaN or infinite values"):
            decode({"body": body}, {}, CONFIG, SHAPE)

    @pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
    def test_number_beyond_float32_range_is_invalid(self) -> None:
        data = [0.0] * PER
        data[0] = 1e39  # finite as a JSON number, infinite as FP32
        tensor = {"name": "pixels", "datatype": "FP32", "shape": [1, *SHAPE], "data": data}
        with raises_invalid("holds NaN or infinite values"):
            decode_json({"inputs": [tensor]})

    def test_huge_integer_in_data_is_invalid_input(self) -> None:
        body = b'{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 1, 4, 4], "data": [1'
        body += b"0" * 400 + b", 0" * (PER - 1) + b"]}]}"
        with raises_invalid("pixels"):
            decode({"body": body}, {}, CONFIG, SHAPE)

    @pytest.mark.parametrize("datatype", ["FP64", "BYTES", "UINT8", "fp32"])
    def test_wrong_datatype_names_the_datatype(self, datatype: str) -> None:
        tensor = {**pixel_input(self.pixels(1)), "datatype": datatype}
        with raises_invalid(f"must have datatype FP32, got '{datatype}'"):
            decode_json({"inputs": [tensor]})

    def test_more_tensors_than_max_images_is_payload_too_large(self) -> None:
        config = ProtocolConfig(max_images=2)
        with pytest.raises(PayloadTooLarge, match="3 images in one request"):
            decode_json({"inputs": [pixel_input(self.pixels(3))]}, config)

    def test_binary_fp32_as_tritonclient_sends_it(self) -> None:
        array = self.pixels(2)
        body, length = triton_body([("pixels", [2, *SHAPE], "FP32", array.tobytes())], request_id="bin")
        call = decode_binary(body, length)
        assert call.request_id == "bin"
        assert call.images == []
        assert [t.shape for t in call.tensors] == [SHAPE, SHAPE]
        np.testing.assert_array_equal(np.stack(call.tensors), array)

    @pytest.mark.parametrize("delta", [-4, 4])
    def test_binary_fp32_of_the_wrong_size_is_invalid(self, delta: int) -> None:
        raw = self.pixels(1).tobytes()
        raw = raw[:delta] if delta < 0 else raw + b"\x00" * delta
        body, length = triton_body([("pixels", [1, *SHAPE], "FP32", raw)])
        with raises_invalid(rf"needs 64 bytes of FP32, got {64 + delta}"):
            decode_binary(body, length)


# ============================================================================ OIP binary extension
class TestOipBinary:
    def test_single_image_as_tritonclient_sends_it(self) -> None:
        body, length = binary_images_body([IMG1], request_id="abc")
        call = decode_binary(body, length)
        assert call.protocol == "oip_v2"
        assert call.images == [IMG1]
        assert call.request_id == "abc"
        # tritonclient asks for every output in binary when it names none
        assert call.outputs == [("labels", True), ("scores", True), ("indices", True)]

    @pytest.mark.parametrize("shape", [[3], [3, 1]])
    def test_several_images_keep_their_order(self, shape: list[int]) -> None:
        body, length = binary_images_body([IMG1, IMG3, IMG2], shape=shape)
        assert decode_binary(body, length).images == [IMG1, IMG3, IMG2]

    def test_requested_binary_outputs_as_tritonclient_names_them(self) -> None:
        outputs = [
            {"name": "scores", "parameters": {"binary_data": True}},
            {"name": "labels", "parameters": {"binary_data": False}},
        ]
        body, length = binary_images_body([IMG1], outputs=outputs, parameters={"top_k": 2})
        call = decode_binary(body, length)
        assert call.outputs == [("scores", True), ("labels", False)]
        assert call.topk == 2

    def test_body_as_bytearray_and_memoryview(self) -> None:
        body, length = binary_images_body([IMG2])
        assert decode_binary(bytearray(body), length).images == [IMG2]
        assert decode_binary(memoryview(body), length).images == [IMG2]

    def test_header_value_with_surrounding_spaces_is_read(self) -> None:
        body, length = binary_images_body([IMG2])
        assert decode_binary(body, f" {length} ").images == [IMG2]

    @pytest.mark.parametrize("value", ["abc", "12.5", "", "0x20", "1e3"])
    def test_non_integer_header_length_is_invalid(self, value: str) -> None:
        body, _ = binary_images_body([IMG1])
        with raises_invalid("Inference-Header-Content-Length must be an integer"):
            decode_binary(body, value)

    def test_header_length_larger_than_body_is_invalid(self) -> None:
        body, _ = binary_images_body([IMG1])
        with raises_invalid(rf"Inference-Header-Content-Length is {len(body) + 1} but the body has {len(body)} bytes"):
            decode_binary(body, str(len(body) + 1))

    @pytest.mark.parametrize("value", ["1", "0", "-3"])
    def test_header_length_below_two_is_invalid(self, value: str) -> None:
        body, _ = binary_images_body([IMG1])
        with raises_invalid(f"Inference-Header-Content-Length is {value} but"):
            decode_binary(body, value)

    def test_header_length_cutting_the_json_is_invalid(self) -> None:
        body, length = binary_images_body([IMG1])
        with raises_invalid("malformed JSON body"):
            decode_binary(body, str(int(length) - 5))

    def test_header_that_is_not_an_object_is_invalid(self) -> None:
        header = json.dumps([1, 2]).encode()
        with raises_invalid("inference header must be a JSON object"):
            decode_binary(header + b"\x00\x01", str(len(header)))

    def test_header_not_utf8_is_invalid(self) -> None:
        header = b'{"id": "\xff"}'
        with raises_invalid("not valid UTF-8"):
            decode_binary(header, str(len(header)))

    def test_no_body_is_invalid(self) -> None:
        with raises_invalid("must have a body"):
            decode({}, {BINARY_HEADER: "10"}, CONFIG, SHAPE)

    @pytest.mark.parametrize("delta", [-1, 1])
    def test_binary_data_size_not_matching_the_tail_is_invalid(self, delta: int) -> None:
        raw = serialize_bytes_tensor([IMG1])
        document = {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": len(raw) + delta},
                }
            ]
        }
        body, length = binary_tail_body(document, raw)
        with raises_invalid(f"binary_data_size is {len(raw) + delta} but {len(raw)} bytes follow the header"):
            decode_binary(body, length)

    @pytest.mark.parametrize("size", [-1, 1.5, "12", True])
    def test_binary_data_size_not_a_count_is_invalid(self, size: object) -> None:
        document = {
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": size}}]
        }
        body, length = binary_tail_body(document, b"")
        with raises_invalid("binary_data_size must be a non-negative integer"):
            decode_binary(body, length)

    def test_element_length_overrunning_the_data_is_invalid(self) -> None:
        raw = struct.pack("<I", len(IMG1) + 10) + IMG1
        body, length = triton_body([("image", [1], "BYTES", raw)])
        with raises_invalid(f"element 0 declares {len(IMG1) + 10} bytes but only {len(IMG1)} remain"):
            decode_binary(body, length)

    def test_second_element_overrunning_names_it(self) -> None:
        raw = serialize_bytes_tensor([IMG1]) + struct.pack("<I", 1000) + IMG2
        body, length = triton_body([("image", [2], "BYTES", raw)])
        with raises_invalid("element 1 declares 1000 bytes"):
            decode_binary(body, length)

    def test_leftover_bytes_after_the_elements_are_invalid(self) -> None:
        raw = serialize_bytes_tensor([IMG1, IMG2]) + b"xyz"
        body, length = triton_body([("image", [2], "BYTES", raw)])
        with raises_invalid("3 bytes left over after 2 elements"):
            decode_binary(body, length)

    def test_extra_element_beyond_shape_is_leftover(self) -> None:
        raw = serialize_bytes_tensor([IMG1, IMG2, IMG3])
        body, length = triton_body([("image", [2], "BYTES", raw)])
        with raises_invalid("left over after 2 elements"):
            decode_binary(body, length)

    def test_fewer_elements_than_shape_is_invalid(self) -> None:
        raw = serialize_bytes_tensor([IMG1, IMG2])
        body, length = triton_body([("image", [3], "BYTES", raw)])
        with raises_invalid("binary data ends before element 2 of 3"):
            decode_binary(body, length)

    def test_truncated_length_prefix_is_invalid(self) -> None:
        raw = serialize_bytes_tensor([IMG1]) + b"\x05\x00"
        body, length = triton_body([("image", [2], "BYTES", raw)])
        with raises_invalid("ends before element 1 of 2"):
            decode_binary(body, length)

    def test_empty_element_is_invalid(self) -> None:
        raw = serialize_bytes_tensor([IMG1, b""])
        body, length = triton_body([("image", [2], "BYTES", raw)])
        with raises_invalid("element 1 is empty"):
            decode_binary(body, length)

    @pytest.mark.parametrize(
        ("name", "shape", "datatype"),
        [("image", [10**12], "BYTES"), ("image", [10**12, 1], "BYTES"), ("pixels", [10**12, *SHAPE], "FP32")],
        ids=["bytes-n", "bytes-n-1", "fp32"],
    )
    def test_huge_declared_shape_is_payload_too_large_without_allocating(
        self, name: str, shape: list[int], datatype: str
    ) -> None:
        raw = serialize_bytes_tensor([IMG1])
        body, length = triton_body([(name, shape, datatype, raw)])
        tracemalloc.start()
        try:
            with pytest.raises(PayloadTooLarge, match="1000000000000 images in one request") as info:
                decode_binary(body, length)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert info.value.status == 413
        assert peak < 1 << 20

    def test_huge_declared_shape_in_json_is_payload_too_large(self) -> None:
        tensor = {"name": "image", "datatype": "BYTES", "shape": [10**12], "data": [b64(IMG1)]}
        with pytest.raises(PayloadTooLarge):
            decode_json({"inputs": [tensor]})

    def test_tail_with_no_binary_data_size_is_invalid(self) -> None:
        body, length = binary_tail_body({"inputs": [image_input([IMG1])]}, serialize_bytes_tensor([IMG2]))
        with raises_invalid("binary bytes follow the header but no input declares binary_data_size"):
            decode_binary(body, length)

    def test_both_data_and_binary_data_size_is_invalid(self) -> None:
        raw = serialize_bytes_tensor([IMG1])
        tensor = {**image_input([IMG1]), "parameters": {"binary_data_size": len(raw)}}
        body, length = binary_tail_body({"inputs": [tensor]}, raw)
        with raises_invalid("has both data and binary_data_size"):
            decode_binary(body, length)

    def test_wrong_datatype_in_binary_names_it(self) -> None:
        body, length = triton_body([("image", [1], "UINT8", serialize_bytes_tensor([IMG1]))])
        with raises_invalid("must have datatype BYTES .*got 'UINT8'"):
            decode_binary(body, length)

    def test_already_parsed_body_with_default_separators_is_read(self) -> None:
        # TorchServe parses an application/json body; Python clients (requests' json=) use json.dumps defaults.
        document = {"id": "p", "inputs": [image_input([IMG1])]}
        call = decode_binary(document, str(len(json.dumps(document))))
        assert call.images == [IMG1]
        assert call.request_id == "p"

    def test_already_parsed_body_sent_as_compact_json_is_read(self) -> None:
        document = {"id": "p", "inputs": [image_input([IMG1])]}
        compact = json.dumps(document, separators=(",", ":"))
        call = decode_binary(document, str(len(compact)))
        assert call.images == [IMG1]


# ============================================================================ encoding
RESULTS = [
    Classification(["cat", "dog", "fox"], [3, 1, 7], [0.7, 0.2, 0.1]),
    Classification(["dog", "fox", "cat"], [1, 7, 3], [0.5, 0.30000001, 0.2]),
]


def oip_call(outputs: list[tuple[str, bool]] | None = None, request_id: str | None = None, n: int = 2) -> Call:
    default = [("labels", False), ("scores", False), ("indices", False)]
    return Call("oip_v2", [IMG1] * n, [], request_id=request_id, outputs=default if outputs is None else outputs)


class TestEncode:
    def test_native_reply(self) -> None:
        call = decode({"body": IMG1}, {}, CONFIG, SHAPE)
        result = Classification(["cat", "dog"], [3, 1], [0.123456789, 0.0000004])
        reply = call.encode([result], "digits", "2.0", CONFIG)
        assert reply.content_type == "application/json"
        assert reply.headers is None
        assert reply.body == {
            "predictions": [
                {"label": "cat", "index": 3, "probability": 0.123457},
                {"label": "dog", "index": 1, "probability": 0.0},
            ],
            "model": "digits",
            "version": "2.0",
        }

    def test_kserve_v1_reply(self) -> None:
        call = decode_json({"instances": [b64(IMG1), b64(IMG2)]})
        reply = call.encode(RESULTS, "digits", "1.0", CONFIG)
        assert reply.content_type == "application/json"
        assert reply.headers is None
        assert reply.body == {
            "predictions": [
                [
                    {"label": "cat", "index": 3, "probability": 0.7},
                    {"label": "dog", "index": 1, "probability": 0.2},
                    {"label": "fox", "index": 7, "probability": 0.1},
                ],
                [
                    {"label": "dog", "index": 1, "probability": 0.5},
                    {"label": "fox", "index": 7, "probability": 0.3},
                    {"label": "cat", "index": 3, "probability": 0.2},
                ],
            ],
            "model_name": "digits",
            "model_version": "1.0",
        }

    def test_oip_json_reply(self) -> None:
        call = decode_json({"id": "r-1", "inputs": [image_input([IMG1, IMG2])]})
        reply = call.encode(RESULTS, "digits", "1.0", CONFIG)
        assert reply.content_type == "application/json"
        assert reply.headers is None
        assert reply.body == {
            "model_name": "digits",
            "model_version": "1.0",
            "id": "r-1",
            "outputs": [
                {
                    "name": "labels",
                    "datatype": "BYTES",
                    "shape": [2, 3],
                    "data": ["cat", "dog", "fox", "dog", "fox", "cat"],
                },
                {"name": "scores", "datatype": "FP32", "shape": [2, 3], "data": [0.7, 0.2, 0.1, 0.5, 0.3, 0.2]},
                {"name": "indices", "datatype": "INT64", "shape": [2, 3], "data": [3, 1, 7, 1, 7, 3]},
            ],
        }
        json.dumps(reply.body)  # serialisable as it is

    def test_oip_json_reply_without_id_has_no_id(self) -> None:
        reply = oip_call().encode(RESULTS, "m", "1", CONFIG)
        assert "id" not in reply.body

    def test_oip_reply_data_is_row_major_for_one_column(self) -> None:
        reply = oip_call(outputs=[("indices", False)]).encode(RESULTS, "m", "1", CONFIG)
        (indices,) = reply.body["outputs"]
        np.testing.assert_array_equal(np.asarray(indices["data"]).reshape(indices["shape"]), [[3, 1, 7], [1, 7, 3]])

    def test_oip_reply_cuts_every_row_to_the_shortest_k(self) -> None:
        results = [RESULTS[0], Classification(["dog", "fox"], [1, 7], [0.6, 0.4])]
        reply = oip_call().encode(results, "m", "1", CONFIG)
        labels, scores, indices = reply.body["outputs"]
        assert labels["shape"] == scores["shape"] == indices["shape"] == [2, 2]
        assert labels["data"] == ["cat", "dog", "dog", "fox"]
        assert indices["data"] == [3, 1, 1, 7]

    def test_oip_reply_honours_selection_and_order(self) -> None:
        reply = oip_call(outputs=[("indices", False), ("labels", False)]).encode(RESULTS, "m", "1", CONFIG)
        assert [o["name"] for o in reply.body["outputs"]] == ["indices", "labels"]

    def test_oip_reply_uses_configured_names(self) -> None:
        config = ProtocolConfig(labels_output="classes", scores_output="probs", indices_output="ids")
        call = Call("oip_v2", [IMG1], [], outputs=[("probs", False), ("classes", False)])
        reply = call.encode(RESULTS[:1], "m", "1", config)
        assert [(o["name"], o["datatype"]) for o in reply.body["outputs"]] == [("probs", "FP32"), ("classes", "BYTES")]

    def test_oip_binary_reply_round_trips_through_tritonclient_parsing(self) -> None:
        body, length = binary_images_body([IMG1, IMG2], request_id="bin-7")
        call = decode_binary(body, length)
        reply = call.encode(RESULTS, "digits", "3.0", CONFIG)
        assert reply.content_type == "application/octet-stream"
        assert isinstance(reply.body, bytes)
        header, blobs = parse_binary_reply(reply)
        assert header["model_name"] == "digits"
        assert header["model_version"] == "3.0"
        assert header["id"] == "bin-7"
        assert [(o["name"], o["datatype"], o["shape"]) for o in header["outputs"]] == [
            ("labels", "BYTES", [2, 3]),
            ("scores", "FP32", [2, 3]),
            ("indices", "INT64", [2, 3]),
        ]
        assert all("data" not in o for o in header["outputs"])
        assert [o["parameters"]["binary_data_size"] for o in header["outputs"]] == [len(b) for b in blobs.values()]
        labels = [label.decode() for label in parse_bytes_tensor(blobs["labels"])]
        assert labels == [label for r in RESULTS for label in r.labels]
        scores = np.frombuffer(blobs["scores"], "<f4").reshape(2, 3)
        np.testing.assert_array_equal(scores, np.asarray([r.scores for r in RESULTS], np.float32))
        indices = np.frombuffer(blobs["indices"], "<i8").reshape(2, 3)
        np.testing.assert_array_equal(indices, [r.indices for r in RESULTS])

    def test_oip_binary_reply_mixes_binary_and_json_outputs_in_order(self) -> None:
        call = oip_call(outputs=[("scores", True), ("labels", False), ("indices", True)])
        reply = call.encode(RESULTS, "m", "1", CONFIG)
        header, blobs = parse_binary_reply(reply)
        assert [o["name"] for o in header["outputs"]] == ["scores", "labels", "indices"]
        assert header["outputs"][1]["data"] == ["cat", "dog", "fox", "dog", "fox", "cat"]
        assert "parameters" not in header["outputs"][1]
        assert list(blobs) == ["scores", "indices"]
        np.testing.assert_array_equal(np.frombuffer(blobs["indices"], "<i8"), [3, 1, 7, 1, 7, 3])
        length = int(reply.headers["Inference-Header-Content-Length"])
        assert reply.body[length:] == blobs["scores"] + blobs["indices"]

    def test_oip_binary_reply_with_one_selected_output(self) -> None:
        reply = oip_call(outputs=[("indices", True)]).encode(RESULTS, "m", "1", CONFIG)
        header, blobs = parse_binary_reply(reply)
        assert [o["name"] for o in header["outputs"]] == ["indices"]
        assert blobs["indices"] == np.asarray([3, 1, 7, 1, 7, 3], "<i8").tobytes()

    def test_oip_binary_labels_are_utf8_with_byte_lengths(self) -> None:
        results = [Classification(["caf\u00e9", "\u732b"], [0, 1], [0.9, 0.1])]
        reply = oip_call(outputs=[("labels", True)], n=1).encode(results, "m", "1", CONFIG)
        _, blobs = parse_binary_reply(reply)
        assert blobs["labels"] == struct.pack("<I", 5) + "caf\u00e9".encode() + struct.pack("<I", 3) + "\u732b".encode()

    def test_oip_binary_header_length_is_the_json_part(self) -> None:
        reply = oip_call(outputs=[("scores", True)], request_id="x").encode(RESULTS, "m", "1", CONFIG)
        length = int(reply.headers["Inference-Header-Content-Length"])
        assert json.loads(reply.body[:length])["id"] == "x"
        assert len(reply.body) - length == 6 * 4

    def test_oip_json_only_outputs_stay_json_even_after_a_binary_request(self) -> None:
        outputs = [{"name": "labels", "parameters": {"binary_data": False}}]
        body, length = binary_images_body([IMG1], outputs=outputs)
        reply = decode_binary(body, length).encode(RESULTS[:1], "m", "1", CONFIG)
        assert reply.headers is None
        assert reply.body["outputs"] == [
            {"name": "labels", "datatype": "BYTES", "shape": [1, 3], "data": ["cat", "dog", "fox"]}
        ]

    def test_classification_as_predictions_rounds_probabilities(self) -> None:
        result = Classification(["a"], [0], [0.1234564999])
        assert result.as_predictions() == [{"label": "a", "index": 0, "probability": 0.123456}]


# ============================================================================ ProtocolConfig
class TestProtocolConfig:
    def test_defaults(self) -> None:
        assert CONFIG.to_dict() == {
            "image_input": "image",
            "tensor_input": "pixels",
            "labels_output": "labels",
            "scores_output": "scores",
            "indices_output": "indices",
            "max_images": 32,
        }

    def test_outputs_map_names_to_datatypes_in_order(self) -> None:
        config = ProtocolConfig(labels_output="l", scores_output="s", indices_output="i")
        assert list(config.outputs.items()) == [("l", "BYTES"), ("s", "FP32"), ("i", "INT64")]

    @pytest.mark.parametrize(
        ("key", "value"),
        [
            ("image_input", ""),
            ("image_input", "1image"),
            ("image_input", "my image"),
            ("image_input", "x" * 65),
            ("image_input", 5),
            ("image_input", None),
            ("tensor_input", "pix/els"),
            ("tensor_input", ""),
            ("labels_output", "caf\u00e9"),
            ("scores_output", "-scores"),
            ("indices_output", "idx\n"),
        ],
    )
    def test_bad_names_are_refused_naming_the_key(self, key: str, value: object) -> None:
        with pytest.raises(ValueError, match=f"{key}: a tensor name"):
            ProtocolConfig(**{key: value})

    @pytest.mark.parametrize("name", ["_x", "a" * 64, "INPUT__0", "image.v2", "out-1"])
    def test_good_names_are_accepted(self, name: str) -> None:
        assert ProtocolConfig(image_input=name).image_input == name

    @pytest.mark.parametrize(
        "names",
        [
            {"image_input": "labels"},
            {"tensor_input": "image"},
            {"scores_output": "indices"},
            {"labels_output": "x", "scores_output": "x"},
        ],
    )
    def test_duplicate_names_are_refused(self, names: dict) -> None:
        with pytest.raises(ValueError, match="tensor names must be distinct"):
            ProtocolConfig(**names)

    def test_no_tensor_input_is_allowed(self) -> None:
        assert ProtocolConfig(tensor_input=None).tensor_input is None

    @pytest.mark.parametrize("value", [0, -1, 1025, True, 1.5, "32", None])
    def test_max_images_out_of_bounds_is_refused(self, value: object) -> None:
        with pytest.raises(ValueError, match="max_images: must be an integer from 1 to 1024"):
            ProtocolConfig(max_images=value)

    @pytest.mark.parametrize("value", [1, 1024])
    def test_max_images_bounds_are_inclusive(self, value: int) -> None:
        assert ProtocolConfig(max_images=value).max_images == value

    def test_from_dict_round_trips(self) -> None:
        config = ProtocolConfig(image_input="img", tensor_input=None, max_images=4)
        assert ProtocolConfig.from_dict(config.to_dict()) == config

    @pytest.mark.parametrize("data", [None, {}])
    def test_from_dict_of_nothing_gives_defaults(self, data: dict | None) -> None:
        assert ProtocolConfig.from_dict(data) == ProtocolConfig()

    def test_from_dict_refuses_unknown_keys(self) -> None:
        with pytest.raises(ValueError, match="max_batch: unknown key in protocol") as info:
            ProtocolConfig.from_dict({"max_images": 4, "zeta": 1, "max_batch": 2})
        assert "image_input, indices_output, labels_output, max_images, scores_output, tensor_input" in str(info.value)

    def test_from_dict_validates_values(self) -> None:
        with pytest.raises(ValueError, match="max_images"):
            ProtocolConfig.from_dict({"max_images": 0})

    def test_from_dict_does_not_alter_its_argument(self) -> None:
        data = {"max_images": 3}
        ProtocolConfig.from_dict(data)
        assert data == {"max_images": 3}

    def test_config_is_frozen(self) -> None:
        with pytest.raises(dataclasses.FrozenInstanceError):
            CONFIG.max_images = 5  # type: ignore[misc]


class TestOipMetadata:
    def test_lists_inputs_and_outputs_with_datatypes_and_shapes(self) -> None:
        metadata = oip_metadata(CONFIG, (3, 224, 224), 10)
        assert metadata["inputs"] == [
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "pixels", "datatype": "FP32", "shape": [-1, 3, 224, 224]},
        ]
        assert metadata["outputs"] == [
            {"name": "labels", "datatype": "BYTES", "shape": [-1, -1]},
            {"name": "scores", "datatype": "FP32", "shape": [-1, -1]},
            {"name": "indices", "datatype": "INT64", "shape": [-1, -1]},
        ]
        assert metadata["parameters"] == {"num_classes": 10, "max_images": 32}
        assert metadata["platform"] == "pytorch_torchscript"

    def test_no_tensor_input_lists_only_the_image_input(self) -> None:
        metadata = oip_metadata(ProtocolConfig(tensor_input=None, max_images=8), SHAPE, 3)
        assert metadata["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
        assert metadata["parameters"]["max_images"] == 8

    def test_configured_names_are_listed(self) -> None:
        config = ProtocolConfig(image_input="jpeg", tensor_input="x", labels_output="cls")
        metadata = oip_metadata(config, SHAPE, 2)
        assert [i["name"] for i in metadata["inputs"]] == ["jpeg", "x"]
        assert [o["name"] for o in metadata["outputs"]] == ["cls", "scores", "indices"]


# ============================================================================ element_error
class TestElementError:
    def test_single_element_call_leaves_the_error_alone(self) -> None:
        call = decode_json({"inputs": [image_input([IMG1])]})
        exc = InvalidInput("cannot decode")
        assert element_error(call, 0, exc) is exc

    def test_native_call_leaves_the_error_alone(self) -> None:
        call = decode({"body": IMG1}, {}, CONFIG, SHAPE)
        exc = PayloadTooLarge("too many pixels")
        assert element_error(call, 0, exc) is exc

    def test_oip_call_with_several_images_prefixes_input_index(self) -> None:
        call = decode_json({"inputs": [image_input([IMG1, IMG2])]})
        exc = InvalidInput("cannot decode")
        error = element_error(call, 1, exc)
        assert type(error) is InvalidInput
        assert str(error) == "input[1]: cannot decode"
        assert error.status == 400
        assert error.__cause__ is exc

    def test_oip_call_with_several_tensors_prefixes_input_index(self) -> None:
        array = np.zeros((2, *SHAPE), np.float32)
        call = decode_json({"inputs": [pixel_input(array)]})
        assert str(element_error(call, 0, InvalidInput("bad"))) == "input[0]: bad"

    def test_kserve_call_with_several_instances_prefixes_instances_index(self) -> None:
        call = decode_json({"instances": [b64(IMG1), b64(IMG2), b64(IMG3)]})
        error = element_error(call, 2, PayloadTooLarge("image too large"))
        assert type(error) is PayloadTooLarge
        assert error.status == 413
        assert str(error) == "instances[2]: image too large"

    def test_kserve_call_with_one_instance_has_no_prefix(self) -> None:
        call = decode_json({"instances": [b64(IMG1)]})
        assert str(element_error(call, 0, InvalidInput("bad"))) == "bad"

    def test_error_without_status_is_returned_unchanged(self) -> None:
        call = decode_json({"instances": [b64(IMG1), b64(IMG2)]})
        exc = RuntimeError("boom")
        assert element_error(call, 1, exc) is exc

    def test_prefixed_error_payload_carries_the_prefix(self) -> None:
        call = decode_json({"inputs": [image_input([IMG1, IMG2])]})
        error = element_error(call, 0, InvalidInput("bad"))
        assert error.to_payload() == {"error": "input[0]: bad", "code": 400, "type": "InvalidInput"}


def test_call_size_counts_images_or_tensors() -> None:
    assert Call("native", [IMG1], []).size == 1
    assert Call("oip_v2", [], [np.zeros(SHAPE)] * 3).size == 3
    assert Call("oip_v2", [], []).size == 0


def test_module_exports() -> None:
    assert set(protocols.__all__) == {
        "BINARY_HEADER",
        "Call",
        "Classification",
        "Envelope",
        "ProtocolConfig",
        "Reply",
        "bytes_tensor",
        "decode",
        "decode_kserve_v1",
        "decode_oip",
        "element_error",
        "native_image",
        "oip_metadata",
        "read_envelope",
    }
    assert BINARY_HEADER == "inference-header-content-length"


def test_preprocessed_pixels_beyond_the_normalised_range_are_refused() -> None:
    """3e38 is finite FP32 but makes the model answer NaN, which is not JSON: refused for that request."""
    data = [0.0] * 16
    data[3] = 3e38
    tensor = {"name": "pixels", "datatype": "FP32", "shape": [1, *SHAPE], "data": data}
    with raises_invalid(r"beyond \+-10000"):
        decode_json({"inputs": [tensor]})


def test_servekits_json_form_keeps_the_requests_other_fields() -> None:
    """A multipart ``topk`` beside JSON text, or a JSON body TorchServe parsed, keeps the request's options."""
    document = {"data": base64.b64encode(IMG1).decode()}
    call = protocols.decode({"body": document, "topk": "2"}, {}, CONFIG, SHAPE)
    assert (call.protocol, call.topk, call.images) == ("native", "2", [IMG1])
    call = protocols.decode({"data": json.dumps(document).encode(), "topk": b"1"}, {}, CONFIG, SHAPE)
    assert (call.topk, call.images) == (b"1", [IMG1])


# ------------------------------------------------------------------------------------------ read_envelope
class TestReadEnvelope:
    """The one place that tells which protocol a request speaks, for every task (and a user's handler)."""

    OIP = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}]}
    V1 = {"instances": [{"data": "aGk="}]}

    @staticmethod
    def forms(document: object) -> list[object]:
        """``document`` as the body can hold it: bytes, a bytearray, a memoryview, text, parsed by TorchServe."""
        raw = json.dumps(document).encode()
        return [raw, bytearray(raw), memoryview(raw), raw.decode(), document]

    @pytest.mark.parametrize("flags", [{}, {"json_lists": True}, {"json_only": True}])
    def test_a_json_object_with_inputs_is_oip_in_every_body_form(self, flags: dict) -> None:
        for body in self.forms(self.OIP):
            envelope = protocols.read_envelope({"body": body}, {}, **flags)
            assert (envelope.protocol, envelope.document, envelope.tail) == ("oip_v2", self.OIP, b"")

    @pytest.mark.parametrize("flags", [{}, {"json_lists": True}, {"json_only": True}])
    def test_a_json_object_with_instances_is_kserve_v1_in_every_body_form(self, flags: dict) -> None:
        for body in self.forms(self.V1):
            envelope = protocols.read_envelope({"data": body}, {}, **flags)  # "data" when there is no "body"
            assert (envelope.protocol, envelope.document, envelope.tail) == ("kserve_v1", self.V1, b"")

    def test_inputs_win_over_instances(self) -> None:
        assert protocols.read_envelope({"body": {**self.V1, **self.OIP}}, {}).protocol == "oip_v2"

    def test_the_binary_header_is_oip_whatever_the_document_holds_and_its_tail_is_not_copied(self) -> None:
        header = json.dumps({"inputs": []}).encode()
        body = header + b"\x01\x02\x03"
        envelope = protocols.read_envelope({"body": body}, {BINARY_HEADER: str(len(header))})
        assert (envelope.protocol, envelope.document) == ("oip_v2", {"inputs": []})
        assert isinstance(envelope.tail, memoryview)
        assert envelope.tail.obj is body  # a slice of the body, not a copy
        assert bytes(envelope.tail) == b"\x01\x02\x03"
        # Sent as application/json, TorchServe parsed it: no tail, still OIP.
        parsed = protocols.read_envelope({"body": {"id": "x"}}, {BINARY_HEADER: "11"})
        assert (parsed.protocol, parsed.document, parsed.tail) == ("oip_v2", {"id": "x"}, b"")
        with pytest.raises(InvalidInput, match="Inference-Header-Content-Length must be an integer, got 'x'"):
            protocols.read_envelope({"body": body}, {BINARY_HEADER: "x"})

    def test_native_image_bodies_keep_the_request_and_parse_only_a_json_object(self) -> None:
        request = {"body": IMG1, "topk": b"2"}
        envelope = protocols.read_envelope(request, {})
        assert (envelope.protocol, envelope.document, envelope.tail) == ("native", None, b"")
        assert envelope.request is request  # multipart fields and raw bytes stay the task's to read
        for body in self.forms({"data": "aGk=", "topk": 3}):
            assert protocols.read_envelope({"body": body}, {}).document == {"data": "aGk=", "topk": 3}
        for body in (b'[{"data": "aGk="}]', "[1]", [1], "text", 7, None):
            envelope = protocols.read_envelope({"body": body}, {})
            assert (envelope.protocol, envelope.document) == ("native", None)

    def test_json_lists_adds_json_lists_and_leaves_other_bodies_to_the_task(self) -> None:
        for body in self.forms([{"a": 1}, [1, 2]]):
            assert protocols.read_envelope({"body": body}, {}, json_lists=True).document == [{"a": 1}, [1, 2]]
        for body in (b"plain text", "plain text", b"42", b"", "7", 7, None):  # e.g. a raw text body: the task's
            envelope = protocols.read_envelope({"body": body}, {}, json_lists=True)
            assert (envelope.protocol, envelope.document) == ("native", None)

    def test_json_only_makes_every_body_json(self) -> None:
        for body in self.forms([{"a": 1}, [1, 2]]):
            assert protocols.read_envelope({"body": body}, {}, json_only=True).document == [{"a": 1}, [1, 2]]
        cases = {b"42": 42, b' "x" ': "x", b"null": None, b"": None, b" \n": None, "plain text": "plain text", 7: 7}
        for body, document in cases.items():
            envelope = protocols.read_envelope({"body": body}, {}, json_only=True)
            assert (envelope.protocol, envelope.document) == ("native", document)
        bom = b"\xef\xbb\xbf" + json.dumps(self.OIP).encode()  # JSON all the same: the protocol is read from it
        assert protocols.read_envelope({"body": bom}, {}, json_only=True).protocol == "oip_v2"
        assert protocols.read_envelope({"body": bom}, {}).protocol == "native"  # an image task's body: not JSON

    def test_a_malformed_json_body_is_a_400_and_a_container_bomb_a_413(self) -> None:
        for flags in ({}, {"json_lists": True}, {"json_only": True}):
            with pytest.raises(InvalidInput, match="malformed JSON body"):
                protocols.read_envelope({"body": b'  {"inputs": '}, {}, **flags)
        with pytest.raises(InvalidInput, match="malformed JSON body"):
            protocols.read_envelope({"body": b"not json"}, {}, json_only=True)  # nothing but JSON
        with pytest.raises(InvalidInput, match="malformed JSON body"):
            protocols.read_envelope({"body": b"[not json"}, {}, json_lists=True)
        assert protocols.read_envelope({"body": b"[not json"}, {}).document is None  # an image task's to read
        with pytest.raises(PayloadTooLarge, match="arrays and objects"):
            protocols.read_envelope({"body": b"{" + b"[" * 200_000}, {})

    def test_the_image_tasks_read_a_native_image_from_the_envelope(self) -> None:
        raw = protocols.native_image(protocols.read_envelope({"body": IMG1, "topk": b"2"}, {}))
        assert (raw.payload, raw.options) == (IMG1, {"topk": b"2"})
        document = {"data": base64.b64encode(IMG2).decode(), "topk": 3}
        for body in self.forms(document):
            image = protocols.native_image(protocols.read_envelope({"body": body}, {}))
            assert (image.payload, image.options) == (IMG2, {"topk": 3})
