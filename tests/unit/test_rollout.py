"""servekit rollout: the analysis on synthetic log lines and fabricated metrics pages, the step walk with
a fake deployer and clock, the status file and --status, the spec's rollout: section and the precedence
of flags, spec and defaults, the drift gate, the proxy's request log format, and the handler's injected
faults."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from handlers.base import BatchHandler
from handlers.config import Faults, HandlerConfig
from handlers.errors import InjectedFault
from servekit.cli import main
from servekit.deploy.history import History
from servekit.deploy.proxy import NginxProxy, render_config
from servekit.deploy.rollout import (
    BUILT_IN,
    Analysis,
    Figures,
    LogRecord,
    MetricsPageSource,
    PrometheusSource,
    ProxyLogSource,
    RequestLog,
    Rollout,
    RolloutAborted,
    RolloutProcess,
    RolloutSpec,
    Settings,
    StatusFile,
    Thresholds,
    analyse,
    class_drift,
    format_event,
    format_status,
    log_window,
    p99,
    parse_steps,
    read_status,
    rollout_settings,
    select_source,
    status_path,
)
from servekit.deploy.state import Canary, DeploymentState, DeploymentStore
from servekit.deploy.workflows import DeployError
from servekit.observe.drift import load_reference
from servekit.observe.metrics_source import MetricsError, MetricsPage, PrometheusAPI, Samples, parse_exposition
from servekit.serving.logkeeper import backup_path, rotate
from servekit.serving.nginx import nginx_binary
from servekit.serving.processes import command_line, free_port
from tests.fake_metrics import (
    CLASSES,
    FakeMetricsServer,
    Traffic,
    exposition,
    prometheus_of,
    vector,
    write_store,
)
from tests.fake_server import serving

URI = "/predictions/digits"


def analyse_log(
    records: list[LogRecord], version: str, thresholds: Thresholds, baseline: float | None = None
) -> Analysis:
    window = log_window(records, "digits", version)
    return analyse(window.canary, window.default, thresholds, baseline)


def records(target: str, count: int, status: int = 200, seconds: float = 0.01, at: float = 100.0) -> list[LogRecord]:
    return [LogRecord(at, URI, status, seconds, target) for _ in range(count)]


# ------------------------------------------------------------------------------------------ the request log
def line(msec: float, status: int = 200, target: str = "", uri: str = URI, request_time: float = 0.004) -> str:
    return json.dumps({"msec": msec, "uri": uri, "status": status, "request_time": request_time, "target": target})


def test_the_request_log_reads_complete_new_lines_within_the_window(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    path.write_text(line(1.0) + "\n")
    log = RequestLog(path)
    log.start()  # what was there before the rollout never counts
    with path.open("a") as handle:
        handle.write(line(10.0, 503, "/3.0") + "\n" + "not json\n" + line(20.0) + "\n" + line(30.0)[:12])
    assert [(r.time, r.status, r.target) for r in log.records(5.0, 25.0)] == [(10.0, 503, "/3.0"), (20.0, 200, "")]
    assert log.records(15.0, 25.0) == [LogRecord(20.0, URI, 200, 0.004, "")]
    with path.open("a") as handle:  # the cut line is finished: read now, whole
        handle.write(line(30.0)[12:] + "\n")
    assert [r.time for r in log.records(15.0, 35.0)] == [20.0, 30.0]
    path.write_text(line(40.0) + "\n")  # rotated: a new, shorter file is read from its start
    assert [r.time for r in log.records(35.0, 45.0)] == [40.0]


def append(path: Path, *times: float) -> None:
    with path.open("a") as handle:
        handle.write("".join(line(t) + "\n" for t in times))


def test_the_request_log_reads_across_a_rotation_without_losing_or_repeating_records(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    append(path, 1.0)
    log = RequestLog(path)
    log.start()
    append(path, 10.0, 11.0)
    assert [r.time for r in log.records(0.0, 100.0)] == [10.0, 11.0]
    append(path, 12.0)
    rotate(path, keep=2)  # the keeper renames the file; nginx writes the old one until it reopens its log
    append(backup_path(path, 1), 13.0)
    assert [r.time for r in log.records(0.0, 100.0)] == [10.0, 11.0, 12.0, 13.0]
    append(backup_path(path, 1), 14.0)  # written before nginx reopened, read after the new file appeared
    append(path, 20.0)
    with path.open("a") as handle:  # a new file longer than the old offset is still read from its start
        handle.write("".join(line(21.0 + i / 100) + "\n" for i in range(50)))
    assert [r.time for r in log.records(0.0, 100.0)][4:7] == [14.0, 20.0, 21.0]
    assert len(log.records(0.0, 100.0)) == 4 + 2 + 50
    rotate(path, keep=2)  # rotated again: the first file moves on to .2 and is no longer read
    append(backup_path(path, 2), 15.0)
    append(path, 30.0)
    times = [r.time for r in log.records(0.0, 100.0)]
    assert (len(times), times[-1], 15.0 in times) == (57, 30.0, False)


def test_the_request_log_started_before_the_file_exists_reads_it_from_its_start(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    log = RequestLog(path)
    log.start()
    assert log.records(0.0, 100.0) == []
    append(path, 5.0)
    assert [r.time for r in log.records(0.0, 100.0)] == [5.0]
    rotate(path, keep=1)
    append(backup_path(path, 1), 6.0)
    assert [r.time for r in log.records(0.0, 100.0)] == [5.0, 6.0]  # from .1: nginx has not reopened its log yet
    append(path, 7.0)
    assert [r.time for r in log.records(0.0, 100.0)] == [5.0, 6.0, 7.0]


def test_p99_is_the_nearest_rank() -> None:
    assert p99([]) is None
    assert p99([5.0]) == 5.0
    assert p99([float(i) for i in range(1, 101)]) == 99.0
    assert p99([float(i) for i in range(1, 201)]) == 198.0


# ------------------------------------------------------------------------------------------ the analysis
def test_a_clean_canary_passes() -> None:
    result = analyse_log(records("", 100) + records("/2.0", 60), "2.0", Thresholds(min_requests=50))
    assert result.passed
    assert (result.canary.requests, result.default.requests, result.p99_ratio) == (60, 100, 1.0)


def test_the_error_budget_is_absolute_and_widened_by_the_defaults_own_errors() -> None:
    thresholds = Thresholds(max_error_rate=0.01, min_requests=50)
    canary = records("/2.0", 98) + records("/2.0", 2, status=503)  # 2.0 %
    failed = analyse_log(records("", 100) + canary, "2.0", thresholds)
    assert failed.reason == "canary error rate 2.0% > 1.0% (default 0.0%)"
    # Clients sending bad images get 400 from both versions: the default fails 1.5 %, the limit is 2.5 %.
    default = records("", 197) + records("", 3, status=400)
    assert analyse_log(default + canary, "2.0", thresholds).error_limit == 0.025
    assert analyse_log(default + canary, "2.0", thresholds).passed


def test_the_p99_ratio_counts_only_when_both_sides_have_enough_requests() -> None:
    thresholds = Thresholds(max_p99_ratio=1.5, min_requests=50)
    slow = records("/4.0", 60, seconds=0.2)
    result = analyse_log(records("", 60, seconds=0.02) + slow, "4.0", thresholds)
    assert result.p99_ratio == 10.0
    assert result.reason == "p99 ratio 10.00 > 1.5 (canary 200 ms, default 20 ms)"
    # At 100 % the default gets no traffic: judged on errors alone.
    assert analyse_log(records("", 10, seconds=0.02) + slow, "4.0", thresholds).passed


def test_too_few_canary_requests_is_not_a_verdict_on_the_canary() -> None:
    result = analyse_log(records("", 200) + records("/2.0", 49), "2.0", Thresholds(min_requests=50))
    assert result.reason == "not enough traffic: the canary had 49 of 50 requests"


def test_only_the_models_split_route_counts() -> None:
    noise = [LogRecord(1.0, "/predictions/digits/2.0", 500, 1.0, ""), LogRecord(1.0, "/ping", 500, 1.0, "")]
    other = [LogRecord(1.0, "/predictions/letters", 500, 1.0, "/2.0")]
    result = analyse_log(noise + other + records("/2.0", 5), "2.0", Thresholds(min_requests=5))
    assert (result.canary.requests, result.default.requests, result.passed) == (5, 0, True)


def test_oip_and_kserve_requests_through_the_proxy_are_judged_with_the_native_ones() -> None:
    uris = (URI, "/v2/models/digits/infer", "/v1/models/digits:predict")
    split = [LogRecord(1.0, uri, 200, 0.01, target) for uri in uris for target in ("", "/2.0")]
    failed = [LogRecord(1.0, "/v2/models/digits/infer", 500, 0.01, "/2.0")]
    window = log_window(split + failed, "digits", "2.0")
    assert (window.canary.requests, window.canary.errors, window.default.requests) == (4, 1, 3)
    other = [
        LogRecord(1.0, "/v2/models/letters/infer", 500, 1.0, "/2.0"),
        LogRecord(1.0, "/v2/models/digits", 500, 1, ""),
    ]
    assert log_window(other, "digits", "2.0").canary.requests == 0


def test_a_log_line_names_the_version_that_answered() -> None:
    line = b'{"msec":1.5,"uri":"/v2/models/digits/infer","status":200,"request_time":0.01,"target":"","served":"1.0"}'
    assert LogRecord.parse(line) == LogRecord(1.5, "/v2/models/digits/infer", 200, 0.01, "", "1.0")
    older = b'{"msec":1.5,"uri":"/predictions/digits","status":200,"request_time":0.01,"target":"/2.0"}'
    assert LogRecord.parse(older).served == ""  # written before the field existed: still read


@pytest.mark.parametrize("text", ["", "10,x", "0,50", "50,25", "10,10", "101"])
def test_bad_steps_are_refused(text: str) -> None:
    with pytest.raises(DeployError, match="--steps must be"):
        parse_steps(text)


def test_steps_parse() -> None:
    assert parse_steps("10,25,50,100") == (10, 25, 50, 100)


# ------------------------------------------------------------------------------------------ the walk
class FakeClient:
    def __init__(self, deployer: FakeDeployer) -> None:
        self.deployer = deployer

    def describe(self, model: str) -> list[dict]:
        return [{"modelVersion": v} for v in self.deployer.registered]

    def default_version(self, model: str) -> str:
        return self.deployer.default


class FakeDeployer:
    """The Deployer's surface the rollout uses, over a real state file and history."""

    def __init__(self, tmp_path: Path, golden_ok: bool = True) -> None:
        self.deployments = DeploymentStore(tmp_path / "state.json", History(tmp_path / "history.jsonl"))
        self.registered, self.default, self.golden_ok = ["1.0"], "1.0", golden_ok
        self.client = FakeClient(self)
        self.calls: list[tuple] = []

    def canary_of(self, model: str = "digits") -> Canary | None:
        return self.deployments.load().model(model).canary

    def register(self, model: str, version: str) -> dict:
        self.calls.append(("register", version))
        self.registered.append(version)
        return {}

    def golden_check(self, model: str, version: str) -> list[dict]:
        self.calls.append(("golden", version))
        return [{"file": "digit_3.png", "expected": "3", "got": "3" if self.golden_ok else "8", "status": 200,
                 "ok": self.golden_ok}]  # fmt: skip

    def canary(self, model: str, version: str, percent: int) -> dict:
        self.calls.append(("canary", percent))
        state = self.deployments.load()
        state.model(model).set_canary(version, percent)
        self.deployments.save(state)
        return self.deployments.record("canary", model, version=version, percent=percent)

    def promote(self, model: str, version: str) -> dict:
        self.calls.append(("promote", version))
        state = self.deployments.load()
        state.model(model).promoted(version)
        self.deployments.save(state)
        previous, self.default = self.default, version
        return self.deployments.record("promote", model, version=version, previous_default=previous, golden=1)


class FakeLog:
    """``rate`` requests a second through the proxy, split as the deployer's canary says; each version
    answers with its ``behaviour``: (failure share, seconds)."""

    def __init__(self, deployer: FakeDeployer, rate: int = 20, behaviour: dict | None = None) -> None:
        self.deployer, self.rate = deployer, rate
        self.behaviour = {"1.0": (0.0, 0.01), "2.0": (0.0, 0.01), **(behaviour or {})}

    def start(self) -> None:
        pass

    def records(self, since: float, until: float) -> list[LogRecord]:
        canary, served, out = self.deployer.canary_of(), {}, []
        for n in range(int((until - since) * self.rate)):
            to_canary = canary is not None and Faults(canary.percent / 100).fails(n)  # an exact share
            version = canary.version if to_canary else self.deployer.default
            fail_share, seconds = self.behaviour[version]
            i = served[version] = served.get(version, -1) + 1
            status = 503 if Faults(fail_share).fails(i) else 200
            out.append(LogRecord(since + n / self.rate, URI, status, seconds, f"/{version}" if to_canary else ""))
        return out


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps = 0
        self.interrupt_at: int | None = None
        self.on_sleep = None

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        if self.interrupt_at == self.sleeps:
            raise KeyboardInterrupt
        if self.on_sleep is not None:
            self.on_sleep(self.sleeps)
        self.now += seconds


def rollout(deployer: FakeDeployer, log: FakeLog, clock: FakeClock, events: list, **kwargs) -> Rollout:
    kwargs.setdefault("thresholds", Thresholds(min_requests=20))
    return Rollout(deployer, ProxyLogSource(log), steps=(10, 50, 100), step_seconds=10, emit=events.append,
                   clock=lambda: clock.now, sleep=clock.sleep, **kwargs)  # fmt: skip


def actions(deployer: FakeDeployer) -> list[str]:
    return [e["action"] for e in deployer.deployments.events("digits")]


def test_a_good_version_is_registered_walked_through_every_step_and_promoted(tmp_path: Path) -> None:
    deployer, clock, events = FakeDeployer(tmp_path), FakeClock(), []
    done = rollout(deployer, FakeLog(deployer), clock, events).run("digits", "2.0")
    assert deployer.calls == [("register", "2.0"), ("golden", "2.0"), ("canary", 10), ("canary", 50),
                              ("canary", 100), ("promote", "2.0")]  # fmt: skip
    assert actions(deployer) == ["rollout-start", "canary", "rollout-step", "canary", "rollout-step", "canary",
                                 "rollout-step", "promote", "rollout-done"]  # fmt: skip
    steps = [e for e in events if e["action"] == "rollout-step"]
    assert [(s["percent"], s["verdict"]) for s in steps] == [(10, "advance"), (50, "advance"), (100, "promote")]
    # 10 % of 20 req/s needs 10 s for 20 canary requests: the step ends as soon as it is both long and full enough
    assert [s["window_s"] for s in steps] == [10.0, 10.0, 10.0]
    assert steps[0]["canary"] == {"requests": 20, "errors": 0, "error_rate": 0.0, "p99_ms": 10.0}
    assert done["previous_default"] == "1.0"
    assert deployer.default == "2.0"
    assert deployer.canary_of() is None
    assert format_event(steps[0]).startswith("step 1/3  10% (10s): canary 20 req, 0.0% errors, p99 10 ms | default ")


def test_a_failing_version_is_rolled_back_at_the_first_step(tmp_path: Path) -> None:
    deployer, clock, events = FakeDeployer(tmp_path), FakeClock(), []
    deployer.registered.append("3.0")
    log = FakeLog(deployer, behaviour={"3.0": (0.3, 0.01)})
    with pytest.raises(RolloutAborted) as raised:
        rollout(deployer, log, clock, events).run("digits", "3.0")
    assert raised.value.exit_code == 1
    assert str(raised.value) == (
        "rollout of digits 3.0 aborted at 10%: step 1 (10%): canary error rate 30.0% > 1.0% (default 0.0%); "
        "canary removed, default unchanged"
    )
    assert ("promote", "3.0") not in deployer.calls
    assert ("register", "3.0") not in deployer.calls
    assert deployer.canary_of() is None
    assert deployer.default == "1.0"
    assert actions(deployer) == ["rollout-start", "canary", "rollout-step", "canary", "rollout-aborted"]
    assert events[-1]["canary_removed"] is True
    assert events[-2]["verdict"] == "abort"


def test_a_slow_version_fails_the_p99_ratio(tmp_path: Path) -> None:
    deployer, clock, events = FakeDeployer(tmp_path), FakeClock(), []
    log = FakeLog(deployer, rate=40, behaviour={"2.0": (0.0, 0.2)})
    with pytest.raises(RolloutAborted, match=r"p99 ratio 20.00 > 1.5 \(canary 200 ms, default 10 ms\)"):
        rollout(deployer, log, clock, events, thresholds=Thresholds(min_requests=20)).run("digits", "2.0")
    assert deployer.canary_of() is None


def test_not_enough_traffic_aborts_after_the_longest_wait(tmp_path: Path) -> None:
    deployer, clock, events = FakeDeployer(tmp_path), FakeClock(), []
    start = clock.now
    with pytest.raises(RolloutAborted, match="not enough traffic: the canary had 4 of 20 requests"):
        rollout(deployer, FakeLog(deployer, rate=1), clock, events, max_wait_factor=4).run("digits", "2.0")
    assert clock.now - start == 40.0  # max_wait_factor x step_seconds
    assert deployer.canary_of() is None


class StarvedDefaultLog(FakeLog):
    """A slow canary holding every client: while a canary is set, the default answers nothing."""

    def records(self, since: float, until: float) -> list[LogRecord]:
        out = super().records(since, until)
        return [r for r in out if r.target] if self.deployer.canary_of() is not None else out


def test_a_step_below_100_percent_waits_for_the_defaults_requests_and_aborts_without_them(tmp_path: Path) -> None:
    """No latency yardstick, no advance: with the default starved, the step waits its longest and aborts."""
    deployer, clock, events = FakeDeployer(tmp_path), FakeClock(), []
    start = clock.now
    log = StarvedDefaultLog(deployer, rate=20, behaviour={"2.0": (0.0, 0.2)})
    with pytest.raises(RolloutAborted, match="not enough traffic on the default to compare p99: it had 0 of 20"):
        rollout(deployer, log, clock, events, max_wait_factor=4).run("digits", "2.0")
    assert clock.now - start == 40.0  # the canary had its 20 requests at 10 s; the step waited for the default
    assert deployer.canary_of() is None
    assert deployer.default == "1.0"


def test_the_default_is_needed_only_below_100_percent() -> None:
    from servekit.deploy.rollout.judging import Figures, analyse

    canary, starved = Figures(requests=30, errors=0, p99_ms=200.0), Figures(requests=3, errors=0, p99_ms=10.0)
    thresholds = Thresholds(min_requests=20)
    split = analyse(canary, starved, thresholds, compare=True)
    assert split.reason == "not enough traffic on the default to compare p99: it had 3 of 20 requests"
    assert split.p99_ratio is None
    assert analyse(canary, starved, thresholds, compare=False).passed  # at 100 %: errors alone
    failing = Figures(requests=30, errors=30, p99_ms=200.0)  # the canary's own failures come first
    assert analyse(failing, starved, thresholds, compare=True).reason.startswith("canary error rate 100.0%")


def test_ctrl_c_mid_step_removes_the_canary_and_exits_130(tmp_path: Path) -> None:
    deployer, clock, events = FakeDeployer(tmp_path), FakeClock(), []
    clock.interrupt_at = 15  # in the second step
    with pytest.raises(RolloutAborted, match=r"aborted at 50%: interrupted \(SIGINT\)") as raised:
        rollout(deployer, FakeLog(deployer), clock, events).run("digits", "2.0")
    assert raised.value.exit_code == 130
    assert deployer.canary_of() is None
    assert deployer.default == "1.0"
    assert deployer.deployments.events("digits")[-1]["reason"] == "interrupted (SIGINT)"


@pytest.mark.parametrize(("signum", "name", "code"), [(signal.SIGTERM, "SIGTERM", 143), (signal.SIGINT, "SIGINT", 130)])
def test_a_real_signal_mid_step_aborts_cleanly_even_when_sigint_was_inherited_ignored(
    tmp_path: Path, signum: int, name: str, code: int
) -> None:
    """A rollout started from a background job inherits SIGINT ignored; kill (SIGTERM) must not leave the canary.

    Run in a process of its own, started with SIGINT ignored as a background job's is: a real signal then
    meets the rollout's handlers and nothing of the test runner's (in the whole suite, a pytest-xdist
    worker's signal state after other modules let a SIGTERM end the worker itself, three CI runs running).
    """
    script = f"""
import os, signal, sys
from pathlib import Path
from servekit.deploy.rollout import RolloutAborted
from tests.unit.test_rollout import FakeClock, FakeDeployer, FakeLog, rollout

assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # inherited, as from a background job
deployer, clock, events = FakeDeployer(Path(sys.argv[1])), FakeClock(), []
clock.on_sleep = lambda sleeps: os.kill(os.getpid(), {int(signum)}) if sleeps == 15 else None  # in the second step
try:
    rollout(deployer, FakeLog(deployer), clock, events).run("digits", "2.0")
except RolloutAborted as exc:
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # the process's own handlers are back
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    print(exc.exit_code, deployer.canary_of(), deployer.default)
    print(exc)
    print(deployer.deployments.events("digits")[-1]["reason"])
else:
    print("not aborted")
"""

    def background_job() -> None:  # the child starts as a background job's command would: SIGINT ignored
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                            timeout=120, cwd=root, preexec_fn=background_job, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    first, message, reason = result.stdout.strip().splitlines()
    assert first == f"{code} None 1.0"  # exit code, no canary left, default kept
    assert re.search(rf"aborted at 50%: interrupted \({name}\)", message), message
    assert reason == f"interrupted ({name})"


def test_a_canary_changed_by_someone_else_aborts_and_is_left_alone(tmp_path: Path) -> None:
    deployer, clock, events = FakeDeployer(tmp_path), FakeClock(), []
    other = FakeDeployer(tmp_path)  # another operator's `servekit canary`, same state file

    def meddle(sleeps: int) -> None:
        if sleeps == 3:
            other.canary("digits", "2.0", 40)

    clock.on_sleep = meddle
    with pytest.raises(RolloutAborted, match=r"changed outside this rollout \(now 2.0 at 40%\): left as it is"):
        rollout(deployer, FakeLog(deployer), clock, events).run("digits", "2.0")
    assert deployer.canary_of() == Canary("2.0", 40)
    assert events[-1]["canary_removed"] is False


def test_an_existing_canary_or_a_failed_golden_set_stops_before_any_traffic(tmp_path: Path) -> None:
    deployer, clock, events = FakeDeployer(tmp_path, golden_ok=False), FakeClock(), []
    with pytest.raises(RolloutAborted, match=r"golden set failed \(1/1\): digit_3.png: expected 3, got 8"):
        rollout(deployer, FakeLog(deployer), clock, events).run("digits", "2.0")
    assert [c for c in deployer.calls if c[0] == "canary"] == []
    deployer.canary("digits", "5.0", 10)
    with pytest.raises(RolloutAborted, match=r"already has a canary \(5.0 at 10%\)"):
        rollout(deployer, FakeLog(deployer), clock, events).run("digits", "2.0")
    assert deployer.canary_of() == Canary("5.0", 10)


# ------------------------------------------------------------------------------------------ the proxy's log
def test_the_proxy_logs_json_lines_with_the_splits_choice_and_passes_nginx_check(tmp_path: Path) -> None:
    proxy = NginxProxy(tmp_path / "proxy", 18090, "127.0.0.1:18080")
    state = DeploymentState("127.0.0.1:18090", "127.0.0.1:18080")
    state.model("digits").set_canary("2.0", 25)
    state.model("letters").set_shadow("2.0")
    for routed in (state, DeploymentState("127.0.0.1:18090", "127.0.0.1:18080")):
        text = render_config(routed, proxy.prefix)
        assert "log_format servekit_json escape=json" in text
        assert '"msec":$msec,"uri":"$uri","status":$status,"request_time":$request_time' in text
        assert f"access_log {proxy.request_log} servekit_json;" in text
        proxy.install(text)
        check = subprocess.run([nginx_binary(), "-t", "-p", str(proxy.prefix), "-c", str(proxy.conf)],
                               capture_output=True, text=True, check=False)  # fmt: skip
        assert check.returncode == 0, check.stderr
    text = render_config(state, proxy.prefix)
    assert "location = /predictions/digits {\n            set $servekitlog_target $servekit_digits;\n" in text
    assert "location = /predictions/letters {\n            mirror /_shadow/letters;" in text


# ------------------------------------------------------------------------------------------ injected faults
def test_faults_are_validated_and_absent_by_default() -> None:
    assert "faults" not in HandlerConfig().to_dict()  # a normal archive's model-config.yaml is unchanged
    config = HandlerConfig.from_dict({"faults": {"error_rate": 0.3, "delay_ms": 200}})
    assert config.faults == Faults(0.3, 200)
    assert HandlerConfig.from_dict(config.to_dict()) == config
    for bad, message in (
        ({"error_rate": 1.5}, "faults.error_rate: must be a number from 0.0 to 1.0, got 1.5"),
        ({"delay_ms": 6000}, "faults.delay_ms: must be a whole number from 0 to 5000, got 6000"),
        ({"delay": 1}, "faults.delay: unknown key"),
        ({"start_after": -1}, "faults.start_after: must be a whole number from 0 to 1000000, got -1"),
        ([1], "faults: must be a mapping"),
    ):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            HandlerConfig.from_dict({"faults": bad})


def test_the_error_rate_fails_an_exact_deterministic_share() -> None:
    assert [Faults(0.3).fails(n) for n in range(10)].count(True) == 3
    assert sum(Faults(0.3).fails(n) for n in range(1000)) == 300
    assert not any(Faults(0.0).fails(n) for n in range(100))
    assert all(Faults(1.0).fails(n) for n in range(100))
    assert [Faults(1.0, start_after=3).fails(n) for n in range(5)] == [False, False, False, True, True]


class EchoHandler(BatchHandler):
    def inference(self, items):
        return items

    def postprocess(self, outputs, items):
        return list(outputs)


def test_the_base_fails_injected_inputs_with_a_503_and_only_once_initialized() -> None:
    handler = EchoHandler()
    handler.settings, handler.batch_size = HandlerConfig(faults=Faults(0.5)), 4
    assert handler.run([1, 2, 3, 4]) == [1, 2, 3, 4]  # warm-up (not initialized): no faults
    handler.initialized = True
    results = handler.run([1, 2, 3, 4])
    assert [type(r).__name__ for r in results] == ["int", "InjectedFault", "int", "InjectedFault"]
    assert isinstance(results[1], InjectedFault)
    assert results[1].status == 503


def test_the_spec_passes_validated_faults_to_the_handler_config(tmp_path: Path) -> None:
    from servekit.build.spec import SpecError, parse_spec
    from tests.unit.test_spec import base_spec

    data = base_spec()
    data["models"]["digits"]["versions"]["3.0"] = {"precision": "fp32", "weights": {"train": "digits"},
                                                   "faults": {"error_rate": 0.3, "start_after": 10}}  # fmt: skip
    plain, drill = parse_spec(data, tmp_path)
    assert plain.faults is None
    assert "faults" not in plain.to_dict()  # fingerprints of versions without faults are unchanged
    assert drill.handler_config().faults == Faults(0.3, 0, 10)
    data["models"]["digits"]["versions"]["3.0"]["faults"] = {"error_rate": 2}
    with pytest.raises(SpecError, match=r"^digits 3.0: faults.error_rate: must be a number from 0.0 to 1.0, got 2$"):
        parse_spec(data, tmp_path)


def test_the_last_step_uses_the_defaults_earlier_error_rate() -> None:
    """At 100 % the default gets no traffic; clients' bad inputs (400 from every version) must not abort it."""
    thresholds = Thresholds(max_error_rate=0.01, min_requests=50)
    canary = records("/2.0", 97) + records("/2.0", 3, status=400)  # 3 % refused client inputs
    assert not analyse_log(canary, "2.0", thresholds).passed  # no baseline: the 1 % budget
    carried = analyse_log(canary, "2.0", thresholds, baseline=0.03)
    assert carried.passed
    assert carried.error_limit == 0.04


# ------------------------------------------------------------------------------------------ the metric sources
def page_of(*versions: Traffic) -> str:
    return exposition(*versions)


def served(version: str, codes: dict[str, int], seconds: list[float], default: bool = False, **kwargs) -> Traffic:
    """What one version has answered since the server started (no classes unless given)."""
    return Traffic(version=version, codes=codes, seconds=seconds, default=default, classes=kwargs.pop("classes", {}),
                   confidence=[], brightness=[], megapixels=[], **kwargs)  # fmt: skip


def test_the_metrics_page_source_takes_each_sides_figures_from_the_deltas_of_its_real_version() -> None:
    before = page_of(served("1.0", {"200": 500, "400": 3}, [0.004] * 503, default=True),
                     served("2.0", {"200": 10}, [0.004] * 10))  # fmt: skip
    # Between the scrapes: 100 requests through the default route, answered (and labelled) by 1.0, the
    # default's real version; 20 canary requests to 2.0, 2 of them 503 and all slower.
    after = page_of(
        served("1.0", {"200": 598, "400": 5}, [0.004] * 503 + [0.004] * 100, default=True),
        served("2.0", {"200": 28, "503": 2}, [0.004] * 10 + [0.04] * 20, classes={"3": 20}),
        served("3.0", {"200": 1000}, [0.5] * 1000),  # another version's traffic never counts
    )
    with serving(FakeMetricsServer(pages=[before, after])) as server:
        source = MetricsPageSource(MetricsPage(server.url + "/metrics"))
        source.begin("digits", "2.0", "1.0")
        source.start_step(100.0)
        window = source.window(100.0, 105.0)
    assert window.canary == Figures(requests=20, errors=2, p99_ms=49.8)  # in (25, 50] ms, interpolated
    assert window.default == Figures(requests=100, errors=2, p99_ms=5.0)
    assert window.classes == {"3": 20.0}
    result = analyse(window.canary, window.default, Thresholds(max_error_rate=0.01, min_requests=20))
    assert result.reason == "canary error rate 10.0% > 3.0% (default 2.0%)"


def test_a_scrape_that_fails_is_a_metrics_error() -> None:
    source = MetricsPageSource(MetricsPage(f"http://127.0.0.1:{free_port()}/metrics", timeout=0.5))
    source.begin("digits", "2.0", "1.0")
    with pytest.raises(MetricsError, match="is not reachable"):
        source.start_step(0.0)


def test_the_prometheus_source_asks_increase_over_the_steps_elapsed_seconds_rounded_up() -> None:
    def answer(query: str) -> dict:
        if query.startswith("sum by (model, version, code)"):
            return vector(({"model": "digits", "version": "2.0", "code": "200"}, 19.6),
                          ({"model": "digits", "version": "2.0", "code": "503"}, 0.4),
                          ({"model": "digits", "version": "1.0", "code": "200"}, 80.2))  # fmt: skip
        if query.startswith("sum by (model, version, le)"):
            cumulative = {"0.005": 70, "0.01": 80, "+Inf": 80}
            default = [({"model": "digits", "version": "1.0", "le": le}, n) for le, n in cumulative.items()]
            canary = [({"model": "digits", "version": "2.0", "le": le}, 20) for le in ("0.005", "+Inf")]
            return vector(*default, *canary)
        return vector(({"model": "digits", "version": "2.0", "class": "7"}, 20))

    fake = FakeMetricsServer(prometheus=answer)
    with serving(fake):
        source = PrometheusSource(PrometheusAPI(fake.url))
        source.begin("digits", "2.0", "1.0")
        source.start_step(100.0)
        window = source.window(100.0, 106.2)
    assert fake.queries == [
        'sum by (model, version, code) (increase(servekit_requests_total{model="digits"}[7s]))',
        'sum by (model, version, le) (increase(servekit_request_seconds_bucket{model="digits"}[7s]))',
        'sum by (model, version, class) (increase(servekit_predictions_total{model="digits",version="2.0"}[7s]))',
    ]
    assert window.canary == Figures(requests=20, errors=0, p99_ms=5.0)  # 0.4 extrapolated errors round to 0
    assert window.default == Figures(requests=80, errors=0, p99_ms=9.6)  # 70 under 5 ms, 10 in (5, 10]
    assert window.classes == {"7": 20.0}


def test_auto_takes_prometheus_then_the_metrics_page_then_the_proxy_log(tmp_path: Path) -> None:
    log = RequestLog(tmp_path / "requests.jsonl")
    closed_page = MetricsPage(f"http://127.0.0.1:{free_port()}/metrics")
    closed_api = PrometheusAPI(f"http://127.0.0.1:{free_port()}")
    source, note = select_source("auto", page=closed_page, prometheus=closed_api, request_log=log)
    assert source.name == "proxy-log"
    assert note.startswith("no metrics to read: Prometheus at ")
    assert note.endswith(": judging from the proxy's request log")
    with serving(FakeMetricsServer(pages=[page_of(Traffic())])) as page_only:
        page = MetricsPage(page_only.url + "/metrics")
        assert select_source("auto", page=page, prometheus=closed_api, request_log=log)[0].name == "metrics"
        assert select_source("proxy-log", page=page, prometheus=closed_api, request_log=log)[0].name == "proxy-log"
    both = FakeMetricsServer(pages=[page_of(Traffic())], prometheus=prometheus_of(Traffic()))
    with serving(both):
        page, api = MetricsPage(both.url + "/metrics"), PrometheusAPI(both.url)
        assert select_source("auto", page=page, prometheus=api, request_log=log) == (source_of(api), None)
    with serving(FakeMetricsServer(pages=["other_metric 1\n"])) as foreign:  # answers, but not servekit's page
        page = MetricsPage(foreign.url + "/metrics")
        source, note = select_source("auto", page=page, prometheus=closed_api, request_log=log)
        assert (source.name, "has no servekit series" in note) == ("proxy-log", True)
        with pytest.raises(MetricsError, match="has no servekit series"):
            select_source("metrics", page=page, prometheus=closed_api, request_log=log)
    with pytest.raises(MetricsError, match="^Prometheus is not reachable"):
        select_source("prometheus", page=closed_page, prometheus=closed_api, request_log=log)


def source_of(api: PrometheusAPI):
    class Same:
        def __eq__(self, other: object) -> bool:
            return isinstance(other, PrometheusSource) and other.prometheus is api

    return Same()


class FakeHandlerMetrics:
    """The handler metrics page of a fake server: each scrape first serves the requests since the last one
    (``rate`` a second, split as the deployer's canary says) and every version labels its answers with its
    own version; ``behaviour``: (failure share, seconds); ``classes``: version -> label of its n-th answer."""

    def __init__(self, deployer: FakeDeployer, clock: FakeClock, rate: int = 20, behaviour: dict | None = None,
                 classes: dict | None = None) -> None:  # fmt: skip
        self.deployer, self.clock, self.rate = deployer, clock, rate
        self.behaviour = {"1.0": (0.0, 0.01), "2.0": (0.0, 0.01), **(behaviour or {})}
        self.classes = classes or {}
        self.served: dict[str, Traffic] = {}
        self.sent, self.last = 0, clock.now

    def scrape(self) -> Samples:
        canary = self.deployer.canary_of()
        for _ in range(int((self.clock.now - self.last) * self.rate)):
            to_canary = canary is not None and Faults(canary.percent / 100).fails(self.sent)
            self.sent += 1
            version = canary.version if to_canary else self.deployer.default
            traffic = self.served.setdefault(version, served(version, {}, []))
            n = sum(traffic.codes.values())
            fail_share, seconds = self.behaviour[version]
            code = "503" if Faults(fail_share).fails(n) else "200"
            traffic.codes[code] = traffic.codes.get(code, 0) + 1
            traffic.seconds.append(seconds)
            label = self.classes.get(version, lambda i: str(i % 10))(n)
            traffic.classes[label] = traffic.classes.get(label, 0) + 1
        self.last = self.clock.now
        return parse_exposition(exposition(*self.served.values()))


def metrics_rollout(deployer: FakeDeployer, page: FakeHandlerMetrics, clock: FakeClock, events: list,
                    **kwargs) -> Rollout:  # fmt: skip
    kwargs.setdefault("thresholds", Thresholds(min_requests=20))
    kwargs.setdefault("steps", (10, 50, 100))
    return Rollout(deployer, MetricsPageSource(page), step_seconds=10, emit=events.append,
                   clock=lambda: clock.now, sleep=clock.sleep, **kwargs)  # fmt: skip


def test_a_good_version_is_promoted_on_the_handler_metrics(tmp_path: Path) -> None:
    deployer, clock, events = FakeDeployer(tmp_path), FakeClock(), []
    done = metrics_rollout(deployer, FakeHandlerMetrics(deployer, clock), clock, events).run("digits", "2.0")
    steps = [e for e in events if e["action"] == "rollout-step"]
    assert [(s["percent"], s["verdict"], s["window_s"]) for s in steps] == [
        (10, "advance", 10.0), (50, "advance", 10.0), (100, "promote", 10.0)]  # fmt: skip
    assert steps[0]["canary"] == {"requests": 20, "errors": 0, "error_rate": 0.0, "p99_ms": 10.0}  # interpolated
    assert steps[0]["default"]["requests"] == 180  # the default route's answers, labelled 1.0 by the handler
    assert steps[0]["drift"] is None  # no --max-drift
    assert events[0]["source"] == "metrics"
    assert done["previous_default"] == "1.0"
    assert deployer.default == "2.0"


def test_a_failing_version_is_rolled_back_on_the_handler_metrics(tmp_path: Path) -> None:
    deployer, clock, events = FakeDeployer(tmp_path), FakeClock(), []
    page = FakeHandlerMetrics(deployer, clock, behaviour={"2.0": (0.3, 0.01)})
    with pytest.raises(RolloutAborted, match=r"step 1 \(10%\): canary error rate 30.0% > 1.0% \(default 0.0%\)"):
        metrics_rollout(deployer, page, clock, events).run("digits", "2.0")
    assert deployer.canary_of() is None
    assert deployer.default == "1.0"


# ------------------------------------------------------------------------------------------ the drift gate
def test_class_drift_is_judged_from_the_archives_min_samples(tmp_path: Path) -> None:
    write_store(tmp_path / "store")
    reference = load_reference(tmp_path / "store", "digits", "2.0")  # every class 10 %, min samples 100
    even = class_drift(reference, dict.fromkeys(CLASSES, 12), 0.2)
    assert (even.psi, even.predictions, even.judged, even.reason) == (0.0, 120, True, None)
    sevens = class_drift(reference, {"7": 120}, 0.2)
    assert sevens.judged
    assert sevens.psi == pytest.approx(0.9 * math.log(10) + 9 * 0.0999 * math.log(1000), abs=1e-4)
    assert sevens.reason == (
        "class drift PSI 8.283 > 0.2 (120 canary predictions against the digits 2.0 archive's reference)"
    )
    few = class_drift(reference, {"7": 99}, 0.2)
    assert (few.judged, few.reason) == (False, None)
    assert class_drift(reference, {}, 0.2).psi is None


def test_a_canary_whose_class_mix_drifts_is_rolled_back_with_the_figure(tmp_path: Path) -> None:
    write_store(tmp_path / "store")
    deployer, clock, events = FakeDeployer(tmp_path), FakeClock(), []
    page = FakeHandlerMetrics(deployer, clock, rate=100, classes={"2.0": lambda n: "7"})
    rollout = metrics_rollout(deployer, page, clock, events, max_drift=0.25,
                              reference=lambda m, v: load_reference(tmp_path / "store", m, v))  # fmt: skip
    with pytest.raises(RolloutAborted) as raised:
        rollout.run("digits", "2.0")
    assert "step 1 (10%): class drift PSI 8.283 > 0.25 (100 canary predictions" in str(raised.value)
    step = [e for e in events if e["action"] == "rollout-step"][0]
    assert step["verdict"] == "abort"
    assert step["drift"] == {"psi": 8.2831, "predictions": 100, "min_samples": 100, "max_drift": 0.25, "judged": True,
                             "reason": step["reason"]}  # fmt: skip
    assert "class PSI 8.283 -> abort: class drift PSI" in format_event(step)
    assert deployer.canary_of() is None


def test_a_canary_with_too_few_predictions_is_not_judged_on_drift(tmp_path: Path) -> None:
    write_store(tmp_path / "store")
    deployer, clock, events = FakeDeployer(tmp_path), FakeClock(), []
    page = FakeHandlerMetrics(deployer, clock, classes={"2.0": lambda n: "7"})  # 20 a step at most: under 100
    rollout = metrics_rollout(deployer, page, clock, events, max_drift=0.25, steps=(10,),
                              reference=lambda m, v: load_reference(tmp_path / "store", m, v))  # fmt: skip
    rollout.run("digits", "2.0")
    step = [e for e in events if e["action"] == "rollout-step"][0]
    assert (step["verdict"], step["drift"]["judged"], step["drift"]["predictions"]) == ("promote", False, 20)
    assert "class PSI not judged (20 of 100 predictions) -> promote" in format_event(step)


def test_the_drift_gate_needs_the_handler_metrics(tmp_path: Path) -> None:
    deployer = FakeDeployer(tmp_path)
    log = ProxyLogSource(RequestLog(tmp_path / "r.jsonl"))
    with pytest.raises(DeployError, match=r"^max_drift 0.2 \(flag\) needs the handler metrics .*use --source metrics"):
        Rollout(deployer, log, max_drift=0.2, origins={"max_drift": "flag"})


# ------------------------------------------------------------------------------------------ the spec and the settings
def rollout_spec(section: object) -> dict:
    from tests.unit.test_spec import base_spec

    data = base_spec()
    data["models"]["digits"]["rollout"] = section
    return data


def test_the_spec_rollout_section_is_validated_and_left_out_of_the_fingerprint(tmp_path: Path) -> None:
    from servekit.build.spec import parse_spec
    from tests.unit.test_spec import base_spec

    plain = parse_spec(base_spec(), tmp_path)[0]
    with_rollout = parse_spec(rollout_spec({"steps": [5, 100], "max_error_rate": 0.05, "max_drift": 0.2}), tmp_path)
    assert with_rollout[0].spec_hash() == plain.spec_hash()  # thresholds change without rebuilding archives
    assert "rollout" not in with_rollout[0].to_dict()


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"steps": [50, 25]}, "digits: rollout.steps: must be a list of increasing whole percentages from 1 to 100, "
                              "e.g. [10, 25, 50, 100], got [50, 25]"),
        ({"steps": "10,50"}, "digits: rollout.steps: must be a list of increasing whole percentages"),
        ({"steps": [0, 100]}, "digits: rollout.steps: must be a list"),
        ({"max_error_rate": 2}, "digits: rollout.max_error_rate: must be a number from 0 to 1, got 2"),
        ({"max_p99_ratio": 0}, "digits: rollout.max_p99_ratio: must be a number > 0, got 0"),
        ({"step_seconds": "30s"}, "digits: rollout.step_seconds: must be a number > 0, got '30s'"),
        ({"min_requests": 2.5}, "digits: rollout.min_requests: must be an integer >= 1, got 2.5"),
        ({"max_wait_factor": 0.5}, "digits: rollout.max_wait_factor: must be a number >= 1, got 0.5"),
        ({"max_drift": True}, "digits: rollout.max_drift: must be a number > 0 (a PSI), got True"),
        ({"max_errors": 1}, "digits: rollout.max_errors: unknown key in rollout (valid keys: max_drift, "),
        ([10, 25], "digits: rollout: must be a mapping (steps, step_seconds, "),
    ],
)  # fmt: skip
def test_a_bad_rollout_section_names_the_model_and_the_field(tmp_path: Path, section: object, message: str) -> None:
    from servekit.build.spec import SpecError, parse_spec

    with pytest.raises(SpecError) as caught:
        parse_spec(rollout_spec(section), tmp_path)
    assert str(caught.value).startswith(message)
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(rollout_spec(section)))
    with pytest.raises(SpecError) as read:
        rollout_settings(path, "digits")
    assert str(read.value) == str(caught.value)


def test_rollout_is_a_model_level_section_only(tmp_path: Path) -> None:
    from servekit.build.spec import SpecError, parse_spec

    data = rollout_spec(None)
    data["models"]["digits"]["versions"]["1.0"]["rollout"] = {"steps": [50, 100]}
    refused = r"^digits 1.0: rollout: unknown key \(valid keys: allow_ungated, architecture, "
    with pytest.raises(SpecError, match=refused):
        parse_spec(data, tmp_path)


def test_rollout_settings_reads_one_models_section(tmp_path: Path, repo_root: Path) -> None:
    from servekit.errors import SpecError

    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(rollout_spec({"steps": [20, 100], "max_drift": 0.3})))
    assert rollout_settings(path, "digits").given() == {"steps": (20, 100), "max_drift": 0.3}
    assert rollout_settings(path, "letters") == RolloutSpec()  # not in the spec: nothing set
    # The repo's models.yaml carries the built-in defaults for digits.
    assert rollout_settings(repo_root / "models.yaml", "digits").given() == {
        "steps": (10, 25, 50, 100), "step_seconds": 30, "max_error_rate": 0.01, "max_p99_ratio": 1.5,
        "min_requests": 50, "max_wait_factor": 4,
    }  # fmt: skip
    with pytest.raises(SpecError, match="spec file not found"):
        rollout_settings(tmp_path / "nope.yaml", "digits")


def test_a_flag_wins_over_the_spec_which_wins_over_the_default() -> None:
    spec = {"steps": (20, 100), "max_error_rate": 0.05, "max_drift": 0.3}
    settings = Settings.resolve({"steps": (50, 100), "min_requests": 10, "max_error_rate": None}, spec)
    assert settings.values == {"steps": (50, 100), "step_seconds": 30.0, "max_error_rate": 0.05,
                               "max_p99_ratio": 1.5, "min_requests": 10, "max_wait_factor": 4.0,
                               "max_drift": 0.3}  # fmt: skip
    assert settings.origins == {"steps": "flag", "step_seconds": "default", "max_error_rate": "spec",
                                "max_p99_ratio": "default", "min_requests": "flag", "max_wait_factor": "default",
                                "max_drift": "spec"}  # fmt: skip
    arguments = settings.rollout_arguments()
    assert arguments["thresholds"] == Thresholds(0.05, 1.5, 10)
    assert Settings.resolve({}).values == dict(BUILT_IN)


def test_the_start_event_records_each_setting_and_where_it_came_from(tmp_path: Path) -> None:
    deployer, clock, events = FakeDeployer(tmp_path), FakeClock(), []
    settings = Settings.resolve({"steps": (10, 50, 100), "step_seconds": 10, "min_requests": 20},
                                {"max_error_rate": 0.02})  # fmt: skip
    Rollout(deployer, ProxyLogSource(FakeLog(deployer)), emit=events.append, clock=lambda: clock.now,
            sleep=clock.sleep, **settings.rollout_arguments()).run("digits", "2.0")  # fmt: skip
    start = deployer.deployments.events("digits")[0]
    assert start["action"] == "rollout-start"
    assert start["settings"] == {"steps": [10, 50, 100], "step_seconds": 10.0, "max_error_rate": 0.02,
                                 "max_p99_ratio": 1.5, "min_requests": 20, "max_wait_factor": 4.0,
                                 "max_drift": None}  # fmt: skip
    assert start["settings_from"] == {"steps": "flag", "step_seconds": "flag", "max_error_rate": "spec",
                                      "max_p99_ratio": "default", "min_requests": "flag",
                                      "max_wait_factor": "default", "max_drift": "default"}  # fmt: skip
    assert format_event(events[0]).splitlines() == [
        "rollout digits 2.0: default 1.0, steps 10,50,100%, figures from proxy-log",
        "settings: steps 10,50,100 (flag), step_seconds 10 (flag), max_error_rate 0.02 (spec), max_p99_ratio 1.5 "
        "(default), min_requests 20 (flag), max_wait_factor 4 (default), max_drift off (default)",
    ]


def test_the_cli_reads_the_spec_it_is_given_and_reports_its_errors_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "models.yaml"
    spec.write_text(yaml.safe_dump(rollout_spec({"max_error_rate": 7})))
    common = ["--proxy-dir", str(tmp_path / "proxy"), "--history", str(tmp_path / "h.jsonl")]
    assert main([*common, "rollout", "digits", "2.0", "--spec", str(spec)]) == 1
    assert capsys.readouterr().err == (
        "servekit: error: digits: rollout.max_error_rate: must be a number from 0 to 1, got 7\n"
    )
    spec.write_text(yaml.safe_dump(rollout_spec({"max_error_rate": 0.5})))
    assert main([*common, "rollout", "digits", "2.0", "--spec", str(spec)]) == 1  # valid: on to the proxy check
    assert "the proxy is not running" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ the status file
def snapshots_of(path: Path, clock: FakeClock) -> list[dict]:
    seen: list[dict] = []
    clock.on_sleep = lambda sleeps: seen.append(read_status(path))
    return seen


def test_the_status_file_follows_the_steps_and_ends_with_the_outcome(tmp_path: Path) -> None:
    deployer, clock, events = FakeDeployer(tmp_path), FakeClock(), []
    path = status_path(tmp_path / "proxy", "digits")
    seen = snapshots_of(path, clock)
    status = StatusFile(path, clock=lambda: clock.now)
    rollout(deployer, FakeLog(deployer), clock, events, status=status).run("digits", "2.0")
    first = seen[0]  # before the first poll of step 1
    assert (first["state"], first["phase"], first["step"], first["of"], first["percent"]) == ("running", "step", 1,
                                                                                              3, 10)  # fmt: skip
    assert (first["pid"], first["version"], first["default"], first["source"]) == (os.getpid(), "2.0", "1.0",
                                                                                   "proxy-log")  # fmt: skip
    assert first["step_started_at"] == 1000.0
    assert first["window"] is None
    assert first["settings"]["steps"] == [10, 50, 100]
    assert seen[5]["window"]["seconds"] == 5.0  # updated at every poll
    assert seen[5]["window"]["canary"]["requests"] == 10
    assert seen[5]["window"]["reason"] == "not enough traffic: the canary had 10 of 20 requests"
    assert [s["percent"] for s in seen if s["phase"] == "step"][-1] == 100
    assert seen[-1]["last_step"]["verdict"] == "advance"
    final = read_status(path)
    assert (final["state"], final["phase"]) == ("promoted", "done")
    assert final["outcome"] == {"result": "promoted", "at": clock.now, "reason": None, "previous_default": "1.0",
                                "golden": 1, "exit_code": 0}  # fmt: skip
    assert final["last_step"]["verdict"] == "promote"
    shown = format_status(final, "digits", alive=False, now=clock.now).splitlines()
    assert shown[0] == (
        f"rollout of digits 2.0: promoted at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(clock.now))} "
        f"(pid {os.getpid()} has ended); previous default 1.0; figures from proxy-log"
    )
    assert shown[1].startswith("  last verdict: step 3/3 100% (10s): canary 200 req, 0.0% errors")
    assert shown[2] == (
        "  settings: steps 10,50,100 (given), step_seconds 10 (given), max_error_rate 0.01 (given), max_p99_ratio "
        "1.5 (given), min_requests 20 (given), max_wait_factor 4 (given), max_drift off (given)"
    )  # in the start event's order, though the file's keys are sorted


def test_the_status_file_records_an_abort_and_its_reason(tmp_path: Path) -> None:
    deployer, clock, events = FakeDeployer(tmp_path), FakeClock(), []
    path = status_path(tmp_path / "proxy", "digits")
    log = FakeLog(deployer, behaviour={"2.0": (0.3, 0.01)})
    with pytest.raises(RolloutAborted):
        rollout(deployer, log, clock, events, status=StatusFile(path, clock=lambda: clock.now)).run("digits", "2.0")
    final = read_status(path)
    assert final["state"] == "aborted"
    outcome = final["outcome"]
    assert (outcome["percent"], outcome["canary_removed"], outcome["exit_code"]) == (10, True, 1)
    assert outcome["reason"] == "step 1 (10%): canary error rate 30.0% > 1.0% (default 0.0%)"
    assert "aborted at" in format_status(final, "digits", alive=False, now=clock.now)
    assert ": step 1 (10%): canary error rate 30.0% > 1.0% (default 0.0%); canary removed" in format_status(
        final, "digits", alive=False, now=clock.now
    )


@pytest.fixture
def pretend_rollout() -> subprocess.Popen:
    """A live process whose command line says ``rollout digits 2.0`` (it only sleeps)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "rollout", "digits", "2.0"])
    try:
        deadline = time.monotonic() + 10
        while "rollout" not in command_line(process.pid):  # exec'd: the command line is the child's
            assert time.monotonic() < deadline
            time.sleep(0.01)
        yield process
    finally:
        process.kill()
        process.wait()


def running_status(process: RolloutProcess, now: float) -> dict:
    return {"model": "digits", "version": "2.0", "pid": process.pid, "argv": list(process.argv), "state": "running",
            "phase": "step", "step": 1, "of": 3, "percent": 10, "step_started_at": now - 7, "started_at": now - 30,
            "updated_at": now - 1, "source": "metrics", "outcome": None,
            "window": {"seconds": 6.0, "canary": {"requests": 12, "errors": 0, "error_rate": 0.0, "p99_ms": 9.9},
                       "default": {"requests": 108, "errors": 0, "error_rate": 0.0, "p99_ms": 9.9},
                       "error_limit": 0.01, "p99_ratio": None, "drift": None,
                       "reason": "not enough traffic"}}  # fmt: skip


def test_status_says_whether_the_rollout_process_still_runs(
    tmp_path: Path, pretend_rollout: subprocess.Popen, capsys: pytest.CaptureFixture[str]
) -> None:
    live = RolloutProcess(pretend_rollout.pid, tuple(command_line(pretend_rollout.pid)))
    assert live.alive()
    assert not RolloutProcess(pretend_rollout.pid, ("servekit", "rollout", "digits", "3.0")).alive()  # other argv
    assert not RolloutProcess(os.getpid(), live.argv).alive()  # another process under the recorded pid
    now = time.time()
    document = running_status(live, now)
    path = status_path(tmp_path / "proxy", "digits")
    path.parent.mkdir()
    path.write_text(json.dumps(document))
    common = ["--proxy-dir", str(tmp_path / "proxy"), "--history", str(tmp_path / "h.jsonl")]
    assert main([*common, "rollout", "--status", "digits"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"rollout of digits 2.0: running (pid {live.pid}), step 1/3 at 10% for 7s; figures from metrics"
    assert out[1] == ("  window 6s: canary 12 req, 0.0% errors, p99 9.9 ms | default 108 req, 0.0% errors, "
                      "p99 9.9 ms | error limit 1.0%, p99 ratio n/a")  # fmt: skip
    assert main([*common, "rollout", "--status", "digits", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {**document, "alive": True}
    pretend_rollout.kill()  # killed: no outcome recorded, the status is stale
    pretend_rollout.wait()
    assert main([*common, "rollout", "--status", "digits"]) == 0
    stale = capsys.readouterr().out.splitlines()[0]
    assert stale.startswith(f"rollout of digits 2.0: not running: pid {live.pid} is no longer this rollout and it "
                            "recorded no outcome (killed?); it was at step 1/3 at 10% ")  # fmt: skip
    assert stale.endswith("ago: check servekit state digits for a canary left behind")
    assert main([*common, "rollout", "--status", "letters"]) == 0
    assert capsys.readouterr().out == "no rollout of letters has run\n"
    path.write_text("{cut")
    assert main([*common, "rollout", "--status", "digits"]) == 1
    assert capsys.readouterr().err.startswith(f"servekit: error: the rollout status {path} is not valid JSON (")


def test_a_second_rollout_of_a_model_whose_rollout_runs_is_refused(
    tmp_path: Path, pretend_rollout: subprocess.Popen
) -> None:
    deployer, clock, events = FakeDeployer(tmp_path), FakeClock(), []
    live = RolloutProcess(pretend_rollout.pid, tuple(command_line(pretend_rollout.pid)))
    path = status_path(tmp_path / "proxy", "digits")
    path.parent.mkdir()
    path.write_text(json.dumps(running_status(live, clock.now)))
    with pytest.raises(RolloutAborted, match=rf"a rollout of digits is already running \(pid {live.pid}: 2.0, "
                                             r"step 1/3 at 10%\): see servekit rollout --status digits"):  # fmt: skip
        rollout(deployer, FakeLog(deployer), clock, events, status=StatusFile(path)).run("digits", "2.0")
    assert json.loads(path.read_text()) == running_status(live, clock.now)  # left as it was
    assert deployer.calls == []
    pretend_rollout.kill()
    pretend_rollout.wait()
    # Its process is gone: the stale status is replaced by the new rollout's.
    rollout(deployer, FakeLog(deployer), clock, events, status=StatusFile(path)).run("digits", "2.0")
    assert read_status(path)["state"] == "promoted"


def test_a_status_write_that_fails_warns_once_and_the_rollout_goes_on(tmp_path: Path) -> None:
    deployer, clock, events, warnings = FakeDeployer(tmp_path), FakeClock(), [], []
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")
    status = StatusFile(blocked / "rollout-digits.json", warn=warnings.append)
    rollout(deployer, FakeLog(deployer), clock, events, status=status).run("digits", "2.0")
    assert deployer.default == "2.0"
    assert len(warnings) == 1
    assert warnings[0].startswith(f"cannot write the rollout status {blocked / 'rollout-digits.json'} (")
