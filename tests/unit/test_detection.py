"""The object detector: digit pages, letterbox, decoding, mAP, training, and the handler on a tiny trained model."""

from __future__ import annotations

import base64
import hashlib
import importlib
import io
import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision.ops import box_iou
from ts.utils.util import list_classes_from_module

from handlers.detection import (
    DetectionConfig,
    DetectorConfig,
    Letterbox,
    decode_detections,
    letterbox,
    parse_max_detections,
    parse_score_threshold,
)
from handlers.errors import InvalidInput
from handlers.image_io import DecodeLimits, decode_image
from handlers.model_loading import load_model
from handlers.object_detector import ObjectDetector
from servekit.build import detection as build
from servekit.build.detection import DetectorTask
from servekit.build.spec import SpecError, load_spec
from servekit.build.tasks import task_for
from tests.fake_context import FakeContext

TINY = build.DetectorRecipe(seed=1, train_pages=48, epochs=2, batch_size=16, width=8)


# ------------------------------------------------------------------------------------------ pages
def test_pages_are_reproducible_from_their_seed() -> None:
    first = build.generate_pages("train", 4, seed=7)
    again = build.generate_pages("train", 4, seed=7)
    alone = build.generate_pages("train", 1, seed=7, start=2)
    other = build.generate_pages("train", 4, seed=8)

    for a, b in zip(first, again, strict=True):
        assert a.image.tobytes() == b.image.tobytes()
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.labels, b.labels)
    assert alone[0].image.tobytes() == first[2].image.tobytes()  # page i does not depend on pages before it
    assert [p.image.tobytes() for p in first] != [p.image.tobytes() for p in other]


def test_pages_vary_in_size_aspect_and_digit_count() -> None:
    pages = build.generate_pages("train", 40, seed=0)

    sizes = {page.image.size for page in pages}
    assert len(sizes) > 30
    assert any(w > 1.5 * h for w, h in sizes)
    assert any(h > 1.5 * w for w, h in sizes)
    counts = [len(page.labels) for page in pages]
    assert min(counts) >= 1
    assert max(counts) <= 6
    assert len(set(counts)) >= 4
    assert all(page.image.mode == "L" for page in pages)


def test_boxes_are_tight_around_the_ink_and_never_overlap() -> None:
    style = build.PageStyle(max_noise=0.0, max_gradient=0.0)  # plain paper: the ink is exactly what is not paper
    for page in build.generate_pages("holdout", 12, seed=3, style=style):
        pixels = np.asarray(page.image, dtype=np.float32)
        paper = float(np.median(pixels))
        height, width = pixels.shape
        assert page.boxes.dtype == np.float32
        assert page.labels.dtype == np.int64
        assert ((page.labels >= 0) & (page.labels <= 9)).all()
        outside = np.ones_like(pixels, dtype=bool)
        for x1, y1, x2, y2 in page.boxes.astype(int):
            assert 0 <= x1 < x2 <= width
            assert 0 <= y1 < y2 <= height
            inside = pixels[y1:y2, x1:x2]
            # Every edge of the box touches ink (at least INK_LEVEL at the weakest contrast, 0.45).
            dark = paper * (1 - 0.45 * build.INK_LEVEL) + 1
            for edge in (inside[0], inside[-1], inside[:, 0], inside[:, -1]):
                assert edge.min() <= dark
            outside[y1:y2, x1:x2] = False
        # Outside every box, no ink of INK_LEVEL or more (at the strongest contrast, 1.0).
        assert pixels[outside].min() >= paper * (1 - build.INK_LEVEL) - 1
        ious = box_iou(torch.from_numpy(page.boxes), torch.from_numpy(page.boxes))
        assert (ious - torch.eye(len(page.boxes))).abs().max() == 0


def test_the_text_of_a_page_reads_its_boxes_left_to_right() -> None:
    boxes = np.array([[50, 0, 60, 10], [0, 40, 10, 50], [20, 5, 30, 15]], dtype=np.float32)

    assert build.reading_order_text(boxes, [3, 1, 4]) == "143"
    assert build.reading_order_text(np.zeros((0, 4)), []) == ""


def test_unknown_split_is_refused() -> None:
    with pytest.raises(ValueError, match="split: must be one of"):
        build.generate_pages("test", 1, seed=0)


# ------------------------------------------------------------------------------------------ letterbox
@pytest.mark.parametrize("size", [(640, 480), (100, 300), (1000, 50), (128, 128), (37, 91), (5, 2000)])
def test_letterbox_maps_boxes_back_within_a_pixel(size: tuple[int, int]) -> None:
    width, height = size
    gray, transform = letterbox(Image.new("L", size, 200), 128)
    assert gray.shape == (128, 128)
    assert transform.image_size == size

    # The image's part of the input maps back onto the whole image.
    content = torch.tensor([transform.content], dtype=torch.float32)
    np.testing.assert_allclose(transform.to_original(content)[0].numpy(), [0, 0, width, height], atol=1e-3)
    # Boxes go to the input and back.
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 1, size=(20, 4)) * [width, height, width, height]
    low, high = np.minimum(corners[:, :2], corners[:, 2:]), np.maximum(corners[:, :2], corners[:, 2:])
    boxes = torch.tensor(np.concatenate([low, high], axis=1), dtype=torch.float32)
    back = transform.to_original(transform.to_input(boxes))
    assert (back - boxes).abs().max() <= 1.0
    # Padding is white (ink 0); the image is in the content box.
    x0, y0, x1, y1 = transform.content
    assert (gray[y0:y1, x0:x1] == 200).all()
    assert gray.sum() == 200 * (x1 - x0) * (y1 - y0) + 255 * (128 * 128 - (x1 - x0) * (y1 - y0))


@pytest.mark.parametrize("size", [(640, 480), (200, 500), (900, 120)])
def test_a_drawn_box_comes_back_where_it_was(size: tuple[int, int]) -> None:
    width, height = size
    image = np.full((height, width), 240, dtype=np.uint8)
    x1, y1, x2, y2 = int(width * 0.3), int(height * 0.4), int(width * 0.55), int(height * 0.7)
    image[y1:y2, x1:x2] = 0
    gray, transform = letterbox(Image.fromarray(image), 128)

    rows, cols = np.flatnonzero((gray < 120).any(axis=1)), np.flatnonzero((gray < 120).any(axis=0))
    found = torch.tensor([[cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]], dtype=torch.float32)
    back = transform.to_original(found)[0].numpy()
    pixel = max(transform.gain)  # one input pixel, in original pixels
    np.testing.assert_allclose(back, [x1, y1, x2, y2], atol=pixel + 1)


def test_letterbox_follows_a_dct_scaled_jpeg_to_its_full_size() -> None:
    image = np.full((1000, 2000), 230, dtype=np.uint8)
    image[400:600, 500:900] = 0
    encoded = io.BytesIO()
    Image.fromarray(image).save(encoded, format="JPEG", quality=95)
    decoded = decode_image(encoded.getvalue(), DecodeLimits(), DetectionConfig().min_decode_side())
    assert decoded.size == (1000, 500)  # decoded at 1/2

    gray, transform = letterbox(decoded, 128)

    assert transform.image_size == (2000, 1000)
    rows, cols = np.flatnonzero((gray < 120).any(axis=1)), np.flatnonzero((gray < 120).any(axis=0))
    found = torch.tensor([[cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]], dtype=torch.float32)
    np.testing.assert_allclose(transform.to_original(found)[0].numpy(), [500, 400, 900, 600], atol=16 + 1)


def test_letterbox_takes_the_exif_orientation_as_displayed() -> None:
    stored = Image.new("L", (300, 100), 250)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    encoded = io.BytesIO()
    stored.save(encoded, format="JPEG", exif=exif.tobytes())
    decoded = decode_image(encoded.getvalue(), DecodeLimits())

    _, transform = letterbox(decoded, 128)

    assert transform.image_size == (100, 300)


# ------------------------------------------------------------------------------------------ decoding
def heads(peaks: list[tuple[int, int, int, float, float, float]], classes: int = 10, side: int = 32):
    """Heads with ``(class, cell_x, cell_y, score, width, height)`` peaks, offset 0.5 everywhere."""
    heatmap = torch.full((1, classes, side, side), -20.0)
    size = torch.zeros(1, 2, side, side)
    for c, x, y, score, w, h in peaks:
        heatmap[0, c, y, x] = math.log(score / (1 - score))
        size[0, :, y, x] = torch.tensor([w, h])
    return heatmap, size, torch.full((1, 2, side, side), 0.5)


def test_decoding_turns_peaks_into_boxes_best_first() -> None:
    outputs = heads([(3, 10, 5, 0.9, 4, 6), (7, 20, 20, 0.6, 2, 2), (1, 30, 30, 0.2, 2, 2)])

    (found,) = decode_detections(outputs, [Letterbox.identity(128)], 0.3, 10, 0.5, 128)

    assert found.classes.tolist() == [3, 7]
    np.testing.assert_allclose(found.scores.numpy(), [0.9, 0.6], atol=1e-6)
    # centre (10.5, 5.5) cells = (42, 22) px; 4x6 cells = 16x24 px
    np.testing.assert_allclose(found.boxes.numpy(), [[34, 10, 50, 34], [78, 78, 86, 86]], atol=1e-4)
    assert found.image_size == (128, 128)


def test_nms_drops_the_weaker_of_two_overlapping_boxes_of_any_class() -> None:
    outputs = heads([(3, 10, 10, 0.9, 8, 8), (5, 12, 10, 0.8, 8, 8), (3, 25, 25, 0.7, 4, 4)])
    box = Letterbox.identity(128)

    (agnostic,) = decode_detections(outputs, [box], 0.3, 10, 0.5, 128)
    (per_class,) = decode_detections(outputs, [box], 0.3, 10, 0.5, 128, class_agnostic=False)
    (loose,) = decode_detections(outputs, [box], 0.3, 10, 0.9, 128)

    assert agnostic.classes.tolist() == [3, 3]  # IoU 0.6: the 0.8 box of class 5 goes
    assert per_class.classes.tolist() == [3, 5, 3]
    assert loose.classes.tolist() == [3, 5, 3]


def test_thresholds_and_counts_apply_per_image() -> None:
    one = heads([(c, 4 * c + 2, 4, 0.9 - 0.1 * c, 2, 2) for c in range(6)])
    batch = tuple(torch.cat([t, t]) for t in one)
    boxes = [Letterbox.identity(128)] * 2

    first, second = decode_detections(batch, boxes, [0.55, 0.01], [10, 2], 0.5, 128)

    assert first.classes.tolist() == [0, 1, 2, 3]  # scores 0.9 .. 0.6
    assert second.classes.tolist() == [0, 1]


def test_boxes_come_back_in_original_pixels_clipped_and_padding_dropped() -> None:
    # A 256x128 image: scale 0.5, 32 rows of padding above and below in the input.
    _, transform = letterbox(Image.new("L", (256, 128), 255), 128)
    outputs = heads([(2, 10, 12, 0.9, 4, 4), (4, 2, 9, 0.8, 4, 4), (6, 16, 2, 0.7, 2, 2)])

    (found,) = decode_detections(outputs, [transform], 0.3, 10, 0.5, 128)

    # (10.5, 12.5) cells = (42, 50) px +- 8 -> original: x * 2, (y - 32) * 2
    assert found.classes.tolist() == [2, 4]  # class 6 lies wholly in the padding
    np.testing.assert_allclose(found.boxes[0].numpy(), [68, 20, 100, 52], atol=1e-3)
    np.testing.assert_allclose(found.boxes[1].numpy(), [4, 0, 36, 28], atol=1e-3)  # clipped at the top
    assert found.image_size == (256, 128)


def test_decoding_a_batch_with_nothing_found() -> None:
    outputs = heads([])
    found = decode_detections(outputs, [Letterbox.identity(128)], 0.3, 10, 0.5, 128)
    assert len(found[0]) == 0
    assert found[0].boxes.shape == (0, 4)


# ------------------------------------------------------------------------------------------ settings
@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"score_threshold": 2},
         "detection.score_threshold: must be a number from 0.01 (min_score_threshold) to 1, got 2"),
        ({"score_threshold": "0.5"}, "detection.score_threshold: must be a number"),
        ({"max_detections": 0}, "detection.max_detections: must be a whole number from 1 to 100"),
        ({"max_detections": 30, "max_detections_limit": 10},
         "detection.max_detections: must be a whole number from 1 to 10 (max_detections_limit), got 30"),
        ({"input_size": 130}, "detection.input_size: must be a multiple of 4 from 16 to 1024, got 130"),
        ({"nms_iou": 0}, "detection.nms_iou: must be a number > 0 and <= 1, got 0"),
        ({"class_agnostic_nms": "yes"}, "detection.class_agnostic_nms: must be true or false"),
        ({"min_score_threshold": float("nan")}, "detection.min_score_threshold: must be a number > 0"),
        ({"nms": 0.5}, "detection.nms: unknown key (valid keys: input_size, score_threshold"),
    ],
)  # fmt: skip
def test_detection_settings_name_the_bad_key(section: dict, message: str) -> None:
    with pytest.raises(ValueError) as error:
        DetectorConfig.from_dict({"detection": section})
    assert str(error.value).startswith(message)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"precision": "fp16"}, "precision: must be one of ['fp32', 'int8', 'bf16'], got 'fp16'"),
        ({"topk": 5}, "topk: unknown key in the handler section (valid keys: detection, explain, faults, labels_file"),
        ({"limits": {"max_pixels": 0}}, "max_pixels: must be a positive integer, got 0"),
        ({"faults": {"error_rate": 2}}, "faults.error_rate: must be a number from 0.0 to 1.0, got 2"),
        ({"detection": [1]}, "detection: must be a mapping, got [1]"),
        ({"threads": 0}, "threads: must be a positive integer, got 0"),
    ],
)
def test_handler_settings_name_the_bad_key(section: dict, message: str) -> None:
    with pytest.raises(ValueError) as error:
        DetectorConfig.from_dict(section)
    assert str(error.value).startswith(message)


def test_handler_settings_round_trip() -> None:
    config = DetectorConfig.from_dict(
        {"precision": "int8", "detection": {"score_threshold": 0.4, "max_detections": 8}, "limits": {"max_pixels": 10},
         "faults": {"error_rate": 0.5}}
    )  # fmt: skip

    assert DetectorConfig.from_dict(config.to_dict()) == config
    assert "prediction_log" not in config.to_dict()
    assert DetectorConfig.from_dict(None) == DetectorConfig()
    assert build.handler_config("int8", score_threshold=0.4)["detection"]["score_threshold"] == 0.4


@pytest.mark.parametrize(
    ("value", "expected"), [(0.5, 0.5), (1, 1.0), ("0.25", 0.25), (bytearray(b" 0.75 "), 0.75), (b"1", 1.0)]
)
def test_score_threshold_options(value: object, expected: float) -> None:
    assert parse_score_threshold(value, DetectionConfig()) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0.001, "score_threshold must be a number from 0.01 to 1, got 0.001"),
        ("1.5", "score_threshold must be a number from 0.01 to 1, got 1.5"),
        ("nan", "score_threshold must be a number from 0.01 to 1, got nan"),
        (True, "score_threshold must be a number from 0.01 to 1, got True"),
        (b"high", "score_threshold must be a number from 0.01 to 1, got 'high'"),
        (b"\xff", "score_threshold is not valid UTF-8 text"),
    ],
)
def test_bad_score_thresholds(value: object, message: str) -> None:
    with pytest.raises(InvalidInput) as error:
        parse_score_threshold(value, DetectionConfig())
    assert error.value.message == message


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "max_detections must be a whole number from 1 to 100, got 0"),
        ("101", "max_detections must be a whole number from 1 to 100, got 101"),
        (2.0, "max_detections must be a whole number from 1 to 100, got 2.0"),
        ("1e3", "max_detections must be a whole number from 1 to 100, got '1e3'"),
        ("9" * 5000, f"max_detections must be a whole number from 1 to 100, got '{'9' * 36}..."),
    ],
)  # fmt: skip
def test_bad_max_detections(value: object, message: str) -> None:
    with pytest.raises(InvalidInput) as error:
        parse_max_detections(value, DetectionConfig())
    assert error.value.message == message
    assert parse_max_detections(b"7", DetectionConfig()) == 7


# ------------------------------------------------------------------------------------------ mAP
def prediction(boxes: list, scores: list, labels: list) -> build.Prediction:
    return build.Prediction(np.array(boxes, dtype=np.float32).reshape(-1, 4), np.array(scores), np.array(labels))


A, B, C = [0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]


def test_perfect_detections_score_one() -> None:
    truths = [(np.array([A, B]), np.array([1, 2])), (np.array([C]), np.array([1]))]
    predictions = [prediction([A, B], [0.9, 0.8], [1, 2]), prediction([C], [0.7], [1])]

    map50, per_class = build.mean_average_precision(predictions, truths)

    assert map50 == 1.0
    assert per_class[1] == per_class[2] == 1.0
    assert math.isnan(per_class[0])  # no ground truth: not in the mean


def test_known_partial_average_precisions() -> None:
    truths = [(np.array([A, B]), np.array([0, 0])), (np.array([C]), np.array([5]))]
    shifted = [2, 0, 12, 10]  # IoU with A: 80 / 120 = 0.67 -> still a hit
    predictions = [
        # class 0: hit (0.9), a false positive (0.8), hit (0.7): P/R = 1/0.5, 0.5/0.5, 0.67/1
        prediction([shifted, C, B], [0.9, 0.8, 0.7], [0, 0, 0]),
        # class 5: a duplicate of a hit is a false positive; the hit comes second
        prediction([[40, 5, 50, 15], C, C], [0.95, 0.6, 0.5], [5, 5, 5]),
    ]

    map50, per_class = build.mean_average_precision(predictions, truths)

    assert per_class[0] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert per_class[5] == pytest.approx(0.5)  # IoU of the 0.95 box is 1/3: a miss; then P = 1/2 at R = 1
    assert map50 == pytest.approx((5 / 6 + 0.5) / 2)


def test_wrong_labels_and_missed_objects_cost_average_precision() -> None:
    truths = [(np.array([A, B]), np.array([3, 4]))]
    predictions = [prediction([A], [0.9], [4])]  # A called a 4: a false positive for 4, both missed

    map50, per_class = build.mean_average_precision(predictions, truths)

    assert per_class[3] == 0.0
    assert per_class[4] == 0.0
    assert map50 == 0.0
    assert build.average_precision(np.array([]), np.array([]), 2) == 0.0


# ------------------------------------------------------------------------------------------ training, INT8, export
@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    lines: list[str] = []
    state = build.train_detector(TINY, lines.append)
    assert lines[0].startswith("generated 48 training pages")
    assert [line.split(":")[0] for line in lines[1:]] == ["epoch 1/2", "epoch 2/2"]
    return state


def test_training_is_deterministic_for_a_seed(tiny_state: dict[str, torch.Tensor]) -> None:
    again = build.train_detector(TINY, lambda line: None)

    assert tiny_state.keys() == again.keys()
    assert all(torch.equal(tiny_state[k], again[k]) for k in tiny_state)


def test_tiny_model_quantizes_exports_and_evaluates(tiny_state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    model = build.load_detector(tiny_state, TINY.width)
    calibration = build.calibration_inputs(8, seed=TINY.seed)
    assert calibration.shape == (8, 1, 128, 128)
    assert 0 <= float(calibration.min()) <= float(calibration.max()) <= 1
    int8 = build.quantize(model, calibration, log=lambda line: None)
    pages = build.evaluation_pages(6)

    for precision, program in (("fp32", model), ("int8", int8)):
        path = tmp_path / f"{precision}.pt"
        build.export_program(program, path)
        loaded = load_model(path, DetectorConfig(precision=precision))
        heatmap, size, offset = loaded(build.example_input(batch=3))
        assert heatmap.shape == (3, 10, 32, 32)
        assert size.shape == offset.shape == (3, 2, 32, 32)
        scores = build.evaluate(loaded, pages)
        assert scores.pages == 6
        assert 0.0 <= scores.map50 <= 1.0
        assert 0.0 <= scores.page_accuracy <= 1.0


def test_train_and_evaluate_reports_the_bar(tiny_state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    torch.save(tiny_state, tmp_path / "tiny.pt")
    lines: list[str] = []

    report = build.train_and_evaluate(
        recipe=TINY,
        evaluation=4,
        validation=4,
        out_dir=tmp_path / "out",
        log=lines.append,
        weights=tmp_path / "tiny.pt",
    )

    assert report["score_threshold"] == max(build.SCORE_THRESHOLDS)  # every candidate reads 0 pages: the highest
    assert set(report["validation_page_accuracy"]) == set(build.SCORE_THRESHOLDS)
    assert report["fp32_torchscript"]["pages"] == report["int8_torchscript"]["pages"] == 4
    assert report["int8_handler_config"]["precision"] == "int8"
    assert report["int8_handler_config"]["detection"]["score_threshold"] == report["score_threshold"]
    assert DetectorConfig.from_dict(report["fp32_handler_config"]).detection.score_threshold == 0.5
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "detector_fp32.pt", "detector_fp32_state.pt", "detector_int8.pt", "labels.json",
    ]  # fmt: skip
    assert lines[-1].startswith("INT8 mAP drop")


# ------------------------------------------------------------------------------------------ the handler
DETECTOR_MANIFEST = {"model": {"modelName": "digit_pages", "modelVersion": "1.0", "serializedFile": "model.pt"}}


def model_dir(root: Path, program: torch.jit.ScriptModule | torch.nn.Module, traced: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if traced:
        build.export_program(program, root / "model.pt")
    else:
        torch.jit.save(program, str(root / "model.pt"))
    digest = hashlib.sha256((root / "model.pt").read_bytes()).hexdigest()
    (root / "metadata.json").write_text(json.dumps({"program_sha256": digest}))
    (root / "labels.json").write_text(json.dumps(list(build.LABELS)))
    return root


def start(directory: Path, batch_size: int = 4, **handler: object) -> tuple[ObjectDetector, FakeContext]:
    context = FakeContext(directory, DETECTOR_MANIFEST, {"handler": {"precision": "fp32", **handler}}, batch_size)
    detector = ObjectDetector()
    detector.initialize(context)
    context.statuses.clear()
    context.content_types.clear()
    return detector, context


class FixedHeads(torch.nn.Module):
    """A program whose heads do not depend on the page: class 7 at cell (10, 12), 4x4 cells."""

    def __init__(self) -> None:
        super().__init__()
        heatmap = torch.full((1, 10, 32, 32), -20.0)
        heatmap[0, 7, 12, 10] = 3.0
        heatmap[0, 2, 20, 20] = 0.0  # score 0.5
        size = torch.full((1, 2, 32, 32), 4.0)
        self.register_buffer("heatmap", heatmap)
        self.register_buffer("size", size)
        self.register_buffer("offset", torch.full((1, 2, 32, 32), 0.5))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        return self.heatmap.expand(n, -1, -1, -1), self.size.expand(n, -1, -1, -1), self.offset.expand(n, -1, -1, -1)


def png(size: tuple[int, int], value: int = 230) -> bytes:
    encoded = io.BytesIO()
    Image.new("L", size, value).save(encoded, format="PNG")
    return encoded.getvalue()


def page_png(page: build.Page) -> bytes:
    encoded = io.BytesIO()
    page.image.save(encoded, format="PNG")
    return encoded.getvalue()


@pytest.fixture(scope="module")
def tiny_dir(tiny_state: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_dir(tmp_path_factory.mktemp("detector"), build.load_detector(tiny_state, TINY.width))


@pytest.fixture(scope="module")
def fixed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_dir(tmp_path_factory.mktemp("fixed"), torch.jit.script(FixedHeads()), traced=False)


def test_the_handler_module_has_exactly_one_class() -> None:
    module = importlib.import_module("handlers.object_detector")
    assert list_classes_from_module(module) == [ObjectDetector]


def test_initialize_warms_up_every_batch_size(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    detector = ObjectDetector()
    warmed: list[int] = []
    real = detector.inference
    monkeypatch.setattr(detector, "inference", lambda items: warmed.append(len(items)) or real(items))

    detector.initialize(FakeContext(tiny_dir, DETECTOR_MANIFEST, {"handler": {}}, 3))

    rounds = detector.warmup_rounds
    # then the four warm-up requests (two raw pages, KServe v1, OIP) in batches of 3 and 1
    assert warmed == [size for size in (1, 2, 3) for _ in range(rounds)] + [3, 1] * rounds
    assert detector.labels == list(build.LABELS)
    assert detector.settings.detection == DetectionConfig()


def test_answers_in_original_pixels_for_any_aspect(fixed_dir: Path) -> None:
    detector, context = start(fixed_dir)
    sizes = [(128, 128), (256, 128), (100, 400)]

    responses = detector.handle([{"body": png(size)} for size in sizes], context)

    assert context.statuses == {}
    assert [r["image_size"] for r in responses] == [[128, 128], [256, 128], [100, 400]]
    # The box is (34, 42, 50, 58) in the input; class 2 (score 0.5) is also above the default 0.3.
    assert responses[0] == {
        "detections": [
            {"label": "7", "index": 7, "score": round(1 / (1 + math.exp(-3.0)), 6), "box": [34.0, 42.0, 50.0, 58.0]},
            {"label": "2", "index": 2, "score": 0.5, "box": [74.0, 74.0, 90.0, 90.0]},
        ],
        "label": "72",  # read left to right
        "model": "digit_pages",
        "version": "1.0",
        "image_size": [128, 128],
    }
    # 256x128: x * 2, (y - 32) * 2; 100x400: (x - 48) * 3.125, y * 3.125 (clipped to 100 wide).
    assert responses[1]["detections"][0]["box"] == [68.0, 20.0, 100.0, 52.0]
    assert responses[2]["detections"][0]["box"] == [0.0, 131.25, 6.25, 181.25]
    assert responses[2]["detections"][1]["box"] == [81.25, 231.25, 100.0, 281.25]


def test_options_from_query_json_and_multipart(fixed_dir: Path) -> None:
    detector, context = start(fixed_dir)
    image = png((64, 64))
    encoded = base64.b64encode(image).decode()
    requests = [
        {"body": image, "max_detections": bytearray(b"1")},  # a query parameter
        {"body": {"data": encoded, "score_threshold": 0.6}},  # a JSON field
        {"data": image, "score_threshold": bytearray(b"0.99")},  # a multipart field
        {"body": image},
    ]

    responses = detector.handle(requests, context)

    assert context.statuses == {}
    assert [[d["label"] for d in r["detections"]] for r in responses] == [["7"], ["7"], [], ["7", "2"]]


def test_hostile_requests_fail_alone(fixed_dir: Path) -> None:
    detector, context = start(fixed_dir, limits={"max_pixels": 1_000_000})
    good = png((300, 200))
    requests = [
        {"body": good},
        {"body": b"%PDF-1.4 not an image"},
        {"body": good[:40]},
        {"body": png((2000, 1000))},
        {"body": good, "score_threshold": b"2"},
        {"body": {"data": base64.b64encode(good).decode(), "max_detections": 0}},
        {"body": {"image_url": "http://example.com/x.png"}},
        {"body": b""},
        {"data": good},
    ]

    responses = detector.handle(requests, context)

    codes = {idx: code for idx, (code, _) in context.statuses.items()}
    assert codes == {1: 415, 2: 400, 3: 413, 4: 400, 5: 400, 6: 400, 7: 400}
    assert responses[4] == {"error": "score_threshold must be a number from 0.01 to 1, got 2", "code": 400,
                            "type": "InvalidInput"}  # fmt: skip
    assert responses[5]["error"] == "max_detections must be a whole number from 1 to 100, got 0"
    assert responses[0] == responses[8]
    assert [d["label"] for d in responses[0]["detections"]] == ["7", "2"]


def test_the_tiny_trained_model_answers_pages(tiny_dir: Path) -> None:
    # Seconds of training leave every score low: ask for everything, to see the boxes.
    detector, context = start(tiny_dir, detection={"max_detections": 5, "min_score_threshold": 1e-9})
    pages = build.evaluation_pages(3)
    requests = [{"body": page_png(page), "score_threshold": b"1e-9"} for page in pages]

    responses = detector.handle(requests, context)

    assert context.statuses == {}
    for response, page in zip(responses, pages, strict=True):
        width, height = page.image.size
        assert response["image_size"] == [width, height]
        assert 1 <= len(response["detections"]) <= 5
        scores = [d["score"] for d in response["detections"]]
        assert scores == sorted(scores, reverse=True)
        for d in response["detections"]:
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 < x2 <= width
            assert 0 <= y1 < y2 <= height
            assert d["label"] == str(d["index"])
    assert json.loads(json.dumps(responses)) == responses


def test_metrics_hooks(fixed_dir: Path) -> None:
    detector, _ = start(fixed_dir)
    (item,) = detector.prepare(detector.decode({"body": png((200, 100), 204)}, {}))

    stats = detector.input_statistics(item)
    (found,) = detector.postprocess(detector.inference([item]), [item])

    assert stats == {"brightness": pytest.approx(0.8), "megapixels": 0.02}
    assert detector.summarize(found) == ("7", pytest.approx(1 / (1 + math.exp(-3.0))))
    nothing = type(found)(found.boxes[:0], found.scores[:0], found.classes[:0], found.image_size)
    assert detector.summarize(nothing) is None


def test_a_program_with_other_heads_is_refused_at_load(tmp_path: Path) -> None:
    class TwoClasses(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            n = x.shape[0]
            return torch.zeros(n, 2, 32, 32), torch.zeros(n, 2, 32, 32), torch.zeros(n, 2, 32, 32)

    directory = model_dir(tmp_path, torch.jit.script(TwoClasses()), traced=False)

    with pytest.raises(RuntimeError, match="heatmap has 2 classes, the labels file 10"):
        start(directory)


# ------------------------------------------------------------------------------------------ the protocols
def oip(images: list[bytes], **extra: object) -> dict:
    data = [base64.b64encode(image).decode() for image in images]
    return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)], "data": data}], **extra}


def test_kserve_v1_answers_every_instance_with_its_reading(fixed_dir: Path) -> None:
    detector, context = start(fixed_dir)
    encoded = base64.b64encode(png((128, 128))).decode()
    body = {"instances": [{"b64": encoded}, encoded], "parameters": {"max_detections": 1}}

    (response,) = detector.handle([{"body": body}], context)

    assert context.statuses == {}
    assert response["model_name"] == "digit_pages"
    assert [p["label"] for p in response["predictions"]] == ["7", "7"]
    assert response["predictions"][0]["detections"][0]["box"] == [34.0, 42.0, 50.0, 58.0]
    assert response["predictions"][1]["image_size"] == [128, 128]


def test_oip_answers_padded_tensors_in_json_and_binary(fixed_dir: Path) -> None:
    detector, context = start(fixed_dir)
    images = [png((128, 128)), png((256, 128))]
    json_body = oip(images, id="r1", parameters={"score_threshold": 0.6})
    binary = oip(images, outputs=[{"name": "counts", "parameters": {"binary_data": True}}, {"name": "labels"}])

    first, second = detector.handle([{"body": json_body}, {"body": binary}], context)

    assert context.statuses == {}
    assert first["id"] == "r1"
    outputs = {o["name"]: o for o in first["outputs"]}
    assert [outputs[n]["shape"] for n in ("boxes", "scores", "labels", "counts")] == [[2, 1, 4], [2, 1], [2, 1], [2]]
    assert outputs["boxes"]["data"] == [34.0, 42.0, 50.0, 58.0, 68.0, 20.0, 100.0, 52.0]
    assert outputs["labels"]["data"] == ["7", "7"]
    assert outputs["counts"]["data"] == [1, 1]
    header_length = int(context.response_headers[1]["Inference-Header-Content-Length"])
    header = json.loads(second[:header_length])
    assert [o["name"] for o in header["outputs"]] == ["counts", "labels"]
    assert np.frombuffer(second[header_length:], dtype="<i8").tolist() == [2, 2]
    assert header["outputs"][1]["data"] == ["7", "2", "7", "2"]


def test_oip_pads_images_with_fewer_detections(fixed_dir: Path) -> None:
    detector, _ = start(fixed_dir)
    call = detector.decode({"body": oip([png((64, 64)), png((64, 64))])}, {})
    items = detector.prepare(call)
    found, _ = detector.postprocess(detector.inference(items), items)
    nothing = type(found)(found.boxes[:0], found.scores[:0], found.classes[:0], found.image_size)

    reply = detector.encode(call, [found, nothing])

    outputs = {o["name"]: o["data"] for o in reply.body["outputs"]}
    assert outputs["counts"] == [2, 0]
    assert outputs["labels"] == ["7", "2", "", ""]
    assert outputs["scores"][2:] == [0.0, 0.0]
    assert outputs["boxes"][8:] == [0.0] * 8


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"instances": ["x"], "parameters": {"score_threshold": 0}}, 400,
         "score_threshold must be a number from 0.01 to 1, got 0"),
        ({"instances": ["x"], "parameters": {"max_detections": "many"}}, 400,
         "max_detections must be a whole number from 1 to 100, got 'many'"),
        ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1], "data": [0]}]}, 400,
         "unknown input 'pixels': this model takes one of ['image']"),
        ({"instances": ["aGVsbG8="] * 33}, 413, "instances: 33 images in one request; the limit is 32"),
    ],
)  # fmt: skip
def test_protocol_errors_name_what_is_wrong(fixed_dir: Path, body: dict, status: int, message: str) -> None:
    detector, context = start(fixed_dir)
    if "instances" in body and body["instances"] == ["x"]:
        body = {**body, "instances": [base64.b64encode(png((32, 32))).decode()]}

    (response,) = detector.handle([{"body": body}], context)

    assert context.statuses[0][0] == status
    assert response["error"] == message


def test_a_bad_image_among_several_names_its_place(fixed_dir: Path) -> None:
    detector, context = start(fixed_dir)

    (response,) = detector.handle([{"body": oip([png((32, 32)), b"not an image"])}], context)

    assert context.statuses[0][0] == 415
    assert response["error"].startswith("input[1]: ")


# ------------------------------------------------------------------------------------------ the task
def detector_model(**overrides: object) -> dict:
    model = {
        "architecture": "digit_detector",
        "handler": "object_detector",
        "labels": list(build.LABELS),
        "detection": {"train_pages": 48, "validation_pages": 16, "evaluation_pages": 16, "width": 8,
                      "batch_size": 16},
        "evaluation": "digit_pages",
        "versions": {
            "1.0": {"precision": "fp32", "weights": {"train": "digit_pages", "seed": 1, "epochs": 2}},
            "2.0": {"precision": "int8", "weights": {"train": "digit_pages", "seed": 1, "epochs": 2},
                    "quantization": {"calibration": "digit_pages", "calibration_images": 16, "max_drop": 100.0}},
        },
    }  # fmt: skip
    model.update(overrides)
    return model


def detector_spec_error(tmp_path: Path, model: dict) -> str:
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": {"p": model}}))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return str(info.value)


def test_the_detector_is_a_task_with_its_own_keys(tmp_path: Path) -> None:
    assert task_for("object_detector").metric == "map50"
    assert detector_spec_error(tmp_path, detector_model(topk=1)) == (
        "p 1.0: topk: does not apply to handler object_detector (its own keys: detection, limits)"
    )
    assert detector_spec_error(tmp_path, detector_model(detection={"pages": 3})).startswith(
        "p 1.0: detection.pages: unknown key in detection (valid keys: "
    )
    assert detector_spec_error(tmp_path, detector_model(detection={"score_threshold": 2})) == (
        "p 1.0: detection.score_threshold: must be a number from 0.01 (min_score_threshold) to 1, got 2"
    )
    assert detector_spec_error(tmp_path, detector_model(detection={"input_size": 72})) == (
        "p 1.0: detection.input_size: the detector's backbone needs a multiple of 16, got 72"
    )
    assert detector_spec_error(tmp_path, detector_model(labels=["a", "b"])).startswith("p 1.0: labels: the digit")
    assert detector_spec_error(tmp_path, detector_model(protocol={"boxes_output": "scores"})).startswith(
        "p 1.0: protocol: tensor names must be distinct"
    )
    synthetic = {"precision": "int8", "weights": {"train": "digit_pages"}, "quantization": {}}
    assert detector_spec_error(tmp_path, detector_model(versions={"2.0": synthetic})) == (
        "p 2.0: quantization.calibration: the detector calibrates on training pages: digit_pages"
    )
    golden = tmp_path / "golden.json"
    (tmp_path / "page.png").write_bytes(png((32, 32)))
    golden.write_text(json.dumps([{"file": "page.png", "label": "12a"}]))
    assert detector_spec_error(tmp_path, detector_model(golden_set=str(golden))) == (
        "p 1.0: golden_set: entry 0: label '12a' is not a page's digits (a non-empty string of 0123456789)"
    )


def test_the_real_spec_has_the_detector_with_its_gate(repo_root: Path) -> None:
    specs = {s.version: s for s in load_spec(repo_root / "models.yaml") if s.name == "digit_pages"}
    assert {v: s.precision for v, s in specs.items()} == {"1.0": "fp32", "2.0": "int8"}
    assert specs["2.0"].max_drop == 2.0
    assert specs["1.0"].options.score_threshold is None  # auto: chosen at build time
    config = specs["2.0"].handler_config()
    assert isinstance(config, DetectorConfig)
    assert config.quantized_engine == "x86"
    recipe = DetectorTask.detector_recipe(specs["1.0"])
    assert (recipe.train_pages, recipe.epochs, recipe.width) == (2500, 6, 32)  # about a minute on 2 cores
    assert [g.label for g in specs["1.0"].golden_set] == [
        e["label"] for e in json.loads((repo_root / "samples/pages/golden.json").read_text())
    ]


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory: pytest.TempPathFactory, repo_root: Path) -> dict:
    """Both versions of a tiny detector built into a store by the real build (every task hook runs)."""
    from servekit.build.archive import build_all

    root = tmp_path_factory.mktemp("tiny-build")
    model = detector_model(golden_set=str(repo_root / "samples/pages/golden.json"))
    path = root / "models.yaml"
    path.write_text(yaml.safe_dump({"models": {"p": model}}))
    lines: list[str] = []
    stream = type("Lines", (), {"write": lambda self, text: lines.append(text), "flush": lambda self: None})()
    specs = load_spec(path)
    results = build_all(specs, root / "store", root / "cache", stream=stream)
    archives = {}
    for result in results:
        with zipfile.ZipFile(root / "store" / result.spec.archive_name) as mar:
            archives[result.spec.version] = {
                "config": yaml.safe_load(mar.read("model-config.yaml"))["handler"],
                "metadata": json.loads(mar.read("metadata.json")),
                "names": set(mar.namelist()),
                "spec": result.spec,
            }
    return {"archives": archives, "log": "".join(lines), "specs": specs}


def test_a_tiny_build_records_map_page_accuracy_and_the_gate(tiny_build: dict) -> None:
    fp32, int8 = (tiny_build["archives"][v]["metadata"]["accuracy"] for v in ("1.0", "2.0"))
    assert fp32["pages"] == 16
    assert 0.0 <= fp32["map50"] <= 100.0
    assert 0.0 <= fp32["page_accuracy"] <= 100.0
    assert int8["fp32_map50"] == pytest.approx(fp32["map50"])
    assert int8["gate"] == {"max_map50_drop": 100.0, "drop": round(fp32["map50"] - int8["map50"], 4)}
    assert "page accuracy" in tiny_build["log"]
    assert "score threshold" in tiny_build["log"]


def test_a_tiny_build_writes_the_chosen_threshold_into_the_archive(tiny_build: dict) -> None:
    configs = [DetectorConfig.from_dict(tiny_build["archives"][v]["config"]) for v in ("1.0", "2.0")]
    assert configs[0].precision == "fp32"
    assert configs[1].precision == "int8"
    chosen = configs[0].detection.score_threshold
    assert chosen in build.SCORE_THRESHOLDS
    assert configs[1].detection.score_threshold == chosen  # chosen once, from the FP32 weights
    metadata = tiny_build["archives"]["1.0"]["metadata"]
    assert metadata["oip"]["parameters"]["score_threshold"] == chosen
    assert metadata["tuned"]["options"]["score_threshold"] == chosen  # what the archive differs from the spec by
    assert metadata["spec_hash"] == tiny_build["specs"][0].spec_hash()  # the spec as written ("auto")
    assert [o["name"] for o in metadata["oip"]["outputs"]] == ["boxes", "scores", "labels", "counts"]


def test_a_tiny_build_carries_golden_pages_and_a_drift_reference(tiny_build: dict) -> None:
    archive = tiny_build["archives"]["2.0"]
    assert {"golden/golden.json", "golden/page_0.png", "labels.json", "model.pt"} <= archive["names"]
    reference = archive["metadata"]["drift_reference"]
    assert set(reference) >= {"classes", "confidence", "brightness", "megapixels", "samples"}
    assert set(reference["classes"]) == set(build.LABELS)
    assert sum(reference["confidence"]["counts"]) == reference["samples"]
    assert sum(reference["brightness"]["counts"]) == 16


def test_golden_check_reads_a_top_level_label() -> None:
    from servekit.deploy.workflows import _top_label

    class Answer:
        status_code = 200

        def __init__(self, body: object) -> None:
            self.body = body

        def json(self) -> object:
            return self.body

    assert _top_label(Answer({"label": "0427", "detections": []})) == "0427"
    assert _top_label(Answer({"predictions": [{"label": "7"}]})) == "7"
    assert _top_label(Answer([1, 2])) is None
