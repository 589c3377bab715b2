"""The suite's own guard: a test that leaves a process-wide signal handler changed errors (tests/conftest.py)."""

from __future__ import annotations

import signal

import pytest

from tests.conftest import signals_restored


def _handler(signum: int, frame: object) -> None:  # pragma: no cover - never delivered
    pass


def test_a_handler_left_changed_fails_the_block_and_is_put_back() -> None:
    before = signal.getsignal(signal.SIGHUP)
    with pytest.raises(pytest.fail.Exception, match=r"SIGHUP .*_handler"), signals_restored((signal.SIGHUP,)):
        signal.signal(signal.SIGHUP, _handler)
    assert signal.getsignal(signal.SIGHUP) == before


def test_a_handler_changed_and_restored_passes() -> None:
    with signals_restored((signal.SIGHUP,)):
        previous = signal.signal(signal.SIGHUP, _handler)
        signal.signal(signal.SIGHUP, previous)
