"""Getting an image out of a request and decoding it safely: every failure is a typed 4xx error."""

from __future__ import annotations

import base64
import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from handlers.errors import MAX_MESSAGE_CHARS, InvalidInput, PayloadTooLarge, UnsupportedMediaType, error_payload
from handlers.image_io import DecodeLimits, decode_image, extract_image_request, parse_topk

LIMITS = DecodeLimits()


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def noisy_rgb(size: tuple[int, int] = (64, 48), seed: int = 0) -> Image.Image:
    # Noise compresses badly, so a truncation really cuts into the pixel data.
    array = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    return Image.fromarray(array, "RGB")


@pytest.fixture(scope="module")
def png() -> bytes:
    return encode(noisy_rgb())


def png_with_header_size(width: int, height: int) -> bytes:
    """A real 4x4 PNG whose IHDR claims ``width`` x ``height`` (CRC recomputed, so it parses)."""
    data = encode(Image.new("L", (4, 4), 255))
    assert data[12:16] == b"IHDR"
    body = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return data[:8] + struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body)) + data[33:]


# ------------------------------------------------------------------------------------ extract_image_request
def test_raw_body_bytes(png: bytes) -> None:
    request = extract_image_request({"body": png})

    assert request.payload == png
    assert request.options == {}


def test_raw_body_bytearray(png: bytes) -> None:
    request = extract_image_request({"body": bytearray(png)})

    assert type(request.payload) is bytes
    assert request.payload == png


@pytest.mark.parametrize("field", ["data", "file", "image"])
def test_multipart_field_with_options(png: bytes, field: str) -> None:
    request = extract_image_request({field: bytearray(png), "topk": bytearray(b"2")})

    assert request.payload == png
    assert request.options == {"topk": bytearray(b"2")}


def test_json_dict_with_base64_data(png: bytes) -> None:
    document = {"data": base64.b64encode(png).decode(), "topk": 4}

    request = extract_image_request({"body": document})

    assert request.payload == png
    assert request.options == {"topk": 4}


def test_json_base64_as_data_url_with_line_breaks(png: bytes) -> None:
    encoded = base64.encodebytes(png).decode()  # wrapped at 76 characters, as some tools do
    assert "\n" in encoded

    request = extract_image_request({"body": {"data": f"data:image/png;base64,{encoded}"}})

    assert request.payload == png


@pytest.mark.parametrize("as_text", [False, True], ids=["bytes", "str"])
def test_json_text_body(png: bytes, as_text: bool) -> None:
    text = " \n" + json.dumps({"data": base64.b64encode(png).decode(), "topk": "1"})
    body = text if as_text else text.encode()

    request = extract_image_request({"body": body})

    assert request.payload == png
    assert request.options == {"topk": "1"}


def test_malformed_json() -> None:
    with pytest.raises(InvalidInput) as info:
        extract_image_request({"body": b'{"data": "abc'})

    assert info.value.status == 400
    assert info.value.message.startswith("malformed JSON body: ")
    assert "malformed JSON" in info.value.message


def test_invalid_base64() -> None:
    with pytest.raises(InvalidInput) as info:
        extract_image_request({"body": {"data": "this is not base64!"}})

    assert info.value.message.startswith("JSON field 'data' is not valid base64: ")


def test_base64_field_must_be_a_string() -> None:
    with pytest.raises(InvalidInput) as info:
        extract_image_request({"body": {"data": 12345}})

    assert info.value.message == "JSON field 'data' must be a base64 string, got int"


def test_json_without_an_image_field_names_the_fields_it_got() -> None:
    with pytest.raises(InvalidInput) as info:
        extract_image_request({"body": {"img": "AAAA", "topk": 3}})

    assert info.value.message == (
        "JSON body has no image: expected a base64 string in field 'data', got fields ['img', 'topk']"
    )


def test_json_array_body_is_refused() -> None:
    with pytest.raises(InvalidInput) as info:
        extract_image_request({"body": b'["AAAA"]'})

    assert info.value.message == 'JSON body must be an object like {"data": "<base64 image>"}, got list'


@pytest.mark.parametrize("body", [b"", bytearray()])
def test_empty_body(body) -> None:
    with pytest.raises(InvalidInput) as info:
        extract_image_request({"body": body})

    assert info.value.status == 400
    assert info.value.message == "request body is empty: send the image bytes, a multipart file or JSON"


def test_request_without_any_image() -> None:
    with pytest.raises(InvalidInput) as info:
        extract_image_request({"topk": b"3"})

    assert (
        info.value.message == "no image in request: expected the body or a field named one of ['data', 'file', 'image']"
    )


@pytest.mark.parametrize("body", [10**6, True, 2.5])
def test_bare_json_scalar_body_is_invalid_input(body) -> None:
    # TorchServe json-parses application/json bodies: `1000000` arrives as an int. It must be
    # refused as a 400, not turned into a million zero bytes (or a 500 for a float).
    with pytest.raises(InvalidInput) as info:
        extract_image_request({"body": body})

    assert info.value.message.startswith("request 'body' must be image bytes or a JSON object like ")
    assert info.value.message.endswith(f"got {type(body).__name__}")


def test_text_body_is_unsupported_media_type() -> None:
    with pytest.raises(UnsupportedMediaType) as info:
        extract_image_request({"body": "hello, this is a letter"})

    assert info.value.status == 415
    assert info.value.message == "request body is text, not an image"


# ------------------------------------------------------------------------------------ decode_image
def test_decodes_a_valid_png_fully(png: bytes) -> None:
    image = decode_image(png, LIMITS)

    assert image.size == (64, 48)
    assert image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.asarray(noisy_rgb()))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"Dear model, please classify this text. " * 4, "body is not an image in a supported format"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", "body is a PDF document, not an image"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "body is an SVG drawing (vector images are not accepted)"),
        (b"PK\x03\x04" + b"\0" * 40, "body is a ZIP archive, not an image"),
    ],
    ids=["text", "pdf", "svg", "zip"],
)
def test_non_images_are_unsupported_media_type(payload: bytes, message: str) -> None:
    with pytest.raises(UnsupportedMediaType) as info:
        decode_image(payload, LIMITS)

    assert info.value.status == 415
    assert info.value.message.startswith(message)
    assert info.value.message.endswith("(accepted: JPEG, PNG, BMP, GIF, WEBP, TIFF, PPM)")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_is_invalid_input(fmt: str) -> None:
    data = encode(noisy_rgb(), fmt)
    decode_image(data, LIMITS)  # the whole file is fine

    with pytest.raises(InvalidInput) as info:
        decode_image(data[: len(data) // 2], LIMITS)

    assert info.value.status == 400
    assert info.value.message.startswith("image data is corrupt or truncated: ")


def test_payload_over_max_bytes(png: bytes) -> None:
    limits = DecodeLimits(max_bytes=len(png) - 1)

    with pytest.raises(PayloadTooLarge) as info:
        decode_image(png, limits)

    assert info.value.status == 413
    assert info.value.message == f"image is {len(png)} bytes; the limit is {len(png) - 1}"
    assert decode_image(png, DecodeLimits(max_bytes=len(png))).size == (64, 48)


@pytest.fixture
def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to decode pixels fail the test (AssertionError is not mapped to a 4xx)."""

    def refuse(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    with pytest.raises(AssertionError, match="pixels were decoded"):  # the trap really catches PNG decoding
        decode_image(encode(Image.new("L", (4, 4))), LIMITS)


@pytest.mark.usefixtures("no_pixel_decoding")
def test_header_over_max_pixels_is_refused_before_decoding() -> None:
    bomb = png_with_header_size(6000, 6000)  # 36 Mpx: over our 25 Mpx default, under PIL's own limit
    assert len(bomb) < 100

    with pytest.raises(PayloadTooLarge) as info:
        decode_image(bomb, LIMITS)

    assert info.value.status == 413
    assert info.value.message == "image is 6000x6000 = 36000000 pixels; the limit is 25000000"


@pytest.mark.usefixtures("no_pixel_decoding")
def test_decompression_bomb_header_is_refused_before_decoding() -> None:
    bomb = png_with_header_size(100_000, 100_000)
    assert Image.open(io.BytesIO(png_with_header_size(7, 9))).size == (7, 9)  # the patch really works

    for limits in (LIMITS, DecodeLimits(max_pixels=10**12)):  # refused even if our own limit is lifted
        with pytest.raises(PayloadTooLarge) as info:
            decode_image(bomb, limits)

        assert info.value.status == 413
        assert info.value.message.startswith("image refused as a decompression bomb: ")
        assert "10000000000 pixels" in info.value.message


def test_small_max_pixels_limit_applies() -> None:
    image = encode(Image.new("L", (100, 60), 255))

    with pytest.raises(PayloadTooLarge, match=r"^image is 100x60 = 6000 pixels; the limit is 5999$"):
        decode_image(image, DecodeLimits(max_pixels=5999))
    assert decode_image(image, DecodeLimits(max_pixels=6000)).size == (100, 60)


def test_animated_gif_is_refused() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "green", "blue")]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])

    with pytest.raises(InvalidInput) as info:
        decode_image(gif, LIMITS)

    assert info.value.message == "animated or multi-frame images are not accepted (3 frames)"


def test_single_frame_gif_is_accepted() -> None:
    gif = encode(Image.new("RGB", (8, 6), "red"), "GIF")

    assert decode_image(gif, LIMITS).size == (8, 6)


def test_exif_orientation_is_applied() -> None:
    # A 40x20 landscape photo whose camera says "rotate 90 degrees clockwise to display" (6).
    image = Image.new("RGB", (40, 20), "white")
    image.paste((0, 0, 0), (0, 0, 10, 20))  # black band at the left edge
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(image, "JPEG", exif=exif.tobytes(), quality=95)
    assert Image.open(io.BytesIO(data)).size == (40, 20)

    decoded = decode_image(data, LIMITS)

    assert decoded.size == (20, 40)
    gray = np.asarray(decoded.convert("L"), dtype=np.float32)
    # Rotated clockwise, the left band becomes the top band.
    assert gray[:8].mean() < 40
    assert gray[-20:].mean() > 215


def test_sixteen_bit_png_decodes() -> None:
    data = encode(Image.fromarray(np.full((5, 7), 40000, dtype=np.uint16)))

    image = decode_image(data, LIMITS)

    assert image.size == (7, 5)
    assert image.mode.startswith("I")
    assert int(np.asarray(image).max()) == 40000


# ------------------------------------------------------------------------------------ parse_topk
@pytest.mark.parametrize(("value", "expected"), [(1, 1), (10, 10), ("3", 3), (b" 2 ", 2), (bytearray(b"7"), 7)])
def test_parse_topk_valid(value, expected: int) -> None:
    assert parse_topk(value, 10) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "topk must be between 1 and 10, got 0"),
        (11, "topk must be between 1 and 10, got 11"),
        ("-1", "topk must be between 1 and 10, got -1"),
        (True, "topk must be an integer, got True"),
        (2.0, "topk must be an integer, got 2.0"),
        ("2.5", "topk must be an integer, got '2.5'"),
        ("three", "topk must be an integer, got 'three'"),
        (b"\xff", "request parameter is not valid UTF-8 text"),
    ],
)
def test_parse_topk_invalid(value, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_topk(value, 10)

    assert info.value.status == 400
    assert info.value.message == message


# ------------------------------------------------------------------------------------ process-wide state
def test_importing_the_handlers_leaves_pils_bomb_limit_alone(repo_root: Path) -> None:
    # In a fresh interpreter: PIL's default before, then import everything a worker imports.
    code = (
        "import PIL.Image as I; before = I.MAX_IMAGE_PIXELS; "
        "import handlers.image_classifier, handlers.image_io, handlers.transforms; "
        "print(before, I.MAX_IMAGE_PIXELS)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=120, check=True
    )
    before, after = result.stdout.split()

    assert before != "None"
    assert after == before
    assert Image.MAX_IMAGE_PIXELS is not None
    assert str(Image.MAX_IMAGE_PIXELS) == before


# ------------------------------------------------------------------------------------ hostile inputs
@pytest.mark.parametrize(
    ("payload", "fmt"),
    [
        (b"\x89PNG\r\n\x1a\n", "PNG"),
        (b"\xff\xd8\xff", "JPEG"),
        (b"GIF89a", "GIF"),
        (b"II*\x00", "TIFF"),
        (b"MM\x00*", "TIFF"),
        (b"RIFF\x00\x00\x00\x00WEBP", "WEBP"),
        (b"BM" + b"\x00" * 12, "BMP"),
    ],
)
def test_unreadable_header_of_an_accepted_format_is_invalid_input_not_415(payload: bytes, fmt: str) -> None:
    # A damaged image is a 400 (README), even when PIL cannot even identify it.
    with pytest.raises(InvalidInput) as info:
        decode_image(payload, LIMITS)

    assert info.value.message == (
        f"image data is corrupt or truncated: it starts like a {fmt} file but its header cannot be read"
    )


def test_json_nested_too_deeply_is_invalid_input() -> None:
    with pytest.raises(InvalidInput) as info:
        extract_image_request({"body": b"[" * 100_000 + b"]" * 100_000})

    assert info.value.message == "malformed JSON body: nested too deeply"


def test_json_integer_of_5000_digits_is_invalid_input() -> None:
    with pytest.raises(InvalidInput) as info:
        extract_image_request({"body": b'{"data": "AAAA", "topk": 1' + b"0" * 5000 + b"}"})

    assert info.value.message.startswith("malformed JSON body: Exceeds the limit (4300 digits)")


def test_error_messages_are_short_printable_ascii() -> None:
    # The message is also the HTTP reason phrase: TorchServe 0.12 frames it with its length in
    # characters, so one non-ASCII character used to kill the worker.
    error = InvalidInput("caf\u00e9 \u2603\tnew\nline \x00" + "x" * 5000)

    assert error.message.startswith("caf\\xe9 \\u2603 new line \\x00xxx")
    assert error.message.isascii()
    assert len(error.message) == MAX_MESSAGE_CHARS
    assert error.message.endswith("...")
    assert error.to_payload()["error"] == error.message


def test_internal_error_payload_is_short_printable_ascii() -> None:
    status, payload = error_payload(RuntimeError("d\u00e9j\u00e0 vu " * 500))

    assert status == 500
    assert payload["error"].startswith("internal error: RuntimeError: d\\xe9j\\xe0 vu ")
    assert payload["error"].isascii()
    assert len(payload["error"]) == MAX_MESSAGE_CHARS


def test_client_text_quoted_in_errors_is_bounded() -> None:
    with pytest.raises(InvalidInput) as info:
        extract_image_request({"body": {f"f\u00e9{i:03d}": i for i in range(100)}})
    assert info.value.message == (
        "JSON body has no image: expected a base64 string in field 'data', got fields "
        "['f\\xe9000', 'f\\xe9001', 'f\\xe9002', 'f\\xe9003', 'f\\xe9004', 'f\\xe9005', 'f\\xe9006', "
        "'f\\xe9007', ... 92 more]"
    )

    with pytest.raises(InvalidInput) as info:
        parse_topk("\\" * 3_000_000, 10)
    assert info.value.message == "topk must be an integer, got '" + "\\\\" * 18 + "..."
