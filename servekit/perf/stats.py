"""Latency statistics shared by the benchmark and the soak.

``percentile`` is the nearest-rank percentile: the smallest value with at least q % of the values
at or below it, i.e. the ``ceil(q / 100 * n)``-th smallest. So p50 of 1..100 is 50, p99 is 99
and p100 the maximum; p99 of fewer than 100 values is the maximum. The rank is computed in exact
arithmetic, so that binary floating point (0.95 * 100 = 94.99999999999999) cannot move it by one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from fractions import Fraction


def percentile(values: Iterable[float], q: float) -> float | None:
    """The nearest-rank ``q`` th percentile (0 < q <= 100) of ``values``, in any order; None when empty."""
    ordered = sorted(values)
    if not ordered:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be between 0 and 100, got {q}")
    rank = math.ceil(Fraction(str(q)) * len(ordered) / 100)
    return ordered[min(len(ordered), max(1, rank)) - 1]


def ms(seconds: float | None, digits: int = 2) -> float | None:
    """Seconds as milliseconds rounded to ``digits`` places; None stays None."""
    return None if seconds is None else round(seconds * 1000, digits)
