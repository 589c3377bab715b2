"""The state lock, atomic replacement and pid-file checks: real files and real processes, no server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from servekit.deploy.proxy import NginxProxy
from servekit.deploy.state_lock import StateLock, StateLockError
from servekit.files import atomic_write_text
from servekit.serving.processes import pid_matches, signal_if_matches, verified_pid
from tests.processes import sleeping_process


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen]:
    """An unrelated process of ours, for a stale pid file to point at; SIGHUP, SIGQUIT or SIGTERM would end it."""
    with sleeping_process() as process:
        yield process


# ------------------------------------------------------------------------------------------ lock
def test_a_second_holder_gives_up_after_the_timeout_naming_the_first(tmp_path: Path) -> None:
    lock = tmp_path / "servekit.lock"
    with StateLock(lock, holder="servekit canary digits 2.0 --percent 20"):
        started = time.monotonic()
        with pytest.raises(StateLockError) as refused:
            StateLock(lock, timeout=0.3).acquire()
        waited = time.monotonic() - started
    assert 0.3 <= waited < 2
    message = str(refused.value)
    assert message.startswith(f"another servekit command holds {lock} (pid {os.getpid()}: servekit canary digits 2.0")
    assert message.endswith("gave up after 0.3s (--lock-timeout)")


def test_the_lock_is_free_again_when_its_holder_is_killed(tmp_path: Path) -> None:
    lock = tmp_path / "servekit.lock"
    code = (
        "import sys, time; from servekit.deploy.state_lock import StateLock; "
        f"StateLock({str(lock)!r}).acquire(); print('held', flush=True); time.sleep(300)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StateLockError):
            StateLock(lock, timeout=0.1).acquire()
    finally:
        holder.kill()
        holder.wait()
    with StateLock(lock, timeout=2):
        pass


def test_the_lock_serialises_read_modify_write_across_threads(tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    counter.write_text("0")

    def bump() -> None:
        with StateLock(tmp_path / "servekit.lock", timeout=30):
            value = int(counter.read_text())
            time.sleep(0.005)  # widen the window a lost update needs
            atomic_write_text(counter, str(value + 1))

    threads = [threading.Thread(target=bump) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counter.read_text() == "20"


# ------------------------------------------------------------------------------------------ atomic writes
def test_concurrent_atomic_writes_leave_one_whole_file_and_no_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    texts = [json.dumps({"writer": i, "pad": "x" * 50_000}) for i in range(16)]
    errors: list[BaseException] = []

    def write(text: str) -> None:
        try:
            for _ in range(10):
                atomic_write_text(target, text)
        except BaseException as exc:  # a shared temp name would fail here (FileNotFoundError on replace)
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(t,)) for t in texts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert target.read_text() in texts
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    assert target.stat().st_mode & 0o777 == 0o644


def test_a_failed_check_keeps_the_old_file_and_removes_the_candidate(tmp_path: Path) -> None:
    target = tmp_path / "nginx.conf"
    target.write_text("old")

    def reject(candidate: Path) -> None:
        assert candidate.read_text() == "new"
        raise ValueError("rejected")

    with pytest.raises(ValueError, match="rejected"):
        atomic_write_text(target, "new", check=reject)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nginx.conf"]


# ------------------------------------------------------------------------------------------ pid files
def test_pid_matches_needs_every_fragment_as_whole_words(sleeper: subprocess.Popen) -> None:
    assert pid_matches(sleeper.pid, ["sleep", "300"])
    assert not pid_matches(sleeper.pid, ["sleep", "30"])
    assert not pid_matches(sleeper.pid, ["nginx: master process"])
    assert not pid_matches(sleeper.pid, [])


def test_pid_matches_is_false_for_a_dead_process() -> None:
    process = subprocess.Popen(["true"])
    process.wait()
    assert not pid_matches(process.pid, ["true"])


def test_a_stale_pid_file_is_reported_removed_and_not_signalled(tmp_path: Path, sleeper: subprocess.Popen) -> None:
    pid_file = tmp_path / "nginx.pid"
    pid_file.write_text(f"{sleeper.pid}\n")
    reported: list[str] = []
    assert verified_pid(pid_file, ["nginx: master process"], warn=reported.append) is None
    assert not pid_file.exists()
    assert reported == [
        f"{pid_file} names pid {sleeper.pid}, which is another process (sleep 300): "
        "removed the stale pid file, nothing signalled"
    ]
    assert sleeper.poll() is None


@pytest.mark.parametrize(("content", "why"), [("garbage", "does not hold a pid"), ("", "does not hold a pid")])
def test_a_pid_file_without_a_pid_is_reported_and_removed(tmp_path: Path, content: str, why: str) -> None:
    pid_file = tmp_path / "nginx.pid"
    pid_file.write_text(content)
    reported: list[str] = []
    assert verified_pid(pid_file, ["nginx"], warn=reported.append) is None
    assert reported == [f"{pid_file} {why}: removed the stale pid file, nothing signalled"]
    assert not pid_file.exists()


def test_signal_if_matches_signals_only_a_matching_process(sleeper: subprocess.Popen) -> None:
    assert signal_if_matches(sleeper.pid, ["nginx: master process"], signal.SIGTERM) is False
    time.sleep(0.1)
    assert sleeper.poll() is None
    assert signal_if_matches(sleeper.pid, ["sleep", "300"], signal.SIGTERM) is True
    assert sleeper.wait(timeout=5) == -signal.SIGTERM


def test_proxy_stop_and_apply_never_signal_the_process_a_stale_pid_file_names(
    tmp_path: Path, sleeper: subprocess.Popen, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(NginxProxy, "check_config", lambda self, candidate: None)  # no nginx needed here
    reported: list[str] = []
    proxy = NginxProxy(tmp_path / "proxy", 18090, "127.0.0.1:8080", warn=reported.append)
    proxy.prefix.mkdir()

    def shadow() -> None:
        state = proxy.current()
        state.model("digits").set_shadow("2.0")
        proxy.apply(state)

    for step in (proxy.stop, shadow):
        proxy.pid_file.write_text(str(sleeper.pid))
        step()
        time.sleep(0.1)
        assert sleeper.poll() is None  # SIGQUIT (stop) or SIGHUP (reload) would have ended it
        assert not proxy.pid_file.exists()
    assert len(reported) == 2
    assert all(f"names pid {sleeper.pid}, which is another process (sleep 300)" in line for line in reported)
    assert proxy.state()["routes"] == {"digits": {"shadow": "2.0"}}
