"""The cost of the handler metrics in ``make bench``: the same archive with them on and off.

Two TorchServes serve the same INT8 archive side by side, one started with
``SERVEKIT_HANDLER_METRICS=off`` (``handlers.metrics``: every counter a no-op); each has its own
CPU-budget registry, so the idle one does not halve the other's threads. They are loaded in turn,
in the order on, off, off, on (so a drift of the machine over the minute weighs on both alike),
with the same load generator, concurrency and duration. A full run repeats that order ``ROUNDS``
times with runs of half the bench's duration, and its judged figure is the median of the rounds'
on/off ratios: on a shared 2-core machine single 10 s runs of one server move by 5-8 %, so one
round's ratio is mostly noise, and one disturbed round must not decide a 5 % bar. The
workers of the server with metrics on write every request's series into its multiprocess folder,
exactly as ``make serve`` does, and its request log lines are written in both. Before the ordered
runs each server gets 15 s of unmeasured load (full runs): the Java frontend's JIT warms up
on it, so the first measured run is not penalised for coming first.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import psutil

from handlers.cpu_budget import ENV_REGISTRY
from handlers.metrics import SWITCH
from servekit.perf.sweep import Target
from servekit.serving.server import ADDRESS_KEYS, TorchServeProcess, free_port

MAX_OVERHEAD = 0.05  # the bar: metrics cost at most 5 % of req/s
ORDER = ("on", "off", "off", "on")
ROUNDS = 4  # full runs: ORDER this many times, each run half the bench's --seconds; quick runs: once
WARMUP_SECONDS = 15.0  # unmeasured load on each server before the ordered runs (the frontend JIT settles)


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
    result = switch_overhead(
        workdir, store, target, photo, concurrency, seconds, quick, run_hey, log,
        name="metrics", envs={"on": {SWITCH: "on"}, "off": {SWITCH: "off"}}, content_type=content_type,
    )  # fmt: skip
    result["description"] = (
        f"{target.archive}, /predictions at c={concurrency}, handler metrics on vs off ({SWITCH}=off), "
        f"order {', '.join(ORDER)}"
    )
    return result


def switch_overhead(
    workdir: Path,
    store: Path,
    target: Target,
    photo: Path,
    concurrency: int,
    seconds: float,
    quick: bool,
    run_hey: Callable[..., dict],
    log: Callable[[str], None],
    *,
    name: str,
    envs: dict[str, dict[str, str]],
    content_type: str = "image/jpeg",
) -> dict:
    """Two TorchServes serving ``target``, one with ``envs["on"]`` and one with ``envs["off"]`` in their
    environment, loaded in the order ``ORDER``; the mean req/s of each and on over off."""
    servers: dict[str, TorchServeProcess] = {}
    try:
        for mode in ("on", "off"):
            folder = workdir / f"{name}_{mode}"
            server = TorchServeProcess(
                workdir=folder, model_store=store, ports={kind: free_port() for kind in ADDRESS_KEYS},
                load_models="", env={**envs[mode], ENV_REGISTRY: str(folder / "cpu")},
            )  # fmt: skip
            server.start()
            servers[mode] = server
            target.register(server.client(timeout=600))

        def load(mode: str, seconds: float, bound: int | None) -> dict:
            client = servers[mode].client(timeout=120)
            url = client.url("inference", f"/predictions/{target.model}/{target.version}")
            token = client.token("inference")
            before = process_cpu(servers[mode].process.pid)
            run = run_hey(url, token, photo, concurrency, seconds, bound, content_type=content_type)
            after = process_cpu(servers[mode].process.pid)
            if run.get("requests"):
                run["cpu_us_per_request"] = {part: round((after[part] - before[part]) * 1e6 / run["requests"], 1)
                                             for part in after}  # fmt: skip
            return run

        if not quick:  # the frontends' JIT warms up on unmeasured load first: the first run is not the slowest
            for mode in ("on", "off"):
                load(mode, WARMUP_SECONDS, None)
        runs: dict[str, list[dict]] = {"on": [], "off": []}
        round_ratios: list[float] = []
        rounds, each = (1, seconds) if quick else (ROUNDS, seconds / 2)
        for index in range(rounds):
            rates: dict[str, list[float]] = {"on": [], "off": []}
            for mode in ORDER:
                run = load(mode, each, 4 * concurrency if quick else None)
                log(
                    f"{target.model} {name} {mode} (round {index + 1}/{rounds}): c={concurrency}: {run['rps']} req/s, "
                    f"p99 {run['p99_ms']} ms, {run['errors']} errors"
                )
                runs[mode].append(run)
                rates[mode].append(run["rps"])
            if sum(rates["off"]):
                round_ratios.append(round(sum(rates["on"]) / sum(rates["off"]), 3))
    finally:
        for server in servers.values():
            server.stop()
    mean = {mode: sum(r["rps"] for r in rs) / len(rs) for mode, rs in runs.items()}
    ratio = round(statistics.median(round_ratios), 3) if round_ratios else None
    cpu = {mode: mean_cpu(rs) for mode, rs in runs.items()}
    return {
        "description": f"{target.archive}, /predictions at c={concurrency}, {name} on vs off, order {', '.join(ORDER)}",
        "runs": runs,
        "round_ratios": round_ratios,  # on/off per round of ORDER; on_over_off is their median
        "run_seconds": None if quick else round(each, 1),
        # the server's own CPU per answered request (frontend, workers), mean of the measured runs
        "served_cpu_us": cpu,
        "cpu_on_over_off": round(sum(cpu["on"].values()) / sum(cpu["off"].values()), 3)
        if cpu["on"] and cpu["off"]
        else None,
        "rps_on": round(mean["on"], 1),
        "rps_off": round(mean["off"], 1),
        "on_over_off": ratio,
        "overhead": round(1 - ratio, 3) if ratio is not None else None,
    }


def process_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of a TorchServe's processes: its Java frontend, and its workers
    (with the launcher, which sleeps). A process gone meanwhile no longer counts; a run's figure is a difference."""
    totals = {"frontend": 0.0, "workers": 0.0}
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return totals
    for process in processes:
        try:
            times = process.cpu_times()
            totals["frontend" if process.name() == "java" else "workers"] += times.user + times.system
        except psutil.Error:
            continue
    return totals


def mean_cpu(runs: list[dict]) -> dict[str, float]:
    """The mean of the runs' ``cpu_us_per_request`` per part; empty when no run has one."""
    measured = [r["cpu_us_per_request"] for r in runs if r.get("cpu_us_per_request")]
    if not measured:
        return {}
    return {part: round(sum(m[part] for m in measured) / len(measured), 1) for part in measured[0]}


def cpu_note(result: dict) -> str:
    """The server's CPU per request with the feature on and off, for a report; empty when not measured."""
    cpu = result.get("served_cpu_us") or {}
    if not cpu.get("on") or not cpu.get("off"):
        return ""
    parts = "; ".join(f"{mode}: frontend {cpu[mode]['frontend']:.0f} µs, workers {cpu[mode]['workers']:.0f} µs"
                      for mode in ("on", "off"))  # fmt: skip
    return (
        f"The server's own CPU per answered request (its process tree, mean of the measured runs): {parts}; "
        f"on over off {result.get('cpu_on_over_off')}."
    )


def rounds_note(result: dict) -> str:
    """How ``switch_overhead``'s on/off figure was formed, for a report: empty for a single round."""
    ratios = result.get("round_ratios") or []
    if len(ratios) < 2:
        return ""
    return (f", the median of {len(ratios)} rounds' ratios ({', '.join(str(r) for r in ratios)}; "
            f"runs of {result.get('run_seconds')} s)")  # fmt: skip


# One answered request's calls on the handler metrics, as the base handler makes them (a batch's own
# calls, batch size and inference/postprocess time, counted once per request: an upper bound).
_COUNTER_LOOP = """
import json, sys, time
from handlers.metrics import handler_metrics
m = handler_metrics("model", "1.0")
def one():
    m.batch(8)
    m.input(brightness=0.4, megapixels=0.3)
    for stage in ("decode", "preprocess", "inference", "postprocess"):
        m.stage(stage, 0.002)
    m.prediction("3", 0.97)
    m.request(200, 0.004)
n = int(sys.argv[1])
for _ in range(1000):
    one()
best = float("inf")
for _ in range(5):
    started = time.perf_counter()
    for _ in range(n):
        one()
    best = min(best, (time.perf_counter() - started) / n)
print(json.dumps(best * 1e6))
"""


def counter_cost_us(requests: int = 20000) -> float:
    """Microseconds one request's handler-metrics calls take, in a fresh process writing a multiprocess folder.

    The best of 5 loops of ``requests``: the counting's own cost, free of the served path's noise.
    """
    with tempfile.TemporaryDirectory(prefix="servekit-counters-") as folder:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": folder, SWITCH: "on"}
        root = Path(__file__).resolve().parents[2]
        done = subprocess.run([sys.executable, "-c", _COUNTER_LOOP, str(requests)], env=env, cwd=root,
                              capture_output=True, text=True, check=True, timeout=300)  # fmt: skip
    return round(json.loads(done.stdout), 2)


def with_counter_share(result: dict, counter_us: float, cores: int) -> dict:
    """``result`` with the counters' cost as a share of the CPU one request had (all cores over req/s, metrics off)."""
    cpu_us = cores * 1e6 / result["rps_off"] if result.get("rps_off") else None
    return {
        **result,
        "counter_us_per_request": counter_us,
        "cpu_us_per_request": round(cpu_us, 1) if cpu_us else None,
        "counter_share": round(counter_us / cpu_us, 4) if cpu_us else None,
    }


def counter_bar(result: dict) -> dict[str, bool]:
    share = result.get("counter_share")
    name = f"handler metrics counters cost <= {MAX_OVERHEAD:.0%} of a request's CPU (in-process cost / served CPU)"
    return {name: share is not None and share <= MAX_OVERHEAD}


def overhead_bar(result: dict) -> dict[str, bool]:
    ratio = result.get("on_over_off")
    return {f"handler metrics cost <= {MAX_OVERHEAD:.0%} of req/s": ratio is not None and ratio >= 1 - MAX_OVERHEAD}
