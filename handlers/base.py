"""The thin shared base of every handler: the batch contract and error mapping, in one place.

Workflow of a handler built on ``BatchHandler``:

1. ``load(context, config)``: load the model and build everything per-request work needs;
2. ``preprocess(request)``: ONE request dict -> a prepared item (raise a ``HandlerError`` to fail
   only that request);
3. ``inference(items)``: the prepared items of the batch that survived step 2 -> model outputs;
4. ``postprocess(outputs, items)``: -> one JSON-serialisable response per item.

``handle`` runs the steps, guarantees N responses for N requests, and turns every error into a
per-request status with a JSON body. ``initialize`` joins the machine-wide CPU budget
(``handlers.cpu_budget``: torch's thread pool follows the number of live workers, re-checked
between batches) and warms the model up at every batch size the worker can receive.

Minimal example::

    class Echo(BatchHandler):
        def load(self, context, config): pass
        def preprocess(self, request): return request["body"]
        def inference(self, items): return items
        def postprocess(self, outputs, items): return [{"echo": len(o)} for o in outputs]
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch

from handlers.config import HandlerConfig
from handlers.cpu_budget import CpuBudget
from handlers.errors import HandlerError, InferenceError, error_payload

logger = logging.getLogger(__name__)

JSON_CONTENT_TYPE = "application/json"


class BatchHandler:
    """Base class: subclasses implement ``load``, ``preprocess``, ``inference``, ``postprocess``."""

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
        ready: list[tuple[int, Any]] = []
        for idx, request in enumerate(data):
            try:
                ready.append((idx, self.preprocess(request)))
            except Exception as exc:  # noqa: BLE001 - every error becomes this request's status
                responses[idx] = self._fail(context, idx, exc)

        if ready:
            items = [item for _, item in ready]
            try:
                outputs = self.postprocess(self.inference(items), items)
                if len(outputs) != len(items):
                    raise InferenceError(
                        f"{type(self).__name__}.postprocess returned {len(outputs)} results for "
                        f"{len(items)} inputs. Hint: return exactly one result per prepared item."
                    )
            except Exception as exc:  # noqa: BLE001
                logger.exception("inference failed for a batch of %d", len(items))
                outputs = [exc] * len(items)
            for (idx, _), output in zip(ready, outputs, strict=True):
                if isinstance(output, BaseException):
                    responses[idx] = self._fail(context, idx, output)
                else:
                    context.set_response_content_type(idx, JSON_CONTENT_TYPE)
                    responses[idx] = output
        return responses

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

    def preprocess(self, request: dict) -> Any:
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


class _WarmupContext:
    """Stands in for TorchServe's context during warm-up: the answers go nowhere."""

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        pass

    def set_response_content_type(self, idx: int, value: str) -> None:
        pass
