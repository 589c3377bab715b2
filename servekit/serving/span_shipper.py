"""Exports the span log of an nginx hop that has no Python process beside it: the canary proxy's.

The OIP front's span log is exported by the gateway process that runs with it
(``servekit.serving.oip``). The canary proxy (``servekit.deploy.proxy``) is nginx alone, so with span
export on ``NginxProxy.start`` also starts this small process, and ``NginxProxy.stop`` stops it, as
it does its log keeper. It follows the log across the keeper's rotations and exports what it finds
every ``interval`` seconds (``servekit.serving.tracing.SpanLogShipper``); on ``SIGTERM``, or once
the nginx master under its prefix has been gone for two checks in a row, it ships what is left and
exits. Its pid file is checked before any signal, as for every process of ours
(``servekit.serving.processes``). Without OpenTelemetry's OTLP exporter installed it does not start.

    shipper = SpanShipperProcess(prefix, prefix / "spans.jsonl", "http://COLLECTOR:4318/v1/traces", "proxy")
    shipper.start(offset)   # python -m servekit.serving.span_shipper --prefix PREFIX --hop proxy ... LOG
    shipper.stop()          # True if it was running
"""

from __future__ import annotations

import argparse
import importlib.util
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from servekit.errors import ServekitError
from servekit.serving.nginx import NginxInstance
from servekit.serving.processes import Companion, owned_pid, release_own_pid_file
from servekit.serving.tracing import HOPS, SpanLogShipper

__all__ = ["PID_FILE", "SpanShipperError", "SpanShipperProcess"]

PID_FILE = "span-shipper.pid"
DEFAULT_INTERVAL = 1.0
REPO_ROOT = Path(__file__).resolve().parents[2]
READY = "span shipper: exporting"  # its output, once it ships (and stops shipping what is left)
EXPORTER = "opentelemetry.exporter.otlp.proto.http.trace_exporter"


class SpanShipperError(ServekitError):
    """The span shipper's settings are invalid, or it could not be started."""


def _warn(message: str) -> None:
    print(f"servekit: warning: {message}", file=sys.stderr, flush=True)


def _validated(hop: str, endpoint: str, interval: float) -> None:
    if hop not in HOPS:
        raise SpanShipperError(f"span shipper hop: must be one of {', '.join(sorted(HOPS))}, got {hop!r}")
    if not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://")):
        raise SpanShipperError(f"span shipper endpoint: must be an OTLP/HTTP traces URL (http://...), got {endpoint!r}")
    if not isinstance(interval, int | float) or isinstance(interval, bool) or not 0.05 <= interval <= 60:
        raise SpanShipperError(f"span shipper interval: must be from 0.05 to 60 seconds, got {interval!r}")


@dataclass
class SpanShipperProcess(Companion):
    """The span shipper of the nginx under ``prefix``: its pid file and output there, checked before any signal."""

    prefix: Path
    log: Path
    endpoint: str | None  # None: only to find or stop the running one
    hop: str = "proxy"
    interval: float = DEFAULT_INTERVAL
    warn: Callable[[str], None] = field(default=_warn, kw_only=True)
    module = "servekit.serving.span_shipper"
    pid_name, output_name, error, label = PID_FILE, "span-shipper.log", SpanShipperError, "span shipper"

    def __post_init__(self) -> None:
        if self.endpoint is not None:
            _validated(self.hop, self.endpoint, self.interval)
        self.prefix = Path(self.prefix).resolve()
        self.log = Path(self.log)

    def command(self, offset: int | None = None) -> list[str]:
        return [
            sys.executable, "-m", self.module, "--prefix", str(self.prefix), "--hop", self.hop,
            "--endpoint", self.endpoint, "--interval", str(self.interval),
            *(["--offset", str(offset)] if offset is not None else []), str(self.log),
        ]  # fmt: skip

    def start(self, offset: int | None = None, timeout: float = 5.0) -> None:
        """Start the shipper (one left over from a crashed nginx is stopped first); ``offset``: where in the log
        to begin (``LogFollower.start``; default: its end when the shipper has started)."""
        if self.endpoint is None:
            raise SpanShipperError("the span shipper cannot start without an endpoint")
        try:  # the check imports OpenTelemetry's parent packages only, not the exporter (what the child does)
            installed = importlib.util.find_spec(EXPORTER) is not None
        except ModuleNotFoundError:
            installed = False
        if not installed:
            raise SpanShipperError(f"span export needs OpenTelemetry's OTLP exporter ({EXPORTER}): not installed")
        self.launch(self.command(offset), REPO_ROOT, timeout)

    def stop(self, timeout: float = 15.0) -> bool:
        """Stop our shipper (SIGTERM: it ships what is left; SIGKILL after ``timeout`` s); False when not running."""
        return super().stop(timeout)


# ------------------------------------------------------------------------------------------ command line
def run(interval: float, alive: Callable[[], bool], stop: threading.Event) -> None:
    """Wait until ``stop`` is set or ``alive`` has been false for two checks ``interval`` s apart."""
    missed = 0
    while missed < 2 and not stop.wait(interval):
        missed = 0 if alive() else missed + 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m servekit.serving.span_shipper", description=__doc__.split("\n")[0])
    parser.add_argument("--prefix", type=Path, required=True, help="the nginx prefix (nginx.pid, nginx.conf)")
    parser.add_argument("--hop", required=True, help="whose spans: " + ", ".join(sorted(HOPS)))
    parser.add_argument("--endpoint", required=True, help="the collector's OTLP/HTTP traces URL")
    parser.add_argument("--interval", type=float, default=DEFAULT_INTERVAL, help="seconds between two exports")
    parser.add_argument("--offset", type=int, help="read the log from this byte on (default: from its end now)")
    parser.add_argument("log", type=Path, help="the span log")
    args = parser.parse_args(argv)
    try:
        _validated(args.hop, args.endpoint, args.interval)
    except SpanShipperError as exc:
        parser.error(str(exc))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        shipper = SpanLogShipper(args.log, args.endpoint, args.interval, HOPS[args.hop], offset=args.offset)
    except ImportError as exc:
        print(f"servekit: span export needs OpenTelemetry ({exc}): no {args.hop} spans", file=sys.stderr, flush=True)
        return 2
    shipper.start()
    print(f"{READY} {args.log} to {args.endpoint} every {args.interval:g} s", flush=True)  # to its output file
    nginx = NginxInstance(args.prefix)
    run(args.interval, lambda: owned_pid(nginx.pid_file, nginx.master_fragments) is not None, stop)
    shipper.stop()  # its last round ships what is left
    release_own_pid_file(args.prefix / PID_FILE)  # gone with nginx: leave no stale pid file behind
    return 0


if __name__ == "__main__":
    sys.exit(main())
