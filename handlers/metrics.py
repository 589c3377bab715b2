"""What a worker counts, for Prometheus: per-stage time, errors, batches, predictions, inputs.

The names, labels and buckets are the contract in ``docs/monitoring.md``. Workers are separate
processes started by TorchServe, so the counting is ``prometheus_client``'s multiprocess mode:
with ``PROMETHEUS_MULTIPROC_DIR`` set (``make serve`` sets it, ``var/metrics``), every worker writes
its series into memory-mapped files there and the exporter in the OIP gateway sums them per label
set at each scrape (``servekit.serving.oip``). TorchServe's own metrics API was the other choice; it
sends every observation from the worker to the frontend as a log line that the frontend parses,
its histograms have the Java client's fixed latency buckets (5 ms to 10 s: no bins for a
probability or a brightness), and a metric not declared in the server's metrics configuration is
dropped without a word.

``SERVEKIT_HANDLER_METRICS=off`` in the worker's environment turns all of it into no-ops (the
benchmark measures the overhead that way). ``PredictionLog`` writes a sampled JSON-lines record of
answers (``handler.prediction_log`` in the archive's configuration), capped and rotated.

This module must not import torch: the build and the exporter read the bucket edges from here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import random
import stat
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, fields
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
        self.queue_seconds = Histogram("servekit_queue_seconds", "Time from the nearest nginx to the batch's start "
                                       "in the worker (frontend, queue, batch delay)", common,
                                       buckets=SECONDS_BUCKETS)  # fmt: skip
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
        self._queue = families.queue_seconds.labels(*labels)
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

    def queue(self, seconds: float) -> None:
        self._queue.observe(seconds)

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

    def queue(self, seconds: float) -> None:
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
MIB = 1024 * 1024
MIN_LOG_BYTES = 4096
MAX_LOG_BYTES = 1 << 40
MAX_BACKUPS = 100


def _whole_number(name: str, value: Any, low: int, high: int, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"prediction_log.{name}: must be a whole number {what} from {low} to {high}, got {value!r}")


@dataclass(frozen=True)
class PredictionLogConfig:
    """``handler.prediction_log``: a sampled JSON-lines record of answers, off by default.

    ``sample_rate`` (0..1): the share of answered requests written; ``include_input``: also write the
    request body, base64 (off: only its sha256, so images never land in logs by accident);
    ``path``: the file, relative to TorchServe's log directory (``LOG_LOCATION``) unless absolute;
    ``max_bytes``: the file's cap: a record that would take it past the cap first renames it to
    ``PATH.1`` (``PATH.1`` to ``PATH.2`` and so on, the oldest beyond ``backups`` dropped; with
    ``backups: 0`` the full file is deleted) and starts a new one, so the log never takes more than
    ``max_bytes * (backups + 1)`` bytes of disk; a single record larger than ``max_bytes`` is skipped.
    """

    sample_rate: float = 0.0
    include_input: bool = False
    path: str = "servekit_predictions.jsonl"
    max_bytes: int = 64 * MIB
    backups: int = 3

    def __post_init__(self) -> None:
        rate = self.sample_rate
        if not isinstance(rate, int | float) or isinstance(rate, bool) or not 0.0 <= rate <= 1.0:
            raise ValueError(f"prediction_log.sample_rate: must be a number from 0.0 to 1.0, got {rate!r}")
        if not isinstance(self.include_input, bool):
            raise ValueError(f"prediction_log.include_input: must be true or false, got {self.include_input!r}")
        if not isinstance(self.path, str) or not self.path.strip() or "\n" in self.path:
            raise ValueError(f"prediction_log.path: must be a file name, got {self.path!r}")
        _whole_number("max_bytes", self.max_bytes, MIN_LOG_BYTES, MAX_LOG_BYTES, "of bytes")
        _whole_number("backups", self.backups, 0, MAX_BACKUPS, "of rotated files kept")

    @classmethod
    def from_dict(cls, data: Any) -> PredictionLogConfig:
        names = [f.name for f in fields(cls)]
        if not isinstance(data, dict):
            raise ValueError(f"prediction_log: must be a mapping ({', '.join(names)}), got {data!r}")
        valid = set(names)
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"prediction_log.{unknown[0]}: unknown key (valid keys: {', '.join(sorted(valid))})")
        return cls(**data)


class PredictionLog:
    """Appends one JSON line per sampled answer to a capped, rotated file shared by every worker.

    Each record is one ``os.write`` to a file opened with ``O_APPEND``, made while holding an
    exclusive ``flock`` on that file, so lines from several worker processes stay whole. Under the
    lock the writer checks that the path still names the file it opened (another worker may have
    rotated it meanwhile: then it opens the new one) and, when the record would take the file past
    ``max_bytes``, rotates it first (``PredictionLogConfig``). The path is opened anew for each
    record, with ``O_NOFOLLOW``: a symbolic link there is never followed, and anything that is not a
    regular file with one link, owned by this process's user, is refused. A new file is created
    0600; an existing one of ours that others may read is set to 0600 before anything is written
    (it is our file and only lost its mode, e.g. to an older servekit or a hand-made copy; one that
    belongs to another user is refused, since we cannot take it back). A refused or failed write
    (full disk, permissions) skips the record and logs one warning per kind of failure; it never
    fails the request.

        log = PredictionLog(PredictionLogConfig(sample_rate=0.01), "digits", "1.0")
        if log.sampled():
            log.write(request_id, body, answers, seconds, 200)
    """

    # Each retry means another worker rotated the file while we waited for its lock (progress elsewhere); a
    # worker that loses this many times in a row gives its record up rather than hold its request any longer.
    _RETRIES = 64

    def __init__(self, config: PredictionLogConfig, model: str, version: str, rng: random.Random | None = None):
        self.config = config
        self.model, self.version = model, version
        self.rng = rng or random.Random()
        path = Path(config.path)
        if not path.is_absolute():
            path = Path(os.environ.get("LOG_LOCATION") or ".") / path
        self.path = path
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    def backup(self, n: int) -> Path:
        """The ``n``-th rotated file (1: the newest)."""
        return self.path.with_name(f"{self.path.name}.{n}")

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
        if len(line) > self.config.max_bytes:
            self._warn_once("long", f"a record of {len(line)} bytes is larger than max_bytes "
                                    f"({self.config.max_bytes}): such records are skipped")  # fmt: skip
            return
        with self._lock:
            try:
                self._append(line)
            except OSError as exc:  # a full disk must not fail the request
                self._warn_once(f"errno {exc.errno}", f"{exc}: records are skipped while this lasts")

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            logger.warning("prediction log %s: %s", self.path, message)

    def _append(self, line: bytes) -> None:
        for _ in range(self._RETRIES):
            fd = self._open()
            if fd is None:
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                opened = os.fstat(fd)
                try:
                    now = os.lstat(self.path)
                except FileNotFoundError:
                    continue  # rotated away (or deleted) between our open and our lock
                if (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino):
                    continue
                if opened.st_size and opened.st_size + len(line) > self.config.max_bytes:
                    self._rotate()  # under the lock of the file the path names: one rotation at a time
                    continue
                written = os.write(fd, line)
                if written != len(line):  # a full disk: take the cut line back, no torn record stays
                    os.ftruncate(fd, opened.st_size)
                    raise OSError(errno.ENOSPC, f"only {written} of {len(line)} bytes written")
                return
            finally:
                os.close(fd)  # releases the lock
        self._warn_once("busy", f"the file was rotated {self._RETRIES} times during one write: record skipped")

    def _open(self) -> int | None:
        """A descriptor of the log file, or None (warned once) when what the path names is refused."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                self._warn_once("symlink", "is a symbolic link: not followed, records are skipped")
                return None
            if exc.errno in (errno.EISDIR, errno.ENXIO):  # a directory, a FIFO, a socket
                self._warn_once("special", "is not a regular file: records are skipped")
                return None
            raise
        try:
            info = os.fstat(fd)
            refusal = None
            if not stat.S_ISREG(info.st_mode):
                refusal = ("special", "is not a regular file: records are skipped")
            elif info.st_uid != os.geteuid():
                refusal = ("owner", f"belongs to uid {info.st_uid}, not to us: records are skipped")
            elif info.st_nlink > 1:
                refusal = ("links", "has other hard links: records are skipped")
            elif stat.S_IMODE(info.st_mode) & 0o077:
                os.fchmod(fd, 0o600)
                self._warn_once("mode", f"had mode {stat.S_IMODE(info.st_mode):04o}: set to 0600")
        except BaseException:
            os.close(fd)
            raise
        if refusal is not None:
            os.close(fd)
            self._warn_once(*refusal)
            return None
        return fd

    def _rotate(self) -> None:
        """``PATH.N-1`` to ``PATH.N`` ... ``PATH`` to ``PATH.1`` (the oldest replaced); PATH deleted with no backups.

        ``rename`` never follows a link, so a link planted at a backup's name is replaced, not written through.
        """
        if self.config.backups == 0:
            os.unlink(self.path)
            return
        for n in range(self.config.backups, 1, -1):
            with contextlib.suppress(FileNotFoundError):
                os.rename(self.backup(n - 1), self.backup(n))
        os.rename(self.path, self.backup(1))
