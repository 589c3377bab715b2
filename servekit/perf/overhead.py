"""The cost of the handler metrics in ``make bench``: the same archive with them on and off.

Two TorchServes serve the same INT8 archive side by side, one started with
``SERVEKIT_HANDLER_METRICS=off`` (``handlers.metrics``: every counter a no-op); each has its own
CPU-budget registry, so the idle one does not halve the other's threads. They are loaded in turn,
in the order on, off, off, on (so a drift of the machine over the minute weighs on both alike),
with the same load generator, concurrency and duration; the rates of a mode are averaged. The
workers of the server with metrics on write every request's series into its multiprocess folder,
exactly as ``make serve`` does, and its request log lines are written in both. Before the ordered
runs each server gets a few seconds of unmeasured load (full runs): the Java frontend's JIT warms up
on it, so the first measured run is not penalised for coming first.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from handlers.cpu_budget import ENV_REGISTRY
from handlers.metrics import SWITCH
from servekit.ops.server import ADDRESS_KEYS, TorchServeProcess, free_port
from servekit.perf.sweep import Target

MAX_OVERHEAD = 0.05  # the bar: metrics cost at most 5 % of req/s
ORDER = ("on", "off", "off", "on")
WARMUP_SECONDS = 3.0  # unmeasured load on each server before the ordered runs


def metrics_overhead(
    workdir: Path,
    store: Path,
    target: Target,
    photo: Path,
    concurrency: int,
    seconds: float,
    quick: bool,
    run_hey: Callable[..., dict],
    log: Callable[[str], None],
    content_type: str = "image/jpeg",
) -> dict:
    servers: dict[str, TorchServeProcess] = {}
    try:
        for mode in ("on", "off"):
            folder = workdir / f"metrics_{mode}"
            server = TorchServeProcess(
                workdir=folder, model_store=store, ports={kind: free_port() for kind in ADDRESS_KEYS},
                load_models="", env={SWITCH: mode, ENV_REGISTRY: str(folder / "cpu")},
            )  # fmt: skip
            server.start()
            servers[mode] = server
            target.register(server.client(timeout=600))

        def load(mode: str, seconds: float, bound: int | None) -> dict:
            client = servers[mode].client(timeout=120)
            url = client.url("inference", f"/predictions/{target.model}/{target.version}")
            token = client.token("inference")
            return run_hey(url, token, photo, concurrency, seconds, bound, content_type=content_type)

        if not quick:  # the frontends' JIT warms up on unmeasured load first: the first run is not the slowest
            for mode in ("on", "off"):
                load(mode, WARMUP_SECONDS, None)
        runs: dict[str, list[dict]] = {"on": [], "off": []}
        for mode in ORDER:
            run = load(mode, seconds, 4 * concurrency if quick else None)
            log(
                f"{target.model} metrics {mode}: c={concurrency}: {run['rps']} req/s, p99 {run['p99_ms']} ms, "
                f"{run['errors']} errors"
            )
            runs[mode].append(run)
    finally:
        for server in servers.values():
            server.stop()
    mean = {mode: sum(r["rps"] for r in rs) / len(rs) for mode, rs in runs.items()}
    ratio = round(mean["on"] / mean["off"], 3) if mean["off"] else None
    return {
        "description": f"{target.archive}, /predictions at c={concurrency}, handler metrics on vs off "
        f"({SWITCH}=off), order {', '.join(ORDER)}",
        "runs": runs,
        "rps_on": round(mean["on"], 1),
        "rps_off": round(mean["off"], 1),
        "on_over_off": ratio,
        "overhead": round(1 - ratio, 3) if ratio is not None else None,
    }


def overhead_bar(result: dict) -> dict[str, bool]:
    ratio = result.get("on_over_off")
    return {f"handler metrics cost <= {MAX_OVERHEAD:.0%} of req/s": ratio is not None and ratio >= 1 - MAX_OVERHEAD}
