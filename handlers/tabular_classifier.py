"""TorchServe entry point for tabular classification (FP32, INT8 or BF16): one class per record.

TorchServe requires this module to define exactly one class: the feature schema, the record
validation and the protocols live in ``handlers.tabular``. Settings are the archive's ``handler:``
section, typed and validated by ``handlers.tabular.TabularConfig``.

A request carries one record or several (at most ``max_records``); every record is one model input,
so the records of all the requests of a server-side batch go through the model together. Answers,
one top-1 prediction per record in the request's order:

* servekit's own (``/predictions/NAME``, a JSON record or a list of records)::

    {"predictions": [{"label": "benign", "index": 1, "probability": 0.97}, ...],
     "model": name, "version": version}

* KServe v1 (``{"instances": [...]}``): the same predictions, with ``model_name`` and ``model_version``;
* Open Inference Protocol v2 (an FP32 tensor ``[N, F]``): tensors ``labels`` (BYTES), ``scores``
  (FP32) and ``indices`` (INT64), each ``[N, 1]``, in JSON or binary.

A record with a missing, unknown, non-numeric, non-finite or far-out-of-range feature fails its
request with a 400 that names the record and the feature; the batch's other requests are answered.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from handlers import explain, tabular
from handlers.base import BatchHandler
from handlers.model_loading import load_model, verify_program
from handlers.protocols import Classification, Reply
from handlers.tabular import RecordSchema, TabularCall, TabularConfig


class TabularClassifier(BatchHandler):
    """Decode and validate records -> batched softmax MLP over every record of the batch -> top-1 per record."""

    config_type = TabularConfig

    def load(self, context: Any, config: TabularConfig) -> None:
        model_dir = Path(context.system_properties["model_dir"])
        manifest = context.manifest or {}
        serialized = manifest.get("model", {}).get("serializedFile", "model.pt")
        verify_program(model_dir, serialized)
        self.model = load_model(model_dir / serialized, config)
        self.labels = json.loads((model_dir / config.labels_file).read_text())
        self.protocol = config.protocol
        self.schema = RecordSchema(config.features, config.max_records)
        typical = self.schema.typical()
        self._typical = np.array([typical[name] for name in self.schema.names], dtype=np.float32)
        with torch.inference_mode():
            out = self.model(torch.from_numpy(self._typical[None]))
        if tuple(out.shape) != (1, len(self.labels)):
            raise RuntimeError(
                f"the program answers {list(out.shape)} for one record of {self.schema.width} features, "
                f"not [1, {len(self.labels)}] (one score per label)"
            )

    # ------------------------------------------------------------------ per request
    def decode(self, request: dict, headers: dict[str, str]) -> TabularCall:
        return tabular.decode(request, headers, self.schema, self.protocol)

    def prepare(self, call: TabularCall) -> list[np.ndarray]:
        """Every record is one model input (a float32 row, already validated)."""
        return list(call.rows)

    def encode(self, call: TabularCall, results: list[Classification]) -> Reply:
        return call.encode(results, self.model_name, self.model_version, self.protocol)

    # ------------------------------------------------------------------ per batch
    @torch.inference_mode()
    def inference(self, items: list[np.ndarray]) -> torch.Tensor:
        return torch.softmax(self.model(torch.from_numpy(np.stack(items))).float(), dim=1)

    def postprocess(self, outputs: torch.Tensor, items: list[np.ndarray]) -> list[Classification]:
        probabilities, indices = outputs.max(dim=1)
        labels = self.labels
        return [
            Classification([labels[i]], [i], [p]) for p, i in zip(probabilities.tolist(), indices.tolist(), strict=True)
        ]

    # ------------------------------------------------------------------ explanations
    BASELINE = "the feature schema's typical record: every feature at the middle of its training range"

    def explain(
        self, call: TabularCall, items: list[np.ndarray], results: list[Classification],
        options: explain.ExplainOptions, deadline: float,
    ) -> list[dict]:  # fmt: skip
        """Integrated Gradients per feature, signed, in the schema's order and units, for the answered (or
        requested) class, against the typical record (handlers.explain)."""
        program, what = self.reference_program()
        inputs = torch.from_numpy(np.stack(items)).float()
        baseline = torch.from_numpy(self._typical[None]).float()
        targets = [explain.target_index(options.target, self.labels, r.indices[0]) for r in results]
        attribution = explain.integrated_gradients(program, inputs, baseline, targets, options.steps, deadline)
        answers = []
        for i, (row, result, target) in enumerate(zip(items, results, targets, strict=True)):
            answer = explain.describe(
                attribution, i, what, self.BASELINE, result.as_predictions()[0], target, self.labels
            )
            values = attribution.attributions[i].tolist()
            answer["features"] = [
                {"name": feature.name, "unit": feature.unit, "value": float(f"{row[j]:.7g}"),
                 "baseline": float(f"{self._typical[j]:.7g}"), "attribution": float(f"{values[j]:.6g}")}
                for j, feature in enumerate(self.schema.features)
            ]  # fmt: skip
            answer["ranking"] = [self.schema.features[j].name for j in np.argsort(-np.abs(values), kind="stable")]
            answers.append(answer)
        return answers

    # ------------------------------------------------------------------ what the metrics see
    def summarize(self, result: Classification) -> tuple[str, float] | None:
        return result.labels[0], result.scores[0]

    # ------------------------------------------------------------------ warm-up
    def warmup_items(self, batch_size: int) -> list[np.ndarray]:
        return [self._typical] * batch_size

    def warmup_requests(self) -> list[dict]:
        """A record, a list, KServe v1 and OIP JSON: every decoding path once, as TorchServe sends them."""
        record = self.schema.typical()
        oip = {"inputs": [{"name": self.protocol.tensor_input, "datatype": "FP32",
                           "shape": [1, self.schema.width], "data": self._typical.tolist()}]}  # fmt: skip
        return [
            {"body": json.dumps(record).encode()},
            {"body": [record, record]},
            {"body": {"instances": [record]}},
            {"body": oip},
        ]
