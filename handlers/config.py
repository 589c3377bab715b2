"""The handler's configuration: one typed definition, written by the build and read by the worker.

The build (``ModelVersionSpec.handler_config``) writes ``HandlerConfig.to_dict()`` as the
``handler:`` section of the archive's ``model-config.yaml``; the worker reads it back with
``HandlerConfig.from_dict``. Defaults live here and nowhere else, and every value is validated on
construction, so a bad archive fails at load with a message naming the key.

    handler:
      precision: fp32            # fp32 | int8 | bf16: only the model loader differs
      topk: 5                    # default k; a request may ask for another
      labels_file: labels.json
      preprocessing: {...}       # handlers.transforms.Preprocessing
      limits: {...}              # handlers.image_io.DecodeLimits
      threads: null              # pin torch threads; null = this worker's share of the CPU budget
      quantized_engine: x86      # INT8 kernels
      optimize: true             # FP32: oneDNN-prepacked convolutions at load
      protocol: {...}            # handlers.protocols.ProtocolConfig: OIP / KServe tensor names
      faults: {error_rate: 0.3, delay_ms: 0, start_after: 20}   # drills and tests only (Faults); absent = none
      prediction_log: {sample_rate: 0.01, include_input: false}  # handlers.metrics.PredictionLogConfig; absent = off
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

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


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")


def check_runtime_fields(config: Any) -> None:
    """The checks every task's handler config shares: INT8 kernels, FP32 optimisation, drills, prediction log."""
    if config.quantized_engine not in QUANTIZED_ENGINES:
        raise ValueError(f"quantized_engine: must be one of {list(QUANTIZED_ENGINES)}, got {config.quantized_engine!r}")
    if not isinstance(config.optimize, bool):
        raise ValueError(f"optimize: must be true or false, got {config.optimize!r}")
    if config.faults is not None and not isinstance(config.faults, Faults):
        raise ValueError("faults must be a Faults object or None")
    if config.prediction_log is not None and not isinstance(config.prediction_log, PredictionLogConfig):
        raise ValueError("prediction_log must be a PredictionLogConfig object or None")


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
    return data


@dataclass(frozen=True)
class HandlerConfig:
    """What the image classifier needs besides its program (see the module docstring)."""

    precision: str = "fp32"
    topk: int = 5
    labels_file: str = "labels.json"
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    threads: int | None = None
    quantized_engine: str = "x86"
    optimize: bool = True
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    faults: Faults | None = None
    prediction_log: PredictionLogConfig | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: must be one of {list(PRECISIONS)}, got {self.precision!r}")
        _positive_int("topk", self.topk)
        if not isinstance(self.labels_file, str) or not self.labels_file or "/" in self.labels_file:
            raise ValueError(f"labels_file: must be a file name inside the archive, got {self.labels_file!r}")
        if self.threads is not None:
            _positive_int("threads", self.threads)
        check_runtime_fields(self)
        if not isinstance(self.preprocessing, Preprocessing) or not isinstance(self.limits, DecodeLimits):
            raise ValueError("preprocessing and limits must be Preprocessing and DecodeLimits objects")
        if not isinstance(self.protocol, ProtocolConfig):
            raise ValueError("protocol must be a ProtocolConfig object")

    @classmethod
    def from_dict(cls, data: dict | None) -> HandlerConfig:
        data = handler_section(cls, data)
        if "preprocessing" in data:
            data["preprocessing"] = Preprocessing.from_dict(data["preprocessing"])
        if "limits" in data:
            data["limits"] = DecodeLimits.from_dict(data["limits"])
        if "protocol" in data:
            try:
                data["protocol"] = ProtocolConfig.from_dict(data["protocol"])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"protocol: {exc}") from None
        return cls(**data)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["preprocessing"] = self.preprocessing.to_dict()
        data["limits"] = asdict(self.limits)
        data["protocol"] = self.protocol.to_dict()
        if self.faults is None:
            data.pop("faults")  # absent, not null: the model-config.yaml of a normal version stays as it was
        if self.prediction_log is None:
            data.pop("prediction_log")
        return data
