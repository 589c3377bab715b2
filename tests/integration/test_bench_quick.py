"""The benchmark's quick variant, so `make bench` cannot rot. It asserts completeness, not speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from handlers.model_loading import native_bf16


def test_quick_bench_serves_every_variant_without_errors(repo_root: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "servekit.perf.bench", "--quick", "--concurrency", "1,4", "--out", str(tmp_path)],
        cwd=repo_root,
        capture_output=True,
        text=True,
        # A bound on a hang, not on speed: beside the suite's other two processes it took about 10 minutes, and
        # on a slower CI machine (the whole suite 28 min against 19) it was still measuring at 900 s.
        timeout=1800,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "quick.json").read_text())
    # Every version of bench/models.yaml, the runtime ones (runtime: openvino) under precision_engine keys.
    expected = {"stock", "fp32", "int8", "fp32_openvino", "int8_openvino"}
    expected |= {"bf16", "bf16_openvino"} if native_bf16() else set()
    assert set(report["served"]) == expected
    peers = report["peers"]  # model only, beside ONNX Runtime and OpenVINO (issue 25)
    sides = {(row["precision"], row["side"]) for row in peers["rows"].values()}
    assert {("fp32", "peer"), ("fp32", "servekit"), ("int8", "peer"), ("int8", "servekit")} <= sides
    assert all(row["img_per_s"] > 0 for row in peers["rows"].values())
    for precision in ("fp32", "int8"):
        entry = peers["by_precision"][precision]
        best = peers["rows"][entry["best_servekit"]]["img_per_s"] / peers["rows"][entry["best_peer"]]["img_per_s"]
        assert entry["ratio"] == pytest.approx(best, abs=0.01)
        assert f"model-only {precision}: servekit's best >= 1x the best peer" in report["bars"]
    assert "| **servekit fp32 (openvino runtime)** | fp32 |" in (tmp_path / "quick.md").read_text()
    for key, served in report["served"].items():
        assert [r["concurrency"] for r in served["runs"]] == [1, 4], key
        for run in served["runs"]:
            assert run["requests"] == 4 * run["concurrency"]
            assert run["errors"] == 0, (key, run)
            assert run["rps"] > 0
            assert run["p50_ms"] <= run["p95_ms"] <= run["p99_ms"]
        assert served["cold_start"]["first_status"] == 200
    assert report["served"]["stock"]["settings"]["batch_size"] == 1
    assert report["served"]["int8"]["settings"]["batch_size"] == 8
    for key in ("fp32", "int8"):
        assert report["in_process"][key]["img_per_s"] > 0
    assert report["archives"]["int8_bytes"] < report["archives"]["fp32_bytes"]
    assert [layout["layout"] for layout in report["sweep"]] == [
        "resnet18 2.0 x1",
        "resnet18 2.0 x2",
        "resnet18 2.0 x2 + resnet18_second 2.0 x2",
    ]
    assert all(layout["errors"] == 0 and layout["rps"] > 0 for layout in report["sweep"])
    assert any(name.startswith("sweep:") for name in report["bars"])
    # A lone request (c=1) judged beside the stock handler and the in-process single image (issue 28).
    assert set(report["lone_request"]) >= {"stock", "fp32", "int8"}
    assert report["lone_request"]["fp32"]["in_process_single_ms"] > 0
    assert "fp32 c=1 p50 <= 1.3x in-process single image" in report["bars"]
    oip = report["oip"]  # OIP v2 binary against /predictions: one round of P, OIP, OIP, P per concurrency
    assert [r["concurrency"] for r in oip["runs"]] == [1, 4]
    for pair in oip["runs"]:
        assert len(pair["rounds"]) == 1
        assert pair["oip"]["errors"] == 0
        assert pair["oip_over_predictions"] == pytest.approx(pair["rounds"][0]["ratio"], abs=0.01)
    assert "int8 OIP binary >= 0.97x /predictions at every concurrency" in report["bars"]
    for key in ("stock", "int8"):  # a 4000x3000 phone photo served next to the 640x480 one
        camera = report["served"][key]["camera_photo"]
        assert (camera["concurrency"], camera["requests"], camera["errors"]) == (4, 16, 0), key
        assert camera["over_640x480"] > 0
    assert "int8_camera_over_640x480" in report["ratios"]
    ceiling = report["camera_decode_ceiling"]  # the bare libjpeg decode of the same photo, at 1/8
    assert ceiling["decoded"] == [500, 375]
    assert ceiling["img_per_s"] > 0
    assert report["ratios"]["int8_camera_over_decode_ceiling"] > 0
    overhead = report["metrics_overhead"]  # the same archive with the handler metrics on and off
    assert [len(overhead["runs"][mode]) for mode in ("on", "off")] == [2, 2]
    assert all(r["errors"] == 0 and r["rps"] > 0 for runs in overhead["runs"].values() for r in runs)
    assert overhead["on_over_off"] == pytest.approx(overhead["rps_on"] / overhead["rps_off"], abs=0.01)
    assert "handler metrics cost <= 5% of req/s" in report["bars"]
    small = report["metrics_overhead_small"]  # and the digits model, where a request costs least
    assert small["description"].startswith("digits_v2.0.mar")
    assert all(r["errors"] == 0 and r["rps"] > 0 for runs in small["runs"].values() for r in runs)
    assert "metrics_on_over_off_small" in report["ratios"]
    assert 0 < small["counter_us_per_request"] < small["cpu_us_per_request"]  # the counting's own cost, measured
    tabular = report["tabular"]  # breast_cancer FP32 and INT8, JSON bodies of 64 records
    assert set(tabular["versions"]) == {"1.0", "2.0"}
    for entry in tabular["versions"].values():
        assert [r["concurrency"] for r in entry["runs"]] == [1, 4]
        assert all(r["errors"] == 0 and r["records_per_s"] > 0 for r in entry["runs"])
    assert any(name.startswith("tabular 2.0 (int8) >= 5,000 records/s") for name in report["bars"])
    detector = report["detector"]  # digit_pages FP32 and INT8, one page per request, reported without a bar
    assert set(detector["versions"]) == {"1.0", "2.0"}
    for entry in detector["versions"].values():
        assert [(r["concurrency"], r["requests"], r["errors"]) for r in entry["runs"]] == [(4, 16, 0)]
        assert entry["runs"][0]["pages_per_s"] > 0
    assert {"detector_1.0_pages_per_s", "detector_2.0_pages_per_s"} <= set(report["ratios"])
    assert (tmp_path / "quick.md").read_text().startswith("# Benchmark: ResNet-18")
    assert (tmp_path / "quick_latency_vs_throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
