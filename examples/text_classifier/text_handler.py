"""The text classifier's handler: a user's handler on servekit's public base (``handlers.base.BatchHandler``).

It writes only what is its own (how a text becomes token ids, and what an answer looks like) and
gets the rest from the base: server-side batching across requests, one failed request never failing
another, typed errors as 4xx JSON, per-request metrics and logs, the CPU budget, the response-size
bound, and warm-up at every batch size. ``handlers.protocols.read_envelope`` tells which protocol a
request speaks; this handler decodes its own elements in each:

* ``/predictions/NAME``: a text body (``text/plain``), ``{"text": "..."}`` or ``{"texts": [...]}``;
* KServe v1: ``{"instances": ["...", {"text": "..."}]}``;
* Open Inference Protocol: one BYTES input ``text`` of shape ``[N]`` (JSON ``data``).

Answers: ``{"predictions": [{"label", "index", "probability"}], "model", "version"}`` (one per text),
KServe v1 ``{"predictions": [...]}`` and OIP outputs ``label`` (BYTES) and ``score`` (FP32).
TorchServe's rule: this file defines one class; the tokenizer and the config are in ``text_support``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from text_support import TextCall, TextConfig, encode

from handlers.base import BatchHandler
from handlers.errors import InvalidInput, PayloadTooLarge
from handlers.model_loading import load_model, verify_program
from handlers.protocols import Classification, Reply, oip_input, read_envelope


def _texts(values: Any, where: str, config: TextConfig) -> list[str]:
    if not isinstance(values, list) or not values:
        raise InvalidInput(f"{where} must be a non-empty list of texts")
    if len(values) > config.max_texts:
        raise PayloadTooLarge(f"{where}: {len(values)} texts in one request; the limit is {config.max_texts}")
    texts = []
    for i, value in enumerate(values):
        if isinstance(value, dict) and "text" in value:
            value = value["text"]
        if isinstance(value, bytes | bytearray):
            value = bytes(value).decode("utf-8", "replace")
        if not isinstance(value, str) or not value.strip():
            raise InvalidInput(f"{where}[{i}] must be a non-empty text")
        if len(value) > config.max_chars:
            raise PayloadTooLarge(f"{where}[{i}] has {len(value)} characters; the limit is {config.max_chars}")
        texts.append(value)
    return texts


class TextClassifier(BatchHandler):
    config_type = TextConfig

    def load(self, context: Any, config: TextConfig) -> None:
        model_dir = Path(context.system_properties["model_dir"])
        serialized = (context.manifest or {}).get("model", {}).get("serializedFile", "model.pt")
        verify_program(model_dir, serialized)
        self.model = load_model(model_dir / serialized, config)
        self.labels = json.loads((model_dir / config.labels_file).read_text())
        self.vocab = json.loads((model_dir / config.vocab_file).read_text())
        self.text_input = self.options.get("text_input", "text")

    def decode(self, request: dict, headers: dict[str, str]) -> TextCall:
        envelope = read_envelope(request, headers, json_lists=True)
        config: TextConfig = self.settings
        if envelope.protocol == "oip_v2":
            tensor = oip_input(envelope.document, envelope.tail, [self.text_input])
            if tensor.datatype != "BYTES" or tensor.binary is not None:
                raise InvalidInput(f"{tensor.where} must be BYTES texts in JSON data")
            return TextCall("oip_v2", _texts(tensor.data, tensor.where, config), tensor.request_id)
        if envelope.protocol == "kserve_v1":
            return TextCall("kserve_v1", _texts(envelope.document["instances"], "instances", config))
        document = envelope.document
        if isinstance(document, dict):
            if "texts" in document:
                return TextCall("native", _texts(document["texts"], "texts", config))
            if "text" in document:
                return TextCall("native", _texts([document["text"]], "text", config))
            raise InvalidInput('expected {"text": "..."} or {"texts": ["...", ...]}')
        if isinstance(document, list):
            return TextCall("native", _texts(document, "texts", config))
        body = request.get("body") if request.get("body") is not None else request.get("data")
        if isinstance(body, bytes | bytearray):
            body = bytes(body).decode("utf-8", "replace")
        return TextCall("native", _texts([body], "text", config))

    def prepare(self, call: TextCall) -> list[list[int]]:
        return [encode(text, self.vocab, self.settings.max_length) for text in call.texts]

    @torch.inference_mode()
    def inference(self, items: list[list[int]]) -> torch.Tensor:
        return torch.softmax(self.model(torch.tensor(items)).float(), dim=1)

    def postprocess(self, outputs: torch.Tensor, items: list) -> list[Classification]:
        scores, indices = outputs.max(dim=1)
        pairs = zip(scores.tolist(), indices.tolist(), strict=True)
        return [Classification([self.labels[i]], [i], [s]) for s, i in pairs]

    def encode(self, call: TextCall, results: list[Classification]) -> Reply:
        if call.protocol == "oip_v2":
            outputs = [
                {"name": "label", "datatype": "BYTES", "shape": [len(results)], "data": [r.labels[0] for r in results]},
                {"name": "score", "datatype": "FP32", "shape": [len(results)],
                 "data": [round(r.scores[0], 6) for r in results]},
            ]  # fmt: skip
            body = {"model_name": self.model_name, "model_version": self.model_version, "outputs": outputs}
            if call.request_id:
                body["id"] = call.request_id
            return Reply(body)
        predictions = [r.as_predictions()[0] for r in results]
        if call.protocol == "kserve_v1":
            return Reply({"predictions": predictions, "model_name": self.model_name,
                          "model_version": self.model_version})  # fmt: skip
        return Reply({"predictions": predictions, "model": self.model_name, "version": self.model_version})

    def summarize(self, result: Classification) -> tuple[str, float]:
        return result.labels[0], result.scores[0]

    def warmup_items(self, batch_size: int) -> list[list[int]]:
        return [encode("hello my parcel has not arrived", self.vocab, self.settings.max_length)] * batch_size

    def warmup_requests(self) -> list[dict]:
        return [{"body": b"my invoice shows a double charge"}, {"body": json.dumps({"texts": ["a", "b"]}).encode()}]
