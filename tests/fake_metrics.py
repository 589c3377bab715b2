"""Fakes for the reading side of the metrics (``servekit top``, ``servekit drift``): no TorchServe, no Prometheus.

* ``Traffic`` + ``exposition``: a ``/metrics`` page as the exporter writes it, made by
  ``prometheus_client`` itself from what one or more model versions answered;
* ``FakeMetricsServer``: a threaded HTTP server on 127.0.0.1 that serves ``/metrics`` (one page,
  or a sequence, one per scrape) and Prometheus' ``/api/v1/query`` from a function of the query;
* ``write_store``: a model store with a real zip archive whose ``metadata.json`` carries a drift
  reference, recorded in the manifest (sha256) like ``make archive`` does.
"""

from __future__ import annotations

import json
import re
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from servekit.serving.store import archive_name, file_sha256, read_manifest, write_manifest

SECONDS_EDGES = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONFIDENCE_EDGES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
BRIGHTNESS_EDGES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MEGAPIXEL_EDGES = (0.001, 0.01, 0.05, 0.1, 0.3, 1.0, 3.0, 12.0, 25.0)
CLASSES = [str(i) for i in range(10)]

# The held-out set of the tests' "digits": every class alike, confident answers, mid brightness, 28x28 images.
REFERENCE_CONFIDENCE = [0, 0, 0, 0, 2, 2, 4, 6, 10, 16, 60, 100]
REFERENCE_BRIGHTNESS = [0, 10, 40, 80, 60, 10, 0, 0, 0, 0]
REFERENCE_MEGAPIXELS = [200, 0, 0, 0, 0, 0, 0, 0, 0, 0]


def reference_block(samples: int = 200) -> dict:
    return {
        "source": "digits holdout",
        "samples": samples,
        "classes": dict.fromkeys(CLASSES, 0.1),
        "confidence": {"edges": list(CONFIDENCE_EDGES), "counts": REFERENCE_CONFIDENCE},
        "brightness": {"edges": list(BRIGHTNESS_EDGES), "counts": REFERENCE_BRIGHTNESS},
        "megapixels": {"edges": list(MEGAPIXEL_EDGES), "counts": REFERENCE_MEGAPIXELS},
    }


def values_for(edges: Sequence[float], counts: Sequence[int]) -> list[float]:
    """Observations that fall ``counts[i]`` times into bin i (the bin's upper edge, or above the last)."""
    values = []
    for i, count in enumerate(counts):
        value = edges[i] if i < len(edges) else edges[-1] * 2
        values += [value] * count
    return values


# ------------------------------------------------------------------------------------------ pages
@dataclass
class Traffic:
    """What one model version answered, as the exporter would count it."""

    model: str = "digits"
    version: str = "2.0"
    classes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLASSES, 20))
    confidence: list[float] = field(default_factory=lambda: values_for(CONFIDENCE_EDGES, REFERENCE_CONFIDENCE))
    brightness: list[float] = field(default_factory=lambda: values_for(BRIGHTNESS_EDGES, REFERENCE_BRIGHTNESS))
    megapixels: list[float] = field(default_factory=lambda: values_for(MEGAPIXEL_EDGES, REFERENCE_MEGAPIXELS))
    codes: dict[str, int] = field(default_factory=lambda: {"200": 200})
    seconds: list[float] = field(default_factory=lambda: [0.004] * 100 + [0.02] * 100)
    ready: int = 1
    pending: int = 0
    default: bool = True


def exposition(*versions: Traffic) -> str:
    """The metrics page of these versions (prometheus_client's own text format, ``_created`` lines included)."""
    registry = CollectorRegistry()
    common = ("model", "version")
    requests = Counter("servekit_requests", "requests", (*common, "code"), registry=registry)
    predictions = Counter("servekit_predictions", "top-1", (*common, "class"), registry=registry)
    histograms = {
        "seconds": Histogram("servekit_request_seconds", "s", common, buckets=SECONDS_EDGES, registry=registry),
        "confidence": Histogram("servekit_confidence", "p", common, buckets=CONFIDENCE_EDGES, registry=registry),
        "brightness": Histogram("servekit_input_brightness", "b", common, buckets=BRIGHTNESS_EDGES, registry=registry),
        "megapixels": Histogram("servekit_input_megapixels", "mp", common, buckets=MEGAPIXEL_EDGES, registry=registry),
    }
    up = Gauge("servekit_exporter_up", "up", registry=registry)
    ready = Gauge("servekit_workers_ready", "ready", common, registry=registry)
    pending = Gauge("servekit_queue_pending", "pending", common, registry=registry)
    default = Gauge("servekit_default_version", "default", common, registry=registry)
    up.set(1)
    for t in versions:
        labels = (t.model, t.version)
        for code, n in t.codes.items():
            requests.labels(*labels, code).inc(n)
        for label, n in t.classes.items():
            predictions.labels(*labels, label).inc(n)
        for name in histograms:
            child = histograms[name].labels(*labels)  # the series exists even without observations
            for value in getattr(t, name):
                child.observe(value)
        ready.labels(*labels).set(t.ready)
        pending.labels(*labels).set(t.pending)
        default.labels(*labels).set(1 if t.default else 0)
    return generate_latest(registry).decode()


# ------------------------------------------------------------------------------------------ the server
Answer = Callable[[str], dict]


class FakeMetricsServer(ThreadingHTTPServer):
    """``GET /metrics`` and ``GET /api/v1/query`` on 127.0.0.1 (a free port).

    ``pages``: each scrape takes the next page, the last one repeats. ``prometheus``: the
    ``data`` of a successful answer for a query (``None``: no Prometheus here, 404 as any other
    server). ``queries`` records every query asked.
    """

    daemon_threads = True

    def __init__(self, pages: Sequence[str] = (), prometheus: Answer | None = None, delay: float = 0.0) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.pages = list(pages)
        self.prometheus = prometheus
        self.delay = delay
        self.queries: list[str] = []
        self.scrapes = 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that gave up (timeouts) is not an error here

    def next_page(self) -> str | None:
        with self.lock:
            if not self.pages:
                return None
            self.scrapes += 1
            return self.pages.pop(0) if len(self.pages) > 1 else self.pages[0]


class _Handler(BaseHTTPRequestHandler):
    server: FakeMetricsServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: str, content_type: str = "text/plain; version=0.0.4") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - the base's name
        if self.server.delay:
            time.sleep(self.server.delay)
        address = urlsplit(self.path)
        if address.path == "/metrics":
            page = self.server.next_page()
            return self._send(200, page) if page is not None else self._send(404, "<html>not here</html>")
        if address.path == "/api/v1/query" and self.server.prometheus is not None:
            query = parse_qs(address.query).get("query", [""])[0]
            with self.server.lock:
                self.server.queries.append(query)
            try:
                document = {"status": "success", "data": self.server.prometheus(query)}
                status = 200
            except ValueError as exc:
                document = {"status": "error", "errorType": "bad_data", "error": str(exc)}
                status = 400
            return self._send(status, json.dumps(document), "application/json")
        return self._send(404, "<html>404 page not found</html>", "text/html")


# ------------------------------------------------------------------------------------------ Prometheus answers
def vector(*series: tuple[dict[str, str], float]) -> dict:
    return {"resultType": "vector", "result": [{"metric": labels, "value": [1.0, str(v)]} for labels, v in series]}


SCALAR_ONE = {"resultType": "scalar", "result": [1.0, "1"]}
_SELECTOR = re.compile(r'(\w+)="([^"]*)"')
GROUPED_BY = {
    "servekit_predictions_total": "class",
    "servekit_confidence_bucket": "le",
    "servekit_input_brightness_bucket": "le",
    "servekit_input_megapixels_bucket": "le",
}


def prometheus_of(*versions: Traffic, extra: dict[str, dict] | None = None) -> Answer:
    """A Prometheus holding these versions' counts as ``increase()`` over any window, for the queries drift reads.

    ``extra``: exact query -> data (rules, raw top queries); anything else answers an empty vector.
    """
    from servekit.observe.metrics_source import parse_exposition

    samples = parse_exposition(exposition(*versions))

    def answer(query: str) -> dict:
        if extra and query in extra:
            return extra[query]
        if query == "1":
            return SCALAR_ONE
        if query == "count(servekit_exporter_up)":
            return vector(({}, 1))
        wanted = dict(_SELECTOR.findall(query))
        if query.startswith("servekit_default_version"):
            return vector(*[(dict(s.labels), 1) for s in samples.select("servekit_default_version", **wanted)
                            if s.value == 1])  # fmt: skip
        for name, by in GROUPED_BY.items():
            if f"({name}" in query:
                grouped: dict[tuple[str, str, str], float] = {}
                for s in samples.select(name, **wanted):
                    key = (s.labels["model"], s.labels["version"], s.labels[by])
                    grouped[key] = grouped.get(key, 0.0) + s.value
                return vector(*[({"model": m, "version": v, by: b}, n) for (m, v, b), n in grouped.items()])
        return vector()

    return answer


# ------------------------------------------------------------------------------------------ the store
def write_store(store: Path, model: str = "digits", version: str = "2.0", metadata: dict | None = None) -> Path:
    """An archive ``store/<model>_v<version>.mar`` with ``metadata.json``, recorded in the manifest."""
    store.mkdir(parents=True, exist_ok=True)
    if metadata is None:
        metadata = {
            "model": model,
            "version": version,
            "monitoring": {"slo_p99_ms": 250, "drift_threshold": 0.25, "drift_min_samples": 100},
            "drift_reference": reference_block(),
        }
    name = archive_name(model, version)
    path = store / name
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("MAR-INF/MANIFEST.json", json.dumps({"model": {"modelName": model}}))
        archive.writestr("metadata.json", json.dumps(metadata))
    manifest = read_manifest(store)
    manifest["archives"][name] = {"model": model, "version": version, "sha256": file_sha256(path)}
    write_manifest(store, manifest)
    return path
