"""The model store and its manifest: archive names, sha256 records and integrity checks.

Pure Python (no torch): the server launcher and the operator CLI use it to check archives before
anything loads them. ``build.py`` writes the manifest; everything else only reads it.

    <store>/<name>_v<version>.mar     immutable archives built by ``make archive``
    <store>/manifest.json             {"format": 1, "archives": {"<archive>": {"sha256": ..., ...}}}
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from servekit.errors import ServekitError

MANIFEST_NAME = "manifest.json"
# "\Z", not "$": "$" also matches before a trailing newline.
NAME_PATTERN = r"[A-Za-z][A-Za-z0-9_-]{0,63}"
VERSION_PATTERN = r"\d{1,9}(?:\.\d{1,9}){0,2}"  # at most 29 characters: no version is unbounded
NAME_RE = re.compile(rf"^{NAME_PATTERN}\Z")
VERSION_RE = re.compile(rf"^{VERSION_PATTERN}\Z")


def version_key(version: str) -> tuple[int, ...]:
    """Versions in numeric order: 1.10 after 1.9."""
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def archive_pattern(name: str = NAME_PATTERN, version: str = VERSION_PATTERN) -> str:
    """The regex of an archive name, ``<name>_v<version>.mar`` (the guard's nginx uses it too)."""
    return rf"{name}_v{version}\.mar"


ARCHIVE_PATTERN = archive_pattern()
ARCHIVE_RE = re.compile(rf"^{archive_pattern(f'(?P<name>{NAME_PATTERN})', f'(?P<version>{VERSION_PATTERN})')}\Z")


class IntegrityError(ServekitError):
    """An archive is missing, unrecorded, or differs from the manifest; the message says which."""


def archive_name(model: str, version: str) -> str:
    """The one place an archive's file name is made: ``digits_v2.0.mar``."""
    return f"{model}_v{version}.mar"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(store: Path) -> dict:
    path = Path(store) / MANIFEST_NAME
    if not path.is_file():
        return {"format": 1, "archives": {}}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"cannot read {path}: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("archives"), dict):
        raise IntegrityError(f"{path} is not a servekit manifest (no 'archives' object)")
    return manifest


def write_manifest(store: Path, manifest: dict) -> None:
    path = Path(store) / MANIFEST_NAME
    tmp = path.with_name(f".{MANIFEST_NAME}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def verify_archive(store: Path, name: str, manifest: dict | None = None) -> Path:
    """``store/name`` if it is a bare archive name, recorded in the manifest, with the recorded sha256."""
    if not ARCHIVE_RE.match(name):
        raise IntegrityError(f"{name!r} is not an archive name of the form <model>_v<version>.mar")
    store = Path(store)
    path = store / name
    if not path.is_file():
        raise IntegrityError(f"no archive {name} in {store} (run make archive)")
    record = (manifest if manifest is not None else read_manifest(store))["archives"].get(name)
    if record is None:
        raise IntegrityError(f"{name} is not in {store / MANIFEST_NAME}: refusing an archive that was not built here")
    actual = file_sha256(path)
    if actual != record.get("sha256"):
        raise IntegrityError(
            f"sha256 mismatch for {name}: manifest {str(record.get('sha256'))[:16]}..., file {actual[:16]}...; "
            "the archive was modified after it was built"
        )
    return path


def verify_store(store: Path, names: list[str]) -> list[Path]:
    """Verify every archive in ``names``; one error listing every failure."""
    manifest = read_manifest(store)
    paths, problems = [], []
    for name in names:
        try:
            paths.append(verify_archive(store, name, manifest))
        except IntegrityError as exc:
            problems.append(str(exc))
    if problems:
        raise IntegrityError("; ".join(problems))
    return paths
