"""TorchServe entry point for object detection (FP32 or INT8): boxes, labels and scores per image.

TorchServe requires this module to define exactly one class: helpers live in
``handlers.detection`` (settings, letterbox, decoding the heads, the protocols). Settings are the
archive's ``handler:`` section, typed and validated by ``handlers.detection.DetectorConfig``.

A request may ask for ``score_threshold`` (``min_score_threshold``..1) and ``max_detections``
(1..``max_detections_limit``): a multipart field beside the image or a JSON field beside its base64
in servekit's own forms (TorchServe does not pass query parameters to handlers), ``parameters`` in
KServe v1 and OIP; a bad value is a 400 naming the option. Answers,
boxes ``[x1, y1, x2, y2]`` in the pixels of each image as sent (after its EXIF orientation), best
first; ``label`` is the page read left to right (the detections' labels by box centre):

* servekit's own (``/predictions/NAME``, one image: raw body, multipart, ``{"data": b64}``)::

    {"detections": [{"label": "7", "index": 7, "score": 0.97, "box": [x1, y1, x2, y2]}, ...],
     "label": "0427", "image_size": [width, height], "model": name, "version": version}

* KServe v1 (``{"instances": [image, ...]}``): ``{"predictions": [{"detections", "label",
  "image_size"}, ...], "model_name", "model_version"}``, one per instance;
* Open Inference Protocol v2 (a BYTES tensor of encoded images): tensors ``boxes`` FP32
  ``[N, K, 4]``, ``scores`` FP32 ``[N, K]``, ``labels`` BYTES ``[N, K]`` and ``counts`` INT64
  ``[N]``, K the most detections of any image, padded (``handlers.detection.DetectorProtocol``).
"""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from handlers import detection, image_io, protocols
from handlers.base import BatchHandler
from handlers.detection import DetectionCall, Detections, DetectorConfig, Letterbox, PreparedPage
from handlers.errors import InvalidInput, NotExplainable, PayloadTooLarge
from handlers.image_io import decode_image
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
        self.protocol = config.protocol
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
        return detection.decode_request(request, headers, self.protocol, self.detection)

    def prepare(self, call: DetectionCall) -> list[PreparedPage]:
        """Every image of the call as a model input; the images share ONE decode budget (as for classifiers)."""
        deadline = image_io.decode_clock() + self.limits.max_decode_seconds  # CPU seconds (handlers.image_io)
        pages = []
        for i, payload in enumerate(call.images):
            try:
                remaining = deadline - image_io.decode_clock()
                if remaining <= 0:
                    raise PayloadTooLarge(
                        f"the request's images take more than {self.limits.max_decode_seconds:g} s to decode "
                        f"(the limit for a whole request): send fewer images per request"
                    )
                pages.append(self.prepare_page(payload, call, remaining if i else None))
            except Exception as exc:
                raise protocols.element_error(call, i, exc) from exc
        return pages

    def prepare_page(self, payload: bytes, call: DetectionCall, seconds: float | None) -> PreparedPage:
        """Encoded image bytes -> its letterboxed input, the way back and its statistics."""
        limits = self.limits
        if seconds is not None and seconds < limits.max_decode_seconds:
            limits = dataclasses.replace(limits, max_decode_seconds=seconds)
        with self.timed("decode"):
            image = decode_image(payload, limits, self.detection.min_decode_side())
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
        return PreparedPage(
            detection.ink_tensor(gray), transform, call.score_threshold, call.max_detections,
            width * height / 1e6, brightness,
        )  # fmt: skip

    def encode(self, call: DetectionCall, results: list[Detections]) -> Reply:
        return detection.encode_reply(call, results, self.labels, self.model_name, self.model_version, self.protocol)

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

    # ------------------------------------------------------------------ explanations
    def explain(self, call: DetectionCall, items: list, results: list, options: Any, deadline: float) -> list[dict]:
        """Not offered for detection (docs/explanations.md): 501 with the reason."""
        raise NotExplainable(
            "explanations are offered for classifiers (images and records); a detector's boxes come from heatmap "
            "peaks, thresholds and NMS, so a per-box attribution is not offered yet: the answer you got from "
            "/predictions carries each box's score"
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
        """A photo-sized JPEG and a tall PNG as raw bodies, then KServe v1 and OIP JSON: every path once."""
        pages = detection.warmup_pages()
        encoded = base64.b64encode(pages[1]).decode()
        oip = {"inputs": [{"name": self.protocol.image_input, "datatype": "BYTES", "shape": [1], "data": [encoded]}]}
        return [*({"body": data} for data in pages), {"body": {"instances": [{"b64": encoded}]}}, {"body": oip}]
