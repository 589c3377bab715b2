"""The wire protocols a handler answers: which one a request speaks, its elements decoded, answers encoded.

TorchServe routes three kinds of request to the same handler: its own ``/predictions/NAME``,
KServe v1 (``POST /v1/models/NAME:predict``) and the Open Inference Protocol, KServe v2
(``POST /v2/models/NAME/infer``). The frontend does not tell the handler which route a request
came in on, so the protocol is read from the request itself, in one place for every task
(``read_envelope``):

* an ``Inference-Header-Content-Length`` header, or a JSON object with ``inputs``: OIP v2. The JSON
  header may be followed by raw tensor bytes (the binary tensor extension ``tritonclient`` uses by
  default); ``BYTES`` elements there are each a 4-byte little-endian length and the bytes;
* a JSON object with ``instances``: KServe v1;
* anything else: servekit's own forms, each task's (for images: raw body, multipart,
  ``{"data": b64}``; for tabular records: a JSON record or a list of them).

``read_envelope`` returns an ``Envelope`` (the protocol, the JSON document, the binary tail, the
request) and decodes nothing else: each task decodes only its own elements from it. A handler of
your own does the same in its ``decode``::

    def decode(self, request, headers):
        envelope = protocols.read_envelope(request, headers)   # json_lists=True: a JSON list is a form of yours
        if envelope.protocol == "oip_v2":
            tensor = protocols.oip_input(envelope.document, envelope.tail, ["text"])   # the envelope checked
            ...                                                 # its elements are yours to check
        elif envelope.protocol == "kserve_v1":
            instances = envelope.document["instances"]
        else:
            ...                                                 # envelope.document, or envelope.request

The image classifier's decoding is here (``decode``: a request becomes a ``Call``, its images or
preprocessed tensors and the options it asked for, ``top_k``, which outputs, binary or JSON);
``Call.encode`` packs the per-element results into the protocol's answer. A malformed request
raises ``InvalidInput`` (400) or ``PayloadTooLarge`` (413) for itself alone; OIP clients read the
message from the body's ``error`` field.

What the protocols call inputs and outputs is data (``ProtocolConfig``, the spec's ``protocol:``
section): the names, and for OIP metadata the datatypes and shapes (``oip_metadata``).

The OIP envelope (``binary_oip_document``, ``oip_input``), the JSON helpers (``parse_json``,
``flatten``, ``parse_shape``, ``quote``), the outputs a request asks for (``requested_outputs``), the
KServe v1 and OIP image decoders (``decode_kserve_v1``, ``decode_oip``, ``native_image``) and the
classification answer (``encode_oip``) are shared with the other tasks' protocol modules
(``handlers.tabular``, ``handlers.detection``); what an input tensor holds is each task's own.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from handlers import json_body
from handlers.errors import InvalidInput, PayloadTooLarge
from handlers.image_io import ImageRequest, decode_base64, extract_image_request

# The binary tensor extension's header: the JSON part's length in bytes.
BINARY_HEADER = json_body.BINARY_HEADER
BINARY_CONTENT_TYPE = "application/octet-stream"
JSON_CONTENT_TYPE = "application/json"
TENSOR_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,63}\Z")
# Bytes per element of every fixed-size OIP datatype (BYTES is variable).
DATATYPE_SIZES = {
    "BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2,
    "UINT32": 4, "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8,
}  # fmt: skip
_NUMPY_TYPES = {"FP32": "<f4", "INT64": "<i8"}
# The OIP request id is echoed in the answer (where JSON escaping can grow a character to six bytes).
MAX_REQUEST_ID_CHARS = 256
MAX_PIXEL_MAGNITUDE = 1e4  # preprocessed inputs beyond this are not normalised pixels
_QUOTE = 40


def quote(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)[: _QUOTE * 2]
    return repr(text if len(text) <= _QUOTE else text[:_QUOTE] + "...")


@dataclass(frozen=True)
class ProtocolConfig:
    """Names the protocols use for this model's tensors (the spec's ``protocol:`` section).

    ``image_input``: a BYTES tensor of encoded images, shape ``[N]`` or ``[N, 1]``;
    ``tensor_input``: an FP32 tensor already preprocessed, shape ``[N, *input_shape]`` (null:
    refused); outputs ``labels`` (BYTES), ``scores`` (FP32) and ``indices`` (INT64), each
    ``[N, k]``. ``max_images`` bounds the elements one request may carry (every element takes a
    slot in the server-side batch).
    """

    image_input: str = "image"
    tensor_input: str | None = "pixels"
    labels_output: str = "labels"
    scores_output: str = "scores"
    indices_output: str = "indices"
    max_images: int = 32

    def __post_init__(self) -> None:
        named = {"image_input": self.image_input, "labels_output": self.labels_output,
                 "scores_output": self.scores_output, "indices_output": self.indices_output}  # fmt: skip
        if self.tensor_input is not None:
            named["tensor_input"] = self.tensor_input
        for key, name in named.items():
            if not isinstance(name, str) or not TENSOR_NAME_RE.match(name):
                raise ValueError(
                    f"{key}: a tensor name starts with a letter or _ and holds at most 64 letters, digits, "
                    f"_ . -; got {name!r}"
                )
        if len(set(named.values())) != len(named):
            raise ValueError(f"tensor names must be distinct, got {sorted(named.values())}")
        limit = self.max_images
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 1024:
            raise ValueError(f"max_images: must be an integer from 1 to 1024, got {self.max_images!r}")

    @property
    def outputs(self) -> dict[str, str]:
        """Output name -> datatype, in the order answers list them."""
        return {self.labels_output: "BYTES", self.scores_output: "FP32", self.indices_output: "INT64"}

    @classmethod
    def from_dict(cls, data: dict | None) -> ProtocolConfig:
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown key in protocol (valid keys: {', '.join(sorted(known))})")
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)


def oip_metadata(config: ProtocolConfig, input_shape: tuple[int, ...], num_classes: int) -> dict:
    """The inputs and outputs of ``GET /v2/models/NAME`` (without name and versions)."""
    inputs = [{"name": config.image_input, "datatype": "BYTES", "shape": [-1]}]
    if config.tensor_input is not None:
        inputs.append({"name": config.tensor_input, "datatype": "FP32", "shape": [-1, *input_shape]})
    outputs = [{"name": name, "datatype": dtype, "shape": [-1, -1]} for name, dtype in config.outputs.items()]
    return {
        "platform": "pytorch_torchscript",
        "inputs": inputs,
        "outputs": outputs,
        "parameters": {"num_classes": num_classes, "max_images": config.max_images},
    }


# ------------------------------------------------------------------------------------------ results
@dataclass(frozen=True)
class Classification:
    """One element's answer: its top-k labels, class indices and probabilities, best first."""

    labels: list[str]
    indices: list[int]
    scores: list[float]

    def as_predictions(self) -> list[dict]:
        return [
            {"label": label, "index": index, "probability": round(score, 6)}
            for label, index, score in zip(self.labels, self.indices, self.scores, strict=True)
        ]


@dataclass
class Reply:
    """What goes back for one request: a JSON-serialisable body or bytes, its type and headers."""

    body: Any
    content_type: str = JSON_CONTENT_TYPE
    headers: dict[str, str] | None = None


# ------------------------------------------------------------------------------------------ the call
@dataclass
class Call:
    """One request, decoded: its elements and how to answer it.

    ``images`` holds encoded image bytes, ``tensors`` (OIP FP32 input) one preprocessed array per
    element; exactly one of the two is non-empty.
    """

    protocol: str  # "native" | "kserve_v1" | "oip_v2"
    images: list[bytes]
    tensors: list[np.ndarray]
    topk: Any = None  # the raw option, validated by the handler (it knows the number of classes)
    request_id: str | None = None
    outputs: list[tuple[str, bool]] | None = None  # OIP: (name, binary) in the requested order

    @property
    def size(self) -> int:
        return len(self.images) or len(self.tensors)

    def encode(self, results: list[Classification], model: str, version: str, config: ProtocolConfig) -> Reply:
        if self.protocol == "oip_v2":
            return encode_oip(self, results, model, version, config)
        if self.protocol == "kserve_v1":
            return Reply({"predictions": [r.as_predictions() for r in results], "model_name": model,
                          "model_version": version})  # fmt: skip
        return Reply({"predictions": results[0].as_predictions(), "model": model, "version": version})


def element_error(call: Call, index: int, exc: Exception) -> Exception:
    """``exc`` of element ``index``, its message prefixed with where it is when the call has several."""
    if call.size <= 1 or not hasattr(exc, "status"):
        return exc
    where = "instances" if call.protocol == "kserve_v1" else "input"
    error = type(exc)(f"{where}[{index}]: {exc}")
    error.__cause__ = exc
    return error


# ------------------------------------------------------------------------------------------ the envelope
@dataclass(frozen=True, eq=False)
class Envelope:
    """Which protocol one request speaks, and what it carries (``read_envelope``).

    ``protocol``: ``"oip_v2"``, ``"kserve_v1"`` or ``"native"`` (servekit's own forms). ``document``:
    the OIP inference header or the KServe v1 object; for ``native``, the body's JSON when it was
    JSON (see ``read_envelope``), else None. ``tail``: the raw tensor bytes after an OIP binary
    header (a slice of the body, never a copy; empty otherwise). ``request``: the TorchServe request
    dict as it came, for the native forms a task reads itself (raw bytes, multipart fields).
    """

    protocol: str
    document: Any
    tail: bytes | memoryview
    request: dict


def read_envelope(
    request: dict, headers: dict[str, str], json_lists: bool = False, json_only: bool = False
) -> Envelope:
    """Tell which protocol one TorchServe request dict speaks (module docstring); decode nothing else.

    ``headers``: the request's HTTP headers, names in lower case. The body (``body``, else ``data``)
    may be bytes, text or what TorchServe already parsed. An ``Inference-Header-Content-Length``
    header, or a JSON object with ``inputs``, is OIP v2; a JSON object with ``instances`` is KServe
    v1; anything else is ``native``, where ``document`` is the body's JSON object (text or bytes
    starting with ``{``, or parsed by TorchServe), with ``json_lists=True`` also its JSON list
    (starting with ``[``), and otherwise None: the body is the task's own to read from ``request``
    (raw bytes, text, multipart fields).

    ``json_only=True`` is for a task that takes nothing but JSON (it implies ``json_lists``): every
    bytes body is parsed, whatever it starts with, and ``document`` is whatever JSON it holds (a
    number, a string; None for an empty body or ``null``); a text body that does not start with
    ``{`` or ``[``, or a value TorchServe parsed, is the document as it is.

    A body that is parsed and is not JSON raises ``InvalidInput`` (400); one with too many arrays
    and objects ``PayloadTooLarge`` (413), before it is parsed (``handlers.json_body``).
    """
    body = request.get("body")
    if body is None:
        body = request.get("data")
    if BINARY_HEADER in headers:
        document, tail = binary_oip_document(body, headers[BINARY_HEADER])
        return Envelope("oip_v2", document, tail, request)
    document = _json_document(body, json_lists or json_only, json_only)
    if isinstance(document, dict):
        if "inputs" in document:
            return Envelope("oip_v2", document, b"", request)
        if "instances" in document:
            return Envelope("kserve_v1", document, b"", request)
    return Envelope("native", document, b"", request)


def _json_document(body: Any, lists: bool, json_only: bool) -> Any:
    """The body's JSON, as ``read_envelope`` describes it."""
    if isinstance(body, bytes | bytearray | memoryview):
        raw = bytes(body)
        if json_only:
            return parse_json(raw) if raw.strip() else None
        return parse_json(raw) if raw.lstrip()[:1] in ((b"{", b"[") if lists else (b"{",)) else None
    if isinstance(body, str):
        if body.lstrip()[:1] in (("{", "[") if lists else ("{",)):
            return parse_json(body)  # a text/* body (TorchServe decoded it), not a JSON string it parsed
        return body if json_only else None
    if json_only or isinstance(body, dict) or (lists and isinstance(body, list)):
        return body
    return None


def native_image(envelope: Envelope) -> ImageRequest:
    """The image and options of servekit's own image forms: raw body, multipart, ``{"data": b64}``."""
    request = envelope.request
    if isinstance(envelope.document, dict):  # parsed once, by read_envelope
        field = "body" if "body" in request else "data"
        return extract_image_request({**request, field: envelope.document})
    return extract_image_request(request)


# ------------------------------------------------------------------------------------------ decoding
def decode(request: dict, headers: dict[str, str], config: ProtocolConfig, input_shape: tuple[int, ...]) -> Call:
    """One TorchServe request dict -> the image classifier's ``Call``: its images or preprocessed tensors.

    ``headers`` are the request's HTTP headers with lower-case names.
    """
    envelope = read_envelope(request, headers)
    if envelope.protocol == "oip_v2":
        return decode_oip(envelope.document, envelope.tail, config, input_shape)
    if envelope.protocol == "kserve_v1":
        return decode_kserve_v1(envelope.document, config)
    image = native_image(envelope)
    return Call("native", [image.payload], [], topk=image.options.get("topk"))


def parse_json(text: bytes | str) -> Any:
    """A request body as JSON, its arrays and objects counted before parsing (``handlers.json_body``)."""
    return json_body.parse_json(text)


def _b64(text: Any, where: str) -> bytes:
    if isinstance(text, bytes | bytearray):  # tritonclient's JSON mode sends BYTES elements it was given as bytes
        text = bytes(text).decode("ascii", "replace")
    return decode_base64(text, where)


def _check_count(count: int, config: ProtocolConfig, what: str) -> None:
    if count < 1:
        raise InvalidInput(f"{what}: no images in the request")
    if count > config.max_images:
        raise PayloadTooLarge(f"{what}: {count} images in one request; the limit is {config.max_images}")


# KServe v1 -----------------------------------------------------------------------------------------
_V1_IMAGE_KEYS = ("data", "b64", "image")


def decode_kserve_v1(document: dict, config: ProtocolConfig) -> Call:
    """KServe v1 ``{"instances": [...]}``: one image per instance (``data``/``b64``/``image`` or a bare string)."""
    instances = document["instances"]
    if not isinstance(instances, list):
        raise InvalidInput(f"'instances' must be a list of images, got {type(instances).__name__}")
    _check_count(len(instances), config, "instances")
    images = []
    for i, instance in enumerate(instances):
        if isinstance(instance, dict):
            key = next((k for k in _V1_IMAGE_KEYS if k in instance), None)
            if key is None:
                raise InvalidInput(
                    f"instances[{i}]: expected an object with a base64 image in one of {list(_V1_IMAGE_KEYS)}"
                )
            images.append(_b64(instance[key], f"instances[{i}].{key}"))
        else:
            images.append(_b64(instance, f"instances[{i}]"))
    parameters = document.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput("'parameters' must be an object")
    topk = parameters.get("top_k", document.get("topk"))
    return Call("kserve_v1", images, [], topk=topk)


# OIP v2 --------------------------------------------------------------------------------------------
def binary_oip_document(body: Any, declared: str) -> tuple[dict, bytes | memoryview]:
    """The JSON inference header and the raw tensor bytes after it, of a request with
    ``Inference-Header-Content-Length`` (``declared``): shared by every handler that speaks OIP."""
    if isinstance(body, dict):
        # The frontend parsed the whole body as JSON (sent as application/json): no binary tail.
        return body, b""
    if isinstance(body, list):
        raise InvalidInput("the inference header must be a JSON object with 'inputs'")
    if isinstance(body, str):
        body = body.encode()
    if not isinstance(body, bytes | bytearray | memoryview):
        raise InvalidInput("a request with Inference-Header-Content-Length must have a body")
    body = memoryview(body)  # the tail is sliced, never copied: only each element is, once
    try:
        header_length = int(str(declared).strip())
    except ValueError:
        raise InvalidInput(f"Inference-Header-Content-Length must be an integer, got {quote(declared)}") from None
    if not 2 <= header_length <= len(body):
        raise InvalidInput(f"Inference-Header-Content-Length is {header_length} but the body has {len(body)} bytes")
    try:
        document = parse_json(bytes(body[:header_length]))
    except InvalidInput as exc:
        raise InvalidInput(
            f"the first {header_length} bytes (Inference-Header-Content-Length) are not a JSON header: {exc}"
        ) from None
    if not isinstance(document, dict):
        raise InvalidInput("the inference header must be a JSON object with 'inputs'")
    return document, body[header_length:]


def parse_shape(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not value or len(value) > 8:
        raise InvalidInput(f"{where}.shape must be a list of 1 to 8 dimensions, got {quote(value)}")
    for dim in value:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
            raise InvalidInput(f"{where}.shape must hold non-negative integers, got {quote(value)}")
    return value


def flatten(data: Any, limit: int, where: str) -> list:
    """Row-major flattening of nested JSON lists, refusing more than ``limit`` elements early."""
    if not isinstance(data, list):
        return [data]
    out: list = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                if len(stack) > 8:
                    raise InvalidInput(f"{where}.data is nested deeper than its shape allows")
                stack.append(iter(value))
                break
            out.append(value)
            if len(out) > limit:
                raise InvalidInput(f"{where}.data holds more elements than its shape ({limit})")
        else:
            stack.pop()
    return out


@dataclass
class OipInput:
    """The one input tensor of an OIP request, its envelope checked (name, shape, where its data is).

    ``data`` is the JSON ``data`` (``None`` with the binary extension); ``binary`` the raw bytes
    after the JSON header (``None`` without it). The datatype and the data are the handler's to check.
    """

    name: str
    datatype: Any
    shape: list[int]
    where: str
    data: Any
    binary: bytes | memoryview | None
    request_id: str | None
    parameters: dict


def oip_input(document: dict, tail: bytes | memoryview, known: list[str]) -> OipInput:
    """Check an OIP request's envelope: its id, parameters, exactly one input named in ``known``, its
    shape, and that its data is either JSON ``data`` or exactly the binary ``tail``."""
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(f"'id' must be a string, got {type(request_id).__name__}")
    if request_id is not None and len(request_id) > MAX_REQUEST_ID_CHARS:
        # The answer echoes the id: an unbounded one makes the reply as large as the client likes.
        raise InvalidInput(f"'id' is {len(request_id)} characters long; the limit is {MAX_REQUEST_ID_CHARS}")
    parameters = document.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput("'parameters' must be an object")
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("'inputs' must be a non-empty list of tensors")
    if len(inputs) != 1:
        raise InvalidInput(f"expected exactly one input tensor, one of {known}; got {len(inputs)}")
    tensor = inputs[0]
    if not isinstance(tensor, dict):
        raise InvalidInput("each input must be an object with name, datatype, shape and data")
    name = tensor.get("name")
    if name not in known:
        raise InvalidInput(f"unknown input {quote(name)}: this model takes one of {known}")
    where = f"input {name!r}"
    datatype = tensor.get("datatype")
    shape = parse_shape(tensor.get("shape"), where)
    tensor_params = tensor.get("parameters") or {}
    if not isinstance(tensor_params, dict):
        raise InvalidInput(f"{where}.parameters must be an object")
    binary_size = tensor_params.get("binary_data_size")
    if binary_size is not None:
        if not isinstance(binary_size, int) or isinstance(binary_size, bool) or binary_size < 0:
            raise InvalidInput(f"{where}.parameters.binary_data_size must be a non-negative integer")
        if binary_size != len(tail):
            raise InvalidInput(
                f"{where}.parameters.binary_data_size is {binary_size} but {len(tail)} bytes follow the header"
            )
        if "data" in tensor:
            raise InvalidInput(f"{where} has both data and binary_data_size")
    elif tail:
        raise InvalidInput(f"{len(tail)} binary bytes follow the header but no input declares binary_data_size")
    elif "data" not in tensor:
        raise InvalidInput(f"{where} has no data (give 'data' or the binary extension's binary_data_size)")
    binary = tail if binary_size is not None else None
    return OipInput(name, datatype, shape, where, tensor.get("data"), binary, request_id, parameters)


def decode_oip(document: dict, tail: bytes | memoryview, config: ProtocolConfig, input_shape: tuple[int, ...]) -> Call:
    """An OIP v2 request (its JSON ``document`` and the binary ``tail`` after it) to a Call of images or tensors."""
    known = [config.image_input] + ([config.tensor_input] if config.tensor_input else [])
    tensor = oip_input(document, tail, known)
    name, datatype, shape, where = tensor.name, tensor.datatype, tensor.shape, tensor.where
    binary = tensor.binary

    if name == config.image_input:
        if datatype != "BYTES":
            raise InvalidInput(f"{where} must have datatype BYTES (encoded images), got {quote(datatype)}")
        if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
            raise InvalidInput(f"{where}.shape must be [N] or [N, 1] (N images), got {shape}")
        count = shape[0]
        _check_count(count, config, where)
        if binary is not None:
            images = _split_bytes(binary, count, where)
        else:
            elements = flatten(tensor.data, count, where)
            if len(elements) != count:
                raise InvalidInput(f"{where}.data holds {len(elements)} elements; its shape {shape} needs {count}")
            images = [_b64(e, f"{where}.data[{i}]") for i, e in enumerate(elements)]
        call = Call("oip_v2", images, [])
    else:
        if datatype != "FP32":
            raise InvalidInput(f"{where} must have datatype FP32, got {quote(datatype)}")
        expected = list(input_shape)
        if len(shape) != len(expected) + 1 or shape[1:] != expected:
            raise InvalidInput(f"{where}.shape must be [N, {', '.join(map(str, expected))}], got {shape}")
        count = shape[0]
        _check_count(count, config, where)
        per = math.prod(expected)
        total = count * per
        if binary is not None:
            if len(binary) != total * 4:
                raise InvalidInput(f"{where}: shape {shape} needs {total * 4} bytes of FP32, got {len(binary)}")
            array = np.frombuffer(binary, dtype="<f4")
        else:
            elements = flatten(tensor.data, total, where)
            if len(elements) != total:
                raise InvalidInput(f"{where}.data holds {len(elements)} numbers; its shape {shape} needs {total}")
            if not all(isinstance(e, int | float) and not isinstance(e, bool) for e in elements):
                raise InvalidInput(f"{where}.data must hold numbers only")
            try:
                array = np.asarray(elements, dtype=np.float32)
            except (OverflowError, ValueError) as exc:  # an integer of hundreds of digits
                raise InvalidInput(f"{where}.data holds a number FP32 cannot hold: {exc}") from None
        if not np.isfinite(array).all():
            raise InvalidInput(f"{where} holds NaN or infinite values")
        if array.size and float(np.abs(array).max()) > MAX_PIXEL_MAGNITUDE:
            # Preprocessed pixels are normalised (a few units at most); 1e38 makes the model answer NaN.
            raise InvalidInput(
                f"{where} holds values beyond +-{MAX_PIXEL_MAGNITUDE:g} (preprocessed pixels are normalised)"
            )
        array = array.reshape(count, *expected)
        call = Call("oip_v2", [], [array[i] for i in range(count)])

    call.request_id = tensor.request_id
    call.topk = tensor.parameters.get("top_k")
    call.outputs = requested_outputs(document.get("outputs"), tensor.parameters, config)
    return call


def _split_bytes(raw: bytes | memoryview, count: int, where: str) -> list[bytes]:
    """The BYTES tensor serialisation: per element a uint32 little-endian length, then the bytes."""
    elements, offset = [], 0
    for i in range(count):
        if offset + 4 > len(raw):
            raise InvalidInput(f"{where}: binary data ends before element {i} of {count}")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if length == 0:
            raise InvalidInput(f"{where}: element {i} is empty")
        if offset + length > len(raw):
            raise InvalidInput(f"{where}: element {i} declares {length} bytes but only {len(raw) - offset} remain")
        elements.append(bytes(raw[offset : offset + length]))
        offset += length
    if offset != len(raw):
        raise InvalidInput(f"{where}: {len(raw) - offset} bytes left over after {count} elements")
    return elements


def requested_outputs(value: Any, parameters: dict, config: ProtocolConfig) -> list[tuple[str, bool]]:
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise InvalidInput("parameters.binary_data_output must be true or false")
    available = list(config.outputs)
    if value is None:
        return [(name, binary_default) for name in available]
    if not isinstance(value, list) or not value:
        raise InvalidInput(f"'outputs' must be a non-empty list of objects with a name, one of {available}")
    requested = []
    for output in value:
        name = output.get("name") if isinstance(output, dict) else None
        if name not in available:
            raise InvalidInput(f"unknown output {quote(name)}: this model gives {available}")
        params = output.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidInput(f"output {name!r}: parameters must be an object")
        binary = params.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise InvalidInput(f"output {name!r}: parameters.binary_data must be true or false")
        if any(name == seen for seen, _ in requested):
            raise InvalidInput(f"output {name!r} is requested twice")
        requested.append((name, binary))
    return requested


# ------------------------------------------------------------------------------------------ encoding
def bytes_tensor(values: list[str]) -> bytes:
    """A BYTES tensor in the binary extension's layout: per element, a 4-byte little-endian length, then UTF-8."""
    parts = []
    for value in values:
        raw = value.encode("utf-8")
        parts.append(struct.pack("<I", len(raw)))
        parts.append(raw)
    return b"".join(parts)


def encode_oip(call: Call, results: list[Classification], model: str, version: str, config: ProtocolConfig) -> Reply:
    k = min(len(r.labels) for r in results)  # every element of a call has the same k
    columns = {
        config.labels_output: [label for r in results for label in r.labels[:k]],
        config.scores_output: [float(s) for r in results for s in r.scores[:k]],
        config.indices_output: [int(i) for r in results for i in r.indices[:k]],
    }
    outputs, blobs = [], []
    for name, binary in call.outputs or []:
        datatype = config.outputs[name]
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": [len(results), k]}
        values = columns[name]
        if binary:
            blob = bytes_tensor(values) if datatype == "BYTES" else np.asarray(values, _NUMPY_TYPES[datatype]).tobytes()
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = [round(v, 6) for v in values] if datatype == "FP32" else values
        outputs.append(tensor)
    document: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": outputs}
    if call.request_id is not None:
        document["id"] = call.request_id
    if not blobs:
        return Reply(document)
    header = json.dumps(document, separators=(",", ":")).encode()
    return Reply(b"".join([header, *blobs]), BINARY_CONTENT_TYPE, {"Inference-Header-Content-Length": str(len(header))})


__all__ = [
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
]
