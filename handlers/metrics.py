"""What a worker counts, for Prometheus: per-stage time, errors, batches, predictions, inputs.

The names, labels and buckets are the contract in ``docs/monitoring.md``. Workers are separate
processes started by TorchServe, so the counting is ``prometheus_client``'s multiprocess mode:
with ``PROMETHEUS_MULTIPROC_DIR`` set (``make serve`` sets it, ``var/metrics``), every worker writes
its series into memory-mapped files there and the exporter in the OIP gateway sums them per label
set at each scrape (``servekit.ops.oip``). TorchServe's own metrics API was the other choice; it
sends every observation from the worker to the frontend as a log line that the frontend parses,
its histograms have the Java client's fixed latency buckets (5 ms to 10 s: no bins for a
probability or a brightness), and a metric not declared in the server's metrics configuration is
dropped without a word.

``SERVEKIT_HANDLER_METRICS=off`` in the worker's environment turns all of it into no-ops (the
benchmark measures the overhead that way). ``PredictionLog`` writes a sampled JSON-lines record of
answers (``handler.prediction_log`` in the archive's configuration).

This module must not import torch: the build and the exporter read the bucket edges from here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
BRIGHTNESS_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MEGAPIXEL_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.3, 1.0, 3.0, 12.0, 25.0)
STAGES = ("decode", "preprocess", "inference", "postprocess")
SWITCH = "SERVEKIT_HANDLER_METRICS"


def bin_counts(values: Iterable[float], edges: tuple[float, ...]) -> list[int]:
    """Counts per bin as the drift reference stores them: bin i is ``(edges[i-1], edges[i]]``.

    ``len(result) == len(edges) + 1``; the last bin holds the values above the last edge: the same
    bins as a Prometheus histogram's cumulative ``le`` buckets, taken apart.
    """
    counts = [0] * (len(edges) + 1)
    for value in values:
        i = 0
        while i < len(edges) and value > edges[i]:
            i += 1
        counts[i] += 1
    return counts


def enabled() -> bool:
    return os.environ.get(SWITCH, "on").strip().lower() not in ("off", "0", "false", "no")


class _Families:
    """The metric families, created once per process (prometheus_client refuses duplicates)."""

    _instance: _Families | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        common = ("model", "version")
        self.requests = Counter("servekit_requests", "Requests the handler answered, by HTTP status",
                                (*common, "code"))  # fmt: skip
        self.errors = Counter("servekit_errors", "Failed requests by error type and HTTP status",
                              (*common, "type", "code"))  # fmt: skip
        self.request_seconds = Histogram("servekit_request_seconds", "Handler time of one request",
                                         common, buckets=SECONDS_BUCKETS)  # fmt: skip
        self.stage_seconds = Histogram("servekit_stage_seconds", "Time per stage (decode and preprocess per "
                                       "request; inference and postprocess per model call)",
                                       (*common, "stage"), buckets=SECONDS_BUCKETS)  # fmt: skip
        self.batch_inputs = Histogram("servekit_batch_inputs", "Model inputs in one server-side batch",
                                      common, buckets=BATCH_BUCKETS)  # fmt: skip
        self.predictions = Counter("servekit_predictions", "Top-1 class of every answered input",
                                   (*common, "class"))  # fmt: skip
        self.confidence = Histogram("servekit_confidence", "Top-1 probability of every answered input",
                                    common, buckets=CONFIDENCE_BUCKETS)  # fmt: skip
        self.brightness = Histogram("servekit_input_brightness", "Mean brightness (0..1) of the model's input",
                                    common, buckets=BRIGHTNESS_BUCKETS)  # fmt: skip
        self.megapixels = Histogram("servekit_input_megapixels", "Decoded image size in megapixels",
                                    common, buckets=MEGAPIXEL_BUCKETS)  # fmt: skip

    @classmethod
    def get(cls) -> _Families:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance


class HandlerMetrics:
    """One model version's series in this worker; label children are looked up once and cached."""

    def __init__(self, model: str, version: str) -> None:
        self.model, self.version = model, version
        families = _Families.get()
        self._families = families
        labels = (model, version)
        self._request_seconds = families.request_seconds.labels(*labels)
        self._stages = {stage: families.stage_seconds.labels(*labels, stage) for stage in STAGES}
        self._batch = families.batch_inputs.labels(*labels)
        self._confidence = families.confidence.labels(*labels)
        self._brightness = families.brightness.labels(*labels)
        self._megapixels = families.megapixels.labels(*labels)
        self._codes: dict[str, Any] = {}
        self._errors: dict[tuple[str, str], Any] = {}
        self._classes: dict[str, Any] = {}

    def request(self, code: int, seconds: float, error_type: str | None = None) -> None:
        key = str(code)
        child = self._codes.get(key)
        if child is None:
            child = self._codes[key] = self._families.requests.labels(self.model, self.version, key)
        child.inc()
        self._request_seconds.observe(seconds)
        if error_type is not None:
            errors = self._errors.get((error_type, key))
            if errors is None:
                errors = self._errors[(error_type, key)] = self._families.errors.labels(
                    self.model, self.version, error_type, key
                )
            errors.inc()

    def stage(self, stage: str, seconds: float) -> None:
        self._stages[stage].observe(seconds)

    def batch(self, inputs: int) -> None:
        self._batch.observe(inputs)

    def prediction(self, label: str, confidence: float) -> None:
        child = self._classes.get(label)
        if child is None:
            child = self._classes[label] = self._families.predictions.labels(self.model, self.version, label)
        child.inc()
        self._confidence.observe(confidence)

    def input(self, brightness: float | None = None, megapixels: float | None = None) -> None:
        if brightness is not None:
            self._brightness.observe(brightness)
        if megapixels is not None:
            self._megapixels.observe(megapixels)


class NullMetrics:
    """Counts nothing: warm-up, and workers with ``SERVEKIT_HANDLER_METRICS=off``."""

    def request(self, code: int, seconds: float, error_type: str | None = None) -> None:
        pass

    def stage(self, stage: str, seconds: float) -> None:
        pass

    def batch(self, inputs: int) -> None:
        pass

    def prediction(self, label: str, confidence: float) -> None:
        pass

    def input(self, brightness: float | None = None, megapixels: float | None = None) -> None:
        pass


def handler_metrics(model: str, version: str) -> HandlerMetrics | NullMetrics:
    if not enabled():
        logger.info("handler metrics off (%s=%s)", SWITCH, os.environ.get(SWITCH))
        return NullMetrics()
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        logger.info("handler metrics are counted in-process only: PROMETHEUS_MULTIPROC_DIR is not set")
    return HandlerMetrics(model, version)


# ------------------------------------------------------------------------------------------ prediction log
@dataclass(frozen=True)
class PredictionLogConfig:
    """``handler.prediction_log``: a sampled JSON-lines record of answers, off by default.

    ``sample_rate`` (0..1): the share of answered requests written; ``include_input``: also write the
    request body, base64 (off: only its sha256, so images never land in logs by accident);
    ``path``: the file, relative to TorchServe's log directory (``LOG_LOCATION``) unless absolute.
    """

    sample_rate: float = 0.0
    include_input: bool = False
    path: str = "servekit_predictions.jsonl"

    def __post_init__(self) -> None:
        rate = self.sample_rate
        if not isinstance(rate, int | float) or isinstance(rate, bool) or not 0.0 <= rate <= 1.0:
            raise ValueError(f"prediction_log.sample_rate: must be a number from 0.0 to 1.0, got {rate!r}")
        if not isinstance(self.include_input, bool):
            raise ValueError(f"prediction_log.include_input: must be true or false, got {self.include_input!r}")
        if not isinstance(self.path, str) or not self.path.strip() or "\n" in self.path:
            raise ValueError(f"prediction_log.path: must be a file name, got {self.path!r}")

    @classmethod
    def from_dict(cls, data: Any) -> PredictionLogConfig:
        if not isinstance(data, dict):
            raise ValueError(f"prediction_log: must be a mapping (sample_rate, include_input, path), got {data!r}")
        valid = {"sample_rate", "include_input", "path"}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"prediction_log.{unknown[0]}: unknown key (valid keys: {', '.join(sorted(valid))})")
        return cls(**data)


class PredictionLog:
    """Appends one JSON line per sampled answer; lines from several workers stay whole (one write each)."""

    def __init__(self, config: PredictionLogConfig, model: str, version: str, rng: random.Random | None = None):
        self.config = config
        self.model, self.version = model, version
        self.rng = rng or random.Random()
        path = Path(config.path)
        if not path.is_absolute():
            path = Path(os.environ.get("LOG_LOCATION") or ".") / path
        self.path = path

    def sampled(self) -> bool:
        rate = self.config.sample_rate
        return rate > 0 and (rate >= 1 or self.rng.random() < rate)

    def write(self, request_id: str | None, body: Any, answers: list[Any], seconds: float, code: int) -> None:
        raw = body if isinstance(body, bytes | bytearray) else json.dumps(body, default=str).encode()
        record = {
            "time": time.time(),
            "model": self.model,
            "version": self.version,
            "request_id": request_id,
            "code": code,
            "input_sha256": hashlib.sha256(raw).hexdigest(),
            "latency_ms": round(seconds * 1000, 3),
            "answers": answers,
        }
        if self.config.include_input:
            import base64

            record["input_base64"] = base64.b64encode(raw).decode()
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as exc:  # a full disk must not fail the request
            logger.warning("prediction log %s: %s", self.path, exc)
