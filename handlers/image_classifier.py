"""TorchServe entry point for image classification (FP32 or INT8).

TorchServe requires this module to define exactly one class: helpers live in the other modules.

The archive's ``model-config.yaml`` carries a ``handler:`` section, written by ``build_mar.py``::

    handler:
      precision: fp32            # or int8: only the model loader differs
      topk: 5                    # default k; a request may ask for another (JSON or multipart field "topk")
      labels_file: labels.json
      preprocessing: {color_mode: RGB, resize: 256, crop: 224, mean: [...], std: [...]}
      limits: {max_bytes: 6000000, max_pixels: 25000000}

Responses are JSON: ``{"predictions": [{"label": "7", "index": 7, "probability": 0.98}, ...],
"model": name, "version": version}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from handlers.base import BatchHandler
from handlers.errors import InvalidInput, PayloadTooLarge
from handlers.image_io import DecodeLimits, PreparedImage, decode_image, extract_image_request, parse_topk
from handlers.model_loading import load_model, verify_program
from handlers.transforms import ImagePreprocessor, Preprocessing

# What converting a decoded image (PIL modes, numpy arithmetic) raises on data it cannot take.
CONVERSION_FAILURES = (ValueError, TypeError, OSError)


class ImageClassifier(BatchHandler):
    """Decode -> preprocess -> batched softmax classifier -> top-k labels."""

    def load(self, context: Any, config: dict) -> None:
        model_dir = Path(context.system_properties["model_dir"])
        manifest = context.manifest or {}
        serialized = manifest.get("model", {}).get("serializedFile", "model.pt")
        self.model_name = manifest.get("model", {}).get("modelName", context.model_name)
        self.model_version = manifest.get("model", {}).get("modelVersion", "")
        verify_program(model_dir, serialized)
        self.model = load_model(model_dir / serialized, config.get("precision", "fp32"), config)
        self.labels = json.loads((model_dir / config.get("labels_file", "labels.json")).read_text())
        self.topk = min(int(config.get("topk", 5)), len(self.labels))
        self.limits = DecodeLimits.from_dict(config.get("limits"))
        self.preprocessing = Preprocessing.from_dict(config.get("preprocessing"))
        self.transform = ImagePreprocessor(self.preprocessing)

    def preprocess(self, request: dict) -> PreparedImage:
        image_request = extract_image_request(request)
        topk = self.topk
        if "topk" in image_request.options:
            topk = parse_topk(image_request.options["topk"], len(self.labels))
        image = decode_image(image_request.payload, self.limits)
        try:
            tensor = self.transform(image)
        except MemoryError as exc:
            raise PayloadTooLarge("image needs more memory to convert than the worker can give it") from exc
        except CONVERSION_FAILURES as exc:
            # A decoded image PIL or numpy cannot convert is the client's odd file, not a server fault.
            width, height = image.size
            raise InvalidInput(
                f"image cannot be converted for the model ({image.mode}, {width}x{height}): {exc}"
            ) from exc
        return PreparedImage(tensor, topk)

    @torch.inference_mode()
    def inference(self, items: list[PreparedImage]) -> torch.Tensor:
        batch = torch.stack([item.tensor for item in items])
        return torch.softmax(self.model(batch).float(), dim=1)

    def postprocess(self, outputs: torch.Tensor, items: list[PreparedImage]) -> list[dict]:
        kmax = max(item.topk for item in items)
        probs, indices = outputs.topk(kmax, dim=1)
        results = []
        for item, row_p, row_i in zip(items, probs.tolist(), indices.tolist(), strict=True):
            predictions = [
                {"label": self.labels[i], "index": i, "probability": round(p, 6)}
                for p, i in zip(row_p[: item.topk], row_i[: item.topk], strict=True)
            ]
            results.append({"predictions": predictions, "model": self.model_name, "version": self.model_version})
        return results

    def warmup_items(self, batch_size: int) -> list[PreparedImage]:
        blank = torch.zeros(self.preprocessing.input_shape)
        return [PreparedImage(blank, self.topk) for _ in range(batch_size)]
