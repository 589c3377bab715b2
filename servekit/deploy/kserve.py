"""Canaries on KServe as it is today: ``servekit kserve canary|promote|abort|rollout``.

KServe 0.20 (``pkg/constants/constants.go``) names its modes ``Standard`` (the default; 0.15-0.19 call
it ``RawDeployment``, which 0.20 still reads as Standard) and ``Knative`` (formerly ``Serverless``).
``servekit bundle`` (``servekit.deploy.bundle``) writes Standard unless ``--kserve-mode knative``:

* **Standard**: KServe creates a Deployment and a Service ``APP-predictor`` from the predictor. The
  Service's first port is the first container port on :80 (here the OIP HTTP front, 8000), every
  further container port at its own number, with ``appProtocol: kubernetes.io/h2c`` when its name holds
  ``grpc`` or ``h2c`` (``reconcilers/service/service_reconciler.go``): so OIP gRPC (8001) is reachable
  through the Service, and ``/predictions`` (8080). The pod is the Deployment form's (startup probe,
  preStop, grace); no Knative, no queue-proxy. Scaling: KEDA on the queue with CPU beside it
  (``serving.kserve.io/autoscalerClass: keda`` and ``autoScaling``; KServe writes the ScaledObject),
  or KServe's CPU HPA with ``--autoscaler hpa``.
* **Knative**: the revision-based form (``canaryTrafficPercent``).

Canaries (``servekit kserve canary|promote|abort``) take the applied InferenceService and write the
next one and the JSON merge patch between them (``kubectl patch --type merge``):

* Standard (KServe >= 0.20, ``spec.canary``): the candidate bundle's containers become a named canary
  predictor with ``trafficPercent`` P (its own Deployment and Service ``APP-NAME-predictor``, replicas
  ``ceil(stable x P / 100)``); promote retargets the stable predictor to it (``predictor.name`` = NAME,
  no restart) and drops the canary entry, so KServe deletes the previous Deployment; abort drops the
  entry; ``--percent 0`` keeps it deployed without traffic. KServe 0.20's webhook accepts a canary only
  when the stable predictor has a storage URI (``STORAGE_URI`` on ``kserve-container``, models outside
  the image): an image-baked predictor is refused here with that reason. KServe 0.20.0 creates and
  scales the canary's Deployment; the weighted split of the route lands after 0.20.0 (kserve/kserve#5912,
  Gateway API HTTPRoutes): until then the canary answers on its own Service only.
* Knative: the candidate InferenceService with ``canaryTrafficPercent`` P; promote removes the field
  (a full rollout), abort sets it to 0 (all traffic to the last rolled-out revision).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import yaml

from servekit.deploy.bundle import KSERVE_CONTAINER, BundleError

__all__ = [
    "KServeError",
    "abort",
    "apply_merge_patch",
    "canary",
    "canary_name",
    "merge_patch",
    "promote",
    "read_inferenceservice",
    "rollout_plan",
]

DEPLOYMENT_MODE = "serving.kserve.io/deploymentMode"
STORAGE_URI_ENV = "STORAGE_URI"  # a custom container's storage URI (CustomPredictor.GetStorageUri)
CANARY_NAME_RE = re.compile(r"^[a-z0-9](?:[-a-z0-9]{0,38}[a-z0-9])?\Z")
SERVER_FIELDS = ("resourceVersion", "uid", "generation", "creationTimestamp", "managedFields", "selfLink")


class KServeError(BundleError):
    """A canary step cannot be written as asked; one line saying why and what would do."""


# ------------------------------------------------------------------------------------------ canaries
def read_inferenceservice(path: Path) -> dict:
    """The InferenceService in a YAML file (a bundle's kserve/inferenceservice.yaml or ``kubectl get -o yaml``).

    What the API server adds (status, resourceVersion, uid, ...) is dropped: the result is what to apply.
    """
    try:
        documents = [d for d in yaml.safe_load_all(Path(path).read_text(encoding="utf-8")) if d]
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise KServeError(f"cannot read {path}: {' '.join(str(exc).split())}") from None
    found = [d for d in documents if isinstance(d, dict) and d.get("kind") == "InferenceService"]
    if len(found) != 1:
        raise KServeError(f"{path} must hold exactly one InferenceService, found {len(found)}")
    isvc = copy.deepcopy(found[0])
    isvc.pop("status", None)
    metadata = isvc.setdefault("metadata", {})
    for key in SERVER_FIELDS:
        metadata.pop(key, None)
    metadata.get("annotations", {}).pop("kubectl.kubernetes.io/last-applied-configuration", None)
    if not isinstance((isvc.get("spec") or {}).get("predictor"), dict):
        raise KServeError(f"{path}: the InferenceService has no spec.predictor")
    return isvc


def mode_of(isvc: dict) -> str:
    """'standard' or 'knative', as KServe 0.20 reads the annotation (legacy names included, unset = Standard)."""
    value = (isvc.get("metadata", {}).get("annotations") or {}).get(DEPLOYMENT_MODE, "Standard")
    modes = {"Standard": "standard", "RawDeployment": "standard", "Knative": "knative", "Serverless": "knative"}
    if value not in modes:
        raise KServeError(f"{DEPLOYMENT_MODE}: {value!r} is not a mode servekit maps canaries onto (Standard, Knative)")
    return modes[value]


def _container(isvc: dict) -> dict:
    containers = isvc["spec"]["predictor"].get("containers") or []
    for container in containers:
        if container.get("name") == KSERVE_CONTAINER:
            return container
    raise KServeError(f"the InferenceService's predictor has no container named {KSERVE_CONTAINER}")


def _storage_uri(isvc: dict) -> str | None:
    for env in _container(isvc).get("env") or []:
        if env.get("name") == STORAGE_URI_ENV:
            return env.get("value")
    return None


def _percent(percent: Any) -> int:
    if not isinstance(percent, int) or isinstance(percent, bool) or not 0 <= percent <= 100:
        raise KServeError(f"--percent must be a whole number from 0 to 100, got {percent!r}")
    return percent


def canary_name(models: dict[str, dict]) -> str:
    """A predictor name from a bundle's models and defaults: digits 2.0 -> ``digits-2-0``."""
    text = "-".join(f"{name}-{entry['default']}" for name, entry in sorted(models.items()))
    name = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40].rstrip("-")
    return name or "canary"


def canary(current: dict, candidate: dict, percent: int, name: str) -> dict:
    """The InferenceService that sends ``percent`` % to ``candidate`` (the new bundle's InferenceService)."""
    percent = _percent(percent)
    mode = mode_of(current)
    if mode_of(candidate) != mode:
        raise KServeError(f"the candidate is bundled for {mode_of(candidate)} mode, the applied one runs {mode}")
    if mode == "knative":
        nxt = copy.deepcopy(candidate)
        nxt["spec"]["predictor"]["canaryTrafficPercent"] = percent
        return nxt
    if not CANARY_NAME_RE.match(name):
        raise KServeError(f"--name {name!r} is not a predictor name (lower-case letters, digits, '-', <= 40)")
    if _storage_uri(current) is None:
        raise KServeError(
            "KServe 0.20 accepts spec.canary only when the stable predictor has a storage URI (STORAGE_URI on "
            f"{KSERVE_CONTAINER}, models outside the image); this one bakes its models into the image: roll it "
            "out whole (kubectl apply the new bundle) or bundle with --kserve-mode knative"
        )
    if name == (current["spec"]["predictor"].get("name") or ""):
        raise KServeError(f"--name {name!r} is the stable predictor's name: the canary needs its own")
    others = [c for c in current["spec"].get("canary") or [] if c["predictor"].get("name") != name]
    if others:
        listed = ", ".join(c["predictor"].get("name", "?") for c in others)
        raise KServeError(f"another canary is running ({listed}): promote or abort it first")
    nxt = copy.deepcopy(current)
    # Only what differs: KServe merges the canary predictor onto the stable one (containers replace whole).
    canary_predictor = {"name": name, "containers": copy.deepcopy(candidate["spec"]["predictor"]["containers"])}
    nxt["spec"]["canary"] = [{"trafficPercent": percent, "predictor": canary_predictor}]
    annotations = nxt["metadata"].setdefault("annotations", {})
    annotations["servekit.io/canary-bundle-sha256"] = (candidate["metadata"].get("annotations") or {}).get(
        "servekit.io/bundle-sha256", ""
    )
    return nxt


def _knative_canary(isvc: dict, action: str) -> dict:
    """The predictor of a Knative-mode InferenceService that has a canary; else a one-line refusal."""
    predictor = isvc["spec"]["predictor"]
    if "canaryTrafficPercent" not in predictor:
        raise KServeError(f"no canary to {action}: the predictor has no canaryTrafficPercent")
    return predictor


def promote(current: dict) -> dict:
    """The canary takes all traffic and the previous predictor goes (Standard) / a full rollout (Knative)."""
    nxt = copy.deepcopy(current)
    if mode_of(current) == "knative":
        _knative_canary(nxt, "promote").pop("canaryTrafficPercent")
        return nxt
    canaries = nxt["spec"].pop("canary", None) or []
    if len(canaries) != 1:
        raise KServeError(f"promote needs exactly one canary in spec.canary, found {len(canaries)}")
    (entry,) = canaries
    # The stable predictor is retargeted to the canary's Deployment (its name) and pod template: no restart.
    nxt["spec"]["predictor"]["name"] = entry["predictor"]["name"]
    nxt["spec"]["predictor"]["containers"] = entry["predictor"]["containers"]
    annotations = nxt["metadata"].setdefault("annotations", {})
    sha = annotations.pop("servekit.io/canary-bundle-sha256", None)
    if sha:
        annotations["servekit.io/bundle-sha256"] = sha
    return nxt


def abort(current: dict) -> dict:
    """All traffic back to the stable predictor: the canary entry goes (Standard) / 0 % (Knative)."""
    nxt = copy.deepcopy(current)
    if mode_of(current) == "knative":
        _knative_canary(nxt, "abort")["canaryTrafficPercent"] = 0
        return nxt
    if not nxt["spec"].pop("canary", None):
        raise KServeError("no canary to abort: spec.canary is empty")
    nxt["metadata"].get("annotations", {}).pop("servekit.io/canary-bundle-sha256", None)
    return nxt


def rollout_plan(current: dict, candidate: dict, steps: list[int], name: str) -> list[tuple[str, dict]]:
    """``servekit rollout``'s steps as InferenceServices: (label, document) per canary step, then the promotion.

    The judging between steps (error rate, p99, drift) is ``servekit rollout``'s on one host; on a cluster
    it needs the cluster's Prometheus, and these documents are applied step by step by whoever judges.
    """
    if not steps or any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        raise KServeError(f"--steps {steps} must rise strictly, e.g. 10,25,50,100")
    plan = [(f"canary-{p}", canary(current, candidate, p, name)) for p in steps]
    plan.append(("promote", promote(plan[-1][1])))
    return plan


# ------------------------------------------------------------------------------------------ patches
def merge_patch(old: Any, new: Any) -> Any:
    """The RFC 7386 JSON merge patch that turns ``old`` into ``new`` (``kubectl patch --type merge``)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return copy.deepcopy(new)
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        if key not in old:
            patch[key] = copy.deepcopy(value)
        elif old[key] != value:
            patch[key] = merge_patch(old[key], value) if isinstance(value, dict) else copy.deepcopy(value)
    return patch


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 applied: what the API server makes of ``target`` with ``patch``."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_merge_patch(result.get(key), value)
    return result


def kubectl_patch_command(isvc: dict, patch: dict) -> list[str]:
    meta = isvc["metadata"]
    return ["kubectl", "-n", meta.get("namespace", "default"), "patch", "inferenceservice", meta["name"],
            "--type", "merge", "-p", json.dumps(patch, separators=(",", ":"), sort_keys=True)]  # fmt: skip
