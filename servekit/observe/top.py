"""``servekit top``: a live view of every model version: traffic, latency, errors, queue, workers, drift.

Two ways to the numbers, the same ``Snapshot`` from both:

* Prometheus, when it answers: the recording rules (``RULES``, ``monitoring/rules/``) where they
  have data for a version, else the same expressions over the base metrics (``RAW``);
* the ``/metrics`` page: two scrapes ``interval`` seconds apart, rates and latency from their
  difference; drift from the counts since the server started.

Rendering is a pure function of a snapshot, so the view is tested without a server:

    view = PrometheusView(PrometheusAPI(url), ReferenceCache(store))   # or MetricsView(page, ..., interval=2)
    print(render(view.snapshot()))
    json.dumps(view.snapshot().as_dict())

``run_top`` is the command: one frame (``once``), one JSON document, or a frame every ``interval``
seconds until Ctrl-C. Nothing here imports torch.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Protocol, TextIO

from servekit.errors import ServekitError, one_line
from servekit.observe.drift import (
    DEFAULT_WINDOW,
    JUDGED,
    DriftError,
    ReferenceCache,
    compare,
    live_distributions,
    prometheus_drift_samples,
    require_servekit,
)
from servekit.observe.metrics_source import MetricsPage, PrometheusAPI, Samples
from servekit.serving.store import version_key

__all__ = ["MetricsView", "PrometheusView", "Row", "Snapshot", "render", "run_top"]

CLEAR = "\x1b[H\x1b[2J"
NO_REFERENCE = "no reference"
REQUESTS = "servekit_requests_total"
SECONDS = "servekit_request_seconds"


def _error_ratio(codes: str, window: str) -> str:
    every = f"sum by (model, version) (rate({REQUESTS}[{window}]))"
    failed = f'sum by (model, version) (rate({REQUESTS}{{code=~"{codes}"}}[{window}]))'
    return f"({failed} or 0 * {every}) / ({every} > 0)"  # no failed series yet: 0; no traffic: absent


def _quantile(q: float, window: str) -> str:
    return f"histogram_quantile({q}, sum by (model, version, le) (rate({SECONDS}_bucket[{window}])))"


# quantity -> its recording rule (monitoring/rules/servekit.rules.yml, "Rules" in docs/monitoring.md), and the
# same expression over the base metrics for a version the rule has no value for. Exporter gauges are read
# through max by (model, version), as the rules do: two scrapes of one page must not double them.
RULES = {
    "rps": "servekit:requests:rate1m",
    "p50": "servekit:request_seconds:p50_5m",
    "p99": "servekit:request_seconds:p99_5m",
    "errors_5xx": "servekit:server_errors:ratio5m",
    "errors_4xx": "servekit:client_errors:ratio5m",
}
RAW = {
    "rps": f"sum by (model, version) (rate({REQUESTS}[1m]))",
    "p50": _quantile(0.5, "5m"),
    "p99": _quantile(0.99, "5m"),
    "errors_5xx": _error_ratio("5..", "5m"),
    "errors_4xx": _error_ratio("4..", "5m"),
    "pending": "max by (model, version) (servekit_queue_pending)",
    "ready": "max by (model, version) (servekit_workers_ready)",
    "default": "max by (model, version) (servekit_default_version)",
    "seen": f"count by (model, version) ({REQUESTS})",
}


# ------------------------------------------------------------------------------------------ the snapshot
@dataclass(frozen=True)
class Row:
    """One model version. ``None``: no data (no traffic for a rate or a latency)."""

    model: str
    version: str
    default: bool = False
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors_5xx_pct: float | None = None
    errors_4xx_pct: float | None = None
    pending: float | None = None
    ready: float | None = None
    drift: str = NO_REFERENCE
    drift_psi: float | None = None  # the highest PSI of the judged signals


@dataclass(frozen=True)
class Snapshot:
    """Everything one frame shows; ``taken_at`` is ``time.time()``."""

    source: str
    taken_at: float
    rows: tuple[Row, ...] = ()
    notes: tuple[str, ...] = ()
    error: str | None = None

    def as_dict(self) -> dict:
        return {
            "time": datetime.fromtimestamp(self.taken_at, UTC).isoformat(timespec="seconds"),
            "source": self.source,
            "models": [_rounded(asdict(row)) for row in self.rows],
            "notes": list(self.notes),
            **({"error": self.error} if self.error else {}),
        }


def _rounded(row: dict) -> dict:
    return {key: round(value, 3) if isinstance(value, float) else value for key, value in row.items()}


HEADER = ("MODEL", "VERSION", "DEFAULT", "REQ/S", "P50 MS", "P99 MS", "5XX %", "4XX %", "QUEUE", "READY", "DRIFT")


def render(snapshot: Snapshot) -> str:
    """The frame as text: a title line, one line per version, then the notes."""
    clock = time.strftime("%H:%M:%S", time.localtime(snapshot.taken_at))
    lines = [f"servekit top  {clock}  {snapshot.source}"]
    if snapshot.error:
        lines.append(f"error: {snapshot.error}")
    if snapshot.rows:
        rows = [HEADER] + [
            (
                row.model,
                row.version,
                "*" if row.default else "",
                _rate(row.rps),
                _fixed(row.p50_ms),
                _fixed(row.p99_ms),
                _fixed(row.errors_5xx_pct),
                _fixed(row.errors_4xx_pct),
                _whole(row.pending),
                _whole(row.ready),
                row.drift if row.drift_psi is None else f"{row.drift} ({row.drift_psi:.2f})",
            )
            for row in snapshot.rows
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
        right = {3, 4, 5, 6, 7, 8, 9}  # numbers line up on the right
        lines += [
            "  ".join(
                cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(r)
            ).rstrip()
            for r in rows
        ]
    elif not snapshot.error:
        lines.append("no model versions in the metrics yet")
    lines += [f"note: {note}" for note in snapshot.notes]
    return "\n".join(lines)


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _fixed(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _whole(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


# ------------------------------------------------------------------------------------------ drift per row
def drift_cell(references: ReferenceCache, samples: Samples, model: str, version: str) -> tuple[str, float | None]:
    """The verdict and highest judged PSI of one version from ``samples``; ``no reference`` without one."""
    reference = references.get(model, version)
    if reference is None:
        return NO_REFERENCE, None
    try:
        report = compare(reference, live_distributions(samples, model, version))
    except DriftError:
        return "buckets differ", None
    values = [s["psi"] for name, s in report["signals"].items() if name in JUDGED and s["psi"] is not None]
    return report["verdict"], (max(values) if values and report["verdict"] != "insufficient data" else None)


def _ordered(keys: set[tuple[str, str]]) -> list[tuple[str, str]]:
    return sorted(keys, key=lambda key: (key[0], version_key(key[1]), key[1]))


# ------------------------------------------------------------------------------------------ the sources
class View(Protocol):
    def snapshot(self) -> Snapshot: ...


@dataclass
class PrometheusView:
    """Snapshots from Prometheus: recording rules first, the base metrics where a rule has no data."""

    prometheus: PrometheusAPI
    references: ReferenceCache
    window: str = DEFAULT_WINDOW
    clock: Callable[[], float] = field(default=time.time, repr=False)
    rules: Mapping[str, str] = field(default_factory=lambda: dict(RULES))

    def snapshot(self) -> Snapshot:
        values = {name: self._vector(RAW[name]) for name in ("pending", "ready", "default", "seen")}
        keys = set().union(*(v.keys() for v in values.values()))
        for name in ("rps", "p50", "p99", "errors_5xx", "errors_4xx"):
            values[name] = self._with_fallback(name, keys)
        drift_samples = prometheus_drift_samples(self.prometheus, self.window)
        rows = []
        for model, version in _ordered(keys):
            key = (model, version)
            drift, worst = drift_cell(self.references, drift_samples, model, version)
            rows.append(Row(
                model, version, values["default"].get(key) == 1, values["rps"].get(key),
                _ms(values["p50"].get(key)), _ms(values["p99"].get(key)),
                _pct(values["errors_5xx"].get(key)), _pct(values["errors_4xx"].get(key)),
                values["pending"].get(key), values["ready"].get(key), drift, worst,
            ))  # fmt: skip
        source = (
            f"Prometheus {self.prometheus.url}: req/s over 1m, latency and errors over 5m, drift over {self.window}"
        )
        return Snapshot(source, self.clock(), tuple(rows))

    def _vector(self, promql: str) -> dict[tuple[str, str], float]:
        values: dict[tuple[str, str], float] = {}
        for labels, value in self.prometheus.query(promql):
            key = (labels.get("model", ""), labels.get("version", ""))
            if all(key):
                values[key] = values.get(key, 0.0) + value
        return values

    def _with_fallback(self, name: str, keys: set[tuple[str, str]]) -> dict[tuple[str, str], float]:
        if not keys:
            return {}
        rule = self.rules.get(name)
        found = self._vector(rule) if rule else {}
        if not keys <= set(found):
            found = {**self._vector(RAW[name]), **found}
        return found


@dataclass
class MetricsView:
    """Snapshots from the ``/metrics`` page: the difference of two scrapes ``interval`` seconds apart.

    The first snapshot scrapes twice; every later one scrapes once and compares with the scrape
    before it (``run_top`` calls it every ``interval`` seconds).
    """

    page: MetricsPage
    references: ReferenceCache
    interval: float = 2.0
    clock: Callable[[], float] = field(default=time.time, repr=False)
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    previous: Samples | None = field(default=None, repr=False)

    def snapshot(self) -> Snapshot:
        if self.previous is None:
            self.previous = self.page.scrape()
            require_servekit(self.previous, self.page.url)
            self.sleep(self.interval)
        latest = self.page.scrape()
        earlier, self.previous = self.previous, latest
        return snapshot_from_scrapes(earlier, latest, self.references, self.page.url, self.clock())


def snapshot_from_scrapes(
    earlier: Samples, latest: Samples, references: ReferenceCache, url: str, taken_at: float
) -> Snapshot:
    """A frame from two scrapes: rates, latency and errors from their difference, gauges and drift from ``latest``."""
    delta = latest.since(earlier)
    elapsed = latest.seconds_since(earlier) or 0.0
    keys = set()
    for name in ("servekit_workers_ready", "servekit_queue_pending", "servekit_default_version", REQUESTS):
        keys |= {k for k in latest.keys(name, "model", "version") if all(k)}
    rows = []
    for model, version in _ordered(keys):
        labels = {"model": model, "version": version}
        codes = delta.by_label(REQUESTS, "code", **labels)
        total = sum(codes.values())
        histogram = delta.histogram(SECONDS, **labels)
        drift, worst = drift_cell(references, latest, model, version)
        rows.append(Row(
            model, version, latest.value("servekit_default_version", **labels) == 1,
            total / elapsed if elapsed > 0 else None,
            _ms(histogram.quantile(0.5)) if histogram else None,
            _ms(histogram.quantile(0.99)) if histogram else None,
            _share(codes, "5", total), _share(codes, "4", total),
            latest.value("servekit_queue_pending", **labels), latest.value("servekit_workers_ready", **labels),
            drift, worst,
        ))  # fmt: skip
    source = f"{url}: req/s, latency and errors over the last {elapsed:.1f} s; drift since the server started"
    return Snapshot(source, taken_at, tuple(rows))


def _share(codes: Mapping[str, float], first_digit: str, total: float) -> float | None:
    if total <= 0:
        return None
    return 100.0 * sum(n for code, n in codes.items() if code.startswith(first_digit)) / total


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def _pct(ratio: float | None) -> float | None:
    return None if ratio is None else ratio * 100.0


# ------------------------------------------------------------------------------------------ the command
def run_top(
    view: View,
    *,
    once: bool = False,
    as_json: bool = False,
    interval: float = 2.0,
    out: TextIO | None = None,
    sleep: Callable[[float], None] = time.sleep,
    frames: int | None = None,
) -> None:
    """Print one frame (``once``), one JSON document (``as_json``), or a frame every ``interval`` s until Ctrl-C.

    The first frame's failure is the command's (one line, status 1); a later one is shown in the
    frame and the view keeps trying. ``frames`` bounds the loop (tests).
    """
    out = out or sys.stdout
    if as_json:
        out.write(json.dumps(view.snapshot().as_dict(), indent=2) + "\n")
        return
    if once:
        out.write(render(view.snapshot()) + "\n")
        return
    shown = 0
    try:
        snapshot = view.snapshot()
        while True:
            out.write(CLEAR + render(snapshot) + f"\n\nevery {interval:g} s; Ctrl-C to quit\n")
            out.flush()
            shown += 1
            if frames is not None and shown >= frames:
                return
            sleep(interval)
            try:
                snapshot = view.snapshot()
            except ServekitError as exc:
                snapshot = Snapshot(snapshot.source, time.time(), (), (), one_line(exc))
    except KeyboardInterrupt:
        out.write("\n")
