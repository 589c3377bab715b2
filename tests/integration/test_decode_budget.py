"""The decode budget against a real TorchServe: the second hostile corpus, each answer within 2 s.

Every case of ``tests/hostile_corpus_decode.py`` (decode amplification, formats dropped on purpose,
odd but valid images) is sent in all three forms (raw body, multipart field ``data``, JSON
``{"data": base64}``):

1. alone, to ``digits`` 1.0: the exact status and JSON body (or the right digit), answered within
   2 s, while the worker's memory is sampled every few milliseconds: it must not grow by more than
   300 MB above what it held before the request;
2. mixed into real batches of 8 with good requests (the batch registration and the helpers of
   ``test_hostile_inputs``): every answer right and the whole batch answered within 2 s, so at most
   one of the slow valid cases (``SLOW``: 25-megapixel pages) goes into a batch.

At the end the worker pids must be the ones from before (no crash, no restart) and their resident
memory must not have grown by more than 300 MB. The counts and figures are printed (``-s``) and
written to ``decode_budget_summary.json`` in pytest's base temp directory.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import psutil
import pytest
import requests

from tests.hostile_corpus import FORMS, RAW, Case
from tests.hostile_corpus_decode import SLOW, corpus
from tests.integration import test_hostile_inputs as hostile
from tests.integration.conftest import Client
from tests.integration.survival import publish, survival_report
from tests.integration.test_hostile_inputs import (
    BATCH_MODEL,
    BATCH_SIZE,
    HOSTILE_PER_BATCH,
    MODEL,
    REQUEST_TIMEOUT_S,
    VERSION,
    Ledger,
    Workers,
    good_request,
    prediction_problems,
    problems_with,
    request_kwargs,
    send_batch,
    snapshot,
    worker_pids,
)

# The good requests that share a batch here go to /predictions: servekit's own forms, not OIP.
PREDICTIONS_FORMS = FORMS

ANSWER_WITHIN_S = 2.0
MEMORY_GROWTH_LIMIT_MB = 300
RSS_SAMPLE_INTERVAL_S = 0.005

# This module's own TorchServe, registrations, warm-up and ledger: the fixtures of the first corpus.
server = hostile.server
client = hostile.client
baseline = hostile.baseline
ledger = hostile.ledger


@dataclass
class Peaks:
    """The highest worker memory seen during each single request, above what it held just before."""

    growth_mb: dict[str, float] = field(default_factory=dict)
    slowest_s: dict[str, float] = field(default_factory=dict)


@pytest.fixture(scope="module")
def peaks() -> Peaks:
    return Peaks()


class RssSampler:
    """Samples a process's resident memory in a thread until stopped; keeps the maximum."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.before = self.process.memory_info().rss
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(RSS_SAMPLE_INTERVAL_S)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.before) / 2**20


# ------------------------------------------------------------------------------------ parameters
def single_params() -> list:
    return [
        pytest.param(case, form, id=f"{form}-{case.name}")
        for case in corpus()
        for form in ("raw", "multipart", "json")
        if form in case.forms
    ]


def batch_groups() -> list[list[tuple[Case, str]]]:
    """Every (case, form) in groups of ``HOSTILE_PER_BATCH``, at most one slow case in each."""
    pairs = [(case, form) for case in corpus() for form in case.forms]
    groups: list[list[tuple[Case, str]]] = [[pair] for pair in pairs if pair[0].name in SLOW]
    for pair in (pair for pair in pairs if pair[0].name not in SLOW):
        open_group = next((group for group in groups if len(group) < HOSTILE_PER_BATCH), None)
        if open_group is None:
            open_group = []
            groups.append(open_group)
        open_group.append(pair)
    return groups


BATCH_GROUPS = batch_groups()


# ------------------------------------------------------------------------------------ the tests
@pytest.mark.parametrize(("case", "form"), single_params())
def test_single_request_answered_within_two_seconds(
    client: Client, baseline: Workers, ledger: Ledger, peaks: Peaks, case: Case, form: str
) -> None:
    ledger.payloads.add(case.name)
    ledger.pairs.add((case.name, form))
    ledger.single += 1
    label = f"single {form} {case.name}"
    (pid,) = baseline.pids[MODEL]
    with RssSampler(pid) as rss:
        started = time.monotonic()
        try:
            response = client.predict(f"{MODEL}/{VERSION}", REQUEST_TIMEOUT_S, **request_kwargs(case, form))
        except requests.RequestException as exc:
            ledger.record(label, exc, [])
            raise
        elapsed = time.monotonic() - started
    problems = problems_with(case, response)
    ledger.record(label, response, problems)
    peaks.growth_mb[f"{form}:{case.name}"] = round(rss.growth_mb, 1)
    peaks.slowest_s[case.name] = round(max(elapsed, peaks.slowest_s.get(case.name, 0.0)), 3)

    assert problems == []
    assert elapsed < ANSWER_WITHIN_S, f"answered after {elapsed:.2f} s"
    assert rss.growth_mb < MEMORY_GROWTH_LIMIT_MB, f"the worker grew by {rss.growth_mb:.0f} MB during the request"
    assert worker_pids(client, MODEL) == baseline.pids[MODEL], f"a worker restarted after {case.name} ({form})"


@pytest.mark.parametrize(
    "group",
    BATCH_GROUPS,
    ids=[f"{i:02d}-" + "+".join(f"{form}:{case.name}" for case, form in g)[:80] for i, g in enumerate(BATCH_GROUPS)],
)
def test_mixed_batch_answered_within_two_seconds(
    client: Client, baseline: Workers, ledger: Ledger, group: list[tuple[Case, str]]
) -> None:
    # Alternate hostile and good requests; fill up to exactly BATCH_SIZE with good ones.
    slots: list[tuple[str, Case | int, dict]] = []
    goods = iter(range(ledger.in_batches, ledger.in_batches + BATCH_SIZE))
    for case, form in group:
        slots.append((f"{form}:{case.name}", case, request_kwargs(case, form)))
        digit, good_form, kwargs = good_request(next(goods), PREDICTIONS_FORMS)
        slots.append((f"good {good_form}:{digit}", digit, kwargs))
    while len(slots) < BATCH_SIZE:
        digit, good_form, kwargs = good_request(next(goods), PREDICTIONS_FORMS)
        slots.append((f"good {good_form}:{digit}", digit, kwargs))

    answers, elapsed = send_batch(client, [(RAW, kwargs) for _, _, kwargs in slots])  # all to /predictions

    ledger.batches += 1
    ledger.in_batches += len(slots)
    failures = []
    for (label, expected, _), answer in zip(slots, answers, strict=True):
        if isinstance(answer, BaseException):
            problems = [f"no answer: {answer!r}"]
        elif isinstance(expected, Case):
            problems = problems_with(expected, answer)
        else:
            problems = [f"status {answer.status_code}"] if answer.status_code != 200 else []
            problems = problems or prediction_problems(answer.json(), expected)
        ledger.record(f"batch {label}", answer, problems)
        failures += [f"{label}: {p}" for p in problems]
    assert failures == []
    assert elapsed < ANSWER_WITHIN_S, f"the batch of {BATCH_SIZE} was answered after {elapsed:.2f} s"
    assert worker_pids(client, BATCH_MODEL) == baseline.pids[BATCH_MODEL], "a batch worker restarted"


def test_workers_survived_with_bounded_memory(
    client: Client, baseline: Workers, ledger: Ledger, peaks: Peaks, tmp_path_factory: pytest.TempPathFactory
) -> None:
    after = snapshot(client)
    summary = survival_report(
        ledger, baseline, after,
        payloads=len(corpus()), payloads_tried=len(ledger.payloads), case_form_pairs=len(ledger.pairs),
        slowest_single_answer_s=max(peaks.slowest_s.values(), default=0.0),
        slowest_single_answers_s=dict(sorted(peaks.slowest_s.items(), key=lambda kv: -kv[1])[:8]),
        largest_peak_rss_growth_mb=dict(sorted(peaks.growth_mb.items(), key=lambda kv: -kv[1])[:8]),
    )  # fmt: skip
    headline = (
        f"decode budget: {summary['payloads_tried']} of {summary['payloads']} payloads, "
        f"{summary['case_form_pairs']} payload x form pairs; slowest single answer "
        f"{summary['slowest_single_answer_s']} s; largest peak RSS growth during a request "
        f"{max(peaks.growth_mb.values(), default=0.0)} MB"
    )
    publish(summary, "decode_budget_summary.json", tmp_path_factory, headline, BATCH_SIZE)
    growth_mb = summary["worker_rss_growth_mb"]

    assert after.pids == baseline.pids, "a worker died or restarted"
    assert ledger.lost == []
    assert ledger.mismatched == []
    for pid, mb in growth_mb.items():
        assert mb < MEMORY_GROWTH_LIMIT_MB, f"worker {pid} grew by {mb:.0f} MB"
    # And it still serves.
    digit, _, kwargs = good_request(3, PREDICTIONS_FORMS)
    assert prediction_problems(client.predict(f"{MODEL}/{VERSION}", **kwargs).json(), digit) == []
