"""One CPU budget for every servekit worker on the machine (or in the container).

TorchServe starts each worker as its own process, and torch sizes its intra-op thread pool once:
N workers each using every core oversubscribe the CPU N times over, which is slower than one
worker. Sizing at start from the archive's ``minWorkers`` is not enough either: scaling, a second
version, another model or a restarted worker change the number of workers sharing the cores.

So every worker registers itself in a registry shared by all workers of this user on the machine
(a directory of one small file per worker, on tmpfs) and, between batches, re-reads who is alive
and resizes ``torch.set_num_threads`` to its share of the budget:

* the budget is the cgroup CPU quota (``cpu.max``, v2, or ``cpu.cfs_quota_us``, v1, the tightest
  on the path to the root) rounded down, capped by the CPUs this process may run on;
* a worker with a pinned thread count (``serving.threads`` in the spec) keeps it and that many
  CPUs are taken out of the budget; the other workers share the rest, the remainder going to the
  lowest pids, at least one thread each;
* a worker is alive while ``/proc/<pid>`` exists with the start time it registered with: a worker
  killed with SIGKILL never unregisters, and its file is ignored (and removed) by the others;
* the budget is work-conserving: a worker is busy while it runs a batch (a ``<pid>.busy`` marker
  beside its entry, made when the batch begins and removed when it ends), and only busy workers
  split the flexible budget: idle ones lend their share. A lone request computes on every core the
  budget has; a worker that gets work takes its share back at once (it counts itself), and the
  others give it back at their next batch. ``SERVEKIT_CPU_LEND=1`` turns lending on; it is off by
  default. In ``make bench`` (2026-12-06 04:34, results/bench/2026-12-06-0434-lending.md) it brought
  FP32's lone-request p50 to 42.5 ms (0.95x the stock handler's; 60.2 ms without), but the same
  run's c=16 rows fell further below the in-process limit than that noisy machine explains
  (INT8 0.62 of it, against 0.99 the run before): between two batches of a loaded worker the other
  sees it idle for a few milliseconds and both may take the whole budget at once, which
  oversubscribes OpenMP's spinning threads. It stays off until a claim that two workers cannot both
  win (and a clean side-by-side run) shows that load loses nothing.

    budget = CpuBudget.create(model="digits", version="1.0", pinned=None)
    budget.register(); threads = budget.refresh(force=True)   # in initialize
    threads = budget.refresh()                                  # before each batch (cheap, rate-limited)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

ENV_REGISTRY = "SERVEKIT_CPU_REGISTRY"  # override the registry folder (tests, several tenants)
ENV_CGROUP_ROOT = "SERVEKIT_CGROUP_ROOT"  # where the cgroup filesystem is mounted (tests use a fake tree)
REFRESH_SECONDS = 0.25  # how often a busy worker re-reads who is alive (who is busy: every batch, one listdir)
ENV_LEND = "SERVEKIT_CPU_LEND"  # "1": idle workers lend their share (off by default: see the module docstring)
BUSY_SUFFIX = ".busy"


def lending() -> bool:
    return os.environ.get(ENV_LEND, "0").strip() == "1"


# ------------------------------------------------------------------------------------------- budget
def affinity_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _own_cgroup(proc_cgroup: Path) -> tuple[str, str]:
    """``("v2", path)`` or ``("v1", path)`` of this process's CPU cgroup, from /proc/self/cgroup."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return "v2", "/"
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3 and "cpu" in parts[1].split(","):
            return "v1", parts[2]
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[0] == "0":
            return "v2", parts[2]
    return "v2", "/"


def _quota_at(folder: Path, kind: str) -> float | None:
    """CPUs allowed by the cgroup at ``folder`` alone, or None for no limit."""
    try:
        if kind == "v2":
            quota, _, period = (folder / "cpu.max").read_text().strip().partition(" ")
            if quota == "max":
                return None
            return int(quota) / int(period or 100000)
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_cpu_limit(root: Path | None = None, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The tightest CPU quota from this process's cgroup up to the root, in CPUs; None if unlimited."""
    root = Path(root or os.environ.get(ENV_CGROUP_ROOT) or "/sys/fs/cgroup")
    kind, own = _own_cgroup(proc_cgroup)
    base = root / "cpu" if kind == "v1" and (root / "cpu").is_dir() else root
    limits = []
    folder = base / own.lstrip("/")
    while True:
        limit = _quota_at(folder, kind)
        if limit is not None:
            limits.append(limit)
        if folder == base or base not in folder.parents:
            break
        folder = folder.parent
    return min(limits) if limits else None


@dataclass(frozen=True)
class Budget:
    cpus: int
    reason: str


def cpu_budget(root: Path | None = None) -> Budget:
    """CPUs the workers may use together: the cgroup quota (rounded down, at least 1) capped by affinity."""
    cores = affinity_cpus()
    limit = cgroup_cpu_limit(root)
    if limit is not None and limit < cores:
        return Budget(max(1, math.floor(limit)), f"cgroup CPU quota {limit:g} CPUs ({cores} CPUs visible)")
    return Budget(cores, f"{cores} CPUs available to this process")


# ------------------------------------------------------------------------------------------- registry
def default_registry() -> Path:
    if env := os.environ.get(ENV_REGISTRY):
        return Path(env)
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return base / f"servekit-cpu-{os.getuid()}"


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot): tells a live pid from a reused one."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class Member:
    pid: int
    started: int
    pinned: int | None
    label: str


def live_members(registry: Path) -> list[Member]:
    """Every registered worker still alive; entries of dead workers are removed."""
    members = []
    try:
        entries = list(registry.iterdir())
    except OSError:
        return []
    for entry in entries:
        if not entry.name.endswith(".json"):
            continue
        try:
            data = json.loads(entry.read_text())
            member = Member(int(data["pid"]), int(data["started"]), data.get("pinned"), str(data.get("label", "")))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written, or not ours
        if process_start_time(member.pid) == member.started:
            members.append(member)
        else:
            entry.unlink(missing_ok=True)
            (registry / f"{member.pid}{BUSY_SUFFIX}").unlink(missing_ok=True)  # it died in a batch
    return sorted(members, key=lambda m: m.pid)


def busy_pids(registry: Path) -> set[int]:
    """The workers in a batch now (their ``<pid>.busy`` markers): one listdir."""
    try:
        names = os.listdir(registry)
    except OSError:
        return set()
    return {int(name[: -len(BUSY_SUFFIX)]) for name in names if name.endswith(BUSY_SUFFIX) and name[0].isdigit()}


def share(budget: int, members: list[Member], pid: int, busy: set[int] | None = None) -> int:
    """Threads for ``pid``: pinned workers keep theirs; the others split what is left, remainder to the lowest pids.

    With ``busy``, only the flexible workers in a batch split it (``pid`` itself always counts: it is about
    to run one): idle workers lend their share. Without it every live worker counts.
    """
    me = next((m for m in members if m.pid == pid), None)
    if me is not None and me.pinned:
        return me.pinned
    flexible = [m for m in members if not m.pinned and (busy is None or m.pid == pid or m.pid in busy)]
    flexible = flexible or [Member(pid, 0, None, "")]
    left = max(budget - sum(m.pinned for m in members if m.pinned), len(flexible))
    base, extra = divmod(left, len(flexible))
    rank = next((i for i, m in enumerate(flexible) if m.pid == pid), len(flexible) - 1)
    return max(1, base + (1 if rank < extra else 0))


@dataclass
class CpuBudget:
    """This worker's place in the machine-wide budget; ``refresh`` returns the thread count to use."""

    label: str
    pinned: int | None = None
    registry: Path = field(default_factory=default_registry)
    budget: Budget = field(default_factory=cpu_budget)
    pid: int = field(default_factory=os.getpid)
    threads: int = 0
    lend: bool = field(default_factory=lending)
    _checked: float = 0.0
    _members: list[Member] = field(default_factory=list)
    _busy: bool = False

    @property
    def entry(self) -> Path:
        return self.registry / f"{self.pid}.json"

    def register(self) -> None:
        """Write (or rewrite) this worker's entry; ``threads`` is what it uses now, for operators and tests."""
        self.registry.mkdir(mode=0o700, parents=True, exist_ok=True)
        record = {
            "pid": self.pid,
            "started": process_start_time(self.pid),
            "pinned": self.pinned,
            "label": self.label,
            "threads": self.threads,
        }
        tmp = self.registry / f".{self.pid}.tmp"
        tmp.write_text(json.dumps(record))
        tmp.replace(self.entry)

    def unregister(self) -> None:
        self.mark_idle()
        self.entry.unlink(missing_ok=True)

    @property
    def busy_marker(self) -> Path:
        return self.registry / f"{self.pid}{BUSY_SUFFIX}"

    def mark_busy(self) -> None:
        """This worker begins a batch (the marker others count; a few microseconds on tmpfs)."""
        if self.lend and not self._busy:
            with contextlib.suppress(OSError):
                os.close(os.open(self.busy_marker, os.O_CREAT | os.O_WRONLY, 0o600))
                self._busy = True

    def mark_idle(self) -> None:
        """The batch ended: this worker's share is free for the busy ones until its next batch."""
        if self._busy:
            self.busy_marker.unlink(missing_ok=True)
            self._busy = False

    def refresh(self, force: bool = False) -> tuple[int, str | None]:
        """``(threads, reason)`` for the batch about to run; ``reason`` is set only when the count changed.

        Who is alive is re-read at most every ``REFRESH_SECONDS``; who is busy, at every call (lending).
        """
        self.mark_busy()
        now = time.monotonic()
        lend = self.lend and not self.pinned
        if force or now - self._checked >= REFRESH_SECONDS:
            self._checked = now
            if not self.entry.is_file():
                self.register()  # removed by someone who thought we were dead, or the registry was wiped
            self._members = live_members(self.registry)
        elif not lend:
            return self.threads, None
        members = self._members
        alive = {m.pid for m in members}
        busy = (busy_pids(self.registry) & alive) if lend else None
        threads = share(self.budget.cpus, members, self.pid, busy)
        if threads == self.threads:
            return threads, None
        previous, self.threads = self.threads, threads
        self.register()
        pinned = f"pinned by serving.threads ({self.pinned})" if self.pinned else None
        idle = 0 if busy is None else sum(1 for m in members if not (m.pinned or m.pid == self.pid or m.pid in busy))
        lent = f"; {idle} idle lend theirs" if idle else ""
        reason = pinned or (
            f"{len(members)} live servekit workers share a budget of {self.budget.cpus} CPUs ({self.budget.reason})"
            f"{lent}"
        )
        return threads, f"threads {previous or '-'} -> {threads}: {reason}"
