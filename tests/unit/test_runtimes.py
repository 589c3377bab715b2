"""``runtime:``: a version served by OpenVINO or ONNX Runtime, gated against the FP32 torch program.

Every archive here is built from a user's own model and data that the test makes (the shapes CNN on
a drawn image folder, an MLP on a wine CSV): nothing shipped.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from handlers.model_loading import load_model, native_bf16
from handlers.runtimes import RuntimeProgram
from servekit.build.archive import build_version
from servekit.build.spec import SpecError, load_spec
from servekit.build.training import BuildError
from tests.byom_project import shapes_model, shapes_project, wine_csv, write_spec

pytestmark = pytest.mark.unit

ENGINES = ("openvino", "onnxruntime")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return shapes_project(tmp_path_factory.mktemp("runtimes") / "shapes", epochs=20).resolve()
    finally:
        torch.set_num_threads(threads)


def runtime_versions() -> dict:
    versions = {
        "1.0": {"precision": "fp32"},
        "3.0": {"precision": "fp32", "runtime": "openvino"},
        "4.0": {"precision": "fp32", "runtime": {"engine": "onnxruntime", "max_drop": 1.0}},
    }
    versions["6.0"] = {"precision": "int8", "runtime": "openvino", "quantization": {"max_drop": 5.0}}
    if native_bf16():
        versions["5.0"] = {"precision": "bf16", "runtime": "openvino", "bf16": {"max_drop": 5.0}}
    return versions


@pytest.fixture(scope="module")
def built(project: Path, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("runtimes-built")
    specs = load_spec(write_spec(project, {"shapes": shapes_model(versions=runtime_versions())}, "rt.yaml"))
    logs = {}
    for spec in specs:
        stream = io.StringIO()
        build_version(spec, work / "store", work / "cache", stream=stream)
        logs[spec.version] = stream.getvalue()
    return {spec.version: spec for spec in specs}, work / "store", logs


def files_of(store: Path, spec) -> dict[str, bytes]:
    with zipfile.ZipFile(store / spec.archive_name) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def program_of(store: Path, spec, tmp_path: Path):
    """The archive's program, loaded as the worker loads it (handlers.model_loading.load_model)."""
    files = files_of(store, spec)
    path = tmp_path / f"{spec.version}-{spec.program_file}"
    path.write_bytes(files[spec.program_file])
    return load_model(path, spec.handler_config())


def val_batch(project: Path, spec) -> torch.Tensor:
    from handlers.transforms import ImagePreprocessor
    from servekit.build.datasets import images
    from servekit.build.training import to_tensors

    x, _ = to_tensors(images(spec, "data", "holdout"), ImagePreprocessor(spec.preprocessing))
    return x


def test_a_runtime_version_carries_onnx_with_its_sha256_runtime_and_fp32_reference(built) -> None:
    specs, store, _ = built
    for version in ("3.0", "4.0"):
        spec = specs[version]
        files = files_of(store, spec)
        metadata = json.loads(files["metadata.json"])
        assert "model.pt" not in files
        assert spec.program_file == "model.onnx"
        assert metadata["program_sha256"] == hashlib.sha256(files["model.onnx"]).hexdigest()
        assert metadata["runtime"]["engine"] == spec.engine
        assert metadata["runtime"]["version"]
        reference = metadata["explain_reference"]
        assert reference["sha256"] == hashlib.sha256(files[reference["file"]]).hexdigest()
        config = yaml.safe_load(files["model-config.yaml"])
        assert config["handler"]["runtime"] == spec.engine  # what the worker loads it with
    assert "runtime" not in yaml.safe_load(files_of(store, specs["1.0"])["model-config.yaml"])["handler"]


def test_fp32_on_each_runtime_answers_as_the_torch_program_on_the_users_images(built, project, tmp_path) -> None:
    specs, store, _ = built
    torch_program = program_of(store, specs["1.0"], tmp_path)
    x = val_batch(project, specs["1.0"])
    with torch.inference_mode():
        expected = torch_program(x)
        for version in ("3.0", "4.0"):
            program = program_of(store, specs[version], tmp_path)
            assert isinstance(program, RuntimeProgram)
            assert program.runtime == specs[version].engine
            got = program(x)
            assert got.dtype == torch.float32
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)


def test_each_runtime_version_is_gated_against_the_fp32_torch_program(built) -> None:
    specs, store, logs = built
    fp32 = json.loads(files_of(store, specs["1.0"])["metadata.json"])["accuracy"]
    for version, allowed in (("3.0", 0.5), ("4.0", 1.0)):
        accuracy = json.loads(files_of(store, specs[version])["metadata.json"])["accuracy"]
        assert accuracy["fp32_top1"] == fp32["top1"]
        assert accuracy["gate"] == {"max_top1_drop": allowed, "drop": round(fp32["top1"] - accuracy["top1"], 4)}
        assert f"-> FP32 on {specs[version].engine}" in logs[version]


@pytest.mark.skipif(not native_bf16(), reason="BF16 needs a CPU with native BF16")
def test_bf16_on_openvino_keeps_the_bf16_gate_and_the_top1(built, project, tmp_path) -> None:
    specs, store, logs = built
    accuracy = json.loads(files_of(store, specs["5.0"])["metadata.json"])["accuracy"]
    assert accuracy["gate"]["max_top1_drop"] == 5.0
    assert "-> BF16 on openvino" in logs["5.0"]
    x = val_batch(project, specs["1.0"])
    with torch.inference_mode():
        expected = program_of(store, specs["1.0"], tmp_path)(x).argmax(1)
        got = program_of(store, specs["5.0"], tmp_path)(x).argmax(1)
    assert (got == expected).float().mean() >= 0.95


def test_the_gate_fails_the_build_when_the_runtimes_answers_lose_accuracy(project, tmp_path, monkeypatch) -> None:
    def shuffled(self, batch):  # a runtime that answers the wrong class for every image
        return torch.roll(torch.eye(3)[torch.zeros(len(batch), dtype=torch.long)], 1, dims=1)

    monkeypatch.setattr(RuntimeProgram, "__call__", shuffled)
    (spec,) = load_spec(write_spec(project, {"shapes": shapes_model(versions={"3.0": {
        "precision": "fp32", "runtime": "onnxruntime"}})}, "bad.yaml"))  # fmt: skip
    with pytest.raises(BuildError, match=r"accuracy gate failed: FP32 on onnxruntime top-1 .* below FP32"):
        build_version(spec, tmp_path / "store", tmp_path / "cache", stream=io.StringIO())
    assert not (tmp_path / "store" / spec.archive_name).exists()


def test_a_runtime_session_follows_the_cpu_budgets_thread_count(built, tmp_path) -> None:
    specs, store, _ = built
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        program = program_of(store, specs["4.0"], tmp_path)
        x = torch.zeros(2, 3, 32, 32)
        first = program(x)
        assert program.sessions == [1]
        torch.set_num_threads(2)
        second = program(x)
        assert program.sessions == [1, 2]
        torch.testing.assert_close(first, second)
    finally:
        torch.set_num_threads(threads)


def wine_model(tmp_path: Path, versions: dict, **fields) -> dict:
    """A user's MLP on a wine CSV the test writes (``tmp_path/wine.csv``), with ``versions``."""
    wine_csv(tmp_path / "wine.csv")
    return {
        "architecture": "mlp",
        "handler": "tabular_classifier",
        "data": {"csv": "wine.csv", "target": "cultivar"},
        "weights": {"train": "data"},
        **fields,
        "versions": versions,
    }


def test_a_users_csv_model_serves_in_onnxruntime_as_in_torch(tmp_path: Path) -> None:
    model = wine_model(tmp_path, {"1.0": {"precision": "fp32"}, "2.0": {"precision": "fp32", "runtime": "onnxruntime"}})
    specs = load_spec(write_spec(tmp_path, {"wine": model}))
    for spec in specs:
        build_version(spec, tmp_path / "store", tmp_path / "cache", stream=io.StringIO())
    torch_program, ort_program = (program_of(tmp_path / "store", spec, tmp_path) for spec in specs)
    x = torch.randn(16, 13)
    with torch.inference_mode():
        torch.testing.assert_close(ort_program(x), torch_program(x), atol=1e-4, rtol=1e-4)
    accuracy = json.loads(files_of(tmp_path / "store", specs[1])["metadata.json"])["accuracy"]
    assert accuracy["gate"]["max_accuracy_drop"] == 0.5


@pytest.mark.parametrize(
    ("version", "field", "message"),
    [
        ({"precision": "int8", "runtime": "onnxruntime"}, "runtime", "onnxruntime serves precision fp32, not int8"),
        ({"precision": "bf16", "runtime": "onnxruntime"}, "runtime", "onnxruntime serves precision fp32, not bf16"),
        ({"precision": "fp32", "runtime": "tensorrt"}, "runtime.engine", "must be one of"),
        ({"precision": "fp32", "runtime": {"max_drop": 1}}, "runtime.engine", "is required"),
        ({"precision": "fp32", "runtime": {"engine": "openvino", "max_drop": -1}}, "runtime.max_drop", ">= 0"),
        ({"precision": "fp32", "runtime": {"engine": "openvino", "threads": 2}}, "runtime", "threads"),
    ],
)
def test_a_bad_runtime_is_one_line_naming_the_field(project, version, field, message) -> None:
    spec_file = write_spec(project, {"shapes": shapes_model(versions={"3.0": version})}, "refused.yaml")
    with pytest.raises(SpecError, match=re.escape(field) + ".*" + re.escape(message)) as info:
        load_spec(spec_file)
    assert "\n" not in str(info.value)


def test_a_runtime_needs_evaluation_data_or_allow_ungated(tmp_path: Path) -> None:
    model = wine_model(tmp_path, {"2.0": {"precision": "fp32", "runtime": "openvino"}}, evaluation=None)
    with pytest.raises(SpecError, match="runtime needs evaluation data"):
        load_spec(write_spec(tmp_path, {"wine": model}))


def test_the_detector_refuses_a_runtime(tmp_path: Path) -> None:
    model = {
        "architecture": "digit_detector",
        "handler": "object_detector",
        "weights": {"train": "digit_pages"},
        "labels": [str(i) for i in range(10)],
        "versions": {"1.0": {"precision": "fp32", "runtime": "openvino"}},
    }
    with pytest.raises(SpecError, match="handler object_detector serves its program in torch only"):
        load_spec(write_spec(tmp_path, {"pages": model}))


def test_int8_on_openvino_is_a_qdq_graph_calibrated_on_the_users_images_and_gated(built, project, tmp_path) -> None:
    import onnx

    specs, store, logs = built
    spec = specs["6.0"]
    files = files_of(store, spec)
    graph = onnx.load_from_string(files["model.onnx"]).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # static INT8 as a QDQ graph
    train = len(list((project / "data" / "train").rglob("*.png")))
    assert f"calibrating on {train} data inputs" in logs["6.0"]  # the user's training images, never held-out ones
    accuracy = json.loads(files["metadata.json"])["accuracy"]
    fp32 = json.loads(files_of(store, specs["1.0"])["metadata.json"])["accuracy"]
    assert accuracy["fp32_top1"] == fp32["top1"]
    assert accuracy["gate"] == {"max_top1_drop": 5.0, "drop": round(fp32["top1"] - accuracy["top1"], 4)}
    x = val_batch(project, specs["1.0"])
    with torch.inference_mode():
        expected = program_of(store, specs["1.0"], tmp_path)(x).argmax(1)
        got = program_of(store, spec, tmp_path)(x).argmax(1)
    assert (got == expected).float().mean() >= 0.9


def test_int8_in_a_runtime_is_refused_for_a_dynamically_quantized_task(tmp_path: Path) -> None:
    model = wine_model(tmp_path, {"2.0": {"precision": "int8", "runtime": "openvino"}})
    with pytest.raises(SpecError, match="tabular_classifier quantizes dynamically, in torch"):
        load_spec(write_spec(tmp_path, {"wine": model}))


def test_a_missing_runtime_package_is_one_clear_line_at_load(built, tmp_path, monkeypatch) -> None:
    import importlib.util

    specs, store, _ = built
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    with pytest.raises(RuntimeError, match=r"served by openvino .* pip install 'servekit\[runtimes\]'") as info:
        program_of(store, specs["3.0"], tmp_path)
    assert "\n" not in str(info.value)


def test_openvino_never_pins_a_workers_threads_to_cores(built, tmp_path) -> None:
    # Pinned (OpenVINO's default), every worker process would put its threads on the same first cores.
    specs, store, _ = built
    program = program_of(store, specs["3.0"], tmp_path)
    program(torch.zeros(1, 3, 32, 32))
    for threads in program.sessions:
        assert program._session(threads).get_property("ENABLE_CPU_PINNING") is False
