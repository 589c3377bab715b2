"""One-line progress reports for long build steps (training, calibration, export)."""

from __future__ import annotations

import sys
import time


class Progress:
    """Prints ``[model version] step: message (elapsed)`` lines to stderr."""

    def __init__(self, prefix: str, stream=None) -> None:
        self.prefix = prefix
        self.stream = stream or sys.stderr
        self.started = time.perf_counter()

    def __call__(self, message: str) -> None:
        elapsed = time.perf_counter() - self.started
        print(f"[{self.prefix}] {message} ({elapsed:.1f}s)", file=self.stream, flush=True)
