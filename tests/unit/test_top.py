"""``servekit top``: rendering as a pure function of a snapshot, both sources, the loop, the command line."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from servekit.cli import main
from servekit.observe.drift import ReferenceCache
from servekit.observe.metrics_source import MetricsPage, PrometheusAPI, parse_exposition
from servekit.observe.top import CLEAR, RAW, RULES, MetricsView, PrometheusView, Row, Snapshot, render, run_top
from servekit.observe.top import snapshot_from_scrapes as from_scrapes
from servekit.serving.server import free_port
from tests.fake_metrics import FakeMetricsServer, Traffic, exposition, prometheus_of, vector, write_store
from tests.fake_server import serving

TAKEN_AT = 1_700_000_000.0
CLOCK = time.strftime("%H:%M:%S", time.localtime(TAKEN_AT))

SNAPSHOT = Snapshot(
    source="Prometheus http://127.0.0.1:9090: req/s over 1m, latency and errors over 5m, drift over 15m",
    taken_at=TAKEN_AT,
    rows=(
        Row("digits", "1.0", ready=1, pending=0),
        Row("digits", "2.0", True, 123.456, 4.21, 18.0, 0.0, 1.25, 3, 2, "moderate", 0.1234),
        Row("fashion", "1.0", rps=0.5, drift="insufficient data"),
    ),
    notes=("something to know",),
)


def closed_url(path: str = "") -> str:
    return f"http://127.0.0.1:{free_port()}{path}"


# ------------------------------------------------------------------------------------------ rendering
def test_render_is_a_table_of_the_snapshot() -> None:
    assert render(SNAPSHOT).splitlines() == [
        f"servekit top  {CLOCK}  {SNAPSHOT.source}",
        "MODEL    VERSION  DEFAULT  REQ/S  P50 MS  P99 MS  5XX %  4XX %  QUEUE  READY  DRIFT",
        "digits   1.0                   -       -       -      -      -      0      1  no reference",
        "digits   2.0      *        123.5     4.2    18.0    0.0    1.2      3      2  moderate (0.12)",
        "fashion  1.0                0.50       -       -      -      -      -      -  insufficient data",
        "note: something to know",
    ]


def test_render_without_versions_or_with_an_error() -> None:
    assert render(Snapshot("src", TAKEN_AT)).splitlines() == [
        f"servekit top  {CLOCK}  src",
        "no model versions in the metrics yet",
    ]
    assert render(Snapshot("src", TAKEN_AT, error="Prometheus is not reachable")).splitlines() == [
        f"servekit top  {CLOCK}  src",
        "error: Prometheus is not reachable",
    ]


def test_the_json_document_of_a_snapshot() -> None:
    document = SNAPSHOT.as_dict()
    assert document["time"] == "2023-11-14T22:13:20+00:00"
    assert document["source"] == SNAPSHOT.source
    assert document["notes"] == ["something to know"]
    assert document["models"][1] == {
        "model": "digits", "version": "2.0", "default": True, "rps": 123.456, "p50_ms": 4.21, "p99_ms": 18.0,
        "errors_5xx_pct": 0.0, "errors_4xx_pct": 1.25, "pending": 3, "ready": 2, "drift": "moderate",
        "drift_psi": 0.123,
    }  # fmt: skip
    assert "error" not in document
    json.dumps(document)


# ------------------------------------------------------------------------------------------ from two scrapes
def test_a_snapshot_from_two_scrapes_of_the_metrics_page(tmp_path: Path) -> None:
    write_store(tmp_path)
    earlier = Traffic(codes={"200": 100}, seconds=[0.004] * 100)
    later = Traffic(codes={"200": 300, "503": 10, "400": 10}, seconds=[0.004] * 100 + [0.02] * 220, pending=4,
                    ready=2)  # fmt: skip
    old = Traffic(version="1.0", default=False, classes={}, confidence=[], brightness=[], megapixels=[], codes={},
                  seconds=[])  # fmt: skip
    first = parse_exposition(exposition(earlier, old), taken_at=10.0)
    second = parse_exposition(exposition(later, old), taken_at=12.0)
    snapshot = from_scrapes(first, second, ReferenceCache(tmp_path), "http://x/metrics", TAKEN_AT)
    assert snapshot.source == (
        "http://x/metrics: req/s, latency and errors over the last 2.0 s; drift since the server started"
    )
    v1, v2 = snapshot.rows
    assert v1 == Row("digits", "1.0", default=False, rps=0.0, pending=0, ready=1, drift="no reference")
    assert (v2.default, v2.pending, v2.ready) == (True, 4, 2)
    assert v2.rps == pytest.approx(220 / 2)  # 200 + 10 + 10 requests in 2 s
    assert v2.errors_5xx_pct == pytest.approx(100 * 10 / 220)
    assert v2.errors_4xx_pct == pytest.approx(100 * 10 / 220)
    assert v2.p50_ms == pytest.approx(10 + 15 * 110 / 220)  # every new request took 20 ms: in (10, 25] ms
    assert v2.p99_ms == pytest.approx(10 + 15 * 217.8 / 220)
    assert (v2.drift, v2.drift_psi) == ("stable", 0.0)


def test_the_metrics_view_scrapes_twice_first_then_once_per_frame(tmp_path: Path) -> None:
    pages = [exposition(Traffic(codes={"200": n})) for n in (10, 30, 70)]
    slept: list[float] = []
    with serving(FakeMetricsServer(pages=pages)) as server:
        ticks = iter([100.0, 102.0, 104.0])  # the scrapes' times: 2 s apart, whatever the machine's load
        page = MetricsPage(server.url + "/metrics", clock=lambda: next(ticks))
        view = MetricsView(page, ReferenceCache(tmp_path), 2.0, sleep=slept.append)
        first = view.snapshot()
        assert (server.scrapes, slept) == (2, [2.0])
        second = view.snapshot()
        assert server.scrapes == 3
    assert (first.rows[0].rps, second.rows[0].rps) == (10.0, 20.0)  # 20, then 40 requests in 2 s


# ------------------------------------------------------------------------------------------ from Prometheus
def test_the_prometheus_view_takes_the_rules_and_falls_back_to_the_base_metrics(tmp_path: Path) -> None:
    write_store(tmp_path)
    v2, v1 = {"model": "digits", "version": "2.0"}, {"model": "digits", "version": "1.0"}
    answers = {
        RAW["ready"]: vector((v2, 2), (v1, 1)),
        RAW["pending"]: vector((v2, 0), (v1, 5)),
        RAW["default"]: vector((v2, 1), (v1, 0)),
        RULES["rps"]: vector((v2, 42.0), (v1, 1.5)),
        RULES["p99"]: vector((v2, 0.018)),  # no 1.0 here yet: the raw expression fills it
        RAW["p99"]: vector((v2, 99.0), (v1, 0.030)),
        RAW["p50"]: vector((v2, 0.004)),
        RAW["errors_5xx"]: vector((v2, 0.01), (v1, 0.0)),
        RAW["errors_4xx"]: vector((v2, 0.0), (v1, 0.5)),
    }
    with serving(FakeMetricsServer(prometheus=prometheus_of(Traffic(), extra=answers))) as server:
        view = PrometheusView(PrometheusAPI(server.url), ReferenceCache(tmp_path), clock=lambda: TAKEN_AT)
        snapshot = view.snapshot()
    first, second = snapshot.rows
    assert first == Row("digits", "1.0", default=False, rps=1.5, p50_ms=None, p99_ms=30.0, errors_5xx_pct=0.0,
                        errors_4xx_pct=50.0, pending=5, ready=1, drift="no reference")  # fmt: skip
    assert second == Row("digits", "2.0", default=True, rps=42.0, p50_ms=4.0, p99_ms=18.0, errors_5xx_pct=1.0,
                         errors_4xx_pct=0.0, pending=0, ready=2, drift="stable", drift_psi=0.0)  # fmt: skip
    assert RAW["rps"] not in server.queries  # the rule had every version
    assert snapshot.source.startswith(f"Prometheus {server.url}: req/s over 1m")


# ------------------------------------------------------------------------------------------ the loop
class Frames:
    def __init__(self, *snapshots: Snapshot | Exception) -> None:
        self.snapshots = list(snapshots)

    def snapshot(self) -> Snapshot:
        item = self.snapshots.pop(0)
        if isinstance(item, Exception):
            raise item
        return item


def test_once_and_json_print_one_frame() -> None:
    out = io.StringIO()
    run_top(Frames(SNAPSHOT), once=True, out=out)
    assert out.getvalue() == render(SNAPSHOT) + "\n"
    out = io.StringIO()
    run_top(Frames(SNAPSHOT), as_json=True, out=out)  # --json implies --once
    assert json.loads(out.getvalue()) == SNAPSHOT.as_dict()


def test_the_loop_clears_the_screen_survives_a_failed_frame_and_stops_on_ctrl_c() -> None:
    from servekit.observe.metrics_source import MetricsError

    out, slept = io.StringIO(), []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 3:
            raise KeyboardInterrupt

    run_top(Frames(SNAPSHOT, MetricsError("the metrics page\nis gone"), SNAPSHOT), interval=0.5, out=out, sleep=sleep)
    frames = out.getvalue().split(CLEAR)[1:]
    assert (len(frames), slept) == (3, [0.5, 0.5, 0.5])
    assert frames[0] == render(SNAPSHOT) + "\n\nevery 0.5 s; Ctrl-C to quit\n"
    assert "error: the metrics page is gone" in frames[1]
    assert frames[2].endswith("Ctrl-C to quit\n\n")


# ------------------------------------------------------------------------------------------ the command line
@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    write_store(tmp_path / "store")
    for name, value in (("STORE", str(tmp_path / "store")), ("METRICS_URL", closed_url("/metrics")),
                        ("PROMETHEUS_URL", closed_url()), ("MANAGEMENT_URL", closed_url()),
                        ("KEY_FILE", str(tmp_path / "no_key_file.json")),
                        ("HISTORY", str(tmp_path / "var" / "deployments.jsonl")),
                        ("PROXY_DIR", str(tmp_path / "var" / "proxy"))):  # fmt: skip
        monkeypatch.setenv(f"SERVEKIT_{name}", value)
    return tmp_path / "store"


def test_cli_top_json_from_the_metrics_page(cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pages = [exposition(Traffic(codes={"200": 10})), exposition(Traffic(codes={"200": 30}))]
    with serving(FakeMetricsServer(pages=pages)) as server:
        code = main(["--metrics-url", server.url + "/metrics", "top", "--json", "--interval", "0.05", "--source",
                     "metrics"])  # fmt: skip
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    document = json.loads(out)
    assert [(m["model"], m["version"], m["default"], m["drift"]) for m in document["models"]] == [
        ("digits", "2.0", True, "stable")
    ]
    assert document["models"][0]["rps"] > 0
    assert document["source"].startswith(f"{server.url}/metrics: req/s")


def test_cli_top_once_from_prometheus_when_it_answers(cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    v2 = {"model": "digits", "version": "2.0"}
    answers = {RAW["ready"]: vector((v2, 1)), RAW["default"]: vector((v2, 1)), RULES["rps"]: vector((v2, 3.0))}
    with serving(FakeMetricsServer(prometheus=prometheus_of(Traffic(), extra=answers))) as server:
        code = main(["--prometheus-url", server.url, "top", "--once"])
    out, _ = capsys.readouterr()
    assert code == 0
    lines = out.splitlines()
    assert lines[0].endswith(f"Prometheus {server.url}: req/s over 1m, latency and errors over 5m, drift over 15m")
    assert lines[2].split() == ["digits", "2.0", "*", "3.00", "-", "-", "-", "-", "-", "1", "stable", "(0.00)"]


def test_cli_top_when_nothing_answers_is_one_line(cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["top", "--once"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("servekit: error: no metrics to read: Prometheus at http://127.0.0.1:")
    assert len(err.strip().splitlines()) == 1
    assert main(["top", "--interval", "0"]) == 1
    assert capsys.readouterr().err == "servekit: error: --interval must be positive, got 0\n"


def test_the_reading_side_imports_no_torch(repo_root: Path) -> None:
    code = (
        "import sys, json; import servekit.observe.metrics_source, servekit.observe.drift, servekit.observe.top; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'numpy',"
        " 'handlers', 'yaml') or m.startswith('servekit.build'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == []
