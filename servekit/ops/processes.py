"""Processes we started: the /proc table, pid files, and the check made before any signal.

A pid file can outlive its process, and the kernel reuses pids: signalling whatever a stale pid
file names can hit an unrelated process (as root, any process). ``owned_pid`` only returns a pid
whose command line contains every expected fragment (and whose working directory is the expected
one, when given).
"""

from __future__ import annotations

import os
from pathlib import Path


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


def read_pid(path: Path) -> int | None:
    try:
        pid = int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid > 1 else None


def command_line(pid: int) -> list[str]:
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


def pid_matches(pid: int, fragments: tuple[str, ...], cwd: Path | None = None) -> bool:
    """Whether ``pid`` runs a command line holding every fragment (and runs in ``cwd`` if given)."""
    line = " ".join(command_line(pid))
    if not line or not all(fragment in line for fragment in fragments):
        return False
    return cwd is None or working_directory(pid) == Path(cwd).resolve()


def owned_pid(path: Path, fragments: tuple[str, ...], cwd: Path | None = None) -> int | None:
    """The pid in ``path`` if that process is still the one we started, else None (stale file)."""
    pid = read_pid(path)
    if pid is None or not pid_matches(pid, fragments, cwd):
        return None
    return pid
