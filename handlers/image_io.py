"""Getting an image out of one TorchServe request, safely.

A request reaches the handler as a dict. The image can be:

* the raw body (``curl -T img.png`` or ``--data-binary @img.png``): ``{"body": b"..."}``;
* a multipart file field (``curl -F data=@img.png``): ``{"data": b"..."}`` (``file`` and ``image``
  are accepted too);
* JSON ``{"data": "<base64>"}``: TorchServe parses ``application/json`` bodies into a dict.

Decoding runs on a per-request budget (``DecodeLimits``), so that no accepted payload holds a worker
for long or makes it allocate far more than the image it claims to be:

1. before PIL parses anything, caps read from the file's own structure: bytes; JPEG scans (a
   progressive JPEG pays a full pass over the image per scan); PNG chunks; GIF blocks and frames;
   TIFF compression, strips, tiles and pages (TIFF is restricted to single-page files with no,
   LZW, Deflate or PackBits compression); binary PNM only;
2. the pixel limit, read from the header before the pixels are decoded (decompression bombs);
3. a wall-clock limit checked on every read the decoder makes, so a decode that is still slow
   fails this request only, with a 413.

A JPEG can be decoded smaller than it is stored: ``decode_image(..., min_side=N)`` lets libjpeg
scale it by 1/2, 1/4 or 1/8 in the DCT domain (PIL's ``draft``), the smallest scale whose shorter
side is still at least ``N`` (the size the preprocessing needs: ``Preprocessing.min_decode_side``).
A 12-megapixel photo for a 224x224 model is then decoded at 1000x750 instead of 4000x3000: the
entropy decoding is the same, the inverse DCT, colour conversion and later resize touch 16 times
fewer pixels. The limits above are checked on the stored (full) size, before any scaling.

PIL's own process-wide ``MAX_IMAGE_PIXELS`` protection is left as it is. Only raster formats are
opened (no EPS, which would run Ghostscript; no PDF). Every failure is a typed 4xx: a decoder
error on a damaged file is a 400, never a 500.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
import time
import warnings
from dataclasses import dataclass, fields
from typing import Any

from PIL import ExifTags, Image, UnidentifiedImageError
from PIL.JpegImagePlugin import MARKER as JPEG_MARKERS

from handlers.errors import HandlerError, InvalidInput, PayloadTooLarge, UnsupportedMediaType
from handlers.json_body import parse_json

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


# What PIL raises on a malformed file: from parsing headers, decoding, reading EXIF. Each is the
# client's file being broken, so each becomes a 400 (never a 500). AssertionError and the like are
# not in the list: they would be our bugs.
DECODER_FAILURES = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    TypeError,
    ArithmeticError,
)


@dataclass(frozen=True)
class DecodeLimits:
    """The per-request decode budget (the spec's ``limits`` section; every key is optional).

    ``max_bytes`` and ``max_pixels`` bound the encoded and the decoded size. The others bound decode
    *work* that neither does, each checked from the file's structure before decoding: the scans of
    a JPEG (each one a pass over the whole image) and the markers before its first scan (parsed in
    Python, as are stray bytes between them), the chunks of a PNG, the data blocks of a GIF, the
    strips or tiles of a TIFF. ``max_webp_pixels`` is a lower pixel limit for WEBP, which libwebp
    decodes into its own canvas before PIL copies it (about 15 bytes a pixel at the peak, against 4
    to 8 for the other formats). ``max_decode_seconds`` is the guard for the rest, in CPU seconds of the
    decoding thread (``decode_clock``).
    """

    max_bytes: int = 6_000_000
    max_pixels: int = 25_000_000
    max_decode_seconds: float = 1.0
    max_jpeg_scans: int = 100
    max_jpeg_markers: int = 5_000
    max_png_chunks: int = 20_000
    max_gif_blocks: int = 65_536
    max_tiff_strips: int = 16_384
    max_webp_pixels: int = 16_000_000

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            if spec.name == "max_decode_seconds":
                # "not 0 < value" also refuses NaN.
                if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value <= 60:
                    raise ValueError(f"{spec.name}: must be a number of seconds > 0 and <= 60, got {value!r}")
            elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{spec.name}: must be a positive integer, got {value!r}")

    @classmethod
    def from_dict(cls, data: dict | None) -> DecodeLimits:
        data = dict(data or {})
        known = [spec.name for spec in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown key (valid keys: {', '.join(known)})")
        return cls(**data)


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
    megapixels: float | None = None  # of the decoded image (None: the client sent a preprocessed tensor)


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


def decode_base64(text: Any, where: str) -> bytes:
    """Base64 (or a ``data:`` URL) to bytes; errors name ``where`` the text was (a field, a tensor element)."""
    if not isinstance(text, str):
        raise InvalidInput(f"{where} must be a base64 string, got {type(text).__name__}")
    if text.startswith("data:") and "," in text:  # data URL: data:image/png;base64,....
        text = text.split(",", 1)[1]
    try:
        payload = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"{where} is not valid base64: {exc}") from exc
    if not payload:
        raise InvalidInput(f"{where} is empty")
    return payload


def _decode_base64(text: Any, field: str) -> bytes:
    return decode_base64(text, f"JSON field '{field}'")


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
    document = parse_json(text)
    parsed = _from_json(document)
    return ImageRequest(parsed.payload, {**options, **parsed.options})


# ------------------------------------------------------------------------------------ the decode clock
# The decode clock's time source: the decoding thread's CPU time, not the wall clock. An image is refused for
# what decoding it costs, never because other processes held the CPU meanwhile: under a starved machine (CI,
# 2026-12-06) a 1 KB digit PNG passed 1 s of wall time in its worker and got a 413. A module attribute, so
# tests can replace it; the response timeout is what bounds a request's wall time.
decode_clock = time.thread_time


class _DecodeClock:
    """The request's decode budget in CPU seconds of the decoding thread; ``check`` raises once it is spent."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = decode_clock() + seconds
        self.expired = False

    def check(self) -> None:
        if self.expired or decode_clock() > self.deadline:
            self.expired = True
            raise PayloadTooLarge(
                f"image takes too long to decode: more than {self.seconds:g} s; the limit is {self.seconds:g} s"
            )


class _ClockedBytes(io.BytesIO):
    """The payload as the file PIL reads, checking the decode clock on every read.

    PIL pulls its input through ``read``: header parsers (in Python) a few bytes at a time, the
    incremental C decoders (JPEG, PNG, GIF, raw) in blocks of up to 64 KB or chunk by chunk.
    Checking the clock there bounds them all without threads or signals, so a slow decode fails
    this request only. Decoders that take the whole file in one C call (WEBP, compressed TIFF)
    are bounded by the structural caps and the pixel limits instead.
    """

    def __init__(self, payload: bytes, clock: _DecodeClock) -> None:
        super().__init__(payload)
        self._clock = clock

    def read(self, size: int | None = -1, /) -> bytes:
        self._clock.check()
        return super().read(size)


# ------------------------------------------------------------------------------------ structural caps
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_GIF_SIGNATURES = (b"GIF87a", b"GIF89a")
# Every prefix PIL's TIFF plugin opens, including two byte orders it tolerates and BigTIFF.
_TIFF_PREFIXES = (b"MM\x00\x2a", b"II\x2a\x00", b"MM\x2a\x00", b"II\x00\x2a", b"MM\x00\x2b", b"II\x2b\x00")
# TIFF compressions PIL hands to libtiff, which decodes the whole image in one C call (no clock):
# only simple lossless codecs whose cost is bounded by bytes and pixels. JPEG-in-TIFF (with its
# own progressive scans), old-style JPEG, CCITT fax, LZMA, ZSTD, WEBP, SGI log... are refused.
_TIFF_COMPRESSIONS = {1: "none", 5: "LZW", 8: "Deflate", 32946: "Deflate", 32773: "PackBits"}
_TIFF_TAG_WIDTH, _TIFF_TAG_HEIGHT, _TIFF_TAG_COMPRESSION = 256, 257, 259
_TIFF_TAG_STRIP_OFFSETS, _TIFF_TAG_TILE_WIDTH, _TIFF_TAG_TILE_LENGTH, _TIFF_TAG_TILE_OFFSETS = 273, 322, 323, 324
# Tiles may overhang the image (they are multiples of 16 pixels), but padded tiles covering more
# than twice the image (or a megapixel, for small images) only cost memory: libtiff allocates a
# whole tile however little of it is inside the image.
_TIFF_TILE_SLACK, _TIFF_TILE_SLACK_MIN_PIXELS = 2, 1 << 20
# Binary PNM only: PIL decodes the plain (ASCII) variants P1-P3 in Python, and P0/Py are PIL's
# test-only extensions. Pf is the grayscale float map (PFM).
_PNM_ACCEPTED = (b"P4", b"P5", b"P6", b"Pf")
_PNM_PLAIN = (b"P1", b"P2", b"P3")
# One header token (size, maxval or scale) after any whitespace and comments.
_PNM_TOKEN = re.compile(rb"(?:\s|#[^\r\n]*)*[^\s#]+")
_PNM_MAX_HEADER_BYTES = 4096
_BMP_RLE = {1: "RLE8", 2: "RLE4"}
# A GIF is a sequence of blocks: extension (!), image (,) and trailer (;). PIL skips any other byte
# one at a time, so a walk must do the same (at C speed: a regular expression).
_GIF_BLOCK = re.compile(rb"[\x21\x2c\x3b]")
_JPEG_START_OF_SCAN = re.compile(rb"\xff\xda")


def _check_structure(payload: bytes, limits: DecodeLimits) -> int | None:
    """Enforce the format-specific caps from the file's structure, before PIL parses it.

    Returns the number of frames (at most 2) where the walk counted them (GIF, TIFF), else None.
    A structure that is cut short is left to PIL, which reports it as corrupt.
    """
    if payload.startswith(b"\xff\xd8\xff"):
        _check_jpeg_markers(payload, limits)
        _check_jpeg_scans(payload, limits)
    elif payload.startswith(_PNG_SIGNATURE):
        _check_png_chunks(payload, limits)
    elif payload.startswith(_GIF_SIGNATURES):
        return _gif_frames(payload, limits)
    elif payload.startswith(_TIFF_PREFIXES):
        return _tiff_frames(payload, limits)
    elif len(payload) >= 2 and payload[0] == ord("P") and payload[1] in b"0123456fy":  # what PIL's PPM plugin opens
        _check_pnm(payload)
    elif payload.startswith(b"BM"):
        _check_bmp_compression(payload)
    return None


def _check_jpeg_markers(payload: bytes, limits: DecodeLimits) -> None:
    """Walk the JPEG markers before the first scan as PIL does, counting its steps.

    PIL parses this part in Python, one marker at a time, and skips stray bytes between markers
    one at a time too: a million 4-byte comments took 2 s. After the first scan libjpeg (in C)
    takes over. Real files have a few dozen markers here.
    """
    cap, pos, steps = limits.max_jpeg_markers, 2, 0
    while pos + 1 < len(payload) and steps <= cap:
        if payload[pos] != 0xFF:
            marker = payload.find(b"\xff", pos)
            steps += (marker if marker >= 0 else len(payload)) - pos
            if marker < 0:
                break
            pos = marker
            continue
        code = 0xFF00 | payload[pos + 1]
        steps += 1
        if code == 0xFFDA or pos + 4 > len(payload):  # start of scan, or cut off (PIL reports it)
            break
        if code in JPEG_MARKERS:  # a marker with a handler has a 2-byte length that counts itself
            pos += 2 if JPEG_MARKERS[code][2] is None else 2 + max(2, int.from_bytes(payload[pos + 2 : pos + 4]))
        elif code == 0xFFFF:  # fill byte: the second FF starts the marker
            pos += 1
        elif code == 0xFF00:
            pos += 2
        else:
            break  # PIL: "no marker found"
    if steps > cap:
        raise PayloadTooLarge(f"JPEG has more than {cap} markers before its first scan; the limit is {cap}")


def _check_jpeg_scans(payload: bytes, limits: DecodeLimits) -> None:
    # Every scan libjpeg decodes starts with an SOS marker (FF DA), and entropy-coded data never
    # holds FF DA (a coded FF is followed by 00): the count is an upper bound on the scans,
    # taken at C speed without parsing anything. An MPO's second frame counts too. The search
    # stops one past the cap (a regular expression finds FF with memchr: 1.3 ms on a 3 MB photo,
    # where bytes.count took 4.4 ms); the exact count is taken only for the error message.
    scans = 0
    for _ in _JPEG_START_OF_SCAN.finditer(payload):
        scans += 1
        if scans > limits.max_jpeg_scans:
            scans = payload.count(b"\xff\xda")
            break
    if scans > limits.max_jpeg_scans:
        raise PayloadTooLarge(
            f"JPEG has {scans} scans; the limit is {limits.max_jpeg_scans} "
            "(each scan of a progressive JPEG is a decoding pass over the whole image)"
        )


def _check_png_chunks(payload: bytes, limits: DecodeLimits) -> None:
    # PIL handles every chunk in Python (a CRC, a dispatch): half a million empty chunks fit in
    # the byte limit. Real encoders write chunks of 8 KB or more.
    pos, chunks, cap = len(_PNG_SIGNATURE), 0, limits.max_png_chunks
    while pos + 8 <= len(payload):
        chunks += 1
        if chunks > cap:
            raise PayloadTooLarge(f"PNG has more than {cap} chunks; the limit is {cap}")
        length, kind = struct.unpack_from(">I4s", payload, pos)
        if kind == b"IEND":
            return
        pos += 12 + length


def _gif_frames(payload: bytes, limits: DecodeLimits) -> int:
    """Complete frames of a GIF, counting at most 2, and data blocks up to the cap.

    A second frame whose header is cut off is not a frame: PIL would fail on it, and the first
    frame is a valid image, so the file is read as a still image.
    """
    flags = payload[10] if len(payload) > 10 else 0
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # logical screen, global colour table
    frames, blocks = 0, 0
    while (match := _GIF_BLOCK.search(payload, pos)) is not None:
        pos = match.start()
        if payload[pos] == 0x3B:  # trailer
            break
        if payload[pos] == 0x2C:  # image: descriptor, local colour table, LZW code size, data
            if pos + 10 > len(payload):
                break
            local = payload[pos + 9]
            pos += 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0)
            if pos >= len(payload):
                break
            frames += 1
            if frames > 1:
                break
            pos += 1
        else:  # extension: label, then data
            pos += 2
        pos, blocks = _skip_gif_sub_blocks(payload, pos, blocks, limits.max_gif_blocks)
    return frames


def _skip_gif_sub_blocks(payload: bytes, pos: int, blocks: int, max_blocks: int) -> tuple[int, int]:
    # PIL reads extension data in Python, one sub-block (1 to 255 bytes) at a time; encoders fill
    # image data in 255-byte sub-blocks, so the cap leaves room for any real file in the byte limit.
    while pos < len(payload):
        size = payload[pos]
        pos += 1 + size
        blocks += 1
        if blocks > max_blocks:
            raise PayloadTooLarge(f"GIF has more than {max_blocks} data blocks; the limit is {max_blocks}")
        if size == 0:
            break
    return pos, blocks


def _tiff_frames(payload: bytes, limits: DecodeLimits) -> int | None:
    """Check the first TIFF directory (IFD) and say whether another follows (2) or not (1).

    PIL counts pages by walking the whole IFD chain (tens of thousands of IFDs fit in the byte
    limit; it took 15 s), and builds one Python decoder per strip or tile: read the first IFD
    here instead and refuse what would be expensive before PIL sees it.
    """
    if payload[2] == 0x2B:
        raise UnsupportedMediaType("BigTIFF is not accepted: send a classic TIFF (or PNG)")
    endian = "<" if payload[:2] == b"II" else ">"
    try:
        (first,) = struct.unpack_from(endian + "I", payload, 4)
        tags, next_ifd = _read_tiff_ifd(payload, first, endian)
    except struct.error:
        return None  # cut off: PIL says so
    compression = tags.get(_TIFF_TAG_COMPRESSION, (1, 1))[1]
    if compression not in _TIFF_COMPRESSIONS:
        accepted = ", ".join(dict.fromkeys(_TIFF_COMPRESSIONS.values()))
        raise UnsupportedMediaType(f"TIFF compression {compression} is not accepted (accepted: {accepted})")
    for tag, kind in ((_TIFF_TAG_STRIP_OFFSETS, "strips"), (_TIFF_TAG_TILE_OFFSETS, "tiles")):
        count = tags.get(tag, (0, 0))[0]
        if count > limits.max_tiff_strips:
            raise PayloadTooLarge(f"TIFF has {count} {kind}; the limit is {limits.max_tiff_strips}")
    _check_tiff_tiles(tags)
    return 1 if next_ifd in (0, first) else 2


def _read_tiff_ifd(payload: bytes, offset: int, endian: str) -> tuple[dict[int, tuple[int, int | None]], int]:
    """One IFD: {tag: (count, value if it is a single BYTE, SHORT or LONG)}, and the next IFD's offset."""
    (entries,) = struct.unpack_from(endian + "H", payload, offset)
    tags: dict[int, tuple[int, int | None]] = {}
    for pos in range(offset + 2, offset + 2 + 12 * entries, 12):
        tag, kind, count = struct.unpack_from(endian + "HHI", payload, pos)
        value = None
        if count == 1 and kind in (1, 3, 4):
            (value,) = struct.unpack_from(endian + {1: "B", 3: "H", 4: "I"}[kind], payload, pos + 8)
        tags.setdefault(tag, (count, value))  # PIL keeps the first of duplicated tags too
    (next_ifd,) = struct.unpack_from(endian + "I", payload, offset + 2 + 12 * entries)
    return tags, next_ifd


def _check_tiff_tiles(tags: dict[int, tuple[int, int | None]]) -> None:
    sizes = [tags.get(tag, (0, None))[1] for tag in (_TIFF_TAG_WIDTH, _TIFF_TAG_HEIGHT)]
    tile = [tags.get(tag, (0, None))[1] for tag in (_TIFF_TAG_TILE_WIDTH, _TIFF_TAG_TILE_LENGTH)]
    if not all(sizes) or not all(tile):
        return  # not tiled, or missing sizes: PIL refuses or decodes it by strips
    (width, height), (tile_width, tile_height) = sizes, tile
    covered = -(-width // tile_width) * tile_width * -(-height // tile_height) * tile_height
    if covered > _TIFF_TILE_SLACK * max(width * height, _TIFF_TILE_SLACK_MIN_PIXELS):
        raise PayloadTooLarge(
            f"TIFF tiles of {tile_width}x{tile_height} cover {covered} pixels for a {width}x{height} image "
            f"(more than {_TIFF_TILE_SLACK} times the image)"
        )


def _check_pnm(payload: bytes) -> None:
    magic = payload[:2]
    if magic not in _PNM_ACCEPTED:
        kind = "plain (ASCII) PNM" if magic in _PNM_PLAIN else "this PNM variant"
        raise UnsupportedMediaType(
            f"{kind} is not accepted: send binary PBM/PGM/PPM (P4, P5, P6) or PFM (Pf), or another format"
        )
    # PIL reads the header (sizes, maxval, comments, whitespace) one byte at a time in Python:
    # megabytes of comment or padding took 2 s. Real headers are a few dozen bytes.
    head, pos = payload[:_PNM_MAX_HEADER_BYTES], 2
    for _ in range(2 if magic == b"P4" else 3):
        token = _PNM_TOKEN.match(head, pos)
        if token is None or token.end() == len(head) < len(payload):
            if len(payload) > len(head):
                raise PayloadTooLarge(f"PNM header is longer than {_PNM_MAX_HEADER_BYTES} bytes (the limit)")
            return  # cut off or malformed: PIL reports it
        pos = token.end()


def _check_bmp_compression(payload: bytes) -> None:
    # PIL decodes RLE-compressed BMP in Python, pixel by pixel (seconds for one image in the pixel
    # limit, with no read in between for the clock to see): only uncompressed BMP is decoded in C.
    if len(payload) >= 34 and int.from_bytes(payload[14:18], "little") >= 40:
        compression = int.from_bytes(payload[30:34], "little")
        if compression in _BMP_RLE:
            raise UnsupportedMediaType(f"BMP with {_BMP_RLE[compression]} compression is not accepted")


# ------------------------------------------------------------------------------------ decoding
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1..8), or 1 when there is none or the EXIF cannot be read.

    EXIF is metadata: a block PIL cannot parse, or an orientation of the wrong type or out of
    range, means "as stored", never a failed request.
    """
    try:
        value = image.getexif().get(ExifTags.Base.Orientation)
    except DECODER_FAILURES:
        return 1
    return value if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 8 else 1


def _apply_orientation(image: Image.Image, frame: FullFrame | None = None) -> tuple[Image.Image, FullFrame | None]:
    """The image as displayed, and ``frame`` (see ``FULL_FRAME``) moved with its pixels."""
    # Not ImageOps.exif_transpose: it copies the image even when nothing changes, and re-encodes the
    # EXIF afterwards, which fails (TypeError) on vendor tags of an unexpected type.
    method = _ORIENTATION_TRANSPOSE.get(_exif_orientation(image))
    if method is None:
        return image, frame
    if frame is not None:
        (full_width, full_height), box = frame
        if method in _SWAPS_AXES:
            full_width, full_height = full_height, full_width
        corners = [_transposed_point(x, y, image.size, method) for x, y in ((box[0], box[1]), (box[2], box[3]))]
        (ax, ay), (bx, by) = corners
        frame = ((full_width, full_height), (min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)))
    return image.transpose(method), frame


_SWAPS_AXES = (
    Image.Transpose.TRANSPOSE,
    Image.Transpose.TRANSVERSE,
    Image.Transpose.ROTATE_90,
    Image.Transpose.ROTATE_270,
)


def _transposed_point(x: float, y: float, size: tuple[int, int], method: Image.Transpose) -> tuple[float, float]:
    """Where the point (x, y) of an image of ``size`` lands after ``image.transpose(method)``."""
    width, height = size
    return {
        Image.Transpose.FLIP_LEFT_RIGHT: (width - x, y),
        Image.Transpose.FLIP_TOP_BOTTOM: (x, height - y),
        Image.Transpose.ROTATE_180: (width - x, height - y),
        Image.Transpose.TRANSPOSE: (y, x),
        Image.Transpose.ROTATE_90: (y, width - x),  # counter-clockwise
        Image.Transpose.ROTATE_270: (height - y, x),  # clockwise
        Image.Transpose.TRANSVERSE: (height - y, width - x),
    }[method]


def _check_pixels(image: Image.Image, limits: DecodeLimits) -> None:
    """The pixel limits, from the header: nothing is decoded yet."""
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidInput(f"image has no pixels ({width}x{height})")
    limit, kind = limits.max_pixels, "image"
    if image.format == "WEBP" and limits.max_webp_pixels < limit:
        limit, kind = limits.max_webp_pixels, "WEBP image"
    if width * height > limit:
        raise PayloadTooLarge(f"{kind} is {width}x{height} = {width * height} pixels; the limit is {limit}")


def _frames(image: Image.Image, walked: int | None) -> int:
    if image.format == "MPO":
        return 1  # a camera's JPEG with a preview (or second-eye) frame: the first frame is the photo
    if walked is not None:
        return walked
    return getattr(image, "n_frames", 1)  # PNG (acTL) and WEBP give the count in their headers


# DCT scale denominators libjpeg decodes at through PIL's draft, largest first.
JPEG_DRAFT_SCALES = (8, 4, 2)
_DRAFT_FORMATS = ("JPEG", "MPO")
# A DCT-scaled decode records in the image's ``info``, under this key, the image's full size (as
# displayed) and the box of the decoded pixels that the full image covers: libjpeg rounds the
# scaled size up, so the last row and column stand for less than ``scale`` full pixels (after an
# EXIF flip or rotation, the first ones). Geometry that must match the full decode exactly (the
# centre crop) is computed on the full size and mapped through the box. Absent: not scaled.
FULL_FRAME = "servekit.full_frame"
FullFrame = tuple[tuple[int, int], tuple[float, float, float, float]]


def jpeg_draft_scale(width: int, height: int, min_side: int | None) -> int:
    """The DCT scale denominator (8, 4, 2, or 1 for full size) to decode a ``width`` x ``height`` JPEG at.

    The largest one whose scaled shorter side (``shorter // scale``, libjpeg rounds up) is still at
    least ``min_side``. The rule depends on the shorter side only, so it is the same before and
    after an EXIF rotation (a rotation swaps width and height). ``None`` means full size.
    """
    if min_side is None:
        return 1
    shorter = min(width, height)
    return next((scale for scale in JPEG_DRAFT_SCALES if shorter // scale >= max(1, min_side)), 1)


def _draft_jpeg(image: Image.Image, min_side: int | None) -> FullFrame | None:
    """Ask libjpeg to decode ``image`` (opened, not loaded) at the smallest scale ``min_side`` allows.

    Returns the full frame (see ``FULL_FRAME``) when it will be scaled, else None.
    """
    if image.format not in _DRAFT_FORMATS:
        return None
    width, height = image.size
    scale = jpeg_draft_scale(width, height, min_side)
    if scale == 1:
        return None
    # PIL picks the scale from a requested size: this one gives exactly ``scale``.
    drafted = image.draft(None, (width // scale, height // scale))
    if drafted is None or image.size == (width, height):
        return None  # not a single-tile JPEG: decoded at full size
    return (width, height), (0.0, 0.0, width / scale, height / scale)


def decode_image(payload: bytes, limits: DecodeLimits, min_side: int | None = None) -> Image.Image:
    """Decode bytes to a fully loaded, EXIF-oriented PIL image within ``limits``, or raise a typed error.

    With ``min_side``, a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) whose shorter side
    stays at least ``min_side`` pixels (see ``jpeg_draft_scale``; ``info[FULL_FRAME]`` says how the
    pixels map to the full size); other formats at full size.
    """
    if len(payload) > limits.max_bytes:
        raise PayloadTooLarge(f"image is {len(payload)} bytes; the limit is {limits.max_bytes}")
    head = payload[:16].lstrip()
    for signature, kind in _KNOWN_SIGNATURES.items():
        if head.startswith(signature):
            raise UnsupportedMediaType(f"body is {kind}, not an image (accepted: {', '.join(ALLOWED_FORMATS)})")
    clock = _DecodeClock(limits.max_decode_seconds)
    walked_frames = _check_structure(payload, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(_ClockedBytes(payload, clock), formats=ALLOWED_FORMATS)
            _check_pixels(image, limits)
            frames = _frames(image, walked_frames)
            if frames > 1:
                counted = f"{frames}" if walked_frames is None else "2 or more"  # a walk stops at the second
                raise InvalidInput(f"animated or multi-frame images are not accepted ({counted} frames)")
            frame = _draft_jpeg(image, min_side)  # after the pixel limit, which holds for the stored size
            image.load()
            clock.check()  # a decoder may have swallowed the clock's error
            image, frame = _apply_orientation(image, frame)
            image.info.pop(FULL_FRAME, None)  # a PNG text chunk of that name is only text
            if frame is not None:
                image.info[FULL_FRAME] = frame
    except HandlerError:
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
    except MemoryError as exc:
        raise PayloadTooLarge("image needs more memory to decode than the worker can give it") from exc
    except DECODER_FAILURES as exc:
        clock.check()  # a decoder that failed on the clock's error reports its own
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
