"""servekit rollout against a real TorchServe behind the real proxy, with live traffic through it.

The store holds digits 1.0 and 2.0 as built, plus two drill versions built here from a spec
variant: 3.0 fails 30 % of its inputs once it has served its golden set (10 inputs) (``faults.error_rate``,
``faults.start_after``) and 4.0 sleeps 1 s per batch (``faults.delay_ms``).

The CLI reads this TorchServe's handler metrics (its OIP front's ``/metrics``) and a Prometheus address
where nothing listens, so ``--source auto`` means the metrics page here, whatever else runs on the
machine. The drills and the transcript's good rollout are judged from the proxy log (``--source
proxy-log``); the Ctrl-C rollout (auto) and the last one (``--source metrics``) from the handler metrics,
and both are watched with ``rollout --status`` from this process while they run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from servekit.serving.server import TorchServeProcess, free_port
from tests.integration.conftest import drill_store, one_error_line, operator_cli, running_torchserve

STEPS = ("--steps", "25,100", "--step-seconds", "5", "--min-requests", "10")
FAST = (*STEPS, "--source", "proxy-log")
# 4.0's delay is far above what the default's p99 reaches on a starved machine (409 ms in CI on 2026-12-06,
# while the image was being built beside it, against a 200 ms delay that then looked fast).
DRILLS = {"3.0": {"error_rate": 0.3, "start_after": 10}, "4.0": {"delay_ms": 1000}}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, model_store: Path, repo_root: Path) -> Path:
    return drill_store(tmp_path_factory.mktemp("store"), model_store, repo_root, DRILLS, "test_rollout")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, store: Path) -> Iterator[TorchServeProcess]:
    with running_torchserve(tmp_path_factory.mktemp("torchserve"), store) as server:
        yield server


@pytest.fixture(scope="module")
def cli(server: TorchServeProcess, store: Path, repo_root: Path, tmp_path_factory: pytest.TempPathFactory):
    run = operator_cli(
        server, store, repo_root, tmp_path_factory.mktemp("deploy"),
        "--metrics-url", server.url("oip_http", "/metrics"), "--prometheus-url", f"http://127.0.0.1:{free_port()}",
        proxy_port=free_port(),
    )  # fmt: skip
    assert run("proxy", "start").returncode == 0
    try:
        yield run
    finally:
        run.proxy.stop()


class Traffic:
    """About 20 requests a second through the proxy from one thread, every answer kept; stops on ``stop``."""

    def __init__(self, url: str, headers: dict, samples: Path) -> None:
        self.url, self.headers = url, headers
        self.payloads = [(samples / f"digit_{d}.png").read_bytes() for d in range(10)]
        self.answers: list[tuple[int, str]] = []  # (status, served version or error type)
        self.failures: list[str] = []  # transport errors
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._send, daemon=True)

    def _send(self) -> None:
        n = 0
        while not self._stop.is_set():
            try:  # a new connection each time, as test_proxy does: nginx reloads between steps
                response = requests.post(self.url, data=self.payloads[n % 10], headers=self.headers, timeout=30)
                body = response.json()
                self.answers.append((response.status_code, body.get("version") or body.get("type", "?")))
            except (requests.RequestException, ValueError) as exc:
                self.failures.append(repr(exc))
            n += 1
            self._stop.wait(0.05)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


@pytest.fixture
def traffic(cli, server: TorchServeProcess, samples_dir: Path) -> Iterator[Traffic]:
    with Traffic(cli.proxy.url("/predictions/digits"), server.headers("inference"), samples_dir) as traffic:
        yield traffic


def default_of(cli) -> str:
    states = json.loads(cli("status", "--json").stdout)
    return next(s["version"] for s in states if s["model"] == "digits" and s["default"])


def events(cli, action: str) -> list[dict]:
    lines = cli.history.read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["action"] == action]


def logged_errors(cli) -> set[str]:
    """The split targets of every non-2xx answer to /predictions/digits in the proxy's request log."""
    records = map(json.loads, cli.proxy.request_log.read_text().splitlines())
    return {r["target"] for r in records if r["uri"] == "/predictions/digits" and not 200 <= r["status"] < 300}


def test_a_version_failing_some_inputs_is_rolled_back_at_the_first_step(cli, traffic: Traffic) -> None:
    result = cli("rollout", "digits", "3.0", *FAST)
    print(result.stdout + result.stderr)  # docs/operating.md's transcript ("Rolling out a version")
    error = one_error_line(result)
    assert "rollout of digits 3.0 aborted at 25%: step 1 (25%): canary error rate" in error, error
    assert error.endswith("canary removed, default unchanged"), error
    assert "step 1/2  25%" in result.stdout
    assert "-> abort: canary error rate" in result.stdout
    assert cli.proxy.state()["routes"] == {}
    assert default_of(cli) == "1.0"
    time.sleep(1)
    statuses = {(status, who) for status, who in traffic.answers}
    # Clients saw errors only from the canary's share: injected 503s, never from the default.
    assert {s for s in statuses if s[0] != 200} == {(503, "InjectedFault")}, statuses
    assert {who for status, who in statuses if status == 200} <= {"1.0", "3.0"}
    assert traffic.failures == []
    assert logged_errors(cli) == {"/3.0"}
    aborted = events(cli, "rollout-aborted")[-1]
    assert (aborted["version"], aborted["percent"], aborted["canary_removed"]) == ("3.0", 25, True)


def test_a_slow_version_fails_the_p99_ratio(cli, traffic: Traffic) -> None:
    # 5 canary requests: at a second each, the one traffic thread sends about one a second to the canary.
    result = cli("rollout", "digits", "4.0", *STEPS, "--min-requests", "5", "--source", "proxy-log", "--json")
    print(result.stdout + result.stderr)
    error = one_error_line(result)
    assert "rollout of digits 4.0 aborted at 25%: step 1 (25%): p99 ratio" in error, error
    step = [json.loads(line) for line in result.stdout.splitlines() if '"rollout-step"' in line][0]
    assert step["verdict"] == "abort"
    assert step["canary"]["p99_ms"] >= 1000
    assert step["p99_ratio"] > 1.5
    assert cli.proxy.state()["routes"] == {}
    assert default_of(cli) == "1.0"
    assert traffic.failures == []
    assert {status for status, _ in traffic.answers} == {200}


def rollout_status(cli) -> dict:
    result = cli("rollout", "--status", "digits", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def status_while_running(cli, process: subprocess.Popen, percent: int) -> dict:
    """``rollout --status --json`` polled until the step at ``percent`` has its first window figures."""
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline, "the rollout never reached its step"
        assert process.poll() is None, process.communicate()
        status = rollout_status(cli)
        if status.get("phase") == "step" and status.get("percent") == percent and status.get("window"):
            return status
        time.sleep(0.3)


def test_ctrl_c_mid_step_leaves_no_canary_and_the_default(cli, traffic: Traffic, repo_root: Path) -> None:
    process = cli.start("rollout", "digits", "2.0", "--steps", "25,100", "--step-seconds", "60")
    try:
        status = status_while_running(cli, process, 25)  # the first step is live
        assert cli.proxy.state()["routes"]["digits"]["canary"] == {"version": "2.0", "percent": 25}
        assert (status["pid"], status["alive"], status["state"], status["step"], status["of"]) == (
            process.pid, True, "running", 1, 2)  # fmt: skip
        assert status["source"] == "metrics"  # auto: no Prometheus at the address given, the metrics page answers
        assert status["settings_from"]["min_requests"] == "spec"  # models.yaml's rollout: section
        shown = cli("rollout", "--status", "digits").stdout.splitlines()
        print("\n".join(["$ servekit rollout --status digits", *shown]))  # docs/operating.md's transcript
        assert shown[0].startswith(f"rollout of digits 2.0: running (pid {process.pid}), step 1/2 at 25% for "), shown
        assert shown[1].startswith("  window "), shown
        time.sleep(1)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert "aborted at 25%: interrupted (SIGINT); canary removed, default unchanged" in err
    assert cli.proxy.state()["routes"] == {}
    assert default_of(cli) == "1.0"
    assert events(cli, "rollout-aborted")[-1]["reason"] == "interrupted (SIGINT)"
    status = rollout_status(cli)
    assert (status["state"], status["alive"], status["outcome"]["reason"]) == ("aborted", False, "interrupted (SIGINT)")
    assert (status["outcome"]["exit_code"], status["outcome"]["canary_removed"]) == (130, True)
    shown = cli("rollout", "--status", "digits").stdout.splitlines()[0]
    print(f"$ servekit rollout --status digits\n{shown}")
    assert shown.startswith("rollout of digits 2.0: aborted at "), shown
    assert f"(pid {process.pid} has ended): interrupted (SIGINT); canary removed; figures from metrics" in shown


def test_a_good_version_is_walked_through_every_step_and_promoted(cli, traffic: Traffic) -> None:
    # The walk is under test, not the latency gate (test_a_slow_version_fails_the_p99_ratio has it): the p99
    # of 10-20 canary requests is their slowest, and one request slowed by the suite's other processes put a
    # good copy of the model at 7.6x the default's in CI (144 against 19 ms; 1.8x earlier), so the gate is
    # 20 here, as in the metrics-source test below.
    result = cli("rollout", "digits", "2.0", *FAST, "--max-p99-ratio", "20")
    assert result.returncode == 0, result.stderr
    print(result.stdout)  # docs/operating.md's transcript ("Rolling out a version")
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "rollout digits 2.0: default 1.0, steps 25,100%, figures from proxy-log"
    assert lines[1] == (
        "settings: steps 25,100 (flag), step_seconds 5 (flag), max_error_rate 0.01 (spec), max_p99_ratio 20 "
        "(flag), min_requests 10 (flag), max_wait_factor 4 (spec), max_drift off (default)"
    )
    assert "-> advance" in lines[2]
    assert "-> promote" in lines[3]
    assert lines[4] == "promoted digits 2.0 (golden set 10/10); previous default 1.0"
    assert default_of(cli) == "2.0"
    assert cli.proxy.state()["routes"] == {}
    time.sleep(1)
    assert traffic.failures == []
    assert {status for status, _ in traffic.answers} == {200}  # zero failed client requests
    steps = [e for e in events(cli, "rollout-step") if e["version"] == "2.0"]
    assert [(s["percent"], s["verdict"]) for s in steps] == [(25, "advance"), (100, "promote")]
    assert all(s["canary"]["requests"] >= 10 for s in steps)
    assert events(cli, "rollout-done")[-1]["previous_default"] == "1.0"


def test_a_good_version_judged_from_the_handler_metrics_is_promoted_and_status_shows_it(
    cli, traffic: Traffic, repo_root: Path
) -> None:
    before = default_of(cli)
    version = "1.0" if before == "2.0" else "2.0"  # the other built version, whichever is the default now
    # The source is under test here, not the latency gate (test_a_slow_version_fails_the_p99_ratio is): with 10
    # to 20 canary requests a step, the p99 of the handler's histogram is its slowest bucket's, and on a shared
    # machine one slow request puts a good version's p99 in a bucket 3x the default's (CI: 224.5 against
    # 73.5 ms while the image was being built beside it); the error-rate gate applies as always.
    process = cli.start("rollout", "digits", version, *STEPS, "--source", "metrics", "--max-p99-ratio", "20")
    try:
        running = status_while_running(cli, process, 25)
        during = cli("rollout", "--status", "digits").stdout  # human form; the step may have moved on meanwhile
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    print(f"$ servekit rollout --status digits   # while it runs\n{during}{out}{err}")
    assert process.returncode == 0, err
    assert during.startswith(f"rollout of digits {version}: "), during
    assert (running["version"], running["step"], running["alive"], running["source"]) == (version, 1, True, "metrics")
    assert (running["settings"]["max_p99_ratio"], running["settings_from"]["max_p99_ratio"]) == (20, "flag")
    assert {"seconds", "canary", "default", "error_limit", "p99_ratio"} <= set(running["window"])  # each poll's
    lines = out.strip().splitlines()
    assert lines[0] == f"rollout digits {version}: default {before}, steps 25,100%, figures from metrics"
    assert lines[-1] == f"promoted digits {version} (golden set 10/10); previous default {before}"
    assert default_of(cli) == version
    assert cli.proxy.state()["routes"] == {}
    steps = [e for e in events(cli, "rollout-step") if e["version"] == version][-2:]
    assert [(s["percent"], s["verdict"]) for s in steps] == [(25, "advance"), (100, "promote")]
    assert all(s["canary"]["requests"] >= 10 and s["canary"]["p99_ms"] is not None for s in steps)
    assert steps[0]["default"]["requests"] >= 10  # the default route's answers, under the default's real version
    assert events(cli, "rollout-start")[-1]["source"] == "metrics"
    time.sleep(1)
    assert traffic.failures == []
    assert {status for status, _ in traffic.answers} == {200}
    final = rollout_status(cli)
    assert (final["state"], final["alive"], final["outcome"]["previous_default"]) == ("promoted", False, before)
    shown = cli("rollout", "--status", "digits").stdout.splitlines()
    print("\n".join(["$ servekit rollout --status digits", *shown]))
    assert shown[0].startswith(f"rollout of digits {version}: promoted at "), shown
    assert shown[0].endswith(f"has ended); previous default {before}; figures from metrics"), shown
