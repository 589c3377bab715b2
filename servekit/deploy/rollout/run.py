"""The walk: ``Rollout.run`` through the steps, its clean abort, and the signals that trigger one.

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

Locking: each state change (register, each step's canary, promote, the abort) takes the
``servekit`` state lock on its own, so ``servekit status``/``state``/``history`` and other models'
commands are not blocked for the whole rollout. A change to this model's canary made by anyone else
meanwhile (``servekit canary`` by hand, another rollout) is detected at the next poll or step and
aborts the rollout; the routes are then left as the other command set them.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servekit.deploy.rollout.judging import Analysis, DriftCheck, Thresholds, Window, analyse, class_drift
from servekit.deploy.rollout.settings import DEFAULT_STEPS
from servekit.deploy.rollout.sources import FigureSource
from servekit.deploy.rollout.status import RolloutProcess, StatusFile, position
from servekit.deploy.state import Canary
from servekit.deploy.workflows import Deployer, DeployError, versions
from servekit.errors import ServekitError
from servekit.observe.drift import Reference, load_reference
from servekit.observe.metrics_source import MetricsError

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
                where = position(current)
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
            analysis = analyse(window.canary, window.default, self.thresholds, self._baseline, compare=percent < 100)
            drift = self._drift(window)
            self._status(window={"seconds": round(now - start, 1), **_figures(analysis, drift),
                                 "reason": analysis.reason or (drift.reason if drift else None)},
                         read_error=None)  # fmt: skip
            # Below 100 % both sides need min_requests: the default's p99 is the canary's yardstick.
            needed = (analysis.canary, analysis.default) if percent < 100 else (analysis.canary,)
            enough = all(side.requests >= self.thresholds.min_requests for side in needed)
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
