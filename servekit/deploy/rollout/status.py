"""The status file of a model's rollout, and the process it names.

Status (``StatusFile``, ``rollout-NAME.json`` beside the deployment state in the proxy directory):
the running rollout replaces it whole at every change and every poll: its pid and command line,
the settings, the current step, percent and step start, the latest figures of the step window, and
the outcome when it ends. ``servekit rollout --status NAME`` prints it and says whether that
process is still a ``servekit rollout`` (``RolloutProcess.alive``: pid and command line, never the
pid alone). A second rollout of a model whose rollout process is alive is refused.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from servekit.deploy.workflows import DeployError
from servekit.files import atomic_write_text
from servekit.serving.processes import command_line, pid_matches


def status_path(proxy_dir: Path, model: str) -> Path:
    """``rollout-NAME.json`` beside the deployment state."""
    return Path(proxy_dir) / f"rollout-{model}.json"


@dataclass(frozen=True)
class RolloutProcess:
    """A rollout's process as its status file records it: pid and command line, checked together."""

    pid: int
    argv: tuple[str, ...]

    @classmethod
    def current(cls) -> RolloutProcess:
        pid = os.getpid()
        return cls(pid, tuple(command_line(pid)) or tuple(sys.argv))

    @classmethod
    def of(cls, status: Mapping[str, Any]) -> RolloutProcess | None:
        pid, argv = status.get("pid"), status.get("argv")
        if not isinstance(pid, int) or not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            return None
        return cls(pid, tuple(argv))

    def alive(self) -> bool:
        """Whether ``pid`` still runs this very command line, and it is a ``servekit rollout`` (pids are reused)."""
        return "rollout" in self.argv and pid_matches(self.pid, [" ".join(self.argv)])


def _warn(message: str) -> None:
    print(f"servekit: warning: {message}", file=sys.stderr, flush=True)


class StatusFile:
    """The status document of one model's rollout, replaced whole at each ``write`` (readers never see half).

    A failed write (a full disk) warns once and the rollout goes on: the file is a view, not the record
    (the history is).
    """

    def __init__(
        self,
        path: Path,
        process: RolloutProcess | None = None,
        clock: Callable[[], float] = time.time,
        warn: Callable[[str], None] = _warn,
    ) -> None:
        self.path = Path(path)
        self.process = process or RolloutProcess.current()
        self.clock, self.warn = clock, warn
        self.document: dict[str, Any] = {}
        self._warned = False

    def read(self) -> dict | None:
        return read_status(self.path)

    def start(self, **fields: Any) -> None:
        now = self.clock()
        self.document = {"pid": self.process.pid, "argv": list(self.process.argv), "state": "running",
                         "started_at": now, "outcome": None, **fields}  # fmt: skip
        self.write()

    def write(self, **changes: Any) -> None:
        self.document.update(changes)
        self.document["updated_at"] = self.clock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(self.document, indent=2, sort_keys=True) + "\n")
        except OSError as exc:
            if not self._warned:
                self._warned = True
                self.warn(f"cannot write the rollout status {self.path} ({exc}); the rollout goes on")


def read_status(path: Path) -> dict | None:
    """The status document at ``path``; None when there is none; a one-line error when it is unreadable."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DeployError(f"cannot read the rollout status {path}: {exc}") from None
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise DeployError(f"the rollout status {path} is not valid JSON ({exc}): remove it") from None
    if not isinstance(document, dict) or not isinstance(document.get("model"), str):
        raise DeployError(f"the rollout status {path} is not a rollout status document: remove it")
    return document


def position(status: Mapping[str, Any]) -> str:
    """``step 1/2 at 25%`` (or the phase before the steps) of a status document."""
    if status.get("phase") == "step" and status.get("step"):
        return f"step {status['step']}/{status.get('of', '?')} at {status.get('percent')}%"
    return str(status.get("phase") or "")
