"""Models outside the image: the pod serves a bundle's ``config/`` and ``model-store/`` from a mounted folder.

A new model version then needs no new image: copy the new bundle's ``config/`` and ``model-store/``
to the models volume under a new folder and apply the new manifests, which name that folder and
pin its digest. Two mounted forms are written beside the image-baked ones (which stay the default):

* plain Kubernetes (``k8s/servekit-models-volume.yaml``): the Deployment mounts the
  PersistentVolumeClaim ``servekit-models`` read-only at ``/mnt/models`` (its ``subPath`` is the
  bundle's folder);
* KServe (``kserve/inferenceservice-models-volume.yaml``): ``STORAGE_URI`` on the custom predictor
  container (``pvc://servekit-models/FOLDER``, or any URI KServe's storage initializer reads: s3://,
  gs://, https://), which puts the folder at ``/mnt/models``.

Before serving, the pod checks what it was given (``python -m servekit.deploy.model_source check-and-run``,
the mounted forms' entrypoint, which then becomes the usual launcher by ``exec``, keeping its pid):

1. every archive the configuration loads is in ``model-store/manifest.json`` with that sha256;
2. the configuration and the archives' sha256 are the bundle the manifests pin (``--bundle-sha256``,
   bundle.json's ``bundle_sha256``): a folder from another bundle is refused, not served.

Any mismatch: one line on stderr and exit status 3, so the pod never becomes ready on the wrong bytes.

    documents = mount_models_deployment(render_kubernetes(record), record)
    inference_service = mount_models_inferenceservice(render_inferenceservice(record), record)
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
from pathlib import Path

from servekit.errors import ServekitError, one_line
from servekit.serving.server import read_properties, snapshot_archives
from servekit.serving.store import MANIFEST_NAME, IntegrityError, read_manifest, verify_store

__all__ = ["ModelSourceError", "bundle_digest", "check_models", "mount_models_deployment"]

MODELS_MOUNT = "/mnt/models"  # KServe's storage initializer writes here (DefaultModelLocalMountPath)
MODELS_CLAIM = "servekit-models"
MODELS_VOLUME = "models"
CONFIG_PATH = "config/config.properties"
STORE_PATH = "model-store"
KSERVE_CONTAINER = "kserve-container"
REFUSED_EXIT = 3
MODULE = "servekit.deploy.model_source"  # what the mounted forms run (python -m)


class ModelSourceError(ServekitError):
    """The mounted models are not the bundle the pod was given; the message says what differs."""

    exit_code = REFUSED_EXIT


def bundle_digest(config_text: str, archives: dict[str, str]) -> str:
    """The bundle's identity: sha256 of its config.properties and of each archive's name and sha256."""
    digest = hashlib.sha256(config_text.encode())
    for name in sorted(archives):
        digest.update(f"{name}={archives[name]}\n".encode())
    return digest.hexdigest()


def models_folder(record: dict) -> str:
    """The folder on the models volume that holds this bundle's ``config/`` and ``model-store/``."""
    return f"{record['servekit_version']}-{record['bundle_sha256'][:12]}"


def check_models(root: Path, bundle_sha256: str) -> list[Path]:
    """Verify ``root`` (a bundle's config/ and model-store/); the archives to serve, or a ``ModelSourceError``."""
    config, store = root / CONFIG_PATH, root / STORE_PATH
    if not config.is_file() or not (store / MANIFEST_NAME).is_file():
        raise ModelSourceError(
            f"refusing to serve {root}: it must hold {CONFIG_PATH} and {STORE_PATH}/{MANIFEST_NAME} "
            "(a bundle's config/ and model-store/ folders)"
        )
    props = read_properties(config)
    try:
        names = snapshot_archives(json.loads(props.get("model_snapshot", "{}")))
    except json.JSONDecodeError as exc:
        raise ModelSourceError(f"refusing to serve {root}: {config} has no readable model_snapshot ({exc})") from None
    if not names:
        raise ModelSourceError(f"refusing to serve {root}: {config} loads no model")
    try:
        paths = verify_store(store, names)
        manifest = read_manifest(store)
    except IntegrityError as exc:
        raise ModelSourceError(f"refusing to serve {root}: {exc}") from None
    archives = {name: str(record.get("sha256")) for name, record in manifest["archives"].items()}
    actual = bundle_digest(config.read_text(), archives)
    if actual != bundle_sha256:
        raise ModelSourceError(
            f"refusing to serve {root}: it holds bundle {actual[:12]}, the pod was given bundle {bundle_sha256[:12]} "
            "(copy that bundle's config/ and model-store/ there, or apply the manifests of the bundle it holds)"
        )
    return paths


# ------------------------------------------------------------------------------------------ manifests
def mounted_command(entrypoint: list[str], bundle_sha256: str, root: str = MODELS_MOUNT) -> list[str]:
    """The image's entrypoint behind the check, reading its configuration and archives from ``root``."""
    command = list(entrypoint)
    for flag, path in (("--config", CONFIG_PATH), ("--model-store", STORE_PATH)):
        command[command.index(flag) + 1] = f"{root}/{path}"
    return [
        command[0], "-m", MODULE, "check-and-run", "--models", root, "--bundle-sha256", bundle_sha256,
        "--", *command,
    ]  # fmt: skip


def _annotated(documents: list[dict], record: dict) -> None:
    for document in documents:
        document.setdefault("metadata", {}).setdefault("annotations", {})["servekit.io/models"] = (
            f"{MODELS_CLAIM}/{models_folder(record)}"
        )


def mount_models_deployment(documents: list[dict], record: dict) -> list[dict]:
    """render_kubernetes's documents with the Deployment serving the models volume instead of the image's store."""
    documents = copy.deepcopy(documents)
    deployment = next(d for d in documents if d.get("kind") == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    container["command"] = mounted_command(container["command"], record["bundle_sha256"])
    container["volumeMounts"].append(
        {"name": MODELS_VOLUME, "mountPath": MODELS_MOUNT, "subPath": models_folder(record), "readOnly": True}
    )
    claim = {"claimName": MODELS_CLAIM, "readOnly": True}
    pod["volumes"].append({"name": MODELS_VOLUME, "persistentVolumeClaim": claim})
    _annotated([deployment], record)
    return documents


def mount_models_inferenceservice(document: dict, record: dict, storage_uri: str | None = None) -> dict:
    """render_inferenceservice's document with KServe's storage initializer putting the models at /mnt/models."""
    document = copy.deepcopy(document)
    container = next(c for c in document["spec"]["predictor"]["containers"] if c["name"] == KSERVE_CONTAINER)
    container["command"] = mounted_command(container["command"], record["bundle_sha256"])
    uri = storage_uri or f"pvc://{MODELS_CLAIM}/{models_folder(record)}"
    container["env"] = [*container["env"], {"name": "STORAGE_URI", "value": uri}]
    _annotated([document], record)
    return document


# ------------------------------------------------------------------------------------------ the pod's entrypoint
USAGE = f"usage: python -m {MODULE} check-and-run --models DIR --bundle-sha256 SHA -- COMMAND..."


def main(argv: list[str] | None = None) -> int:
    """``check-and-run --models DIR --bundle-sha256 SHA -- COMMAND...``: check, then exec COMMAND."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print(f"model_source: error: {USAGE}", file=sys.stderr)
        return 2
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1 :]
    pairs = dict(zip(options[1::2], options[2::2], strict=False))
    if options[:1] != ["check-and-run"] or set(pairs) != {"--models", "--bundle-sha256"} or not command:
        print(f"model_source: error: {USAGE}", file=sys.stderr)
        return 2
    try:
        check_models(Path(pairs["--models"]), pairs["--bundle-sha256"])
    except ServekitError as exc:
        print(f"model_source: error: {one_line(exc, 600)}", file=sys.stderr)
        return exc.exit_code
    print(f"models checked: {pairs['--models']} is bundle {pairs['--bundle-sha256'][:12]}", flush=True)
    os.execvp(command[0], command)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
