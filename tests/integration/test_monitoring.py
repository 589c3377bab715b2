"""A real TorchServe and a real Prometheus: the handler metrics, the rules and drift, end to end.

Known traffic goes to two versions (one through the default route), bad inputs included; Prometheus
(scraping every second) must then hold exactly what the clients saw, per real version. Skewed
traffic to one version must raise the drift verdict and the ServekitDrift alert; balanced held-out
traffic to the other must not.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from servekit.build.datasets import digits
from servekit.deploy import autoscaling, operators
from servekit.serving.monitor import PrometheusServer, ScrapeTarget
from servekit.serving.server import free_port
from tests.integration.conftest import Client, operator_cli, running_torchserve

DRIFT_ALERT_WAIT_S = 150  # the alert's `for: 30s`, 15 s of rule evaluation and scrapes, and a loaded CI machine


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> Iterator[SimpleNamespace]:
    workdir = tmp_path_factory.mktemp("monitoring")
    with running_torchserve(workdir / "torchserve", model_store) as server:
        client = Client(server)
        client.ensure_registered("2.0")
        prometheus = PrometheusServer(
            workdir / "prometheus", listen=f"127.0.0.1:{free_port()}", interval=1.0,
            targets=[ScrapeTarget("servekit", f"127.0.0.1:{server.oip_ports['oip_http']}"),
                     ScrapeTarget("torchserve", f"127.0.0.1:{server.ports['metrics']}")],
        )  # fmt: skip
        prometheus.start()
        try:
            yield SimpleNamespace(server=server, client=client, prometheus=prometheus, sent={})
        finally:
            prometheus.stop()


def query(stack: SimpleNamespace, expr: str) -> dict[tuple, float]:
    answer = requests.get(f"{stack.prometheus.url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", answer
    return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in answer["data"]["result"]}


def by(stack: SimpleNamespace, expr: str, *labels: str) -> dict[tuple, float]:
    """``sum by (labels) (expr)`` as {(label values...): value}."""
    result = query(stack, f"sum by ({', '.join(labels)}) ({expr})")
    return {tuple(dict(key)[label] for label in labels): value for key, value in result.items()}


def wait_for(stack: SimpleNamespace, expr: str, expected: float, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        values = list(query(stack, expr).values())
        if values and values[0] == expected:
            return
        assert time.monotonic() < deadline, f"{expr}: {values}, expected {expected}"
        time.sleep(0.5)


def png(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def send(stack: SimpleNamespace, path: str, bodies: list[bytes]) -> list[requests.Response]:
    answers = [stack.client.predict(path, data=body) for body in bodies]
    for answer in answers:
        stack.sent.setdefault(path, []).append(answer)
    return answers


def observed(answers: list[requests.Response]) -> dict[str, Counter]:
    """What the clients saw: statuses, error types and top-1 labels."""
    seen = {"codes": Counter(), "types": Counter(), "classes": Counter()}
    for answer in answers:
        seen["codes"][str(answer.status_code)] += 1
        body = answer.json()
        if answer.status_code == 200:
            seen["classes"][body["predictions"][0]["label"]] += 1
        else:
            seen["types"][body["type"]] += 1
    return seen


def test_prometheus_holds_exactly_the_traffic_each_real_version_answered(stack, samples_dir: Path) -> None:
    digits_png = [(samples_dir / f"digit_{d}.png").read_bytes() for d in range(10)]
    bad = [b"not an image at all", b"\x89PNG\r\n\x1a\n truncated"]
    v1 = send(stack, "digits", digits_png * 2 + bad + bad[:1])  # the default route: version 1.0 answers
    v2 = send(stack, "digits/2.0", digits_png + bad)
    wait_for(stack, "sum(servekit_request_seconds_count)", len(v1) + len(v2))

    for version, answers in (("1.0", v1), ("2.0", v2)):
        seen = observed(answers)
        mine = f'{{model="digits", version="{version}"}}'
        assert {c: v for (c,), v in by(stack, f"servekit_requests_total{mine}", "code").items()} == seen["codes"]
        assert {t: v for (t,), v in by(stack, f"servekit_errors_total{mine}", "type").items()} == seen["types"]
        assert {c: v for (c,), v in by(stack, f"servekit_predictions_total{mine}", "class").items()} == seen["classes"]
        answered, total = seen["codes"]["200"], len(answers)
        stages = {s: v for (s,), v in by(stack, f"servekit_stage_seconds_count{mine}", "stage").items()}
        assert stages["decode"] == total  # every request
        assert stages["preprocess"] == answered  # the bad ones failed in decoding
        assert 1 <= stages["inference"] == stages["postprocess"] <= answered  # once per model call
        assert by(stack, f'servekit_request_seconds_bucket{{model="digits", version="{version}", le="+Inf"}}') == {
            (): total
        }
        assert by(stack, f"servekit_batch_inputs_sum{mine}") == {(): answered}
        assert by(stack, f"servekit_confidence_count{mine}") == {(): answered}
        assert by(stack, f"servekit_input_megapixels_count{mine}") == {(): answered}
        assert by(stack, f"servekit_default_version{mine}") == {(): 1.0 if version == "1.0" else 0.0}
        assert by(stack, f"servekit_workers_ready{mine}") == {(): 1.0}
    assert query(stack, 'servekit_requests_total{version="default"}') == {}  # TorchServe's own label, not ours
    # TorchServe's own metrics are scraped beside ours (its target's first scrape may come after ours: waited for).
    wait_for(stack, 'up{job="torchserve"}', 1.0)
    assert all(v == 1 for v in query(stack, "up").values())


def test_drift_is_reported_and_alerted_for_skewed_traffic_only(
    stack, samples_dir: Path, model_store: Path, repo_root: Path, tmp_path: Path
) -> None:
    holdout = digits("holdout")
    balanced = [png(image) for image in holdout.images[:150]]
    skewed = [(samples_dir / "digit_1.png").read_bytes()] * 130
    assert all(a.status_code == 200 for a in send(stack, "digits", balanced))
    assert all(a.status_code == 200 for a in send(stack, "digits/2.0", skewed))
    expected = sum(len(answers) for answers in stack.sent.values())
    wait_for(stack, "sum(servekit_request_seconds_count)", expected)

    cli = operator_cli(
        stack.server,
        model_store,
        repo_root,
        tmp_path,
        "--metrics-url",
        stack.server.url("oip_http", "/metrics"),
        "--prometheus-url",
        stack.prometheus.url,
    )

    def drift(version: str, source: str) -> tuple[int, dict]:
        result = cli("drift", "digits", version, "--source", source, "--json", timeout=60)
        assert result.returncode in (0, 3), result.stderr
        return result.returncode, json.loads(result.stdout)

    for source in ("metrics", "prometheus"):
        code, report = drift("2.0", source)
        assert (code, report["verdict"]) == (3, "drift"), report
        assert report["signals"]["classes"]["psi"] > 1.0
        code, report = drift("1.0", source)
        assert code == 0, report
        assert report["verdict"] in ("stable", "moderate"), report
        assert report["signals"]["classes"]["verdict"] == "stable"

    psi = {v: value for (v,), value in by(stack, "servekit:drift_psi:15m", "version").items()}
    assert psi["2.0"] > 1.0
    assert psi["1.0"] < 0.1
    deadline = time.monotonic() + DRIFT_ALERT_WAIT_S
    while True:
        alerts = requests.get(f"{stack.prometheus.url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
        drifting = {a["labels"]["version"]: a["state"] for a in alerts if a["labels"]["alertname"] == "ServekitDrift"}
        if drifting.get("2.0") == "firing":
            break
        assert time.monotonic() < deadline, f"ServekitDrift did not fire within {DRIFT_ALERT_WAIT_S} s: {alerts}"
        time.sleep(2)
    assert "1.0" not in drifting  # balanced held-out traffic: neither pending nor firing


def test_the_cluster_dashboard_and_queue_query_read_series_this_server_emits(stack, samples_dir: Path) -> None:
    """Every Grafana dashboard query and KEDA's queue query (servekit bundle) answers from a real scrape."""
    digits_png = [(samples_dir / f"digit_{d}.png").read_bytes() for d in range(10)]
    for path in ("digits", "digits/2.0"):  # traffic of its own, a bad input for the error panels
        send(stack, path, [*digits_png, b"not an image at all"])
    wait_for(stack, "sum(servekit_request_seconds_count)", sum(len(answers) for answers in stack.sent.values()))
    page = requests.get(stack.server.url("oip_http", "/metrics"), timeout=10).text
    emitted = {re.split(r"[{ ]", line, maxsplit=1)[0] for line in page.splitlines() if line and line[0] != "#"}
    recorded = {rule["record"] for group in operators.rule_groups() for rule in group["rules"] if "record" in rule}
    variables = {"$__rate_interval": "1m", "$namespace": ".*", "$model": ".*"}  # Grafana's, as "All" expands them
    queries = []
    for expr in operators.dashboard_queries():
        for variable, value in variables.items():
            expr = expr.replace(variable, value)
        queries.append(expr)
    queries.append(autoscaling.queue_query({"job": autoscaling.SCRAPE_JOB}))
    for expr in queries:
        names = set(re.findall(r"\bservekit[_:][a-z0-9_:]*", expr))
        assert names, expr
        assert names <= emitted | recorded, (expr, sorted(names - emitted - recorded))
    deadline, empty = time.monotonic() + DRIFT_ALERT_WAIT_S, queries  # recording rules: evaluated every second
    while empty := [expr for expr in empty if not query(stack, expr)]:
        assert time.monotonic() < deadline, f"no series for: {empty}"
        time.sleep(2)
