"""The deployment history: append-only JSON lines, one event per line, never rewritten.

A crash (or a full disk) can leave a truncated last line, and a hand edit can break any line. The
history is what ``rollback`` walks back through, so one bad line must neither crash the CLI nor
block rollback for good: ``History.events`` reports each bad line once, on stderr, with the file
and line number, and skips it. Appends are one ``write`` of one complete line on an ``O_APPEND``
descriptor, and a file that does not end with a newline (a line cut short by a crash) gets one
first, so the cut line stays alone and is reported instead of corrupting the new event.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REQUIRED_FIELDS = ("action", "model")
# Rollback walks these events, so a line that lacks what it needs is as bad as a cut one.
ACTION_FIELDS = {"promote": ("version", "previous_default"), "rollback": ("version", "previous_default")}


def _warn(message: str) -> None:
    print(f"servekit: warning: {message}", file=sys.stderr)


class History:
    """Append-only JSON lines: who/when/what; bad lines are reported through ``warn`` and skipped."""

    def __init__(self, path: Path, warn: Callable[[str], None] = _warn) -> None:
        self.path = Path(path)
        self.warn = warn
        self._reported: set[int] = set()

    def append(self, action: str, model: str, **fields: Any) -> dict:
        event = {
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            "user": getpass.getuser(),
            "action": action,
            "model": model,
            **fields,
        }
        line = (json.dumps(event, sort_keys=True) + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if not _ends_with_newline(fd):
                line = b"\n" + line
            written = os.write(fd, line)
            if written != len(line):  # a short write (disk full) leaves a cut line: say so
                raise OSError(f"history {self.path}: wrote {written} of {len(line)} bytes")
            os.fsync(fd)
        finally:
            os.close(fd)
        return event

    def events(self, model: str | None = None) -> list[dict]:
        """Every valid event (of ``model``, if given), oldest first."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        events = []
        for number, raw in enumerate(data.split(b"\n"), 1):
            if not raw.strip():
                continue
            event, problem = _parse(raw)
            if problem is not None:
                self._report(number, problem)
            elif model is None or event["model"] == model:
                events.append(event)
        return events

    def _report(self, number: int, problem: str) -> None:
        if number not in self._reported:  # once per line, however often the file is read
            self._reported.add(number)
            self.warn(f"{self.path} line {number}: {problem}; skipped")


def _ends_with_newline(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return size == 0 or os.pread(fd, 1, size - 1) == b"\n"


def _parse(raw: bytes) -> tuple[dict, None] | tuple[None, str]:
    try:
        event = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg}: column {exc.colno}; truncated by a crash?)"
    if not isinstance(event, dict):
        return None, f"a JSON {type(event).__name__}, not an event object"
    required = REQUIRED_FIELDS + ACTION_FIELDS.get(str(event.get("action")), ())
    missing = [name for name in required if not isinstance(event.get(name), str)]
    if missing:
        return None, f"event without {' and '.join(missing)}"
    return event, None
