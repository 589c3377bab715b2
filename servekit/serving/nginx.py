"""One nginx process of our own, its files under one prefix: the base of the management guard and the proxy.

``NginxInstance`` owns what both share (and the OIP front with them): the binary, the common head of
the configuration (pid file, logs and temporary paths under the prefix, the worker's open-file limit
where asked), installing a configuration only after
``nginx -t`` accepted it (replaced whole, never half-written), starting nginx and waiting for
it to answer, reloading it, and stopping it. nginx is signalled by us, never through
``nginx -s``, and only after its pid file's process is checked to be this prefix's master
(``servekit.serving.processes``): a stale pid file is reported and removed, nothing is signalled.
"""

from __future__ import annotations

import contextlib
import http.client
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from servekit.errors import ServekitError, one_line
from servekit.files import atomic_write_text
from servekit.serving.processes import children, pid_matches, signal_if_matches, verified_pid

TEMP_DIRS = ("body", "proxy", "fastcgi", "uwsgi", "scgi")


class NginxError(ServekitError):
    """nginx could not be found, configured, started or reloaded."""


def _warn(message: str) -> None:
    print(f"servekit: warning: {message}", file=sys.stderr)


def nginx_binary() -> str:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if path is None:
        raise NginxError("nginx is not installed (make tools installs Debian's nginx)")
    return path


def config_head(prefix: Path, worker_connections: int, user: str = "", rlimit_nofile: int | None = None) -> str:
    """Everything before an ``http`` block's own settings: one worker, every file under ``prefix``.

    ``rlimit_nofile``: the worker's open-file limit (``worker_rlimit_nofile``), for ``worker_connections``
    above the limit nginx inherits (often 1,024); none: the inherited one.
    """
    temp_paths = "".join(f"    {sub}_temp_path {prefix / 'tmp' / sub};\n" for sub in TEMP_DIRS if sub != "body")
    rlimit = f"worker_rlimit_nofile {rlimit_nofile};\n" if rlimit_nofile is not None else ""
    return (
        f"{user}worker_processes 1;\n"
        f"{rlimit}"
        f"pid {prefix / 'nginx.pid'};\n"
        f"error_log {prefix / 'error.log'} warn;\n"
        f"events {{ worker_connections {worker_connections}; }}\n"
        "http {\n"
        f"    access_log {prefix / 'access.log'};\n"
        f"    client_body_temp_path {prefix / 'tmp' / 'body'};\n"
        f"{temp_paths}"
    )


@dataclass
class NginxInstance:
    """An nginx master started with ``-p prefix -c prefix/nginx.conf``; subclasses say what it serves."""

    prefix: Path
    warn: Callable[[str], None] = field(default=_warn, kw_only=True)
    label: ClassVar[str] = "nginx"  # how messages name it: "the proxy", "the management guard"
    error: ClassVar[type[NginxError]] = NginxError
    rejected: ClassVar[str] = "the new configuration (kept the old one)"

    def __post_init__(self) -> None:
        self.prefix = Path(self.prefix).resolve()

    @property
    def conf(self) -> Path:
        return self.prefix / "nginx.conf"

    @property
    def pid_file(self) -> Path:
        return self.prefix / "nginx.pid"

    @property
    def master_fragments(self) -> tuple[str, ...]:
        """What our master's command line holds (nginx rewrites it to "nginx: master process ... -c CONF")."""
        return ("nginx: master process", f"-p {self.prefix}", f"-c {self.conf}")

    def running_pid(self) -> int | None:
        """Our nginx master's pid; a pid file naming anything else is reported, removed and never signalled."""
        return verified_pid(self.pid_file, self.master_fragments, warn=self.warn)

    # ------------------------------------------------------------------ configuration
    def install(self, text: str) -> None:
        """Replace ``nginx.conf`` with ``text`` once ``nginx -t`` accepts it; otherwise keep the old one."""
        self.prefix.mkdir(parents=True, exist_ok=True)
        for sub in TEMP_DIRS:
            (self.prefix / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.conf, text, check=self.check_config)

    def check_config(self, candidate: Path) -> None:
        try:
            check = subprocess.run(
                [nginx_binary(), "-t", "-q", "-p", str(self.prefix), "-c", str(candidate)],
                capture_output=True,
                text=True,
                check=False,
            )
        except NginxError as exc:
            raise self.error(str(exc)) from None
        if check.returncode != 0:
            raise self.error(f"nginx -t rejected {self.rejected}: {one_line(check.stderr)}")

    # ------------------------------------------------------------------ process
    def refuse_if_running(self) -> None:
        if (pid := self.running_pid()) is not None:
            raise self.error(f"{self.label} is already running (pid {pid})")

    def launch(self, listen: str, timeout: float = 10.0) -> None:
        """Start nginx on the installed configuration; return once it answers HTTP on ``listen``."""
        try:
            command = [nginx_binary(), "-p", str(self.prefix), "-c", str(self.conf)]
        except NginxError as exc:
            raise self.error(str(exc)) from None
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise self.error(f"{self.label} (nginx) failed to start: {one_line(result.stderr)}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _answers_http(listen):
                return
            time.sleep(0.1)
        raise self.error(f"{self.label} (nginx) did not listen on {listen} within {timeout:.0f}s")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop our master gracefully (requests in flight finish), then firmly after ``timeout`` s."""
        pid = self.running_pid()
        if pid is None:
            return
        signal_if_matches(pid, self.master_fragments, signal.SIGQUIT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not pid_matches(pid, self.master_fragments):
                return
            time.sleep(0.1)
        signal_if_matches(pid, self.master_fragments, signal.SIGTERM)

    def reload(self, drain_timeout: float = 10.0, timeout: float = 10.0) -> None:
        """If nginx runs, make it load the installed configuration; return once its old workers are gone.

        A good reload starts new workers (a bad one logs an error and keeps the old ones); the old
        workers finish the requests they hold (mirrors included), for at most ``drain_timeout`` s.
        """
        pid = self.running_pid()
        if pid is None:
            return
        before = set(children(pid))
        if not signal_if_matches(pid, self.master_fragments, signal.SIGHUP):
            raise self.error(f"nginx (pid {pid}) exited before it could be reloaded; servekit proxy start")
        deadline = time.monotonic() + timeout
        while not set(children(pid)) - before:
            if time.monotonic() >= deadline:
                raise self.error(
                    f"nginx did not start workers with the new configuration within {timeout:.0f}s "
                    f"(see {self.prefix / 'error.log'}): the previous routes may still be live"
                )
            time.sleep(0.05)
        deadline = time.monotonic() + drain_timeout
        while set(children(pid)) & before and time.monotonic() < deadline:
            time.sleep(0.05)


def _answers_http(listen: str) -> bool:
    host, _, port = listen.rpartition(":")
    connection = http.client.HTTPConnection(host or "127.0.0.1", int(port), timeout=1)
    try:
        connection.request("GET", "/")
        connection.getresponse().read()
        return True
    except (OSError, http.client.HTTPException):
        return False
    finally:
        with contextlib.suppress(OSError):
            connection.close()
