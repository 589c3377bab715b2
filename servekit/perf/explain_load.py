"""Predictions beside explanations: prediction p99 at c=16 alone, and with one explanation client running.

An explanation costs tens of inferences (Integrated Gradients, ``handlers.explain``); it must not cost the
predictions their latency. One TorchServe on free loopback ports serves one version with its spec's
settings; in each round ``hey`` loads ``/predictions/NAME/VERSION`` at ``concurrency`` alone, then again
while one client posts ``/explanations/NAME/VERSION`` back to back (what it gets is counted: answered,
refused with 429 by the explanations' share of time, other). The bar: the median of the rounds' p99
with explanations within ``P99_BAR`` x the median alone.

``make bench`` runs it (``servekit.perf.bench``, section "Predictions beside explanations"); on its own,
with the repository's ``model_store``: ``python -m servekit.perf.explain_demo --load``.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import requests

from servekit.perf.stats import percentile
from servekit.serving.server import ADDRESS_KEYS, TorchServeProcess, free_port

CONCURRENCY = 16
P99_BAR = 1.2  # prediction p99 with one explanation client / alone (issue 27)


class ExplanationClient:
    """One client posting explanations back to back on a thread, until stopped; counts what it got."""

    def __init__(self, url: str, token: str, body: bytes, content_type: str) -> None:
        self.url, self.body = url, body
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": content_type}
        self.statuses: Counter[int] = Counter()
        self.latencies_ms: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="explanation-client", daemon=True)

    def __enter__(self) -> ExplanationClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def _run(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    answer = session.post(self.url, data=self.body, headers=self.headers, timeout=60)
                    status = answer.status_code
                except requests.RequestException:
                    status = 0
                self.statuses[status] += 1
                if status == 200:
                    self.latencies_ms.append((time.perf_counter() - started) * 1000)
                elif status == 429:
                    time.sleep(0.05)  # refused by the share of time: a polite client waits a moment

    def summary(self) -> dict:
        return {
            "answered": self.statuses.get(200, 0),
            "refused_429": self.statuses.get(429, 0),
            "other": sum(n for code, n in self.statuses.items() if code not in (200, 429)),
            "p50_ms": _round(percentile(sorted(self.latencies_ms), 50)),
        }


def measure(
    workdir: Path,
    store: Path,
    model: str,
    version: str,
    archive: str,
    body: Path,
    seconds: float,
    quick: bool,
    run_hey: Callable[..., dict],
    log: Callable[[str], None],
    content_type: str = "image/png",
    concurrency: int = CONCURRENCY,
    rounds: int = 3,
) -> dict:
    """``rounds`` x (predictions alone, predictions with one explanation client) on one TorchServe.

    ``run_hey`` is ``servekit.perf.bench.run_hey`` (passed in: bench imports this module).
    """
    server = TorchServeProcess(
        workdir=workdir / "explain_load",
        model_store=store,
        ports={kind: free_port() for kind in ADDRESS_KEYS},
        load_models="",
        oip=False,
    )
    server.start()
    runs = []
    try:
        client = server.client(timeout=120)
        client.manage("POST", "/models", params={"url": archive, "synchronous": "true"}, timeout=600)
        predict = client.url("inference", f"/predictions/{model}/{version}")
        explain_url = client.url("inference", f"/explanations/{model}/{version}")
        token = client.token("inference")
        payload = body.read_bytes()
        first = requests.post(explain_url, data=payload, timeout=60,
                              headers={"Authorization": f"Bearer {token}", "Content-Type": content_type})  # fmt: skip
        if first.status_code != 200:
            raise RuntimeError(f"explain_load: the first explanation was answered {first.status_code}: {first.text}")
        bound = 4 * concurrency if quick else None
        run_hey(predict, token, body, concurrency, seconds / 2, bound, content_type=content_type)  # warm, not counted
        for n in range(1, rounds + 1):
            alone = run_hey(predict, token, body, concurrency, seconds, bound, content_type=content_type)
            with ExplanationClient(explain_url, token, payload, content_type) as explainer:
                beside = run_hey(predict, token, body, concurrency, seconds, bound, content_type=content_type)
            explanations = explainer.summary()
            log(f"explanations beside predictions, round {n}: p99 alone {alone['p99_ms']} ms, with one explanation "
                f"client {beside['p99_ms']} ms ({explanations['answered']} explanations answered, "
                f"{explanations['refused_429']} refused with 429)")  # fmt: skip
            runs.append({"alone": alone, "with_explanations": beside, "explanations": explanations})
    finally:
        server.stop()
    alone_p99 = statistics.median(r["alone"]["p99_ms"] for r in runs)
    beside_p99 = statistics.median(r["with_explanations"]["p99_ms"] for r in runs)
    ratio = round(beside_p99 / alone_p99, 3) if alone_p99 else None
    return {
        "model": model,
        "version": version,
        "concurrency": concurrency,
        "description": f"{model} {version}: hey at c={concurrency} on /predictions alone, then with one client "
        f"posting /explanations back to back; {rounds} rounds, medians of the p99s",
        "runs": runs,
        "p99_alone_ms": alone_p99,
        "p99_with_explanations_ms": beside_p99,
        "p99_ratio": ratio,
        "bar": {f"prediction p99 with explanations <= {P99_BAR}x alone": ratio is not None and ratio <= P99_BAR},
    }


def markdown(result: dict | None) -> list[str]:
    """The report's section (``make bench``'s latest.md)."""
    if not result:
        return []
    lines = [
        "",
        "## Predictions beside explanations",
        "",
        result["description"] + ".",
        "",
        "| round | p99 alone (ms) | p99 with explanations (ms) | req/s alone | req/s with | explanations "
        "answered | refused (429) | explanation p50 (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, run in enumerate(result["runs"], 1):
        a, b, e = run["alone"], run["with_explanations"], run["explanations"]
        lines.append(f"| {n} | {a['p99_ms']} | {b['p99_ms']} | {a['rps']} | {b['rps']} | {e['answered']} | "
                     f"{e['refused_429']} | {e['p50_ms']} |")  # fmt: skip
    verdict = "PASS" if all(result["bar"].values()) else "FAIL"
    lines += ["", f"p99 ratio (medians): {result['p99_ratio']} ({verdict}: bar {P99_BAR}x)"]
    return lines


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
