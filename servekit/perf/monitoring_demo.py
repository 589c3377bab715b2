"""The real run in docs/monitoring.md ("In practice"): two versions, then drift, watched by a real Prometheus.

    make monitor-demo      # about 4 minutes; loopback only; stops everything it started

One TorchServe (free loopback ports) serves digits 1.0 (default) and 2.0; a Prometheus of its own
scrapes it every second with the rules of ``monitoring/``. Traffic, from held-out digits:

1. balanced digits to both versions (1.0 through the default route), a few bad inputs among them
   (a first minute of it is not plotted: the rules' 1-minute rates are still filling);
2. then version 2.0 receives only one digit (its class mix drifts) while 1.0 stays balanced.

At the end it writes, under ``docs/`` (or ``--out``): ``monitoring_demo.png`` (req/s per version,
p99, the drift index with its threshold, and when ServekitDrift fired, from Prometheus'
``query_range``), ``monitoring_top.txt`` (``servekit top --once`` as the run ended),
``monitoring_drift.txt`` (``servekit drift digits 2.0``) and ``monitoring_demo.json`` (the machine,
the phases and the alerts).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

from servekit.build.archive import REPO_ROOT
from servekit.build.datasets import digits
from servekit.observe.drift import ReferenceCache
from servekit.observe.metrics_source import PrometheusAPI
from servekit.observe.top import PrometheusView, render
from servekit.perf.bench import machine
from servekit.progress import Progress
from servekit.serving.monitor import PrometheusServer, ScrapeTarget
from servekit.serving.oip import read_archive_metadata
from servekit.serving.server import ADDRESS_KEYS, TorchServeProcess, free_port

WORKDIR = REPO_ROOT / "build" / "monitoring_demo"
WARM_S = 60.0  # traffic before the plotted span
SERIES = {
    "req/s": "servekit:requests:rate1m",
    "p99 ms": "1000 * servekit:request_seconds:p99_5m",
    "drift PSI (classes)": "servekit:drift_psi:15m",
}


def png(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def drive(server: TorchServeProcess, plan: list[tuple[str, list[bytes]]], seconds: float, stop: threading.Event):
    """Send ``plan``'s bodies round-robin per route for ``seconds`` (about 20 req/s per route)."""
    client = server.client(timeout=30)
    ends = time.monotonic() + seconds
    i = 0
    while time.monotonic() < ends and not stop.is_set():
        for route, bodies in plan:
            client.send("inference", "POST", f"/predictions/{route}", data=bodies[i % len(bodies)], timeout=30)
        i += 1
        time.sleep(0.05)


def query_range(url: str, expr: str, start: float, end: float) -> list[tuple[dict, list[tuple[float, float]]]]:
    params = {"query": expr, "start": start, "end": end, "step": 2}
    answer = requests.get(f"{url}/api/v1/query_range", params=params, timeout=30).json()
    return [(r["metric"], [(float(t), float(v)) for t, v in r["values"]]) for r in answer["data"]["result"]]


def plot(url: str, start: float, end: float, phase_two: float, fired: float | None, threshold: float, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(SERIES), 1, figsize=(9, 8), sharex=True)
    for ax, (title, expr) in zip(axes, SERIES.items(), strict=True):
        for metric, points in sorted(query_range(url, expr, start, end), key=lambda item: item[0].get("version", "")):
            ax.plot([t - start for t, _ in points], [v for _, v in points], label=f"digits {metric.get('version')}")
        ax.axvline(phase_two - start, color="grey", linestyle=":", linewidth=1)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    axes[-1].axhline(threshold, color="red", linestyle="--", linewidth=1, label="drift_threshold")
    if fired is not None:
        axes[-1].axvline(fired - start, color="red", linewidth=1)
        axes[-1].text(fired - start, threshold, " ServekitDrift firing", color="red", fontsize=8, va="bottom")
    axes[-1].set_xlabel("seconds (dotted: version 2.0 starts getting only digit 1)")
    fig.suptitle("servekit handler metrics in Prometheus: two versions, then drift on 2.0")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs")
    parser.add_argument("--phase-seconds", type=float, default=60.0, help="phase 1 (after a minute not plotted)")
    parser.add_argument("--drift-seconds", type=float, default=90.0, help="phase 2: the alert needs ~65 s")
    args = parser.parse_args(argv)
    log = Progress("monitoring demo")
    args.out.mkdir(parents=True, exist_ok=True)
    store = REPO_ROOT / "model_store"
    server = TorchServeProcess(workdir=WORKDIR / "torchserve", model_store=store, load_models="digits_v1.0.mar",
                               ports={kind: free_port() for kind in ADDRESS_KEYS})  # fmt: skip
    prometheus = PrometheusServer(
        WORKDIR / "prometheus", listen=f"127.0.0.1:{free_port()}", interval=1.0,
        targets=[ScrapeTarget("servekit", f"127.0.0.1:{server.oip_ports['oip_http']}"),
                 ScrapeTarget("torchserve", f"127.0.0.1:{server.ports['metrics']}")],
    )  # fmt: skip
    log("starting TorchServe (digits 1.0) and registering 2.0")
    server.start()
    try:
        params = {"url": "digits_v2.0.mar", "initial_workers": 1, "synchronous": "true"}
        server.client(timeout=300).send("management", "POST", "/models", params=params, timeout=300)
        log(f"starting Prometheus on {prometheus.listen} (scrapes every second, an empty database)")
        shutil.rmtree(prometheus.data_dir, ignore_errors=True)  # an earlier demo's series would mix in
        prometheus.start()
        holdout = [png(image) for image in digits("holdout").images[:200]]
        bad = [b"not an image"]
        stop = threading.Event()
        # The plot starts once the rules' longest rate window (5 minutes for p99) holds a minute of
        # traffic: 1-minute rates of series born inside their window ramp up from 0 meanwhile.
        log(f"phase 1: balanced held-out digits to 1.0 and 2.0 for {WARM_S + args.phase_seconds:.0f} s")
        drive(server, [("digits", holdout + bad), ("digits/2.0", holdout)], WARM_S, stop)
        start = time.time()
        drive(server, [("digits", holdout + bad), ("digits/2.0", holdout)], args.phase_seconds, stop)
        phase_two = time.time()
        ones = [b for b, label in zip(holdout, digits("holdout").labels[:200], strict=True) if label == 1]
        log(f"phase 2: 2.0 gets only the digit 1 for {args.drift_seconds:.0f} s; 1.0 stays balanced")
        fired = None
        worker = threading.Thread(target=drive, args=(server, [("digits", holdout), ("digits/2.0", ones)],
                                                      args.drift_seconds, stop))  # fmt: skip
        worker.start()
        while worker.is_alive():
            alerts = requests.get(f"{prometheus.url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
            if fired is None and any(a["labels"]["alertname"] == "ServekitDrift" and a["state"] == "firing"
                                     for a in alerts):  # fmt: skip
                fired = time.time()
                log(f"ServekitDrift firing {fired - phase_two:.0f} s into phase 2")
            time.sleep(1)
        end = time.time()
        time.sleep(3)  # the last scrapes and rule evaluations
        view = PrometheusView(PrometheusAPI(prometheus.url), ReferenceCache(store), "15m")
        frame = render(view.snapshot())
        (args.out / "monitoring_top.txt").write_text(frame + "\n")
        drift = subprocess.run(
            [sys.executable, "-m", "servekit.cli", "--prometheus-url", prometheus.url, "--store", str(store),
             "--metrics-url", server.url("oip_http", "/metrics"), "drift", "digits", "2.0", "--source", "prometheus"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        (args.out / "monitoring_drift.txt").write_text(
            f"$ servekit drift digits 2.0   # exit status {drift.returncode}\n{drift.stdout}"
        )
        threshold = read_archive_metadata(store / "digits_v2.0.mar")["monitoring"]["drift_threshold"]
        plot(prometheus.url, start, end, phase_two, fired, threshold, args.out / "monitoring_demo.png")
        alerts = requests.get(f"{prometheus.url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
        report = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": machine(),
            "phase_seconds": args.phase_seconds,
            "drift_seconds": args.drift_seconds,
            "drift_alert_after_s": round(fired - phase_two, 1) if fired else None,
            "alerts": [
                {"name": a["labels"]["alertname"], "version": a["labels"].get("version"), "state": a["state"]}
                for a in alerts
            ],  # fmt: skip
        }
        (args.out / "monitoring_demo.json").write_text(json.dumps(report, indent=2) + "\n")
        print(frame)
        log(f"wrote {args.out / 'monitoring_demo.png'}, monitoring_top.txt, monitoring_demo.json")
    finally:
        prometheus.stop()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
