"""``GET /metrics`` of the OIP gateway: the workers' handler metrics and the serving state, for Prometheus.

Two parts, one page (names and labels: ``docs/monitoring.md``):

* the handler metrics every worker writes into ``PROMETHEUS_MULTIPROC_DIR`` (``handlers.metrics``),
  summed per label set across worker processes, dead ones included (their counts stay);
* gauges read at scrape time from TorchServe's management API and the archives: workers per status,
  READY workers, queued requests, which version is the default, and each version's monitoring
  settings and drift reference from its ``metadata.json`` (what the alert rules compare with).
  The management API is read through the gateway's short-lived cache (``Gateway.serving_view``,
  shared with readiness): scrapes within its TTL cost TorchServe nothing more.

A management API that does not answer costs the gauges, not the page: the handler metrics are still
served, and ``servekit_exporter_up`` says 0.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from servekit.serving.client import TorchServeError

logger = logging.getLogger(__name__)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_VERSION_LABELS = ["model", "version"]


class StateCollector:
    """The gauges read at scrape time (see the module docstring); ``gateway``: a ``servekit.serving.oip.Gateway``."""

    def __init__(self, gateway: Any) -> None:
        self.gateway = gateway

    def versions(self) -> Iterator[tuple[str, dict, str]]:
        """(model, description of one version, the model's default version) for every registered version."""
        serving_view = getattr(self.gateway, "serving_view", None)
        if serving_view is not None:  # the gateway's cached view (servekit.serving.oip.Gateway)
            view = serving_view()
            if view.error is not None:
                raise TorchServeError(view.error)
            for name, (default, descriptions) in view.models.items():
                for description in descriptions:
                    yield name, description, default
            return
        client = self.gateway.client  # anything else with a client: asked at every scrape
        for name in client.models():
            default = str(client.describe(name, "", timeout=10)[0].get("modelVersion"))
            for description in client.describe(name, "all", timeout=10):
                yield name, description, default

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("servekit_exporter_up", "1 when TorchServe's management API answered the scrape")
        families = {
            "workers": GaugeMetricFamily("servekit_workers", "Workers per status", labels=[*_VERSION_LABELS, "status"]),
            "ready": GaugeMetricFamily("servekit_workers_ready", "READY workers", labels=_VERSION_LABELS),
            "queue": GaugeMetricFamily("servekit_queue_pending", "Requests in the job queue", labels=_VERSION_LABELS),
            "default": GaugeMetricFamily(
                "servekit_default_version", "1 for the default version", labels=_VERSION_LABELS
            ),  # fmt: skip
            "slo": GaugeMetricFamily("servekit_slo_p99_seconds", "The spec's p99 objective", labels=_VERSION_LABELS),
            "threshold": GaugeMetricFamily(
                "servekit_drift_threshold", "PSI at which the class mix counts as drift", labels=_VERSION_LABELS
            ),  # fmt: skip
            "min_samples": GaugeMetricFamily(
                "servekit_drift_min_samples", "Live inputs needed for a drift verdict", labels=_VERSION_LABELS
            ),  # fmt: skip
            "reference": GaugeMetricFamily(
                "servekit_drift_reference_ratio",
                "Reference share of each top-1 class",
                labels=[*_VERSION_LABELS, "class"],
            ),  # fmt: skip
        }
        try:
            for name, description, default in self.versions():
                self._add(families, name, description, default)
            up.add_metric([], 1)
        except (TorchServeError, requests.RequestException, OSError, ValueError, KeyError, IndexError) as exc:
            logger.warning("exporter: the serving state is incomplete: %s", exc)
            up.add_metric([], 0)
        yield up
        yield from families.values()

    def _add(self, families: dict, name: str, description: dict, default: str) -> None:
        version = str(description.get("modelVersion"))
        labels = [name, version]
        statuses: dict[str, int] = {}
        for worker in description.get("workers", []):
            status = str(worker.get("status", "UNKNOWN"))
            statuses[status] = statuses.get(status, 0) + 1
        for status, count in sorted(statuses.items()):
            families["workers"].add_metric([*labels, status], count)
        families["ready"].add_metric(labels, statuses.get("READY", 0))
        queue = description.get("jobQueueStatus") or {}
        if "pendingRequests" in queue:
            families["queue"].add_metric(labels, float(queue["pendingRequests"]))
        families["default"].add_metric(labels, 1 if version == default else 0)
        try:
            metadata = self.gateway.archive_metadata(str(description.get("modelUrl") or description.get("marName")))
        except Exception as exc:  # noqa: BLE001 - an unreadable archive costs its gauges only
            logger.warning("exporter: %s %s: no archive metadata: %s", name, version, exc)
            return
        monitoring = metadata.get("monitoring") or {}
        if "slo_p99_ms" in monitoring:
            families["slo"].add_metric(labels, float(monitoring["slo_p99_ms"]) / 1000)
        if "drift_threshold" in monitoring:
            families["threshold"].add_metric(labels, float(monitoring["drift_threshold"]))
        if "drift_min_samples" in monitoring:
            families["min_samples"].add_metric(labels, float(monitoring["drift_min_samples"]))
        reference = (metadata.get("drift_reference") or {}).get("classes") or {}
        for label, share in reference.items():
            families["reference"].add_metric([*labels, str(label)], float(share))


def render(gateway: Any, metrics_dir: Path | None) -> bytes:
    """The whole ``/metrics`` page (a fresh registry per scrape; TorchServe's view may come from the gateway cache)."""
    registry = CollectorRegistry()
    if metrics_dir is not None and metrics_dir.is_dir():
        MultiProcessCollector(registry, path=str(metrics_dir))
    registry.register(StateCollector(gateway))
    return generate_latest(registry)


def clear(metrics_dir: Path) -> None:
    """Empty the workers' metric files before a server starts (counts from an earlier run would mix in)."""
    metrics_dir.mkdir(parents=True, exist_ok=True)
    for path in metrics_dir.glob("*.db"):
        path.unlink(missing_ok=True)
