"""The declarative model spec (``models.yaml``), parsed once into frozen, validated dataclasses.

Layout::

    models:
      digits:                      # model name (TorchServe's model name)
        architecture: digits_cnn   # see servekit.build.architectures.ARCHITECTURES
        handler: image_classifier  # the task: servekit.build.tasks.TASKS (image_classifier,
                                   # tabular_classifier, object_detector)
        labels: ["0", "1", ...]    # or labels_file: path/to/labels.json (a JSON list); with
                                   # weights.torchvision, the weights' own categories by default
        topk: 3
        preprocessing: {...}       # handlers.transforms.Preprocessing
        limits: {...}              # handlers.image_io.DecodeLimits
        protocol: {...}            # handlers.protocols.ProtocolConfig: OIP/KServe tensor names
        faults: {error_rate: 0.3}  # handlers.config.Faults: injected errors/delay, drills and tests only
        explain: {max_steps: 64}   # handlers.config.ExplainConfig: the explanations' limits (docs/explanations.md)
        monitoring: {...}          # Monitoring below: SLO, drift thresholds, sampled prediction log
        serving: {...}             # Serving below: TorchServe's batch and worker settings
        rollout: {...}             # servekit rollout's steps and thresholds (model level only, read at
                                   # rollout time, not part of any archive): servekit.deploy.rollout.settings
        evaluation: digits         # data set for measured accuracy (servekit.build.datasets): an INT8 or
                                   # BF16 version without one is refused unless it says allow_ungated: true
        versions:
          "1.0": {precision: fp32, weights: {train: digits}}
          "2.0": {precision: int8, weights: {train: digits}, quantization: {calibration: digits}}

``topk``, ``preprocessing`` and ``limits`` are the image classifier's; every task names the keys
only it takes and its own section (``tabular:`` for ``tabular_classifier``: hidden widths, range
tolerance, records per request), parses ``protocol:`` into its own config, and says which
architectures and data sets it knows (``servekit.build.tasks``). A version inherits every
model-level key and may override any of them. Every error names the model, the version and the
field, and says what would be valid.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from handlers.config import RUNTIME_PRECISIONS, RUNTIMES, ExplainConfig, Faults
from handlers.image_io import DecodeLimits
from handlers.metrics import PredictionLogConfig
from handlers.preprocessing import Preprocessing
from handlers.protocols import ProtocolConfig
from servekit.deploy.rollout.settings import model_rollout
from servekit.errors import SpecError
from servekit.fields import check_keys, positive_int
from servekit.serving.store import (  # one definition of names and versions ("\Z", not "$")
    NAME_RE,
    VERSION_RE,
    archive_name,
)

PRECISIONS = ("fp32", "int8", "bf16")


def _known(datasets: dict) -> str:
    """The data set names a field may take, and how to add the user's own."""
    names = ", ".join(sorted(datasets)) or "none"
    return names if "data" in datasets else f"{names}; or data, with a data: section of your own"


# Keys every task takes; each task adds its own (``servekit.build.tasks.Task.spec_keys``).
COMMON_KEYS = {
    "architecture",
    "handler",
    "precision",
    "weights",
    "labels",
    "labels_file",
    "protocol",
    "serving",
    "evaluation",
    "allow_ungated",
    "quantization",
    "bf16",
    "description",
    "golden_set",
    "faults",
    "explain",
    "monitoring",
    "data",
    "program",
    "options",
    "runtime",
}


def version_keys() -> set[str]:
    """The keys a version may set: the common ones and every task's own (checked per task on resolve)."""
    from servekit.build.tasks import task_keys

    return COMMON_KEYS | task_keys()


def model_keys() -> set[str]:
    """A model's keys: a version's, plus ``versions`` and ``rollout``.

    ``rollout`` is model-level only and never reaches a ModelVersionSpec: changing a threshold must not
    change the archives' fingerprints (``servekit.deploy.rollout.rollout_settings`` reads it when a rollout
    starts; it is validated here with the rest by ``model_rollout`` from there).
    """
    return version_keys() | {"versions", "rollout"}


@dataclass(frozen=True)
class Serving:
    """TorchServe settings for one version, written into the archive's model-config.yaml."""

    batch_size: int = 1
    # How long a worker that took a request from an empty queue waits for company. Under load batches fill
    # from the queue anyway; a longer wait makes the few clients of a moderate load arrive as one batch on
    # one worker while the other workers idle (docs/performance.md, "A longer batch delay makes a moderate
    # load one batch").
    max_batch_delay_ms: int = 1
    min_workers: int = 1
    max_workers: int = 1
    response_timeout_s: int = 60
    startup_timeout_s: int = 120
    job_queue_size: int | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        positive_int("batch_size", self.batch_size)
        positive_int("max_batch_delay_ms", self.max_batch_delay_ms, 0)
        positive_int("min_workers", self.min_workers, 0)
        positive_int("max_workers", self.max_workers)
        if self.max_workers < self.min_workers:
            raise ValueError(f"max_workers: must be >= min_workers ({self.min_workers}), got {self.max_workers}")
        positive_int("response_timeout_s", self.response_timeout_s)
        positive_int("startup_timeout_s", self.startup_timeout_s)
        if self.job_queue_size is not None:
            positive_int("job_queue_size", self.job_queue_size)
        if self.threads is not None:
            positive_int("threads", self.threads)

    @classmethod
    def from_dict(cls, data: dict | None) -> Serving:
        data = data or {}
        check_keys(data, {f.name for f in fields(cls)}, "serving")
        return cls(**data)

    def model_config(self) -> dict:
        """TorchServe's frontend keys for model-config.yaml."""
        config = {
            "minWorkers": self.min_workers,
            "maxWorkers": self.max_workers,
            "batchSize": self.batch_size,
            "maxBatchDelay": self.max_batch_delay_ms,
            "responseTimeout": self.response_timeout_s,
            "startupTimeout": self.startup_timeout_s,
            "deviceType": "cpu",
        }
        if self.job_queue_size is not None:
            config["jobQueueSize"] = self.job_queue_size
        return config


@dataclass(frozen=True)
class Monitoring:
    """What the alert rules and ``servekit drift`` hold a version to (``docs/monitoring.md``).

    ``slo_p99_ms``: the handler's p99 latency objective; ``drift_threshold``: the population
    stability index at which the live top-1 class mix counts as drift against the archive's
    reference; ``drift_min_samples``: live inputs needed before any drift verdict;
    ``prediction_log``: ``handlers.metrics.PredictionLogConfig`` (absent: off). The exporter
    publishes the first three as gauges read from the archive's ``metadata.json``.
    """

    slo_p99_ms: float = 250.0
    drift_threshold: float = 0.25
    drift_min_samples: int = 100
    prediction_log: PredictionLogConfig | None = None

    def __post_init__(self) -> None:
        for name in ("slo_p99_ms", "drift_threshold"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < 1e6:
                raise ValueError(f"{name}: must be a number > 0, got {value!r}")
        positive_int("drift_min_samples", self.drift_min_samples)

    @classmethod
    def from_dict(cls, data: dict | None) -> Monitoring:
        if data is not None and not isinstance(data, dict):
            raise ValueError(f"must be a mapping (slo_p99_ms, drift_threshold, drift_min_samples, prediction_log), "
                             f"got {data!r}")  # fmt: skip
        data = dict(data or {})
        check_keys(data, {f.name for f in fields(cls)}, "monitoring")
        if data.get("prediction_log") is not None:
            data["prediction_log"] = PredictionLogConfig.from_dict(data["prediction_log"])
        return cls(**data)

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.prediction_log is None:
            data.pop("prediction_log")
        return data


@dataclass(frozen=True)
class Weights:
    """Where the weights come from: exactly one of ``train``, ``file`` or ``torchvision``."""

    train: str | None = None
    file: str | None = None
    torchvision: str | None = None
    sha256: str | None = None
    seed: int = 0
    epochs: int = 40

    @classmethod
    def from_dict(cls, data: Any, base_dir: Path) -> Weights:
        if not isinstance(data, dict):
            raise ValueError("weights: must be a mapping such as {file: weights.pt} or {train: digits}")
        check_keys(data, {f.name for f in fields(cls)}, "weights")
        weights = cls(**data)
        sources = [name for name in ("train", "file", "torchvision") if getattr(weights, name)]
        if len(sources) != 1:
            raise ValueError(f"weights: give exactly one of train, file, torchvision (got {sources or 'none'})")
        if weights.file:
            path = (base_dir / weights.file).resolve()
            if not path.is_file():
                raise ValueError(f"weights.file: weights file not found: {path}")
            weights = cls(**{**asdict(weights), "file": str(path)})
        if weights.sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", str(weights.sha256)):
            raise ValueError(f"weights.sha256: must be 64 lowercase hex digits, got {weights.sha256!r}")
        positive_int("weights.epochs", weights.epochs)
        return weights


def _check_drops(section: str, max_top1_drop: Any, max_drop: Any) -> None:
    if not isinstance(max_top1_drop, int | float) or max_top1_drop < 0:
        raise ValueError(f"{section}.max_top1_drop: must be a number >= 0, got {max_top1_drop!r}")
    if max_drop is not None and (not isinstance(max_drop, int | float) or isinstance(max_drop, bool) or max_drop < 0):
        raise ValueError(f"{section}.max_drop: must be a number >= 0, got {max_drop!r}")


def _one_drop(data: dict, section: str) -> None:
    if "max_drop" in data and "max_top1_drop" in data:
        raise ValueError(f"{section}.max_drop: give max_drop or max_top1_drop (its older name), not both")


@dataclass(frozen=True)
class Quantization:
    """INT8 quantization and its accuracy gate (how a task quantizes is its own: ``Task.convert``).

    The gate: ``max_drop`` points of the task's held-out metric below FP32 (top-1 for images,
    accuracy for tabular models, mAP@0.5 for detectors); ``max_top1_drop`` is its older name and
    counts when ``max_drop`` is not given. ``calibration`` and ``calibration_images`` only for tasks
    that calibrate (static quantization).
    """

    calibration: str = "synthetic"
    calibration_images: int = 256
    backend: Literal["x86", "fbgemm", "qnnpack"] = "x86"
    max_top1_drop: float = 1.0
    max_drop: float | None = None

    @property
    def allowed_drop(self) -> float:
        return self.max_drop if self.max_drop is not None else self.max_top1_drop

    @classmethod
    def from_dict(cls, data: dict | None) -> Quantization:
        data = data or {}
        check_keys(data, {f.name for f in fields(cls)}, "quantization")
        _one_drop(data, "quantization")
        q = cls(**data)
        positive_int("quantization.calibration_images", q.calibration_images)
        if q.backend not in ("x86", "fbgemm", "qnnpack"):
            raise ValueError(f"quantization.backend: must be x86, fbgemm or qnnpack, got {q.backend!r}")
        _check_drops("quantization", q.max_top1_drop, q.max_drop)
        return q


@dataclass(frozen=True)
class Bf16:
    """BF16 weights and activations (CPUs with native BF16 only) and the accuracy gate against FP32."""

    max_top1_drop: float = 1.0
    max_drop: float | None = None

    def __post_init__(self) -> None:
        _check_drops("bf16", self.max_top1_drop, self.max_drop)

    @property
    def allowed_drop(self) -> float:
        return self.max_drop if self.max_drop is not None else self.max_top1_drop

    @classmethod
    def from_dict(cls, data: dict | None) -> Bf16:
        data = data or {}
        check_keys(data, {f.name for f in fields(cls)}, "bf16")
        _one_drop(data, "bf16")
        return cls(**data)


@dataclass(frozen=True)
class Runtime:
    """``runtime:``: the engine the version's program runs in (handlers.runtimes), and its accuracy gate.

    ``runtime: openvino`` or ``runtime: {engine: openvino, max_drop: 0.5}``. The archive carries the
    FP32 module as ONNX; the build measures the runtime's answers on the held-out split against the
    FP32 torch program: at most ``max_drop`` points below it (an FP32 version; a BF16 or INT8 one keeps
    the ``bf16`` or ``quantization`` section's gate). OpenVINO computes FP32, BF16 (its inference hint)
    and INT8 (a QDQ graph calibrated as ``quantization:`` says); ONNX Runtime computes FP32.
    """

    engine: str
    max_drop: float = 0.5

    @classmethod
    def from_dict(cls, data: Any) -> Runtime:
        if isinstance(data, str):
            data = {"engine": data}
        if not isinstance(data, dict):
            raise ValueError(f"must be an engine name ({', '.join(RUNTIMES)}) or a mapping with engine, got {data!r}")
        check_keys(data, {f.name for f in fields(cls)}, "runtime")
        if "engine" not in data:
            raise ValueError(f"engine: is required (one of {', '.join(RUNTIMES)})")
        runtime = cls(**data)
        if runtime.engine not in RUNTIMES:
            raise ValueError(f"engine: must be one of {list(RUNTIMES)}, got {runtime.engine!r}")
        _check_drops("runtime", 0, runtime.max_drop)
        return runtime


@dataclass(frozen=True)
class GoldenItem:
    """One golden-set input: a file and the label the model must give it before promotion."""

    name: str
    label: str
    sha256: str
    path: str = field(compare=False)
    content: bytes | None = field(default=None, compare=False, repr=False)  # golden_set: auto, written at packaging


def _read_json_file(base_dir: Path, value: Any, field_name: str, what: str, fail) -> tuple[Path, Any]:
    """Resolve ``value`` against the spec's folder and parse it as JSON; errors name ``field_name``."""
    path = (base_dir / str(value)).resolve()
    if not path.is_file():
        raise fail(field_name, f"{what} not found: {path}")
    try:
        return path, json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise fail(field_name, f"{path} is not valid JSON: {exc}") from exc


def _golden_set(
    value: Any, base_dir: Path, labels: tuple[str, ...], fail, task: Any, data: Any = None
) -> tuple[GoldenItem, ...]:
    """``golden_set: path/to/golden.json``, a JSON list of ``{"file": ..., "label": ...}``; each label
    one the task's answers can carry (``Task.golden_label_error``: a class, or a detector's page reading).
    ``golden_set: auto``: a few held-out inputs per class of the user's ``data`` (``Task.golden_from_data``)."""
    if value is None:
        return ()
    if value == "auto":
        if data is None:
            raise fail("golden_set", "auto picks held-out inputs of the user's data: it needs a data: section")
        return tuple(GoldenItem(name, label, hashlib.sha256(content).hexdigest(), "", content)
                     for name, label, content in task.golden_from_data(data))  # fmt: skip
    path, entries = _read_json_file(base_dir, value, "golden_set", "golden set file", fail)
    if not isinstance(entries, list) or not entries:
        raise fail("golden_set", f"{path} must be a non-empty JSON list of {{file, label}}")
    items = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != {"file", "label"}:
            raise fail("golden_set", f'entry {i} of {path} must be {{"file": ..., "label": ...}}')
        file = (path.parent / str(entry["file"])).resolve()
        if not file.is_file():
            raise fail("golden_set", f"entry {i}: file not found: {file}")
        error = task.golden_label_error(str(entry["label"]), labels)
        if error is not None:
            raise fail("golden_set", f"entry {i}: {error}")
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        items.append(GoldenItem(file.name, str(entry["label"]), digest, str(file)))
    if len({item.name for item in items}) != len(items):
        raise fail("golden_set", f"{path}: file names must be unique")
    return tuple(items)


@dataclass(frozen=True)
class ModelVersionSpec:
    """One model version, fully resolved: everything needed to build its archive."""

    name: str
    version: str
    architecture: str
    handler: str
    precision: str
    weights: Weights
    labels: tuple[str, ...]
    topk: int
    preprocessing: Preprocessing
    limits: DecodeLimits
    serving: Serving
    evaluation: str | None = None
    quantization: Quantization | None = None
    bf16: Bf16 | None = None
    description: str = ""
    golden_set: tuple[GoldenItem, ...] = ()
    protocol: Any = field(default_factory=ProtocolConfig)  # the task's protocol config (``Task.parse_protocol``)
    faults: Faults | None = None
    explain: ExplainConfig | None = None  # the explanations' limits (handlers.config.ExplainConfig); None: defaults
    monitoring: Monitoring = field(default_factory=Monitoring)
    options: Any = None  # the task's own section (``Task.options_key``), parsed; None for tasks without one
    allow_ungated: bool = False  # a reduced-precision version built with no evaluation data, on purpose
    data: Any = None  # the user's data (servekit.build.user_data: ImageFolder, CsvTable), named "data"
    program: Any = None  # the user's finished program (servekit.build.user_model.UserProgram)
    custom: Any = None  # the user's handler, and task (servekit.build.user_handler.UserHandler)
    runtime: Runtime | None = None  # None: torch (TorchScript); else OpenVINO or ONNX Runtime (handlers.runtimes)
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def task(self) -> Any:
        """The ``servekit.build.tasks.Task`` of this version's ``handler``."""
        from servekit.build.tasks import task_for

        if self.custom is not None and self.custom.task is not None:
            return self.custom.task.instance()
        return task_for(self.handler)

    @property
    def max_drop(self) -> float | None:
        """The accuracy gate of a reduced-precision version against its FP32 sibling, in points of the
        task's metric (None for FP32)."""
        gate = self.quantization or self.bf16
        if gate is not None:
            return gate.allowed_drop
        return self.runtime.max_drop if self.runtime is not None else None

    @property
    def max_top1_drop(self) -> float | None:
        """``max_drop`` by its older name (the image classifier's metric is top-1)."""
        return self.max_drop

    @property
    def engine(self) -> str:
        """The runtime the program runs in: torch, openvino or onnxruntime."""
        return self.runtime.engine if self.runtime is not None else "torch"

    @property
    def program_file(self) -> str:
        """The archive's program: TorchScript ``model.pt``, or ``model.onnx`` for another runtime."""
        return "model.pt" if self.runtime is None else "model.onnx"

    @property
    def gated(self) -> bool:
        """Whether the build measures this version against its FP32 torch program: reduced precision or
        another runtime (and, for the same reason, whether explanations need an FP32 reference)."""
        return self.precision != "fp32" or self.runtime is not None

    @property
    def served_as(self) -> str:
        """How logs and errors name what serves: ``INT8``, or ``FP32 on openvino``."""
        return self.precision.upper() + (f" on {self.engine}" if self.runtime is not None else "")

    @property
    def ungated(self) -> bool:
        """A gated version (reduced precision or another runtime) built with no evaluation data (``allow_ungated``)."""
        return self.gated and self.evaluation is None

    @property
    def architecture_key(self) -> str | dict:
        """The architecture as JSON: a built-in name, or the user's module / torchvision builder / program."""
        if self.program is not None:
            return self.program.to_dict()
        return self.architecture if isinstance(self.architecture, str) else self.architecture.to_dict()

    @property
    def data_source(self) -> str | None:
        """What ``evaluation`` names, in words (the user's folder or CSV for ``data``)."""
        if self.evaluation == "data" and self.data is not None:
            return self.data.source
        return self.evaluation

    @property
    def archive_name(self) -> str:
        return archive_name(self.name, self.version)

    @property
    def handler_file(self) -> str:
        """The archive's entry point: the user's handler file, or the task's in this repository."""
        if self.custom is not None:
            return self.custom.file
        return str(Path(__file__).resolve().parents[2] / self.task.handler_file)

    @property
    def handler_options(self) -> dict:
        """The user handler's ``options`` (``self.options`` in the worker)."""
        return dict(self.custom.options) if self.custom is not None else {}

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("extra")
        if self.bf16 is None:
            data.pop("bf16")  # absent, not null: fingerprints of fp32/int8 versions stay as they were
        if self.faults is None:
            data.pop("faults")  # likewise for every version without injected faults
        if self.explain is None:
            data.pop("explain")  # likewise for every version with the default explanation limits
        for gate in ("quantization", "bf16"):
            if data.get(gate) is not None and data[gate]["max_drop"] is None:
                data[gate].pop("max_drop")  # likewise for every gate given by its older name
        if self.runtime is None:
            data.pop("runtime")  # absent, not null: fingerprints of torch versions stay as they were
        if not self.allow_ungated:
            data.pop("allow_ungated")  # absent unless given: fingerprints of gated versions stay as they were
        # The user's data, module and program by content (absent when not given: fingerprints stay as they were).
        for key in ("data", "program", "custom"):
            data.pop(key)
            if getattr(self, key) is not None:
                data[key] = getattr(self, key).to_dict()
        if not isinstance(self.architecture, str):
            data["architecture"] = self.architecture.to_dict()
        data.pop("options")
        if self.options is not None:
            data["options"] = self.options.to_dict()
        data["preprocessing"] = self.preprocessing.to_dict()
        data["protocol"] = self.protocol.to_dict()
        data["monitoring"] = self.monitoring.to_dict()
        data["labels"] = list(self.labels)
        # Content, not location: the fingerprint must not change when the checkout moves.
        if self.weights.file:
            data["weights"]["file"] = Path(self.weights.file).name
        data["golden_set"] = [{"name": g.name, "label": g.label, "sha256": g.sha256} for g in self.golden_set]
        return data

    def spec_hash(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def handler_config(self) -> Any:
        """The ``handler:`` section of model-config.yaml, read back by the worker (its handler's ``config_type``)."""
        return self.task.handler_config(self)

    def oip_metadata(self, versions: list[str] | None = None) -> dict:
        """What ``GET /v2/models/NAME`` answers for this version (``versions``: those registered)."""
        return {
            "name": self.name,
            "versions": versions if versions is not None else [self.version],
            **self.task.oip_metadata(self),
        }


def _torchvision_categories(weights_name: str) -> list[str] | None:
    """Class names shipped in torchvision's code with its named weights (no download needed)."""
    import torchvision

    try:
        return list(torchvision.models.get_weight(weights_name).meta["categories"])
    except (ValueError, KeyError, AttributeError):
        return None


def _torchvision_preprocessing(weights_name: str) -> dict | None:
    """The resize, crop, mean and std that torchvision's named weights were evaluated with."""
    import torchvision

    try:
        transforms = torchvision.models.get_weight(weights_name).transforms()
    except (ValueError, KeyError, AttributeError):
        return None
    return {
        "color_mode": "RGB",
        "resize": int(transforms.resize_size[0]),
        "crop": int(transforms.crop_size[0]),
        "mean": list(transforms.mean),
        "std": list(transforms.std),
    }


def _check_version_string(name: str, version: Any) -> str:
    if not isinstance(version, str):
        hint = " (quote it in YAML: '1.0', or YAML reads it as a number)" if isinstance(version, int | float) else ""
        raise SpecError(f"version must be a string like '1.0', got {version!r}{hint}", name, str(version), "version")
    if not VERSION_RE.match(version):
        raise SpecError(
            f"bad version string {version!r}: use 1 to 3 dot-separated numbers of at most 9 digits, "
            "e.g. '1.0' or '2.1.3'",
            name,
            version,
            "version",
        )
    return version


def _merged_settings(name: str, version: str, model: dict, override: Any) -> dict:
    """The model's settings with the version's on top: sections merge key by key, except weights."""
    if override is None:
        override = {}
    if not isinstance(override, dict):
        raise SpecError("must be a mapping of settings", name, version)
    merged = {k: v for k, v in model.items() if k != "versions"}
    for key, value in override.items():
        if key not in version_keys():
            raise SpecError(f"unknown key (valid keys: {', '.join(sorted(version_keys()))})", name, version, key)
        # A version names its own weights source outright: merging would mix two sources.
        if key != "weights" and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


@dataclass
class _VersionResolver:
    """Turns one version's merged settings into a ``ModelVersionSpec``; every error names the field."""

    name: str
    version: str
    merged: dict
    base_dir: Path
    custom: Any = None  # the user's handler (servekit.build.user_handler.UserHandler), once checked

    def fail(self, field_name: str, message: str) -> SpecError:
        return SpecError(message, self.name, self.version, field_name)

    def nested(self, section: str, build):
        """``build()`` a nested dataclass; its ValueError/TypeError becomes a SpecError on ``section.field``."""
        try:
            return build()
        except (ValueError, TypeError) as exc:
            message = str(exc)
            # Messages of the nested dataclasses start with their own field name.
            head, sep, tail = message.partition(": ")
            if sep and " " not in head:
                head = head if head.startswith(section) else f"{section}.{head}"
                raise self.fail(head, tail) from exc
            raise self.fail(section, message) from exc

    def check_required(self) -> Any:
        """The required keys, the handler (-> its task), the task's keys and architecture; returns the task."""
        from servekit.build.tasks import TASKS, task_for, task_keys

        merged = self.merged
        program = "program" in merged
        for required in ("handler", "precision") if program else ("architecture", "handler", "precision", "weights"):
            if required not in merged:
                raise self.fail(required, "is required")
        if isinstance(merged["handler"], dict):
            task = self.custom_handler()
        elif merged["handler"] not in TASKS:
            raise self.fail("handler", f"unknown handler {merged['handler']!r} (known: {sorted(TASKS)}, or your own "
                            "{file: my_handler.py, class: MyHandler})")  # fmt: skip
        else:
            task = task_for(merged["handler"])
        if "options" in merged and task.options_key != "options":
            raise self.fail("options", f"applies to a task of your own (handler: {{task: {{file, class}}}}); "
                            f"handler {task.handler} takes {task.options_key or 'no section'}")  # fmt: skip
        for key in sorted(set(merged) & (task_keys() - task.spec_keys)):
            own = ", ".join(sorted(task.spec_keys)) or "none"
            raise self.fail(key, f"does not apply to handler {task.handler} (its own keys: {own})")
        if merged["precision"] not in PRECISIONS:
            raise self.fail("precision", f"must be one of {list(PRECISIONS)}, got {merged['precision']!r}")
        return task

    def custom_handler(self) -> Any:
        """``handler: {file, class, task, options}`` (``servekit.build.user_handler``); returns its task."""
        from servekit.build.tasks import task_for
        from servekit.build.user_handler import parse_handler
        from servekit.build.user_model import ModelSourceError

        try:
            self.custom = parse_handler(self.merged["handler"], self.base_dir)
            return self.custom.task.instance() if self.custom.task is not None else task_for(self.custom.task_name)
        except ModelSourceError as exc:
            head, _, tail = str(exc).partition(": ")
            raise self.fail(head, tail) from None

    def architecture(self, task: Any) -> Any:
        """A built-in name, or the user's own (``servekit.build.user_model``): a module file or torchvision builder."""
        from servekit.build.user_model import ModelSourceError, parse_architecture

        value = self.merged["architecture"]
        if isinstance(value, dict):
            kind = "torchvision" if "torchvision" in value else "file"
            if kind not in task.user_models:
                offered = " or ".join(sorted(task.user_models & {"file", "torchvision"})) or "none"
                raise self.fail("architecture", f"handler {task.handler} takes a built-in architecture "
                                f"{sorted(task.architectures())} (user models: {offered}), got {value!r}")  # fmt: skip
            try:
                return parse_architecture(value, self.base_dir)
            except ModelSourceError as exc:
                head, _, tail = str(exc).partition(": ")
                raise self.fail(head, tail) from None
        if not isinstance(value, str) or value not in task.architectures():
            known = sorted(task.architectures())
            files = " or {file: net.py, class: Net}" if "file" in task.user_models else ""
            tv = " or {torchvision: NAME}" if "torchvision" in task.user_models else ""
            raise self.fail("architecture", f"unknown architecture {value!r} (known: {known}{files}{tv})")
        return value

    def program(self, task: Any) -> Any:
        """``program: {file}``: the user's finished program, FP32, instead of architecture and weights."""
        from servekit.build.user_model import ModelSourceError, parse_program

        merged = self.merged
        if "program" not in task.user_models:
            raise self.fail("program", f"handler {task.handler} does not take a finished program")
        for key in ("architecture", "weights"):
            if key in merged:
                raise self.fail(key, "give program, or architecture and weights, not both")
        if merged["precision"] != "fp32":
            raise self.fail("precision", f"a program is served as given, in FP32; {merged['precision']} needs the "
                            "nn.Module (architecture: {file, class} with weights: {file})")  # fmt: skip
        try:
            return parse_program(merged["program"], self.base_dir)
        except ModelSourceError as exc:
            head, _, tail = str(exc).partition(": ")
            raise self.fail(head, tail) from None

    def data(self, task: Any) -> Any:
        """The user's ``data:`` (an image folder or a CSV), checked against the spec's labels when it gives them."""
        from servekit.build.user_data import DataError, parse_data

        if "data" not in self.merged:
            return None
        labels = None
        if "labels" in self.merged or "labels_file" in self.merged:
            labels = self.labels(Weights(train="data"))  # the spec's own labels, checked: the data must fit them
        try:
            return parse_data(self.merged["data"], self.base_dir, task.data_kinds, task.handler, labels)
        except DataError as exc:
            head, _, tail = str(exc).partition(": ")
            raise self.fail(head, tail) from None

    def defaults_from_data(self, task: Any) -> None:
        """With the user's data: it is the evaluation and INT8 calibration data, unless the spec names others."""
        merged = self.merged
        merged.setdefault("evaluation", "data")
        if merged["precision"] == "int8" and task.calibrated:
            quantization = merged.get("quantization") or {}
            if isinstance(quantization, dict) and "calibration" not in quantization:
                merged["quantization"] = {**quantization, "calibration": "data"}

    def labels(self, weights: Weights, data: Any = None) -> tuple[str, ...]:
        merged = self.merged
        if "labels" in merged and "labels_file" in merged:
            raise self.fail("labels", "give labels or labels_file, not both")
        if "labels_file" in merged:
            _, labels = _read_json_file(self.base_dir, merged["labels_file"], "labels_file", "labels file", self.fail)
        elif "labels" in merged:
            labels = merged["labels"]
        elif data is not None:
            labels = list(data.labels)
        elif weights.torchvision:
            labels = _torchvision_categories(weights.torchvision)
            if labels is None:
                raise self.fail("weights.torchvision", f"unknown torchvision weights {weights.torchvision!r}")
        else:
            raise self.fail("labels", "is required (a list of class names, or labels_file)")
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str | int) for x in labels):
            raise self.fail("labels", "must be a non-empty list of class names")
        return tuple(str(x) for x in labels)

    def topk(self, labels: tuple[str, ...]) -> int:
        topk = self.merged.get("topk", min(5, len(labels)))
        if not isinstance(topk, int) or isinstance(topk, bool) or not 1 <= topk <= len(labels):
            raise self.fail(
                "topk", f"must be an integer between 1 and {len(labels)} (the number of labels), got {topk!r}"
            )
        return topk

    def evaluation(self, datasets: dict) -> str | None:
        evaluation = self.merged.get("evaluation")
        if evaluation is not None and evaluation not in datasets:
            raise self.fail("evaluation", f"unknown data set {evaluation!r} (known: {_known(datasets)})")
        return evaluation

    def allow_ungated(self, evaluation: str | None, datasets: dict) -> bool:
        """``allow_ungated``; a reduced-precision version without evaluation data needs it said."""
        allow = self.merged.get("allow_ungated", False)
        if not isinstance(allow, bool):
            raise self.fail("allow_ungated", f"must be true or false, got {allow!r}")
        precision = self.merged["precision"]
        engine = self.merged.get("runtime")
        if (precision != "fp32" or engine is not None) and evaluation is None and not allow:
            known = _known(datasets)
            what = f"precision {precision}" if precision != "fp32" else "runtime"
            raise self.fail(
                "evaluation",
                f"{what} needs evaluation data: its accuracy gate against FP32 is measured on it "
                f"(known data sets: {known}); or set allow_ungated: true to build it without any gate",
            )
        return allow

    def quantization(self, datasets: dict, calibrated: bool = True) -> Quantization | None:
        merged = self.merged
        if merged["precision"] != "int8":
            if "quantization" in merged:
                raise self.fail("quantization", "only applies to precision int8")
            return None
        quantization = self.nested("quantization", lambda: Quantization.from_dict(merged.get("quantization")))
        given = sorted({"calibration", "calibration_images"} & set(merged.get("quantization") or {}))
        if not calibrated and given:
            raise self.fail(f"quantization.{given[0]}", f"handler {merged['handler']} quantizes dynamically: "
                            "no calibration")  # fmt: skip
        if quantization.calibration != "synthetic" and quantization.calibration not in datasets:
            raise self.fail(
                "quantization.calibration",
                f"unknown data set {quantization.calibration!r} (known: synthetic, {_known(datasets)})",
            )
        return quantization

    def bf16(self) -> Bf16 | None:
        if self.merged["precision"] != "bf16":
            if "bf16" in self.merged:
                raise self.fail("bf16", "only applies to precision bf16")
            return None
        return self.nested("bf16", lambda: Bf16.from_dict(self.merged.get("bf16")))

    def runtime(self, task: Any) -> Runtime | None:
        """``runtime:``, checked against the task (a tensor-to-tensor program) and the precision."""
        if "runtime" not in self.merged:
            return None
        runtime = self.nested("runtime", lambda: Runtime.from_dict(self.merged["runtime"]))
        if runtime.engine == "torch":
            return None  # the default, said out loud
        if runtime.engine not in task.runtimes:
            raise self.fail("runtime", f"handler {task.handler} serves its program in torch only")
        if "program" in self.merged:
            raise self.fail("runtime", "a program is served as given, in torch; give the nn.Module (architecture: "
                            f"{{file, class}} with weights: {{file}}) to serve it in {runtime.engine}")  # fmt: skip
        precision = self.merged["precision"]
        if precision not in RUNTIME_PRECISIONS[runtime.engine]:
            allowed = ", ".join(RUNTIME_PRECISIONS[runtime.engine])
            raise self.fail("runtime", f"{runtime.engine} serves precision {allowed}, not {precision}")
        if precision == "int8" and not task.calibrated:
            raise self.fail("runtime", f"handler {task.handler} quantizes dynamically, in torch; static INT8 in "
                            f"{runtime.engine} needs calibration inputs (an image classifier)")  # fmt: skip
        return runtime

    def resolve(self) -> ModelVersionSpec:
        task = self.check_required()
        merged = self.merged
        program = self.program(task) if "program" in merged else None
        architecture = self.architecture(task) if program is None else "program"
        data = self.data(task)
        datasets = dict.fromkeys(task.datasets())
        if data is not None:
            datasets["data"] = data
            self.defaults_from_data(task)
        if program is not None:
            weights = Weights(file=program.file)  # the program is its own weights: fingerprinted by content
        else:
            weights = self.nested("weights", lambda: Weights.from_dict(merged["weights"], self.base_dir))
        if weights.train is not None and weights.train not in datasets:
            raise self.fail("weights.train", f"unknown data set {weights.train!r} (known: {_known(datasets)})")
        labels = self.labels(weights, data)
        if "preprocessing" not in merged and weights.torchvision:
            merged["preprocessing"] = _torchvision_preprocessing(weights.torchvision)
        evaluation = self.evaluation(datasets)
        quantization, bf16 = self.quantization(datasets, task.calibrated), self.bf16()
        options = None
        if task.options_key is not None:
            options = self.nested(task.options_key, lambda: task.parse_options(merged.get(task.options_key)))
        spec = ModelVersionSpec(
            name=self.name,
            version=self.version,
            architecture=architecture,
            handler=task.handler,
            precision=merged["precision"],
            weights=weights,
            labels=labels,
            topk=self.topk(labels),
            preprocessing=self.nested("preprocessing", lambda: Preprocessing.from_dict(merged.get("preprocessing"))),
            limits=self.nested("limits", lambda: DecodeLimits.from_dict(merged.get("limits"))),
            serving=self.nested("serving", lambda: Serving.from_dict(merged.get("serving"))),
            evaluation=evaluation,
            runtime=self.runtime(task),
            allow_ungated=self.allow_ungated(evaluation, datasets),  # after the gates' own sections are checked
            quantization=quantization,
            bf16=bf16,
            description=str(merged.get("description", "")),
            golden_set=_golden_set(merged.get("golden_set"), self.base_dir, labels, self.fail, task, data),
            protocol=self.nested("protocol", lambda: task.parse_protocol(merged.get("protocol"))),
            faults=self.nested("faults", lambda: Faults.from_dict(merged["faults"])) if "faults" in merged else None,
            explain=self.nested("explain", lambda: ExplainConfig.from_dict(merged["explain"]))
            if "explain" in merged
            else None,
            monitoring=self.nested("monitoring", lambda: Monitoring.from_dict(merged.get("monitoring"))),
            options=options,
            data=data,
            program=program,
            custom=self.custom,
        )
        try:
            task.check(spec)
        except (ValueError, TypeError) as exc:
            head, sep, tail = str(exc).partition(": ")
            raise (self.fail(head, tail) if sep and " " not in head else self.fail("handler", str(exc))) from exc
        return spec


def _resolve_version(name: str, version: Any, model: dict, override: Any, base_dir: Path) -> ModelVersionSpec:
    version = _check_version_string(name, version)
    merged = _merged_settings(name, version, model, override)
    return _VersionResolver(name, version, merged, base_dir).resolve()


def parse_spec(data: Any, base_dir: Path) -> list[ModelVersionSpec]:
    """Validate a loaded spec document; returns every model x version, in spec order."""
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict) or not data["models"]:
        raise SpecError("the spec needs a non-empty 'models:' mapping at the top level")
    extra = sorted(set(data) - {"models"})
    if extra:
        raise SpecError(f"unknown top-level key {extra[0]!r} (valid: models)")
    specs = []
    for name, model in data["models"].items():
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise SpecError(
                "bad model name: use letters, digits, '_' or '-', starting with a letter", str(name), None, "name"
            )
        if not isinstance(model, dict):
            raise SpecError("must be a mapping of settings", name)
        valid = model_keys()
        for key in model:
            if key not in valid:
                raise SpecError(f"unknown key (valid keys: {', '.join(sorted(valid))})", name, None, key)
        if "rollout" in model:
            model_rollout(name, model["rollout"])  # checked with the rest; used only by servekit rollout
        versions = model.get("versions")
        if not isinstance(versions, dict) or not versions:
            raise SpecError("needs at least one entry under 'versions:'", name, None, "versions")
        for version, override in versions.items():
            specs.append(_resolve_version(name, version, model, override, base_dir))
    return specs


def load_spec(path: str | Path) -> list[ModelVersionSpec]:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path} is not UTF-8 text: {exc}") from exc
    except yaml.YAMLError as exc:
        # PyYAML's messages span several lines; errors are reported on one line.
        raise SpecError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from exc
    return parse_spec(data, path.parent.resolve())


def select(specs: list[ModelVersionSpec], model: str | None, version: str | None) -> list[ModelVersionSpec]:
    chosen = [s for s in specs if (model is None or s.name == model) and (version is None or s.version == version)]
    if not chosen:
        known = ", ".join(f"{s.name} {s.version}" for s in specs)
        raise SpecError(f"no model/version matches --model {model} --version {version} (known: {known})")
    return chosen
