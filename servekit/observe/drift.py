"""Drift of one model version: live distributions against the archive's reference, as PSI per signal.

The reference is ``drift_reference`` in the archive's ``metadata.json`` (written by the build from
the held-out set), the thresholds its ``monitoring`` block; the format and the verdicts are in
``docs/monitoring.md``. Three signals are judged: the top-1 classes
(``servekit_predictions_total``), the top-1 confidence (``servekit_confidence``) and the input
brightness (``servekit_input_brightness``). Image size (``servekit_input_megapixels``) is shown,
live against reference median bin, but not judged: the held-out set is rendered at one size.

    reference = load_reference(Path("model_store"), "digits", "2.0")
    live = live_distributions(MetricsPage(url).scrape(), "digits", "2.0")
    report = compare(reference, live)          # {"verdict": "stable", "signals": {...}, ...}
    print(format_report(report))

``run_drift`` is ``servekit drift``: it picks the source (Prometheus' ``increase()`` over a window,
or the metrics page: cumulative, or the delta of two scrapes), resolves the default version, and
returns the report. Nothing here imports torch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from servekit.errors import ServekitError
from servekit.observe.metrics_source import (
    Histogram,
    MetricsError,
    MetricsPage,
    PrometheusAPI,
    Samples,
    choose_source,
    label_selector,
    parse_window,
)

__all__ = [
    "DriftError",
    "LiveDistributions",
    "Reference",
    "ReferenceCache",
    "chi_square",
    "compare",
    "format_report",
    "live_distributions",
    "load_reference",
    "parse_reference",
    "prometheus_drift_samples",
    "psi",
    "run_drift",
    "verdict",
]

SHARE_FLOOR = 1e-4
STABLE_BELOW = 0.1
DEFAULT_THRESHOLD = 0.25
DEFAULT_MIN_SAMPLES = 100
DEFAULT_WINDOW = "15m"
INSUFFICIENT, STABLE, MODERATE, DRIFT = "insufficient data", "stable", "moderate", "drift"
SEVERITY = {INSUFFICIENT: 0, STABLE: 1, MODERATE: 2, DRIFT: 3}
PREDICTIONS = "servekit_predictions_total"
# signal -> histogram metric; "megapixels" is shown, never judged
HISTOGRAMS = {
    "confidence": "servekit_confidence",
    "brightness": "servekit_input_brightness",
    "megapixels": "servekit_input_megapixels",
}
JUDGED = ("classes", "confidence", "brightness")
SIZE_NOTE = (
    "image size is informational, not part of the verdict: the held-out set is rendered at one size, "
    "so its reference says little about what clients send"
)


class DriftError(ServekitError):
    """No usable reference, or live buckets that do not match it."""


# ------------------------------------------------------------------------------------------ the math
def shares(counts: Sequence[float]) -> list[float]:
    total = sum(counts)
    return [c / total for c in counts] if total > 0 else [0.0] * len(counts)


def psi(live: Sequence[float], reference: Sequence[float], floor: float = SHARE_FLOOR) -> float | None:
    """Population stability index of two distributions over the same bins (counts or shares).

    ``sum((p - q) * ln(p / q))`` over the shares ``p`` (live) and ``q`` (reference), each floored
    at ``floor`` so an empty bin does not make it infinite; ``None`` when either side is empty.
    """
    if len(live) != len(reference):
        raise ValueError(f"PSI needs the same bins on both sides ({len(live)} live, {len(reference)} reference)")
    if sum(live) <= 0 or sum(reference) <= 0:
        return None
    total = 0.0
    for p, q in zip(shares(live), shares(reference)):
        p, q = max(p, floor), max(q, floor)
        total += (p - q) * math.log(p / q)
    return total


@dataclass(frozen=True)
class ChiSquare:
    statistic: float
    dof: int
    p_value: float

    def as_dict(self) -> dict:
        return {"statistic": round(self.statistic, 4), "dof": self.dof, "p_value": _round_p(self.p_value)}


def chi_square(
    live_counts: Sequence[float], reference: Sequence[float], floor: float = SHARE_FLOOR
) -> ChiSquare | None:
    """Pearson's goodness of fit of live counts to the reference shares (floored like PSI's); ``None`` without data.

    An extra figure beside PSI: with thousands of live inputs even a harmless shift gets a tiny p-value.
    """
    n = sum(live_counts)
    if n <= 0 or sum(reference) <= 0 or len(live_counts) < 2:
        return None
    expected = [n * max(q, floor) for q in shares(reference)]
    statistic = sum((o - e) ** 2 / e for o, e in zip(live_counts, expected))
    dof = len(live_counts) - 1
    return ChiSquare(statistic, dof, chi_square_sf(statistic, dof))


def chi_square_sf(x: float, dof: int) -> float:
    """P(X >= x) for a chi-square variable with ``dof`` degrees of freedom (the upper regularized gamma)."""
    if x <= 0:
        return 1.0
    return _gamma_q(dof / 2.0, x / 2.0)


def _gamma_q(a: float, x: float) -> float:
    log_prefix = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:  # the series of P converges fast here
        term = total = 1.0 / a
        ap = a
        for _ in range(10_000):
            ap += 1
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(log_prefix))
    tiny = 1e-300  # Lentz's continued fraction for Q
    b = x + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return min(1.0, math.exp(log_prefix) * h)


def _round_p(p: float) -> float:
    return float(f"{p:.3g}")


def verdict(value: float | None, samples: float, threshold: float, min_samples: int) -> str:
    """``insufficient data`` under ``min_samples`` live inputs, else ``stable`` / ``moderate`` / ``drift``."""
    if value is None or samples < max(min_samples, 1):
        return INSUFFICIENT
    if value >= threshold:
        return DRIFT
    return MODERATE if value >= STABLE_BELOW else STABLE


def overall(verdicts: Sequence[str]) -> str:
    """The worst verdict among the signals that have enough data (``insufficient data`` when none has)."""
    return max(verdicts, key=SEVERITY.__getitem__, default=INSUFFICIENT)


# ------------------------------------------------------------------------------------------ the reference
@dataclass(frozen=True)
class Reference:
    """An archive's drift reference and monitoring thresholds."""

    model: str
    version: str
    source: str
    samples: int
    classes: Mapping[str, float]
    histograms: Mapping[str, tuple[tuple[float, ...], tuple[float, ...]]]  # signal -> (edges, counts)
    threshold: float = DEFAULT_THRESHOLD
    min_samples: int = DEFAULT_MIN_SAMPLES


def parse_reference(metadata: Mapping, model: str, version: str) -> Reference:
    """The ``drift_reference`` and ``monitoring`` blocks of an archive's ``metadata.json``, checked."""
    where = f"{model} {version}"
    block = metadata.get("drift_reference")
    if not block:
        raise DriftError(
            f"{where}: the archive has no drift reference (drift_reference in metadata.json); "
            "rebuild it with an evaluation set (make archive)"
        )
    if not isinstance(block, Mapping):
        raise DriftError(f"{where}: drift_reference in metadata.json is not an object")
    classes = block.get("classes")
    if not isinstance(classes, Mapping) or not classes:
        raise DriftError(f"{where}: drift_reference.classes must map every label to its share")
    try:
        class_shares = {str(label): float(share) for label, share in classes.items()}
    except (TypeError, ValueError):
        raise DriftError(f"{where}: drift_reference.classes holds a share that is not a number") from None
    histograms = {}
    for signal in HISTOGRAMS:
        entry = block.get(signal)
        if entry is None:
            continue
        try:
            edges = tuple(float(e) for e in entry["edges"])
            counts = tuple(float(c) for c in entry["counts"])
        except (TypeError, KeyError, ValueError):
            raise DriftError(f"{where}: drift_reference.{signal} needs numeric 'edges' and 'counts'") from None
        if len(counts) != len(edges) + 1:
            raise DriftError(
                f"{where}: drift_reference.{signal} has {len(counts)} counts for {len(edges)} edges "
                f"(need {len(edges) + 1}: one per bin and one above the last edge)"
            )
        histograms[signal] = (edges, counts)
    monitoring = metadata.get("monitoring") or {}
    try:
        threshold = float(monitoring.get("drift_threshold", DEFAULT_THRESHOLD))
        min_samples = int(monitoring.get("drift_min_samples", DEFAULT_MIN_SAMPLES))
        samples = int(block.get("samples", 0))
    except (TypeError, ValueError):
        raise DriftError(f"{where}: monitoring.drift_threshold / drift_min_samples are not numbers") from None
    return Reference(model, version, str(block.get("source", "")), samples, class_shares, histograms,
                     threshold, min_samples)  # fmt: skip


def load_reference(store: Path, model: str, version: str) -> Reference:
    """The reference in ``store``'s archive of ``model`` ``version`` (sha256 checked against the manifest)."""
    from servekit.serving.oip import read_archive_metadata
    from servekit.serving.store import archive_name, verify_archive

    path = verify_archive(Path(store), archive_name(model, version))
    return parse_reference(read_archive_metadata(path), model, version)


class ReferenceCache:
    """References by (model, version), read once per archive file (``servekit top`` asks every frame).

    ``get`` returns ``None`` for a version without a usable reference; ``errors`` says why.
    """

    def __init__(self, store: Path) -> None:
        self.store = Path(store)
        self._cache: dict[tuple[str, str], tuple[tuple[float, int], Reference | None]] = {}
        self.errors: dict[tuple[str, str], str] = {}

    def get(self, model: str, version: str) -> Reference | None:
        from servekit.serving.store import archive_name

        path = self.store / archive_name(model, version)
        try:
            stat = path.stat()
            stamp = (stat.st_mtime, stat.st_size)
        except OSError:
            stamp = (0.0, -1)
        cached = self._cache.get((model, version))
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            reference: Reference | None = load_reference(self.store, model, version)
            self.errors.pop((model, version), None)
        except ServekitError as exc:
            reference = None
            self.errors[(model, version)] = str(exc)
        self._cache[(model, version)] = (stamp, reference)
        return reference


# ------------------------------------------------------------------------------------------ live
@dataclass(frozen=True)
class LiveDistributions:
    """What one version answered: top-1 counts per class, and the histograms (``None``: no series)."""

    classes: Mapping[str, float]
    histograms: Mapping[str, Histogram | None]

    @property
    def inputs(self) -> float:
        return sum(self.classes.values())


def live_distributions(samples: Samples, model: str, version: str) -> LiveDistributions:
    labels = {"model": model, "version": version}
    return LiveDistributions(
        samples.by_label(PREDICTIONS, "class", **labels),
        {signal: samples.histogram(metric, **labels) for signal, metric in HISTOGRAMS.items()},
    )


def prometheus_drift_samples(
    prometheus: PrometheusAPI, window: str, model: str | None = None, version: str | None = None
) -> Samples:
    """``increase()`` over ``window`` of every series drift reads, as ``Samples`` (``model=None``: all models)."""
    parse_window(window)
    selector = label_selector(model=model, version=version)
    samples = prometheus.samples(
        PREDICTIONS, f"sum by (model, version, class) (increase({PREDICTIONS}{selector}[{window}]))"
    )
    for metric in HISTOGRAMS.values():
        samples += prometheus.samples(
            f"{metric}_bucket", f"sum by (model, version, le) (increase({metric}_bucket{selector}[{window}]))"
        )
    return Samples(samples)


# ------------------------------------------------------------------------------------------ the comparison
def class_order(labels: Sequence[str]) -> list[str]:
    return sorted(labels, key=lambda label: (0, int(label), "") if label.isdigit() else (1, 0, label))


def compare(reference: Reference, live: LiveDistributions) -> dict:
    """The drift report of ``live`` against ``reference`` (JSON-able; ``format_report`` prints it)."""
    signals: dict[str, dict] = {}
    labels = class_order(list(reference.classes) + [c for c in live.classes if c not in reference.classes])
    live_counts = [live.classes.get(label, 0.0) for label in labels]
    reference_shares = [reference.classes.get(label, 0.0) for label in labels]
    signals["classes"] = _signal(reference, labels, live_counts, reference_shares)
    for signal in ("confidence", "brightness"):
        if signal not in reference.histograms:
            continue
        edges, counts = reference.histograms[signal]
        live_counts = _live_bins(reference, signal, edges, live.histograms.get(signal))
        signals[signal] = _signal(reference, bin_labels(edges), live_counts, list(counts))
    verdicts = [s["verdict"] for s in signals.values()]
    result = overall([v for v in verdicts if v != INSUFFICIENT])
    report = {
        "model": reference.model,
        "version": reference.version,
        "verdict": result,
        "reason": _reason(result, signals, reference),
        "live_inputs": _number(live.inputs),
        "reference": {"source": reference.source, "samples": reference.samples},
        "thresholds": {
            "stable_below": STABLE_BELOW,
            "drift_at": reference.threshold,
            "min_samples": reference.min_samples,
        },
        "signals": signals,
        "notes": [],
    }
    if "megapixels" in reference.histograms:
        edges, counts = reference.histograms["megapixels"]
        live_counts = _live_bins(reference, "megapixels", edges, live.histograms.get("megapixels"))
        report["image_size"] = {
            "informational": True,
            "samples": _number(sum(live_counts)),
            "live_median_bin": median_bin(edges, live_counts, "MP"),
            "reference_median_bin": median_bin(edges, counts, "MP"),
        }
        report["notes"].append(SIZE_NOTE)
    return report


def _signal(reference: Reference, labels: list[str], live: list[float], ref: list[float]) -> dict:
    value = psi(live, ref)
    samples = sum(live)
    fit = chi_square(live, ref)
    return {
        "psi": None if value is None else round(value, 4),
        "verdict": verdict(value, samples, reference.threshold, reference.min_samples),
        "samples": _number(samples),
        "chi_square": fit.as_dict() if fit else None,
        "bins": labels,
        "live": [round(s, 4) for s in shares(live)],
        "reference": [round(s, 4) for s in shares(ref)],
    }


def _live_bins(reference: Reference, signal: str, edges: tuple[float, ...], live: Histogram | None) -> list[float]:
    if live is None or live.count <= 0:
        return [0.0] * (len(edges) + 1)
    same = len(live.edges) == len(edges) and all(math.isclose(a, b) for a, b in zip(live.edges, edges))
    if not same:
        raise DriftError(
            f"{reference.model} {reference.version}: the live {HISTOGRAMS[signal]} buckets "
            f"({', '.join(f'{e:g}' for e in live.edges)}) are not the reference's edges "
            f"({', '.join(f'{e:g}' for e in edges)}); rebuild the archive or align handlers/metrics.py"
        )
    return live.bins()


def bin_labels(edges: Sequence[float], unit: str = "") -> list[str]:
    """``<= e0``, ``(e0, e1]``, ..., ``> en``: the bins of ``edges`` as the doc defines them."""
    suffix = f" {unit}" if unit else ""
    if not edges:
        return [f"all{suffix}"]
    inner = [f"({a:g}, {b:g}]{suffix}" for a, b in zip(edges, edges[1:])]
    return [f"<= {edges[0]:g}{suffix}", *inner, f"> {edges[-1]:g}{suffix}"]


def median_bin(edges: Sequence[float], counts: Sequence[float], unit: str = "") -> str | None:
    """The label of the bin holding the median (``None`` without counts)."""
    total = sum(counts)
    if total <= 0:
        return None
    running = 0.0
    for label, count in zip(bin_labels(edges, unit), counts):
        running += count
        if running >= total / 2:
            return label
    return bin_labels(edges, unit)[-1]


def _reason(result: str, signals: Mapping[str, dict], reference: Reference) -> str:
    if result == INSUFFICIENT:
        most = max((s["samples"] for s in signals.values()), default=0)
        return f"{_count(most)} live inputs, fewer than the {reference.min_samples} a verdict needs"
    name, worst = max(((n, s) for n, s in signals.items() if s["verdict"] == result), key=lambda item: item[1]["psi"])
    if result == DRIFT:
        return f"{name} PSI {worst['psi']:.3f} >= {reference.threshold:g}"
    if result == MODERATE:
        return f"{name} PSI {worst['psi']:.3f} >= {STABLE_BELOW:g}, under {reference.threshold:g}"
    return f"every signal's PSI under {STABLE_BELOW:g} (highest: {name} {worst['psi']:.3f})"


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else round(value, 2)


def _count(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() or value >= 100 else f"{value:,.1f}"


# ------------------------------------------------------------------------------------------ printing
def format_report(report: Mapping) -> str:
    """The report for a person: headline, where the numbers come from, one line per signal."""
    live, reference = report.get("source") or {}, report["reference"]
    lines = [
        f"{report['model']} {report['version']}: {report['verdict']} ({report['reason']})",
        f"live:      {_count(report['live_inputs'])} inputs" + (f", {live['description']}" if live else ""),
        f"reference: {reference['source'] or 'held-out set'}, {_count(reference['samples'])} inputs",
    ]
    header = ("SIGNAL", "PSI", "VERDICT", "INPUTS", "CHI-SQUARE (DOF, P)")
    rows = [header]
    for name, signal in report["signals"].items():
        fit = signal["chi_square"]
        rows.append((
            name,
            "-" if signal["psi"] is None else f"{signal['psi']:.3f}",
            signal["verdict"],
            _count(signal["samples"]),
            "-" if fit is None else f"{fit['statistic']:.1f} ({fit['dof']}, {_format_p(fit['p_value'])})",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    size = report.get("image_size")
    if size:
        lines.append(
            f"image size: live median {size['live_median_bin'] or '-'}, reference median "
            f"{size['reference_median_bin'] or '-'} (informational, {_count(size['samples'])} inputs)"
        )
    t = report["thresholds"]
    lines.append(
        f"PSI: stable under {t['stable_below']:g}, moderate from {t['stable_below']:g}, drift at {t['drift_at']:g} "
        f"or over; a verdict needs at least {t['min_samples']} live inputs"
    )
    lines += [f"note: {note}" for note in report.get("notes", [])]
    return "\n".join(lines)


def _format_p(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


# ------------------------------------------------------------------------------------------ servekit drift
def default_version_from(samples: Samples | None, prometheus: PrometheusAPI | None, model: str) -> str | None:
    """The version ``servekit_default_version`` marks for ``model`` (the exporter's gauge), if it is there."""
    if prometheus is not None:
        found = prometheus.query(f"servekit_default_version{label_selector(model=model)} == 1")
        versions = [labels.get("version") for labels, _ in found]
    elif samples is not None:
        versions = [s.labels.get("version") for s in samples.select("servekit_default_version", model=model)
                    if s.value == 1]  # fmt: skip
    else:
        return None
    versions = [v for v in versions if v]
    return versions[0] if len(set(versions)) == 1 else None


def require_servekit(samples: Samples, url: str) -> None:
    if not any(name.startswith("servekit_") for name in samples.names()):
        raise MetricsError(
            f"the page at {url} has no servekit series (is it the OIP front's /metrics? --metrics-url, "
            "SERVEKIT_METRICS_URL)"
        )


def run_drift(
    model: str,
    version: str | None,
    *,
    store: Path,
    page: MetricsPage,
    prometheus: PrometheusAPI,
    source: str = "auto",
    window: str | None = None,
    seconds: float | None = None,
    management_default: Callable[[str], str] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict:
    """``servekit drift``: the report of ``model`` ``version`` (the default version when ``None``).

    ``seconds``: the delta of two scrapes of the metrics page that far apart (the metrics page,
    also under ``auto``); else Prometheus' ``increase()`` over ``window`` (default 15m), or the
    metrics page's counts since the server started when Prometheus does not answer.
    """
    if seconds is not None and window is not None:
        raise DriftError("--window is Prometheus' range and --seconds two scrapes of the metrics page: pick one")
    if seconds is not None:
        if not seconds > 0:
            raise DriftError(f"--seconds must be positive, got {seconds:g}")
        if source == "prometheus":
            raise DriftError("--seconds scrapes the metrics page twice; with --source prometheus use --window")
        source = "metrics"
    if window is not None and source == "metrics":
        raise DriftError("--window is a Prometheus range; the metrics page takes --seconds N")
    if window is not None:
        parse_window(window)
    reference = load_reference(store, model, version) if version else None  # no reference: fail before waiting
    chosen, note = choose_source(source, prometheus, page)
    first = None
    if chosen == "metrics":
        first = page.scrape()
        require_servekit(first, page.url)
    if version is None:
        version = default_version_from(first, prometheus if chosen == "prometheus" else None, model)
        if version is None:
            if management_default is None:
                raise DriftError(f"no default version of {model} in the metrics: name the version")
            version = management_default(model)
        reference = load_reference(store, model, version)
    assert reference is not None
    if chosen == "prometheus":
        span = window or DEFAULT_WINDOW
        samples = prometheus_drift_samples(prometheus, span, model, version)
        described = {"kind": "prometheus", "address": prometheus.url, "window": span,
                     "description": f"increase over {span} from Prometheus {prometheus.url}"}  # fmt: skip
    elif seconds is not None:
        sleep(seconds)
        samples = page.scrape().since(first)
        described = {"kind": "metrics", "address": page.url, "seconds": seconds,
                     "description": f"the last {seconds:g} s (two scrapes of {page.url})"}  # fmt: skip
    else:
        samples = first
        described = {"kind": "metrics", "address": page.url, "since_start": True,
                     "description": f"since the server started ({page.url})"}  # fmt: skip
    report = compare(reference, live_distributions(samples, model, version))
    report["source"] = described
    if note:
        report["notes"].insert(0, note)
    return report
