"""The pod's routing (servekit.deploy.pod): its routing file checked against what the pod serves, followed
while it serves, a bad change refused with one line; the launcher refuses what it cannot route."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from servekit.deploy import pod
from servekit.deploy.pod import PodRouting, RoutingError, Ticker, read_routes, served_versions
from servekit.deploy.proxy import ProxyError
from servekit.serving.server import ServerError

SERVED = {"digits": {"1.0", "2.0"}, "tabular": {"1.0"}}


def config(tmp_path: Path, inference: str = "http://127.0.0.1:8079") -> Path:
    snapshot = {"name": "startup.cfg", "modelCount": 3,
                "models": {"digits": {"1.0": {"marName": "digits_v1.0.mar"}, "2.0": {"marName": "digits_v2.0.mar"}},
                           "tabular": {"1.0": {"marName": "tabular_v1.0.mar"}}}}  # fmt: skip
    path = tmp_path / "config.properties"
    path.write_text(f"inference_address={inference}\nmodel_snapshot={json.dumps(snapshot)}\n")
    return path


def routes(**models: dict) -> bytes:
    return json.dumps({"routes": models}).encode()


def test_the_served_versions_are_the_configs_model_snapshot(tmp_path: Path) -> None:
    assert served_versions(config(tmp_path)) == SERVED
    (tmp_path / "bad.properties").write_text("model_snapshot={not json\n")
    with pytest.raises(RoutingError, match="no readable model_snapshot"):
        served_versions(tmp_path / "bad.properties")


def test_routes_of_served_versions_are_read() -> None:
    state = read_routes(
        routes(digits={"canary": {"version": "2.0", "percent": 30}, "shadow": "1.0"}), SERVED, Path("f")
    )
    digits = state.models["digits"]
    assert (digits.canary.version, digits.canary.percent, digits.shadow) == ("2.0", 30, "1.0")
    assert read_routes(b"", SERVED, Path("f")).models == {}  # no file, or an empty one: no routes
    assert read_routes(b'{"routes": {}}', SERVED, Path("f")).models == {}
    assert pod.describe(state) == "digits: canary 2.0 (30%), shadow 1.0"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{", "f: not JSON"),
        (b"[]", 'f: expected {"routes"'),
        (b'{"routes": {}, "listen": "0.0.0.0:1"}', 'f: expected {"routes"'),  # the pod sets its own addresses
        (routes(digits={"canary": {"version": "2.0", "percent": 130}}), "canary must be {version, percent 0-100}"),
        (routes(digits={"canary": {"version": "3.0", "percent": 10}}), "routes digits to 3.0, which this pod does not"),
        (routes(digits={"shadow": "3.0"}), "(it serves digits 1.0, 2.0)"),
        (routes(vision={"shadow": "1.0"}), "routes vision, which this pod does not serve (digits, tabular)"),
        (routes(**{"bad name": {"shadow": "1.0"}}), "bad model name"),
    ],
)
def test_routes_a_pod_cannot_apply_are_refused_saying_why(raw: bytes, message: str) -> None:
    with pytest.raises(RoutingError) as caught:
        read_routes(raw, SERVED, Path("f"))
    assert message in str(caught.value)


@dataclass
class FakeProxy:
    """What PodRouting uses of NginxProxy: the installed state is recorded, ``fail`` makes nginx -t fail."""

    prefix: Path
    upstream: str = "127.0.0.1:8079"
    running: bool = True
    fail: str | None = None
    applied: list[dict] = field(default_factory=list)
    started: int = 0

    @property
    def state_file(self) -> Path:
        return self.prefix / "state.json"

    def start(self) -> None:
        self.started += 1

    def running_pid(self) -> int | None:
        return 4242 if self.running else None

    def apply(self, state) -> None:
        if self.fail:
            raise ProxyError(self.fail)
        self.applied.append(state.to_json())


def routing(tmp_path: Path, initial: bytes | None = None) -> tuple[PodRouting, FakeProxy, Path]:
    source = tmp_path / "routing" / "routing.json"
    if initial is not None:
        source.parent.mkdir(parents=True)
        source.write_bytes(initial)
    proxy = FakeProxy(tmp_path / "proxy")
    return PodRouting(proxy, "0.0.0.0:8080", source, SERVED), proxy, source  # type: ignore[arg-type]


def test_the_pod_starts_with_its_files_routes_on_its_own_address(tmp_path: Path) -> None:
    router, proxy, _ = routing(tmp_path, routes(digits={"canary": {"version": "2.0", "percent": 30}}))
    router.start()
    written = json.loads(proxy.state_file.read_text())
    assert (written["listen"], written["upstream"]) == ("0.0.0.0:8080", "127.0.0.1:8079")
    assert written["routes"] == {"digits": {"canary": {"version": "2.0", "percent": 30}}}
    assert proxy.started == 1
    assert router.said == ["routing: digits: canary 2.0 (30%)"]


def test_without_a_file_the_pod_routes_nothing(tmp_path: Path) -> None:
    router, proxy, _ = routing(tmp_path)
    router.start()
    assert json.loads(proxy.state_file.read_text())["routes"] == {}
    assert router.said == ["routing: no routes (every request goes to its model's default version)"]


def test_a_changed_file_is_applied_once_and_a_bad_change_refused_once(tmp_path: Path) -> None:
    router, proxy, source = routing(tmp_path, b"")
    router.start()
    router.poll()
    assert proxy.applied == []  # unchanged: nothing to do

    source.write_bytes(routes(digits={"shadow": "1.0"}))
    router.poll()
    router.poll()
    assert [state["routes"] for state in proxy.applied] == [{"digits": {"shadow": "1.0"}}]
    assert proxy.applied[0]["listen"] == "0.0.0.0:8080"
    assert router.said[-1] == "routing: now digits: shadow 1.0"

    source.write_bytes(routes(digits={"shadow": "7.0"}))
    router.poll()
    router.poll()
    assert len(proxy.applied) == 1  # the routes stay as they were
    refusals = [line for line in router.said if line.startswith("routing: change refused")]
    assert len(refusals) == 1  # said once, not every second
    assert "routes digits to 7.0, which this pod does not serve" in refusals[0]

    proxy.fail = "nginx -t: bad configuration"  # a rendering nginx refuses is refused too
    source.write_bytes(routes(digits={"canary": {"version": "2.0", "percent": 5}}))
    router.poll()
    assert len(proxy.applied) == 1
    assert router.said[-1].endswith("nginx -t: bad configuration")

    proxy.fail = None
    source.unlink()  # the ConfigMap removed: no routes
    router.poll()
    assert proxy.applied[-1]["routes"] == {}
    assert router.said[-1] == "routing: now no routes (every request goes to its model's default version)"


def test_a_proxy_that_exits_ends_the_pod(tmp_path: Path) -> None:
    router, proxy, _ = routing(tmp_path)
    router.start()
    proxy.running = False
    with pytest.raises(ServerError, match="routing proxy"):
        router.poll()


def test_the_ticker_polls_at_most_once_a_second(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    now = [100.0]
    monkeypatch.setattr(pod.time, "monotonic", lambda: now[0])
    router, _, _ = routing(tmp_path)
    monkeypatch.setattr(router, "poll", lambda: calls.append(now[0]))
    tick = Ticker(router)
    for step in range(11):  # 2 s in steps of 0.2 s, as the server's loop ticks
        now[0] = 100.0 + step * 0.2
        tick()
    assert calls == [100.0, pytest.approx(101.0), pytest.approx(102.0)]


def test_the_launcher_refuses_a_public_torchserve_and_a_bad_routing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    common = ["--workdir", str(tmp_path / "var"), "--model-store", str(tmp_path), "--http-port", "18080"]
    exposed = config(tmp_path, inference="http://0.0.0.0:8080")
    assert pod.main(["--config", str(exposed), *common]) == 2
    assert "inference_address must be on 127.0.0.1, behind the routing proxy" in capsys.readouterr().err

    bad = tmp_path / "routing.json"
    bad.write_bytes(routes(digits={"canary": {"version": "9.0", "percent": 10}}))
    assert pod.main(["--config", str(config(tmp_path)), *common, "--routing", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pod: error: ")
    assert err.count("\n") == 1
    assert "routes digits to 9.0, which this pod does not serve" in err
    assert not (tmp_path / "var" / "torchserve.pid").exists()  # refused before anything started
