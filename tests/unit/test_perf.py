"""The statistics the benchmark and the soak share, and the soak's pure steps: no server."""

from __future__ import annotations

from pathlib import Path

import pytest

from servekit.perf import soak
from servekit.perf.soak import Result, Scaler, latency_comparison, per_second, phase_p99, retried, scaling_window
from servekit.perf.stats import ms, percentile


# ------------------------------------------------------------------------------------------ percentile
def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 95) == 95  # 0.95 * 100 is 94.99999999999999 in binary: the rank must not slip
    assert percentile(values, 99) == 99  # rounding half to even gave the maximum here
    assert percentile(values, 100) == 100
    assert percentile(values, 0) == 1
    assert percentile(reversed(values), 99) == 99  # any order
    assert percentile(list(range(1, 1001)), 99.9) == 999


def test_percentile_of_few_values_and_of_none() -> None:
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0], 50) == 1.0
    assert percentile([1.0, 2.0], 51) == 2.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match="between 0 and 100"):
        percentile([1.0], 101)


def test_ms_rounds_and_keeps_none() -> None:
    assert ms(0.0123456) == 12.35
    assert ms(None) is None


# ------------------------------------------------------------------------------------------ soak steps
def test_scaling_window_runs_from_the_scale_up_call_to_grace_after_the_last_call() -> None:
    events = [
        {"action": "up", "t_start": 12.0, "t_end": 15.5},
        {"action": "down", "t_start": 18.0, "t_end": 18.4},
        {"action": "limits", "t_start": 18.4, "t_end": 18.6},
    ]
    assert scaling_window(events, t_up=12.0, seconds=30.0, grace=5.0) == (12.0, 23.6)
    assert scaling_window([], t_up=12.0, seconds=30.0, grace=5.0) == (12.0, 35.0)  # no call made: the planned span


def test_latency_comparison_takes_the_first_and_last_quarter_of_a_short_run() -> None:
    results = [Result(due=t, latency=0.010, status=200) for t in range(0, 10)]
    results += [Result(due=t, latency=0.030, status=200) for t in range(30, 40)]
    results += [Result(due=39.5, latency=9.0, status=503)]  # errors do not count as latency
    comparison = latency_comparison(results, seconds=40.0, max_ratio=1.5)
    assert comparison == {"span_s": 10.0, "p50_first_ms": 10.0, "p50_last_ms": 30.0, "ratio": 3.0, "max_ratio": 1.5}
    assert latency_comparison([], seconds=40.0, max_ratio=1.5)["ratio"] is None


def test_phase_p99_compares_the_one_worker_phase_with_the_settled_scaled_up_phase() -> None:
    events = [{"action": "up", "t_start": 100.0, "t_end": 104.0}, {"action": "down", "t_start": 200.0, "t_end": 201.0}]
    results = [Result(due=t, latency=0.010, status=200) for t in range(0, 100)]
    results += [Result(due=102.0, latency=5.0, status=200)]  # while scaling, before the grace: not judged
    results += [Result(due=t, latency=0.025, status=200) for t in range(110, 200)]
    results += [Result(due=150.0, latency=9.0, status=503)]  # errors are not latency
    phases = phase_p99(results, events, grace=5.0, max_ratio=2.0)
    assert phases == {"p99_one_worker_ms": 10.0, "p99_scaled_ms": 25.0, "scaled_window_s": [109.0, 200.0],
                      "ratio": 2.5, "max_ratio": 2.0}  # fmt: skip
    assert phase_p99(results, events[:1], grace=5.0, max_ratio=2.0)["ratio"] is None


def test_per_second_buckets_by_due_time() -> None:
    results = [Result(0.1, 0.02, 200), Result(0.6, 0.04, 200), Result(1.2, 5.0, -1, "ConnectionError")]
    rows = per_second(results, seconds=3, workers={0: 1, 1: 2})
    assert [(r["t"], r["requests"], r["ok"], r["errors"], r["workers"]) for r in rows] == [
        (0, 2, 2, 0, 1),
        (1, 1, 0, 1, 2),
        (2, 0, 0, 0, None),
    ]
    assert (rows[0]["p50_ms"], rows[0]["p99_ms"], rows[0]["max_ms"]) == (20.0, 40.0, 40.0)
    assert rows[1]["p50_ms"] is None


class _Answer:
    def __init__(self, status: int, body: dict) -> None:
        self.status_code, self._body, self.text = status, body, str(body)

    def json(self) -> dict:
        return self._body


class _ScalingClient:
    """Answers each PUT with the next of ``statuses`` and records the paths it was sent."""

    def __init__(self, *statuses: int) -> None:
        self.statuses, self.paths = list(statuses), []

    def call(self, kind: str, method: str, path: str, **kwargs) -> _Answer:
        assert (kind, method) == ("management", "PUT")
        self.paths.append(path)
        status = self.statuses.pop(0)
        message = "Workers scaled" if status == 200 else "java.util.ConcurrentModificationException"
        return _Answer(status, {"status": message} if status == 200 else {"code": status, "message": message})


def test_a_scaling_call_answered_500_is_sent_once_more_and_both_answers_are_kept(monkeypatch) -> None:
    monkeypatch.setattr(soak, "SCALE_RETRY_PAUSE_S", 0.0)
    client = _ScalingClient(500, 200)
    event = Scaler(client, "m", "1.0").scale(1, 1)
    assert len(client.paths) == 2
    assert client.paths[0] == client.paths[1]
    assert "min_worker=1&max_worker=1&synchronous=true" in client.paths[0]
    assert event["status"] == 200
    assert event["message"] == "Workers scaled"
    assert [a["status"] for a in event["attempts"]] == [500, 200]
    assert retried(event) == " (after 500: java.util.ConcurrentModificationException)"


def test_a_scaling_call_is_retried_only_after_500_and_only_once(monkeypatch) -> None:
    monkeypatch.setattr(soak, "SCALE_RETRY_PAUSE_S", 0.0)
    refused = _ScalingClient(400)  # a refusal is an answer: no retry
    assert Scaler(refused, "m", "1.0").scale(1, 1)["status"] == 400
    assert len(refused.paths) == 1
    broken = _ScalingClient(500, 500, 200)  # still 500 after the retry: the call failed
    event = Scaler(broken, "m", "1.0").scale(2, 2)
    assert event["status"] == 500
    assert len(broken.paths) == 2
    assert broken.statuses == [200]
    ok = _ScalingClient(200)
    event = Scaler(ok, "m", "1.0").scale(2, 2)
    assert event["status"] == 200
    assert len(ok.paths) == 1
    assert retried(event) == ""


# ------------------------------------------------------------------------------------------ bench: OIP row
def _oip_reply(version: str = "2.0") -> tuple[dict, bytes]:
    """A real binary OIP answer, encoded by the handler's own protocol code."""
    from handlers.protocols import Call, Classification, ProtocolConfig

    config = ProtocolConfig()
    call = Call("oip_v2", [b"jpeg"], [], outputs=[(name, True) for name in config.outputs])
    reply = call.encode([Classification(["cat", "dog"], [3, 5], [0.75, 0.25])], "resnet18", version, config)
    return reply.headers, reply.body


def test_oip_binary_body_is_a_json_header_then_one_bytes_element() -> None:
    import json
    import struct

    from servekit.perf.bench import oip_binary_body

    jpeg = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 3 + b"\xff\xd9"
    body, header_length = oip_binary_body(jpeg, "photo")
    document = json.loads(body[:header_length])
    assert document == {
        "inputs": [
            {"name": "photo", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 4 + len(jpeg)}}
        ],
        "parameters": {"binary_data_output": True},
    }
    tail = body[header_length:]
    assert len(tail) == 4 + len(jpeg)
    assert struct.unpack("<I", tail[:4]) == (len(jpeg),)
    assert tail[4:] == jpeg
    assert oip_binary_body(jpeg)[0][: oip_binary_body(jpeg)[1]].startswith(b'{"inputs":[{"name":"image"')
    with pytest.raises(ValueError, match="empty"):
        oip_binary_body(b"")


def test_oip_binary_body_is_what_the_handler_decodes() -> None:
    from handlers.protocols import ProtocolConfig, decode
    from servekit.perf.bench import oip_binary_body

    config = ProtocolConfig()
    body, header_length = oip_binary_body(b"\xff\xd8 not really a jpeg \xff\xd9", config.image_input)
    call = decode({"body": body}, {"inference-header-content-length": str(header_length)}, config, (3, 224, 224))
    assert call.protocol == "oip_v2"
    assert call.images == [b"\xff\xd8 not really a jpeg \xff\xd9"]
    assert call.outputs == [(name, True) for name in config.outputs]


def test_check_oip_answer_accepts_a_binary_answer_naming_the_outputs() -> None:
    from handlers.protocols import ProtocolConfig
    from servekit.perf.bench import check_oip_answer

    headers, body = _oip_reply()
    lower_case = {name.lower(): value for name, value in headers.items()}
    found = check_oip_answer(200, lower_case, body, ProtocolConfig().outputs, "2.0")
    assert found["outputs"] == ["labels", "scores", "indices"]
    assert found["model_version"] == "2.0"
    assert found["json_header_bytes"] + found["binary_bytes"] == len(body)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s, h, b: (503, h, b'{"code": 503, "error": "busy"}'), "answered 503, not 200: .*busy"),
        (lambda s, h, b: (s, {}, b), "no Inference-Header-Content-Length"),
        (lambda s, h, b: (s, {"Inference-Header-Content-Length": "x"}, b), "not an integer"),
        (lambda s, h, b: (s, {"Inference-Header-Content-Length": str(len(b) + 1)}, b), "the body has"),
        (lambda s, h, b: (s, h, b"[" + b[1:]), "does not parse"),
        (lambda s, h, b: (s, h, b[:-1]), "follow the JSON header"),
    ],
)
def test_check_oip_answer_fails_the_bench_with_what_is_wrong(change, message: str) -> None:
    from servekit.perf.bench import BenchError, check_oip_answer

    status, headers, body = change(200, *_oip_reply())
    with pytest.raises(BenchError, match=message):
        check_oip_answer(status, headers, body, ["labels", "scores", "indices"])


def test_check_oip_answer_wants_every_output_and_the_version() -> None:
    from servekit.errors import ServekitError
    from servekit.perf.bench import BenchError, check_oip_answer

    headers, body = _oip_reply(version="1.0")
    with pytest.raises(BenchError, match=r"not \['probabilities'\]"):
        check_oip_answer(200, headers, body, ["labels", "probabilities"])
    with pytest.raises(ServekitError, match="answered by version '1.0', not '2.0'"):  # main() reports ServekitError
        check_oip_answer(200, headers, body, ["labels"], "2.0")


def _run(concurrency: int, rps: float, errors: int = 0) -> dict:
    return {
        "concurrency": concurrency,
        "requests": 100,
        "errors": errors,
        "rps": rps,
        "p50_ms": 10.0,
        "p95_ms": 20.0,
        "p99_ms": 30.0,
    }


def _fabricated_result(oip_rps: float, oip_errors: int = 0) -> dict:
    """A result as main() assembles it, with round numbers: int8 /predictions does 200 req/s at c=16."""
    cold = {
        "first_status": 200,
        "registration_s": 1.0,
        "registration_to_first_answer_s": 1.1,
        "first_answer_ms": 12.0,
        "steady_p50_ms": 10.0,
        "first_over_steady_p50": 1.2,
    }
    settings = {"workers": 2, "batch_size": 8, "max_batch_delay_ms": 2}
    served = {
        key: {"description": key, "settings": settings, "cold_start": cold, "runs": [_run(1, rps / 4), _run(16, rps)]}
        for key, rps in (("stock", 10.0), ("fp32", 50.0), ("int8", 200.0))
    }
    oip_runs = []
    for predictions, oip in zip(served["int8"]["runs"], (_run(1, oip_rps / 4), _run(16, oip_rps, oip_errors))):
        short = {key: predictions[key] for key in ("requests", "errors", "rps", "p50_ms", "p99_ms")}
        ratio = round(oip["rps"] / predictions["rps"], 2)
        rounds = [{"predictions_rps": [predictions["rps"]] * 2, "oip_rps": [oip["rps"]] * 2, "ratio": ratio}]
        oip_runs.append(
            {"concurrency": oip["concurrency"], "predictions": short, "oip": oip, "rounds": rounds,
             "oip_over_predictions": ratio}
        )  # fmt: skip
    return {
        "date": "2025-01-01 00:00 UTC",
        "quick": True,
        "machine": {
            "cpu": "test cpu",
            "cores": 2,
            "memory_gib": 4.0,
            "python": "3.11",
            "torch": "2",
            "torchserve": "0",
        },
        "in_process": {
            key: {"best_batch": 8, "decode": "serial", "img_per_s": 220.0, "by_batch": {1: 100.0, 8: 220.0}}
            for key in ("fp32", "int8")
        },
        "served": served,
        "oip": {
            "variant": "int8",
            "predictions_route": "/predictions/resnet18/2.0",
            "oip_route": "/v2/models/resnet18/infer",
            "body_bytes": 1234,
            "json_header_bytes": 150,
            "check": {"status": 200, "outputs": ["labels", "scores", "indices"], "model_version": "2.0"},
            "runs": oip_runs,
        },
        "sweep": [
            {"layout": "resnet18 2.0 x2", "workers": 2, "requests": 100, "errors": 0, "rps": 200.0, "p99_ms": 30.0}
        ],
        "archives": {"fp32_bytes": 100, "int8_bytes": 25, "stock_bytes": 100},
    }


OIP_BAR = "int8 OIP binary c=16 costs at most 10% of req/s (>= 0.9x /predictions)"
OIP_PAR_BAR = "int8 OIP binary >= 0.97x /predictions at every concurrency"


@pytest.mark.parametrize(
    ("oip_rps", "ratio", "passes", "at_par"),
    [(200.0, 1.0, True, True), (194.0, 0.97, True, True), (190.0, 0.95, True, False), (180.0, 0.9, True, False),
     (170.0, 0.85, False, False)],
)  # fmt: skip
def test_oip_ratio_and_bars(oip_rps: float, ratio: float, passes: bool, at_par: bool) -> None:
    from servekit.perf.bench import compute_ratios_and_bars

    result = _fabricated_result(oip_rps)
    compute_ratios_and_bars(result, 16)
    assert result["ratios"]["oip_vs_predictions"] == ratio
    assert result["bars"][OIP_BAR] is passes
    assert result["bars"][OIP_PAR_BAR] is at_par
    assert result["bars"]["zero errors in every served run"] is True


def test_the_par_bar_needs_every_concurrency() -> None:
    from servekit.perf.bench import compute_ratios_and_bars

    result = _fabricated_result(200.0)
    result["oip"]["runs"][0]["oip_over_predictions"] = 0.96  # c=1 below par, c=16 at 1.0
    compute_ratios_and_bars(result, 16)
    assert result["bars"][OIP_BAR] is True
    assert result["bars"][OIP_PAR_BAR] is False


def _hey(rps: float, errors: int = 0) -> dict:
    return {"concurrency": 4, "requests": 100, "errors": errors, "rps": rps, "p50_ms": 1000 / rps, "p95_ms": 1.0,
            "p99_ms": 2.0}  # fmt: skip


def test_oip_rounds_run_abba_and_judge_the_median_round() -> None:
    from servekit.perf.bench import oip_rounds

    calls: list[str] = []
    predictions = iter([100.0, 100.0, 100.0, 100.0, 50.0, 50.0])  # round 3: the machine slowed for both sides
    binary = iter([98.0, 98.0, 80.0, 80.0, 51.0, 51.0])  # round 2: OIP disturbed
    pair = oip_rounds(
        lambda: calls.append("P") or _hey(next(predictions)),
        lambda: calls.append("O") or _hey(next(binary), errors=1),
        3,
    )
    assert calls == list("POOP" * 3)
    assert [r["ratio"] for r in pair["rounds"]] == [0.98, 0.8, 1.02]
    assert pair["oip_over_predictions"] == 0.98  # the median: neither the disturbed round nor the slow one decides
    assert pair["predictions"]["rps"] == 100.0  # the first round's runs
    assert pair["oip"]["rps"] == 98.0
    assert pair["oip"]["errors"] == 6  # every OIP run's errors count
    assert pair["predictions"]["errors"] == 0


def test_an_error_in_any_run_of_the_oip_rounds_fails_the_zero_error_bar() -> None:
    from servekit.perf.bench import compute_ratios_and_bars, oip_rounds

    answers = iter([_hey(100.0), _hey(100.0), _hey(100.0), _hey(100.0, errors=2)])  # the last /predictions run
    pair = oip_rounds(lambda: next(answers), lambda: _hey(100.0), 2)
    assert pair["predictions"]["errors"] == 2
    result = _fabricated_result(200.0)
    compute_ratios_and_bars(result, 16)
    assert result["bars"]["zero errors in every served run"] is True
    result["oip"]["runs"][0]["predictions"]["errors"] = pair["predictions"]["errors"]
    compute_ratios_and_bars(result, 16)
    assert result["bars"]["zero errors in every served run"] is False


def test_oip_rounds_of_an_even_count_take_the_middle_two_and_refuse_none() -> None:
    from servekit.perf.bench import oip_rounds

    rates = iter([100.0, 100.0, 90.0, 90.0])
    answers = iter([100.0, 100.0, 100.0, 100.0])
    pair = oip_rounds(lambda: _hey(next(answers)), lambda: _hey(next(rates)), 2)
    assert [r["ratio"] for r in pair["rounds"]] == [1.0, 0.9]
    assert pair["oip_over_predictions"] == 0.95
    with pytest.raises(ValueError, match="at least one round"):
        oip_rounds(lambda: _hey(1.0), lambda: _hey(1.0), 0)


def test_oip_errors_fail_the_zero_error_bar_and_a_result_without_oip_has_no_oip_bar() -> None:
    from servekit.perf.bench import compute_ratios_and_bars

    result = _fabricated_result(190.0, oip_errors=1)
    compute_ratios_and_bars(result, 16)
    assert result["bars"]["zero errors in every served run"] is False
    result = _fabricated_result(190.0)
    result["oip"] = None
    compute_ratios_and_bars(result, 16)
    assert "oip_vs_predictions" not in result["ratios"]
    assert not any("OIP" in name for name in result["bars"])


def test_markdown_has_the_oip_section(tmp_path) -> None:
    from servekit.perf.bench import compute_ratios_and_bars, write_markdown

    result = _fabricated_result(190.0)
    compute_ratios_and_bars(result, 16)
    write_markdown(result, tmp_path / "bench.md")
    text = (tmp_path / "bench.md").read_text()
    assert "## Open Inference Protocol v2, binary tensors (int8: /v2/models/resnet18/infer vs" in text
    assert "| 16 | 200.0 | 10.0 | 30.0 | 190.0 | 10.0 | 30.0 | 0 | 0.95 | 0.95 |" in text
    assert f"- FAIL: {OIP_PAR_BAR}" in text
    assert f"- PASS: {OIP_BAR}" in text
    assert "- oip_vs_predictions: 0.95" in text


@pytest.mark.parametrize(("rps_on", "passes"), [(96.0, True), (95.0, True), (94.0, False)])
def test_the_metrics_overhead_bar_and_its_section(tmp_path, rps_on: float, passes: bool) -> None:
    from servekit.perf.bench import compute_ratios_and_bars, write_markdown

    result = _fabricated_result(190.0)
    run = {
        "concurrency": 16,
        "requests": 100,
        "errors": 0,
        "rps": 100.0,
        "p50_ms": 10.0,
        "p95_ms": 20.0,
        "p99_ms": 30.0,
    }
    result["metrics_overhead"] = {
        "description": "resnet18_v2.0.mar, /predictions at c=16, handler metrics on vs off",
        "runs": {"on": [dict(run, rps=rps_on)] * 2, "off": [run, run]},
        "rps_on": rps_on, "rps_off": 100.0, "on_over_off": rps_on / 100, "overhead": 1 - rps_on / 100,
    }  # fmt: skip
    compute_ratios_and_bars(result, 16)
    assert result["bars"]["handler metrics cost <= 5% of req/s"] is passes
    write_markdown(result, tmp_path / "bench.md")
    text = (tmp_path / "bench.md").read_text()
    assert f"| on | {rps_on}, {rps_on} | {rps_on} |" in text
    assert "| off | 100.0, 100.0 | 100.0 |" in text


@pytest.mark.parametrize(("camera_rps", "passes"), [(80.0, True), (70.0, True), (69.0, False)])
def test_the_camera_photo_bar_and_its_table(tmp_path, camera_rps: float, passes: bool) -> None:
    from servekit.perf.bench import compute_ratios_and_bars, write_markdown

    result = _fabricated_result(190.0)
    top = next(r for r in result["served"]["int8"]["runs"] if r["concurrency"] == 16)
    run = {**top, "rps": camera_rps, "over_640x480": round(camera_rps / top["rps"], 2)}
    result["served"]["int8"]["camera_photo"] = run
    compute_ratios_and_bars(result, 16)
    assert result["bars"]["int8 4000x3000 photo >= 35% of the 640x480 rate (c=16)"] is passes
    write_markdown(result, tmp_path / "bench.md")
    assert f"| int8 | 16 | {camera_rps} |" in (tmp_path / "bench.md").read_text()


def test_the_camera_decode_ceiling_is_reported_beside_the_photo_bar(tmp_path) -> None:
    from servekit.perf.bench import compute_ratios_and_bars, write_markdown

    result = _fabricated_result(190.0)
    top = next(r for r in result["served"]["int8"]["runs"] if r["concurrency"] == 16)
    result["served"]["int8"]["camera_photo"] = {**top, "rps": 30.0, "over_640x480": 0.15}
    result["camera_decode_ceiling"] = {"threads": 2, "bytes": 3_000_000, "decoded": [500, 375],
                                       "img_per_s": 60.0, "ms_per_img_1t": 33.3}  # fmt: skip
    compute_ratios_and_bars(result, 16)
    assert result["ratios"]["camera_decode_ceiling_over_640x480"] == 0.3  # 60 photos/s over 200 req/s
    assert result["ratios"]["int8_camera_over_decode_ceiling"] == 0.5
    assert result["bars"]["int8 4000x3000 photo >= 35% of the 640x480 rate (c=16)"] is False
    write_markdown(result, tmp_path / "bench.md")
    text = " ".join((tmp_path / "bench.md").read_text().split())
    assert "at 60.0 photos/s on 2 threads (33.3 ms per photo per core), 0.3x the INT8 640x480 rate" in text
    assert "the INT8 photo rate is 0.5x that ceiling" in text


@pytest.mark.parametrize(("counter_us", "passes"), [(20.0, True), (250.0, True), (251.0, False)])
def test_the_small_models_bar_is_on_the_counting_cost(tmp_path, counter_us: float, passes: bool) -> None:
    from servekit.perf.bench import SMALL_MODEL, compute_ratios_and_bars, write_markdown
    from servekit.perf.overhead import with_counter_share

    result = _fabricated_result(190.0)
    run = {"concurrency": 16, "requests": 100, "errors": 0, "rps": 400.0, "p50_ms": 1.0, "p95_ms": 2.0, "p99_ms": 3.0}
    result["metrics_overhead"] = {"description": "resnet18", "runs": {"on": [run, run], "off": [run, run]},
                                  "rps_on": 400.0, "rps_off": 400.0, "on_over_off": 1.0, "overhead": 0.0}  # fmt: skip
    small = {"description": "digits_v2.0.mar, /predictions at c=16",
             "runs": {"on": [dict(run, rps=360.0)] * 2, "off": [run, run]},
             "rps_on": 360.0, "rps_off": 400.0, "on_over_off": 0.9, "overhead": 0.1}  # fmt: skip
    result["metrics_overhead_small"] = with_counter_share(small, counter_us, cores=2)  # 2 cores / 400 req/s: 5000 µs

    compute_ratios_and_bars(result, 16)

    assert result["metrics_overhead_small"]["cpu_us_per_request"] == 5000.0
    assert result["ratios"]["metrics_counter_share_small"] == round(counter_us / 5000, 4)
    assert result["ratios"]["metrics_on_over_off_small"] == 0.9  # reported, not gated
    bar = f"handler metrics counters cost <= 5% of a request's CPU (in-process cost / served CPU) ({SMALL_MODEL})"
    assert result["bars"][bar] is passes
    assert result["bars"]["handler metrics cost <= 5% of req/s"] is True
    write_markdown(result, tmp_path / "bench.md")
    text = " ".join((tmp_path / "bench.md").read_text().split())
    assert "## Handler metrics overhead (digits_v2.0.mar, /predictions at c=16)" in text
    assert f"{counter_us} µs per request, {counter_us / 5000:.2%} of the 5000.0 µs of CPU one request had" in text


def test_the_counting_cost_is_measured_in_a_fresh_process() -> None:
    from servekit.perf.overhead import counter_cost_us

    cost = counter_cost_us(200)
    assert 0 < cost < 10_000  # microseconds for about ten counter updates


def test_decode_ceiling_decodes_the_jpeg_at_one_eighth() -> None:
    from servekit.perf.photos import camera_jpeg, decode_ceiling

    payload = camera_jpeg(640, 480)
    ceiling = decode_ceiling(payload, threads=1, seconds=0.05, rounds=1)
    assert ceiling["decoded"] == [80, 60]
    assert ceiling["bytes"] == len(payload)
    assert ceiling["img_per_s"] > 0
    assert ceiling["ms_per_img_1t"] == pytest.approx(1000 / ceiling["img_per_s"], rel=0.01)


def test_run_hey_sends_the_extra_headers_and_content_type(monkeypatch, tmp_path) -> None:
    import subprocess
    from types import SimpleNamespace

    from servekit.perf import bench

    seen = {}

    def fake_run(command, **kwargs):
        seen["command"] = command
        csv = "response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,status-code,offset\n"
        csv += "0.010,0,0,0,0,0,200,0.0\n0.020,0,0,0,0,0,200,0.010\n"
        return SimpleNamespace(stdout=csv)

    monkeypatch.setattr(bench.shutil, "which", lambda name: "/usr/bin/hey")
    monkeypatch.setattr(subprocess, "run", fake_run)
    body = tmp_path / "body.bin"
    run = bench.run_hey(
        "http://x/v2/models/m/infer",
        "tok",
        body,
        2,
        1.0,
        8,
        content_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": "150"},
    )
    command = seen["command"]
    assert command[command.index("-T") + 1] == "application/octet-stream"
    assert command[command.index("-D") + 1] == str(body)
    headers = [command[i + 1] for i, arg in enumerate(command) if arg == "-H"]
    assert headers == ["Authorization: Bearer tok", "Inference-Header-Content-Length: 150"]
    assert command[-1] == "http://x/v2/models/m/infer"
    assert (run["requests"], run["errors"], run["rps"], run["p50_ms"]) == (2, 0, 66.7, 10.0)
    bench.run_hey("http://x/predictions/m", "tok", body, 1, 1.0, None)
    assert seen["command"][seen["command"].index("-T") + 1] == "image/jpeg"
    assert [a for a in seen["command"] if a.startswith("Inference")] == []


# ------------------------------------------------------------------------------------------ bench: tabular row
TABULAR_BAR = "tabular 1.0 (fp32) >= 5,000 records/s (best concurrency, 64 records per request)"


def _tabular(best: float, errors: int = 0) -> dict:
    runs = [dict(_run(4, best / 128), records_per_s=best / 2), dict(_run(16, best / 64, errors), records_per_s=best)]
    return {
        "model": "breast_cancer",
        "description": "breast_cancer: JSON bodies of 64 held-out records",
        "records_per_request": 64,
        "body_bytes": 52298,
        "versions": {
            "1.0": {"precision": "fp32", "workers": 1, "batch_size": 16, "runs": runs,
                    "best": {"concurrency": 16, "records_per_s": best}},
        },
    }  # fmt: skip


@pytest.mark.parametrize(("best", "passes"), [(6400.0, True), (5000.0, True), (4992.0, False)])
def test_the_tabular_bar_and_its_table(tmp_path, best: float, passes: bool) -> None:
    from servekit.perf.bench import compute_ratios_and_bars, write_markdown

    result = _fabricated_result(190.0)
    result["tabular"] = _tabular(best)
    compute_ratios_and_bars(result, 16)
    assert result["bars"][TABULAR_BAR] is passes
    assert result["ratios"]["tabular_1.0_records_per_s"] == best
    assert result["bars"]["zero errors in every served run"] is True
    write_markdown(result, tmp_path / "bench.md")
    text = (tmp_path / "bench.md").read_text()
    assert "## Tabular (breast_cancer: JSON bodies of 64 held-out records; 52,298 bytes per body)" in text
    assert f"| 1.0 | fp32 | 1 | 16 | 16 | {best / 64} | {best} | 10.0 | 30.0 | 0 |" in text
    assert f"- {'PASS' if passes else 'FAIL'}: {TABULAR_BAR}" in text


def test_tabular_errors_fail_the_zero_error_bar_and_no_tabular_means_no_bar() -> None:
    from servekit.perf.bench import compute_ratios_and_bars

    result = _fabricated_result(190.0)
    result["tabular"] = _tabular(6400.0, errors=1)
    compute_ratios_and_bars(result, 16)
    assert result["bars"]["zero errors in every served run"] is False
    result = _fabricated_result(190.0)
    result["tabular"] = None
    compute_ratios_and_bars(result, 16)
    assert not any(name.startswith("tabular") for name in result["bars"])


def test_serve_tabular_registers_each_version_and_keeps_its_best_concurrency(monkeypatch, tmp_path) -> None:
    from types import SimpleNamespace

    from servekit.perf import bench

    body = tmp_path / "body.json"
    bench.tabular_body(body, count=3)
    calls, loads = [], []

    class FakeClient:
        def manage(self, method, path, **kwargs):
            calls.append((method, path, kwargs.get("params")))
            return {}

        def call(self, kind, method, path, **kwargs):
            assert kwargs["headers"] == {"Content-Type": "application/json"}
            return SimpleNamespace(status_code=200, json=lambda: {"predictions": [{}] * 3}, text="")

        def describe(self, model, version):
            return [{"workers": [{"pid": 1}], "batchSize": 16}]

        def url(self, kind, path):
            return f"http://x{path}"

        def token(self, kind):
            return "tok"

    def fake_hey(url, token, path, concurrency, seconds, bound, content_type):
        loads.append((url, concurrency, content_type, bound))
        return {**_run(concurrency, {1: 100.0, 4: 300.0, 16: 250.0}[concurrency])}

    monkeypatch.setattr(bench, "run_hey", fake_hey)
    specs = [SimpleNamespace(name="breast_cancer", version=v, precision=p, archive_name=f"breast_cancer_v{v}.mar")
             for v, p in (("1.0", "fp32"), ("2.0", "int8"))]  # fmt: skip
    result = bench.serve_tabular(FakeClient(), specs, body, [1, 4, 16], 5.0, quick=True)
    assert [c[:2] for c in calls] == [
        ("POST", "/models"), ("DELETE", "/models/breast_cancer/1.0"),
        ("POST", "/models"), ("DELETE", "/models/breast_cancer/2.0"),
    ]  # fmt: skip
    assert calls[0][2] == {"url": "breast_cancer_v1.0.mar", "synchronous": "true"}  # the archive's own settings
    assert loads[:3] == [("http://x/predictions/breast_cancer/1.0", c, "application/json", 4 * c) for c in (1, 4, 16)]
    entry = result["versions"]["2.0"]
    assert (entry["precision"], entry["workers"], entry["batch_size"]) == ("int8", 1, 16)
    assert [r["records_per_s"] for r in entry["runs"]] == [300.0, 900.0, 750.0]
    assert entry["best"] == {"concurrency": 4, "records_per_s": 900.0}
    assert result["records_per_request"] == 3


def test_the_tabular_body_holds_valid_held_out_records(tmp_path, repo_root) -> None:
    import json

    from handlers.tabular import RecordSchema
    from servekit.build.spec import load_spec, select
    from servekit.perf.bench import TABULAR_MODEL, TABULAR_RECORDS, tabular_body

    size = tabular_body(tmp_path / "body.json")
    records = json.loads((tmp_path / "body.json").read_text())
    assert (len(records), size) == (TABULAR_RECORDS, (tmp_path / "body.json").stat().st_size)
    config = select(load_spec(repo_root / "models.yaml"), TABULAR_MODEL, "1.0")[0].handler_config()
    rows = RecordSchema(config.features, config.max_records).rows(records, lambda i: f"record {i}")
    assert rows.shape == (TABULAR_RECORDS, 30)


# ------------------------------------------------------------------------------------------ bench: detector row
def _detector(pages_per_s: float, errors: int = 0) -> dict:
    run = dict(_run(4, pages_per_s, errors), pages_per_s=pages_per_s)
    return {
        "model": "digit_pages",
        "description": "digit_pages: one held-out 300x200 page PNG (4 digits) per request",
        "body_bytes": 23126,
        "versions": {"1.0": {"precision": "fp32", "workers": 1, "batch_size": 8, "runs": [run]}},
    }


def test_the_detector_row_is_reported_without_a_bar(tmp_path) -> None:
    from servekit.perf.bench import compute_ratios_and_bars, write_markdown

    result = _fabricated_result(190.0)
    result["detector"] = _detector(150.0)
    compute_ratios_and_bars(result, 16)
    assert result["ratios"]["detector_1.0_pages_per_s"] == 150.0
    assert not any(name.startswith("detector") for name in result["bars"])
    assert result["bars"]["zero errors in every served run"] is True
    write_markdown(result, tmp_path / "bench.md")
    text = (tmp_path / "bench.md").read_text()
    assert "## Detector (digit_pages: one held-out 300x200 page PNG (4 digits) per request; 23,126 bytes per body)" in (
        text
    )
    assert "| 1.0 | fp32 | 1 | 8 | 4 | 150.0 | 10.0 | 30.0 | 0 |" in text
    result["detector"] = _detector(150.0, errors=1)
    compute_ratios_and_bars(result, 16)
    assert result["bars"]["zero errors in every served run"] is False


def test_serve_detector_checks_the_reading_and_loads_each_version(monkeypatch, tmp_path) -> None:
    from types import SimpleNamespace

    from servekit.perf import bench

    body = tmp_path / "page.png"
    size, digits = bench.detector_body(body)
    assert size == body.stat().st_size
    assert digits.isdigit()
    calls, loads = [], []
    answer = {"label": digits}

    class FakeClient:
        def manage(self, method, path, **kwargs):
            calls.append((method, path))
            return {}

        def call(self, kind, method, path, **kwargs):
            return SimpleNamespace(status_code=200, json=lambda: answer, text="")

        def describe(self, model, version):
            return [{"workers": [{"pid": 1}], "batchSize": 8}]

        def url(self, kind, path):
            return f"http://x{path}"

        def token(self, kind):
            return "tok"

    def fake_hey(url, token, path, concurrency, seconds, bound, content_type):
        loads.append((url, concurrency, content_type, bound))
        return _run(concurrency, 120.0)

    monkeypatch.setattr(bench, "run_hey", fake_hey)
    specs = [SimpleNamespace(name="digit_pages", version=v, precision=p, archive_name=f"digit_pages_v{v}.mar")
             for v, p in (("1.0", "fp32"), ("2.0", "int8"))]  # fmt: skip
    result = bench.serve_detector(FakeClient(), specs, body, digits, 4, 5.0, quick=True)
    assert calls == [("POST", "/models"), ("DELETE", "/models/digit_pages/1.0"),
                     ("POST", "/models"), ("DELETE", "/models/digit_pages/2.0")]  # fmt: skip
    assert loads == [(f"http://x/predictions/digit_pages/{v}", 4, "image/png", 16) for v in ("1.0", "2.0")]
    assert result["versions"]["2.0"]["runs"][0]["pages_per_s"] == 120.0
    answer["label"] = "0"
    with pytest.raises(bench.BenchError, match="expected the label"):
        bench.serve_detector(FakeClient(), specs, body, digits, 4, 5.0, quick=True)


def test_the_worker_sweep_measures_in_mirrored_order_so_a_linear_drift_weighs_on_every_layout_alike(
    monkeypatch,
) -> None:
    from servekit.perf import sweep

    calls: list[tuple] = []
    loads: list[list[str]] = []

    class FakeClient:
        def manage(self, method, path, params=None, timeout=None):
            calls.append((method, path, (params or {}).get("min_worker")))

    def fake_load(client, run_hey, photo, targets, total, seconds, quick):
        loads.append([t.model for t in targets])
        drift = len(loads) - 1  # the machine gets 10 req/s faster with every measurement
        return {"requests": 100, "errors": 0, "rps": 100.0 + 10 * drift, "p99_ms": 50.0 + drift, "per_version": {}}

    monkeypatch.setattr(sweep, "_load", fake_load)
    main, other = sweep.Target("m", "2.0", "m.mar"), sweep.Target("m_second", "2.0", "m.mar")
    layouts = sweep.worker_sweep(FakeClient(), None, None, main, other, 16, 1.0, False, lambda message: None)

    scaled = [workers for method, path, workers in calls if method == "PUT" and path == "/models/m/2.0"]
    assert scaled == [1, 2, 3, 4, 2, 4, 3, 2, 1]
    assert [len(t) for t in loads] == [1, 1, 1, 1, 2, 2, 1, 1, 1, 1]
    assert [layout["layout"] for layout in layouts] == ["m 2.0 x1", "m 2.0 x2", "m 2.0 x3", "m 2.0 x4",
                                                        "m 2.0 x2 + m_second 2.0 x2"]  # fmt: skip
    assert {layout["rps"] for layout in layouts} == {145.0}  # the mean of passes i and 9 - i
    assert {layout["p99_ms"] for layout in layouts} == {54.5}
    assert layouts[0]["passes"] == [{"rps": 100.0, "p99_ms": 50.0}, {"rps": 190.0, "p99_ms": 59.0}]
    assert all(layout["requests"] == 200 for layout in layouts)
    assert ("DELETE", "/models/m_second/2.0", None) in calls
    assert calls[-1] == ("DELETE", "/models/m/2.0", None)


def test_a_lone_request_is_judged_against_the_stock_handler_and_the_in_process_single_image() -> None:
    from servekit.perf.bench import compute_ratios_and_bars

    result = _fabricated_result(190.0)  # every c=1 p50 is 10 ms; in-process batch 1: 100 img/s = 10 ms
    compute_ratios_and_bars(result, 16)
    assert result["lone_request"]["fp32"] == {
        "p50_ms": 10.0, "queue_wait_ms": None, "in_process_single_ms": 10.0, "over_stock": 1.0,
        "over_in_process": 1.0,
    }  # fmt: skip
    assert result["bars"]["fp32 c=1 p50 <= 1x stock's"] is True
    assert result["bars"]["fp32 c=1 p50 <= 1.3x in-process single image"] is True
    assert result["bars"]["int8 c=1 p50 <= 1.5x in-process single image"] is True

    result = _fabricated_result(190.0)
    result["served"]["fp32"]["runs"][0]["p50_ms"] = 14.0
    result["served"]["int8"]["runs"][0]["p50_ms"] = 16.0
    compute_ratios_and_bars(result, 16)
    assert result["ratios"]["fp32_c1_p50_vs_stock"] == 1.4
    assert result["bars"]["fp32 c=1 p50 <= 1x stock's"] is False
    assert result["bars"]["fp32 c=1 p50 <= 1.3x in-process single image"] is False
    assert result["bars"]["int8 c=1 p50 <= 1.5x in-process single image"] is False


def test_the_lone_request_table_is_in_the_report(tmp_path) -> None:
    from servekit.perf.bench import compute_ratios_and_bars, write_markdown

    result = _fabricated_result(190.0)
    result["served"]["fp32"]["runs"][0]["queue_wait_ms"] = 2.1
    compute_ratios_and_bars(result, 16)
    write_markdown(result, tmp_path / "r.md")
    text = (tmp_path / "r.md").read_text()
    assert "## A lone request (c=1)" in text
    assert "| fp32 | 10.0 | 2.1 | 10.0 | 1.0 | 1.0 |" in text


def test_the_frontend_queue_wait_is_torchserves_count_over_the_runs_requests() -> None:
    from servekit.perf.bench import frontend_totals, mean_queue_wait_ms

    class FakeClient:
        def __init__(self, queued_us: float, requests: float) -> None:
            self.page = (
                "# TYPE ts_queue_latency_microseconds counter\n"
                f'ts_queue_latency_microseconds{{model_name="m",model_version="2.0",uuid="a"}} {queued_us}\n'
                'ts_queue_latency_microseconds{model_name="other",model_version="2.0",uuid="a"} 99999.0\n'
                f'ts_inference_requests_total{{model_name="m",model_version="2.0",uuid="a"}} {requests}\n'
            )

        def metrics(self) -> str:
            return self.page

    before = frontend_totals(FakeClient(1000.0, 10), "m", "2.0")
    after = frontend_totals(FakeClient(1000.0 + 210 * 2100.0, 220), "m", "2.0")
    assert before == (1000.0, 10.0)
    assert mean_queue_wait_ms(before, after) == 2.1
    assert frontend_totals(FakeClient(1.0, 1), "absent", "1.0") is None
    assert mean_queue_wait_ms(before, before) is None


def test_the_tracing_sink_counts_exports_and_the_bar_needs_spans_and_a_small_cost() -> None:
    import requests

    from servekit.perf.trace_load import markdown, otlp_sink, tracing_bar

    with otlp_sink() as (url, sink):
        assert requests.post(url, data=b"\x0a\x00", timeout=5).status_code == 200
        assert (sink.exports, sink.received) == (1, 2)
    run = {"rps": 100.0}
    result = {"description": "d", "runs": {"on": [run], "off": [run]}, "rps_on": 97.0, "rps_off": 100.0,
              "on_over_off": 0.97, "otlp_exports": 12, "otlp_bytes": 3456, "off_path_ns_per_request": 20.0,
              "cpu_us_per_request": 20000.0, "off_share": 0.000001}  # fmt: skip
    on_bar = "tracing on costs <= 5% of req/s (spans exported)"
    off_bar = "tracing off costs < 0.1% of a request's CPU (its checks timed / served CPU)"
    assert tracing_bar(result) == {on_bar: True, off_bar: True}
    assert tracing_bar({**result, "on_over_off": 0.94})[on_bar] is False
    assert tracing_bar({**result, "otlp_exports": 0})[on_bar] is False  # nothing exported: not measured
    assert tracing_bar({**result, "off_share": 0.002})[off_bar] is False
    assert tracing_bar({**result, "off_share": None})[off_bar] is False  # not measured: not met
    assert tracing_bar(None) == {}
    assert "the worker's tracing checks take 20.0 ns per request, 0.00010%" in "\n".join(markdown(result))
    assert "the sink received 12 exports (3456 bytes)" in "\n".join(markdown(result))


def test_the_tracing_off_path_is_timed_on_a_handler_without_a_tracer() -> None:
    from servekit.perf import trace_load

    seconds = trace_load.off_path_seconds(calls=20_000)
    assert 0 < seconds < 1e-5  # two attribute checks: nanoseconds, not microseconds


def test_an_on_off_comparison_runs_rounds_of_the_order_and_judges_the_median_round(monkeypatch) -> None:
    """Full runs repeat (on, off, off, on) in rounds of half-length runs; one disturbed round does not decide;
    the servers' own CPU per request is reported beside the rates."""
    from servekit.perf import overhead
    from servekit.perf.sweep import Target

    started: list[str] = []

    class FakeServer:
        def __init__(self, *, workdir, env, **_):
            self.mode = Path(workdir).name.rsplit("_", 1)[1]
            self.env = env
            self.process = type("P", (), {"pid": 1 if self.mode == "on" else 2})()

        def start(self):
            started.append(self.mode)

        def stop(self):
            started.remove(self.mode)

        def client(self, timeout):
            mode = self.mode

            class Client:
                def manage(self, *args, **kwargs):
                    return None

                def url(self, kind, path):
                    return f"{mode}{path}"

                def token(self, kind):
                    return "t"

            return Client()

    calls: list[tuple[str, float]] = []
    # per round, on and off rates: round 3 is disturbed while the server with the feature on ran
    rates = {"on": iter([97.0, 97.0, 98.0, 98.0, 60.0, 60.0, 99.0, 99.0]), "off": iter([100.0] * 8)}

    def fake_hey(url, token, body, concurrency, seconds, bound, **kwargs):
        mode = "on" if url.startswith("on") else "off"
        calls.append((mode, seconds))
        rps = 50.0 if seconds == overhead.WARMUP_SECONDS else next(rates[mode])
        return {"rps": rps, "requests": 100, "p99_ms": 1.0, "errors": 0}

    # the server's CPU so far: each run of "on" costs its workers 10 % more than "off"'s
    spent = {1: {"frontend": 0.0, "workers": 0.0}, 2: {"frontend": 0.0, "workers": 0.0}}

    def fake_cpu(pid):
        now = dict(spent[pid])
        spent[pid]["frontend"] += 0.001
        spent[pid]["workers"] += 0.011 if pid == 1 else 0.010
        return now

    monkeypatch.setattr(overhead, "TorchServeProcess", FakeServer)
    monkeypatch.setattr(overhead, "process_cpu", fake_cpu)
    target = Target("m", "1.0", "m_v1.0.mar")
    result = overhead.switch_overhead(Path("/nowhere"), Path("/store"), target, Path("/photo"), 16, 10.0, False,
                                      fake_hey, lambda line: None, name="x", envs={"on": {}, "off": {}})  # fmt: skip
    measured = [c for c in calls if c[1] != overhead.WARMUP_SECONDS]
    assert measured == [(mode, 5.0) for _ in range(overhead.ROUNDS) for mode in overhead.ORDER]
    assert result["round_ratios"] == [0.97, 0.98, 0.6, 0.99]
    assert result["on_over_off"] == 0.975  # the median round, where the mean of all runs says 0.885
    assert result["rps_on"] == 88.5
    assert started == []  # both servers stopped
    assert result["served_cpu_us"] == {"on": {"frontend": 10.0, "workers": 110.0},
                                       "off": {"frontend": 10.0, "workers": 100.0}}  # fmt: skip
    assert result["cpu_on_over_off"] == 1.091
    assert "on: frontend 10 µs, workers 110 µs; off: frontend 10 µs, workers 100 µs; on over off 1.091" in (
        overhead.cpu_note(result)
    )
    assert "the median of 4 rounds' ratios (0.97, 0.98, 0.6, 0.99; runs of 5.0 s)" in overhead.rounds_note(result)


def test_a_servers_cpu_is_read_from_its_process_tree_frontend_apart() -> None:
    import subprocess
    import sys
    import time

    from servekit.perf import overhead

    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ntime.sleep(30)"
    parent = "import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', sys.argv[1]])\ntime.sleep(30)"
    root = subprocess.Popen([sys.executable, "-c", parent, busy])  # a launcher and a busy worker under it
    try:
        deadline = time.monotonic() + 20
        while overhead.process_cpu(root.pid)["workers"] < 0.3 and time.monotonic() < deadline:
            time.sleep(0.1)
        totals = overhead.process_cpu(root.pid)
        assert totals["workers"] >= 0.3  # the child's CPU counts: the tree is read, not the root alone
        assert totals["frontend"] == 0.0  # no Java frontend among them
    finally:
        for process in overhead.psutil.Process(root.pid).children(recursive=True):
            process.kill()
        root.kill()
        root.wait()
    assert overhead.process_cpu(root.pid) == {"frontend": 0.0, "workers": 0.0}  # gone: nothing counted


def test_the_in_process_limit_judges_each_way_by_its_median_round(monkeypatch, tmp_path) -> None:
    """``rounds`` > 1: both ways of every batch size run that many times, in turn; the median round counts."""
    import io

    import torch
    from PIL import Image

    import servekit.perf.bench as bench
    from servekit.build.spec import load_spec

    spec = load_spec(bench.SPEC_TEMPLATE)[0]
    calls: list[int] = []

    def program(batch: torch.Tensor) -> torch.Tensor:
        calls.append(len(batch))
        return batch.mean(dim=(2, 3))

    monkeypatch.setattr(bench, "load_model", lambda path, config: program)
    buffer = io.BytesIO()
    Image.new("RGB", (320, 240), (90, 140, 200)).save(buffer, "JPEG")
    result = bench.in_process_limit(tmp_path / "unused.pt", spec, buffer.getvalue(), [1, 2], 0.3, rounds=3)
    assert set(result["rounds"]) == {1, 2}
    for size in (1, 2):
        rounds = result["rounds"][size]
        assert [len(rounds[way]) for way in ("serial", "thread pool")] == [3, 3]
        way = result["decode"] if size == result["best_batch"] else max(rounds, key=lambda w: sorted(rounds[w])[1])
        assert result["by_batch"][size] == pytest.approx(sorted(rounds[way])[1], abs=0.11)  # the median of three
    assert set(calls) == {1, 2}
    assert bench.in_process_limit(tmp_path / "unused.pt", spec, buffer.getvalue(), [1], 0.1).get("rounds") is None
