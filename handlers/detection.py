"""Object detection helpers: the detector's typed settings, letterboxing, and decoding its heads.

A detector program (TorchScript, FP32 or INT8) takes a batch of letterboxed gray pages
``[N, 1, S, S]`` (ink = ``1 - pixel / 255``, padding 0) and returns its raw CenterNet-style heads:

* ``heatmap`` ``[N, C, S/r, S/r]``: one logit per class and output cell (r, the stride, is
  ``S`` over the heatmap's side: 4 for the digits detector);
* ``size`` ``[N, 2, S/r, S/r]``: box width and height in output cells;
* ``offset`` ``[N, 2, S/r, S/r]``: where the centre lies inside its cell (0..1).

Everything after the program is here, in plain torch and torchvision, so the handler, the build's
evaluation and the tests decode the same way:

1. ``letterbox``: a decoded PIL image of any size and aspect ratio, scaled (aspect kept) into the
   ``S`` x ``S`` input and centred on padding, with the ``Letterbox`` that maps boxes back to the
   original image's pixels (a DCT-scaled JPEG decode included, ``image_io.FULL_FRAME``);
2. ``decode_detections``: peaks of the class heatmaps (a 3x3 max-pool), boxes from size and offset,
   mapped back and clipped to each image, then ``torchvision.ops.batched_nms`` and the per-image
   score threshold and maximum count.

``DetectorConfig`` is the ``handler:`` section of a detector archive's model-config.yaml; its
``detection:`` part is ``DetectionConfig``. Both are validated on construction and every error
names the key.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual name
from PIL import Image
from torchvision.ops import batched_nms, box_area, clip_boxes_to_image

from handlers import protocols
from handlers.config import RuntimeConfig
from handlers.errors import InvalidInput
from handlers.image_io import FULL_FRAME, DecodeLimits
from handlers.transforms import to_model_mode

# The letterbox's padding and the pages' paper: white, which is ink 0 in the model's input.
PAPER = 255
# A JPEG may be decoded at 1/2, 1/4 or 1/8 scale (image_io.decode_image's min_side) while its
# shorter side keeps this many times the input side: the letterbox resize then still shrinks it.
DECODE_FACTOR = 2
# Heatmap peaks kept per image before NMS: far more than a page holds, bounded whatever a request asks.
MAX_CANDIDATES = 100
# What converting a decoded image (PIL modes, numpy arithmetic) raises on data it cannot take.
CONVERSION_FAILURES = (ValueError, TypeError, OSError)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class DetectionConfig:
    """The detector's geometry and default filtering (the handler section's ``detection:``).

    ``input_size``: the model's square input side (16..1024, a multiple of 4); ``score_threshold``
    (``min_score_threshold``..1) and ``max_detections`` (1..``max_detections_limit``): the defaults a
    request may override within those bounds; ``nms_iou`` (0..1): boxes overlapping a better one
    more than this are dropped; ``class_agnostic_nms``: whether NMS compares boxes of different
    classes too (true for digits on a page, which never overlap: one place, one answer).
    """

    input_size: int = 128
    score_threshold: float = 0.3
    max_detections: int = 20
    nms_iou: float = 0.5
    class_agnostic_nms: bool = True
    min_score_threshold: float = 0.01
    max_detections_limit: int = 100

    def __post_init__(self) -> None:
        size = self.input_size
        if not _whole(size) or not 16 <= size <= 1024 or size % 4:
            raise ValueError(f"detection.input_size: must be a multiple of 4 from 16 to 1024, got {size!r}")
        low = self.min_score_threshold
        if not _number(low) or not 0.0 < low <= 1.0:
            raise ValueError(f"detection.min_score_threshold: must be a number > 0 and <= 1, got {low!r}")
        limit = self.max_detections_limit
        if not _whole(limit) or not 1 <= limit <= MAX_CANDIDATES:
            raise ValueError(f"detection.max_detections_limit: must be a whole number from 1 to {MAX_CANDIDATES}, "
                             f"got {limit!r}")  # fmt: skip
        threshold = self.score_threshold
        if not _number(threshold) or not low <= threshold <= 1.0:
            raise ValueError(f"detection.score_threshold: must be a number from {low:g} (min_score_threshold) "
                             f"to 1, got {threshold!r}")  # fmt: skip
        count = self.max_detections
        if not _whole(count) or not 1 <= count <= limit:
            raise ValueError(f"detection.max_detections: must be a whole number from 1 to {limit} "
                             f"(max_detections_limit), got {count!r}")  # fmt: skip
        iou = self.nms_iou
        if not _number(iou) or not 0.0 < iou <= 1.0:
            raise ValueError(f"detection.nms_iou: must be a number > 0 and <= 1, got {iou!r}")
        if not isinstance(self.class_agnostic_nms, bool):
            raise ValueError(f"detection.class_agnostic_nms: must be true or false, got {self.class_agnostic_nms!r}")

    @classmethod
    def from_dict(cls, data: Any) -> DetectionConfig:
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ValueError(f"detection: must be a mapping, got {data!r}")
        known = [spec.name for spec in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"detection.{unknown[0]}: unknown key (valid keys: {', '.join(known)})")
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (1, self.input_size, self.input_size)

    def min_decode_side(self) -> int:
        """The shorter side a DCT-scaled JPEG decode must keep (``image_io.decode_image``'s ``min_side``)."""
        return DECODE_FACTOR * self.input_size


@dataclass(frozen=True)
class DetectorProtocol:
    """Names the protocols use for the detector's tensors (the spec's ``protocol:`` section).

    ``image_input``: the OIP BYTES tensor of encoded images, ``[N]`` or ``[N, 1]``; outputs
    ``boxes`` FP32 ``[N, K, 4]`` (x1, y1, x2, y2 in each image's pixels), ``scores`` FP32 ``[N, K]``,
    ``labels`` BYTES ``[N, K]`` and ``counts`` INT64 ``[N]`` (how many of an image's K rows are
    detections), K being the most detections any image of the request has: an image with fewer is
    padded with zero boxes, score 0 and label ``""`` after its ``counts`` rows. ``max_images``
    bounds the images of one request (KServe v1 instances or OIP elements). There is no
    preprocessed-tensor input (``tensor_input`` is always null): the letterbox's way back to the
    original pixels needs the image.
    """

    image_input: str = "image"
    boxes_output: str = "boxes"
    scores_output: str = "scores"
    labels_output: str = "labels"
    counts_output: str = "counts"
    max_images: int = 32

    tensor_input = None  # read by handlers.protocols' OIP decoding: only encoded images here

    def __post_init__(self) -> None:
        named = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "max_images"}
        for key, name in named.items():
            if not isinstance(name, str) or not protocols.TENSOR_NAME_RE.match(name):
                raise ValueError(
                    f"protocol.{key}: a tensor name starts with a letter or _ and holds at most 64 letters, "
                    f"digits, _ . -; got {name!r}"
                )
        if len(set(named.values())) != len(named):
            raise ValueError(f"protocol: tensor names must be distinct, got {sorted(named.values())}")
        if not _whole(self.max_images) or not 1 <= self.max_images <= 1024:
            raise ValueError(f"protocol.max_images: must be a whole number from 1 to 1024, got {self.max_images!r}")

    @property
    def outputs(self) -> dict[str, str]:
        """Output name -> datatype, in the order answers list them."""
        return {self.boxes_output: "FP32", self.scores_output: "FP32", self.labels_output: "BYTES",
                self.counts_output: "INT64"}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict | None) -> DetectorProtocol:
        data = dict(data or {})
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"protocol.{unknown[0]}: unknown key (valid keys: {', '.join(known)})")
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)


def oip_metadata(config: DetectorProtocol, detection: DetectionConfig, num_classes: int) -> dict:
    """The inputs, outputs and parameters of ``GET /v2/models/NAME`` (without name and versions)."""
    shapes = {config.boxes_output: [-1, -1, 4], config.scores_output: [-1, -1], config.labels_output: [-1, -1],
              config.counts_output: [-1]}  # fmt: skip
    return {
        "platform": "pytorch_torchscript",
        "inputs": [{"name": config.image_input, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": n, "datatype": t, "shape": shapes[n]} for n, t in config.outputs.items()],
        "parameters": {
            "num_classes": num_classes,
            "max_images": config.max_images,
            "score_threshold": detection.score_threshold,
            "max_detections": detection.max_detections,
            "max_detections_limit": detection.max_detections_limit,
        },
    }


@dataclass(frozen=True)
class DetectorConfig(RuntimeConfig):
    """What the object detector needs besides its program: the ``handler:`` section of its archive.

    The fields every task shares (``precision``, ``labels_file``, ``threads``, ``quantized_engine``,
    ``optimize``, ``faults``, ``prediction_log``) are ``handlers.config.RuntimeConfig``'s; its own::

        handler:
          detection: {...}         # DetectionConfig
          limits: {...}            # handlers.image_io.DecodeLimits
          protocol: {...}          # DetectorProtocol: OIP tensor names, max_images
    """

    detection: DetectionConfig = field(default_factory=DetectionConfig)
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    protocol: DetectorProtocol = field(default_factory=DetectorProtocol)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.detection, DetectionConfig):
            raise ValueError("detection must be a DetectionConfig object")
        if not isinstance(self.limits, DecodeLimits):
            raise ValueError("limits must be a DecodeLimits object")
        if not isinstance(self.protocol, DetectorProtocol):
            raise ValueError("protocol must be a DetectorProtocol object")

    @classmethod
    def parse_sections(cls, data: dict) -> dict:
        if "detection" in data:
            data["detection"] = DetectionConfig.from_dict(data["detection"])
        if "limits" in data:
            data["limits"] = DecodeLimits.from_dict(data["limits"])
        if "protocol" in data:
            data["protocol"] = DetectorProtocol.from_dict(data["protocol"])
        return data


# ------------------------------------------------------------------------------------------ per-request options
def _option_text(value: Any, name: str) -> str:
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8").strip()
        except UnicodeDecodeError:
            raise InvalidInput(f"{name} is not valid UTF-8 text") from None
    return str(value).strip()


def _shown(text: str) -> str:
    text = ascii(text)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_score_threshold(value: Any, config: DetectionConfig) -> float:
    """A request's ``score_threshold`` (a JSON number, or the text of a multipart field)."""
    low = config.min_score_threshold
    if isinstance(value, bool):
        raise InvalidInput(f"score_threshold must be a number from {low:g} to 1, got {value!r}")
    if _number(value):
        number = float(value)
    else:
        text = _option_text(value, "score_threshold")
        try:
            number = float(text)
        except ValueError:
            raise InvalidInput(f"score_threshold must be a number from {low:g} to 1, got {_shown(text)}") from None
    if not low <= number <= 1.0:  # NaN fails too
        raise InvalidInput(f"score_threshold must be a number from {low:g} to 1, got {number:g}")
    return number


def parse_max_detections(value: Any, config: DetectionConfig) -> int:
    """A request's ``max_detections``: a whole number from 1 to ``max_detections_limit``."""
    limit = config.max_detections_limit
    if isinstance(value, bool | float):
        raise InvalidInput(f"max_detections must be a whole number from 1 to {limit}, got {value!r}")
    if _whole(value):
        count = value
    else:
        text = _option_text(value, "max_detections")
        if not text.isascii() or not text.lstrip("+-").isdigit() or len(text) > 12:
            raise InvalidInput(f"max_detections must be a whole number from 1 to {limit}, got {_shown(text)}")
        count = int(text)
    if not 1 <= count <= limit:
        raise InvalidInput(f"max_detections must be a whole number from 1 to {limit}, got {count}")
    return count


# ------------------------------------------------------------------------------------------ letterbox
@dataclass(frozen=True)
class Letterbox:
    """Where an image landed in the model's input, and the way back.

    A point ``(x, y)`` of the input is ``(x * gain[0] + offset[0], y * gain[1] + offset[1])`` in the
    original image, whose size (as displayed, full size even when a JPEG was decoded smaller) is
    ``image_size`` = (width, height). ``content`` is the box of the input the image covers.
    """

    gain: tuple[float, float]
    offset: tuple[float, float]
    image_size: tuple[int, int]
    content: tuple[int, int, int, int]

    @classmethod
    def identity(cls, size: int) -> Letterbox:
        return cls((1.0, 1.0), (0.0, 0.0), (size, size), (0, 0, size, size))

    def to_original(self, boxes: torch.Tensor) -> torch.Tensor:
        """``[K, 4]`` input-space boxes (x1, y1, x2, y2) in the original image's pixels, clipped to it."""
        gain = boxes.new_tensor([*self.gain, *self.gain])
        offset = boxes.new_tensor([*self.offset, *self.offset])
        width, height = self.image_size
        return clip_boxes_to_image(boxes * gain + offset, (height, width))

    def to_input(self, boxes: torch.Tensor) -> torch.Tensor:
        """The inverse of ``to_original`` (without clipping): original pixels to the model's input."""
        gain = boxes.new_tensor([*self.gain, *self.gain])
        offset = boxes.new_tensor([*self.offset, *self.offset])
        return (boxes - offset) / gain


def letterbox(image: Image.Image, size: int) -> tuple[np.ndarray, Letterbox]:
    """A decoded image as ``size`` x ``size`` 8-bit gray, aspect kept, centred on white; and the way back.

    Any PIL mode is accepted (``handlers.transforms.to_model_mode``: transparency on white, 16-bit
    and float scaled). A DCT-scaled JPEG decode (``image_io.FULL_FRAME``) maps back to the full size.
    """
    frame = image.info.get(FULL_FRAME)
    width, height = image.size
    if not isinstance(frame, tuple):
        frame = ((width, height), (0.0, 0.0, float(width), float(height)))
    (full_width, full_height), (fx0, fy0, fx1, fy1) = frame
    gray = to_model_mode(image, "L")
    scale = size / max(width, height)
    new_width, new_height = max(1, min(size, round(width * scale))), max(1, min(size, round(height * scale)))
    left, top = (size - new_width) // 2, (size - new_height) // 2
    canvas = np.full((size, size), PAPER, dtype=np.uint8)
    resized = gray.resize((new_width, new_height), Image.Resampling.BILINEAR)
    canvas[top : top + new_height, left : left + new_width] = np.asarray(resized, dtype=np.uint8)
    # input -> decoded pixels: (x - left) * width / new_width; decoded -> full: (x - fx0) * full / (fx1 - fx0).
    gains, offsets = [], []
    for pad, decoded, placed, start, stop, full in (
        (left, width, new_width, fx0, fx1, full_width),
        (top, height, new_height, fy0, fy1, full_height),
    ):
        to_decoded = decoded / placed
        to_full = full / (stop - start)
        gains.append(to_decoded * to_full)
        offsets.append((-pad * to_decoded - start) * to_full)
    content = (left, top, left + new_width, top + new_height)
    return canvas, Letterbox(tuple(gains), tuple(offsets), (int(full_width), int(full_height)), content)


def ink_tensor(gray: np.ndarray) -> torch.Tensor:
    """8-bit gray ``[H, W]`` (or a batch ``[N, H, W]``) as the model's input: ink = 1 - pixel / 255, channel 1."""
    tensor = torch.from_numpy(np.ascontiguousarray(gray)).float()
    return (1.0 - tensor / 255.0).unsqueeze(-3)


# ------------------------------------------------------------------------------------------ the handler's items
@dataclass
class DetectionCall:
    """One decoded request: its images, the filtering it asked for, and how to answer it.

    ``protocol`` is ``native`` (one image), ``kserve_v1`` or ``oip_v2`` (one image or several,
    answered in their order); ``outputs`` are the OIP outputs asked for, ``(name, binary)``.
    """

    protocol: str
    images: list[bytes]
    score_threshold: float
    max_detections: int
    request_id: str | None = ""  # servekit's own protocol and KServe v1 carry no request id
    outputs: list[tuple[str, bool]] | None = None

    @property
    def size(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class PreparedPage:
    """One image ready for the model: its letterboxed input, the way back, and the request's filtering."""

    tensor: torch.Tensor
    transform: Letterbox
    score_threshold: float
    max_detections: int
    megapixels: float | None = None  # of the image as sent (None: warm-up)
    brightness: float | None = None  # mean of the image's pixels in the input, 0..1 (letterbox padding excluded)


# ------------------------------------------------------------------------------------------ decoding
@dataclass(frozen=True)
class Detections:
    """One image's detections, best first: boxes ``[K, 4]`` in original pixels, scores and class indices."""

    boxes: torch.Tensor
    scores: torch.Tensor
    classes: torch.Tensor
    image_size: tuple[int, int]  # (width, height) of the original image

    def __len__(self) -> int:
        return len(self.scores)


def _per_image(value: float | int | Sequence, count: int, name: str) -> list:
    values = list(value) if isinstance(value, Sequence) else [value] * count
    if len(values) != count:
        raise ValueError(f"{name}: {len(values)} values for {count} images")
    return values


def head_stride(heatmap: torch.Tensor, input_size: int) -> float:
    """Input pixels per output cell, from the heads' shape (a program with other heads fails here)."""
    if heatmap.dim() != 4 or heatmap.shape[-1] != heatmap.shape[-2] or input_size % heatmap.shape[-1]:
        raise ValueError(f"heatmap of shape {list(heatmap.shape)} does not fit an input of {input_size}x{input_size}")
    return input_size / heatmap.shape[-1]


@torch.inference_mode()
def decode_detections(
    outputs: Sequence[torch.Tensor],
    transforms: Sequence[Letterbox],
    score_threshold: float | Sequence[float],
    max_detections: int | Sequence[int],
    nms_iou: float,
    input_size: int,
    class_agnostic: bool = True,
) -> list[Detections]:
    """The program's heads for a batch -> each image's detections in its original pixels (module docstring).

    ``score_threshold`` and ``max_detections`` are one value for the batch or one per image.
    """
    heatmap, sizes, offsets = (t.float() for t in outputs)
    count = len(transforms)
    if heatmap.shape[0] != count:
        raise ValueError(f"heads for {heatmap.shape[0]} images, {count} transforms")
    thresholds = _per_image(score_threshold, count, "score_threshold")
    maxima = _per_image(max_detections, count, "max_detections")
    stride = head_stride(heatmap, input_size)
    batch, classes, height, width = heatmap.shape
    heat = torch.sigmoid(heatmap)
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
    k = min(MAX_CANDIDATES, classes * height * width)
    scores, index = peaks.reshape(batch, -1).topk(k, dim=1)
    labels = torch.div(index, height * width, rounding_mode="floor")
    cell = index % (height * width)
    ys = torch.div(cell, width, rounding_mode="floor").float()
    xs = (cell % width).float()
    flat_sizes = sizes.reshape(batch, 2, -1)
    flat_offsets = offsets.reshape(batch, 2, -1)
    box_w = flat_sizes[:, 0].gather(1, cell).clamp(min=0)
    box_h = flat_sizes[:, 1].gather(1, cell).clamp(min=0)
    cx = xs + flat_offsets[:, 0].gather(1, cell)
    cy = ys + flat_offsets[:, 1].gather(1, cell)
    boxes = torch.stack([cx - box_w / 2, cy - box_h / 2, cx + box_w / 2, cy + box_h / 2], dim=-1) * stride

    kept_boxes, kept_scores, kept_labels, owners = [], [], [], []
    for i, transform in enumerate(transforms):
        keep = scores[i] >= thresholds[i]
        mapped = transform.to_original(boxes[i][keep])
        visible = box_area(mapped) > 0  # a box wholly in the letterbox's padding has nothing left
        kept_boxes.append(mapped[visible])
        kept_scores.append(scores[i][keep][visible])
        kept_labels.append(labels[i][keep][visible])
        owners.append(torch.full((int(visible.sum()),), i, dtype=torch.long))
    all_boxes, all_scores = torch.cat(kept_boxes), torch.cat(kept_scores)
    all_labels, all_owners = torch.cat(kept_labels), torch.cat(owners)
    groups = all_owners if class_agnostic else all_owners * classes + all_labels
    order = batched_nms(all_boxes, all_scores, groups, nms_iou)  # by decreasing score
    results = []
    for i in range(count):
        mine = order[all_owners[order] == i][: maxima[i]]
        results.append(Detections(all_boxes[mine], all_scores[mine], all_labels[mine], transforms[i].image_size))
    return results


# ------------------------------------------------------------------------------------------ the protocols
def decode_request(
    request: dict, headers: dict[str, str], protocol: DetectorProtocol, settings: DetectionConfig
) -> DetectionCall:
    """One TorchServe request dict -> a ``DetectionCall`` (the protocol is read from the request).

    * servekit's own: raw body, multipart field or ``{"data": b64}``; options as multipart fields or
      JSON fields (TorchServe passes a handler no query parameters);
    * KServe v1 ``{"instances": [...], "parameters": {...}}``: each instance an image as for the
      image classifier (``{"data"|"b64"|"image": b64}`` or a bare base64 string);
    * OIP v2: one BYTES tensor ``protocol.image_input`` (JSON ``data`` of base64 strings, or the
      binary extension); options in the request's ``parameters``.

    ``score_threshold`` and ``max_detections`` apply to every image of the request; a bad value
    is a 400 naming the option.
    """
    envelope = protocols.read_envelope(request, headers)
    defaults = (settings.score_threshold, settings.max_detections)
    if envelope.protocol == "native":
        image = protocols.native_image(envelope)
        call = DetectionCall("native", [image.payload], *defaults)
        options: Any = image.options
    else:
        document = envelope.document
        if envelope.protocol == "oip_v2":
            decoded = protocols.decode_oip(document, envelope.tail, protocol, ())
            call = DetectionCall("oip_v2", decoded.images, *defaults, decoded.request_id, decoded.outputs)
        else:
            call = DetectionCall("kserve_v1", protocols.decode_kserve_v1(document, protocol).images, *defaults)
        options = document.get("parameters") or {}
    threshold, count = options.get("score_threshold"), options.get("max_detections")
    if threshold is not None:
        call.score_threshold = parse_score_threshold(threshold, settings)
    if count is not None:
        call.max_detections = parse_max_detections(count, settings)
    return call


def reading(found: Detections, labels: Sequence[str]) -> str:
    """The labels of ``found`` read left to right by box centre (a page's digit string)."""
    if not len(found):
        return ""
    centres = (found.boxes[:, 0] + found.boxes[:, 2]) / 2
    order = torch.sort(centres, stable=True).indices.tolist()
    indices = found.classes.tolist()
    return "".join(labels[indices[i]] for i in order)


def detections_answer(found: Detections, labels: Sequence[str]) -> dict:
    """One image's answer: its detections best first, its reading left to right, its size."""
    answers = [
        {"label": labels[index], "index": index, "score": round(score, 6), "box": [round(v, 2) for v in box]}
        for box, score, index in zip(found.boxes.tolist(), found.scores.tolist(), found.classes.tolist())
    ]
    width, height = found.image_size
    return {"detections": answers, "label": reading(found, labels), "image_size": [width, height]}


def encode_reply(
    call: DetectionCall, results: list[Detections], labels: Sequence[str], model: str, version: str,
    protocol: DetectorProtocol,
) -> protocols.Reply:  # fmt: skip
    """The request's answer in its protocol (``handlers.object_detector``'s docstring shows each)."""
    if call.protocol == "oip_v2":
        return encode_oip(call, results, labels, model, version, protocol)
    if call.protocol == "kserve_v1":
        return protocols.Reply({"predictions": [detections_answer(r, labels) for r in results], "model_name": model,
                                "model_version": version})  # fmt: skip
    return protocols.Reply({**detections_answer(results[0], labels), "model": model, "version": version})


def encode_oip(
    call: DetectionCall, results: list[Detections], labels: Sequence[str], model: str, version: str,
    config: DetectorProtocol,
) -> protocols.Reply:  # fmt: skip
    """OIP outputs ``[N, K, ...]`` padded to the most detections of any image (``DetectorProtocol``)."""
    count, k = len(results), max((len(r) for r in results), default=0)
    boxes = np.zeros((count, k, 4), dtype="<f4")
    scores = np.zeros((count, k), dtype="<f4")
    names = [[""] * k for _ in range(count)]
    for i, found in enumerate(results):
        n = len(found)
        boxes[i, :n] = found.boxes.numpy()
        scores[i, :n] = found.scores.numpy()
        names[i][:n] = [labels[c] for c in found.classes.tolist()]
    columns: dict[str, tuple[list[int], Any]] = {
        config.boxes_output: ([count, k, 4], boxes),
        config.scores_output: ([count, k], scores),
        config.labels_output: ([count, k], [name for row in names for name in row]),
        config.counts_output: ([count], np.array([len(r) for r in results], dtype="<i8")),
    }
    outputs, blobs = [], []
    for name, binary in call.outputs or []:
        shape, values = columns[name]
        datatype = config.outputs[name]
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if binary:
            blob = protocols.bytes_tensor(values) if datatype == "BYTES" else values.tobytes()
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif datatype == "FP32":  # as the other forms: boxes to 0.01 pixel, scores to 6 decimals
            places = 2 if name == config.boxes_output else 6
            tensor["data"] = [round(float(v), places) for v in values.reshape(-1)]
        elif datatype == "INT64":
            tensor["data"] = [int(v) for v in values.reshape(-1)]
        else:
            tensor["data"] = values
        outputs.append(tensor)
    document: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": outputs}
    if call.request_id is not None:
        document["id"] = call.request_id
    if not blobs:
        return protocols.Reply(document)
    header = json.dumps(document, separators=(",", ":")).encode()
    return protocols.Reply(b"".join([header, *blobs]), protocols.BINARY_CONTENT_TYPE,
                           {"Inference-Header-Content-Length": str(len(header))})  # fmt: skip


# ------------------------------------------------------------------------------------------ warm-up
def warmup_pages() -> list[bytes]:
    """A 640x480 JPEG and a tall 90x300 PNG with dark strokes on light paper, made in memory."""
    y, x = np.mgrid[0:480, 0:640]
    photo = np.stack([200 + x * 55 // 639, 200 + y * 55 // 479, np.full_like(x, 230)], axis=-1).astype(np.uint8)
    photo[150:330, 100:130] = 20  # a "1"
    photo[150:170, 300:420] = 30  # a "7"
    photo[150:330, 400:420] = 30
    tall = np.full((300, 90), 235, dtype=np.uint8)
    tall[40:120, 30:40] = 10
    jpeg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(photo).save(jpeg, format="JPEG", quality=90)
    Image.fromarray(tall).save(png, format="PNG")
    return [jpeg.getvalue(), png.getvalue()]


__all__ = [
    "CONVERSION_FAILURES",
    "DetectionConfig",
    "DetectionCall",
    "Detections",
    "DetectorConfig",
    "DetectorProtocol",
    "Letterbox",
    "decode_detections",
    "decode_request",
    "detections_answer",
    "encode_reply",
    "oip_metadata",
    "reading",
    "head_stride",
    "ink_tensor",
    "letterbox",
    "parse_max_detections",
    "parse_score_threshold",
    "PreparedPage",
    "warmup_pages",
]
