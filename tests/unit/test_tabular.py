"""The tabular task: settings, record validation, protocol decoding, the build (folding, INT8) and the handler."""

from __future__ import annotations

import importlib
import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from ts.utils.util import list_classes_from_module

from handlers import tabular
from handlers.errors import InvalidInput, PayloadTooLarge
from handlers.model_loading import load_model
from handlers.protocols import BINARY_HEADER, Classification
from handlers.tabular import Feature, RecordSchema, TabularConfig, TabularProtocol
from handlers.tabular_classifier import TabularClassifier
from servekit.build import tabular as build
from servekit.build.spec import SpecError, load_spec
from servekit.serving.store import archive_name, read_manifest
from tests import hostile_corpus_tabular as corpus
from tests.fake_context import FakeContext

pytestmark = pytest.mark.unit

MODEL = "breast_cancer"
VERSIONS = {"1.0": "fp32", "2.0": "int8"}
MIN_ACCURACY = 95.0

# A small schema for the decoding tests: two features, one never negative in training.
SMALL = (
    Feature(name="size", min=1.0, max=3.0, lower=0.0, upper=4.0, unit="mm"),
    Feature(name="shift", min=-1.0, max=1.0, lower=-2.0, upper=2.0),
)
SCHEMA = RecordSchema(SMALL, max_records=4)
PROTOCOL = TabularProtocol(tensor_input="features")


def decode(body, headers: dict[str, str] | None = None) -> tabular.TabularCall:
    return tabular.decode({"body": body}, headers or {}, SCHEMA, PROTOCOL)


def refused(body, headers: dict[str, str] | None = None, error: type = InvalidInput) -> str:
    with pytest.raises(error) as info:
        decode(body, headers)
    return str(info.value)


# ------------------------------------------------------------------------------------------ settings
def test_config_round_trips_and_refuses_bad_values_with_the_key() -> None:
    config = TabularConfig(features=SMALL, max_records=8)
    assert TabularConfig.from_dict(config.to_dict()) == config
    assert TabularConfig.from_dict(None) == TabularConfig()
    assert set(config.to_dict()) == set(TabularConfig().to_dict())
    cases = [
        ({"precision": "fp16"}, "precision: must be one of ['fp32', 'int8', 'bf16'], got 'fp16'"),
        ({"max_records": 0}, "max_records: must be an integer from 1 to 4096, got 0"),
        ({"range_tolerance": -1}, "range_tolerance: must be a number from 0 to 100, got -1"),
        ({"topk": 3}, "topk: unknown key in the handler section"),
        ({"protocol": {"tensor_input": "1x"}}, "protocol: tensor_input: a tensor name starts with a letter"),
        ({"features": [{"name": "a", "min": 2, "max": 1, "lower": 0, "upper": 3}]},
         "features: 'a': needs finite numbers with lower <= min <= max <= upper"),
        ({"features": [{"name": "a", "min": 0, "max": 1, "lower": 0, "upper": 1, "kind": "x"}]},
         "features: unknown key 'kind'"),
        ({"features": [{"name": "a", "min": 0, "max": 1, "lower": 0, "upper": 1, "type": "int"}]},
         "features: 'a': type must be one of ['float'], got 'int'"),
        ({"features": [asdict_feature(SMALL[0]), asdict_feature(SMALL[0])]}, "features: 'size' is listed twice"),
    ]  # fmt: skip
    for data, message in cases:
        with pytest.raises(ValueError) as info:
            TabularConfig.from_dict(data)
        assert message in str(info.value), (data, str(info.value))


def asdict_feature(feature: Feature) -> dict:
    from dataclasses import asdict

    return asdict(feature)


def test_oip_metadata_names_the_input_the_outputs_and_the_features() -> None:
    metadata = tabular.oip_metadata(PROTOCOL, SMALL, 2, 4)
    assert metadata["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 2]}]
    assert [o["name"] for o in metadata["outputs"]] == ["labels", "scores", "indices"]
    assert all(o["shape"] == [-1, 1] for o in metadata["outputs"])
    assert metadata["parameters"] == {"num_classes": 2, "max_records": 4, "features": ["size", "shift"]}


# ------------------------------------------------------------------------------------------ records
def test_every_form_decodes_to_the_same_rows() -> None:
    rows = np.array([[1.5, -0.5], [3.0, 1.0]], dtype=np.float32)
    records = [{"size": 1.5, "shift": -0.5}, {"shift": 1, "size": 3}]  # any key order, integers too
    oip = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [2, 2], "data": rows.tolist()}]}
    header = json.dumps({"inputs": [{"name": "features", "datatype": "FP32", "shape": [2, 2],
                                     "parameters": {"binary_data_size": 16}}]}).encode()  # fmt: skip
    forms = {
        "list": decode(records),
        "list-bytes": decode(json.dumps(records).encode()),
        "list-text": decode(json.dumps(records)),
        "kserve-v1": decode({"instances": records}),
        "kserve-v1-lists": decode({"instances": rows.tolist()}),
        "oip-json": decode(oip),
        "oip-json-flat": decode({"inputs": [{**oip["inputs"][0], "data": rows.ravel().tolist()}]}),
        "oip-binary": decode(header + rows.tobytes(), {BINARY_HEADER.lower(): str(len(header))}),
    }
    for name, call in forms.items():
        assert call.rows.dtype == np.float32, name
        np.testing.assert_array_equal(call.rows, rows, err_msg=name)
    assert [forms[k].protocol for k in ("list", "kserve-v1", "oip-json", "oip-binary")] == [
        "native", "kserve_v1", "oip_v2", "oip_v2"
    ]  # fmt: skip
    single = decode(records[0])
    assert (single.protocol, single.size) == ("native", 1)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"size": 1.0}, "record 0: feature 'shift' is missing"),
        ({}, "record 0: feature 'size' is missing (and 1 more)"),
        ({"size": 1.0, "shift": 0.0, "sise": 2.0}, "record 0: unknown feature 'sise' (did you mean 'size'?)"),
        ({"size": 1.0, "zzz": 0.0}, "record 0: unknown feature 'zzz' (the model's features are listed in features"),
        ({"size": "1.0", "shift": 0.0}, "record 0: feature 'size' must be a number, got '1.0' (a string)"),
        ({"size": True, "shift": 0.0}, "record 0: feature 'size' must be a number, got true (a boolean)"),
        ({"size": None, "shift": 0.0}, "record 0: feature 'size' must be a number, got null"),
        ({"size": [1.0], "shift": 0.0}, "record 0: feature 'size' must be a number, got a list"),
        ({"size": float("nan"), "shift": 0.0}, "record 0: feature 'size' is NaN"),
        ({"size": 1.0, "shift": float("-inf")}, "record 0: feature 'shift' is infinite"),
        ({"size": 10**400, "shift": 0.0}, "record 0: feature 'size' is too large to be a number ('1000000000"),
        ({"size": 4.5, "shift": 0.0},
         "record 0: feature 'size' is 4.5, far outside its training range 1 to 3 (accepted: 0 to 4)"),
        ({"size": -0.1, "shift": 0.0}, "record 0: feature 'size' is -0.1, far outside"),
        ({"size": 1.0, "shift": -2.5}, "record 0: feature 'shift' is -2.5, far outside its training range -1 to 1"),
    ],
)  # fmt: skip
def test_a_bad_record_is_refused_naming_the_record_and_the_feature(record: dict, message: str) -> None:
    assert refused(record).startswith(message)
    good = {"size": 2.0, "shift": 0.0}
    assert refused([good, record]).startswith(message.replace("record 0", "record 1"))
    assert refused({"instances": [good, good, record]}).startswith(message.replace("record 0", "instances[2]"))


def test_the_accepted_range_is_inclusive() -> None:
    call = decode([{"size": 0.0, "shift": -2.0}, {"size": 4.0, "shift": 2.0}])
    np.testing.assert_array_equal(call.rows, [[0.0, -2.0], [4.0, 2.0]])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([[1.0, 0.0], [2.0, "x"]], "input 'features' row 1: feature 'shift' must be a number, got 'x' (a string)"),
        ([[1.0, 0.0], [False, 0.0]], "input 'features' row 1: feature 'size' must be a number, got false"),
        ([[1.0, 0.0], [None, 0.0]], "input 'features' row 1: feature 'size' must be a number, got null"),
        ([[1.0, 0.0], [float("nan"), 0.0]], "input 'features' row 1: feature 'size' is NaN"),
        ([[1.0, 9.0], [1.0, 0.0]], "input 'features' row 0: feature 'shift' is 9, far outside"),
        ([[1.0, 0.0], [10**400, 0.0]], "input 'features' row 1: feature 'size' is too large to be a number"),
    ],
)  # fmt: skip
def test_oip_json_values_are_checked_like_records(data: list, message: str) -> None:
    document = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [2, 2], "data": data}]}
    assert refused(document).startswith(message)


@pytest.mark.parametrize(("value", "what"), [(float("nan"), "is NaN"), (float("inf"), "is infinite"),
                                             (1e30, "is 1e+30, far outside")])  # fmt: skip
def test_oip_binary_values_are_checked_like_records(value: float, what: str) -> None:
    rows = np.array([[1.0, 0.0], [2.0, 0.0]], dtype="<f4")
    rows[1, 0] = value
    header = json.dumps({"inputs": [{"name": "features", "datatype": "FP32", "shape": [2, 2],
                                     "parameters": {"binary_data_size": 16}}]}).encode()  # fmt: skip
    message = refused(header + rows.tobytes(), {BINARY_HEADER.lower(): str(len(header))})
    assert message.startswith(f"input 'features' row 1: feature 'size' {what}")


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        ({"datatype": "FP64", "shape": [1, 2], "data": [1.0, 0.0]}, "input 'features' must have datatype FP32"),
        ({"datatype": "FP32", "shape": [2], "data": [1.0, 0.0]}, "input 'features'.shape must be [N, 2] (N records"),
        ({"datatype": "FP32", "shape": [1, 3], "data": [1.0, 0.0, 1.0]}, "input 'features'.shape must be [N, 2]"),
        ({"datatype": "FP32", "shape": [2, 2], "data": [1.0, 0.0]}, "input 'features'.data holds 2 numbers; its shape"),
        ({"datatype": "FP32", "shape": [0, 2], "data": []}, "input 'features': no records in the request"),
    ],
)  # fmt: skip
def test_oip_envelope_errors(tensor: dict, message: str) -> None:
    assert refused({"inputs": [{"name": "features", **tensor}]}).startswith(message)
    assert refused({"inputs": [{"name": "pixels", **tensor}]}) == (
        "unknown input 'pixels': this model takes one of ['features']"
    )


def test_request_level_errors() -> None:
    record = {"size": 2.0, "shift": 0.0}
    assert refused(b"") == tabular.EMPTY_BODY
    assert refused(b"  \n") == tabular.EMPTY_BODY
    assert refused(None) == tabular.EMPTY_BODY
    assert refused(b'{"size": ').startswith("malformed JSON body: ")
    assert refused(b"\xff\xfe").startswith("JSON body is not valid UTF-8") or refused(b"\xff\xfe").startswith(
        "malformed JSON body"
    )
    assert refused([]) == "records: no records in the request"
    assert refused([record] * 5, error=PayloadTooLarge) == "records: 5 records in one request; the limit is 4"
    assert refused({"instances": [record] * 5}, error=PayloadTooLarge).startswith("instances: 5 records")
    assert refused("hello").startswith("expected a JSON record (an object of feature names and numbers)")
    assert refused(7) == ("expected a JSON record (an object of feature names and numbers) or a list of records, got 7")
    assert refused([7]) == "record 0: a record must be a JSON object of feature names and numbers, got 7"
    assert refused({"instances": "x"}) == "'instances' must be a list of records, got 'x' (a string)"
    assert refused({"instances": [[1.0]]}).startswith("instances[0]: a record given as a list needs the 2 feature")


def test_oip_answers_only_the_outputs_asked_for_with_the_request_id() -> None:
    document = {"id": "r1", "inputs": [{"name": "features", "datatype": "FP32", "shape": [2, 2],
                                         "data": [1.0, 0.0, 2.0, 0.5]}],
                "outputs": [{"name": "labels"}, {"name": "scores", "parameters": {"binary_data": True}}]}  # fmt: skip
    call = decode(document)
    assert (call.request_id, call.outputs) == ("r1", [("labels", False), ("scores", True)])
    results = [Classification(["benign"], [1], [0.9]), Classification(["malignant"], [0], [0.75])]
    reply = call.encode(results, "m", "1.0", PROTOCOL)
    header_length = int(reply.headers["Inference-Header-Content-Length"])
    header = json.loads(reply.body[:header_length])
    assert header["id"] == "r1"
    assert header["outputs"][0] == {
        "name": "labels",
        "datatype": "BYTES",
        "shape": [2, 1],
        "data": ["benign", "malignant"],
    }
    assert header["outputs"][1]["shape"] == [2, 1]
    assert np.frombuffer(reply.body[header_length:], "<f4").tolist() == [0.8999999761581421, 0.75]


# ------------------------------------------------------------------------------------------ spec
def base_model(**overrides) -> dict:
    model = {
        "architecture": "mlp",
        "handler": "tabular_classifier",
        "labels": ["malignant", "benign"],
        "evaluation": "breast_cancer",
        "versions": {"1.0": {"precision": "fp32", "weights": {"train": "breast_cancer", "epochs": 2}}},
    }
    model.update(overrides)
    return model


def spec_error(tmp_path: Path, model: dict) -> str:
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": {"t": model}}))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return str(info.value)


def test_spec_keys_belong_to_their_task(tmp_path: Path) -> None:
    assert spec_error(tmp_path, base_model(topk=1)) == (
        "t 1.0: topk: does not apply to handler tabular_classifier (its own keys: tabular)"
    )
    image = base_model(handler="image_classifier", architecture="digits_cnn", tabular={"hidden": [4]})
    assert spec_error(tmp_path, image).startswith("t 1.0: tabular: does not apply to handler image_classifier")
    assert spec_error(tmp_path, base_model(architecture="digits_cnn")) == (
        "t 1.0: architecture: unknown architecture 'digits_cnn' (known: ['mlp'] or {file: net.py, class: Net})"
    )
    assert spec_error(tmp_path, base_model(tabular={"hidden": []})).startswith("t 1.0: tabular.hidden: must be a list")
    assert spec_error(tmp_path, base_model(tabular={"max_records": 0})).startswith(
        "t 1.0: tabular.max_records: must be an integer from 1 to 4096"
    )
    assert spec_error(tmp_path, base_model(labels=["a", "b", "c"])) == (
        "t 1.0: labels: breast_cancer has 2 classes ['malignant', 'benign'], got 3 labels"
    )
    assert spec_error(tmp_path, base_model(evaluation="digits")).startswith("t 1.0: evaluation: unknown data set")
    int8 = {"precision": "int8", "weights": {"train": "breast_cancer"}, "quantization": {"calibration": "digits"}}
    assert spec_error(tmp_path, base_model(versions={"2.0": int8})) == (
        "t 2.0: quantization.calibration: handler tabular_classifier quantizes dynamically: no calibration"
    )
    both = {**int8, "quantization": {"max_drop": 1, "max_top1_drop": 1}}
    assert spec_error(tmp_path, base_model(versions={"2.0": both})) == (
        "t 2.0: quantization.max_drop: give max_drop or max_top1_drop (its older name), not both"
    )


def test_the_real_spec_has_the_tabular_model_with_its_gate(repo_root: Path) -> None:
    specs = {s.version: s for s in load_spec(repo_root / "models.yaml") if s.name == MODEL}
    assert {v: s.precision for v, s in specs.items()} == VERSIONS
    assert specs["2.0"].max_drop == 1.0
    assert specs["1.0"].max_drop is None
    config = specs["2.0"].handler_config()
    assert isinstance(config, TabularConfig)
    assert [f.name for f in config.features][:2] == ["mean radius", "mean texture"]
    assert len(config.features) == 30
    assert config.max_records == 256


# ------------------------------------------------------------------------------------------ the build
def test_folded_standardisation_equals_the_explicit_one() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(loc=[100.0, 0.05, 3.0], scale=[50.0, 0.01, 1.0], size=(64, 3))
    data = build.TabularData(x, np.zeros(64, dtype=np.int64), ("a", "b", "c"), ("n", "p"))
    mean, std = build.standardisation(data)
    torch.manual_seed(0)
    model = build.TabularMLP(3, (8,), 2).eval()
    inputs = torch.tensor(x, dtype=torch.float32)
    with torch.no_grad():
        explicit = model(torch.tensor((x - mean) / std, dtype=torch.float32))
        build.fold_standardisation(model.layers[0], mean, std)
        folded = model(inputs)
    torch.testing.assert_close(folded, explicit, rtol=1e-4, atol=1e-4)


def test_a_constant_feature_does_not_divide_by_zero() -> None:
    x = np.array([[1.0, 5.0], [3.0, 5.0]])
    mean, std = build.standardisation(build.TabularData(x, np.zeros(2, dtype=np.int64), ("a", "b"), ("n",)))
    assert std.tolist() == [1.0, 1.0]


def test_feature_schema_widens_the_training_range_and_keeps_measurements_non_negative() -> None:
    x = np.array([[1.0, -1.0], [3.0, 1.0]])
    data = build.TabularData(x, np.zeros(2, dtype=np.int64), ("mean radius", "shift"), ("n",))
    size, shift = build.feature_schema(data, 0.5)
    assert (size.min, size.max, size.lower, size.upper) == (1.0, 3.0, 0.0, 4.0)
    assert (shift.min, shift.max, shift.lower, shift.upper) == (-1.0, 1.0, -2.0, 2.0)
    assert size.unit.startswith("length")


def test_breast_cancer_split_is_stratified_seeded_and_disjoint() -> None:
    train, holdout = build.breast_cancer("train"), build.breast_cancer("holdout")
    assert (len(train), len(holdout)) == (426, 143)
    assert train.class_names == ("malignant", "benign")
    assert len(train.feature_names) == 30
    assert abs(train.y.mean() - holdout.y.mean()) < 0.01  # stratified
    assert not {tuple(r) for r in train.x} & {tuple(r) for r in holdout.x}
    assert json.loads((corpus.SAMPLES / "golden.json").read_text())  # golden records are held-out ones
    held = {tuple(r) for r in holdout.x}
    for record, _ in corpus.golden():
        assert tuple(record[name] for name in holdout.feature_names) in held


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tabular")
    dirs = {}
    for version in VERSIONS:
        with zipfile.ZipFile(model_store / archive_name(MODEL, version)) as mar:
            mar.extractall(root / version)
        dirs[version] = root / version
    return dirs


@pytest.fixture(scope="module")
def archives(model_dirs: dict[str, Path]) -> dict[str, dict]:
    """Per version: the program, loaded as the worker does, and the archive's config and metadata."""
    loaded = {}
    for version, folder in model_dirs.items():
        config = TabularConfig.from_dict(yaml.safe_load((folder / "model-config.yaml").read_text())["handler"])
        loaded[version] = {
            "program": load_model(folder / "model.pt", config),
            "config": config,
            "metadata": json.loads((folder / "metadata.json").read_text()),
            "features": json.loads((folder / "features.json").read_text()),
        }
    return loaded


def test_int8_is_within_the_gate_as_recorded_and_recomputed(archives: dict, model_store: Path) -> None:
    holdout = build.breast_cancer("holdout")
    x, y = torch.tensor(holdout.x, dtype=torch.float32), torch.from_numpy(holdout.y)
    fp32 = build.accuracy(archives["1.0"]["program"], x, y)
    int8 = build.accuracy(archives["2.0"]["program"], x, y)
    recorded = {v: a["metadata"]["accuracy"] for v, a in archives.items()}
    assert fp32 >= MIN_ACCURACY
    assert int8 >= fp32 - 1.0
    assert recorded["1.0"]["accuracy"] == pytest.approx(fp32)
    assert recorded["2.0"]["accuracy"] == pytest.approx(int8)
    assert recorded["2.0"]["gate"] == {
        "max_accuracy_drop": 1.0,
        "drop": round(recorded["2.0"]["fp32_accuracy"] - int8, 4),
    }
    assert recorded["1.0"]["records"] == len(holdout) == 143
    manifest = read_manifest(model_store)["archives"]
    assert manifest[archive_name(MODEL, "2.0")]["accuracy"]["accuracy"] == pytest.approx(int8)
    # INT8 really is INT8 where it applies: the hidden Linear layers, not the raw-feature one.
    graph = str(archives["2.0"]["program"].graph)
    assert "quantized::linear_dynamic" in graph
    with torch.inference_mode():
        close = torch.softmax(archives["2.0"]["program"](x), 1) - torch.softmax(archives["1.0"]["program"](x), 1)
    assert float(close.abs().max()) < 0.1


def test_the_archive_carries_the_schema_for_the_handler_and_for_people(archives: dict) -> None:
    config, features = archives["1.0"]["config"], archives["1.0"]["features"]
    assert [f["name"] for f in features["features"]] == [f.name for f in config.features]
    assert features["range_tolerance"] == config.range_tolerance == 0.5
    area = next(f for f in features["features"] if f["name"] == "worst area")
    assert area["unit"].startswith("area")
    assert area["description"].startswith("area of the nucleus")
    train = build.breast_cancer("train")
    column = train.feature_names.index("worst area")
    assert (area["min"], area["max"]) == (train.x[:, column].min(), train.x[:, column].max())
    reference = archives["1.0"]["metadata"]["drift_reference"]
    assert set(reference) == {"source", "samples", "classes", "confidence"}  # no image statistics
    assert sorted(reference["classes"]) == ["benign", "malignant"]
    assert archives["1.0"]["metadata"]["oip"]["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 30]}]


# ------------------------------------------------------------------------------------------ the handler
@pytest.fixture(scope="module", params=list(VERSIONS))
def loaded(request: pytest.FixtureRequest, model_dirs: dict[str, Path]) -> tuple[TabularClassifier, FakeContext]:
    context = FakeContext.from_archive(model_dirs[request.param])
    handler = TabularClassifier()
    handler.initialize(context)
    return handler, context


def run(handler: TabularClassifier, context: FakeContext, cases: list[corpus.TabularCase]) -> list:
    requests, headers = zip(*(corpus.handler_request(case) for case in cases), strict=True)
    context.reset(list(headers))
    return handler.handle(list(requests), context)


def test_initialize_warms_up_every_batch_size(model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    handler = TabularClassifier()
    sizes: list[int] = []
    real = handler.inference

    def spy(items):
        sizes.append(len(items))
        return real(items)

    monkeypatch.setattr(handler, "inference", spy)
    handler.initialize(FakeContext.from_archive(model_dirs["2.0"], batch_size=4))
    model_sizes = [size for size in (1, 2, 3, 4) for _ in range(handler.warmup_rounds)]
    assert sizes[: len(model_sizes)] == model_sizes
    # Then the warm-up requests (a record, a list of 2, KServe v1, OIP: 5 records) as one batch, in model calls of 4.
    assert sizes[len(model_sizes) :] == [4, 1] * handler.warmup_rounds
    assert handler.labels == ["malignant", "benign"]
    assert handler.schema.width == 30
    assert handler.settings.threads == 1  # models.yaml pins one thread: the MLP's ops take microseconds


def test_every_form_answers_what_the_model_computes(loaded, archives: dict) -> None:
    handler, context = loaded
    rows = np.array(corpus.as_rows(corpus.records(4)), dtype=np.float32)
    with torch.inference_mode():
        probabilities = torch.softmax(handler.model(torch.from_numpy(rows)), 1)
    expected_p, expected_i = (t.tolist() for t in probabilities.max(1))
    responses = run(handler, context, corpus.good_requests())
    assert context.statuses == {}
    for index, (case, response) in enumerate(zip(corpus.good_requests(), responses, strict=True)):
        n = len(case.labels)
        if case.route == corpus.V2:
            assert corpus.oip_labels(response, context.response_headers.get(index, {})) == list(case.labels)
            continue
        predictions = response["predictions"]
        assert [p["label"] for p in predictions] == list(case.labels), case.name
        assert [p["index"] for p in predictions] == expected_i[:n], case.name
        assert [p["probability"] for p in predictions] == pytest.approx(expected_p[:n], abs=2e-6), case.name
        version_key = "model_version" if case.route == corpus.V1 else "version"
        assert response[version_key] == handler.model_version


def test_golden_records_are_recognised(loaded) -> None:
    handler, context = loaded
    for record, label in corpus.golden():
        context.reset()
        (response,) = handler.handle([{"body": record}], context)
        assert response["predictions"][0]["label"] == label


@pytest.mark.parametrize("case", corpus.corpus(), ids=lambda case: case.name)
def test_every_hostile_request_fails_alone_in_a_batch_of_good_ones(loaded, case: corpus.TabularCase) -> None:
    handler, context = loaded
    good = corpus.good_requests()
    batch = [good[0], case, good[3], good[6]]
    responses = run(handler, context, batch)
    assert set(context.statuses) == {1}, context.statuses
    code, phrase = context.statuses[1]
    assert (code, responses[1]["code"]) == (case.status, case.status)
    assert responses[1]["type"] == ("PayloadTooLarge" if case.status == 413 else "InvalidInput")
    assert case.phrase in responses[1]["error"], responses[1]["error"]
    assert phrase == responses[1]["error"][:200]
    assert phrase.isascii()
    assert [p["label"] for p in responses[0]["predictions"]] == list(good[0].labels)
    assert [p["label"] for p in responses[2]["predictions"]] == list(good[3].labels)
    assert corpus.oip_labels(responses[3], context.response_headers.get(3, {})) == list(good[6].labels)


def test_records_of_all_requests_share_the_model_calls(loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    handler, context = loaded
    calls: list[int] = []
    real = handler.inference
    monkeypatch.setattr(handler, "inference", lambda items: calls.append(len(items)) or real(items))
    good = corpus.good_requests()
    run(handler, context, [good[1], good[4], good[6]])  # 3 + 3 + 4 records
    assert sum(calls) == 10
    assert max(calls) == min(handler.batch_size, 10)
    assert len(calls) == math.ceil(10 / handler.batch_size)


def test_summaries_feed_the_prediction_metrics(loaded) -> None:
    handler, _ = loaded
    assert handler.summarize(Classification(["benign"], [1], [0.875])) == ("benign", 0.875)
    assert handler.input_statistics(np.zeros(30, dtype=np.float32)) is None


def test_handler_module_defines_exactly_one_class() -> None:
    module = importlib.import_module("handlers.tabular_classifier")
    assert list_classes_from_module(module) == [TabularClassifier]
