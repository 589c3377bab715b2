"""Preprocessing parameters, colour-mode conversion and the two geometries of ImagePreprocessor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from handlers.errors import InvalidInput
from handlers.transforms import ImagePreprocessor, Preprocessing, to_model_mode
from servekit.build.datasets import _digits_arrays, render_digit

DIGITS = Preprocessing(
    color_mode="L", resize=None, crop=16, mean=(0.1,), std=(0.25,), invert=True, fit_content=True, margin=2
)


# ------------------------------------------------------------------------------------ Preprocessing
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"color_mode": "CMYK"}, "color_mode: 'CMYK' is not one of ['L', 'RGB']"),
        ({"crop": 0}, "crop: must be a positive integer, got 0"),
        ({"crop": True}, "crop: must be a positive integer, got True"),
        ({"resize": 100}, "resize: must be an integer >= crop (224) or null, got 100"),
        ({"resize": 256.0}, "resize: must be an integer >= crop (224) or null, got 256.0"),
        ({"mean": (0.5,)}, "mean: needs 3 numbers for color_mode RGB, got (0.5,)"),
        ({"color_mode": "L"}, "mean: needs 1 numbers for color_mode L, got (0.485, 0.456, 0.406)"),
        ({"std": (0.2, 0.2, "x")}, "std: needs 3 numbers for color_mode RGB, got (0.2, 0.2, 'x')"),
        ({"std": (0.2, 0.0, 0.2)}, "std: every value must be > 0, got (0.2, 0.0, 0.2)"),
        ({"margin": 112}, "margin: must be an integer with 0 <= 2*margin < crop, got 112"),
        ({"margin": -1}, "margin: must be an integer with 0 <= 2*margin < crop, got -1"),
    ],
)
def test_preprocessing_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        Preprocessing(**kwargs)

    assert str(info.value) == message


def test_preprocessing_from_dict_refuses_unknown_keys() -> None:
    with pytest.raises(ValueError) as info:
        Preprocessing.from_dict({"crop": 16, "resize": None, "size": 16})

    assert str(info.value).startswith("size: unknown key (valid keys: color_mode, crop, fit_content, ")


def test_preprocessing_from_dict_refuses_a_scalar_mean() -> None:
    with pytest.raises(ValueError, match=r"^mean: must be a list of numbers, got 0.5$"):
        Preprocessing.from_dict({"mean": 0.5})


def test_preprocessing_dict_round_trip() -> None:
    data = DIGITS.to_dict()

    assert data["mean"] == [0.1]
    assert Preprocessing.from_dict(data) == DIGITS
    assert DIGITS.input_shape == (1, 16, 16)
    assert Preprocessing().input_shape == (3, 224, 224)


# ------------------------------------------------------------------------------------ to_model_mode
def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


@pytest.mark.parametrize("target", ["L", "RGB"])
def test_l_and_rgb_pass_through(target: str) -> None:
    gray = Image.new("L", (3, 2), 77)
    rgb = Image.new("RGB", (3, 2), (10, 200, 30))

    assert pixels(to_model_mode(gray, "L")).tolist() == pixels(gray).tolist()
    assert pixels(to_model_mode(rgb, "RGB")).tolist() == pixels(rgb).tolist()
    assert to_model_mode(gray, target).mode == target
    assert to_model_mode(rgb, target).mode == target
    assert pixels(to_model_mode(gray, "RGB"))[0, 0].tolist() == [77, 77, 77]


@pytest.mark.parametrize("target", ["L", "RGB"])
def test_rgba_transparent_pixels_become_white(target: str) -> None:
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent "black"
    image.putpixel((1, 1), (0, 0, 0, 255))  # one opaque black ink pixel
    image.putpixel((2, 2), (0, 0, 0, 128))  # half-transparent black: mid grey on paper

    out = to_model_mode(image, target)

    gray = pixels(out.convert("L")).astype(int)
    assert out.mode == target
    assert gray[0, 0] == 255
    assert gray[1, 1] == 0
    assert 120 <= gray[2, 2] <= 135


def test_la_transparent_pixels_become_white() -> None:
    out = to_model_mode(Image.new("LA", (2, 2), (0, 0)), "L")

    assert pixels(out).tolist() == [[255, 255], [255, 255]]


def test_palette_image_uses_its_palette_and_transparency() -> None:
    image = Image.new("P", (2, 2), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((1, 0), 1)
    assert pixels(to_model_mode(image, "RGB"))[0].tolist() == [[255, 0, 0], [0, 0, 255]]

    image.info["transparency"] = 0  # index 0 is transparent -> paper
    assert pixels(to_model_mode(image, "RGB"))[0].tolist() == [[255, 255, 255], [0, 0, 255]]


def test_cmyk_is_converted() -> None:
    cmyk = Image.new("CMYK", (2, 2), (0, 0, 0, 0))  # no ink: white
    cmyk.putpixel((0, 0), (0, 255, 255, 0))  # magenta + yellow: red

    rgb = to_model_mode(cmyk, "RGB")
    gray = to_model_mode(cmyk, "L")

    assert rgb.mode == "RGB"
    assert pixels(rgb)[0].tolist() == [[255, 0, 0], [255, 255, 255]]
    assert gray.mode == "L"
    assert pixels(gray)[1, 1] == 255


@pytest.mark.parametrize("target", ["L", "RGB"])
def test_sixteen_bit_is_scaled_to_eight_bits(target: str) -> None:
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"

    out = to_model_mode(image, target)

    assert out.mode == target
    assert pixels(out.convert("L"))[0].tolist() == [0, 100, 255]


def test_32_bit_integer_with_16_bit_range_is_scaled() -> None:
    image = Image.new("I", (2, 1), 65535)
    image.putpixel((0, 0), 257 * 10)

    assert pixels(to_model_mode(image, "L"))[0].tolist() == [10, 255]


def test_32_bit_integer_in_8_bit_range_is_kept() -> None:
    assert pixels(to_model_mode(Image.new("I", (2, 1), 200), "L"))[0].tolist() == [200, 200]


def test_bilevel_image() -> None:
    image = Image.new("1", (2, 1), 0)
    image.putpixel((1, 0), 1)

    out = to_model_mode(image, "L")

    assert out.mode == "L"
    assert pixels(out)[0].tolist() == [0, 255]


def test_float_image_is_clipped_to_the_8_bit_range() -> None:
    image = Image.fromarray(np.array([[-5.0, 99.6, 300.0]], dtype=np.float32), "F")

    out = to_model_mode(image, "RGB")

    assert out.mode == "RGB"
    assert pixels(out.convert("L"))[0].tolist() == [0, 99, 255]


# ------------------------------------------------------------------------------------ ImagePreprocessor
@pytest.mark.parametrize(
    ("size", "mode"), [((640, 480), "RGB"), ((100, 300), "RGBA"), ((50, 50), "L"), ((224, 224), "P")]
)
def test_resize_crop_output_shape(size: tuple[int, int], mode: str) -> None:
    preprocessor = ImagePreprocessor(Preprocessing())

    tensor = preprocessor(Image.new(mode, size))

    assert tensor.shape == (3, 224, 224)
    assert tensor.dtype == torch.float32


def test_resize_crop_normalises_with_mean_and_std() -> None:
    params = Preprocessing(color_mode="RGB", resize=None, crop=8)
    preprocessor = ImagePreprocessor(params)

    tensor = preprocessor(Image.new("RGB", (8, 8), (255, 0, 51)))

    expected = [(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (0.2 - 0.406) / 0.225]
    assert torch.allclose(tensor[:, 3, 3], torch.tensor(expected), atol=1e-5)


def test_resize_crop_takes_the_centre() -> None:
    image = Image.new("L", (30, 10), 0)
    image.paste(255, (10, 0, 20, 10))  # a white centre square between black sides
    preprocessor = ImagePreprocessor(Preprocessing(color_mode="L", resize=None, crop=10, mean=(0.0,), std=(1.0,)))

    tensor = preprocessor(image)

    assert tensor.shape == (1, 10, 10)
    assert torch.all(tensor == 1.0)


def test_grayscale_model_input_shape() -> None:
    params = Preprocessing(color_mode="L", resize=32, crop=28, mean=(0.5,), std=(0.5,))

    assert ImagePreprocessor(params)(Image.new("RGB", (200, 100))).shape == (1, 28, 28)


def test_fit_content_output_shape_and_margin() -> None:
    image = Image.new("L", (300, 200), 255)
    image.paste(0, (100, 50, 140, 150))  # a dark bar on white paper

    tensor = ImagePreprocessor(DIGITS)(image)

    assert tensor.shape == (1, 16, 16)
    background = (0.0 - 0.1) / 0.25
    border = torch.cat([tensor[0, :2].flatten(), tensor[0, -2:].flatten(), tensor[0, :, :2].flatten()])
    assert torch.allclose(border, torch.full_like(border, background))
    assert tensor.max() == pytest.approx((1.0 - 0.1) / 0.25)


@pytest.mark.parametrize("colour", [255, 0, 128])
def test_blank_image_with_fit_content_is_invalid_input(colour: int) -> None:
    image = Image.new("L", (64, 64), colour)
    image.putpixel((5, 5), min(255, colour + 10))  # under the visibility threshold

    with pytest.raises(InvalidInput) as info:
        ImagePreprocessor(DIGITS)(image)

    assert info.value.status == 400
    assert info.value.message == "image has no visible content (it is blank or nearly uniform)"


@pytest.fixture(scope="module")
def holdout_cells() -> np.ndarray:
    return _digits_arrays()[1]


def on_canvas(digit: Image.Image, canvas: tuple[int, int], at: tuple[int, int]) -> Image.Image:
    page = Image.new("L", canvas, 255)
    page.paste(digit, at)
    return page


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_fit_content_makes_position_and_canvas_irrelevant(holdout_cells: np.ndarray, index: int) -> None:
    preprocessor = ImagePreprocessor(DIGITS)
    digit = render_digit(holdout_cells[index], 32)

    alone = preprocessor(digit)
    corner = preprocessor(on_canvas(digit, (500, 400), (468, 368)))  # bottom-right corner of a big page
    centred = preprocessor(on_canvas(digit, (500, 400), (234, 184)))

    assert torch.equal(corner, alone)
    assert torch.equal(corner, centred)


def test_fit_content_makes_scale_nearly_irrelevant(holdout_cells: np.ndarray) -> None:
    preprocessor = ImagePreprocessor(DIGITS)
    big_centred = preprocessor(render_digit(holdout_cells[0], 128))
    small_in_corner = preprocessor(on_canvas(render_digit(holdout_cells[0], 40), (1000, 800), (0, 0)))
    other_digit = preprocessor(render_digit(holdout_cells[1], 128))
    assert (holdout_cells[0] != holdout_cells[1]).any()

    same_gap = (big_centred - small_in_corner).abs().mean().item()
    other_gap = (big_centred - other_digit).abs().mean().item()

    assert same_gap < 0.1  # normalised units: the full 0..255 range spans 4.0
    assert other_gap > 5 * same_gap
