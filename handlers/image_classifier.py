"""TorchServe entry point for image classification (FP32, INT8 or BF16).

TorchServe requires this module to define exactly one class: helpers live in the other modules.
Its settings are the archive's ``handler:`` section, typed and validated by
``handlers.config.ImageClassifierConfig`` (defaults and keys are documented there).

Every protocol of ``handlers.protocols`` is answered on every route:

* servekit's own (``/predictions/NAME``): ``{"predictions": [{"label": "7", "index": 7,
  "probability": 0.98}, ...], "model": name, "version": version}``;
* KServe v1: ``{"predictions": [[...top-k of instance 0...], ...], "model_name", "model_version"}``;
* Open Inference Protocol v2: tensors ``labels`` (BYTES), ``scores`` (FP32), ``indices`` (INT64),
  each ``[N, k]``, in JSON or binary.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from handlers import explain, image_io, protocols
from handlers.base import BatchHandler
from handlers.config import ImageClassifierConfig
from handlers.errors import InvalidInput, PayloadTooLarge
from handlers.image_io import FULL_FRAME, PreparedImage, decode_image, parse_topk
from handlers.model_loading import load_model, verify_program
from handlers.transforms import ImagePreprocessor

# What converting a decoded image (PIL modes, numpy arithmetic) raises on data it cannot take.
CONVERSION_FAILURES = (ValueError, TypeError, OSError)


def warmup_images() -> list[bytes]:
    """A 640x480 JPEG and a 64x64 PNG with structure (gradients and a dark stroke), made in memory."""
    y, x = np.mgrid[0:480, 0:640]
    photo = np.stack([x * 255 // 639, y * 255 // 479, (x + y) * 255 // 1118], axis=-1).astype(np.uint8)
    photo[200:280, 100:540] //= 4  # a dark band, so content-fitting preprocessing has ink to find
    jpeg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(photo).save(jpeg, format="JPEG", quality=90)
    Image.fromarray(photo[::8, ::8].copy()).convert("L").resize((64, 64)).save(png, format="PNG")
    return [jpeg.getvalue(), png.getvalue()]


def input_brightness(tensor: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> float:
    """Mean brightness (0..1) of a normalised ``[C, H, W]`` model input, un-normalised per channel."""
    return float((tensor.float().mean(dim=(-2, -1)) * std + mean).mean())


class ImageClassifier(BatchHandler):
    """Decode -> preprocess -> batched softmax classifier -> top-k labels, in any protocol."""

    config_type = ImageClassifierConfig

    def load(self, context: Any, config: ImageClassifierConfig) -> None:
        model_dir = Path(context.system_properties["model_dir"])
        manifest = context.manifest or {}
        serialized = manifest.get("model", {}).get("serializedFile", "model.pt")
        verify_program(model_dir, serialized)
        self.model = load_model(model_dir / serialized, config)
        self.labels = json.loads((model_dir / config.labels_file).read_text())
        self.topk = min(config.topk, len(self.labels))
        self.limits = config.limits
        self.preprocessing = config.preprocessing
        self.protocol = config.protocol
        self.transform = ImagePreprocessor(self.preprocessing)
        # Un-normalising a channel mean: brightness = mean(x) * std + mean (handlers.metrics).
        self._std = torch.tensor(self.preprocessing.std, dtype=torch.float32)
        self._mean = torch.tensor(self.preprocessing.mean, dtype=torch.float32)

    # ------------------------------------------------------------------ per request
    def decode(self, request: dict, headers: dict[str, str]) -> protocols.Call:
        return protocols.decode(request, headers, self.protocol, self.preprocessing.input_shape)

    def prepare(self, call: protocols.Call) -> list[PreparedImage]:
        """Every element of the call as a model input; the images share ONE decode budget.

        ``limits.max_decode_seconds`` bounds the whole request, not each image: a request of 32
        slow images must not hold the worker 32 times as long (a batch of such requests would pass
        the response timeout, and TorchServe would kill the worker with its neighbours' requests).
        """
        topk = self.topk if call.topk is None else parse_topk(call.topk, len(self.labels))
        deadline = image_io.decode_clock() + self.limits.max_decode_seconds  # CPU seconds (handlers.image_io)
        prepared = []
        for i, element in enumerate(call.images or call.tensors):
            try:
                if call.images:
                    remaining = deadline - image_io.decode_clock()
                    if remaining <= 0:
                        raise PayloadTooLarge(
                            f"the request's images take more than {self.limits.max_decode_seconds:g} s to decode "
                            f"(the limit for a whole request): send fewer images per request"
                        )
                    tensor, megapixels = self.preprocess_image(element, remaining if i else None)
                else:
                    tensor, megapixels = torch.from_numpy(np.array(element, dtype=np.float32)), None
            except Exception as exc:
                raise protocols.element_error(call, i, exc) from exc
            prepared.append(PreparedImage(tensor, topk, megapixels))
        return prepared

    def preprocess_image(self, payload: bytes, seconds: float | None = None) -> tuple[torch.Tensor, float]:
        """Encoded image bytes -> the model's input tensor and the decoded image's megapixels.

        Within the decode budget (``seconds`` left of it); the decoding is timed as the ``decode`` stage.
        """
        limits = self.limits
        if seconds is not None and seconds < limits.max_decode_seconds:
            limits = dataclasses.replace(limits, max_decode_seconds=seconds)
        with self.timed("decode"):
            image = decode_image(payload, limits, self.transform.min_decode_side)
        try:
            width, height = image.info.get(FULL_FRAME, (image.size,))[0]  # as sent, before DCT scaling
            return self.transform(image), width * height / 1e6
        except MemoryError as exc:
            raise PayloadTooLarge("image needs more memory to convert than the worker can give it") from exc
        except CONVERSION_FAILURES as exc:
            # A decoded image PIL or numpy cannot convert is the client's odd file, not a server fault.
            width, height = image.size
            raise InvalidInput(
                f"image cannot be converted for the model ({image.mode}, {width}x{height}): {exc}"
            ) from exc

    def encode(self, call: protocols.Call, results: list[protocols.Classification]) -> protocols.Reply:
        return call.encode(results, self.model_name, self.model_version, self.protocol)

    # ------------------------------------------------------------------ per batch
    @torch.inference_mode()
    def inference(self, items: list[PreparedImage]) -> torch.Tensor:
        batch = torch.stack([item.tensor for item in items])
        return torch.softmax(self.model(batch).float(), dim=1)

    def postprocess(self, outputs: torch.Tensor, items: list[PreparedImage]) -> list[protocols.Classification]:
        kmax = max(item.topk for item in items)
        probs, indices = outputs.topk(kmax, dim=1)
        results = []
        for item, row_p, row_i in zip(items, probs.tolist(), indices.tolist(), strict=True):
            k = item.topk
            results.append(protocols.Classification([self.labels[i] for i in row_i[:k]], row_i[:k], row_p[:k]))
        return results

    # ------------------------------------------------------------------ explanations
    def explain(
        self, call: protocols.Call, items: list[PreparedImage], results: list[protocols.Classification],
        options: explain.ExplainOptions, deadline: float,
    ) -> list[dict]:  # fmt: skip
        """Integrated Gradients per pixel of the model's input, for the answered (or requested) class,
        against a blank image; attributions summed over channels, pooled to ``explain.grid`` (handlers.explain)."""
        program, what = self.reference_program()
        limits = self.settings.explain_limits
        inputs = torch.stack([item.tensor for item in items]).float()
        targets = [explain.target_index(options.target, self.labels, r.indices[0]) for r in results]
        attribution = explain.integrated_gradients(
            program, inputs, self.blank_input(), targets, options.steps, deadline
        )
        answers = []
        for i, (item, result, target) in enumerate(zip(items, results, targets, strict=True)):
            pixels = item.tensor.float() * self._std.view(-1, 1, 1) + self._mean.view(-1, 1, 1)
            answer = explain.describe(attribution, i, what, self.BLANK, result.as_predictions()[0], target, self.labels)
            answer.update(explain.image_fields(attribution.attributions[i], pixels, limits, options.heatmap))
            answers.append(answer)
        return answers

    BLANK = (
        "a blank image: every pixel 0 after the preprocessing's colour handling (no ink where it inverts, "
        "black otherwise), normalised with the spec's mean and std"
    )

    def blank_input(self) -> torch.Tensor:
        """The baseline in the model's input space: pixel value 0 in every channel, normalised."""
        shape = self.preprocessing.input_shape
        return ((torch.zeros(shape) - self._mean.view(-1, 1, 1)) / self._std.view(-1, 1, 1))[None]

    # ------------------------------------------------------------------ what the metrics see
    def summarize(self, result: protocols.Classification) -> tuple[str, float] | None:
        return (result.labels[0], result.scores[0]) if result.labels else None

    def input_statistics(self, item: PreparedImage) -> dict[str, float]:
        return {"brightness": input_brightness(item.tensor, self._mean, self._std), "megapixels": item.megapixels}

    # ------------------------------------------------------------------ warm-up
    def warmup_items(self, batch_size: int) -> list[PreparedImage]:
        blank = torch.zeros(self.preprocessing.input_shape)
        return [PreparedImage(blank, self.topk) for _ in range(batch_size)]

    def warmup_requests(self) -> list[dict]:
        """A photo-sized JPEG and a small PNG, in the raw-body form: every decoder and resize path once."""
        return [{"body": data} for data in warmup_images()]
