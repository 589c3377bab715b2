"""make test's xdist scheduler: one module per worker at a time, and no hang after a crashed worker.

pytest-xdist 3.8's ``--dist loadfile`` scheduler deadlocks the run when a worker dies mid-module
(pytest-xdist issues #784, #1323, #1327, #1378): the dead worker's finished modules go back on the
queue as empty work units, and a replacement worker given a single test waits for a second one that
never comes. The run then sits at 99 % until CI's limit. This subclass keeps the scheduling and fixes
the recovery: only unfinished modules are queued again, the test the worker died in is reported once
(as a failure, by xdist) and not run again, every worker keeps two tests queued while work is left,
and all workers are told to finish once the queue is empty.
"""

from __future__ import annotations

from typing import Any

from xdist.scheduler import LoadFileScheduling


class CrashSafeLoadFileScheduling(LoadFileScheduling):
    def remove_node(self, node: Any) -> str | None:
        workload = self.assigned_work.pop(node)
        pending = [(scope, nodeid) for scope, unit in workload.items() for nodeid, done in unit.items() if not done]
        if not pending:
            return None
        scope, crashitem = pending[0]  # a worker runs its tests in order: the first unfinished one killed it
        workload[scope][crashitem] = True  # xdist reports it as failed; running it again proves nothing
        for scope, unit in workload.items():
            if not all(unit.values()):
                self.workqueue[scope] = unit
        for other in list(self.assigned_work):
            self._reschedule(other)
        return crashitem

    def _reschedule(self, node: Any) -> None:
        if node.shutting_down:
            return
        # A worker runs a test once it knows the next one (or is told to finish): keep two queued.
        while self.workqueue and self._pending_of(self.assigned_work[node]) < 2:
            self._assign_work_unit(node)
        if not self.workqueue:
            for each in self.assigned_work:
                if not each.shutting_down:
                    each.shutdown()


def pytest_xdist_make_scheduler(config: Any, log: Any) -> Any:
    if config.getvalue("dist") == "loadfile":
        return CrashSafeLoadFileScheduling(config, log)
    return None
