"""make image's pieces that need no build (servekit.deploy.image): pip settings, the archive's layers, the report."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from servekit.deploy.image import PYPI, Layer, PipSettings, archive_layers, format_layers, local_pip, short_step

pytestmark = pytest.mark.unit


def test_local_pip_passes_this_machines_indexes_and_mounts_their_folders(tmp_path: Path) -> None:
    index = tmp_path / "pypi" / "simple"
    index.mkdir(parents=True)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    cert = tmp_path / "ca.crt"
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    config = {"extra-index-url": f"file://{index}", "find-links": str(wheels)}
    settings = local_pip(config, environ={"PIP_CERT": str(cert)})
    assert settings == PipSettings(PYPI, (f"file://{index}",), (str(wheels),), str(cert))
    assert settings.build_args() == {
        "TORCH_INDEX_URL": PYPI,
        "PIP_EXTRA_INDEX_URL": f"file://{index}",
        "PIP_FIND_LINKS": str(wheels),
        "PIP_CERT": str(cert),
    }
    # an index's wheels sit beside its simple/ folder: its parent is mounted; remote URLs mount nothing
    assert settings.mounts() == [f"{index.parent}:{index.parent}:ro", f"{wheels}:{wheels}:ro", f"{cert}:{cert}:ro"]


def test_without_local_settings_the_dockerfile_defaults_stand() -> None:
    settings = local_pip({}, environ={})
    assert settings.build_args() == {"TORCH_INDEX_URL": PYPI}
    assert settings.mounts() == []
    assert PipSettings().build_args() == {}  # a user's build: the CPU-only index and PyPI, nothing mounted


def test_short_step_names_the_dockerfile_step() -> None:
    assert short_step("|2 PIP_CERT=/x TORCH_INDEX_URL=y /bin/sh -c apt-get update") == "apt-get update"
    assert short_step("/bin/sh -c #(nop) COPY dir:abc in /opt/src ") == "COPY dir:abc in /opt/src"
    assert short_step("x" * 100, width=10) == "xxxxxxx..."


def write_oci_archive(path: Path, layers: list[bytes]) -> list[str]:
    """A minimal OCI image layout in a tar: gzip layers, a config with history, a manifest, an index."""
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return digest

    packed = [gzip.compress(data) for data in layers]
    history = [{"created_by": f"/bin/sh -c step {i}"} for i in range(len(layers))]
    history.insert(1, {"created_by": "/bin/sh -c #(nop) ENV A=1", "empty_layer": True})
    config = blob(json.dumps({"history": history}).encode())
    manifest = {
        "config": {"digest": config},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": blob(p), "size": len(p)}
            for p in packed
        ],
    }
    index = {"manifests": [{"digest": blob(json.dumps(manifest).encode())}]}
    with tarfile.open(path, "w") as archive:
        for name, data in [("index.json", json.dumps(index).encode())] + [
            (f"blobs/sha256/{d.split(':')[1]}", b) for d, b in blobs.items()
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return [f"step {i}" for i in range(len(layers))]


def test_archive_layers_reads_each_layers_step_and_both_sizes(tmp_path: Path) -> None:
    layers = [b"a" * 50_000, bytes(range(256)) * 40]
    steps = write_oci_archive(tmp_path / "image.oci.tar", layers)
    found = archive_layers(tmp_path / "image.oci.tar")
    assert [(short_step(layer.created_by), layer.size) for layer in found] == list(zip(steps, map(len, layers)))
    assert all(0 < layer.compressed < layer.size for layer in found)
    report = format_layers(found)
    assert report.splitlines()[-1].endswith("total (2 layers)")
    assert "step 1" in report


def test_format_layers_shows_no_compressed_size_before_an_export() -> None:
    report = format_layers([Layer("/bin/sh -c true", 0, 2_000_000)])
    assert report.splitlines()[1].split()[:3] == ["2", "MB", "-"]


def test_make_image_without_a_bundle_fails_in_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "servekit.deploy.image", "--bundle", str(tmp_path / "none"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert (
        result.stderr == f"image: error: {tmp_path / 'none'} is not a bundle (no bundle.json): make bundle writes one\n"
    )
