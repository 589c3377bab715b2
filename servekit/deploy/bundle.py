"""``servekit bundle``: what a cluster needs to serve the built archives, generated from the spec and the manifest.

    bundle/
      bundle.json                  the machine-readable record: selection, image, replicas, cpu, memory, ports,
                                   entrypoint argv, env, probes, preStop and termination grace, canary
      model-store/                 the selected archives (sha256 checked) and their manifest records
      config/config.properties     the pod's TorchServe configuration (one setting per line)
      Dockerfile, .dockerignore    the image: pinned Python, JRE 17, nginx, the pyproject pins, non-root
      src/                         what the image installs: pyproject.toml, README.md, handlers/, servekit/
      k8s/servekit.yaml            Deployment, Service, KEDA ScaledObject on the queue (--autoscaler keda, the
                                   default) or a CPU HorizontalPodAutoscaler (hpa), PodDisruptionBudget, NetworkPolicy
      kserve/inferenceservice.yaml serving.kserve.io/v1beta1 InferenceService (a custom predictor from the same
                                   image, Standard mode unless --kserve-mode knative, cluster-local unless
                                   --public) and a NetworkPolicy for its predictor pods
      monitoring/                  PodMonitor, PrometheusRule (monitoring/rules), Grafana dashboard
                                   (servekit.deploy.operators)
      kustomize/                   base/ and overlays/dev, overlays/production (servekit.deploy.kustomize)
      k8s/servekit-models-volume.yaml, kserve/inferenceservice-models-volume.yaml
                                   the same, serving config/ and model-store/ from a volume at /mnt/models, checked
                                   before serving (servekit.deploy.model_source): a new version, the same image

Workflow::

    options = BundleOptions.from_cli(models=["digits:1.0,2.0"], defaults=["digits:2.0"], image="repo/servekit:1")
    bundle = write_bundle(options, spec=Path("models.yaml"), store=Path("model_store"),
                          state_file=Path("var/proxy/state.json"))
    bundle.record["entrypoint"]    # the container's argv, also the Dockerfile's ENTRYPOINT

Torch-free: the model list comes from ``models.yaml`` read as plain YAML, the serving settings from
each archive's own ``model-config.yaml`` (the build wrote them from the spec's ``serving``: the
archive alone says how it is served, as for ``servekit register``), the sha256 from the manifest.

Every value the pod depends on is a constant here, written once into bundle.json and rendered from
it into the Dockerfile and the manifests, so that they cannot disagree.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import textwrap
import tomllib
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from servekit.deploy import autoscaling, kustomize, operators
from servekit.deploy.model_source import bundle_digest, mount_models_deployment, mount_models_inferenceservice
from servekit.deploy.state import read_state
from servekit.errors import ServekitError, one_line
from servekit.serving.server import BASE_CONFIG, REPO_ROOT, read_properties
from servekit.serving.store import (
    MANIFEST_NAME,
    NAME_RE,
    VERSION_RE,
    IntegrityError,
    archive_name,
    file_sha256,
    read_manifest,
    verify_archive,
    version_key,
)

__all__ = ["Bundle", "BundleError", "BundleOptions", "ModelSelection", "write_bundle"]

# ------------------------------------------------------------------------------------------ the pod
APP = "servekit"
HOME = "/home/model-server"
USER, UID = "model-server", 1000
MODEL_STORE = f"{HOME}/model-store"
CONFIG_FILE = f"{HOME}/config/config.properties"
WORKDIR = f"{HOME}/var"  # an emptyDir in the pod: TorchServe's logs, unpacked archives, the guard's socket
DRAIN_TIMEOUT_S = 25
PRESTOP_SLEEP_S = 5  # the endpoint removal propagates to every proxy before SIGTERM
TERMINATION_GRACE_S = 45  # > preStop 5 + drain 25 + stopping TorchServe and nginx
SERVEKIT_METRICS_PORT = 8083  # GET /metrics only: scraped without opening the tokenless inference port
# GET /v2/health/live and /v2/health/ready only: the probes' own listener, so that clients holding connections on
# the OIP port cannot get pods marked unready and restarted. The kubelet probes from the node, which NetworkPolicies
# do not restrict in common CNIs (Calico, Cilium: host-to-pod traffic is allowed), so no policy rule admits it.
HEALTH_PORT = 8004
ENV = {"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}  # logs at once; site-packages is read-only
# management 8081: loopback only; sk-metrics: servekit's handler metrics and serving state alone (docs/monitoring.md)
PORTS = {"http": 8080, "oip-http": 8000, "oip-grpc": 8001, "metrics": 8082, "sk-metrics": SERVEKIT_METRICS_PORT,
         "health": HEALTH_PORT}  # fmt: skip
# TorchServe's own inference listener, on 127.0.0.1 only: the pod's routing proxy owns the http port in front of it
# (servekit.deploy.pod), so that a canary or shadow applies to /predictions as to OIP.
TORCHSERVE_INFERENCE_PORT = 8079
# The routes of the pod's proxy: the routing.json key of this ConfigMap, mounted read-only (servekit.deploy.pod
# reads it every second; an absent file, as in KServe's form, is no routes).
ROUTING_CONFIGMAP, ROUTING_KEY = f"{APP}-routing", "routing.json"
ROUTING_DIR = f"{HOME}/routing"
ROUTING_FILE = f"{ROUTING_DIR}/{ROUTING_KEY}"
ENTRYPOINT = [
    "python", "-m", "servekit.deploy.pod", "--config", CONFIG_FILE, "--model-store", MODEL_STORE,
    "--workdir", WORKDIR, "--bind", "0.0.0.0", "--drain-timeout", str(DRAIN_TIMEOUT_S),
    "--metrics-port", str(SERVEKIT_METRICS_PORT), "--health-port", str(HEALTH_PORT),
    "--http-port", str(PORTS["http"]), "--routing", ROUTING_FILE,
]  # fmt: skip
SCRAPE_PORTS = ("metrics", "sk-metrics")  # what the monitoring namespace may reach
SERVICE_PORTS = ("http", "oip-http", "oip-grpc")  # never metrics' 8082, the health port nor the management API
GRPC_PORTS = {"grpc_inference_port": 7070, "grpc_management_port": 7071}  # TorchServe's own; not in the Service
PROBE_PORT = HEALTH_PORT  # every probe: the Deployment's, the predictor's and the Dockerfile's HEALTHCHECK
PROBES = {
    # Ready = every model's default version has a READY worker, and not draining (servekit.serving.oip).
    "readiness": {"path": "/v2/health/ready", "periodSeconds": 5, "failureThreshold": 2},
    "liveness": {"path": "/v2/health/live", "periodSeconds": 10, "failureThreshold": 3},
    "startup": {"path": "/v2/health/ready", "periodSeconds": 5, "failureThreshold": 60},  # 5 min for slow loads
}
PROBE_TIMEOUT_S = 3
CLIENT_LABEL = ("servekit.io/client", "true")  # pods allowed to call the APIs (NetworkPolicy)
MONITORING_NAMESPACE = "monitoring"  # the only namespace allowed to scrape :8082 and :8083
HPA_CPU_UTILIZATION = 70
PYTHON_IMAGE = "python:3.11.13-slim-bookworm"  # exact patch release, Debian 12
APT_PACKAGES = ("openjdk-17-jre-headless", "nginx")  # TorchServe's frontend; the management guard and OIP front
PINNED = ("torch", "torchvision", "torchserve", "torch-model-archiver")  # pip pins taken from pyproject.toml
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# The image's Python environment: a venv made from the base's python3, so that one Dockerfile builds on the public
# slim base (BASE_IMAGE's default) and on a Debian base with python3 and python3-venv (make image; docs/kubernetes.md).
VENV = "/opt/servekit/venv"
IMAGE_PATH = f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SOURCES = ("pyproject.toml", "README.md", "handlers", "servekit")  # what `pip install` needs in src/
# Settings copied from the repository's config.properties (the same limits as on one host).
COPIED_SETTINGS = ("job_queue_size", "max_request_size", "max_response_size")
KSERVE_MODES = {"standard": "Standard", "knative": "Knative"}  # --kserve-mode -> serving.kserve.io/deploymentMode
# Standard mode: the first container port is the Service's :80; names holding "grpc" get appProtocol h2c.
KSERVE_STANDARD_PORTS = ("oip-http", "oip-grpc", "http")
# What a Standard-mode predictor takes from the Deployment's pod spec (PredictorSpec carries these PodSpec fields).
KSERVE_POD_FIELDS = ("automountServiceAccountToken", "enableServiceLinks", "terminationGracePeriodSeconds",
                     "securityContext", "volumes")  # fmt: skip
AUTOSCALERS = ("keda", "hpa")  # --autoscaler: KEDA on the queue with CPU beside it, or CPU alone
# Prometheus Operator's governing Service of a Prometheus in the monitoring namespace: KEDA asks it.
PROMETHEUS_URL = f"http://prometheus-operated.{MONITORING_NAMESPACE}.svc:9090"
KSERVE_CONTAINER = "kserve-container"
# Closed by default (KServe v0.20.0 pkg/constants/constants.go and reconcilers/ingress/*.go): in Knative mode the
# ingress reconciler keeps an InferenceService off the external gateway when networking.knative.dev/visibility is
# cluster-local (the label also reaches the Knative Service, which Knative then keeps cluster-local); Standard
# (raw) mode reads networking.kserve.io/visibility instead. Both are set, so that changing the mode stays closed.
KSERVE_CLUSTER_LOCAL = {"networking.knative.dev/visibility": "cluster-local",
                        "networking.kserve.io/visibility": "cluster-local"}  # fmt: skip
# KServe labels every predictor pod with these (components/predictor.go); transformer and explainer pods differ.
KSERVE_PREDICTOR_SELECTOR = {"serving.kserve.io/inferenceservice": APP, "component": "predictor"}
# Knative mode: nobody reaches the container's port directly. The queue-proxy in each pod takes the traffic on
# 8012 (http1; knative.dev/networking BackendHTTPPort) from Knative's activator and the ingress gateways, and
# forwards it over loopback; the Knative autoscaler scrapes the queue-proxy's 9090. Knative's readiness probe runs
# in the queue-proxy against the health port over loopback, and the kubelet probes from the node.
KNATIVE_QUEUE_PORT = 8012
KNATIVE_AUTOSCALER_METRICS_PORT = 9090
KNATIVE_NAMESPACE = "knative-serving"  # the activator and the autoscaler (app.kubernetes.io/component labels)
# KServe's default gateways (knative-local-gateway, knative-ingress-gateway); with Kourier: kourier-system.
KNATIVE_INGRESS_NAMESPACE = "istio-system"
# With serving.kserve.io/enable-metric-aggregation the queue-proxy serves servekit's page (prometheus.kserve.io/port)
# and its own metrics on 9088 and KServe points prometheus.io/port there (webhook metrics_aggregate_injector.go);
# without it prometheus.io/port would name the queue-proxy's 9091 and servekit's page would not be scraped.
KSERVE_AGGREGATE_METRICS_PORT = 9088

CPU_RE = re.compile(r"^(?:(?P<cores>\d+(?:\.\d{1,3})?)|(?P<milli>\d+)m)\Z")
MEMORY_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
                "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}  # fmt: skip
MEMORY_RE = re.compile(r"^(?P<number>\d+(?:\.\d+)?)(?P<unit>Ki|Mi|Gi|Ti|k|M|G|T)?\Z")
# The collector's OTLP/HTTP traces URL: one line of config.properties, so nothing but a plain URL.
OTLP_RE = re.compile(
    r"^https?://(?P<host>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\]):(?P<port>[0-9]{1,5})(?:/[A-Za-z0-9._~/-]*)?\Z"
)
DNS_LABEL_RE = re.compile(r"^[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?\Z")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_RE = re.compile(
    rf"^(?:[A-Za-z0-9.-]+(?::\d+)?/)?{_COMPONENT}(?:/{_COMPONENT})*"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?\Z"
)


class BundleError(ServekitError, ValueError):
    """A bundle cannot be made as asked; the message says which option or file and what would be valid."""


# ------------------------------------------------------------------------------------------ options
@dataclass(frozen=True)
class ModelSelection:
    """One model and its versions (``None``: every version in ``models.yaml``)."""

    name: str
    versions: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise BundleError(f"--models: {self.name!r} is not a model name (letters, digits, '_', '-')")
        for version in self.versions or ():
            if not VERSION_RE.match(version):
                raise BundleError(f"--models: {self.name}:{version} is not a version like 1.0 or 2.1.3")
        if self.versions is not None and len(set(self.versions)) != len(self.versions):
            raise BundleError(f"--models: a version of {self.name} is given twice")


def cpu_millicores(quantity: str) -> int:
    """``"2"`` -> 2000, ``"1.5"`` -> 1500, ``"500m"`` -> 500; a ``BundleError`` for anything else or zero."""
    match = CPU_RE.match(quantity)
    if match is None:
        raise BundleError(f"--cpu {quantity!r} is not a CPU quantity: use whole or decimal CPUs (2, 1.5) or 500m")
    milli = int(match["milli"]) if match["milli"] else round(float(match["cores"]) * 1000)
    if milli <= 0:
        raise BundleError(f"--cpu {quantity!r} must be more than 0")
    return milli


def memory_bytes(quantity: str) -> int:
    """``"4Gi"`` -> 4294967296; a ``BundleError`` for anything that is not a positive Kubernetes quantity."""
    match = MEMORY_RE.match(quantity)
    if match is None:
        raise BundleError(f"--memory {quantity!r} is not a memory quantity: use e.g. 4Gi, 4096Mi or 4G")
    size = float(match["number"]) * MEMORY_UNITS[match["unit"] or ""]
    if size < 1:
        raise BundleError(f"--memory {quantity!r} must be more than 0")
    return int(size)


def _positive_int(option: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, str) and re.fullmatch(r"\d+", value.strip()):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise BundleError(f"{option} must be a whole number >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class BundleOptions:
    """What to bundle and how the pods run; validated on construction, every error one line."""

    models: tuple[ModelSelection, ...] = ()  # empty: every model in models.yaml, every version
    defaults: tuple[tuple[str, str], ...] = ()  # (model, version); unset: the highest selected version
    replicas: int = 2
    max_replicas: int | None = None  # None: twice replicas
    cpu: str = "2"
    memory: str = "4Gi"
    image: str = "servekit:0.1.0"
    namespace: str = "servekit"
    out: Path = Path("bundle")
    public: bool = False  # the KServe form: reachable through the ingress gateway instead of cluster-local
    otlp_endpoint: str | None = None  # the pods' trace export (servekit_otlp_endpoint); None: tracing off
    kserve_mode: str = "standard"  # the InferenceService's deployment mode: standard (KServe's default) or knative
    autoscaler: str = "keda"  # keda: the queue through Prometheus and CPU; hpa: CPU only (no KEDA needed)
    prometheus_url: str = PROMETHEUS_URL  # where KEDA reads the queue

    def __post_init__(self) -> None:
        if self.kserve_mode not in KSERVE_MODES:
            raise BundleError(f"--kserve-mode {self.kserve_mode!r}: use one of {', '.join(KSERVE_MODES)}")
        if self.autoscaler not in AUTOSCALERS:
            raise BundleError(f"--autoscaler {self.autoscaler!r}: use one of {', '.join(AUTOSCALERS)}")
        if not isinstance(self.prometheus_url, str) or OTLP_RE.match(self.prometheus_url) is None:
            raise BundleError(
                f"--prometheus-url {self.prometheus_url!r} is not an HTTP URL with a port, like {PROMETHEUS_URL}"
            )
        if not isinstance(self.public, bool):
            raise BundleError(f"--public is a switch (true or false), got {self.public!r}")
        _positive_int("--replicas", self.replicas)
        if self.max_replicas is None:
            object.__setattr__(self, "max_replicas", 2 * self.replicas)
        _positive_int("--max-replicas", self.max_replicas)
        if self.max_replicas < self.replicas:
            raise BundleError(f"--max-replicas {self.max_replicas} must be >= --replicas {self.replicas}")
        cpu_millicores(self.cpu)
        memory_bytes(self.memory)
        match = IMAGE_RE.match(self.image)
        if match is None:
            raise BundleError(
                f"--image {self.image!r} is not an image reference like registry.example.com/servekit:1.0"
            )
        if not (match["tag"] or match["digest"]) or match["tag"] == "latest":
            raise BundleError(
                f"--image {self.image!r} needs an explicit tag or digest other than latest (REPO:TAG): "
                "pods must not change under a floating tag"
            )
        if self.otlp_endpoint is not None and (
            not isinstance(self.otlp_endpoint, str)
            or (match := OTLP_RE.match(self.otlp_endpoint)) is None
            or not 0 < int(match["port"]) < 65536
        ):
            raise BundleError(
                f"--otlp-endpoint {self.otlp_endpoint!r} is not an OTLP/HTTP URL with a port, like "
                "http://otel-collector.observability:4318/v1/traces"
            )
        if not DNS_LABEL_RE.match(self.namespace):
            raise BundleError(f"--namespace {self.namespace!r} is not a DNS label (lower-case letters, digits, '-')")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise BundleError(f"--models: {sorted(n for n in names if names.count(n) > 1)[0]} is given twice")
        chosen = [model for model, _ in self.defaults]
        if len(set(chosen)) != len(chosen):
            raise BundleError("--default: a model is given twice")
        object.__setattr__(self, "out", Path(self.out))

    @classmethod
    def from_cli(
        cls, models: list[str] | None = None, defaults: list[str] | None = None, **settings: Any
    ) -> BundleOptions:
        """From the command line's strings: ``--models digits:1.0,2.0`` (repeatable), ``--default digits:2.0``."""
        settings = {key: value for key, value in settings.items() if value is not None}
        settings.setdefault("image", f"{APP}:{project_version(REPO_ROOT / 'pyproject.toml')}")
        for key in ("replicas", "max_replicas"):
            if key in settings:
                settings[key] = _positive_int("--" + key.replace("_", "-"), settings[key])
        return cls(models=parse_models(models or []), defaults=parse_defaults(defaults or []), **settings)


def parse_models(texts: list[str]) -> tuple[ModelSelection, ...]:
    """``["digits:1.0,2.0,other"]`` -> digits 1.0 and 2.0, and every version of other."""
    selections: list[tuple[str, list[str] | None]] = []
    for text in texts:
        for item in (part.strip() for part in text.split(",")):
            if not item:
                raise BundleError(f"--models {text!r}: empty item (use NAME, NAME:VERSION or NAME:V1,V2)")
            if ":" in item:
                name, version = (part.strip() for part in item.split(":", 1))
                selections.append((name, [version]))
            elif VERSION_RE.match(item):
                if not selections or selections[-1][1] is None:
                    raise BundleError(f"--models {text!r}: version {item} must follow NAME: (e.g. digits:{item})")
                selections[-1][1].append(item)
            else:
                selections.append((item, None))
    return tuple(ModelSelection(name, tuple(v) if v is not None else None) for name, v in selections)


def parse_defaults(texts: list[str]) -> tuple[tuple[str, str], ...]:
    """``["digits:2.0"]`` -> (("digits", "2.0"),)."""
    pairs = []
    for text in texts:
        for item in (part.strip() for part in text.split(",")):
            name, _, version = item.partition(":")
            if not NAME_RE.match(name) or not VERSION_RE.match(version):
                raise BundleError(f"--default {item!r}: use NAME:VERSION, e.g. digits:2.0")
            pairs.append((name, version))
    return tuple(pairs)


# ------------------------------------------------------------------------------------------ resolving
@dataclass(frozen=True)
class SelectedModel:
    name: str
    versions: tuple[str, ...]  # ascending
    default: str
    settings: dict[str, dict] = field(compare=False)  # version -> the archive's model-config.yaml


def spec_models(spec: Path) -> dict[str, list[str]]:
    """Every model in ``models.yaml`` and its versions, read as plain YAML (the build validates the rest)."""
    try:
        data = yaml.safe_load(Path(spec).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise BundleError(f"cannot read the spec {spec}: {one_line(exc)}") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict) or not models:
        raise BundleError(f"{spec} has no 'models:' mapping")
    return {
        str(name): [str(v) for v in (model.get("versions") or {})] if isinstance(model, dict) else []
        for name, model in models.items()
    }


def archive_settings(path: Path) -> dict:
    """The serving settings the build wrote into the archive's ``model-config.yaml``."""
    try:
        with zipfile.ZipFile(path) as mar:
            config = yaml.safe_load(mar.read("model-config.yaml")) or {}
    except (KeyError, OSError, zipfile.BadZipFile, yaml.YAMLError) as exc:
        raise BundleError(f"cannot read model-config.yaml in {path.name}: {one_line(exc)}") from None
    if not isinstance(config, dict):
        raise BundleError(f"{path.name}: model-config.yaml is not a mapping")
    if (config.get("handler") or {}).get("faults"):
        raise BundleError(f"{path.name} is a drill version (handler faults are set): it is never bundled for a cluster")
    for key in ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout"):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise BundleError(f"{path.name}: model-config.yaml {key} must be a whole number >= 0, got {value!r}")
    return config


def resolve(options: BundleOptions, spec: Path, store: Path, manifest: dict) -> list[SelectedModel]:
    """The models, versions and defaults to bundle; every archive verified against the manifest."""
    known = spec_models(spec)
    selections = options.models or tuple(ModelSelection(name) for name in known)
    built: dict[str, list[str]] = {}
    for record in manifest["archives"].values():
        built.setdefault(str(record.get("model")), []).append(str(record.get("version")))
    chosen_defaults = dict(options.defaults)
    for name in chosen_defaults:
        if name not in {s.name for s in selections}:
            raise BundleError(f"--default {name}:{chosen_defaults[name]}: {name} is not among the bundled models")
    models = []
    for selection in selections:
        if selection.name not in known:
            raise BundleError(f"unknown model {selection.name!r} (models.yaml has: {', '.join(known)})")
        versions = selection.versions if selection.versions is not None else tuple(known[selection.name])
        if not versions:
            raise BundleError(f"{selection.name} has no versions in {spec}")
        settings = {}
        for version in versions:
            name = archive_name(selection.name, version)
            if name not in manifest["archives"]:
                have = ", ".join(sorted(built.get(selection.name, []), key=version_key)) or "none"
                raise BundleError(
                    f"{selection.name} {version} has no archive in {store / MANIFEST_NAME} "
                    f"(built versions: {have}; make archive builds the versions in models.yaml)"
                )
            try:
                path = verify_archive(store, name, manifest)
            except IntegrityError as exc:
                raise BundleError(str(exc)) from None
            settings[version] = archive_settings(path)
        ordered = tuple(sorted(versions, key=version_key))
        default = chosen_defaults.get(selection.name, ordered[-1])
        if default not in ordered:
            raise BundleError(
                f"--default {selection.name}:{default} is not a bundled version (bundled: {', '.join(ordered)})"
            )
        models.append(SelectedModel(selection.name, ordered, default, settings))
    return models


def canary_percent(models: list[SelectedModel], state_file: Path) -> tuple[int | None, dict[str, dict], list[str]]:
    """KServe's ``canaryTrafficPercent`` from the deployment state, the canaries it maps, and notes on those it cannot.

    KServe splits traffic between revisions, not versions: applying a changed InferenceService sends
    ``canaryTrafficPercent`` % to the new revision (this bundle) and the rest to the last one rolled
    out. ``servekit canary NAME V --percent P`` maps onto that when V is this bundle's default for
    NAME (the new revision answers with V) and every such canary in the bundle has the same P.
    Anything else cannot be expressed: the percentage is left out (a full rollout) and a note says why.
    """
    state = read_state(state_file)
    canaries, notes = {}, []
    for model in models:
        record = state.models.get(model.name)
        if record is None or record.canary is None:
            continue
        version, percent = record.canary.version, record.canary.percent
        if version != model.default:
            notes.append(
                f"the canary of {model.name} {version} ({percent}%) is not mapped: this bundle's default is "
                f"{model.default} (bundle with --default {model.name}:{version} to roll it out as a KServe canary)"
            )
            continue
        canaries[model.name] = {"version": version, "percent": percent}
    percents = {c["percent"] for c in canaries.values()}
    if len(percents) > 1:
        listed = ", ".join(f"{n} {c['percent']}%" for n, c in sorted(canaries.items()))
        notes.append(f"the canaries differ ({listed}) and one InferenceService has one canaryTrafficPercent: none set")
        return None, {}, notes
    return (percents.pop() if percents else None), canaries, notes


def pod_routes(models: list[SelectedModel], state_file: Path) -> tuple[dict[str, dict], list[str]]:
    """The pods' routes from the deployment state (the routing ConfigMap), and notes on those left out.

    Each bundled model's canary and shadow go into the pods' proxies when their version is bundled
    (a pod serves only its bundle's versions; ``servekit.deploy.pod`` refuses any other).
    """
    state = read_state(state_file)
    routes, notes = {}, []
    for model in models:
        record = state.models.get(model.name)
        if record is None:
            continue
        route = {}
        for kind, version in (("canary", record.canary.version if record.canary else None), ("shadow", record.shadow)):
            if version is None:
                continue
            if version not in model.versions:
                notes.append(
                    f"the {kind} of {model.name} {version} is not in the pods' routes: {version} is not bundled "
                    f"(bundled: {', '.join(model.versions)})"
                )
            elif kind == "canary":
                route["canary"] = {"version": version, "percent": record.canary.percent}
            else:
                route["shadow"] = version
        if route:
            routes[model.name] = route
    return routes, notes


def routing_configmap(record: dict) -> dict:
    """The ConfigMap holding the pods' routes (``servekit.deploy.pod``; ``servekit pod-routes`` writes a new one)."""
    routes = json.dumps({"routes": record["routing"]["routes"]}, indent=2, sort_keys=True) + "\n"
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": ROUTING_CONFIGMAP, "namespace": record["namespace"], "labels": labels(record)},
        "data": {ROUTING_KEY: routes},
    }


def changed_routes(bundle: Path, canaries: list[str], shadows: list[str]) -> dict:
    """The routing ConfigMap of the written ``bundle`` with new routes (``servekit pod-routes``).

    ``canaries``: ``NAME:VERSION:PERCENT``; ``shadows``: ``NAME:VERSION``. Checked as its pods check
    it (``servekit.deploy.pod.read_routes``, against the bundle's config), so that a ConfigMap a pod
    would refuse is never written.
    """
    from servekit.deploy.pod import RoutingError, read_routes, served_versions  # the pod's own check

    try:
        record = json.loads((Path(bundle) / "bundle.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"--bundle {bundle}: no readable bundle.json ({one_line(exc)})") from None
    routes: dict[str, dict] = {}
    for text in canaries:
        name, _, rest = text.partition(":")
        version, _, percent = rest.rpartition(":")
        if not (name and version and percent.isdigit()):
            raise BundleError(f"--canary {text!r}: use NAME:VERSION:PERCENT, e.g. digits:2.0:10")
        if int(percent) > 0:
            routes.setdefault(name, {})["canary"] = {"version": version, "percent": int(percent)}
    for text in shadows:
        name, _, version = text.partition(":")
        if not (name and version):
            raise BundleError(f"--shadow {text!r}: use NAME:VERSION, e.g. digits:2.0")
        routes.setdefault(name, {})["shadow"] = version
    config = Path(bundle) / "config" / "config.properties"
    try:
        read_routes(json.dumps({"routes": routes}).encode(), served_versions(config), Path(bundle) / "bundle.json")
    except RoutingError as exc:
        raise BundleError(str(exc)) from None
    return routing_configmap({**record, "routing": {**record.get("routing", {}), "routes": routes}})


def pyproject_pins(pyproject: Path) -> dict[str, str]:
    """The exact ``==`` pins of torch, torchvision, torchserve and torch-model-archiver in pyproject.toml."""
    try:
        dependencies = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        raise BundleError(f"cannot read the dependencies of {pyproject}: {one_line(exc)}") from None
    pins = {}
    for requirement in dependencies:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([A-Za-z0-9_.+-]+)\s*", requirement)
        if match and match[1].lower() in PINNED:
            pins[match[1].lower()] = match[2]
    missing = [name for name in PINNED if name not in pins]
    if missing:
        raise BundleError(f"{pyproject} must pin {', '.join(missing)} with == (the image installs exactly those)")
    return {name: pins[name] for name in PINNED}


def project_version(pyproject: Path) -> str:
    try:
        return str(tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "0"


# ------------------------------------------------------------------------------------------ rendering
def model_snapshot(models: list[SelectedModel]) -> dict:
    """TorchServe's ``model_snapshot``: every bundled version, its workers and batching, the default marked."""
    entries: dict[str, dict] = {}
    for model in models:
        entries[model.name] = {}
        for version in model.versions:
            config = model.settings[version]
            entry = {
                "defaultVersion": version == model.default,
                "marName": archive_name(model.name, version),
                "minWorkers": config["minWorkers"],
                "maxWorkers": config["maxWorkers"],
                "batchSize": config["batchSize"],
                "maxBatchDelay": config["maxBatchDelay"],
                "responseTimeout": config["responseTimeout"],
            }
            if isinstance(config.get("startupTimeout"), int):
                entry["startupTimeout"] = config["startupTimeout"]  # TorchServe's default (120 s) otherwise
            entries[model.name][version] = entry
    count = sum(len(m.versions) for m in models)
    return {"name": "startup.cfg", "modelCount": count, "models": entries}


def _listed(ports: Iterable[int]) -> str:
    return ", ".join(str(port) for port in ports)


def who_may_call() -> list[str]:
    """The comment lines of config.properties that say why tokens are off and who may reach which port."""
    text = (
        "Tokens off: TorchServe's keys are random per process and expire, so replicas behind one Service cannot "
        f"share one. k8s/servekit.yaml's NetworkPolicy admits only pods labelled {'='.join(CLIENT_LABEL)} "
        f"({_listed(PORTS[n] for n in SERVICE_PORTS)}) and the monitoring namespace "
        f"({_listed(PORTS[n] for n in SCRAPE_PORTS)}). kserve/inferenceservice.yaml is cluster-local unless bundled "
        "with --public; its NetworkPolicy admits, in Standard mode, the labelled pods (and with --public the "
        f"gateways in {KNATIVE_INGRESS_NAMESPACE}) on {_listed(PORTS[n] for n in ('oip-http', 'oip-grpc', 'http'))} "
        "and the monitoring namespace on the scrape ports; in Knative mode the labelled pods, Knative's activator "
        f"and the gateways in {KNATIVE_INGRESS_NAMESPACE} on the queue-proxy's {KNATIVE_QUEUE_PORT}, the Knative "
        f"autoscaler on {KNATIVE_AUTOSCALER_METRICS_PORT} and the monitoring namespace "
        f"({_listed(kserve_scrape_ports())}). "
        f"The probes' port {HEALTH_PORT} is admitted to no one (the kubelet is not subject to NetworkPolicies). "
        "The management API stays inside the pod."
    )
    return ["# " + line for line in textwrap.wrap(text, width=110, break_on_hyphens=False, break_long_words=False)]


def render_config(models: list[SelectedModel], base_config: Path, otlp_endpoint: str | None = None) -> str:
    """The pod's config.properties: every setting on one line (KServe's wrapper reads it line by line);
    ``otlp_endpoint``: where the pod's gateway and workers export their spans (none: tracing off)."""
    base = read_properties(base_config) if base_config.is_file() else {}
    copied = {key: base[key] for key in COPIED_SETTINGS if key in base}
    snapshot = json.dumps(model_snapshot(models), separators=(",", ":"))
    lines = [
        "# TorchServe configuration of a servekit pod, generated by `servekit bundle` (servekit/deploy/bundle.py).",
        "# One setting per line. The launcher (python -m servekit.deploy.pod) puts the management API on a unix",
        "# socket behind its nginx guard on 127.0.0.1:8081, never exposed outside the pod, and the inference API",
        f"# behind the routing proxy, which owns the pod's port {PORTS['http']} (canary and shadow, every protocol).",
        f"inference_address=http://127.0.0.1:{TORCHSERVE_INFERENCE_PORT}",
        "management_address=http://127.0.0.1:8081",
        f"metrics_address=http://0.0.0.0:{PORTS['metrics']}",
        *(f"{key}={port}" for key, port in GRPC_PORTS.items()),
        f"model_store={MODEL_STORE}",
        *who_may_call(),
        "disable_token_authorization=true",
        "# A pod is immutable: new versions come as a new bundle and image, never by registration.",
        "enable_model_api=false",
        "allowed_urls=(?!)",
        "metrics_mode=prometheus",
        "default_workers_per_model=1",
        *(f"{key}={value}" for key, value in copied.items()),
        "# The bundled versions, their workers and batching (from each archive's model-config.yaml), the default.",
        f"model_snapshot={snapshot}",
    ]
    if otlp_endpoint is not None:
        lines += ["# Traces: the gateway's and the workers' spans, OTLP over HTTP (servekit.serving.tracing).",
                  f"servekit_otlp_endpoint={otlp_endpoint}"]  # fmt: skip
    return "\n".join(lines) + "\n"


def probe(kind: str, extra: dict | None = None) -> dict:
    """A Kubernetes probe on the health port, as bundle.json records it and the manifests use it."""
    spec = PROBES[kind]
    return {
        "httpGet": {"path": spec["path"], "port": PROBE_PORT},
        "periodSeconds": spec["periodSeconds"],
        "failureThreshold": spec["failureThreshold"],
        "timeoutSeconds": PROBE_TIMEOUT_S,
        **(extra or {}),
    }


def render_dockerfile(record: dict) -> str:
    pins = record["pins"]
    torch = " ".join(f"{name}=={pins[name]}" for name in ("torch", "torchvision"))
    serve = " ".join(f"{name}=={pins[name]}" for name in ("torchserve", "torch-model-archiver"))
    image_env = {**ENV, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "VIRTUAL_ENV": VENV, "PATH": IMAGE_PATH}
    env = " \\\n    ".join(f"{key}={value}" for key, value in image_env.items())
    healthcheck = [
        "python", "-c",
        f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{PROBE_PORT}/v2/health/ready', timeout=4)",
    ]  # fmt: skip
    return f"""# The servekit model server, generated by `servekit bundle` (servekit/deploy/bundle.py): regenerate it.
# Build from the bundle folder:  docker build -t {record["image"]} {record["out_name"]}
# Build arguments (docs/kubernetes.md, "The image"): BASE_IMAGE, any Debian 12 with python3 and its venv module;
# TORCH_INDEX_URL, where torch and torchvision come from (PyTorch's CPU-only index: no CUDA libraries).
ARG BASE_IMAGE={record["base_image"]}
FROM ${{BASE_IMAGE}}
ARG TORCH_INDEX_URL={TORCH_CPU_INDEX}
# Unset for users: a build machine's own pip settings (make image passes its local wheel cache through them).
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT

ENV {env}

# Java 17 runs TorchServe's frontend; nginx is the management guard and the OIP front (servekit.serving).
# The base tag pins Debian 12; its security updates replace these packages (DL3008 waived on purpose).
# hadolint ignore=DL3008
RUN apt-get update \\
    && apt-get install -y --no-install-recommends {" ".join(APT_PACKAGES)} \\
    && rm -rf /var/lib/apt/lists/*

# torch and torchvision from TORCH_INDEX_URL; every version is pyproject.toml's pin. The venv is the image's python.
RUN python3 -m venv {VENV} \\
    && pip install --no-cache-dir --index-url "${{TORCH_INDEX_URL}}" {torch} \\
    && pip install --no-cache-dir {serve}

# The toolkit and its handlers. The worker guard's .pth is written now: site-packages is read-only at run time.
COPY src /opt/servekit/src
RUN pip install --no-cache-dir "/opt/servekit/src{"[runtimes]" if record.get("runtimes") else ""}" \\
    && python -c "from servekit.serving.worker_guard import ensure_installed; ensure_installed()"

# {USER} (uid {UID}); {WORKDIR} is an emptyDir in the pod (read-only root filesystem).
RUN useradd --uid {UID} --user-group --create-home --home-dir {HOME} --shell /usr/sbin/nologin {USER} \\
    && mkdir -p {WORKDIR} \\
    && chown {USER}:{USER} {WORKDIR}
# The image-baked model store: served unless the pod mounts its own (docs/kubernetes.md, "Models outside the image").
COPY model-store {MODEL_STORE}
COPY config {HOME}/config

# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER {UID}:{UID}
WORKDIR {HOME}
# The probes' port {HEALTH_PORT} is for the kubelet and this HEALTHCHECK only: not exposed.
EXPOSE {" ".join(str(PORTS[name]) for name in ("http", "oip-http", "oip-grpc", *SCRAPE_PORTS))}
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \\
    CMD {json.dumps(healthcheck)}
ENTRYPOINT {json.dumps(record["entrypoint"])}
"""


DOCKERIGNORE = """# The build context is the bundle folder: only what the Dockerfile copies goes in.
*
!Dockerfile
!src/
!model-store/
!config/
**/__pycache__
**/*.pyc
"""


def labels(record: dict) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": APP,
        "app.kubernetes.io/instance": APP,
        "app.kubernetes.io/version": record["servekit_version"],
        "app.kubernetes.io/component": "model-server",
        "app.kubernetes.io/part-of": APP,
        "app.kubernetes.io/managed-by": "servekit-bundle",
    }


def selector() -> dict[str, str]:
    return {"app.kubernetes.io/name": APP, "app.kubernetes.io/instance": APP}


def resources(record: dict) -> dict:
    # requests = limits: Guaranteed QoS, and the CPU limit is the cgroup quota the handlers' CPU budget reads.
    amounts = {"cpu": record["cpu"], "memory": record["memory"]}
    return {"requests": dict(amounts), "limits": dict(amounts)}


def container_security() -> dict:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": UID,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def volumes() -> tuple[list[dict], list[dict]]:
    mounts = [{"name": "work", "mountPath": WORKDIR}, {"name": "tmp", "mountPath": "/tmp"}]
    declared = [{"name": "work", "emptyDir": {"sizeLimit": "2Gi"}}, {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}]
    return declared, mounts


def render_kubernetes(record: dict) -> list[dict]:
    """Deployment, Service, HorizontalPodAutoscaler, PodDisruptionBudget, NetworkPolicy."""
    meta = {"name": APP, "namespace": record["namespace"], "labels": labels(record)}
    declared, mounts = volumes()
    # The routes, followed by the pod's proxy as the kubelet updates the mount (no restart, no new image).
    declared = [*declared, {"name": "routing", "configMap": {"name": ROUTING_CONFIGMAP, "optional": True}}]
    mounts = [*mounts, {"name": "routing", "mountPath": ROUTING_DIR, "readOnly": True}]
    container = {
        "name": APP,
        "image": record["image"],
        "imagePullPolicy": "IfNotPresent",
        "command": list(record["entrypoint"]),
        "ports": [{"name": name, "containerPort": port, "protocol": "TCP"} for name, port in PORTS.items()],
        "env": [{"name": key, "value": value} for key, value in record["env"].items()],
        "resources": resources(record),
        "startupProbe": record["probes"]["startup"],
        "readinessProbe": record["probes"]["readiness"],
        "livenessProbe": record["probes"]["liveness"],
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(record["preStopSeconds"])]}}},
        "securityContext": container_security(),
        "volumeMounts": mounts,
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": record["replicas"],
            "revisionHistoryLimit": 5,
            "progressDeadlineSeconds": 600,
            "selector": {"matchLabels": selector()},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {
                    "labels": labels(record),
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(PORTS["sk-metrics"]),
                        "prometheus.io/path": "/metrics",
                        "servekit.io/bundle-sha256": record["bundle_sha256"],
                    },
                },
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,  # no SERVEKIT_* variables injected from the Service's name
                    "terminationGracePeriodSeconds": record["terminationGracePeriodSeconds"],
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": UID,
                        "runAsGroup": UID,
                        "fsGroup": UID,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "topologySpreadConstraints": [
                        {
                            "maxSkew": 1,
                            "topologyKey": "kubernetes.io/hostname",
                            "whenUnsatisfiable": "ScheduleAnyway",
                            "labelSelector": {"matchLabels": selector()},
                        }
                    ],
                    "containers": [container],
                    "volumes": declared,
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "type": "ClusterIP",
            "selector": selector(),
            "ports": [
                {"name": name, "port": PORTS[name], "targetPort": name, "protocol": "TCP"}
                | ({"appProtocol": "grpc"} if name == "oip-grpc" else {})
                for name in record["service_ports"]
            ],
        },
    }
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": meta,
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": APP},
            "minReplicas": record["replicas"],
            "maxReplicas": record["max_replicas"],
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": HPA_CPU_UTILIZATION},
                    },
                }
            ],
            # Down one pod a minute: each one drains (preStop + drain) before the next goes.
            "behavior": {
                "scaleDown": {
                    "stabilizationWindowSeconds": 300,
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
                }
            },  # fmt: skip
        },
    }
    if record["autoscaling"]["autoscaler"] == "keda":
        hpa = _scaler(record)  # KEDA owns the HPA it creates: none of ours then
    # One replica: a minAvailable of 1 would block every node drain, so allow one pod down instead.
    budget = {"minAvailable": 1} if record["replicas"] > 1 else {"maxUnavailable": 1}
    pdb = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": meta,
        "spec": {**budget, "selector": {"matchLabels": selector()}},
    }
    client_key, client_value = CLIENT_LABEL
    network = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": meta,
        "spec": {
            "podSelector": {"matchLabels": selector()},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": {client_key: client_value}}}],
                    "ports": [{"protocol": "TCP", "port": PORTS[name]} for name in record["service_ports"]],
                },
                {
                    "from": [
                        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": MONITORING_NAMESPACE}}}
                    ],
                    "ports": [{"protocol": "TCP", "port": PORTS[name]} for name in SCRAPE_PORTS],
                },
            ],
            # No rule names the health port: the kubelet's probes come from the node, which common CNIs
            # (Calico, Cilium) never hold to a NetworkPolicy, so no client needs to reach it.
            # The pod calls nothing (every hop, guard, OIP front, gateway, is on loopback) but the trace collector
            # when one is configured: its port, and DNS to find it.
            "egress": _trace_egress(record.get("otlp_endpoint")),
        },
    }
    return [deployment, service, hpa, pdb, network, routing_configmap(record)]


def _scaler(record: dict) -> dict:
    """KEDA's ScaledObject on the queue, with CPU beside it (it owns the HPA it creates: none of ours then)."""
    return autoscaling.render_scaled_object(record, APP, labels(record))


def _trace_egress(endpoint: str | None) -> list[dict]:
    if endpoint is None:
        return []
    port = int(OTLP_RE.match(endpoint)["port"])
    dns = [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]
    return [{"ports": [{"protocol": "TCP", "port": port}]}, {"ports": dns}]


def kserve_scrape_ports() -> tuple[int, ...]:
    """What the monitoring namespace may reach on a predictor pod: TorchServe's, servekit's, the aggregate page."""
    return (*(PORTS[name] for name in SCRAPE_PORTS), KSERVE_AGGREGATE_METRICS_PORT)


def _namespace(name: str, pods: dict[str, str] | None = None) -> dict:
    peer: dict[str, Any] = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}
    if pods:
        peer["podSelector"] = {"matchLabels": pods}  # these pods of that namespace only
    return peer


def render_kserve_network_policy(record: dict) -> dict:
    """The predictor pods' NetworkPolicy: Standard mode's (servekit.deploy.kserve) or Knative's below."""
    if record["kserve"]["deploymentMode"] == "Standard":
        return render_standard_network_policy(record)
    return render_knative_network_policy(record)


def render_knative_network_policy(record: dict) -> dict:
    """The NetworkPolicy of the InferenceService's predictor pods (Knative mode): closed but to whom serving needs.

    Admitted, and nothing else: pods labelled like the Deployment form's clients, and Knative's activator
    and the ingress gateways, on the queue-proxy's port (the gateways are the way in for every client of
    the InferenceService's URL, so restricting callers beyond the namespace needs a rule at the gateway,
    e.g. an Istio AuthorizationPolicy); the Knative autoscaler on the queue-proxy's metrics; the monitoring
    namespace on the scrape ports. Nobody reaches the container's own ports (8080, 8000, 8001) or the health
    port: the queue-proxy forwards over loopback, and the kubelet probes from the node.
    """
    client_key, client_value = CLIENT_LABEL

    def queue() -> list[dict]:  # a new list each time: a shared one would be dumped as a YAML anchor and alias
        return [{"protocol": "TCP", "port": KNATIVE_QUEUE_PORT}]

    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"{APP}-predictor", "namespace": record["namespace"], "labels": labels(record)},
        "spec": {
            "podSelector": {"matchLabels": dict(KSERVE_PREDICTOR_SELECTOR)},
            # Ingress only: the Knative data plane's sidecars (queue-proxy, an Istio proxy where injected) need
            # their own egress, which depends on the cluster's mesh and tracing settings.
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {client_key: client_value}}}], "ports": queue()},
                {
                    "from": [
                        _namespace(KNATIVE_NAMESPACE, {"app.kubernetes.io/component": "activator"}),
                        _namespace(KNATIVE_INGRESS_NAMESPACE),
                    ],
                    "ports": queue(),
                },
                {
                    "from": [_namespace(KNATIVE_NAMESPACE, {"app.kubernetes.io/component": "autoscaler"})],
                    "ports": [{"protocol": "TCP", "port": KNATIVE_AUTOSCALER_METRICS_PORT}],
                },
                {
                    "from": [_namespace(MONITORING_NAMESPACE)],
                    "ports": [{"protocol": "TCP", "port": port} for port in kserve_scrape_ports()],
                },
            ],
        },
    }


def render_inferenceservice(record: dict) -> dict:
    """A KServe InferenceService whose predictor is the same image as a custom container (OIP v2).

    Standard mode (KServe's default): servekit.deploy.kserve. Knative mode (--kserve-mode knative): below.
    """
    if record["kserve"]["deploymentMode"] == "Standard":
        return render_standard_inferenceservice(record)
    declared, mounts = volumes()
    kserve = record["kserve"]
    predictor: dict[str, Any] = {
        "minReplicas": record["replicas"],
        "maxReplicas": record["max_replicas"],
        "scaleMetric": "concurrency",
        "scaleTarget": kserve["scale_target"],
    }
    if kserve["canaryTrafficPercent"] is not None:
        predictor["canaryTrafficPercent"] = kserve["canaryTrafficPercent"]
    predictor |= {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "containers": [
            {
                "name": KSERVE_CONTAINER,
                "image": record["image"],
                "imagePullPolicy": "IfNotPresent",
                "command": list(record["entrypoint"]),
                # PROTOCOL on the first container is how KServe reads a custom predictor's protocol version.
                "env": [{"name": "PROTOCOL", "value": "v2"}]
                + [{"name": key, "value": value} for key, value in record["env"].items()],
                # Knative routes one port: the OIP HTTP front (KServe v2 and v1 routes, readiness, metadata).
                "ports": [{"name": "http1", "containerPort": PORTS["oip-http"], "protocol": "TCP"}],
                "resources": resources(record),
                # The health port, not declared (Knative allows one container port, and checks only probe ports
                # given by name against it). The queue-proxy runs the readiness probe against it over loopback
                # (Knative >= 1.14). Knative rewrites a liveness probe's port to the container's (8000, probed by
                # the kubelet from the node) unless its multi-container-probing feature is enabled.
                "readinessProbe": record["probes"]["readiness"],
                # Knative takes no startupProbe: liveness waits out the startup budget instead.
                "livenessProbe": {**record["probes"]["liveness"], "initialDelaySeconds": kserve["liveness_delay"]},
                "securityContext": container_security(),
                "volumeMounts": mounts,
            }
        ],
        "volumes": declared,
    }
    annotations = {"serving.kserve.io/deploymentMode": "Knative", "serving.kserve.io/enable-metric-aggregation": "true"}
    return inferenceservice(record, annotations, predictor)


def inferenceservice(record: dict, annotations: dict[str, str], predictor: dict) -> dict:
    """The InferenceService around a predictor: cluster-local unless public, scraped on servekit's page."""
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": APP,
            "namespace": record["namespace"],
            "labels": labels(record) | ({} if record["kserve"]["public"] else dict(KSERVE_CLUSTER_LOCAL)),
            "annotations": annotations
            | {
                "serving.kserve.io/enable-prometheus-scraping": "true",
                "prometheus.kserve.io/port": str(PORTS["sk-metrics"]),
                "prometheus.kserve.io/path": "/metrics",
                "servekit.io/bundle-sha256": record["bundle_sha256"],
            },
        },
        "spec": {"predictor": predictor},
    }


def render_standard_inferenceservice(record: dict) -> dict:
    """The InferenceService in Standard mode: the Deployment form's pod as a custom predictor (OIP v2)."""
    scaling = record["autoscaling"]
    # The Deployment form's pod as it is (probes, preStop, grace, security, volumes): KServe makes a Deployment.
    (deployment,) = [d for d in render_kubernetes(record) if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (base,) = pod["containers"]
    container = copy.deepcopy(base) | {
        "name": KSERVE_CONTAINER,
        # PROTOCOL on the first container is how KServe reads a custom predictor's protocol version.
        "env": [{"name": "PROTOCOL", "value": "v2"}, *copy.deepcopy(base["env"])],
        # KServe turns every container port into a Service port; the scrape ports are declared too, because a
        # PodMonitor finds only declared ports (the NetworkPolicy admits only the monitoring namespace there).
        "ports": [{"name": name, "containerPort": PORTS[name], "protocol": "TCP"}
                  for name in (*KSERVE_STANDARD_PORTS, *SCRAPE_PORTS)],
    }  # fmt: skip
    predictor: dict[str, Any] = {"minReplicas": record["replicas"], "maxReplicas": record["max_replicas"]}
    if scaling["autoscaler"] == "keda":
        predictor["autoScaling"] = {
            "metrics": [
                {
                    "type": "External",
                    "external": {
                        "metric": {"backend": "prometheus", "serverAddress": scaling["prometheus_url"],
                                   "query": scaling["kserve_query"]},  # fmt: skip
                        # KServe's KEDA reconciler passes target.value as the trigger's threshold (per replica).
                        "target": {"type": "Value", "value": str(scaling["queue_per_pod"])},
                    },
                },
                {"type": "Resource", "resource": {"name": "cpu", "target": {
                    "type": "Utilization", "averageUtilization": scaling["cpu_utilization"]}}},
            ]
        }  # fmt: skip
    else:
        predictor |= {"scaleMetric": "cpu", "scaleTarget": HPA_CPU_UTILIZATION}
    predictor |= {key: copy.deepcopy(pod[key]) for key in KSERVE_POD_FIELDS if key in pod} | {"containers": [container]}
    # KServe splits traffic between revisions itself: no routing ConfigMap, so its pods' proxies route nothing.
    predictor["volumes"] = [v for v in predictor.get("volumes", []) if v["name"] != "routing"]
    container["volumeMounts"] = [m for m in container.get("volumeMounts", []) if m["name"] != "routing"]
    return inferenceservice(record, {"serving.kserve.io/deploymentMode": "Standard",
                             "serving.kserve.io/autoscalerClass": scaling["autoscaler"]},
                            predictor)  # fmt: skip


def render_standard_network_policy(record: dict) -> dict:
    """The predictor pods' NetworkPolicy in Standard mode: no activator or queue-proxy, the ports themselves.

    Admitted: pods labelled like the Deployment form's clients on the Service's ports (OIP HTTP, gRPC,
    /predictions), the ingress gateway's namespace on the same ports only when the InferenceService is
    public (cluster-local creates no route), the monitoring namespace on the scrape ports. Canary pods
    carry the same labels and are covered too. Ingress only: KServe's storage initializer (an
    initContainer of the same pod, for a storage URI) downloads from wherever the URI points.
    """
    client_key, client_value = CLIENT_LABEL

    def served() -> list[dict]:  # a fresh list each time: a shared one would be dumped as a YAML alias
        return [{"protocol": "TCP", "port": PORTS[name]} for name in KSERVE_STANDARD_PORTS]

    ingress = [{"from": [{"podSelector": {"matchLabels": {client_key: client_value}}}], "ports": served()}]
    if record["kserve"]["public"]:
        ingress.append({"from": [_namespace(KNATIVE_INGRESS_NAMESPACE)], "ports": served()})
    ingress.append(
        {
            "from": [_namespace(MONITORING_NAMESPACE)],
            "ports": [{"protocol": "TCP", "port": PORTS[name]} for name in SCRAPE_PORTS],
        }
    )
    # Ingress only: KServe's storage initializer (an initContainer of the pod, for a storage URI) downloads from
    # wherever the URI points, so egress is left to the cluster's own policies.
    spec = {
        "podSelector": {"matchLabels": dict(KSERVE_PREDICTOR_SELECTOR)},
        "policyTypes": ["Ingress"],
        "ingress": ingress,
    }
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"{APP}-predictor", "namespace": record["namespace"], "labels": labels(record)},
        "spec": spec,
    }


def _routes_line(routes: dict[str, dict]) -> str:
    parts = []
    for name, route in sorted(routes.items()):
        if "canary" in route:
            parts.append(f"{name} {route['canary']['version']} canary {route['canary']['percent']}%")
        if "shadow" in route:
            parts.append(f"{name} {route['shadow']} shadow")
    return ", ".join(parts)


def dump_documents(documents: list[dict], header: str) -> str:
    return header + yaml.safe_dump_all(documents, sort_keys=False, default_flow_style=False, explicit_start=True)


# ------------------------------------------------------------------------------------------ writing
@dataclass(frozen=True)
class Bundle:
    """A written bundle: its folder and its record (bundle.json)."""

    path: Path
    record: dict

    def summary(self) -> str:
        r = self.record
        models = "; ".join(
            f"{name} {', '.join(m['versions'])} (default {m['default']})" for name, m in r["models"].items()
        )
        canary = f", KServe canaryTrafficPercent {r['kserve']['canaryTrafficPercent']}"
        return (
            f"bundle written to {self.path}: {models}; image {r['image']}, {r['replicas']}-{r['max_replicas']} "
            f"replicas, cpu {r['cpu']}, memory {r['memory']}"
            + (canary if r["kserve"]["canaryTrafficPercent"] is not None else "")
            + (f"; pods route {_routes_line(r['routing']['routes'])}" if r["routing"]["routes"] else "")
            + "".join(f"\nnote: {note}" for note in [*r["routing"]["notes"], *r["kserve"]["notes"]])
            + f"\nnext: docker build -t {r['image']} {self.path} && docker push {r['image']} && "
            f"kubectl apply -f {self.path / 'k8s' / 'servekit.yaml'}"
            f" (or kubectl apply -k {self.path / 'kustomize' / 'overlays' / 'production'})"
        )


def build_record(
    options: BundleOptions,
    models: list[SelectedModel],
    manifest: dict,
    config_text: str,
    repo_root: Path,
    canary,
    routing: tuple[dict[str, dict], list[str]] = ({}, []),
) -> dict:
    percent, canaries, notes = canary
    mode = KSERVE_MODES[options.kserve_mode]
    if mode == "Standard" and canaries:
        listed = ", ".join(f"{n} {c['version']} ({c['percent']}%)" for n, c in sorted(canaries.items()))
        notes = [
            *notes,
            f"the canary of {listed} is not written into the Standard-mode InferenceService (KServe ignores "
            "canaryTrafficPercent there): apply it with servekit kserve canary --current APPLIED --bundle THIS "
            f"--percent {percent}",
        ]
        percent, canaries = None, {}
    if options.public:
        notes = [
            *notes,
            "--public: the InferenceService is reachable through the ingress gateway, and tokens are off in pods: "
            "anyone who reaches the gateway can call inference and metadata unless the gateway authenticates",
        ]
    archives = {}
    for m in models:
        for v in m.versions:
            name = archive_name(m.name, v)
            archives[name] = {"model": m.name, "version": v, "sha256": manifest["archives"][name]["sha256"]}
    concurrency = sum(
        m.settings[m.default]["maxWorkers"] * max(1, m.settings[m.default]["batchSize"]) for m in models
    )  # requests one pod works on at once: the autoscaler's target per pod
    return {
        "format": 1,
        "servekit_version": project_version(repo_root / "pyproject.toml"),
        "models": {m.name: {"versions": list(m.versions), "default": m.default} for m in models},
        "archives": archives,
        "bundle_sha256": bundle_digest(config_text, {name: entry["sha256"] for name, entry in archives.items()}),
        "image": options.image,
        "base_image": PYTHON_IMAGE,
        "pins": pyproject_pins(repo_root / "pyproject.toml"),
        # The engines of versions whose spec names a runtime (docs/spec.md): the image installs them.
        "runtimes": sorted(
            {
                engine
                for m in models
                for v in m.versions
                if (engine := (m.settings[v].get("handler") or {}).get("runtime", "torch")) != "torch"
            }
        ),  # fmt: skip
        "namespace": options.namespace,
        "replicas": options.replicas,
        "max_replicas": options.max_replicas,
        "cpu": options.cpu,
        "memory": options.memory,
        "cpu_budget": "the handlers' CPU budget reads the cgroup quota (cpu.max) that the CPU limit sets",
        "user": {"name": USER, "uid": UID, "home": HOME},
        "paths": {"model_store": MODEL_STORE, "config": CONFIG_FILE, "workdir": WORKDIR},
        "ports": dict(PORTS),
        "service_ports": list(SERVICE_PORTS),
        "management": "127.0.0.1:8081 inside the pod only (kubectl port-forward)",
        "entrypoint": list(ENTRYPOINT),
        "env": dict(ENV),
        "probes": {kind: probe(kind) for kind in ("readiness", "liveness", "startup")},
        "preStopSeconds": PRESTOP_SLEEP_S,
        "drainTimeoutSeconds": DRAIN_TIMEOUT_S,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
        "rolling_update": {"maxUnavailable": 0, "maxSurge": 1},
        "network": {
            "client_label": dict([CLIENT_LABEL]),
            "metrics_namespace": MONITORING_NAMESPACE,
            "health_port": HEALTH_PORT,  # the probes' only: in no Service and no NetworkPolicy rule
        },
        "otlp_endpoint": options.otlp_endpoint,
        # The Deployment form's in-pod canary and shadow (servekit.deploy.pod); KServe's form splits by revision.
        "routing": {
            "configmap": ROUTING_CONFIGMAP,
            "file": ROUTING_FILE,
            "routes": routing[0],
            "notes": routing[1],
            "torchserve_inference": f"127.0.0.1:{TORCHSERVE_INFERENCE_PORT}",
        },
        "autoscaling": {
            "autoscaler": options.autoscaler,
            "prometheus_url": options.prometheus_url,
            # Waiting requests per pod before another is added: what one pod works on at once.
            "queue_per_pod": max(1, concurrency),
            "cpu_utilization": HPA_CPU_UTILIZATION,
            "deployment_query": _queue_query(options.namespace, "deployment"),
            "kserve_query": _queue_query(options.namespace, "kserve"),
        },
        "kserve": {
            "deploymentMode": mode,
            "public": options.public,
            "visibility": "public" if options.public else "cluster-local",
            "protocolVersion": "v2",
            "canaryTrafficPercent": percent,
            "canaries": canaries,
            "notes": notes,
            "scale_target": max(1, concurrency),
            "liveness_delay": PROBES["startup"]["periodSeconds"] * PROBES["startup"]["failureThreshold"],
        },
    }


def _queue_query(namespace: str, form: str) -> str:
    if form == "deployment":
        return autoscaling.queue_query(autoscaling.deployment_series(namespace, APP))
    return autoscaling.queue_query(autoscaling.predictor_series(namespace, APP, KSERVE_CONTAINER))


def _write_operator_files(record: dict, staging: Path) -> None:
    """monitoring/ (PodMonitors, PrometheusRule, Grafana dashboard) and kustomize/ (base and overlays)."""
    namespace, meta = record["namespace"], labels(record)
    monitors = operators.render_pod_monitors(
        namespace, meta, {APP: selector(), f"{APP}-predictor": dict(KSERVE_PREDICTOR_SELECTOR)}
    )
    rule = operators.render_prometheus_rule(APP, namespace, meta)
    (staging / "monitoring").mkdir()
    header = "# Generated by `servekit bundle` for the Prometheus Operator: kubectl apply -f this file.\n"
    (staging / "monitoring" / "podmonitor.yaml").write_text(dump_documents(monitors, header))
    (staging / "monitoring" / "prometheusrule.yaml").write_text(
        dump_documents([rule], header.replace(":", " (monitoring/rules):", 1))
    )
    (staging / "monitoring" / "grafana-dashboard.json").write_text(
        json.dumps(operators.render_dashboard(), indent=1, sort_keys=True) + "\n"
    )
    extras = {
        "podmonitor.yaml": monitors[0],  # the Deployment's pods
        "prometheusrule.yaml": rule,
        "grafana-dashboard.yaml": operators.render_dashboard_configmap(f"{APP}-dashboard", namespace, meta),
    }
    kustomize.write_kustomize(render_kubernetes(record), extras, namespace, staging / "kustomize")


def _write_models_volume_forms(staging: Path, record: dict) -> None:
    """The forms serving config/ and model-store/ from a volume instead of the image (servekit.deploy.model_source)."""
    header = (
        "# Generated by `servekit bundle`: the Deployment serving this bundle's config/ and model-store/ from the\n"
        "# PersistentVolumeClaim servekit-models (folder in servekit.io/models), checked before serving; same image.\n"
    )
    documents = mount_models_deployment(render_kubernetes(record), record)
    (staging / "k8s" / "servekit-models-volume.yaml").write_text(dump_documents(documents, header))
    header = (
        "# Generated by `servekit bundle`: the InferenceService with KServe's storage initializer putting this\n"
        "# bundle's config/ and model-store/ at /mnt/models (STORAGE_URI), checked before serving; same image.\n"
    )
    document = mount_models_inferenceservice(render_inferenceservice(record), record)
    (staging / "kserve" / "inferenceservice-models-volume.yaml").write_text(dump_documents([document], header))


def _copy_sources(repo_root: Path, target: Path) -> None:
    target.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        source = repo_root / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=ignore)
        elif source.is_file():
            shutil.copy2(source, target / name)
        else:
            raise BundleError(f"{source} is missing: the image installs the toolkit from it")


def _replace(staging: Path, out: Path) -> None:
    """Put ``staging`` at ``out``; an existing ``out`` is replaced only if it is a bundle."""
    if out.exists():
        if not (out / "bundle.json").is_file():
            raise BundleError(f"refusing to replace {out}: it exists and is not a bundle (no bundle.json)")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old)
    else:
        staging.rename(out)


def write_bundle(
    options: BundleOptions,
    spec: Path = REPO_ROOT / "models.yaml",
    store: Path = REPO_ROOT / "model_store",
    state_file: Path = REPO_ROOT / "var" / "proxy" / "state.json",
    repo_root: Path = REPO_ROOT,
    base_config: Path = BASE_CONFIG,
) -> Bundle:
    """Resolve, check and write the bundle to ``options.out`` (replaced whole, never half-written)."""
    store = Path(store)
    manifest = read_manifest(store)
    models = resolve(options, Path(spec), store, manifest)
    canary = canary_percent(models, Path(state_file))
    config_text = render_config(models, Path(base_config), options.otlp_endpoint)
    routing = pod_routes(models, Path(state_file))
    record = build_record(options, models, manifest, config_text, Path(repo_root), canary, routing)
    out = options.out.resolve()
    record_for_files = {**record, "out_name": options.out.name}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    try:
        (staging / "model-store").mkdir(parents=True)
        for name, entry in record["archives"].items():
            copied = staging / "model-store" / name
            shutil.copy2(store / name, copied)
            if file_sha256(copied) != entry["sha256"]:
                raise BundleError(f"{name} changed while it was copied into the bundle; run make bundle again")
        bundled = {
            "format": manifest.get("format", 1),
            "archives": {n: manifest["archives"][n] for n in record["archives"]},
        }
        (staging / "model-store" / MANIFEST_NAME).write_text(json.dumps(bundled, indent=2, sort_keys=True) + "\n")
        (staging / "config").mkdir()
        (staging / "config" / "config.properties").write_text(config_text)
        (staging / "Dockerfile").write_text(render_dockerfile(record_for_files))
        (staging / ".dockerignore").write_text(DOCKERIGNORE)
        _copy_sources(Path(repo_root), staging / "src")
        (staging / "k8s").mkdir()
        header = f"# Generated by `servekit bundle` for image {record['image']}: kubectl apply -f this file.\n"
        (staging / "k8s" / "servekit.yaml").write_text(dump_documents(render_kubernetes(record), header))
        (staging / "kserve").mkdir()
        header = (
            "# Generated by `servekit bundle`: a KServe InferenceService, a custom predictor from the same image\n"
            "# speaking the Open Inference Protocol (v2), and the NetworkPolicy of its predictor pods.\n"
            + (
                "# --public: reachable through the ingress gateway by anyone who reaches it (tokens are off).\n"
                if record["kserve"]["public"]
                else "# Cluster-local: no external route (bundle with --public to expose it through the gateway).\n"
            )
            + (
                f"# canaryTrafficPercent {record['kserve']['canaryTrafficPercent']}: from `servekit canary` "
                "(the new revision, this bundle, gets that share; the previous one the rest).\n"
                if record["kserve"]["canaryTrafficPercent"] is not None
                else ""
            )
        )
        (staging / "kserve" / "inferenceservice.yaml").write_text(
            dump_documents([render_inferenceservice(record), render_kserve_network_policy(record)], header)
        )
        _write_operator_files(record, staging)
        _write_models_volume_forms(staging, record)
        (staging / "bundle.json").write_text(json.dumps(record, indent=2) + "\n")
        _replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Bundle(out, record)
