"""servekit rollout: the analysis on synthetic log lines, the step walk with a fake deployer and clock,
the proxy's request log format, and the handler's injected faults."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from handlers.base import BatchHandler
from handlers.config import Faults, HandlerConfig
from handlers.errors import InjectedFault
from servekit.ops.history import History
from servekit.ops.nginx import nginx_binary
from servekit.ops.proxy import NginxProxy, render_config
from servekit.ops.rollout import (
    LogRecord,
    RequestLog,
    Rollout,
    RolloutAborted,
    Thresholds,
    analyse,
    format_event,
    p99,
    parse_steps,
)
from servekit.ops.state import Canary, DeploymentState, DeploymentStore
from servekit.ops.workflows import DeployError

URI = "/predictions/digits"


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


def test_p99_is_the_nearest_rank() -> None:
    assert p99([]) is None
    assert p99([5.0]) == 5.0
    assert p99([float(i) for i in range(1, 101)]) == 99.0
    assert p99([float(i) for i in range(1, 201)]) == 198.0


# ------------------------------------------------------------------------------------------ the analysis
def test_a_clean_canary_passes() -> None:
    result = analyse(records("", 100) + records("/2.0", 60), "digits", "2.0", Thresholds(min_requests=50))
    assert result.passed
    assert (result.canary.requests, result.default.requests, result.p99_ratio) == (60, 100, 1.0)


def test_the_error_budget_is_absolute_and_widened_by_the_defaults_own_errors() -> None:
    thresholds = Thresholds(max_error_rate=0.01, min_requests=50)
    canary = records("/2.0", 98) + records("/2.0", 2, status=503)  # 2.0 %
    failed = analyse(records("", 100) + canary, "digits", "2.0", thresholds)
    assert failed.reason == "canary error rate 2.0% > 1.0% (default 0.0%)"
    # Clients sending bad images get 400 from both versions: the default fails 1.5 %, the limit is 2.5 %.
    default = records("", 197) + records("", 3, status=400)
    assert analyse(default + canary, "digits", "2.0", thresholds).error_limit == 0.025
    assert analyse(default + canary, "digits", "2.0", thresholds).passed


def test_the_p99_ratio_counts_only_when_both_sides_have_enough_requests() -> None:
    thresholds = Thresholds(max_p99_ratio=1.5, min_requests=50)
    slow = records("/4.0", 60, seconds=0.2)
    result = analyse(records("", 60, seconds=0.02) + slow, "digits", "4.0", thresholds)
    assert result.p99_ratio == 10.0
    assert result.reason == "p99 ratio 10.00 > 1.5 (canary 200 ms, default 20 ms)"
    # At 100 % the default gets no traffic: judged on errors alone.
    assert analyse(records("", 10, seconds=0.02) + slow, "digits", "4.0", thresholds).passed


def test_too_few_canary_requests_is_not_a_verdict_on_the_canary() -> None:
    result = analyse(records("", 200) + records("/2.0", 49), "digits", "2.0", Thresholds(min_requests=50))
    assert result.reason == "not enough traffic: the canary had 49 of 50 requests"


def test_only_the_models_split_route_counts() -> None:
    noise = [LogRecord(1.0, "/predictions/digits/2.0", 500, 1.0, ""), LogRecord(1.0, "/ping", 500, 1.0, "")]
    other = [LogRecord(1.0, "/predictions/letters", 500, 1.0, "/2.0")]
    result = analyse(noise + other + records("/2.0", 5), "digits", "2.0", Thresholds(min_requests=5))
    assert (result.canary.requests, result.default.requests, result.passed) == (5, 0, True)


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
    return Rollout(deployer, log, steps=(10, 50, 100), step_seconds=10, emit=events.append,
                   clock=lambda: clock.now, sleep=clock.sleep, **kwargs)  # fmt: skip


def actions(deployer: FakeDeployer) -> list[str]:
    return [e["action"] for e in deployer.deployments.events("digits")]


def test_a_good_version_is_registered_walked_through_every_step_and_promoted(tmp_path: Path) -> None:
    deployer, clock, events = FakeDeployer(tmp_path), FakeClock(), []
    done = rollout(deployer, FakeLog(deployer), clock, events).run("digits", "2.0")
    assert deployer.calls == [("register", "2.0"), ("golden", "2.0"), ("canary", 10), ("canary", 50),
                              ("canary", 100), ("promote", "2.0")]  # fmt: skip
    assert actions(deployer) == ["canary", "rollout-step", "canary", "rollout-step", "canary", "rollout-step",
                                 "promote", "rollout-done"]  # fmt: skip
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
    assert actions(deployer) == ["canary", "rollout-step", "canary", "rollout-aborted"]
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


def test_ctrl_c_mid_step_removes_the_canary_and_exits_130(tmp_path: Path) -> None:
    deployer, clock, events = FakeDeployer(tmp_path), FakeClock(), []
    clock.interrupt_at = 15  # in the second step
    with pytest.raises(RolloutAborted, match=r"aborted at 50%: interrupted \(SIGINT\)") as raised:
        rollout(deployer, FakeLog(deployer), clock, events).run("digits", "2.0")
    assert raised.value.exit_code == 130
    assert deployer.canary_of() is None
    assert deployer.default == "1.0"
    assert deployer.deployments.events("digits")[-1]["reason"] == "interrupted (SIGINT)"


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
    assert "location = /predictions/digits {\n            set $servekit_target $servekit_digits;\n" in text
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
    assert not analyse(canary, "digits", "2.0", thresholds).passed  # no baseline: the 1 % budget
    carried = analyse(canary, "digits", "2.0", thresholds, baseline=0.03)
    assert carried.passed
    assert carried.error_limit == 0.04
