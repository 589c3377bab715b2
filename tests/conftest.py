"""Shared fixtures; tests are marked unit or integration by the folder they live in."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "unit" in parts:
            item.add_marker(pytest.mark.unit)
        elif "integration" in parts:
            item.add_marker(pytest.mark.integration)


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
    build_all(load_spec(repo_root / "models.yaml"), store, repo_root / "build" / "cache")
    return store
