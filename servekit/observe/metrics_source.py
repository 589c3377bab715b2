"""Reading servekit's metrics: the ``/metrics`` page, two scrapes of it, or Prometheus' HTTP API.

The names and buckets are the contract in ``docs/monitoring.md``. Every way in ends as the same
``Samples``, so ``servekit top`` and ``servekit drift`` compute from one shape whatever answered:

    page = MetricsPage("http://127.0.0.1:8000/metrics")
    now = page.scrape()                                   # cumulative since the server started
    counts = now.by_label("servekit_predictions_total", "class", model="digits", version="2.0")
    hist = now.histogram("servekit_request_seconds", model="digits", version="2.0")
    hist.bins(), hist.quantile(0.99)                      # per-bin counts; seconds, as histogram_quantile

    later = page.scrape()
    delta = later.since(now)                              # counters and buckets: what happened between
    prometheus = PrometheusAPI("http://127.0.0.1:9090")
    prometheus.answers()                                  # a Prometheus API at that address?
    prometheus.query('sum by (model, version) (rate(servekit_requests_total[1m]))')

Every failure is a one-line ``MetricsError``. Nothing here imports torch.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import requests

from servekit.errors import ServekitError, one_line

__all__ = [
    "Histogram",
    "MetricsError",
    "MetricsPage",
    "PrometheusAPI",
    "Sample",
    "Samples",
    "choose_source",
    "histogram_quantile",
    "label_selector",
    "parse_exposition",
    "parse_window",
]

CUMULATIVE_KINDS = ("counter", "histogram", "summary")
SOURCES = ("auto", "prometheus", "metrics")
_WINDOW = re.compile(r"(?:\d+(?:ms|s|m|h|d|w|y))+\Z")
_WINDOW_PART = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


class MetricsError(ServekitError):
    """A metrics page or a Prometheus could not be read, or answered something unusable."""


# ------------------------------------------------------------------------------------------ samples
@dataclass(frozen=True)
class Sample:
    """One series' value; ``name`` as exposed (``servekit_requests_total``, ``..._bucket``), ``kind`` its type."""

    name: str
    labels: Mapping[str, str]
    value: float
    kind: str = "untyped"

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(self.labels.get(key) == value for key, value in labels.items())

    @property
    def key(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        return self.name, tuple(sorted(self.labels.items()))


@dataclass(frozen=True)
class Histogram:
    """A Prometheus histogram: finite ``edges`` (the ``le`` bounds) and ``cumulative`` counts, ``+Inf`` last.

    ``len(cumulative) == len(edges) + 1``. ``bins()`` takes them apart: bin i is
    ``(edges[i-1], edges[i]]`` and the last bin is above the last edge, as the drift reference stores it.
    """

    edges: tuple[float, ...]
    cumulative: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.cumulative) != len(self.edges) + 1:
            raise ValueError(f"{len(self.edges)} edges need {len(self.edges) + 1} cumulative counts")

    @classmethod
    def from_buckets(cls, buckets: Iterable[tuple[float, float]]) -> Histogram:
        """From ``(le, cumulative count)`` pairs in any order; ``+Inf`` may be missing (then the top count)."""
        ordered = sorted(buckets)
        if not ordered:
            return cls((), (0.0,))
        if not math.isinf(ordered[-1][0]):
            ordered.append((math.inf, ordered[-1][1]))
        cumulative, top = [], 0.0
        for _, count in ordered:
            top = max(top, count)  # increase() extrapolates per bucket: keep them monotonic, as Prometheus does
            cumulative.append(top)
        return cls(tuple(le for le, _ in ordered[:-1]), tuple(cumulative))

    @property
    def count(self) -> float:
        return self.cumulative[-1]

    def bins(self) -> list[float]:
        """Non-cumulative counts, ``len(edges) + 1`` of them."""
        return [now - before for before, now in zip((0.0, *self.cumulative[:-1]), self.cumulative)]

    def quantile(self, q: float) -> float | None:
        """As PromQL's ``histogram_quantile``; ``None`` when it has no observations."""
        return histogram_quantile(q, list(zip((*self.edges, math.inf), self.cumulative)))


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The ``q``-quantile of cumulative ``(le, count)`` buckets, as Prometheus computes it.

    Linear interpolation inside the bucket the rank falls in (the first bucket from 0 when its
    bound is positive); a rank in the ``+Inf`` bucket gives the highest finite bound. ``None``
    without observations or without a ``+Inf`` bucket.
    """
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    buckets = sorted(buckets)
    if len(buckets) < 2 or not math.isinf(buckets[-1][0]) or buckets[-1][1] <= 0:
        return None
    counts, top = [], 0.0
    for _, count in buckets:
        top = max(top, count)
        counts.append(top)
    rank = q * counts[-1]
    b = next(i for i, count in enumerate(counts) if count >= rank)
    if b == len(buckets) - 1:
        return buckets[-2][0]
    upper = buckets[b][0]
    if b == 0 and upper <= 0:
        return upper
    lower = 0.0 if b == 0 else buckets[b - 1][0]
    below = 0.0 if b == 0 else counts[b - 1]
    inside = counts[b] - below
    if inside <= 0:
        return upper
    return lower + (upper - lower) * (rank - below) / inside


class Samples:
    """Parsed series: from one scrape, the difference of two, or Prometheus query results.

    ``taken_at`` is ``time.monotonic()`` when the page was read (``None`` for query results).
    Label filters are keyword arguments: ``samples.value("servekit_queue_pending", model="digits")``.
    """

    def __init__(self, samples: Iterable[Sample], taken_at: float | None = None) -> None:
        self.samples = list(samples)
        self.taken_at = taken_at
        self._by_name: dict[str, list[Sample]] = {}
        for sample in self.samples:
            self._by_name.setdefault(sample.name, []).append(sample)

    def __len__(self) -> int:
        return len(self.samples)

    def names(self) -> set[str]:
        return set(self._by_name)

    def select(self, name: str, **labels: str) -> list[Sample]:
        return [s for s in self._by_name.get(name, ()) if s.matches(labels)]

    def value(self, name: str, **labels: str) -> float | None:
        """The sum over every matching series; ``None`` when none matches."""
        matched = self.select(name, **labels)
        return sum(s.value for s in matched) if matched else None

    def by_label(self, name: str, label: str, **labels: str) -> dict[str, float]:
        """Matching series summed per value of ``label`` (``servekit_requests_total`` by ``code``)."""
        totals: dict[str, float] = {}
        for sample in self.select(name, **labels):
            key = sample.labels.get(label, "")
            totals[key] = totals.get(key, 0.0) + sample.value
        return totals

    def keys(self, name: str, *labels: str) -> set[tuple[str, ...]]:
        """The distinct values of ``labels`` among ``name``'s series: ``keys(n, "model", "version")``."""
        return {tuple(s.labels.get(label, "") for label in labels) for s in self._by_name.get(name, ())}

    def histogram(self, name: str, **labels: str) -> Histogram | None:
        """``name``'s ``_bucket`` series that match, summed per ``le``; ``None`` when there are none."""
        per_le: dict[float, float] = {}
        for sample in self.select(f"{name}_bucket", **labels):
            try:
                le = float(sample.labels["le"])
            except (KeyError, ValueError):
                continue
            per_le[le] = per_le.get(le, 0.0) + sample.value
        return Histogram.from_buckets(per_le.items()) if per_le else None

    def since(self, earlier: Samples) -> Samples:
        """What the counters did between ``earlier`` and this scrape; gauges as they are now.

        A counter lower than before was reset (a restarted server): its whole value is new, as
        ``increase()`` counts it. A series absent before started from zero.
        """
        before = {s.key: s.value for s in earlier.samples}
        delta = []
        for sample in self.samples:
            value = sample.value
            if sample.kind in CUMULATIVE_KINDS and sample.key in before and value >= before[sample.key]:
                value -= before[sample.key]
            delta.append(Sample(sample.name, sample.labels, value, sample.kind))
        return Samples(delta, self.taken_at)

    def seconds_since(self, earlier: Samples) -> float | None:
        if self.taken_at is None or earlier.taken_at is None:
            return None
        return self.taken_at - earlier.taken_at


def parse_exposition(text: str, taken_at: float | None = None, where: str = "the metrics page") -> Samples:
    """Prometheus' text exposition format as ``Samples`` (``_created`` series dropped)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        samples = [
            Sample(s.name, dict(s.labels), float(s.value), family.type)
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if not s.name.endswith("_created")
        ]
    except (ValueError, TypeError, IndexError) as exc:
        raise MetricsError(f"{where} is not in Prometheus' text format: {one_line(exc, 200)}") from None
    return Samples(samples, taken_at)


# ------------------------------------------------------------------------------------------ the page
@dataclass
class MetricsPage:
    """A ``/metrics`` page (the OIP front's, by default), read on demand.

    ``auth`` gives headers for a second try when the page answers 401 or 403 (the OIP front's
    inference token); it is not asked otherwise.
    """

    url: str
    timeout: float = 5.0
    auth: Callable[[], Mapping[str, str]] | None = None
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)

    def text(self, timeout: float | None = None) -> str:
        response = self._get({}, timeout)
        if response.status_code in (401, 403) and self.auth is not None:
            try:
                headers = dict(self.auth())
            except ServekitError:
                headers = {}
            if headers:
                response = self._get(headers, timeout)
        if response.status_code != 200:
            raise MetricsError(
                f"the metrics page {self.url} answered {response.status_code} {one_line(response.text, 120)}"
            )
        return response.text

    def scrape(self, timeout: float | None = None) -> Samples:
        text = self.text(timeout)
        return parse_exposition(text, self.clock(), where=f"the page at {self.url}")

    def answers(self, timeout: float = 1.0) -> bool:
        try:
            self.text(timeout)
        except MetricsError:
            return False
        return True

    def _get(self, headers: dict[str, str], timeout: float | None) -> requests.Response:
        limit = timeout or self.timeout
        try:
            return requests.get(self.url, headers=headers, timeout=limit)
        except requests.ConnectionError:
            raise MetricsError(
                f"the metrics page {self.url} is not reachable (is make serve running? "
                "--metrics-url, SERVEKIT_METRICS_URL)"
            ) from None
        except requests.Timeout:
            raise MetricsError(f"the metrics page {self.url} did not answer within {limit:g}s") from None
        except requests.RequestException as exc:
            raise MetricsError(f"the metrics page {self.url}: {one_line(exc, 200)}") from None


# ------------------------------------------------------------------------------------------ Prometheus
@dataclass
class PrometheusAPI:
    """Instant queries to a Prometheus server's HTTP API (``GET /api/v1/query``)."""

    url: str
    timeout: float = 5.0

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")

    def query(self, promql: str, timeout: float | None = None) -> list[tuple[dict[str, str], float]]:
        """An instant vector as ``(labels, value)`` pairs (a scalar: one pair with no labels); NaN dropped."""
        limit = timeout or self.timeout
        try:
            response = requests.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=limit)
        except requests.ConnectionError:
            raise MetricsError(
                f"Prometheus is not reachable at {self.url} (--prometheus-url, SERVEKIT_PROMETHEUS_URL)"
            ) from None
        except requests.Timeout:
            raise MetricsError(f"Prometheus at {self.url} did not answer {promql!r} within {limit:g}s") from None
        except requests.RequestException as exc:
            raise MetricsError(f"Prometheus at {self.url}: {one_line(exc, 200)}") from None
        try:
            document = response.json()
        except ValueError:
            document = None
        if not isinstance(document, dict) or "status" not in document:
            raise MetricsError(
                f"{self.url} is not a Prometheus API: /api/v1/query answered {response.status_code} "
                f"{one_line(response.text, 120)}"
            )
        if document["status"] != "success":
            reason = f"{document.get('errorType', 'error')}: {document.get('error', '')}"
            raise MetricsError(f"Prometheus at {self.url} refused {promql!r}: {one_line(reason, 200)}")
        return _instant_result(document.get("data"), self.url)

    def samples(self, name: str, promql: str) -> list[Sample]:
        """``query``'s answer as samples named ``name`` (so ``Samples`` helpers read them like a scrape)."""
        return [Sample(name, labels, value, "gauge") for labels, value in self.query(promql)]

    def answers(self, timeout: float = 1.0) -> bool:
        """Whether a Prometheus API answers at ``url`` (a trivial query, ``timeout`` seconds at most)."""
        try:
            self.query("1", timeout=timeout)
        except MetricsError:
            return False
        return True

    def has(self, metric: str, timeout: float = 2.0) -> bool:
        """Whether Prometheus holds a current series of ``metric`` (it scrapes what exposes it)."""
        try:
            return bool(self.query(f"count({metric})", timeout=timeout))
        except MetricsError:
            return False


def _instant_result(data: object, url: str) -> list[tuple[dict[str, str], float]]:
    if not isinstance(data, dict):
        raise MetricsError(f"Prometheus at {url} answered without data")
    kind, result = data.get("resultType"), data.get("result")
    try:
        if kind == "scalar":
            pairs = [({}, float(result[1]))]
        elif kind == "vector":
            pairs = [(dict(item.get("metric") or {}), float(item["value"][1])) for item in result]
        else:
            raise MetricsError(f"Prometheus at {url} answered a {kind} where an instant vector was asked")
    except (TypeError, KeyError, IndexError, ValueError):
        raise MetricsError(f"Prometheus at {url} answered a malformed {kind}") from None
    return [(labels, value) for labels, value in pairs if not math.isnan(value)]


def label_selector(**labels: str | None) -> str:
    """``{model="digits",version="2.0"}`` for the labels that are not ``None`` (``""`` when none)."""
    parts = [f'{key}="{_escape(value)}"' for key, value in labels.items() if value is not None]
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def parse_window(window: str) -> float:
    """Seconds in a Prometheus duration (``15m``, ``1h30m``); a one-line error when it is not one."""
    if not _WINDOW.match(window or ""):
        raise MetricsError(f"{window!r} is not a Prometheus duration (e.g. 30s, 15m, 1h)")
    return sum(int(n) * _UNIT_SECONDS[unit] for n, unit in _WINDOW_PART.findall(window))


# ------------------------------------------------------------------------------------------ which source
EXPORTER_UP = "servekit_exporter_up"


def choose_source(requested: str, prometheus: PrometheusAPI, page: MetricsPage) -> tuple[str, str | None]:
    """``("prometheus" | "metrics", note)`` for ``--source`` ``auto``, ``prometheus`` or ``metrics``.

    ``auto``: Prometheus when it answers and holds servekit's series, else the metrics page; an
    error naming both when neither answers. The note says why auto did not take Prometheus.
    """
    if requested not in SOURCES:
        raise MetricsError(f"unknown source {requested!r} (valid: {', '.join(SOURCES)})")
    if requested == "prometheus":
        prometheus.query("1")  # a one-line error when it does not answer
        return "prometheus", None
    if requested == "metrics":
        return "metrics", None
    note = None
    if prometheus.answers():
        if prometheus.has(EXPORTER_UP):
            return "prometheus", None
        note = f"Prometheus at {prometheus.url} holds no servekit series: read {page.url} instead"
    try:
        page.text()
    except MetricsError as exc:
        where = "holds no servekit series" if note else "does not answer"
        raise MetricsError(f"no metrics to read: Prometheus at {prometheus.url} {where}, and {exc}") from None
    return "metrics", note
