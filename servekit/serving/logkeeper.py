"""Keeps the log files of one nginx bounded: a small process started and stopped with the proxy.

nginx cannot rotate a log by size, and nothing of ours runs beside the proxy between two commands,
so ``NginxProxy.start`` starts this keeper and ``NginxProxy.stop`` stops it. Every ``interval``
seconds the keeper looks at each of its files (the proxy's ``requests.jsonl``, ``error.log`` and
``access.log``, and its ``spans.jsonl`` with span export on); one over ``max_bytes`` is renamed to
``FILE.1`` (``FILE.1`` to ``FILE.2`` and so on, the oldest beyond ``keep`` dropped) and, once per
check that rotated anything, nginx's master gets ``SIGHUP``: it opens its logs anew (a new
``FILE``) and hands them to new workers, while the old workers finish the requests they hold (into
``FILE.1``) and exit. nginx's ``SIGUSR1`` (reopen) was
the other choice and fails here: it makes the *workers* reopen the files themselves, as nginx's
worker user (``nobody`` under a root master), who cannot reach a prefix below a 0700 directory
(``/root``, pytest's ``tmp_path``); nginx then keeps writing the renamed file, without bound, and
the master hands the new, unused file to the worker user. A reload is what ``servekit canary`` does
anyway, and its configuration on disk is always one ``nginx -t`` accepted. The master is signalled
only after its pid file's process is checked to be this prefix's nginx master
(``servekit.serving.processes``); the keeper never signals anything else and never edits nginx's pid
file. A rotated file that nginx has not recreated by the next check is reported (once). When the
master has been gone for two checks in a row, the keeper exits (nothing writes the logs any more).

A file grows past the cap only by what nginx writes in one interval, and a rotated file only by
what the old workers write while they finish, so the files of one log take about
``(keep + 1) * (max_bytes + interval x write rate)`` bytes at most. ``servekit.deploy.rollout.RequestLog``
reads across one rotation (``FILE.1``, then the new ``FILE``).

    keeper = LogKeeperProcess(prefix, (prefix / "requests.jsonl",), max_bytes=64 << 20, keep=3)
    keeper.start()          # python -m servekit.serving.logkeeper --prefix PREFIX ... FILE...
    keeper.stop()           # True if it was running
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import stat
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from servekit.errors import ServekitError
from servekit.serving.nginx import NginxInstance
from servekit.serving.processes import Companion, owned_pid, release_own_pid_file, signal_if_matches

__all__ = [
    "DEFAULT_INTERVAL",
    "DEFAULT_KEEP",
    "DEFAULT_MAX_BYTES",
    "LogFollower",
    "LogKeeper",
    "LogKeeperError",
    "LogKeeperProcess",
    "backup_path",
    "reload_nginx",
    "rotate",
]

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_KEEP = 3
DEFAULT_INTERVAL = 2.0
MIN_MAX_BYTES = 4096
MAX_KEEP = 100
PID_FILE = "logkeeper.pid"
REPO_ROOT = Path(__file__).resolve().parents[2]


class LogKeeperError(ServekitError):
    """The log keeper's settings are invalid, or it could not be started."""


def _warn(message: str) -> None:
    print(f"servekit: warning: {message}", file=sys.stderr, flush=True)


def backup_path(path: Path, n: int) -> Path:
    """The ``n``-th rotated copy of ``path`` (1: the newest)."""
    return path.with_name(f"{path.name}.{n}")


def rotate(path: Path, keep: int) -> bool:
    """``FILE.keep-1`` to ``FILE.keep`` ... ``FILE`` to ``FILE.1``; False when ``path`` is not a regular file.

    ``rename`` never follows a link: a link planted at a backup's name is replaced, not written through.
    """
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
    except FileNotFoundError:
        return False
    for n in range(keep, 1, -1):
        with contextlib.suppress(FileNotFoundError):
            os.rename(backup_path(path, n - 1), backup_path(path, n))
    os.rename(path, backup_path(path, 1))
    return True


def reload_nginx(nginx: NginxInstance) -> bool:
    """``SIGHUP`` to ``nginx``'s master, only once its pid file's process is checked to be it; True when sent."""
    pid = owned_pid(nginx.pid_file, nginx.master_fragments)  # read only: nginx's pid file is never removed here
    return pid is not None and signal_if_matches(pid, nginx.master_fragments, signal.SIGHUP)


def _validated(max_bytes: int, keep: int, interval: float = DEFAULT_INTERVAL) -> None:
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < MIN_MAX_BYTES:
        raise LogKeeperError(f"log max_bytes: must be a whole number of bytes >= {MIN_MAX_BYTES}, got {max_bytes!r}")
    if not isinstance(keep, int) or isinstance(keep, bool) or not 1 <= keep <= MAX_KEEP:
        raise LogKeeperError(f"log keep: must be a whole number of rotated files from 1 to {MAX_KEEP}, got {keep!r}")
    if not isinstance(interval, int | float) or isinstance(interval, bool) or not 0.05 <= interval <= 60:
        raise LogKeeperError(f"log check interval: must be from 0.05 to 60 seconds, got {interval!r}")


@dataclass
class LogKeeper:
    """One check of the files: rotate those over ``max_bytes``, then ``reopen`` (reload nginx) once."""

    logs: Sequence[Path]
    reopen: Callable[[], bool]
    max_bytes: int = DEFAULT_MAX_BYTES
    keep: int = DEFAULT_KEEP
    warn: Callable[[str], None] = _warn
    _warned: set[str] = field(default_factory=set, init=False, repr=False)
    _reopening: list[Path] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        _validated(self.max_bytes, self.keep)
        self.logs = tuple(Path(p) for p in self.logs)

    def check(self) -> list[Path]:
        """The files rotated by this check (nginx was reloaded once if any were)."""
        for path in self._reopening:
            if not path.exists():
                why = f"it may still write {backup_path(path, 1).name} (see {path.parent / 'error.log'})"
                self._warn_once(f"reopen {path}", f"nginx did not open a new {path.name} after its rotation: {why}")
        rotated = []
        for path in self.logs:
            try:
                if os.lstat(path).st_size > self.max_bytes and rotate(path, self.keep):
                    rotated.append(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                self._warn_once(str(path), f"cannot rotate {path}: {exc}")
        if rotated and not self.reopen():
            self._warn_once("reopen", "rotated logs but nginx's master could not be verified: nothing signalled")
        self._reopening = rotated
        return rotated

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:  # the keeper's own output must stay small too
            self._warned.add(key)
            self.warn(message)


def run(keeper: LogKeeper, interval: float, alive: Callable[[], bool], stop: threading.Event) -> None:
    """Check every ``interval`` s until ``stop`` is set or ``alive`` has been false for two checks in a row.

    ``stop`` is only looked at between checks, so a rotation is never left half done (renamed, not reloaded).
    """
    missed = 0
    while missed < 2 and not stop.is_set():
        keeper.check()
        missed = 0 if alive() else missed + 1
        stop.wait(interval)


# ------------------------------------------------------------------------------------------ the process
@dataclass
class LogKeeperProcess(Companion):
    """The keeper process of the nginx under ``prefix``: its pid file and output there, checked before any signal."""

    prefix: Path
    logs: Sequence[Path]
    max_bytes: int = DEFAULT_MAX_BYTES
    keep: int = DEFAULT_KEEP
    interval: float = DEFAULT_INTERVAL
    warn: Callable[[str], None] = field(default=_warn, kw_only=True)
    module = "servekit.serving.logkeeper"
    pid_name, output_name, error, label = PID_FILE, "logkeeper.log", LogKeeperError, "log keeper"

    def __post_init__(self) -> None:
        _validated(self.max_bytes, self.keep, self.interval)
        self.prefix = Path(self.prefix).resolve()
        self.logs = tuple(Path(p) for p in self.logs)

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", self.module, "--prefix", str(self.prefix),
            "--max-bytes", str(self.max_bytes), "--keep", str(self.keep), "--interval", str(self.interval),
            *(str(p) for p in self.logs),
        ]  # fmt: skip

    def start(self, timeout: float = 5.0) -> None:
        """Start the keeper (one left over from a crashed proxy is stopped first)."""
        self.launch(self.command(), REPO_ROOT, timeout)


# ------------------------------------------------------------------------------------------ reading
class LogFollower:
    """Reads a JSON-lines log incrementally, from where it was when ``start`` was called, across rotations.

    The keeper renames a full ``FILE`` to ``FILE.1`` and nginx starts a new one. The reader follows the
    file it was reading by its inode: when the path names another file, the rest of the old one is read
    from ``.1`` (now and at every later read while ``.1`` is still that file, for the lines nginx wrote
    before it reopened its log), then the new file from its start. Records survive one rotation between
    two reads; a file rotated twice in between (to ``.2``) is not looked for. ``parse`` turns one line
    into a record, or None for a line to skip (cut, hand-edited).
    """

    def __init__(self, path: Path, parse: Callable[[bytes], Any]) -> None:
        self.path = Path(path)
        self.parse = parse
        self._file: tuple[int, int] | None = None  # (device, inode) of the file being read
        self._offset = 0
        self._previous: tuple[tuple[int, int], int] | None = None  # the rotated file and where its reading stopped
        self._records: list[Any] = []

    def start(self, offset: int | None = None) -> None:
        """Forget everything before now: only lines logged from here on are read.

        ``offset``: read the file now at the path from there instead of from its end (the size it had
        before its writer started, taken by whoever started both: nothing it logged since is missed).
        """
        try:
            info = self.path.stat()
            self._file, self._offset = (info.st_dev, info.st_ino), info.st_size if offset is None else offset
        except FileNotFoundError:
            self._file, self._offset = None, 0
        self._previous = None
        self._records = []

    def new_records(self) -> list[Any]:
        """Every record logged since the last call (or ``start``), once."""
        self._read_new()
        taken, self._records = self._records, []
        return taken

    def _read_new(self) -> None:
        try:
            handle = self.path.open("rb")
        except FileNotFoundError:  # renamed, and nginx has not reopened its log yet
            handle = None
        with handle or contextlib.nullcontext():
            identity = None
            if handle is not None:
                info = os.fstat(handle.fileno())
                identity = (info.st_dev, info.st_ino)
            if identity != self._file:
                if self._file is not None:
                    self._previous = (self._file, self._offset)
                self._file, self._offset = identity, 0
            if self._previous is not None:
                self._read_previous()
            if handle is not None:
                self._offset = self._read_from(handle, self._offset)

    def _read_previous(self) -> None:
        identity, offset = self._previous
        try:
            with backup_path(self.path, 1).open("rb") as handle:
                info = os.fstat(handle.fileno())
                if (info.st_dev, info.st_ino) != identity:  # rotated again, or not rotated but removed
                    self._previous = None
                    return
                self._previous = (identity, self._read_from(handle, offset))
        except FileNotFoundError:
            self._previous = None

    def _read_from(self, handle: BinaryIO, offset: int) -> int:
        """Parse the complete lines after ``offset``; the new offset (a line nginx is still writing waits)."""
        size = handle.seek(0, 2)
        if size < offset:  # truncated in place: read it again from its start
            offset = 0
        handle.seek(offset)
        data = handle.read(size - offset)
        complete = data.rfind(b"\n") + 1
        for line in data[:complete].splitlines():
            record = self.parse(line)
            if record is not None:
                self._records.append(record)
        return offset + complete


# ------------------------------------------------------------------------------------------ command line
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m servekit.serving.logkeeper", description=__doc__.split("\n")[0])
    parser.add_argument("--prefix", type=Path, required=True, help="the nginx prefix (nginx.pid, nginx.conf)")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES)
    parser.add_argument("--keep", type=int, default=DEFAULT_KEEP)
    parser.add_argument("--interval", type=float, default=DEFAULT_INTERVAL)
    parser.add_argument("logs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    try:
        _validated(args.max_bytes, args.keep, args.interval)
    except LogKeeperError as exc:
        parser.error(str(exc))
    nginx = NginxInstance(args.prefix)
    keeper = LogKeeper(args.logs, lambda: reload_nginx(nginx), args.max_bytes, args.keep)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    run(keeper, args.interval, lambda: owned_pid(nginx.pid_file, nginx.master_fragments) is not None, stop)
    release_own_pid_file(args.prefix / PID_FILE)  # gone with nginx: leave no stale pid file behind
    return 0


if __name__ == "__main__":
    sys.exit(main())
