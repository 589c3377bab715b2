"""The summary the hostile suites end with: what was sent, what came back, and the workers before and after.

Each suite keeps a ledger (``sent``, ``single``, ``in_batches``, ``batches``, ``statuses``, ``lost``,
``mismatched``) and two snapshots of its workers (``pids``, ``rss``); ``survival_report`` turns them
into one JSON summary, ``publish`` writes it beside the session's temporary files and prints one line.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests


@dataclass
class Workers:
    """A snapshot of a suite's workers: pids per model, and resident memory per pid (bytes)."""

    pids: dict[str, list[int]]
    rss: dict[int, int]


@dataclass
class Ledger:
    """Every request a suite sends, and what became of it (the fields ``survival_report`` reads)."""

    sent: int = 0
    single: int = 0
    batches: int = 0
    in_batches: int = 0
    lost: list[str] = field(default_factory=list)  # no HTTP answer, or a 5xx
    mismatched: list[str] = field(default_factory=list)  # answered, but not as expected
    statuses: Counter = field(default_factory=Counter)

    def record(self, label: str, response: requests.Response | BaseException, problems: list[str]) -> None:
        self.sent += 1
        if isinstance(response, BaseException):
            self.lost.append(f"{label}: no answer: {type(response).__name__}: {response}")
            return
        self.statuses[response.status_code] += 1
        if self.lost_to(response, problems):
            self.lost.append(f"{label}: {response.status_code} {response.text[:200]!r}")
        elif problems:
            self.mismatched.append(f"{label}: {'; '.join(problems)}")

    def lost_to(self, response: requests.Response, problems: list[str]) -> bool:
        """Whether ``response`` counts as lost: any 5xx (a suite that expects some narrows this)."""
        return response.status_code >= 500


def survival_report(ledger: Any, before: Any, after: Any, **head: Any) -> dict:
    """``head`` (the suite's own counts) followed by the parts every suite shares."""
    growth_mb = {pid: (after.rss.get(pid, 0) - rss) / 2**20 for pid, rss in before.rss.items()}
    return {
        **head,
        "requests_sent": ledger.sent,
        "requests_single": ledger.single,
        "requests_in_batches": ledger.in_batches,
        "batches": ledger.batches,
        "requests_lost": len(ledger.lost),
        "requests_mismatched": len(ledger.mismatched),
        "statuses": {str(code): n for code, n in sorted(ledger.statuses.items())},
        "worker_pids_before": before.pids,
        "worker_pids_after": after.pids,
        "worker_rss_mb_before": {str(pid): round(rss / 2**20, 1) for pid, rss in before.rss.items()},
        "worker_rss_mb_after": {str(pid): round(rss / 2**20, 1) for pid, rss in after.rss.items()},
        "worker_rss_growth_mb": {str(pid): round(mb, 1) for pid, mb in growth_mb.items()},
        "lost": ledger.lost,
        "mismatched": ledger.mismatched,
    }


def publish(report: dict, name: str, tmp_path_factory: pytest.TempPathFactory, headline: str, batch_size: int) -> Path:
    """Write ``report`` to ``<basetemp>/name`` and print one line: ``headline``, then the shared counts."""
    path = tmp_path_factory.getbasetemp() / name
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"\n{headline}; {report['requests_sent']} requests sent ({report['requests_single']} alone, "
        f"{report['requests_in_batches']} in {report['batches']} batches of {batch_size}); "
        f"{report['requests_lost']} lost, {report['requests_mismatched']} mismatched; statuses {report['statuses']}; "
        f"worker RSS growth (MB) {report['worker_rss_growth_mb']}; pids {report['worker_pids_after']}; summary: {path}"
    )
    return path
