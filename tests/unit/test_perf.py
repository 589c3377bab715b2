"""The statistics the benchmark and the soak share, and the soak's pure steps: no server."""

from __future__ import annotations

import pytest

from servekit.perf.soak import Result, latency_comparison, per_second, scaling_window
from servekit.perf.stats import ms, percentile


# ------------------------------------------------------------------------------------------ percentile
def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 95) == 95  # 0.95 * 100 is 94.99999999999999 in binary: the rank must not slip
    assert percentile(values, 99) == 99  # rounding half to even gave the maximum here
    assert percentile(values, 100) == 100
    assert percentile(values, 0) == 1
    assert percentile(reversed(values), 99) == 99  # any order
    assert percentile(list(range(1, 1001)), 99.9) == 999


def test_percentile_of_few_values_and_of_none() -> None:
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0], 50) == 1.0
    assert percentile([1.0, 2.0], 51) == 2.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match="between 0 and 100"):
        percentile([1.0], 101)


def test_ms_rounds_and_keeps_none() -> None:
    assert ms(0.0123456) == 12.35
    assert ms(None) is None


# ------------------------------------------------------------------------------------------ soak steps
def test_scaling_window_runs_from_the_scale_up_call_to_grace_after_the_last_call() -> None:
    events = [
        {"action": "up", "t_start": 12.0, "t_end": 15.5},
        {"action": "down", "t_start": 18.0, "t_end": 18.4},
        {"action": "limits", "t_start": 18.4, "t_end": 18.6},
    ]
    assert scaling_window(events, t_up=12.0, seconds=30.0, grace=5.0) == (12.0, 23.6)
    assert scaling_window([], t_up=12.0, seconds=30.0, grace=5.0) == (12.0, 35.0)  # no call made: the planned span


def test_latency_comparison_takes_the_first_and_last_quarter_of_a_short_run() -> None:
    results = [Result(due=t, latency=0.010, status=200) for t in range(0, 10)]
    results += [Result(due=t, latency=0.030, status=200) for t in range(30, 40)]
    results += [Result(due=39.5, latency=9.0, status=503)]  # errors do not count as latency
    comparison = latency_comparison(results, seconds=40.0, max_ratio=1.5)
    assert comparison == {"span_s": 10.0, "p50_first_ms": 10.0, "p50_last_ms": 30.0, "ratio": 3.0, "max_ratio": 1.5}
    assert latency_comparison([], seconds=40.0, max_ratio=1.5)["ratio"] is None


def test_per_second_buckets_by_due_time() -> None:
    results = [Result(0.1, 0.02, 200), Result(0.6, 0.04, 200), Result(1.2, 5.0, -1, "ConnectionError")]
    rows = per_second(results, seconds=3, workers={0: 1, 1: 2})
    assert [(r["t"], r["requests"], r["ok"], r["errors"], r["workers"]) for r in rows] == [
        (0, 2, 2, 0, 1),
        (1, 1, 0, 1, 2),
        (2, 0, 0, 0, None),
    ]
    assert (rows[0]["p50_ms"], rows[0]["p99_ms"], rows[0]["max_ms"]) == (20.0, 40.0, 40.0)
    assert rows[1]["p50_ms"] is None
