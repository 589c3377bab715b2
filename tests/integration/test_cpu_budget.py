"""Workers share one CPU budget and follow it at runtime (real TorchServe, real scaling; not timed).

Each test gives its server a private worker registry (``SERVEKIT_CPU_REGISTRY``), so workers of
other servers alive in this test session do not count; the registry entries record the thread
count each worker uses now, which is what these tests read.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from handlers.cpu_budget import ENV_CGROUP_ROOT, ENV_LEND, ENV_REGISTRY, cpu_budget, live_members, share
from servekit.serving.server import OPENMP_ENV, OPENMP_USER_KEYS, TorchServeProcess
from tests.integration.conftest import Client, running_torchserve

SETTLE_S = 60.0


def thread_counts(registry: Path) -> dict[int, int]:
    import json

    counts = {}
    for member in live_members(registry):
        record = json.loads((registry / f"{member.pid}.json").read_text())
        counts[member.pid] = record["threads"]
    return counts


def settle(client: Client, registry: Path, workers: int, digit: bytes, budget: int) -> dict[int, int]:
    """Send requests until ``workers`` live workers all hold their share of ``budget``."""
    deadline = time.monotonic() + SETTLE_S
    counts: dict[int, int] = {}
    while time.monotonic() < deadline:
        for _ in range(4):  # every worker gets batches, and so a chance to re-read the registry
            assert client.predict("digits", data=digit).status_code == 200
        counts = thread_counts(registry)
        members = live_members(registry)
        expected = {m.pid: share(budget, members, m.pid) for m in members}
        if len(counts) == workers and counts == expected:
            return counts
        time.sleep(0.3)
    raise AssertionError(f"workers did not settle on {workers} shares of {budget} CPUs: {counts}")


def wait_for_replacement(client: Client, victim: int) -> None:
    """Until TorchServe has replaced the killed worker: two READY workers, neither of them ``victim``."""
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        workers = client.manage("GET", "/models/digits/1.0").json()[0]["workers"]
        ready = [w for w in workers if w.get("status") == "READY"]
        if len(ready) == 2 and victim not in {w.get("pid") for w in workers}:
            return
        time.sleep(0.3)
    raise AssertionError(f"TorchServe did not replace worker {victim} within {SETTLE_S:.0f}s")


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "registry"
    monkeypatch.setenv(ENV_REGISTRY, str(folder))  # inherited by the TorchServe started below
    # Scaling and the quota are about the split among live workers: no share is lent here (lending:
    # test_a_lone_request_gets_the_whole_budget_while_the_other_worker_idles below).
    monkeypatch.setenv(ENV_LEND, "0")
    return folder


@pytest.fixture
def server(tmp_path: Path, model_store: Path, registry: Path) -> Iterator[TorchServeProcess]:
    with running_torchserve(tmp_path / "ts", model_store) as process:
        yield process


def test_threads_follow_scaling_up_down_and_a_killed_worker(
    server: TorchServeProcess, registry: Path, samples_dir: Path
) -> None:
    client = Client(server)
    digit = (samples_dir / "digit_3.png").read_bytes()
    budget = cpu_budget().cpus

    one = settle(client, registry, 1, digit, budget)
    assert list(one.values()) == [budget]

    response = client.manage("PUT", "/models/digits/1.0?min_worker=2&max_worker=2&synchronous=true")
    assert response.status_code == 200, response.text
    two = settle(client, registry, 2, digit, budget)
    assert sum(two.values()) <= max(budget, 2)
    assert all(threads >= 1 for threads in two.values())

    # A worker killed with SIGKILL never unregisters; the survivor and its replacement still settle.
    victim = max(two)
    os.kill(victim, signal.SIGKILL)
    wait_for_replacement(client, victim)  # a request sent before TorchServe notices the death fails (507)
    after_kill = settle(client, registry, 2, digit, budget)
    assert victim not in after_kill

    response = client.manage("PUT", "/models/digits/1.0?min_worker=1&max_worker=1&synchronous=true")
    assert response.status_code == 200, response.text
    back = settle(client, registry, 1, digit, budget)
    assert list(back.values()) == [budget]

    log = (server.workdir / "logs" / "model_log.log").read_text(errors="replace")
    assert "cpu budget: threads - -> " in log
    assert "live servekit workers share a budget of" in log


def test_workers_inherit_the_launchers_short_openmp_spin(
    server: TorchServeProcess, registry: Path, samples_dir: Path
) -> None:
    """The frontend passes the launcher's GOMP_SPINCOUNT on to every worker it starts."""
    if any(key in os.environ for key in OPENMP_USER_KEYS):
        pytest.skip("this environment sets how OpenMP threads wait: the launcher keeps it")
    client = Client(server)
    counts = settle(client, registry, 1, (samples_dir / "digit_4.png").read_bytes(), cpu_budget().cpus)
    for pid in counts:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert f"GOMP_SPINCOUNT={OPENMP_ENV['GOMP_SPINCOUNT']}".encode() in environ, pid


def test_threads_follow_the_cgroup_quota(
    tmp_path: Path, model_store: Path, registry: Path, samples_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A container limited to one CPU (a fake cgroup tree where the workers look) gets one thread."""
    fake = tmp_path / "cgroup"
    # The workers are in this process's cgroups: write the quota where they will look, in both the
    # v2 layout (cpu.max) and the v1 layout (cpu/ cfs files), whichever this machine mounts.
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            folder = fake / path.lstrip("/")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "cpu.max").write_text("100000 100000\n")
        elif "cpu" in controllers.split(","):
            folder = fake / "cpu" / path.lstrip("/")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "cpu.cfs_quota_us").write_text("100000\n")
            (folder / "cpu.cfs_period_us").write_text("100000\n")
    monkeypatch.setenv(ENV_CGROUP_ROOT, str(fake))
    with running_torchserve(tmp_path / "ts", model_store) as process:
        client = Client(process)
        digit = (samples_dir / "digit_8.png").read_bytes()
        counts = settle(client, registry, 1, digit, 1)
        assert list(counts.values()) == [1]
        log = (process.workdir / "logs" / "model_log.log").read_text(errors="replace")
        assert "budget of 1 CPUs (cgroup CPU quota 1 CPUs" in log


def test_a_lone_request_gets_the_whole_budget_while_the_other_worker_idles(
    tmp_path: Path, model_store: Path, registry: Path, samples_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers, one request at a time: the one that takes it computes on every core, the other lending."""
    budget = cpu_budget().cpus
    if budget < 2:
        pytest.skip("lending needs a budget of 2 CPUs or more")
    monkeypatch.setenv(ENV_LEND, "1")
    with running_torchserve(tmp_path / "ts", model_store) as process:
        client = Client(process)
        response = client.manage("PUT", "/models/digits/1.0?min_worker=2&max_worker=2&synchronous=true")
        assert response.status_code == 200, response.text
        digit = (samples_dir / "digit_5.png").read_bytes()
        deadline = time.monotonic() + SETTLE_S
        counts: dict[int, int] = {}
        while time.monotonic() < deadline:
            assert client.predict("digits", data=digit).status_code == 200  # one at a time: the other is idle
            counts = thread_counts(registry)
            if sorted(counts.values()) == [budget, budget]:
                break
        # The worker added second started at its fair share (the first was live): it rose to the whole
        # budget only by borrowing the idle one's CPUs for a lone request (and logged it).
        assert sorted(counts.values()) == [budget, budget], counts
        log = (process.workdir / "logs" / "model_log.log").read_text(errors="replace")
        assert "a lone request borrows" in log
