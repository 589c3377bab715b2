"""Files replaced whole: readers see the old or the new content, never a half-written file.

``atomic_write_text`` writes through a unique temporary file in the same directory and
``os.replace``: two writers never share a temporary name. Every room writes its state files,
pid files and rendered configurations (nginx, Prometheus, the rollout status) through it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write_text(path: Path, text: str, mode: int = 0o644, check: Callable[[Path], None] | None = None) -> None:
    """Replace ``path`` with ``text`` in one step, through a unique temporary file beside it.

    ``check`` (e.g. ``nginx -t``) runs on the complete temporary file first; if it raises, the
    temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)  # mkstemp creates 0600
        if check is not None:
            check(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
