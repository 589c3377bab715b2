"""Canary and shadow traffic through a real nginx in front of a real TorchServe."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from servekit.deploy.proxy import NginxProxy
from servekit.deploy.rollout import RequestLog
from servekit.serving.logkeeper import backup_path
from servekit.serving.processes import children, pid_matches
from servekit.serving.server import TorchServeProcess, free_port
from tests.integration.conftest import operator_cli, running_torchserve


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> Iterator[TorchServeProcess]:
    with running_torchserve(tmp_path_factory.mktemp("torchserve"), model_store) as server:
        yield server


@pytest.fixture(scope="module")
def cli(server: TorchServeProcess, model_store: Path, repo_root: Path, tmp_path_factory: pytest.TempPathFactory):
    operator = operator_cli(server, model_store, repo_root, tmp_path_factory.mktemp("deploy"), proxy_port=free_port())

    def run(*args: str, fails: bool = False) -> str:
        result = operator(*args)
        if fails:
            assert result.returncode == 1, result.stdout
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
            return result.stderr
        assert result.returncode == 0, result.stderr
        return result.stdout

    run.proxy = operator.proxy
    run("register", "digits", "2.0")
    run("proxy", "start")
    try:
        yield run
    finally:
        run.proxy.stop()


def through_proxy(cli, server: TorchServeProcess, payload: bytes, count: int, workers: int = 8) -> Counter:
    url = cli.proxy.url("/predictions/digits")
    headers = server.headers("inference")

    def one(_: int) -> str:
        response = requests.post(url, data=payload, headers=headers, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["predictions"][0]["label"] == "3"
        return response.json()["version"]

    with ThreadPoolExecutor(workers) as pool:
        return Counter(pool.map(one, range(count)))


def inference_count(server: TorchServeProcess, version: str) -> float:
    metrics = requests.get(server.url("metrics", "/metrics"), timeout=10).text
    pattern = rf'^ts_inference_requests_total\{{model_name="digits",model_version="{version}",[^}}]*\}} (\S+)$'
    match = re.search(pattern, metrics, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_twenty_percent_canary_splits_a_thousand_requests(cli, server, samples_dir: Path) -> None:
    cli("canary", "digits", "2.0", "--percent", "20")
    try:
        counts = through_proxy(cli, server, (samples_dir / "digit_3.png").read_bytes(), 1000)
    finally:
        cli("canary", "digits", "2.0", "--percent", "0")
    assert sum(counts.values()) == 1000
    assert set(counts) == {"1.0", "2.0"}
    # Binomial(1000, 0.2): mean 200, sd 12.6; 4.5 sd leaves a 1-in-150,000 chance of a false failure.
    assert 143 <= counts["2.0"] <= 257, counts


def test_canary_zero_aborts_and_hundred_then_promote_completes(cli, server, samples_dir: Path) -> None:
    digit = (samples_dir / "digit_3.png").read_bytes()
    cli("canary", "digits", "2.0", "--percent", "30")
    cli("canary", "digits", "2.0", "--percent", "0")
    assert through_proxy(cli, server, digit, 40) == Counter({"1.0": 40})
    assert "digits" not in cli.proxy.state()["routes"]

    cli("canary", "digits", "2.0", "--percent", "100")
    assert through_proxy(cli, server, digit, 40) == Counter({"2.0": 40})
    cli("promote", "digits", "2.0")
    try:
        assert "digits" not in cli.proxy.state()["routes"]  # the rollout is complete: no split left
        assert through_proxy(cli, server, digit, 40) == Counter({"2.0": 40})
    finally:
        cli("rollback", "digits")
    assert through_proxy(cli, server, digit, 20) == Counter({"1.0": 20})


def test_shadow_mirrors_every_request_and_clients_see_the_default(cli, server, samples_dir: Path) -> None:
    before = inference_count(server, "2.0")
    cli("shadow", "digits", "2.0")
    try:
        counts = through_proxy(cli, server, (samples_dir / "digit_3.png").read_bytes(), 60)
        deadline = time.monotonic() + 20
        while inference_count(server, "2.0") - before < 60 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        cli("shadow", "digits", "2.0", "--off")
    assert counts == Counter({"1.0": 60})
    assert inference_count(server, "2.0") - before == 60


def test_proxy_passes_the_token_through(cli, samples_dir: Path) -> None:
    response = requests.post(
        cli.proxy.url("/predictions/digits"), data=(samples_dir / "digit_3.png").read_bytes(), timeout=30
    )
    assert response.status_code == 400
    assert "Token Authorization failed" in response.json()["message"]


def test_refused_changes_leave_the_running_configuration_alone(cli) -> None:
    config = cli.proxy.conf.read_text()
    assert config.startswith("# Written by servekit.deploy.proxy")
    assert "percent must be between 0 and 100" in cli("canary", "digits", "2.0", "--percent", "150", fails=True)
    assert "digits has no registered version '7.7'" in cli("canary", "digits", "7.7", "--percent", "10", fails=True)
    assert cli.proxy.conf.read_text() == config
    status = json.loads(cli("proxy", "status"))
    assert status["running"] is True
    assert status["routes"] == {}


def inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def test_the_request_log_is_rotated_at_its_cap_and_read_across_rotations(server, tmp_path: Path) -> None:
    cap, keep, burst = 4096, 2, 30  # about 48 lines of /ping per file, 30 lines per burst
    proxy = NginxProxy(tmp_path / "proxy", free_port(), server.url("inference").split("//")[1],
                       log_max_bytes=cap, log_keep=keep, log_interval=0.1)  # fmt: skip
    proxy.start()
    keeper = proxy.log_keeper
    keeper_pid = keeper.running_pid()
    try:
        assert keeper_pid is not None
        log = RequestLog(proxy.request_log)
        log.start()
        url, headers = proxy.url("/ping"), server.headers("inference")
        files = [proxy.request_log, *(backup_path(proxy.request_log, n) for n in range(1, keep + 2))]
        rotated, sent, newest = set(), 0, None  # the inodes seen at requests.jsonl.1: one per rotation
        with requests.Session() as session:
            while len(rotated) < 3 and sent < 600:
                workers = set(children(proxy.running_pid()))
                for _ in range(burst):
                    assert session.get(url, headers=headers, timeout=30).status_code == 200
                sent += burst
                log.records(0.0, time.time() + 60)  # the reader polls, as a rollout does
                full, deadline = inode(proxy.request_log), time.monotonic() + 10
                while full is not None and size(proxy.request_log) > cap and inode(proxy.request_log) == full:
                    assert time.monotonic() < deadline, "the keeper did not rotate a full log"
                    time.sleep(0.02)  # it checks every 0.1 s
                if inode(backup_path(proxy.request_log, 1)) != newest:  # rotated during the burst or just now
                    newest = inode(backup_path(proxy.request_log, 1))
                    rotated.add(newest)
                    # The keeper reloads nginx: the worker that served the burst writes the renamed file
                    # until it exits. Wait for that here, so that the next burst goes to the new file.
                    while set(children(proxy.running_pid())) & workers:
                        assert time.monotonic() < deadline, "nginx did not reload"
                        time.sleep(0.02)
                log.records(0.0, time.time() + 60)
                sizes = {p.name: p.stat().st_size for p in files if p.exists()}
                assert "requests.jsonl.3" not in sizes  # keep 2: older files are dropped
                assert max(sizes.values()) <= cap + 4096, sizes  # over the cap by at most about one burst
        assert len(rotated) == 3
        pings = [r for r in log.records(0.0, time.time() + 60) if r.uri == "/ping"]
        assert (len(pings), {r.status for r in pings}) == (sent, {200})  # nothing lost across the rotations
    finally:
        proxy.stop()
    assert not pid_matches(keeper_pid, keeper.fragments)
    assert not keeper.pid_file.exists()
