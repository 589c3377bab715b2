"""The `servekit` command line against a real TorchServe: register, promote, rollback, errors."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from servekit.build.archive import build_all
from servekit.build.spec import load_spec, select
from servekit.serving.server import TorchServeProcess, free_port
from tests.integration.conftest import OperatorCli, one_error_line, operator_cli, running_torchserve


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, model_store: Path, repo_root: Path) -> Path:
    """A copy of the built store plus digits 9.0, whose golden set has deliberately wrong labels."""
    store = tmp_path_factory.mktemp("store")
    for name in ("digits_v1.0.mar", "digits_v2.0.mar", "manifest.json"):
        shutil.copyfile(model_store / name, store / name)
    work = tmp_path_factory.mktemp("badgolden")
    wrong = [{"file": str(repo_root / "samples" / f"digit_{d}.png"), "label": str((d + 1) % 10)} for d in range(10)]
    (work / "wrong_golden.json").write_text(json.dumps(wrong))
    spec = yaml.safe_load((repo_root / "models.yaml").read_text())
    spec["models"] = {"digits": spec["models"]["digits"]}  # the other models' relative paths stay out of it
    versions = spec["models"]["digits"]["versions"]
    versions["9.0"] = {**versions["1.0"], "golden_set": str(work / "wrong_golden.json")}
    spec_path = repo_root / "build" / "test_deploy_models.yaml"  # beside models.yaml's relative paths' root
    spec_path.parent.mkdir(exist_ok=True)
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False).replace("samples/golden.json", "../samples/golden.json"))
    build_all(select(load_spec(spec_path), "digits", "9.0"), store, repo_root / "build" / "cache")
    return store


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, store: Path) -> Iterator[TorchServeProcess]:
    with running_torchserve(tmp_path_factory.mktemp("torchserve"), store) as server:
        yield server


@pytest.fixture
def cli(server: TorchServeProcess, store: Path, repo_root: Path, tmp_path: Path) -> OperatorCli:
    return operator_cli(server, store, repo_root, tmp_path)  # the state lock lives beside its history: one per test


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def default_of(cli, name: str = "digits") -> str:
    states = json.loads(ok(cli("status", "--json")))
    return next(s["version"] for s in states if s["model"] == name and s["default"])


def test_register_promote_rollback_returns_to_the_start_and_is_recorded(cli) -> None:
    start = default_of(cli)
    assert start == "1.0"
    assert "registered digits 2.0" in ok(cli("register", "digits", "2.0"))
    try:
        promoted = ok(cli("promote", "digits", "2.0"))
        assert "golden set 10/10 correct" in promoted
        assert default_of(cli) == "2.0"
        status = ok(cli("status"))
        assert "digits  1.0" in status  # the previous default keeps serving
        gates = {(s["model"], s["version"]): s["gate"] for s in json.loads(ok(cli("status", "--json")))}
        assert (gates[("digits", "1.0")], gates[("digits", "2.0")]) == ("-", "gated")  # INT8 measured against FP32
        assert "rolled back digits: default is 1.0 again (was 2.0; golden set 10/10 correct)" in ok(
            cli("rollback", "digits")
        )
        assert default_of(cli) == start
        events = [json.loads(line) for line in cli.history.read_text().splitlines()]
        assert [e["action"] for e in events] == ["register", "promote", "rollback"]
        assert events[1]["previous_default"] == "1.0"
        assert events[1]["version"] == "2.0"
        assert events[2]["version"] == "1.0"
        assert events[2]["undoes"] == events[1]["time"]
        assert all(e["user"] and e["time"] for e in events)
    finally:
        cli("retire", "digits", "2.0")


def test_promote_refuses_a_failing_golden_set_and_keeps_the_default(cli) -> None:
    ok(cli("register", "digits", "9.0"))
    try:
        line = one_error_line(cli("promote", "digits", "9.0"))
        assert "golden set failed for digits 9.0 (10/10)" in line
        assert "default stays 1.0" in line
        assert default_of(cli) == "1.0"
        events = [json.loads(line) for line in cli.history.read_text().splitlines()]
        assert events[-1]["action"] == "promote-refused"
    finally:
        ok(cli("retire", "digits", "9.0"))


def test_a_second_rollback_does_not_re_promote_the_rolled_back_version(cli) -> None:
    ok(cli("register", "digits", "2.0"))
    try:
        ok(cli("promote", "digits", "2.0"))
        ok(cli("rollback", "digits"))
        line = one_error_line(cli("rollback", "digits"))
        assert line == (
            f"servekit: error: no promotion of digits left to roll back: every promotion in {cli.history} has "
            "been rolled back (promote a version to change the default)"
        )
        assert default_of(cli) == "1.0"
    finally:
        ok(cli("retire", "digits", "2.0"))


def test_rollback_refuses_a_target_whose_golden_set_fails(cli, server: TorchServeProcess) -> None:
    ok(cli("register", "digits", "9.0"))
    try:
        # 9.0 became the default outside servekit (it could never pass promote's gate), then 1.0 was promoted.
        response = requests.put(
            server.url("management", "/models/digits/9.0/set-default"), headers=server.headers("management"), timeout=60
        )
        assert response.status_code == 200, response.text
        ok(cli("promote", "digits", "1.0"))
        line = one_error_line(cli("rollback", "digits"))
        assert line.startswith("servekit: error: golden set failed for digits 9.0 (10/10): ")
        assert line.endswith("; default stays 1.0")
        assert default_of(cli) == "1.0"
        events = [json.loads(line) for line in cli.history.read_text().splitlines()]
        assert [e["action"] for e in events][-2:] == ["promote", "rollback-refused"]
    finally:
        ok(cli("retire", "digits", "9.0"))


def test_scale_and_retire_rules(cli) -> None:
    ok(cli("scale", "digits", "1.0", "--min", "2", "--max", "2"))
    state = next(s for s in json.loads(ok(cli("status", "--json"))) if s["version"] == "1.0")
    assert len(state["workers"]) == 2
    ok(cli("scale", "digits", "1.0", "--min", "1", "--max", "2"))
    assert "it is the last registered version" in one_error_line(cli("retire", "digits", "1.0"))
    ok(cli("register", "digits", "2.0"))
    try:
        assert "it is the default" in one_error_line(cli("retire", "digits", "1.0"))
    finally:
        ok(cli("retire", "digits", "2.0"))


def test_compare_fp32_and_int8_on_the_samples(cli, repo_root: Path) -> None:
    ok(cli("register", "digits", "2.0"))
    try:
        report = json.loads(
            ok(cli("compare", "digits", "1.0", "2.0", "--inputs", str(repo_root / "samples"), "--json"))
        )
    finally:
        ok(cli("retire", "digits", "2.0"))
    images = [r for r in report["rows"] if r["file"].endswith(".png")]
    assert len(images) == 10
    assert all(r["agree"] for r in images)
    assert report["max_probability_diff"] is not None
    assert report["max_probability_diff"] < 0.2
    assert set(report["latency_ms"]) == {"1.0", "2.0"}


def test_register_refuses_an_archive_whose_sha256_differs(cli, store: Path, tmp_path: Path) -> None:
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    shutil.copyfile(store / "manifest.json", tampered / "manifest.json")
    (tampered / "digits_v2.0.mar").write_bytes((store / "digits_v2.0.mar").read_bytes() + b"\0")
    line = one_error_line(cli("register", "digits", "2.0", options=["--store", str(tampered)]))
    assert "sha256 mismatch for digits_v2.0.mar" in line
    assert "digits  2.0" not in ok(cli("status"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("scale", "nope", "1.0", "--min", "1", "--max", "1"), "model 'nope' is not registered"),
        (("promote", "digits", "7.7"), "digits has no registered version '7.7'"),
        (("register", "digits", "7.7"), "no archive digits_v7.7.mar"),
        (("rollback", "nope"), "no promotion of nope"),
    ],
)
def test_error_paths_print_one_line(cli, args: tuple[str, ...], message: str) -> None:
    assert message in one_error_line(cli(*args))


def test_torchserve_down_is_one_line(cli) -> None:
    line = one_error_line(cli("status", options=["--management-url", f"http://127.0.0.1:{free_port()}"]))
    assert "TorchServe is not reachable at http://127.0.0.1:" in line
