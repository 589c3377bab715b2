"""The worker sweep of ``make bench``: one version at 1..4 workers, then two registrations x 2 workers.

Every layout is reached the way operators reach it, with the management API on a running server
(scale, register), and loaded with ``hey`` for the same time at the same total concurrency; with
two registrations the clients are split evenly between them and their rates add up. The second
registration is the same archive under another model name (``model_name=``): two versions of equal
cost side by side, as during a rollout, so that the layouts compare the serving, not the models.
The CPU budget (``handlers.cpu_budget``) is what should keep every layout near the best one.
A full run measures each layout twice, in mirrored order, and keeps the mean (``worker_sweep``).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from servekit.serving.client import TorchServeClient

WORKER_COUNTS = (1, 2, 3, 4)


@dataclass(frozen=True)
class Target:
    model: str
    version: str
    archive: str

    def register(self, client: TorchServeClient) -> None:
        params = {"url": self.archive, "model_name": self.model, "synchronous": "true"}
        client.manage("POST", "/models", params=params, timeout=600)


def _scale(client: TorchServeClient, target: Target, workers: int) -> None:
    params = {"min_worker": workers, "max_worker": workers, "synchronous": "true"}
    client.manage("PUT", f"/models/{target.model}/{target.version}", params=params, timeout=600)


def _load(
    client: TorchServeClient,
    run_hey: Callable[..., dict],
    photo: Path,
    targets: list[Target],
    total: int,
    seconds: float,
    quick: bool,
) -> dict:
    """All ``targets`` loaded at once, ``total`` clients split between them; rates summed, worst p99 kept."""
    share = max(1, total // len(targets))
    token = client.token("inference")

    def one(target: Target) -> dict:
        url = client.url("inference", f"/predictions/{target.model}/{target.version}")
        return run_hey(url, token, photo, share, seconds, 4 * share if quick else None)

    with ThreadPoolExecutor(len(targets)) as pool:
        runs = list(pool.map(one, targets))
    p99s = [r["p99_ms"] for r in runs if r["p99_ms"] is not None]
    return {
        "requests": sum(r["requests"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
        "rps": round(sum(r["rps"] for r in runs), 1),
        "p99_ms": max(p99s) if p99s else None,
        "per_version": {t.version: r for t, r in zip(targets, runs, strict=True)},
    }


def worker_sweep(
    client: TorchServeClient,
    run_hey: Callable[..., dict],
    photo: Path,
    main: Target,
    other: Target,
    concurrency: int,
    seconds: float,
    quick: bool,
    log: Callable[[str], None],
) -> list[dict]:
    """Layouts: ``main`` at 1..4 workers, then ``main`` and ``other`` at 2 workers each.

    A full run measures every layout twice, in mirrored order (1, 2, 3, 4 workers, two versions, two
    versions, 4, 3, 2, 1), and reports the mean of the two passes: a machine whose speed drifts over
    the minutes of the sweep (shared hosts do, by 10-30 %) then weighs on every layout alike instead
    of on whichever comes last. ``quick``: one pass over 1 and 2 workers and the two versions.
    """
    counts = WORKER_COUNTS[:2] if quick else WORKER_COUNTS
    passes: dict[str, list[dict]] = {}
    workers_of: dict[str, int] = {}
    pair = f"{main.model} {main.version} x2 + {other.model} {other.version} x2"

    def measure(layout: str, workers: int, targets: list[Target]) -> None:
        result = _load(client, run_hey, photo, targets, concurrency, seconds, quick)
        passes.setdefault(layout, []).append(result)
        workers_of[layout] = workers
        log(f"sweep {layout} (pass {len(passes[layout])}): {result['rps']} req/s, p99 {result['p99_ms']} ms")

    def single(workers: int) -> None:
        _scale(client, main, workers)
        measure(f"{main.model} {main.version} x{workers}", workers, [main])

    main.register(client)
    try:
        for workers in counts:
            single(workers)
        _scale(client, main, 2)
        other.register(client)
        try:
            _scale(client, other, 2)
            for _ in range(1 if quick else 2):
                measure(pair, 4, [main, other])
        finally:
            client.manage("DELETE", f"/models/{other.model}/{other.version}")
        if not quick:
            for workers in reversed(counts):
                single(workers)
    finally:
        client.manage("DELETE", f"/models/{main.model}/{main.version}")
    return [_combined(layout, workers_of[layout], runs) for layout, runs in passes.items()]


def _combined(layout: str, workers: int, runs: list[dict]) -> dict:
    """One layout's passes as one row: requests and errors summed, req/s and p99 the passes' means."""
    p99s = [r["p99_ms"] for r in runs if r["p99_ms"] is not None]
    return {
        "layout": layout,
        "workers": workers,
        "requests": sum(r["requests"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
        "rps": round(sum(r["rps"] for r in runs) / len(runs), 1),
        "p99_ms": round(sum(p99s) / len(p99s), 1) if p99s else None,
        "passes": [{"rps": r["rps"], "p99_ms": r["p99_ms"]} for r in runs],
        "per_version": runs[-1]["per_version"],
    }


def sweep_bars(layouts: list[dict]) -> dict[str, bool]:
    """The issue's bars: every layout with 2+ workers >= 90 % of the best req/s, p99 <= 1.5x the best p99."""
    best_rps = max(layout["rps"] for layout in layouts)
    p99s = [layout["p99_ms"] for layout in layouts if layout["p99_ms"] is not None]
    best_p99 = min(p99s) if p99s else None
    multi = [layout for layout in layouts if layout["workers"] >= 2]
    return {
        "sweep: every 2+ worker layout >= 90% of the best req/s": all(m["rps"] >= 0.9 * best_rps for m in multi),
        "sweep: every 2+ worker layout p99 <= 1.5x the best": best_p99 is not None
        and all(m["p99_ms"] is not None and m["p99_ms"] <= 1.5 * best_p99 for m in multi),
    }
