"""Soak: a bounded open-loop load near capacity, with workers scaled up and back down in the middle.

    python -m servekit.perf.soak --minutes 10 --rate-fraction 0.7    # -> results/soak/latest.json, latest.png

1. starts its own TorchServe (free loopback ports, a temporary workdir under build/) with one version;
2. measures capacity: a closed-loop run of ``--capacity-seconds`` at ``--capacity-concurrency`` with
   the very client that then drives the load (its CPU use counts: client and server share the
   machine), or with ``hey`` (``--capacity-tool hey``: the server's capacity with a compiled client;
   on a 2-core machine the Python open-loop client cannot sustain 70 % of that);
3. sends requests at ``rate-fraction x capacity`` on a fixed schedule for ``--minutes``: open loop, a
   request's latency counts from the moment it was due, so a stalled server shows up as latency even
   when every client thread is waiting (no coordinated omission). Every answer's top label is checked
   against the digit sent;
4. at 40 % of the run scales the version to ``--scale-workers`` workers, at 60 % back to the workers
   it had (``PUT /models/{name}/{version}?min_worker=N&max_worker=N&synchronous=true``: TorchServe only
   stops workers above ``max_worker``), then puts min/max back as they were (no worker change);
5. records per second (by due time): requests, answers, errors, latency p50/p95/p99/max, workers.

``--max-rate`` caps the load (req/s) whatever the capacity: for a quick run on a shared machine.

Checks (exit status 1 when one fails): every planned request sent and answered (not aborted); the
scaling calls answered 200 and the READY workers followed them; no error outside the scaling window
(from the scale-up call to ``--grace-seconds`` after the last scaling call returned); the p50 latency
of the last minute (or last quarter of a shorter run) within ``--max-p50-ratio`` of the first one.
Writes ``<out>/latest.json`` and ``<out>/latest.png`` (latency, throughput, errors and workers over
time). Traffic goes only to 127.0.0.1; everything is bounded: the run, each request (``--timeout``),
and the backlog (the run is aborted when requests fall more than ``--max-backlog-seconds`` behind).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import math
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from servekit.errors import ServekitError
from servekit.perf.stats import ms, percentile
from servekit.serving.client import TorchServeClient
from servekit.serving.server import ADDRESS_KEYS, REPO_ROOT, TorchServeProcess, free_port
from servekit.serving.store import archive_name

SAMPLES = REPO_ROOT / "samples"


@dataclass
class Result:
    due: float  # seconds since the load started, when the request was scheduled
    latency: float  # seconds from due to the end of the answer (or of the failure)
    status: int  # HTTP status; -1 for no answer (timeout, connection error); 0 for a wrong label
    detail: str = ""


# ----------------------------------------------------------------------------------------- load
class DigitSender:
    """Sends held-out digit images over keep-alive connections (one per thread); checks the top label."""

    def __init__(self, client: TorchServeClient, path: str, samples: list[bytes]) -> None:
        self.sender = client.keep_alive(path)
        self.samples = samples
        self.timeout = client.timeout

    def send(self, digit: int) -> tuple[int, str]:
        try:
            status, body = self.sender.post(self.samples[digit])
        except (OSError, http.client.HTTPException) as exc:
            return -1, f"{type(exc).__name__}: {exc}"
        if status != 200:
            return status, body[:200].decode(errors="replace")
        try:
            label = json.loads(body)["predictions"][0]["label"]
        except (ValueError, KeyError, IndexError):
            return 0, f"unreadable answer: {body[:200]!r}"
        return (200, "") if label == str(digit) else (0, f"sent {digit}, answered {label}")


def closed_loop(sender: DigitSender, concurrency: int, seconds: float) -> dict:
    """Each thread sends its next request when the previous one is answered."""
    stop_at = time.monotonic() + seconds
    counts = {"ok": 0, "errors": 0}
    lock = threading.Lock()

    def run(k: int) -> None:
        i = k
        while time.monotonic() < stop_at:
            status, _ = sender.send(i % 10)
            i += 1
            with lock:
                counts["ok" if status == 200 else "errors"] += 1

    started = time.monotonic()
    threads = [threading.Thread(target=run, args=(k,)) for k in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    return {"tool": "python", "rps": round(counts["ok"] / elapsed, 1), **counts, "seconds": round(elapsed, 1)}


def hey_closed_loop(url: str, token: str, image: Path, concurrency: int, seconds: float) -> dict:
    command = [
        "hey", "-z", f"{seconds}s", "-c", str(concurrency), "-m", "POST", "-T", "application/octet-stream",
        "-D", str(image), "-H", f"Authorization: Bearer {token}", "-t", "30", url,
    ]  # fmt: skip
    output = subprocess.run(command, check=True, capture_output=True, text=True, timeout=seconds + 60).stdout
    total = float(re.search(r"Total:\s+([\d.]+) secs", output).group(1))
    statuses = {int(code): int(n) for code, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", output)}
    ok = statuses.get(200, 0)
    return {
        "tool": "hey",
        "rps": round(ok / total, 1),
        "ok": ok,
        "errors": sum(statuses.values()) - ok,
        "seconds": total,
    }


@dataclass
class OpenLoop:
    """Requests due every 1/rate s for ``seconds``; ``threads`` senders take them from a queue in order.

    A request's latency counts from when it was due, so a stalled server shows up as latency even
    while every sender waits (no coordinated omission). The run is aborted when more than
    ``max_backlog`` seconds of requests are due but not picked up.
    """

    sender: DigitSender
    rate: float
    seconds: float
    threads: int
    max_backlog: float
    due_queue: queue.Queue = field(default_factory=queue.Queue, init=False)
    results: list[Result] = field(default_factory=list, init=False)
    lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def run(self, on_tick: Callable[[float], None]) -> dict:
        """Send the schedule; ``on_tick(t)`` once per second of due time. The results and why it aborted."""
        self.start = time.monotonic()
        senders = [threading.Thread(target=self._send_loop, daemon=True) for _ in range(self.threads)]
        for thread in senders:
            thread.start()
        aborted = self._schedule(on_tick)
        if aborted:  # drop what was not sent yet
            with contextlib.suppress(queue.Empty):
                while True:
                    self.due_queue.get_nowait()
        for _ in senders:
            self.due_queue.put(None)
        deadline = time.monotonic() + self.sender.timeout + 10
        for thread in senders:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        with self.lock:
            return {"results": list(self.results), "aborted": aborted}

    def _schedule(self, on_tick: Callable[[float], None]) -> str | None:
        next_tick = 0
        for i in range(int(self.rate * self.seconds)):
            due = i / self.rate
            now = time.monotonic() - self.start
            if due > now:
                time.sleep(due - now)
            # Backlog: requests due but not yet picked up by a sender.
            if self.due_queue.qsize() > self.max_backlog * self.rate:
                return f"more than {self.max_backlog:.0f}s of requests behind schedule at t={due:.1f}s"
            self.due_queue.put((due, i % 10))
            if due >= next_tick:
                on_tick(due)
                next_tick = math.floor(due) + 1
        return None

    def _send_loop(self) -> None:
        while (item := self.due_queue.get()) is not None:
            due, digit = item
            status, detail = self.sender.send(digit)
            with self.lock:
                self.results.append(Result(due, time.monotonic() - self.start - due, status, detail))


# ----------------------------------------------------------------------------------------- scaling
SCALE_RETRIES = 1  # a scaling call TorchServe answers with 500 is sent once more (see Scaler.scale)
SCALE_RETRY_PAUSE_S = 1.0


class Scaler:
    """Scales one version beside the load, on the load's clock, and samples its workers once a second."""

    def __init__(self, client: TorchServeClient, model: str, version: str) -> None:
        self.client, self.model, self.version = client, model, version
        self.events: list[dict] = []
        self.workers: dict[int, int] = {}
        self.load_over = threading.Event()
        self.started = time.monotonic()

    def describe(self) -> dict:
        return self.client.describe(self.model, self.version, timeout=10)[0]

    def ready_workers(self) -> int:
        return sum(w["status"] == "READY" for w in self.describe()["workers"])

    def scale(self, min_workers: int, max_workers: int) -> dict:
        """Set the worker range; a 500 is retried once (``SCALE_RETRIES``), and every attempt is kept.

        TorchServe 0.12 can answer a scale-down with 500 when a worker it stops still has a batch in
        flight (a ``ConcurrentModificationException`` in its ``BatchAggregator.sendError``). The call
        sets a range, so repeating it is safe; the event's ``status`` is the last attempt's, and
        ``attempts`` keeps every answer so the report shows that TorchServe needed a second call.
        """
        started = time.monotonic()
        path = f"/models/{self.model}/{self.version}?min_worker={min_workers}&max_worker={max_workers}&synchronous=true"
        attempts = []
        for attempt in range(1 + SCALE_RETRIES):
            if attempt:
                time.sleep(SCALE_RETRY_PAUSE_S)
            response = self.client.call("management", "PUT", path, timeout=300)
            try:
                answer = response.json()
            except ValueError:
                answer = {"message": response.text[:200]}
            attempts.append({"status": response.status_code, "message": answer.get("status") or answer.get("message")})
            if response.status_code != 500:
                break
        return {
            "min_workers": min_workers,
            "max_workers": max_workers,
            **attempts[-1],
            "attempts": attempts,
            "seconds": round(time.monotonic() - started, 2),
        }

    def start(self, plan: list[tuple[float, tuple[int, int], str]]) -> threading.Thread:
        """Run ``plan`` ((when, (min, max), name) steps) in a thread, from now."""
        self.started = time.monotonic()
        thread = threading.Thread(target=self._run, args=(plan,), daemon=True)
        thread.start()
        return thread

    def _run(self, plan: list[tuple[float, tuple[int, int], str]]) -> None:
        for when, target, key in plan:
            self._scale_at(when, target, key)

    def elapsed(self) -> float:
        return round(time.monotonic() - self.started, 2)

    def _scale_at(self, when: float, target: tuple[int, int], key: str) -> None:
        if self.load_over.wait(max(0.0, when - (time.monotonic() - self.started))):
            return  # the load was aborted: no more scaling
        event = {"action": key, "t_start": self.elapsed(), **self.scale(*target)}
        event["t_end"] = self.elapsed()
        event["ready_workers_after"] = self.ready_workers()
        self.events.append(event)
        print(
            f"soak: scaled {key} at t={event['t_start']}s: {event['status']} {event['message']}{retried(event)}",
            flush=True,
        )

    def sample_workers(self, t: float) -> None:
        """Record the worker count at second ``t`` in the background (the load must not wait for it)."""

        def sample() -> None:
            try:
                self.workers[int(t)] = len(self.describe()["workers"])
            except (ServekitError, ValueError, KeyError, IndexError):
                self.workers[int(t)] = -1

        threading.Thread(target=sample, daemon=True).start()


# ----------------------------------------------------------------------------------------- report
def retried(event: dict) -> str:
    """``" (after 500: <message>)"`` when TorchServe needed the call repeated; empty otherwise."""
    earlier = event.get("attempts", [])[:-1]
    return "".join(f" (after {a['status']}: {a['message']})" for a in earlier)


def per_second(results: list[Result], seconds: float, workers: dict[int, int]) -> list[dict]:
    rows = []
    for second in range(math.ceil(seconds)):
        bucket = [r for r in results if second <= r.due < second + 1]
        latencies = [r.latency for r in bucket if r.status == 200]
        rows.append(
            {
                "t": second,
                "requests": len(bucket),
                "ok": len(latencies),
                "errors": len(bucket) - len(latencies),
                "p50_ms": ms(percentile(latencies, 50)),
                "p95_ms": ms(percentile(latencies, 95)),
                "p99_ms": ms(percentile(latencies, 99)),
                "max_ms": ms(max(latencies, default=None)),
                "workers": workers.get(second),
            }
        )
    return rows


def scaling_window(events: list[dict], t_up: float, seconds: float, grace: float) -> tuple[float, float]:
    """From the scale-up call to ``grace`` seconds after the last scaling call returned."""
    up = next((e for e in events if e["action"] == "up"), None)
    return (up["t_start"] if up else t_up, (events[-1]["t_end"] if events else seconds) + grace)


def latency_comparison(results: list[Result], seconds: float, max_ratio: float) -> dict:
    """p50 of the first and of the last minute (or quarter of a shorter run) of answered requests."""
    span = min(60.0, seconds / 4)
    first = [r.latency for r in results if r.due < span and r.status == 200]
    last = [r.latency for r in results if r.due >= seconds - span and r.status == 200]
    p50_first, p50_last = percentile(first, 50), percentile(last, 50)
    ratio = None if not (p50_first and p50_last) else round(p50_last / p50_first, 3)
    return {
        "span_s": span,
        "p50_first_ms": ms(p50_first),
        "p50_last_ms": ms(p50_last),
        "ratio": ratio,
        "max_ratio": max_ratio,
    }


def phase_p99(results: list[Result], events: list[dict], grace: float, max_ratio: float) -> dict:
    """p99 of the answers due while one worker served (before the scale-up call) and while the
    scaled-up workers did (from ``grace`` s after the scale-up returned to the scale-down call)."""
    up = next((e for e in events if e["action"] == "up"), None)
    down = next((e for e in events if e["action"] == "down"), None)
    if up is None or down is None:
        return {"p99_one_worker_ms": None, "p99_scaled_ms": None, "ratio": None, "max_ratio": max_ratio}
    one = [r.latency for r in results if r.due < up["t_start"] and r.status == 200]
    scaled = [r.latency for r in results if up["t_end"] + grace <= r.due < down["t_start"] and r.status == 200]
    p99_one, p99_scaled = percentile(one, 99), percentile(scaled, 99)
    ratio = None if not (p99_one and p99_scaled) else round(p99_scaled / p99_one, 3)
    return {"p99_one_worker_ms": ms(p99_one), "p99_scaled_ms": ms(p99_scaled), "scaled_window_s":
            [round(up["t_end"] + grace, 2), down["t_start"]], "ratio": ratio, "max_ratio": max_ratio}  # fmt: skip


def evaluate(args: argparse.Namespace, load: dict, scaler: Scaler, running: int, rate: float) -> dict:
    """The report's results and checks for one finished load."""
    seconds, results, events = args.minutes * 60, load["results"], scaler.events
    window = scaling_window(events, 0.4 * seconds, seconds, args.grace_seconds)

    def overlaps(r: Result) -> bool:
        return r.due <= window[1] and r.due + r.latency >= window[0]

    errors_outside = [r for r in results if r.status != 200 and not overlaps(r)]
    comparison = latency_comparison(results, seconds, args.max_p50_ratio)
    phases = phase_p99(results, events, args.grace_seconds, args.max_p99_phase_ratio)
    all_ok = [r.latency for r in results if r.status == 200]
    ready_at_end = scaler.ready_workers()
    checks = {
        "completed": load["aborted"] is None and len(results) == int(rate * seconds),
        "scaling_calls_succeeded": len(events) == 3 and all(e["status"] == 200 for e in events),
        "workers_followed_scaling": [e["ready_workers_after"] for e in events] == [args.scale_workers, running, running]
        and ready_at_end == running,
        "no_errors_outside_scaling_window": not errors_outside,
        "p50_last_within_ratio_of_first": comparison["ratio"] is not None and comparison["ratio"] <= args.max_p50_ratio,
    }
    if args.max_p99_phase_ratio > 0:  # 0: not judged (a run too short to have a settled scaled-up phase)
        checks["p99_scaled_phase_within_ratio_of_one_worker"] = (
            phases["ratio"] is not None and phases["ratio"] <= args.max_p99_phase_ratio
        )
    return {
        "duration_s": seconds,
        "ready_workers_at_end": ready_at_end,
        "load_average_at_end": os.getloadavg(),
        "requests": {
            "planned": int(rate * seconds),
            "sent": len(results),
            "ok": len(all_ok),
            "errors": sum(r.status != 200 for r in results),
            "errors_in_scaling_window": sum(r.status != 200 for r in results if overlaps(r)),
            "errors_outside_scaling_window": len(errors_outside),
            "error_examples": sorted({f"{r.status} {r.detail}"[:160] for r in results if r.status != 200})[:10],
        },
        "aborted": load["aborted"],
        "latency_ms": {
            "p50": ms(percentile(all_ok, 50)),
            "p95": ms(percentile(all_ok, 95)),
            "p99": ms(percentile(all_ok, 99)),
            "max": ms(max(all_ok, default=None)),
        },
        "scaling": {
            "events": events,
            "window_s": [round(window[0], 2), round(window[1], 2)],
            "grace_s": args.grace_seconds,
        },
        "comparison": comparison,
        "phases": phases,
        "checks": checks,
        "passed": all(checks.values()),
        "per_second": per_second(results, seconds, scaler.workers),
    }


# ----------------------------------------------------------------------------------------- soak
def measure_capacity(args: argparse.Namespace, client: TorchServeClient, sender: DigitSender, path: str) -> dict:
    """Closed-loop capacity with the load's own client (or ``hey``), after every digit answered right once."""
    for digit in range(10):
        status, detail = sender.send(digit)
        if status != 200:
            raise SystemExit(f"soak: error: digit {digit}: {status} {detail}")
    if args.capacity_tool == "hey":
        image = SAMPLES / "digit_3.png"
        capacity = hey_closed_loop(
            client.url("inference", path), client.token("inference"), image, args.capacity_concurrency,
            args.capacity_seconds,
        )  # fmt: skip
    else:
        capacity = closed_loop(sender, args.capacity_concurrency, args.capacity_seconds)
    capacity["concurrency"] = args.capacity_concurrency
    if capacity["rps"] <= 0:
        raise SystemExit(f"soak: error: no capacity measured: {capacity}")
    return capacity


def soak(args: argparse.Namespace, server: TorchServeProcess, report: dict) -> dict:
    """Capacity, then the open-loop load with scaling in the middle; ``report`` filled in and returned."""
    seconds = args.minutes * 60
    client = server.client(timeout=args.timeout)
    scaler = Scaler(client, args.model, args.version)
    described = scaler.describe()
    original = (int(described["minWorkers"]), int(described["maxWorkers"]))
    running = len(described["workers"])
    report["model"] = {
        "name": args.model,
        "version": args.version,
        "batch_size": described["batchSize"],
        "max_batch_delay_ms": described["maxBatchDelay"],
        "min_max_workers": original,
        "workers": running,
    }
    path = f"/predictions/{args.model}/{args.version}"
    sender = DigitSender(client, path, [(SAMPLES / f"digit_{d}.png").read_bytes() for d in range(10)])
    capacity = report["capacity"] = measure_capacity(args, client, sender, path)
    rate = args.rate_fraction * capacity["rps"]
    if args.max_rate:
        rate = min(rate, args.max_rate)
    report["rate_rps"] = round(rate, 1)
    print(
        f"soak: capacity {capacity['rps']} req/s ({capacity['tool']}, concurrency {args.capacity_concurrency}); "
        f"open loop at {rate:.1f} req/s for {seconds:.0f}s",
        flush=True,
    )
    plan = [
        (0.4 * seconds, (args.scale_workers, args.scale_workers), "up"),
        (0.6 * seconds, (running, running), "down"),
        (0.0, original, "limits"),
    ]
    scaling = scaler.start(plan)
    load = OpenLoop(sender, rate, seconds, args.threads, args.max_backlog_seconds).run(scaler.sample_workers)
    if load["aborted"]:
        scaler.load_over.set()
    scaling.join(timeout=600)
    report.update(evaluate(args, load, scaler, running, rate))
    return report


def run_soak(args: argparse.Namespace) -> dict:
    """Start a TorchServe of its own, soak it, stop it; its workdir is removed when the soak passed."""
    build = REPO_ROOT / "build"
    build.mkdir(exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="soak-", dir=build))
    server = TorchServeProcess(
        workdir=workdir,
        model_store=Path(args.model_store),
        ports={kind: free_port() for kind in ADDRESS_KEYS},
        load_models=archive_name(args.model, args.version),
        overrides={"grpc_inference_port": str(free_port()), "grpc_management_port": str(free_port())},
    )
    report: dict = {
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "workdir": str(workdir),
    }
    print(f"soak: starting TorchServe in {workdir}", flush=True)
    server.start()
    try:
        soak(args, server, report)
    finally:
        server.stop()
        if report.get("passed") and not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return report


# ----------------------------------------------------------------------------------------- output
def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["per_second"]
    t = [r["t"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True, height_ratios=[3, 2])
    for key, style in (("p50_ms", "-"), ("p95_ms", "--"), ("p99_ms", ":")):
        top.plot(t, [r[key] if r[key] is not None else float("nan") for r in rows], style, label=key[:3])
    top.set_ylabel("latency from due time (ms)")
    top.set_yscale("log")
    start, end = report["scaling"]["window_s"]
    for axis in (top, bottom):
        axis.axvspan(start, end, color="orange", alpha=0.15, label="scaling window" if axis is top else None)
        axis.grid(alpha=0.3)
    for event in report["scaling"]["events"]:
        if event["action"] == "limits":  # right after "down", changes no worker
            continue
        top.axvline(event["t_start"], color="gray", linewidth=0.8)
        top.annotate(f"scale {event['action']}", (event["t_start"], 0.97), xycoords=("data", "axes fraction"),
                     fontsize=8, va="top")  # fmt: skip
    top.legend(loc="upper left", fontsize=8)
    model = report["model"]
    top.set_title(
        f"soak: {model['name']} {model['version']}, {report['rate_rps']} req/s open loop "
        f"({report['rate_rps'] / report['capacity']['rps']:.0%} of {report['capacity']['rps']} req/s), "
        f"{report['duration_s'] / 60:g} min"
    )
    bottom.plot(t, [r["ok"] for r in rows], label="answered/s", color="tab:green")
    bottom.bar(t, [r["errors"] for r in rows], color="tab:red", label="errors/s")
    bottom.set_ylabel("requests per second")
    bottom.set_xlabel("seconds since the load started (by due time)")
    workers_axis = bottom.twinx()
    workers_axis.step(t, [r["workers"] if r["workers"] is not None else float("nan") for r in rows],
                      where="post", color="tab:purple", label="workers")  # fmt: skip
    workers_axis.set_ylabel("workers")
    workers_axis.set_ylim(0, max(3, max((r["workers"] or 0) for r in rows) + 1))
    lines = bottom.get_legend_handles_labels()
    extra = workers_axis.get_legend_handles_labels()
    bottom.legend(lines[0] + extra[0], lines[1] + extra[1], loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(report: dict) -> str:
    requests_ = report["requests"]
    comparison = report["comparison"]
    lines = [
        f"capacity {report['capacity']['rps']} req/s ({report['capacity']['tool']}); "
        f"load {report['rate_rps']} req/s for {report['duration_s']:.0f}s",
        f"requests {requests_['sent']}/{requests_['planned']}, errors {requests_['errors']} "
        f"(in scaling window {requests_['errors_in_scaling_window']}, "
        f"outside {requests_['errors_outside_scaling_window']})",
        f"latency p50 {report['latency_ms']['p50']} ms, p99 {report['latency_ms']['p99']} ms; "
        f"p50 first {comparison['span_s']:.0f}s {comparison['p50_first_ms']} ms, "
        f"last {comparison['span_s']:.0f}s {comparison['p50_last_ms']} ms (ratio {comparison['ratio']}, "
        f"max {comparison['max_ratio']})",
    ]
    phases = report.get("phases") or {}
    if phases.get("ratio") is not None:
        lines.append(
            f"p99 with one worker {phases['p99_one_worker_ms']} ms, with the scaled-up workers "
            f"{phases['p99_scaled_ms']} ms (ratio {phases['ratio']}, max {phases['max_ratio']})"
        )
    for event in report["scaling"]["events"]:
        lines.append(
            f"scale {event['action']} (min {event['min_workers']}, max {event['max_workers']}) at "
            f"t={event['t_start']}s: {event['status']} in {event['seconds']}s, "
            f"{event['ready_workers_after']} READY workers after{retried(event)}"
        )
    if report["aborted"]:
        lines.append(f"aborted: {report['aborted']}")
    lines += [f"check {name}: {'ok' if ok else 'FAILED'}" for name, ok in report["checks"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="duration of the open-loop load")
    parser.add_argument("--rate-fraction", type=float, default=0.7, help="load as a fraction of capacity")
    parser.add_argument("--model", default="digits")
    parser.add_argument("--version", default="1.0")
    parser.add_argument("--model-store", default=str(REPO_ROOT / "model_store"))
    parser.add_argument("--capacity-seconds", type=float, default=10.0)
    parser.add_argument("--capacity-concurrency", type=int, default=8)
    parser.add_argument("--capacity-tool", choices=["python", "hey"], default="python")
    parser.add_argument("--max-rate", type=float, default=None, help="cap on the load, req/s")
    parser.add_argument("--scale-workers", type=int, default=2, help="workers during the middle of the run")
    parser.add_argument("--max-p99-phase-ratio", type=float, default=2.0,
                        help="scaled-up p99 over one-worker p99 (the CPU budget's bar; 0: not judged)")  # fmt: skip
    parser.add_argument("--grace-seconds", type=float, default=5.0, help="scaling window extends this far")
    parser.add_argument("--max-p50-ratio", type=float, default=1.5, help="last vs first p50 latency")
    parser.add_argument("--threads", type=int, default=32, help="sender threads of the open-loop client")
    parser.add_argument("--timeout", type=float, default=30.0, help="per request, seconds")
    parser.add_argument("--max-backlog-seconds", type=float, default=10.0)
    parser.add_argument("--out", default=str(REPO_ROOT / "results" / "soak"))
    parser.add_argument("--keep-workdir", action="store_true", help="keep TorchServe's logs even on success")
    args = parser.parse_args(argv)
    if not 0 < args.minutes <= 120 or not 0 < args.rate_fraction <= 1.5:
        parser.error("--minutes must be in (0, 120] and --rate-fraction in (0, 1.5]")
    if args.scale_workers < 1:
        parser.error("--scale-workers must be >= 1")
    try:
        report = run_soak(args)
    except ServekitError as exc:
        print(f"soak: error: {exc}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out / "latest.png")
    print(summary(report))
    print(f"soak: {'passed' if report['passed'] else 'FAILED'}; wrote {out / 'latest.json'} and {out / 'latest.png'}")
    if not report["passed"]:
        print(f"soak: TorchServe's logs kept in {report['workdir']}", file=sys.stderr)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
