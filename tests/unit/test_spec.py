"""Spec validation: every mistake is reported with its model, version and field, on one line."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from servekit.build.spec import SpecError, load_spec, parse_spec

LABELS = [str(i) for i in range(10)]
DIGITS_PREPROCESSING = {
    "color_mode": "L",
    "invert": True,
    "fit_content": True,
    "resize": None,
    "crop": 16,
    "margin": 2,
    "mean": [0.1],
    "std": [0.25],
}


def base_spec() -> dict:
    """A small valid spec: one model with one FP32 version."""
    return {
        "models": {
            "digits": {
                "architecture": "digits_cnn",
                "handler": "image_classifier",
                "labels": list(LABELS),
                "topk": 3,
                "preprocessing": copy.deepcopy(DIGITS_PREPROCESSING),
                "serving": {"batch_size": 8, "min_workers": 1, "max_workers": 2},
                "versions": {"1.0": {"precision": "fp32", "weights": {"train": "digits"}}},
            }
        }
    }


def write_spec(tmp_path: Path, data: dict | str, name: str = "models.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def spec_error(tmp_path: Path, data: dict | str) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_spec(write_spec(tmp_path, data))
    return info.value


# ------------------------------------------------------------------------------------ valid specs
def test_real_models_yaml_parses_into_two_versions(repo_root: Path) -> None:
    specs = [s for s in load_spec(repo_root / "models.yaml") if s.name == "digits"]  # other tasks: their own tests

    assert [(s.name, s.version, s.precision) for s in specs] == [("digits", "1.0", "fp32"), ("digits", "2.0", "int8")]
    fp32, int8 = specs
    assert fp32.quantization is None
    assert int8.quantization is not None
    assert (int8.quantization.calibration, int8.quantization.calibration_images) == ("digits", 512)
    assert int8.quantization.max_top1_drop == 1.0
    # Model-level settings are inherited by both versions.
    for spec in specs:
        assert spec.labels == tuple(LABELS)
        assert spec.topk == 3
        assert spec.preprocessing.input_shape == (1, 16, 16)
        assert spec.serving.batch_size == 8
        assert spec.evaluation == "digits"
    assert [s.archive_name for s in specs] == ["digits_v1.0.mar", "digits_v2.0.mar"]
    assert fp32.handler_config().precision == "fp32"
    assert int8.handler_config().quantized_engine == "x86"


def test_version_override_merges_into_model_level_settings(tmp_path: Path) -> None:
    data = base_spec()
    data["models"]["digits"]["versions"] = {
        "1.0": {"precision": "fp32", "weights": {"train": "digits"}},
        "1.1": {
            "precision": "fp32",
            "weights": {"train": "digits"},
            "topk": 5,  # scalar: replaced
            "serving": {"batch_size": 4},  # mapping: merged key by key
            "preprocessing": {"margin": 1},
        },
    }
    v10, v11 = load_spec(write_spec(tmp_path, data))

    assert (v10.topk, v10.serving.batch_size, v10.serving.max_workers, v10.preprocessing.margin) == (3, 8, 2, 2)
    assert (v11.topk, v11.serving.batch_size, v11.serving.max_workers, v11.preprocessing.margin) == (5, 4, 2, 1)
    # The rest of the overridden mapping is still the model's.
    assert v11.preprocessing.crop == 16
    assert v11.preprocessing.mean == (0.1,)


def test_weights_file_is_resolved_relative_to_the_spec(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "w.pt").write_bytes(b"not really weights")
    data = base_spec()
    data["models"]["digits"]["versions"]["1.0"]["weights"] = {"file": "weights/w.pt"}

    (spec,) = load_spec(write_spec(tmp_path, data))

    assert spec.weights.file == str((tmp_path / "weights" / "w.pt").resolve())


def test_version_weights_replace_the_model_level_source(tmp_path: Path) -> None:
    (tmp_path / "w.pt").write_bytes(b"not really weights")
    data = base_spec()
    model = data["models"]["digits"]
    model["weights"] = {"train": "digits", "epochs": 5}
    model["versions"]["1.0"] = {"precision": "fp32"}
    model["versions"]["1.1"] = {"precision": "fp32", "weights": {"file": "w.pt"}}

    trained, from_file = load_spec(write_spec(tmp_path, data))

    assert (trained.weights.train, trained.weights.epochs, trained.weights.file) == ("digits", 5, None)
    assert (from_file.weights.train, from_file.weights.file) == (None, str((tmp_path / "w.pt").resolve()))


# ------------------------------------------------------------------------------------ errors
def test_unknown_key_at_model_level_names_model_and_field(tmp_path: Path) -> None:
    data = base_spec()
    data["models"]["digits"]["colour"] = "blue"

    err = spec_error(tmp_path, data)

    assert str(err).startswith("digits: colour: unknown key (valid keys: allow_ungated, architecture, ")
    assert (err.model, err.version, err.field) == ("digits", None, "colour")


def test_unknown_key_at_version_level_names_model_version_and_field(tmp_path: Path) -> None:
    data = base_spec()
    data["models"]["digits"]["versions"]["1.0"]["batch"] = 4

    err = spec_error(tmp_path, data)

    assert str(err).startswith("digits 1.0: batch: unknown key (valid keys: allow_ungated, architecture, ")
    assert "versions" not in str(err).split("valid keys:")[1]  # a version cannot nest versions
    assert (err.model, err.version, err.field) == ("digits", "1.0", "batch")


@pytest.mark.parametrize("version", ["v1", "1.0-beta", "1.2.3.4", "1.", "1.0\n", "1" * 10 + ".0"])
def test_bad_version_string_is_refused(tmp_path: Path, version: str) -> None:
    data = base_spec()
    data["models"]["digits"]["versions"] = {version: {"precision": "fp32", "weights": {"train": "digits"}}}

    err = spec_error(tmp_path, data)

    assert str(err).startswith(f"digits {version}: version: bad version string {version!r}: use 1 to 3 dot-separated")
    assert err.field == "version"


def test_unquoted_yaml_float_version_hints_quoting(tmp_path: Path) -> None:
    text = yaml.safe_dump(base_spec(), sort_keys=False).replace("'1.0':", "1.0:")
    assert "    1.0:" in text  # really unquoted: YAML reads it as the float 1.0

    err = spec_error(tmp_path, text)

    assert str(err) == (
        "digits 1.0: version: version must be a string like '1.0', got 1.0 "
        "(quote it in YAML: '1.0', or YAML reads it as a number)"
    )


def test_missing_weights_file(tmp_path: Path) -> None:
    data = base_spec()
    data["models"]["digits"]["versions"]["1.0"]["weights"] = {"file": "missing.pt"}

    err = spec_error(tmp_path, data)

    assert str(err) == f"digits 1.0: weights.file: weights file not found: {(tmp_path / 'missing.pt').resolve()}"
    assert err.field == "weights.file"
    assert "weights.file" in str(err)
    assert "not found" in str(err)


def test_weights_need_exactly_one_source(tmp_path: Path) -> None:
    data = base_spec()
    data["models"]["digits"]["versions"]["1.0"]["weights"] = {"seed": 1}

    err = spec_error(tmp_path, data)

    assert str(err) == "digits 1.0: weights: give exactly one of train, file, torchvision (got none)"


def test_serving_batch_size_zero(tmp_path: Path) -> None:
    data = base_spec()
    data["models"]["digits"]["serving"]["batch_size"] = 0

    err = spec_error(tmp_path, data)

    assert str(err) == "digits 1.0: serving.batch_size: must be an integer >= 1, got 0"


def test_max_workers_below_min_workers(tmp_path: Path) -> None:
    data = base_spec()
    data["models"]["digits"]["serving"].update(min_workers=3, max_workers=2)

    err = spec_error(tmp_path, data)

    assert str(err) == "digits 1.0: serving.max_workers: must be >= min_workers (3), got 2"


def test_unknown_serving_key(tmp_path: Path) -> None:
    data = base_spec()
    data["models"]["digits"]["serving"]["workers"] = 2

    err = spec_error(tmp_path, data)

    assert str(err).startswith("digits 1.0: serving.workers: unknown key in serving (valid keys: batch_size, ")


def test_unknown_architecture(tmp_path: Path) -> None:
    data = base_spec()
    data["models"]["digits"]["architecture"] = "lenet5"

    err = spec_error(tmp_path, data)

    assert str(err).startswith("digits 1.0: architecture: unknown architecture 'lenet5' (known: [")
    assert "'digits_cnn'" in str(err)


@pytest.mark.parametrize("precision", ["fp16", "FP32", "BF16"])
def test_precision_must_be_fp32_int8_or_bf16(tmp_path: Path, precision: str) -> None:
    data = base_spec()
    data["models"]["digits"]["versions"]["1.0"]["precision"] = precision

    err = spec_error(tmp_path, data)

    assert str(err) == f"digits 1.0: precision: must be one of ['fp32', 'int8', 'bf16'], got {precision!r}"


def test_bf16_section_is_validated_and_only_for_bf16(tmp_path: Path) -> None:
    data = base_spec()
    data["models"]["digits"]["versions"]["1.0"].update(precision="bf16", bf16={"max_top1_drop": -1})
    assert str(spec_error(tmp_path, data)) == "digits 1.0: bf16.max_top1_drop: must be a number >= 0, got -1"
    data["models"]["digits"]["versions"]["1.0"].update(precision="fp32", bf16={"max_top1_drop": 1})
    assert str(spec_error(tmp_path, data)) == "digits 1.0: bf16: only applies to precision bf16"


def test_quantization_given_for_fp32_is_refused(tmp_path: Path) -> None:
    data = base_spec()
    data["models"]["digits"]["versions"]["1.0"]["quantization"] = {"calibration": "digits"}

    err = spec_error(tmp_path, data)

    assert str(err) == "digits 1.0: quantization: only applies to precision int8"


def test_int8_quantization_section_is_validated(tmp_path: Path) -> None:
    data = base_spec()
    data["models"]["digits"]["versions"]["1.0"].update(
        precision="int8", quantization={"calibration": "digits", "max_top1_drop": -0.5}
    )

    err = spec_error(tmp_path, data)

    assert str(err) == "digits 1.0: quantization.max_top1_drop: must be a number >= 0, got -0.5"


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_a_reduced_precision_version_without_evaluation_data_is_refused(tmp_path: Path, precision: str) -> None:
    """No silent loss of the accuracy gate: INT8/BF16 with nothing to measure it on is an error."""
    data = base_spec()
    data["models"]["digits"]["versions"]["2.0"] = {"precision": precision, "weights": {"train": "digits"}}

    err = spec_error(tmp_path, data)

    assert str(err) == (
        f"digits 2.0: evaluation: precision {precision} needs evaluation data: its accuracy gate against FP32 is "
        "measured on it (known data sets: digits; or data, with a data: section of your own); or set "
        "allow_ungated: true to build it without any gate"
    )
    assert (err.model, err.version, err.field) == ("digits", "2.0", "evaluation")


def test_allow_ungated_builds_without_a_gate_and_says_so(tmp_path: Path) -> None:
    data = base_spec()
    data["models"]["digits"]["versions"]["2.0"] = {
        "precision": "int8", "weights": {"train": "digits"}, "allow_ungated": True,
    }  # fmt: skip
    data["models"]["digits"]["versions"]["3.0"] = {"precision": "int8", "weights": {"train": "digits"},
                                                   "evaluation": "digits"}  # fmt: skip
    fp32, ungated, gated = load_spec(write_spec(tmp_path, data))

    assert (fp32.ungated, ungated.ungated, gated.ungated) == (False, True, False)
    assert ungated.to_dict()["allow_ungated"] is True
    assert "allow_ungated" not in gated.to_dict()  # absent unless given: gated fingerprints are unchanged


def test_allow_ungated_must_be_a_boolean(tmp_path: Path) -> None:
    data = base_spec()
    data["models"]["digits"]["versions"]["2.0"] = {"precision": "int8", "weights": {"train": "digits"},
                                                   "allow_ungated": "yes"}  # fmt: skip

    err = spec_error(tmp_path, data)

    assert str(err) == "digits 2.0: allow_ungated: must be true or false, got 'yes'"


@pytest.mark.parametrize("topk", [0, 11, "3"])
def test_topk_must_fit_the_labels(tmp_path: Path, topk) -> None:
    data = base_spec()
    data["models"]["digits"]["topk"] = topk

    err = spec_error(tmp_path, data)

    assert str(err) == f"digits 1.0: topk: must be an integer between 1 and 10 (the number of labels), got {topk!r}"


@pytest.mark.parametrize(
    ("preprocessing", "message"),
    [
        ({"mean": [0.1, 0.2]}, "preprocessing.mean: needs 1 numbers for color_mode L, got (0.1, 0.2)"),
        ({"color_mode": "RGB"}, "preprocessing.mean: needs 3 numbers for color_mode RGB, got (0.1,)"),
        ({"std": [0.0]}, "preprocessing.std: every value must be > 0, got (0.0,)"),
        ({"margin": 8}, "preprocessing.margin: must be an integer with 0 <= 2*margin < crop, got 8"),
        ({"color_mode": "CMYK"}, "preprocessing.color_mode: 'CMYK' is not one of ['L', 'RGB']"),
    ],
)
def test_bad_preprocessing(tmp_path: Path, preprocessing: dict, message: str) -> None:
    data = base_spec()
    data["models"]["digits"]["preprocessing"].update(preprocessing)

    err = spec_error(tmp_path, data)

    assert str(err) == f"digits 1.0: {message}"


def test_bad_limits(tmp_path: Path) -> None:
    data = base_spec()
    data["models"]["digits"]["limits"] = {"max_bytes": 0}

    err = spec_error(tmp_path, data)

    assert str(err) == "digits 1.0: limits.max_bytes: must be a positive integer, got 0"


@pytest.mark.parametrize("name", ["1digits", "my model", "digits\n"])
def test_bad_model_name(tmp_path: Path, name: str) -> None:
    data = base_spec()
    data["models"] = {name: data["models"]["digits"]}

    err = spec_error(tmp_path, data)

    assert "name: bad model name: use letters, digits, '_' or '-', starting with a letter" in str(err)


def test_missing_models_section() -> None:
    with pytest.raises(SpecError, match=r"^the spec needs a non-empty 'models:' mapping at the top level$"):
        parse_spec({"model": {}}, Path("."))


def test_missing_spec_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"^spec file not found: "):
        load_spec(tmp_path / "nope.yaml")


def test_yaml_syntax_error_is_reported_on_one_line(tmp_path: Path) -> None:
    err = spec_error(tmp_path, "models:\n  digits: [\n")

    assert str(err).startswith(f"{tmp_path / 'models.yaml'} is not valid YAML: ")
    assert "\n" not in str(err)


def test_non_utf8_spec_is_a_spec_error(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_bytes(b"models:\n  \xff\xfe: {}\n")

    with pytest.raises(SpecError, match=r"is not UTF-8 text"):
        load_spec(path)


# ------------------------------------------------------------------------------------ the CLI
def run_build_mar(repo_root: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    # --store and --cache point into tmp_path: should a spec unexpectedly validate, nothing real is touched.
    command = [sys.executable, "build_mar.py", "--store", str(tmp_path / "store"), "--cache", str(tmp_path / "cache")]
    return subprocess.run([*command, *args], cwd=repo_root, capture_output=True, text=True, timeout=120, check=False)


def test_cli_check_accepts_the_real_spec(repo_root: Path, tmp_path: Path) -> None:
    result = run_build_mar(repo_root, tmp_path, "--check")

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("spec OK: digits 1.0, digits 2.0, ")
    assert "breast_cancer 1.0, breast_cancer 2.0" in result.stdout
    assert not (tmp_path / "store").exists()


def test_cli_bad_spec_exits_1_with_one_error_line(repo_root: Path, tmp_path: Path) -> None:
    data = base_spec()
    data["models"]["digits"]["serving"]["batch_size"] = 0
    bad = write_spec(tmp_path, data, "bad.yaml")

    result = run_build_mar(repo_root, tmp_path, "--spec", str(bad))

    assert result.returncode == 1
    assert result.stderr == "build_mar: error: digits 1.0: serving.batch_size: must be an integer >= 1, got 0\n"
    assert result.stdout == ""
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"models:\n  digits: [\n", "is not valid YAML: "), (b"models:\n  \xff: {}\n", "is not UTF-8 text: ")],
)
def test_cli_unreadable_spec_gives_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, expected: str
) -> None:
    import build_mar  # in-process: same main() as the subprocess test above, without a second torch import

    bad = tmp_path / "bad.yaml"
    bad.write_bytes(content)

    status = build_mar.main(["--spec", str(bad), "--store", str(tmp_path / "store"), "--cache", str(tmp_path / "c")])

    captured = capsys.readouterr()
    assert status == 1
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"build_mar: error: {bad}")
    assert expected in lines[0]
    assert not (tmp_path / "store").exists()


def test_torchvision_weights_bring_their_categories_and_transforms(tmp_path: Path) -> None:
    data = base_spec()
    model = data["models"]["digits"]
    for key in ("labels", "topk", "preprocessing"):
        del model[key]
    model["architecture"] = "resnet50"
    model["versions"]["1.0"]["weights"] = {"torchvision": "ResNet50_Weights.IMAGENET1K_V2"}

    (spec,) = load_spec(write_spec(tmp_path, data))

    assert len(spec.labels) == 1000
    assert spec.labels[0] == "tench"
    # IMAGENET1K_V2 weights were evaluated at resize 232, crop 224 (not the usual 256).
    assert (spec.preprocessing.resize, spec.preprocessing.crop) == (232, 224)
    assert spec.preprocessing.mean == (0.485, 0.456, 0.406)
