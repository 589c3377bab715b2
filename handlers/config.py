"""The handler's configuration: one typed definition, written by the build and read by the worker.

Every task's handler config is a frozen dataclass on one base, ``RuntimeConfig``: the fields every
task shares (how the model is loaded and run, drills, the prediction log) are declared and validated
there once, and each task's subclass adds only its own. The build (``ModelVersionSpec.handler_config``)
writes ``config.to_dict()`` as the ``handler:`` section of the archive's ``model-config.yaml``; the
worker reads it back with the handler's ``config_type.from_dict``. Defaults live in the dataclasses
and nowhere else, and every value is validated on construction, so a bad archive fails at load with a
message naming the key.

The shared fields (``RuntimeConfig``)::

    handler:
      precision: fp32            # fp32 | int8 | bf16: only the model loader differs
      labels_file: labels.json   # a file name inside the archive
      threads: null              # pin torch threads; null = this worker's share of the CPU budget
      quantized_engine: x86      # INT8 kernels
      optimize: true             # FP32: oneDNN-prepacked convolutions at load
      faults: {error_rate: 0.3, delay_ms: 0, start_after: 20}   # drills and tests only (Faults); absent = none
      prediction_log: {sample_rate: 0.01, include_input: false}  # handlers.metrics.PredictionLogConfig; absent = off
      explain: {max_steps: 128, max_inputs: 4, timeout_s: 10, max_share: 0.25}   # ExplainConfig; absent = defaults

The image classifier's own (``ImageClassifierConfig``, also known as ``HandlerConfig``)::

      topk: 5                    # default k; a request may ask for another
      preprocessing: {...}       # handlers.transforms.Preprocessing
      limits: {...}              # handlers.image_io.DecodeLimits
      protocol: {...}            # handlers.protocols.ProtocolConfig: OIP / KServe tensor names

The tabular classifier's and the detector's are ``handlers.tabular.TabularConfig`` and
``handlers.detection.DetectorConfig``.

A handler of your own gets a config of its own the same way: subclass ``RuntimeConfig`` with your
fields (each with a default), validate them in ``__post_init__`` after ``super().__post_init__()``,
turn nested mappings into their objects in ``parse_sections`` if you have any, and name the class
as your handler's ``config_type``::

    @dataclass(frozen=True)
    class TextConfig(RuntimeConfig):
        max_chars: int = 2000

        def __post_init__(self) -> None:
            super().__post_init__()
            if not isinstance(self.max_chars, int) or self.max_chars < 1:
                raise ValueError(f"max_chars: must be a positive integer, got {self.max_chars!r}")

    class TextClassifier(BatchHandler):
        config_type = TextConfig      # self.settings is a TextConfig

``from_dict`` refuses unknown keys and parses ``faults`` and ``prediction_log``; ``to_dict`` writes
every field (nested objects through their ``to_dict``, or as plain dataclasses), leaving out
``faults`` and ``prediction_log`` when they are absent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, ClassVar, Self

from handlers.image_io import DecodeLimits
from handlers.metrics import PredictionLogConfig
from handlers.preprocessing import Preprocessing
from handlers.protocols import ProtocolConfig

PRECISIONS = ("fp32", "int8", "bf16")
QUANTIZED_ENGINES = ("x86", "fbgemm", "qnnpack")
MAX_FAULT_DELAY_MS = 5000


@dataclass(frozen=True)
class Faults:
    """Injected failures and delay, for rollout drills and tests only; never in a production version.

    ``error_rate`` (0..1): that share of inputs fails with ``handlers.errors.InjectedFault`` (503),
    deterministically: a per-worker counter fails input n when ``floor(n * rate)`` steps up, so 0.3
    fails exactly 3 inputs in every 10. ``start_after`` (0..1000000): the inputs a worker serves
    cleanly before the errors begin, so a drill version can pass its golden set and then fail live
    traffic, like a version that degrades under load. ``delay_ms`` (0..5000): a sleep before every batch.
    """

    error_rate: float = 0.0
    delay_ms: int = 0
    start_after: int = 0

    def __post_init__(self) -> None:
        rate = self.error_rate
        if not isinstance(rate, int | float) or isinstance(rate, bool) or not 0.0 <= rate <= 1.0:
            raise ValueError(f"faults.error_rate: must be a number from 0.0 to 1.0, got {rate!r}")
        delay = self.delay_ms
        if not isinstance(delay, int) or isinstance(delay, bool) or not 0 <= delay <= MAX_FAULT_DELAY_MS:
            raise ValueError(f"faults.delay_ms: must be a whole number from 0 to {MAX_FAULT_DELAY_MS}, got {delay!r}")
        start = self.start_after
        if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start <= 1_000_000:
            raise ValueError(f"faults.start_after: must be a whole number from 0 to 1000000, got {start!r}")

    @classmethod
    def from_dict(cls, data: Any) -> Faults:
        if not isinstance(data, dict):
            raise ValueError(f"faults: must be a mapping (error_rate, delay_ms, start_after), got {data!r}")
        unknown = sorted(set(data) - {"error_rate", "delay_ms", "start_after"})
        if unknown:
            raise ValueError(f"faults.{unknown[0]}: unknown key (valid keys: delay_ms, error_rate, start_after)")
        return cls(**data)

    def fails(self, n: int) -> bool:
        """Whether input number ``n`` (0, 1, 2, ... in this worker) is one of the injected failures."""
        n -= self.start_after
        return n >= 0 and int((n + 1) * self.error_rate) > int(n * self.error_rate)


@dataclass(frozen=True)
class ExplainConfig:
    """The limits of explanations (``POST /explanations/NAME``, KServe v1 ``:explain``; handlers.explain).

    ``steps``: Integrated Gradients steps when the request names none; ``max_steps``: the most a request
    (``X-Explain-Steps``) may ask for (beyond: 413); ``max_inputs``: inputs (images, records) one
    explanation request may carry (beyond: 413); ``timeout_s``: an explanation running longer is stopped
    (503); ``max_share`` (0..1]: explanations of a model may keep its workers busy for at most this share of
    the wall time, machine-wide, one at a time (beyond: 429 with the seconds to wait); ``grid``: an image's
    attributions are sum-pooled to at most ``grid`` x ``grid`` cells in the answer (sums are kept);
    ``reference``: an INT8 or BF16 archive carries its FP32 reference for explanations (false: it does not,
    the archive stays small and its explanations answer 501).
    """

    steps: int = 32
    max_steps: int = 128
    max_inputs: int = 4
    timeout_s: float = 10.0
    max_share: float = 0.25
    grid: int = 32
    reference: bool = True  # INT8/BF16 versions: pack the FP32 reference (false: a smaller archive, and 501)

    def __post_init__(self) -> None:
        for name in ("steps", "max_steps", "max_inputs", "grid"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 4096:
                raise ValueError(f"explain.{name}: must be an integer from 1 to 4096, got {value!r}")
        if self.steps > self.max_steps:
            raise ValueError(f"explain.steps ({self.steps}) must not exceed explain.max_steps ({self.max_steps})")
        timeout = self.timeout_s
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or not 0 < timeout <= 600:
            raise ValueError(f"explain.timeout_s: must be a number of seconds in (0, 600], got {timeout!r}")
        if not isinstance(self.reference, bool):
            raise ValueError(f"explain.reference: must be true or false, got {self.reference!r}")
        share = self.max_share
        if not isinstance(share, int | float) or isinstance(share, bool) or not 0 < share <= 1:
            raise ValueError(f"explain.max_share: must be a number in (0, 1], got {share!r}")

    @classmethod
    def from_dict(cls, data: Any) -> ExplainConfig:
        if not isinstance(data, dict):
            raise ValueError(f"explain: must be a mapping ({', '.join(f.name for f in fields(cls))}), got {data!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"explain.{unknown[0]}: unknown key (valid keys: {', '.join(sorted(known))})")
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")


# The engines a version's program may run in (handlers.runtimes), and the precisions each computes in.
RUNTIMES = ("torch", "openvino", "onnxruntime")
# What each runtime computes a precision in; a precision a runtime does not offer is refused at build.
RUNTIME_PRECISIONS = {"torch": ("fp32", "int8", "bf16"), "openvino": ("fp32", "bf16", "int8"), "onnxruntime": ("fp32",)}


def check_runtime(runtime: str, precision: str) -> None:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime: must be one of {list(RUNTIMES)}, got {runtime!r}")
    if precision not in RUNTIME_PRECISIONS[runtime]:
        raise ValueError(
            f"runtime: {runtime} serves precision {', '.join(RUNTIME_PRECISIONS[runtime])}, not {precision}"
        )


def check_runtime_fields(config: Any) -> None:
    """The checks of INT8 kernels, FP32 optimisation, drills and prediction log (``RuntimeConfig`` runs them)."""
    if config.quantized_engine not in QUANTIZED_ENGINES:
        raise ValueError(f"quantized_engine: must be one of {list(QUANTIZED_ENGINES)}, got {config.quantized_engine!r}")
    if not isinstance(config.optimize, bool):
        raise ValueError(f"optimize: must be true or false, got {config.optimize!r}")
    if config.faults is not None and not isinstance(config.faults, Faults):
        raise ValueError("faults must be a Faults object or None")
    if config.prediction_log is not None and not isinstance(config.prediction_log, PredictionLogConfig):
        raise ValueError("prediction_log must be a PredictionLogConfig object or None")
    if getattr(config, "explain", None) is not None and not isinstance(config.explain, ExplainConfig):
        raise ValueError("explain must be an ExplainConfig object or None")


def handler_section(cls: type, data: dict | None) -> dict:
    """``data`` as keyword arguments of ``cls``: unknown keys refused, the shared sub-sections parsed."""
    data = dict(data or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown key in the handler section (valid keys: {', '.join(sorted(known))})")
    if data.get("faults") is not None:
        data["faults"] = Faults.from_dict(data["faults"])
    if data.get("prediction_log") is not None:
        data["prediction_log"] = PredictionLogConfig.from_dict(data["prediction_log"])
    if data.get("explain") is not None:
        data["explain"] = ExplainConfig.from_dict(data["explain"])
    return data


def _plain(value: Any) -> Any:
    """A field's value as YAML writes it: nested objects through ``to_dict`` (or as dataclasses), tuples as lists."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# ------------------------------------------------------------------------------------------ the shared base
@dataclass(frozen=True)
class RuntimeConfig:
    """The fields every task's handler config shares, validated once (see the module docstring).

    Subclass it for a task: declare only the task's own fields (each with a default), check them in
    ``__post_init__`` after ``super().__post_init__()``, and parse their nested mappings in
    ``parse_sections``. ``from_dict`` and ``to_dict`` need no override.
    """

    precision: str = "fp32"
    labels_file: str = "labels.json"
    threads: int | None = None
    quantized_engine: str = "x86"
    optimize: bool = True
    faults: Faults | None = None
    prediction_log: PredictionLogConfig | None = None
    explain: ExplainConfig | None = None  # None: ExplainConfig's defaults (``explain_limits``)
    runtime: str = "torch"  # or openvino / onnxruntime: the engine of the archive's program (handlers.runtimes)

    # The most torch threads ``threads`` may pin; None: any positive number (a task may bound it).
    max_threads: ClassVar[int | None] = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.labels_file, str) or not self.labels_file or "/" in self.labels_file:
            raise ValueError(f"labels_file: must be a file name inside the archive, got {self.labels_file!r}")
        threads, limit = self.threads, self.max_threads
        if threads is not None:
            if limit is None:
                _positive_int("threads", threads)
            elif not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= limit:
                raise ValueError(f"threads: must be an integer from 1 to {limit}, got {threads!r}")
        check_runtime_fields(self)
        check_runtime(self.runtime, self.precision)

    @classmethod
    def from_dict(cls, data: dict | None) -> Self:
        """The ``handler:`` section (a mapping, or None for every default) -> this config, validated."""
        return cls(**cls.parse_sections(handler_section(cls, data)))

    @classmethod
    def parse_sections(cls, data: dict) -> dict:
        """Turn this task's nested mappings in ``data`` (the section's keys, checked) into their objects."""
        return data

    def to_dict(self) -> dict:
        """The ``handler:`` section the build writes: every field, ``faults`` and ``prediction_log`` only if set."""
        data = {f.name: _plain(getattr(self, f.name)) for f in fields(self)}
        if self.faults is None:
            data.pop("faults")  # absent, not null: the model-config.yaml of a normal version stays as it was
        if self.prediction_log is None:
            data.pop("prediction_log")
        if self.explain is None:
            data.pop("explain")  # the defaults: model-config.yaml stays as it was
        if self.runtime == "torch":
            data.pop("runtime")  # likewise
        return data

    @property
    def explain_limits(self) -> ExplainConfig:
        """The explanation limits in force: the section's, or the defaults."""
        return self.explain if self.explain is not None else ExplainConfig()


# ------------------------------------------------------------------------------------------ the image classifier
@dataclass(frozen=True)
class ImageClassifierConfig(RuntimeConfig):
    """What the image classifier needs besides its program and the shared fields (module docstring)."""

    topk: int = 5
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int("topk", self.topk)
        if not isinstance(self.preprocessing, Preprocessing) or not isinstance(self.limits, DecodeLimits):
            raise ValueError("preprocessing and limits must be Preprocessing and DecodeLimits objects")
        if not isinstance(self.protocol, ProtocolConfig):
            raise ValueError("protocol must be a ProtocolConfig object")

    @classmethod
    def parse_sections(cls, data: dict) -> dict:
        if "preprocessing" in data:
            data["preprocessing"] = Preprocessing.from_dict(data["preprocessing"])
        if "limits" in data:
            data["limits"] = DecodeLimits.from_dict(data["limits"])
        if "protocol" in data:
            try:
                data["protocol"] = ProtocolConfig.from_dict(data["protocol"])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"protocol: {exc}") from None
        return data


# The name the image classifier's config had before the other tasks shared its base.
HandlerConfig = ImageClassifierConfig

__all__ = [
    "MAX_FAULT_DELAY_MS",
    "ExplainConfig",
    "PRECISIONS",
    "QUANTIZED_ENGINES",
    "Faults",
    "HandlerConfig",
    "ImageClassifierConfig",
    "RuntimeConfig",
    "check_runtime_fields",
    "handler_section",
]
