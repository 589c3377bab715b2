"""The image classifier's build: images in any protocol -> top-k classes (``handlers.image_classifier``).

The built-in architectures (``servekit.build.architectures``: the digits CNN) and torchvision
classifiers, the user's own models; weights trained on rendered images or the user's folder
(``servekit.build.training``); INT8 is static FX quantization calibrated on training images, BF16
casts weights and activations (``servekit.build.convert``); the metric is held-out top-1, and the
drift reference is taken on the held-out set (``servekit.build.reference``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sized
from pathlib import Path
from typing import Any

import torch
from torch import nn

from handlers.config import HandlerConfig
from handlers.protocols import ProtocolConfig
from handlers.protocols import oip_metadata as protocol_metadata
from servekit.build import convert, reference, training
from servekit.build.architectures import ARCHITECTURES, build_architecture
from servekit.build.datasets import DATASETS, images
from servekit.build.tasks import Log, Task


class ImageClassifierTask(Task):
    """Images in any protocol -> top-k classes: the digits CNN, torchvision classifiers (``handlers.image_classifier``).

    Weights trained on rendered images (``servekit.build.training``); INT8 is static FX quantization
    calibrated on training images; BF16 casts weights and activations; the metric is held-out top-1.
    """

    handler = "image_classifier"
    handler_file = "handlers/image_classifier.py"
    spec_keys = frozenset({"topk", "preprocessing", "limits"})
    data_kinds = ("folder",)
    user_models = frozenset({"file", "torchvision", "program"})
    classifier = True
    runtimes = ("torch", "openvino", "onnxruntime")  # a tensor in, one tensor of scores out

    def architectures(self) -> Collection[str]:
        return ARCHITECTURES

    def datasets(self) -> Collection[str]:
        return DATASETS

    def parse_protocol(self, data: dict | None) -> Any:
        return ProtocolConfig.from_dict(data)

    def handler_config(self, spec: Any) -> Any:
        return HandlerConfig(
            precision=spec.precision,
            runtime=spec.engine,
            topk=spec.topk,
            preprocessing=spec.preprocessing,
            limits=spec.limits,
            threads=spec.serving.threads,
            quantized_engine=spec.quantization.backend if spec.quantization is not None else "x86",
            protocol=spec.protocol,
            faults=spec.faults,
            prediction_log=spec.monitoring.prediction_log,
            explain=spec.explain,
        )

    def oip_metadata(self, spec: Any) -> dict:
        return protocol_metadata(spec.protocol, spec.preprocessing.input_shape, len(spec.labels))

    def recipe(self, spec: Any) -> dict:
        recipe = {
            "architecture": spec.architecture_key,
            "train": spec.weights.train,
            "seed": spec.weights.seed,
            "epochs": spec.weights.epochs,
            "labels": list(spec.labels),
            "preprocessing": spec.preprocessing.to_dict(),
            "sizes": training.TRAIN_SIZES,
            "recipe_version": 1,
        }
        if spec.weights.train == "data":
            recipe["data_sha256"] = spec.data.sha256  # the user's images, by content
        return recipe

    def train(self, spec: Any, log: Log) -> dict[str, torch.Tensor]:
        return training.train(spec, log)

    def build_model(self, spec: Any) -> nn.Module:
        if not isinstance(spec.architecture, str):
            return spec.architecture.build(len(spec.labels))  # the user's module or a torchvision builder
        return build_architecture(spec.architecture, len(spec.labels))

    def example_input(self, spec: Any) -> torch.Tensor:
        return torch.zeros((1, *spec.preprocessing.input_shape))

    def convert(self, model: nn.Module, spec: Any, log: Log) -> nn.Module:
        if spec.precision == "int8":
            return convert.quantize_static(model, spec, log)
        if spec.precision == "bf16":
            return convert.to_bf16(model)
        raise ValueError(f"precision: {spec.precision!r} is not a reduced precision of {self.handler}")

    def calibration_inputs(self, spec: Any) -> torch.Tensor:
        return convert.calibration_inputs(spec)  # training images (never held-out ones), or synthetic

    def fp32_program(self, model: nn.Module, spec: Any) -> nn.Module:
        return convert.channels_last(model)  # oneDNN's fastest FP32 convolution layout on CPU

    def evaluation_data(self, spec: Any) -> Sized | None:
        data = convert.evaluation_set(spec)
        if data is None:
            return None
        sizes = [image.size for image in images(spec, spec.evaluation, "holdout").images]
        return ImageEvaluation(*data, sizes)

    def evaluate(self, program: Callable[[torch.Tensor], Any], data: Any, spec: Any) -> float:
        return convert.top1_accuracy(program, data.inputs, data.labels)

    def drift_reference(self, program: Callable[[torch.Tensor], Any], data: Any, spec: Any) -> dict | None:
        return reference.drift_reference(
            program, data.inputs, spec.labels, data.sizes, spec.preprocessing.mean, spec.preprocessing.std,
            f"{spec.data_source} holdout",
        )  # fmt: skip

    def golden_from_data(self, data: Any) -> list[tuple[str, str, bytes]]:
        return [(f"{label}_{Path(path).name}", label, Path(path).read_bytes()) for path, label in data.golden()]


class ImageEvaluation:
    """The held-out images, preprocessed as the handler does, their labels and the decoded sizes."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, sizes: list[tuple[int, int]]) -> None:
        self.inputs, self.labels, self.sizes = inputs, labels, sizes

    def __len__(self) -> int:
        return len(self.labels)
