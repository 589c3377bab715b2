"""The text classifier's build: a task of the user's own (``servekit.build.tasks.Task``), not the toolkit's.

Data (``tickets``): generated support tickets in four queues (``tickets.py``). Model: a bag of
words (``nn.EmbeddingBag`` averaging word vectors, padding ignored) and a small MLP, over token ids
from a vocabulary built on the training split. INT8 is dynamic quantization of the Linear layers
(no calibration); the metric is held-out accuracy, so INT8 is gated against FP32 like any version.
BF16 is refused: the program's input is token ids, which BF16 cannot carry.

The archive gets ``labels.json``, ``vocab.json`` and ``text_support.py`` (the tokenizer and the
handler's config, which the handler imports in the worker).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from text_support import PAD, TextConfig, encode, words
from tickets import LABELS, tickets
from torch import nn

from servekit.build.reference import classifier_reference
from servekit.build.tasks import Task

HERE = Path(__file__).resolve().parent
SOURCES = ("tickets.py", "text_support.py")  # what the weights and the archive depend on besides this file


@dataclass(frozen=True)
class TextOptions:
    """The spec's ``options:`` section."""

    max_length: int = 32
    vocab_size: int = 2000
    dim: int = 32
    hidden: int = 32

    @classmethod
    def from_dict(cls, data: Any) -> TextOptions:
        data = data or {}
        if not isinstance(data, dict):
            raise ValueError(f"must be a mapping ({', '.join(f.name for f in fields(cls))}), got {data!r}")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown key in options (valid: {', '.join(f.name for f in fields(cls))})")
        options = cls(**data)
        for name, value in asdict(options).items():
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 100_000:
                raise ValueError(f"{name}: must be a whole number from 1 to 100000, got {value!r}")
        return options

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TextProtocol:
    """OIP names: one BYTES input of texts, a BYTES ``label`` and an FP32 ``score`` output."""

    text_input: str = "text"

    def to_dict(self) -> dict:
        return asdict(self)


class BagOfWords(nn.Module):
    def __init__(self, vocab_size: int, dim: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab_size, dim, mode="mean", padding_idx=PAD)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(ids))


def vocabulary(size: int) -> dict[str, int]:
    """The ``size - 2`` commonest words of the training split (ids from 2: 0 pads, 1 is unknown)."""
    texts, _ = tickets("train")
    counts = Counter(word for text in texts for word in words(text))
    common = sorted(counts, key=lambda w: (-counts[w], w))[: size - 2]
    return {word: i + 2 for i, word in enumerate(common)}


class TextEvaluation:
    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.labels)


class TextTask(Task):
    handler = "text_classifier"
    handler_file = ""  # the spec's handler: {file: text_handler.py}
    metric = "accuracy"
    metric_label = "accuracy"
    unit = "texts"
    options_key = "options"
    calibrated = False

    def architectures(self):
        return ("bag_of_words",)

    def datasets(self):
        return ("tickets",)

    def parse_protocol(self, data: dict | None) -> TextProtocol:
        return TextProtocol(**(data or {}))

    def parse_options(self, data: Any) -> TextOptions:
        return TextOptions.from_dict(data)

    def check(self, spec: Any) -> None:
        if spec.precision == "bf16":
            raise ValueError("precision: bf16 cannot carry token ids; use fp32 or int8")
        if list(spec.labels) != list(LABELS):
            raise ValueError(f"labels: the tickets data set's queues are {list(LABELS)}, got {list(spec.labels)}")

    def handler_config(self, spec: Any) -> TextConfig:
        return TextConfig(
            precision=spec.precision,
            threads=spec.serving.threads,
            quantized_engine=spec.quantization.backend if spec.quantization is not None else "x86",
            faults=spec.faults,
            prediction_log=spec.monitoring.prediction_log,
            max_length=spec.options.max_length,
        )

    def oip_metadata(self, spec: Any) -> dict:
        return {
            "platform": "servekit_text_classifier",
            "inputs": [{"name": spec.protocol.text_input, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                        {"name": "score", "datatype": "FP32", "shape": [-1]}],
        }  # fmt: skip

    def recipe(self, spec: Any) -> dict:
        sources = {name: hashlib.sha256((HERE / name).read_bytes()).hexdigest() for name in SOURCES}
        return {"task": self.handler, "options": spec.options.to_dict(), "seed": spec.weights.seed,
                "epochs": spec.weights.epochs, "labels": list(spec.labels), "sources": sources,
                "recipe_version": 1}  # fmt: skip

    def tensors(self, spec: Any, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        vocab, length = vocabulary(spec.options.vocab_size), spec.options.max_length
        texts, labels = tickets(split)
        return torch.tensor([encode(t, vocab, length) for t in texts]), torch.tensor(labels)

    def train(self, spec: Any, log) -> dict[str, torch.Tensor]:
        x, y = self.tensors(spec, "train")
        log(f"training a bag of words on {len(x)} tickets ({spec.options.vocab_size} words)")
        torch.manual_seed(spec.weights.seed)
        model = self.build_model(spec)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        generator = torch.Generator().manual_seed(spec.weights.seed)
        for epoch in range(1, spec.weights.epochs + 1):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), 32):
                index = order[start : start + 32]
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(x[index]), y[index])
                loss.backward()
                optimizer.step()
            if epoch == 1 or epoch % 5 == 0 or epoch == spec.weights.epochs:
                log(f"epoch {epoch}/{spec.weights.epochs}: loss {loss.item():.4f}")
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def build_model(self, spec: Any) -> nn.Module:
        o = spec.options
        return BagOfWords(o.vocab_size, o.dim, o.hidden, len(spec.labels))

    def example_input(self, spec: Any) -> torch.Tensor:
        return torch.zeros((1, spec.options.max_length), dtype=torch.long)

    def convert(self, model: nn.Module, spec: Any, log) -> nn.Module:
        from torch.ao.quantization import quantize_dynamic

        log("dynamic INT8 quantization of the Linear layers")
        torch.backends.quantized.engine = spec.quantization.backend
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return quantize_dynamic(model.eval(), {nn.Linear}, dtype=torch.qint8)

    def evaluation_data(self, spec: Any) -> TextEvaluation | None:
        return TextEvaluation(*self.tensors(spec, "holdout")) if spec.evaluation else None

    @torch.inference_mode()
    def evaluate(self, program, data: TextEvaluation, spec: Any) -> float:
        predicted = program(data.inputs).argmax(1)
        return 100.0 * float((predicted == data.labels).float().mean())

    def drift_reference(self, program, data: TextEvaluation, spec: Any) -> dict:
        return classifier_reference(program, data.inputs, spec.labels, "tickets holdout")

    def archive_files(self, spec: Any, directory: Path) -> None:
        super().archive_files(spec, directory)
        (directory / "vocab.json").write_text(json.dumps(vocabulary(spec.options.vocab_size)))
        shutil.copyfile(HERE / "text_support.py", directory / "text_support.py")
