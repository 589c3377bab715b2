"""The operator side without a server: torch-free imports, status formatting, the state command, serving settings."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from servekit.cli import format_status, main, store_gates
from servekit.deploy.history import History
from servekit.deploy.state import DeploymentState, DeploymentStore
from servekit.deploy.workflows import DeployError, VersionState, serving_settings

OPERATOR_MODULES = [
    "servekit.cli", *(f"servekit.serving.{name}" for name in ("client", "exporter", "guard", "nginx", "processes",
                                                              "server", "store", "worker_guard")),
    *(f"servekit.observe.{name}" for name in ("drift", "metrics_source", "top")),
    *(f"servekit.deploy.{name}" for name in ("history", "proxy", "state", "state_lock", "workflows")),
]  # fmt: skip


# ------------------------------------------------------------------------------------------ torch-free
def test_the_operator_side_imports_without_torch(repo_root: Path) -> None:
    code = (
        "import sys, json; "
        + "; ".join(f"import {name}" for name in OPERATOR_MODULES)
        + "; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'numpy',"
        " 'handlers', 'yaml') or m.startswith('servekit.build'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == []


def test_the_cli_runs_from_this_checkout_and_its_help_imports_no_torch(repo_root: Path) -> None:
    code = "import sys, servekit.cli as cli; print(cli.__file__); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == [str(repo_root / "servekit" / "cli.py"), "False"]
    helped = subprocess.run(
        [sys.executable, "-m", "servekit.cli", "--help"], cwd=repo_root, capture_output=True, text=True, check=True
    )
    assert "servekit [-h]" in helped.stdout
    assert "--spec" not in helped.stdout  # register reads the archive's own settings


def test_registering_reads_settings_without_torch(repo_root: Path, model_store: Path) -> None:
    code = (
        "import sys, json; from pathlib import Path; from servekit.deploy.workflows import serving_settings; "
        f"print(json.dumps(serving_settings(Path({str(model_store / 'digits_v2.0.mar')!r})))); "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, check=True)
    settings, torch_loaded = result.stdout.splitlines()
    assert torch_loaded == "False"
    assert json.loads(settings) == {
        "initial_workers": 1, "batch_size": 8, "max_batch_delay": 1, "response_timeout": 30, "startup_timeout": 120,
    }  # fmt: skip


def test_reading_the_specs_rollout_settings_imports_no_torch(repo_root: Path) -> None:
    """A rollout reads its spec section when it starts: without torch, and without the build side."""
    code = (
        "import sys; from servekit.cli import _spec_rollout; "
        "print(sorted(_spec_rollout(None, 'digits'))); print('torch' in sys.modules); "
        "print(sorted(m for m in sys.modules if m.startswith(('servekit.build', 'handlers'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, check=True)
    keys, torch_loaded, build_side = result.stdout.splitlines()
    assert keys != "[]"  # the repository's models.yaml has a rollout: section for digits
    assert torch_loaded == "False"
    assert build_side == "[]"


# ------------------------------------------------------------------------------------------ serving settings
def archive_with(tmp_path: Path, config: object | None, name: str = "m_v1.0.mar") -> Path:
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as mar:
        mar.writestr("MAR-INF/MANIFEST.json", "{}")
        if config is not None:
            mar.writestr("model-config.yaml", config if isinstance(config, str) else yaml.safe_dump(config))
    return path


def test_serving_settings_map_model_config_to_registration_parameters(tmp_path: Path) -> None:
    config = {"minWorkers": 0, "maxWorkers": 4, "batchSize": 4, "maxBatchDelay": 20, "handler": {"topk": 3}}
    assert serving_settings(archive_with(tmp_path, config)) == {
        "initial_workers": 1,  # never 0: a registration without workers answers 503
        "batch_size": 4,
        "max_batch_delay": 20,
    }
    assert serving_settings(archive_with(tmp_path, None, "n_v1.0.mar")) == {"initial_workers": 1}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"batchSize": "8"}, r"model-config\.yaml batchSize must be a whole number >= 0, got '8'"),
        ({"minWorkers": -1}, r"minWorkers must be a whole number >= 0, got -1"),
        ("- a list", r"model-config\.yaml is not a mapping"),
        ("key: [unclosed", r"cannot read the serving settings of m_v1\.0\.mar"),
    ],
)
def test_bad_serving_settings_are_refused(tmp_path: Path, config: object, message: str) -> None:
    with pytest.raises(DeployError, match=message):
        serving_settings(archive_with(tmp_path, config))


# ------------------------------------------------------------------------------------------ status
def test_format_status_is_an_aligned_table() -> None:
    states = [
        VersionState("digits", "1.0", True, 1, 2, ({"status": "READY"}, {"status": "UNLOADING"}), 0, 8),
        VersionState("digits", "10.0", False, 0, 0, (), 12, 1),
    ]
    gates = {("digits", "1.0"): "-", ("digits", "10.0"): "UNGATED"}
    assert format_status(states, gates).splitlines() == [
        "MODEL   VERSION  DEFAULT  WORKERS  READY  MIN-MAX  BATCH  QUEUED  GATE",
        "digits  1.0      *        2        1      1-2      8      0       -",
        "digits  10.0              0        0      0-0      1      12      UNGATED",
    ]
    assert format_status([]) == "MODEL  VERSION  DEFAULT  WORKERS  READY  MIN-MAX  BATCH  QUEUED  GATE"


def test_the_gate_column_reads_the_store_manifest(tmp_path: Path) -> None:
    """A reduced-precision version built with allow_ungated is UNGATED; gated ones and FP32 say so too."""
    records = {
        "digits_v1.0.mar": {"precision": "fp32", "accuracy": {"top1": 1.0}},
        "digits_v2.0.mar": {"precision": "int8", "accuracy": {"top1": 1.0}, "ungated": False},
        "digits_v3.0.mar": {"precision": "int8", "accuracy": None, "ungated": True},
        "digits_v5.0.mar": {"precision": "bf16", "accuracy": None},  # built before the manifest said so
    }
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "archives": records}))
    states = [VersionState("digits", v, v == "1.0", 1, 1, (), 0, 1) for v in ("1.0", "2.0", "3.0", "4.0", "5.0")]
    assert store_gates(tmp_path, states) == {
        ("digits", "1.0"): "-", ("digits", "2.0"): "gated", ("digits", "3.0"): "UNGATED", ("digits", "4.0"): "?",
        ("digits", "5.0"): "UNGATED",
    }  # fmt: skip
    (tmp_path / "manifest.json").write_text("not json")
    assert set(store_gates(tmp_path, states).values()) == {"?"}


def test_version_state_as_dict_keeps_the_json_fields() -> None:
    state = VersionState("digits", "1.0", True, 1, 2, ({"pid": 7, "status": "READY", "memoryUsage": 1},), 3, 8)
    assert state.as_dict() == {
        "model": "digits", "version": "1.0", "default": True, "min_workers": 1, "max_workers": 2,
        "workers": [{"pid": 7, "status": "READY"}], "pending_requests": 3, "batch_size": 8,
    }  # fmt: skip


# ------------------------------------------------------------------------------------------ state and history commands
def test_state_and_history_commands_read_the_one_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = DeploymentStore(tmp_path / "proxy" / "state.json", History(tmp_path / "deployments.jsonl"))
    state = DeploymentState()
    state.model("digits").observe("2.0", ["1.0", "2.0"])
    state.model("digits").set_shadow("1.0")
    store.save(state)
    store.record("promote", "digits", version="2.0", previous_default="1.0", golden=10)
    flags = ["--proxy-dir", str(tmp_path / "proxy"), "--history", str(tmp_path / "deployments.jsonl")]
    assert main([*flags, "state", "digits"]) == 0
    record = json.loads(capsys.readouterr().out)["digits"]
    assert (record["default"], record["versions"], record["shadow"]) == ("2.0", ["1.0", "2.0"], "1.0")
    assert [(p["version"], p["previous_default"]) for p in record["promotions"]] == [("2.0", "1.0")]
    assert main([*flags, "history", "digits"]) == 0
    assert json.loads(capsys.readouterr().out)["action"] == "promote"


def test_proxy_status_without_nginx_running_shows_the_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--proxy-dir", str(tmp_path / "proxy"), "--history", str(tmp_path / "h.jsonl"), "--proxy-port", "18123"]
    assert main([*flags, "proxy", "status"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["running"], status["pid"], status["routes"]) == (False, None, {})
    assert status["listen"] == "127.0.0.1:18123"


def test_a_servekit_error_anywhere_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--proxy-dir", str(tmp_path / "proxy"), "--history", str(tmp_path / "h.jsonl")]
    assert main([*flags, "canary", "digits", "2.0", "--percent", "101"]) == 1
    assert capsys.readouterr().err == "servekit: error: --percent must be between 0 and 100, got 101\n"
    assert main([*flags, "--key-file", str(tmp_path / "none.json"), "status"]) == 1
    assert capsys.readouterr().err.startswith("servekit: error: no TorchServe key file at ")


def test_proxy_start_takes_its_span_endpoint_from_config_properties_or_its_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import servekit.cli as cli

    config = tmp_path / "config.properties"
    config.write_text("inference_address=http://127.0.0.1:8080\n")
    monkeypatch.setattr(cli, "BASE_CONFIG", config)
    assert cli.build_parser().parse_args(["proxy", "start"]).otlp_endpoint == ""  # unset: no spans
    config.write_text("servekit_otlp_endpoint=http://collector:4318/v1/traces\n")
    assert cli.build_parser().parse_args(["proxy", "start"]).otlp_endpoint == "http://collector:4318/v1/traces"
    assert cli.build_parser().parse_args(["proxy", "start", "--otlp-endpoint", ""]).otlp_endpoint == ""
    # The flag reaches the proxy: a bad endpoint fails in one line before anything starts.
    flags = ["--proxy-dir", str(tmp_path / "proxy"), "--history", str(tmp_path / "h.jsonl"), "--proxy-port", "18124"]
    assert main([*flags, "proxy", "start", "--otlp-endpoint", "collector:4318"]) == 1
    assert capsys.readouterr().err == (
        "servekit: error: span shipper endpoint: must be an OTLP/HTTP traces URL (http://...), got 'collector:4318'\n"
    )
    assert not (tmp_path / "proxy" / "nginx.pid").exists()
