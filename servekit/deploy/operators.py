"""What operators apply around the pods: PodMonitors, a PrometheusRule and a Grafana dashboard.

* ``render_pod_monitors``: Prometheus Operator ``PodMonitor`` s for the Deployment's pods and for the
  KServe predictor's, scraping servekit's page (``sk-metrics``, 8083) as job ``servekit`` and TorchServe's
  (``metrics``, 8082) as job ``torchserve``: the job names ``make monitor`` uses and ``monitoring/rules``
  alert on (``up{job=~"servekit|torchserve"}``). The operator adds ``namespace``, ``pod`` and ``container``,
  which the queue query of ``servekit.deploy.autoscaling`` selects on.
* ``render_prometheus_rule``: a ``PrometheusRule`` whose groups are read from ``monitoring/rules/*.yml``,
  the same files ``promtool test rules`` tests (never a copy kept here).
* ``render_dashboard``: a Grafana dashboard, per version: requests/s, p50/p99, errors, 5xx share, queue
  and READY workers, drift (PSI against its threshold). ``dashboard_queries`` lists every expression; the
  integration test evaluates each one against a real Prometheus scraping a real server.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from servekit.deploy.autoscaling import SCRAPE_JOB
from servekit.errors import ServekitError
from servekit.serving.server import REPO_ROOT

__all__ = [
    "dashboard_queries",
    "render_dashboard",
    "render_dashboard_configmap",
    "render_pod_monitors",
    "render_prometheus_rule",
    "rule_groups",
]

RULES_DIR = REPO_ROOT / "monitoring" / "rules"
TORCHSERVE_JOB = "torchserve"
SCRAPE_INTERVAL = "15s"  # the rules' 1-minute rates need at least 4 samples a minute
DASHBOARD_UID = "servekit-versions"
GRAFANA_DASHBOARD_LABEL = ("grafana_dashboard", "1")  # what Grafana's dashboard sidecar looks for (kube-prometheus)


class RulesError(ServekitError, ValueError):
    """monitoring/rules cannot be read into a PrometheusRule; the message names the file."""


def _endpoints() -> list[dict]:
    return [
        {"port": port, "path": "/metrics", "interval": SCRAPE_INTERVAL,
         "relabelings": [{"action": "replace", "targetLabel": "job", "replacement": job}]}
        for port, job in (("sk-metrics", SCRAPE_JOB), ("metrics", TORCHSERVE_JOB))
    ]  # fmt: skip


def render_pod_monitors(namespace: str, labels: dict[str, str], pods: dict[str, dict[str, str]]) -> list[dict]:
    """One PodMonitor per entry of ``pods`` (its name: the pods' label selector), both pages of each pod."""
    return [
        {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
         "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
         "spec": {"selector": {"matchLabels": dict(selector)}, "podMetricsEndpoints": _endpoints()}}
        for name, selector in pods.items()
    ]  # fmt: skip


def rule_groups(rules_dir: Path = RULES_DIR) -> list[dict]:
    """The rule groups of ``monitoring/rules/*.yml``, in file order."""
    groups: list[dict] = []
    files = sorted(Path(rules_dir).glob("*.yml"))
    if not files:
        raise RulesError(f"no rule files in {rules_dir}")
    for path in files:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise RulesError(f"cannot read {path}: {' '.join(str(exc).split())}") from None
        if not isinstance(data, dict) or not isinstance(data.get("groups"), list):
            raise RulesError(f"{path} has no 'groups:' list")
        groups.extend(data["groups"])
    return groups


def render_prometheus_rule(name: str, namespace: str, labels: dict[str, str], rules_dir: Path = RULES_DIR) -> dict:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "spec": {"groups": rule_groups(rules_dir)},
    }


# ------------------------------------------------------------------------------------------ Grafana
_SELECT = 'namespace=~"$namespace", model=~"$model"'
PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    # (title, unit, [(legend, expr)])
    ("Requests per second", "reqps", [
        ("{{model}} {{version}}",
         f"sum by (model, version) (rate(servekit_requests_total{{{_SELECT}}}[$__rate_interval]))"),
    ]),
    ("Latency p50 and p99 (handler)", "s", [
        ("p50 {{model}} {{version}}", "histogram_quantile(0.5, sum by (model, version, le) "
         f"(rate(servekit_request_seconds_bucket{{{_SELECT}}}[$__rate_interval])))"),
        ("p99 {{model}} {{version}}", "histogram_quantile(0.99, sum by (model, version, le) "
         f"(rate(servekit_request_seconds_bucket{{{_SELECT}}}[$__rate_interval])))"),
    ]),
    ("Errors per second by type", "reqps", [
        ("{{model}} {{version}} {{type}}",
         f"sum by (model, version, type) (rate(servekit_errors_total{{{_SELECT}}}[$__rate_interval]))"),
    ]),
    ("5xx share (5 min)", "percentunit", [
        ("{{model}} {{version}}", f"sum by (model, version) (servekit:server_errors:ratio5m{{{_SELECT}}})"),
    ]),
    ("Queue and READY workers", "short", [
        ("queued {{model}} {{version}}", f"sum by (model, version) (max by (pod, model, version) "
         f"(servekit_queue_pending{{{_SELECT}}}))"),
        ("READY {{model}} {{version}}", f"sum by (model, version) (max by (pod, model, version) "
         f"(servekit_workers_ready{{{_SELECT}}}))"),
    ]),
    ("Drift: PSI of the class mix (15 min) and its threshold", "short", [
        ("PSI {{model}} {{version}}", f"max by (model, version) (servekit:drift_psi:15m{{{_SELECT}}})"),
        ("threshold {{model}} {{version}}", f"max by (model, version) (servekit_drift_threshold{{{_SELECT}}})"),
    ]),
]  # fmt: skip


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard, template variables unexpanded."""
    return [expr for _, _, targets in PANELS for _, expr in targets]


def render_dashboard() -> dict[str, Any]:
    """A Grafana dashboard (schemaVersion 39): one panel per row of PANELS, lines per model and version."""
    panels = []
    for index, (title, unit, targets) in enumerate(PANELS):
        panels.append({
            "id": index + 1,
            "type": "timeseries",
            "title": title,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "table", "placement": "bottom"}},
            "targets": [{"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend,
                         "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                        for i, (legend, expr) in enumerate(targets)],
        })  # fmt: skip
    variable = {"type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"}, "refresh": 2,
                "includeAll": True, "multi": True, "allValue": ".*",
                "current": {"text": "All", "value": "$__all"}}  # fmt: skip
    return {
        "uid": DASHBOARD_UID,
        "title": "servekit: model versions",
        "tags": ["servekit"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
                {
                    **variable,
                    "name": "namespace",
                    "label": "namespace",
                    "query": "label_values(servekit_exporter_up, namespace)",
                },
                {
                    **variable,
                    "name": "model",
                    "label": "model",
                    "query": 'label_values(servekit_requests_total{namespace=~"$namespace"}, model)',
                },
            ]
        },  # fmt: skip
        "panels": panels,
    }


def render_dashboard_configmap(name: str, namespace: str, labels: dict[str, str]) -> dict:
    """The dashboard as a ConfigMap that Grafana's sidecar picks up (label grafana_dashboard=1)."""
    key, value = GRAFANA_DASHBOARD_LABEL
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels) | {key: value}},
        "data": {"servekit-dashboard.json": json.dumps(render_dashboard(), indent=1, sort_keys=True)},
    }
