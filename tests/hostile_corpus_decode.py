"""A second hostile corpus: decode amplification and odd-but-valid images, generated in memory.

``tests/hostile_corpus.py`` covers what a request can be (not an image, broken JSON, headers that
lie about their size, ...). This corpus covers what *decoding* a file within the byte and pixel
limits can cost, and what unusual but valid files look like (issue 8):

* decode amplification, each refused from the file's structure before PIL decodes anything: a
  progressive JPEG with thousands of scans, a million markers before a JPEG's first scan, TIFF IFD
  chains, a million TIFF strips, tiles far larger than their image, hundreds of thousands of PNG
  chunks or GIF frames, millions of GIF sub-blocks, a PNM header of megabytes of comment, WEBP
  whose canvas is too large; formats dropped on purpose (plain PNM, BMP RLE, JPEG/CCITT TIFF,
  BigTIFF);
* odd but valid images, each answered with the right digit: camera MPO files, EXIF orientation
  next to vendor tags of unexpected types, GIF whose second frame header is cut off, LA/La, 16-bit,
  float, 32-bit integer, CMYK and 1-bit TIFF, 16-bit RGBA PNG, PFM, and big images at the limits.

Cases are ``tests.hostile_corpus.Case`` objects, so the same senders and checks apply. Every
payload is at most about 4.5 MB, so that its base64 in a JSON body still fits the frontend's
request limit: every case is sent in all three forms. Everything is deterministic.

``SLOW`` names the valid cases that legitimately use a good part of the 2 s budget (large images),
so that a batch holds at most one of them.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from functools import cache

import numpy as np
from PIL import Image

from tests.hostile_corpus import (
    ANIMATED,
    Case,
    bad,
    digit_image,
    encode,
    ink_mask,
    ok,
    png_build,
    png_chunk,
    png_chunks,
    too_large,
    unsupported,
)

MAX_JPEG_SCANS = 100  # handlers.image_io.DecodeLimits defaults (the digits spec does not change them)
MAX_TIFF_STRIPS = 16_384

NOT_ACCEPTED = "is not accepted"


# ------------------------------------------------------------------------------------ digits, stored oddly
def rotated_for_orientation_6(image: Image.Image) -> Image.Image:
    """What a camera stores for "rotate 90 degrees clockwise to display" (EXIF orientation 6)."""
    return image.transpose(Image.Transpose.ROTATE_90)


def ink_alpha(digit: int) -> tuple[np.ndarray, np.ndarray]:
    """Black ink whose opacity is the ink: (gray, alpha) arrays; the paper is fully transparent."""
    alpha = ink_mask(digit)
    return np.zeros_like(alpha), alpha


@cache
def digit_page(digit: int, size: tuple[int, int]) -> Image.Image:
    """The digit drawn big in the middle of a white page of ``size`` (grayscale)."""
    width, height = size
    side = min(width, height) // 2
    page = Image.new("L", size, 255)
    page.paste(digit_image(digit).convert("L").resize((side, side)), ((width - side) // 2, (height - side) // 2))
    return page


# ------------------------------------------------------------------------------------ JPEG
def jpeg_segments(data: bytes) -> list[tuple[int, int]]:
    """(offset, marker) of every segment up to the first scan."""
    segments, pos = [], 2
    while True:
        marker = data[pos + 1]
        segments.append((pos, marker))
        if marker == 0xDA:
            return segments
        pos += 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]


def jpeg_components(data: bytes) -> list[int]:
    pos = next(p for p, marker in jpeg_segments(data) if marker in (0xC0, 0xC1, 0xC2))
    count = data[pos + 9]
    return [data[pos + 10 + 3 * i] for i in range(count)]


def empty_scan(components: Sequence[int], dc_refinement: bool) -> bytes:
    """An SOS header with no entropy-coded data after it.

    libjpeg still walks every block of the image for it (zero bits, "premature end of data"
    warning). A DC refinement scan (Ah=1, Al=0) on zero bits changes no coefficient, so a file
    padded with them decodes exactly like the original.
    """
    body = bytes([len(components)]) + b"".join(bytes([c, 0]) for c in components)
    body += bytes([0, 0, 0x10 if dc_refinement else 0])
    return b"\xff\xda" + struct.pack(">H", 2 + len(body)) + body


def progressive_scan_bomb(size: tuple[int, int], scans: int) -> bytes:
    """A progressive grayscale JPEG header of ``size`` followed by ``scans`` empty scans (issue 8)."""
    base = encode(Image.new("L", size, 255), "JPEG", progressive=True)
    first_scan = jpeg_segments(base)[-1][0]
    return base[:first_scan] + empty_scan([1], dc_refinement=False) * scans + b"\xff\xd9"


def progressive_digit_with_scans(digit: int, total_scans: int) -> bytes:
    """A real progressive digit JPEG padded with harmless scans to ``total_scans`` SOS markers."""
    data = encode(digit_image(digit).convert("L"), "JPEG", progressive=True, quality=90)
    extra = total_scans - data.count(b"\xff\xda")
    assert extra >= 0
    assert data.endswith(b"\xff\xd9")
    return data[:-2] + empty_scan(jpeg_components(data), dc_refinement=True) * extra + b"\xff\xd9"


def jpeg_with_segments_before_frame(digit: int, segment: bytes, count: int) -> bytes:
    data = encode(digit_image(digit).convert("L"), "JPEG", quality=90)
    return data[:2] + segment * count + data[2:]


def jpeg_with_stray_bytes(digit: int, count: int) -> bytes:
    """``count`` stray zero bytes after the first segment (decoders skip them one by one)."""
    data = encode(digit_image(digit).convert("L"), "JPEG", quality=90)
    after_app0 = jpeg_segments(data)[1][0]
    return data[:after_app0] + b"\0" * count + data[after_app0:]


def exif_block(ifd0: list[tuple[int, int, int, bytes]], exif_ifd: list | None = None, endian: str = "<") -> bytes:
    """An EXIF APP1 body: "Exif\\0\\0", a TIFF header and IFD0 (plus an EXIF sub-IFD if given).

    Entries are (tag, type, count, value bytes); values over 4 bytes go after the IFD.
    """

    def ifd(entries: list, start: int) -> bytes:
        data_at = start + 2 + 12 * len(entries) + 4
        table, data = b"", b""
        for tag, kind, count, value in entries:
            if len(value) <= 4:
                table += struct.pack(endian + "HHI", tag, kind, count) + value.ljust(4, b"\0")
            else:
                table += struct.pack(endian + "HHII", tag, kind, count, data_at + len(data))
                data += value + b"\0" * (len(value) % 2)
        return struct.pack(endian + "H", len(entries)) + table + struct.pack(endian + "I", 0) + data

    header = (b"II*\0" if endian == "<" else b"MM\0*") + struct.pack(endian + "I", 8)
    if exif_ifd is None:
        return b"Exif\0\0" + header + ifd(ifd0, 8)
    pointer = (0x8769, 4, 1, b"\0" * 4)
    first_length = len(ifd([*ifd0, pointer], 8))
    pointer = (0x8769, 4, 1, struct.pack(endian + "I", 8 + first_length))
    return b"Exif\0\0" + header + ifd([*ifd0, pointer], 8) + ifd(exif_ifd, 8 + first_length)


def short(value: int, endian: str = "<") -> bytes:
    return struct.pack(endian + "H", value)


ORIENTATION_6 = (0x0112, 3, 1, short(6))


def jpeg_with_exif(digit: int, exif: bytes, stored_rotated: bool) -> bytes:
    """The digit as a JPEG with ``exif`` as its APP1; stored turned when the orientation is valid."""
    image = digit_image(digit)
    data = encode(rotated_for_orientation_6(image) if stored_rotated else image, "JPEG", quality=92)
    return data[:2] + b"\xff\xe1" + struct.pack(">H", 2 + len(exif)) + exif + data[2:]


def jpeg_cmyk_rotated(digit: int) -> bytes:
    stored = rotated_for_orientation_6(digit_image(digit)).convert("CMYK")
    return encode(stored, "JPEG", progressive=True, quality=92, exif=exif_block([ORIENTATION_6]))


def mpo(digit: int, preview_digit: int, orientation: int | None = None) -> bytes:
    """A camera MPO: the photo as the first frame, a small preview of something else as the second."""
    photo = digit_image(digit)
    params: dict = {}
    if orientation is not None:
        photo = rotated_for_orientation_6(photo)
        exif = Image.Exif()
        exif[0x0112] = orientation
        params["exif"] = exif.tobytes()
    preview = digit_image(preview_digit).resize((48, 48))
    return encode(photo, "MPO", save_all=True, append_images=[preview], quality=92, **params)


# ------------------------------------------------------------------------------------ PNG
def png_with_chunks_after_header(data: bytes, chunk: bytes, count: int) -> bytes:
    return data[:33] + chunk * count + data[33:]  # after the signature (8) and IHDR (25)


def png_raw(array: np.ndarray, color_type: int, depth: int) -> bytes:
    """A PNG written by hand from ``array`` (rows x columns x samples, big-endian for 16-bit)."""
    height, width = array.shape[:2]
    dtype = ">u2" if depth == 16 else np.uint8
    rows = np.ascontiguousarray(array.astype(dtype)).reshape(height, -1).view(np.uint8)
    raw = b"".join(b"\0" + row.tobytes() for row in rows)
    header = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return png_build([(b"IHDR", header), (b"IDAT", zlib.compress(raw, 9)), (b"IEND", b"")])


def png_16bit_rgba(digit: int) -> bytes:
    gray, alpha = ink_alpha(digit)
    rgba = np.stack([gray, gray, gray, alpha], axis=-1).astype(np.uint16) * 257
    return png_raw(rgba, color_type=6, depth=16)


def png_16bit_gray_alpha(digit: int) -> bytes:
    gray, alpha = ink_alpha(digit)
    return png_raw(np.stack([gray, alpha], axis=-1).astype(np.uint16) * 257, color_type=4, depth=16)


def png_idat_split(data: bytes, size: int) -> bytes:
    """The same PNG with its image data cut into IDAT chunks of ``size`` bytes."""
    chunks = png_chunks(data)
    idat = b"".join(body for kind, body in chunks if kind == b"IDAT")
    parts = [(b"IDAT", idat[i : i + size]) for i in range(0, len(idat), size)]
    head = [(kind, body) for kind, body in chunks if kind not in (b"IDAT", b"IEND")]
    return png_build([*head, *parts, (b"IEND", b"")])


def ztxt_bomb(number: int) -> bytes:
    """A zTXt chunk whose text inflates to 1,000,000 bytes (PIL allows 1 MiB each, 64 MiB in all)."""
    return png_chunk(b"zTXt", b"k%d\0\0" % number + zlib.compress(b"\0" * 1_000_000, 9))


# ------------------------------------------------------------------------------------ GIF
def gif_parts(data: bytes) -> tuple[bytes, bytes]:
    """(header with the logical screen and global colour table, the blocks up to the trailer)."""
    flags = data[10]
    start = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    assert data.endswith(b";")
    return data[:start], data[start:-1]


def gif_digit(digit: int) -> bytes:
    return encode(digit_image(digit).convert("L"), "GIF")


def gif_with_second_frame(digit: int, second: bytes) -> bytes:
    """The digit as a GIF, then ``second`` where a second frame would start, and no trailer."""
    head, blocks = gif_parts(gif_digit(digit))
    return head + blocks + second


def gif_frames(count: int) -> bytes:
    one = encode(Image.new("L", (1, 1), 0), "GIF")
    head, blocks = gif_parts(one)
    return head + blocks * count + b";"


def gif_with_comment(digit: int, sub_blocks: int) -> bytes:
    """A comment extension of ``sub_blocks`` one-byte sub-blocks before the image."""
    head, blocks = gif_parts(gif_digit(digit))
    return head + b"\x21\xfe" + b"\x01c" * sub_blocks + b"\0" + blocks + b";"


def gif_with_stray_bytes(digit: int, count: int) -> bytes:
    """``count`` stray zero bytes between the image and the trailer (readers skip them one by one)."""
    head, blocks = gif_parts(gif_digit(digit))
    return head + blocks + b"\0" * count + b";"


def gif_transparent_paper(digit: int) -> bytes:
    image = digit_image(digit).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    paper = max(image.getcolors(), key=lambda c: c[0])[1]
    return encode(image, "GIF", transparency=paper)


# ------------------------------------------------------------------------------------ TIFF
TIFF_DATA_AT = 8  # pixel data (or anything else) written right after the header


def tiff_by_hand(
    entries: list[tuple[int, int, Sequence[int]]], data: bytes, next_ifd: int | None = 0, *, endian: str = "<"
) -> bytes:
    """A classic TIFF: header, ``data`` at offset 8, then one IFD with its out-of-line values.

    ``entries`` are (tag, type, values) with type 1 (BYTE), 3 (SHORT) or 4 (LONG); ``next_ifd``
    None makes the IFD point at itself.
    """
    fmt = {1: "B", 3: "H", 4: "I"}
    data += b"\0" * (len(data) % 2)
    ifd_at = TIFF_DATA_AT + len(data)
    values_at = ifd_at + 2 + 12 * len(entries) + 4
    table, values = b"", b""
    for tag, kind, items in sorted(entries):
        packed = struct.pack(endian + fmt[kind] * len(items), *items)
        if len(packed) <= 4:
            table += struct.pack(endian + "HHI", tag, kind, len(items)) + packed.ljust(4, b"\0")
        else:
            table += struct.pack(endian + "HHII", tag, kind, len(items), values_at + len(values))
            values += packed + b"\0" * (len(packed) % 2)
    prefix = b"II*\0" if endian == "<" else b"MM\0*"
    following = ifd_at if next_ifd is None else next_ifd
    return (
        prefix
        + struct.pack(endian + "I", ifd_at)
        + data
        + struct.pack(endian + "H", len(entries))
        + table
        + struct.pack(endian + "I", following)
        + values
    )


def gray_tags(width: int, height: int, compression: int = 1) -> list[tuple[int, int, Sequence[int]]]:
    """ImageWidth, ImageLength, BitsPerSample 8, Compression, PhotometricInterpretation BlackIsZero."""
    return [(256, 4, [width]), (257, 4, [height]), (258, 3, [8]), (259, 3, [compression]), (262, 3, [1])]


def tiff_ifd_chain(count: int) -> bytes:
    """``count`` IFDs of a 1x1 gray image, each pointing at the next (issue 8: tens of thousands)."""
    entries = [*gray_tags(1, 1), (273, 4, [TIFF_DATA_AT]), (278, 3, [1]), (279, 4, [1])]
    single = tiff_by_hand(entries, b"\x80")  # no out-of-line values: the IFD ends the file
    first = struct.unpack_from("<I", single, 4)[0]
    table = single[first:-4]
    size = len(table) + 4
    nexts = [first + (index + 1) * size for index in range(count - 1)] + [0]
    return single[:first] + b"".join(table + struct.pack("<I", following) for following in nexts)


def tiff_two_page_loop(digit: int) -> bytes:
    """Two IFDs of the digit pointing at each other."""
    pixels = np.asarray(digit_image(digit).convert("L")).tobytes()
    tags = [*gray_tags(128, 128), (273, 4, [TIFF_DATA_AT]), (278, 3, [128]), (279, 4, [len(pixels)])]
    single = tiff_by_hand(tags, pixels)
    first = struct.unpack_from("<I", single, 4)[0]
    second = len(single)
    # The first IFD points at a copy of itself appended at the end, which points back.
    table_end = first + 2 + 12 * len(tags)
    ifd = single[first:table_end]
    return single[:table_end] + struct.pack("<I", second) + single[table_end + 4 :] + ifd + struct.pack("<I", first)


def tiff_million_strips(strips: int = 1_000_000) -> bytes:
    """A 1 x ``strips`` image, one row per strip, every strip the same byte (issue 8: 6 s to decode).

    Offsets are SHORT and counts BYTE so that a million of them fit in 3 MB.
    """
    data = b"\x80\0"
    offsets_at = TIFF_DATA_AT + len(data)
    counts_at = offsets_at + 2 * strips
    ifd_at = counts_at + strips + strips % 2
    entries = [
        (256, 3, 1, struct.pack("<HH", 1, 0)),
        (257, 4, 1, struct.pack("<I", strips)),
        (258, 3, 1, struct.pack("<HH", 8, 0)),
        (259, 3, 1, struct.pack("<HH", 1, 0)),
        (262, 3, 1, struct.pack("<HH", 1, 0)),
        (273, 3, strips, struct.pack("<I", offsets_at)),
        (278, 3, 1, struct.pack("<HH", 1, 0)),
        (279, 1, strips, struct.pack("<I", counts_at)),
    ]
    out = b"II*\0" + struct.pack("<I", ifd_at) + data
    out += struct.pack(f"<{strips}H", *([TIFF_DATA_AT] * strips)) + b"\x01" * strips + b"\0" * (strips % 2)
    out += struct.pack("<H", len(entries))
    out += b"".join(struct.pack("<HHI", tag, kind, count) + value for tag, kind, count, value in entries)
    return out + struct.pack("<I", 0)


def deflated_zeros(size: int) -> bytes:
    """zlib of ``size`` zero bytes, built without holding them all in memory."""
    compressor, block = zlib.compressobj(9), b"\0" * (1 << 20)
    parts = [compressor.compress(block) for _ in range(size // len(block))]
    parts.append(compressor.compress(b"\0" * (size % len(block))))
    return b"".join(parts) + compressor.flush()


def tiff_tiled(
    size: tuple[int, int], tile: tuple[int, int], tiles: int, tile_data: bytes, compression: int = 8
) -> bytes:
    """A gray TIFF whose ``tiles`` tiles all point at the same ``tile_data``."""
    entries = [*gray_tags(*size, compression), (322, 4, [tile[0]]), (323, 4, [tile[1]])]
    entries += [(324, 4, [TIFF_DATA_AT] * tiles), (325, 4, [len(tile_data)] * tiles)]
    return tiff_by_hand(entries, tile_data)


def tiff_tiled_digit(digit: int, tile: int, compression: int = 1) -> bytes:
    """The gray digit in ``tile`` x ``tile`` tiles, uncompressed (1) or Deflate (8)."""
    pixels = np.asarray(digit_image(digit).convert("L"))
    blobs = [pixels[y : y + tile, x : x + tile].tobytes() for y in range(0, 128, tile) for x in range(0, 128, tile)]
    if compression == 8:
        blobs = [zlib.compress(blob) for blob in blobs]
    offsets = [TIFF_DATA_AT + sum(len(blob) for blob in blobs[:i]) for i in range(len(blobs))]
    entries = [*gray_tags(128, 128, compression), (322, 4, [tile]), (323, 4, [tile])]
    entries += [(324, 4, offsets), (325, 4, [len(blob) for blob in blobs])]
    return tiff_by_hand(entries, b"".join(blobs))


def tiff_strip_per_row(digit: int) -> bytes:
    pixels = np.asarray(digit_image(digit).convert("L"))
    offsets = [TIFF_DATA_AT + 128 * row for row in range(128)]
    entries = [*gray_tags(128, 128), (273, 4, offsets), (278, 3, [1]), (279, 3, [128] * 128)]
    return tiff_by_hand(entries, pixels.tobytes())


def tiff_self_loop(digit: int) -> bytes:
    pixels = np.asarray(digit_image(digit).convert("L")).tobytes()
    tags = [*gray_tags(128, 128), (273, 4, [TIFF_DATA_AT]), (278, 3, [128]), (279, 4, [len(pixels)])]
    return tiff_by_hand(tags, pixels, next_ifd=None)


def tiff_with_orientation(digit: int) -> bytes:
    """Pixels stored turned, with the TIFF Orientation tag 6: must be turned back exactly once."""
    pixels = np.asarray(rotated_for_orientation_6(digit_image(digit)).convert("L")).tobytes()
    tags = [*gray_tags(128, 128), (273, 4, [TIFF_DATA_AT]), (274, 3, [6]), (278, 3, [128])]
    return tiff_by_hand([*tags, (279, 4, [len(pixels)])], pixels)


def tiff_gray_alpha(digit: int, associated: bool) -> bytes:
    """Grayscale + alpha; ExtraSamples 2 (unassociated: PIL mode LA) or 1 (associated: La)."""
    gray, alpha = ink_alpha(digit)
    data = encode(Image.merge("LA", [Image.fromarray(gray), Image.fromarray(alpha)]), "TIFF")
    if associated:
        unassociated = struct.pack("<HHIHH", 338, 3, 1, 2, 0)
        assert data.count(unassociated) == 1
        data = data.replace(unassociated, struct.pack("<HHIHH", 338, 3, 1, 1, 0))
    return data


def tiff_float(digit: int) -> bytes:
    """32-bit float samples in 0..1, the convention of float TIFF and PFM."""
    gray = np.asarray(digit_image(digit).convert("L"), dtype=np.float32) / 255.0
    return encode(Image.fromarray(gray, "F"), "TIFF", compression="tiff_adobe_deflate")


def tiff_16bit(digit: int) -> bytes:
    gray = np.asarray(digit_image(digit).convert("L"), dtype=np.uint16) * 257
    return encode(Image.fromarray(gray), "TIFF", compression="tiff_lzw")


def bigtiff_header() -> bytes:
    return b"II+\0\x08\0\0\0\x10\0\0\0\0\0\0\0" + b"\0" * 64


# ------------------------------------------------------------------------------------ PNM, BMP, WEBP
def pfm_float(digit: int) -> bytes:
    gray = np.asarray(digit_image(digit).convert("L"), dtype=np.float32) / 255.0
    return encode(Image.fromarray(gray, "F"), "PPM")


def pgm_16bit(digit: int) -> bytes:
    gray = np.asarray(digit_image(digit).convert("L"), dtype=">u2") * 257
    return b"P5\n128 128\n65535\n" + gray.astype(">u2").tobytes()


def ppm_plain(digit: int) -> bytes:
    gray = np.asarray(digit_image(digit).convert("L"))
    return b"P2\n128 128\n255\n" + " ".join(str(v) for v in gray.ravel()).encode() + b"\n"


def bmp_rle8(digit: int) -> bytes:
    """An 8-bit BMP whose rows are run-length encoded (BI_RLE8), one run per pixel."""
    gray = np.asarray(digit_image(digit).convert("L"))[::-1]  # BMP rows go bottom-up
    body = b"".join(b"".join(bytes([1, int(v)]) for v in row) + b"\0\0" for row in gray) + b"\0\1"
    palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
    offset = 14 + 40 + len(palette)
    header = b"BM" + struct.pack("<IHHI", offset + len(body), 0, 0, offset)
    info = struct.pack("<IiiHHIIiiII", 40, 128, 128, 1, 8, 1, len(body), 2835, 2835, 256, 0)
    return header + info + palette + body


def webp_claiming_size(width: int, height: int) -> bytes:
    """A lossless WEBP of 16x16 whose header claims ``width`` x ``height`` (38 bytes)."""
    data = encode(Image.new("RGB", (16, 16), "white"), "WEBP", lossless=True)
    at = data.index(b"VP8L") + 9
    bits = int.from_bytes(data[at : at + 4], "little") & ~((1 << 28) - 1) | (width - 1) | ((height - 1) << 14)
    return data[:at] + bits.to_bytes(4, "little") + data[at + 4 :]


def webp_exif_rotated(digit: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(rotated_for_orientation_6(digit_image(digit)), "WEBP", lossless=True, exif=exif.tobytes())


# ------------------------------------------------------------------------------------ the corpus
SCANS = "scans"
STRIPS = "strips"
TILES = "tiles"
SLOW = frozenset({"jpeg_progressive_5000x5000_page", "webp_4000x4000_page", "tiff_lzw_5000x5000_page"})


def _decode_amplification() -> list[Case]:
    zeros_16k_tile = deflated_zeros(16384 * 16384)
    return [
        # --- JPEG ---------------------------------------------------------------------------------------
        Case("jpeg_progressive_20000_scans", progressive_scan_bomb((5000, 5000), 20_000), too_large(SCANS)),
        Case("jpeg_progressive_3000_scans_2048px", progressive_scan_bomb((2048, 2048), 3000), too_large(SCANS)),
        Case(
            "jpeg_progressive_one_scan_over_the_limit",
            progressive_digit_with_scans(6, MAX_JPEG_SCANS + 1),
            too_large(f"{MAX_JPEG_SCANS + 1} scans"),
        ),
        Case(
            "jpeg_million_comments_before_frame",
            jpeg_with_segments_before_frame(7, b"\xff\xfe\x00\x02", 1_000_000),
            too_large("markers before its first scan"),
        ),
        Case("jpeg_4mb_stray_bytes_in_headers", jpeg_with_stray_bytes(7, 4_000_000), too_large("markers")),
        # --- TIFF ---------------------------------------------------------------------------------------
        Case("tiff_ifd_chain_40000", tiff_ifd_chain(40_000), bad(ANIMATED)),
        Case("tiff_two_ifds_pointing_at_each_other", tiff_two_page_loop(4), bad(ANIMATED)),
        Case("tiff_million_strips", tiff_million_strips(), too_large(STRIPS)),
        Case("tiff_strips_one_over_the_limit", tiff_million_strips(MAX_TIFF_STRIPS + 1), too_large(STRIPS)),
        Case(
            "tiff_16384px_tile_on_64px_image",
            tiff_tiled((64, 64), (16384, 16384), 1, zeros_16k_tile),
            too_large("cover 268435456 pixels"),
        ),
        Case(
            "tiff_93750_tiles",
            tiff_tiled((4000, 6000), (16, 16), 93_750, zlib.compress(b"\0" * 256)),
            too_large(TILES),
        ),
        Case("tiff_jpeg_compressed", encode(digit_image(4), "TIFF", compression="jpeg"), unsupported(NOT_ACCEPTED)),
        Case(
            "tiff_ccitt_group4",
            encode(digit_image(4).convert("1"), "TIFF", compression="group4"),
            unsupported(NOT_ACCEPTED),
        ),
        Case("tiff_bigtiff", bigtiff_header(), unsupported("BigTIFF")),
        # --- PNG ----------------------------------------------------------------------------------------
        Case(
            "png_350k_empty_chunks",
            png_with_chunks_after_header(encode(digit_image(3), "PNG"), png_chunk(b"vpAg", b""), 350_000),
            too_large("chunks"),
        ),
        Case(
            "png_80_ztxt_bombs",
            png_with_chunks_after_header(encode(digit_image(3), "PNG"), b"".join(ztxt_bomb(i) for i in range(80)), 1),
            bad("too much memory used in text chunks"),
        ),
        # --- GIF ----------------------------------------------------------------------------------------
        Case("gif_200k_frames", gif_frames(200_000), bad(ANIMATED)),
        Case("gif_comment_of_2m_sub_blocks", gif_with_comment(3, 2_000_000), too_large("data blocks")),
        Case("gif_second_frame_without_data", gif_with_second_frame(3, b",\0\0\0\0\x08\0\x08\0\0\x08"), bad(ANIMATED)),
        # --- PNM, BMP, WEBP -----------------------------------------------------------------------------
        Case(
            "pgm_header_with_4mb_comment",
            b"P5\n#" + b"x" * 4_000_000 + b"\n4 4\n255\n" + b"\x80" * 16,
            too_large("header"),
        ),
        Case("ppm_plain_ascii", ppm_plain(8), unsupported("plain (ASCII) PNM")),
        Case("ppm_pil_test_extension", b"PyRGBA\n4 4\n" + b"\x80" * 64, unsupported(NOT_ACCEPTED)),
        Case("bmp_rle8", bmp_rle8(2), unsupported("RLE8")),
        Case("webp_38_bytes_claiming_5000x5000", webp_claiming_size(5000, 5000), too_large("WEBP image")),
    ]


def _odd_but_valid() -> list[Case]:
    o6 = ORIENTATION_6
    return [
        # --- JPEG: MPO and EXIF -------------------------------------------------------------------------
        Case("mpo_camera_photo_with_preview", mpo(3, preview_digit=8), ok(3)),
        Case("mpo_camera_photo_rotated", mpo(7, preview_digit=1, orientation=6), ok(7)),
        Case(
            "jpeg_exif_rotated_with_text_xresolution",
            jpeg_with_exif(7, exif_block([o6, (0x011A, 2, 4, b"72\0\0")]), stored_rotated=True),
            ok(7),
        ),
        Case(
            "jpeg_exif_rotated_with_short_makernote",
            jpeg_with_exif(7, exif_block([o6], [(0x927C, 3, 3, short(1) + short(2) + short(3))]), stored_rotated=True),
            ok(7),
        ),
        Case(
            "jpeg_exif_rotated_with_unknown_type_vendor_tag",
            jpeg_with_exif(7, exif_block([o6, (0xC4A5, 99, 4, b"abcd")]), stored_rotated=True),
            ok(7),
        ),
        Case(
            "jpeg_exif_orientation_as_long",
            jpeg_with_exif(7, exif_block([(0x0112, 4, 1, struct.pack("<I", 6))]), stored_rotated=True),
            ok(7),
        ),
        Case(
            "jpeg_exif_big_endian_rotated",
            jpeg_with_exif(7, exif_block([(0x0112, 3, 1, short(6, ">"))], endian=">"), stored_rotated=True),
            ok(7),
        ),
        # Unusable orientations mean "as stored": these are stored upright.
        Case(
            "jpeg_exif_orientation_as_text",
            jpeg_with_exif(7, exif_block([(0x0112, 2, 2, b"6\0")]), stored_rotated=False),
            ok(7),
        ),
        Case(
            "jpeg_exif_orientation_99",
            jpeg_with_exif(7, exif_block([(0x0112, 3, 1, short(99))]), stored_rotated=False),
            ok(7),
        ),
        Case(
            "jpeg_exif_ifd_past_the_end",
            jpeg_with_exif(7, b"Exif\0\0II*\0\xff\xff\0\0", stored_rotated=False),
            ok(7),
        ),
        Case("jpeg_cmyk_progressive_rotated", jpeg_cmyk_rotated(2), ok(2)),
        Case("jpeg_progressive_at_the_scan_limit", progressive_digit_with_scans(6, MAX_JPEG_SCANS), ok(6)),
        # --- GIF ----------------------------------------------------------------------------------------
        Case("gif_second_frame_header_cut_off", gif_with_second_frame(3, b",\0\0\0\0"), ok(3)),
        Case("gif_4mb_stray_bytes_after_frame", gif_with_stray_bytes(5, 4_000_000), ok(5)),
        Case("gif_transparent_paper", gif_transparent_paper(9), ok(9)),
        # --- TIFF ---------------------------------------------------------------------------------------
        Case("tiff_gray_alpha", tiff_gray_alpha(4, associated=False), ok(4)),
        Case("tiff_gray_premultiplied_alpha", tiff_gray_alpha(4, associated=True), ok(4)),
        Case("tiff_16bit_gray_lzw", tiff_16bit(1), ok(1)),
        Case("tiff_float_0_to_1_deflate", tiff_float(2), ok(2)),
        Case("tiff_int32", encode(digit_image(5).convert("I"), "TIFF"), ok(5)),
        Case("tiff_cmyk_packbits", encode(digit_image(6).convert("CMYK"), "TIFF", compression="packbits"), ok(6)),
        Case("tiff_1bit", encode(digit_image(0).convert("1"), "TIFF"), ok(0)),
        Case("tiff_rgba_deflate", encode(digit_image(9).convert("RGBA"), "TIFF", compression="tiff_deflate"), ok(9)),
        Case("tiff_tiled_64px", tiff_tiled_digit(8, 64), ok(8)),
        Case("tiff_tiled_32px_deflate", tiff_tiled_digit(9, 32, compression=8), ok(9)),
        Case("tiff_one_strip_per_row", tiff_strip_per_row(3), ok(3)),
        Case("tiff_ifd_pointing_at_itself", tiff_self_loop(4), ok(4)),
        Case("tiff_orientation_tag", tiff_with_orientation(7), ok(7)),
        # --- PNG ----------------------------------------------------------------------------------------
        Case("png_gray_alpha", encode(Image.merge("LA", [Image.fromarray(a) for a in ink_alpha(1)]), "PNG"), ok(1)),
        Case("png_16bit_rgba", png_16bit_rgba(2), ok(2)),
        Case("png_16bit_gray_alpha", png_16bit_gray_alpha(5), ok(5)),
        Case("png_image_data_in_64_byte_chunks", png_idat_split(encode(digit_image(6), "PNG"), 64), ok(6)),
        Case(
            "png_exif_rotated",
            encode(rotated_for_orientation_6(digit_image(7)), "PNG", exif=exif_block([o6])[6:]),
            ok(7),
        ),
        # --- PNM, BMP, WEBP -----------------------------------------------------------------------------
        Case("pfm_float_0_to_1", pfm_float(3), ok(3)),
        Case("pgm_16bit", pgm_16bit(4), ok(4)),
        Case("pbm_binary", encode(digit_image(5).convert("1"), "PPM"), ok(5)),
        Case("bmp_1bit", encode(digit_image(6).convert("1"), "BMP"), ok(6)),
        Case("bmp_32bit_with_alpha", encode(digit_image(8).convert("RGBA"), "BMP"), ok(8)),
        Case(
            "webp_lossless_transparent_paper",
            encode(
                Image.merge("LA", [Image.fromarray(a) for a in ink_alpha(0)]).convert("RGBA"), "WEBP", lossless=True
            ),
            ok(0),
        ),
        Case("webp_exif_rotated", webp_exif_rotated(7), ok(7)),
        # --- big images at the limits (each must still answer within the 2 s) -------------------------
        Case(
            "jpeg_progressive_5000x5000_page",
            encode(digit_page(7, (5000, 5000)), "JPEG", progressive=True, quality=90),
            ok(7),
        ),
        Case("webp_4000x4000_page", encode(digit_page(2, (4000, 4000)), "WEBP", lossless=True), ok(2)),
        Case("tiff_lzw_5000x5000_page", encode(digit_page(4, (5000, 5000)), "TIFF", compression="tiff_lzw"), ok(4)),
    ]


@cache
def corpus() -> tuple[Case, ...]:
    cases = (*_decode_amplification(), *_odd_but_valid())
    names = [case.name for case in cases]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    assert not duplicates, f"duplicate case names: {duplicates}"
    too_big = [case.name for case in cases if len(case.payload) > 4_500_000]
    assert not too_big, f"over 4.5 MB (base64 would not fit the frontend's request limit): {too_big}"
    return cases
