"""Pid files that are checked against the process they name before anything is signalled.

A pid file outlives its process after a crash or a reboot, and the kernel reuses pids: signalling
whatever pid the file names can stop an unrelated process (as root, any process). Every signal
from the toolkit therefore goes through ``signal_if_matches``, which checks the process's command
line against fragments only our process has (e.g. nginx's ``-c <our nginx.conf>``) and sends the
signal through a pidfd, so the process checked is the process signalled even if the pid is reused
in between.

    pid = verified_pid(prefix / "nginx.pid", ["nginx: master process", f"-c {conf}"])
    if pid is not None:
        signal_if_matches(pid, ["nginx: master process", f"-c {conf}"], signal.SIGHUP)
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from servekit.ops.processes import command_line, read_pid


def _warn(message: str) -> None:
    print(f"servekit: warning: {message}", file=sys.stderr)


def process_command_line(pid: int) -> str | None:
    """The process's arguments joined by spaces; None when it is gone, a zombie or unreadable."""
    # nginx rewrites its argv into one string ("nginx: master process /usr/sbin/nginx -p ... -c ...").
    return " ".join(command_line(pid)) or None


def _has_words(line: str, fragment: str) -> bool:
    """``fragment`` occurs in ``line`` on word boundaries: "-c /x/a.conf" must not match "-c /x/a.conf.bak"."""
    return re.search(rf"(?:^|\s){re.escape(fragment)}(?=\s|$)", line) is not None


def pid_matches(pid: int, expected_cmd_fragments: Sequence[str]) -> bool:
    """True when process ``pid`` is alive and its command line contains every fragment (whole words)."""
    if pid <= 0 or not expected_cmd_fragments:
        return False
    line = process_command_line(pid)
    return line is not None and all(_has_words(line, f) for f in expected_cmd_fragments)


def verified_pid(
    pid_file: Path, expected_cmd_fragments: Sequence[str], warn: Callable[[str], None] = _warn
) -> int | None:
    """The pid in ``pid_file`` if it names a live process that matches; otherwise None.

    A file that holds no pid, names a dead pid or names a process that is not ours is stale: it
    is reported through ``warn`` (one line) and removed, and its pid is never signalled.
    """
    pid_file = Path(pid_file)
    if not pid_file.exists():
        return None
    pid = read_pid(pid_file)
    if pid is not None and pid_matches(pid, expected_cmd_fragments):
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
    return f"names pid {pid}, which is another process ({_short(process_command_line(pid))})"


def signal_if_matches(pid: int, expected_cmd_fragments: Sequence[str], sig: signal.Signals) -> bool:
    """Send ``sig`` to ``pid`` only if it matches; True when sent. The check and the signal hit one process."""
    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except OSError:  # no pidfd support: check then kill, with the usual small reuse window
        if not pid_matches(pid, expected_cmd_fragments):
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
            return True
        return False
    try:
        if not pid_matches(pid, expected_cmd_fragments):
            return False
        # If the process we opened died and its pid was reused after the check, this raises
        # ProcessLookupError instead of signalling the newcomer.
        signal.pidfd_send_signal(handle, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(handle)


def _short(line: str | None, limit: int = 80) -> str:
    text = line or "?"
    return text if len(text) <= limit else text[: limit - 3] + "..."
