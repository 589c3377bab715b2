"""Progressive delivery: a canary walked through steps, then promoted or rolled back from the proxy's request log.

Workflow of ``Rollout.run`` (``servekit rollout NAME VERSION``):

1. VERSION is registered if TorchServe does not have it (``Deployer.register``: sha256 first);
2. its golden set must be all correct (``Deployer.golden_check``), before any client sees it;
3. for each step (default 10, 25, 50, 100 %): the canary is set (``Deployer.canary``); then the
   rollout waits at least ``step_seconds`` AND until the canary has served ``min_requests`` in the
   step's window (``"not enough traffic"`` after ``max_wait_factor`` x ``step_seconds``), compares
   the canary with the default over that window (``analyse``), and advances or aborts;
4. after the last step: ``Deployer.promote`` (golden set again, set-default; the split goes).

On any failure, or Ctrl-C, the canary goes back to 0 and the default is left as it was; the reason
is recorded and the command exits 1 (130 for Ctrl-C). Every step decision goes to the deployment
history (``rollout-step``, ``rollout-done``, ``rollout-aborted``) and to ``emit`` as one progress
line.

Locking: each state change (register, each step's canary, promote, the abort) takes the
``servekit`` state lock on its own, so ``servekit status``/``state``/``history`` and other models'
commands are not blocked for the whole rollout. A change to this model's canary made by anyone else
meanwhile (``servekit canary`` by hand, another rollout) is detected at the next poll or step and
aborts the rollout; the routes are then left as the other command set them.

Where the figures come from: the proxy's request log (``servekit.ops.proxy``: one JSON line per
request with ``msec``, ``uri``, ``status``, ``request_time`` and ``target``, the version the split
chose, empty for the default). TorchServe's own ``/metrics`` cannot answer the question: requests to
the default route are labelled ``default`` rather than with a version, and there is no per-version
error series or latency quantile. Only requests to ``/predictions/NAME`` through the proxy count;
the golden set and direct ``/predictions/NAME/VERSION`` calls do not.

The rules, per step window (``Thresholds``):

* error rate = the share of non-2xx answers. The canary passes if its rate is at most
  ``max(max_error_rate, default_rate + max_error_rate)``: an absolute budget, widened by what the
  default itself fails in the same window (clients sending bad images get 400 from both versions,
  which must not roll a good canary back);
* p99 ratio = canary p99 / default p99 (nearest rank, of ``request_time``) must be at most
  ``max_p99_ratio``; compared only when both sides have ``min_requests`` in the window (at 100 %
  the default gets no traffic, so the last step is judged on errors alone).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from servekit.errors import ServekitError
from servekit.ops.state import Canary
from servekit.ops.workflows import Deployer, DeployError, versions

__all__ = [
    "DEFAULT_STEPS",
    "Analysis",
    "Figures",
    "LogRecord",
    "RequestLog",
    "Rollout",
    "RolloutAborted",
    "Thresholds",
    "analyse",
    "format_event",
    "p99",
    "parse_steps",
]

DEFAULT_STEPS = (10, 25, 50, 100)
INTERRUPTED_EXIT = 130


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
    """Reads the proxy's JSON-lines request log incrementally, from where it was when ``start`` was called."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._offset = 0
        self._records: list[LogRecord] = []

    def start(self) -> None:
        """Forget everything before now: only requests logged from here on are read."""
        self._offset = self.path.stat().st_size if self.path.exists() else 0
        self._records = []

    def records(self, since: float, until: float) -> list[LogRecord]:
        """The requests finished in ``[since, until]``; older ones are forgotten (windows only move forward)."""
        self._read_new()
        self._records = [r for r in self._records if r.time >= since]
        return [r for r in self._records if r.time <= until]

    def _read_new(self) -> None:
        try:
            with self.path.open("rb") as handle:
                size = handle.seek(0, 2)
                if size < self._offset:  # replaced or truncated (rotated): read the new file from its start
                    self._offset = 0
                handle.seek(self._offset)
                data = handle.read(size - self._offset)
        except FileNotFoundError:
            return
        complete = data.rfind(b"\n") + 1  # a line nginx is still writing is read next time
        self._offset += complete
        for line in data[:complete].splitlines():
            record = LogRecord.parse(line)
            if record is not None:
                self._records.append(record)


# ------------------------------------------------------------------------------------------ the analysis
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


def analyse(
    records: list[LogRecord], model: str, version: str, thresholds: Thresholds, baseline: float | None = None
) -> Analysis:
    """Compare ``version``'s canary share of ``/predictions/model`` with the default's (module docstring rules).

    ``baseline``: the default's error rate in an earlier step, used when the default has fewer than
    ``min_requests`` in this window (at 100 % it has none): clients' bad inputs, which every version
    refuses, must not abort the last step of a good canary.
    """
    uri = f"/predictions/{model}"
    canary = Figures.of([r for r in records if r.uri == uri and r.target == f"/{version}"])
    default = Figures.of([r for r in records if r.uri == uri and r.target == ""])
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


# ------------------------------------------------------------------------------------------ the walk
def _no_lock(holder: str) -> AbstractContextManager:
    return contextlib.nullcontext()


@dataclass
class Rollout:
    """Walks one version through the canary steps; see the module docstring.

        rollout = Rollout(deployer, RequestLog(proxy.request_log), lock=lambda what: StateLock(path, holder=what))
        rollout.run("digits", "2.0")   # the rollout-done event, or raises RolloutAborted

    ``lock(holder)`` is the state lock, taken around each state change; ``emit`` gets every event
    (start, each step, done or aborted) as it happens; ``clock`` (epoch seconds, as in the log) and
    ``sleep`` are injectable so the walk can be tested without waiting.
    """

    deployer: Deployer
    log: RequestLog
    lock: Callable[[str], AbstractContextManager] = _no_lock
    thresholds: Thresholds = field(default_factory=Thresholds)
    steps: tuple[int, ...] = DEFAULT_STEPS
    step_seconds: float = 30.0
    max_wait_factor: float = 4.0
    emit: Callable[[dict], None] = lambda event: None
    clock: Callable[[], float] = field(default=time.time, repr=False)
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    poll_s: float = 1.0

    def __post_init__(self) -> None:
        if self.step_seconds <= 0:
            raise DeployError(f"--step-seconds must be above 0, got {self.step_seconds}")
        if self.max_wait_factor < 1:
            raise DeployError(f"--max-wait-factor must be at least 1, got {self.max_wait_factor}")
        self._ours: Canary | None = None  # the canary this rollout last set

    @property
    def deployments(self):
        return self.deployer.deployments

    def run(self, model: str, version: str) -> dict:
        """Register, golden set, the steps, promote: the ``rollout-done`` event; raises ``RolloutAborted``."""
        self._ours, percent = None, 0
        self._baseline: float | None = None
        try:
            default = self._prepare(model, version)
            self._announce("rollout-start", model, version=version, default=default, steps=list(self.steps))
            self._golden(model, version)
            for number, percent in enumerate(self.steps, 1):
                self._set_canary(model, version, percent)
                analysis, window = self._watch(model, version, percent)
                if analysis.default.requests >= self.thresholds.min_requests:
                    self._baseline = analysis.default.error_rate  # for steps where the default gets too little
                last = number == len(self.steps)
                verdict = "abort" if not analysis.passed else "promote" if last else "advance"
                self._record("rollout-step", model, version, step=number, of=len(self.steps), percent=percent,
                             window_s=round(window, 1), verdict=verdict, **_figures(analysis))  # fmt: skip
                if not analysis.passed:
                    raise _Abort(f"step {number} ({percent}%): {analysis.reason}")
            with self.lock(f"servekit rollout {model} {version}: promote"):
                promoted = self.deployer.promote(model, version)
            return self._record("rollout-done", model, version, previous_default=promoted["previous_default"],
                                golden=promoted["golden"], steps=list(self.steps))  # fmt: skip
        except _Abort as abort:
            raise self._abort(model, version, percent, abort.reason, abort.keep_routes) from None
        except ServekitError as exc:  # register, golden set, the lock, nginx, promote
            raise self._abort(model, version, percent, str(exc), keep_routes=False) from None
        except KeyboardInterrupt:
            raise self._abort(model, version, percent, "interrupted (SIGINT)", False, INTERRUPTED_EXIT) from None
        except Exception as exc:  # a bug or an unreadable log: still never leave the canary behind
            reason = f"internal error: {type(exc).__name__}: {exc}"
            raise self._abort(model, version, percent, reason, keep_routes=False) from exc

    # ------------------------------------------------------------------ steps
    def _prepare(self, model: str, version: str) -> str:
        """Refuse a model whose canary is taken; register ``version`` if needed. The current default."""
        with self.lock(f"servekit rollout {model} {version}: register"):
            canary = self.deployments.load().model(model).canary
            if canary is not None:
                raise _Abort(
                    f"{model} already has a canary ({canary.version} at {canary.percent}%): "
                    f"finish it first (servekit canary {model} {canary.version} --percent 0)",
                    keep_routes=True,
                )
            states = versions(self.deployer.client, model)
            if version not in {s.version for s in states}:
                self.deployer.register(model, version)
                states = versions(self.deployer.client, model)
        default = next(s.version for s in states if s.default)
        if default == version:
            raise _Abort(f"{model} {version} is already the default", keep_routes=True)
        return default

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

    def _watch(self, model: str, version: str, percent: int) -> tuple[Analysis, float]:
        """Wait for the step's window to be long and full enough; its analysis and length in seconds."""
        start = self.clock()
        ready_at, give_up_at = start + self.step_seconds, start + self.max_wait_factor * self.step_seconds
        while True:
            self.sleep(self.poll_s)
            self._check_unchanged(model)
            now = self.clock()
            analysis = analyse(self.log.records(start, now), model, version, self.thresholds, self._baseline)
            enough = analysis.canary.requests >= self.thresholds.min_requests
            if (now >= ready_at and enough) or now >= give_up_at:
                return analysis, now - start

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
        return RolloutAborted(f"rollout of {model} {version} aborted{where}: {reason}; {tail}", exit_code)

    def _announce(self, action: str, model: str, **fields: Any) -> None:
        self.emit({"action": action, "model": model, **fields})

    def _record(self, action: str, model: str, version: str, **fields: Any) -> dict:
        event = self.deployments.record(action, model, version=version, **fields)
        self.emit(event)
        return event


def _figures(analysis: Analysis) -> dict:
    return {
        "canary": analysis.canary.as_dict(),
        "default": analysis.default.as_dict(),
        "error_limit": analysis.error_limit,
        "p99_ratio": analysis.p99_ratio,
        "reason": analysis.reason,
    }


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """A second Ctrl-C must not interrupt the clean-up (only the main thread can change signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# ------------------------------------------------------------------------------------------ progress lines
def format_event(event: dict) -> str:
    """One human line per rollout event (``--json`` prints the event itself)."""
    action, model, version = event["action"], event["model"], event.get("version")
    if action == "rollout-start":
        steps = ",".join(str(s) for s in event["steps"])
        return f"rollout {model} {version}: default {event['default']}, steps {steps}%"
    if action == "rollout-step":
        canary, default = event["canary"], event["default"]
        ratio = f"{event['p99_ratio']:.2f}" if event["p99_ratio"] is not None else "n/a"
        line = (
            f"step {event['step']}/{event['of']} {event['percent']:>3}% ({event['window_s']:.0f}s): "
            f"canary {_side(canary)} | default {_side(default)} | error limit {event['error_limit']:.1%}, "
            f"p99 ratio {ratio} -> {event['verdict']}"
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
