"""The soak script on a very short run, so that `python -m servekit.perf.soak` cannot rot.

It asserts what must hold on any machine: the run completes on schedule, the scaling calls succeed
and the workers follow them, no request fails outside the scaling window, every answer is the right
digit, and the report and plot are written. The load is capped low and the latency comparison made
generous: this is a 30-second run on a machine other test suites may share, not a measurement.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_short_soak_runs_scales_and_reports(repo_root: Path, model_store: Path, tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "servekit.perf.soak", "--minutes", "0.5", "--capacity-seconds", "4",
        "--max-rate", "25", "--max-p50-ratio", "100", "--max-p99-phase-ratio", "0",
        "--out", str(tmp_path), "--model-store", str(model_store),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, timeout=300, check=False)
    print(result.stdout)
    report = json.loads((tmp_path / "latest.json").read_text())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert report["passed"] is True
    assert all(report["checks"].values()), report["checks"]
    assert report["capacity"]["rps"] > 0
    assert 0 < report["rate_rps"] <= 25
    requests = report["requests"]
    assert requests["sent"] == requests["planned"] == requests["ok"] + requests["errors"] > 0
    assert requests["errors_outside_scaling_window"] == 0
    assert [e["action"] for e in report["scaling"]["events"]] == ["up", "down", "limits"]
    assert [e["ready_workers_after"] for e in report["scaling"]["events"]] == [2, 1, 1]
    assert len(report["per_second"]) == 30
    assert "p99_scaled_phase_within_ratio_of_one_worker" not in report["checks"]  # 30 s: no settled phase
    assert report["phases"]["p99_one_worker_ms"] > 0
    assert sum(row["requests"] for row in report["per_second"]) == requests["sent"]
    assert (tmp_path / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
