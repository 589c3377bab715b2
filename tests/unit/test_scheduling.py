"""make test's scheduler (tests/scheduling.py): a worker that dies costs one failed test, never a hung run.

Each case runs a small suite of its own under pytest-xdist with ``--dist loadfile`` and this project's
scheduler; pytest-xdist 3.8's own scheduler hangs on both (issues #784 and #1378 upstream).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

PASSING = "def test_one():\n    pass\n\n\ndef test_two():\n    pass\n"
CRASHING = "import os\n\n\ndef test_crash():\n    os._exit(3)\n\n\ndef test_after():\n    pass\n"
CASES = {
    # One worker finishes a module, then dies in the next: its finished module must not come back.
    "finished module before the crash": (1, {"test_a.py": PASSING, "test_b.py": CRASHING}, 3),
    # The crash leaves one test of its module for the replacement worker, with more modules queued.
    "replacement given a single test": (
        2,
        {"test_a.py": PASSING, "test_b.py": CRASHING, "test_c.py": PASSING, "test_d.py": PASSING},
        7,
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_crashed_worker_fails_its_test_once_and_the_run_ends(case: str, tmp_path: Path, repo_root: Path) -> None:
    workers, files, passed = CASES[case]
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "conftest.py").write_text("from tests.scheduling import pytest_xdist_make_scheduler  # noqa: F401\n")
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    argv = [sys.executable, "-m", "pytest", "-n", str(workers), "--dist", "loadfile", "-p", "no:cacheprovider",
            "-q", str(tmp_path)]  # fmt: skip
    process = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)  # fmt: skip
    try:
        output, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the run hung after the crash:\n{output[-3000:]}")
    assert process.returncode == 1, output[-3000:]
    assert re.search(r"worker 'gw\d+' crashed while running 'test_b.py::test_crash'", output), output[-3000:]
    assert re.search(rf"\b1 failed, {passed} passed\b", output), output[-3000:]
