"""Fuzzing request parsing, decoding and the digits preprocessing: a tensor or a typed 4xx, nothing else.

The pipeline a worker runs for one request (``protocols.decode`` -> ``parse_topk`` ->
``decode_image`` -> ``ImagePreprocessor`` with the digits spec from models.yaml) must, for ANY
input, either return a finite float tensor of the model's input shape or raise ``InvalidInput``
(400), ``PayloadTooLarge`` (413) or ``UnsupportedMediaType`` (415) with a short ASCII message.
Any other exception would be a 500 (or, in TorchServe, a dead worker).

Inputs: random bytes, random bytes behind the signature of each accepted format, random
mutations of valid PNG/JPEG/MPO/GIF/BMP/TIFF/WEBP/PNM files (with PNG CRCs recomputed too, so
the mutated headers are believed; EXIF, tiled TIFF and multi-frame seeds exercise the structural
walks of the decode budget), random JSON-ish documents and request dicts, and valid images of
random size, mode and format. Then every case of ``tests/hostile_corpus.py`` and of
``tests/hostile_corpus_decode.py`` in process, with its expected status (the second corpus also
within 2 s each).

Deterministic by default (the same examples every run, no example database; hypothesis's
other files go to a temp directory, not the checkout). For a deeper, random run:
``FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest tests/unit/test_fuzz_decode.py``.

Regression: ``transforms.ImagePreprocessor._fit_content`` once padded the ink's box to a
max(w, h)-sided square before scaling, so a thin image (a 200,000 x 1 PNG of 276 bytes, or a PNG
whose IHDR claims far more rows than it holds, which PIL fills with black) cost max(w, h)^2 pixels,
up to an OOM kill. It now scales first; the test at the end measures what it allocates.
It also works on the 256 gray levels instead of full-size float32 arrays (several hundred MB for
a 25-megapixel page): a property test checks it gives exactly the pixels of the float version.
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import tempfile
import time
import tracemalloc
import zlib
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from PIL import Image

from handlers import protocols
from handlers.errors import MAX_MESSAGE_CHARS, HandlerError, InvalidInput, PayloadTooLarge, UnsupportedMediaType
from handlers.image_io import decode_image, parse_topk
from handlers.transforms import ImagePreprocessor, Preprocessing
from servekit.build.spec import load_spec
from tests import hostile_corpus_decode
from tests.conftest import REPO_ROOT
from tests.hostile_corpus import (
    RAW,
    Case,
    corpus,
    digit_image,
    encode,
    handler_request,
    png_build,
    png_chunks,
    png_with_ihdr,
)
from tests.hostile_corpus_decode import (
    ORIENTATION_6,
    digit_page,
    exif_block,
    jpeg_with_exif,
    mpo,
    tiff_gray_alpha,
    tiff_tiled_digit,
)

if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "servekit-hypothesis")

# PIL warns (UserWarning) about the corrupt TIFF/EXIF data the fuzzer feeds it: expected here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TYPED_ERRORS = {InvalidInput: 400, PayloadTooLarge: 413, UnsupportedMediaType: 415}

_RANDOM_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "0"))


def fuzz(examples: int) -> settings:
    """Bounded and derandomized unless FUZZ_EXAMPLES asks for a random run of that size."""
    return settings(
        max_examples=_RANDOM_EXAMPLES or examples,
        derandomize=not _RANDOM_EXAMPLES,
        database=None,
        deadline=5000,  # ms per example: the first one imports PIL plugins
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


@cache
def digits_spec():
    return next(s for s in load_spec(REPO_ROOT / "models.yaml") if s.name == "digits")


@cache
def preprocessor() -> ImagePreprocessor:
    return ImagePreprocessor(digits_spec().preprocessing)


def is_thin(image: Image.Image) -> bool:
    """Whether padding the image to a square would cost over 4 Mpx and 16x the image itself."""
    width, height = image.size
    return max(width, height) ** 2 > max(16 * width * height, 4_000_000)


def pipeline(request: dict) -> torch.Tensor:
    """What ``ImageClassifier.decode`` + ``prepare`` do with one request (no model needed)."""
    spec = digits_spec()
    call = protocols.decode(request, {}, spec.protocol, spec.preprocessing.input_shape)
    if call.topk is not None:
        parse_topk(call.topk, len(spec.labels))
    (payload,) = call.images  # servekit's own forms carry one image
    image = decode_image(payload, spec.limits)
    return preprocessor()(image)


def outcome(request: dict) -> torch.Tensor | HandlerError:
    """Run the pipeline: a valid tensor or a typed 4xx error; anything else fails the test."""
    try:
        result: torch.Tensor | HandlerError = pipeline(request)
    except HandlerError as exc:
        result = exc
    if isinstance(result, HandlerError):
        assert type(result) in TYPED_ERRORS, f"{type(result).__name__}: {result.message}"
        assert result.status == TYPED_ERRORS[type(result)]
        assert result.message
        assert result.message.isascii()
        assert len(result.message) <= MAX_MESSAGE_CHARS
        return result
    assert isinstance(result, torch.Tensor)
    assert tuple(result.shape) == digits_spec().preprocessing.input_shape
    assert result.dtype == torch.float32
    assert bool(torch.isfinite(result).all())
    return result


# ------------------------------------------------------------------------------------ seeds
@cache
def seeds() -> dict[str, bytes]:
    """Small valid files of every accepted format (small: so mutations reach the pixel data)."""
    image = digit_image(4).resize((24, 24))
    return {
        "PNG": encode(image, "PNG"),
        "PNG-L": encode(image.convert("L"), "PNG"),
        "PNG-P": encode(image.convert("P"), "PNG"),
        "JPEG": encode(image, "JPEG", quality=80),
        "JPEG-progressive": encode(image, "JPEG", quality=80, progressive=True),
        "GIF": encode(image, "GIF"),
        "BMP": encode(image, "BMP"),
        "TIFF": encode(image, "TIFF"),
        "TIFF-deflate": encode(image, "TIFF", compression="tiff_adobe_deflate"),
        "WEBP": encode(image, "WEBP", quality=80),
        "PPM": encode(image, "PPM"),
        "PFM": encode(image.convert("F"), "PPM"),
        # The structures the decode budget walks: EXIF, MPO frames, tiles, IFDs, GIF blocks.
        "JPEG-exif": jpeg_with_exif(4, exif_block([ORIENTATION_6, (0x011A, 2, 4, b"72\0\0")]), True),
        "MPO": mpo(4, preview_digit=1),
        "TIFF-tiled-deflate": tiff_tiled_digit(4, 64, compression=8),
        "TIFF-LA": tiff_gray_alpha(4, associated=True),
        "GIF-2-frames": encode(image, "GIF", save_all=True, append_images=[image.rotate(90)]),
    }


SIGNATURES = [
    b"\x89PNG\r\n\x1a\n",
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR",
    b"\xff\xd8\xff",
    b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"P5\n",
    b"P6\n24 24\n255\n",
    b"P4\n",
    b"Pf\n",
    b"P2\n",
    b"II+\x00",
    b"MM\x2a\x00",
    b"II*\x00\x08\x00\x00\x00",
    b"GIF89a\x10\x00\x10\x00\x80\x00\x00",
    b"BM\x00\x00\x00\x00\x00\x00\x00\x00\x36\x00\x00\x00\x28\x00\x00\x00",
]


@st.composite
def mutated(draw: st.DrawFn, formats: tuple[str, ...] | None = None) -> bytes:
    """A seed file with 1-4 random edits: flipped bits, overwritten bytes, cuts, insertions."""
    name = draw(st.sampled_from(formats or sorted(seeds())))
    data = bytearray(seeds()[name])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[pos] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF]))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
    return bytes(data)


def fix_png_crcs(data: bytes) -> bytes | None:
    """Recompute every chunk CRC, so PIL believes the mutated chunks (None if unparseable)."""
    try:
        return png_build(png_chunks(data))
    except (AssertionError, struct.error):
        return None


@st.composite
def mutated_png_with_valid_crcs(draw: st.DrawFn) -> bytes:
    """A PNG whose IHDR/IDAT bytes are edited and whose CRCs are then made right again."""
    chunks = png_chunks(seeds()[draw(st.sampled_from(["PNG", "PNG-L", "PNG-P"]))])
    index = draw(st.integers(0, len(chunks) - 1))
    kind, body = chunks[index]
    body = bytearray(body)
    for _ in range(draw(st.integers(1, 3))):
        if body:
            body[draw(st.integers(0, len(body) - 1))] = draw(st.integers(0, 255))
    chunks[index] = (kind, bytes(body))
    return png_build(chunks)


json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@st.composite
def json_documents(draw: st.DrawFn) -> object:
    """JSON-ish documents, often shaped like a request: image fields with good, odd or bad values."""
    image_field = draw(st.sampled_from(["data", "image", "b64", "Data", "img"]))
    good = base64.b64encode(seeds()["PNG"]).decode()
    value = draw(
        st.sampled_from([good, "data:image/png;base64," + good, good[:-2], good + "=", " " + good + "\n"])
        | st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode())
        | st.builds(lambda m: base64.b64encode(m).decode(), mutated())
        | json_values
    )
    document = {image_field: value}
    if draw(st.booleans()):
        document["topk"] = draw(st.integers(-3, 13) | st.text(max_size=6) | json_values)
    return draw(st.just(document) | json_values)


# ------------------------------------------------------------------------------------ properties
@fuzz(300)
@given(payload=st.binary(max_size=2048), field=st.sampled_from(["body", "data", "file", "image"]))
def test_random_bytes(payload: bytes, field: str) -> None:
    outcome({field: payload})


@fuzz(300)
@given(signature=st.sampled_from(SIGNATURES), rest=st.binary(max_size=512))
def test_random_bytes_behind_an_image_signature(signature: bytes, rest: bytes) -> None:
    outcome({"body": signature + rest})


@fuzz(400)
@given(payload=mutated())
def test_mutated_images(payload: bytes) -> None:
    outcome({"body": payload})


@fuzz(150)
@given(payload=mutated(("PNG", "PNG-L", "PNG-P")))
def test_mutated_png_with_crcs_fixed_afterwards(payload: bytes) -> None:
    fixed = fix_png_crcs(payload)
    assume(fixed is not None)
    outcome({"body": fixed})


@fuzz(150)
@given(payload=mutated_png_with_valid_crcs())
def test_png_chunks_edited_with_valid_crcs(payload: bytes) -> None:
    outcome({"body": payload})


@fuzz(300)
@given(document=json_documents(), as_text=st.sampled_from(["parsed", "bytes", "str"]))
def test_json_documents(document: object, as_text: str) -> None:
    # TorchServe hands an application/json body over parsed; text/* as str; anything else as bytes.
    if as_text == "parsed":
        request = {"body": document}
    else:
        text = json.dumps(document)
        request = {"body": text.encode() if as_text == "bytes" else text}
    outcome(request)


request_values = (
    st.binary(max_size=64) | st.text(max_size=16) | json_values | st.sampled_from([seeds()["PNG"], bytearray(b"")])
)


@fuzz(200)
@given(request=st.dictionaries(st.sampled_from(["body", "data", "file", "image", "topk", "x"]), request_values))
def test_request_dicts_of_any_shape(request: dict) -> None:
    outcome(request)


MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "I", "I;16", "F"]
FORMATS = ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM"]


@fuzz(200)
@given(
    mode=st.sampled_from(MODES),
    fmt=st.sampled_from(FORMATS),
    width=st.integers(1, 48),
    height=st.integers(1, 48),
    seed=st.integers(0, 2**16),
    fill=st.sampled_from(["noise", "uniform", "stripe"]),
)
def test_valid_images_of_any_mode_size_and_format(
    mode: str, fmt: str, width: int, height: int, seed: int, fill: str
) -> None:
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    if fill == "uniform":
        rgba[:] = rgba[0, 0]
    elif fill == "stripe":
        rgba[:] = 255
        rgba[:, : max(1, width // 3), :3] = 0
    image = Image.fromarray(rgba, "RGBA")
    image = image.convert(mode) if mode not in ("I", "I;16", "F") else image.convert("L").convert(mode)
    try:
        data = encode(image, fmt)
    except (OSError, ValueError, KeyError):
        assume(False)  # this format cannot store this mode
    result = outcome({"body": data})
    if isinstance(result, HandlerError):
        # A valid image can only be refused for having nothing to read in it.
        assert isinstance(result, InvalidInput), result.message
        assert "no visible content" in result.message


# ------------------------------------------------------------------------------------ the corpus, in process
def _corpus_params() -> list:
    return [
        pytest.param(case, form, id=f"{form}-{case.name}")
        for case in corpus()
        if case.modelled_in_process
        for form in case.forms
    ]


@pytest.mark.parametrize(("case", "form"), _corpus_params())
def test_hostile_corpus_in_process(case: Case, form: str) -> None:
    result = outcome(handler_request(case, form))
    expect = case.expect
    if expect.status == 200:
        assert isinstance(result, torch.Tensor), f"expected a tensor, got {result!r}"
        return
    assert isinstance(result, HandlerError), f"expected {expect.status}, got a tensor"
    assert (result.status, type(result).__name__) == (expect.status, expect.error_type), result.message
    assert expect.message.lower() in result.message.lower()


# ------------------------------------------------------------------------------------ the decode corpus, in process
DECODE_BUDGET_S = 2.0


@pytest.mark.parametrize("case", hostile_corpus_decode.corpus(), ids=lambda case: case.name)
def test_decode_corpus_in_process_within_two_seconds(case: Case) -> None:
    # The raw form only: the other forms change how the bytes arrive, not how they decode.
    started = time.monotonic()
    result = outcome(handler_request(case, RAW))
    elapsed = time.monotonic() - started

    expect = case.expect
    if expect.status == 200:
        assert isinstance(result, torch.Tensor), f"expected a tensor, got {result!r}"
    else:
        assert isinstance(result, HandlerError), f"expected {expect.status}, got a tensor"
        assert (result.status, type(result).__name__) == (expect.status, expect.error_type), result.message
        assert expect.message.lower() in result.message.lower()
    assert elapsed < DECODE_BUDGET_S, f"{elapsed:.2f} s"


# ------------------------------------------------------------------------------------ lean fit_content
def fit_content_in_float32(image: Image.Image, crop: int, margin: int) -> Image.Image:
    """``ImagePreprocessor._fit_content`` as it was before it worked on gray levels (the reference)."""
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    lo, hi = float(gray.min()), float(gray.max())
    stretched = (np.asarray(image, dtype=np.float32) - lo) * (255.0 / (hi - lo))
    image = Image.fromarray(np.clip(stretched, 0, 255).astype(np.uint8), image.mode)
    ys, xs = np.nonzero((gray - lo) > 0.35 * (hi - lo))
    content = image.crop((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
    inner = crop - 2 * margin
    w, h = content.size
    side = max(w, h)
    size = (max(1, round(w * inner / side)), max(1, round(h * inner / side)))
    scaled = content.resize(size, Image.Resampling.BILINEAR)
    canvas = Image.new(image.mode, (crop, crop), 0)
    canvas.paste(scaled, (margin + (inner - size[0]) // 2, margin + (inner - size[1]) // 2))
    return canvas


@fuzz(200)
@given(
    mode=st.sampled_from(["L", "RGB"]),
    width=st.integers(1, 40),
    height=st.integers(1, 40),
    seed=st.integers(0, 2**16),
    levels=st.tuples(st.integers(0, 255), st.integers(0, 255)),
)
def test_fit_content_gives_the_pixels_of_the_float32_version(
    mode: str, width: int, height: int, seed: int, levels: tuple[int, int]
) -> None:
    lo, hi = sorted(levels)
    bands = 3 if mode == "RGB" else 1
    pixels = np.random.default_rng(seed).integers(lo, hi + 1, (height, width, bands), dtype=np.uint8)
    image = Image.fromarray(pixels if bands == 3 else pixels[..., 0], mode)
    gray = np.asarray(image.convert("L"))
    assume(int(gray.max()) - int(gray.min()) >= 16)  # else both refuse it as blank
    params = Preprocessing(
        color_mode=mode, resize=None, crop=16, margin=2, fit_content=True, mean=(0.1,) * bands, std=(0.25,) * bands
    )

    lean = ImagePreprocessor(params)._fit_content(image)

    assert np.array_equal(np.asarray(lean), np.asarray(fit_content_in_float32(image, crop=16, margin=2)))


def test_preprocessing_a_25_megapixel_page_allocates_no_full_size_float_arrays() -> None:
    # The float32 version allocated four 100 MB arrays for this page (numpy reports to tracemalloc;
    # PIL's own image memory is not counted here).
    image = digit_page(7, (5000, 5000)).convert("RGB")
    tracemalloc.start()
    try:
        tensor = preprocessor()(image)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert tuple(tensor.shape) == (1, 16, 16)
    assert peak < 60 * 2**20, f"{peak / 2**20:.0f} MB"


# ------------------------------------------------------------------------------------ thin images
def thin_png() -> bytes:
    row = np.full((1, 4000), 255, np.uint8)
    row[0, 0] = row[0, -1] = 0  # ink at both ends: the ink box is the whole row
    return encode(Image.fromarray(row), "PNG")


def short_png() -> bytes:
    """A 24 x 24 PNG whose IHDR (CRC fixed) claims 4000 rows: PIL decodes the rest as black."""
    return png_with_ihdr(seeds()["PNG-L"], height=4000)


@pytest.mark.parametrize("payload", [thin_png(), short_png()], ids=["real_4000x1_png", "png_header_claims_4000_rows"])
def test_preprocessing_allocates_nothing_much_bigger_than_its_input(
    monkeypatch: pytest.MonkeyPatch, payload: bytes
) -> None:
    # 4000 rows or columns: the old pad-first code allocated a 16 Mpx square here.
    allocated: list[int] = []
    new = Image.new

    def recording_new(mode, size, *args, **kwargs):
        allocated.append(size[0] * size[1])
        return new(mode, size, *args, **kwargs)

    monkeypatch.setattr(Image, "new", recording_new)
    image = decode_image(payload, digits_spec().limits)
    assert is_thin(image)
    outcome({"body": payload})

    width, height = image.size
    crop = digits_spec().preprocessing.crop
    assert max(allocated) <= max(width * height, crop * crop), f"a {max(allocated)} pixel image for {width}x{height}"


def test_fuzz_helpers_produce_what_they_claim() -> None:
    # The CRC fixer really makes an edited PNG readable, and a seed really decodes.
    png = seeds()["PNG"]
    chunks = png_chunks(png)
    assert chunks[0][0] == b"IHDR"
    edited = bytearray(png)
    edited[16:20] = struct.pack(">I", 7)  # width 7, CRC now wrong
    assert zlib.crc32(bytes(edited[12:29])) != struct.unpack(">I", edited[29:33])[0]
    fixed = fix_png_crcs(bytes(edited))
    assert Image.open(io.BytesIO(fixed)).size == (7, 24)
    for name, data in seeds().items():
        result = outcome({"body": data})
        if name == "GIF-2-frames":  # a seed for the frame walk: refused as it is
            assert isinstance(result, InvalidInput)
            assert "multi-frame" in result.message
        else:
            assert isinstance(result, torch.Tensor), name
