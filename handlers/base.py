"""The thin shared base of every handler: the batch contract and error mapping, in one place.

Workflow of a handler built on ``BatchHandler``, for each server-side batch of requests:

1. ``decode(request, headers)``: ONE request dict (and its HTTP headers, lower-case names) -> a
   call object with a ``size``: how many model inputs the request carries (an OIP or KServe v1
   request may carry several images; ``handlers.protocols``). Raise a ``HandlerError`` to fail
   only that request;
2. ``prepare(call)``: -> the call's model inputs, one per element (failures fail that request);
3. ``run(items)``: the inputs of every surviving request of the batch, in slices of at most the
   batch size the model was warmed up for: ``inference`` then ``postprocess`` -> one result per
   input;
4. ``encode(call, results)``: -> the request's ``protocols.Reply`` (body, content type, headers).

``handle`` runs the steps, guarantees N responses for N requests, and turns every error into a
per-request status with a JSON body. ``initialize`` joins the machine-wide CPU budget
(``handlers.cpu_budget``: torch's thread pool follows the number of live workers, re-checked
between batches) and warms the model up at every batch size the worker can receive.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch

from handlers.config import HandlerConfig
from handlers.cpu_budget import CpuBudget
from handlers.errors import HandlerError, InferenceError, InjectedFault, error_payload

logger = logging.getLogger(__name__)

JSON_CONTENT_TYPE = "application/json"


class BatchHandler:
    """Base class: subclasses implement ``load``, ``decode``, ``prepare``, ``inference``, ``postprocess``,
    ``encode`` and ``warmup_items``."""

    # TorchScript's profiling executor specialises a graph on its first calls for each shape.
    warmup_rounds = 3
    # The typed ``handler:`` section of model-config.yaml (``from_dict``; a ``threads`` attribute).
    config_type: type = HandlerConfig

    def __init__(self) -> None:
        self.initialized = False
        self.context: Any = None
        self.settings: Any = None
        self.batch_size = 1
        self.cpu: CpuBudget | None = None
        self.inputs_seen = 0  # counts inputs for the deterministic injected faults

    # ----------------------------------------------------------------- lifecycle
    def initialize(self, context: Any) -> None:
        self.context = context
        yaml_config = getattr(context, "model_yaml_config", None) or {}
        self.settings = self.config_type.from_dict(yaml_config.get("handler"))
        self.batch_size = max(1, int(context.system_properties.get("batch_size") or 1))
        pinned = self.settings.threads
        self.cpu = CpuBudget(label=f"{getattr(context, 'model_name', '?')} pid {os.getpid()}", pinned=pinned)
        self.cpu.register()
        threads = self.resize_threads(force=True)
        started = time.perf_counter()
        self.load(context, self.settings)
        loaded = time.perf_counter()
        self.warm_up()
        logger.info(
            "initialized: %d torch threads, load %.2fs, warm-up for batch sizes 1..%d %.2fs",
            threads,
            loaded - started,
            self.batch_size,
            time.perf_counter() - loaded,
        )
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
        requests = self.warmup_requests()
        for _ in range(self.warmup_rounds if requests else 0):
            for start in range(0, len(requests), self.batch_size):
                self.handle(requests[start : start + self.batch_size], _WarmupContext())

    def resize_threads(self, force: bool = False) -> int:
        """Follow this worker's share of the CPU budget; logs every change with its reason."""
        if self.cpu is None:
            return torch.get_num_threads()
        threads, reason = self.cpu.refresh(force=force)
        if reason is not None:
            torch.set_num_threads(threads)
            logger.info("cpu budget: %s", reason)
        return threads

    # ----------------------------------------------------------------- the batch contract
    def handle(self, data: list[dict], context: Any) -> list[Any]:
        """N requests in, N responses out; a failure costs only the request it belongs to."""
        self.resize_threads()
        responses: list[Any] = [None] * len(data)
        calls: list[tuple[int, Any, list[Any]]] = []
        for idx, request in enumerate(data):
            try:
                call = self.decode(request, request_headers(context, idx))
                calls.append((idx, call, self.prepare(call)))
            except Exception as exc:  # noqa: BLE001 - every error becomes this request's status
                responses[idx] = self._fail(context, idx, exc)
        if not calls:
            return responses

        items = [item for _, _, prepared in calls for item in prepared]
        try:
            results = self.run(items)
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
            except Exception as exc:  # noqa: BLE001
                responses[idx] = self._fail(context, idx, exc)
                continue
            context.set_response_content_type(idx, reply.content_type)
            for name, value in (reply.headers or {}).items():
                context.set_response_header(idx, name, value)
            responses[idx] = reply.body
        return responses

    def run(self, items: list[Any]) -> list[Any]:
        """``inference`` + ``postprocess`` over ``items``, at most ``batch_size`` at a time.

        A request may carry several inputs, so a batch may hold more than ``batch_size``: slices
        keep every call to the model at a shape warm-up has already run. The handler config's
        ``faults`` (drills and tests only; never during warm-up) delay the batch and fail some inputs.
        """
        faults = getattr(self.settings, "faults", None) if self.initialized else None
        if faults is not None and faults.delay_ms:
            time.sleep(faults.delay_ms / 1000)
        results: list[Any] = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            results.extend(self.postprocess(self.inference(chunk), chunk))
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
        raise NotImplementedError

    def decode(self, request: dict, headers: dict[str, str]) -> Any:
        raise NotImplementedError

    def prepare(self, call: Any) -> list[Any]:
        raise NotImplementedError

    def encode(self, call: Any, results: list[Any]) -> Any:
        raise NotImplementedError

    def inference(self, items: list[Any]) -> Any:
        raise NotImplementedError

    def postprocess(self, outputs: Any, items: list[Any]) -> list[Any]:
        raise NotImplementedError

    def warmup_items(self, batch_size: int) -> list[Any]:
        raise NotImplementedError

    def warmup_requests(self) -> list[dict]:
        """Request dicts like TorchServe's, run through ``handle`` at warm-up (none by default)."""
        return []


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
