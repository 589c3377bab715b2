"""``servekit drift`` and what it reads: PSI, bins from cumulative buckets, quantiles, the reference, the sources.

Everything against fakes on 127.0.0.1 (``tests.fake_metrics``): a metrics page made by
prometheus_client, a Prometheus API answering canned queries, a store with a real zip archive.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from servekit.cli import main
from servekit.observe.drift import (
    DriftError,
    ReferenceCache,
    bin_labels,
    chi_square,
    chi_square_sf,
    compare,
    format_report,
    live_distributions,
    load_reference,
    median_bin,
    overall,
    parse_reference,
    psi,
    run_drift,
    verdict,
)
from servekit.observe.metrics_source import (
    Histogram,
    MetricsError,
    MetricsPage,
    PrometheusAPI,
    Sample,
    Samples,
    choose_source,
    histogram_quantile,
    label_selector,
    parse_exposition,
    parse_window,
)
from servekit.serving.server import free_port
from servekit.serving.store import IntegrityError
from tests.fake_metrics import (
    BRIGHTNESS_EDGES,
    CLASSES,
    CONFIDENCE_EDGES,
    SCALAR_ONE,
    FakeMetricsServer,
    Traffic,
    exposition,
    prometheus_of,
    reference_block,
    values_for,
    vector,
    write_store,
)
from tests.fake_server import serving

# A version that answers "7" for everything, unsure and in the dark: the classes drift, so does the rest.
DRIFTED = Traffic(
    classes={"7": 300},
    confidence=values_for(CONFIDENCE_EDGES, [0, 0, 100, 100, 100, 0, 0, 0, 0, 0, 0, 0]),
    brightness=values_for(BRIGHTNESS_EDGES, [300, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
)


def closed_url(path: str = "") -> str:
    return f"http://127.0.0.1:{free_port()}{path}"


# ------------------------------------------------------------------------------------------ PSI
def test_psi_of_identical_distributions_is_zero_whatever_the_scale() -> None:
    assert psi([50, 50], [0.5, 0.5]) == 0.0
    assert psi([1, 2, 3], [10, 20, 30]) == pytest.approx(0.0, abs=1e-15)


def test_psi_known_values() -> None:
    # (0.6 - 0.5) ln(0.6/0.5) + (0.4 - 0.5) ln(0.4/0.5)
    assert psi([60, 40], [50, 50]) == pytest.approx(0.1 * math.log(1.2) + 0.1 * math.log(1.25))
    assert psi([60, 40], [50, 50]) == pytest.approx(0.040546, abs=1e-6)
    # an empty live bin is floored at 1e-4 on both sides, not infinite
    assert psi([1, 0], [0.5, 0.5]) == pytest.approx(0.5 * math.log(2) + (0.5 - 1e-4) * math.log(0.5 / 1e-4))
    assert psi([1, 0], [0.5, 0.5]) == pytest.approx(4.604319, abs=1e-6)
    assert psi([0, 1], [1, 0]) == pytest.approx(2 * (1 - 1e-4) * math.log(1 / 1e-4))


def test_psi_without_data_or_with_other_bins() -> None:
    assert psi([0, 0], [0.5, 0.5]) is None
    assert psi([1, 1], [0, 0]) is None
    with pytest.raises(ValueError, match="same bins"):
        psi([1, 2], [1, 2, 3])


def test_chi_square_statistic_dof_and_p_value() -> None:
    fit = chi_square([60, 40], [0.5, 0.5])
    assert (fit.statistic, fit.dof) == (pytest.approx(4.0), 1)
    assert fit.p_value == pytest.approx(0.0455, abs=1e-4)
    assert chi_square([0, 0], [0.5, 0.5]) is None
    assert chi_square_sf(3.841459, 1) == pytest.approx(0.05, abs=1e-6)
    assert chi_square_sf(5.0, 2) == pytest.approx(math.exp(-2.5))  # dof 2: exp(-x/2)
    assert chi_square_sf(40.0, 9) == pytest.approx(7.5e-6, rel=0.05)  # continued-fraction branch
    assert chi_square_sf(0.0, 3) == 1.0


@pytest.mark.parametrize(
    ("value", "samples", "expected"),
    [
        (0.0, 100, "stable"),
        (0.0999, 100, "stable"),
        (0.1, 100, "moderate"),
        (0.2499, 5000, "moderate"),
        (0.25, 100, "drift"),
        (3.0, 100, "drift"),
        (3.0, 99, "insufficient data"),
        (None, 1000, "insufficient data"),
    ],
)
def test_verdict_thresholds(value: float | None, samples: int, expected: str) -> None:
    assert verdict(value, samples, threshold=0.25, min_samples=100) == expected


def test_verdict_follows_the_spec_threshold_and_overall_takes_the_worst() -> None:
    assert verdict(0.3, 10, threshold=0.5, min_samples=10) == "moderate"
    assert verdict(0.5, 10, threshold=0.5, min_samples=10) == "drift"
    assert verdict(0.5, 0, threshold=0.5, min_samples=0) == "insufficient data"  # never a verdict on nothing
    assert overall(["stable", "drift", "moderate"]) == "drift"
    assert overall([]) == "insufficient data"


# ------------------------------------------------------------------------------------------ histograms
def test_bins_from_cumulative_buckets() -> None:
    hist = Histogram.from_buckets([(math.inf, 9), (0.1, 2), (0.5, 5)])  # any order, as a query answers
    assert hist.edges == (0.1, 0.5)
    assert hist.bins() == [2, 3, 4]
    assert hist.count == 9
    # increase() extrapolates each bucket on its own: a lower count above is kept monotonic
    assert Histogram.from_buckets([(0.1, 2.2), (0.5, 2.0), (math.inf, 3)]).bins() == [2.2, 0.0, pytest.approx(0.8)]
    # no +Inf bucket: the top count is the total
    assert Histogram.from_buckets([(0.1, 1), (0.5, 4)]).bins() == [1, 3, 0]


def test_bins_of_a_scraped_histogram_match_the_reference_layout() -> None:
    page = parse_exposition(exposition(Traffic(confidence=[0.05, 0.1, 0.15, 0.97, 0.995, 1.0])))
    hist = page.histogram("servekit_confidence", model="digits", version="2.0")
    assert hist.edges == CONFIDENCE_EDGES
    assert hist.bins() == [2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2]  # (x, 0.1] is bin 0: 0.1 falls in it
    assert len(hist.bins()) == len(CONFIDENCE_EDGES) + 1


def test_quantiles_interpolate_inside_the_bucket_like_histogram_quantile() -> None:
    buckets = [(0.1, 10), (0.2, 20), (0.4, 30), (math.inf, 30)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.15)  # rank 15: half into (0.1, 0.2]
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.25)  # rank 22.5: a quarter into (0.2, 0.4]
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.075)  # the first bucket starts at 0
    assert histogram_quantile(1.0, buckets) == pytest.approx(0.4)
    assert histogram_quantile(0.99, [(0.1, 1), (math.inf, 10)]) == 0.1  # in +Inf: the highest finite bound
    assert histogram_quantile(0.5, [(0.1, 0), (math.inf, 0)]) is None
    assert histogram_quantile(0.5, [(0.1, 4)]) is None  # no +Inf bucket
    assert histogram_quantile(0.5, [(-1.0, 4), (math.inf, 4)]) == -1.0
    assert histogram_quantile(-0.1, buckets) == -math.inf
    assert histogram_quantile(1.1, buckets) == math.inf


def test_quantile_of_a_scraped_request_histogram() -> None:
    page = parse_exposition(exposition(Traffic(seconds=[0.004] * 50 + [0.02] * 50)))
    hist = page.histogram("servekit_request_seconds", model="digits", version="2.0")
    assert hist.quantile(0.5) == pytest.approx(0.005)  # the top of (0.0025, 0.005]
    assert hist.quantile(0.99) == pytest.approx(0.01 + 0.015 * 49 / 50)  # rank 99: 49 of 50 into (0.01, 0.025]


def test_labels_of_bins_and_the_median_bin() -> None:
    assert bin_labels((0.1, 0.5), "MP") == ["<= 0.1 MP", "(0.1, 0.5] MP", "> 0.5 MP"]
    assert median_bin((0.1, 0.5), [1, 5, 1]) == "(0.1, 0.5]"
    assert median_bin((0.1, 0.5), [5, 0, 4]) == "<= 0.1"
    assert median_bin((0.1, 0.5), [0, 0, 0]) is None


# ------------------------------------------------------------------------------------------ samples and scrapes
def test_parsing_a_metrics_page_into_samples() -> None:
    page = parse_exposition(exposition(Traffic(codes={"200": 7, "400": 2}), Traffic(version="1.0", default=False)))
    assert page.by_label("servekit_requests_total", "code", model="digits", version="2.0") == {"200": 7, "400": 2}
    assert page.value("servekit_requests_total", model="digits") == 209
    assert page.value("servekit_default_version", model="digits", version="1.0") == 0
    assert page.value("no_such_metric") is None
    assert page.keys("servekit_workers_ready", "model", "version") == {("digits", "1.0"), ("digits", "2.0")}
    assert not [name for name in page.names() if name.endswith("_created")]
    kinds = {s.name: s.kind for s in page.samples}
    assert (kinds["servekit_requests_total"], kinds["servekit_confidence_bucket"]) == ("counter", "histogram")
    assert kinds["servekit_queue_pending"] == "gauge"


def test_a_page_that_is_not_prometheus_text_is_one_line() -> None:
    with pytest.raises(MetricsError, match=r"^the page at X is not in Prometheus' text format: ") as caught:
        parse_exposition("<html>\n<body>hello</body>\n</html>", where="the page at X")
    assert "\n" not in str(caught.value)


def test_the_difference_of_two_scrapes() -> None:
    counter, gauge = "counter", "gauge"
    first = Samples(
        [Sample("c_total", {"a": "1"}, 10, counter), Sample("g", {}, 5, gauge), Sample("r_total", {}, 50, counter)],
        taken_at=100.0,
    )
    second = Samples(
        [Sample("c_total", {"a": "1"}, 25, counter), Sample("g", {}, 3, gauge), Sample("r_total", {}, 4, counter),
         Sample("n_total", {}, 2, counter)],
        taken_at=102.5,
    )  # fmt: skip
    delta = second.since(first)
    assert delta.value("c_total") == 15
    assert delta.value("g") == 3  # a gauge is what it is now
    assert delta.value("r_total") == 4  # lower than before: reset, all of it is new
    assert delta.value("n_total") == 2  # a new series started from zero
    assert second.seconds_since(first) == 2.5


def test_label_selectors_and_windows() -> None:
    assert label_selector(model="digits", version=None) == '{model="digits"}'
    assert label_selector(model='a"b\\c') == '{model="a\\"b\\\\c"}'
    assert label_selector() == ""
    assert parse_window("15m") == 900
    assert parse_window("1h30m") == 5400
    for bad in ("15", "m", "15 m", "-5m", ""):
        with pytest.raises(MetricsError, match="is not a Prometheus duration"):
            parse_window(bad)


# ------------------------------------------------------------------------------------------ Prometheus client
def test_prometheus_client_reads_vectors_and_scalars() -> None:
    answers = {
        "up": vector(({"job": "servekit"}, 1), ({"job": "other"}, float("nan"))),
        "1": SCALAR_ONE,
    }

    def answer(query: str) -> dict:
        if query == "bad(":
            raise ValueError("1:5: parse error: unclosed left parenthesis")
        return answers[query]

    with serving(FakeMetricsServer(prometheus=answer)) as server:
        api = PrometheusAPI(server.url + "/")
        assert api.query("up") == [({"job": "servekit"}, 1.0)]  # NaN (no data) is dropped
        assert api.query("1") == [({}, 1.0)]
        assert api.answers()
        assert api.samples("x", "up") == [Sample("x", {"job": "servekit"}, 1.0, "gauge")]
        with pytest.raises(MetricsError, match=r"refused 'bad\(': bad_data: 1:5: parse error"):
            api.query("bad(")


def test_prometheus_client_errors_are_one_line() -> None:
    url = closed_url()
    with pytest.raises(MetricsError, match=rf"^Prometheus is not reachable at {url} \(--prometheus-url"):
        PrometheusAPI(url).query("up")
    assert not PrometheusAPI(url).answers()
    with serving(FakeMetricsServer(pages=["x 1\n"])) as server:  # a server, but no Prometheus API
        with pytest.raises(MetricsError, match=r"is not a Prometheus API: /api/v1/query answered 404 <html>"):
            PrometheusAPI(server.url).query("up")
        assert not PrometheusAPI(server.url).answers()
    slow = FakeMetricsServer(prometheus=lambda q: SCALAR_ONE, delay=1.0)
    with serving(slow), pytest.raises(MetricsError, match=r"did not answer 'up' within 0.2s"):
        PrometheusAPI(slow.url, timeout=0.2).query("up")


def test_the_metrics_page_and_its_errors() -> None:
    with serving(FakeMetricsServer(pages=[exposition(Traffic())])) as server:
        page = MetricsPage(server.url + "/metrics")
        assert page.scrape().value("servekit_exporter_up") == 1
        assert page.answers()
        with pytest.raises(MetricsError, match=r"/nothing answered 404 <html>404 page not found</html>$"):
            MetricsPage(server.url + "/nothing").text()
    url = closed_url("/metrics")
    with pytest.raises(MetricsError, match=rf"^the metrics page {url} is not reachable"):
        MetricsPage(url).scrape()


def test_choosing_the_source() -> None:
    with serving(FakeMetricsServer(pages=[exposition(Traffic())], prometheus=prometheus_of(Traffic()))) as both:
        page, api = MetricsPage(both.url + "/metrics"), PrometheusAPI(both.url)
        assert choose_source("auto", api, page) == ("prometheus", None)
        assert choose_source("metrics", api, page) == ("metrics", None)
    empty = prometheus_of(extra={"count(servekit_exporter_up)": vector()})
    with serving(FakeMetricsServer(pages=[exposition(Traffic())], prometheus=empty)) as unscraped:
        page, api = MetricsPage(unscraped.url + "/metrics"), PrometheusAPI(unscraped.url)
        source, note = choose_source("auto", api, page)
        assert source == "metrics"
        assert note == f"Prometheus at {api.url} holds no servekit series: read {page.url} instead"
    page, api = MetricsPage(closed_url("/metrics")), PrometheusAPI(closed_url())
    with pytest.raises(MetricsError, match=r"^no metrics to read: Prometheus at .* does not answer, and the metrics"):
        choose_source("auto", api, page)
    with pytest.raises(MetricsError, match=r"^Prometheus is not reachable"):
        choose_source("prometheus", api, page)


# ------------------------------------------------------------------------------------------ the reference
def test_the_reference_is_read_from_the_archive_in_the_store(tmp_path: Path) -> None:
    write_store(tmp_path)
    reference = load_reference(tmp_path, "digits", "2.0")
    assert (reference.model, reference.version, reference.source, reference.samples) == (
        "digits", "2.0", "digits holdout", 200,
    )  # fmt: skip
    assert reference.classes == dict.fromkeys(CLASSES, 0.1)
    assert reference.histograms["confidence"][0] == CONFIDENCE_EDGES
    assert (reference.threshold, reference.min_samples) == (0.25, 100)


def test_an_archive_without_a_reference_is_a_clear_error(tmp_path: Path) -> None:
    write_store(tmp_path, version="1.0", metadata={"model": "digits", "version": "1.0"})
    with pytest.raises(DriftError, match=r"^digits 1.0: the archive has no drift reference \(drift_reference in"):
        load_reference(tmp_path, "digits", "1.0")
    with pytest.raises(IntegrityError, match="no archive digits_v3.0.mar"):
        load_reference(tmp_path, "digits", "3.0")
    path = write_store(tmp_path)
    path.write_bytes(path.read_bytes() + b"tampered")
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        load_reference(tmp_path, "digits", "2.0")


def test_a_malformed_reference_says_what_is_wrong() -> None:
    block = reference_block()
    block["confidence"] = {"edges": [0.1, 0.5], "counts": [1, 2]}
    with pytest.raises(DriftError, match=r"drift_reference.confidence has 2 counts for 2 edges \(need 3"):
        parse_reference({"drift_reference": block}, "m", "1.0")
    with pytest.raises(DriftError, match="classes must map every label"):
        parse_reference({"drift_reference": {"classes": {}}}, "m", "1.0")
    defaults = parse_reference({"drift_reference": {"classes": {"a": 1.0}}}, "m", "1.0")
    assert (defaults.threshold, defaults.min_samples, defaults.histograms) == (0.25, 100, {})


def test_the_reference_cache_reads_an_archive_once_and_again_when_it_changes(tmp_path: Path) -> None:
    cache = ReferenceCache(tmp_path)
    assert cache.get("digits", "2.0") is None
    assert "no archive" in cache.errors[("digits", "2.0")]
    write_store(tmp_path)
    first = cache.get("digits", "2.0")
    assert first is not None
    assert cache.get("digits", "2.0") is first


# ------------------------------------------------------------------------------------------ the comparison
def reference(tmp_path: Path):
    write_store(tmp_path)
    return load_reference(tmp_path, "digits", "2.0")


def test_live_traffic_like_the_held_out_set_is_stable(tmp_path: Path) -> None:
    live = live_distributions(parse_exposition(exposition(Traffic())), "digits", "2.0")
    report = compare(reference(tmp_path), live)
    assert report["verdict"] == "stable"
    assert {name: s["psi"] for name, s in report["signals"].items()} == {
        "classes": 0.0, "confidence": 0.0, "brightness": 0.0,
    }  # fmt: skip
    assert report["live_inputs"] == 200
    assert report["image_size"] == {
        "informational": True, "samples": 200, "live_median_bin": "<= 0.001 MP", "reference_median_bin": "<= 0.001 MP",
    }  # fmt: skip
    assert report["notes"] == [
        "image size is informational, not part of the verdict: the held-out set is rendered at one size, "
        "so its reference says little about what clients send"
    ]


def test_one_class_for_everything_is_drift(tmp_path: Path) -> None:
    report = compare(reference(tmp_path), live_distributions(parse_exposition(exposition(DRIFTED)), "digits", "2.0"))
    classes = report["signals"]["classes"]
    expected = (1 - 0.1) * math.log(1 / 0.1) + 9 * (0.1 - 1e-4) * math.log(0.1 / 1e-4)
    assert classes["psi"] == pytest.approx(expected, abs=1e-4)
    assert classes["verdict"] == "drift"
    assert report["verdict"] == "drift"
    worst = max(report["signals"], key=lambda name: report["signals"][name]["psi"])
    assert report["reason"] == f"{worst} PSI {report['signals'][worst]['psi']:.3f} >= 0.25"


def test_few_live_inputs_are_insufficient_data_and_image_size_never_judges(tmp_path: Path) -> None:
    few = Traffic(classes={"7": 10}, confidence=[0.2] * 10, brightness=[0.95] * 10, megapixels=[20.0] * 10)
    report = compare(reference(tmp_path), live_distributions(parse_exposition(exposition(few)), "digits", "2.0"))
    assert report["verdict"] == "insufficient data"
    assert report["reason"] == "10 live inputs, fewer than the 100 a verdict needs"
    assert {s["verdict"] for s in report["signals"].values()} == {"insufficient data"}
    assert report["image_size"]["live_median_bin"] == "(12, 25] MP"
    # plenty of inputs, all of a size the held-out set never had: still stable
    big = Traffic(megapixels=[20.0] * 200)
    report = compare(reference(tmp_path), live_distributions(parse_exposition(exposition(big)), "digits", "2.0"))
    assert report["verdict"] == "stable"
    assert "megapixels" not in report["signals"]


def test_moderate_between_point_one_and_the_threshold(tmp_path: Path) -> None:
    # a quarter of the inputs in one class: PSI 0.15 ln 2.5 + 9 (1/60) ln 1.2 = 0.165
    classes = dict.fromkeys(CLASSES, 15) | {"3": 45}
    report = compare(reference(tmp_path), live_distributions(
        parse_exposition(exposition(Traffic(classes=classes))), "digits", "2.0"))  # fmt: skip
    assert report["signals"]["classes"]["psi"] == pytest.approx(0.15 * math.log(2.5) + 0.15 * math.log(1.2), abs=1e-4)
    assert report["verdict"] == "moderate"
    assert report["reason"].startswith("classes PSI 0.")


def test_live_buckets_other_than_the_reference_edges_are_an_error(tmp_path: Path) -> None:
    live = live_distributions(Samples([
        Sample("servekit_confidence_bucket", {"model": "digits", "version": "2.0", "le": le}, n, "histogram")
        for le, n in (("0.5", 100), ("+Inf", 200))
    ]), "digits", "2.0")  # fmt: skip
    with pytest.raises(DriftError, match=r"live servekit_confidence buckets \(0.5\) are not the reference's edges"):
        compare(reference(tmp_path), live)


def test_the_printed_report(tmp_path: Path) -> None:
    report = compare(reference(tmp_path), live_distributions(parse_exposition(exposition(DRIFTED)), "digits", "2.0"))
    report["source"] = {"description": "since the server started (http://x/metrics)"}
    lines = format_report(report).splitlines()
    assert lines[0] == f"digits 2.0: drift ({report['reason']})"
    assert lines[1] == "live:      300 inputs, since the server started (http://x/metrics)"
    assert lines[2] == "reference: digits holdout, 200 inputs"
    assert lines[3].split() == ["SIGNAL", "PSI", "VERDICT", "INPUTS", "CHI-SQUARE", "(DOF,", "P)"]
    assert lines[4].split()[:3] == ["classes", f"{report['signals']['classes']['psi']:.3f}", "drift"]
    assert lines[4].endswith("(9, p<0.001)")
    assert lines[7] == "image size: live median <= 0.001 MP, reference median <= 0.001 MP (informational, 200 inputs)"
    assert lines[8] == (
        "PSI: stable under 0.1, moderate from 0.1, drift at 0.25 or over; a verdict needs at least 100 live inputs"
    )
    assert lines[9].startswith("note: image size is informational")


# ------------------------------------------------------------------------------------------ run_drift
def test_drift_from_prometheus_over_a_window(tmp_path: Path) -> None:
    write_store(tmp_path)
    with serving(FakeMetricsServer(prometheus=prometheus_of(DRIFTED))) as server:
        report = run_drift("digits", None, store=tmp_path, page=MetricsPage(closed_url("/metrics")),
                           prometheus=PrometheusAPI(server.url), window="30m")  # fmt: skip
    assert (report["version"], report["verdict"]) == ("2.0", "drift")  # the default, from the exporter's gauge
    assert report["source"] == {
        "kind": "prometheus", "address": server.url, "window": "30m",
        "description": f"increase over 30m from Prometheus {server.url}",
    }  # fmt: skip
    assert 'servekit_default_version{model="digits"} == 1' in server.queries
    assert (
        'sum by (model, version, class) (increase(servekit_predictions_total{model="digits",version="2.0"}[30m]))'
        in server.queries
    )


def test_drift_from_two_scrapes_of_the_metrics_page(tmp_path: Path) -> None:
    write_store(tmp_path)
    before = Traffic(classes={"7": 10_000}, confidence=[0.2] * 10_000, brightness=[0.05] * 10_000)
    # between the scrapes: traffic like the held-out set, on top of a drifted past
    after = Traffic(
        classes={label: n + before.classes.get(label, 0) for label, n in Traffic().classes.items()},
        confidence=before.confidence + Traffic().confidence,
        brightness=before.brightness + Traffic().brightness,
    )
    slept = []
    with serving(FakeMetricsServer(pages=[exposition(before), exposition(after)])) as server:
        page = MetricsPage(server.url + "/metrics")
        report = run_drift("digits", "2.0", store=tmp_path, page=page, prometheus=PrometheusAPI(closed_url()),
                           seconds=30, sleep=slept.append)  # fmt: skip
        assert server.scrapes == 2
    assert slept == [30]
    assert (report["verdict"], report["live_inputs"]) == ("stable", 200)
    assert report["source"]["description"] == f"the last 30 s (two scrapes of {page.url})"
    # the cumulative page alone is the drifted past
    with serving(FakeMetricsServer(pages=[exposition(after)])) as server:
        page = MetricsPage(server.url + "/metrics")
        report = run_drift("digits", "2.0", store=tmp_path, page=page, prometheus=PrometheusAPI(closed_url()))
    assert report["verdict"] == "drift"
    assert report["source"]["since_start"] is True


def test_drift_refuses_contradicting_options(tmp_path: Path) -> None:
    page, api = MetricsPage(closed_url("/metrics")), PrometheusAPI(closed_url())
    for kwargs, message in (
        ({"window": "5m", "seconds": 10}, "pick one"),
        ({"seconds": 0}, "--seconds must be positive"),
        ({"seconds": 5, "source": "prometheus"}, "with --source prometheus use --window"),
        ({"window": "5m", "source": "metrics"}, "the metrics page takes --seconds"),
        ({"window": "5 minutes"}, "is not a Prometheus duration"),
    ):
        with pytest.raises((DriftError, MetricsError), match=message):
            run_drift("digits", "2.0", store=tmp_path, page=page, prometheus=api, **kwargs)


# ------------------------------------------------------------------------------------------ the command line
@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every address the CLI knows points at a closed port unless a test says otherwise."""
    write_store(tmp_path / "store")
    for name, value in (("STORE", str(tmp_path / "store")), ("METRICS_URL", closed_url("/metrics")),
                        ("PROMETHEUS_URL", closed_url()), ("MANAGEMENT_URL", closed_url()),
                        ("INFERENCE_URL", closed_url()), ("KEY_FILE", str(tmp_path / "no_key_file.json")),
                        ("HISTORY", str(tmp_path / "var" / "deployments.jsonl")),
                        ("PROXY_DIR", str(tmp_path / "var" / "proxy"))):  # fmt: skip
        monkeypatch.setenv(f"SERVEKIT_{name}", value)
    return tmp_path / "store"


def test_cli_drift_exits_3_with_the_report_on_drift(cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with serving(FakeMetricsServer(prometheus=prometheus_of(DRIFTED))) as server:
        code = main(["--prometheus-url", server.url, "drift", "digits", "2.0"])
    out, err = capsys.readouterr()
    assert code == 3
    assert out.startswith("digits 2.0: drift (")
    assert f"increase over 15m from Prometheus {server.url}" in out
    assert err == ""


def test_cli_drift_exits_0_when_stable_and_prints_json(
    cli_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with serving(FakeMetricsServer(pages=[exposition(Traffic())])) as server:
        monkeypatch.setenv("SERVEKIT_METRICS_URL", server.url + "/metrics")
        code = main(["drift", "digits", "--json"])  # the default version from the page's gauge
    out, _ = capsys.readouterr()
    assert code == 0
    report = json.loads(out)
    assert (report["model"], report["version"], report["verdict"]) == ("digits", "2.0", "stable")
    assert report["source"]["kind"] == "metrics"
    assert set(report["signals"]) == {"classes", "confidence", "brightness"}


def test_cli_drift_insufficient_data_exits_0(cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    few = Traffic(classes={"7": 5}, confidence=[0.2] * 5, brightness=[0.95] * 5)
    with serving(FakeMetricsServer(pages=[exposition(few)])) as server:
        code = main(["--metrics-url", server.url + "/metrics", "drift", "digits", "2.0", "--source", "metrics"])
    assert code == 0
    assert capsys.readouterr().out.startswith("digits 2.0: insufficient data (5 live inputs, fewer than the 100")


def test_cli_drift_when_nothing_answers_is_one_line(cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["drift", "digits", "2.0"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("servekit: error: no metrics to read: Prometheus at http://127.0.0.1:")
    assert len(err.strip().splitlines()) == 1


def test_cli_drift_without_a_reference_is_one_line(cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_store(cli_env, version="1.0", metadata={"model": "digits"})
    assert main(["drift", "digits", "1.0"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "servekit: error: digits 1.0: the archive has no drift reference (drift_reference in metadata.json); "
        "rebuild it with an evaluation set (make archive)\n"
    )


def test_cli_drift_without_a_default_in_the_metrics_asks_the_management_api(
    cli_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = exposition(Traffic(default=False))
    with serving(FakeMetricsServer(pages=[page])) as server:
        code = main(["--metrics-url", server.url + "/metrics", "drift", "digits"])
    assert code == 1
    assert capsys.readouterr().err.startswith("servekit: error: no TorchServe key file at")
