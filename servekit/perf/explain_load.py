"""Predictions beside explanations: prediction p99 at c=16 alone, and with one explanation client running.

An explanation costs tens of inferences (Integrated Gradients, ``handlers.explain``); it must not cost the
predictions their latency. One TorchServe on free loopback ports serves one version with its spec's
settings, and the same archive as its explanation pool (``NAME-explainer``, one worker on idle CPU time:
``handlers.explain``). In each round ``hey`` loads ``/predictions/NAME/VERSION`` at ``concurrency``
alone; while one client posts explanations back to back to the prediction workers
(``/explanations/NAME/VERSION``); and while it posts them to the pool
(``/explanations/NAME-explainer/VERSION``), in the reverse order every other round. What the client
gets is counted (answered, refused with 429 by the explanations' share of time, other: a 503 past the
explanation's timeout). The bar: the median of
the rounds' p99 with explanations on the pool within ``P99_BAR`` x the median alone; the figure for
explanations in the prediction workers is reported beside it.

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

from handlers.explain import EXPLAINER_SUFFIX
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
        pool = f"{model}{EXPLAINER_SUFFIX}"
        client.manage("POST", "/models", timeout=600, params={"url": archive, "model_name": pool,
                                                              "initial_workers": 1, "synchronous": "true"})  # fmt: skip
        predict = client.url("inference", f"/predictions/{model}/{version}")
        places = {
            "with_explanations": client.url("inference", f"/explanations/{model}/{version}"),
            "with_pool_explanations": client.url("inference", f"/explanations/{pool}/{version}"),
        }
        token = client.token("inference")
        payload = body.read_bytes()
        headers = {"Authorization": f"Bearer {token}", "Content-Type": content_type}
        for url in places.values():
            first = requests.post(url, data=payload, timeout=60, headers=headers)
            if first.status_code != 200:
                raise RuntimeError(f"explain_load: the first explanation ({url}) was answered {first.status_code}: "
                                   f"{first.text}")  # fmt: skip
        bound = 4 * concurrency if quick else None
        # Warm, not counted: a shorter warm-up left the first round's p99 alone at 3x the others' (2026-12-06).
        run_hey(predict, token, body, concurrency, seconds, bound, content_type=content_type)
        for n in range(1, rounds + 1):
            run = {}
            order = ["alone", *places]
            for phase in order if n % 2 else order[::-1]:  # mirrored every other round: drift cancels out
                if phase == "alone":
                    run[phase] = run_hey(predict, token, body, concurrency, seconds, bound, content_type=content_type)
                    continue
                with ExplanationClient(places[phase], token, payload, content_type) as explainer:
                    run[phase] = run_hey(predict, token, body, concurrency, seconds, bound, content_type=content_type)
                run[phase.replace("with_", "")] = explainer.summary()
            log(f"explanations beside predictions, round {n}: p99 alone {run['alone']['p99_ms']} ms, with one "
                f"explanation client on the prediction workers {run['with_explanations']['p99_ms']} ms "
                f"({run['explanations']['answered']} answered, {run['explanations']['refused_429']} refused with "
                f"429), on the pool {run['with_pool_explanations']['p99_ms']} ms "
                f"({run['pool_explanations']['answered']} answered, {run['pool_explanations']['other']} past their "
                "timeout)")  # fmt: skip
            runs.append(run)
    finally:
        server.stop()
    alone_p99 = statistics.median(r["alone"]["p99_ms"] for r in runs)
    beside_p99 = statistics.median(r["with_explanations"]["p99_ms"] for r in runs)
    pool_p99 = statistics.median(r["with_pool_explanations"]["p99_ms"] for r in runs)
    ratio = round(beside_p99 / alone_p99, 3) if alone_p99 else None
    pool_ratio = round(pool_p99 / alone_p99, 3) if alone_p99 else None
    return {
        "model": model,
        "version": version,
        "concurrency": concurrency,
        "description": f"{model} {version}: hey at c={concurrency} on /predictions alone, with one client posting "
        f"explanations back to back to the prediction workers, and with it posting them to the explanation pool "
        f"({pool}, one worker on idle CPU time); {rounds} rounds, the order mirrored every other round, medians of "
        "the p99s",
        "runs": runs,
        "p99_alone_ms": alone_p99,
        "p99_with_explanations_ms": beside_p99,
        "p99_ratio": ratio,
        "p99_with_pool_explanations_ms": pool_p99,
        "pool_p99_ratio": pool_ratio,
        "bar": {
            f"prediction p99 with explanations on their pool <= {P99_BAR}x alone": pool_ratio is not None
            and pool_ratio <= P99_BAR
        },
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
        "| round | p99 alone (ms) | p99, explanations on the prediction workers (ms) | p99, explanations on the "
        "pool (ms) | req/s alone / workers / pool | explanations answered: workers (429) / pool (timed out) | "
        "explanation p50 (ms): workers / pool |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, run in enumerate(result["runs"], 1):
        a, b, c = run["alone"], run["with_explanations"], run.get("with_pool_explanations") or {}
        e, f = run["explanations"], run.get("pool_explanations") or {}
        lines.append(f"| {n} | {a['p99_ms']} | {b['p99_ms']} | {c.get('p99_ms')} | {a['rps']} / {b['rps']} / "
                     f"{c.get('rps')} | {e['answered']} ({e['refused_429']}) / {f.get('answered')} ({f.get('other')}) "
                     f"| {e['p50_ms']} / {f.get('p50_ms')} |")  # fmt: skip
    verdict = "PASS" if all(result["bar"].values()) else "FAIL"
    lines += [
        "",
        f"p99 ratio (medians), explanations on the pool: {result.get('pool_p99_ratio')} ({verdict}: bar {P99_BAR}x); "
        f"on the prediction workers: {result['p99_ratio']}",
    ]
    return lines


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
