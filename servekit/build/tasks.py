"""The tasks the build knows, keyed by the spec's ``handler:`` value: what differs between them, as hooks.

Everything else in the build is shared (``servekit.build.archive``: weights cache, export, the
accuracy gate, packaging, manifest; ``servekit.build.spec``: validation). A task says:

================================  =========================================================
``handler_file``                  the TorchServe entry point in the archive
``metric``, ``metric_label``,     the held-out metric (points, 0..100: ``top1``, ``map50``),
``unit``                          how logs name it, what the evaluation counts (``images``)
``spec_keys``, ``options_key``    the spec keys only this task takes; its own section, if any
``calibrated``                    whether INT8 needs calibration data (``quantization.calibration``)
``data_kinds``, ``user_models``   the user's ``data:`` it takes (``folder``, ``csv``) and its own models
                                  (``file``, ``torchvision``, ``program``: ``servekit.build.user_model``)
``classifier``                    a user's model must answer one score per label (checked at build)
``runtimes``                      the engines ``runtime:`` may name (a tensor-in, tensor-out program only)
``architectures()``,              the names ``architecture:`` and ``evaluation`` / ``weights.train`` /
``datasets()``                    ``quantization.calibration`` may take
``parse_protocol(data)``          the ``protocol:`` section -> its typed config (``to_dict()``)
``parse_options(data)``           the ``options_key`` section -> its typed options (``to_dict()``) or None
``check(spec)``                   cross-field checks; raise ``ValueError("field: message")``
``handler_config(spec)``          the ``handler:`` section of model-config.yaml (typed, ``to_dict()``, and
                                  ``precision``/``quantized_engine``/``optimize`` for the model loader)
``oip_metadata(spec)``            inputs, outputs and parameters of ``GET /v2/models/NAME``
``recipe(spec)``                  what determines trained weights (the cache key; JSON-able)
``train(spec, log)``              FP32 weights as a state_dict
``build_model(spec)``             the ``nn.Module`` those weights load into
``tune(model, spec, log)``        the spec as built: settings the task chooses from the FP32 model on data
                                  that is not held out (default: ``spec`` unchanged)
``example_input(spec)``           the tensor the program is traced with
``convert(model, spec, log)``     the reduced-precision module (``spec.precision``: int8, bf16)
``evaluation_data(spec)``         the held-out split, prepared once (``len()`` = the count), or None
``evaluate(program, data, spec)`` the metric of a loaded program, in points
``measure(program, data, spec)``  the metric and further held-out figures in points, ``{name: points}``, for
                                  the version's own program (logged, and kept in metadata's ``accuracy``)
``drift_reference(program,        the archive's drift reference (``servekit.build.reference``), or None
data, spec)``
``archive_files(spec, folder)``   files beside the program (``labels.json``; a task adds its own)
``golden_label_error(label,       why a golden set's expected ``label`` cannot be an answer's, or None
labels)``
``golden_from_data(data)``        ``golden_set: auto``: (file name, label, bytes) of a few held-out inputs
================================  =========================================================

Register a task in ``TASKS`` as ``"module:Class"``; modules are imported when first used, so the
spec (and a task module that subclasses ``Task``) can import this one freely. This module imports
nothing else of the build: the spec reads the registry, each task module (``image_classifier``,
``tabular``, ``detection``) uses training, conversion and the spec, and no import leads back.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Collection, Sized
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

Log = Callable[[str], None]

TASKS: dict[str, str] = {
    "image_classifier": "servekit.build.image_classifier:ImageClassifierTask",
    "tabular_classifier": "servekit.build.tabular:TabularClassifierTask",
    "object_detector": "servekit.build.detection:DetectorTask",
}


class Task:
    """The hooks of one task (see the module docstring); subclasses set the attributes and override the hooks."""

    handler: str = ""
    handler_file: str = ""
    metric: str = "top1"
    metric_label: str = "top-1"
    unit: str = "images"
    spec_keys: frozenset[str] = frozenset()
    options_key: str | None = None
    calibrated: bool = True
    data_kinds: tuple[str, ...] = ()
    user_models: frozenset[str] = frozenset()
    classifier: bool = False  # a model of its own must answer [N, len(labels)]: one score per label
    runtimes: tuple[str, ...] = ("torch",)  # the engines ``runtime:`` may name (handlers.runtimes)

    # ------------------------------------------------------------------ the spec
    def architectures(self) -> Collection[str]:
        raise NotImplementedError

    def datasets(self) -> Collection[str]:
        raise NotImplementedError

    def parse_protocol(self, data: dict | None) -> Any:
        raise NotImplementedError

    def parse_options(self, data: Any) -> Any:
        return None

    def check(self, spec: Any) -> None:
        """Cross-field checks of a resolved version; raise ``ValueError("field: message")``."""

    def handler_config(self, spec: Any) -> Any:
        raise NotImplementedError

    def oip_metadata(self, spec: Any) -> dict:
        raise NotImplementedError

    # ------------------------------------------------------------------ weights
    def recipe(self, spec: Any) -> dict:
        raise NotImplementedError

    def train(self, spec: Any, log: Log) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def build_model(self, spec: Any) -> nn.Module:
        raise NotImplementedError

    def tune(self, model: nn.Module, spec: Any, log: Log) -> Any:
        """The spec as built, with what the task chooses from the FP32 model (never on held-out data)."""
        return spec

    # ------------------------------------------------------------------ the program
    def example_input(self, spec: Any) -> torch.Tensor:
        raise NotImplementedError

    def convert(self, model: nn.Module, spec: Any, log: Log) -> nn.Module:
        raise NotImplementedError

    def calibration_inputs(self, spec: Any) -> torch.Tensor:
        """The inputs static INT8 in another runtime calibrates on (``runtime:`` with ``precision: int8``)."""
        raise NotImplementedError

    def fp32_program(self, model: nn.Module, spec: Any) -> nn.Module:
        """The module the FP32 program is exported from: the trained one unless a layout serves it faster."""
        return model

    # ------------------------------------------------------------------ evaluation
    def evaluation_data(self, spec: Any) -> Sized | None:
        raise NotImplementedError

    def evaluate(self, program: Callable[[torch.Tensor], Any], data: Any, spec: Any) -> float:
        raise NotImplementedError

    def measure(self, program: Callable[[torch.Tensor], Any], data: Any, spec: Any) -> tuple[float, dict]:
        """``evaluate`` and further held-out figures in points (none by default)."""
        return self.evaluate(program, data, spec), {}

    def drift_reference(self, program: Callable[[torch.Tensor], Any], data: Any, spec: Any) -> dict | None:
        return None

    # ------------------------------------------------------------------ the archive
    def archive_files(self, spec: Any, directory: Path) -> None:
        (directory / "labels.json").write_text(json.dumps(list(spec.labels)))

    def golden_label_error(self, label: str, labels: Collection[str]) -> str | None:
        """Why ``label`` cannot be the answer's label (``servekit promote``'s golden check), or None."""
        return None if label in labels else f"label {label!r} is not one of the model's labels"

    def golden_from_data(self, data: Any) -> list[tuple[str, str, bytes]]:
        """``golden_set: auto``: a few held-out inputs per class of the user's data, as (name, label, bytes)."""
        raise NotImplementedError


@cache
def task_for(handler: str) -> Task:
    """The task registered for ``handler`` (KeyError for an unknown one: the spec refuses those first)."""
    module, _, name = TASKS[handler].partition(":")
    task = getattr(importlib.import_module(module), name)()
    if task.handler != handler:
        raise RuntimeError(f"TASKS[{handler!r}] is {TASKS[handler]}, whose handler is {task.handler!r}")
    return task


def task_keys() -> frozenset[str]:
    """Every task-specific spec key: a version may use only its own task's."""
    return frozenset().union(*(task_for(handler).spec_keys for handler in TASKS))
