"""``make image``: the bundle's Dockerfile built for real, without a daemon, and exported as an OCI archive.

    base.tar   mmdebstrap --variant=minbase bookworm, with python3 and python3-venv (Debian's packages only)
    base image buildah from scratch + add base.tar: a local image, since no registry serves base images here
    the image  buildah bud --isolation chroot on that base (BASE_IMAGE), torch from this machine's wheel cache
               (its pip settings as build arguments, the folders they name bind-mounted read-only into the build)
    export     buildah push IMAGE oci-archive:FILE, then every layer's size read back from the archive itself

Workflow::

    buildah = Buildah()                                   # the system's storage; tests pass a private root
    base = make_base(buildah, Path("build/image/base.tar"))
    build_image(buildah, Path("bundle"), "servekit:0.1.0", base=base, pip=local_pip())
    export_archive(buildah, "servekit:0.1.0", Path("build/image/servekit.oci.tar"))
    print(format_layers(archive_layers(Path("build/image/servekit.oci.tar"))))

Users keep the Dockerfile's defaults (the public python slim base, PyTorch's CPU-only index); this
module is how this project builds the same Dockerfile on a machine that has neither.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from servekit.errors import ServekitError, one_line
from servekit.serving.server import REPO_ROOT

__all__ = ["Buildah", "ImageError", "Layer", "PipSettings", "archive_layers", "build_image", "make_base"]

SUITE = "bookworm"  # the slim base's Debian
BASE_PACKAGES = ("python3", "python3-venv")  # what the Dockerfile needs of a base: python3 with venv (and ensurepip)
BASE_NAME = "localhost/servekit-base:bookworm"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # a tarball carries no image config
# The sandbox refuses raising RLIMIT_NPROC, so the build's limits are set explicitly (TORCHSERVE_NOTES.md).
ULIMITS = ("nofile=20000:20000", "nproc=1000:1000")
BUILD_TIMEOUT_S = 3600  # wall time: a paused or busy machine stretches every step
PYPI = "https://pypi.org/simple"  # pip's default index
STORAGE_ROOT = "/var/lib/containers/storage"  # buildah's as root, unless --root
# The image built here (torch 2.14.1 from the wheel cache: a CUDA build, 4.3 GB of it nvidia and triton) must stay
# under this, unpacked; tests/integration/test_container.py holds it to it. Measured: docs/kubernetes.md.
SIZE_BUDGET_BYTES = 7_500_000_000


class ImageError(ServekitError):
    """Building, importing or exporting the image failed; the message names the step and its last output."""


# ------------------------------------------------------------------------------------------ buildah
@dataclass(frozen=True)
class Buildah:
    """``buildah`` on the system's storage, or on a private one (``root``/``runroot``: tests, parallel runs)."""

    root: Path | None = None
    runroot: Path | None = None

    def argv(self, *args: str) -> list[str]:
        storage = []
        if self.root is not None:
            storage += ["--root", str(self.root)]
        if self.runroot is not None:
            storage += ["--runroot", str(self.runroot)]
        return ["buildah", *storage, *args]

    def run(self, *args: str, timeout: float = 300, log: Path | None = None) -> str:
        """Run one buildah command; its stdout, or an ``ImageError`` with the end of its output."""
        return run_step(self.argv(*args), timeout=timeout, log=log)

    def exists(self, image: str) -> bool:
        result = subprocess.run(
            self.argv("inspect", "--type", "image", image), capture_output=True, text=True, check=False
        )
        return result.returncode == 0

    def config(self, image: str) -> dict:
        """The image's OCI configuration (``config``: Env, Entrypoint, User, WorkingDir, ...)."""
        return json.loads(self.run("inspect", "--type", "image", image))["OCIv1"]


def run_step(argv: list[str], timeout: float, log: Path | None = None) -> str:
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            out.write(f"\n$ {' '.join(argv)}\n".encode())
            out.flush()
            result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False)
        if result.returncode != 0:
            tail = log.read_text(errors="replace")[-400:]
            raise ImageError(f"{argv[0]} {argv[1]} failed ({result.returncode}): {one_line(tail)} (log: {log})")
        return ""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise ImageError(f"{argv[0]} is not installed: make containers installs it") from None
    if result.returncode != 0:
        raise ImageError(f"{' '.join(argv[:3])} failed ({result.returncode}): {one_line(result.stderr[-400:])}")
    return result.stdout


# ------------------------------------------------------------------------------------------ the base
def make_base_tarball(tarball: Path, log: Path | None = None) -> Path:
    """A Debian base from Debian's packages (``mmdebstrap --variant=minbase``) with python3 and its venv module."""
    tarball.parent.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_name(tarball.name + ".partial")
    argv = [
        "mmdebstrap",
        "--variant=minbase",
        "--format=tar",
        "--include=" + ",".join(BASE_PACKAGES),
        SUITE,
        str(partial),
    ]
    try:
        run_step(argv, timeout=BUILD_TIMEOUT_S, log=log)
    except FileNotFoundError:
        raise ImageError("mmdebstrap is not installed: make containers installs it") from None
    partial.rename(tarball)
    return tarball


def import_base(buildah: Buildah, tarball: Path, name: str = BASE_NAME) -> str:
    """``tarball`` as the local image ``name`` (what ``podman import`` does), with a PATH."""
    container = buildah.run("from", "scratch").strip()
    try:
        buildah.run("add", container, str(tarball), "/", timeout=BUILD_TIMEOUT_S)
        buildah.run("config", "--env", f"PATH={BASE_PATH}", "--cmd", "/bin/bash", container)
        buildah.run("commit", "--quiet", container, name, timeout=BUILD_TIMEOUT_S)
    finally:
        subprocess.run(buildah.argv("rm", container), capture_output=True, check=False)
    return name


def make_base(buildah: Buildah, tarball: Path, name: str = BASE_NAME, log: Path | None = None) -> str:
    """The base image ``name``: kept if it exists, else imported from ``tarball`` (made first if missing)."""
    if buildah.exists(name):
        return name
    if not tarball.is_file():
        make_base_tarball(tarball, log=log)
    return import_base(buildah, tarball, name)


# ------------------------------------------------------------------------------------------ pip here
@dataclass(frozen=True)
class PipSettings:
    """Where the build's pip finds packages: the Dockerfile's build arguments and the folders they name."""

    torch_index_url: str | None = None  # None: the Dockerfile's default (PyTorch's CPU-only index)
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    cert: str | None = None

    def build_args(self) -> dict[str, str]:
        args = {}
        if self.torch_index_url:
            args["TORCH_INDEX_URL"] = self.torch_index_url
        if self.extra_index_urls:
            args["PIP_EXTRA_INDEX_URL"] = " ".join(self.extra_index_urls)
        if self.find_links:
            args["PIP_FIND_LINKS"] = " ".join(self.find_links)
        if self.cert:
            args["PIP_CERT"] = self.cert
        return args

    def mounts(self) -> list[str]:
        """Every local folder or file the settings name, bind-mounted read-only at the same path."""
        paths = []
        for location in (*self.extra_index_urls, *self.find_links, self.torch_index_url or "", self.cert or ""):
            path = location.removeprefix("file://") if location.startswith(("file://", "/")) else None
            if path and Path(path).exists():
                # an index's files sit beside its simple/ folder (../../files/...): mount the index's parent
                mounted = Path(path).parent if Path(path).name == "simple" else Path(path)
                if str(mounted) not in paths:
                    paths.append(str(mounted))
        return [f"{path}:{path}:ro" for path in paths]


def _pip_config() -> dict[str, str]:
    """``pip config list`` of this interpreter's pip: ``{"global.find-links": "/opt/wheels", ...}``."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    )
    settings = {}
    for line in result.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            settings[key.split(".", 1)[-1].strip()] = value.strip().strip("'\"")
    return settings


def local_pip(config: dict[str, str] | None = None, environ: dict[str, str] | None = None) -> PipSettings:
    """This machine's pip settings (its configuration files, then ``PIP_*``), as the build's pip gets them.

    torch's index is this pip's own (PyPI unless configured): torch's dependencies that the local
    indexes lack (``cuda-bindings`` here) come from it, while pip takes the wheels the local indexes
    and find-links hold (torch, the nvidia libraries) from disk, as it does for ``make venv``.
    """
    config = dict(_pip_config() if config is None else config)
    environ = dict(os.environ if environ is None else environ)
    for key in ("extra-index-url", "find-links", "cert", "index-url"):
        value = environ.get("PIP_" + key.upper().replace("-", "_"))
        if value:
            config[key] = value
    return PipSettings(
        torch_index_url=config.get("index-url", PYPI),
        extra_index_urls=tuple(config.get("extra-index-url", "").split()),
        find_links=tuple(config.get("find-links", "").split()),
        cert=config.get("cert"),
    )


# ------------------------------------------------------------------------------------------ building
def build_image(
    buildah: Buildah,
    bundle: Path,
    tag: str,
    base: str | None = None,
    pip: PipSettings | None = None,
    log: Path | None = None,
) -> float:
    """``buildah bud`` of ``bundle/Dockerfile`` as ``tag``; returns the seconds it took."""
    if not (bundle / "Dockerfile").is_file():
        raise ImageError(f"{bundle} has no Dockerfile: make bundle writes it")
    argv = ["bud", "--isolation", "chroot", "--layers", "-f", str(bundle / "Dockerfile"), "-t", tag]
    for limit in ULIMITS:
        argv += ["--ulimit", limit]
    args = (pip or PipSettings()).build_args()
    if base:
        args["BASE_IMAGE"] = base
    for key, value in args.items():
        argv += ["--build-arg", f"{key}={value}"]
    for mount in (pip or PipSettings()).mounts():
        argv += ["--volume", mount]
    started = time.monotonic()
    buildah.run(*argv, str(bundle), timeout=BUILD_TIMEOUT_S, log=log)
    return time.monotonic() - started


def export_archive(buildah: Buildah, image: str, archive: Path) -> Path:
    """``buildah push IMAGE oci-archive:FILE`` (gzip layers, as a registry stores them)."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    archive.unlink(missing_ok=True)
    buildah.run("push", "--quiet", image, f"oci-archive:{archive}", timeout=BUILD_TIMEOUT_S)
    return archive


# ------------------------------------------------------------------------------------------ sizes
@dataclass(frozen=True)
class Layer:
    """One layer of the exported image: the Dockerfile step that made it and its sizes in bytes."""

    created_by: str
    compressed: int  # the gzip blob in the archive (what a registry stores and a node pulls)
    size: int  # unpacked: the layer's tar stream
    digest: str = field(default="", compare=False)


def _blob(archive: tarfile.TarFile, digest: str) -> tarfile.ExFileObject:
    algorithm, _, value = digest.partition(":")
    handle = archive.extractfile(f"blobs/{algorithm}/{value}")
    if handle is None:
        raise ImageError(f"the archive has no blob {digest}")
    return handle


def _unpacked_size(handle) -> int:
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip framing
    size = 0
    while chunk := handle.read(1 << 20):
        size += len(inflate.decompress(chunk))
    return size + len(inflate.flush())


def archive_layers(path: Path) -> list[Layer]:
    """Every layer of the OCI archive at ``path``, oldest first, read from its manifest, config and blobs."""
    with tarfile.open(path) as archive:
        index = json.load(archive.extractfile("index.json"))
        manifest = json.load(_blob(archive, index["manifests"][0]["digest"]))
        config = json.load(_blob(archive, manifest["config"]["digest"]))
        steps = [h.get("created_by", "") for h in config.get("history", []) if not h.get("empty_layer")]
        if len(steps) != len(manifest["layers"]):
            steps = [""] * len(manifest["layers"])
        layers = []
        for step, entry in zip(steps, manifest["layers"], strict=True):
            gzipped = entry["mediaType"].endswith("gzip")
            size = _unpacked_size(_blob(archive, entry["digest"])) if gzipped else entry["size"]
            layers.append(Layer(step, entry["size"], size, entry["digest"]))
    return layers


def storage_layers(buildah: Buildah, image: str) -> list[Layer]:
    """Every layer of ``image`` as buildah stored it (unpacked sizes; no compressed size before an export)."""
    config = json.loads(buildah.run("inspect", "--type", "image", image))["OCIv1"]
    steps = [h.get("created_by", "") for h in config.get("history", []) if not h.get("empty_layer")]
    diff_ids = config["rootfs"]["diff_ids"]
    root = buildah.root or Path(STORAGE_ROOT)
    stored = json.loads((root / "overlay-layers" / "layers.json").read_text())
    sizes = {layer.get("diff-digest"): int(layer.get("diff-size", 0)) for layer in stored}
    if len(steps) != len(diff_ids):
        steps = [""] * len(diff_ids)
    missing = [digest for digest in diff_ids if digest not in sizes]
    if missing:
        raise ImageError(f"{image}: layer {missing[0]} is not in {root / 'overlay-layers' / 'layers.json'}")
    return [Layer(step, 0, sizes[digest], digest) for step, digest in zip(steps, diff_ids, strict=True)]


def short_step(created_by: str, width: int = 72) -> str:
    """``/bin/sh -c #(nop) COPY dir:... in /x`` -> ``COPY dir:... in /x``; ``RUN`` steps keep their command."""
    text = " ".join(created_by.split())
    if text.startswith("|") and " /bin/sh -c " in text:  # "|N ARG=value ... /bin/sh -c CMD": a RUN with build args
        text = text.split(" /bin/sh -c ", 1)[1]
    text = text.removeprefix("/bin/sh -c ").removeprefix("#(nop) ").strip()
    return text if len(text) <= width else text[: width - 3] + "..."


def format_layers(layers: list[Layer]) -> str:
    """The size report: one line a layer, then the totals."""
    lines = [f"{'unpacked':>10} {'gzip':>10}  step"]
    for layer in layers:
        packed = megabytes(layer.compressed) if layer.compressed else "-"
        lines.append(f"{megabytes(layer.size):>10} {packed:>10}  {short_step(layer.created_by) or '(base)'}")
    total = sum(layer.size for layer in layers)
    compressed = sum(layer.compressed for layer in layers)
    packed = megabytes(compressed) if compressed else "-"
    lines.append(f"{megabytes(total):>10} {packed:>10}  total ({len(layers)} layers)")
    return "\n".join(lines)


def megabytes(size: int) -> str:
    return f"{size / 1e6:,.0f} MB"


# ------------------------------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the bundle's image with buildah and export an OCI archive.")
    parser.add_argument("--bundle", default=str(REPO_ROOT / "bundle"), help="the bundle folder (make bundle)")
    parser.add_argument("--tag", help="the image's name (default: bundle.json's image)")
    parser.add_argument("--out", default=str(REPO_ROOT / "build" / "image"), help="base.tar, the archive, the log")
    parser.add_argument(
        "--base", help="an existing base image (default: a Debian base made here by mmdebstrap and imported)"
    )
    args = parser.parse_args(argv)
    bundle, out = Path(args.bundle), Path(args.out)
    try:
        record_file = bundle / "bundle.json"
        if not record_file.is_file():
            raise ImageError(f"{bundle} is not a bundle (no bundle.json): make bundle writes one")
        tag = args.tag or json.loads(record_file.read_text())["image"]
        buildah = Buildah()
        log = out / "build.log"
        log.unlink(missing_ok=True)
        base = args.base or make_base(buildah, out / "base.tar", log=log)
        took = build_image(buildah, bundle, tag, base=base, pip=local_pip(), log=log)
        archive = export_archive(buildah, tag, out / f"{tag.rsplit('/', 1)[-1].replace(':', '_')}.oci.tar")
        print(f"built {tag} on {base} in {took:.0f} s; exported {archive}")
        print(format_layers(archive_layers(archive)))
    except (ImageError, subprocess.TimeoutExpired, OSError) as exc:
        print(f"image: error: {one_line(exc)}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
