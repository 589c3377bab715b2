"""Getting an image out of one TorchServe request, safely.

A request reaches the handler as a dict. The image can be:

* the raw body (``curl -T img.png`` or ``--data-binary @img.png``): ``{"body": b"..."}``;
* a multipart file field (``curl -F data=@img.png``): ``{"data": b"..."}`` (``file`` and ``image``
  are accepted too);
* JSON ``{"data": "<base64>"}``: TorchServe parses ``application/json`` bodies into a dict.

Decoding enforces a byte limit and a pixel limit read from the image header *before* the pixels
are decoded, so a decompression bomb is refused without allocating it. PIL's own process-wide
``MAX_IMAGE_PIXELS`` protection is left as it is. Only raster formats are opened (no EPS, which
would run Ghostscript; no PDF).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import warnings
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from handlers.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType

IMAGE_FIELDS = ("body", "data", "file", "image")
JSON_IMAGE_FIELDS = ("data", "image", "b64")
ALLOWED_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "PPM")
_KNOWN_SIGNATURES = {
    b"%PDF": "a PDF document",
    b"PK\x03\x04": "a ZIP archive",
    b"\x7fELF": "an executable",
    b"<?xml": "an XML document",
    b"<svg": "an SVG drawing (vector images are not accepted)",
}
# How files of the accepted formats start: bytes that begin like one of these but that PIL cannot
# open are a damaged image (400), not a file of another kind (415).
_RASTER_SIGNATURES = (
    (re.compile(rb"\x89PNG\r\n\x1a\n"), "PNG"),
    (re.compile(rb"\xff\xd8\xff"), "JPEG"),
    (re.compile(rb"GIF8[79]a"), "GIF"),
    (re.compile(rb"BM.{4}\x00{4}", re.DOTALL), "BMP"),
    (re.compile(rb"RIFF.{4}WEBP", re.DOTALL), "WEBP"),
    (re.compile(rb"II\*\x00|MM\x00\*"), "TIFF"),
    (re.compile(rb"P[1-6]\s+(#|\d)"), "PPM"),
)
# Client-supplied text quoted in an error message is cut to this many characters, and at most
# this many JSON field names are listed: an error must stay small whatever the request holds.
_QUOTE_CHARS = 40
_QUOTE_FIELDS = 8


@dataclass(frozen=True)
class DecodeLimits:
    """Per-request limits: encoded bytes and decoded pixels (width x height)."""

    max_bytes: int = 6_000_000
    max_pixels: int = 25_000_000

    @classmethod
    def from_dict(cls, data: dict | None) -> DecodeLimits:
        data = dict(data or {})
        unknown = sorted(set(data) - {"max_bytes", "max_pixels"})
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown key (valid keys: max_bytes, max_pixels)")
        limits = cls(**data)
        for name in ("max_bytes", "max_pixels"):
            value = getattr(limits, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        return limits


@dataclass(frozen=True)
class ImageRequest:
    """The encoded image of one request and its options (JSON or multipart fields, never the query string)."""

    payload: bytes
    options: dict[str, Any]


@dataclass(frozen=True)
class PreparedImage:
    """One request ready for the model: its input tensor and the number of labels it asked for."""

    tensor: Any
    topk: int


def _as_text(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput("request parameter is not valid UTF-8 text") from exc
    return str(value)


def _quote(value: Any) -> str:
    """``ascii()`` of client-supplied text (no raw control or non-ASCII characters), cut short."""
    text = ascii(value)
    return text if len(text) <= _QUOTE_CHARS else text[: _QUOTE_CHARS - 3] + "..."


def _quote_fields(document: dict) -> str:
    names = [_quote(name) for name in sorted(document)[:_QUOTE_FIELDS]]
    more = len(document) - len(names)
    return "[" + ", ".join(names) + (f", ... {more} more" if more > 0 else "") + "]"


def _decode_base64(text: Any, field: str) -> bytes:
    if not isinstance(text, str):
        raise InvalidInput(f"JSON field '{field}' must be a base64 string, got {type(text).__name__}")
    if text.startswith("data:") and "," in text:  # data URL: data:image/png;base64,....
        text = text.split(",", 1)[1]
    try:
        payload = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"JSON field '{field}' is not valid base64: {exc}") from exc
    if not payload:
        raise InvalidInput(f"JSON field '{field}' is empty")
    return payload


def _from_json(document: Any) -> ImageRequest:
    if not isinstance(document, dict):
        raise InvalidInput(
            f'JSON body must be an object like {{"data": "<base64 image>"}}, got {type(document).__name__}'
        )
    for field in JSON_IMAGE_FIELDS:
        if field in document:
            options = {k: v for k, v in document.items() if k != field}
            return ImageRequest(_decode_base64(document[field], field), options)
    raise InvalidInput(
        f"JSON body has no image: expected a base64 string in field 'data', got fields {_quote_fields(document)}"
    )


def extract_image_request(request: dict) -> ImageRequest:
    """Find the image and options in one TorchServe request dict (see module docstring)."""
    options = {k: request[k] for k in request if k not in IMAGE_FIELDS}
    for field in IMAGE_FIELDS:
        if field not in request or request[field] is None:
            continue
        value = request[field]
        if isinstance(value, dict | list):
            parsed = _from_json(value)
            return ImageRequest(parsed.payload, {**options, **parsed.options})
        if isinstance(value, str):
            stripped = value.lstrip()
            if stripped.startswith(("{", "[")):
                return _json_text(stripped, options)
            raise UnsupportedMediaType("request body is text, not an image")
        if not isinstance(value, bytes | bytearray | memoryview):
            # TorchServe parses an application/json body: a bare JSON number or boolean arrives
            # here as int/bool, and bytes(<int>) would allocate that many zero bytes.
            raise InvalidInput(
                f"request {field!r} must be image bytes or a JSON object like "
                f'{{"data": "<base64 image>"}}, got {type(value).__name__}'
            )
        payload = bytes(value)
        if not payload:
            raise InvalidInput("request body is empty: send the image bytes, a multipart file or JSON")
        if payload.lstrip()[:1] in (b"{", b"["):
            return _json_text(payload, options)
        return ImageRequest(payload, options)
    raise InvalidInput(f"no image in request: expected the body or a field named one of {list(IMAGE_FIELDS[1:])}")


def _json_text(text: str | bytes, options: dict) -> ImageRequest:
    try:
        document = json.loads(text)
    except UnicodeDecodeError as exc:
        raise InvalidInput("JSON body is not valid UTF-8") from exc
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"malformed JSON body: {exc}") from exc
    except RecursionError as exc:
        raise InvalidInput("malformed JSON body: nested too deeply") from exc
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise InvalidInput(f"malformed JSON body: {exc}") from exc
    parsed = _from_json(document)
    return ImageRequest(parsed.payload, {**options, **parsed.options})


def decode_image(payload: bytes, limits: DecodeLimits) -> Image.Image:
    """Decode bytes to a fully loaded, EXIF-oriented PIL image, or raise a typed error."""
    if len(payload) > limits.max_bytes:
        raise PayloadTooLarge(f"image is {len(payload)} bytes; the limit is {limits.max_bytes}")
    head = payload[:16].lstrip()
    for signature, kind in _KNOWN_SIGNATURES.items():
        if head.startswith(signature):
            raise UnsupportedMediaType(f"body is {kind}, not an image (accepted: {', '.join(ALLOWED_FORMATS)})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(payload), formats=ALLOWED_FORMATS)
            width, height = image.size
            if width < 1 or height < 1:
                raise InvalidInput(f"image has no pixels ({width}x{height})")
            if width * height > limits.max_pixels:
                raise PayloadTooLarge(
                    f"image is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}"
                )
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                raise InvalidInput(f"animated or multi-frame images are not accepted ({frames} frames)")
            image.load()
            image = ImageOps.exif_transpose(image)
    except (InvalidInput, PayloadTooLarge):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"image refused as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        for signature, fmt in _RASTER_SIGNATURES:
            if signature.match(payload):
                raise InvalidInput(
                    f"image data is corrupt or truncated: it starts like a {fmt} file but its header cannot be read"
                ) from exc
        raise UnsupportedMediaType(
            f"body is not an image in a supported format (accepted: {', '.join(ALLOWED_FORMATS)})"
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidInput(f"image data is corrupt or truncated: {exc}") from exc
    return image


def parse_topk(value: Any, num_classes: int) -> int:
    """A per-request ``topk`` option, validated against the number of classes."""
    if isinstance(value, bool | float):
        raise InvalidInput(f"topk must be an integer, got {value!r}")
    try:
        k = value if isinstance(value, int) else int(_as_text(value).strip())
    except ValueError as exc:
        raise InvalidInput(f"topk must be an integer, got {_quote(_as_text(value))}") from exc
    if not 1 <= k <= num_classes:
        raise InvalidInput(f"topk must be between 1 and {num_classes}, got {_quote(k)}")
    return k
