"""The cost of tracing in ``make bench``: the same archive with span export on and off.

Two TorchServes serve the same INT8 archive side by side (``servekit.perf.overhead.switch_overhead``):
one with ``SERVEKIT_OTLP_ENDPOINT`` pointing at a sink on loopback (every request gets a worker span
and its stage spans, exported with OTLP/HTTP by a background thread, ``handlers.tracing``), one
without (tracing off: nothing of OpenTelemetry is imported). The sink answers every export with an
empty OTLP response and counts what it received, so the run shows that spans really were exported.
The bar: tracing on costs at most ``MAX_TRACING_COST`` of req/s.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from handlers.tracing import ENDPOINT_ENV
from servekit.perf.overhead import switch_overhead
from servekit.perf.sweep import Target

MAX_TRACING_COST = 0.05  # issue 24: tracing on costs at most 5 % of req/s


class _Sink(BaseHTTPRequestHandler):
    exports = 0
    received = 0
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802 - the http.server name
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with _Sink.lock:
            _Sink.exports += 1
            _Sink.received += len(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
        return


@contextlib.contextmanager
def otlp_sink() -> Iterator[tuple[str, type[_Sink]]]:
    """An OTLP/HTTP sink on a free loopback port: ``(url of /v1/traces, the counters' class)``."""
    _Sink.exports = _Sink.received = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    thread = threading.Thread(target=server.serve_forever, name="otlp-sink", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces", _Sink
    finally:
        server.shutdown()
        server.server_close()


def tracing_overhead(
    workdir: Path,
    store: Path,
    target: Target,
    photo: Path,
    concurrency: int,
    seconds: float,
    quick: bool,
    run_hey: Callable[..., dict],
    log: Callable[[str], None],
) -> dict:
    with otlp_sink() as (url, sink):
        result = switch_overhead(
            workdir, store, target, photo, concurrency, seconds, quick, run_hey, log,
            name="tracing", envs={"on": {ENDPOINT_ENV: url}, "off": {ENDPOINT_ENV: ""}},
        )  # fmt: skip
        result["otlp_exports"], result["otlp_bytes"] = sink.exports, sink.received
    result["description"] = (
        f"{target.archive}, /predictions at c={concurrency}, span export to a loopback OTLP sink on vs tracing off"
    )
    return result


def tracing_bar(result: dict | None) -> dict[str, bool]:
    if not result:
        return {}
    ratio = result.get("on_over_off")
    exported = bool(result.get("otlp_exports"))
    return {
        f"tracing on costs <= {MAX_TRACING_COST:.0%} of req/s (spans exported)": exported
        and ratio is not None
        and ratio >= 1 - MAX_TRACING_COST
    }


def markdown(result: dict | None) -> list[str]:
    if not result:
        return []
    lines = ["", f"## Tracing cost ({result['description']}, order on, off, off, on)", "",
             "| tracing | req/s per run | mean req/s |", "|---|---|---|"]  # fmt: skip
    for mode in ("on", "off"):
        rates = ", ".join(str(r["rps"]) for r in result["runs"][mode])
        lines.append(f"| {mode} | {rates} | {result[f'rps_{mode}']} |")
    lines += ["", f"On over off: {result['on_over_off']}; the sink received {result['otlp_exports']} exports "
              f"({result['otlp_bytes']} bytes) from the server with tracing on."]  # fmt: skip
    return lines
