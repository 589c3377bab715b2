"""Where a step window's figures come from: the proxy's request log, the metrics page, Prometheus.

``--source`` picks one (``select_source``); every source gives one ``Window`` per poll (``Figures``
for the canary and for the default, and the canary's top-1 classes), and the same ``analyse``
(``servekit.deploy.rollout.judging``) judges it:

* ``metrics``: the handler metrics on the OIP front's ``/metrics`` page (``docs/monitoring.md``),
  scraped at the step's start and at each poll; the window is the difference. Per side, from the
  series of that side's real version: requests and non-2xx errors from ``servekit_requests_total``,
  p99 from the ``servekit_request_seconds`` buckets (interpolated inside the bucket, as
  ``histogram_quantile``), classes from ``servekit_predictions_total``. The default side is the
  version TorchServe's default route answers with (the handler labels its answers with the real
  version, never ``default``).
* ``prometheus``: the same series as ``increase(...[Ns])`` over the step's elapsed seconds, rounded
  up; Prometheus scrapes every few seconds, so its window lags by up to a scrape interval and
  ``increase`` extrapolates (figures need not be whole numbers: they are rounded).
* ``proxy-log``: the proxy's request log (``servekit.deploy.proxy``: one JSON line per request with
  ``msec``, ``uri``, ``status``, ``request_time``, ``target``, the version the split chose, empty
  for the default, and ``served``, the version that answered); every inference path the proxy routes
  counts: ``/predictions/NAME``, OIP ``/v2/models/NAME/infer`` and KServe ``/v1/models/NAME:predict``,
  which is where the OIP front and the gRPC gateway send their inference when the proxy runs. p99 by
  nearest rank of ``request_time``. No classes: no drift gate.
* ``auto`` (the default): Prometheus when it answers and holds servekit's series, else the metrics
  page when it has servekit's series, else the proxy log (the reason is printed and recorded).

What they count differs. The handler metrics count every request a version answers: golden set
checks, direct ``/predictions/NAME/VERSION`` calls and clients that bypass the proxy too, and their
latency is the handler's (decode to encoded answer, not TorchServe's queue). The proxy log counts
only requests through the proxy (every protocol: HTTP clients of ``/predictions``, and OIP HTTP, KServe
v1 and gRPC clients through the OIP front), timed by nginx end to end.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from servekit.deploy.proxy import ROUTED_PATHS
from servekit.deploy.rollout.judging import Figures, Window, p99
from servekit.deploy.workflows import DeployError
from servekit.observe.drift import PREDICTIONS, require_servekit
from servekit.observe.metrics_source import (
    EXPORTER_UP,
    MetricsError,
    MetricsPage,
    PrometheusAPI,
    Samples,
    choose_source,
    label_selector,
)
from servekit.serving.logkeeper import LogFollower

SOURCES = ("auto", "prometheus", "metrics", "proxy-log")
REQUESTS = "servekit_requests_total"
REQUEST_SECONDS = "servekit_request_seconds"


@dataclass(frozen=True)
class LogRecord:
    time: float  # epoch seconds, when nginx finished the request
    uri: str
    status: int
    seconds: float  # request_time
    target: str  # "/VERSION" the split chose; "" = TorchServe's default
    served: str = ""  # the version that answered (its X-Model-Version); "" when unknown (older log lines)

    @classmethod
    def parse(cls, line: bytes) -> LogRecord | None:
        """One line of the proxy's log, or None for a line that is not one (cut, hand-edited)."""
        try:
            data = json.loads(line)
            return cls(float(data["msec"]), str(data["uri"]), int(data["status"]),
                       float(data["request_time"]), str(data["target"]), str(data.get("served", "")))  # fmt: skip
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


class RequestLog(LogFollower):
    """Reads the proxy's JSON-lines request log incrementally, from where it was when ``start`` was called,
    across the log keeper's rotations (``servekit.serving.logkeeper.LogFollower``), as ``LogRecord``s."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, LogRecord.parse)

    def records(self, since: float, until: float) -> list[LogRecord]:
        """The requests finished in ``[since, until]``; older ones are forgotten (windows only move forward)."""
        self._read_new()
        self._records = [r for r in self._records if r.time >= since]
        return [r for r in self._records if r.time <= until]


def log_figures(records: list[LogRecord]) -> Figures:
    """Requests, non-2xx answers and p99 (nearest rank of ``request_time``) of proxy log records."""
    latency = p99([r.seconds for r in records])
    return Figures(
        requests=len(records),
        errors=sum(1 for r in records if not 200 <= r.status < 300),
        p99_ms=round(latency * 1000, 1) if latency is not None else None,
    )


def routed_uris(model: str) -> dict[str, str]:
    """``model``'s inference paths the proxy splits, each with its protocol (``servekit.deploy.proxy.ROUTED_PATHS``)."""
    return {form.format(name=model): protocol for protocol, form in ROUTED_PATHS}


def log_window(records: list[LogRecord], model: str, version: str) -> Window:
    """The canary's (split target ``/version``) and the default's share of ``model``'s traffic in the log, every
    protocol together (``/predictions/model``, ``/v2/models/model/infer``, ``/v1/models/model:predict``)."""
    uris = routed_uris(model)
    mine = [r for r in records if r.uri in uris]
    return Window(
        log_figures([r for r in mine if r.target == f"/{version}"]),
        log_figures([r for r in mine if r.target == ""]),
    )


def _is_success(code: str) -> bool:
    try:
        return 200 <= int(code) < 300
    except ValueError:
        return False


def metric_figures(samples: Samples, model: str, version: str) -> Figures:
    """``version``'s requests, non-2xx answers and p99 in ``samples`` (deltas of the handler metrics)."""
    codes = samples.by_label(REQUESTS, "code", model=model, version=version)
    histogram = samples.histogram(REQUEST_SECONDS, model=model, version=version)
    latency = histogram.quantile(0.99) if histogram is not None else None
    return Figures(
        requests=round(sum(codes.values())),
        errors=round(sum(n for code, n in codes.items() if not _is_success(code))),
        p99_ms=round(latency * 1000, 1) if latency is not None else None,
    )


def metrics_window(samples: Samples, model: str, version: str, default: str) -> Window:
    """The canary ``version`` against the ``default`` version, from handler-metric deltas."""
    return Window(
        metric_figures(samples, model, version),
        metric_figures(samples, model, default),
        samples.by_label(PREDICTIONS, "class", model=model, version=version),
    )


class FigureSource(Protocol):
    """Where a step window's figures come from: ``begin`` once, ``start_step`` per step, ``window`` per poll."""

    name: str

    def begin(self, model: str, version: str, default: str) -> None: ...

    def start_step(self, at: float) -> None: ...

    def window(self, since: float, now: float) -> Window: ...


class ProxyLogSource:
    """The proxy's request log (a ``RequestLog``, or anything with ``start`` and ``records``)."""

    name = "proxy-log"

    def __init__(self, log: RequestLog) -> None:
        self.log = log
        self._who = ("", "")

    def begin(self, model: str, version: str, default: str) -> None:
        self._who = (model, version)
        self.log.start()  # what was logged before the rollout never counts

    def start_step(self, at: float) -> None:
        pass  # the window is a time range of the log

    def window(self, since: float, now: float) -> Window:
        return log_window(self.log.records(since, now), *self._who)


class MetricsPageSource:
    """The handler metrics page, scraped at each step's start and at each poll: the window is the difference."""

    name = "metrics"

    def __init__(self, page: MetricsPage) -> None:
        self.page = page
        self._who = ("", "", "")
        self._base: Samples | None = None

    def begin(self, model: str, version: str, default: str) -> None:
        self._who = (model, version, default)

    def start_step(self, at: float) -> None:
        self._base = self.page.scrape()

    def window(self, since: float, now: float) -> Window:
        if self._base is None:
            raise MetricsError("internal: the metrics page was not scraped at the step's start")
        return metrics_window(self.page.scrape().since(self._base), *self._who)


class PrometheusSource:
    """Prometheus' ``increase()`` over the step's elapsed seconds (rounded up) of the same handler series."""

    name = "prometheus"

    def __init__(self, prometheus: PrometheusAPI) -> None:
        self.prometheus = prometheus
        self._who = ("", "", "")

    def begin(self, model: str, version: str, default: str) -> None:
        self._who = (model, version, default)

    def start_step(self, at: float) -> None:
        pass  # the window is a range Prometheus already holds

    def window(self, since: float, now: float) -> Window:
        model, version, default = self._who
        span = f"{max(1, math.ceil(now - since))}s"
        selector = label_selector(model=model)
        ask = self.prometheus.samples
        found = ask(REQUESTS, f"sum by (model, version, code) (increase({REQUESTS}{selector}[{span}]))")
        found += ask(f"{REQUEST_SECONDS}_bucket",
                     f"sum by (model, version, le) (increase({REQUEST_SECONDS}_bucket{selector}[{span}]))")  # fmt: skip
        canary = label_selector(model=model, version=version)
        found += ask(PREDICTIONS, f"sum by (model, version, class) (increase({PREDICTIONS}{canary}[{span}]))")
        return metrics_window(Samples(found), model, version, default)


def select_source(
    requested: str, *, page: MetricsPage, prometheus: PrometheusAPI, request_log: RequestLog
) -> tuple[FigureSource, str | None]:
    """The source ``--source`` names (``auto``: see the module docstring), and a note when auto fell back.

    ``prometheus`` and ``metrics`` must answer with servekit's series now (one-line error otherwise);
    ``auto`` ends at the proxy log when neither does, and the note says why.
    """
    if requested not in SOURCES:
        raise DeployError(f"--source must be one of {', '.join(SOURCES)}, got {requested!r}")
    if requested == "proxy-log":
        return ProxyLogSource(request_log), None
    if requested == "prometheus":
        choose_source("prometheus", prometheus, page)  # a one-line error when it does not answer
        if not prometheus.has(EXPORTER_UP):
            raise MetricsError(
                f"Prometheus at {prometheus.url} holds no servekit series ({EXPORTER_UP}): is it scraping the "
                "OIP front's /metrics (make monitor)?"
            )
        return PrometheusSource(prometheus), None
    if requested == "metrics":
        require_servekit(page.scrape(), page.url)
        return MetricsPageSource(page), None
    try:
        chosen, note = choose_source("auto", prometheus, page)
        if chosen == "prometheus":
            return PrometheusSource(prometheus), None
        require_servekit(page.scrape(), page.url)
        return MetricsPageSource(page), note
    except MetricsError as exc:
        return ProxyLogSource(request_log), f"{exc}: judging from the proxy's request log"
