"""The deployment workflows' safety rules, against a fake TorchServe: no server, no network.

The fake answers the management calls ``Deployer`` makes (describe, scale, set-default,
unregister) from a small in-memory model, and records every state-changing call, so each test can
assert both the refusal message and that nothing was sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from servekit.cli import main
from servekit.deploy.history import History
from servekit.deploy.state import DeploymentState, DeploymentStore, promotions_to_undo, write_state
from servekit.deploy.workflows import QUIET_S, Deployer, DeployError
from servekit.serving.client import TorchServeClient
from tests.fake_clock import FakeClock


@dataclass
class FakeResponse:
    status_code: int
    body: Any = field(default_factory=dict)

    @property
    def text(self) -> str:
        return json.dumps(self.body)

    def json(self) -> Any:
        return self.body


class FakeTorchServe(TorchServeClient):
    """One model, ``digits``; ``pending`` holds the queue lengths the next describes report."""

    def __init__(self, versions: dict[str, int], default: str) -> None:
        super().__init__("http://fake-management", "http://fake-inference", Path("/nonexistent"))
        self.workers = dict(versions)
        self.default = default
        self.pending: list[int] = []
        self.sent: list[tuple[str, str]] = []  # state-changing calls only

    def call(self, kind: str, method: str, path: str, **kwargs: Any) -> FakeResponse:
        parts = path.strip("/").split("/")
        if method == "GET":
            return self._describe(parts)
        self.sent.append((method, path))
        if method == "PUT" and parts[-1] == "set-default":
            self.default = parts[2]
        elif method == "PUT":
            self.workers[parts[2]] = kwargs["params"]["min_worker"]
        elif method == "DELETE":
            del self.workers[parts[2]]
        return FakeResponse(200, {"status": "ok"})

    def _describe(self, parts: list[str]) -> FakeResponse:
        if len(parts) == 2:
            return FakeResponse(200, [self._version(self.default)])
        if parts[2] == "all":
            return FakeResponse(200, [self._version(v) for v in self.workers])
        if parts[2] not in self.workers:
            return FakeResponse(404, {"message": "not found"})
        # Only describing one version (the drain wait's poll) consumes a queue length.
        return FakeResponse(200, [self._version(parts[2], self.pending.pop(0) if self.pending else 0)])

    def _version(self, version: str, pending: int = 0) -> dict:
        return {
            "modelVersion": version,
            "minWorkers": self.workers[version],
            "maxWorkers": self.workers[version],
            "workers": [{"pid": 100 + i, "status": "READY"} for i in range(self.workers[version])],
            "jobQueueStatus": {"pendingRequests": pending},
        }


class FakeProxy:
    """The call Deployer makes on the proxy when routes change: saves the state, records the routes rendered."""

    def __init__(self, state_file: Path) -> None:
        self.state_file = state_file
        self.applied: list[dict] = []

    def apply(self, state: DeploymentState, drain_timeout: float = 10.0) -> None:
        write_state(self.state_file, state)
        self.applied.append(state.routes())


def route(deployer: Deployer, version: str, canary: int = 0, shadow: bool = False) -> None:
    """Give the proxy routes to ``digits`` ``version``, as ``servekit canary`` / ``shadow`` would."""
    state = deployer.deployments.load()
    state.model("digits").set_canary(version, canary)
    state.model("digits").set_shadow(version if shadow else None)
    deployer.deployments.save(state)


class GoldenDeployer(Deployer):
    """Golden sets answered from ``golden_ok`` instead of archives and inference calls."""

    golden_ok: dict[str, bool]
    golden_checked: list[str]

    def golden_check(self, model: str, version: str) -> list[dict]:
        self.golden_checked.append(version)
        ok = self.golden_ok.get(version, True)
        return [{"file": "digit_7.png", "expected": "7", "got": "7" if ok else "1", "status": 200, "ok": ok}]


@pytest.fixture
def server() -> FakeTorchServe:
    return FakeTorchServe({"1.0": 1, "2.0": 1}, default="1.0")


@pytest.fixture
def warnings() -> list[str]:
    return []


@pytest.fixture
def deployer(server: FakeTorchServe, tmp_path: Path, warnings: list[str]) -> GoldenDeployer:
    clock = FakeClock()
    deployments = DeploymentStore(
        tmp_path / "proxy" / "state.json", History(tmp_path / "history.jsonl", warn=warnings.append)
    )
    deployer = GoldenDeployer(
        server, tmp_path, deployments, FakeProxy(deployments.path), clock=clock, sleep=clock.sleep
    )
    deployer.golden_ok, deployer.golden_checked = {}, []
    return deployer


def actions(deployer: Deployer) -> list[str]:
    return [e["action"] for e in deployer.history.events()]


# ------------------------------------------------------------------------------------------ scale
@pytest.mark.parametrize(("low", "high"), [(0, 0), (0, 1), (0, 4)])
def test_scaling_the_default_to_zero_min_workers_is_refused_and_nothing_is_sent(deployer, server, low, high) -> None:
    with pytest.raises(DeployError) as refused:
        deployer.scale("digits", "1.0", low, high)
    assert str(refused.value) == (
        "refusing to scale digits 1.0 to 0 workers: it is the default version, so every request to "
        "/predictions/digits would get 503; promote another version first"
    )
    assert server.sent == []
    assert server.workers["1.0"] == 1


def test_scaling_a_non_default_version_to_zero_is_allowed(deployer, server) -> None:
    deployer.scale("digits", "2.0", 0, 0)
    assert server.sent == [("PUT", "/models/digits/2.0")]
    assert server.workers["2.0"] == 0
    assert actions(deployer) == ["scale"]


def test_scaling_a_routed_version_to_zero_is_refused(deployer, server) -> None:
    route(deployer, "2.0", canary=20)
    with pytest.raises(DeployError, match=r"the proxy sends it canary \(20%\) traffic, which would get 503"):
        deployer.scale("digits", "2.0", 0, 0)
    assert server.sent == []


def test_max_below_min_is_refused(deployer, server) -> None:
    with pytest.raises(DeployError, match=r"--max \(1\) >= --min"):
        deployer.scale("digits", "2.0", 2, 1)
    assert server.sent == []


def test_scale_down_waits_for_the_queue_to_stay_empty(deployer, server) -> None:
    server.workers["1.0"] = 2
    server.pending = [3, 3, 0]  # busy, busy, then empty from t = 0.2 s
    deployer.scale("digits", "1.0", 1, 1)
    assert server.sent == [("PUT", "/models/digits/1.0")]
    assert deployer.clock() == pytest.approx(0.2 + QUIET_S)


def test_scale_down_of_a_busy_version_is_refused_after_the_drain_timeout(deployer, server) -> None:
    server.workers["1.0"] = 2
    server.pending = [5] * 1000
    with pytest.raises(DeployError) as refused:
        deployer.scale("digits", "1.0", 1, 1, drain_timeout=3)
    assert str(refused.value).startswith(
        "digits 1.0 still had queued requests (5 pending) after 3s: not scaled down; retry when its traffic "
        "has stopped, or pass --drain-timeout 0"
    )
    assert server.sent == []


def test_drain_timeout_zero_scales_down_without_waiting(deployer, server) -> None:
    server.workers["1.0"] = 2
    server.pending = [5] * 10
    deployer.scale("digits", "1.0", 1, 1, drain_timeout=0)
    assert server.sent == [("PUT", "/models/digits/1.0")]
    assert deployer.clock() == 0.0


# ------------------------------------------------------------------------------------------ retire
def test_retiring_a_version_the_proxy_routes_to_is_refused_with_how_to_remove_the_routes(deployer, server) -> None:
    route(deployer, "2.0", canary=20, shadow=True)
    with pytest.raises(DeployError) as refused:
        deployer.retire("digits", "2.0")
    assert str(refused.value) == (
        "refusing to retire digits 2.0: the proxy still sends it canary (20%) and shadow traffic; remove the "
        "routes first (servekit canary digits 2.0 --percent 0; servekit shadow digits 2.0 --off), or retire "
        "with --drop-routes"
    )
    assert server.sent == []
    assert deployer.proxy.applied == []
    assert deployer.deployments.load().model("digits").routes_to("2.0") == ["canary (20%)", "shadow"]


def test_retire_with_drop_routes_removes_the_routes_then_unregisters(deployer, server) -> None:
    route(deployer, "2.0", shadow=True)
    deployer.retire("digits", "2.0", drop_routes=True)
    assert deployer.proxy.applied == [{}]  # the routes to 2.0 were dropped through the proxy, before the DELETE
    assert server.sent == [("DELETE", "/models/digits/2.0")]
    assert actions(deployer) == ["drop-routes", "retire"]
    assert deployer.history.events()[0]["routes"] == ["shadow"]


def test_retire_of_a_busy_version_is_refused_and_it_stays_registered(deployer, server) -> None:
    server.pending = [2] * 1000
    with pytest.raises(DeployError, match=r"still had queued requests \(2 pending\) after 5s: not retired"):
        deployer.retire("digits", "2.0", drain_timeout=5)
    assert "2.0" in server.workers
    assert server.sent == []


# ------------------------------------------------------------------------------------------ rollback
def test_promotions_to_undo_is_a_stack() -> None:
    promote = [
        {"action": "promote", "version": "2.0", "previous_default": "1.0"},
        {"action": "promote", "version": "3.0", "previous_default": "2.0"},
    ]
    rollback = {"action": "rollback", "version": "2.0", "previous_default": "3.0"}
    assert promotions_to_undo(promote) == promote
    assert promotions_to_undo([*promote, rollback]) == promote[:1]
    assert promotions_to_undo([*promote, rollback, rollback]) == []
    assert promotions_to_undo([*promote, rollback, rollback, rollback]) == []


def test_rollback_twice_does_not_re_promote_the_rolled_back_version(deployer, server) -> None:
    deployer.promote("digits", "2.0")
    assert deployer.rollback("digits")["version"] == "1.0"
    with pytest.raises(DeployError) as refused:
        deployer.rollback("digits")
    assert str(refused.value) == (
        f"no promotion of digits left to roll back: every promotion in {deployer.history.path} has been "
        "rolled back (promote a version to change the default)"
    )
    assert server.default == "1.0"
    assert server.sent.count(("PUT", "/models/digits/2.0/set-default")) == 1


def test_rollback_walks_back_through_two_promotions(deployer, server) -> None:
    server.workers["3.0"] = 1
    deployer.promote("digits", "2.0")
    deployer.promote("digits", "3.0")
    assert deployer.rollback("digits")["version"] == "2.0"
    assert deployer.rollback("digits")["version"] == "1.0"
    assert server.default == "1.0"
    with pytest.raises(DeployError, match="no promotion of digits left to roll back"):
        deployer.rollback("digits")


def test_rollback_runs_the_golden_gate_on_its_target(deployer, server) -> None:
    deployer.promote("digits", "2.0")
    deployer.golden_ok["1.0"] = False
    deployer.golden_checked.clear()
    with pytest.raises(DeployError, match=r"golden set failed for digits 1.0 \(1/1\).*; default stays 2.0"):
        deployer.rollback("digits")
    assert deployer.golden_checked == ["1.0"]
    assert server.default == "2.0"
    assert actions(deployer) == ["promote", "rollback-refused"]


def test_rollback_to_a_retired_version_is_refused(deployer, server) -> None:
    deployer.promote("digits", "2.0")
    del server.workers["1.0"]
    with pytest.raises(DeployError, match=r"cannot roll back digits to 1.0: it is no longer registered"):
        deployer.rollback("digits")
    assert server.default == "2.0"


def test_rollback_works_from_the_valid_lines_of_a_corrupt_history(deployer, server, warnings) -> None:
    deployer.promote("digits", "2.0")
    with open(deployer.history.path, "ab") as handle:
        handle.write(b'{"action": "promote", "model": "digits", "vers')  # cut short by a crash, no newline
    assert deployer.rollback("digits")["version"] == "1.0"
    assert server.default == "1.0"
    assert warnings == [f"{deployer.history.path} line 2: not valid JSON (Unterminated string starting at: column "
                        "42; truncated by a crash?); skipped"]  # fmt: skip
    assert actions(deployer) == ["promote", "rollback"]


# ------------------------------------------------------------------------------------------ history
def test_bad_history_lines_are_each_reported_once_with_file_and_line_and_skipped(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    good = json.dumps({"action": "register", "model": "digits", "version": "2.0"})
    path.write_bytes(
        "\n".join(
            [good, "{not json", "[1, 2]", '{"action": "promote", "model": "digits", "version": "2.0"}', good]
        ).encode()
        + b"\n\xff\xfe\n"
    )
    reported: list[str] = []
    history = History(path, warn=reported.append)
    assert [e["action"] for e in history.events()] == ["register", "register"]
    assert [e["action"] for e in history.events("digits")] == ["register", "register"]
    assert reported == [
        f"{path} line 2: not valid JSON (Expecting property name enclosed in double quotes: column 2; "
        "truncated by a crash?); skipped",
        f"{path} line 3: a JSON list, not an event object; skipped",
        f"{path} line 4: event without previous_default; skipped",
        f"{path} line 6: not UTF-8 text; skipped",
    ]


def test_an_append_after_a_cut_line_starts_on_a_new_line(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    path.write_bytes(b'{"action": "register", "model": "digits"}\n{"action": "prom')
    reported: list[str] = []
    history = History(path, warn=reported.append)
    history.append("scale", "digits", version="1.0")
    lines = path.read_bytes().split(b"\n")
    assert lines[1] == b'{"action": "prom'
    assert json.loads(lines[2])["action"] == "scale"
    assert lines[3] == b""
    assert [e["action"] for e in history.events()] == ["register", "scale"]
    assert len(reported) == 1
    assert reported[0].startswith(f"{path} line 2: not valid JSON")


def test_each_append_is_one_write_of_one_whole_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import servekit.deploy.history

    writes: list[bytes] = []
    real_write = servekit.deploy.history.os.write
    monkeypatch.setattr(
        servekit.deploy.history.os, "write", lambda fd, data: writes.append(data) or real_write(fd, data)
    )
    history = History(tmp_path / "history.jsonl")
    history.append("register", "digits", version="2.0")
    history.append("promote", "digits", version="2.0", previous_default="1.0")
    assert len(writes) == 2
    assert all(w.endswith(b"\n") and w.count(b"\n") == 1 for w in writes)


# ------------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("command", [["proxy", "status"], ["canary", "digits", "2.0", "--percent", "0"]])
def test_a_corrupt_proxy_state_is_one_error_line_and_stays_as_it_was(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    proxy_dir = tmp_path / "proxy"
    proxy_dir.mkdir()
    corrupt = '{"listen": "127.0.0.1:1", "routes": {'
    (proxy_dir / "state.json").write_text(corrupt)
    code = main(["--proxy-dir", str(proxy_dir), "--history", str(tmp_path / "h.jsonl"), *command])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1
    assert err.startswith(f"servekit: error: proxy state {proxy_dir / 'state.json'} is corrupt (")
    assert "fix it, or remove it to start again from no routes" in err
    assert (proxy_dir / "state.json").read_text() == corrupt


def test_a_bad_lock_timeout_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--lock-timeout", "soon", "proxy", "stop"])
    assert exited.value.code == 1
    assert capsys.readouterr().err == (
        "servekit: error: argument --lock-timeout: invalid float value: 'soon' (see servekit --help)\n"
    )


def test_a_usage_mistake_is_one_error_line_and_status_1(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["scale", "digits", "1.0", "--min", "1"])
    assert exited.value.code == 1
    assert capsys.readouterr().err == (
        "servekit: error: the following arguments are required: --max (see servekit scale --help)\n"
    )
