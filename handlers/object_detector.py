"""TorchServe entry point for object detection (FP32 or INT8): boxes, labels and scores per image.

TorchServe requires this module to define exactly one class: helpers live in
``handlers.detection`` (settings, letterbox, decoding the heads). Settings are the archive's
``handler:`` section, typed and validated by ``handlers.detection.DetectorConfig``.

A request carries one image in servekit's own forms (raw body, multipart field, JSON
``{"data": "<base64>"}``), and may ask for ``score_threshold`` and ``max_detections`` as a query
parameter, a multipart field or a JSON field. The answer::

    {"detections": [{"label": "7", "index": 7, "score": 0.97, "box": [x1, y1, x2, y2]}, ...],
     "model": name, "version": version, "image_size": [width, height]}

boxes in the pixels of the image as sent (after its EXIF orientation), best first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from handlers import detection
from handlers.base import BatchHandler
from handlers.detection import DetectionCall, Detections, DetectorConfig, Letterbox, PreparedPage
from handlers.errors import InvalidInput, PayloadTooLarge
from handlers.image_io import decode_image, extract_image_request
from handlers.model_loading import load_model, verify_program
from handlers.protocols import Reply


class ObjectDetector(BatchHandler):
    """Decode -> letterbox -> batched detector heads -> peaks, boxes, NMS -> detections in original pixels."""

    config_type = DetectorConfig

    def load(self, context: Any, config: DetectorConfig) -> None:
        model_dir = Path(context.system_properties["model_dir"])
        manifest = context.manifest or {}
        serialized = manifest.get("model", {}).get("serializedFile", "model.pt")
        verify_program(model_dir, serialized)
        self.model = load_model(model_dir / serialized, config)
        self.labels = json.loads((model_dir / config.labels_file).read_text())
        self.detection = config.detection
        self.limits = config.limits
        self._check_heads()

    def _check_heads(self) -> None:
        """Refuse at load a program whose heads do not fit the configured input and labels."""
        size = self.detection.input_size
        with torch.inference_mode():
            heads = self.model(torch.zeros(1, *self.detection.input_shape))
        if not isinstance(heads, tuple | list) or len(heads) != 3:
            raise RuntimeError("the detector program must return (heatmap, size, offset)")
        heatmap = heads[0]
        detection.head_stride(heatmap, size)
        if heatmap.shape[1] != len(self.labels):
            raise RuntimeError(
                f"the program's heatmap has {heatmap.shape[1]} classes, the labels file {len(self.labels)}"
            )
        for name, head in zip(("size", "offset"), heads[1:]):
            if list(head.shape) != [1, 2, *heatmap.shape[2:]]:
                raise RuntimeError(
                    f"the program's {name} head is {list(head.shape)}, not [1, 2, {heatmap.shape[2]}, ...]"
                )

    # ------------------------------------------------------------------ per request
    def decode(self, request: dict, headers: dict[str, str]) -> DetectionCall:
        image = extract_image_request(request)
        options, settings = image.options, self.detection
        threshold = options.get("score_threshold")
        count = options.get("max_detections")
        return DetectionCall(
            image.payload,
            settings.score_threshold if threshold is None else detection.parse_score_threshold(threshold, settings),
            settings.max_detections if count is None else detection.parse_max_detections(count, settings),
        )

    def prepare(self, call: DetectionCall) -> list[PreparedPage]:
        with self.timed("decode"):
            image = decode_image(call.payload, self.limits, self.detection.min_decode_side())
        try:
            gray, transform = detection.letterbox(image, self.detection.input_size)
        except MemoryError as exc:
            raise PayloadTooLarge("image needs more memory to convert than the worker can give it") from exc
        except detection.CONVERSION_FAILURES as exc:
            width, height = image.size
            raise InvalidInput(
                f"image cannot be converted for the model ({image.mode}, {width}x{height}): {exc}"
            ) from exc
        x0, y0, x1, y1 = transform.content
        width, height = transform.image_size
        brightness = float(gray[y0:y1, x0:x1].mean()) / 255.0
        page = PreparedPage(
            detection.ink_tensor(gray), transform, call.score_threshold, call.max_detections,
            width * height / 1e6, brightness,
        )  # fmt: skip
        return [page]

    def encode(self, call: DetectionCall, results: list[Detections]) -> Reply:
        (found,) = results
        answers = [
            {
                "label": self.labels[index],
                "index": index,
                "score": round(score, 6),
                "box": [round(v, 2) for v in box],
            }
            for box, score, index in zip(found.boxes.tolist(), found.scores.tolist(), found.classes.tolist())
        ]
        width, height = found.image_size
        return Reply({"detections": answers, "model": self.model_name, "version": self.model_version,
                      "image_size": [width, height]})  # fmt: skip

    # ------------------------------------------------------------------ per batch
    @torch.inference_mode()
    def inference(self, items: list[PreparedPage]) -> tuple[torch.Tensor, ...]:
        return tuple(self.model(torch.stack([item.tensor for item in items])))

    def postprocess(self, outputs: tuple[torch.Tensor, ...], items: list[PreparedPage]) -> list[Detections]:
        return detection.decode_detections(
            outputs,
            [item.transform for item in items],
            [item.score_threshold for item in items],
            [item.max_detections for item in items],
            self.detection.nms_iou,
            self.detection.input_size,
            self.detection.class_agnostic_nms,
        )

    # ------------------------------------------------------------------ what the metrics see
    def summarize(self, result: Detections) -> tuple[str, float] | None:
        """The top detection's label and score (none when nothing was found)."""
        if not len(result):
            return None
        return self.labels[int(result.classes[0])], float(result.scores[0])

    def input_statistics(self, item: PreparedPage) -> dict[str, float]:
        return {"brightness": item.brightness, "megapixels": item.megapixels}

    # ------------------------------------------------------------------ warm-up
    def warmup_items(self, batch_size: int) -> list[PreparedPage]:
        size = self.detection.input_size
        blank = torch.zeros(self.detection.input_shape)
        item = PreparedPage(
            blank, Letterbox.identity(size), self.detection.score_threshold, self.detection.max_detections
        )
        return [item] * batch_size

    def warmup_requests(self) -> list[dict]:
        """A photo-sized JPEG and a tall PNG, raw bodies: the decoders, the letterbox and the decoding once."""
        return [{"body": data} for data in detection.warmup_pages()]
