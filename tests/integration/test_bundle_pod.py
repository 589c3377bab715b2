"""The bundle runs as a pod would (issue 12): its entrypoint, config.properties and archives, a fresh home.

A bundle is generated from the session's model store into a temporary folder; ``Pod``
(tests/integration/pods.py) copies its ``config/`` and ``model-store/`` into a fresh home and runs
bundle.json's ``entrypoint`` argv in it, with the Deployment's environment, changing only the
interpreter, the ``/home/model-server`` paths, ``--bind 0.0.0.0`` to 127.0.0.1 and the fixed ports
(free loopback ports instead; see pods.py). No token anywhere: the pod configuration disables them.
Every shipped digit must come back right through ``/predictions`` and through the OIP address
(tritonclient, HTTP binary tensors and gRPC); on SIGTERM the readiness turns false, the launcher
drains, exits 0 within the termination grace, and leaves no process of its own behind.
"""

from __future__ import annotations

import base64
import contextlib
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
import yaml

from servekit.serving.server import read_properties
from tests.integration.conftest import operator_cli
from tests.integration.pods import Pod, make_bundle, pod_timing, record_of
from tests.otlp_receiver import otlp_receiver

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DIGITS = [(str(d), (REPO / "samples" / f"digit_{d}.png").read_bytes()) for d in range(10)]
NOT_READY_WITHIN_S = 1.0  # the launcher checks for SIGTERM every 0.2 s and marks itself draining at once


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    make_bundle(out, model_store)
    return out


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory, bundle: Path) -> Iterator[Pod]:
    pod = Pod(bundle, tmp_path_factory.mktemp("pod") / "home")
    try:
        pod.prepare()
        pod.start()
        took = pod.wait_ready(pod_timing(pod.record)["startup_s"])
        print(f"\npod ready in {took:.1f}s: {' '.join(pod.argv())}")
        yield pod
    finally:
        pod.kill()


def test_the_bundle_configures_a_pod(bundle: Path) -> None:
    """What the pod below changes is only what a shared machine forces: the bundle itself is a pod's,
    and bundle.json (which the pod is started from) says what the Deployment says."""
    props = read_properties(bundle / "config" / "config.properties")
    assert props["inference_address"] == "http://127.0.0.1:8079"  # TorchServe behind the pod's routing proxy
    assert props["metrics_address"] == "http://0.0.0.0:8082"
    assert props["management_address"] == "http://127.0.0.1:8081"
    assert props["disable_token_authorization"] == "true"
    assert props["model_store"] == "/home/model-server/model-store"

    record = record_of(bundle)
    documents = list(yaml.safe_load_all((bundle / "k8s" / "servekit.yaml").read_text()))
    deployment = next(d for d in documents if d and d.get("kind") == "Deployment")
    pod_spec = deployment["spec"]["template"]["spec"]
    (container,) = pod_spec["containers"]
    assert [*container.get("command", []), *container.get("args", [])] == record["entrypoint"]
    assert {e["name"]: e["value"] for e in container.get("env", [])} == record["env"]
    assert container["readinessProbe"]["httpGet"] == record["probes"]["readiness"]["httpGet"]
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(record["preStopSeconds"])]
    assert pod_spec["terminationGracePeriodSeconds"] == record["terminationGracePeriodSeconds"]


def bundled_routes(pod: Pod) -> list[tuple[str | None, str]]:
    """(version asked for, version that must answer): the default route, then every bundled version."""
    digits = pod.record["models"]["digits"]
    return [(None, digits["default"]), *((version, version) for version in digits["versions"])]


def test_every_digit_through_predictions(pod: Pod) -> None:
    for asked, answering in bundled_routes(pod):
        path = "/predictions/digits" + (f"/{asked}" if asked else "")
        for label, image in DIGITS:
            response = requests.post(
                pod.url("http", path), data=image, headers={"Content-Type": "image/png"}, timeout=60
            )
            assert response.status_code == 200, response.text
            assert response.json()["predictions"][0]["label"] == label, (path, response.json())
            assert response.json()["version"] == answering, (path, response.json())


def test_every_digit_through_oip_http(pod: Pod) -> None:
    """tritonclient.http on the OIP HTTP port with binary tensors, and no token, as a pod's client sends it."""
    http = triton_http.InferenceServerClient(f"127.0.0.1:{pod.ports['oip_http']}")
    assert http.is_server_ready()
    outputs = [triton_http.InferRequestedOutput(name, binary_data=True) for name in ("labels", "scores")]
    for asked, _ in bundled_routes(pod):
        for label, image in DIGITS:
            tensor = triton_http.InferInput("image", [1], "BYTES")
            tensor.set_data_from_numpy(np.array([image], dtype=np.object_), binary_data=True)
            result = http.infer("digits", [tensor], model_version=asked or "", outputs=outputs)
            assert result.as_numpy("labels")[0][0].decode() == label, asked


def test_every_digit_through_oip_grpc(pod: Pod) -> None:
    """tritonclient.grpc on the OIP gRPC port (the Service's 8001), no token."""
    grpc = triton_grpc.InferenceServerClient(f"127.0.0.1:{pod.ports['oip_grpc']}")
    assert grpc.is_server_ready()
    for asked, _ in bundled_routes(pod):
        for label, image in DIGITS:
            tensor = triton_grpc.InferInput("image", [1], "BYTES")
            tensor.set_data_from_numpy(np.array([image], dtype=np.object_))
            result = grpc.infer("digits", [tensor], model_version=asked or "")
            assert result.as_numpy("labels")[0][0].decode() == label, asked


def test_the_scrape_port_serves_the_handler_metrics_and_nothing_else(pod: Pod) -> None:
    """The annotated scrape port (the Deployment's prometheus.io/port) counts what the tests above sent."""
    page = requests.get(pod.url("servekit_metrics", "/metrics"), timeout=30)
    assert page.status_code == 200
    default = pod.record["models"]["digits"]["default"]
    prefix = f'servekit_requests_total{{code="200",model="digits",version="{default}"}} '
    answered = [line for line in page.text.splitlines() if line.startswith(prefix)]
    assert answered, page.text[:2000]
    assert float(answered[0].rsplit(" ", 1)[1]) >= len(DIGITS)
    assert f'servekit_workers_ready{{model="digits",version="{default}"}} 1.0' in page.text
    refused = requests.post(pod.url("servekit_metrics", "/predictions/digits"), data=b"x", timeout=30)
    assert refused.status_code == 404  # only GET /metrics: the tokenless inference API is not reachable here


# ------------------------------------------------------------------------------------------ routing in the pod
def wait_said(pod: Pod, line: str, timeout: float = 15.0) -> None:
    """Wait until the pod's log has one more line starting with ``line`` than it had when called."""
    log = pod.home / "pod.log"
    before = log.read_text().count(line)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.read_text().count(line) > before:
            return
        time.sleep(0.2)
    raise AssertionError(f"the pod never said {line!r}:{pod.log_tail()}")


def send(count: int, one: Callable[[], str], workers: int = 4) -> Counter:
    with ThreadPoolExecutor(workers) as pool:
        return Counter(pool.map(lambda _: one(), range(count)))


def predictions(pod: Pod) -> Callable[[], str]:
    label, image = DIGITS[3]

    def one() -> str:
        response = requests.post(pod.url("http", "/predictions/digits"), data=image, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["predictions"][0]["label"] == label
        assert response.headers["X-Model-Version"] == response.json()["version"]
        return response.json()["version"]

    return one


def every_protocol(pod: Pod) -> dict[str, Callable[[], str]]:
    """One request on each protocol a pod's clients use, each returning the version that answered."""
    label, image = DIGITS[3]
    http = triton_http.InferenceServerClient(f"127.0.0.1:{pod.ports['oip_http']}")
    grpc = triton_grpc.InferenceServerClient(f"127.0.0.1:{pod.ports['oip_grpc']}")

    def oip_http() -> str:
        tensor = triton_http.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([image], dtype=np.object_), binary_data=True)
        result = http.infer("digits", [tensor])
        assert result.as_numpy("labels")[0][0].decode() == label
        return result.get_response()["model_version"]

    def oip_grpc() -> str:
        tensor = triton_grpc.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([image], dtype=np.object_))
        result = grpc.infer("digits", [tensor])
        assert result.as_numpy("labels")[0][0].decode() == label
        return result.get_response().model_version

    def kserve_v1() -> str:
        body = {"instances": [{"data": base64.b64encode(image).decode()}]}
        response = requests.post(pod.url("oip_http", "/v1/models/digits:predict"), json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["model_version"]

    return {"predictions": predictions(pod), "oip-http": oip_http, "oip-grpc": oip_grpc, "kserve-v1": kserve_v1}


def handled(pod: Pod, version: str) -> float:
    """The handler's count of answered digits requests of ``version`` (the pod's scrape port)."""
    page = requests.get(pod.url("servekit_metrics", "/metrics"), timeout=30).text
    prefix = f'servekit_requests_total{{code="200",model="digits",version="{version}"}} '
    return sum(float(line.rsplit(" ", 1)[1]) for line in page.splitlines() if line.startswith(prefix))


def test_the_pods_proxy_follows_its_routing_file_on_every_protocol(pod: Pod, model_store: Path, tmp_path: Path) -> None:
    """The routing ConfigMap's file, changed while the pod serves (docs/kubernetes.md, "Canary and shadow in
    pods"): a canary's share on /predictions, a full canary on every protocol, a shadow that clients never see,
    a refused change that keeps the routes, no routes."""
    default = pod.record["models"]["digits"]["default"]
    (other,) = [v for v in pod.record["models"]["digits"]["versions"] if v != default]

    # The first change as an operator makes it: servekit pod-routes writes the ConfigMap, the kubelet the file.
    cli = operator_cli(None, model_store, REPO, tmp_path / "state")
    out = tmp_path / "routes.yaml"
    written = cli("pod-routes", "--bundle", str(pod.bundle), "--canary", f"digits:{other}:30", "--out", str(out))
    assert written.returncode == 0, written.stderr
    (configmap,) = yaml.safe_load_all(out.read_text())
    pod.write_routes(configmap["data"]["routing.json"])
    wait_said(pod, f"routing: now digits: canary {other} (30%)")
    counts = send(300, predictions(pod))
    print(f"\n30% canary of {other} in the pod: {dict(counts)}")
    assert 0.20 <= counts[other] / 300 <= 0.40, counts

    pod.write_routes({"digits": {"canary": {"version": other, "percent": 100}}})
    wait_said(pod, f"routing: now digits: canary {other} (100%)")
    for protocol, one in every_protocol(pod).items():  # one at a time: a tritonclient.http client is not shared
        assert send(20, one, workers=1) == Counter({other: 20}), protocol

    before = handled(pod, other)
    pod.write_routes({"digits": {"shadow": other}})
    wait_said(pod, f"routing: now digits: shadow {other}")
    assert send(20, predictions(pod)) == Counter({default: 20})  # clients see only the default's answers
    deadline = time.monotonic() + 15
    while handled(pod, other) < before + 20 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert handled(pod, other) >= before + 20  # the shadow answered a copy of each

    pod.write_routes({"digits": {"canary": {"version": "9.9", "percent": 50}}})
    wait_said(pod, "routing: change refused, the routes stay as they were")
    served = ", ".join(sorted({default, other}))
    refusal = f"routes digits to 9.9, which this pod does not serve (it serves digits {served})"
    assert refusal in (pod.home / "pod.log").read_text()
    assert send(20, predictions(pod)) == Counter({default: 20})
    assert pod.readiness() == 200

    pod.write_routes({})
    wait_said(pod, "routing: now no routes")
    assert send(20, predictions(pod)) == Counter({default: 20})


def test_sigterm_turns_readiness_false_drains_and_leaves_nothing(pod: Pod) -> None:
    grace = pod_timing(pod.record)["grace_s"]
    pod.note_processes()
    running = [line for _, line in pod.owned().values()]
    for part in ("org.pytorch.serve.ModelServer", "servekit.serving.oip", "nginx: master process"):
        assert any(part in line for line in running), f"no {part} among the pod's processes: {running}"

    pod.terminate()
    signalled = time.monotonic()
    probes: list[tuple[float, int | None]] = []
    while pod.process.poll() is None and time.monotonic() - signalled < grace:
        probes.append((time.monotonic() - signalled, pod.readiness()))
        time.sleep(0.05)
    try:
        code = pod.process.wait(timeout=max(0.1, grace - (time.monotonic() - signalled)))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the launcher did not exit within the termination grace ({grace}s):{pod.log_tail()}")
    exited = time.monotonic() - signalled
    print(f"\nSIGTERM -> exit {code} in {exited:.1f}s; readiness probes: {compact(probes)}")
    assert code == 0, pod.log_tail()

    answers = [(at, status) for at, status in probes if status is not None]
    not_ready = [at for at, status in answers if status != 200]
    assert not_ready, f"the readiness never said not-ready before the listener went away: {compact(probes)}"
    assert all(at < NOT_READY_WITHIN_S for at, status in answers if status == 200), compact(probes)
    assert all(status != 200 for at, status in answers if at >= not_ready[0]), compact(probes)

    assert pod.image_files() == pod.image_snapshot, "the pod wrote into config/ or model-store/ (read-only there)"
    left = pod.wait_gone(5)  # the launcher waited for its children; allow the kernel a moment
    assert left == {}, f"left running after the launcher exited: {left}"


def compact(probes: list[tuple[float, int | None]]) -> str:
    """Runs of equal probe answers: ``200 x3 (0.00-0.12s), 400 x20 (...), refused x5 (...)``."""
    runs: list[list] = []
    for at, status in probes:
        if runs and runs[-1][0] == status:
            runs[-1][1] += 1
            runs[-1][3] = at
        else:
            runs.append([status, 1, at, at])
    return ", ".join(f"{s or 'refused'} x{n} ({a:.2f}-{b:.2f}s)" for s, n, a, b in runs)


# ------------------------------------------------------------------------------------------ traces in the pod
def test_a_bundle_with_trace_export_gives_the_pods_proxy_a_span_between_the_front_and_the_worker(
    tmp_path: Path, model_store: Path
) -> None:
    """``--otlp-endpoint`` per deployment: a gRPC request's spans chain gateway -> front -> proxy -> worker."""
    trace_id, client_span = "6d1e0f5a7c3b4e2d9a8b7c6d5e4f3a2b", "1a2b3c4d5e6f7a8b"
    with otlp_receiver() as receiver:
        out = tmp_path / "traced-bundle"
        make_bundle(out, model_store, "--models", "digits:1.0", "--otlp-endpoint", receiver.url)
        pod = Pod(out, tmp_path / "home")
        try:
            pod.prepare()
            pod.start()
            pod.wait_ready(pod_timing(pod.record)["startup_s"])
            tensor = triton_grpc.InferInput("image", [1], "BYTES")
            tensor.set_data_from_numpy(np.array([DIGITS[7][1]], dtype=np.object_))
            with contextlib.closing(triton_grpc.InferenceServerClient(f"127.0.0.1:{pod.ports['oip_grpc']}")) as grpc:
                result = grpc.infer("digits", [tensor], headers={"traceparent": f"00-{trace_id}-{client_span}-01"})
            assert result.as_numpy("labels")[0][0].decode() == "7"
            hops = ("gateway ModelInfer", "front", "proxy", "worker")
            got = receiver.wait_for(lambda spans: set(hops) <= {s.name for s in spans if s.trace_id == trace_id})
            spans = {s.name: s for s in got if s.trace_id == trace_id and s.name in hops}
        finally:
            pod.kill()
    parents = [client_span, *(spans[name].span_id for name in hops[:-1])]
    assert [spans[name].parent_id for name in hops] == parents  # each hop's parent is the hop before it
    assert spans["proxy"].service == "servekit-proxy"
    assert spans["proxy"].attributes["servekit.served_version"] == "1.0"
