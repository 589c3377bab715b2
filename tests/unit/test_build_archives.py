"""Archive builds from local torchvision state_dicts: contents, manifest, immutability."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from servekit.build.archive import build_all
from servekit.build.spec import load_spec
from servekit.build.training import BuildError
from servekit.serving.store import file_sha256, read_manifest

LABELS = [f"class_{i}" for i in range(10)]


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), directory / "resnet18.pt")
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=10).state_dict(), directory / "mnv3.pt")
    return directory


def write_spec(directory: Path, models: dict) -> Path:
    path = directory / "models.yaml"
    path.write_text(yaml.safe_dump({"models": models}, sort_keys=False))
    return path


def vision_model(architecture: str, weights: str, versions: dict) -> dict:
    return {
        "architecture": architecture,
        "handler": "image_classifier",
        "labels": LABELS,
        "preprocessing": {"resize": 72, "crop": 64},
        "serving": {"batch_size": 2, "max_workers": 2},
        "weights": {"file": weights},
        "versions": versions,
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, weights_dir: Path):
    work = tmp_path_factory.mktemp("build")
    spec_path = write_spec(
        work,
        {
            "resnet": vision_model(
                "resnet18",
                str(weights_dir / "resnet18.pt"),
                {
                    "1.0": {"precision": "fp32"},
                    "1.1": {"precision": "int8", "quantization": {"calibration_images": 16}, "allow_ungated": True},
                },
            ),
            "mobile": vision_model("mobilenet_v3_small", str(weights_dir / "mnv3.pt"), {"1.0": {"precision": "fp32"}}),
        },
    )
    store = work / "store"
    results = build_all(load_spec(spec_path), store, work / "cache")
    return work, spec_path, store, results


def test_every_version_is_built_with_a_manifest_entry(built) -> None:
    _, _, store, results = built
    assert [r.status for r in results] == ["built", "built", "built"]
    manifest = read_manifest(store)["archives"]
    assert set(manifest) == {"resnet_v1.0.mar", "resnet_v1.1.mar", "mobile_v1.0.mar"}
    for name, record in manifest.items():
        assert record["sha256"] == file_sha256(store / name)
        assert record["size_bytes"] == (store / name).stat().st_size


def test_archive_carries_program_handler_config_labels_and_metadata(built, weights_dir: Path) -> None:
    _, _, store, _ = built
    with zipfile.ZipFile(store / "resnet_v1.1.mar") as archive:
        names = set(archive.namelist())
        assert {"model.pt", "image_classifier.py", "handlers/base.py", "labels.json", "metadata.json"} <= names
        config = yaml.safe_load(archive.read("model-config.yaml"))
        metadata = json.loads(archive.read("metadata.json"))
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
        assert json.loads(archive.read("labels.json")) == LABELS
    assert manifest["model"]["modelName"] == "resnet"
    assert manifest["model"]["modelVersion"] == "1.1"
    assert (config["batchSize"], config["maxWorkers"]) == (2, 2)
    assert config["handler"]["precision"] == "int8"
    assert config["handler"]["preprocessing"]["crop"] == 64
    assert metadata["precision"] == "int8"
    assert metadata["weights_sha256"] == file_sha256(weights_dir / "resnet18.pt")
    assert metadata["accuracy"] is None  # no evaluation set for these: nothing is claimed
    assert metadata["ungated"] is True  # ... and it says so (allow_ungated)
    assert read_manifest(store)["archives"]["resnet_v1.1.mar"]["ungated"] is True


def test_int8_program_is_much_smaller_than_fp32_and_its_archive_carries_the_fp32_reference(built) -> None:
    """The INT8 program is the small one; its archive also carries the FP32 reference explanations run on
    (handlers.explain), recorded by sha256 (``explain: {reference: false}`` leaves it out)."""
    import zipfile

    _, _, store, _ = built
    with zipfile.ZipFile(store / "resnet_v1.0.mar") as fp32, zipfile.ZipFile(store / "resnet_v1.1.mar") as int8:
        assert int8.getinfo("model.pt").file_size < 0.35 * fp32.getinfo("model.pt").file_size
        assert "fp32_reference.pt" not in fp32.namelist()
        metadata = json.loads(int8.read("metadata.json"))
        reference = int8.read(metadata["explain_reference"]["file"])
    assert hashlib.sha256(reference).hexdigest() == metadata["explain_reference"]["sha256"]
    record = read_manifest(store)["archives"]["resnet_v1.1.mar"]
    assert record["explain_reference_sha256"] == metadata["explain_reference"]["sha256"]


def test_rebuild_with_same_inputs_is_skipped(built) -> None:
    work, spec_path, store, _ = built
    before = file_sha256(store / "mobile_v1.0.mar")
    results = build_all([s for s in load_spec(spec_path) if s.name == "mobile"], store, work / "cache")
    assert [r.status for r in results] == ["up to date"]
    assert file_sha256(store / "mobile_v1.0.mar") == before


def test_rebuild_with_changed_inputs_is_refused_unless_forced(built) -> None:
    work, spec_path, store, _ = built
    spec = yaml.safe_load(spec_path.read_text())
    spec["models"]["mobile"]["topk"] = 2
    (work / "changed").mkdir()
    changed = write_spec(work / "changed", spec["models"])
    mobile = [s for s in load_spec(changed) if s.name == "mobile"]
    before = file_sha256(store / "mobile_v1.0.mar")
    with pytest.raises(BuildError, match="immutable"):
        build_all(mobile, store, work / "cache")
    assert file_sha256(store / "mobile_v1.0.mar") == before
    results = build_all(mobile, store, work / "cache", force=True)
    assert [r.status for r in results] == ["built"]
    assert read_manifest(store)["archives"]["mobile_v1.0.mar"]["sha256"] == file_sha256(store / "mobile_v1.0.mar")


def test_cli_refuses_a_changed_version_with_one_line(built, repo_root: Path) -> None:
    work, spec_path, store, _ = built
    spec = yaml.safe_load(spec_path.read_text())
    spec["models"]["resnet"]["topk"] = 4
    (work / "cli").mkdir()
    changed = write_spec(work / "cli", spec["models"])
    result = subprocess.run(
        [sys.executable, str(repo_root / "build_mar.py"), "--spec", str(changed), "--store", str(store),
         "--cache", str(work / "cache"), "--model", "resnet", "--version", "1.0"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("build_mar: error: resnet 1.0: resnet_v1.0.mar was already built from different inputs")
