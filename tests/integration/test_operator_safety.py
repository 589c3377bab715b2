"""Operator workflows that must stay safe when repeated, raced or run over damaged files.

A real TorchServe and a real nginx (the servekit proxy); every command is the real CLI in its own
process, so the state lock is exercised across processes as operators would hit it.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from servekit.deploy.proxy import NginxProxy, render_config
from servekit.deploy.state_lock import StateLock
from servekit.serving.server import TorchServeProcess, free_port
from tests.integration.conftest import OperatorCli, one_error_line, operator_cli, running_torchserve


@dataclass
class Operator:
    """Runs ``servekit`` (``operator_cli``) against this module's TorchServe and proxy, each call in its own process."""

    cli: OperatorCli

    @property
    def server(self) -> TorchServeProcess:
        return self.cli.server

    @property
    def state(self) -> Path:
        return self.cli.state

    @property
    def history(self) -> Path:
        return self.cli.history

    @property
    def proxy(self) -> NginxProxy:
        return self.cli.proxy

    def start(self, *args: str) -> subprocess.Popen:
        return self.cli.start(*args)

    def run(self, *args: str, history: Path | None = None) -> subprocess.CompletedProcess:
        return self.cli(*args, options=["--history", str(history)] if history is not None else [])

    def ok(self, *args: str, history: Path | None = None) -> str:
        result = self.run(*args, history=history)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def default(self) -> str:
        states = json.loads(self.ok("status", "--json"))
        return next(s["version"] for s in states if s["default"])

    def versions(self) -> dict[str, int]:
        return {s["version"]: len(s["workers"]) for s in json.loads(self.ok("status", "--json"))}


def all_ok(*processes: subprocess.Popen) -> None:
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr


def consistent_state(op: Operator) -> dict:
    """state.json parses, nginx.conf is exactly its rendering, no temporary file is left, nginx runs."""
    proxy = op.proxy
    state = json.loads(proxy.state_file.read_text())
    assert proxy.conf.read_text() == render_config(state, proxy.prefix)
    assert [p.name for p in proxy.prefix.iterdir() if p.name.endswith((".tmp", ".new"))] == []
    assert proxy.running_pid() is not None
    return state


def history_events(path: Path) -> list[dict]:
    """Every line of the history, each required to be one complete JSON event."""
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def op(tmp_path_factory: pytest.TempPathFactory, model_store: Path, repo_root: Path) -> Iterator[Operator]:
    with running_torchserve(tmp_path_factory.mktemp("torchserve"), model_store) as server:
        state = tmp_path_factory.mktemp("deploy")
        operator = Operator(operator_cli(server, model_store, repo_root, state, proxy_port=free_port()))
        operator.ok("register", "digits", "2.0")
        operator.ok("proxy", "start")
        try:
            yield operator
        finally:
            operator.proxy.stop()


@pytest.fixture
def digit(samples_dir: Path) -> bytes:
    return (samples_dir / "digit_3.png").read_bytes()


# ------------------------------------------------------------------------------------------ concurrency
def test_canary_and_shadow_at_once_both_land_and_nginx_conf_matches_state(op: Operator) -> None:
    all_ok(op.start("canary", "digits", "2.0", "--percent", "20"), op.start("shadow", "digits", "2.0"))
    assert consistent_state(op)["routes"] == {"digits": {"canary": {"version": "2.0", "percent": 20}, "shadow": "2.0"}}
    all_ok(op.start("canary", "digits", "2.0", "--percent", "0"), op.start("shadow", "digits", "2.0", "--off"))
    assert consistent_state(op)["routes"] == {}
    assert Counter(e["action"] for e in history_events(op.history))["canary"] >= 2


def test_four_canaries_at_once_end_with_the_percent_the_history_records_last(op: Operator) -> None:
    all_ok(*[op.start("canary", "digits", "2.0", "--percent", str(p)) for p in (10, 20, 30, 40)])
    events = history_events(op.history)
    last = [e for e in events if e["action"] == "canary"][-1]
    assert sorted(e["percent"] for e in events[-4:]) == [10, 20, 30, 40]
    assert consistent_state(op)["routes"]["digits"]["canary"] == {"version": "2.0", "percent": last["percent"]}
    op.ok("canary", "digits", "2.0", "--percent", "0")


def test_promote_and_canary_at_once_leave_state_history_and_nginx_agreeing(op: Operator) -> None:
    all_ok(op.start("promote", "digits", "2.0"), op.start("canary", "digits", "2.0", "--percent", "50"))
    try:
        assert op.default() == "2.0"
        events = history_events(op.history)
        order = [e["action"] for e in events if e["action"] in ("promote", "canary")][-2:]
        routes = consistent_state(op)["routes"]
        if order == ["canary", "promote"]:  # the promotion completed the canary: no split left
            assert routes == {}
        else:  # the canary came second, so it stands (of the new default: harmless)
            assert order == ["promote", "canary"]
            assert routes == {"digits": {"canary": {"version": "2.0", "percent": 50}}}
    finally:
        op.ok("canary", "digits", "2.0", "--percent", "0")
        op.ok("rollback", "digits")
    assert op.default() == "1.0"


def test_a_held_lock_makes_a_changing_command_give_up_in_one_line_but_not_status(op: Operator) -> None:
    before = op.proxy.state_file.read_text()
    with StateLock(op.state / "servekit.lock", holder="test_operator_safety holds it"):
        started = time.monotonic()
        line = one_error_line(op.run("--lock-timeout", "1", "canary", "digits", "2.0", "--percent", "10"))
        waited = time.monotonic() - started
        assert "digits" in op.ok("status")
    assert line.startswith(f"servekit: error: another servekit command holds {op.state / 'servekit.lock'} (pid ")
    assert ": test_operator_safety holds it, since " in line
    assert line.endswith("gave up after 1s (--lock-timeout)")
    assert 1 <= waited < 10
    assert op.proxy.state_file.read_text() == before


# ------------------------------------------------------------------------------------------ scale and retire
def test_scaling_the_default_to_zero_is_refused_and_a_non_default_may_go_to_zero(op: Operator) -> None:
    line = one_error_line(op.run("scale", "digits", "1.0", "--min", "0", "--max", "0"))
    assert line == (
        "servekit: error: refusing to scale digits 1.0 to 0 workers: it is the default version, so every "
        "request to /predictions/digits would get 503; promote another version first"
    )
    assert op.versions()["1.0"] == 1
    op.ok("scale", "digits", "2.0", "--min", "0", "--max", "0")
    assert op.versions()["2.0"] == 0
    op.ok("scale", "digits", "2.0", "--min", "1", "--max", "1")
    assert op.versions()["2.0"] == 1


def test_retire_refuses_a_routed_version_and_drop_routes_retires_it_without_a_client_error(
    op: Operator, digit: bytes
) -> None:
    op.ok("canary", "digits", "2.0", "--percent", "50")
    line = one_error_line(op.run("retire", "digits", "2.0"))
    assert line == (
        "servekit: error: refusing to retire digits 2.0: the proxy still sends it canary (50%) traffic; remove the "
        "routes first (servekit canary digits 2.0 --percent 0; servekit shadow digits 2.0 --off), or retire "
        "with --drop-routes"
    )
    assert "2.0" in op.versions()

    answers: Counter = Counter()
    stop = threading.Event()
    url, headers = op.proxy.url("/predictions/digits"), op.server.headers("inference")

    def clients() -> None:
        while not stop.is_set():
            try:
                response = requests.post(url, data=digit, headers=headers, timeout=60)
                answers[response.json().get("version") if response.ok else f"HTTP {response.status_code}"] += 1
            except requests.RequestException as exc:
                answers[type(exc).__name__] += 1

    threads = [threading.Thread(target=clients) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1)
        retired = op.run("retire", "digits", "2.0", "--drop-routes")
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    try:
        assert retired.returncode == 0, retired.stderr
        assert set(answers) == {"1.0", "2.0"}, answers  # every answer a 200, from both versions
        assert consistent_state(op)["routes"] == {}
        assert "2.0" not in op.versions()
        assert [e["action"] for e in history_events(op.history)][-2:] == ["drop-routes", "retire"]
    finally:
        op.ok("register", "digits", "2.0")


# ------------------------------------------------------------------------------------------ damaged files
def test_a_stale_nginx_pid_file_naming_our_sleep_is_never_signalled(op: Operator, digit: bytes) -> None:
    proxy = op.proxy
    op.ok("proxy", "stop")
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        time.sleep(0.2)  # let it exec
        for args in (("proxy", "status"), ("canary", "digits", "2.0", "--percent", "10"), ("proxy", "stop")):
            proxy.pid_file.write_text(f"{sleeper.pid}\n")
            result = op.run(*args)
            assert result.returncode == 0, result.stderr
            assert result.stderr == (
                f"servekit: warning: {proxy.pid_file} names pid {sleeper.pid}, which is another process "
                "(sleep 300): removed the stale pid file, nothing signalled\n"
            )
            assert not proxy.pid_file.exists()
            time.sleep(0.1)
            assert sleeper.poll() is None  # SIGHUP (reload) or SIGQUIT (stop) would have ended it
        proxy.pid_file.write_text(f"{sleeper.pid}\n")
        op.ok("proxy", "start")
        assert proxy.running_pid() not in (None, sleeper.pid)
        assert sleeper.poll() is None
        response = requests.post(
            proxy.url("/predictions/digits"), data=digit, headers=op.server.headers("inference"), timeout=60
        )
        assert response.status_code == 200
    finally:
        sleeper.kill()
        sleeper.wait()
        op.ok("canary", "digits", "2.0", "--percent", "0")
    assert consistent_state(op)["routes"] == {}


def test_corrupt_history_lines_are_reported_and_rollback_still_works(op: Operator, tmp_path: Path) -> None:
    history = tmp_path / "history.jsonl"
    op.ok("promote", "digits", "2.0", history=history)
    with open(history, "ab") as handle:
        handle.write(b"{garbage\n")
        handle.write(b'{"action": "rollback", "model": "dig')  # cut by a crash: no newline
    result = op.run("rollback", "digits", history=history)
    assert result.returncode == 0, result.stderr
    assert "rolled back digits: default is 1.0 again (was 2.0; golden set 10/10 correct)" in result.stdout
    warnings = result.stderr.splitlines()
    assert len(warnings) == 2
    assert warnings[0].startswith(f"servekit: warning: {history} line 2: not valid JSON (")
    assert warnings[1].startswith(f"servekit: warning: {history} line 3: not valid JSON (")
    assert op.default() == "1.0"
    lines = history.read_text().splitlines()
    assert lines[2] == '{"action": "rollback", "model": "dig'  # the cut line stays alone
    assert json.loads(lines[3])["action"] == "rollback"
    listed = op.run("history", "digits", history=history)
    assert listed.returncode == 0
    assert [json.loads(line)["action"] for line in listed.stdout.splitlines()] == ["promote", "rollback"]
