"""``servekit init``: a checked spec entry for the user's own model and data, and the commands that follow.

    servekit init shapes --model-file net.py --class Net --weights net.pt --data images/ [--spec models.yaml]
    servekit init churn --model-file net.py --class Net --weights net.pt --data churn.csv --target churned
    servekit init flowers --torchvision efficientnet_b0 --data flowers/ --train 20

The task follows from the data: a folder (``train/<label>/*``, ``val/<label>/*``) is an image
classifier, a ``.csv`` a tabular classifier. The entry has version 1.0 in FP32 and 2.0 in INT8
(``--precisions`` changes that), evaluated and gated on the data's held-out split, with
``golden_set: auto``. Before anything is written the entry is resolved like any spec entry, the
model is instantiated, the weights are loaded into it and one input of the spec's shape goes through
it, so a wrong class, weights that do not fit, or an input size the model cannot take is one line
here rather than a failed build later. An existing spec gets the entry appended (its comments stay);
a model of that name already in it is refused.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from servekit.errors import ServekitError

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
MAX_SIDE = 224


class InitError(ServekitError):
    """``servekit init`` could not write a working entry; the message says why."""


@dataclass
class InitRequest:
    name: str
    spec: Path
    data: Path
    model_file: Path | None = None
    class_name: str | None = None
    kwargs: str | None = None
    torchvision: str | None = None
    weights: Path | None = None
    train_epochs: int | None = None
    target: str | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    size: int | None = None
    precisions: tuple[str, ...] = ("fp32", "int8")


def _relative(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()


def _first_image(folder: Path) -> Path | None:
    from servekit.build.user_data import IMAGE_SUFFIXES

    train = folder / "train"
    if not train.is_dir():
        return None
    return next((p for p in sorted(train.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES), None)


def _image_preprocessing(request: InitRequest) -> dict:
    """RGB or L from the first training image, its shorter side (at most 224) as the crop, the given mean/std."""
    from PIL import Image

    first = _first_image(request.data)
    mode, side = "RGB", MAX_SIDE
    if first is not None:
        try:
            with Image.open(first) as image:
                mode = "L" if image.mode in ("L", "1", "I;16", "I") else "RGB"
                side = min(min(image.size), MAX_SIDE)
        except OSError:
            pass  # the build names an image that does not decode
    side = request.size or side
    channels = 1 if mode == "L" else 3

    def per_channel(values: list[float] | None, default: list[float], what: str) -> list[float]:
        if values is None:
            return default[:channels] if channels == 3 else [round(sum(default) / 3, 3)]
        if len(values) == 1:
            return values * channels
        if len(values) != channels:
            raise InitError(f"init: --{what} needs 1 or {channels} numbers for {mode} images, got {values}")
        return values

    return {
        "color_mode": mode,
        "resize": side,
        "crop": side,
        "mean": per_channel(request.mean, IMAGENET_MEAN, "mean"),
        "std": per_channel(request.std, IMAGENET_STD, "std"),
    }


def entry_for(request: InitRequest) -> dict:
    """The spec entry (paths relative to the spec's folder)."""
    base = request.spec.parent
    if request.data.is_dir():
        handler = "image_classifier"
        data: dict[str, Any] = {"folder": _relative(request.data, base)}
    elif request.data.suffix.lower() == ".csv" and request.data.is_file():
        if not request.target:
            raise InitError("init: --target COLUMN is required with a CSV (the column that holds the class)")
        handler = "tabular_classifier"
        data = {"csv": _relative(request.data, base), "target": request.target}
    else:
        raise InitError(f"init: --data {request.data} is neither an image folder (train/<label>/*, val/<label>/*) "
                        "nor a .csv file")  # fmt: skip
    if request.torchvision:
        architecture: Any = {"torchvision": request.torchvision}
    elif request.model_file is not None and request.class_name:
        architecture = {"file": _relative(request.model_file, base), "class": request.class_name}
    elif handler == "tabular_classifier" and request.model_file is None:
        architecture = "mlp"
    else:
        raise InitError("init: give --model-file FILE --class NAME (your nn.Module) or --torchvision NAME")
    if request.kwargs:
        try:
            kwargs = json.loads(request.kwargs)
        except json.JSONDecodeError as exc:
            raise InitError(f"init: --kwargs is not JSON: {exc}") from None
        if not isinstance(architecture, dict):
            raise InitError("init: --kwargs applies to --model-file or --torchvision")
        architecture["kwargs"] = kwargs
    if request.weights is not None and request.train_epochs is not None:
        raise InitError("init: give --weights FILE or --train EPOCHS, not both")
    if request.weights is not None:
        weights: dict[str, Any] = {"file": _relative(request.weights, base)}
    elif request.train_epochs is not None:
        weights = {"train": "data", "epochs": request.train_epochs}
    else:
        raise InitError("init: give --weights FILE (a state_dict of your model) or --train EPOCHS (train on the data)")
    entry: dict[str, Any] = {
        "description": f"{request.name}: {architecture if isinstance(architecture, str) else _describe(architecture)}"
        f" on {data.get('folder') or data.get('csv')} (servekit init)",
        "architecture": architecture,
        "handler": handler,
        "data": data,
        "weights": weights,
    }
    if handler == "image_classifier":
        entry["preprocessing"] = _image_preprocessing(request)
    entry["golden_set"] = "auto"
    entry["versions"] = {f"{n}.0": {"precision": p} for n, p in enumerate(request.precisions, start=1)}
    return entry


def _describe(architecture: dict) -> str:
    return (
        f"torchvision {architecture['torchvision']}"
        if "torchvision" in architecture
        else (f"{Path(architecture['file']).name}:{architecture['class']}")
    )


def _entry_text(name: str, entry: dict) -> str:
    text = yaml.safe_dump({name: entry}, sort_keys=False, default_flow_style=None, width=100)
    return "".join(f"  {line}\n" for line in text.splitlines())


def _spec_text(request: InitRequest, entry: dict) -> str:
    """The spec file's new text: the entry appended under ``models:`` (or a new spec)."""
    if not request.spec.exists():
        return "models:\n" + _entry_text(request.name, entry)
    text = request.spec.read_text()
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InitError(f"init: {request.spec} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(document, dict) or set(document) != {"models"} or not isinstance(document["models"], dict):
        raise InitError(f"init: {request.spec} is not a model spec (one top-level key, models:)")
    if request.name in document["models"]:
        raise InitError(f"init: {request.spec} already has a model {request.name!r}: choose another name")
    return text + ("" if text.endswith("\n") else "\n") + _entry_text(request.name, entry)


def _check(spec_path: Path, name: str) -> list:
    """Resolve the new entry, load the weights into the model and run one input through it."""
    import torch

    from servekit.build.spec import load_spec
    from servekit.build.training import BuildError, load_fp32_model
    from servekit.build.user_data import DataError
    from servekit.build.user_model import ModelSourceError

    specs = [s for s in load_spec(spec_path) if s.name == name]
    spec = specs[0]
    try:
        model = load_fp32_model(spec, Path(spec.weights.file)) if spec.weights.file else spec.task.build_model(spec)
    except (BuildError, DataError, ModelSourceError) as exc:
        raise InitError(f"init: {name} 1.0: {exc}") from None
    example = spec.task.example_input(spec)
    try:
        with torch.inference_mode():
            output = model.eval()(example)
    except Exception as exc:  # noqa: BLE001 - the user's forward on the spec's input shape
        text = " ".join(str(exc).split())[:300]
        raise InitError(f"init: {name}: the model cannot take an input of shape {list(example.shape)} (the spec's "
                        f"preprocessing; --size changes it): {type(exc).__name__}: {text}") from None  # fmt: skip
    if not isinstance(output, torch.Tensor) or output.dim() != 2 or output.shape[1] != len(spec.labels):
        shape = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        n = len(spec.labels)
        raise InitError(f"init: {name}: the model answers {shape} for one input; a classifier of the data's "
                        f"{n} classes {list(spec.labels)} must answer [1, {n}]")  # fmt: skip
    return specs


def init(request: InitRequest) -> str:
    """Write the checked entry into ``request.spec``; returns what to print (the entry and the next commands)."""
    from servekit.build.spec import SpecError

    if request.model_file is not None and not request.model_file.is_file():
        raise InitError(f"init: --model-file {request.model_file} not found")
    if request.weights is not None and not request.weights.is_file():
        raise InitError(f"init: --weights {request.weights} not found")
    if not request.data.exists():
        raise InitError(f"init: --data {request.data} not found")
    request.spec = request.spec.resolve()
    entry = entry_for(request)
    text = _spec_text(request, entry)
    request.spec.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=request.spec.parent, suffix=".yaml", delete=False) as tmp:
        tmp.write(text)
    candidate = Path(tmp.name)
    try:
        specs = _check(candidate, request.name)
    except SpecError as exc:
        candidate.unlink()
        raise InitError(f"init: {exc}") from None
    except BaseException:
        candidate.unlink()
        raise
    candidate.replace(request.spec)
    versions = ", ".join(f"{s.version} {s.precision}" for s in specs)
    spec_flag = f" --spec {_relative(request.spec, Path.cwd())}"
    return "\n".join([
        f"wrote model {request.name} ({versions}; {specs[0].task.handler}, {len(specs[0].labels)} classes "
        f"{list(specs[0].labels)[:10]}) to {request.spec}",
        "next:",
        f"  .venv/bin/python build_mar.py{spec_flag} --model {request.name}   # gated on the data's held-out split",
        f"  .venv/bin/servekit register {request.name} {specs[-1].version}",
        f"  curl -H \"Authorization: Bearer $INF\" "
        f"http://127.0.0.1:8080/predictions/{request.name}/{specs[-1].version} -T INPUT",
    ])  # fmt: skip
