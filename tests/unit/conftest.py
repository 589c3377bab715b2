"""Unit tests never join the machine-wide CPU budget of real workers (handlers.cpu_budget)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from handlers.cpu_budget import ENV_REGISTRY


@pytest.fixture(scope="session", autouse=True)
def private_cpu_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Session-wide, so that module-scoped handler fixtures are covered too."""
    registry = tmp_path_factory.mktemp("cpu-registry")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENV_REGISTRY, str(registry))
        yield registry
