"""The built image run as the kubelet would, without a container runtime (``podman run`` cannot start here).

``Container`` starts the image's root filesystem (``buildah mount`` of a working container made from
the image: the layers the OCI archive holds, with the writable layer a runtime adds, used only for
mount points) under ``unshare`` and ``chroot``:

* namespaces: mount, pid (the entrypoint is pid 1: when it exits, the kernel ends everything it
  started) and cgroup (the container sees its own cgroup as the root, as in a pod);
* a cgroup v1 CPU quota: ``/sys/fs/cgroup/cpu/NAME/cpu.cfs_quota_us`` = the Deployment's CPU limit,
  shown inside at ``/sys/fs/cgroup/cpu`` (read-only), which the handlers' CPU budget reads;
* the root read-only, with the Deployment's writable volumes as tmpfs (``var/`` and ``/tmp``, the
  emptyDirs), ``/dev`` (null, zero, random, urandom, a 64 MiB ``/dev/shm``), ``/proc``, and the
  kubelet's ``/etc/hosts``, ``/etc/hostname`` and ``/etc/resolv.conf``; ``volumes`` are bind mounts
  (read-only unless said), e.g. a ConfigMap-like configuration or the models volume at ``/mnt/models``;
* the image's ``User`` (numeric uid:gid, so no capabilities) with ``no_new_privs``, its ``Env`` and
  ``WorkingDir``, and its ``Entrypoint`` as the command unless ``command`` overrides it (the
  Deployment's ``command``).

Not done here (a runtime's work): a network namespace (the container shares the host's, so the tests
bind its listeners to 127.0.0.1 and give each container its own ports), seccomp, the capability
bounding set and user namespaces. The kubelet's signals are the ones sent here: SIGTERM to pid 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from servekit.deploy.image import Buildah

CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 100_000
UNSHARE = ("unshare", "--mount", "--pid", "--cgroup", "--fork", "--kill-child")
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")


def cgroup_with_quota(name: str, cpus: float) -> Path:
    """A cgroup v1 CPU group ``name`` throttled to ``cpus`` CPUs (cfs quota over a 100 ms period)."""
    if not (CGROUP_CPU / "cpu.cfs_quota_us").is_file():
        raise RuntimeError(f"no cgroup v1 cpu controller at {CGROUP_CPU}: the container tests need one (as root)")
    group = CGROUP_CPU / name
    group.mkdir(exist_ok=True)
    (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
    (group / "cpu.cfs_quota_us").write_text(str(int(cpus * PERIOD_US)))
    return group


def remove_cgroup(group: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while group.exists():
        try:
            group.rmdir()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@dataclass
class Container:
    """One container of the image (see the module docstring); ``start``, then always ``kill``."""

    buildah: Buildah
    image: str
    name: str
    state: Path  # a host folder for the mount point, the kubelet's files and the log
    cpus: float = 1.0
    command: list[str] | None = None  # the Deployment's command; None: the image's Entrypoint
    volumes: dict[str, tuple[Path, bool]] = field(default_factory=dict)  # container path -> (host path, read-only)
    emptydirs: tuple[str, ...] = ()  # container paths given a fresh tmpfs (owned by the image's user)
    process: subprocess.Popen | None = None
    working: str | None = None  # the buildah working container
    rootfs: Path | None = None
    group: Path | None = None

    def __post_init__(self) -> None:
        self.config = self.buildah.config(self.image)["config"]
        uid, _, gid = str(self.config.get("User", "0")).partition(":")
        self.uid, self.gid = int(uid), int(gid or uid)

    # ------------------------------------------------------------------ what the runtime sets up
    def argv(self) -> list[str]:
        return list(self.command or self.config["Entrypoint"])

    def environment(self) -> dict[str, str]:
        env = dict(item.split("=", 1) for item in self.config.get("Env", []))
        env.setdefault("HOME", self.config.get("WorkingDir") or "/")
        env["HOSTNAME"] = self.name
        return env

    def _kubelet_files(self) -> dict[str, Path]:
        folder = self.state / "etc"
        folder.mkdir(parents=True, exist_ok=True)
        files = {
            "/etc/hosts": f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{self.name}\n",
            "/etc/hostname": f"{self.name}\n",
            "/etc/resolv.conf": "nameserver 127.0.0.53\noptions ndots:5\n",
        }
        paths = {}
        for target, text in files.items():
            path = folder / Path(target).name
            path.write_text(text)
            paths[target] = path
        return paths

    def script(self) -> str:
        """The shell run as root in the new namespaces: mounts, then ``exec chroot`` to the image's user."""
        assert self.rootfs is not None
        root = self.state / "root"
        q = shlex.quote
        lines = [
            "set -eu",
            f"R={q(str(root))}",
            # mount points the image lacks go into the working container's writable layer, never the image
            *(f"mkdir -p {q(str(self.rootfs))}{q(path)}" for path in (*self.volumes, *self.emptydirs)),
            *(f"touch {q(str(self.rootfs))}{q(path)}" for path in self._kubelet_files()),
            f'mount --bind {q(str(self.rootfs))} "$R"',
            'mount -o remount,bind,ro "$R"',
            'mount -t proc -o nosuid,nodev,noexec proc "$R/proc"',
            'mount -t tmpfs -o mode=755,nosuid dev "$R/dev"',
            *(f'touch "$R/dev/{n}" && mount --bind /dev/{n} "$R/dev/{n}"' for n in DEVICES),
            'mkdir "$R/dev/shm" && mount -t tmpfs -o mode=1777,nosuid,nodev,size=64m shm "$R/dev/shm"',
            'ln -s /proc/self/fd "$R/dev/fd" && ln -s /proc/self/fd/0 "$R/dev/stdin"',
            'ln -s /proc/self/fd/1 "$R/dev/stdout" && ln -s /proc/self/fd/2 "$R/dev/stderr"',
            'mount -t tmpfs -o mode=755,nosuid,nodev,noexec sys "$R/sys"',
            'mkdir -p "$R/sys/fs/cgroup/cpu"',
            # the cgroup namespace makes this process's cgroup "/": its folder is the container's /sys/fs/cgroup/cpu
            f'mount --bind {q(str(self.group))} "$R/sys/fs/cgroup/cpu"',
            'mount -o remount,bind,ro "$R/sys/fs/cgroup/cpu"',
        ]
        for path in self.emptydirs:
            mode = "1777" if path == "/tmp" else "0755"
            options = f"mode={mode},uid={self.uid},gid={self.gid},nosuid,nodev"
            lines.append(f'mount -t tmpfs -o {options} tmpfs "$R"{q(path)}')
        for target, source in self._kubelet_files().items():
            lines += [f'mount --bind {q(str(source))} "$R"{q(target)}', f'mount -o remount,bind,ro "$R"{q(target)}']
        for path, (source, read_only) in self.volumes.items():
            lines.append(f'mount --bind {q(str(source))} "$R"{q(path)}')
            if read_only:
                lines.append(f'mount -o remount,bind,ro "$R"{q(path)}')
        env = [f"{key}={value}" for key, value in self.environment().items()]
        workdir = self.config.get("WorkingDir") or "/"
        lines.append(
            f'exec chroot --userspec={self.uid}:{self.gid} --groups={self.gid} "$R" '
            + shlex.join(["/usr/bin/env", "-i", f"--chdir={workdir}", *env, "setpriv", "--no-new-privs", "--"])
            + " "
            + shlex.join(self.argv())
        )
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        (self.state / "root").mkdir(exist_ok=True)
        self.working = self.buildah.run("from", "--name", self.name, self.image).strip()
        self.rootfs = Path(self.buildah.run("mount", self.working).strip())
        self.group = cgroup_with_quota(f"{self.name}-{os.getpid()}", self.cpus)  # unique across test runs
        tasks = self.group / "tasks"
        (self.state / "start.sh").write_text(self.script())
        log = open(self.state / "container.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            self.process = subprocess.Popen(
                [*UNSHARE, "sh", str(self.state / "start.sh")],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=lambda: tasks.write_text(str(os.getpid())),  # joins the cgroup before the namespaces
            )  # fmt: skip
        finally:
            log.close()

    @property
    def init_pid(self) -> int | None:
        """The host pid of the container's pid 1 (unshare's child), None before it exists or after it exits."""
        if self.process is None or self.process.poll() is not None:
            return None
        try:
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def pids(self) -> list[int]:
        """Every host process in the container's pid namespace (none once its pid 1 is gone)."""
        init = self.init_pid
        if init is None:
            return []
        try:
            namespace = os.readlink(f"/proc/{init}/ns/pid")
        except OSError:
            return []
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if os.readlink(entry / "ns" / "pid") == namespace:
                        found.append(int(entry.name))
        return sorted(found)

    def command_lines(self) -> list[str]:
        lines = []
        for pid in self.pids():
            with contextlib.suppress(OSError):
                lines.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        return lines

    def file(self, path: str) -> Path:
        """A path inside the running container, seen from the host (through its pid 1's root)."""
        return Path(f"/proc/{self.init_pid}/root") / path.lstrip("/")

    def terminate(self) -> None:
        """SIGTERM to the container's pid 1, as the kubelet sends it."""
        init = self.init_pid
        if init is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(init, signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        """The entrypoint's exit status (unshare returns its child's)."""
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def log(self, chars: int = 3000) -> str:
        path = self.state / "container.log"
        return path.read_text(errors="replace")[-chars:] if path.is_file() else ""

    def kill(self) -> None:
        """Always leaves nothing: SIGKILL to pid 1 ends the namespace; then the working container and the cgroup."""
        if self.process is not None and self.process.poll() is None:
            init = self.init_pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(init or self.process.pid, signal.SIGKILL)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        if self.working is not None:
            subprocess.run(self.buildah.argv("rm", self.working), capture_output=True, check=False)
            self.working = None
        if self.group is not None:
            remove_cgroup(self.group)
            self.group = None


def wait_ready(container: Container, url: str, timeout: float) -> float:
    """Seconds until ``url`` (the readiness probe) answers 200; an AssertionError with the log otherwise."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if container.process is not None and container.process.poll() is not None:
            raise AssertionError(f"the container exited with {container.process.returncode}:\n{container.log()}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=2).status_code == 200:
                return time.monotonic() - started
        time.sleep(0.25)
    raise AssertionError(f"not ready after {timeout:.0f}s:\n{container.log()}")


def image_config(buildah: Buildah, image: str) -> dict:
    return json.loads(buildah.run("inspect", "--type", "image", image))["OCIv1"]["config"]
