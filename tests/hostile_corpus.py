"""Hostile and broken request payloads for the digits model, generated in memory (no files).

``corpus()`` returns ``Case`` objects: a name, the bytes a client sends, and the outcome the
served digits model must give: an exact status (200, 400, 413 or 415), and for a 4xx the error
``type`` and a phrase the ``error`` text contains; for a 200, the digit it must read.

A case is sent through every *form* that applies to it (see ``FORMS``):

* ``raw``: the bytes are the request body (with ``content_type`` if set, else no Content-Type);
* ``multipart``: the bytes are the file field ``data`` of a multipart form;
* ``json``: the bytes go base64-encoded into ``{"data": ...}`` with Content-Type application/json.

Every case that is an image file (both ``raw`` and ``multipart`` apply: ``Case.oip_applies``) is
also sent in a fourth form, ``oip`` (``OIP_FORM``): the bytes as the one element of a binary Open
Inference Protocol BYTES tensor (``tests.hostile_corpus_oip.oip_image_body``) posted to
``/v2/models/NAME/infer``. It expects the same answer as the raw form: the handler's error bodies
are the same JSON on every protocol (an OIP 200 holds the digit in its ``labels`` tensor). It is not
in ``FORMS``, so the suites that model a request in process (``handler_request``) do not see it.

A JSON-only case (malformed JSON, a JSON array, ...) is raw only: wrapping it in another form
would test a different thing (base64 of some JSON text is just a non-image). ``skip`` says, for
each form that does not apply, why.

Expected outcomes come from the contract in docs/protocols.md ("Images and bad input on
``/predictions``": 400 corrupt / 413 too large / 415 not an image) and, where a file is odd but
valid (CMYK, EXIF-rotated, 16-bit, palette, RGBA), 200 with the right digit. Everything is
deterministic: the "random" payloads use fixed seeds.

Sizes are bounded: decompression bombs are small files whose headers lie (CRCs fixed so PIL reads
them); the only large bodies are the three byte-limit cases (about 6 to 7 MB each).
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import random
import struct
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

SAMPLES = Path(__file__).resolve().parent.parent / "samples"

RAW, MULTIPART, JSON_FORM = "raw", "multipart", "json"
FORMS = (RAW, MULTIPART, JSON_FORM)
OIP_FORM = "oip"  # see the module docstring; only for cases where ``Case.oip_applies``

# From models.yaml (limits.max_bytes, limits.max_pixels) and config.properties (max_request_size).
HANDLER_MAX_BYTES = 6_000_000
HANDLER_MAX_PIXELS = 25_000_000
FRONTEND_MAX_REQUEST_SIZE = 6_553_600

BAD_REQUEST, TOO_LARGE, UNSUPPORTED = 400, 413, 415
FORM = "application/x-www-form-urlencoded"
ERROR_TYPES = {BAD_REQUEST: "InvalidInput", TOO_LARGE: "PayloadTooLarge", UNSUPPORTED: "UnsupportedMediaType"}

# Reasons a form does not apply, used in ``Case.skip``.
JSON_TEXT_ONLY = "JSON-only case: only meaningful as a raw application/json body"
RAW_ONLY = "about the raw body and its Content-Type header"
MULTIPART_ONLY = "about the multipart form itself"
BASE64_OVER_FRONTEND = (
    "base64 of more than 6,000,000 bytes is more than 8,000,000: the frontend refuses it first (see frontend_* cases)"
)
FRONTEND_ONLY = "the frontend refuses the body before any form is parsed; raw and multipart show it"


@dataclass(frozen=True)
class Expect:
    """What the server must answer.

    ``status``: the exact HTTP status. ``source``: ``handler`` (a JSON body from our handler) or
    ``frontend`` (TorchServe's Java frontend answers before the handler runs). For a handler 4xx,
    ``error_type`` is the JSON ``type`` and ``message`` a phrase the ``error`` text contains
    (case-insensitive). For a 200, ``digit`` is the top label. For a frontend answer,
    ``frontend_error`` is the ``type`` of TorchServe's own JSON error body
    (``{"code": ..., "type": ..., "message": ...}``), or "" when the body is empty.
    """

    status: int
    message: str = ""
    digit: int | None = None
    source: str = "handler"
    frontend_error: str = ""  # frontend answers: TorchServe's JSON error ``type``, "" for an empty body

    @property
    def error_type(self) -> str | None:
        return ERROR_TYPES.get(self.status) if self.source == "handler" else None


def ok(digit: int) -> Expect:
    return Expect(200, digit=digit)


def bad(message: str) -> Expect:
    return Expect(BAD_REQUEST, message)


def too_large(message: str) -> Expect:
    return Expect(TOO_LARGE, message)


def unsupported(message: str) -> Expect:
    return Expect(UNSUPPORTED, message)


@dataclass(frozen=True)
class Case:
    """One hostile (or odd but valid) payload and the answer it must get."""

    name: str
    payload: bytes
    expect: Expect
    content_type: str | None = None  # raw form only
    skip: Mapping[str, str] = field(default_factory=dict)  # form -> why it does not apply
    options: Mapping[str, Any] = field(default_factory=dict)  # extra fields: multipart and JSON forms
    query: str = ""  # query string, raw form only
    multipart_field: str = "data"
    document: Any = None  # the JSON document, for JSON-only cases (payload is its text)

    @property
    def forms(self) -> tuple[str, ...]:
        return tuple(form for form in FORMS if form not in self.skip)

    @property
    def oip_applies(self) -> bool:
        """Whether the payload is an image file (raw and multipart both apply), so the OIP form applies too.

        Cases about the request itself (JSON text, Content-Type, the multipart form) do not.
        """
        return RAW in self.forms and MULTIPART in self.forms

    @property
    def reaches_handler(self) -> bool:
        return self.expect.source == "handler"

    @property
    def modelled_in_process(self) -> bool:
        """Whether ``handler_request`` can say what the worker receives (no frontend form parsing)."""
        parsed_by_frontend = (self.content_type or "").startswith(FRONTEND_PARSED_TYPES)
        return self.reaches_handler and not parsed_by_frontend


# Bodies of these types are parsed into fields by TorchServe's frontend (Netty's form decoder).
FRONTEND_PARSED_TYPES = ("application/x-www-form-urlencoded", "multipart/")


# ------------------------------------------------------------------------------------ valid images
@cache
def digit_image(digit: int) -> Image.Image:
    """The shipped sample of ``digit`` (128x128 RGB, dark ink on light paper)."""
    with Image.open(SAMPLES / f"digit_{digit}.png") as image:
        return image.convert("RGB")


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


@cache
def digit_png(digit: int) -> bytes:
    return (SAMPLES / f"digit_{digit}.png").read_bytes()


@cache
def digit_jpeg(digit: int, quality: int = 90) -> bytes:
    return encode(digit_image(digit), "JPEG", quality=quality)


def ink_mask(digit: int) -> np.ndarray:
    """Ink darkness 0..255 (255 = black ink) of a sample, for building other encodings."""
    return 255 - np.asarray(digit_image(digit).convert("L"), dtype=np.uint8)


def rgba_transparent_png(digit: int) -> bytes:
    """Black ink whose alpha is the ink; the paper is fully transparent (RGB under it is black)."""
    alpha = ink_mask(digit)
    rgba = np.zeros((*alpha.shape, 4), np.uint8)
    rgba[..., 3] = alpha
    return encode(Image.fromarray(rgba, "RGBA"), "PNG")


def palette_png(digit: int, transparency: bool = False) -> bytes:
    image = digit_image(digit).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    if transparency:
        # Make the palette entry of the paper (the most common one) transparent.
        paper = max(image.getcolors(), key=lambda c: c[0])[1]
        return encode(image, "PNG", transparency=paper)
    return encode(image, "PNG")


def gray16_png(digit: int) -> bytes:
    gray = np.asarray(digit_image(digit).convert("L"), dtype=np.uint16) * 257
    return encode(Image.fromarray(gray), "PNG")


def cmyk_jpeg(digit: int) -> bytes:
    return encode(digit_image(digit).convert("CMYK"), "JPEG", quality=92)


def exif_rotated_jpeg(digit: int) -> bytes:
    """Pixels stored turned 90 degrees, with EXIF orientation 6 ("rotate 90 CW to display")."""
    stored = digit_image(digit).transpose(Image.Transpose.ROTATE_90)  # counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, "JPEG", quality=92, exif=exif.tobytes())


def big_canvas_png(digit: int, size: tuple[int, int]) -> bytes:
    """The digit drawn big on a white page of ``size`` pixels, as a small 1-bit PNG."""
    width, height = size
    side = min(width, height) // 2
    ink = Image.fromarray(ink_mask(digit) > 96).resize((side, side), Image.Resampling.NEAREST)
    page = Image.new("1", size, 1)
    page.paste(0, ((width - side) // 2, (height - side) // 2), ink)
    return encode(page, "PNG", optimize=True)


def animated(fmt: str, frames: int = 3) -> bytes:
    images = [digit_image(d) for d in range(frames)]
    params: dict[str, Any] = {"save_all": True, "append_images": images[1:]}
    if fmt in ("GIF", "PNG", "WEBP"):
        params["duration"] = 100
    return encode(images[0], fmt, **params)


def padded(data: bytes, total: int) -> bytes:
    """A valid image followed by zero bytes up to ``total`` (decoders ignore trailing data)."""
    return data + b"\0" * (total - len(data))


# ------------------------------------------------------------------------------------ PNG surgery
def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        chunks.append((kind, data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


def png_chunk(kind: bytes, body: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + body) if crc is None else crc
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc & 0xFFFFFFFF)


def png_build(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(png_chunk(kind, body) for kind, body in chunks)


def png_with_ihdr(data: bytes, **fields: int) -> bytes:
    """Rewrite IHDR fields (width, height, depth, color) with a valid CRC, so PIL trusts them."""
    chunks = png_chunks(data)
    width, height, depth, color, compression, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    values = {"width": width, "height": height, "depth": depth, "color": color} | fields
    ihdr = struct.pack(
        ">IIBBBBB", values["width"], values["height"], values["depth"], values["color"], compression, filt, interlace
    )
    return png_build([(b"IHDR", ihdr), *chunks[1:]])


def png_bad_ihdr_crc(data: bytes) -> bytes:
    chunks = png_chunks(data)
    ihdr = chunks[0][1]
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr, zlib.crc32(b"IHDR" + ihdr) ^ 0xFF) + data[33:]


def png_corrupt_zlib(data: bytes) -> bytes:
    """IDAT whose zlib header is garbage (CRC recomputed: only the compressed stream is wrong)."""
    chunks = [(k, b"\xff\xff" + b[2:] if k == b"IDAT" else b) for k, b in png_chunks(data)]
    return png_build(chunks)


def png_idat_length_lie(data: bytes) -> bytes:
    """The IDAT chunk claims to be 2 GB long."""
    pos = data.index(b"IDAT") - 4
    return data[:pos] + struct.pack(">I", 0x7FFFFFF0) + data[pos + 4 :]


def png_without_idat(data: bytes) -> bytes:
    return png_build([(k, b) for k, b in png_chunks(data) if k != b"IDAT"])


def small_png(mode: str = "L", size: tuple[int, int] = (4, 4), value: int = 255) -> bytes:
    return encode(Image.new(mode, size, value), "PNG")


# ------------------------------------------------------------------------------------ JPEG surgery
def jpeg_segment_offset(data: bytes, markers: tuple[int, ...]) -> int:
    """Offset of the first segment with one of ``markers`` (before the scan data)."""
    pos = 2
    while pos < len(data):
        assert data[pos] == 0xFF, f"not a marker at {pos}"
        marker = data[pos + 1]
        if marker in markers:
            return pos
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        pos += 2 + length
    raise ValueError(f"no marker {markers} in JPEG")


SOF_MARKERS = (0xC0, 0xC1, 0xC2)


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the frame header's dimensions (JPEG has no checksum: the header is simply trusted)."""
    pos = jpeg_segment_offset(data, SOF_MARKERS)
    return data[: pos + 5] + struct.pack(">HH", height, width) + data[pos + 9 :]


def jpeg_bad_huffman(data: bytes) -> bytes:
    """A Huffman table whose code counts add up to more codes than fit (libjpeg: bogus table)."""
    pos = jpeg_segment_offset(data, (0xC4,))
    counts = bytes([0xFF] * 16)
    return data[: pos + 5] + counts + data[pos + 21 :]


def jpeg_scan_offset(data: bytes) -> int:
    pos = jpeg_segment_offset(data, (0xDA,))
    (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
    return pos + 2 + length


# ------------------------------------------------------------------------------------ other formats
def gif_with_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the GIF logical screen and the first image descriptor to claim ``width`` x ``height``."""
    size = struct.pack("<HH", width, height)
    out = bytearray(data[:6] + size + data[10:])
    descriptor = out.index(b"\x2c", 13)  # image separator of the first frame (no colour table here)
    out[descriptor + 5 : descriptor + 9] = size
    return bytes(out)


def bmp_with_size(data: bytes, width: int, height: int) -> bytes:
    return data[:18] + struct.pack("<ii", width, height) + data[26:]


def ico(digit: int) -> bytes:
    return encode(digit_image(digit).resize((32, 32)), "ICO")


def zip_of(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, data)
    return buffer.getvalue()


def seeded_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def non_utf8_bytes(size: int = 256, seed: int = 7) -> bytes:
    """Bytes that are neither UTF-8 nor an image: continuation bytes and 0xC0/0xFF everywhere."""
    rng = random.Random(seed)
    return bytes(rng.choice((0x80, 0xBF, 0xC0, 0xC1, 0xF8, 0xFE, 0xFF)) for _ in range(size))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def json_case(name: str, document: Any, expect: Expect, content_type: str = "application/json") -> Case:
    text = json.dumps(document).encode()
    return Case(
        name,
        text,
        expect,
        content_type=content_type,
        document=document,
        skip={MULTIPART: JSON_TEXT_ONLY, JSON_FORM: JSON_TEXT_ONLY},
    )


def raw_json_text(name: str, text: bytes, expect: Expect, content_type: str = "application/json") -> Case:
    return Case(
        name, text, expect, content_type=content_type, skip={MULTIPART: JSON_TEXT_ONLY, JSON_FORM: JSON_TEXT_ONLY}
    )


def raw_only(name: str, payload: bytes, expect: Expect, content_type: str | None = None, query: str = "") -> Case:
    return Case(
        name, payload, expect, content_type=content_type, query=query, skip={MULTIPART: RAW_ONLY, JSON_FORM: RAW_ONLY}
    )


def multipart_only(name: str, payload: bytes, expect: Expect, field_name: str = "data", **options: Any) -> Case:
    return Case(
        name,
        payload,
        expect,
        options=options,
        multipart_field=field_name,
        skip={RAW: MULTIPART_ONLY, JSON_FORM: MULTIPART_ONLY},
    )


def frontend(status: int, error: str = "") -> Expect:
    return Expect(status, source="frontend", frontend_error=error)


# ------------------------------------------------------------------------------------ the corpus
CORRUPT = "corrupt or truncated"
NOT_AN_IMAGE = "not an image"
BLANK = "no visible content"
BOMB = "decompression bomb"
OVER_PIXELS = "pixels; the limit is 25000000"
OVER_BYTES = "bytes; the limit is 6000000"
ANIMATED = "animated or multi-frame"


def _cases() -> list[Case]:
    png, jpeg = digit_png(3), digit_jpeg(5)
    tiny_png = small_png()
    tiny_jpeg = encode(Image.new("L", (16, 16), 255), "JPEG")
    tiny_gif = encode(Image.new("L", (4, 4), 255), "GIF")
    tiny_bmp = encode(Image.new("L", (4, 4), 255), "BMP")
    scan = jpeg_scan_offset(jpeg)
    return [
        # --- nothing, or not an image at all --------------------------------------------------------
        Case("empty", b"", bad("empty")),
        Case("whitespace_only", b" \r\n\t  \n", unsupported(NOT_AN_IMAGE)),
        Case("text_file", b"Dear model,\nplease classify this letter.\nRegards\n" * 3, unsupported(NOT_AN_IMAGE)),
        raw_only("text_as_text_plain", b"just some words", unsupported("text"), content_type="text/plain"),
        raw_only("text_labelled_image_png", b"this is not a PNG at all", unsupported(NOT_AN_IMAGE), "image/png"),
        Case(
            "html_page",
            b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>",
            unsupported(NOT_AN_IMAGE),
        ),
        Case(
            "pdf",
            b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n%%EOF\n",
            unsupported("PDF"),
        ),
        Case("zip_with_png_inside", zip_of("digit.png", png), unsupported("ZIP")),
        Case("gzip_of_png", gzip.compress(png, mtime=0), unsupported(NOT_AN_IMAGE)),
        Case(
            "svg_with_xml_prolog",
            b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="8" height="8">'
            b'<rect width="8" height="8"/></svg>',
            unsupported("XML"),
        ),
        Case("svg_bare", b'<svg xmlns="http://www.w3.org/2000/svg"><text y="20">7</text></svg>', unsupported("SVG")),
        Case(
            "eps_postscript", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n", unsupported(NOT_AN_IMAGE)
        ),
        Case("elf_executable", b"\x7fELF\x02\x01\x01" + b"\0" * 57, unsupported("executable")),
        Case("ico_icon", ico(4), unsupported(NOT_AN_IMAGE)),
        Case("random_bytes", seeded_bytes(4096, seed=1), unsupported(NOT_AN_IMAGE)),
        Case("non_utf8_bytes", non_utf8_bytes(), unsupported(NOT_AN_IMAGE)),
        raw_only("non_utf8_bytes_as_json", non_utf8_bytes(), unsupported(NOT_AN_IMAGE), "application/json"),
        # --- JSON documents (raw application/json bodies) ---------------------------------------------
        raw_json_text("json_malformed", b'{"data": ', bad("malformed JSON")),
        raw_json_text("json_trailing_garbage", b'{"data": "AAAA"} and more', bad("malformed JSON")),
        raw_json_text("json_non_utf8", b'{"data": "\xff\xfe\xfd"}', bad("not valid UTF-8")),
        raw_json_text("json_nested_100k_deep", b"[" * 100_000 + b"]" * 100_000, bad("nested")),
        raw_json_text(
            "json_integer_5000_digits", b'{"data": "AAAA", "topk": 1' + b"0" * 5000 + b"}", bad("malformed JSON")
        ),
        json_case("json_invalid_base64", {"data": "!!not base64!!"}, bad("not valid base64")),
        json_case("json_base64_bad_padding", {"data": b64(png)[:-3]}, bad("not valid base64")),
        json_case("json_base64_of_text", {"data": b64(b"hello, world: no image here")}, unsupported(NOT_AN_IMAGE)),
        json_case("json_base64_of_truncated_png", {"data": b64(png[: len(png) // 2])}, bad(CORRUPT)),
        json_case("json_wrong_field_name", {"image_data": b64(png)}, bad("no image")),
        json_case("json_field_name_case", {"Data": b64(png), "topk": 1}, bad("no image")),
        # One non-ASCII character quoted in the error (the reason phrase) used to kill the worker.
        json_case("json_non_ascii_field_name", {"\u00e9": 1}, bad("no image")),
        json_case("json_unicode_field_names", {"d\u00e4t\u00e4": b64(png), "\u2603\U0001f600": 1}, bad("no image")),
        json_case("json_5000_fields", {f"field{i:04d}": i for i in range(5000)}, bad("no image")),
        # A 2.8 MB topk of emoji, quoted in full, used to make a reply over max_response_size.
        raw_json_text(
            "json_topk_700k_emoji",
            json.dumps({"data": b64(png), "topk": "\U0001f600" * 700_000}, ensure_ascii=False).encode(),
            bad("topk"),
        ),
        json_case("json_array", [b64(png)], bad("must be an object")),
        json_case("json_number", 1_000_000, bad("got int")),
        raw_json_text("json_huge_exponent", b"1e400", bad("got float")),
        json_case("json_true", True, bad("got bool")),
        json_case("json_null", None, bad("no image")),
        json_case("json_string", b64(png), unsupported("text")),
        json_case("json_data_is_number", {"data": 12345}, bad("must be a base64 string")),
        json_case("json_data_is_object", {"data": {"data": b64(png)}}, bad("must be a base64 string")),
        json_case("json_data_is_list", {"data": [1, 2, 3]}, bad("must be a base64 string")),
        json_case("json_data_is_null", {"data": None}, bad("must be a base64 string")),
        json_case("json_data_is_empty", {"data": ""}, bad("empty")),
        json_case("json_topk_zero", {"data": b64(png), "topk": 0}, bad("topk")),
        json_case("json_topk_huge", {"data": b64(png), "topk": 10**30}, bad("topk")),
        json_case("json_topk_text", {"data": b64(png), "topk": "all of them"}, bad("topk")),
        json_case("json_topk_float", {"data": b64(png), "topk": 2.5}, bad("topk")),
        json_case("json_data_url", {"data": "data:image/png;base64," + b64(digit_png(6))}, ok(6)),
        json_case("json_base64_wrapped_lines", {"data": base64.encodebytes(digit_png(8)).decode()}, ok(8)),
        json_case("json_as_text_plain", {"data": b64(digit_png(1))}, ok(1), content_type="text/plain"),
        raw_json_text("json_without_content_type", json.dumps({"data": b64(digit_png(2))}).encode(), ok(2), None),
        # --- the multipart form itself ----------------------------------------------------------------
        multipart_only("multipart_wrong_field_name", png, bad("no image"), field_name="picture"),
        multipart_only("multipart_topk_not_a_number", png, bad("topk"), topk="three"),
        # 3 MB of backslashes: quoted in full (repr, then JSON) they made a 12 MB reply.
        multipart_only("multipart_topk_3mb_of_backslashes", png, bad("topk"), topk="\\" * 3_000_000),
        # --- Content-Type and query-string trickery ---------------------------------------------------
        raw_only("png_labelled_text_plain", digit_png(4), ok(4), "text/plain"),
        raw_only("png_labelled_json", digit_png(9), ok(9), "application/json"),
        # TorchServe 0.12 does not pass query parameters to the handler: the default topk applies.
        raw_only("png_with_topk_query_not_a_number", png, ok(3), query="topk=lots"),
        # curl --data-binary sends Content-Type application/x-www-form-urlencoded: the frontend then
        # parses the body as a form (percent-decoding it) before any handler sees it.
        raw_only("png_as_form_urlencoded", png, frontend(500, "ErrorDataDecoderException"), FORM),
        raw_only("form_urlencoded_bad_percent", b"data=%zz", frontend(500, "ErrorDataDecoderException"), FORM),
        raw_only("form_urlencoded_fields", b"topk=2&picture=abc", bad("no image"), FORM),
        raw_only("multipart_type_without_boundary", digit_png(6), ok(6), "multipart/form-data"),
        raw_only(
            "multipart_garbage_body", b"--xyz\r\ngarbage\r\n", bad("no image"), "multipart/form-data; boundary=xyz"
        ),
        # --- PNG: truncated and corrupted ----------------------------------------------------------------
        Case("png_signature_only", png[:8], bad(CORRUPT)),
        Case("png_truncated_in_ihdr", png[:20], bad(CORRUPT)),
        Case("png_without_idat", png_without_idat(png), bad(CORRUPT)),
        Case("png_truncated_half", png[: len(png) // 2], bad(CORRUPT)),
        Case("png_truncated_before_iend", png[:-12], ok(3)),
        Case("png_bad_signature", b"\x89PNX" + png[4:], unsupported(NOT_AN_IMAGE)),
        Case("png_bad_ihdr_crc", png_bad_ihdr_crc(png), bad(CORRUPT)),
        Case("png_corrupt_zlib_stream", png_corrupt_zlib(png), bad(CORRUPT)),
        # The chunk length lies but the data is complete: PIL reads what is there (tolerated).
        Case("png_idat_length_lie", png_idat_length_lie(png), ok(3)),
        Case("png_unknown_color_type", png_with_ihdr(tiny_png, color=1), bad(CORRUPT)),
        Case("png_zero_width", png_with_ihdr(tiny_png, width=0), bad(CORRUPT)),
        # --- JPEG: truncated and corrupted ----------------------------------------------------------------
        Case("jpeg_soi_only", jpeg[:3], bad(CORRUPT)),
        Case("jpeg_truncated_in_headers", jpeg[: jpeg_segment_offset(jpeg, SOF_MARKERS) + 4], bad(CORRUPT)),
        Case("jpeg_truncated_at_scan_start", jpeg[: scan + 16], bad(CORRUPT)),
        Case("jpeg_truncated_half", jpeg[: len(jpeg) // 2], bad(CORRUPT)),
        Case("jpeg_missing_eoi", jpeg[:-2], bad(CORRUPT)),
        Case("jpeg_bad_huffman_table", jpeg_bad_huffman(jpeg), bad(CORRUPT)),
        Case("jpeg_zero_height", jpeg_with_size(jpeg, 128, 0), bad(CORRUPT)),
        # --- decompression bombs and pixel limits (tiny files, lying headers) --------------------------
        Case("png_bomb_100k_x_100k", png_with_ihdr(tiny_png, width=100_000, height=100_000), too_large(BOMB)),
        Case("png_header_6000_x_6000", png_with_ihdr(tiny_png, width=6000, height=6000), too_large(OVER_PIXELS)),
        Case("jpeg_bomb_65000_x_65000", jpeg_with_size(tiny_jpeg, 65000, 65000), too_large(BOMB)),
        Case("jpeg_header_6000_x_6000", jpeg_with_size(tiny_jpeg, 6000, 6000), too_large(OVER_PIXELS)),
        Case("gif_bomb_65535_x_65535", gif_with_size(tiny_gif, 65535, 65535), too_large(BOMB)),
        Case("bmp_bomb_50000_x_50000", bmp_with_size(tiny_bmp, 50_000, 50_000), too_large(BOMB)),
        Case("ppm_bomb_100k_x_100k", b"P5\n100000 100000\n255\n" + b"\0" * 64, too_large(BOMB)),
        # Real files (small when compressed): exactly at the pixel limit decodes; one row more is refused.
        Case("png_5000_x_5000_white_page", small_png("1", (5000, 5000), 1), bad(BLANK)),
        Case("png_5000_x_5000_with_digit", big_canvas_png(7, (5000, 5000)), ok(7)),
        Case("png_5000_x_5001_with_digit", big_canvas_png(7, (5000, 5001)), too_large(OVER_PIXELS)),
        # --- multi-frame images ---------------------------------------------------------------------
        Case("gif_animated", animated("GIF"), bad(ANIMATED)),
        Case("png_animated_apng", animated("PNG"), bad(ANIMATED)),
        Case("tiff_multipage", animated("TIFF"), bad(ANIMATED)),
        Case("webp_animated", animated("WEBP"), bad(ANIMATED)),
        # --- tiny and blank ---------------------------------------------------------------------------
        Case("png_1x1", small_png("RGB", (1, 1), 0), bad(BLANK)),
        Case("jpeg_1x1", encode(Image.new("RGB", (1, 1), (200, 30, 30)), "JPEG"), bad(BLANK)),
        Case("png_blank_white_page", small_png("L", (64, 64), 255), bad(BLANK)),
        # --- odd but valid: every one must read the right digit ----------------------------------------
        Case("jpeg_cmyk", cmyk_jpeg(2), ok(2)),
        Case("jpeg_exif_rotated", exif_rotated_jpeg(7), ok(7)),
        Case("jpeg_progressive", encode(digit_image(6), "JPEG", progressive=True, quality=90), ok(6)),
        Case("jpeg_grayscale", encode(digit_image(0).convert("L"), "JPEG"), ok(0)),
        Case("png_rgba_transparent_paper", rgba_transparent_png(4), ok(4)),
        Case("png_palette", palette_png(8), ok(8)),
        Case("png_palette_transparent_paper", palette_png(9, transparency=True), ok(9)),
        Case("png_16bit_grayscale", gray16_png(1), ok(1)),
        Case("png_1bit", encode(digit_image(5).convert("1"), "PNG"), ok(5)),
        Case("png_trailing_garbage", digit_png(0) + seeded_bytes(512, seed=2), ok(0)),
        Case("gif_single_frame", encode(digit_image(3), "GIF"), ok(3)),
        Case("bmp", encode(digit_image(2), "BMP"), ok(2)),
        Case("tiff", encode(digit_image(4), "TIFF"), ok(4)),
        Case("webp", encode(digit_image(9), "WEBP", quality=90), ok(9)),
        Case("ppm", encode(digit_image(8), "PPM"), ok(8)),
        # --- byte limits: the handler's (6,000,000) and the frontend's (6,553,600) -------------------
        Case(
            "png_padded_to_handler_limit",
            padded(digit_png(1), HANDLER_MAX_BYTES),
            ok(1),
            skip={JSON_FORM: BASE64_OVER_FRONTEND},
        ),
        Case(
            "png_one_byte_over_handler_limit",
            padded(digit_png(1), HANDLER_MAX_BYTES + 1),
            too_large(OVER_BYTES),
            skip={JSON_FORM: BASE64_OVER_FRONTEND},
        ),
        Case(
            "frontend_over_max_request_size",
            padded(digit_png(1), 7_000_000),
            frontend(TOO_LARGE),
            skip={JSON_FORM: FRONTEND_ONLY},
        ),
    ]


@cache
def corpus() -> tuple[Case, ...]:
    cases = tuple(_cases())
    names = [case.name for case in cases]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    assert not duplicates, f"duplicate case names: {duplicates}"
    return cases


# ------------------------------------------------------------------------------------ what a worker sees
def handler_request(case: Case, form: str) -> dict:
    """The request dict TorchServe 0.12 hands the handler for ``case`` sent in ``form``.

    Mirrors ``ts.protocol.otf_message_handler._retrieve_input_data``: an ``application/json`` part
    is json-parsed (left as bytes if that fails), a ``text/*`` part is UTF-8 decoded (left as bytes
    if that fails), anything else stays bytes; multipart fields become keys. Query parameters do not
    reach the handler. Only for cases that are ``modelled_in_process``.
    """
    if not case.modelled_in_process:
        raise ValueError(f"{case.name}: the frontend parses this request; it has no in-process model")
    if form == RAW:
        return {"body": _ts_decode(case.payload, case.content_type or "")}
    if form == MULTIPART:
        request = {case.multipart_field: case.payload}
        request.update({k: str(v) for k, v in case.options.items()})
        return request
    if form == JSON_FORM:
        return {"body": {"data": b64(case.payload), **case.options}}
    raise ValueError(f"unknown form {form!r}")


def _ts_decode(value: bytes, content_type: str) -> Any:
    if content_type == "application/json":
        try:
            return json.loads(value.decode("utf-8"))
        except Exception:  # noqa: BLE001 - TorchServe forwards the bytes on any failure
            return value
    if content_type.startswith("text"):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    return value


def summary() -> dict[str, int]:
    """Counts by expected status, for reports."""
    counts: dict[str, int] = {}
    for case in corpus():
        key = str(case.expect.status) + ("" if case.reaches_handler else " (frontend)")
        counts[key] = counts.get(key, 0) + 1
    return counts
