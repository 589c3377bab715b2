"""Kustomize: the bundle's manifests as a base and two overlays, for ``kubectl apply -k``.

    kustomize/
      base/                    Deployment, Service, PodDisruptionBudget, NetworkPolicy (k8s/servekit.yaml's
                               documents, the autoscaler aside)
      overlays/dev/            one host's shape: one replica, no autoscaler, a PDB that never blocks a drain
      overlays/production/     the bundle's replicas, the autoscaler (KEDA ScaledObject on the queue, or the
                               CPU HPA), the PodMonitors, the PrometheusRule and the Grafana dashboard

Every document is the one the rest of the bundle renders (``servekit.deploy.bundle``, ``.operators``);
the overlays only select and patch. ``kubectl kustomize overlays/dev`` renders each.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from servekit.deploy.bundle import APP, render_kubernetes, selector
from servekit.deploy.operators import render_dashboard_configmap, render_pod_monitors, render_prometheus_rule

__all__ = ["BASE_FILES", "write_kustomize"]

BASE_FILES = {"Deployment": "deployment.yaml", "Service": "service.yaml",
              "PodDisruptionBudget": "pdb.yaml", "NetworkPolicy": "networkpolicy.yaml"}  # fmt: skip
SCALERS = ("ScaledObject", "HorizontalPodAutoscaler")


def _dump(path: Path, documents: list[dict] | dict) -> None:
    documents = documents if isinstance(documents, list) else [documents]
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False, default_flow_style=False, explicit_start=True))


def _kustomization(resources: list[str], **extra: object) -> dict:
    return {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": resources,
            **extra}  # fmt: skip


def write_kustomize(record: dict, out: Path) -> list[Path]:
    """Write ``out/base`` and ``out/overlays/{dev,production}``; returns the overlay folders."""
    documents = {doc["kind"]: doc for doc in render_kubernetes(record)}
    base, dev, production = out / "base", out / "overlays" / "dev", out / "overlays" / "production"
    for folder in (base, dev, production):
        folder.mkdir(parents=True)
    for kind, name in BASE_FILES.items():
        _dump(base / name, documents[kind])
    _dump(base / "kustomization.yaml", _kustomization(list(BASE_FILES.values()), namespace=record["namespace"]))

    # dev: what `make serve` is on one host: one pod, no autoscaler; the PDB allows that pod down.
    pdb_spec = {"maxUnavailable": 1, "selector": {"matchLabels": selector()}}
    dev_patches = [
        {"target": {"kind": "Deployment", "name": APP},
         "patch": yaml.safe_dump([{"op": "replace", "path": "/spec/replicas", "value": 1}])},
        {"target": {"kind": "PodDisruptionBudget", "name": APP},
         "patch": yaml.safe_dump([{"op": "replace", "path": "/spec", "value": pdb_spec}])},
    ]  # fmt: skip
    _dump(dev / "kustomization.yaml", _kustomization(["../../base"], patches=dev_patches))

    (scaler,) = [documents[kind] for kind in SCALERS if kind in documents]
    extra = {
        "autoscaler.yaml": scaler,
        "podmonitor.yaml": render_pod_monitors(record)[0],  # the Deployment's pods
        "prometheusrule.yaml": render_prometheus_rule(record),
        "grafana-dashboard.yaml": render_dashboard_configmap(record),
    }
    for name, document in extra.items():
        _dump(production / name, document)
    _dump(production / "kustomization.yaml", _kustomization(["../../base", *extra]))
    return [dev, production]
