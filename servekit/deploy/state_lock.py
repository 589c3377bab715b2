"""One lock for every state-changing ``servekit`` command.

Two operators (or two scripts) running ``promote`` and ``canary`` at once would otherwise both read
``state.json``, change their copy and write it back: the second write silently undoes the first, and
the nginx configuration ends up rendered from a state that no longer exists. ``StateLock`` makes
such commands take turns:

    with StateLock(Path("var/servekit.lock"), timeout=60, holder="canary digits 2.0"):
        ...  # read, change and write state.json / nginx.conf / the history

It is an ``fcntl.flock`` on a file next to the deployment history, so the kernel releases it when
the holder exits, even after ``kill -9``: no stale lock to clean up by hand. The holder writes a
one-line description into the file so that a command that gives up can say who holds it. The files
the lock guards are each replaced whole (``servekit.files.atomic_write_text``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

from servekit.errors import ServekitError


class StateLockError(ServekitError):
    """The lock could not be taken in time; the message says who holds it."""


class StateLock:
    """An exclusive ``flock`` on ``path``, waited for at most ``timeout`` seconds."""

    def __init__(self, path: Path, timeout: float = 60.0, holder: str = "servekit", poll: float = 0.05) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.holder = holder
        self.poll = poll
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise StateLockError(
                        f"another servekit command holds {self.path} ({self._current_holder()}); "
                        f"gave up after {self.timeout:g}s (--lock-timeout)"
                    ) from None
                time.sleep(self.poll)
        self._fd = fd
        self._describe_holder(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        # Emptying the description first means a waiter never names a holder that has finished.
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def _describe_holder(self, fd: int) -> None:
        started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {self.holder}, since {started}\n".encode(), 0)

    def _current_holder(self) -> str:
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            text = ""
        return text.splitlines()[0][:200] if text else "holder unknown"

    def __enter__(self) -> StateLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()
