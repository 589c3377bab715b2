"""The span shipper process of the canary proxy: pid-checked like every process of ours, ships on stop, exits
without its nginx (``servekit.serving.span_shipper``), against a real (test) OTLP receiver."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from servekit.serving.processes import pid_matches
from servekit.serving.span_shipper import READY, SpanShipperError, SpanShipperProcess
from servekit.serving.tracing import SPAN_LOG
from tests.otlp_receiver import otlp_receiver
from tests.processes import sleeping_process, wait_for

pytestmark = pytest.mark.unit

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen]:
    with sleeping_process() as process:
        yield process


def line(span: str) -> bytes:
    record = {"trace": TRACE, "span": span, "parent": "1" * 16, "end": 1_700_000_000.25, "seconds": 0.04,
              "status": 200, "method": "POST", "uri": "/predictions/digits", "upstream_seconds": "0.039",
              "target": "/2.0", "served": "2.0"}  # fmt: skip
    return json.dumps(record).encode() + b"\n"


def test_the_shipper_is_stopped_by_its_verified_pid_and_ships_what_is_left(
    tmp_path: Path, sleeper: subprocess.Popen
) -> None:
    log = tmp_path / SPAN_LOG
    log.write_bytes(line("0" * 16))
    warnings: list[str] = []
    with otlp_receiver() as receiver:
        shipper = SpanShipperProcess(tmp_path, log, receiver.url, "proxy", interval=60, warn=warnings.append)
        shipper.pid_file.write_text(f"{sleeper.pid}\n")
        assert shipper.stop() is False  # a stale pid file naming our sleep: removed, nothing signalled
        assert sleeper.poll() is None
        assert len(warnings) == 1
        assert "which is another process (sleep 300)" in warnings[0]
        shipper.start(offset=log.stat().st_size)  # the first line was there before: not its to ship
        assert wait_for(lambda: READY in shipper.output.read_text())
        with log.open("ab") as out:
            out.write(line("2" * 16))
        pid = shipper.running_pid()
        assert pid is not None
        assert shipper.stop() is True  # long before its first round (60 s): the stop ships the line
        assert not pid_matches(pid, shipper.fragments)
        assert not shipper.pid_file.exists()
        spans = receiver.wait_for(lambda spans: len(spans) >= 1)
    assert [(s.service, s.name, s.span_id, s.parent_id) for s in spans] == [
        ("servekit-proxy", "proxy", "2" * 16, "1" * 16)
    ]


def test_the_shipper_exits_by_itself_without_its_nginx(tmp_path: Path) -> None:
    # No nginx under the prefix: the shipper exits after two checks and removes its pid file.
    shipper = SpanShipperProcess(tmp_path, tmp_path / SPAN_LOG, "http://127.0.0.1:9/v1/traces", "proxy", interval=0.05)
    shipper.start()
    assert wait_for(lambda: not shipper.pid_file.exists())
    assert shipper.running_pid() is None


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"hop": "gateway"}, "span shipper hop: must be one of front, proxy, got 'gateway'"),
        ({"endpoint": "collector:4318"}, r"span shipper endpoint: must be an OTLP/HTTP traces URL \(http://...\), got"),
        ({"interval": 0}, "span shipper interval: must be from 0.05 to 60 seconds, got 0"),
    ],
)
def test_the_shipper_s_settings_are_validated(tmp_path: Path, settings: dict, message: str) -> None:
    kwargs = {"endpoint": "http://127.0.0.1:4318/v1/traces", "hop": "proxy", **settings}
    with pytest.raises(SpanShipperError, match=f"^{message}"):
        SpanShipperProcess(tmp_path, tmp_path / SPAN_LOG, **kwargs)
    with pytest.raises(SpanShipperError, match="cannot start without an endpoint"):
        SpanShipperProcess(tmp_path, tmp_path / SPAN_LOG, None).start()
