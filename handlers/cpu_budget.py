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
* the budget is work-conserving, through tokens that two workers cannot both hold: one lock file
  per flexible CPU (``cpu-<i>.lock`` beside the entries; at least one per unpinned worker when
  workers outnumber CPUs), each flexible worker owning a fair range of them (its share, in pid
  order). A worker takes its own tokens (``flock``) when its batch begins and holds them until its
  inference ends; it waits only while a lone request elsewhere still runs on them. Right before the
  inference of a lone request (``LEND_MAX_REQUESTS``), it also tries every other token without
  waiting, all or none: only when every other worker is idle does it borrow, and then it runs with
  the whole flexible budget's threads. Under load some other worker is always in a batch, so nobody
  borrows and the split is the fair one; two workers never hold one CPU, and a worker killed
  mid-batch holds nothing (the kernel drops a dead process's locks). ``SERVEKIT_CPU_LEND=0`` turns
  lending off (each worker keeps its fair share; no tokens are taken).

    budget = CpuBudget(label="digits pid 123", pinned=None)
    budget.register(); threads, why = budget.refresh(force=True)   # in initialize: the fair share
    budget.hold_own()                                                # when a batch begins
    threads, why = budget.claim(requests=len(batch))                 # before its inference
    budget.release()                                                 # when the inference ends
"""

from __future__ import annotations

import contextlib
import fcntl
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
ENV_LEND = "SERVEKIT_CPU_LEND"  # "0": idle workers keep their share to themselves (lending is on by default)
ENV_LEND_MAX_REQUESTS = "SERVEKIT_CPU_LEND_MAX_REQUESTS"  # batches of at most this many requests borrow
LEND_MAX_REQUESTS = 1  # a lone request borrows; a batch of several (load) keeps to its own share
TOKEN_PREFIX, TOKEN_SUFFIX = "cpu-", ".lock"


# libgomp's helper threads spin this many turns after a parallel region before they sleep (its default:
# 300,000, several ms). servekit's launcher sets it for TorchServe, so for every worker: a CPU lent to a
# lone request is then free soon after that request ends (docs/performance.md, "Why a second worker cost
# a lone request 1.5 ms"). It must be in the environment before torch loads libgomp: the worker cannot set it.
SPIN_ENV, SHORT_SPIN = "GOMP_SPINCOUNT", "100000"
WAIT_ENVS = (SPIN_ENV, "OMP_WAIT_POLICY")  # either one set: the operator chose how OpenMP threads wait


def spin_advice(environ: dict[str, str] | os._Environ[str]) -> str | None:
    """One line for the log of a lending worker started without a spin count of its own (a bare ``torchserve``)."""
    if any(key in environ for key in WAIT_ENVS):
        return None
    return (
        f"{SPIN_ENV} is not set: after a lone request this worker's OpenMP threads spin for libgomp's default "
        f"300,000 turns on the CPUs it borrowed, which the next request, in another worker, needs; start "
        f"TorchServe with {SPIN_ENV}={SHORT_SPIN} (servekit's launcher does)"
    )


def lending() -> bool:
    return os.environ.get(ENV_LEND, "1").strip() != "0"


def lend_max_requests() -> int:
    try:
        return max(0, int(os.environ.get(ENV_LEND_MAX_REQUESTS, LEND_MAX_REQUESTS)))
    except ValueError:
        return LEND_MAX_REQUESTS


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


def batches_running(registry: Path | None = None) -> bool:
    """True while some worker of the registry is in a batch, that is, holds a CPU token.

    A worker holds its tokens exclusively from a batch's start to its inference's end. This tries each
    token with a shared lock, without waiting, and gives it back at once (a worker taking it waits
    microseconds at most). For explanation pools (``handlers.explain``), which run only on time the
    prediction workers leave. Without lending no tokens are taken, and this is always False.
    """
    folder = default_registry() if registry is None else registry
    try:
        paths = [entry.path for entry in os.scandir(folder) if entry.name.startswith(TOKEN_PREFIX)]
    except OSError:
        return False
    for path in paths:
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            continue
        else:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
        finally:
            os.close(descriptor)
    return False


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
    return sorted(members, key=lambda m: m.pid)


def share(budget: int, members: list[Member], pid: int) -> int:
    """Threads for ``pid``: pinned workers keep theirs; the others split what is left, remainder to the lowest pids."""
    me = next((m for m in members if m.pid == pid), None)
    if me is not None and me.pinned:
        return me.pinned
    flexible = [m for m in members if not m.pinned] or [Member(pid, 0, None, "")]
    left = max(budget - sum(m.pinned for m in members if m.pinned), len(flexible))
    base, extra = divmod(left, len(flexible))
    rank = next((i for i, m in enumerate(flexible) if m.pid == pid), len(flexible) - 1)
    return max(1, base + (1 if rank < extra else 0))


def flexible_cpus(budget: int, members: list[Member]) -> int:
    """The CPUs left to the unpinned workers: the most threads a lone request gets."""
    return max(0, budget - sum(m.pinned for m in members if m.pinned))


def token_count(budget: int, members: list[Member]) -> int:
    """One token per flexible CPU, and at least one per unpinned worker (more workers than CPUs: each holds
    one while in a batch, so a lone request can see that it is not alone)."""
    return max(flexible_cpus(budget, members), sum(1 for m in members if not m.pinned))


def own_tokens(budget: int, members: list[Member], pid: int) -> range:
    """The tokens ``pid`` owns: its fair share, numbered in pid order (at least one each)."""
    start = 0
    for member in (m for m in members if not m.pinned):
        count = share(budget, members, member.pid)
        if member.pid == pid:
            return range(start, start + count)
        start += count
    return range(0)


@dataclass
class CpuBudget:
    """This worker's place in the machine-wide budget.

    ``refresh`` gives the fair share (at start, and for every batch without lending); ``claim``
    takes the tokens for a batch (its own, and with lending the free ones for a lone request) and
    returns the thread count; ``release`` gives them back when the batch ends.
    """

    label: str
    pinned: int | None = None
    registry: Path = field(default_factory=default_registry)
    budget: Budget = field(default_factory=cpu_budget)
    pid: int = field(default_factory=os.getpid)
    threads: int = 0
    lend: bool = field(default_factory=lending)
    lend_max_requests: int = field(default_factory=lend_max_requests)
    _checked: float = 0.0
    _members: list[Member] = field(default_factory=list)
    _files: dict[int, int] = field(default_factory=dict)  # token -> open descriptor (kept open)
    held: list[int] = field(default_factory=list)  # the tokens held for the running batch
    waited_s: float = 0.0  # time the last claim waited for its own tokens (lent to a lone request)

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
        self.release()
        for descriptor in self._files.values():
            with contextlib.suppress(OSError):
                os.close(descriptor)
        self._files.clear()
        self.entry.unlink(missing_ok=True)

    def _members_now(self, force: bool) -> list[Member]:
        """Who is alive, re-read at most every ``REFRESH_SECONDS`` (or now with ``force``)."""
        now = time.monotonic()
        if force or now - self._checked >= REFRESH_SECONDS:
            self._checked = now
            if not self.entry.is_file():
                self.register()  # removed by someone who thought we were dead, or the registry was wiped
            self._members = live_members(self.registry)
        return self._members

    def _token(self, index: int) -> int:
        descriptor = self._files.get(index)
        if descriptor is None:
            path = self.registry / f"{TOKEN_PREFIX}{index}{TOKEN_SUFFIX}"
            descriptor = self._files[index] = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        return descriptor

    def _take(self, index: int, wait: bool) -> bool:
        try:
            fcntl.flock(self._token(index), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        except OSError:  # the registry vanished under us: run without this token rather than fail the batch
            self._files.pop(index, None)
            return False
        self.held.append(index)
        return True

    def refresh(self, force: bool = False) -> tuple[int, str | None]:
        """``(threads, reason)``: the fair share, without claiming; ``reason`` is set only when the count changed."""
        members = self._members_now(force)
        return self._use(share(self.budget.cpus, members, self.pid), members, lent=0)

    def claim(self, requests: int = 1, force: bool = False, borrow: bool = True) -> tuple[int, str | None]:
        """Take this batch's CPUs: ``(threads, reason)``, ``reason`` set only when the count changed.

        ``borrow=False``: only this worker's own CPUs, whatever the batch (long work: explanations).
        Its own CPUs are taken first if ``hold_own`` has not taken them for this batch yet. Without
        lending, or for a pinned worker, this is ``refresh``: nothing is taken.
        """
        if not self.lend or self.pinned:
            return self.refresh(force)
        members = self._members_now(force)
        own = self.hold_own(members)
        lent, cpus = 0, flexible_cpus(self.budget.cpus, members)
        if borrow and requests <= self.lend_max_requests:
            lent = self._borrow_idle(own, token_count(self.budget.cpus, members))
        return self._use(max(1, min(len(self.held), cpus)), members, lent)

    def _borrow_idle(self, own: range, tokens: int) -> int:
        """Take every other worker's CPUs if, and only if, all of them are free: a lone request borrows only
        on an otherwise idle budget (all or none; under load some worker is always in a batch)."""
        taken: list[int] = []
        for index in (i for i in range(tokens) if i not in own and i not in self.held):
            if not self._take(index, wait=False):
                for back in taken:  # someone is busy: give back what was taken
                    self.held.remove(back)
                    with contextlib.suppress(OSError):
                        fcntl.flock(self._files[back], fcntl.LOCK_UN)
                return 0
            taken.append(index)
        return len(taken)

    def hold_own(self, members: list[Member] | None = None) -> range:
        """Take this worker's own CPUs for the batch that begins (once per batch; ``release`` ends it).

        Held from the batch's start, so no lone request elsewhere borrows them while this worker decodes;
        waits only while one it lent them to is still running, and only while it holds no token (a worker
        that waits holds nothing, so no two wait on each other). Returns the tokens it owns.
        """
        if not self.lend or self.pinned:
            return range(0)
        members = self._members_now(False) if members is None else members
        own = own_tokens(self.budget.cpus, members, self.pid)
        if not self.held:  # never wait while holding a token: membership may have changed since the batch began
            began = time.perf_counter()
            for index in own:  # ascending: a worker waiting for its second token holds only its first, lower one
                self._take(index, wait=True)
            self.waited_s = time.perf_counter() - began
        return own

    def spin_advice(self, environ: dict[str, str] | os._Environ[str] = os.environ) -> str | None:
        """``spin_advice`` for a worker that lends (a pinned worker, or a budget of one CPU, lends nothing)."""
        if not self.lend or self.pinned or self.budget.cpus < 2:
            return None
        return spin_advice(environ)

    def lendable(self) -> int:
        """The most threads a lone request can get: every flexible CPU."""
        return max(1, flexible_cpus(self.budget.cpus, self._members) if self._members else self.budget.cpus)

    def release(self) -> None:
        """The batch ended: every token goes back (the lent ones to their owners, who may be waiting)."""
        while self.held:
            index = self.held.pop()
            with contextlib.suppress(OSError):
                fcntl.flock(self._files[index], fcntl.LOCK_UN)

    def _use(self, threads: int, members: list[Member], lent: int) -> tuple[int, str | None]:
        if threads == self.threads:
            return threads, None
        previous, self.threads = self.threads, threads
        self.register()
        pinned = f"pinned by serving.threads ({self.pinned})" if self.pinned else None
        borrowed = f"; a lone request borrows {lent} idle CPU{'s' if lent > 1 else ''}" if lent else ""
        reason = pinned or (
            f"{len(members)} live servekit workers share a budget of {self.budget.cpus} CPUs ({self.budget.reason})"
            f"{borrowed}"
        )
        return threads, f"threads {previous or '-'} -> {threads}: {reason}"
