"""Faults against real TorchServe instances: keep serving, lose nothing.

- a worker SIGKILLed in the middle of a bounded load: only the requests that worker held fail, every
  other answer is correct, and TorchServe restarts the worker (recovery time measured);
- TorchServe stopped and started again in the same workdir: registered versions, worker counts and
  the default version come back from TorchServe's own config snapshot (``restore=True``);
- a corrupted archive and an archive whose handler raises in ``initialize`` are refused with an error
  status and message within a bounded time, and the versions already serving are untouched.

Every server here is our own (free loopback ports, gRPC ports too: TorchServe binds 7070/7071
otherwise, which collides with any other TorchServe on the machine) and is stopped in teardown.
The only process signalled directly is a worker whose process group is our server's.
Figures are printed (``pytest -s``) and attached with ``record_property``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from servekit.serving.server import ADDRESS_KEYS, TorchServeProcess, free_port
from tests.integration.conftest import Client

CONCURRENCY = 4  # client threads in the kill test, each with at most one request outstanding
CLIENT_TIMEOUT_S = 20.0  # a request TorchServe never answers counts as failed after this
RECOVERY_LIMIT_S = 90.0  # generous: other test suites may share this machine's 2 cores
REGISTER_LIMIT_S = 60.0  # a refused registration must answer within this


def make_server(workdir: Path, store: Path, **kwargs) -> TorchServeProcess:
    grpc = {"grpc_inference_port": str(free_port()), "grpc_management_port": str(free_port())}
    return TorchServeProcess(
        workdir=workdir,
        model_store=store,
        ports={kind: free_port() for kind in ADDRESS_KEYS},
        overrides={**grpc, **kwargs.pop("overrides", {})},
        **kwargs,
    )


def garbled(data: bytes) -> bytes:
    """Every 97th byte after the first local header flipped: the zip's entries no longer inflate."""
    out = bytearray(data)
    for i in range(100, len(out), 97):
        out[i] ^= 0xFF
    return bytes(out)


def failing_init_archive(source: Path, target: Path, version: str) -> None:
    """A copy of ``source`` whose handler fails in ``initialize`` (its config names an unknown INT8 engine)."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            body = zin.read(item.filename)
            if item.filename == "model-config.yaml":
                config = yaml.safe_load(body)
                config["handler"].update(precision="int8", quantized_engine="no-such-engine")
                body = yaml.safe_dump(config, sort_keys=False).encode()
            elif item.filename == "MAR-INF/MANIFEST.json":
                manifest = json.loads(body)
                manifest["model"]["modelVersion"] = version
                body = json.dumps(manifest, indent=2).encode()
            zout.writestr(item, body)


# Names of the form the management guard lets through, so that TorchServe itself meets the damage.
BAD_ARCHIVES = {
    "digits_v2.1.mar": "the first half of digits_v2.0.mar",
    "digits_v2.2.mar": "digits_v2.0.mar with every 97th byte flipped",
    "digits_v2.3.mar": "a text file named .mar",
}
FAILING_INIT_VERSION = "9.9"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> Path:
    """The two good archives, three corrupted ones and one whose handler fails to initialize."""
    store = tmp_path_factory.mktemp("store")
    for name in ("digits_v1.0.mar", "digits_v2.0.mar", "manifest.json"):
        shutil.copyfile(model_store / name, store / name)
    data = (model_store / "digits_v2.0.mar").read_bytes()
    truncated, damaged, text = BAD_ARCHIVES
    (store / truncated).write_bytes(data[: len(data) // 2])
    (store / damaged).write_bytes(garbled(data))
    (store / text).write_bytes(b"not a model archive\n" * 64)
    failing_init_archive(model_store / "digits_v1.0.mar", store / f"digits_v{FAILING_INIT_VERSION}.mar", "9.9")
    return store


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, store: Path) -> Iterator[TorchServeProcess]:
    server = make_server(tmp_path_factory.mktemp("torchserve"), store, load_models="digits_v1.0.mar")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def samples(samples_dir: Path) -> list[bytes]:
    return [(samples_dir / f"digit_{d}.png").read_bytes() for d in range(10)]


def describe(client: Client, version: str) -> dict:
    response = client.manage("GET", f"/models/digits/{version}", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()[0]


def worker_pids(client: Client, version: str) -> list[int]:
    return sorted(int(w["pid"]) for w in describe(client, version)["workers"])


def assert_answers_every_digit(client: Client, samples: list[bytes], path: str, version: str) -> None:
    for digit, image in enumerate(samples):
        response = client.predict(path, data=image, timeout=CLIENT_TIMEOUT_S)
        assert response.status_code == 200, response.text
        assert response.json()["predictions"][0]["label"] == str(digit)
        assert response.json()["version"] == version


def our_worker_processes(server: TorchServeProcess) -> dict[int, str]:
    """pid -> command line of every TorchServe worker in our server's process group."""
    found = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if "model_service_worker.py" in cmdline and os.getpgid(proc.info["pid"]) == server.process.pid:
                found[proc.info["pid"]] = cmdline
        except (psutil.Error, ProcessLookupError):
            continue
    return found


def report(record_property: Callable[[str, object], None], title: str, figures: dict) -> None:
    for key, value in figures.items():
        record_property(key, value)
    print(f"\n{title}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


# ------------------------------------------------------------------------------------ restart
def versions_state(client: Client) -> tuple[str, dict[str, tuple[int, int, int]]]:
    """(default version, {version: (minWorkers, maxWorkers, READY workers)})."""
    default = client.manage("GET", "/models/digits", timeout=30).json()[0]["modelVersion"]
    described = client.manage("GET", "/models/digits/all", timeout=30).json()
    state = {
        v["modelVersion"]: (v["minWorkers"], v["maxWorkers"], sum(w["status"] == "READY" for w in v["workers"]))
        for v in described
    }
    return default, state


def settled_state(client: Client, timeout: float = RECOVERY_LIMIT_S) -> tuple[str, dict[str, tuple[int, int, int]]]:
    """``versions_state`` once every version has minWorkers READY workers (start() waits for one)."""
    deadline = time.monotonic() + timeout
    while True:
        state = versions_state(client)
        if all(ready == low for low, _, ready in state[1].values()) or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


def test_restart_restores_versions_workers_and_default(
    tmp_path: Path, store: Path, samples: list[bytes], record_property
) -> None:
    workdir = tmp_path / "torchserve"
    first = make_server(workdir, store, load_models="digits_v1.0.mar", snapshots=True)
    first.start()
    try:
        client = Client(first)
        client.ensure_registered("2.0", workers=1)
        response = client.manage("PUT", "/models/digits/1.0?min_worker=2&max_worker=2&synchronous=true")
        assert response.status_code == 200, response.text
        assert client.manage("PUT", "/models/digits/2.0/set-default").status_code == 200
        before = settled_state(client)
        pids_before = set(our_worker_processes(first))
        keys_before = first.keys()
    finally:
        first.stop()
    assert before == ("2.0", {"1.0": (2, 2, 2), "2.0": (1, 2, 1)})
    snapshot = first.latest_snapshot()
    assert snapshot is not None
    assert snapshot.name.endswith("-shutdown.cfg"), snapshot

    # Same workdir, model store and ports; no load_models: the launcher carries the shutdown
    # snapshot's registrations into today's configuration (servekit.serving.server.apply_snapshot).
    second = TorchServeProcess(
        workdir=workdir, model_store=store, ports=first.ports, load_models="", snapshots=True, restore=True
    )
    started = time.monotonic()
    second.start()
    try:
        client = Client(second)
        after = settled_state(client)
        restart_s = time.monotonic() - started
        assert after == before
        assert second.keys() != keys_before, "the restarted server kept the old keys"
        assert not pids_before & set(our_worker_processes(second))
        assert_answers_every_digit(client, samples, "digits", "2.0")
        assert_answers_every_digit(client, samples, "digits/1.0", "1.0")
        log = (workdir / "logs" / "ts_log.log").read_text(errors="replace")
        assert f"Snapshot {snapshot.name} validated successfully" in log
    finally:
        second.stop()
    report(
        record_property,
        "restart from snapshot",
        {"restored_from": snapshot.name, "default": after[0], "versions": after[1], "restart_s": round(restart_s, 1)},
    )

    # Contrast: TorchServe ignores every snapshot when started with --ts-config (restore=False), and
    # then writes its own startup snapshot, so the registered versions are lost for later restarts too.
    third = make_server(workdir, store, load_models="digits_v1.0.mar", snapshots=True)
    third.start()
    try:
        assert settled_state(Client(third)) == ("1.0", {"1.0": (1, 2, 1)})
    finally:
        third.stop()
    assert "digits_v2.0.mar" not in third.latest_snapshot().read_text()


# ------------------------------------------------------------------------------------ worker killed
@dataclass
class Outcome:
    sent: float  # time.monotonic() when the request was sent
    done: float
    digit: int
    status: int  # -1: no HTTP answer within CLIENT_TIMEOUT_S (or connection error)
    body: str


def correct(outcome: Outcome) -> bool:
    if outcome.status != 200:
        return False
    return json.loads(outcome.body)["predictions"][0]["label"] == str(outcome.digit)


class Load:
    """CONCURRENCY closed-loop client threads sending sample digits until stopped (or a hard cap)."""

    def __init__(self, server: TorchServeProcess, samples: list[bytes], path: str, max_per_thread: int = 3000):
        self.url = server.url("inference", f"/predictions/{path}")
        self.headers = server.headers("inference")
        self.samples = samples
        self.max_per_thread = max_per_thread
        self.stop = threading.Event()
        self.outcomes: list[Outcome] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(CONCURRENCY)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=CLIENT_TIMEOUT_S + 10)

    def _run(self, k: int) -> None:
        session = requests.Session()
        for i in range(self.max_per_thread):
            if self.stop.is_set():
                break
            digit = (k + i) % 10
            sent = time.monotonic()
            try:
                response = session.post(
                    self.url, data=self.samples[digit], headers=self.headers, timeout=CLIENT_TIMEOUT_S
                )
                status, body = response.status_code, response.text
            except requests.RequestException as exc:
                status, body = -1, repr(exc)
            with self.lock:
                self.outcomes.append(Outcome(sent, time.monotonic(), digit, status, body))

    def snapshot(self) -> list[Outcome]:
        with self.lock:
            return list(self.outcomes)


@pytest.mark.parametrize("workers", [1, 2])
def test_worker_killed_under_load_costs_only_its_batch(
    server: TorchServeProcess, samples: list[bytes], workers: int, record_property
) -> None:
    client = Client(server)
    response = client.manage("PUT", f"/models/digits/1.0?min_worker={workers}&max_worker=2&synchronous=true")
    assert response.status_code == 200, response.text
    described = describe(client, "1.0")
    batch_size = int(described["batchSize"])
    pids = sorted(int(w["pid"]) for w in described["workers"])
    assert len(pids) == workers
    assert all(w["status"] == "READY" for w in described["workers"])
    victim = pids[0]
    # Only a worker of the TorchServe this test started: its process group is our launcher's.
    assert victim in our_worker_processes(server), f"pid {victim} is not a worker of our TorchServe"

    with Load(server, samples, "digits/1.0") as load:
        deadline = time.monotonic() + 30
        while sum(o.status == 200 for o in load.snapshot()) < 2 * CONCURRENCY and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any(o.status == 200 for o in load.snapshot()), "no answer before the kill"
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)

        answers_again_s = workers_back_s = None
        new_pids: list[int] = []
        while time.monotonic() - killed_at < RECOVERY_LIMIT_S and (answers_again_s is None or workers_back_s is None):
            if answers_again_s is None:
                after = [o.done for o in load.snapshot() if o.sent > killed_at and o.status == 200]
                if after:
                    answers_again_s = min(after) - killed_at
            if workers_back_s is None:
                workers_now = describe(client, "1.0")["workers"]
                new_pids = sorted(int(w["pid"]) for w in workers_now)
                if (
                    len(workers_now) == workers
                    and victim not in new_pids
                    and all(w["status"] == "READY" for w in workers_now)
                ):
                    workers_back_s = time.monotonic() - killed_at
            time.sleep(0.05)
        time.sleep(1.0)  # keep the load on a little after recovery
    outcomes = load.snapshot()

    # Requests outstanding on the client side at the moment of the kill (sent before, answered after).
    in_flight_at_kill = sum(1 for o in outcomes if o.sent <= killed_at <= o.done)
    failed = [o for o in outcomes if o.status != 200]
    wrong = [o for o in outcomes if o.status == 200 and not correct(o)]
    ok_times = sorted(o.done for o in outcomes if o.status == 200)
    gap_s = max((b - a for a, b in zip(ok_times, ok_times[1:]) if b > killed_at), default=float("nan"))
    figures = {
        "workers": workers,
        "batch_size": batch_size,
        "requests_sent": len(outcomes),
        "failed": len(failed),
        "failed_statuses": sorted({o.status for o in failed}),
        "in_flight_at_kill": in_flight_at_kill,
        "answers_again_s": None if answers_again_s is None else round(answers_again_s, 2),
        "worker_back_s": None if workers_back_s is None else round(workers_back_s, 2),
        "longest_gap_between_answers_s": round(gap_s, 2),
        "new_pids": new_pids,
    }
    report(record_property, f"SIGKILL worker {victim} of {workers}", figures)

    assert answers_again_s is not None, f"digits 1.0 did not answer within {RECOVERY_LIMIT_S}s of the kill"
    assert workers_back_s is not None, f"no {workers} READY worker(s) with a new pid within {RECOVERY_LIMIT_S}s"
    # The bound: TorchServe fails only the batch the dead worker held ("Worker died."); requests still
    # queued wait for a worker. A worker holds at most one batch (<= batch_size requests), and at most
    # CONCURRENCY requests exist at any moment (one per client thread), so at most
    # min(batch_size, CONCURRENCY) requests can fail.
    assert len(failed) <= min(batch_size, CONCURRENCY), [(o.status, o.body[:200]) for o in failed]
    for outcome in failed:
        # TorchServe answers the dead worker's batch with 500, or 507 when it reads the worker's exit
        # status 137 (SIGKILL) as out-of-memory; a job it dropped would surface as a client timeout (-1).
        assert outcome.status in (-1, 500, 507), (outcome.status, outcome.body[:300])
        if outcome.status != -1:
            assert json.loads(outcome.body)["message"] == "Worker died."
        assert outcome.sent <= killed_at + 1.0, "a request sent well after the kill failed"
    assert not wrong, [(o.digit, o.body[:200]) for o in wrong]
    assert sum(o.status == 200 for o in outcomes) >= len(outcomes) - len(failed) > 0
    assert_answers_every_digit(client, samples, "digits/1.0", "1.0")


# ------------------------------------------------------------------------------------ bad archives
def test_corrupted_archives_are_refused_and_serving_is_untouched(
    server: TorchServeProcess, samples: list[bytes], record_property
) -> None:
    client = Client(server)
    pids_before = worker_pids(client, "1.0")
    assert_answers_every_digit(client, samples, "digits", "1.0")

    figures = {}
    for name in BAD_ARCHIVES:
        started = time.monotonic()
        response = client.manage("POST", f"/models?url={name}&initial_workers=1&synchronous=true", timeout=60)
        elapsed = time.monotonic() - started
        figures[name] = f"{response.status_code} {response.json().get('message')!r} in {elapsed:.2f}s"
        assert 400 <= response.status_code < 600, response.text
        assert response.json()["message"].strip(), response.text
        assert elapsed < REGISTER_LIMIT_S
        for version in ("2.0", name.removeprefix("digits_v").removesuffix(".mar")):
            assert client.manage("GET", f"/models/digits/{version}").status_code == 404, f"{name} left a registration"
    report(record_property, "corrupted archives", figures)

    assert worker_pids(client, "1.0") == pids_before
    assert set(our_worker_processes(server)) == set(pids_before)
    assert_answers_every_digit(client, samples, "digits", "1.0")


def test_version_failing_in_initialize_is_refused_quickly_and_serving_is_untouched(
    server: TorchServeProcess, samples: list[bytes], record_property
) -> None:
    client = Client(server)
    version = FAILING_INIT_VERSION
    pids_before = worker_pids(client, "1.0")

    started = time.monotonic()
    response = client.manage(
        "POST",
        f"/models?url=digits_v{version}.mar&initial_workers=1&synchronous=true&startup_timeout=30&response_timeout=10",
        timeout=REGISTER_LIMIT_S + 30,
    )
    elapsed = time.monotonic() - started
    assert response.status_code == 500, response.text
    message = response.json()["message"]
    assert message == f"Failed to start workers for model digits version: {version}"
    assert elapsed < REGISTER_LIMIT_S
    # The reason is only in the worker's log, not in the API's answer.
    model_log = (server.workdir / "logs" / "model_log.log").read_text(errors="replace")
    assert "quantized_engine: must be one of ['x86', 'fbgemm', 'qnnpack'], got 'no-such-engine'" in model_log

    # TorchServe 0.12 does not retry a worker whose load failed during a synchronous registration
    # (its error path unregisters the version) ...
    time.sleep(3)
    assert set(our_worker_processes(server)) == set(pids_before), "a worker of the failed version is alive"
    # ... but the unregistration runs on the failing worker's own thread, is interrupted by the very
    # scale-down it starts ("WorkerThread interrupted during waitFor") and puts the version back: a
    # ghost registration with no workers (min/max 0) is left behind. It never serves, and DELETE
    # removes it. Should a TorchServe release fix this, the version is simply gone (404).
    ghost = client.manage("GET", f"/models/digits/{version}")
    ghost_left = ghost.status_code == 200
    if ghost_left:
        described = ghost.json()[0]
        assert described["workers"] == [], described
        assert described["minWorkers"] == 0, described
        assert client.predict(f"digits/{version}", data=samples[3], timeout=CLIENT_TIMEOUT_S).status_code >= 500
        assert client.manage("DELETE", f"/models/digits/{version}").status_code == 200
    else:
        assert ghost.status_code == 404, ghost.text
    assert client.manage("GET", f"/models/digits/{version}").status_code == 404
    report(
        record_property,
        "handler failing in initialize",
        {
            "status": response.status_code,
            "message": message,
            "seconds": round(elapsed, 2),
            "ghost_registration_left": ghost_left,
        },
    )

    assert worker_pids(client, "1.0") == pids_before
    assert_answers_every_digit(client, samples, "digits", "1.0")
