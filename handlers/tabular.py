"""Tabular records for ``handlers.tabular_classifier``: the feature schema, record validation, the protocols.

The settings are the archive's ``handler:`` section, ``TabularConfig``; the build writes it from
the data set the model was trained on (``servekit.build.tabular``) and the worker reads it back::

    handler:
      precision: fp32            # the fields every task shares: handlers.config.RuntimeConfig
      labels_file: labels.json   # (threads, quantized_engine, optimize, faults, prediction_log too;
      threads: null              #  here threads is at most 1024)
      features:                  # the model's inputs, in the order it takes them (also in features.json)
        - {name: mean radius, type: float, unit: ..., min: 6.981, max: 28.11, lower: 0.0, upper: 38.68}
      range_tolerance: 0.5       # how the build widened [min, max] into [lower, upper] (recorded)
      max_records: 256           # records in one request: each is one model input of the server-side batch
      protocol: {tensor_input: features, labels_output: labels, scores_output: scores, indices_output: indices}

A request is one of (``decode``; the protocol is read from the request, as for images):

* servekit's own: one JSON record ``{"mean radius": 14.1, ...}`` or a JSON list of records;
* KServe v1: ``{"instances": [record, ...]}``; a record may also be the list of its numbers in
  the schema's order;
* Open Inference Protocol v2: one FP32 tensor ``[N, F]`` named ``protocol.tensor_input``, in JSON
  ``data`` or with the binary tensor extension.

Every record is validated before any reaches the model: every feature present, none unknown,
JSON numbers only (a string, a boolean or null is refused), finite, and inside the feature's
accepted range ``[lower, upper]`` (the training range widened by ``range_tolerance`` of its span,
never below 0 for a feature that is never negative in training). A record that fails gets its
request a 400 naming the record and the feature (``record 3: feature 'mean area' is NaN``); the
other requests of the server-side batch are answered as usual.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from handlers import protocols
from handlers.config import RuntimeConfig
from handlers.errors import InvalidInput, PayloadTooLarge
from handlers.protocols import Classification, Reply, quote

FEATURE_TYPES = ("float",)
MAX_RECORDS_LIMIT = 4096
MAX_NAME_CHARS = 64


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _whole(name: str, value: Any, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name}: must be an integer from {low} to {high}, got {value!r}")


# ------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Feature:
    """One input column: its name, type and unit, its training range and the range a request may use."""

    name: str
    min: float
    max: float
    lower: float
    upper: float
    type: str = "float"
    unit: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip() or len(self.name) > MAX_NAME_CHARS:
            raise ValueError(f"features: a name must be a non-empty string of at most {MAX_NAME_CHARS} characters, "
                             f"got {self.name!r}")  # fmt: skip
        if self.type not in FEATURE_TYPES:
            raise ValueError(f"features: {self.name!r}: type must be one of {list(FEATURE_TYPES)}, got {self.type!r}")
        if not isinstance(self.unit, str):
            raise ValueError(f"features: {self.name!r}: unit must be a string, got {self.unit!r}")
        bounds = (self.lower, self.min, self.max, self.upper)
        if not all(_number(v) for v in bounds) or list(bounds) != sorted(bounds):
            raise ValueError(
                f"features: {self.name!r}: needs finite numbers with lower <= min <= max <= upper, "
                f"got {self.lower!r}, {self.min!r}, {self.max!r}, {self.upper!r}"
            )

    @classmethod
    def from_dict(cls, data: Any) -> Feature:
        if not isinstance(data, dict):
            raise ValueError(f"features: each feature must be a mapping (name, type, unit, min, max, lower, upper), "
                             f"got {data!r}")  # fmt: skip
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"features: unknown key {unknown[0]!r} (valid keys: {', '.join(sorted(known))})")
        return cls(**data)


@dataclass(frozen=True)
class TabularProtocol:
    """Names the protocols use for this model's tensors (the spec's ``protocol:`` section).

    ``tensor_input``: the FP32 ``[N, F]`` input of OIP; outputs ``labels`` (BYTES), ``scores``
    (FP32) and ``indices`` (INT64), each ``[N, 1]``: the top-1 class of every record.
    """

    tensor_input: str = "features"
    labels_output: str = "labels"
    scores_output: str = "scores"
    indices_output: str = "indices"

    def __post_init__(self) -> None:
        named = {f.name: getattr(self, f.name) for f in fields(self)}
        for key, name in named.items():
            if not isinstance(name, str) or not protocols.TENSOR_NAME_RE.match(name):
                raise ValueError(
                    f"{key}: a tensor name starts with a letter or _ and holds at most 64 letters, digits, "
                    f"_ . -; got {name!r}"
                )
        if len(set(named.values())) != len(named):
            raise ValueError(f"tensor names must be distinct, got {sorted(named.values())}")

    @property
    def outputs(self) -> dict[str, str]:
        """Output name -> datatype, in the order answers list them."""
        return {self.labels_output: "BYTES", self.scores_output: "FP32", self.indices_output: "INT64"}

    @classmethod
    def from_dict(cls, data: dict | None) -> TabularProtocol:
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown key in protocol (valid keys: {', '.join(sorted(known))})")
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TabularConfig(RuntimeConfig):
    """What the tabular classifier needs besides its program and the shared fields (module docstring)."""

    features: tuple[Feature, ...] = ()
    range_tolerance: float = 0.5
    max_records: int = 256
    protocol: TabularProtocol = field(default_factory=TabularProtocol)

    max_threads: ClassVar[int | None] = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.features, tuple) or not all(isinstance(f, Feature) for f in self.features):
            raise ValueError("features must be a tuple of Feature objects")
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            duplicate = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"features: {duplicate!r} is listed twice")
        tolerance = self.range_tolerance
        if not _number(tolerance) or not 0 <= tolerance <= 100:
            raise ValueError(f"range_tolerance: must be a number from 0 to 100, got {tolerance!r}")
        _whole("max_records", self.max_records, 1, MAX_RECORDS_LIMIT)
        if not isinstance(self.protocol, TabularProtocol):
            raise ValueError("protocol must be a TabularProtocol object")

    @classmethod
    def parse_sections(cls, data: dict) -> dict:
        if "features" in data:
            if not isinstance(data["features"], list | tuple):
                raise ValueError(f"features: must be a list of features, got {data['features']!r}")
            data["features"] = tuple(Feature.from_dict(f) for f in data["features"])
        if "protocol" in data:
            try:
                data["protocol"] = TabularProtocol.from_dict(data["protocol"])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"protocol: {exc}") from None
        return data


def oip_metadata(config: TabularProtocol, features: tuple[Feature, ...], num_classes: int, max_records: int) -> dict:
    """The inputs and outputs of ``GET /v2/models/NAME`` (without name and versions)."""
    outputs = [{"name": name, "datatype": dtype, "shape": [-1, 1]} for name, dtype in config.outputs.items()]
    return {
        "platform": "pytorch_torchscript",
        "inputs": [{"name": config.tensor_input, "datatype": "FP32", "shape": [-1, len(features)]}],
        "outputs": outputs,
        "parameters": {
            "num_classes": num_classes,
            "max_records": max_records,
            "features": [f.name for f in features],
        },
    }


# ------------------------------------------------------------------------------------------ records
def _what(value: Any) -> str:
    """A refused value as the client wrote it, bounded."""
    if isinstance(value, bool):
        return f"{'true' if value else 'false'} (a boolean)"
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"{quote(value)} (a string)"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, int | float):
        text = repr(value)
        return text if len(text) <= 40 else text[:40] + "..."
    return quote(value)


class RecordSchema:
    """The features a record must hold, in the model's order, and the checks of their values (built once)."""

    def __init__(self, features: tuple[Feature, ...], max_records: int) -> None:
        if not features:
            raise ValueError("features: the handler config lists no features (the build writes them)")
        self.features = features
        self.names = tuple(f.name for f in features)
        self.name_set = frozenset(self.names)
        self.max_records = max_records
        self.lower = np.array([f.lower for f in features], dtype=np.float64)
        self.upper = np.array([f.upper for f in features], dtype=np.float64)

    @property
    def width(self) -> int:
        return len(self.names)

    def typical(self) -> dict[str, float]:
        """A valid record: every feature at the middle of its training range (warm-up)."""
        return {f.name: (f.min + f.max) / 2 for f in self.features}

    def check_count(self, count: int, what: str) -> None:
        if count < 1:
            raise InvalidInput(f"{what}: no records in the request")
        if count > self.max_records:
            raise PayloadTooLarge(f"{what}: {count} records in one request; the limit is {self.max_records}")

    # ---------------------------------------------------------------- one record
    def values(self, record: Any, where: str) -> list:
        """The numbers of one record (an object, or a list in the schema's order), types checked."""
        if isinstance(record, dict):
            if len(record) != len(self.names) or record.keys() != self.name_set:
                raise self._key_error(record, where)
            numbers = [record[name] for name in self.names]
        elif isinstance(record, list):
            if len(record) != len(self.names):
                raise InvalidInput(
                    f"{where}: a record given as a list needs the {len(self.names)} feature values in the "
                    f"model's order, got {len(record)} values"
                )
            numbers = record
        else:
            raise InvalidInput(
                f"{where}: a record must be a JSON object of feature names and numbers, got {_what(record)}"
            )
        for column, value in enumerate(numbers):
            if type(value) is not float and type(value) is not int:  # bool is an int subclass: refused here
                raise InvalidInput(f"{where}: feature {self.names[column]!r} must be a number, got {_what(value)}")
        return numbers

    def _key_error(self, record: dict, where: str) -> InvalidInput:
        unknown = [key for key in record if key not in self.name_set]
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), self.names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else " (the model's features are listed in features.json)"
            return InvalidInput(f"{where}: unknown feature {quote(unknown[0])}{hint}")
        missing = [name for name in self.names if name not in record]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        return InvalidInput(f"{where}: feature {missing[0]!r} is missing{more}")

    # ---------------------------------------------------------------- many records
    def rows(self, records: list, where: Any) -> np.ndarray:
        """``[N, F]`` float32 of ``records``; ``where(i)`` names record ``i`` in error messages."""
        values = [self.values(record, where(i)) for i, record in enumerate(records)]
        return self.checked(self.to_array(values, where), where)

    def to_array(self, values: list, where: Any) -> np.ndarray:
        try:
            return np.array(values, dtype=np.float64).reshape(len(values), self.width)
        except OverflowError:  # an integer too large for a float: find it, and name it
            for i, row in enumerate(values):
                for column, value in enumerate(row):
                    try:
                        float(value)
                    except OverflowError:
                        raise InvalidInput(
                            f"{where(i)}: feature {self.names[column]!r} is too large to be a number ({quote(value)})"
                        ) from None
            raise

    def checked(self, array: np.ndarray, where: Any) -> np.ndarray:
        """``array`` (``[N, F]`` float64) as float32, once every value is finite and in its accepted range."""
        finite = np.isfinite(array)
        if not finite.all():
            row, column = (int(v) for v in np.argwhere(~finite)[0])
            value = array[row, column]
            raise InvalidInput(
                f"{where(row)}: feature {self.names[column]!r} is {'NaN' if math.isnan(value) else 'infinite'}"
            )
        outside = (array < self.lower) | (array > self.upper)
        if outside.any():
            row, column = (int(v) for v in np.argwhere(outside)[0])
            f = self.features[column]
            raise InvalidInput(
                f"{where(row)}: feature {f.name!r} is {array[row, column]:.6g}, far outside its training range "
                f"{f.min:.6g} to {f.max:.6g} (accepted: {f.lower:.6g} to {f.upper:.6g})"
            )
        return array.astype(np.float32)


# ------------------------------------------------------------------------------------------ the call
@dataclass
class TabularCall:
    """One request, decoded: its records as rows ``[N, F]`` and how to answer it."""

    protocol: str  # "native" | "kserve_v1" | "oip_v2"
    rows: np.ndarray
    request_id: str | None = None
    outputs: list[tuple[str, bool]] | None = None  # OIP: (name, binary) in the requested order

    @property
    def size(self) -> int:
        return len(self.rows)

    def encode(self, results: list[Classification], model: str, version: str, config: TabularProtocol) -> Reply:
        if self.protocol == "oip_v2":
            return protocols.encode_oip(self, results, model, version, config)
        predictions = [result.as_predictions()[0] for result in results]
        if self.protocol == "kserve_v1":
            return Reply({"predictions": predictions, "model_name": model, "model_version": version})
        return Reply({"predictions": predictions, "model": model, "version": version})


EMPTY_BODY = "request body is empty: send a JSON record, a JSON list of records, KServe v1 or OIP v2"


def decode(request: dict, headers: dict[str, str], schema: RecordSchema, config: TabularProtocol) -> TabularCall:
    """One TorchServe request dict -> its records (module docstring); ``protocols.read_envelope`` tells the protocol."""
    envelope = protocols.read_envelope(request, headers, json_only=True)  # records are JSON, always
    document = envelope.document
    if envelope.protocol == "oip_v2":
        return _decode_oip(document, envelope.tail, schema, config)
    if envelope.protocol == "kserve_v1":
        return _decode_kserve_v1(document, schema)
    if document is None or (isinstance(document, str) and not document.strip()):
        raise InvalidInput(EMPTY_BODY)
    if isinstance(document, dict):
        return TabularCall("native", schema.rows([document], lambda i: f"record {i}"))
    if isinstance(document, list):
        schema.check_count(len(document), "records")
        return TabularCall("native", schema.rows(document, lambda i: f"record {i}"))
    raise InvalidInput(f"expected a JSON record (an object of feature names and numbers) or a list of records, "
                       f"got {_what(document)}")  # fmt: skip


def _decode_kserve_v1(document: dict, schema: RecordSchema) -> TabularCall:
    instances = document["instances"]
    if not isinstance(instances, list):
        raise InvalidInput(f"'instances' must be a list of records, got {_what(instances)}")
    schema.check_count(len(instances), "instances")
    return TabularCall("kserve_v1", schema.rows(instances, lambda i: f"instances[{i}]"))


def _decode_oip(document: dict, tail: bytes | memoryview, schema: RecordSchema, config: TabularProtocol) -> TabularCall:
    tensor = protocols.oip_input(document, tail, [config.tensor_input])
    where, shape, width = tensor.where, tensor.shape, schema.width
    if tensor.datatype != "FP32":
        raise InvalidInput(f"{where} must have datatype FP32, got {quote(tensor.datatype)}")
    if len(shape) != 2 or shape[1] != width:
        raise InvalidInput(f"{where}.shape must be [N, {width}] (N records of the model's {width} features), "
                           f"got {shape}")  # fmt: skip
    count = shape[0]
    schema.check_count(count, where)
    total = count * width

    def row(i: int) -> str:
        return f"{where} row {i}"

    if tensor.binary is not None:
        if len(tensor.binary) != total * 4:
            raise InvalidInput(f"{where}: shape {shape} needs {total * 4} bytes of FP32, got {len(tensor.binary)}")
        array = np.frombuffer(tensor.binary, dtype="<f4").astype(np.float64).reshape(count, width)
    else:
        elements = protocols.flatten(tensor.data, total, where)
        if len(elements) != total:
            raise InvalidInput(f"{where}.data holds {len(elements)} numbers; its shape {shape} needs {total}")
        values = [schema.values(elements[i * width : (i + 1) * width], row(i)) for i in range(count)]
        array = schema.to_array(values, row)
    rows = schema.checked(array, row)
    outputs = protocols.requested_outputs(document.get("outputs"), tensor.parameters, config)
    return TabularCall("oip_v2", rows, tensor.request_id, outputs)


__all__ = [
    "Feature",
    "RecordSchema",
    "TabularCall",
    "TabularConfig",
    "TabularProtocol",
    "decode",
    "oip_metadata",
]
