"""DCT-scaled JPEG decoding: which scale for which size, EXIF after a scaled decode, the decode budget
still on the stored size, and the preprocessed tensor within the stated tolerance of the full decode.

The tolerance (docs/decoding.md), in normalised units against the full decode's tensor: resize +
crop at most 0.3 max and 0.015 mean absolute difference (under one grey level, 0.0175; measured on
camera-sized photo-like JPEGs: 0.26 and 0.0073, both below the JPEG encoding's own error on the
same photos); fit_content at most 0.12 mean absolute difference over images (measured 0.042 on
the held-out digits as photos).
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from handlers import image_io
from handlers.errors import PayloadTooLarge
from handlers.image_classifier import ImageClassifier
from handlers.image_io import FULL_FRAME, DecodeLimits, decode_image, jpeg_draft_scale
from handlers.transforms import ImagePreprocessor, Preprocessing
from servekit.build.datasets import _digits_arrays
from servekit.perf.photos import digit_photo, encode_jpeg, paper, photo_like
from tests.hostile_corpus_decode import mpo, progressive_digit_with_scans

LIMITS = DecodeLimits()
IMAGENET = Preprocessing(resize=256, crop=224)
DIGITS = Preprocessing(
    color_mode="L", resize=None, crop=16, mean=(0.1,), std=(0.25,), invert=True, fit_content=True, margin=2
)
MAX_ABS, MEAN_ABS = 0.3, 0.015  # the resize + crop tolerance, normalised units (one grey level: 0.0175)
DIGITS_MEAN_ABS = 0.12  # fit_content: mean over images


def jpeg(image: Image.Image, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **params)
    return buffer.getvalue()


def difference(payload: bytes, preprocessing: Preprocessing) -> tuple[torch.Tensor, Image.Image]:
    """|scaled - full| of the preprocessed tensors, and the scaled decode."""
    preprocessor = ImagePreprocessor(preprocessing)
    scaled_image = decode_image(payload, LIMITS, preprocessor.min_decode_side)
    full = preprocessor(decode_image(payload, LIMITS))
    return (preprocessor(scaled_image) - full).abs(), scaled_image


# ------------------------------------------------------------------------------------ the scale rule
@pytest.mark.parametrize(
    ("size", "min_side", "scale"),
    [
        ((4000, 3000), 512, 4),  # a phone photo for a 256/224 model: 1000x750
        ((3000, 4000), 512, 4),  # portrait: the shorter side decides, whichever it is
        ((1920, 1080), 512, 2),
        ((640, 480), 512, 1),  # already small: decoded as it is
        ((4096, 4096), 512, 8),
        ((4095, 4096), 512, 4),  # 4095 // 8 = 511: one pixel short of 1/8
        ((1023, 1500), 512, 1),
        ((1024, 1500), 512, 2),
        ((4000, 3000), 375, 8),
        ((4000, 3000), 376, 4),
        ((4000, 3000), None, 1),  # no size given: full size
    ],
)
def test_draft_scale_is_the_smallest_that_keeps_the_shorter_side(
    size: tuple[int, int], min_side: int | None, scale: int
) -> None:
    assert jpeg_draft_scale(*size, min_side) == scale


def test_min_decode_side_per_geometry() -> None:
    assert IMAGENET.min_decode_side() == 512  # 2 x resize
    assert Preprocessing(resize=232, crop=224).min_decode_side() == 464
    assert Preprocessing(resize=None, crop=224).min_decode_side() is None  # a crop at native resolution
    assert DIGITS.min_decode_side() == 512  # 32 x crop
    assert ImagePreprocessor(IMAGENET).min_decode_side == 512  # computed once, with the preprocessor


def test_decoded_size_is_rounded_up_and_the_full_frame_recorded() -> None:
    payload = jpeg(Image.new("RGB", (1001, 601), (120, 80, 40)))

    image = decode_image(payload, LIMITS, min_side=75)  # 601 // 8 = 75

    assert image.size == (math.ceil(1001 / 8), math.ceil(601 / 8)) == (126, 76)
    # The last column and row stand for 1 of 8 full pixels: the full image covers 125.125 x 75.125.
    assert image.info[FULL_FRAME] == ((1001, 601), (0.0, 0.0, 125.125, 75.125))
    assert FULL_FRAME not in decode_image(payload, LIMITS).info


def test_full_frame_turns_with_the_exif_orientation() -> None:
    payload = encode_jpeg(Image.new("RGB", (601, 1001)), 90, orientation=6)  # stored 1001x601

    image = decode_image(payload, LIMITS, min_side=75)

    assert image.size == (76, 126)
    # Rotated clockwise: the partial column (stored last row) is now the first one.
    assert image.info[FULL_FRAME] == ((601, 1001), (0.875, 0.0, 76.0, 125.125))


def test_a_text_chunk_named_like_the_full_frame_is_only_text() -> None:
    from PIL import PngImagePlugin

    text = PngImagePlugin.PngInfo()
    text.add_text(FULL_FRAME, "((1, 1), (0, 0, 1, 1))")
    buffer = io.BytesIO()
    Image.new("RGB", (300, 400), (90, 120, 150)).save(buffer, "PNG", pnginfo=text)

    image = decode_image(buffer.getvalue(), LIMITS, min_side=64)

    assert FULL_FRAME not in image.info
    assert ImagePreprocessor(IMAGENET)(image).shape == (3, 224, 224)


@pytest.mark.parametrize("min_side", [None, 1000])
def test_full_size_without_min_side_or_when_already_small(min_side: int | None) -> None:
    assert decode_image(jpeg(Image.new("RGB", (1200, 900))), LIMITS, min_side).size == (1200, 900)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "BMP"])
def test_other_formats_are_decoded_at_full_size(fmt: str) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (800, 600), (10, 20, 30)).save(buffer, fmt)

    assert decode_image(buffer.getvalue(), LIMITS, min_side=64).size == (800, 600)


@pytest.mark.parametrize(("mode", "params"), [("L", {}), ("CMYK", {}), ("RGB", {"progressive": True})])
def test_gray_cmyk_and_progressive_jpegs_are_scaled_too(mode: str, params: dict) -> None:
    image = decode_image(jpeg(Image.new(mode, (800, 600)), **params), LIMITS, min_side=150)

    assert (image.mode, image.size) == (mode, (200, 150))


# ------------------------------------------------------------------------------------ EXIF orientation
@pytest.fixture(scope="module")
def portrait() -> Image.Image:
    return photo_like(320, 480, seed=11)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_after_a_scaled_decode(portrait: Image.Image, orientation: int) -> None:
    payload = encode_jpeg(portrait, 90, orientation)  # 5..8: stored as 480x320, displayed 320x480

    image = decode_image(payload, LIMITS, min_side=80)  # 320 // 4 = 80

    assert image.size == (80, 120)
    expected = np.asarray(portrait.reduce(4), np.float32)
    error = np.abs(np.asarray(image, np.float32) - expected).mean()
    wrong = np.abs(np.asarray(image, np.float32) - expected[::-1, ::-1]).mean()
    assert error < 3.0  # grey levels: libjpeg's 1/4 scale against a 4x4 box average of the original
    assert wrong > 5 * error


def test_mpo_first_frame_is_scaled_and_oriented() -> None:
    full = decode_image(mpo(7, 1, orientation=6), LIMITS)

    scaled = decode_image(mpo(7, 1, orientation=6), LIMITS, min_side=32)

    assert full.size == (128, 128)
    assert scaled.size == (32, 32)
    error = np.abs(np.asarray(scaled, np.float32) - np.asarray(full.reduce(4), np.float32)).mean()
    assert error < 4.0


# ------------------------------------------------------------------------------------ the budget still holds
def test_pixel_limit_holds_for_the_stored_size() -> None:
    payload = jpeg(Image.new("RGB", (400, 300)))  # decoded at 1/8 it would be 50x38

    with pytest.raises(PayloadTooLarge) as info:
        decode_image(payload, DecodeLimits(max_pixels=100_000), min_side=32)

    assert info.value.message == "image is 400x300 = 120000 pixels; the limit is 100000"


def test_scan_cap_holds_with_scaling() -> None:
    payload = progressive_digit_with_scans(6, 12)

    assert decode_image(payload, DecodeLimits(max_jpeg_scans=12), min_side=32).size == (32, 32)
    with pytest.raises(PayloadTooLarge, match=r"^JPEG has 12 scans; the limit is 11 "):
        decode_image(payload, DecodeLimits(max_jpeg_scans=11), min_side=32)


def test_clock_holds_with_scaling(monkeypatch: pytest.MonkeyPatch) -> None:
    payload = jpeg(Image.fromarray(np.random.default_rng(0).integers(0, 256, (600, 800, 3), dtype=np.uint8)))
    now = [0.0]

    def clock() -> float:
        now[0] += 0.1
        return now[0]

    monkeypatch.setattr(image_io, "decode_clock", clock)

    with pytest.raises(PayloadTooLarge, match=r"^image takes too long to decode"):
        decode_image(payload, DecodeLimits(max_decode_seconds=0.25), min_side=64)


# ------------------------------------------------------------------------------------ tolerance
@pytest.fixture(scope="module")
def odd_sized_photo() -> Image.Image:
    return photo_like(1366, 1025, seed=2)  # neither side a multiple of 4: libjpeg rounds up


@pytest.mark.parametrize("orientation", range(1, 9))
def test_crop_is_the_same_part_of_the_scene_whatever_the_rounding_and_orientation(
    odd_sized_photo: Image.Image, orientation: int
) -> None:
    # Without the full frame, the rounded-up size shifts the crop by up to one output pixel
    # (mean difference 0.09 instead of 0.008 at 128/112).
    diff, scaled = difference(encode_jpeg(odd_sized_photo, 90, orientation), Preprocessing(resize=128, crop=112))

    assert sorted(scaled.size) == [257, 342]  # 1/4
    assert diff.max().item() <= MAX_ABS
    assert diff.mean().item() <= MEAN_ABS


@pytest.mark.parametrize(
    ("displayed", "preprocessing", "scale"),
    [
        ((2048, 2732), IMAGENET, 4),  # portrait, stored landscape with EXIF orientation 6
        ((1366, 1024), Preprocessing(resize=64, crop=56), 8),  # the same 2x rule at 1/8
    ],
    ids=["256-224 at 1-4", "64-56 at 1-8"],
)
def test_resize_crop_tensor_within_tolerance(
    displayed: tuple[int, int], preprocessing: Preprocessing, scale: int
) -> None:
    width, height = displayed
    payload = encode_jpeg(photo_like(width, height, seed=3), 90, orientation=6 if height > width else 1)

    diff, scaled = difference(payload, preprocessing)

    assert scaled.size == (math.ceil(width / scale), math.ceil(height / scale))
    assert diff.max().item() <= MAX_ABS
    assert diff.mean().item() <= MEAN_ABS


def test_digit_photos_keep_their_tensor_close() -> None:
    # fit_content's max difference is no measure: a one-pixel change of the ink's box can move the
    # digit by a canvas pixel (JPEG encoding alone does). The mean over images is (docs/decoding.md).
    _, cells, _, _ = _digits_arrays()
    sheet = paper(2732, 2048, seed=5)
    means = []
    for i, fraction in enumerate((0.4, 0.25, 0.1, 0.07)):
        diff, scaled = difference(digit_photo(cells[i], sheet, fraction, seed=i), DIGITS)
        assert scaled.size == (683, 512)  # 1/4: the shorter side keeps 512 = 32 x crop
        means.append(diff.mean().item())

    assert np.mean(means) <= DIGITS_MEAN_ABS


# ------------------------------------------------------------------------------------ the handler passes it on
def test_handler_decodes_at_its_preprocessing_size(monkeypatch: pytest.MonkeyPatch) -> None:
    handler = ImageClassifier()
    handler.labels, handler.topk, handler.limits = ["a", "b"], 1, LIMITS
    handler.transform = ImagePreprocessor(IMAGENET)
    seen = []

    def recording_decode(payload: bytes, limits: DecodeLimits, min_side: int | None = None) -> Image.Image:
        seen.append(min_side)
        return decode_image(payload, limits, min_side)

    monkeypatch.setattr("handlers.image_classifier.decode_image", recording_decode)

    tensor, megapixels = handler.preprocess_image(jpeg(Image.new("RGB", (1200, 1100))))

    assert seen == [512]
    assert tensor.shape == (3, 224, 224)
    assert megapixels == 1200 * 1100 / 1e6  # of the image as sent, not of the scaled decode
