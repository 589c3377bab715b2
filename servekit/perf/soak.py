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
from dataclasses import dataclass
from pathlib import Path

import requests

from servekit.ops.server import ADDRESS_KEYS, REPO_ROOT, ServerError, TorchServeProcess, free_port

SAMPLES = REPO_ROOT / "samples"


@dataclass
class Result:
    due: float  # seconds since the load started, when the request was scheduled
    latency: float  # seconds from due to the end of the answer (or of the failure)
    status: int  # HTTP status; -1 for no answer (timeout, connection error); 0 for a wrong label
    detail: str = ""


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


# ----------------------------------------------------------------------------------------- client
class Client:
    """Keep-alive HTTP/1.1 connections to the inference API, one per thread; checks the top label."""

    def __init__(self, port: int, path: str, token: str, samples: list[bytes], timeout: float) -> None:
        self.port, self.path, self.timeout, self.samples = port, path, timeout, samples
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}
        self.local = threading.local()

    def send(self, digit: int) -> tuple[int, str]:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        try:
            conn.request("POST", self.path, body=self.samples[digit], headers=self.headers)
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            self.local.conn = None
            return -1, f"{type(exc).__name__}: {exc}"
        if response.status != 200:
            return response.status, body[:200].decode(errors="replace")
        try:
            label = json.loads(body)["predictions"][0]["label"]
        except (ValueError, KeyError, IndexError):
            return 0, f"unreadable answer: {body[:200]!r}"
        return (200, "") if label == str(digit) else (0, f"sent {digit}, answered {label}")


def closed_loop(client: Client, concurrency: int, seconds: float) -> dict:
    """Each thread sends its next request when the previous one is answered."""
    stop_at = time.monotonic() + seconds
    counts = {"ok": 0, "errors": 0}
    lock = threading.Lock()

    def run(k: int) -> None:
        i = k
        while time.monotonic() < stop_at:
            status, _ = client.send(i % 10)
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


def open_loop(client: Client, rate: float, seconds: float, threads: int, max_backlog: float, on_tick) -> dict:
    """Requests due every 1/rate s for ``seconds``; ``threads`` senders take them from a queue in order."""
    due_queue: queue.Queue[tuple[float, int] | None] = queue.Queue()
    results: list[Result] = []
    lock = threading.Lock()
    start = time.monotonic()

    def sender() -> None:
        while (item := due_queue.get()) is not None:
            due, digit = item
            status, detail = client.send(digit)
            with lock:
                results.append(Result(due, time.monotonic() - start - due, status, detail))

    senders = [threading.Thread(target=sender, daemon=True) for _ in range(threads)]
    for thread in senders:
        thread.start()
    total = int(rate * seconds)
    aborted = None
    next_tick = 0
    for i in range(total):
        due = i / rate
        now = time.monotonic() - start
        if due > now:
            time.sleep(due - now)
        # Backlog: requests due but not yet picked up by a sender.
        if due_queue.qsize() > max_backlog * rate:
            aborted = f"more than {max_backlog:.0f}s of requests behind schedule at t={due:.1f}s"
            break
        due_queue.put((due, i % 10))
        if due >= next_tick:
            on_tick(due)
            next_tick = math.floor(due) + 1
    if aborted:  # drop what was not sent yet
        with contextlib.suppress(queue.Empty):
            while True:
                due_queue.get_nowait()
    for _ in senders:
        due_queue.put(None)
    deadline = time.monotonic() + client.timeout + 10
    for thread in senders:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    with lock:
        return {"results": list(results), "aborted": aborted}


# ----------------------------------------------------------------------------------------- soak
class Management:
    def __init__(self, server: TorchServeProcess, model: str, version: str) -> None:
        self.server, self.model, self.version = server, model, version

    def request(self, method: str, path: str, timeout: float = 300) -> requests.Response:
        url = self.server.url("management", path)
        return requests.request(method, url, headers=self.server.headers("management"), timeout=timeout)

    def describe(self) -> dict:
        return self.request("GET", f"/models/{self.model}/{self.version}", timeout=10).json()[0]

    def scale(self, min_workers: int, max_workers: int) -> dict:
        started = time.monotonic()
        path = f"/models/{self.model}/{self.version}?min_worker={min_workers}&max_worker={max_workers}&synchronous=true"
        response = self.request("PUT", path)
        return {
            "min_workers": min_workers,
            "max_workers": max_workers,
            "status": response.status_code,
            "message": response.json().get("status") or response.json().get("message"),
            "seconds": round(time.monotonic() - started, 2),
        }


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


def run_soak(args: argparse.Namespace) -> dict:
    samples = [(SAMPLES / f"digit_{d}.png").read_bytes() for d in range(10)]
    build = REPO_ROOT / "build"
    build.mkdir(exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="soak-", dir=build))
    grpc = {"grpc_inference_port": str(free_port()), "grpc_management_port": str(free_port())}
    server = TorchServeProcess(
        workdir=workdir,
        model_store=Path(args.model_store),
        ports={kind: free_port() for kind in ADDRESS_KEYS},
        load_models=f"{args.model}_v{args.version}.mar",
        overrides=grpc,
    )
    seconds = args.minutes * 60
    report: dict = {
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "workdir": str(workdir),
    }
    print(f"soak: starting TorchServe in {workdir}", flush=True)
    server.start()
    passed = False
    try:
        management = Management(server, args.model, args.version)
        described = management.describe()
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
        token = server.keys()["inference"]
        client = Client(
            server.ports["inference"], f"/predictions/{args.model}/{args.version}", token, samples, args.timeout
        )
        for digit in range(10):  # every digit right before anything is measured
            status, detail = client.send(digit)
            if status != 200:
                raise SystemExit(f"soak: error: digit {digit}: {status} {detail}")

        url = server.url("inference", f"/predictions/{args.model}/{args.version}")
        if args.capacity_tool == "hey":
            capacity = hey_closed_loop(
                url, token, SAMPLES / "digit_3.png", args.capacity_concurrency, args.capacity_seconds
            )
        else:
            capacity = closed_loop(client, args.capacity_concurrency, args.capacity_seconds)
        capacity["concurrency"] = args.capacity_concurrency
        report["capacity"] = capacity
        if capacity["rps"] <= 0:
            raise SystemExit(f"soak: error: no capacity measured: {capacity}")
        rate = args.rate_fraction * capacity["rps"]
        if args.max_rate:
            rate = min(rate, args.max_rate)
        report["rate_rps"] = round(rate, 1)
        print(
            f"soak: capacity {capacity['rps']} req/s ({capacity['tool']}, concurrency {args.capacity_concurrency}); "
            f"open loop at {rate:.1f} req/s for {seconds:.0f}s",
            flush=True,
        )

        # Scaling and worker sampling run beside the load, driven by its clock.
        events: list[dict] = []
        workers: dict[int, int] = {}
        t_up, t_down = 0.4 * seconds, 0.6 * seconds
        load_started = time.monotonic()
        load_over = threading.Event()

        def scale_at(when: float, target: tuple[int, int], key: str) -> None:
            if load_over.wait(max(0.0, when - (time.monotonic() - load_started))):
                return  # the load was aborted: no more scaling
            event = {"action": key, "t_start": round(time.monotonic() - load_started, 2)}
            event.update(management.scale(*target))
            event["t_end"] = round(time.monotonic() - load_started, 2)
            event["ready_workers_after"] = sum(w["status"] == "READY" for w in management.describe()["workers"])
            events.append(event)
            print(f"soak: scaled {key} at t={event['t_start']}s: {event['status']} {event['message']}", flush=True)

        def scaler() -> None:
            scale_at(t_up, (args.scale_workers, args.scale_workers), "up")
            scale_at(t_down, (running, running), "down")
            scale_at(0, original, "limits")

        def sample_workers(t: float) -> None:
            try:
                workers[int(t)] = len(management.describe()["workers"])
            except (requests.RequestException, ValueError, KeyError, IndexError):
                workers[int(t)] = -1

        def on_tick(t: float) -> None:
            threading.Thread(target=sample_workers, args=(t,), daemon=True).start()

        scaling = threading.Thread(target=scaler, daemon=True)
        scaling.start()
        load = open_loop(client, rate, seconds, args.threads, args.max_backlog_seconds, on_tick)
        if load["aborted"]:
            load_over.set()
        scaling.join(timeout=600)
        results: list[Result] = load["results"]

        # The scaling window: from the scale-up call to grace seconds after the last scaling call returned.
        up = next((e for e in events if e["action"] == "up"), None)
        window = (up["t_start"] if up else t_up, (events[-1]["t_end"] if events else seconds) + args.grace_seconds)

        def overlaps(r: Result) -> bool:
            return r.due <= window[1] and r.due + r.latency >= window[0]

        in_window = [r for r in results if overlaps(r)]
        errors_outside = [r for r in results if r.status != 200 and not overlaps(r)]
        span = min(60.0, seconds / 4)
        first = [r.latency for r in results if r.due < span and r.status == 200]
        last = [r.latency for r in results if r.due >= seconds - span and r.status == 200]
        p50_first, p50_last = percentile(first, 50), percentile(last, 50)
        ratio = None if not (p50_first and p50_last) else round(p50_last / p50_first, 3)
        all_ok = [r.latency for r in results if r.status == 200]
        ready_at_end = sum(w["status"] == "READY" for w in management.describe()["workers"])
        expected_ready = [args.scale_workers, running, running]
        checks = {
            "completed": load["aborted"] is None and len(results) == int(rate * seconds),
            "scaling_calls_succeeded": len(events) == 3 and all(e["status"] == 200 for e in events),
            "workers_followed_scaling": [e["ready_workers_after"] for e in events] == expected_ready
            and ready_at_end == running,
            "no_errors_outside_scaling_window": not errors_outside,
            "p50_last_within_ratio_of_first": ratio is not None and ratio <= args.max_p50_ratio,
        }
        passed = all(checks.values())
        report.update(
            {
                "duration_s": seconds,
                "ready_workers_at_end": ready_at_end,
                "load_average_at_end": os.getloadavg(),
                "requests": {
                    "planned": int(rate * seconds),
                    "sent": len(results),
                    "ok": len(all_ok),
                    "errors": sum(r.status != 200 for r in results),
                    "errors_in_scaling_window": sum(r.status != 200 for r in in_window),
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
                "comparison": {
                    "span_s": span,
                    "p50_first_ms": ms(p50_first),
                    "p50_last_ms": ms(p50_last),
                    "ratio": ratio,
                    "max_ratio": args.max_p50_ratio,
                },
                "checks": checks,
                "passed": passed,
                "per_second": per_second(results, seconds, workers),
            }
        )
    finally:
        server.stop()
        if passed and not args.keep_workdir:
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
    for event in report["scaling"]["events"]:
        lines.append(
            f"scale {event['action']} (min {event['min_workers']}, max {event['max_workers']}) at "
            f"t={event['t_start']}s: {event['status']} in {event['seconds']}s, "
            f"{event['ready_workers_after']} READY workers after"
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
    except ServerError as exc:
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
