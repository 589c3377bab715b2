"""Processes we started: the /proc table, pid files, and the checks made before any signal.

A pid file outlives its process after a crash or a reboot, and the kernel reuses pids: signalling
whatever pid the file names can stop an unrelated process (as root, any process). So a pid counts
as ours only when its command line holds every expected fragment as whole words (``-c /x/a.conf``
must not match ``-c /x/a.conf.bak``), and, when asked, it runs in the expected directory. Signals go
through ``signal_if_matches``, which opens a pidfd first, so the process checked is the process
signalled even if the pid is reused in between.

    pid = verified_pid(prefix / "nginx.pid", ["nginx: master process", f"-c {conf}"])   # stale: warned, removed
    if pid is not None:
        signal_if_matches(pid, ["nginx: master process", f"-c {conf}"], signal.SIGHUP)
    pid = owned_pid(workdir / "torchserve.pid", (launcher, "--foreground"), cwd=workdir)  # stale: None
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def _warn(message: str) -> None:
    print(f"servekit: warning: {message}", file=sys.stderr)


# ------------------------------------------------------------------------------------------ /proc
def process_table() -> list[tuple[int, str, int, int]]:
    """``(pid, state, parent pid, process group)`` of every process, from /proc."""
    table = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table.append((int(proc.name), fields[0], int(fields[1]), int(fields[2])))
    return table


def children(pid: int) -> list[int]:
    return [child for child, _, parent, _ in process_table() if parent == pid]


def group_alive(pgid: int) -> bool:
    """True while the process group has a member that is not a zombie."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return any(group == pgid and state != "Z" for _, state, _, group in process_table())


def command_line(pid: int) -> list[str]:
    """The process's arguments; empty when it is gone, a zombie or unreadable."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


def working_directory(pid: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None


# ------------------------------------------------------------------------------------------ matching
def _has_words(line: str, fragment: str) -> bool:
    """``fragment`` occurs in ``line`` on word boundaries (white space or either end)."""
    return re.search(rf"(?:^|\s){re.escape(fragment)}(?=\s|$)", line) is not None


def pid_matches(pid: int, fragments: Sequence[str], cwd: Path | None = None) -> bool:
    """Whether ``pid`` is alive with every fragment in its command line as whole words (and runs in ``cwd``).

    nginx rewrites its arguments into one string ("nginx: master process /usr/sbin/nginx -p ... -c ..."),
    so the arguments are joined by spaces before matching.
    """
    if pid <= 0 or not fragments:
        return False
    line = " ".join(command_line(pid))
    if not line or not all(_has_words(line, fragment) for fragment in fragments):
        return False
    return cwd is None or working_directory(pid) == Path(cwd).resolve()


# ------------------------------------------------------------------------------------------ pid files
def read_pid(path: Path) -> int | None:
    try:
        pid = int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid > 1 else None


def owned_pid(path: Path, fragments: Sequence[str], cwd: Path | None = None) -> int | None:
    """The pid in ``path`` if that process is still the one we started, else None (a stale file, kept)."""
    pid = read_pid(path)
    if pid is None or not pid_matches(pid, fragments, cwd):
        return None
    return pid


def verified_pid(pid_file: Path, fragments: Sequence[str], warn: Callable[[str], None] = _warn) -> int | None:
    """The pid in ``pid_file`` if it names a live process that matches; otherwise None.

    A file that holds no pid, names a dead pid or names a process that is not ours is stale: it
    is reported through ``warn`` (one line) and removed, and its pid is never signalled.
    """
    pid_file = Path(pid_file)
    if not pid_file.exists():
        return None
    pid = read_pid(pid_file)
    if pid is not None and pid_matches(pid, fragments):
        return pid
    warn(f"{pid_file} {_why_stale(pid)}: removed the stale pid file, nothing signalled")
    with contextlib.suppress(OSError):
        pid_file.unlink()
    return None


def _why_stale(pid: int | None) -> str:
    if pid is None:
        return "does not hold a pid"
    if not Path(f"/proc/{pid}").exists():
        return f"names pid {pid}, which is not running"
    return f"names pid {pid}, which is another process ({_short(' '.join(command_line(pid)))})"


def _short(line: str, limit: int = 80) -> str:
    text = line or "?"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------ signals
def signal_if_matches(pid: int, fragments: Sequence[str], sig: signal.Signals) -> bool:
    """Send ``sig`` to ``pid`` only if it matches; True when sent. The check and the signal hit one process."""
    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except OSError:  # no pidfd support: check then kill, with the usual small reuse window
        if not pid_matches(pid, fragments):
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
            return True
        return False
    try:
        if not pid_matches(pid, fragments):
            return False
        # If the process we opened died and its pid was reused after the check, this raises
        # ProcessLookupError instead of signalling the newcomer.
        signal.pidfd_send_signal(handle, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(handle)


# ------------------------------------------------------------------------------------------ ports
_HANDED_OUT: set[int] = set()
_PORTS_LOCK = threading.Lock()


def wait_gone(pid: int, fragments: Sequence[str], timeout: float, poll: float = 0.05) -> bool:
    """Wait until ``pid`` no longer runs our command (gone, or a zombie whose command line reads empty),
    reaping it when we are its parent; False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        gone = not pid_matches(pid, fragments)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it when we are its parent, or it stays a zombie
        if gone:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)


def stop_verified(pid: int, fragments: Sequence[str], timeout: float) -> None:
    """SIGTERM our process ``pid`` (its command line checked first), then SIGKILL after ``timeout`` seconds."""
    signal_if_matches(pid, fragments, signal.SIGTERM)
    if not wait_gone(pid, fragments, timeout):
        signal_if_matches(pid, fragments, signal.SIGKILL)
        wait_gone(pid, fragments, 5.0)


def start_verified(command: Sequence[str], fragments: Sequence[str], pid_file: Path, output: Path, cwd: Path,
                   timeout: float = 5.0) -> int:  # fmt: skip
    """Start ``command`` in a session of its own (no stdin; stdout and stderr appended to ``output``), write its
    pid to ``pid_file``, and return it once its command line holds ``fragments``.

    Popen can return while the child is still inside exec (its command line reads empty): waiting until it
    is ours means nothing checks it too early and takes it for a stale pid. ``ChildProcessError`` when it
    exits first or does not match within ``timeout`` s (it is killed, its pid file removed), ``OSError``
    when it cannot be started.
    """
    with open(output, "ab") as out:
        process = subprocess.Popen(list(command), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True, cwd=cwd)  # fmt: skip
    Path(pid_file).write_text(str(process.pid))
    deadline = time.monotonic() + timeout
    while not pid_matches(process.pid, fragments):
        if process.poll() is not None or time.monotonic() > deadline:
            Path(pid_file).unlink(missing_ok=True)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()
            raise ChildProcessError(f"it exited or did not come up within {timeout:g} s (see {output})")
        time.sleep(0.01)
    return process.pid


def free_port() -> int:
    """A loopback port free now and never handed out before by this process.

    The kernel may give the same free port to two ``bind(0)`` calls once the first socket is
    closed, and the ports chosen here are only bound later (by TorchServe, nginx, the gateway): two
    listeners of one server could otherwise be given the same port and one of them fail to start.
    """
    with _PORTS_LOCK:
        for _ in range(100):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            if port not in _HANDED_OUT:
                _HANDED_OUT.add(port)
                return port
    raise OSError("no free loopback port that was not handed out already")


def stop_recorded(pid_file: Path, fragments: Sequence[str], timeout: float,
                  warn: Callable[[str], None] = _warn) -> bool:  # fmt: skip
    """Stop the process ``pid_file`` names, only if its command line holds ``fragments`` (SIGTERM, then SIGKILL
    after ``timeout`` s), and remove the file; False when none of ours was running."""
    pid = verified_pid(pid_file, fragments, warn=warn)
    if pid is None:
        return False
    stop_verified(pid, fragments, timeout)
    pid_file.unlink(missing_ok=True)
    return True


def release_own_pid_file(pid_file: Path) -> None:
    """Remove ``pid_file`` when it names this process (a companion leaving with its nginx): no stale file."""
    if read_pid(pid_file) == os.getpid():
        pid_file.unlink(missing_ok=True)


class Companion:
    """A helper process of the nginx under ``self.prefix`` (log keeper, span shipper), found by its pid file there
    and signalled only when its command line holds ``fragments``. A subclass names its module, pid file,
    output file and error, and builds its ``command``; ``self.warn`` reports a stale pid file."""

    module: str
    pid_name: str
    output_name: str
    error: type[Exception]
    label: str
    prefix: Path
    warn: Callable[[str], None]

    @property
    def pid_file(self) -> Path:
        return self.prefix / self.pid_name

    @property
    def output(self) -> Path:
        return self.prefix / self.output_name

    @property
    def fragments(self) -> tuple[str, ...]:
        """What our process's command line holds; nothing else is ever signalled."""
        return (f"-m {self.module}", f"--prefix {self.prefix}")

    def running_pid(self) -> int | None:
        """Our process's pid; a pid file naming anything else is reported, removed and never signalled."""
        return verified_pid(self.pid_file, self.fragments, warn=self.warn)

    def launch(self, command: Sequence[str], cwd: Path, timeout: float) -> None:
        """Start ``command`` (one left over from a crashed nginx is stopped first); ``error`` when it does not start."""
        self.stop()
        self.prefix.mkdir(parents=True, exist_ok=True)
        try:
            start_verified(command, self.fragments, self.pid_file, self.output, cwd, timeout)
        except ChildProcessError:
            raise self.error(f"the {self.label} did not start (see {self.output})") from None
        except OSError as exc:
            raise self.error(f"the {self.label} did not start: {exc}") from None

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop our process (SIGTERM, then SIGKILL after ``timeout`` s); False when it was not running."""
        return stop_recorded(self.pid_file, self.fragments, timeout, self.warn)
