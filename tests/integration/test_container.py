"""The image built for real and run as the cluster would (issue 26), on this machine, without a container runtime.

The module builds once: a Debian base from Debian's packages (``mmdebstrap``, cached in build/image/base.tar
across runs of one checkout), imported into a private buildah storage, then the bundle's own Dockerfile
(``buildah bud --isolation chroot``, torch from this machine's wheel cache), exactly as ``make image``
does (servekit.deploy.image). The storage is removed at the end.

Then the image runs in containers (tests/integration/containers.py: ``unshare`` + ``chroot`` on the
image's filesystem, read-only root, the Deployment's emptyDirs as tmpfs, the image's non-root user, a
cgroup v1 CPU quota). What a shared machine forces, and nothing else, is changed: the listeners bind
127.0.0.1 instead of 0.0.0.0 and each container gets free ports, through its configuration mounted
read-only over the image's (a ConfigMap would do the same) and the launcher's own port flags.

* the image-baked form, quota 1 CPU: every shipped digit through /predictions, OIP HTTP and OIP gRPC;
  the handlers' thread budget is the quota (their log line); SIGTERM drains as the probes promise;
* models outside the image: a store mounted at /mnt/models that is not the pinned bundle is refused;
* a rolling update of two containers of the same image, digits 1.0 then 2.0 from mounted stores (a new
  version without a new image), behind nginx under load: zero failed requests.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http

from servekit.deploy.image import (
    SIZE_BUDGET_BYTES,
    Buildah,
    archive_layers,
    build_image,
    export_archive,
    format_layers,
    local_pip,
    make_base,
    storage_layers,
)
from servekit.deploy.model_source import MODELS_MOUNT, REFUSED_EXIT, bundle_digest, mounted_command
from servekit.serving.store import read_manifest
from tests.integration.containers import Container, wait_ready
from tests.integration.pods import (
    PORT_NAMES,
    ServiceStandIn,
    free_ports,
    make_bundle,
    on_loopback,
    on_ports,
    pod_timing,
)
from tests.integration.test_rolling_update import (
    CONCURRENCY,
    SETTLE_S,
    VersionSampler,
    answering_versions,
    end_load,
    hey_report,
    post_digit,
    start_hey,
    stop_load,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DIGITS = [(str(d), (REPO / "samples" / f"digit_{d}.png").read_bytes()) for d in range(10)]
IMAGE = "localhost/servekit-test:0.1.0"
HOME = "/home/model-server"
EMPTYDIRS = (f"{HOME}/var", "/tmp")  # the Deployment's emptyDirs (bundle.volumes())
NOT_READY_WITHIN_S = 1.0
START_BUDGET_S = 240.0


@dataclass
class Built:
    buildah: Buildah
    bundle: Path
    record: dict
    build_s: float
    folder: Path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> Iterator[Built]:
    folder = tmp_path_factory.mktemp("image")
    buildah = Buildah(root=folder / "storage", runroot=folder / "run")
    try:
        bundle = folder / "bundle"
        record = make_bundle(bundle, model_store, "--models", "digits:1.0,2.0", "--image", IMAGE)
        base = make_base(buildah, REPO / "build" / "image" / "base.tar", log=folder / "build.log")
        took = build_image(buildah, bundle, IMAGE, base=base, pip=local_pip(), log=folder / "build.log")
        print(f"\nbuilt {IMAGE} in {took:.0f} s")
        yield Built(buildah, bundle, record, took, folder)
    finally:
        for command in (("rm", "--all"), ("rmi", "--all", "--force")):
            subprocess.run(buildah.argv(*command), capture_output=True, check=False, timeout=300)
        shutil.rmtree(folder / "storage", ignore_errors=True)


def configured_folder(target: Path, bundle: Path, ports: dict[str, int], store: bool) -> Path:
    """A bundle's config/ (ports moved to ``ports``) and, with ``store``, its model-store/: what a volume holds."""
    (target / "config").mkdir(parents=True)
    text = on_ports((bundle / "config" / "config.properties").read_text(), ports)
    (target / "config" / "config.properties").write_text(text)
    if store:
        shutil.copytree(bundle / "model-store", target / "model-store")
    return target


def folder_digest(folder: Path) -> str:
    archives = read_manifest(folder / "model-store")["archives"]
    return bundle_digest((folder / "config" / "config.properties").read_text(),
                         {name: entry["sha256"] for name, entry in archives.items()})  # fmt: skip


def container(
    built: Built, name: str, state: Path, cpus: float, ports: dict[str, int], models: Path | None
) -> Container:
    """The image-baked form (its config/ replaced by a ported copy), or with ``models`` the mounted form."""
    if models is None:
        config = configured_folder(state / "mounted", built.bundle, ports, store=False) / "config"
        box = Container(built.buildah, IMAGE, name, state, cpus=cpus, volumes={f"{HOME}/config": (config, True)},
                        emptydirs=EMPTYDIRS)  # fmt: skip
        box.command = on_loopback(box.config["Entrypoint"], ports)
        return box
    box = Container(built.buildah, IMAGE, name, state, cpus=cpus, volumes={MODELS_MOUNT: (models, True)},
                    emptydirs=EMPTYDIRS)  # fmt: skip
    box.command = on_loopback(mounted_command(box.config["Entrypoint"], folder_digest(models)), ports)
    return box


def url(ports: dict[str, int], kind: str, path: str) -> str:
    return f"http://127.0.0.1:{ports[kind]}{path}"


def budget_lines(box: Container) -> list[str]:
    log = box.file(f"{HOME}/var/logs/model_log.log").read_text(errors="replace")
    return [line.split("cpu budget: ", 1)[1] for line in log.splitlines() if "cpu budget: " in line]


# ------------------------------------------------------------------------------------------ the image
def test_the_image_builds_on_a_debian_base_within_its_size_budget(built: Built) -> None:
    layers = storage_layers(built.buildah, IMAGE)
    total = sum(layer.size for layer in layers)
    print(f"\n{format_layers(layers)}")
    assert len(layers) == 8  # the base, apt, torch, COPY src, pip install src, useradd, COPY model-store, COPY config
    assert total <= SIZE_BUDGET_BYTES, f"{total / 1e9:.2f} GB > the budget {SIZE_BUDGET_BYTES / 1e9:.2f} GB"
    config = built.buildah.config(IMAGE)["config"]
    assert config["User"] == "1000:1000"
    assert config["Entrypoint"] == built.record["entrypoint"]
    assert config["WorkingDir"] == HOME
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["PATH"].startswith("/opt/servekit/venv/bin:")
    assert not any(key.startswith("PIP_") and key != "PIP_DISABLE_PIP_VERSION_CHECK" for key in env), env  # build only


def test_an_image_exports_as_an_oci_archive_whose_layers_are_read_back(built: Built) -> None:
    """buildah push to oci-archive (make image's export), on the base image: the archive's layer unpacks to
    exactly the layer buildah stored. The full image's export is make image's (minutes for its 6 GB)."""
    base = "localhost/servekit-base:bookworm"
    archive = export_archive(built.buildah, base, built.folder / "base.oci.tar")
    (layer,) = archive_layers(archive)
    (stored,) = storage_layers(built.buildah, base)
    assert layer.size == stored.size
    assert 0 < layer.compressed < layer.size
    archive.unlink()


# ------------------------------------------------------------------------------------------ one container
@pytest.fixture(scope="module")
def running(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Container, dict[str, int]]]:
    ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES)), strict=True))
    box = container(built, "sk-test-baked", tmp_path_factory.mktemp("baked"), 1.0, ports, models=None)
    try:
        started = time.monotonic()
        box.start()
        wait_ready(box, url(ports, "oip_health", "/v2/health/ready"), START_BUDGET_S)
        response = post_digit(url(ports, "http", "/predictions/digits"))
        assert response.status_code == 200, response.text
        print(f"\ncontainer answered its first request {time.monotonic() - started:.1f} s after start")
        yield box, ports
    finally:
        box.kill()


def test_every_digit_through_predictions_in_the_container(running: tuple[Container, dict[str, int]]) -> None:
    box, ports = running
    for asked in (None, "1.0", "2.0"):
        path = "/predictions/digits" + (f"/{asked}" if asked else "")
        for label, image in DIGITS:
            response = requests.post(url(ports, "http", path), data=image,
                                     headers={"Content-Type": "image/png"}, timeout=60)  # fmt: skip
            assert response.status_code == 200, response.text
            assert response.json()["predictions"][0]["label"] == label, (path, response.json())
            assert response.json()["version"] == (asked or "2.0")


def test_every_digit_through_oip_http_and_grpc_in_the_container(running: tuple[Container, dict[str, int]]) -> None:
    _, ports = running
    http = triton_http.InferenceServerClient(f"127.0.0.1:{ports['oip_http']}")
    grpc = triton_grpc.InferenceServerClient(f"127.0.0.1:{ports['oip_grpc']}")
    try:
        outputs = [triton_http.InferRequestedOutput(name, binary_data=True) for name in ("labels", "scores")]
        for asked in ("", "1.0", "2.0"):
            for label, image in DIGITS:
                tensor = triton_http.InferInput("image", [1], "BYTES")
                tensor.set_data_from_numpy(np.array([image], dtype=np.object_), binary_data=True)
                result = http.infer("digits", [tensor], model_version=asked, outputs=outputs)
                assert result.as_numpy("labels")[0][0].decode() == label, asked
                tensor = triton_grpc.InferInput("image", [1], "BYTES")
                tensor.set_data_from_numpy(np.array([image], dtype=np.object_))
                result = grpc.infer("digits", [tensor], model_version=asked)
                assert result.as_numpy("labels")[0][0].decode() == label, asked
    finally:
        http.close()
        grpc.close()


def test_the_handlers_thread_budget_is_the_containers_cpu_quota(running: tuple[Container, dict[str, int]]) -> None:
    box, _ = running
    lines = budget_lines(box)
    assert lines, "no worker logged its CPU budget"
    assert all("a budget of 1 CPUs (cgroup CPU quota 1 CPUs" in line for line in lines), lines


def test_the_container_runs_as_its_user_on_a_read_only_root(running: tuple[Container, dict[str, int]]) -> None:
    box, _ = running
    for pid in box.pids():
        status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        assert status["Uid"].split()[:2] == ["1000", "1000"], (pid, status["Uid"])
        assert status["NoNewPrivs"].strip() == "1"
        assert status["CapEff"].strip() == "0000000000000000"
    mounts = {line.split()[4]: line for line in Path(f"/proc/{box.init_pid}/mountinfo").read_text().splitlines()}
    assert mounts["/"].split()[5].startswith("ro"), mounts["/"]
    for path in EMPTYDIRS:
        assert mounts[path].split()[5].startswith("rw"), mounts[path]
        assert " - tmpfs " in mounts[path], mounts[path]
    assert mounts[f"{HOME}/config"].split()[5].startswith("ro")


def test_sigterm_turns_readiness_false_and_drains_within_the_grace(
    built: Built, running: tuple[Container, dict[str, int]]
) -> None:
    box, ports = running
    grace = pod_timing(built.record)["grace_s"]
    box.terminate()
    signalled = time.monotonic()
    probes: list[tuple[float, int | None]] = []
    while box.process.poll() is None and time.monotonic() - signalled < grace:
        try:
            status = requests.get(url(ports, "oip_health", "/v2/health/ready"), timeout=2).status_code
        except requests.RequestException:
            status = None
        probes.append((time.monotonic() - signalled, status))
        time.sleep(0.05)
    code = box.wait(timeout=max(0.1, grace - (time.monotonic() - signalled)))
    print(f"\nSIGTERM -> exit {code} in {time.monotonic() - signalled:.1f} s")
    assert code == 0, box.log()
    answers = [(at, status) for at, status in probes if status is not None]
    not_ready = [at for at, status in answers if status != 200]
    assert not_ready, f"readiness never said not-ready before the listener went away: {probes[:20]}"
    assert all(at < NOT_READY_WITHIN_S for at, status in answers if status == 200), answers[:20]
    assert box.pids() == []  # pid 1 exited: nothing of the container is left


# ------------------------------------------------------------------------------------------ models outside
def test_a_mounted_store_that_is_not_the_pinned_bundle_is_refused(built: Built, tmp_path: Path) -> None:
    ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES)), strict=True))
    models = configured_folder(tmp_path / "models", built.bundle, ports, store=True)
    box = container(built, "sk-test-refused", tmp_path / "state", 1.0, ports, models=models)
    archive = models / "model-store" / "digits_v2.0.mar"
    archive.write_bytes(archive.read_bytes() + b"\0")  # changed after the manifest: a corrupt copy
    try:
        box.start()
        code = box.wait(timeout=120)
    finally:
        box.kill()
    lines = box.log().splitlines()
    assert code == REFUSED_EXIT, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("model_source: error: refusing to serve /mnt/models: "), lines
    assert "digits_v2.0.mar" in lines[0]


# ------------------------------------------------------------------------------------------ rolling update
def test_rolling_update_of_two_containers_under_load_fails_no_request(
    built: Built, tmp_path: Path, model_store: Path
) -> None:
    """digits 1.0 (quota 1 CPU) replaced by 2.0 (quota 2 CPUs): one image, two mounted stores, nginx in front."""
    hey = shutil.which("hey")
    assert hey is not None, "the load generator 'hey' is not installed: `make tools` installs it"
    bundles = {v: tmp_path / f"bundle-{v}" for v in ("1.0", "2.0")}
    for version, bundle in bundles.items():
        make_bundle(bundle, model_store, "--models", f"digits:{version}", "--image", IMAGE)
    timing = pod_timing(built.record)
    service = ServiceStandIn(tmp_path / "service", port=free_ports(1)[0])
    endpoint = service.url("/predictions/digits")
    boxes: dict[str, tuple[Container, dict[str, int]]] = {}
    load: subprocess.Popen | None = None
    sampler = VersionSampler(endpoint)
    first_new = only_new = time.monotonic()

    def start(version: str, cpus: float) -> tuple[Container, dict[str, int]]:
        ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES)), strict=True))
        models = configured_folder(tmp_path / f"models-{version}", bundles[version], ports, store=True)
        box = container(built, f"sk-test-{version}", tmp_path / f"state-{version}", cpus, ports, models=models)
        boxes[version] = (box, ports)
        box.start()
        took = wait_ready(box, url(ports, "oip_health", "/v2/health/ready"), START_BUDGET_S)
        print(f"\ncontainer digits {version} (quota {cpus:g} CPU) ready in {took:.1f} s", flush=True)
        return box, ports

    try:
        old, old_ports = start("1.0", 1.0)
        service.start([f"127.0.0.1:{old_ports['http']}"])
        assert answering_versions(endpoint, 4) == Counter({"1.0": 4})
        load = start_hey(hey, endpoint)
        sampler.start()
        time.sleep(SETTLE_S)
        new, new_ports = start("2.0", 2.0)  # readiness gating: not in the Service before it is ready
        first_new = time.monotonic()
        service.route_to([f"127.0.0.1:{old_ports['http']}", f"127.0.0.1:{new_ports['http']}"])
        service.route_to([f"127.0.0.1:{new_ports['http']}"])  # returns once no old nginx worker is left
        only_new = time.monotonic()
        time.sleep(timing["prestop_s"])
        old.terminate()
        code = old.wait(timeout=timing["grace_s"] - timing["prestop_s"])
        assert code == 0, old.log()
        budgets = {version: budget_lines(box) for version, (box, _) in boxes.items() if version == "2.0"}
        time.sleep(SETTLE_S)
        assert load.poll() is None, "the load ended before the update did"
        output, errors_text = stop_load(load)
        sampler.stop()
        after = answering_versions(endpoint, 4)
    finally:
        end_load(load, sampler)
        for box, _ in boxes.values():
            with contextlib.suppress(Exception):
                box.kill()
        service.stop()

    statuses, errors = hey_report(output)
    total = sum(statuses.values()) + sum(errors.values())
    versions = [answer for _, status, answer in sampler.samples if status == 200]
    print(f"rolling update of two containers: {total} requests, status codes {dict(statuses)}, "
          f"errors {dict(errors)}; sampler versions {dict(Counter(versions))}")  # fmt: skip
    assert errors == Counter(), f"transport errors under load: {dict(errors)}; {errors_text[-500:]}"
    assert set(statuses) == {200}, dict(statuses)
    assert total >= 10 * CONCURRENCY, f"too little load to mean anything: {total} requests"
    assert not [s for s in sampler.samples if s[1] != 200], [s for s in sampler.samples if s[1] != 200][:5]
    assert {a for at, _, a in sampler.samples if at < first_new} == {"1.0"}
    assert {a for at, _, a in sampler.samples if at > only_new} == {"2.0"}
    assert after == Counter({"2.0": 4})
    assert budgets["2.0"], "the 2.0 container's workers logged no CPU budget"
    assert all("a budget of 2 CPUs" in line for line in budgets["2.0"]), budgets
    print(f"thread budget under quota 2: {budgets['2.0'][-1]}")
    assert json.loads((bundles["2.0"] / "bundle.json").read_text())["image"] == IMAGE  # same image, new version
