"""The tabular classification task's build side: the data set, the MLP, training, INT8, evaluation.

Data (``breast_cancer``): scikit-learn's bundled Breast Cancer Wisconsin (Diagnostic) data set,
569 records of 30 named numeric features computed from a digitized image of a fine needle
aspirate of a breast mass (classes ``malignant`` and ``benign``), split once, stratified and
seeded, into 75 % train / 25 % held out. No download: the data ships with scikit-learn.

Model (``TabularMLP``): ``Linear -> ReLU`` per hidden width, then a ``Linear`` to the classes.
Training standardises the features with the training split's mean and standard deviation; the
standardisation is then folded into the first ``Linear`` (``fold_standardisation``: ``W' = W / std``,
``b' = b - W' mean``), so the program takes the raw features the client sends and nothing runs
before it. INT8 (``quantize_dynamic``) is dynamic quantization of the hidden ``Linear`` layers: the
first one stays FP32, because its input is the raw features, from 0.001 to 4,000 in one record,
and one dynamic activation scale for all of them rounds every small feature to zero (held-out
accuracy fell to 63 % when it was quantized too).

The feature schema (``feature_schema``) goes into the archive twice: the handler's config (what it
enforces) and ``features.json`` (names, units, descriptions, ranges) for the people who call it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from collections.abc import Callable, Collection, Sized
from dataclasses import asdict, dataclass, fields
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from handlers.tabular import Feature, TabularConfig, TabularProtocol, oip_metadata
from servekit.build.splits import TabularData
from servekit.build.tasks import Log, Task

SPLIT_SEED = 0
HOLDOUT_FRACTION = 0.25
ARCHITECTURE = "mlp"
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-2
BATCH_SIZE = 32
FEATURES_FILE = "features.json"

# The data set's description (sklearn's DESCR) names each measurement; it gives no units: lengths and
# areas are in the units of the digitized image, the rest are ratios or counts it defines.
MEASUREMENTS = {
    "radius": ("length, digitized-image units (not stated in the data set)",
               "mean of distances from center to points on the perimeter"),
    "texture": ("gray levels", "standard deviation of gray-scale values"),
    "perimeter": ("length, digitized-image units (not stated in the data set)", "perimeter of the nucleus"),
    "area": ("area, digitized-image units squared (not stated in the data set)", "area of the nucleus"),
    "smoothness": ("unit as in the data set", "local variation in radius lengths"),
    "compactness": ("dimensionless", "perimeter^2 / area - 1.0"),
    "concavity": ("unit as in the data set", "severity of concave portions of the contour"),
    "concave points": ("unit as in the data set", "number of concave portions of the contour"),
    "symmetry": ("unit as in the data set", "symmetry of the nucleus"),
    "fractal dimension": ("dimensionless", '"coastline approximation" - 1'),
}  # fmt: skip
STATISTICS = {"mean": "mean over the nuclei in the image", "error": "standard error over the nuclei",
              "worst": "mean of the three largest values"}  # fmt: skip


# ------------------------------------------------------------------------------------------ data
@cache
def _breast_cancer_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple, tuple]:
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    data = load_breast_cancer()
    x_train, x_holdout, y_train, y_holdout = train_test_split(
        data.data, data.target, test_size=HOLDOUT_FRACTION, random_state=SPLIT_SEED, stratify=data.target
    )
    names = tuple(str(name) for name in data.feature_names)
    classes = tuple(str(name) for name in data.target_names)
    return x_train, x_holdout, y_train, y_holdout, names, classes


def breast_cancer(split: str) -> TabularData:
    """The ``train`` or ``holdout`` split of the breast cancer data set."""
    x_train, x_holdout, y_train, y_holdout, names, classes = _breast_cancer_split()
    x, y = {"train": (x_train, y_train), "holdout": (x_holdout, y_holdout)}[split]
    return TabularData(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.int64), names, classes)


DATASETS: dict[str, Callable[[str], TabularData]] = {"breast_cancer": breast_cancer}
SOURCES = {"breast_cancer": "scikit-learn load_breast_cancer (Breast Cancer Wisconsin (Diagnostic), UCI)"}


def split_of(spec: Any, name: str, split: str) -> TabularData:
    """The ``split`` of data set ``name`` for ``spec``: a bundled one, or ``data``, the user's CSV."""
    return spec.data.split(split) if name == "data" else DATASETS[name](split)


def describe_feature(name: str) -> tuple[str, str]:
    """(unit, description) of a breast cancer feature such as ``worst concave points``."""
    statistic, _, measurement = name.partition(" ")
    if statistic not in STATISTICS:  # "radius error": the statistic comes last
        measurement, _, statistic = name.rpartition(" ")
    unit, meaning = MEASUREMENTS.get(measurement, ("unit as in the data set", ""))
    return unit, f"{meaning} ({STATISTICS.get(statistic, statistic)})" if meaning else ""


def feature_schema(train: TabularData, tolerance: float, described: bool = True) -> tuple[Feature, ...]:
    """Every feature with its training range and the range a request may use.

    Accepted: ``[min - tolerance * span, max + tolerance * span]``, where span = max - min; a
    feature never negative in training (a length, an area, a count) is never accepted below 0.
    """
    schema = []
    for column, name in enumerate(train.feature_names):
        values = train.x[:, column]
        low, high = float(values.min()), float(values.max())
        span = high - low
        lower, upper = low - tolerance * span, high + tolerance * span
        if low >= 0:
            lower = max(lower, 0.0)
        schema.append(
            Feature(
                name=name,
                min=low,
                max=high,
                lower=min(round(lower, 6), low),
                upper=max(round(upper, 6), high),
                unit=describe_feature(name)[0] if described else "",
            )  # fmt: skip
        )
    return tuple(schema)


def features_document(train: TabularData, tolerance: float, dataset: str, source: str | None = None) -> dict:
    """``features.json`` in the archive: the schema with every feature's description, for callers."""
    described = dataset in SOURCES  # the bundled data sets' features have descriptions; a user's CSV only names
    features = []
    for feature in feature_schema(train, tolerance, described):
        entry = asdict(feature)
        entry["description"] = describe_feature(feature.name)[1] if described else ""
        features.append(entry)
    return {
        "dataset": dataset,
        "source": SOURCES.get(dataset, source),
        "split": f"train ({len(train)} records), stratified, seed {SPLIT_SEED}",
        "range_tolerance": tolerance,
        "accepted_range": "[min - range_tolerance * (max - min), max + range_tolerance * (max - min)], "
        "never below 0 for a feature that is never negative in training; outside it a record gets 400",
        "classes": list(train.class_names),
        "features": features,
    }


# ------------------------------------------------------------------------------------------ the spec's section
@dataclass(frozen=True)
class TabularOptions:
    """The spec's ``tabular:`` section: the MLP's hidden widths and the serving limits of a request."""

    hidden: tuple[int, ...] = (32, 16)
    range_tolerance: float = 0.5
    max_records: int = 256

    def __post_init__(self) -> None:
        hidden = self.hidden
        if (
            not isinstance(hidden, list | tuple)
            or not hidden
            or len(hidden) > 8
            or not all(isinstance(h, int) and not isinstance(h, bool) and 1 <= h <= 4096 for h in hidden)
        ):
            raise ValueError(f"hidden: must be a list of 1 to 8 layer widths from 1 to 4096, got {hidden!r}")
        object.__setattr__(self, "hidden", tuple(hidden))
        # The handler's own checks, so a bad value fails the spec rather than the worker.
        TabularConfig(range_tolerance=self.range_tolerance, max_records=self.max_records)

    @classmethod
    def from_dict(cls, data: Any) -> TabularOptions:
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ValueError(f"must be a mapping (hidden, range_tolerance, max_records), got {data!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown key in tabular (valid keys: {', '.join(sorted(known))})")
        return cls(**data)

    def to_dict(self) -> dict:
        return {"hidden": list(self.hidden), "range_tolerance": self.range_tolerance, "max_records": self.max_records}


# ------------------------------------------------------------------------------------------ the model
class TabularMLP(nn.Module):
    """``Linear -> ReLU`` per hidden width, then ``Linear`` to the classes; ``layers[0]`` takes raw features."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def standardisation(train: TabularData) -> tuple[np.ndarray, np.ndarray]:
    """The training split's per-feature mean and standard deviation (1 where a feature is constant)."""
    mean, std = train.x.mean(axis=0), train.x.std(axis=0)
    return mean, np.where(std > 0, std, 1.0)


@torch.no_grad()
def fold_standardisation(linear: nn.Linear, mean: np.ndarray, std: np.ndarray) -> None:
    """Make ``linear(x)`` equal the trained ``linear((x - mean) / std)``, in place (computed in float64)."""
    weight = linear.weight.double() / torch.from_numpy(std)
    bias = linear.bias.double() - weight @ torch.from_numpy(mean)
    linear.weight.copy_(weight.float())
    linear.bias.copy_(bias.float())


def train_mlp(
    train: TabularData, hidden: tuple[int, ...], num_classes: int, seed: int, epochs: int, log: Log
) -> dict[str, torch.Tensor]:
    """Train on standardised features (AdamW, one-cycle schedule), then fold the standardisation in."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few thousand multiply-adds per step: more threads only wait on each other
    try:
        return _train_mlp(train, hidden, num_classes, seed, epochs, log)
    finally:
        torch.set_num_threads(threads)


def _train_mlp(
    train: TabularData, hidden: tuple[int, ...], num_classes: int, seed: int, epochs: int, log: Log
) -> dict[str, torch.Tensor]:
    mean, std = standardisation(train)
    x = torch.tensor((train.x - mean) / std, dtype=torch.float32)
    y = torch.from_numpy(train.y)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = TabularMLP(x.shape[1], hidden, num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    steps = epochs * ((len(x) + BATCH_SIZE - 1) // BATCH_SIZE)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LEARNING_RATE, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), BATCH_SIZE):
            index = order[start : start + BATCH_SIZE]
            optimizer.zero_grad()
            loss = loss_fn(model(x[index]), y[index])
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(index)
        if epoch == 1 or epoch % 10 == 0 or epoch == epochs:
            log(f"epoch {epoch}/{epochs}: train loss {total / len(x):.4f}")
    model.eval()
    fold_standardisation(model.layers[0], mean, std)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def quantize_dynamic(model: nn.Module) -> nn.Module:
    """Dynamic INT8 of every ``Linear`` but the first (which takes the raw features: module docstring)."""
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    hidden = {
        name: default_dynamic_qconfig
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name != "layers.0"
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao deprecation notices
        return quantize_dynamic(copy.deepcopy(model).eval(), hidden, dtype=torch.qint8)


@torch.inference_mode()
def accuracy(program: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    """Held-out accuracy in percent."""
    correct = 0
    for start in range(0, len(x), 256):
        correct += int((program(x[start : start + 256]).argmax(1) == y[start : start + 256]).sum())
    return 100.0 * correct / len(x)


class TabularEvaluation:
    """The held-out records as the handler gives them to the model (raw float32 features), and their classes."""

    def __init__(self, data: TabularData) -> None:
        self.inputs = torch.tensor(data.x, dtype=torch.float32)
        self.labels = torch.from_numpy(data.y)

    def __len__(self) -> int:
        return len(self.labels)


# ------------------------------------------------------------------------------------------ the task
class TabularClassifierTask(Task):
    """Records of named numeric features -> one class each (``handlers.tabular_classifier``).

    The spec's ``tabular:`` section (``TabularOptions``), ``architecture: mlp``, ``weights: {train:
    breast_cancer}``; INT8 is dynamic (no calibration), and the metric is held-out accuracy in percent.
    """

    handler = "tabular_classifier"
    handler_file = "handlers/tabular_classifier.py"
    metric = "accuracy"
    metric_label = "accuracy"
    unit = "records"
    spec_keys = frozenset({"tabular"})
    options_key = "tabular"
    calibrated = False
    data_kinds = ("csv",)
    user_models = frozenset({"file", "program"})
    classifier = True
    runtimes = ("torch", "openvino", "onnxruntime")  # a tensor in, one tensor of scores out

    def architectures(self) -> Collection[str]:
        return (ARCHITECTURE,)

    def datasets(self) -> Collection[str]:
        return DATASETS

    def golden_from_data(self, data: Any) -> list[tuple[str, str, bytes]]:
        return [(name, label, (json.dumps(record, indent=1) + "\n").encode())
                for name, record, label in data.golden_records()]  # fmt: skip

    def parse_protocol(self, data: dict | None) -> TabularProtocol:
        return TabularProtocol.from_dict(data)

    def parse_options(self, data: Any) -> TabularOptions:
        return TabularOptions.from_dict(data)

    @staticmethod
    def dataset(spec: Any) -> str | None:
        """The data set of the feature schema: the one the weights are trained on, else the evaluation's."""
        return spec.weights.train or spec.evaluation

    def check(self, spec: Any) -> None:
        name = self.dataset(spec)
        if name is None:
            raise ValueError("evaluation: a tabular model needs a data set for its feature schema "
                             f"(weights.train or evaluation: one of {sorted(DATASETS)})")  # fmt: skip
        if name not in DATASETS and not (name == "data" and spec.data is not None):
            raise ValueError(f"weights.train: unknown data set {name!r} (known: {sorted(DATASETS)})")
        if spec.weights.train is not None and not isinstance(spec.architecture, str):
            raise ValueError(f"weights.train: training builds the built-in {ARCHITECTURE} (standardisation "
                             "folded into its first layer); give your own module its weights: {file: ...}")  # fmt: skip
        classes = split_of(spec, name, "train").class_names
        if len(spec.labels) != len(classes):
            raise ValueError(
                f"labels: {name} has {len(classes)} classes {list(classes)}, got {len(spec.labels)} labels"
            )

    def schema(self, spec: Any) -> tuple[Feature, ...]:
        name = self.dataset(spec)
        return feature_schema(split_of(spec, name, "train"), spec.options.range_tolerance, name in SOURCES)

    def handler_config(self, spec: Any) -> TabularConfig:
        return TabularConfig(
            precision=spec.precision,
            runtime=spec.engine,
            features=self.schema(spec),
            range_tolerance=spec.options.range_tolerance,
            max_records=spec.options.max_records,
            threads=spec.serving.threads,
            quantized_engine=spec.quantization.backend if spec.quantization is not None else "x86",
            protocol=spec.protocol,
            faults=spec.faults,
            prediction_log=spec.monitoring.prediction_log,
            explain=spec.explain,
        )

    def oip_metadata(self, spec: Any) -> dict:
        return oip_metadata(spec.protocol, self.schema(spec), len(spec.labels), spec.options.max_records)

    def recipe(self, spec: Any) -> dict:
        train = split_of(spec, spec.weights.train, "train")
        return {
            "task": self.handler,
            "architecture": spec.architecture_key,
            "hidden": list(spec.options.hidden),
            "train": spec.weights.train,
            "data_sha256": hashlib.sha256(train.x.tobytes() + train.y.tobytes()).hexdigest(),
            "seed": spec.weights.seed,
            "epochs": spec.weights.epochs,
            "labels": list(spec.labels),
            "optimizer": {"lr": LEARNING_RATE, "weight_decay": WEIGHT_DECAY, "batch_size": BATCH_SIZE},
            "recipe_version": 1,
        }

    def train(self, spec: Any, log: Log) -> dict[str, torch.Tensor]:
        train = split_of(spec, spec.weights.train, "train")
        source = spec.data.source if spec.weights.train == "data" else spec.weights.train
        log(f"training {spec.architecture} {list(spec.options.hidden)} on {source} ({len(train)} records)")
        return train_mlp(train, spec.options.hidden, len(spec.labels), spec.weights.seed, spec.weights.epochs, log)

    def build_model(self, spec: Any) -> nn.Module:
        if not isinstance(spec.architecture, str):
            return spec.architecture.build(len(spec.labels))  # the user's module: it takes the raw features
        return TabularMLP(len(self.schema(spec)), spec.options.hidden, len(spec.labels))

    def example_input(self, spec: Any) -> torch.Tensor:
        schema = self.schema(spec)
        return torch.tensor([[(f.min + f.max) / 2 for f in schema]], dtype=torch.float32)

    def convert(self, model: nn.Module, spec: Any, log: Log) -> nn.Module:
        from servekit.build.convert import to_bf16

        if spec.precision == "int8":
            log("dynamic INT8 quantization of the hidden Linear layers (the first takes raw features: FP32)")
            torch.backends.quantized.engine = spec.quantization.backend
            return quantize_dynamic(model)
        if spec.precision == "bf16":
            return to_bf16(model)
        raise ValueError(f"precision: {spec.precision!r} is not a reduced precision of {self.handler}")

    def evaluation_data(self, spec: Any) -> Sized | None:
        return TabularEvaluation(split_of(spec, spec.evaluation, "holdout")) if spec.evaluation else None

    def evaluate(self, program: Callable[[torch.Tensor], Any], data: Any, spec: Any) -> float:
        return accuracy(program, data.inputs, data.labels)

    def drift_reference(self, program: Callable[[torch.Tensor], Any], data: Any, spec: Any) -> dict | None:
        from servekit.build.reference import classifier_reference

        return classifier_reference(program, data.inputs, spec.labels, f"{spec.data_source} holdout")

    def archive_files(self, spec: Any, directory: Path) -> None:
        super().archive_files(spec, directory)
        name = self.dataset(spec)
        source = spec.data.source if name == "data" else None
        document = features_document(split_of(spec, name, "train"), spec.options.range_tolerance, name, source)
        (directory / FEATURES_FILE).write_text(json.dumps(document, indent=1))


# ------------------------------------------------------------------------------------------ samples
def write_golden_records(directory: Path, per_class: int = 3, dataset: str = "breast_cancer") -> list[dict]:
    """The first ``per_class`` held-out records of each class as ``<class>_<n>.json`` and ``golden.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    holdout = DATASETS[dataset]("holdout")
    entries = []
    for index, label in enumerate(holdout.class_names):
        for n, row in enumerate(np.flatnonzero(holdout.y == index)[:per_class]):
            record = {name: float(value) for name, value in zip(holdout.feature_names, holdout.x[row], strict=True)}
            name = f"{label}_{n}.json"
            (directory / name).write_text(json.dumps(record, indent=1) + "\n")
            entries.append({"file": name, "label": label})
    (directory / "golden.json").write_text(json.dumps(entries, indent=1) + "\n")
    return entries
