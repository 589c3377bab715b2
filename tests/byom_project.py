"""A user's own project, made by the tests: a CNN file, its trained weights, an image folder, a CSV.

Nothing here is a bundled data set: the images are drawn by ``examples/shapes/make_shapes.py``
(circles, squares, triangles), the CSV is scikit-learn's wine measurements written out as a user's
file with a string target column, and the specs are written as a user would write them.
"""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = REPO_ROOT / "examples" / "shapes"
PREPROCESSING = {"color_mode": "RGB", "resize": None, "crop": 32, "mean": [0.5] * 3, "std": [0.25] * 3}


def shapes_generator():
    sys.path.insert(0, str(EXAMPLE))
    try:
        import make_shapes
    finally:
        sys.path.remove(str(EXAMPLE))
    return make_shapes


def shapes_project(root: Path, train: int = 60, val: int = 40, epochs: int = 30) -> Path:
    """``root/shapes_net.py``, ``root/data/{train,val}/<shape>/*.png``, ``root/shapes_net.pt`` (trained)."""
    make_shapes = shapes_generator()
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(EXAMPLE / "shapes_net.py", root / "shapes_net.py")
    make_shapes.write_images(root / "data", train=train, val=val)
    make_shapes.train_weights(root / "data", root / "shapes_net.pt", epochs=epochs, log=lambda _: None)
    return root


def wine_csv(path: Path, target: str = "cultivar") -> Path:
    """scikit-learn's wine measurements (178 records, 13 numeric features) as a user's CSV, string classes."""
    from sklearn.datasets import load_wine

    wine = load_wine()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*wine.feature_names, target])
        for x, y in zip(wine.data, wine.target, strict=True):
            writer.writerow([*(f"{v:g}" for v in x), f"cultivar_{'ABC'[y]}"])
    return path


def shapes_model(**overrides: Any) -> dict:
    """A spec entry for the user's CNN on the user's folder: FP32 1.0 and gated INT8 2.0."""
    model = {
        "description": "A user's shapes CNN",
        "architecture": {"file": "shapes_net.py", "class": "ShapesNet", "kwargs": {"num_classes": 3}},
        "handler": "image_classifier",
        "data": {"folder": "data"},
        "preprocessing": dict(PREPROCESSING),
        "topk": 2,
        "weights": {"file": "shapes_net.pt"},
        "golden_set": "auto",
        "serving": {"batch_size": 4, "max_batch_delay_ms": 5, "min_workers": 1, "max_workers": 1},
        "versions": {"1.0": {"precision": "fp32"}, "2.0": {"precision": "int8", "quantization": {"max_drop": 3.0}}},
    }
    model.update(overrides)
    return model


def write_spec(root: Path, models: dict[str, dict], name: str = "models.yaml") -> Path:
    path = root / name
    path.write_text(yaml.safe_dump({"models": models}, sort_keys=False))
    return path
