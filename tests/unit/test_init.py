"""``servekit init``: a checked spec entry for the user's model and data, or one line saying why not.

The README's path (a CNN file, its weights and an image folder, built, registered and answering) is
run as written by ``tests/integration/test_readme_byom.py``; here: the CSV path, appending to an
existing spec with its comments kept, and each refusal leaving the spec as it was.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from servekit.build.spec import load_spec
from tests.byom_project import EXAMPLE, shapes_generator, wine_csv

REPO = Path(__file__).resolve().parents[2]


def servekit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "servekit.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=300, check=False)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small image folder, the user's CNN file and untrained weights of it (init only checks that they fit)."""
    root = tmp_path_factory.mktemp("init_project")
    shapes_generator().write_images(root / "data", train=3, val=2)
    (root / "shapes_net.py").write_text((EXAMPLE / "shapes_net.py").read_text())
    sys.path.insert(0, str(root))
    try:
        from shapes_net import ShapesNet
    finally:
        sys.path.remove(str(root))
    torch.save(ShapesNet(num_classes=3).state_dict(), root / "net.pt")
    wine_csv(root / "wine.csv")
    return root


def image_args(name: str, *extra: str) -> list[str]:
    return ["init", name, "--model-file", "shapes_net.py", "--class", "ShapesNet", "--weights", "net.pt",
            "--data", "data", "--mean", "0.5", "--std", "0.25", *extra]  # fmt: skip


def test_init_appends_a_checked_entry_and_keeps_the_specs_comments(project: Path) -> None:
    spec = project / "appended.yaml"
    spec.write_text("# my models\nmodels:\n  first:  # kept\n" + "".join(
        f"    {line}\n" for line in yaml.safe_dump(
            {"architecture": "mlp", "handler": "tabular_classifier", "data": {"csv": "wine.csv", "target": "cultivar"},
             "weights": {"train": "data"}, "versions": {"1.0": {"precision": "fp32"}}}, sort_keys=False).splitlines()
    ))  # fmt: skip

    result = servekit(*image_args("shapes", "--spec", "appended.yaml"), cwd=project)

    assert result.returncode == 0, result.stderr
    assert "wrote model shapes (1.0 fp32, 2.0 int8; image_classifier, 3 classes" in result.stdout
    assert "build_mar.py --spec appended.yaml --model shapes" in result.stdout
    text = spec.read_text()
    assert text.startswith("# my models\nmodels:\n  first:  # kept\n")
    specs = {(s.name, s.version): s for s in load_spec(spec)}
    shapes = specs[("shapes", "2.0")]
    assert (shapes.precision, shapes.evaluation, shapes.quantization.calibration) == ("int8", "data", "data")
    assert shapes.labels == ("circle", "square", "triangle")
    assert (shapes.preprocessing.crop, shapes.preprocessing.mean) == (32, (0.5, 0.5, 0.5))
    assert [g.label for g in shapes.golden_set] == ["circle", "circle", "square", "square", "triangle", "triangle"]


def test_init_of_a_csv_trains_the_mlp_on_it(project: Path) -> None:
    result = servekit("init", "wine", "--data", "wine.csv", "--target", "cultivar", "--train", "30",
                      "--spec", "wine.yaml", cwd=project)  # fmt: skip

    assert result.returncode == 0, result.stderr
    (fp32, int8) = load_spec(project / "wine.yaml")
    assert (fp32.handler, fp32.architecture, fp32.weights.train, fp32.weights.epochs) == (
        "tabular_classifier", "mlp", "data", 30)  # fmt: skip
    assert int8.labels == ("cultivar_A", "cultivar_B", "cultivar_C")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["init", "w", "--data", "wine.csv", "--train", "5"],
            "init: --target COLUMN is required with a CSV (the column that holds the class)",
        ),
        (
            image_args("shapes2", "--kwargs", '{"width": 8}'),
            "init: shapes2 1.0: weights: net.pt does not fit architecture shapes_net.py:ShapesNet with 3 classes: "
            "mis-shaped: features.0.weight (16, 3, 3, 3) vs model (8, 3, 3, 3), features.0.bias (16,) vs model (8,), "
            "features.3.weight (32, 16, 3, 3) vs model (16, 8, 3, 3) and 4 more",
        ),
        (
            ["init", "s", "--model-file", "shapes_net.py", "--class", "Nope", "--weights", "net.pt", "--data", "data"],
            "init: s 1.0: architecture.class: shapes_net.py has no class 'Nope' (its nn.Module classes: ShapesNet)",
        ),
        (image_args("shapes3", "--size", "1"), "init: shapes3: the model cannot take an input of shape [1, 3, 1, 1]"),
        (["init", "s", "--data", "nowhere"], "init: --data nowhere not found"),
        (image_args("first"), "already has a model 'first': choose another name"),
    ],  # fmt: skip
    ids=["csv-without-target", "weights-do-not-fit", "no-such-class", "input-too-small", "no-data", "name-taken"],
)
def test_a_refused_init_is_one_line_and_leaves_the_spec_as_it_was(project: Path, args: list[str], message: str) -> None:
    spec = project / "kept.yaml"
    spec.write_text("models:\n  first: {architecture: mlp, handler: tabular_classifier, data: {csv: wine.csv, "
                    "target: cultivar}, weights: {train: data}, versions: {'1.0': {precision: fp32}}}\n")  # fmt: skip
    before = spec.read_text()

    result = servekit(*args, "--spec", "kept.yaml", cwd=project)

    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("servekit: error: ")
    assert message in lines[0]
    assert spec.read_text() == before
    assert not list(project.glob("tmp*.yaml"))  # the candidate spec is gone
