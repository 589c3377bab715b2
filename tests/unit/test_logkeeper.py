"""The proxy's log keeper: size-capped rotation, keep N, and signals only to a verified nginx master."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from servekit.serving.logkeeper import (
    LogKeeper,
    LogKeeperError,
    LogKeeperProcess,
    backup_path,
    reload_nginx,
    rotate,
    run,
)
from servekit.serving.nginx import NginxInstance
from servekit.serving.processes import pid_matches
from tests.processes import sleeping_process, wait_for

# A stand-in for nginx's master: the command line nginx gives itself, and a file written on SIGHUP.
FAKE_MASTER = (
    "import pathlib, signal, sys, time\n"
    "signal.signal(signal.SIGHUP, lambda *_: pathlib.Path(sys.argv[-1]).write_text('reloaded'))\n"
    "time.sleep(60)\n"
)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen]:
    with sleeping_process() as process:
        yield process


def test_rotate_shifts_the_backups_keeps_n_and_never_writes_through_a_link(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    for n, text in ((0, "current"), (1, "one"), (2, "two")):
        (backup_path(path, n) if n else path).write_text(text)
    assert rotate(path, keep=2)
    assert not path.exists()
    assert (backup_path(path, 1).read_text(), backup_path(path, 2).read_text()) == ("current", "one")
    assert not backup_path(path, 3).exists()  # "two" was the oldest beyond keep: dropped
    target = tmp_path / "target"
    target.write_text("keep me")
    path.write_text("new")
    backup_path(path, 2).unlink()
    backup_path(path, 1).unlink()
    backup_path(path, 1).symlink_to(target)  # planted at a backup's name
    assert rotate(path, keep=1)
    assert (backup_path(path, 1).read_text(), target.read_text()) == ("new", "keep me")
    assert not backup_path(path, 1).is_symlink()


def test_the_keeper_rotates_only_regular_files_over_the_cap_and_reloads_nginx_once(tmp_path: Path) -> None:
    big, small, linked = tmp_path / "requests.jsonl", tmp_path / "error.log", tmp_path / "access.log"
    big.write_bytes(b"x" * 5000)
    small.write_bytes(b"x" * 100)
    (tmp_path / "elsewhere").write_bytes(b"x" * 9000)
    linked.symlink_to(tmp_path / "elsewhere")
    reopened: list[int] = []
    keeper = LogKeeper([big, small, linked, tmp_path / "missing.log"], lambda: reopened.append(1) or True,
                       max_bytes=4096, keep=2)  # fmt: skip
    assert keeper.check() == [big]
    assert reopened == [1]
    assert (backup_path(big, 1).stat().st_size, small.stat().st_size) == (5000, 100)
    assert linked.is_symlink()
    assert not backup_path(linked, 1).exists()
    assert keeper.check() == []  # nothing over the cap: nginx is left alone
    assert reopened == [1]
    for _ in range(3):  # three more rotations, two files kept
        big.write_bytes(b"y" * 4097)
        assert keeper.check() == [big]
    assert sorted(p.name for p in tmp_path.glob("requests.jsonl*")) == ["requests.jsonl.1", "requests.jsonl.2"]
    assert reopened == [1] * 4


def test_a_keeper_that_cannot_reach_nginx_warns_once(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    warnings: list[str] = []
    keeper = LogKeeper([path], lambda: False, max_bytes=4096, keep=1, warn=warnings.append)
    for _ in range(3):
        path.write_bytes(b"x" * 5000)
        assert keeper.check() == [path]
    assert warnings == ["rotated logs but nginx's master could not be verified: nothing signalled"]
    assert keeper.check() == []  # and nothing opened a new requests.jsonl since the last rotation
    assert keeper.check() == []
    assert warnings[1:] == [
        f"nginx did not open a new requests.jsonl after its rotation: it may still write requests.jsonl.1 "
        f"(see {tmp_path / 'error.log'})"
    ]


def test_the_keeper_signals_only_a_verified_nginx_master(tmp_path: Path, sleeper: subprocess.Popen) -> None:
    nginx = NginxInstance(tmp_path / "proxy")
    nginx.prefix.mkdir()
    assert reload_nginx(nginx) is False  # no pid file
    nginx.pid_file.write_text(f"{sleeper.pid}\n")
    assert reload_nginx(nginx) is False
    time.sleep(0.1)
    assert sleeper.poll() is None  # SIGHUP would have ended it
    assert nginx.pid_file.read_text() == f"{sleeper.pid}\n"  # nginx's pid file is not the keeper's to remove
    flag = tmp_path / "reloaded"
    argv = ["nginx: master process", "-c", FAKE_MASTER, "-p", str(nginx.prefix), "-c", str(nginx.conf), str(flag)]
    master = subprocess.Popen(argv, executable=sys.executable)
    try:
        assert wait_for(lambda: pid_matches(master.pid, nginx.master_fragments))
        nginx.pid_file.write_text(f"{master.pid}\n")
        time.sleep(0.3)  # let it install its handler
        assert reload_nginx(nginx) is True
        assert wait_for(flag.exists)
    finally:
        master.kill()
        master.wait()


def test_the_keeper_loop_ends_once_nginx_is_gone_for_two_checks(tmp_path: Path) -> None:
    checks: list[int] = []

    class Counting(LogKeeper):
        def check(self) -> list[Path]:
            checks.append(1)
            return []

    alive = iter([True, False, True, False, False, True])
    run(Counting([tmp_path / "x"], lambda: True), 0.01, lambda: next(alive), threading.Event())
    assert len(checks) == 5
    stop = threading.Event()
    stop.set()
    run(Counting([tmp_path / "x"], lambda: True), 0.01, lambda: True, stop)
    assert len(checks) == 5


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_bytes": 100}, "log max_bytes: must be a whole number of bytes >= 4096, got 100"),
        ({"keep": 0}, "log keep: must be a whole number of rotated files from 1 to 100, got 0"),
        ({"interval": 0}, "log check interval: must be from 0.05 to 60 seconds, got 0"),
    ],
)
def test_keeper_settings_are_validated(tmp_path: Path, settings: dict, message: str) -> None:
    with pytest.raises(LogKeeperError, match=f"^{message}$"):
        LogKeeperProcess(tmp_path, [tmp_path / "requests.jsonl"], **settings)


def test_the_keeper_process_is_stopped_by_its_verified_pid_and_exits_without_nginx(
    tmp_path: Path, sleeper: subprocess.Popen
) -> None:
    warnings: list[str] = []
    keeper = LogKeeperProcess(tmp_path, [tmp_path / "requests.jsonl"], interval=5.0, warn=warnings.append)
    keeper.pid_file.write_text(f"{sleeper.pid}\n")
    assert keeper.stop() is False  # a stale pid file naming our sleep: removed, nothing signalled
    assert sleeper.poll() is None
    assert len(warnings) == 1
    assert "which is another process (sleep 300)" in warnings[0]
    keeper.start()
    pid = keeper.running_pid()
    assert pid is not None
    assert keeper.stop() is True
    assert not pid_matches(pid, keeper.fragments)
    assert not keeper.pid_file.exists()
    # No nginx under the prefix: the keeper exits by itself after two checks and removes its pid file.
    fast = LogKeeperProcess(tmp_path, [tmp_path / "requests.jsonl"], interval=0.05, warn=warnings.append)
    fast.start()
    assert wait_for(lambda: not fast.pid_file.exists())
    assert fast.running_pid() is None
    assert len(warnings) == 1
