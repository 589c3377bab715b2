"""Progressive delivery: a canary walked through steps, then promoted or rolled back from live figures.

Workflow of ``Rollout.run`` (``servekit rollout NAME VERSION``):

1. VERSION is registered if TorchServe does not have it (``Deployer.register``: sha256 first);
2. its golden set must be all correct (``Deployer.golden_check``), before any client sees it;
3. for each step (default 10, 25, 50, 100 %): the canary is set (``Deployer.canary``); then the
   rollout waits at least ``step_seconds`` AND until the canary has served ``min_requests`` in the
   step's window (``"not enough traffic"`` after ``max_wait_factor`` x ``step_seconds``), compares
   the canary with the default over that window (``analyse``), checks the canary's class mix when
   ``max_drift`` is set (``class_drift``), and advances or aborts;
4. after the last step: ``Deployer.promote`` (golden set again, set-default; the split goes).

On any failure, or Ctrl-C, the canary goes back to 0 and the default is left as it was; the reason
is recorded and the command exits 1 (130 for Ctrl-C). Every decision goes to the deployment
history (``rollout-start`` with the settings and where each came from, ``rollout-step``,
``rollout-done``, ``rollout-aborted``) and to ``emit`` as one progress line.

Settings (``Settings.resolve``): steps, step_seconds, max_error_rate, max_p99_ratio, min_requests,
max_wait_factor and max_drift each come from the command's flag, else the model's ``rollout:``
section of the spec (``servekit.build.spec.rollout_settings``: read when the rollout starts, never
built into an archive), else the built-in default (``BUILT_IN``).

Status (``StatusFile``, ``rollout-NAME.json`` beside the deployment state in the proxy directory):
the running rollout replaces it whole at every change and every poll: its pid and command line,
the settings, the current step, percent and step start, the latest figures of the step window, and
the outcome when it ends. ``servekit rollout --status NAME`` prints it and says whether that
process is still a ``servekit rollout`` (``RolloutProcess.alive``: pid and command line, never the
pid alone). A second rollout of a model whose rollout process is alive is refused.

Locking: each state change (register, each step's canary, promote, the abort) takes the
``servekit`` state lock on its own, so ``servekit status``/``state``/``history`` and other models'
commands are not blocked for the whole rollout. A change to this model's canary made by anyone else
meanwhile (``servekit canary`` by hand, another rollout) is detected at the next poll or step and
aborts the rollout; the routes are then left as the other command set them.

Where the figures come from (``--source``, ``select_source``); every source gives one ``Window``
per poll (``Figures`` for the canary and for the default, and the canary's top-1 classes), and the
same ``analyse`` judges it:

* ``metrics``: the handler metrics on the OIP front's ``/metrics`` page (``docs/monitoring.md``),
  scraped at the step's start and at each poll; the window is the difference. Per side, from the
  series of that side's real version: requests and non-2xx errors from ``servekit_requests_total``,
  p99 from the ``servekit_request_seconds`` buckets (interpolated inside the bucket, as
  ``histogram_quantile``), classes from ``servekit_predictions_total``. The default side is the
  version TorchServe's default route answers with (the handler labels its answers with the real
  version, never ``default``).
* ``prometheus``: the same series as ``increase(...[Ns])`` over the step's elapsed seconds, rounded
  up; Prometheus scrapes every few seconds, so its window lags by up to a scrape interval and
  ``increase`` extrapolates (figures need not be whole numbers: they are rounded).
* ``proxy-log``: the proxy's request log (``servekit.deploy.proxy``: one JSON line per request with
  ``msec``, ``uri``, ``status``, ``request_time`` and ``target``, the version the split chose, empty
  for the default); p99 by nearest rank of ``request_time``. No classes: no drift gate.
* ``auto`` (the default): Prometheus when it answers and holds servekit's series, else the metrics
  page when it has servekit's series, else the proxy log (the reason is printed and recorded).

What they count differs. The handler metrics count every request a version answers: golden set
checks, direct ``/predictions/NAME/VERSION`` calls and clients that bypass the proxy too, and their
latency is the handler's (decode to encoded answer, not TorchServe's queue). The proxy log counts
only requests to ``/predictions/NAME`` through the proxy, timed by nginx end to end.

The rules, per step window (``Thresholds``), whatever the source:

* error rate = the share of non-2xx answers. The canary passes if its rate is at most
  ``max(max_error_rate, default_rate + max_error_rate)``: an absolute budget, widened by what the
  default itself fails in the same window (clients sending bad images get 400 from both versions,
  which must not roll a good canary back); when the default has fewer than ``min_requests`` (at
  100 % it has none), its rate from the latest step where it had enough is used;
* p99 ratio = canary p99 / default p99 must be at most ``max_p99_ratio``; compared only when both
  sides have ``min_requests`` in the window (at 100 % the last step is judged on errors alone);
* with ``max_drift``: once the canary has its archive's ``drift_min_samples`` top-1 predictions in
  the window, the PSI of their class mix against the archive's drift reference
  (``servekit.observe.drift``) must be at most ``max_drift``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from servekit.deploy.state import Canary
from servekit.deploy.workflows import Deployer, DeployError, versions
from servekit.errors import ServekitError
from servekit.files import atomic_write_text
from servekit.observe.drift import PREDICTIONS, Reference, class_order, load_reference, psi, require_servekit
from servekit.observe.metrics_source import (
    EXPORTER_UP,
    MetricsError,
    MetricsPage,
    PrometheusAPI,
    Samples,
    choose_source,
    label_selector,
)
from servekit.serving.logkeeper import backup_path
from servekit.serving.processes import command_line, pid_matches

__all__ = [
    "BUILT_IN",
    "DEFAULT_STEPS",
    "SOURCES",
    "Analysis",
    "DriftCheck",
    "Figures",
    "LogRecord",
    "MetricsPageSource",
    "PrometheusSource",
    "ProxyLogSource",
    "RequestLog",
    "Rollout",
    "RolloutAborted",
    "RolloutProcess",
    "Settings",
    "StatusFile",
    "Thresholds",
    "Window",
    "analyse",
    "class_drift",
    "format_event",
    "format_status",
    "log_window",
    "metric_figures",
    "metrics_window",
    "p99",
    "parse_steps",
    "read_status",
    "select_source",
    "status_path",
]

DEFAULT_STEPS = (10, 25, 50, 100)
INTERRUPTED_EXIT = 130
SOURCES = ("auto", "prometheus", "metrics", "proxy-log")
REQUESTS = "servekit_requests_total"
REQUEST_SECONDS = "servekit_request_seconds"
# Every setting and its built-in default, in the order they are shown; None: off.
BUILT_IN: dict[str, Any] = {
    "steps": DEFAULT_STEPS,
    "step_seconds": 30.0,
    "max_error_rate": 0.01,
    "max_p99_ratio": 1.5,
    "min_requests": 50,
    "max_wait_factor": 4.0,
    "max_drift": None,
}


class RolloutAborted(DeployError):
    """The rollout stopped without promoting: canary removed, default unchanged; ``exit_code`` 1 or 130."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _Abort(Exception):
    """Internal: stop the walk with ``reason``; ``keep_routes`` when someone else owns the canary now."""

    def __init__(self, reason: str, keep_routes: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.keep_routes = keep_routes


# ------------------------------------------------------------------------------------------ the request log
@dataclass(frozen=True)
class LogRecord:
    time: float  # epoch seconds, when nginx finished the request
    uri: str
    status: int
    seconds: float  # request_time
    target: str  # "/VERSION" the split chose; "" = TorchServe's default

    @classmethod
    def parse(cls, line: bytes) -> LogRecord | None:
        """One line of the proxy's log, or None for a line that is not one (cut, hand-edited)."""
        try:
            data = json.loads(line)
            return cls(float(data["msec"]), str(data["uri"]), int(data["status"]),
                       float(data["request_time"]), str(data["target"]))  # fmt: skip
        except (ValueError, KeyError, TypeError):
            return None


class RequestLog:
    """Reads the proxy's JSON-lines request log incrementally, from where it was when ``start`` was called.

    The log keeper (``servekit.serving.logkeeper``) renames a full ``requests.jsonl`` to
    ``requests.jsonl.1`` and nginx starts a new one. The reader follows the file it was reading by
    its inode: when the path names another file, the rest of the old one is read from ``.1`` (now
    and at every later read while ``.1`` is still that file, for the lines nginx wrote before it
    reopened its log), then the new file from its start. Records survive one rotation between two
    reads; a file rotated twice in between (to ``.2``) is not looked for.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file: tuple[int, int] | None = None  # (device, inode) of the file being read
        self._offset = 0
        self._previous: tuple[tuple[int, int], int] | None = None  # the rotated file and where its reading stopped
        self._records: list[LogRecord] = []

    def start(self) -> None:
        """Forget everything before now: only requests logged from here on are read."""
        try:
            info = self.path.stat()
            self._file, self._offset = (info.st_dev, info.st_ino), info.st_size
        except FileNotFoundError:
            self._file, self._offset = None, 0
        self._previous = None
        self._records = []

    def records(self, since: float, until: float) -> list[LogRecord]:
        """The requests finished in ``[since, until]``; older ones are forgotten (windows only move forward)."""
        self._read_new()
        self._records = [r for r in self._records if r.time >= since]
        return [r for r in self._records if r.time <= until]

    def _read_new(self) -> None:
        try:
            handle = self.path.open("rb")
        except FileNotFoundError:  # renamed, and nginx has not reopened its log yet
            handle = None
        with handle or contextlib.nullcontext():
            identity = None
            if handle is not None:
                info = os.fstat(handle.fileno())
                identity = (info.st_dev, info.st_ino)
            if identity != self._file:
                if self._file is not None:
                    self._previous = (self._file, self._offset)
                self._file, self._offset = identity, 0
            if self._previous is not None:
                self._read_previous()
            if handle is not None:
                self._offset = self._read_from(handle, self._offset)

    def _read_previous(self) -> None:
        identity, offset = self._previous
        try:
            with backup_path(self.path, 1).open("rb") as handle:
                info = os.fstat(handle.fileno())
                if (info.st_dev, info.st_ino) != identity:  # rotated again, or not rotated but removed
                    self._previous = None
                    return
                self._previous = (identity, self._read_from(handle, offset))
        except FileNotFoundError:
            self._previous = None

    def _read_from(self, handle: BinaryIO, offset: int) -> int:
        """Parse the complete lines after ``offset``; the new offset (a line nginx is still writing waits)."""
        size = handle.seek(0, 2)
        if size < offset:  # truncated in place: read it again from its start
            offset = 0
        handle.seek(offset)
        data = handle.read(size - offset)
        complete = data.rfind(b"\n") + 1
        for line in data[:complete].splitlines():
            record = LogRecord.parse(line)
            if record is not None:
                self._records.append(record)
        return offset + complete


# ------------------------------------------------------------------------------------------ the figures
@dataclass(frozen=True)
class Thresholds:
    max_error_rate: float = 0.01
    max_p99_ratio: float = 1.5
    min_requests: int = 50

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise DeployError(f"--max-error-rate must be between 0 and 1, got {self.max_error_rate}")
        if not self.max_p99_ratio > 0:
            raise DeployError(f"--max-p99-ratio must be above 0, got {self.max_p99_ratio}")
        if self.min_requests < 1:
            raise DeployError(f"--min-requests must be at least 1, got {self.min_requests}")


def p99(values: list[float]) -> float | None:
    """The 99th percentile by nearest rank (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


@dataclass(frozen=True)
class Figures:
    requests: int
    errors: int
    p99_ms: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @classmethod
    def of(cls, records: list[LogRecord]) -> Figures:
        latency = p99([r.seconds for r in records])
        return cls(
            requests=len(records),
            errors=sum(1 for r in records if not 200 <= r.status < 300),
            p99_ms=round(latency * 1000, 1) if latency is not None else None,
        )

    def as_dict(self) -> dict:
        return {**asdict(self), "error_rate": round(self.error_rate, 4)}


@dataclass(frozen=True)
class Window:
    """One step window as a source saw it: each side's figures, and the canary's top-1 classes (None: unknown)."""

    canary: Figures
    default: Figures
    classes: Mapping[str, float] | None = None


def log_window(records: list[LogRecord], model: str, version: str) -> Window:
    """The canary's (split target ``/version``) and the default's share of ``/predictions/model`` in the log."""
    uri = f"/predictions/{model}"
    return Window(
        Figures.of([r for r in records if r.uri == uri and r.target == f"/{version}"]),
        Figures.of([r for r in records if r.uri == uri and r.target == ""]),
    )


def _is_success(code: str) -> bool:
    try:
        return 200 <= int(code) < 300
    except ValueError:
        return False


def metric_figures(samples: Samples, model: str, version: str) -> Figures:
    """``version``'s requests, non-2xx answers and p99 in ``samples`` (deltas of the handler metrics)."""
    codes = samples.by_label(REQUESTS, "code", model=model, version=version)
    histogram = samples.histogram(REQUEST_SECONDS, model=model, version=version)
    latency = histogram.quantile(0.99) if histogram is not None else None
    return Figures(
        requests=round(sum(codes.values())),
        errors=round(sum(n for code, n in codes.items() if not _is_success(code))),
        p99_ms=round(latency * 1000, 1) if latency is not None else None,
    )


def metrics_window(samples: Samples, model: str, version: str, default: str) -> Window:
    """The canary ``version`` against the ``default`` version, from handler-metric deltas."""
    return Window(
        metric_figures(samples, model, version),
        metric_figures(samples, model, default),
        samples.by_label(PREDICTIONS, "class", model=model, version=version),
    )


# ------------------------------------------------------------------------------------------ the sources
class FigureSource(Protocol):
    """Where a step window's figures come from: ``begin`` once, ``start_step`` per step, ``window`` per poll."""

    name: str

    def begin(self, model: str, version: str, default: str) -> None: ...

    def start_step(self, at: float) -> None: ...

    def window(self, since: float, now: float) -> Window: ...


class ProxyLogSource:
    """The proxy's request log (a ``RequestLog``, or anything with ``start`` and ``records``)."""

    name = "proxy-log"

    def __init__(self, log: RequestLog) -> None:
        self.log = log
        self._who = ("", "")

    def begin(self, model: str, version: str, default: str) -> None:
        self._who = (model, version)
        self.log.start()  # what was logged before the rollout never counts

    def start_step(self, at: float) -> None:
        pass  # the window is a time range of the log

    def window(self, since: float, now: float) -> Window:
        return log_window(self.log.records(since, now), *self._who)


class MetricsPageSource:
    """The handler metrics page, scraped at each step's start and at each poll: the window is the difference."""

    name = "metrics"

    def __init__(self, page: MetricsPage) -> None:
        self.page = page
        self._who = ("", "", "")
        self._base: Samples | None = None

    def begin(self, model: str, version: str, default: str) -> None:
        self._who = (model, version, default)

    def start_step(self, at: float) -> None:
        self._base = self.page.scrape()

    def window(self, since: float, now: float) -> Window:
        if self._base is None:
            raise MetricsError("internal: the metrics page was not scraped at the step's start")
        return metrics_window(self.page.scrape().since(self._base), *self._who)


class PrometheusSource:
    """Prometheus' ``increase()`` over the step's elapsed seconds (rounded up) of the same handler series."""

    name = "prometheus"

    def __init__(self, prometheus: PrometheusAPI) -> None:
        self.prometheus = prometheus
        self._who = ("", "", "")

    def begin(self, model: str, version: str, default: str) -> None:
        self._who = (model, version, default)

    def start_step(self, at: float) -> None:
        pass  # the window is a range Prometheus already holds

    def window(self, since: float, now: float) -> Window:
        model, version, default = self._who
        span = f"{max(1, math.ceil(now - since))}s"
        selector = label_selector(model=model)
        ask = self.prometheus.samples
        found = ask(REQUESTS, f"sum by (model, version, code) (increase({REQUESTS}{selector}[{span}]))")
        found += ask(f"{REQUEST_SECONDS}_bucket",
                     f"sum by (model, version, le) (increase({REQUEST_SECONDS}_bucket{selector}[{span}]))")  # fmt: skip
        canary = label_selector(model=model, version=version)
        found += ask(PREDICTIONS, f"sum by (model, version, class) (increase({PREDICTIONS}{canary}[{span}]))")
        return metrics_window(Samples(found), model, version, default)


def select_source(
    requested: str, *, page: MetricsPage, prometheus: PrometheusAPI, request_log: RequestLog
) -> tuple[FigureSource, str | None]:
    """The source ``--source`` names (``auto``: see the module docstring), and a note when auto fell back.

    ``prometheus`` and ``metrics`` must answer with servekit's series now (one-line error otherwise);
    ``auto`` ends at the proxy log when neither does, and the note says why.
    """
    if requested not in SOURCES:
        raise DeployError(f"--source must be one of {', '.join(SOURCES)}, got {requested!r}")
    if requested == "proxy-log":
        return ProxyLogSource(request_log), None
    if requested == "prometheus":
        choose_source("prometheus", prometheus, page)  # a one-line error when it does not answer
        if not prometheus.has(EXPORTER_UP):
            raise MetricsError(
                f"Prometheus at {prometheus.url} holds no servekit series ({EXPORTER_UP}): is it scraping the "
                "OIP front's /metrics (make monitor)?"
            )
        return PrometheusSource(prometheus), None
    if requested == "metrics":
        require_servekit(page.scrape(), page.url)
        return MetricsPageSource(page), None
    try:
        chosen, note = choose_source("auto", prometheus, page)
        if chosen == "prometheus":
            return PrometheusSource(prometheus), None
        require_servekit(page.scrape(), page.url)
        return MetricsPageSource(page), note
    except MetricsError as exc:
        return ProxyLogSource(request_log), f"{exc}: judging from the proxy's request log"


# ------------------------------------------------------------------------------------------ the analysis
@dataclass(frozen=True)
class Analysis:
    """One step window's comparison; ``reason`` says why it failed (None: it passed)."""

    canary: Figures
    default: Figures
    error_limit: float
    p99_ratio: float | None
    reason: str | None

    @property
    def passed(self) -> bool:
        return self.reason is None


def analyse(canary: Figures, default: Figures, thresholds: Thresholds, baseline: float | None = None) -> Analysis:
    """Compare the canary's figures with the default's over one window (module docstring rules).

    ``baseline``: the default's error rate in an earlier step, used when the default has fewer than
    ``min_requests`` in this window (at 100 % it has none): clients' bad inputs, which every version
    refuses, must not abort the last step of a good canary.
    """
    default_rate = default.error_rate
    if default.requests < thresholds.min_requests and baseline is not None:
        default_rate = baseline
    limit = max(thresholds.max_error_rate, default_rate + thresholds.max_error_rate)
    ratio = None
    if min(canary.requests, default.requests) >= thresholds.min_requests and canary.p99_ms and default.p99_ms:
        ratio = round(canary.p99_ms / default.p99_ms, 2)
    reason = None
    if canary.requests < thresholds.min_requests:
        reason = f"not enough traffic: the canary had {canary.requests} of {thresholds.min_requests} requests"
    elif canary.error_rate > limit:
        reason = f"canary error rate {canary.error_rate:.1%} > {limit:.1%} (default {default_rate:.1%})"
    elif ratio is not None and ratio > thresholds.max_p99_ratio:
        reason = (
            f"p99 ratio {ratio:.2f} > {thresholds.max_p99_ratio:g} "
            f"(canary {canary.p99_ms:g} ms, default {default.p99_ms:g} ms)"
        )
    return Analysis(canary, default, round(limit, 4), ratio, reason)


@dataclass(frozen=True)
class DriftCheck:
    """The canary's class mix in one window against its archive's reference; ``reason`` when it fails."""

    psi: float | None
    predictions: int
    min_samples: int
    max_drift: float
    judged: bool
    reason: str | None

    def as_dict(self) -> dict:
        return asdict(self)


def class_drift(reference: Reference, classes: Mapping[str, float], max_drift: float) -> DriftCheck:
    """PSI of ``classes`` (top-1 counts) against ``reference``; judged from ``reference.min_samples`` predictions."""
    labels = class_order(list(reference.classes) + [c for c in classes if c not in reference.classes])
    live = [float(classes.get(label, 0.0)) for label in labels]
    value = psi(live, [reference.classes.get(label, 0.0) for label in labels])
    count = round(sum(live))
    judged = value is not None and count >= reference.min_samples
    reason = None
    if judged and value > max_drift:
        reason = (
            f"class drift PSI {value:.3f} > {max_drift:g} ({count} canary predictions against the "
            f"{reference.model} {reference.version} archive's reference)"
        )
    return DriftCheck(None if value is None else round(value, 4), count, reference.min_samples, max_drift,
                      judged, reason)  # fmt: skip


def parse_steps(text: str) -> tuple[int, ...]:
    """``"10,25,50,100"`` -> ``(10, 25, 50, 100)``: whole percentages from 1 to 100, increasing."""
    try:
        steps = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise DeployError(
            f"--steps must be comma-separated whole percentages, e.g. 10,25,50,100; got {text!r}"
        ) from None
    if not steps or any(not 1 <= s <= 100 for s in steps) or list(steps) != sorted(set(steps)):
        raise DeployError(f"--steps must be increasing percentages from 1 to 100, e.g. 10,25,50,100; got {text!r}")
    return steps


# ------------------------------------------------------------------------------------------ the settings
@dataclass(frozen=True)
class Settings:
    """Every setting's value and where it came from: ``flag``, ``spec`` or ``default`` (``BUILT_IN``)."""

    values: Mapping[str, Any]
    origins: Mapping[str, str]

    @classmethod
    def resolve(cls, flags: Mapping[str, Any], spec: Mapping[str, Any] | None = None) -> Settings:
        """A flag (not None) wins over the spec's ``rollout:`` section (``RolloutSpec.given()``), then the default."""
        values, origins = {}, {}
        for name, default in BUILT_IN.items():
            for origin, given in (("flag", flags.get(name)), ("spec", (spec or {}).get(name))):
                if given is not None:
                    values[name], origins[name] = given, origin
                    break
            else:
                values[name], origins[name] = default, "default"
        values["steps"] = tuple(values["steps"])
        return cls(values, origins)

    def rollout_arguments(self) -> dict[str, Any]:
        """Keyword arguments of ``Rollout`` for these settings."""
        v = self.values
        return {
            "steps": v["steps"],
            "step_seconds": float(v["step_seconds"]),
            "thresholds": Thresholds(float(v["max_error_rate"]), float(v["max_p99_ratio"]), int(v["min_requests"])),
            "max_wait_factor": float(v["max_wait_factor"]),
            "max_drift": None if v["max_drift"] is None else float(v["max_drift"]),
            "origins": dict(self.origins),
        }


# ------------------------------------------------------------------------------------------ the status file
def status_path(proxy_dir: Path, model: str) -> Path:
    """``rollout-NAME.json`` beside the deployment state."""
    return Path(proxy_dir) / f"rollout-{model}.json"


@dataclass(frozen=True)
class RolloutProcess:
    """A rollout's process as its status file records it: pid and command line, checked together."""

    pid: int
    argv: tuple[str, ...]

    @classmethod
    def current(cls) -> RolloutProcess:
        pid = os.getpid()
        return cls(pid, tuple(command_line(pid)) or tuple(sys.argv))

    @classmethod
    def of(cls, status: Mapping[str, Any]) -> RolloutProcess | None:
        pid, argv = status.get("pid"), status.get("argv")
        if not isinstance(pid, int) or not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            return None
        return cls(pid, tuple(argv))

    def alive(self) -> bool:
        """Whether ``pid`` still runs this very command line, and it is a ``servekit rollout`` (pids are reused)."""
        return "rollout" in self.argv and pid_matches(self.pid, [" ".join(self.argv)])


def _warn(message: str) -> None:
    print(f"servekit: warning: {message}", file=sys.stderr, flush=True)


class StatusFile:
    """The status document of one model's rollout, replaced whole at each ``write`` (readers never see half).

    A failed write (a full disk) warns once and the rollout goes on: the file is a view, not the record
    (the history is).
    """

    def __init__(
        self,
        path: Path,
        process: RolloutProcess | None = None,
        clock: Callable[[], float] = time.time,
        warn: Callable[[str], None] = _warn,
    ) -> None:
        self.path = Path(path)
        self.process = process or RolloutProcess.current()
        self.clock, self.warn = clock, warn
        self.document: dict[str, Any] = {}
        self._warned = False

    def read(self) -> dict | None:
        return read_status(self.path)

    def start(self, **fields: Any) -> None:
        now = self.clock()
        self.document = {"pid": self.process.pid, "argv": list(self.process.argv), "state": "running",
                         "started_at": now, "outcome": None, **fields}  # fmt: skip
        self.write()

    def write(self, **changes: Any) -> None:
        self.document.update(changes)
        self.document["updated_at"] = self.clock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(self.document, indent=2, sort_keys=True) + "\n")
        except OSError as exc:
            if not self._warned:
                self._warned = True
                self.warn(f"cannot write the rollout status {self.path} ({exc}); the rollout goes on")


def read_status(path: Path) -> dict | None:
    """The status document at ``path``; None when there is none; a one-line error when it is unreadable."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DeployError(f"cannot read the rollout status {path}: {exc}") from None
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise DeployError(f"the rollout status {path} is not valid JSON ({exc}): remove it") from None
    if not isinstance(document, dict) or not isinstance(document.get("model"), str):
        raise DeployError(f"the rollout status {path} is not a rollout status document: remove it")
    return document


# ------------------------------------------------------------------------------------------ the walk
def _no_lock(holder: str) -> AbstractContextManager:
    return contextlib.nullcontext()


@dataclass
class Rollout:
    """Walks one version through the canary steps; see the module docstring.

        source = ProxyLogSource(RequestLog(proxy.request_log))    # or MetricsPageSource, PrometheusSource
        rollout = Rollout(deployer, source, lock=lambda what: StateLock(path, holder=what),
                          status=StatusFile(status_path(proxy.prefix, "digits")))
        rollout.run("digits", "2.0")   # the rollout-done event, or raises RolloutAborted

    ``lock(holder)`` is the state lock, taken around each state change; ``emit`` gets every event
    (start, each step, done or aborted) as it happens; ``status`` (optional) is kept up to date;
    ``reference(model, version)`` loads the drift reference (default: the deployer's store);
    ``origins`` says where each setting came from (``Settings``); ``clock`` (epoch seconds, as in
    the log) and ``sleep`` are injectable so the walk can be tested without waiting.
    """

    deployer: Deployer
    source: FigureSource
    lock: Callable[[str], AbstractContextManager] = _no_lock
    thresholds: Thresholds = field(default_factory=Thresholds)
    steps: tuple[int, ...] = DEFAULT_STEPS
    step_seconds: float = 30.0
    max_wait_factor: float = 4.0
    max_drift: float | None = None
    emit: Callable[[dict], None] = lambda event: None
    status: StatusFile | None = None
    reference: Callable[[str, str], Reference] | None = None
    origins: Mapping[str, str] = field(default_factory=dict)
    source_note: str | None = None
    clock: Callable[[], float] = field(default=time.time, repr=False)
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    poll_s: float = 1.0

    def __post_init__(self) -> None:
        if self.step_seconds <= 0:
            raise DeployError(f"--step-seconds must be above 0, got {self.step_seconds}")
        if self.max_wait_factor < 1:
            raise DeployError(f"--max-wait-factor must be at least 1, got {self.max_wait_factor}")
        if self.max_drift is not None:
            if not self.max_drift > 0:
                raise DeployError(f"--max-drift must be above 0, got {self.max_drift}")
            if self.source.name == "proxy-log":
                raise DeployError(
                    f"max_drift {self.max_drift:g} ({self.origins.get('max_drift', 'given')}) needs the handler "
                    "metrics (the canary's predicted classes); the proxy's request log has none: "
                    "use --source metrics or prometheus"
                )
        self._ours: Canary | None = None  # the canary this rollout last set
        self._claimed = False  # whether this rollout owns the status file

    @property
    def deployments(self):
        return self.deployer.deployments

    def settings(self) -> dict[str, Any]:
        """Every setting this rollout uses, by name (``BUILT_IN``'s order)."""
        t = self.thresholds
        return {"steps": list(self.steps), "step_seconds": self.step_seconds, "max_error_rate": t.max_error_rate,
                "max_p99_ratio": t.max_p99_ratio, "min_requests": t.min_requests,
                "max_wait_factor": self.max_wait_factor, "max_drift": self.max_drift}  # fmt: skip

    def run(self, model: str, version: str) -> dict:
        """Register, golden set, the steps, promote: the ``rollout-done`` event; raises ``RolloutAborted``."""
        self._ours, self._claimed = None, False
        self._baseline: float | None = None
        self._reference: Reference | None = None
        with _interruptible():
            return self._run(model, version)

    def _run(self, model: str, version: str) -> dict:
        percent = 0
        try:
            default = self._prepare(model, version)
            self.source.begin(model, version, default)
            if self.max_drift is not None:  # no reference: fail before any client sees the canary
                self._reference = (self.reference or self._store_reference)(model, version)
            settings = self.settings()
            start = self._record("rollout-start", model, version, default=default, steps=list(self.steps),
                                 source=self.source.name, settings=settings,
                                 settings_from={name: self.origins.get(name, "given") for name in settings},
                                 **({"source_note": self.source_note} if self.source_note else {}))  # fmt: skip
            self._status(phase="golden set", default=default, source=self.source.name, settings=start["settings"],
                         settings_from=start["settings_from"], source_note=self.source_note)  # fmt: skip
            self._golden(model, version)
            for number, percent in enumerate(self.steps, 1):
                self._set_canary(model, version, percent)
                analysis, drift, window = self._watch(model, version, number, percent)
                if analysis.default.requests >= self.thresholds.min_requests:
                    self._baseline = analysis.default.error_rate  # for steps where the default gets too little
                reason = analysis.reason or (drift.reason if drift is not None else None)
                last = number == len(self.steps)
                verdict = "abort" if reason else "promote" if last else "advance"
                event = self._record("rollout-step", model, version, step=number, of=len(self.steps),
                                     percent=percent, window_s=round(window, 1), verdict=verdict,
                                     **_figures(analysis, drift), reason=reason)  # fmt: skip
                self._status(last_step=event)
                if reason:
                    raise _Abort(f"step {number} ({percent}%): {reason}")
            self._status(phase="promoting")
            with self.lock(f"servekit rollout {model} {version}: promote"):
                promoted = self.deployer.promote(model, version)
            done = self._record("rollout-done", model, version, previous_default=promoted["previous_default"],
                                golden=promoted["golden"], steps=list(self.steps))  # fmt: skip
            self._finish("promoted", {"reason": None, "previous_default": promoted["previous_default"],
                                      "golden": promoted["golden"], "exit_code": 0})  # fmt: skip
            return done
        except _Abort as abort:
            raise self._abort(model, version, percent, abort.reason, abort.keep_routes) from None
        except ServekitError as exc:  # register, golden set, the lock, nginx, promote, the metrics
            raise self._abort(model, version, percent, str(exc), keep_routes=False) from None
        except KeyboardInterrupt as stop:
            name = getattr(stop, "signal_name", "SIGINT")
            code = 128 + signal.Signals[name].value if name != "SIGINT" else INTERRUPTED_EXIT
            raise self._abort(model, version, percent, f"interrupted ({name})", False, code) from None
        except Exception as exc:  # a bug or an unreadable log: still never leave the canary behind
            reason = f"internal error: {type(exc).__name__}: {exc}"
            raise self._abort(model, version, percent, reason, keep_routes=False) from exc

    # ------------------------------------------------------------------ steps
    def _prepare(self, model: str, version: str) -> str:
        """Claim the status file; refuse a model whose canary is taken; register ``version`` if needed. The default."""
        with self.lock(f"servekit rollout {model} {version}: register"):
            self._claim(model, version)
            canary = self.deployments.load().model(model).canary
            if canary is not None:
                raise _Abort(
                    f"{model} already has a canary ({canary.version} at {canary.percent}%): "
                    f"finish it first (servekit canary {model} {canary.version} --percent 0)",
                    keep_routes=True,
                )
            states = versions(self.deployer.client, model)
            if version not in {s.version for s in states}:
                self._status(phase="register")
                self.deployer.register(model, version)
                states = versions(self.deployer.client, model)
        default = next(s.version for s in states if s.default)
        if default == version:
            raise _Abort(f"{model} {version} is already the default", keep_routes=True)
        return default

    def _claim(self, model: str, version: str) -> None:
        """Take the status file, unless a live rollout of ``model`` holds it (under the state lock)."""
        if self.status is None:
            return
        try:
            current = self.status.read()
        except DeployError:
            current = None  # unreadable: replaced by this rollout's
        if current is not None and current.get("state") == "running":
            other = RolloutProcess.of(current)
            if other is not None and other != self.status.process and other.alive():
                where = _where(current)
                raise _Abort(
                    f"a rollout of {model} is already running (pid {other.pid}: {current.get('version')}"
                    f"{', ' + where if where else ''}): see servekit rollout --status {model}",
                    keep_routes=True,
                )
        self.status.start(model=model, version=version, phase="prepare", steps=list(self.steps),
                          of=len(self.steps), step=0, percent=0, step_started_at=None, window=None,
                          last_step=None)  # fmt: skip
        self._claimed = True

    def _golden(self, model: str, version: str) -> None:
        results = self.deployer.golden_check(model, version)
        failed = [r for r in results if not r["ok"]]
        if failed:
            detail = ", ".join(f"{r['file']}: expected {r['expected']}, got {r['got']} ({r['status']})" for r in failed)
            raise _Abort(f"golden set failed ({len(failed)}/{len(results)}): {detail}")

    def _set_canary(self, model: str, version: str, percent: int) -> None:
        with self.lock(f"servekit rollout {model} {version}: canary {percent}%"):
            self._check_unchanged(model)
            self.deployer.canary(model, version, percent)
            self._ours = Canary(version, percent)

    def _check_unchanged(self, model: str) -> None:
        """The model's canary must still be the one this rollout set (None before the first step)."""
        now = self.deployments.load().model(model).canary
        if now != self._ours:
            seen = f"{now.version} at {now.percent}%" if now is not None else "none"
            raise _Abort(
                f"the canary of {model} was changed outside this rollout (now {seen}): left as it is",
                keep_routes=True,
            )

    def _watch(self, model: str, version: str, number: int, percent: int) -> tuple[Analysis, DriftCheck | None, float]:
        """Wait for the step's window to be long and full enough; its analysis, drift check and length in seconds.

        A poll whose figures cannot be read (the metrics page or Prometheus did not answer) is skipped;
        the step aborts with that error when it reaches its longest wait without a reading.
        """
        start = self.clock()
        self.source.start_step(start)
        self._status(phase="step", step=number, percent=percent, step_started_at=start, window=None, read_error=None)
        ready_at, give_up_at = start + self.step_seconds, start + self.max_wait_factor * self.step_seconds
        while True:
            self.sleep(self.poll_s)
            self._check_unchanged(model)
            now = self.clock()
            try:
                window = self.source.window(start, now)
            except MetricsError as exc:
                self._status(read_error=str(exc))
                if now >= give_up_at:
                    raise _Abort(f"the step's figures could not be read: {exc}") from None
                continue
            analysis = analyse(window.canary, window.default, self.thresholds, self._baseline)
            drift = self._drift(window)
            self._status(window={"seconds": round(now - start, 1), **_figures(analysis, drift),
                                 "reason": analysis.reason or (drift.reason if drift else None)},
                         read_error=None)  # fmt: skip
            enough = analysis.canary.requests >= self.thresholds.min_requests
            if (now >= ready_at and enough) or now >= give_up_at:
                return analysis, drift, now - start

    def _drift(self, window: Window) -> DriftCheck | None:
        if self.max_drift is None or self._reference is None:
            return None
        return class_drift(self._reference, window.classes or {}, self.max_drift)

    def _store_reference(self, model: str, version: str) -> Reference:
        return load_reference(Path(self.deployer.store), model, version)

    # ------------------------------------------------------------------ the end
    def _abort(
        self, model: str, version: str, percent: int, reason: str, keep_routes: bool, exit_code: int = 1
    ) -> RolloutAborted:
        """Canary back to 0 (unless another command owns it now), the event recorded; the error to raise."""
        removed, problem = False, None
        with _sigint_ignored():
            if not keep_routes:
                try:
                    with self.lock(f"servekit rollout {model} {version}: abort"):
                        current = self.deployments.load().model(model).canary
                        if current is not None and current.version == version:
                            self.deployer.canary(model, version, 0)
                            removed = True
                except ServekitError as exc:  # still report the abort, and why the canary may be left
                    problem = str(exc)
            self._record("rollout-aborted", model, version, percent=percent, reason=reason,
                         canary_removed=removed, **({"cleanup_error": problem} if problem else {}))  # fmt: skip
            where = f" at {percent}%" if percent else ""
            tail = "canary removed, default unchanged" if removed else "default unchanged"
            if problem:
                tail = f"could not remove the canary ({problem}): run servekit canary {model} {version} --percent 0"
            message = f"rollout of {model} {version} aborted{where}: {reason}; {tail}"
            self._finish("aborted", {"reason": reason, "percent": percent, "canary_removed": removed,
                                     "exit_code": exit_code, "message": message,
                                     **({"cleanup_error": problem} if problem else {})})  # fmt: skip
        return RolloutAborted(message, exit_code)

    def _status(self, **changes: Any) -> None:
        if self._claimed and self.status is not None:
            self.status.write(**changes)

    def _finish(self, result: str, outcome: dict) -> None:
        if self._claimed and self.status is not None:
            self.status.write(state=result, phase="done", outcome={"result": result, "at": self.clock(), **outcome})

    def _record(self, action: str, model: str, version: str, **fields: Any) -> dict:
        event = self.deployments.record(action, model, version=version, **fields)
        self.emit(event)
        return event


def _figures(analysis: Analysis, drift: DriftCheck | None = None) -> dict:
    return {
        "canary": analysis.canary.as_dict(),
        "default": analysis.default.as_dict(),
        "error_limit": analysis.error_limit,
        "p99_ratio": analysis.p99_ratio,
        "drift": drift.as_dict() if drift is not None else None,
    }


class _Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during a rollout: the same clean abort, with the signal's name in the reason."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise _Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """While a rollout runs, SIGINT and SIGTERM abort it cleanly (canary removed, default kept).

    Set explicitly: a process started from a background job or a supervisor may inherit SIGINT as
    ignored, and SIGTERM (``kill``, a CI timeout) would otherwise end it with the canary still live.
    Only the main thread can change signal handlers; elsewhere (tests driving ``run`` from a thread)
    the process's own handlers stay.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """A second Ctrl-C (or a SIGTERM) must not interrupt the clean-up (only the main thread can change handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------------------------------ progress lines
def format_event(event: dict) -> str:
    """One human line per rollout event (``--json`` prints the event itself); the start has a second line."""
    action, model, version = event["action"], event["model"], event.get("version")
    if action == "rollout-start":
        steps = ",".join(str(s) for s in event["steps"])
        head = f"rollout {model} {version}: default {event['default']}, steps {steps}%, figures from {event['source']}"
        return f"{head}\nsettings: {_settings_line(event['settings'], event.get('settings_from') or {})}"
    if action == "rollout-step":
        canary, default = event["canary"], event["default"]
        ratio = f"{event['p99_ratio']:.2f}" if event["p99_ratio"] is not None else "n/a"
        line = (
            f"step {event['step']}/{event['of']} {event['percent']:>3}% ({event['window_s']:.0f}s): "
            f"canary {_side(canary)} | default {_side(default)} | error limit {event['error_limit']:.1%}, "
            f"p99 ratio {ratio}{_drift_text(event.get('drift'))} -> {event['verdict']}"
        )
        return line + (f": {event['reason']}" if event.get("reason") else "")
    if action == "rollout-done":
        golden = f"{event['golden']}/{event['golden']}"
        return f"promoted {model} {version} (golden set {golden}); previous default {event['previous_default']}"
    if action == "rollout-aborted":
        return f"aborted {model} {version}: {event['reason']} (canary removed: {str(event['canary_removed']).lower()})"
    return json.dumps(event, sort_keys=True)


def _side(figures: dict) -> str:
    latency = f"{figures['p99_ms']:g} ms" if figures["p99_ms"] is not None else "n/a"
    return f"{figures['requests']} req, {figures['error_rate']:.1%} errors, p99 {latency}"


def _drift_text(drift: dict | None) -> str:
    if not drift:
        return ""
    if not drift["judged"]:
        return f", class PSI not judged ({drift['predictions']} of {drift['min_samples']} predictions)"
    return f", class PSI {drift['psi']:.3f}"


def _settings_line(settings: Mapping[str, Any], origins: Mapping[str, str]) -> str:
    parts = []
    order = {name: i for i, name in enumerate(BUILT_IN)}  # the status file's keys come back sorted
    for name, value in sorted(settings.items(), key=lambda item: order.get(item[0], len(order))):
        shown = "off" if value is None else ",".join(map(str, value)) if isinstance(value, list) else f"{value:g}"
        parts.append(f"{name} {shown} ({origins.get(name, 'given')})")
    return ", ".join(parts)


def _where(status: Mapping[str, Any]) -> str:
    """``step 1/2 at 25%`` (or the phase before the steps) of a status document."""
    if status.get("phase") == "step" and status.get("step"):
        return f"step {status['step']}/{status.get('of', '?')} at {status.get('percent')}%"
    return str(status.get("phase") or "")


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}min"
    return f"{seconds / 3600:.1f}h"


def _clock_time(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) if isinstance(epoch, int | float) else "?"


def format_status(status: Mapping[str, Any] | None, model: str, alive: bool, now: float | None = None) -> str:
    """``servekit rollout --status NAME`` for a person (``alive``: the recorded process still runs the rollout)."""
    if status is None:
        return f"no rollout of {model} has run"
    now = time.time() if now is None else now
    version, pid, state = status.get("version"), status.get("pid"), status.get("state")
    source = f"; figures from {status['source']}" if status.get("source") else ""
    lines = []
    if state == "running" and alive:
        since = status.get("step_started_at")
        where = _where(status)
        if since is not None and status.get("phase") == "step":
            where += f" for {_ago(now - since)}"
        lines.append(f"rollout of {model} {version}: running (pid {pid}), {where}{source}")
    elif state == "running":
        lines.append(
            f"rollout of {model} {version}: not running: pid {pid} is no longer this rollout and it recorded no "
            f"outcome (killed?); it was at {_where(status)} {_ago(now - status.get('updated_at', now))} ago: "
            f"check servekit state {model} for a canary left behind"
        )
    else:
        outcome = status.get("outcome") or {}
        ended = f"at {_clock_time(outcome.get('at'))}"
        process = f"pid {pid} still running" if alive else f"pid {pid} has ended"
        if state == "promoted":
            lines.append(f"rollout of {model} {version}: promoted {ended} ({process}); previous default "
                         f"{outcome.get('previous_default')}{source}")  # fmt: skip
        else:
            removed = "canary removed" if outcome.get("canary_removed") else "canary not removed by it"
            lines.append(f"rollout of {model} {version}: {state} {ended} ({process}): {outcome.get('reason')}; "
                         f"{removed}{source}")  # fmt: skip
    window = status.get("window")
    if state == "running" and window:
        ratio = f"{window['p99_ratio']:.2f}" if window.get("p99_ratio") is not None else "n/a"
        lines.append(
            f"  window {window['seconds']:.0f}s: canary {_side(window['canary'])} | default {_side(window['default'])}"
            f" | error limit {window['error_limit']:.1%}, p99 ratio {ratio}{_drift_text(window.get('drift'))}"
        )
    if status.get("read_error"):
        lines.append(f"  last read failed: {status['read_error']}")
    last = status.get("last_step")
    if last:
        lines.append(f"  last verdict: {format_event(last)}")
    if status.get("settings"):
        lines.append(f"  settings: {_settings_line(status['settings'], status.get('settings_from') or {})}")
    updated = _ago(now - status.get("updated_at", now))
    lines.append(f"  started {_clock_time(status.get('started_at'))}, updated {updated} ago")
    return "\n".join(lines)
