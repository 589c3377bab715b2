"""A rolling-update rehearsal on one machine (issue 12): two replicas, a Service, constant load, zero failures.

Kubernetes does this in production; the rehearsal only shows that the probes and the drain the
manifests specify are right. Two replicas run from a bundle whose default is digits 1.0 (each as
a pod would, tests/integration/pods.py), behind an nginx upstream standing in for the Service
(round robin, no retries: see ``ServiceStandIn``). ``hey`` POSTs samples/digit_7.png to
``/predictions/digits`` through it throughout (4 clients, each sending its next request as soon as
its last is answered: the two cores stay busy), and a side thread samples which version answers.
Then each replica is replaced in turn, as the Deployment's strategy does it (maxSurge 1,
maxUnavailable 0):

1. start a replica from a second bundle, whose default is digits 2.0;
2. readiness gating: it joins the Service only once its ``/v2/health/ready`` says 200;
3. endpoint removal: the old replica leaves the Service (nginx reload, requests in flight finish);
4. the ``preStop`` sleep from bundle.json, then SIGTERM to the old launcher, which drains and must
   exit 0 within the rest of the termination grace.

Afterwards hey must report only 200s and no transport errors, the sampler must have seen 1.0
before and 2.0 after (both during), and nothing any replica started may be left running.

The load is bounded by ``-z`` (a hard cap); it is stopped with SIGINT a few seconds after the
update (hey then finishes the requests in flight and prints its summary), so on a quick machine the
whole test takes about a minute and a half and it still covers a slow one.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

from tests.integration.pods import Pod, ServiceStandIn, free_ports, make_bundle, pod_timing, record_of

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DIGIT = REPO / "samples" / "digit_7.png"
CONCURRENCY = 4  # hey -c 4, as fast as the replicas answer: the two cores are busy throughout
LOAD_CAP_S = 170  # hey -z: the hard bound on the load; the test stops it well before when all goes well
SETTLE_S = 3.0  # load before the first replacement and after the last
START_BUDGET_S = 150.0  # a replica's start under load, capped below the startup probe's 5 minutes


def post_digit(url: str, timeout: float = 30) -> requests.Response:
    return requests.post(url, data=DIGIT.read_bytes(), headers={"Content-Type": "image/png"}, timeout=timeout)


def answering_versions(url: str, count: int) -> Counter:
    versions: Counter = Counter()
    for _ in range(count):
        response = post_digit(url)
        assert response.status_code == 200, response.text
        assert response.json()["predictions"][0]["label"] == "7"
        versions[response.json()["version"]] += 1
    return versions


class VersionSampler(threading.Thread):
    """One request every ``interval`` s through the Service: when, what status, which version answered."""

    def __init__(self, url: str, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.url, self.interval = url, interval
        self.samples: list[tuple[float, int | None, str]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        body = DIGIT.read_bytes()
        with requests.Session() as session:
            while not self.stopping.is_set():
                at = time.monotonic()
                try:
                    response = session.post(self.url, data=body, headers={"Content-Type": "image/png"}, timeout=30)
                    ok = response.status_code == 200 and response.json()["predictions"][0]["label"] == "7"
                    answer = response.json()["version"] if ok else response.text[:200]
                    self.samples.append((at, response.status_code if ok else -response.status_code, answer))
                except (requests.RequestException, ValueError, KeyError) as exc:
                    self.samples.append((at, None, f"{type(exc).__name__}: {exc}"))
                self.stopping.wait(self.interval)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=60)


def start_hey(hey: str, url: str) -> subprocess.Popen:
    command = [
        hey, "-z", f"{LOAD_CAP_S}s", "-c", str(CONCURRENCY), "-t", "30",
        "-m", "POST", "-T", "image/png", "-D", str(DIGIT), url,
    ]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def stop_load(load: subprocess.Popen) -> tuple[str, str]:
    """SIGINT to hey: it finishes the requests in flight and prints its summary; its (stdout, stderr)."""
    load.send_signal(signal.SIGINT)
    return load.communicate(timeout=90)


def end_load(load: subprocess.Popen | None, sampler: VersionSampler) -> None:
    """Whatever happened: no sampler requests and no hey left running."""
    sampler.stopping.set()
    if load is not None and load.poll() is None:
        load.kill()
        load.wait(timeout=10)


def hey_report(output: str) -> tuple[Counter, Counter]:
    """hey's summary: the status code distribution and the error distribution (transport errors).

    The summary, not ``-o csv``: hey's CSV lists only requests that got a response, so it cannot
    show a refused or reset connection; the summary's "Error distribution" does.
    """
    assert "Summary:" in output, output
    found = re.findall(r"^\s+\[(\d{3})\]\s+(\d+) responses$", output, re.M)
    statuses = Counter({int(code): int(n) for code, n in found})
    errors: Counter = Counter()
    if "Error distribution:" in output:
        for count, message in re.findall(r"^\s+\[(\d+)\]\s+(.+)$", output.split("Error distribution:", 1)[1], re.M):
            errors[message.strip()] += int(count)
    return statuses, errors


def test_rolling_update_under_load_fails_no_request_and_switches_version(tmp_path: Path, model_store: Path) -> None:
    hey = shutil.which("hey")
    if hey is None:
        pytest.fail("the load generator 'hey' is not installed: `make tools` installs it (Debian package hey)")
    old_bundle, new_bundle = tmp_path / "bundle-1.0", tmp_path / "bundle-2.0"
    make_bundle(old_bundle, model_store, "--model", "digits:1.0", "--default", "digits:1.0")
    make_bundle(new_bundle, model_store, "--model", "digits:2.0", "--default", "digits:2.0")
    timing = pod_timing(record_of(new_bundle))
    prestop, grace = timing["prestop_s"], timing["grace_s"]

    service = ServiceStandIn(tmp_path / "service", port=free_ports(1)[0])
    endpoint = service.url("/predictions/digits")
    pods: list[Pod] = []
    load: subprocess.Popen | None = None
    sampler = VersionSampler(endpoint)
    events: list[str] = []
    began = first_new = only_new = time.monotonic()

    def note(text: str) -> None:
        events.append(f"{time.monotonic() - began:6.1f}s {text}")
        print(events[-1], flush=True)

    try:
        old = [Pod(old_bundle, tmp_path / f"old-{i}") for i in range(2)]
        for pod in old:
            pods.append(pod)
            pod.prepare()
            pod.start()
        for pod in old:
            pod.wait_ready(START_BUDGET_S)
        service.start([pod.backend for pod in old])
        note("two replicas of digits 1.0 ready behind the Service")
        assert answering_versions(endpoint, 6) == Counter({"1.0": 6})

        load = start_hey(hey, endpoint)
        sampler.start()
        time.sleep(SETTLE_S)
        serving = list(old)
        for i, stale in enumerate(old):
            fresh = Pod(new_bundle, tmp_path / f"new-{i}")
            pods.append(fresh)
            fresh.prepare()
            fresh.start()
            took = fresh.wait_ready(START_BUDGET_S)  # readiness gating: not in the Service before this
            note(f"replica new-{i} (2.0) ready after {took:.1f}s")
            direct = post_digit(fresh.url("http", "/predictions/digits"))
            assert direct.status_code == 200, direct.text
            assert direct.json()["version"] == "2.0", direct.text

            if i == 0:
                first_new = time.monotonic()  # from here on 2.0 may answer
            serving.append(fresh)
            service.route_to([pod.backend for pod in serving])
            note(f"new-{i} added to the Service")
            serving.remove(stale)
            service.route_to([pod.backend for pod in serving])  # returns once no old nginx worker is left
            only_new = time.monotonic()  # after the last replacement: only 2.0 may answer
            note(f"old-{i} removed from the Service; preStop sleep {prestop:g}s")
            time.sleep(prestop)
            stale.terminate()
            signalled = time.monotonic()
            try:
                code = stale.process.wait(timeout=grace - prestop)
            except subprocess.TimeoutExpired:
                pytest.fail(f"old-{i} did not exit within the termination grace ({grace:g}s):{stale.log_tail()}")
            note(f"old-{i} exited {code} {time.monotonic() - signalled:.1f}s after SIGTERM")
            assert code == 0, stale.log_tail()
            assert stale.wait_gone(5) == {}, f"old-{i} left processes running: {stale.owned()}"
            assert load.poll() is None, "the load ended before the update did: raise LOAD_CAP_S"
        time.sleep(SETTLE_S)
        assert load.poll() is None, "the load ended before the update did: raise LOAD_CAP_S"
        output, errors_text = stop_load(load)
        note("load stopped")
        sampler.stop()
        after = answering_versions(endpoint, 6)
    finally:
        end_load(load, sampler)
        for pod in pods:
            with contextlib.suppress(Exception):  # the next pod and the Service are stopped whatever happens
                pod.kill()
        service.stop()

    statuses, errors = hey_report(output)
    total = sum(statuses.values()) + sum(errors.values())
    seen = Counter(status for _, status, _ in sampler.samples)
    versions = [answer for _, status, answer in sampler.samples if status == 200]
    print(f"hey: {total} requests, status codes {dict(statuses)}, errors {dict(errors)}; "
          f"sampler: {dict(seen)}, versions {dict(Counter(versions))}")  # fmt: skip
    assert errors == Counter(), f"transport errors under load: {dict(errors)}; stderr {errors_text[-500:]}"
    assert set(statuses) == {200}, f"non-200 answers under load: {dict(statuses)}"
    assert total >= 10 * CONCURRENCY, f"too little load to mean anything: {total} requests"
    failed = [sample for sample in sampler.samples if sample[1] != 200]
    assert not failed, f"the sampler saw failures: {failed[:5]}"
    assert set(versions) == {"1.0", "2.0"}, Counter(versions)
    before_new = Counter(answer for at, status, answer in sampler.samples if at < first_new)
    after_old = Counter(answer for at, status, answer in sampler.samples if at > only_new)
    assert set(before_new) == {"1.0"}, f"before 2.0 joined the Service: {dict(before_new)}"
    assert set(after_old) == {"2.0"}, f"after the last 1.0 left the Service: {dict(after_old)}"
    assert after == Counter({"2.0": 6})
