"""Unit tests for the store confinement pieces: guard grammar, worker guard, manifest checks, snapshots, pid files."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from handlers.model_loading import TamperedArchive, verify_program
from servekit.serving.guard import REGISTER_QUERY, GuardError, ManagementGuard, render_guard_config
from servekit.serving.nginx import nginx_binary
from servekit.serving.processes import command_line, owned_pid, pid_matches
from servekit.serving.server import TorchServeProcess, load_models_archives, read_snapshot
from servekit.serving.store import IntegrityError, file_sha256, verify_archive, verify_store
from servekit.serving.worker_guard import ENV_ROOT, refusal

WORKER = ["/venv/bin/python", "/venv/lib/python3.11/site-packages/ts/model_service_worker.py", "--sock-type", "unix"]


# ------------------------------------------------------------------------------------ guard grammar
@pytest.mark.parametrize(
    "query",
    [
        "url=digits_v2.0.mar",
        "url=digits_v2.0.mar&initial_workers=1&synchronous=true",
        "url=digits_v2.mar&model_name=digits_b&batch_size=8&max_batch_delay=20&response_timeout=10&startup_timeout=30",
        "initial_workers=2&url=resnet-18_v1.2.3.mar",
    ],
)
def test_guard_accepts_bare_archive_registrations(query: str) -> None:
    assert re.match(REGISTER_QUERY, query)


@pytest.mark.parametrize(
    "query",
    [
        "",
        "url=/tmp/planted",
        "url=planted_dir",
        "url=file:///repo/model_store/digits_v2.0.mar",
        "url=file%3A%2F%2F%2Fetc%2Fpasswd",
        "url=digits_v2.0.mar%00",
        "url=..%2Fdigits_v2.0.mar",
        "url=digits_v2.0.mar&handler=%2Ftmp%2Fx.py",
        "url=digits_v2.0.mar&runtime=python",
        "url=digits_v2.0.mar&s3_sse_kms=true",
        "url=digits_v2.0.mar;url=/tmp/x",
        "url=digits_v2.0.mar&url=/tmp/x",
        "url=digits_v2.0.mar&",
        "url=digits_v2.0.mar\n",
        "url=digits_v2.0.mar&initial_workers=-1",
        "url=digits_v2.0.mar&synchronous=yes",
    ],
)
def test_guard_refuses_everything_else(query: str) -> None:
    assert not re.match(REGISTER_QUERY, query)


def test_guard_configuration_passes_nginx_check(tmp_path: Path) -> None:
    guard = ManagementGuard(tmp_path / "guard", "127.0.0.1:18081", tmp_path / "run" / "m.sock")
    guard.prefix.mkdir()
    guard.write_config()
    text = guard.conf.read_text()
    assert f"server unix:{tmp_path / 'run' / 'm.sock'};" in text
    assert "proxy_pass_request_body off;" in text
    result = subprocess.run([nginx_binary(), "-t", "-p", str(guard.prefix), "-c", str(guard.conf)], capture_output=True)
    assert result.returncode == 0, result.stderr


def test_guard_refuses_a_socket_path_the_kernel_would_cut(tmp_path: Path) -> None:
    with pytest.raises(GuardError, match="longer than 100 bytes"):
        ManagementGuard(tmp_path, "127.0.0.1:1", Path("/" + "x" * 120) / "m.sock")


def test_rendered_guard_listens_only_where_asked(tmp_path: Path) -> None:
    text = render_guard_config(tmp_path, "127.0.0.1:18081", tmp_path / "m.sock")
    assert re.findall(r"^\s*listen (.*);$", text, re.MULTILINE) == ["127.0.0.1:18081"]


# ------------------------------------------------------------------------------------ worker guard
def test_worker_guard_lets_unpacked_archives_run(tmp_path: Path) -> None:
    root = tmp_path / "tmp" / "models"
    env = {ENV_ROOT: str(root), "PYTHONPATH": f"{root / 'abc123'}:/other"}
    assert refusal(env, WORKER) is None


@pytest.mark.parametrize("model_dir", ["/tmp/planted", "{root}/../planted", "{root}", "{root}-evil/x", ""])
def test_worker_guard_refuses_model_directories_outside_the_root(tmp_path: Path, model_dir: str) -> None:
    root = tmp_path / "tmp" / "models"
    env = {ENV_ROOT: str(root), "PYTHONPATH": model_dir.format(root=root)}
    assert refusal(env, WORKER) is not None


def test_worker_guard_follows_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)  # a symlink inside the root to a directory outside it
    assert refusal({ENV_ROOT: str(root), "PYTHONPATH": str(root / "link")}, WORKER) is not None


def test_worker_guard_ignores_other_processes_and_unguarded_servers(tmp_path: Path) -> None:
    assert refusal({ENV_ROOT: str(tmp_path), "PYTHONPATH": "/tmp/x"}, ["python", "-m", "pytest"]) is None
    assert refusal({"PYTHONPATH": "/tmp/x"}, WORKER) is None


def test_worker_guard_stops_a_real_interpreter_before_any_import(tmp_path: Path) -> None:
    """The installed .pth runs the check when Python starts: the worker script never runs."""
    from servekit.serving.worker_guard import ensure_installed

    ensure_installed()
    script = tmp_path / "model_service_worker.py"
    script.write_text("print('worker body ran')\n")
    env = {ENV_ROOT: str(tmp_path / "models"), "PYTHONPATH": str(tmp_path / "planted"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 3
    assert "worker body ran" not in result.stdout
    assert "servekit worker guard: refusing to start this worker" in result.stderr
    env["PYTHONPATH"] = str(tmp_path / "models" / "abc")
    allowed = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, check=False)
    assert allowed.returncode == 0
    assert allowed.stdout == "worker body ran\n"


# ------------------------------------------------------------------------------------ manifest
@pytest.fixture
def store(tmp_path: Path) -> Path:
    store = tmp_path / "store"
    store.mkdir()
    (store / "digits_v1.0.mar").write_bytes(b"archive one")
    (store / "digits_v2.0.mar").write_bytes(b"archive two")
    records = {name: {"sha256": file_sha256(store / name)} for name in ("digits_v1.0.mar", "digits_v2.0.mar")}
    (store / "manifest.json").write_text(json.dumps({"format": 1, "archives": records}))
    return store


def test_verify_store_accepts_built_archives(store: Path) -> None:
    assert verify_store(store, ["digits_v1.0.mar", "digits_v2.0.mar"]) == [
        store / "digits_v1.0.mar",
        store / "digits_v2.0.mar",
    ]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("digits_v3.0.mar", "no archive digits_v3.0.mar"),
        ("../digits_v1.0.mar", "is not an archive name"),
        ("digits_v1.0.mar\n", "is not an archive name"),
        ("stray_v1.0.mar", "is not in"),
        ("digits_v1.0.mar", "sha256 mismatch for digits_v1.0.mar"),
    ],
)
def test_verify_archive_refuses(store: Path, name: str, message: str) -> None:
    (store / "stray_v1.0.mar").write_bytes(b"never built here")
    (store / "digits_v1.0.mar").write_bytes(b"archive onE")  # one byte changed
    if name != "digits_v1.0.mar":
        (store / "digits_v1.0.mar").write_bytes(b"archive one")
    with pytest.raises(IntegrityError, match=re.escape(message)):
        verify_archive(store, name)


def test_verify_store_names_every_bad_archive(store: Path) -> None:
    (store / "digits_v1.0.mar").write_bytes(b"changed")
    (store / "digits_v2.0.mar").unlink()
    with pytest.raises(IntegrityError) as info:
        verify_store(store, ["digits_v1.0.mar", "digits_v2.0.mar"])
    assert "sha256 mismatch for digits_v1.0.mar" in str(info.value)
    assert "no archive digits_v2.0.mar" in str(info.value)


def test_verify_program_refuses_one_changed_byte(tmp_path: Path) -> None:
    program = b"\x00program bytes" * 100
    (tmp_path / "model.pt").write_bytes(program)
    (tmp_path / "metadata.json").write_text(json.dumps({"program_sha256": hashlib.sha256(program).hexdigest()}))
    assert verify_program(tmp_path, "model.pt") == hashlib.sha256(program).hexdigest()
    changed = bytearray(program)
    changed[500] ^= 1
    (tmp_path / "model.pt").write_bytes(bytes(changed))
    with pytest.raises(TamperedArchive, match="modified after it was built"):
        verify_program(tmp_path, "model.pt")


def test_verify_program_refuses_an_archive_without_a_record(tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(TamperedArchive, match="no program_sha256"):
        verify_program(tmp_path, "model.pt")


# ------------------------------------------------------------------------------------ snapshots
SNAPSHOT = {
    "name": "20261125-shutdown.cfg",
    "modelCount": 2,
    "models": {"digits": {"1.0": {"marName": "digits_v1.0.mar"}, "2.0": {"marName": "digits_v2.0.mar"}}},
}


def write_snapshot(workdir: Path, props: dict[str, str]) -> Path:
    folder = workdir / "logs" / "config"
    folder.mkdir(parents=True)
    # java.util.Properties escapes ':' and '=' in values
    escaped = {k: v.replace(":", "\\:").replace("=", "\\=") for k, v in props.items()}
    path = folder / "20261125123456789-shutdown.cfg"
    path.write_text("#Saved\n" + "".join(f"{k}={v}\n" for k, v in escaped.items()))
    return path


def test_snapshot_values_are_unescaped(tmp_path: Path) -> None:
    path = write_snapshot(tmp_path, {"allowed_urls": "file://.*", "model_snapshot": json.dumps(SNAPSHOT)})
    props, models = read_snapshot(path)
    assert props["allowed_urls"] == "file://.*"
    assert models == SNAPSHOT


def test_restore_keeps_todays_settings_and_lists_the_differences(tmp_path: Path) -> None:
    write_snapshot(
        tmp_path,
        {"allowed_urls": "file://.*", "max_request_size": "6553600", "model_snapshot": json.dumps(SNAPSHOT)},
    )
    server = TorchServeProcess(tmp_path, ports={"inference": 1, "management": 2, "metrics": 3}, snapshots=True)
    assert server.apply_snapshot() is not None
    assert server.props["allowed_urls"] == "(?!)"  # today's value, not the snapshot's
    assert "load_models" not in server.props
    assert json.loads(server.props["model_snapshot"]) == SNAPSHOT
    assert "\n" not in server.props["model_snapshot"]
    assert "allowed_urls: snapshot 'file://.*', config.properties '(?!)'" in server.snapshot_differences
    assert not any(d.startswith("max_request_size") for d in server.snapshot_differences)
    assert server.archives_to_load() == ["digits_v1.0.mar", "digits_v2.0.mar"]


def test_load_models_archives(tmp_path: Path) -> None:
    (tmp_path / "a_v1.mar").write_bytes(b"")
    (tmp_path / "b_v1.mar").write_bytes(b"")
    assert load_models_archives("all", tmp_path) == ["a_v1.mar", "b_v1.mar"]
    assert load_models_archives("digits=digits_v1.0.mar, x_v2.mar", tmp_path) == ["digits_v1.0.mar", "x_v2.mar"]
    assert load_models_archives("", tmp_path) == []


# ------------------------------------------------------------------------------------ pid files
def test_a_stale_pid_file_naming_another_process_is_never_trusted(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    deadline = time.monotonic() + 10
    while "sleep" not in command_line(sleeper.pid) and time.monotonic() < deadline:
        time.sleep(0.01)  # until the child has exec'd
    try:
        pid_file = tmp_path / "torchserve.pid"
        pid_file.write_text(str(sleeper.pid))
        assert owned_pid(pid_file, ("torchserve", "--foreground"), cwd=tmp_path) is None
        assert owned_pid(pid_file, ("sleep", "30")) == sleeper.pid
        assert not pid_matches(sleeper.pid, ("sleep",), cwd=tmp_path / "elsewhere")
        server = TorchServeProcess(tmp_path, ports={"inference": 1, "management": 2, "metrics": 3})
        server.stop()  # must not signal the sleeper
        assert sleeper.poll() is None
        assert not pid_file.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
