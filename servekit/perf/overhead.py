"""The cost of the handler metrics in ``make bench``: the same archive with them on and off.

Two TorchServes serve the same INT8 archive side by side, one started with
``SERVEKIT_HANDLER_METRICS=off`` (``handlers.metrics``: every counter a no-op); each has its own
CPU-budget registry, so the idle one does not halve the other's threads. They are loaded in turn,
in the order on, off, off, on (so a drift of the machine over the minute weighs on both alike),
with the same load generator, concurrency and duration; the rates of a mode are averaged. The
workers of the server with metrics on write every request's series into its multiprocess folder,
exactly as ``make serve`` does, and its request log lines are written in both.
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
        runs: dict[str, list[dict]] = {"on": [], "off": []}
        for mode in ORDER:
            client = servers[mode].client(timeout=120)
            url = client.url("inference", f"/predictions/{target.model}/{target.version}")
            bound = 4 * concurrency if quick else None
            run = run_hey(url, client.token("inference"), photo, concurrency, seconds, bound)
            log(f"metrics {mode}: c={concurrency}: {run['rps']} req/s, p99 {run['p99_ms']} ms, {run['errors']} errors")
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
