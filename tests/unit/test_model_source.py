"""Models outside the image (servekit.deploy.model_source): the check before serving, and the mounted forms.

The check runs on a bundle-shaped folder written here (config/config.properties with a model_snapshot,
model-store/ with two archives and their manifest); the pod entrypoint is run as a subprocess, as the
container runs it, so its exit status and its one line on stderr are what a user sees.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from servekit.deploy.model_source import (
    MODELS_MOUNT,
    REFUSED_EXIT,
    ModelSourceError,
    bundle_digest,
    check_models,
    models_folder,
    mount_models_deployment,
    mount_models_inferenceservice,
    mounted_command,
)
from servekit.serving.store import file_sha256

pytestmark = pytest.mark.unit

ENTRYPOINT = [
    "python", "-m", "servekit.serving.server", "run", "--config", "/home/model-server/config/config.properties",
    "--model-store", "/home/model-server/model-store", "--bind", "0.0.0.0",
]  # fmt: skip


def write_bundle_folder(root: Path, versions: tuple[str, ...] = ("1.0", "2.0")) -> str:
    """config/ and model-store/ as `servekit bundle` writes them; returns their bundle digest."""
    (root / "model-store").mkdir(parents=True)
    (root / "config").mkdir()
    archives, snapshot = {}, {}
    for version in versions:
        name = f"digits_v{version}.mar"
        (root / "model-store" / name).write_bytes(f"archive {version}".encode() * 100)
        archives[name] = {"model": "digits", "version": version, "sha256": file_sha256(root / "model-store" / name)}
        snapshot[version] = {"defaultVersion": version == versions[-1], "marName": name}
    manifest = {"format": 1, "archives": archives}
    (root / "model-store" / "manifest.json").write_text(json.dumps(manifest))
    models = {"name": "startup.cfg", "modelCount": len(versions), "models": {"digits": snapshot}}
    config = f"model_store=/home/model-server/model-store\nmodel_snapshot={json.dumps(models)}\n"
    (root / "config" / "config.properties").write_text(config)
    return bundle_digest(config, {name: entry["sha256"] for name, entry in archives.items()})


def run_pod_entrypoint(root: Path, digest: str, *command: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "servekit.deploy.model_source", "check-and-run", "--models", str(root),
            "--bundle-sha256", digest, "--", *command]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_a_matching_folder_passes_and_the_command_replaces_the_check(tmp_path: Path) -> None:
    digest = write_bundle_folder(tmp_path)
    assert [p.name for p in check_models(tmp_path, digest)] == ["digits_v1.0.mar", "digits_v2.0.mar"]
    result = run_pod_entrypoint(tmp_path, digest, sys.executable, "-c", "import os; print('serving as', os.getpid())")
    assert result.returncode == 0, result.stderr
    checked, serving = result.stdout.splitlines()
    assert checked == f"models checked: {tmp_path} is bundle {digest[:12]}"
    assert serving.startswith("serving as ")  # exec: the same process, so SIGTERM still reaches the launcher


def test_a_changed_archive_is_refused_in_one_line(tmp_path: Path) -> None:
    digest = write_bundle_folder(tmp_path)
    archive = tmp_path / "model-store" / "digits_v2.0.mar"
    archive.write_bytes(archive.read_bytes()[:-1] + b"X")  # one byte differs, the manifest is unchanged
    with pytest.raises(ModelSourceError, match=r"digits_v2\.0\.mar"):
        check_models(tmp_path, digest)
    result = run_pod_entrypoint(tmp_path, digest, sys.executable, "-c", "print('served anyway')")
    assert result.returncode == REFUSED_EXIT
    assert result.stdout == ""  # never ran the server
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"model_source: error: refusing to serve {tmp_path}: ")
    assert "digits_v2.0.mar" in line, line
    assert "sha256" in line, line


def test_a_consistent_folder_of_another_bundle_is_refused(tmp_path: Path) -> None:
    """Archive and manifest changed together (another build): the store alone is consistent, the pin is not."""
    pinned = write_bundle_folder(tmp_path / "pinned")
    write_bundle_folder(tmp_path / "other", versions=("1.0",))
    with pytest.raises(ModelSourceError, match=f"the pod was given bundle {pinned[:12]}"):
        check_models(tmp_path / "other", pinned)
    result = run_pod_entrypoint(tmp_path / "other", pinned, "true")
    assert result.returncode == REFUSED_EXIT
    assert len(result.stderr.splitlines()) == 1


def test_a_missing_archive_or_layout_is_refused(tmp_path: Path) -> None:
    digest = write_bundle_folder(tmp_path / "models")
    (tmp_path / "models" / "model-store" / "digits_v1.0.mar").unlink()
    with pytest.raises(ModelSourceError, match=r"no archive digits_v1\.0\.mar"):
        check_models(tmp_path / "models", digest)
    (tmp_path / "empty").mkdir()
    result = run_pod_entrypoint(tmp_path / "empty", digest, "true")
    assert (result.returncode, result.stderr.count("\n")) == (REFUSED_EXIT, 1)
    assert "must hold config/config.properties and model-store/manifest.json" in result.stderr


def test_the_entrypoint_needs_its_arguments() -> None:
    result = subprocess.run([sys.executable, "-m", "servekit.deploy.model_source", "check-and-run"],
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("model_source: error: usage: python -m servekit.deploy.model_source")


def test_the_mounted_command_reads_config_and_archives_from_the_mount() -> None:
    command = mounted_command(ENTRYPOINT, "ab" * 32)
    split = command.index("--")
    assert command[:split] == ["python", "-m", "servekit.deploy.model_source", "check-and-run",
                               "--models", MODELS_MOUNT, "--bundle-sha256", "ab" * 32]  # fmt: skip
    launcher = command[split + 1 :]
    assert launcher[launcher.index("--config") + 1] == "/mnt/models/config/config.properties"
    assert launcher[launcher.index("--model-store") + 1] == "/mnt/models/model-store"
    assert [a for a in launcher if not a.startswith("/")] == [a for a in ENTRYPOINT if not a.startswith("/")]


def test_the_mounted_forms_change_only_the_command_and_the_models_volume() -> None:
    record = {"bundle_sha256": "cd" * 32, "servekit_version": "0.1.0"}
    container = {"name": "servekit", "command": list(ENTRYPOINT), "volumeMounts": [{"name": "work"}], "env": []}
    pod = {"containers": [container], "volumes": [{"name": "work"}]}
    deployment = {"kind": "Deployment", "metadata": {"name": "servekit"}, "spec": {"template": {"spec": pod}}}
    documents = [deployment, {"kind": "Service", "metadata": {"name": "servekit"}}]
    mounted = mount_models_deployment(documents, record)
    assert documents[0]["spec"]["template"]["spec"]["containers"][0]["command"] == ENTRYPOINT  # not changed in place
    assert mounted[1] == documents[1]
    pod = mounted[0]["spec"]["template"]["spec"]
    assert pod["volumes"][-1] == {"name": "models", "persistentVolumeClaim": {"claimName": "servekit-models",
                                                                              "readOnly": True}}  # fmt: skip
    assert pod["containers"][0]["volumeMounts"][-1] == {"name": "models", "mountPath": "/mnt/models",
                                                        "subPath": "0.1.0-cdcdcdcdcdcd", "readOnly": True}  # fmt: skip
    assert pod["containers"][0]["command"] == mounted_command(ENTRYPOINT, record["bundle_sha256"])

    predictor = {"containers": [{"name": "kserve-container", "command": list(ENTRYPOINT),
                                 "env": [{"name": "PROTOCOL", "value": "v2"}]}]}  # fmt: skip
    service = mount_models_inferenceservice({"metadata": {}, "spec": {"predictor": predictor}}, record)
    (kserve,) = service["spec"]["predictor"]["containers"]
    assert kserve["env"] == [{"name": "PROTOCOL", "value": "v2"},
                             {"name": "STORAGE_URI", "value": "pvc://servekit-models/0.1.0-cdcdcdcdcdcd"}]  # fmt: skip
    assert kserve["command"] == mounted_command(ENTRYPOINT, record["bundle_sha256"])
    assert service["metadata"]["annotations"]["servekit.io/models"] == "servekit-models/0.1.0-cdcdcdcdcdcd"


# ------------------------------------------------------------------------------------------ written by servekit bundle
@pytest.fixture(scope="module")
def written(model_store: Path, tmp_path_factory: pytest.TempPathFactory):
    from servekit.deploy.bundle import BundleOptions, write_bundle

    out = tmp_path_factory.mktemp("bundle") / "bundle"
    options = BundleOptions.from_cli(models=["digits:1.0,2.0"], image="registry.example.com/servekit:0.1.0", out=out)
    return write_bundle(options, store=model_store, state_file=out.parent / "no-state.json")


def test_a_written_bundle_folder_is_what_its_record_pins(written) -> None:
    """config/ and model-store/ as servekit bundle writes them pass the pod's check with bundle.json's digest."""
    paths = check_models(written.path, written.record["bundle_sha256"])
    assert sorted(p.name for p in paths) == sorted(written.record["archives"])


@pytest.mark.parametrize("version", ["1.30.0", "1.33.0"])
def test_the_mounted_deployment_validates_strictly(written, version: str) -> None:
    import jsonschema
    import kubernetes_validate
    import yaml

    from tests.unit.test_bundle import strict_schema
    from tests.unit.test_cluster_manifests import SCHEMAS

    documents = list(yaml.safe_load_all((written.path / "k8s" / "servekit-models-volume.yaml").read_text()))
    baked = list(yaml.safe_load_all((written.path / "k8s" / "servekit.yaml").read_text()))
    assert [d["kind"] for d in documents] == [d["kind"] for d in baked]
    for document in documents:
        if document["kind"] in SCHEMAS:  # a CRD (the KEDA ScaledObject): its vendored schema, strictly
            validator = jsonschema.Draft4Validator(strict_schema(json.loads(SCHEMAS[document["kind"]].read_text())))
            assert not list(validator.iter_errors(document)), document["kind"]
        else:
            assert kubernetes_validate.validate(document, version, strict=True) == version.rsplit(".", 1)[0]
    (container,) = documents[0]["spec"]["template"]["spec"]["containers"]
    assert container["command"][:4] == ["python", "-m", "servekit.deploy.model_source", "check-and-run"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_storage_uri_inferenceservice_validates_against_kserves_crd(written) -> None:
    import jsonschema
    import yaml

    from tests.unit.test_bundle import KSERVE_SCHEMA, strict_schema

    validator = jsonschema.Draft4Validator(strict_schema(json.loads(KSERVE_SCHEMA.read_text())))
    (document,) = yaml.safe_load_all((written.path / "kserve" / "inferenceservice-models-volume.yaml").read_text())
    assert [e.message for e in validator.iter_errors(document)] == []
    (container,) = document["spec"]["predictor"]["containers"]
    assert {"name": "STORAGE_URI", "value": f"pvc://servekit-models/{models_folder(written.record)}"} in container[
        "env"
    ]
