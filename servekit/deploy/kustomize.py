"""Kustomize: the bundle's manifests as a base and two overlays, for ``kubectl apply -k``.

    kustomize/
      base/                    Deployment, Service, PodDisruptionBudget, NetworkPolicy, the routing ConfigMap
                               (k8s/servekit.yaml's documents, the autoscaler aside)
      overlays/dev/            one host's shape: one replica, no autoscaler, a PDB that never blocks a drain
      overlays/production/     the bundle's replicas, the autoscaler (KEDA ScaledObject on the queue, or the
                               CPU HPA), the PodMonitors, the PrometheusRule and the Grafana dashboard

Every document is the one the rest of the bundle renders (``servekit.deploy.bundle``, ``.operators``);
the overlays only select and patch. ``kubectl kustomize overlays/dev`` renders each.
"""

from __future__ import annotations

from pathlib import Path

import yaml

__all__ = ["BASE_FILES", "write_kustomize"]

BASE_FILES = {"Deployment": "deployment.yaml", "Service": "service.yaml",
              "PodDisruptionBudget": "pdb.yaml", "NetworkPolicy": "networkpolicy.yaml",
              "ConfigMap": "routing.yaml"}  # fmt: skip
SCALERS = ("ScaledObject", "HorizontalPodAutoscaler")


def _dump(path: Path, documents: list[dict] | dict) -> None:
    documents = documents if isinstance(documents, list) else [documents]
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False, default_flow_style=False, explicit_start=True))


def _kustomization(resources: list[str], **extra: object) -> dict:
    return {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": resources,
            **extra}  # fmt: skip


def write_kustomize(documents: list[dict], operators: dict[str, dict], namespace: str, out: Path) -> list[Path]:
    """Write ``out/base`` and ``out/overlays/{dev,production}``; returns the overlay folders.

    ``documents``: k8s/servekit.yaml's (one of each BASE_FILES kind and one autoscaler); ``operators``:
    file name -> the document the production overlay adds (PodMonitor, PrometheusRule, dashboard).
    """
    by_kind = {doc["kind"]: doc for doc in documents}
    base, dev, production = out / "base", out / "overlays" / "dev", out / "overlays" / "production"
    for folder in (base, dev, production):
        folder.mkdir(parents=True)
    for kind, name in BASE_FILES.items():
        _dump(base / name, by_kind[kind])
    _dump(base / "kustomization.yaml", _kustomization(list(BASE_FILES.values()), namespace=namespace))

    # dev: what `make serve` is on one host: one pod, no autoscaler; the PDB allows that pod down.
    deployment, budget = by_kind["Deployment"], by_kind["PodDisruptionBudget"]
    pdb_spec = {"maxUnavailable": 1, "selector": budget["spec"]["selector"]}
    dev_patches = [
        {"target": {"kind": "Deployment", "name": deployment["metadata"]["name"]},
         "patch": yaml.safe_dump([{"op": "replace", "path": "/spec/replicas", "value": 1}])},
        {"target": {"kind": "PodDisruptionBudget", "name": budget["metadata"]["name"]},
         "patch": yaml.safe_dump([{"op": "replace", "path": "/spec", "value": pdb_spec}])},
    ]  # fmt: skip
    _dump(dev / "kustomization.yaml", _kustomization(["../../base"], patches=dev_patches))

    (scaler,) = [by_kind[kind] for kind in SCALERS if kind in by_kind]
    extra = {"autoscaler.yaml": scaler, **operators}
    for name, document in extra.items():
        _dump(production / name, document)
    _dump(production / "kustomization.yaml", _kustomization(["../../base", *extra]))
    return [dev, production]
