"""Hostile and good requests for the tabular model (``breast_cancer``), built in memory from the golden records.

``corpus()`` returns ``TabularCase`` objects: a name, the route (``predictions``: servekit's own
``/predictions/NAME``; ``v1``: KServe v1 ``/v1/models/NAME:predict``; ``v2``: OIP
``/v2/models/NAME/infer``), the exact body bytes and HTTP headers a client sends, and the answer
the served model must give: the exact status and a phrase its JSON ``error`` contains (the record
and the feature, e.g. ``record 2: feature 'mean area' is NaN``).

Every kind of bad value is sent in every input form that can carry it: one JSON record, a list of
records, KServe v1 instances, OIP JSON data and OIP binary tensors (where the binary form cannot
carry a kind, a string or a missing feature, it is left out). ``handler_request`` models what
TorchServe 0.12 hands the handler for a case, so the same corpus runs in process (unit tests) and
against a real TorchServe (integration tests). ``good_requests()`` are valid requests of every form
with the labels they must get, for mixed batches.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np

from tests.hostile_corpus import _ts_decode

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "breast_cancer"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
BINARY_HEADER = "Inference-Header-Content-Length"
PREDICTIONS, V1, V2 = "predictions", "v1", "v2"
TENSOR = "features"  # models.yaml: breast_cancer protocol.tensor_input
MAX_RECORDS = 256  # models.yaml: breast_cancer tabular.max_records
FEATURE = "mean area"  # the feature every bad value is put in
BAD_ROW = 2  # in multi-record requests, the record that carries the bad value (of 3)


@dataclass(frozen=True)
class TabularCase:
    name: str
    route: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 400
    phrase: str = ""
    labels: tuple[str, ...] = ()  # a good request: the label of each record

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")


@cache
def golden() -> tuple[tuple[dict, str], ...]:
    """The golden records (``samples/breast_cancer``) and their labels, malignant first."""
    entries = json.loads((SAMPLES / "golden.json").read_text())
    return tuple((json.loads((SAMPLES / e["file"]).read_text()), e["label"]) for e in entries)


def names() -> list[str]:
    return list(golden()[0][0])


def records(count: int = 3) -> list[dict]:
    pool = golden()
    return [dict(pool[i % len(pool)][0]) for i in range(count)]


def labels(count: int = 3) -> tuple[str, ...]:
    pool = golden()
    return tuple(pool[i % len(pool)][1] for i in range(count))


def dumps(document: object) -> bytes:
    """JSON as a client writes it; NaN and Infinity as Python's json writes them (and parses them)."""
    return json.dumps(document).encode()


def oip_json(rows: list[list], shape: list[int] | None = None, datatype: str = "FP32") -> bytes:
    shape = shape or [len(rows), len(rows[0])]
    return dumps({"inputs": [{"name": TENSOR, "datatype": datatype, "shape": shape, "data": rows}]})


def oip_binary(array: np.ndarray, declared: int | None = None) -> tuple[bytes, dict[str, str]]:
    """Binary tensors both ways, as tritonclient sends them by default."""
    raw = np.ascontiguousarray(array, dtype="<f4").tobytes()
    size = len(raw) if declared is None else declared
    document = {"inputs": [{"name": TENSOR, "datatype": "FP32", "shape": list(array.shape),
                            "parameters": {"binary_data_size": size}}],
                "parameters": {"binary_data_output": True}}  # fmt: skip
    header = json.dumps(document).encode()
    return header + raw, {"Content-Type": BINARY_TYPE, BINARY_HEADER: str(len(header))}


def as_rows(batch: list[dict]) -> list[list]:
    return [[record[name] for name in names()] for record in batch]


# ------------------------------------------------------------------------------------------ good
def good_requests() -> list[TabularCase]:
    """One valid request per form (and a few records each), with the labels the model must give."""
    one, three = records(1), records(3)
    binary, headers = oip_binary(np.array(as_rows(records(4)), dtype=np.float32))
    json_headers = {"Content-Type": JSON_TYPE}
    return [
        TabularCase("good-record", PREDICTIONS, dumps(one[0]), json_headers, 200, labels=labels(1)),
        TabularCase("good-list", PREDICTIONS, dumps(three), json_headers, 200, labels=labels(3)),
        TabularCase("good-record-bytes", PREDICTIONS, dumps(one[0]), {}, 200, labels=labels(1)),
        TabularCase("good-kserve-v1", V1, dumps({"instances": three}), json_headers, 200, labels=labels(3)),
        TabularCase(
            "good-kserve-v1-lists", V1, dumps({"instances": as_rows(three)}), json_headers, 200, labels=labels(3)
        ),  # fmt: skip
        TabularCase("good-oip-json", V2, oip_json(as_rows(three)), json_headers, 200, labels=labels(3)),
        TabularCase("good-oip-binary", V2, binary, headers, 200, labels=labels(4)),
    ]


# ------------------------------------------------------------------------------------------ hostile
HUGE_INT = 10**400  # parses as a JSON integer; no float holds it

# kind -> (the value put in FEATURE, what the error says after "feature 'mean area' ")
VALUES = {
    "string": ("575.5", "must be a number, got '575.5' (a string)"),
    "bool": (True, "must be a number, got true (a boolean)"),
    "null": (None, "must be a number, got null"),
    "nan": (float("nan"), "is NaN"),
    "infinity": (float("inf"), "is infinite"),
    "minus-infinity": (float("-inf"), "is infinite"),
    "far-above": (1e7, "is 1e+07, far outside its training range"),
    "negative": (-5.0, "is -5, far outside its training range"),
    "huge-integer": (HUGE_INT, "is too large to be a number"),
}
BINARY_KINDS = ("nan", "infinity", "minus-infinity", "far-above", "negative")


def _bad_record(kind: str) -> dict:
    record = records(1)[0]
    if kind == "missing":
        record.pop(FEATURE)
    elif kind == "unknown":
        record["mean aera"] = record.pop(FEATURE)  # a typo: missing and unknown at once; unknown is named
    else:
        record[FEATURE] = VALUES[kind][0]
    return record


def _message(kind: str, where: str) -> str:
    if kind == "missing":
        return f"{where}: feature '{FEATURE}' is missing"
    if kind == "unknown":
        return f"{where}: unknown feature 'mean aera' (did you mean '{FEATURE}'?)"
    return f"{where}: feature '{FEATURE}' {VALUES[kind][1]}"


def _record_cases() -> list[TabularCase]:
    json_headers = {"Content-Type": JSON_TYPE}
    cases = []
    for kind in ("missing", "unknown", *VALUES):
        bad = _bad_record(kind)
        batch = records(3)
        batch[BAD_ROW] = bad
        cases += [
            TabularCase(f"record-{kind}", PREDICTIONS, dumps(bad), json_headers, phrase=_message(kind, "record 0")),
            TabularCase(
                f"list-{kind}", PREDICTIONS, dumps(batch), json_headers, phrase=_message(kind, f"record {BAD_ROW}")
            ),  # fmt: skip
            TabularCase(
                f"kserve-v1-{kind}",
                V1,
                dumps({"instances": batch}),
                json_headers,
                phrase=_message(kind, f"instances[{BAD_ROW}]"),
            ),  # fmt: skip
        ]
    return cases


def _oip_cases() -> list[TabularCase]:
    json_headers = {"Content-Type": JSON_TYPE}
    where = f"input '{TENSOR}' row {BAD_ROW}"
    column = names().index(FEATURE)
    cases = []
    for kind, (value, _) in VALUES.items():
        rows = as_rows(records(3))
        rows[BAD_ROW][column] = value
        cases.append(TabularCase(f"oip-json-{kind}", V2, oip_json(rows), json_headers, phrase=_message(kind, where)))
    for kind in BINARY_KINDS:
        array = np.array(as_rows(records(3)), dtype=np.float32)
        array[BAD_ROW, column] = VALUES[kind][0]
        body, headers = oip_binary(array)
        cases.append(TabularCase(f"oip-binary-{kind}", V2, body, headers, phrase=_message(kind, where)))
    rows = as_rows(records(3))
    short = [row[:-1] for row in rows]
    body, headers = oip_binary(np.array(rows, dtype=np.float32), declared=100)
    cases += [
        TabularCase("oip-json-missing-feature", V2, oip_json(short), json_headers,
                    phrase=f"input '{TENSOR}'.shape must be [N, 30] (N records of the model's 30 features), "
                    "got [3, 29]"),  # fmt: skip
        TabularCase("oip-json-count-mismatch", V2, oip_json(rows, shape=[4, 30]), json_headers,
                    phrase=f"input '{TENSOR}'.data holds 90 numbers; its shape [4, 30] needs 120"),  # fmt: skip
        TabularCase("oip-json-int64", V2, oip_json(rows, datatype="INT64"), json_headers,
                    phrase=f"input '{TENSOR}' must have datatype FP32, got 'INT64'"),  # fmt: skip
        TabularCase("oip-unknown-input", V2, oip_json(rows).replace(b'"features"', b'"pixels"'), json_headers,
                    phrase="unknown input 'pixels': this model takes one of ['features']"),  # fmt: skip
        TabularCase("oip-binary-size-lie", V2, body, headers,
                    phrase=f"input '{TENSOR}'.parameters.binary_data_size is 100 but 360 bytes follow the header"),
    ]  # fmt: skip
    return cases


def _request_cases() -> list[TabularCase]:
    json_headers = {"Content-Type": JSON_TYPE}
    many = records(MAX_RECORDS + 1)
    return [
        TabularCase("empty-body", PREDICTIONS, b"", {"Content-Type": BINARY_TYPE},
                    phrase="request body is empty"),  # fmt: skip
        TabularCase("malformed-json", PREDICTIONS, b'{"mean radius": 14.1,', {"Content-Type": BINARY_TYPE},
                    phrase="malformed JSON body"),  # fmt: skip
        TabularCase("empty-list", PREDICTIONS, b"[]", json_headers, phrase="records: no records in the request"),
        TabularCase("too-many-records", PREDICTIONS, dumps(many), json_headers, status=413,
                    phrase=f"records: {MAX_RECORDS + 1} records in one request; the limit is {MAX_RECORDS}"),
        TabularCase("record-is-a-number", PREDICTIONS, b"[14.1]", json_headers,
                    phrase="record 0: a record must be a JSON object of feature names and numbers, got 14.1"),
        TabularCase("record-is-a-string", PREDICTIONS, b'"hello"', json_headers,
                    phrase="expected a JSON record (an object of feature names and numbers) or a list of records"),
        TabularCase("kserve-v1-short-list", V1, dumps({"instances": [[1.0, 2.0]]}), json_headers,
                    phrase="instances[0]: a record given as a list needs the 30 feature values"),
        TabularCase("kserve-v1-not-a-list", V1, dumps({"instances": {"mean radius": 1}}), json_headers,
                    phrase="'instances' must be a list of records, got an object"),
        TabularCase("kserve-v1-too-many", V1, dumps({"instances": many}), json_headers, status=413,
                    phrase=f"instances: {MAX_RECORDS + 1} records in one request"),
    ]  # fmt: skip


@cache
def corpus() -> tuple[TabularCase, ...]:
    cases = (*_record_cases(), *_oip_cases(), *_request_cases())
    seen = [case.name for case in cases]
    assert len(set(seen)) == len(seen), "duplicate case names"
    return cases


# ------------------------------------------------------------------------------------------ what a worker sees
def handler_request(case: TabularCase) -> tuple[dict, dict[str, str]]:
    """The request dict TorchServe 0.12 hands the handler for ``case``, and its lower-case headers."""
    headers = {name.lower(): value for name, value in case.headers.items()}
    return {"body": _ts_decode(case.body, case.content_type)}, headers


def route(case: TabularCase, model: str, version: str | None = None) -> str:
    """The inference API path of ``case`` (the versioned form only for servekit's own route)."""
    if case.route == V1:
        return f"/v1/models/{model}:predict"
    if case.route == V2:
        return f"/v2/models/{model}/infer"
    return f"/predictions/{model}" + (f"/{version}" if version else "")


def oip_labels(body: bytes | dict, headers: dict[str, str]) -> list[str]:
    """The ``labels`` output of a JSON or binary OIP answer (a handler's answer may be the JSON document)."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    length = {k.lower(): v for k, v in headers.items()}.get(BINARY_HEADER.lower())
    header_length = int(length) if length is not None else len(body)
    document = json.loads(body[:header_length])
    output = next(o for o in document["outputs"] if o["name"] == "labels")
    if "data" in output:
        return list(output["data"])
    offset = header_length + sum(
        (o.get("parameters") or {}).get("binary_data_size", 0)
        for o in document["outputs"][: document["outputs"].index(output)]
    )
    values, end = [], offset + output["parameters"]["binary_data_size"]
    while offset < end:
        (size,) = struct.unpack_from("<I", body, offset)
        values.append(body[offset + 4 : offset + 4 + size].decode())
        offset += 4 + size
    return values
