"""Bring your own model and data: the user's module, torchvision builder or finished program, built on the
user's image folder or CSV, gated on it and fingerprinted by content; every mistake is one line naming the
model, the version and the field, and writes no archive."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from servekit.build.architectures import ARCHITECTURES
from servekit.build.archive import build_version
from servekit.build.spec import ModelVersionSpec, SpecError, load_spec
from servekit.build.training import BuildError
from servekit.serving.store import read_manifest
from tests.byom_project import EXAMPLE, shapes_model, shapes_project, wine_csv, write_spec

SHAPES = ["circle", "square", "triangle"]
CULTIVARS = ["cultivar_A", "cultivar_B", "cultivar_C"]


def _import(path: Path, name: str):
    """A module from a file, registered under ``name`` (so that its classes pickle by reference)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


make_shapes = _import(EXAMPLE / "make_shapes.py", "byom_make_shapes")


# ------------------------------------------------------------------------------------------ the user's project
@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """shapes_net.py, data/{train,val}/<shape>/*.png and the trained shapes_net.pt, made once."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small CNN on 32x32 images: one thread trains it fastest, and steadily on a busy CPU
    try:
        return shapes_project(tmp_path_factory.mktemp("byom") / "shapes").resolve()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shapes_net(project: Path):
    """The user's ShapesNet class, imported from the user's file as the user's own code would."""
    return _import(project / "shapes_net.py", "byom_user_shapes_net").ShapesNet


@pytest.fixture(scope="module")
def user_net(project: Path, shapes_net) -> torch.nn.Module:
    net = shapes_net(num_classes=3)
    net.load_state_dict(torch.load(project / "shapes_net.pt", weights_only=True))
    return net.eval()


@pytest.fixture(scope="module")
def val_split(project: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The val images as the user's own code prepares them (make_shapes.load_split), and their labels."""
    return make_shapes.load_split(project / "data", "val")


@pytest.fixture(scope="module")
def shapes_built(project: Path, tmp_path_factory: pytest.TempPathFactory):
    """FP32 1.0 and INT8 2.0 of the user's ShapesNet on the user's folder, built in-process, with their logs."""
    work = tmp_path_factory.mktemp("shapes-built")
    specs = load_spec(write_spec(project, {"shapes": shapes_model()}, "built.yaml"))
    logs = {}
    for spec in specs:
        stream = io.StringIO()
        build_version(spec, work / "store", work / "cache", stream=stream)
        logs[spec.version] = stream.getvalue()
    return specs, work / "store", logs


def copy_project(project: Path, destination: Path) -> Path:
    return Path(shutil.copytree(project, destination))


def fp32_only(**overrides) -> dict:
    return shapes_model(**{"versions": {"1.0": {"precision": "fp32"}}, **overrides})


def archive_files(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def load_program(files: dict[str, bytes]) -> torch.jit.ScriptModule:
    return torch.jit.load(io.BytesIO(files["model.pt"]), map_location="cpu")


@torch.no_grad()
def top1(program: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * int((program(x).argmax(1) == y).sum()) / len(y)


def build(spec: ModelVersionSpec, work: Path) -> tuple[dict, dict[str, bytes]]:
    """Build ``spec`` into ``work/store``; (metadata.json, every file of the archive)."""
    build_version(spec, work / "store", work / "cache", stream=io.StringIO())
    files = archive_files(work / "store" / spec.archive_name)
    return json.loads(files["metadata.json"]), files


# ------------------------------------------------------------------------------------------ the user's module
def test_fp32_and_int8_of_the_users_module_are_measured_on_the_users_val_images(
    project: Path, shapes_built, val_split
) -> None:
    specs, store, _ = shapes_built
    x, y = val_split
    val_images = sorted((project / "data" / "val").rglob("*.png"))
    fp32, int8 = specs
    # The test prepares the images as the user's code does: the spec says the same preprocessing.
    for spec in specs:
        assert (spec.preprocessing.mean, spec.preprocessing.std) == (make_shapes.MEAN, make_shapes.STD)
        assert (spec.preprocessing.color_mode, spec.preprocessing.resize, spec.preprocessing.invert) == (
            "RGB",
            None,
            False,
        )
        assert spec.preprocessing.input_shape == tuple(x.shape[1:]) == (3, 32, 32)
        assert spec.labels == tuple(SHAPES) == tuple(make_shapes.SHAPES)
    measured = {}
    for spec in specs:
        files = archive_files(store / spec.archive_name)
        accuracy = json.loads(files["metadata.json"])["accuracy"]
        measured[spec.version] = accuracy
        assert (accuracy["dataset"], accuracy["source"], accuracy["images"]) == ("data", "image folder data", 120)
        assert len(val_images) == len(y) == 120
        assert accuracy["top1"] == top1(load_program(files), x, y)
    gate = measured["2.0"]
    assert "fp32_top1" not in measured["1.0"]
    assert gate["fp32_top1"] == measured["1.0"]["top1"]
    assert gate["gate"] == {"max_top1_drop": 3.0, "drop": round(gate["fp32_top1"] - gate["top1"], 4)}
    assert (fp32.evaluation, int8.evaluation, int8.quantization.calibration) == ("data", "data", "data")


def test_the_archive_keeps_the_users_module_source_and_an_auto_golden_set(project: Path, shapes_built) -> None:
    specs, store, _ = shapes_built
    expected_golden = {
        (shape, path.read_bytes())
        for shape in SHAPES
        for path in sorted((project / "data" / "val" / shape).iterdir())[:2]
    }
    for spec in specs:
        files = archive_files(store / spec.archive_name)
        assert files["model_source/shapes_net.py"] == (project / "shapes_net.py").read_bytes()
        golden = json.loads(files["golden/golden.json"])
        assert [entry["label"] for entry in golden] == [shape for shape in SHAPES for _ in range(2)]
        assert {(entry["label"], files[f"golden/{entry['file']}"]) for entry in golden} == expected_golden


def test_int8_is_calibrated_on_the_users_data(shapes_built) -> None:
    _, _, logs = shapes_built

    assert "calibrating (data): batch 1/" in logs["2.0"]
    assert "calibrating" not in logs["1.0"]


def test_int8_gate_fails_the_build_when_quantization_loses_accuracy_on_the_users_data(
    project: Path, shapes_net, user_net: torch.nn.Module, val_split, tmp_path: Path
) -> None:
    root = copy_project(project, tmp_path / "user")
    state = torch.load(project / "shapes_net.pt", weights_only=True)
    silent = {name: tensor.clone() for name, tensor in state.items()}
    silent["features.3.weight"][:, 0] = 0.0  # the next conv reads nothing of channel 0
    outlier = {name: tensor.clone() for name, tensor in silent.items()}
    outlier["features.0.bias"][0] = 1e4  # channel 0 of the first conv, far above every other activation
    torch.save(outlier, root / "outlier.pt")
    x, y = val_split
    nets = {}
    for name, weights in (("silent", silent), ("outlier", outlier)):
        nets[name] = shapes_net(num_classes=3)
        nets[name].load_state_dict(weights)
        nets[name].eval()
    with torch.no_grad():
        # FP32 answers as before: the outlier channel is read by nothing.
        torch.testing.assert_close(nets["outlier"](x), nets["silent"](x), rtol=0, atol=1e-4)
        assert torch.equal(nets["outlier"](x).argmax(1), user_net(x).argmax(1))
    fp32, int8 = load_spec(write_spec(root, {"shapes": shapes_model(weights={"file": "outlier.pt"})}))
    store = tmp_path / "store"
    build_version(fp32, store, tmp_path / "cache", stream=io.StringIO())

    # Per-tensor INT8 activations of the first conv span 0..1e4: every small value rounds to zero.
    with pytest.raises(BuildError) as info:
        build_version(int8, store, tmp_path / "cache", stream=io.StringIO())
    fp32_top1 = top1(nets["outlier"], x, y)
    message = re.fullmatch(
        rf"shapes 2\.0: accuracy gate failed: INT8 top-1 (\d+\.\d\d)% is more than 3\.0 points below FP32 "
        rf"{fp32_top1:.2f}%",
        str(info.value),
    )
    assert message is not None, str(info.value)
    assert float(message.group(1)) < fp32_top1 - 3.0
    assert sorted(path.name for path in store.iterdir()) == ["manifest.json", "shapes_v1.0.mar"]
    assert sorted(read_manifest(store)["archives"]) == ["shapes_v1.0.mar"]


def test_a_torchvision_builder_outside_the_built_in_list_trains_on_the_users_data(
    project: Path, val_split, tmp_path: Path
) -> None:
    assert "squeezenet1_1" not in ARCHITECTURES
    model = fp32_only(architecture={"torchvision": "squeezenet1_1"}, weights={"train": "data", "epochs": 1})
    (spec,) = load_spec(write_spec(project, {"squeeze": model}, "torchvision.yaml"))

    metadata, files = build(spec, tmp_path)

    assert (tmp_path / "store" / "squeeze_v1.0.mar").is_file()
    assert metadata["architecture"] == {"torchvision": "squeezenet1_1", "kwargs": {}}
    assert metadata["accuracy"]["images"] == 120
    assert not any(name.startswith("model_source/") for name in files)
    x, _ = val_split
    with torch.no_grad():
        assert load_program(files)(x[:2]).shape == (2, 3)


# ------------------------------------------------------------------------------------------ the user's program
def program_model(project: Path, file: str, **overrides) -> dict:
    model = shapes_model(
        program={"file": file}, data={"folder": str(project / "data")}, versions={"1.0": {"precision": "fp32"}}
    )
    del model["architecture"], model["weights"]
    model.update(overrides)
    return model


@pytest.mark.parametrize("kind", ["torchscript", "torch.export"])
def test_a_users_program_builds_as_fp32_and_answers_as_their_module(
    kind: str, project: Path, user_net: torch.nn.Module, val_split, tmp_path: Path
) -> None:
    x, y = val_split
    if kind == "torchscript":
        program = tmp_path / "shapes.ts"
        torch.jit.save(torch.jit.script(user_net), str(program))
    else:
        program = tmp_path / "shapes.pt2"
        batch = torch.export.Dim("batch")
        torch.export.save(torch.export.export(user_net, (x[:2],), dynamic_shapes=({0: batch},)), str(program))
    (spec,) = load_spec(write_spec(tmp_path, {"shapes": program_model(project, program.name)}))

    metadata, files = build(spec, tmp_path)

    assert metadata["architecture"] == {"file": program.name, "sha256": spec.program.sha256}
    assert metadata["accuracy"]["top1"] == top1(user_net, x, y)
    with torch.no_grad():
        torch.testing.assert_close(load_program(files)(x[:8]), user_net(x[:8]), rtol=0, atol=1e-4)


def test_a_program_in_int8_is_refused_naming_precision(
    project: Path, user_net: torch.nn.Module, tmp_path: Path
) -> None:
    torch.jit.save(torch.jit.script(user_net), str(tmp_path / "shapes.ts"))
    model = program_model(project, "shapes.ts", versions={"2.0": {"precision": "int8"}})

    with pytest.raises(SpecError) as info:
        load_spec(write_spec(tmp_path, {"shapes": model}))

    err = info.value
    assert (err.model, err.version, err.field) == ("shapes", "2.0", "precision")
    assert str(err) == (
        "shapes 2.0: precision: a program is served as given, in FP32; int8 needs the nn.Module "
        "(architecture: {file, class} with weights: {file})"
    )


# ------------------------------------------------------------------------------------------ the user's CSV
def wine_model(**data) -> dict:
    return {
        "architecture": "mlp",
        "handler": "tabular_classifier",
        "data": {"csv": "wine.csv", "target": "cultivar", **data},
        "weights": {"train": "data"},
        "versions": {"1.0": {"precision": "fp32"}, "2.0": {"precision": "int8", "quantization": {"max_drop": 3.0}}},
    }


def read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as f:
        header, *rows = list(csv.reader(f))
    return header, rows


@pytest.fixture(scope="module")
def wine_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wine")
    wine_csv(root / "wine.csv")
    return root


def test_fp32_and_int8_of_the_mlp_build_on_the_users_csv(wine_project: Path, tmp_path: Path) -> None:
    header, rows = read_rows(wine_project / "wine.csv")
    specs = load_spec(write_spec(wine_project, {"wine": wine_model()}, "wine.yaml"))
    assert [spec.precision for spec in specs] == ["fp32", "int8"]

    for spec in specs:
        metadata, files = build(spec, tmp_path)
        features = json.loads(files["features.json"])
        assert [feature["name"] for feature in features["features"]] == header[:13] == header[:-1]
        assert json.loads(files["labels.json"]) == sorted({row[-1] for row in rows}) == CULTIVARS
        assert len(rows) == 178
        accuracy = metadata["accuracy"]
        assert (accuracy["dataset"], accuracy["source"], accuracy["records"]) == ("data", "CSV wine.csv", 45)
    assert accuracy["gate"]["max_accuracy_drop"] == 3.0


def test_val_csv_holds_out_exactly_its_own_rows(wine_project: Path, tmp_path: Path) -> None:
    header, rows = read_rows(wine_project / "wine.csv")
    for name, part in (("train.csv", [r for i, r in enumerate(rows) if i % 5]), ("val.csv", rows[::5])):
        with (tmp_path / name).open("w", newline="") as f:
            csv.writer(f).writerows([header, *part])
    model = wine_model(csv="train.csv", val_csv="val.csv")
    model["versions"] = {"1.0": {"precision": "fp32"}}
    (spec,) = load_spec(write_spec(tmp_path, {"wine": model}))

    metadata, files = build(spec, tmp_path)

    val = rows[::5]
    assert metadata["accuracy"]["records"] == len(val) == 36
    assert metadata["accuracy"]["source"] == "CSV train.csv + val.csv"
    assert json.loads(files["features.json"])["split"].startswith(f"train ({len(rows) - len(val)} records)")
    x = torch.tensor([[float(v) for v in row[:-1]] for row in val])
    y = torch.tensor([CULTIVARS.index(row[-1]) for row in val])
    assert metadata["accuracy"]["accuracy"] == top1(load_program(files), x, y)


# ------------------------------------------------------------------------------------------ fingerprints
def spec_hashes(spec_path: Path) -> dict[str, str]:
    return {spec.version: spec.spec_hash() for spec in load_spec(spec_path)}


def test_moving_the_project_keeps_every_spec_hash(project: Path, tmp_path: Path) -> None:
    before = spec_hashes(write_spec(project, {"shapes": shapes_model()}, "fingerprint.yaml"))
    placed = copy_project(project, tmp_path / "here" / "shapes")
    (tmp_path / "elsewhere" / "deeper").mkdir(parents=True)

    moved = Path(shutil.move(placed, tmp_path / "elsewhere" / "deeper" / "moved"))

    assert not placed.exists()
    assert spec_hashes(moved / "fingerprint.yaml") == before


def _flip_a_byte_of_one_image(root: Path) -> None:
    image = root / "data" / "train" / "square" / "007.png"
    content = bytearray(image.read_bytes())
    content[len(content) // 2] ^= 0x01
    image.write_bytes(bytes(content))


def _edit_the_model_file(root: Path) -> None:
    with (root / "shapes_net.py").open("a") as f:
        f.write("# the user's edit\n")


@pytest.mark.parametrize("edit", [_flip_a_byte_of_one_image, _edit_the_model_file], ids=["image", "model-file"])
def test_changing_the_users_files_changes_every_spec_hash(edit, project: Path, tmp_path: Path) -> None:
    before = spec_hashes(write_spec(project, {"shapes": shapes_model()}, "fingerprint.yaml"))
    root = copy_project(project, tmp_path / "user")

    edit(root)

    after = spec_hashes(root / "fingerprint.yaml")
    assert after.keys() == before.keys() == {"1.0", "2.0"}
    assert all(after[version] != before[version] for version in before)


def test_changing_one_csv_cell_changes_the_spec_hash(wine_project: Path, tmp_path: Path) -> None:
    before = spec_hashes(write_spec(wine_project, {"wine": wine_model()}, "wine.yaml"))
    shutil.copyfile(wine_project / "wine.csv", tmp_path / "wine.csv")
    header, rows = read_rows(tmp_path / "wine.csv")
    rows[100][0] = str(float(rows[100][0]) + 0.01)
    with (tmp_path / "wine.csv").open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])

    after = spec_hashes(write_spec(tmp_path, {"wine": wine_model()}))

    assert all(after[version] != before[version] for version in before)


# ------------------------------------------------------------------------------------------ mistakes
# Each returns (the spec's models, (model, version, field), the message after "MODEL VERSION: FIELD: ").
def _missing_model_file(root: Path):
    model = fp32_only(architecture={"file": "nets/shapes_net.py", "class": "ShapesNet"})
    where = ("shapes", "1.0", "architecture.file")
    return {"shapes": model}, where, f"model file not found: {root / 'nets' / 'shapes_net.py'}"


def _empty_data_folder(root: Path):
    (root / "empty").mkdir()
    message = f"{root / 'empty' / 'train'} is missing: the layout is DIR/train/<label>/* and DIR/val/<label>/*"
    return {"shapes": fp32_only(data={"folder": "empty"})}, ("shapes", "1.0", "data.folder"), message


def _label_folder_without_images(root: Path):
    (root / "data" / "train" / "hexagon").mkdir()
    message = f"label folder {root / 'data' / 'train' / 'hexagon'} has no images"
    return {"shapes": fp32_only()}, ("shapes", "1.0", "data.folder"), message


def _val_label_missing_from_train(root: Path):
    (root / "data" / "val" / "hexagon").mkdir()
    shutil.copyfile(root / "data" / "val" / "circle" / "000.png", root / "data" / "val" / "hexagon" / "000.png")
    message = "val label 'hexagon' has no train folder (train labels: ['circle', 'square', 'triangle'])"
    return {"shapes": fp32_only()}, ("shapes", "1.0", "data.folder"), message


def _label_folder_not_in_the_labels(root: Path):
    message = "label folder 'triangle' is not one of the spec's labels ['circle', 'square']"
    return {"shapes": fp32_only(labels=["circle", "square"])}, ("shapes", "1.0", "data.folder"), message


def _wine(root: Path, edit: Callable[[list[str], list[list[str]]], None] | None = None, **data) -> dict:
    path = wine_csv(root / "wine.csv")
    if edit is not None:
        header, rows = read_rows(path)
        edit(header, rows)
        with path.open("w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
    model = wine_model(**data)
    model["versions"] = {"1.0": {"precision": "fp32"}}
    return {"wine": model}


def _csv_without_the_target(root: Path):
    models = _wine(root, target="variety")
    header, _ = read_rows(root / "wine.csv")
    message = f"{root / 'wine.csv'} has no column 'variety' (columns: {', '.join(header)})"
    return models, ("wine", "1.0", "data.target"), message


def _csv_with_a_word_for_a_number(root: Path):
    def edit(header: list[str], rows: list[list[str]]) -> None:
        rows[4][2] = "n/a"  # line 6 of the file: the header is line 1

    message = (
        f"{root / 'wine.csv'} line 6: feature 'ash' is 'n/a', not a finite number (every column but the target "
        "must be numeric)"
    )
    return _wine(root, edit), ("wine", "1.0", "data.csv"), message


def _csv_class_with_one_record(root: Path):
    def edit(header: list[str], rows: list[list[str]]) -> None:
        rows.append([*rows[0][:-1], "cultivar_D"])

    message = "class 'cultivar_D' has one record: a held-out split needs 2+ per class (or give val_csv)"
    return _wine(root, edit), ("wine", "1.0", "data.csv"), message


def _golden_auto_without_data(root: Path):
    model = fp32_only(labels=list(SHAPES))
    del model["data"]
    message = "auto picks held-out inputs of the user's data: it needs a data: section"
    return {"shapes": model}, ("shapes", "1.0", "golden_set"), message


def _data_on_the_detector(root: Path):
    model = {
        "architecture": "digit_detector",
        "handler": "object_detector",
        "labels": [str(i) for i in range(10)],
        "data": {"folder": "data"},
        "weights": {"train": "digit_pages"},
        "versions": {"1.0": {"precision": "fp32"}},
    }
    message = "handler object_detector takes no data section (its data sets are built in)"
    return {"pages": model}, ("pages", "1.0", "data"), message


def _unknown_torchvision_builder(root: Path):
    import torchvision

    known = ", ".join(sorted(torchvision.models.list_models(module=torchvision.models)))
    message = f"'not_a_model' is not a torchvision classification builder (known: {known})"
    model = fp32_only(architecture={"torchvision": "not_a_model"})
    return {"shapes": model}, ("shapes", "1.0", "architecture.torchvision"), message


def _int8_without_any_data(root: Path):
    model = shapes_model(labels=list(SHAPES))
    del model["data"], model["golden_set"]
    message = (
        "precision int8 needs evaluation data: its accuracy gate against FP32 is measured on it (known data sets: "
        "digits; or data, with a data: section of your own); or set allow_ungated: true to build it without any gate"
    )
    return {"shapes": model}, ("shapes", "2.0", "evaluation"), message


SPEC_MISTAKES = [
    _missing_model_file,
    _empty_data_folder,
    _label_folder_without_images,
    _val_label_missing_from_train,
    _label_folder_not_in_the_labels,
    _csv_without_the_target,
    _csv_with_a_word_for_a_number,
    _csv_class_with_one_record,
    _golden_auto_without_data,
    _data_on_the_detector,
    _unknown_torchvision_builder,
    _int8_without_any_data,
]


@pytest.mark.parametrize("mistake", SPEC_MISTAKES, ids=lambda f: f.__name__.strip("_").replace("_", "-"))
def test_a_mistake_in_the_spec_or_data_is_one_line_naming_model_version_and_field(
    mistake, project: Path, tmp_path: Path
) -> None:
    root = copy_project(project, tmp_path / "user")
    models, (model, version, field), message = mistake(root)

    with pytest.raises(SpecError) as info:
        load_spec(write_spec(root, models))

    err = info.value
    assert (err.model, err.version, err.field) == (model, version, field)
    assert str(err) == f"{model} {version}: {field}: {message}"


def test_int8_without_any_data_builds_ungated_only_when_allowed(project: Path) -> None:
    model = shapes_model(labels=list(SHAPES), allow_ungated=True)
    del model["data"], model["golden_set"]

    fp32, int8 = load_spec(write_spec(project, {"shapes": model}, "ungated.yaml"))

    assert (fp32.ungated, int8.ungated, int8.evaluation) == (False, True, None)


# Found at build time: the build imports the user's file, loads the weights and decodes the images.
def _class_not_in_the_file(root: Path):
    model = fp32_only(architecture={"file": "shapes_net.py", "class": "ShapeNet"})
    return model, "architecture.class", "shapes_net.py has no class 'ShapeNet' (its nn.Module classes: ShapesNet)"


def _constructor_fails(root: Path):
    kwargs = {"num_classes": 3, "nope": 1}
    model = fp32_only(architecture={"file": "shapes_net.py", "class": "ShapesNet", "kwargs": kwargs})
    message = (
        f"shapes_net.py:ShapesNet(**{kwargs}) failed: TypeError: ShapesNet.__init__() got an unexpected keyword "
        "argument 'nope'"
    )
    return model, "architecture.kwargs", message


def _weights_of_another_width(root: Path):
    kwargs = {"num_classes": 3, "width": 8}
    model = fp32_only(architecture={"file": "shapes_net.py", "class": "ShapesNet", "kwargs": kwargs})
    message = (
        "shapes_net.pt does not fit architecture shapes_net.py:ShapesNet with 3 classes: mis-shaped: "
        "features.0.weight (16, 3, 3, 3) vs model (8, 3, 3, 3), features.0.bias (16,) vs model (8,), "
        "features.3.weight (32, 16, 3, 3) vs model (16, 8, 3, 3) and 4 more"
    )
    return model, "weights", message


def _weights_with_a_key_missing_and_one_extra(root: Path):
    state = torch.load(root / "shapes_net.pt", weights_only=True)
    del state["head.1.bias"]
    state["head.2.weight"] = torch.zeros(3, 3)
    torch.save(state, root / "edited.pt")
    message = (
        "edited.pt does not fit architecture shapes_net.py:ShapesNet with 3 classes: missing keys: head.1.bias; "
        "unexpected keys: head.2.weight"
    )
    return fp32_only(weights={"file": "edited.pt"}), "weights", message


def _weights_that_are_a_pickled_module(root: Path):
    net_class = _import(root / "shapes_net.py", "byom_pickled_shapes_net").ShapesNet
    torch.save(net_class(num_classes=3), root / "module.pt")
    message = (
        "module.pt is not a state_dict that loads with weights_only=True (UnpicklingError: Unsupported global: "
        "GLOBAL byom_pickled_shapes_net.ShapesNet was not an allowed global by default); save model.state_dict()"
    )
    return fp32_only(weights={"file": "module.pt"}), "weights.file", message


def _an_image_that_does_not_decode(root: Path):
    bad = root / "data" / "val" / "square" / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    message = (
        f"{bad} does not decode as an image the server accepts: image data is corrupt or truncated: it starts "
        "like a PNG file but its header cannot be read"
    )
    return fp32_only(), "data.folder", message


def _preprocessing_that_does_not_fit_the_model(root: Path):
    gray = {"color_mode": "L", "resize": None, "crop": 32, "mean": [0.5], "std": [0.25]}
    message = (
        "shapes_net.py:ShapesNet cannot take an input of shape [1, 1, 32, 32] (the spec's preprocessing or data "
        "decide it): RuntimeError: Given groups=1, weight of size [16, 3, 3, 3], expected input[1, 1, 32, 32] to "
        "have 3 channels, but got 1 channels instead"
    )
    return fp32_only(preprocessing=gray), "architecture", message


def _a_model_with_more_outputs_than_labels(root: Path):
    net_class = _import(root / "shapes_net.py", "byom_five_class_shapes_net").ShapesNet
    torch.save(net_class(num_classes=5).state_dict(), root / "five.pt")
    architecture = {"file": "shapes_net.py", "class": "ShapesNet", "kwargs": {"num_classes": 5}}
    model = fp32_only(architecture=architecture, weights={"file": "five.pt"})
    message = (
        "shapes_net.py:ShapesNet answers [1, 5] for one input; a classifier of 3 labels ['circle', 'square', "
        "'triangle'] must answer [1, 3] (one score per label)"
    )
    return model, "architecture", message


BUILD_MISTAKES = [
    _class_not_in_the_file,
    _constructor_fails,
    _weights_of_another_width,
    _weights_with_a_key_missing_and_one_extra,
    _weights_that_are_a_pickled_module,
    _an_image_that_does_not_decode,
    _preprocessing_that_does_not_fit_the_model,
    _a_model_with_more_outputs_than_labels,
]


@pytest.mark.parametrize("mistake", BUILD_MISTAKES, ids=lambda f: f.__name__.strip("_").replace("_", "-"))
def test_a_mistake_found_at_build_is_one_line_on_stderr_and_writes_no_archive(
    mistake, project: Path, tmp_path: Path, repo_root: Path
) -> None:
    root = copy_project(project, tmp_path / "user")
    model, field, message = mistake(root)
    spec_path = write_spec(root, {"shapes": model})
    load_spec(spec_path)  # the spec itself is valid: the build finds the mistake
    store = tmp_path / "store"

    result = subprocess.run(
        [sys.executable, str(repo_root / "build_mar.py"), "--spec", str(spec_path), "--store", str(store),
         "--cache", str(tmp_path / "cache")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip

    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"build_mar: error: shapes 1.0: {field}: {message}"]
    assert not list(store.glob("*.mar"))
    assert read_manifest(store)["archives"] == {}
