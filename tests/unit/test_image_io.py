"""Getting an image out of a request and decoding it safely: every failure is a typed 4xx error."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from handlers import image_io
from handlers.errors import MAX_MESSAGE_CHARS, InvalidInput, PayloadTooLarge, UnsupportedMediaType, error_payload
from handlers.image_classifier import ImageClassifier
from handlers.image_io import DecodeLimits, decode_image, extract_image_request, parse_topk
from handlers.transforms import to_model_mode
from tests.hostile_corpus import digit_image, png_chunk, png_chunks
from tests.hostile_corpus_decode import (
    ORIENTATION_6,
    bigtiff_header,
    bmp_rle8,
    deflated_zeros,
    exif_block,
    gif_frames,
    gif_with_comment,
    gif_with_second_frame,
    gif_with_stray_bytes,
    gray_tags,
    jpeg_segments,
    jpeg_with_segments_before_frame,
    jpeg_with_stray_bytes,
    mpo,
    pfm_float,
    pgm_16bit,
    png_16bit_gray_alpha,
    png_16bit_rgba,
    png_idat_split,
    png_with_chunks_after_header,
    progressive_digit_with_scans,
    progressive_scan_bomb,
    short,
    tiff_16bit,
    tiff_by_hand,
    tiff_float,
    tiff_gray_alpha,
    tiff_ifd_chain,
    tiff_million_strips,
    tiff_self_loop,
    tiff_strip_per_row,
    tiff_tiled,
    tiff_tiled_digit,
    tiff_two_page_loop,
    tiff_with_orientation,
    webp_claiming_size,
)

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

    assert info.value.message == "animated or multi-frame images are not accepted (2 or more frames)"


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
    # A damaged image is a 400 (docs/protocols.md, "Images and bad input"), even when PIL cannot even identify it.
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


# ------------------------------------------------------------------------------------ decode budget: limits as data
LIMIT_NAMES = [spec.name for spec in fields(DecodeLimits)]
INTEGER_LIMITS = [name for name in LIMIT_NAMES if name != "max_decode_seconds"]


def test_decode_limits_defaults() -> None:
    assert asdict(DecodeLimits()) == {
        "max_bytes": 6_000_000,
        "max_pixels": 25_000_000,
        "max_decode_seconds": 1.0,
        "max_jpeg_scans": 100,
        "max_jpeg_markers": 5_000,
        "max_png_chunks": 20_000,
        "max_gif_blocks": 65_536,
        "max_tiff_strips": 16_384,
        "max_webp_pixels": 16_000_000,
    }


def test_negative_max_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^max_bytes: must be a positive integer, got -1$"):
        DecodeLimits(max_bytes=-1)


@pytest.mark.parametrize("value", [0, -1, True, 2.5, "10", None])
@pytest.mark.parametrize("name", INTEGER_LIMITS)
def test_integer_limits_must_be_positive_integers(name: str, value: object) -> None:
    with pytest.raises(ValueError) as info:
        DecodeLimits(**{name: value})

    assert str(info.value) == f"{name}: must be a positive integer, got {value!r}"


@pytest.mark.parametrize("value", [0, -0.5, 60.5, float("nan"), float("inf"), True, "1", None])
def test_max_decode_seconds_must_be_a_number_of_seconds_up_to_60(value: object) -> None:
    with pytest.raises(ValueError) as info:
        DecodeLimits(max_decode_seconds=value)

    assert str(info.value) == f"max_decode_seconds: must be a number of seconds > 0 and <= 60, got {value!r}"


@pytest.mark.parametrize("value", [0.05, 1, 60])
def test_max_decode_seconds_accepts_integers_and_floats(value: float) -> None:
    assert DecodeLimits(max_decode_seconds=value).max_decode_seconds == value


def test_from_dict_gives_the_new_limits_their_defaults() -> None:
    # Archives built before the decode budget carry only these two keys in model-config.yaml.
    assert DecodeLimits.from_dict({"max_bytes": 6_000_000, "max_pixels": 25_000_000}) == DecodeLimits()
    assert DecodeLimits.from_dict(None) == DecodeLimits()


def test_from_dict_accepts_every_limit() -> None:
    values = dict.fromkeys(INTEGER_LIMITS, 7) | {"max_decode_seconds": 0.5}

    assert asdict(DecodeLimits.from_dict(values)) == values


def test_from_dict_names_every_valid_key() -> None:
    with pytest.raises(ValueError) as info:
        DecodeLimits.from_dict({"max_frames": 2})

    assert str(info.value) == f"max_frames: unknown key (valid keys: {', '.join(LIMIT_NAMES)})"


def test_from_dict_validates_the_values() -> None:
    with pytest.raises(ValueError, match=r"^max_jpeg_scans: must be a positive integer, got 0$"):
        DecodeLimits.from_dict({"max_jpeg_scans": 0})


# ------------------------------------------------------------------------------------ decode budget: JPEG
def test_padding_scans_leave_the_pixels_alone() -> None:
    # The corpus's "at the scan limit" JPEG must be the same image as the one it pads.
    plain = encode(digit_image(6).convert("L"), "JPEG", progressive=True, quality=90)
    padded = progressive_digit_with_scans(6, 100)
    assert padded.count(b"\xff\xda") == 100

    assert np.array_equal(np.asarray(decode_image(padded, LIMITS)), np.asarray(decode_image(plain, LIMITS)))


@pytest.mark.usefixtures("no_pixel_decoding")
def test_progressive_jpeg_with_20000_scans_is_refused_before_decoding() -> None:
    bomb = progressive_scan_bomb((5000, 5000), 20_000)  # 31 s to decode before the budget
    assert len(bomb) < 250_000

    with pytest.raises(PayloadTooLarge) as info:
        decode_image(bomb, LIMITS)

    assert info.value.message == (
        "JPEG has 20000 scans; the limit is 100 "
        "(each scan of a progressive JPEG is a decoding pass over the whole image)"
    )


def test_jpeg_scan_limit_is_inclusive() -> None:
    data = progressive_digit_with_scans(6, 12)

    assert decode_image(data, DecodeLimits(max_jpeg_scans=12)).size == (128, 128)
    with pytest.raises(PayloadTooLarge, match=r"^JPEG has 12 scans; the limit is 11 "):
        decode_image(data, DecodeLimits(max_jpeg_scans=11))


def test_jpeg_marker_limit_counts_every_marker_before_the_first_scan() -> None:
    data = jpeg_with_segments_before_frame(7, b"\xff\xfe\x00\x02", 50)
    markers = len(jpeg_segments(data))  # SOI excluded, the first SOS included
    assert markers > 50

    assert decode_image(data, DecodeLimits(max_jpeg_markers=markers)).size == (128, 128)
    with pytest.raises(PayloadTooLarge) as info:
        decode_image(data, DecodeLimits(max_jpeg_markers=markers - 1))
    assert info.value.message == (
        f"JPEG has more than {markers - 1} markers before its first scan; the limit is {markers - 1}"
    )


def test_stray_bytes_between_jpeg_markers_count_one_each() -> None:
    # PIL skips them one read at a time: 4 MB of them cost as much as a million markers.
    data = jpeg_with_stray_bytes(7, 1000)
    markers = len(jpeg_segments(encode(digit_image(7).convert("L"), "JPEG", quality=90)))

    assert decode_image(data, DecodeLimits(max_jpeg_markers=markers + 1000)).size == (128, 128)
    with pytest.raises(PayloadTooLarge, match="markers before its first scan"):
        decode_image(data, DecodeLimits(max_jpeg_markers=markers + 999))


@pytest.mark.usefixtures("no_pixel_decoding")
@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(jpeg_with_segments_before_frame(7, b"\xff\xfe\x00\x02", 1_000_000), id="million-comments"),
        pytest.param(jpeg_with_stray_bytes(7, 4_000_000), id="4mb-stray-bytes"),
    ],
)
def test_jpeg_header_floods_are_refused_before_pil_parses_them(payload: bytes) -> None:
    started = time.monotonic()
    with pytest.raises(PayloadTooLarge, match=r"^JPEG has more than 5000 markers before its first scan"):
        decode_image(payload, LIMITS)
    assert time.monotonic() - started < 0.5


def test_mpo_is_read_as_its_first_frame() -> None:
    data = mpo(3, preview_digit=8)
    with Image.open(io.BytesIO(data)) as opened:
        assert (opened.format, opened.n_frames) == ("MPO", 2)

    decoded = decode_image(data, LIMITS)

    assert decoded.size == (128, 128)  # the photo, not the 48x48 preview
    assert mean_difference(decoded, digit_image(3)) < 4


def test_mpo_orientation_is_applied() -> None:
    decoded = decode_image(mpo(7, preview_digit=1, orientation=6), LIMITS)

    assert mean_difference(decoded, digit_image(7)) < 4


# ------------------------------------------------------------------------------------ decode budget: EXIF
ROTATED, AS_STORED = True, False


def band_image() -> Image.Image:
    """40x20, black band at the left edge: orientation 6 puts it at the top."""
    image = Image.new("RGB", (40, 20), "white")
    image.paste((0, 0, 0), (0, 0, 10, 20))
    return image


def jpeg_with_app1(image: Image.Image, exif: bytes) -> bytes:
    data = encode(image, "JPEG", quality=95)
    return data[:2] + b"\xff\xe1" + struct.pack(">H", 2 + len(exif)) + exif + data[2:]


@pytest.mark.parametrize(
    ("exif", "rotated"),
    [
        pytest.param(exif_block([ORIENTATION_6]), ROTATED, id="short"),
        pytest.param(exif_block([(0x0112, 4, 1, struct.pack("<I", 6))]), ROTATED, id="long"),
        pytest.param(exif_block([(0x0112, 3, 1, short(6, ">"))], endian=">"), ROTATED, id="big-endian"),
        # ImageOps.exif_transpose re-encodes the EXIF and raised TypeError on this one (a 500).
        pytest.param(exif_block([ORIENTATION_6, (0x011A, 2, 4, b"72\0\0")]), ROTATED, id="text-xresolution"),
        pytest.param(exif_block([ORIENTATION_6], [(0x927C, 3, 2, short(1) + short(2))]), ROTATED, id="short-makernote"),
        pytest.param(exif_block([ORIENTATION_6, (0xC4A5, 99, 4, b"abcd")]), ROTATED, id="unknown-type-tag"),
        pytest.param(exif_block([ORIENTATION_6, (0xC4A5, 7, 0x7FFFFFFF, b"\0" * 4)]), ROTATED, id="huge-count-tag"),
        pytest.param(exif_block([(0x0112, 2, 2, b"6\0")]), AS_STORED, id="orientation-as-text"),
        pytest.param(exif_block([(0x0112, 3, 1, short(99))]), AS_STORED, id="orientation-99"),
        pytest.param(exif_block([(0x0112, 3, 1, short(0))]), AS_STORED, id="orientation-0"),
        # PIL keeps the first value of a tag with too many (and warns): 6.
        pytest.param(exif_block([(0x0112, 3, 2, short(6) + short(1))]), ROTATED, id="orientation-count-2"),
        pytest.param(exif_block([(0x0112, 5, 1, struct.pack("<II", 6, 1))]), AS_STORED, id="orientation-rational"),
        pytest.param(b"Exif\0\0II*\0\xff\xff\0\0", AS_STORED, id="ifd-past-the-end"),
        pytest.param(b"Exif\0\0not a tiff header", AS_STORED, id="not-tiff"),
    ],
)
@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about the odd EXIF it is given: expected
def test_exif_orientation_whatever_else_the_exif_holds(exif: bytes, rotated: bool) -> None:
    decoded = decode_image(jpeg_with_app1(band_image(), exif), LIMITS)

    gray = np.asarray(decoded.convert("L"), dtype=np.float32)
    if rotated:
        assert decoded.size == (20, 40)
        assert gray[:8].mean() < 40  # the band is at the top
    else:
        assert decoded.size == (40, 20)
        assert gray[:, :8].mean() < 40  # the band is still at the left


@pytest.mark.parametrize("orientation", range(1, 9))
def test_each_orientation_turns_the_image_as_pil_does(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(noisy_rgb((24, 16)), "PNG", exif=exif.tobytes())
    with Image.open(io.BytesIO(data)) as opened:
        expected = np.asarray(ImageOps.exif_transpose(opened))

    assert np.array_equal(np.asarray(decode_image(data, LIMITS)), expected)


# ------------------------------------------------------------------------------------ decode budget: PNG, GIF
def test_png_chunk_limit_counts_every_chunk() -> None:
    data = png_with_chunks_after_header(encode(digit_image(3), "PNG"), png_chunk(b"vpAg", b""), 40)
    chunks = len(png_chunks(data))

    assert decode_image(data, DecodeLimits(max_png_chunks=chunks)).size == (128, 128)
    with pytest.raises(PayloadTooLarge) as info:
        decode_image(data, DecodeLimits(max_png_chunks=chunks - 1))
    assert info.value.message == f"PNG has more than {chunks - 1} chunks; the limit is {chunks - 1}"


@pytest.mark.usefixtures("no_pixel_decoding")
def test_png_with_350k_empty_chunks_is_refused_before_pil_parses_it() -> None:
    data = png_with_chunks_after_header(encode(digit_image(3), "PNG"), png_chunk(b"vpAg", b""), 350_000)

    with pytest.raises(PayloadTooLarge, match=r"^PNG has more than 20000 chunks; the limit is 20000$"):
        decode_image(data, LIMITS)


def test_gif_data_block_limit() -> None:
    data = gif_with_comment(3, 1000)  # 1000 sub-blocks and the terminator

    assert decode_image(data, LIMITS).size == (128, 128)
    with pytest.raises(PayloadTooLarge) as info:
        decode_image(data, DecodeLimits(max_gif_blocks=1000))
    assert info.value.message == "GIF has more than 1000 data blocks; the limit is 1000"


@pytest.mark.parametrize("kept", range(10))
def test_gif_second_frame_with_its_header_cut_off_is_a_still_image(kept: int) -> None:
    # "," then `kept` of the 9 descriptor bytes and the LZW code size: PIL failed with struct.error.
    descriptor = b"\0\0\0\0\x08\0\x08\0\0\x08"
    data = gif_with_second_frame(3, b"," + descriptor[:kept])

    decoded = decode_image(data, LIMITS)

    assert decoded.size == (128, 128)
    assert mean_difference(decoded, digit_image(3)) < 4


def test_gif_second_frame_with_a_whole_header_is_a_second_frame() -> None:
    data = gif_with_second_frame(3, b",\0\0\0\0\x08\0\x08\0\0\x08")

    with pytest.raises(InvalidInput, match=r"^animated or multi-frame images are not accepted \(2 or more frames\)$"):
        decode_image(data, LIMITS)


@pytest.mark.usefixtures("no_pixel_decoding")
def test_gif_with_200k_frames_is_refused_at_the_second() -> None:
    started = time.monotonic()
    with pytest.raises(InvalidInput, match="animated or multi-frame"):
        decode_image(gif_frames(200_000), LIMITS)
    assert time.monotonic() - started < 0.5


def test_gif_stray_bytes_between_blocks_are_skipped() -> None:
    assert decode_image(gif_with_stray_bytes(5, 100_000), LIMITS).size == (128, 128)


# ------------------------------------------------------------------------------------ decode budget: TIFF
@pytest.mark.usefixtures("no_pixel_decoding")
def test_tiff_ifd_chain_is_refused_from_its_first_ifd() -> None:
    chain = tiff_ifd_chain(40_000)  # PIL took 10.5 s to count these pages

    started = time.monotonic()
    with pytest.raises(InvalidInput, match=r"^animated or multi-frame images are not accepted \(2 or more frames\)$"):
        decode_image(chain, LIMITS)
    assert time.monotonic() - started < 0.5


def test_tiff_ifd_pointing_at_itself_is_one_page() -> None:
    assert mean_difference(decode_image(tiff_self_loop(4), LIMITS), digit_image(4)) < 1


def test_tiff_two_ifds_pointing_at_each_other_are_two_pages() -> None:
    with pytest.raises(InvalidInput, match="animated or multi-frame"):
        decode_image(tiff_two_page_loop(4), LIMITS)


def test_tiff_orientation_is_applied_once() -> None:
    assert mean_difference(decode_image(tiff_with_orientation(7), LIMITS), digit_image(7)) < 1


def test_tiff_strip_limit_is_inclusive() -> None:
    data = tiff_strip_per_row(3)  # 128 strips

    assert decode_image(data, DecodeLimits(max_tiff_strips=128)).size == (128, 128)
    with pytest.raises(PayloadTooLarge, match=r"^TIFF has 128 strips; the limit is 127$"):
        decode_image(data, DecodeLimits(max_tiff_strips=127))


@pytest.mark.parametrize("compression", [1, 8], ids=["raw", "deflate"])
def test_tiff_tile_limit_is_inclusive(compression: int) -> None:
    data = tiff_tiled_digit(8, 16, compression)  # 64 tiles

    assert mean_difference(decode_image(data, DecodeLimits(max_tiff_strips=64)), digit_image(8)) < 1
    with pytest.raises(PayloadTooLarge, match=r"^TIFF has 64 tiles; the limit is 63$"):
        decode_image(data, DecodeLimits(max_tiff_strips=63))


@pytest.mark.usefixtures("no_pixel_decoding")
def test_million_strip_tiff_is_refused_before_pil_parses_it() -> None:
    with pytest.raises(PayloadTooLarge, match=r"^TIFF has 1000000 strips; the limit is 16384$"):
        decode_image(tiff_million_strips(), LIMITS)


def test_tiles_may_overhang_a_small_image_up_to_two_megapixels() -> None:
    # 16x16 image: tiles may cover 2 x max(256, 2**20) pixels; a 1024x2048 tile is exactly that.
    fits = tiff_tiled((16, 16), (1024, 2048), 1, deflated_zeros(1024 * 2048))
    assert decode_image(fits, LIMITS).size == (16, 16)

    with pytest.raises(PayloadTooLarge) as info:
        decode_image(tiff_tiled((16, 16), (1040, 2048), 1, deflated_zeros(1040 * 2048)), LIMITS)
    assert info.value.message == (
        "TIFF tiles of 1040x2048 cover 2129920 pixels for a 16x16 image (more than 2 times the image)"
    )


@pytest.mark.usefixtures("no_pixel_decoding")
def test_a_tile_of_16384x16384_on_a_64x64_image_is_refused_before_decoding() -> None:
    with pytest.raises(PayloadTooLarge, match=r"^TIFF tiles of 16384x16384 cover 268435456 pixels"):
        decode_image(tiff_tiled((64, 64), (16384, 16384), 1, b"\0" * 16), LIMITS)


@pytest.mark.parametrize("compression", [2, 3, 4, 6, 7, 32809, 34676, 34925, 50000, 50001])
def test_tiff_compressions_outside_the_safe_set_are_unsupported(compression: int) -> None:
    data = tiff_by_hand([*gray_tags(4, 4, compression), (273, 4, [8]), (278, 3, [4]), (279, 4, [16])], b"\0" * 16)

    with pytest.raises(UnsupportedMediaType) as info:
        decode_image(data, LIMITS)

    assert info.value.message == (
        f"TIFF compression {compression} is not accepted (accepted: none, LZW, Deflate, PackBits)"
    )


@pytest.mark.parametrize("compression", ["raw", "tiff_lzw", "tiff_adobe_deflate", "tiff_deflate", "packbits"])
def test_tiff_compressions_in_the_safe_set_decode(compression: str) -> None:
    data = encode(digit_image(5).convert("L"), "TIFF", compression=compression)

    assert mean_difference(decode_image(data, LIMITS), digit_image(5)) < 1


def test_bigtiff_is_unsupported() -> None:
    with pytest.raises(UnsupportedMediaType, match=r"^BigTIFF is not accepted"):
        decode_image(bigtiff_header(), LIMITS)


# ------------------------------------------------------------------------------------ decode budget: PNM, BMP, WEBP
@pytest.mark.parametrize("magic", [b"P1", b"P2", b"P3"])
def test_plain_pnm_is_unsupported(magic: bytes) -> None:
    with pytest.raises(UnsupportedMediaType) as info:
        decode_image(magic + b"\n2 2\n1\n0 1 1 0\n", LIMITS)

    assert info.value.message == (
        "plain (ASCII) PNM is not accepted: send binary PBM/PGM/PPM (P4, P5, P6) or PFM (Pf), or another format"
    )


@pytest.mark.parametrize("magic", [b"P0CMYK", b"PyP", b"PyRGBA", b"PyCMYK"])
def test_pil_test_only_pnm_variants_are_unsupported(magic: bytes) -> None:
    with pytest.raises(UnsupportedMediaType, match=r"^this PNM variant is not accepted"):
        decode_image(magic + b"\n2 2\n" + b"\0" * 16, LIMITS)


@pytest.mark.parametrize("fmt_mode", ["1", "L", "RGB", "F"])
def test_binary_pnm_decodes(fmt_mode: str) -> None:
    data = encode(digit_image(5).convert(fmt_mode), "PPM")

    assert decode_image(data, LIMITS).size == (128, 128)


def test_pnm_header_limit() -> None:
    pixels = b"\x80" * 16
    assert decode_image(b"P5\n# a short comment\n4 4\n255\n" + pixels, LIMITS).size == (4, 4)

    with pytest.raises(PayloadTooLarge, match=r"^PNM header is longer than 4096 bytes \(the limit\)$"):
        decode_image(b"P5\n#" + b"x" * 5000 + b"\n4 4\n255\n" + pixels, LIMITS)
    with pytest.raises(PayloadTooLarge, match="PNM header"):
        decode_image(b"P5\n4" + b" " * 5000 + b"4\n255\n" + pixels, LIMITS)


@pytest.mark.parametrize(("compression", "name"), [(1, "RLE8"), (2, "RLE4")])
def test_rle_bmp_is_unsupported(compression: int, name: str) -> None:
    data = bytearray(bmp_rle8(2))
    data[30:34] = struct.pack("<I", compression)

    with pytest.raises(UnsupportedMediaType, match=rf"^BMP with {name} compression is not accepted$"):
        decode_image(bytes(data), LIMITS)


@pytest.mark.usefixtures("no_pixel_decoding")
def test_webp_claiming_25_megapixels_is_refused_before_decoding() -> None:
    with pytest.raises(PayloadTooLarge) as info:
        decode_image(webp_claiming_size(5000, 5000), LIMITS)

    assert info.value.message == "WEBP image is 5000x5000 = 25000000 pixels; the limit is 16000000"


def test_webp_pixel_limit_is_inclusive_and_never_above_max_pixels() -> None:
    data = encode(digit_image(2).resize((16, 16)), "WEBP", lossless=True)

    assert decode_image(data, DecodeLimits(max_webp_pixels=256)).size == (16, 16)
    with pytest.raises(PayloadTooLarge, match=r"^WEBP image is 16x16 = 256 pixels; the limit is 255$"):
        decode_image(data, DecodeLimits(max_webp_pixels=255))
    with pytest.raises(PayloadTooLarge, match=r"^image is 16x16 = 256 pixels; the limit is 255$"):
        decode_image(data, DecodeLimits(max_pixels=255, max_webp_pixels=1000))


# ------------------------------------------------------------------------------------ decode budget: the clock
class SteppingClock:
    """A monotonic clock that moves ``step`` seconds every time it is read (after ``start`` reads)."""

    def __init__(self, step: float, start: int = 0) -> None:
        self.now, self.step, self.reads_before_moving = 0.0, step, start

    def __call__(self) -> float:
        if self.reads_before_moving > 0:
            self.reads_before_moving -= 1
        else:
            self.now += self.step
        return self.now


def many_chunk_png() -> bytes:
    return png_idat_split(encode(noisy_rgb()), 64)  # about 150 chunks: as many reads


def test_decode_that_outlives_the_clock_fails_with_413(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image_io, "decode_clock", SteppingClock(step=0.1))

    with pytest.raises(PayloadTooLarge) as info:
        decode_image(many_chunk_png(), DecodeLimits(max_decode_seconds=1))

    assert info.value.message == "image takes too long to decode: more than 1 s; the limit is 1 s"


def test_decode_within_the_clock_is_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = SteppingClock(step=0.001)
    monkeypatch.setattr(image_io, "decode_clock", clock)

    assert decode_image(many_chunk_png(), DecodeLimits(max_decode_seconds=1)).size == (64, 48)
    assert clock.now > 0.1  # the clock was read on every one of the reads


def test_a_decoder_that_swallows_the_clock_error_still_gets_413(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = SteppingClock(step=0.0)
    monkeypatch.setattr(image_io, "decode_clock", clock)

    def swallowing_load(self: ImageFile.ImageFile) -> None:
        clock.now += 10  # the decode is slow ...
        with contextlib.suppress(Exception):  # ... and this decoder hides the clock's error
            self.fp.read(1)
        raise OSError("decoder error -2")

    monkeypatch.setattr(ImageFile.ImageFile, "load", swallowing_load)

    with pytest.raises(PayloadTooLarge, match=r"^image takes too long to decode"):
        decode_image(encode(noisy_rgb()), DecodeLimits(max_decode_seconds=1))


# ------------------------------------------------------------------------------------ decoder and conversion failures
@pytest.mark.parametrize(
    "error",
    [
        struct.error("unpack requires a buffer"),
        TypeError("bad operand"),
        KeyError(7),
        IndexError("index"),
        ZeroDivisionError("division by zero"),
        SyntaxError("not a TIFF"),
        EOFError(),
        ValueError("bad"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_any_decoder_failure_is_a_400(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    def failing_load(self: ImageFile.ImageFile) -> None:
        raise error

    monkeypatch.setattr(ImageFile.ImageFile, "load", failing_load)

    with pytest.raises(InvalidInput, match=r"^image data is corrupt or truncated: "):
        decode_image(encode(noisy_rgb()), LIMITS)


def test_memory_error_while_decoding_is_a_413(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_load(self: ImageFile.ImageFile) -> None:
        raise MemoryError

    monkeypatch.setattr(ImageFile.ImageFile, "load", failing_load)

    with pytest.raises(PayloadTooLarge, match=r"^image needs more memory to decode than the worker can give it$"):
        decode_image(encode(noisy_rgb()), LIMITS)


class FunctionTransform:
    """A function as the handler's transform, with the decode size an ``ImagePreprocessor`` carries."""

    min_decode_side = None

    def __init__(self, function) -> None:
        self.function = function

    def __call__(self, image: Image.Image):
        return self.function(image)


def classifier_with(transform) -> ImageClassifier:
    """The handler with just what ``preprocess`` uses (no model)."""
    handler = ImageClassifier()
    handler.labels, handler.topk, handler.limits = [str(d) for d in range(10)], 3, LIMITS
    handler.transform = FunctionTransform(transform)
    return handler


@pytest.mark.parametrize("error", [ValueError("conversion from La to L not supported"), TypeError("x"), OSError("y")])
def test_conversion_failure_in_preprocess_is_a_400(png: bytes, error: Exception) -> None:
    def failing(image: Image.Image) -> None:
        raise error

    with pytest.raises(InvalidInput) as info:
        classifier_with(failing).preprocess_image(png)

    assert info.value.message == f"image cannot be converted for the model (RGB, 64x48): {error}"


def test_memory_error_in_preprocess_is_a_413(png: bytes) -> None:
    def failing(image: Image.Image) -> None:
        raise MemoryError

    with pytest.raises(PayloadTooLarge, match=r"^image needs more memory to convert than the worker can give it$"):
        classifier_with(failing).preprocess_image(png)


def test_handler_errors_from_the_transform_pass_through(png: bytes) -> None:
    def blank(image: Image.Image) -> None:
        raise InvalidInput("image has no visible content (it is blank or nearly uniform)")

    with pytest.raises(InvalidInput, match="no visible content"):
        classifier_with(blank).preprocess_image(png)


# ------------------------------------------------------------------------------------ odd but valid modes
def mean_difference(image: Image.Image, reference: Image.Image) -> float:
    """Mean absolute gray-level difference, both put on white paper first."""
    ours = np.asarray(to_model_mode(image, "L"), dtype=np.float32)
    theirs = np.asarray(to_model_mode(reference, "L"), dtype=np.float32)
    assert ours.shape == theirs.shape
    return float(np.abs(ours - theirs).mean())


@pytest.mark.parametrize(
    ("payload", "mode"),
    [
        pytest.param(tiff_gray_alpha(4, associated=False), "LA", id="tiff-gray-alpha"),
        pytest.param(tiff_gray_alpha(4, associated=True), "La", id="tiff-gray-premultiplied-alpha"),
        pytest.param(tiff_16bit(4), "I;16", id="tiff-16bit"),
        pytest.param(tiff_float(4), "F", id="tiff-float-0-to-1"),
        pytest.param(pfm_float(4), "F", id="pfm-float-0-to-1"),
        pytest.param(pgm_16bit(4), "I", id="pgm-16bit"),
        pytest.param(png_16bit_rgba(4), "RGBA", id="png-16bit-rgba"),
        pytest.param(png_16bit_gray_alpha(4), "RGBA", id="png-16bit-gray-alpha"),  # PIL widens it to RGBA
    ],
)
def test_unusual_modes_decode_and_convert_to_the_digit(payload: bytes, mode: str) -> None:
    decoded = decode_image(payload, LIMITS)

    assert decoded.mode == mode
    assert mean_difference(decoded, digit_image(4)) < 1.5


def test_the_images_of_one_request_share_one_decode_budget(png: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """32 slow images must not hold a worker 32 times the limit: the budget is per request, not per image."""
    from handlers import image_classifier
    from handlers.protocols import Call

    handler = classifier_with(lambda image: image)
    handler.limits = DecodeLimits(max_decode_seconds=0.3)
    budgets: list[float | None] = []
    clock = [100.0]  # a fake clock: each image "takes" 0.12 s, whatever the machine's load
    monkeypatch.setattr(image_classifier.image_io, "decode_clock", lambda: clock[0])

    def slow(payload: bytes, seconds: float | None = None) -> tuple[str, float]:
        budgets.append(seconds)
        clock[0] += 0.12
        return "tensor", 0.01

    monkeypatch.setattr(handler, "preprocess_image", slow)
    with pytest.raises(PayloadTooLarge, match=r"take more than 0.3 s to decode .*send fewer images"):
        handler.prepare(Call("oip_v2", [png] * 5, []))
    assert len(budgets) == 3  # the 4th image found the budget spent
    assert budgets[0] is None  # the first image has the whole limit
    assert budgets[1:] == [pytest.approx(0.18), pytest.approx(0.06)]  # later images only what is left
    budgets.clear()
    assert len(handler.prepare(Call("oip_v2", [png] * 2, []))) == 2  # within the budget: every image prepared
