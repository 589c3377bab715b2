"""Small process helpers shared by the tests that need an unrelated process of their own, or to wait on one."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def sleeping_process(seconds: int = 300) -> Iterator[subprocess.Popen]:
    """A ``sleep`` of ours that has exec'd (before that its command line is the test's), killed on exit."""
    process = subprocess.Popen(["sleep", str(seconds)])
    expected = f"sleep\0{seconds}\0".encode()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{process.pid}/cmdline").read_bytes() == expected:
                break
        except OSError:
            pass
        time.sleep(0.01)
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def wait_for(condition: Callable[[], object], timeout: float = 15.0) -> bool:
    """Poll ``condition`` every 20 ms until it is true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
