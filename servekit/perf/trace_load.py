"""The cost of tracing in ``make bench``: the same archive with span export on and off.

Two TorchServes serve the same INT8 archive side by side (``servekit.perf.overhead.switch_overhead``):
one with ``SERVEKIT_OTLP_ENDPOINT`` pointing at a sink on loopback (every request gets a worker span
and its stage spans, exported with OTLP/HTTP by a background thread, ``handlers.tracing``), one
without (tracing off: nothing of OpenTelemetry is imported). The sink answers every export with an
empty OTLP response and counts what it received, so the run shows that spans really were exported.
The bar: tracing on costs at most ``MAX_TRACING_COST`` of req/s.

Tracing off (``off_path_seconds``): of tracing, a worker then runs only its handler's two ``tracer``
checks per request (``handlers.base``: ``tracer_from_env`` returned None at initialize, so nothing of
OpenTelemetry is imported); they are timed on a real handler instance and set against the server's
CPU time per request in the off runs (all cores over req/s). The bar: under ``MAX_OFF_SHARE`` of it,
i.e. nothing a req/s comparison could measure. The nginx hops pass ``traceparent`` on whether or not
spans are exported (trace context propagation is always on), so that part is in both servers.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from handlers.tracing import ENDPOINT_ENV
from servekit.perf.overhead import cpu_note, rounds_note, switch_overhead
from servekit.perf.sweep import Target

MAX_TRACING_COST = 0.05  # issue 24: tracing on costs at most 5 % of req/s
MAX_OFF_SHARE = 0.001  # tracing off: under 0.1 % of a request's CPU time, far below a req/s run's noise


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


def off_path_seconds(calls: int = 500_000) -> float:
    """What tracing off costs one request in a worker: the handler's two ``tracer`` checks, timed on a handler."""
    import timeit

    from handlers.image_classifier import ImageClassifier

    handler = ImageClassifier()  # tracing off: initialize leaves tracer None without SERVEKIT_OTLP_ENDPOINT
    if handler.tracer is not None:
        raise AssertionError("a new handler has a tracer: the off path is not what this measures")
    checks = "h.tracer is not None\nh.tracer is not None and h.initialized"  # per request, then per batch
    return min(timeit.repeat(checks, globals={"h": handler}, number=calls, repeat=5)) / calls


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
    off_ns = off_path_seconds() * 1e9
    cpu_us = (os.cpu_count() or 1) * 1e6 / result["rps_off"] if result.get("rps_off") else None
    result["off_path_ns_per_request"] = round(off_ns, 1)
    result["cpu_us_per_request"] = round(cpu_us, 1) if cpu_us else None
    result["off_share"] = round(off_ns / 1000 / cpu_us, 7) if cpu_us else None
    return result


def tracing_bar(result: dict | None) -> dict[str, bool]:
    if not result:
        return {}
    ratio = result.get("on_over_off")
    exported = bool(result.get("otlp_exports"))
    share = result.get("off_share")
    return {
        f"tracing on costs <= {MAX_TRACING_COST:.0%} of req/s (spans exported)": exported
        and ratio is not None
        and ratio >= 1 - MAX_TRACING_COST,
        f"tracing off costs < {MAX_OFF_SHARE:.1%} of a request's CPU (its checks timed / served CPU)": share is not None
        and share < MAX_OFF_SHARE,
    }


def markdown(result: dict | None) -> list[str]:
    if not result:
        return []
    lines = ["", f"## Tracing cost ({result['description']}, order on, off, off, on, in rounds)", "",
             "| tracing | req/s per run | mean req/s |", "|---|---|---|"]  # fmt: skip
    for mode in ("on", "off"):
        rates = ", ".join(str(r["rps"]) for r in result["runs"][mode])
        lines.append(f"| {mode} | {rates} | {result[f'rps_{mode}']} |")
    exported = f"{result['otlp_exports']} exports ({result['otlp_bytes']} bytes)"
    lines += ["", f"On over off: {result['on_over_off']}{rounds_note(result)}; the sink received {exported} from the "
              "server with tracing on."]  # fmt: skip
    if cpu_note(result):
        lines += ["", cpu_note(result)]
    if result.get("off_share") is not None:
        lines += ["", f"Off: the worker's tracing checks take {result['off_path_ns_per_request']} ns per request, "
                  f"{result['off_share']:.5%} of the {result['cpu_us_per_request']} µs of CPU a request had in the "
                  "off runs (all cores over req/s)."]  # fmt: skip
    return lines
