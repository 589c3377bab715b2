"""The machine-wide CPU budget: cgroup quotas, the live-worker registry and each worker's share."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from handlers import cpu_budget
from handlers.cpu_budget import CpuBudget, Member, cgroup_cpu_limit, live_members, process_start_time, share


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
    process = subprocess.Popen(["sleep", "30"])
    deadline = time.monotonic() + 10
    while process_start_time(process.pid) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield process
    finally:
        process.kill()
        process.wait()


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


# ------------------------------------------------------------------------------------------ lending idle shares
def test_share_lends_the_shares_of_idle_workers_to_the_busy_ones() -> None:
    group = members((10, None), (11, None), (12, 3))
    assert share(8, group, 10, busy={10}) == 5  # 11 idle lends its share; pinned 12 keeps its 3
    assert share(8, group, 11, busy={10}) == 2  # asking means it is about to run: it counts, and so does 10 (3)
    assert share(8, group, 10, busy={10, 11}) == 3
    assert share(8, group, 10) == 3  # without busy markers every live worker counts, as before lending
    assert share(8, group, 12, busy=set()) == 3  # pinned threads never move


def test_a_busy_worker_takes_the_idle_ones_threads_and_gives_them_back_when_it_gets_work(
    tmp_path: Path, sleeper: subprocess.Popen
) -> None:
    """Two workers, the other one idle: ours rises to the whole budget; the other gets work: ours falls back."""
    me = CpuBudget("me", registry=tmp_path, budget=cpu_budget.Budget(2, "test budget"), lend=True)
    me.register()
    other = CpuBudget("other", registry=tmp_path, pid=sleeper.pid, lend=True)
    other.register()
    threads, reason = me.refresh(force=True)
    assert threads == 2
    assert (
        reason == "threads - -> 2: 2 live servekit workers share a budget of 2 CPUs (test budget); 1 idle lend theirs"
    )
    assert me.busy_marker.exists()

    other.mark_busy()  # the other worker begins a batch
    assert me.refresh() == (1, "threads 2 -> 1: 2 live servekit workers share a budget of 2 CPUs (test budget)")
    other.mark_idle()
    assert me.refresh()[0] == 2  # who is busy is read at every batch, not every REFRESH_SECONDS
    me.mark_idle()
    assert not me.busy_marker.exists()


def test_a_worker_killed_in_a_batch_lends_nothing_and_its_marker_goes(
    tmp_path: Path, sleeper: subprocess.Popen
) -> None:
    me = CpuBudget("me", registry=tmp_path, budget=cpu_budget.Budget(2, "b"), lend=True)
    me.register()
    other = CpuBudget("other", registry=tmp_path, pid=sleeper.pid, lend=True)
    other.register()
    other.mark_busy()
    assert me.refresh(force=True)[0] == 1
    sleeper.kill()
    sleeper.wait()
    assert me.refresh(force=True)[0] == 2
    assert not other.busy_marker.exists()


def test_without_lending_idle_workers_keep_their_share(tmp_path: Path, sleeper: subprocess.Popen) -> None:
    me = CpuBudget("me", registry=tmp_path, budget=cpu_budget.Budget(2, "b"), lend=False)
    me.register()
    CpuBudget("other", registry=tmp_path, pid=sleeper.pid, lend=False).register()
    assert me.refresh(force=True)[0] == 1
    assert not me.busy_marker.exists()


def test_lending_is_off_unless_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cpu_budget.ENV_LEND, raising=False)
    assert cpu_budget.lending() is False
    monkeypatch.setenv(cpu_budget.ENV_LEND, "1")
    assert cpu_budget.lending() is True
