"""The worker guard: a TorchServe Python worker refuses to run code that is not an unpacked archive.

The management guard (``servekit.serving.guard``) confines HTTP registrations to archives of the store,
but TorchServe 0.12 also serves a gRPC management API (loopback, token-protected, cannot be turned
off) whose ``RegisterModel`` accepts a local directory path: the directory is symlinked into the
frontend's temporary folder and its handler code runs in a new worker. The frontend puts the
model's canonical (symlink-resolved) directory first on the worker's ``PYTHONPATH``: for an archive
that is ``$TMPDIR/models/<hash>``, for a directory registration it is the directory itself.

A ``.pth`` file in the environment's site-packages runs ``check()`` (this file, executed by path,
so nothing on the model's ``PYTHONPATH`` can shadow it) at the start of every Python process,
before ``site`` imports anything else. It acts only in a TorchServe worker started by our launcher
(``SERVEKIT_MODELS_ROOT`` set): if the model directory is not inside that root, the worker exits
before importing TorchServe or any handler code, and the registration never gets a worker.
Standard library only: it runs before anything else is importable.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

ENV_ROOT = "SERVEKIT_MODELS_ROOT"
PTH_NAME = "servekit_worker_guard.pth"
WORKER_SCRIPT = "model_service_worker.py"
EXIT_CODE = 3


def _command_line() -> list[str]:
    try:
        with open("/proc/self/cmdline", "rb") as handle:
            return [part.decode("utf-8", "replace") for part in handle.read().split(b"\0") if part]
    except OSError:
        return list(sys.argv)


def refusal(environ: dict[str, str], command: list[str]) -> str | None:
    """Why this process must not run, or None: only TorchServe workers under our launcher are checked."""
    root = environ.get(ENV_ROOT)
    if not root or not any(part.endswith(WORKER_SCRIPT) for part in command):
        return None
    first = environ.get("PYTHONPATH", "").split(os.pathsep)[0]
    if not first:
        return "no model directory on PYTHONPATH"
    model_dir = os.path.realpath(first)
    allowed = os.path.realpath(root)
    if os.path.commonpath([model_dir, allowed]) != allowed or model_dir == allowed:
        return f"model directory {model_dir} is not an archive unpacked under {allowed}"
    return None


def check() -> None:
    reason = refusal(dict(os.environ), _command_line())
    if reason is not None:
        sys.stderr.write(f"servekit worker guard: refusing to start this worker: {reason}\n")
        sys.stderr.flush()
        os._exit(EXIT_CODE)


def pth_line() -> str:
    here = str(Path(__file__).resolve())
    # One line, executed by site.py for every interpreter start; cheap unless the variable is set.
    return (
        f"import os; os.environ.get({ENV_ROOT!r}) and exec(compile(open({here!r}).read() + '\\ncheck()', "
        f"{here!r}, 'exec'), {{'__name__': 'servekit_worker_guard', '__file__': {here!r}}})\n"
    )


def ensure_installed() -> Path:
    """Write (or refresh) the ``.pth`` file in this interpreter's site-packages; returns its path."""
    target = Path(sysconfig.get_paths()["purelib"]) / PTH_NAME
    line = pth_line()
    if not target.is_file() or target.read_text() != line:
        tmp = target.with_name(f".{PTH_NAME}.{os.getpid()}.tmp")
        tmp.write_text(line)
        tmp.replace(target)
    return target
