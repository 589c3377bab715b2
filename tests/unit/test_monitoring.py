"""The Prometheus side: the rules under monitoring/ against promtool and the metric contract, and a real Prometheus.

``promtool test rules`` runs the rules' own unit tests (monitoring/tests): every recording rule with
exact values, every alert firing and not firing. The tests here make sure those run, that the rules
and docs/monitoring.md name the same metrics, and that ``servekit.serving.monitor`` renders a
configuration promtool accepts and runs a Prometheus that scrapes and records.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import yaml

from servekit.serving.monitor import (
    DEFAULT_PREFIX,
    MonitorError,
    PrometheusServer,
    ScrapeTarget,
    _proxy_target,
    default_targets,
    duration,
    main,
    render_config,
    rule_files,
)
from servekit.serving.processes import free_port, pid_matches
from tests.fake_server import loopback, serving

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[2]
RULES = REPO_ROOT / "monitoring" / "rules" / "servekit.rules.yml"
RULE_TESTS = REPO_ROOT / "monitoring" / "tests" / "servekit.rules.test.yml"
CONTRACT = REPO_ROOT / "docs" / "monitoring.md"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False)


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def recorded() -> list[str]:
    return [rule["record"] for rule in rules() if "record" in rule]


def alerts() -> list[dict]:
    return [rule for rule in rules() if "alert" in rule]


# ------------------------------------------------------------------------------------------ promtool
def test_the_rule_files_pass_promtool_check_rules() -> None:
    result = promtool("check", "rules", *map(str, rule_files()))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_the_rules_pass_their_promtool_unit_tests() -> None:
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_rule_tests_check_every_recording_rule_and_every_alert_firing_and_not() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    queried = {case["expr"] for test in tests for case in test.get("promql_expr_test", [])}
    assert set(recorded()) <= queried
    firing: set[str] = set()
    silent: set[str] = set()
    for test in tests:
        for case in test.get("alert_rule_test", []):
            (firing if case["exp_alerts"] else silent).add(case["alertname"])
    names = {rule["alert"] for rule in alerts()}
    assert (firing, silent) == (names, names)


def test_every_recording_rule_has_exact_values_somewhere() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    with_values = {
        case["expr"] for test in tests for case in test.get("promql_expr_test", []) if case.get("exp_samples")
    }
    assert set(recorded()) <= with_values


# ------------------------------------------------------------------------------------------ the contract
def contract_names() -> tuple[set[str], set[str]]:
    """Every metric name docs/monitoring.md gives, and those of them that are histograms."""
    text = CONTRACT.read_text()
    names = set(re.findall(r"`(servekit_[a-z0-9_]+)`", text))
    histograms = set(re.findall(r"^\| `(servekit_[a-z0-9_]+)` \| histogram \|", text, flags=re.MULTILINE))
    return names, histograms


def test_every_metric_the_rules_read_is_in_the_contract() -> None:
    names, histograms = contract_names()
    assert {"servekit_requests_total", "servekit_drift_reference_ratio"} <= names
    assert "servekit_request_seconds" in histograms
    used = {name for rule in rules() for name in re.findall(r"\bservekit_[a-z0-9_]+", rule["expr"])}
    assert used, "no servekit_* metric found in the rules"

    def documented(name: str) -> bool:
        base = re.sub(r"_(bucket|count|sum)$", "", name)
        return name in names or (base != name and base in histograms)

    assert sorted(name for name in used if not documented(name)) == []


def test_every_recorded_series_the_rules_read_is_recorded_by_an_earlier_rule() -> None:
    seen: set[str] = set()
    for rule in rules():
        for name in re.findall(r"\bservekit:[a-z0-9_:]+", rule["expr"]):
            assert name in seen, f"{rule.get('record') or rule.get('alert')} reads {name} before it is recorded"
        if "record" in rule:
            seen.add(rule["record"])


def test_every_rule_is_documented_in_the_contract() -> None:
    rules_section = CONTRACT.read_text().split("\n## Rules\n", 1)[1].split("\n## ", 1)[0]
    names = [*recorded(), *(rule["alert"] for rule in alerts())]
    assert [name for name in names if f"`{name}`" not in rules_section] == []


# The alerts about the metrics themselves name the scrape target, not a model version.
TARGET_ALERTS = {"ServekitMetricsDown"}


def test_every_alert_has_a_severity_and_names_model_and_version() -> None:
    for rule in alerts():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        wanted = (
            ("$labels.job", "$labels.instance")
            if rule["alert"] in TARGET_ALERTS
            else ("$labels.model", "$labels.version")
        )
        for key in ("summary", "description"):
            text = rule["annotations"][key]
            for label in wanted:
                assert label in text, (rule["alert"], key, label)


# ------------------------------------------------------------------------------------------ configuration
def test_the_module_imports_no_torch_and_no_yaml() -> None:
    code = (
        "import sys, servekit.serving.monitor; print(sorted(m for m in sys.modules if m in ('torch', 'numpy', 'yaml')))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_default_targets_are_the_oip_front_and_torchserves_metrics_address() -> None:
    assert default_targets() == [
        ScrapeTarget("servekit", "127.0.0.1:8000", "/metrics"),
        ScrapeTarget("torchserve", "127.0.0.1:8082", "/metrics"),
    ]
    assert DEFAULT_PREFIX == REPO_ROOT / "var" / "prometheus"


def test_default_targets_read_config_properties(tmp_path: Path) -> None:
    config = tmp_path / "config.properties"
    config.write_text("# x\nmetrics_address=http://127.0.0.1:9182\ninference_address=http://127.0.0.1:9180\n")
    assert default_targets(config, oip_port=9100) == [
        ScrapeTarget("servekit", "127.0.0.1:9100"),
        ScrapeTarget("torchserve", "127.0.0.1:9182"),
    ]


def test_the_rendered_configuration(tmp_path: Path) -> None:
    targets = [*default_targets(), ScrapeTarget("proxy", "127.0.0.1:8090", "/stats")]
    text = render_config(targets, [RULES], interval=1.5)
    config = yaml.safe_load(text)
    assert config["global"] == {"scrape_interval": "1500ms", "scrape_timeout": "1500ms",
                                "evaluation_interval": "1500ms"}  # fmt: skip
    assert config["rule_files"] == [str(RULES)]
    assert Path(config["rule_files"][0]).is_absolute()
    assert config["scrape_configs"] == [
        {"job_name": "servekit", "metrics_path": "/metrics", "static_configs": [{"targets": ["127.0.0.1:8000"]}]},
        {"job_name": "torchserve", "metrics_path": "/metrics", "static_configs": [{"targets": ["127.0.0.1:8082"]}]},
        {"job_name": "proxy", "metrics_path": "/stats", "static_configs": [{"targets": ["127.0.0.1:8090"]}]},
    ]


def test_the_server_renders_every_rule_file_of_the_repository(tmp_path: Path) -> None:
    server = PrometheusServer(tmp_path)
    config = yaml.safe_load(server.render())
    assert config["rule_files"] == [str(path) for path in sorted((REPO_ROOT / "monitoring" / "rules").glob("*.yml"))]
    assert config["global"]["scrape_interval"] == "5s"
    assert [job["job_name"] for job in config["scrape_configs"]] == ["servekit", "torchserve"]
    assert server.listen == "127.0.0.1:9090"


def test_the_rendered_configuration_passes_promtool_check_config(tmp_path: Path) -> None:
    server = PrometheusServer(tmp_path / "prometheus")
    server.install()
    result = promtool("check", "config", str(server.config_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_a_configuration_promtool_rejects_is_not_installed(tmp_path: Path) -> None:
    bad_rules = tmp_path / "rules"
    bad_rules.mkdir()
    (bad_rules / "broken.yml").write_text("groups:\n  - name: x\n    rules:\n      - record: a:b\n        expr: sum(\n")
    server = PrometheusServer(tmp_path / "prometheus", rules_dir=bad_rules)
    with pytest.raises(MonitorError, match=r"^promtool check config rejected the configuration: .*broken\.yml"):
        server.install()
    assert not server.config_file.exists()
    assert list(server.prefix.iterdir()) == []  # no temporary file left behind


def test_the_proxy_option_adds_a_proxy_job() -> None:
    assert _proxy_target("127.0.0.1:8090") == ScrapeTarget("proxy", "127.0.0.1:8090", "/metrics")
    assert _proxy_target("127.0.0.1:8090/nginx/stats") == ScrapeTarget("proxy", "127.0.0.1:8090", "/nginx/stats")


@pytest.mark.parametrize(("seconds", "text"), [(5, "5s"), (5.0, "5s"), (0.5, "500ms"), (1.5, "1500ms"), (60, "60s")])
def test_durations(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(MonitorError, match="loopback only"):
        PrometheusServer(tmp_path, listen="0.0.0.0:9090")
    with pytest.raises(MonitorError, match=r"at most 15 s .*got 30 s"):
        PrometheusServer(tmp_path, interval=30)
    with pytest.raises(MonitorError, match="at least 1 ms"):
        duration(0)
    with pytest.raises(MonitorError, match="distinct names"):
        render_config([ScrapeTarget("a", "127.0.0.1:1"), ScrapeTarget("a", "127.0.0.1:2")], [])


def test_stop_and_status_when_nothing_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stop", "--prefix", str(tmp_path)]) == 0
    assert main(["status", "--prefix", str(tmp_path)]) == 3
    assert capsys.readouterr().out.splitlines() == [
        "Prometheus is not running",
        "Prometheus is not running (make monitor starts it)",
    ]


def test_a_stale_pid_file_is_removed_and_nothing_signalled(tmp_path: Path) -> None:
    warnings: list[str] = []
    server = PrometheusServer(tmp_path, warn=warnings.append)
    tmp_path.mkdir(exist_ok=True)
    server.pid_file.write_text("1234567")  # no such process (above pid_max)
    assert server.stop() is False
    assert not server.pid_file.exists()
    assert len(warnings) == 1
    assert "names pid 1234567, which is not running" in warnings[0]


# ------------------------------------------------------------------------------------------ a real Prometheus
class FakeExporter(BaseHTTPRequestHandler):
    """Serves what the OIP front would for one busy version: every scrape adds 10 requests, all of class 0."""

    scrapes = 0
    lock = threading.Lock()

    def do_GET(self) -> None:  # noqa: N802 - BaseHTTPRequestHandler's name
        with self.lock:
            type(self).scrapes += 1
            count = 10 * type(self).scrapes
        labels = 'model="digits",version="1.0"'
        body = f"""# TYPE servekit_requests_total counter
servekit_requests_total{{{labels},code="200"}} {count}
# TYPE servekit_predictions_total counter
servekit_predictions_total{{{labels},class="0"}} {count}
servekit_predictions_total{{{labels},class="1"}} 0
# TYPE servekit_drift_reference_ratio gauge
servekit_drift_reference_ratio{{{labels},class="0"}} 0.5
servekit_drift_reference_ratio{{{labels},class="1"}} 0.5
servekit_drift_threshold{{{labels}}} 0.25
servekit_drift_min_samples{{{labels}}} 1
servekit_default_version{{{labels}}} 1
servekit_workers_ready{{{labels}}} 1
""".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's signature
        pass


@pytest.fixture
def exporter() -> Iterator[str]:
    with serving(loopback(FakeExporter)) as httpd:
        yield f"127.0.0.1:{httpd.server_address[1]}"


def query(server: PrometheusServer, expr: str) -> list[dict]:
    url = f"{server.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)["data"]["result"]


def test_a_real_prometheus_scrapes_and_records(tmp_path: Path, exporter: str) -> None:
    server = PrometheusServer(tmp_path / "prometheus", listen=f"127.0.0.1:{free_port()}",
                              targets=[("servekit", exporter, "/metrics")], interval=0.5)  # fmt: skip
    pid = None
    try:
        server.start(timeout=15)
        pid = server.running_pid()
        assert pid is not None
        assert server.ready()
        assert server.running_listen() == server.listen
        with pytest.raises(MonitorError, match="already running"):
            server.start()
        deadline = time.monotonic() + 15
        rate = psi = pending = []
        while time.monotonic() < deadline and not (rate and psi and pending):
            time.sleep(0.5)
            rate = query(server, "servekit:requests:rate1m")
            psi = query(server, "servekit:drift_psi:15m")
            pending = query(server, 'ALERTS{alertname="ServekitDrift"}')
        assert [sample["metric"] for sample in rate] == [{"__name__": "servekit:requests:rate1m", "model": "digits",
                                                          "version": "1.0"}]  # fmt: skip
        assert float(rate[0]["value"][1]) > 0
        # all of class 0 against a 50/50 reference: (1 - 0.5) ln 2 + (1e-4 - 0.5) ln(2e-4), whatever the counts
        assert [float(sample["value"][1]) for sample in psi] == [pytest.approx(4.60431846666895, rel=1e-12)]
        assert [sample["metric"]["alertstate"] for sample in pending] in (["pending"], ["firing"])
        assert not query(server, 'ALERTS{alertname="ServekitNoReadyWorker"}')
    finally:
        server.stop()
    assert not pid_matches(pid, server.fragments)
    assert not server.pid_file.exists()
