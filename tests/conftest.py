"""Shared fixtures; tests are marked unit or integration by the folder they live in."""

from __future__ import annotations

import contextlib
import fcntl
import signal
import sys
import threading
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.scheduling import pytest_xdist_make_scheduler  # noqa: E402, F401  (make test's scheduler: no hang after a crash)

# The longest modules (make test's --durations, 2 cores), sent to the workers first: `make test` runs
# the suite in 3 processes, one module per process at a time (pytest-xdist --dist loadfile), so a
# long module started last would leave the others idle while it finishes.
LONGEST_FIRST = (
    "integration/test_container.py",  # about 10 min on a busy machine: builds the image (~6 GB) once, then runs it
    "integration/test_bench_quick.py",  # about 2.5 min: every bench variant once
    "integration/test_byom.py",
    "integration/test_soak_short.py",
    "integration/test_rollout.py",
    "integration/test_rolling_update.py",
    "integration/test_monitoring.py",
    "integration/test_text_example.py",
    "integration/test_faults.py",
    "unit/test_byom.py",
    "unit/test_build_archives.py",
    "integration/test_cpu_budget.py",
    "integration/test_deploy.py",
    "integration/test_store_confinement.py",
    "unit/test_init.py",
)


def _rank(item: pytest.Item) -> int:
    path = Path(str(item.fspath)).as_posix()
    return next((i for i, tail in enumerate(LONGEST_FIRST) if path.endswith(tail)), len(LONGEST_FIRST))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "unit" in parts:
            item.add_marker(pytest.mark.unit)
        elif "integration" in parts:
            item.add_marker(pytest.mark.integration)
    items.sort(key=_rank)  # stable: every module keeps its own order


# Signals whose handlers code under test installs (the rollout, the companions' and servers' mains). A
# test that changes one in the runner's process and leaves it changed alters every later test in that
# process: a pytest-xdist worker once died of a SIGTERM meant for a handler a test had already removed.
WATCHED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@pytest.fixture(autouse=True)
def signal_handlers_restored():
    """Every test leaves the process's handlers of ``WATCHED_SIGNALS`` as it found them (``signals_restored``)."""
    with signals_restored():
        yield


@contextlib.contextmanager
def signals_restored(signals: tuple[signal.Signals, ...] = WATCHED_SIGNALS):
    """Fails (``pytest.fail``) if the block left a handler of ``signals`` changed, after putting it back, so
    that later tests in the same process run with the runner's own handlers. Off the main thread: no check."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {sig: signal.getsignal(sig) for sig in signals}
    yield
    left = {sig: signal.getsignal(sig) for sig in signals}
    changed = [sig for sig in signals if left[sig] != before[sig]]
    for sig in changed:
        signal.signal(sig, before[sig] if before[sig] is not None else signal.SIG_DFL)
    if changed:
        names = ", ".join(f"{sig.name} ({before[sig]!r} -> {left[sig]!r})" for sig in changed)
        pytest.fail(f"the test left the process's signal handlers changed: {names}; restore them (try/finally)")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    return REPO_ROOT / "samples"


@pytest.fixture(scope="session")
def model_store(repo_root: Path) -> Path:
    """The repo's model store, brought up to date with models.yaml first (up-to-date versions are skipped).

    Every test that reads the built archives depends on this fixture, so none of them can skip or
    test stale archives because `make archive` did not run.
    """
    from servekit.build.archive import build_all
    from servekit.build.spec import load_spec

    store = repo_root / "model_store"
    lock = repo_root / "build" / "model_store.lock"  # make test's parallel workers: one builds, the rest wait
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        build_all(load_spec(repo_root / "models.yaml"), store, repo_root / "build" / "cache")
    return store
