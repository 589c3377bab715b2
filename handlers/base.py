"""The thin shared base of every handler: the batch contract and error mapping, in one place.

Workflow of a handler built on ``BatchHandler``, for each server-side batch of requests:

1. ``decode(request, headers)``: ONE request dict (and its HTTP headers, lower-case names) -> a
   call object with a ``size``: how many model inputs the request carries (an OIP or KServe v1
   request may carry several images; ``handlers.protocols.read_envelope`` tells the protocol).
   Raise a ``HandlerError`` to fail only that request;
2. ``prepare(call)``: -> the call's model inputs, one per element (failures fail that request);
3. ``run(items)``: the inputs of every surviving request of the batch, in slices of at most the
   batch size the model was warmed up for: ``inference`` then ``postprocess`` -> one result per
   input;
4. ``encode(call, results)``: -> the request's ``protocols.Reply`` (body, content type, headers).

``handle`` runs the steps, guarantees N responses for N requests, and turns every error into a
per-request status with a JSON body. An answer larger than the server's ``max_response_size``
fails its own request with 413 (sent, it would make the frontend drop the worker and the whole
batch), and JSON bodies reach the handler as bytes, to be parsed with bounds
(``handlers.json_body``). ``initialize`` joins the machine-wide CPU budget (``handlers.cpu_budget``:
torch's thread pool follows the number of live workers, re-checked between batches) and warms the
model up at every batch size the worker can receive.

The three built-in tasks (``handlers.image_classifier``, ``handlers.tabular_classifier``,
``handlers.object_detector``) are subclasses like any other; ``BatchHandler``'s docstring is the
contract a handler of your own implements.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from handlers import explain, tracing
from handlers.config import RuntimeConfig
from handlers.cpu_budget import CpuBudget, batches_running, cpu_budget
from handlers.errors import (
    HandlerError,
    InferenceError,
    InjectedFault,
    NotExplainable,
    ResponseTooLarge,
    error_payload,
)
from handlers.json_body import DECODE_ENV, as_torchserve_decodes
from handlers.metrics import NullMetrics, PredictionLog, handler_metrics

logger = logging.getLogger(__name__)

JSON_CONTENT_TYPE = "application/json"
# Every answer says which version served it (a canary's share is visible on any route and protocol).
VERSION_HEADER = "X-Model-Version"
# TorchServe's max_response_size, as ``servekit.serving.server`` passes it to the workers; its default otherwise.
MAX_RESPONSE_ENV = "SERVEKIT_MAX_RESPONSE_SIZE"
TORCHSERVE_MAX_RESPONSE_SIZE = 6_553_500
# Kept free under the limit: the frontend checks each field of the worker's reply on its own, but
# a margin costs nothing and covers a limit changed in config.properties by a few bytes.
RESPONSE_MARGIN = 4096


def response_limit() -> int:
    """The most bytes one answer may have before TorchServe's frontend would drop the worker for it."""
    raw = os.environ.get(MAX_RESPONSE_ENV, "")
    try:
        limit = int(raw) if raw.strip() else TORCHSERVE_MAX_RESPONSE_SIZE
    except ValueError:
        logger.warning("%s=%r is not a number of bytes: using %d", MAX_RESPONSE_ENV, raw, TORCHSERVE_MAX_RESPONSE_SIZE)
        limit = TORCHSERVE_MAX_RESPONSE_SIZE
    return max(1024, limit - RESPONSE_MARGIN)


def reply_size(body: Any) -> int:
    """The bytes TorchServe's worker sends for ``body``: bytes as they are, text as UTF-8, anything
    else as ``json.dumps(body, indent=2)`` (ASCII-escaped), exactly as ``ts.protocol`` writes it."""
    if isinstance(body, bytes | bytearray):
        return len(body)
    if isinstance(body, str):
        return len(body.encode("utf-8"))
    return len(json.dumps(body, indent=2))


class BatchHandler:
    """Base class of every handler: a subclass implements the steps, the base runs them (module docstring).

    A subclass implements:

    * ``load(context, config)``: load the model from ``context.system_properties["model_dir"]``;
    * ``decode(request, headers)`` -> a call with a ``size`` (``handlers.protocols.read_envelope``
      tells the protocol; decode only your own elements), ``prepare(call)`` -> its model inputs;
    * ``inference(items)`` -> the model's outputs for a list of inputs, ``postprocess(outputs, items)``
      -> exactly one result per input;
    * ``encode(call, results)`` -> a ``handlers.protocols.Reply``;
    * ``warmup_items(batch_size)`` -> that many valid model inputs (warm-up runs every batch size
      before the first request); optionally ``warmup_requests()``: whole request dicts run through
      ``handle`` too, so the decoders are warm as well.

    What it gets, all set before ``load`` runs: ``self.settings``, the archive's ``handler:`` section
    typed by ``config_type`` (a ``handlers.config.RuntimeConfig`` subclass: name your own there);
    ``self.options``, the archive's ``handler_options:`` section, free-form (``{}`` when absent);
    ``self.model_name`` and ``self.model_version``; ``self.batch_size``. Requests are counted,
    timed and logged by the base; override ``summarize(result)`` (top-1 label and confidence) and
    ``input_statistics(item)`` to feed the prediction and drift metrics, and wrap slow parts of
    ``prepare`` in ``self.timed("decode")``. A ``handlers.errors.HandlerError`` raised anywhere for
    one request fails that request alone, with its status. In outline::

        class TextClassifier(BatchHandler):
            config_type = TextConfig        # handlers.config's module docstring

            def load(self, context, config):
                self.model = load_model(Path(context.system_properties["model_dir"]) / "model.pt", config)
            ...
    """

    # TorchScript's profiling executor specialises a graph on its first calls for each shape.
    warmup_rounds = 3
    # The typed ``handler:`` section of model-config.yaml (``from_dict``): a RuntimeConfig subclass.
    config_type: type[RuntimeConfig] = RuntimeConfig

    def __init__(self) -> None:
        self.initialized = False
        self.context: Any = None
        self.settings: Any = None
        self.options: dict[str, Any] = {}
        self.batch_size = 1
        self.cpu: CpuBudget | None = None
        self.inputs_seen = 0  # counts inputs for the deterministic injected faults
        self.model_name = ""
        self.model_version = ""
        self.metrics: Any = NullMetrics()  # counts from the end of warm-up (handlers.metrics)
        self.prediction_log: PredictionLog | None = None
        self._nested: dict[str, float] = {}
        self._answers: dict[int, list[Any]] = {}
        self.max_response = response_limit()
        self._reference: tuple[Any, str] | None = None  # explanations' FP32 program, loaded at the first one
        self.explainer = ""  # the registered name when it is an explanation pool, NAME-explainer (handlers.explain)
        self._explain_budget: explain.ShareBudget | None = None
        self.tracer: tracing.Tracer | None = None  # SERVEKIT_OTLP_ENDPOINT set: spans per request (handlers.tracing)
        self._batch_clock: tuple[float, float, float] | None = None  # the last model call: start, inferred, done

    # ----------------------------------------------------------------- lifecycle
    def initialize(self, context: Any) -> None:
        # The worker hands JSON bodies over as bytes: parsed here with bounds (handlers.json_body),
        # not by TorchServe in full before any limit applies. Read by TorchServe for each request.
        os.environ[DECODE_ENV] = "false"
        self.context = context
        yaml_config = getattr(context, "model_yaml_config", None) or {}
        self.settings = self.config_type.from_dict(yaml_config.get("handler"))
        self.options = handler_options(yaml_config)
        self.batch_size = max(1, int(context.system_properties.get("batch_size") or 1))
        model = (getattr(context, "manifest", None) or {}).get("model", {})
        self.model_name = model.get("modelName") or getattr(context, "model_name", "") or "?"
        self.model_version = str(model.get("modelVersion") or "")
        pinned = self.settings.threads
        registered = getattr(context, "model_name", "") or ""
        self.explainer = registered if explain.is_explainer(registered) else ""
        if self.explainer:  # an explanation pool: outside the prediction workers' budget (idle time: below)
            torch.set_num_threads(pinned or cpu_budget().cpus)
            threads = torch.get_num_threads()
        else:
            self.cpu = CpuBudget(label=f"{getattr(context, 'model_name', '?')} pid {os.getpid()}", pinned=pinned)
            self.cpu.register()
            threads = self.resize_threads(force=True)
            if advice := self.cpu.spin_advice():
                logger.warning("cpu budget: %s", advice)
        started = time.perf_counter()
        self.load(context, self.settings)
        loaded = time.perf_counter()
        self.warm_up()
        self.metrics = handler_metrics(self.model_name, self.model_version)
        self.tracer = tracing.tracer_from_env(self.model_name, self.model_version)
        log_config = getattr(self.settings, "prediction_log", None)
        if log_config is not None and log_config.sample_rate > 0:
            self.prediction_log = PredictionLog(log_config, self.model_name, self.model_version)
            logger.info("prediction log: %g of requests to %s", log_config.sample_rate, self.prediction_log.path)
        logger.info(
            "initialized: %d torch threads, load %.2fs, warm-up for batch sizes 1..%d %.2fs",
            threads,
            loaded - started,
            self.batch_size,
            time.perf_counter() - loaded,
        )
        self.warm_up_lent()
        if self.explainer:  # loaded and warm at the usual priority (a registration under load must not starve)
            moved = explain.idle_priority()
            explain.serve_as_pool(explain.IdleGate(batches_running))
            logger.info("explanation pool of %s: %d threads on idle CPU time only (SCHED_IDLE, %d threads "
                        "moved; each chunk of an explanation starts once no prediction batch has run for "
                        "%g ms), outside the CPU budget", self.model_name, threads, moved,
                        explain.POOL_QUIET_S * 1000)  # fmt: skip
        self.initialized = True

    def warm_up(self) -> None:
        """Run every batch size the worker can receive, then whole requests, so no client pays first-call costs.

        The model alone is not enough: the first real request also pays for the decoders' and the
        preprocessing's first calls (codec set-up, resampling kernels, allocator growth), which on
        some CPUs doubled the first answer. ``warmup_requests`` go through ``handle`` itself.
        """
        for size in range(1, self.batch_size + 1):
            items = self.warmup_items(size)
            for _ in range(self.warmup_rounds):
                self.postprocess(self.inference(items), items)
        requests = [] if self.explainer else self.warmup_requests()  # a pool answers no predictions
        for _ in range(self.warmup_rounds if requests else 0):
            for start in range(0, len(requests), self.batch_size):
                self.handle(requests[start : start + self.batch_size], _WarmupContext())

    def warm_up_lent(self) -> None:
        """With lending, a lone request may run on the whole budget: warm that thread count too.

        oneDNN keys some of its kernels by the thread count, so the first lone request on more
        threads than the warm-up used would pay their creation.
        """
        cpu = self.cpu
        if cpu is None or not cpu.lend or cpu.pinned or cpu.lendable() <= cpu.threads:
            return
        torch.set_num_threads(cpu.lendable())
        try:
            items = self.warmup_items(1)
            for _ in range(self.warmup_rounds):
                self.postprocess(self.inference(items), items)
        finally:
            torch.set_num_threads(cpu.threads)

    def resize_threads(self, force: bool = False, requests: int | None = None, borrow: bool = True) -> int:
        """Follow this worker's share of the CPU budget (``requests``: claim it for a batch of that many;
        ``borrow=False``: its own CPUs only); logs every change with its reason."""
        if self.cpu is None:
            return torch.get_num_threads()
        if requests is None:
            threads, reason = self.cpu.refresh(force=force)
        else:
            threads, reason = self.cpu.claim(requests, force=force, borrow=borrow)
        if reason is not None:
            torch.set_num_threads(threads)
            logger.info("cpu budget: %s", reason)
        return threads

    # ----------------------------------------------------------------- the batch contract
    def handle(self, data: list[dict], context: Any) -> list[Any]:
        """N requests in, N responses out; a failure costs only the request it belongs to.

        Counts what ``handlers.metrics`` defines (never during warm-up) and logs one line per
        request with TorchServe's request ID, the one its answer carries in ``x-request-id``.
        """
        began = time.perf_counter()
        try:
            if self.cpu is not None:
                self.cpu.hold_own()  # this worker's own CPUs, from decoding to the end of the inference
            responses = self._handle(data, context, began)
            if self.model_version:  # which version answered: the routing plane's canary is visible to clients
                for idx in range(len(data)):
                    context.set_response_header(idx, VERSION_HEADER, self.model_version)
            return responses
        finally:
            if self.cpu is not None:
                self.cpu.release()

    def _handle(self, data: list[dict], context: Any, began: float) -> list[Any]:
        metrics = self.metrics
        responses: list[Any] = [None] * len(data)
        outcomes: list[tuple[int, str | None, float]] = [(200, None, 0.0)] * len(data)
        calls: list[tuple[int, Any, list[Any]]] = []
        explanations = [i for i in range(len(data)) if explain.explanation_requested(context, i)]
        offset = tracing.clock_offset()
        clocks: dict[int, tuple[dict[str, str], float | None, float, float | None, float | None]] = {}
        self._batch_clock = None
        for idx, request in enumerate(data):
            if idx in explanations:
                continue  # answered after the batch's predictions (_explain_request)
            if self.explainer:
                refused = explain.only_explanations(self.explainer, self.model_name)
                responses[idx] = payload = self._fail(context, idx, refused)
                outcomes[idx] = (payload["code"], payload["type"], time.perf_counter())
                continue
            self._nested: dict[str, float] = {}
            started = time.perf_counter()
            decoded = prepared = None
            headers = request_headers(context, idx)
            waited = tracing.queue_seconds(headers, began + offset)
            if waited is not None and self.initialized:
                metrics.queue(waited)
            try:
                call = self.decode(as_torchserve_decodes(request, headers), headers)
                decoded = time.perf_counter()
                if getattr(call, "request_id", "") is None:  # the protocol has an id and the client sent none
                    call.request_id = request_id(context, idx)
                calls.append((idx, call, self.prepare(call)))
                prepared = time.perf_counter()
            except Exception as exc:  # noqa: BLE001 - every error becomes this request's status
                responses[idx] = payload = self._fail(context, idx, exc)
                outcomes[idx] = (payload["code"], payload["type"], time.perf_counter())
            # decode: every request (the protocol, and what prepare timed as decode); preprocess: only
            # the requests whose inputs were all prepared.
            nested = self._nested.get("decode", 0.0)
            metrics.stage("decode", (decoded or time.perf_counter()) - started + nested)
            if prepared is not None:
                metrics.stage("preprocess", max(0.0, prepared - decoded - nested))
            if self.tracer is not None:
                clocks[idx] = (headers, waited, started, decoded, prepared)
        if calls:
            self._answer(calls, context, responses, outcomes)
        for idx in explanations:
            self._explain_request(idx, data[idx], context, responses, outcomes)
        self._account(data, context, responses, outcomes, began)
        if self.tracer is not None and self.initialized:
            self._trace(clocks, outcomes, began, offset)
        return responses

    def _trace(self, clocks: dict, outcomes: list, began: float, offset: float) -> None:
        """Each request's spans (``handlers.tracing``), from the timestamps taken above; never fails a request."""

        def ns(perf: float) -> int:
            return tracing.epoch_ns(perf, offset)

        try:
            for idx, (headers, waited, started, decoded, prepared) in clocks.items():
                code, _, finished = outcomes[idx]
                stages = []
                if waited is not None:
                    stages.append(("queue", ns(began - waited), ns(began)))
                stages.append(("decode", ns(started), ns(decoded if decoded is not None else finished)))
                if prepared is not None:
                    stages.append(("preprocess", ns(decoded), ns(prepared)))
                    if self._batch_clock is not None:
                        run_start, inferred, done = self._batch_clock
                        stages += [("inference", ns(run_start), ns(inferred)), ("postprocess", ns(inferred), ns(done))]
                self.tracer.request(tracing.traceparent(headers), ns(began - (waited or 0.0)), ns(finished), stages,
                                    **{"http.status_code": code})  # fmt: skip
        except Exception:  # noqa: BLE001 - tracing is an observer: a failure here costs a log line, not an answer
            logger.warning("tracing failed", exc_info=True)

    def _answer(self, calls: list, context: Any, responses: list, outcomes: list) -> None:
        """Run the surviving requests' inputs as one batch and encode each request's reply."""
        metrics = self.metrics
        items = [item for _, _, prepared in calls for item in prepared]
        metrics.batch(len(items))
        for item in items:
            stats = self.input_statistics(item)
            if stats:
                metrics.input(**stats)
        try:
            # This batch's CPUs (handlers.cpu_budget): its own (held since the batch began) and, for a
            # lone request, every idle one; all given back as soon as the inference ends.
            self.resize_threads(requests=len(calls))
            try:
                results = self.run(items)
            finally:
                if self.cpu is not None:
                    self.cpu.release()
            if len(results) != len(items):
                raise InferenceError(
                    f"{type(self).__name__}.postprocess returned {len(results)} results for "
                    f"{len(items)} inputs. Hint: return exactly one result per prepared item."
                )
        except Exception as exc:  # noqa: BLE001
            logger.exception("inference failed for a batch of %d inputs", len(items))
            results = [exc] * len(items)
        if len(calls) > 1 or len(items) > 1:
            logger.info("batch: %d requests, %d inputs", len(calls), len(items))
        start = 0
        for idx, call, prepared in calls:
            mine, start = results[start : start + len(prepared)], start + len(prepared)
            failure = next((r for r in mine if isinstance(r, BaseException)), None)
            try:
                if failure is not None:
                    raise failure
                reply = self.encode(call, mine)
                size = reply_size(reply.body)
                if size > self.max_response:
                    # Sent, this answer would make the frontend drop the worker and fail the whole batch.
                    raise ResponseTooLarge(
                        f"the answer would be {size} bytes; this server sends at most {self.max_response} "
                        "(ask for fewer outputs or elements, or a shorter id)"
                    )
            except Exception as exc:  # noqa: BLE001
                responses[idx] = payload = self._fail(context, idx, exc)
                outcomes[idx] = (payload["code"], payload["type"], time.perf_counter())
                continue
            context.set_response_content_type(idx, reply.content_type)
            for name, value in (reply.headers or {}).items():
                context.set_response_header(idx, name, value)
            responses[idx] = reply.body
            outcomes[idx] = (200, None, time.perf_counter())
            for result in mine:
                summary = self.summarize(result)
                if summary is not None:
                    metrics.prediction(*summary)
            self._answers[idx] = mine

    # ----------------------------------------------------------------- explanations (handlers.explain)
    def _explain_request(self, idx: int, request: dict, context: Any, responses: list, outcomes: list) -> None:
        """One explanation request: decoded like a prediction, answered by the served program, explained by
        ``explain`` on the FP32 reference within the ``explain:`` limits; any failure is this request's alone."""
        try:
            limits = self.settings.explain_limits
            headers = request_headers(context, idx)
            options = explain.read_options(headers, limits)
            call = self.decode(as_torchserve_decodes(request, headers), headers)
            explain.check_inputs(call.size, limits)
            if getattr(call, "request_id", "") is None:
                call.request_id = request_id(context, idx)
            items = self.prepare(call)
            if self._explain_budget is None:  # a pool's share is all of its own (idle) time, one at a time
                share = 1.0 if self.explainer else limits.max_share
                self._explain_budget = explain.ShareBudget(self.explainer or self.model_name, share)
            # The share first: a refused explanation (429) costs no inference. Then tens of inferences, on
            # this worker's own CPUs (handlers.cpu_budget), never borrowed ones.
            with self._explain_budget.claim(limits.timeout_s):
                deadline = time.monotonic() + limits.timeout_s
                self.resize_threads(requests=len(items), borrow=False)
                try:
                    results = self.run(items)  # the answer being explained: the served program's
                    failure = next((r for r in results if isinstance(r, BaseException)), None)
                    if failure is not None:
                        raise failure
                    answers = self.explain(call, items, results, options, deadline)
                finally:
                    if self.cpu is not None:
                        self.cpu.release()
            protocol = getattr(call, "protocol", "native")
            reply = explain.encode(protocol, answers, self.model_name, self.model_version, call.request_id)
            size = reply_size(reply.body)
            if size > self.max_response:
                raise ResponseTooLarge(
                    f"the explanation would be {size} bytes; this server sends at most {self.max_response} "
                    "(send fewer inputs, or leave out X-Explain-Heatmap)"
                )
        except Exception as exc:  # noqa: BLE001 - every error becomes this request's status
            if not isinstance(exc, HandlerError):
                logger.exception("explanation failed")
            responses[idx] = payload = self._fail(context, idx, exc)
            outcomes[idx] = (payload["code"], payload["type"], time.perf_counter())
            return
        context.set_response_content_type(idx, reply.content_type)
        responses[idx] = reply.body
        outcomes[idx] = (200, None, time.perf_counter())
        self._answers[idx] = []  # the prediction log keeps no copy of an explanation

    def reference_program(self) -> tuple[Any, str]:
        """The FP32 program explanations run on, and what it is (``handlers.explain.load_reference``); loaded
        once, at the first explanation, so a worker that never explains holds no second copy."""
        if self._reference is None:
            model_dir = Path(self.context.system_properties["model_dir"])
            serialized = (self.context.manifest or {}).get("model", {}).get("serializedFile", "model.pt")
            self._reference = explain.load_reference(
                model_dir, self.settings.precision, serialized, getattr(self.settings, "runtime", "torch")
            )
        return self._reference

    def _account(self, data: list[dict], context: Any, responses: list, outcomes: list, began: float) -> None:
        """Per request: the counters, the log line with its ID, and the sampled prediction log."""
        log = self.prediction_log
        for idx, (code, error_type, finished) in enumerate(outcomes):
            seconds = finished - began
            self.metrics.request(code, seconds, error_type)
            if not self.initialized:
                continue
            rid = request_id(context, idx)
            client_id = request_headers(context, idx).get("x-request-id")
            logger.info(
                "request %s %s %s: %d in %.1f ms%s",
                rid, self.model_name, self.model_version, code, seconds * 1000,
                f" (client id {_printable(client_id)})" if client_id else "",
            )  # fmt: skip
            if log is not None and log.sampled():
                answers = self._answers.get(idx)
                records = [result_record(r) for r in answers] if answers is not None else [responses[idx]]
                request = data[idx]
                body = request.get("body") if request.get("body") is not None else request.get("data")
                log.write(rid, body, records, seconds, code)
        self._answers.clear()

    @contextmanager
    def timed(self, stage: str):
        """Time a part of ``prepare`` as another stage (the image decoding inside it as ``decode``)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._nested[stage] = self._nested.get(stage, 0.0) + time.perf_counter() - started

    def run(self, items: list[Any]) -> list[Any]:
        """``inference`` + ``postprocess`` over ``items``, at most ``batch_size`` at a time.

        A request may carry several inputs, so a batch may hold more than ``batch_size``: slices
        keep every call to the model at a shape warm-up has already run. The handler config's
        ``faults`` (drills and tests only; never during warm-up) delay the batch and fail some inputs.
        """
        faults = getattr(self.settings, "faults", None) if self.initialized else None
        if faults is not None and faults.delay_ms:
            time.sleep(faults.delay_ms / 1000)
        metrics = self.metrics
        results: list[Any] = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            started = time.perf_counter()
            outputs = self.inference(chunk)
            inferred = time.perf_counter()
            results.extend(self.postprocess(outputs, chunk))
            done = time.perf_counter()
            metrics.stage("inference", inferred - started)
            metrics.stage("postprocess", done - inferred)
            first = self._batch_clock[0] if self._batch_clock is not None else started
            self._batch_clock = (first, inferred, done)  # several chunks: from the first call to the last
        if faults is not None and faults.error_rate:
            for i in range(len(results)):
                if faults.fails(self.inputs_seen):
                    results[i] = InjectedFault(f"injected fault (faults.error_rate {faults.error_rate:g})")
                self.inputs_seen += 1
        return results

    @staticmethod
    def _fail(context: Any, idx: int, exc: BaseException) -> dict:
        status, payload = error_payload(exc)
        if not isinstance(exc, HandlerError):
            logger.error("request %d failed unexpectedly: %r", idx, exc)
        # The reason phrase goes into the HTTP status line: one line, bounded.
        phrase = " ".join(payload["error"].split())[:200]
        context.set_response_status(status, phrase, idx=idx)
        context.set_response_content_type(idx, JSON_CONTENT_TYPE)
        return payload

    # ----------------------------------------------------------------- to implement
    def load(self, context: Any, config: Any) -> None:
        """Load the model (labels, transforms) once; ``config`` is ``self.settings``. Raise to refuse the archive."""
        raise NotImplementedError

    def decode(self, request: dict, headers: dict[str, str]) -> Any:
        """One request dict -> a call object with a ``size`` (its model inputs) and, if the protocol has one,
        a ``request_id`` (None: the base fills in TorchServe's)."""
        raise NotImplementedError

    def prepare(self, call: Any) -> list[Any]:
        """The call's model inputs, ``call.size`` of them."""
        raise NotImplementedError

    def encode(self, call: Any, results: list[Any]) -> Any:
        """The call's results (one per prepared input, in order) -> its ``handlers.protocols.Reply``."""
        raise NotImplementedError

    def inference(self, items: list[Any]) -> Any:
        """The model's outputs for at most ``batch_size`` prepared inputs."""
        raise NotImplementedError

    def postprocess(self, outputs: Any, items: list[Any]) -> list[Any]:
        """``inference``'s outputs -> exactly one result per item."""
        raise NotImplementedError

    def warmup_items(self, batch_size: int) -> list[Any]:
        """``batch_size`` valid prepared inputs, run through ``inference`` and ``postprocess`` at warm-up."""
        raise NotImplementedError

    def warmup_requests(self) -> list[dict]:
        """Request dicts like TorchServe's, run through ``handle`` at warm-up (none by default)."""
        return []

    def explain(self, call: Any, items: list[Any], results: list[Any], options: Any, deadline: float) -> list[dict]:
        """Optional: one JSON explanation per prepared input of an explanation request (``handlers.explain``).

        ``results`` are the served program's answers to ``items``; ``options`` the request's
        ``handlers.explain.ExplainOptions``; ``deadline`` a ``time.monotonic()`` to stop by. Compute on
        ``self.reference_program()`` with ``handlers.explain.integrated_gradients`` and start each answer
        with ``handlers.explain.describe``. Not implemented: the request gets 501.
        """
        raise NotExplainable(f"{type(self).__name__} offers no explanations (it does not implement explain)")

    # ----------------------------------------------------------------- what the metrics see (optional)
    def summarize(self, result: Any) -> tuple[str, float] | None:
        """One answered input's top-1 label and confidence, for the prediction metrics (none by default)."""
        return None

    def input_statistics(self, item: Any) -> dict[str, float] | None:
        """Cheap statistics of one prepared input (``brightness``, ``megapixels``) for drift (none by default)."""
        return None


def handler_options(yaml_config: dict) -> dict[str, Any]:
    """The ``handler_options:`` section of model-config.yaml: free-form, for a handler of your own; ``{}`` if absent."""
    options = yaml_config.get("handler_options")
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise RuntimeError(
            f"handler_options in model-config.yaml must be a mapping of option names to values, "
            f"got {type(options).__name__}: {options!r:.80}"
        )
    return dict(options)


def request_id(context: Any, idx: int) -> str:
    """TorchServe's ID of request ``idx``: the frontend sends it back in the ``x-request-id`` header."""
    getter = getattr(context, "get_request_id", None)
    return str(getter(idx)) if getter is not None else "-"


def result_record(result: Any) -> Any:
    """One result as the prediction log writes it."""
    return dataclasses.asdict(result) if dataclasses.is_dataclass(result) else repr(result)


def _printable(value: str, limit: int = 64) -> str:
    """A client-chosen string, safe for one log line: printable ASCII, bounded."""
    return "".join(ch if 32 < ord(ch) < 127 else "?" for ch in value[:limit])


def request_headers(context: Any, idx: int) -> dict[str, str]:
    """The HTTP headers of request ``idx``, names in lower case (TorchServe keeps the client's case)."""
    getter = getattr(context, "get_all_request_header", None)
    headers = getter(idx) if getter is not None else None
    return {str(k).lower(): v for k, v in (headers or {}).items() if isinstance(v, str)}


class _WarmupContext:
    """Stands in for TorchServe's context during warm-up: the answers go nowhere."""

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        pass

    def set_response_content_type(self, idx: int, value: str) -> None:
        pass

    def set_response_header(self, idx: int, key: str, value: str) -> None:
        pass
