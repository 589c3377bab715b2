"""Judging one step window: the canary's figures against the default's, and its class mix against the reference.

The rules, per step window (``Thresholds``), whatever the source:

* error rate = the share of non-2xx answers. The canary passes if its rate is at most
  ``max(max_error_rate, default_rate + max_error_rate)``: an absolute budget, widened by what the
  default itself fails in the same window (clients sending bad images get 400 from both versions,
  which must not roll a good canary back); when the default has fewer than ``min_requests`` (at
  100 % it has none), its rate from the latest step where it had enough is used;
* p99 ratio = canary p99 / default p99 must be at most ``max_p99_ratio``; compared only when both
  sides have ``min_requests`` in the window. Below 100 % a step whose default never reached
  ``min_requests`` within the step's longest wait aborts: a slow canary holds a closed-loop client's
  requests, so the default gets few exactly when the latency gate matters (at 100 % the last step is
  judged on errors alone);
* with ``max_drift``: once the canary has its archive's ``drift_min_samples`` top-1 predictions in
  the window, the PSI of their class mix against the archive's drift reference
  (``servekit.observe.drift``) must be at most ``max_drift``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from servekit.deploy.workflows import DeployError
from servekit.observe.drift import Reference, class_order, psi


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

    def as_dict(self) -> dict:
        return {**asdict(self), "error_rate": round(self.error_rate, 4)}


@dataclass(frozen=True)
class Window:
    """One step window as a source saw it: each side's figures, and the canary's top-1 classes (None: unknown)."""

    canary: Figures
    default: Figures
    classes: Mapping[str, float] | None = None


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
    canary: Figures, default: Figures, thresholds: Thresholds, baseline: float | None = None, compare: bool = False
) -> Analysis:
    """Compare the canary's figures with the default's over one window (module docstring rules).

    ``compare``: the step splits traffic (below 100 %), so the p99 ratio must be measured: a default with
    fewer than ``min_requests`` is a reason not to advance.

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
    elif compare and default.requests < thresholds.min_requests:
        reason = (
            f"not enough traffic on the default to compare p99: it had {default.requests} of "
            f"{thresholds.min_requests} requests"
        )
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
