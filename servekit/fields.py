"""Checks on fields of a YAML mapping, shared by the spec (``servekit.build.spec``) and the rollout's
section of it (``servekit.deploy.rollout.settings``): each raises ``ValueError`` with the field's name
first, and the caller locates it (model, version) in its own error type."""

from __future__ import annotations

from typing import Any


def check_keys(data: dict, valid: set[str], what: str) -> None:
    """Refuse the first key of ``data`` that is not in ``valid``, naming every valid one."""
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown key in {what} (valid keys: {', '.join(sorted(valid))})")


def positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` if it is an integer (not a bool) of at least ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}")
    return value
