"""The object detection task's build side: digit pages, a small detector, training, INT8, evaluation.

Data (``generate_pages``): pages composed from scikit-learn's digits, 2 to 6 per page at random
non-overlapping places, sizes and contrasts, dark ink on light paper with an illumination gradient
and noise, pages of varied size and aspect ratio; every page has its ground-truth boxes (the
digit's visible ink) and labels. The ``train`` split of ``datasets._digits_arrays`` makes the
training and calibration pages, the ``holdout`` split the evaluation pages only. Page ``i`` of a
seed is the same on every machine (``numpy.random.default_rng([seed, i])``).

Model (``DigitDetector``): CenterNet-style. A small conv backbone (strides 2 to 16) with a
top-down neck back to stride 4, and three heads at stride 4: class heatmaps (logits), box size
(in cells) and centre offset. The program returns the raw heads; ``handlers.detection`` decodes
them, for the handler and for ``evaluate`` alike. FX static INT8 quantization (``quantize``) and
TorchScript export (``export_program``) work on it as is.

Entry points for the build: ``train_detector`` (weights from a ``DetectorRecipe``, whose ``key``
names a cache entry), ``load_detector``, ``choose_score_threshold`` (on ``validation_pages``:
training-split digits), ``calibration_inputs``, ``quantize``, ``example_input``,
``export_program``, ``evaluate`` (mAP@0.5 and page string accuracy on ``evaluation_pages``,
held-out digits), ``handler_config``; ``train_and_evaluate`` runs them all and reports the numbers
the issue's bar asks for. ``DetectorTask`` plugs them into the shared build as the
``object_detector`` task (``servekit.build.tasks``), its settings the spec's ``detection:``
section (``DetectorOptions``); ``write_golden_pages`` made ``samples/pages/``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual name
from PIL import Image
from torch import nn
from torchvision.ops import box_iou

from handlers.detection import (
    DetectionConfig,
    DetectorConfig,
    DetectorProtocol,
    decode_detections,
    ink_tensor,
    letterbox,
)
from handlers.detection import oip_metadata as detector_oip_metadata
from servekit.build.datasets import _digits_arrays
from servekit.build.tasks import Log, Task

LABELS = tuple(str(i) for i in range(10))
SPLITS = ("train", "holdout")
# Rendered ink above this (0..1) is part of the digit's box: what a person would draw the box around.
INK_LEVEL = 0.25
# Seeds of the page streams that are not training pages: calibration, validation (training-split digits),
# and the held-out evaluation pages.
CALIBRATION_SEED_OFFSET = 1_000_003
VALIDATION_SEED_OFFSET = 2_000_003
# The default score thresholds ``choose_score_threshold`` tries on validation pages.
SCORE_THRESHOLDS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
EVALUATION_SEED = 20_261_125


# ------------------------------------------------------------------------------------------ pages
@dataclass(frozen=True)
class PageStyle:
    """How pages vary. Digit sizes are in pixels of the model's letterboxed input (``input_size``)."""

    min_digits: int = 2
    max_digits: int = 6
    min_long_side: int = 96
    max_long_side: int = 480
    max_aspect: float = 2.5  # width / height from 1/max_aspect to max_aspect
    min_digit: float = 14.0  # a digit's height in the input, before its aspect jitter
    max_digit: float = 40.0
    fill: float = 0.3  # the digits' cells cover at most this share of the page
    max_noise: float = 12.0  # Gaussian noise's standard deviation, in gray levels, up to this
    max_gradient: float = 20.0  # illumination: the paper's brightness varies by up to this across the page
    input_size: int = 128


DEFAULT_STYLE = PageStyle()


@dataclass(frozen=True)
class Page:
    """One page: 8-bit gray pixels, boxes ``[K, 4]`` (x1, y1, x2, y2 in pixels) and labels ``[K]``."""

    image: Image.Image
    boxes: np.ndarray
    labels: np.ndarray

    def text(self) -> str:
        """The digits read left to right (by box centre)."""
        return reading_order_text(self.boxes, self.labels)


def reading_order_text(boxes: np.ndarray | torch.Tensor, labels: Sequence[int] | np.ndarray | torch.Tensor) -> str:
    """Labels joined in the order of their boxes' centres from left to right."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    centres = (boxes[:, 0] + boxes[:, 2]) / 2
    order = np.argsort(centres, kind="stable")
    labels = np.asarray(labels).reshape(-1)
    return "".join(LABELS[int(labels[i])] for i in order)


def _pool(split: str) -> tuple[np.ndarray, np.ndarray]:
    if split not in SPLITS:
        raise ValueError(f"split: must be one of {list(SPLITS)}, got {split!r}")
    x_train, x_holdout, y_train, y_holdout = _digits_arrays()
    cells, labels = (x_train, y_train) if split == "train" else (x_holdout, y_holdout)
    return np.asarray(cells, dtype=np.float32).reshape(-1, 8, 8) / 16.0, np.asarray(labels, dtype=np.int64)


def _render_ink(cells: np.ndarray, width: int, height: int) -> np.ndarray:
    """An 8x8 array of ink (0..1) scaled to ``width`` x ``height``, bicubic, clipped to 0..1."""
    image = Image.fromarray(cells.astype(np.float32), "F").resize((width, height), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)


def make_page(rng: np.random.Generator, cells: np.ndarray, labels: np.ndarray, style: PageStyle) -> Page:
    """One page from ``rng``, its digits drawn from ``cells`` / ``labels`` (see the module docstring)."""
    aspect = math.exp(rng.uniform(-math.log(style.max_aspect), math.log(style.max_aspect)))
    long_side = int(rng.integers(style.min_long_side, style.max_long_side + 1))
    if aspect >= 1:
        width, height = long_side, max(8, round(long_side / aspect))
    else:
        width, height = max(8, round(long_side * aspect)), long_side
    page_per_input = long_side / style.input_size  # page pixels per pixel of the letterboxed input
    count = int(rng.integers(style.min_digits, style.max_digits + 1))
    # Digits small enough that ``count`` of them fit the page's share ``fill``.
    fits = math.sqrt(style.fill * width * height / count) / page_per_input
    top = max(style.min_digit, min(style.max_digit, fits))

    paper = rng.uniform(170, 250)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    gx, gy = rng.uniform(-style.max_gradient, style.max_gradient, size=2)
    canvas = paper + gx * (xs / width - 0.5) + gy * (ys / height - 0.5)

    boxes: list[tuple[float, float, float, float]] = []
    chosen: list[int] = []
    cell_sizes: list[float] = []
    for _ in range(40 * count):
        if len(boxes) == count:
            break
        index = int(rng.integers(len(labels)))
        cell_h = max(6, round(rng.uniform(style.min_digit, top) * page_per_input))
        cell_w = max(6, round(cell_h * rng.uniform(0.75, 1.2)))
        if cell_w >= width or cell_h >= height:
            continue
        x, y = int(rng.integers(0, width - cell_w + 1)), int(rng.integers(0, height - cell_h + 1))
        ink = _render_ink(cells[index], cell_w, cell_h)
        rows, cols = np.flatnonzero((ink >= INK_LEVEL).any(axis=1)), np.flatnonzero((ink >= INK_LEVEL).any(axis=0))
        if not len(rows):
            continue
        box = (x + cols[0], y + rows[0], x + cols[-1] + 1.0, y + rows[-1] + 1.0)
        if not _fits(box, cell_h, boxes, cell_sizes):
            continue
        contrast = rng.uniform(0.45, 1.0)
        region = canvas[y : y + cell_h, x : x + cell_w]
        region *= 1.0 - contrast * ink
        boxes.append(tuple(float(v) for v in box))
        chosen.append(index)
        cell_sizes.append(cell_h)
    sigma = rng.uniform(0, style.max_noise)
    canvas += np.float32(sigma) * rng.standard_normal(size=canvas.shape, dtype=np.float32)
    pixels = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return Page(
        Image.fromarray(pixels, "L"),
        np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels[chosen].astype(np.int64) if chosen else np.zeros(0, dtype=np.int64),
    )


def _fits(box: tuple, size: float, boxes: list[tuple], sizes: list[float]) -> bool:
    """No overlap with a gap, and centres far enough apart left to right that reading order is clear."""
    centre = (box[0] + box[2]) / 2
    for other, other_size in zip(boxes, sizes):
        gap = 0.15 * min(size, other_size)
        apart = (
            box[2] + gap <= other[0] or other[2] + gap <= box[0] or box[3] + gap <= other[1] or other[3] + gap <= box[1]
        )
        if not apart or abs(centre - (other[0] + other[2]) / 2) < 0.25 * min(size, other_size):
            return False
    return True


def generate_pages(split: str, count: int, seed: int, style: PageStyle = DEFAULT_STYLE, start: int = 0) -> list[Page]:
    """Pages ``start`` .. ``start + count - 1`` of ``seed``, digits from ``split`` (train or holdout)."""
    cells, labels = _pool(split)
    return [make_page(np.random.default_rng([seed, i]), cells, labels, style) for i in range(start, start + count)]


def evaluation_pages(count: int = 500, style: PageStyle = DEFAULT_STYLE) -> list[Page]:
    """The held-out evaluation pages: held-out digits only, a seed no training run uses."""
    return generate_pages("holdout", count, EVALUATION_SEED, style)


@dataclass(frozen=True)
class PageTensors:
    """Pages letterboxed for the model: inputs ``[N, 1, S, S]`` and boxes in input pixels, padded to ``K``."""

    inputs: torch.Tensor  # uint8 gray; ``ink_tensor`` makes the model's input
    boxes: torch.Tensor  # [N, K, 4] float
    labels: torch.Tensor  # [N, K] long, -1 = no object

    def __len__(self) -> int:
        return len(self.inputs)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return ink_tensor(self.inputs[index].numpy()), self.boxes[index], self.labels[index]


def letterbox_pages(pages: Sequence[Page], input_size: int) -> PageTensors:
    """Letterbox pages exactly as the handler does and move their boxes into the input."""
    most = max((len(p.labels) for p in pages), default=0)
    inputs = np.zeros((len(pages), input_size, input_size), dtype=np.uint8)
    boxes = torch.zeros(len(pages), max(most, 1), 4)
    labels = torch.full((len(pages), max(most, 1)), -1, dtype=torch.long)
    for i, page in enumerate(pages):
        gray, transform = letterbox(page.image, input_size)
        inputs[i] = gray
        k = len(page.labels)
        if k:
            boxes[i, :k] = transform.to_input(torch.from_numpy(page.boxes))
            labels[i, :k] = torch.from_numpy(page.labels)
    return PageTensors(torch.from_numpy(inputs), boxes, labels)


# ------------------------------------------------------------------------------------------ model
def _conv(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class DigitDetector(nn.Module):
    """CenterNet-style detector for ``[N, 1, S, S]`` ink images; returns heads at stride 4.

    ``(heatmap [N, C, S/4, S/4] logits, size [N, 2, ...] in cells, offset [N, 2, ...] in cells)``.
    About 0.27M parameters at ``width`` 32; the layers are the ones FX static quantization fuses and converts
    (conv-bn-relu, add, nearest upsampling).
    """

    stride = 4

    def __init__(self, num_classes: int = len(LABELS), width: int = 32) -> None:
        super().__init__()
        w = width
        self.stem = _conv(1, w // 2, 2)  # /2
        self.stage2 = nn.Sequential(_conv(w // 2, w, 2), _conv(w, w))  # /4
        self.stage3 = nn.Sequential(_conv(w, 2 * w, 2), _conv(2 * w, 2 * w))  # /8
        self.stage4 = nn.Sequential(_conv(2 * w, 3 * w, 2), _conv(3 * w, 3 * w))  # /16
        self.top4 = _conv(3 * w, 2 * w, kernel=1)
        self.lateral3 = _conv(2 * w, 2 * w, kernel=1)
        self.smooth3 = _conv(2 * w, w, kernel=3)
        self.lateral2 = _conv(w, w, kernel=1)
        self.neck = _conv(w, w)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.heatmap = nn.Sequential(_conv(w, w), nn.Conv2d(w, num_classes, 1))
        self.size = nn.Sequential(_conv(w, w // 2), nn.Conv2d(w // 2, 2, 1))
        self.offset = nn.Sequential(_conv(w, w // 2), nn.Conv2d(w // 2, 2, 1))
        nn.init.constant_(self.heatmap[-1].bias, -2.19)  # CenterNet: start every class at p = 0.1
        # Start at a typical digit (6 cells, 24 input pixels) with its centre mid-cell: boxes make sense early.
        nn.init.constant_(self.size[-1].bias, 6.0)
        nn.init.constant_(self.offset[-1].bias, 0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s2 = self.stage2(self.stem(x))
        s3 = self.stage3(s2)
        s4 = self.stage4(s3)
        p3 = self.lateral3(s3) + self.up(self.top4(s4))
        p2 = self.lateral2(s2) + self.up(self.smooth3(p3))
        features = self.neck(p2)
        return self.heatmap(features), self.size(features), self.offset(features)


def example_input(input_size: int = DEFAULT_STYLE.input_size, batch: int = 1) -> torch.Tensor:
    """A batch of blank inputs for tracing and FX preparation."""
    return torch.zeros(batch, 1, input_size, input_size)


# ------------------------------------------------------------------------------------------ training
@dataclass(frozen=True)
class DetectorRecipe:
    """Everything that decides the trained weights (its ``key`` names the cached weights)."""

    seed: int = 0
    train_pages: int = 5000
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 3e-3
    width: int = 32
    style: PageStyle = DEFAULT_STYLE
    recipe_version: int = 1

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def _targets(
    boxes: torch.Tensor, labels: torch.Tensor, num_classes: int, side: int, stride: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CenterNet targets for a batch: heatmaps ``[B, C, H, W]``, centre cells, sizes and offsets per object."""
    valid = labels >= 0
    centres = (boxes[..., :2] + boxes[..., 2:]) / (2 * stride)  # [B, K, 2] in cells
    sizes = (boxes[..., 2:] - boxes[..., :2]) / stride
    cells = centres.floor().clamp(0, side - 1)
    offsets = centres - cells
    grid = torch.arange(side, dtype=torch.float32)
    sigma = (sizes / 6).clamp(min=0.5)  # [B, K, 2]
    gx = torch.exp(-((grid.view(1, 1, -1) - cells[..., :1]) ** 2) / (2 * sigma[..., :1] ** 2))  # [B, K, W]
    gy = torch.exp(-((grid.view(1, 1, -1) - cells[..., 1:]) ** 2) / (2 * sigma[..., 1:] ** 2))  # [B, K, H]
    gauss = gy.unsqueeze(-1) * gx.unsqueeze(-2) * valid[..., None, None]  # [B, K, H, W]
    onehot = F.one_hot(labels.clamp(min=0), num_classes).float() * valid[..., None]  # [B, K, C]
    heat = (onehot[..., None, None] * gauss.unsqueeze(2)).amax(dim=1)  # [B, C, H, W]
    index = (cells[..., 1] * side + cells[..., 0]).long()
    return heat, index, sizes, offsets, valid


def _focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, normalised by the number of objects."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    positive = target.eq(1).float()
    positive_loss = -torch.log(p) * (1 - p) ** 2 * positive
    negative_loss = -torch.log(1 - p) * p**2 * (1 - target) ** 4 * (1 - positive)
    return (positive_loss.sum() + negative_loss.sum()) / positive.sum().clamp(min=1)


def detection_loss(
    heads: tuple[torch.Tensor, torch.Tensor, torch.Tensor], boxes: torch.Tensor, labels: torch.Tensor, stride: int
) -> tuple[torch.Tensor, dict[str, float]]:
    heatmap, size, offset = heads
    batch, classes, side, _ = heatmap.shape
    heat, index, sizes, offsets, valid = _targets(boxes, labels, classes, side, stride)
    # A centre cell is 1 exactly, whatever rounding the Gaussian saw.
    flat = heat.view(batch, classes, -1)
    rows = torch.arange(batch).unsqueeze(1).expand_as(index)
    flat[rows[valid], labels[valid], index[valid]] = 1.0
    focal = _focal_loss(heatmap, heat)
    gather = index.unsqueeze(1).expand(-1, 2, -1)  # [B, 2, K]
    predicted_size = size.reshape(batch, 2, -1).gather(2, gather).transpose(1, 2)  # [B, K, 2]
    predicted_offset = offset.reshape(batch, 2, -1).gather(2, gather).transpose(1, 2)
    mask = valid.unsqueeze(-1).float()
    objects = mask.sum().clamp(min=1)
    size_loss = (F.l1_loss(predicted_size, sizes, reduction="none") * mask).sum() / objects
    offset_loss = (F.l1_loss(predicted_offset, offsets, reduction="none") * mask).sum() / objects
    total = focal + 0.1 * size_loss + offset_loss
    return total, {"heatmap": focal.item(), "size": size_loss.item(), "offset": offset_loss.item()}


def training_pages(recipe: DetectorRecipe, log: Callable[[str], None] = print) -> PageTensors:
    started = time.perf_counter()
    pages = generate_pages("train", recipe.train_pages, recipe.seed, recipe.style)
    tensors = letterbox_pages(pages, recipe.style.input_size)
    log(f"generated {len(pages)} training pages in {time.perf_counter() - started:.1f}s")
    return tensors


def train_detector(
    recipe: DetectorRecipe, log: Callable[[str], None] = print, pages: PageTensors | None = None
) -> dict[str, torch.Tensor]:
    """Train a ``DigitDetector`` on ``recipe``'s training pages; deterministic for a seed (and thread count)."""
    data = pages if pages is not None else training_pages(recipe, log)
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    # channels_last: oneDNN's convolutions (forward and backward) run about 15 % faster on CPU in that layout
    model = DigitDetector(len(LABELS), recipe.width).to(memory_format=torch.channels_last)
    steps_per_epoch = math.ceil(len(data) / recipe.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.learning_rate, total_steps=recipe.epochs * steps_per_epoch, pct_start=0.15
    )
    started = time.perf_counter()
    for epoch in range(1, recipe.epochs + 1):
        model.train()
        order = torch.randperm(len(data), generator=generator)
        totals = {"heatmap": 0.0, "size": 0.0, "offset": 0.0}
        for start in range(0, len(data), recipe.batch_size):
            inputs, boxes, labels = data.batch(order[start : start + recipe.batch_size])
            inputs = inputs.contiguous(memory_format=torch.channels_last)
            loss, parts = detection_loss(model(inputs), boxes, labels, DigitDetector.stride)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            for name, value in parts.items():
                totals[name] += value / steps_per_epoch
        log(
            f"epoch {epoch}/{recipe.epochs}: heatmap {totals['heatmap']:.4f}, size {totals['size']:.4f}, "
            f"offset {totals['offset']:.4f} ({time.perf_counter() - started:.0f}s)"
        )
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def load_detector(state: dict[str, torch.Tensor], width: int = 32) -> DigitDetector:
    model = DigitDetector(len(LABELS), width)
    model.load_state_dict(state, strict=True)
    return model.eval()


# ------------------------------------------------------------------------------------------ INT8 and export
def calibration_inputs(count: int = 256, seed: int = 0, style: PageStyle = DEFAULT_STYLE) -> torch.Tensor:
    """Model inputs of training-split pages (a stream no training run draws: never held-out digits)."""
    pages = generate_pages("train", count, seed + CALIBRATION_SEED_OFFSET, style)
    tensors = letterbox_pages(pages, style.input_size)
    return ink_tensor(tensors.inputs.numpy())


def quantize(
    model: nn.Module, calibration: torch.Tensor, backend: str = "x86", log: Callable[[str], None] = print
) -> nn.Module:
    """Post-training static INT8 quantization in FX graph mode, calibrated on ``calibration``."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = backend
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FX quantization deprecation notices
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping(backend), (calibration[:1],))
        with torch.inference_mode():
            batches = range(0, len(calibration), 32)
            for i, start in enumerate(batches, 1):
                prepared(calibration[start : start + 32])
                if i == 1 or i % 4 == 0 or i == len(batches):
                    log(f"calibrating: batch {i}/{len(batches)}")
        return convert_fx(prepared)


def export_program(model: nn.Module, path: Path, input_size: int = DEFAULT_STYLE.input_size) -> None:
    """Trace and freeze ``model`` (FP32 or INT8) into a TorchScript program returning the raw heads."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarning and torch.jit deprecation notices
        with torch.inference_mode(False), torch.no_grad():
            traced = torch.jit.trace(model.eval(), example_input(input_size))
            torch.jit.save(torch.jit.freeze(traced), str(path))


def handler_config(precision: str = "fp32", **detection: object) -> dict:
    """The ``handler:`` section of a detector archive's model-config.yaml."""
    return DetectorConfig(precision=precision, detection=DetectionConfig(**detection)).to_dict()


# ------------------------------------------------------------------------------------------ evaluation
def average_precision(scores: np.ndarray, hits: np.ndarray, ground_truths: int) -> float:
    """VOC all-point interpolated AP of one class: detections' scores, whether each is a hit, the GT count."""
    if ground_truths == 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hit = np.asarray(hits, dtype=bool)[order]
    true_positives = np.cumsum(hit)
    false_positives = np.cumsum(~hit)
    recall = true_positives / ground_truths
    precision = true_positives / np.maximum(true_positives + false_positives, 1)
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # the precision envelope
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


@dataclass(frozen=True)
class Prediction:
    boxes: np.ndarray  # [K, 4]
    scores: np.ndarray  # [K]
    labels: np.ndarray  # [K]


def mean_average_precision(
    predictions: Sequence[Prediction],
    truths: Sequence[tuple[np.ndarray, np.ndarray]],
    num_classes: int = len(LABELS),
    iou_threshold: float = 0.5,
) -> tuple[float, list[float]]:
    """mAP@``iou_threshold`` (VOC: greedy by score, each ground truth matched once) and AP per class.

    Classes without ground truth get NaN and are left out of the mean.
    """
    scores: list[list[float]] = [[] for _ in range(num_classes)]
    hits: list[list[bool]] = [[] for _ in range(num_classes)]
    counts = [0] * num_classes
    for predicted, (true_boxes, true_labels) in zip(predictions, truths, strict=True):
        true_boxes = torch.as_tensor(np.asarray(true_boxes, dtype=np.float32).reshape(-1, 4))
        true_labels = np.asarray(true_labels).reshape(-1)
        for c in range(num_classes):
            truth = true_boxes[torch.from_numpy(true_labels == c)]
            counts[c] += len(truth)
            mine = np.asarray(predicted.labels).reshape(-1) == c
            if not mine.any():
                continue
            boxes = torch.as_tensor(np.asarray(predicted.boxes, dtype=np.float32).reshape(-1, 4)[mine])
            confidence = np.asarray(predicted.scores, dtype=np.float64).reshape(-1)[mine]
            order = np.argsort(-confidence, kind="stable")
            overlaps = box_iou(boxes, truth).numpy() if len(truth) else np.zeros((len(boxes), 0))
            taken = np.zeros(len(truth), dtype=bool)
            for i in order:
                best = int(np.argmax(overlaps[i])) if len(truth) else -1
                hit = best >= 0 and overlaps[i, best] >= iou_threshold and not taken[best]
                if hit:
                    taken[best] = True
                scores[c].append(float(confidence[i]))
                hits[c].append(bool(hit))
    per_class = [average_precision(np.array(scores[c]), np.array(hits[c]), counts[c]) for c in range(num_classes)]
    present = [ap for ap in per_class if not math.isnan(ap)]
    return (float(np.mean(present)) if present else float("nan")), per_class


@dataclass(frozen=True)
class DetectionScores:
    map50: float
    page_accuracy: float
    per_class_ap: list[float]
    pages: int


@torch.inference_mode()
def page_outputs(
    model: Callable[[torch.Tensor], Sequence[torch.Tensor]],
    pages: Sequence[Page],
    config: DetectionConfig = DetectionConfig(),  # noqa: B008 - frozen
) -> list[tuple[Sequence[torch.Tensor], list]]:
    """The program's heads for ``pages`` through the handler's letterbox, 64 pages at a time, with each page's
    letterbox transform: decoded at as many thresholds as asked (``decode_pages``) for one forward pass."""
    outputs = []
    for start in range(0, len(pages), 64):
        boxed = [letterbox(page.image, config.input_size) for page in pages[start : start + 64]]
        outputs.append((model(ink_tensor(np.stack([gray for gray, _ in boxed]))), [t for _, t in boxed]))
    return outputs


@torch.inference_mode()
def decode_pages(
    outputs: list[tuple[Sequence[torch.Tensor], list]],
    score_threshold: float,
    max_detections: int,
    config: DetectionConfig = DetectionConfig(),  # noqa: B008 - frozen
) -> list[Prediction]:
    """``page_outputs`` through the handler's ``decode_detections`` at one threshold."""
    results = []
    for heads, transforms in outputs:
        found = decode_detections(
            heads, transforms, score_threshold, max_detections, config.nms_iou, config.input_size,
            config.class_agnostic_nms,
        )  # fmt: skip
        results.extend(Prediction(d.boxes.numpy(), d.scores.numpy(), d.classes.numpy()) for d in found)
    return results


def predict_pages(
    model: Callable[[torch.Tensor], Sequence[torch.Tensor]],
    pages: Sequence[Page],
    score_threshold: float,
    max_detections: int,
    config: DetectionConfig = DetectionConfig(),  # noqa: B008 - frozen
) -> list[Prediction]:
    """Each page through the handler's letterbox, the program and ``decode_detections``."""
    return decode_pages(page_outputs(model, pages, config), score_threshold, max_detections, config)


def evaluate(
    model: Callable[[torch.Tensor], Sequence[torch.Tensor]],
    pages: Sequence[Page],
    config: DetectionConfig = DetectionConfig(),  # noqa: B008 - frozen
) -> DetectionScores:
    """mAP@0.5 (every detection down to ``min_score_threshold``) and page string accuracy (the defaults)."""
    truths = [(page.boxes, page.labels) for page in pages]
    outputs = page_outputs(model, pages, config)
    ranked = decode_pages(outputs, config.min_score_threshold, config.max_detections_limit, config)
    map50, per_class = mean_average_precision(ranked, truths)
    served = decode_pages(outputs, config.score_threshold, config.max_detections, config)
    right = sum(reading_order_text(p.boxes, p.labels) == page.text() for p, page in zip(served, pages))
    return DetectionScores(map50, right / max(len(pages), 1), per_class, len(pages))


# ------------------------------------------------------------------------------------------ the bar
def validation_pages(count: int = 500, seed: int = 0, style: PageStyle = DEFAULT_STYLE) -> list[Page]:
    """Pages of training-split digits from a stream no training run draws: for choosing settings, never held-out."""
    return generate_pages("train", count, seed + VALIDATION_SEED_OFFSET, style)


def choose_score_threshold(
    model: Callable[[torch.Tensor], Sequence[torch.Tensor]],
    pages: Sequence[Page],
    candidates: Sequence[float] = SCORE_THRESHOLDS,
    config: DetectionConfig = DetectionConfig(),  # noqa: B008 - frozen
) -> tuple[float, dict[float, float]]:
    """The score threshold that reads the most ``pages`` right (the higher on a tie), and each candidate's accuracy."""
    accuracy = {}
    outputs = page_outputs(model, pages, config)  # one forward pass, decoded at every candidate
    for threshold in candidates:
        found = decode_pages(outputs, threshold, config.max_detections, config)
        accuracy[threshold] = sum(reading_order_text(p.boxes, p.labels) == page.text() for p, page in zip(found, pages))
        accuracy[threshold] /= max(len(pages), 1)
    best = max(accuracy.values())
    return max(t for t, value in accuracy.items() if value == best), accuracy


def train_and_evaluate(
    seed: int = 0,
    recipe: DetectorRecipe | None = None,
    evaluation: int = 500,
    out_dir: Path | None = None,
    log: Callable[[str], None] = print,
    weights: Path | None = None,
    validation: int = 500,
    calibration: int = 256,
) -> dict:
    """Train (or load ``weights``), choose the score threshold on validation pages, evaluate FP32 on held-out
    pages, quantize, export both programs and evaluate them as the handler loads them.

    Returns (and logs) the numbers of the issue's bar: FP32 mAP@0.5 and page accuracy, INT8's and
    the drop, and the training time on this machine. With ``out_dir``: the weights, both programs,
    labels.json and the handler sections there.
    """
    from handlers.model_loading import load_model

    recipe = recipe or DetectorRecipe(seed=seed)
    report: dict = {"seed": recipe.seed, "recipe": asdict(recipe), "threads": torch.get_num_threads()}
    if weights is None:
        began = time.perf_counter()
        pages = training_pages(recipe, log)
        generated = time.perf_counter()
        state = train_detector(recipe, log, pages)
        report["generate_seconds"] = round(generated - began, 1)
        report["train_seconds"] = round(time.perf_counter() - generated, 1)
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        log(f"weights from {weights} (not trained here)")
    model = load_detector(state, recipe.width)
    threshold, tried = choose_score_threshold(model, validation_pages(validation, recipe.seed, recipe.style))
    log(f"score threshold {threshold:g} (validation page accuracy {tried})")
    config = DetectionConfig(score_threshold=threshold)
    report["score_threshold"] = threshold
    report["validation_page_accuracy"] = tried
    held_out = evaluation_pages(evaluation, recipe.style)
    fp32 = evaluate(model, held_out, config)
    log(f"FP32 (eager): mAP@0.5 {fp32.map50:.4f}, page accuracy {fp32.page_accuracy:.1%}")
    report["fp32_eager"] = asdict(fp32)
    int8 = quantize(model, calibration_inputs(calibration, recipe.seed, recipe.style), log=log)
    directory = Path(out_dir) if out_dir is not None else None
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(state, directory / "detector_fp32_state.pt")
        for precision, program in (("fp32", model), ("int8", int8)):
            path = directory / f"detector_{precision}.pt"
            export_program(program, path, recipe.style.input_size)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notices
                loaded = load_model(path, DetectorConfig(precision=precision))
            scores = evaluate(loaded, held_out, config)
            report[f"{precision}_torchscript"] = asdict(scores)
            report[f"{precision}_handler_config"] = handler_config(precision, score_threshold=threshold)
            log(f"{precision} (TorchScript, as served): mAP@0.5 {scores.map50:.4f}, "
                f"page accuracy {scores.page_accuracy:.1%}")  # fmt: skip
        (directory / "labels.json").write_text(json.dumps(list(LABELS)))
    else:
        scores = evaluate(int8, held_out, config)
        report["int8_eager"] = asdict(scores)
        log(f"INT8 (eager): mAP@0.5 {scores.map50:.4f}, page accuracy {scores.page_accuracy:.1%}")
    fp32_map = report.get("fp32_torchscript", report["fp32_eager"])["map50"]
    int8_map = report.get("int8_torchscript", report.get("int8_eager", {})).get("map50", float("nan"))
    report["int8_map_drop_points"] = round(100 * (fp32_map - int8_map), 3)
    if "train_seconds" in report:
        log(f"training {report['train_seconds']}s on {report['threads']} threads "
            f"(+{report['generate_seconds']}s making pages)")  # fmt: skip
    log(f"INT8 mAP drop {report['int8_map_drop_points']} points")
    return report


# ------------------------------------------------------------------------------------------ the task
ARCHITECTURE = "digit_detector"
DATASET = "digit_pages"
# DetectorOptions keys that decide training and evaluation, beside DetectionConfig's (serving) keys.
_BUILD_KEYS = ("train_pages", "validation_pages", "evaluation_pages", "width", "batch_size", "learning_rate")


@dataclass(frozen=True)
class DetectorOptions:
    """The spec's ``detection:`` section: the handler's ``DetectionConfig`` keys and the build's own.

    ``score_threshold: auto`` (the default) is chosen at build time from the FP32 weights on
    ``validation_pages`` pages of training digits (``choose_score_threshold``), never on held-out
    pages, and written into the archive's handler section; a number fixes it. ``train_pages``,
    ``width``, ``batch_size`` and ``learning_rate`` (with ``weights.seed`` and ``weights.epochs``)
    make the ``DetectorRecipe``; ``evaluation_pages`` held-out pages measure mAP@0.5 and page accuracy.
    """

    serving: DetectionConfig = DetectionConfig()
    score_threshold: float | None = None  # None: auto
    train_pages: int = 5000
    validation_pages: int = 500
    evaluation_pages: int = 500
    width: int = 32
    batch_size: int = 32
    learning_rate: float = 3e-3

    @classmethod
    def from_dict(cls, data: Any) -> DetectorOptions:
        data = dict(data or {}) if isinstance(data, dict) or data is None else data
        if not isinstance(data, dict):
            raise ValueError(f"must be a mapping of detection settings, got {data!r}")
        serving_keys = list(DetectionConfig.__dataclass_fields__)
        unknown = sorted(set(data) - set(serving_keys) - set(_BUILD_KEYS))
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown key in detection (valid keys: "
                             f"{', '.join(sorted([*serving_keys, *_BUILD_KEYS]))})")  # fmt: skip
        threshold = data.pop("score_threshold", "auto")
        serving = {k: data.pop(k) for k in list(data) if k in serving_keys}
        if threshold != "auto":
            serving["score_threshold"] = threshold
        try:
            config = DetectionConfig(**serving)
        except ValueError as exc:
            raise ValueError(str(exc).removeprefix("detection.")) from None
        for key in ("train_pages", "validation_pages", "evaluation_pages", "width", "batch_size"):
            value = data.get(key, getattr(cls, key))
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key}: must be a positive whole number, got {value!r}")
        if data.get("width", cls.width) % 2:
            raise ValueError(f"width: must be even (the stem has width / 2 channels), got {data['width']!r}")
        rate = data.get("learning_rate", cls.learning_rate)
        if not isinstance(rate, int | float) or isinstance(rate, bool) or not 0 < rate < 1:
            raise ValueError(f"learning_rate: must be a number between 0 and 1, got {rate!r}")
        if config.input_size % 16:
            raise ValueError(f"input_size: the detector's backbone needs a multiple of 16, got {config.input_size}")
        return cls(config, None if threshold == "auto" else float(threshold), **data)

    def to_dict(self) -> dict:
        data = self.serving.to_dict()
        data["score_threshold"] = "auto" if self.score_threshold is None else self.score_threshold
        data.update({key: getattr(self, key) for key in _BUILD_KEYS})
        return data

    @property
    def style(self) -> PageStyle:
        return PageStyle(input_size=self.serving.input_size)

    def detection_config(self) -> DetectionConfig:
        """The handler's settings (``auto``: the DetectionConfig default until ``DetectorTask.tune`` chose)."""
        if self.score_threshold is None:
            return self.serving
        return DetectionConfig(**{**self.serving.to_dict(), "score_threshold": self.score_threshold})


class PageEvaluation:
    """The held-out evaluation pages (held-out digits only), generated once per build."""

    def __init__(self, pages: list[Page]) -> None:
        self.pages = pages

    def __len__(self) -> int:
        return len(self.pages)


_CHOSEN: dict[str, tuple[float, dict[float, float]]] = {}


class DetectorTask(Task):
    """Pages -> digit boxes, labels and scores (``handlers.object_detector``), built from the spec::

        architecture: digit_detector        # DigitDetector, CenterNet-style
        handler: object_detector
        weights: {train: digit_pages, seed: 0, epochs: 10}
        detection: {train_pages: 5000, score_threshold: auto, ...}   # DetectorOptions
        evaluation: digit_pages             # held-out pages: mAP@0.5 (the metric) and page accuracy
        quantization: {calibration: digit_pages, calibration_images: 256, max_drop: 2.0}

    1. ``train``: ``train_detector`` on ``train_pages`` pages of training digits (cached by ``recipe``);
    2. ``tune``: ``score_threshold: auto`` is chosen on validation pages of training digits;
    3. ``convert``: static FX INT8 calibrated on training pages (``calibration_inputs``);
    4. ``measure``: 100 x mAP@0.5 and the page accuracy on held-out pages, as the handler decodes;
    5. ``drift_reference``: the top detection's label share, its score histogram, brightness, sizes.
    """

    handler = "object_detector"
    handler_file = "handlers/object_detector.py"
    metric = "map50"
    metric_label = "mAP@0.5"
    unit = "pages"
    spec_keys = frozenset({"detection", "limits"})
    options_key = "detection"
    calibrated = True

    def architectures(self) -> Collection[str]:
        return (ARCHITECTURE,)

    def datasets(self) -> Collection[str]:
        return (DATASET,)

    def parse_protocol(self, data: dict | None) -> DetectorProtocol:
        return DetectorProtocol.from_dict(data)

    def parse_options(self, data: Any) -> DetectorOptions:
        return DetectorOptions.from_dict(data)

    def check(self, spec: Any) -> None:
        if tuple(spec.labels) != LABELS:
            raise ValueError(f"labels: the digit detector finds the digits {list(LABELS)}, got {list(spec.labels)}")
        if spec.precision == "bf16":
            raise ValueError("precision: the object detector is built in fp32 or int8 (bf16 is not supported)")
        if spec.weights.file is None and spec.weights.train != DATASET:
            raise ValueError(f"weights: train it on {DATASET} (weights.train) or give a state_dict (weights.file)")
        q = spec.quantization
        if q is not None and q.calibration != DATASET:
            raise ValueError(f"quantization.calibration: the detector calibrates on training pages: {DATASET}")

    def handler_config(self, spec: Any) -> DetectorConfig:
        return DetectorConfig(
            precision=spec.precision,
            detection=spec.options.detection_config(),
            limits=spec.limits,
            threads=spec.serving.threads,
            quantized_engine=spec.quantization.backend if spec.quantization is not None else "x86",
            protocol=spec.protocol,
            faults=spec.faults,
            prediction_log=spec.monitoring.prediction_log,
            explain=spec.explain,
        )

    def oip_metadata(self, spec: Any) -> dict:
        return detector_oip_metadata(spec.protocol, spec.options.detection_config(), len(spec.labels))

    # ------------------------------------------------------------------ weights
    @staticmethod
    def detector_recipe(spec: Any) -> DetectorRecipe:
        o = spec.options
        return DetectorRecipe(
            seed=spec.weights.seed, train_pages=o.train_pages, epochs=spec.weights.epochs, batch_size=o.batch_size,
            learning_rate=float(o.learning_rate), width=o.width, style=o.style,
        )  # fmt: skip

    def recipe(self, spec: Any) -> dict:
        return {"task": self.handler, "train": spec.weights.train, "labels": list(spec.labels),
                **asdict(self.detector_recipe(spec))}  # fmt: skip

    def train(self, spec: Any, log: Log) -> dict[str, torch.Tensor]:
        recipe = self.detector_recipe(spec)
        log(f"training {ARCHITECTURE} (width {recipe.width}) on {recipe.train_pages} pages of training digits, "
            f"{recipe.epochs} epochs")  # fmt: skip
        began = time.perf_counter()
        state = train_detector(recipe, log)
        log(f"trained in {time.perf_counter() - began:.0f}s on {torch.get_num_threads()} threads")
        return state

    def build_model(self, spec: Any) -> nn.Module:
        return DigitDetector(len(LABELS), spec.options.width)

    def tune(self, model: nn.Module, spec: Any, log: Log) -> Any:
        """``score_threshold: auto`` -> the threshold that reads the most validation pages right (training digits)."""
        from dataclasses import replace

        options = spec.options
        if options.score_threshold is not None:
            return spec
        state = model.state_dict()
        digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in state.values())).hexdigest()
        key = json.dumps([digest, options.validation_pages, spec.weights.seed, options.serving.to_dict()])
        if key not in _CHOSEN:
            pages = validation_pages(options.validation_pages, spec.weights.seed, options.style)
            _CHOSEN[key] = choose_score_threshold(model.eval(), pages, config=options.serving)
        threshold, tried = _CHOSEN[key]
        shown = ", ".join(f"{t:g}: {100 * a:.1f}%" for t, a in tried.items())
        log(f"score threshold {threshold:g}, chosen on {options.validation_pages} validation pages of training "
            f"digits (page accuracy {shown})")  # fmt: skip
        return replace(spec, options=replace(options, score_threshold=threshold))

    # ------------------------------------------------------------------ the program
    def example_input(self, spec: Any) -> torch.Tensor:
        return example_input(spec.options.serving.input_size)

    def convert(self, model: nn.Module, spec: Any, log: Log) -> nn.Module:
        if spec.precision != "int8":
            raise ValueError(f"precision: {spec.precision!r} is not a reduced precision of {self.handler}")
        q = spec.quantization
        log(f"static INT8 (FX), calibrated on {q.calibration_images} training pages")
        calibration = calibration_inputs(q.calibration_images, spec.weights.seed, spec.options.style)
        return quantize(model, calibration, q.backend, log)

    # ------------------------------------------------------------------ evaluation
    def evaluation_data(self, spec: Any) -> PageEvaluation | None:
        if spec.evaluation is None:
            return None
        return PageEvaluation(evaluation_pages(spec.options.evaluation_pages, spec.options.style))

    def evaluate(self, program: Callable, data: PageEvaluation, spec: Any) -> float:
        return self.measure(program, data, spec)[0]

    def measure(self, program: Callable, data: PageEvaluation, spec: Any) -> tuple[float, dict]:
        scores = evaluate(program, data.pages, spec.options.detection_config())
        return 100 * scores.map50, {"page_accuracy": round(100 * scores.page_accuracy, 2)}

    def drift_reference(self, program: Callable, data: PageEvaluation, spec: Any) -> dict | None:
        from handlers.metrics import BRIGHTNESS_BUCKETS, CONFIDENCE_BUCKETS, MEGAPIXEL_BUCKETS, bin_counts

        config = spec.options.detection_config()
        found = predict_pages(program, data.pages, config.score_threshold, config.max_detections, config)
        top = [(LABELS[int(p.labels[0])], float(p.scores[0])) for p in found if len(p.scores)]
        brightness = []
        for page in data.pages:
            gray, transform = letterbox(page.image, config.input_size)
            x0, y0, x1, y1 = transform.content
            brightness.append(float(gray[y0:y1, x0:x1].mean()) / 255.0)
        total = max(len(top), 1)
        return {
            "source": f"{spec.evaluation} holdout (the top detection of each page, as servekit_predictions_total)",
            "samples": len(top),
            "classes": {label: round(sum(t == label for t, _ in top) / total, 6) for label in LABELS},
            "confidence": {"edges": list(CONFIDENCE_BUCKETS), "counts": bin_counts([s for _, s in top],
                                                                                   CONFIDENCE_BUCKETS)},
            "brightness": {"edges": list(BRIGHTNESS_BUCKETS), "counts": bin_counts(brightness, BRIGHTNESS_BUCKETS)},
            "megapixels": {"edges": list(MEGAPIXEL_BUCKETS),
                           "counts": bin_counts((p.image.width * p.image.height / 1e6 for p in data.pages),
                                                MEGAPIXEL_BUCKETS)},
        }  # fmt: skip

    def golden_label_error(self, label: str, labels: Sequence[str]) -> str | None:
        """A golden page's label is its digit string, read left to right (the answer's top-level ``label``)."""
        if not label or any(ch not in labels for ch in label):
            return f"label {label!r} is not a page's digits (a non-empty string of {''.join(labels)})"
        return None


def write_golden_pages(directory: Path, count: int = 4, style: PageStyle = DEFAULT_STYLE) -> list[dict]:
    """Held-out evaluation pages ``page_<n>.png`` (the first ``count``) and ``golden.json`` with their digits."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for n, page in enumerate(evaluation_pages(count, style)):
        name = f"page_{n}.png"
        page.image.save(directory / name, format="PNG")
        entries.append({"file": name, "label": page.text()})
    (directory / "golden.json").write_text(json.dumps(entries, indent=1) + "\n")
    return entries


__all__ = [
    "DEFAULT_STYLE",
    "LABELS",
    "DetectionScores",
    "DetectorOptions",
    "DetectorRecipe",
    "DetectorTask",
    "DigitDetector",
    "Page",
    "PageStyle",
    "calibration_inputs",
    "choose_score_threshold",
    "evaluate",
    "evaluation_pages",
    "example_input",
    "export_program",
    "generate_pages",
    "handler_config",
    "letterbox_pages",
    "load_detector",
    "mean_average_precision",
    "quantize",
    "train_and_evaluate",
    "train_detector",
    "validation_pages",
]
