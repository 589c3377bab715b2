"""The machine-wide CPU budget: cgroup quotas, the live-worker registry and each worker's share."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from handlers import cpu_budget
from handlers.cpu_budget import (
    CpuBudget,
    Member,
    cgroup_cpu_limit,
    live_members,
    own_tokens,
    process_start_time,
    share,
)
from tests.processes import sleeping_process

REPO_ROOT = Path(__file__).resolve().parents[2]


def fake_cgroup(root: Path, own: str, limits: dict[str, str], version: str = "v2") -> Path:
    """A cgroup tree under ``root`` with ``cpu.max`` (v2) or cfs files (v1) at the given paths."""
    root.mkdir(parents=True, exist_ok=True)
    proc = root / "proc_self_cgroup"
    if version == "v2":
        proc.write_text(f"0::{own}\n")
        for path, value in limits.items():
            folder = root / path.lstrip("/")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "cpu.max").write_text(value + "\n")
    else:
        proc.write_text(f"5:cpu,cpuacct:{own}\n4:memory:{own}\n")
        for path, value in limits.items():
            folder = root / "cpu" / path.lstrip("/")
            folder.mkdir(parents=True, exist_ok=True)
            quota, period = value.split()
            (folder / "cpu.cfs_quota_us").write_text(quota)
            (folder / "cpu.cfs_period_us").write_text(period)
    (root / own.lstrip("/")).mkdir(parents=True, exist_ok=True)
    return proc


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        ({"/": "max 100000"}, None),
        ({"/kubepods/pod1": "200000 100000"}, 2.0),
        ({"/kubepods/pod1": "150000 100000"}, 1.5),
        ({"/kubepods": "100000 100000", "/kubepods/pod1": "400000 100000"}, 1.0),  # the tighter parent wins
        ({"/kubepods/pod1": "max 100000"}, None),
    ],
)
def test_cgroup_v2_quota(tmp_path: Path, limits: dict[str, str], expected: float | None) -> None:
    proc = fake_cgroup(tmp_path, "/kubepods/pod1", limits)
    assert cgroup_cpu_limit(tmp_path, proc) == expected


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    proc = fake_cgroup(tmp_path, "/docker/abc", {"/docker/abc": "250000 100000"}, version="v1")
    assert cgroup_cpu_limit(tmp_path, proc) == 2.5
    unlimited = fake_cgroup(tmp_path / "u", "/docker/abc", {"/docker/abc": "-1 100000"}, version="v1")
    assert cgroup_cpu_limit(tmp_path / "u", unlimited) is None


def test_budget_is_the_quota_rounded_down_and_capped_by_affinity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpu_budget, "affinity_cpus", lambda: 64)  # a big node ...
    monkeypatch.setattr(cpu_budget, "cgroup_cpu_limit", lambda root=None: 2.5)  # ... a pod limited to 2500m
    budget = cpu_budget.cpu_budget()
    assert budget.cpus == 2
    assert "cgroup CPU quota 2.5 CPUs (64 CPUs visible)" in budget.reason
    monkeypatch.setattr(cpu_budget, "cgroup_cpu_limit", lambda root=None: 0.5)
    assert cpu_budget.cpu_budget().cpus == 1
    monkeypatch.setattr(cpu_budget, "affinity_cpus", lambda: 2)
    monkeypatch.setattr(cpu_budget, "cgroup_cpu_limit", lambda root=None: 8.0)
    assert cpu_budget.cpu_budget().cpus == 2


def members(*spec: tuple[int, int | None]) -> list[Member]:
    return [Member(pid, 0, pinned, "") for pid, pinned in spec]


@pytest.mark.parametrize(
    ("budget", "spec", "expected"),
    [
        (2, [(10, None)], {10: 2}),
        (2, [(10, None), (11, None)], {10: 1, 11: 1}),
        (4, [(10, None), (11, None), (12, None)], {10: 2, 11: 1, 12: 1}),  # remainder to the lowest pid
        (2, [(10, None), (11, None), (12, None)], {10: 1, 11: 1, 12: 1}),  # never below one thread
        (8, [(10, 3), (11, None), (12, None)], {10: 3, 11: 3, 12: 2}),  # pinned threads leave the budget
        (16, [(10, None)] * 1 + [(11, None)], {10: 8, 11: 8}),
    ],
)
def test_share(budget: int, spec: list, expected: dict[int, int]) -> None:
    group = members(*spec)
    assert {m.pid: share(budget, group, m.pid) for m in group} == expected
    if not any(p for _, p in spec) and len(spec) <= budget:
        assert sum(expected.values()) == budget  # the whole budget is used and never exceeded


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen]:
    with sleeping_process(30) as process:
        yield process


def test_registry_drops_dead_and_reused_pids(tmp_path: Path, sleeper: subprocess.Popen) -> None:
    me = CpuBudget("me", registry=tmp_path)
    me.register()
    peer = CpuBudget("peer", registry=tmp_path, pid=sleeper.pid)
    peer.register()
    (tmp_path / "99999999.json").write_text(json.dumps({"pid": 99999999, "started": 1}))  # long gone
    reused = {"pid": sleeper.pid, "started": 1, "pinned": None}  # same pid, another start time
    (tmp_path / "reused.json").write_text(json.dumps(reused))
    (tmp_path / ".123.tmp").write_text("{half written")
    assert [m.pid for m in live_members(tmp_path)] == sorted([os.getpid(), sleeper.pid])
    assert not (tmp_path / "99999999.json").exists()
    assert not (tmp_path / "reused.json").exists()


def test_refresh_follows_workers_joining_and_leaving(
    tmp_path: Path, sleeper: subprocess.Popen, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpu_budget, "REFRESH_SECONDS", 0.0)
    me = CpuBudget("me", registry=tmp_path, budget=cpu_budget.Budget(2, "test budget"), lend=False)
    me.register()
    assert me.refresh(force=True) == (
        2,
        "threads - -> 2: 1 live servekit workers share a budget of 2 CPUs (test budget)",
    )
    assert me.refresh() == (2, None)
    CpuBudget("peer", registry=tmp_path, pid=sleeper.pid).register()
    threads, reason = me.refresh()
    assert threads == 1
    assert reason == "threads 2 -> 1: 2 live servekit workers share a budget of 2 CPUs (test budget)"
    assert json.loads(me.entry.read_text())["threads"] == 1
    sleeper.kill()
    sleeper.wait()
    assert me.refresh()[0] == 2


def test_refresh_is_rate_limited(tmp_path: Path, sleeper: subprocess.Popen) -> None:
    me = CpuBudget("me", registry=tmp_path, budget=cpu_budget.Budget(2, "b"), lend=False)
    me.register()
    me.refresh(force=True)
    CpuBudget("peer", registry=tmp_path, pid=sleeper.pid).register()
    assert me.refresh() == (2, None)  # within REFRESH_SECONDS: the registry is not re-read
    assert me.refresh(force=True)[0] == 1


def test_an_entry_removed_by_mistake_is_written_again(tmp_path: Path) -> None:
    me = CpuBudget("me", registry=tmp_path, budget=cpu_budget.Budget(2, "b"), lend=False)
    me.register()
    me.entry.unlink()
    me.refresh(force=True)
    assert me.entry.is_file()


# ------------------------------------------------------------------------------------------ lending idle CPUs
def pair(tmp_path: Path, sleeper: subprocess.Popen, cpus: int = 2) -> tuple[CpuBudget, CpuBudget]:
    """This process and a stand-in second worker (the sleeper's pid), both lending, on a budget of ``cpus``.

    flock locks belong to open file descriptions, so two budgets in one process exclude each other
    exactly as two worker processes do.
    """
    budget = cpu_budget.Budget(cpus, "test budget")
    me = CpuBudget("me", registry=tmp_path, budget=budget, lend=True, lend_max_requests=1)
    other = CpuBudget("other", registry=tmp_path, budget=budget, pid=sleeper.pid, lend=True, lend_max_requests=1)
    me.register()
    other.register()
    return me, other


def test_own_tokens_are_the_fair_shares_numbered_in_pid_order() -> None:
    two = members((10, None), (11, None))
    assert [own_tokens(4, two, pid) for pid in (10, 11)] == [range(0, 2), range(2, 4)]
    assert [own_tokens(3, two, pid) for pid in (10, 11)] == [range(0, 2), range(2, 3)]  # remainder to the lowest pid
    pinned = members((10, None), (11, None), (12, 1))
    assert [own_tokens(4, pinned, pid) for pid in (10, 11, 12)] == [range(0, 2), range(2, 3), range(0)]
    crowd = members(*((pid, None) for pid in range(10, 16)))  # 6 workers on 2 CPUs: a token each
    assert [own_tokens(2, crowd, pid) for pid in range(10, 16)] == [range(i, i + 1) for i in range(6)]
    assert own_tokens(2, two, 99) == range(0)  # not registered yet: owns nothing


def test_a_lone_request_takes_the_idle_workers_cpu_and_falls_back_when_the_other_gets_work(
    tmp_path: Path, sleeper: subprocess.Popen
) -> None:
    """Two workers, the other idle: ours rises to the whole budget; the other gets work: ours falls back."""
    me, other = pair(tmp_path, sleeper)
    threads, reason = me.claim(requests=1, force=True)
    assert threads == 2
    assert reason == (
        "threads - -> 2: 2 live servekit workers share a budget of 2 CPUs (test budget); "
        "a lone request borrows 1 idle CPU"
    )
    me.release()

    assert other.claim(requests=3, force=True)[0] == 1  # the other gets work (a batch): it takes its own CPU
    assert me.claim(requests=1, force=True) == (
        1,
        "threads 2 -> 1: 2 live servekit workers share a budget of 2 CPUs (test budget)",
    )
    assert sorted(me.held + other.held) == [0, 1]  # ...and never both hold one CPU
    me.release()
    other.release()
    assert me.claim(requests=1)[0] == 2  # the other is idle again: ours takes the whole budget back
    me.release()


def test_a_lone_request_borrows_only_when_every_other_worker_is_idle(tmp_path: Path) -> None:
    """Three workers on two CPUs (a token each): the lone request takes the budget only when both others
    are idle; one of them in a batch is enough for it to keep its one thread, so nothing is oversubscribed."""
    sleepers = [subprocess.Popen(["sleep", "30"]) for _ in range(2)]
    try:
        for process in sleepers:
            while process_start_time(process.pid) is None:
                time.sleep(0.01)
        budget = cpu_budget.Budget(2, "b")
        me = CpuBudget("me", registry=tmp_path, budget=budget, lend=True, lend_max_requests=1)
        others = [CpuBudget(f"w{p.pid}", registry=tmp_path, budget=budget, pid=p.pid, lend=True) for p in sleepers]
        for worker in (me, *others):
            worker.register()
        assert me.claim(requests=1, force=True)[0] == 2  # both others idle: the whole budget (two threads)
        assert len(me.held) == 3  # ...holding every token, so neither can start a batch beside it unseen
        me.release()
        others[1].claim(requests=3, force=True)  # one other worker begins a batch
        assert me.claim(requests=1, force=True)[0] == 1
        assert len(me.held) == 1  # all or none: it gave back what it had taken
        me.release()
        others[1].release()
    finally:
        for process in sleepers:
            process.kill()
            process.wait()


def test_a_batch_of_several_requests_keeps_to_its_fair_share(tmp_path: Path, sleeper: subprocess.Popen) -> None:
    me, _ = pair(tmp_path, sleeper)
    assert me.claim(requests=2, force=True)[0] == 1  # load: no borrowing, the split is the fair one
    assert len(me.held) == 1  # its own CPU only (which one depends on the pids' order)
    me.release()
    assert me.held == []


def test_the_owner_waits_for_its_lent_cpu_until_the_lone_request_ends(
    tmp_path: Path, sleeper: subprocess.Popen
) -> None:
    me, other = pair(tmp_path, sleeper)
    assert me.claim(requests=1, force=True)[0] == 2  # holds the other's CPU too
    got: list[int] = []
    waiter = threading.Thread(target=lambda: got.append(other.claim(requests=8, force=True)[0]))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive()
    assert not got
    me.release()
    waiter.join(5)
    assert got == [1]
    assert other.waited_s >= 0.2
    other.release()


def test_claims_racing_from_many_workers_never_hold_more_cpus_than_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four workers on four CPUs claim lone requests and batches as fast as they can: at no moment are
    more tokens held than there are CPUs, and every worker always holds its own share at least."""
    sleepers = [subprocess.Popen(["sleep", "30"]) for _ in range(3)]
    try:
        for process in sleepers:
            while process_start_time(process.pid) is None:
                time.sleep(0.01)
        budget = cpu_budget.Budget(4, "b")
        workers = [CpuBudget("me", registry=tmp_path, budget=budget, lend=True, lend_max_requests=1)]
        workers += [CpuBudget(f"w{p.pid}", registry=tmp_path, budget=budget, pid=p.pid, lend=True) for p in sleepers]
        for worker in workers:
            worker.register()
        lock, held, peak, problems = threading.Lock(), [0], [0], []

        def run(worker: CpuBudget, seed: int) -> None:
            for step in range(300):
                threads, _ = worker.claim(requests=1 + (step + seed) % 3, force=step == 0)
                with lock:
                    held[0] += len(worker.held)
                    peak[0] = max(peak[0], held[0])
                    if not worker.held or threads != len(worker.held):  # its own CPU, one thread per CPU held
                        problems.append((threads, list(worker.held)))
                time.sleep(0.0002)
                with lock:
                    held[0] -= len(worker.held)
                worker.release()

        threads = [threading.Thread(target=run, args=(w, i)) for i, w in enumerate(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in threads)
        assert not problems
        assert 4 >= peak[0] > 1
    finally:
        for process in sleepers:
            process.kill()
            process.wait()


def free(token: Path) -> bool:
    """Whether no one holds ``token`` now (a non-blocking flock on a new open file description)."""
    descriptor = os.open(token, os.O_RDWR)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(descriptor)
    return True


def test_a_worker_killed_in_a_lone_request_gives_its_cpus_back(tmp_path: Path) -> None:
    """The kernel drops a dead process's locks: what it held (its own CPU and the one it borrowed) is free."""
    script = (
        "import sys, time; from handlers.cpu_budget import CpuBudget, Budget; from pathlib import Path\n"
        "b = CpuBudget('victim', registry=Path(sys.argv[1]), budget=Budget(2, 'b'), lend=True, lend_max_requests=1)\n"
        "b.register(); print(b.claim(requests=1, force=True)[0], flush=True); time.sleep(60)\n"
    )
    victim = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT
    )
    try:
        assert victim.stdout is not None
        assert victim.stdout.readline().strip() == "2"
        assert [free(tmp_path / f"cpu-{index}.lock") for index in (0, 1)] == [False, False]  # it holds both
    finally:
        victim.kill()
        victim.wait()
    me = CpuBudget("me", registry=tmp_path, budget=cpu_budget.Budget(2, "b"), lend=True, lend_max_requests=1)
    me.register()
    assert [free(tmp_path / f"cpu-{index}.lock") for index in (0, 1)] == [True, True]
    assert me.claim(requests=1, force=True)[0] == 2  # a dead worker's locks are gone with it
    me.release()


def test_without_lending_a_claim_is_the_fair_share_and_takes_nothing(tmp_path: Path, sleeper: subprocess.Popen) -> None:
    me = CpuBudget("me", registry=tmp_path, budget=cpu_budget.Budget(2, "b"), lend=False)
    me.register()
    CpuBudget("other", registry=tmp_path, pid=sleeper.pid, lend=False).register()
    assert me.claim(requests=1, force=True)[0] == 1
    assert me.held == []
    assert not list(tmp_path.glob("cpu-*.lock"))


def test_lending_is_on_unless_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cpu_budget.ENV_LEND, raising=False)
    assert cpu_budget.lending() is True
    monkeypatch.setenv(cpu_budget.ENV_LEND, "0")
    assert cpu_budget.lending() is False
    monkeypatch.setenv(cpu_budget.ENV_LEND_MAX_REQUESTS, "4")
    assert cpu_budget.lend_max_requests() == 4
    monkeypatch.setenv(cpu_budget.ENV_LEND_MAX_REQUESTS, "many")
    assert cpu_budget.lend_max_requests() == cpu_budget.LEND_MAX_REQUESTS


def test_workers_get_a_short_openmp_spin_unless_the_environment_sets_how_threads_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lent CPU is free when the inference ends only if the helper thread stops spinning soon after."""
    from servekit.serving.server import OPENMP_ENV, OPENMP_USER_KEYS, TorchServeProcess

    for key in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        monkeypatch.delenv(key, raising=False)
    ours = TorchServeProcess(tmp_path / "a", tmp_path).environment()
    assert ours["GOMP_SPINCOUNT"] == OPENMP_ENV["GOMP_SPINCOUNT"]
    assert int(ours["GOMP_SPINCOUNT"]) < 300_000  # libgomp's default, several ms of a core
    # What a worker started without it advises is what the launcher sets (two copies: the operator side
    # imports nothing of handlers/).
    assert OPENMP_ENV == {cpu_budget.SPIN_ENV: cpu_budget.SHORT_SPIN}
    assert set(OPENMP_USER_KEYS) == set(cpu_budget.WAIT_ENVS)

    given = TorchServeProcess(tmp_path / "b", tmp_path, env={"GOMP_SPINCOUNT": "7"}).environment()
    assert given["GOMP_SPINCOUNT"] == "7"
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    passive = TorchServeProcess(tmp_path / "c", tmp_path).environment()
    assert passive["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "GOMP_SPINCOUNT" not in passive
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("GOMP_SPINCOUNT", "1000000")
    assert TorchServeProcess(tmp_path / "d", tmp_path).environment()["GOMP_SPINCOUNT"] == "1000000"


def test_batches_running_is_true_only_while_a_worker_holds_its_cpus(tmp_path: Path, sleeper: subprocess.Popen) -> None:
    """What an explanation pool asks before each chunk: is some prediction worker in a batch now?"""
    assert not cpu_budget.batches_running(tmp_path / "nowhere")
    me, other = pair(tmp_path, sleeper)
    assert not cpu_budget.batches_running(tmp_path)
    other.hold_own()  # the other worker's batch begins
    assert cpu_budget.batches_running(tmp_path)
    other.release()
    assert not cpu_budget.batches_running(tmp_path)
    me.claim(requests=1)  # a lone request borrows every CPU
    assert cpu_budget.batches_running(tmp_path)
    me.release()
    assert not cpu_budget.batches_running(tmp_path)
    other.hold_own()  # the question itself takes nothing: the workers still get their tokens at once
    assert other.held
    other.release()
