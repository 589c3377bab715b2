"""Camera-sized photos: photo-like JPEGs rendered here, and what DCT-scaled decoding saves on them.

Nothing is downloaded. ``photo_like`` renders a scene with the parts of a photograph that matter
to a decoder and a resize: smooth lighting and colour gradients, multi-scale texture, hard-edged
objects softened by a lens blur, fine gratings (fabric, grass), thin lines and sensor grain.
At 4000x3000 and JPEG quality 90 it is about 3.0 MB, like a phone photo. ``digit_photo`` puts one
held-out digit on a sheet of paper photographed under uneven light.

    python -m servekit.perf.photos speed [--seconds 1] [--rounds 5] [--program model.pt] [--out speed.json]
    python -m servekit.perf.photos accuracy [--mar model_store/digits_v1.0.mar] [--sweep 100] [--out accuracy.json]

``speed`` measures decode + preprocess (1 and 2 threads) for 640x480 and 4000x3000 JPEGs, full
decode ("before") and DCT-scaled decode ("after"), an INT8 ResNet-18 program's inference time per
image at batch 8, and the served rate ratio they imply; ``camera_photo_report`` is the same as a
function, for ``make bench``. ``accuracy`` measures how far the DCT-scaled path's tensors are from
the full decode's on camera-sized photos, and the digits archives' top-1 on the held-out digits
photographed (docs/decoding.md).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageDraw, ImageFilter

from handlers.image_io import DecodeLimits, decode_image
from handlers.transforms import ImagePreprocessor, Preprocessing

# Displayed sizes of the camera photos: a 12-megapixel phone photo, landscape and portrait (stored
# as 4000x3000 with EXIF orientation 6, as phones store them), full HD, VGA.
CAMERA_SIZES = ((4000, 3000), (3000, 4000), (1920, 1080), (640, 480))
IMAGENET = Preprocessing(resize=256, crop=224)
# How a camera stores a displayed image for each EXIF orientation: the inverse of what a viewer applies.
_ORIENTATION_STORED = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


# ------------------------------------------------------------------------------------------ rendering
def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """A synthetic RGB photograph of ``width`` x ``height`` (the scene scales with the size, the grain does not)."""
    rng = np.random.default_rng(seed)
    scale = min(width, height) / 3000.0

    def smooth(cells_x: int, cells_y: int, mode: str = "RGB") -> Image.Image:
        shape = (cells_y, cells_x, 3) if mode == "RGB" else (cells_y, cells_x)
        if mode == "RGB":
            small = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), "RGB")
        else:
            small = Image.fromarray(rng.normal(0, 1, shape).astype(np.float32), "F")
        return small.resize((width, height), Image.Resampling.BICUBIC)

    image = smooth(4, 3)  # lighting and colour
    draw = ImageDraw.Draw(image)
    side = min(width, height)
    for _ in range(40):  # objects with hard edges
        kind, colour = int(rng.integers(3)), tuple(int(c) for c in rng.integers(0, 256, 3))
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), side * rng.uniform(0.03, 0.25)
        if kind == 0:
            draw.ellipse((cx - r, cy - r * rng.uniform(0.4, 1.0), cx + r, cy + r), fill=colour)
        elif kind == 1:
            angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 8))))
            draw.polygon([(cx + r * np.cos(a) * rng.uniform(0.5, 1), cy + r * np.sin(a) * rng.uniform(0.5, 1))
                          for a in angles], fill=colour)  # fmt: skip
        else:
            end = (cx + rng.uniform(-3, 3) * r, cy + rng.uniform(-3, 3) * r)
            draw.line((cx, cy, *end), fill=colour, width=max(1, round(side * rng.uniform(0.0005, 0.01))))
    image = image.filter(ImageFilter.GaussianBlur(max(0.4, 0.8 * scale)))  # the lens
    array = np.asarray(image, dtype=np.float32).copy()
    for cells, amplitude in ((32, 18.0), (128, 12.0), (512, 8.0)):  # texture, coarse to fine
        layer = np.asarray(smooth(max(2, round(cells * width / 4000)), max(2, round(cells * height / 4000)), "F"))
        array += amplitude * layer[:, :, None]
    for _ in range(6):  # fine gratings: fabric, grass, fences (near the decoded image's Nyquist)
        w, h = int(side * rng.uniform(0.05, 0.2)), int(side * rng.uniform(0.05, 0.2))
        x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        period, angle = max(2.5, rng.uniform(3.0, 10.0) * scale), rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        wave = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
        array[y : y + h, x : x + w] += rng.uniform(20, 50) * wave[:, :, None]
    array += rng.normal(0, 4.5, (height, width, 1)).astype(np.float32)  # grain
    np.clip(array, 0, 255, out=array)
    return Image.fromarray(array.astype(np.uint8), "RGB")


def encode_jpeg(displayed: Image.Image, quality: int = 90, orientation: int = 1) -> bytes:
    """``displayed`` as a JPEG whose pixels are stored rotated, with the EXIF orientation that undoes it."""
    method = _ORIENTATION_STORED[orientation]
    stored = displayed if method is None else displayed.transpose(method)
    params: dict = {"quality": quality}
    if orientation != 1:
        exif = Image.Exif()
        exif[ExifTags.Base.Orientation] = orientation
        params["exif"] = exif.tobytes()
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", **params)
    return buffer.getvalue()


def camera_jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    """A photo-like JPEG displayed at ``width`` x ``height``; portrait ones stored landscape + EXIF 6."""
    return encode_jpeg(photo_like(width, height, seed), quality, orientation=6 if height > width else 1)


def paper(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A sheet of off-white paper under uneven light, with grain: uint8 RGB, ``height`` x ``width`` x 3."""
    rng = np.random.default_rng(seed)
    light = Image.fromarray(rng.uniform(-1, 1, (3, 4)).astype(np.float32), "F").resize(
        (width, height), Image.Resampling.BICUBIC
    )
    array = np.empty((height, width, 3), np.float32)
    array[:] = (232.0, 226.0, 214.0)
    array += 14.0 * np.asarray(light)[:, :, None]
    array += rng.normal(0, 3.0, (height, width, 1)).astype(np.float32)
    np.clip(array, 0, 255, out=array)
    return array.astype(np.uint8)


def digit_photo_image(cells: np.ndarray, sheet: np.ndarray, digit_fraction: float, seed: int = 0) -> Image.Image:
    """One 8x8 digit written on ``sheet`` (from ``paper``), its square ``digit_fraction`` of the shorter side."""
    from servekit.build.datasets import render_digit

    rng = np.random.default_rng(seed)
    height, width = sheet.shape[:2]
    side = max(8, round(digit_fraction * min(width, height)))
    coverage = 1.0 - np.asarray(render_digit(cells, side), np.float32)[:, :, None] / 255.0  # ink amount 0..1
    x, y = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
    ink = np.array((35.0, 40.0, 85.0), np.float32)  # blue-black pen
    region = sheet[y : y + side, x : x + side].astype(np.float32)
    region += coverage * (ink - region)
    photo = Image.fromarray(sheet, "RGB").copy()  # the sheet itself is left as it is
    photo.paste(Image.fromarray(np.clip(region, 0, 255).astype(np.uint8), "RGB"), (x, y))
    return photo


def digit_photo(
    cells: np.ndarray, sheet: np.ndarray, digit_fraction: float, seed: int = 0, quality: int = 90, orientation: int = 1
) -> bytes:
    """``digit_photo_image`` as a JPEG (stored rotated, with the EXIF orientation that undoes it)."""
    return encode_jpeg(digit_photo_image(cells, sheet, digit_fraction, seed), quality, orientation)


# ------------------------------------------------------------------------------------------ accuracy
def preprocessed(payload: bytes, preprocessor: ImagePreprocessor, min_side: int | None) -> torch.Tensor:
    return preprocessor(decode_image(payload, DecodeLimits(), min_side))


def tensor_difference(payload: bytes, preprocessing: Preprocessing, min_side: int | None = -1) -> dict:
    """Max and mean absolute difference (normalised units) of the DCT-scaled path from the full decode.

    ``min_side`` -1 means the preprocessing's own ``min_decode_side``.
    """
    preprocessor = ImagePreprocessor(preprocessing)
    side = preprocessor.min_decode_side if min_side == -1 else min_side
    full = preprocessed(payload, preprocessor, None)
    scaled = preprocessed(payload, preprocessor, side)
    with Image.open(io.BytesIO(payload)) as image:
        stored = image.size
    decoded = decode_image(payload, DecodeLimits(), side).size
    difference = (scaled - full).abs()
    return {
        "stored": list(stored),
        "decoded": list(decoded),
        "scale": f"1/{round(max(stored) / max(decoded))}",
        "max_abs": round(difference.max().item(), 4),
        "mean_abs": round(difference.mean().item(), 5),
    }


def camera_tolerance(
    preprocessing: Preprocessing = IMAGENET, sizes=CAMERA_SIZES, seeds: tuple[int, ...] = (1, 2, 3), log=print
) -> list[dict]:
    """``tensor_difference`` on photo-like JPEGs (quality 90) of each size and seed, next to the JPEG's own error.

    ``jpeg_*``: the full decode against the lossless photo it was encoded from, for scale.
    """
    preprocessor, rows = ImagePreprocessor(preprocessing), []
    for seed in seeds:
        for width, height in sizes:
            displayed = photo_like(width, height, seed)
            payload = encode_jpeg(displayed, 90, orientation=6 if height > width else 1)
            row = {"size": f"{width}x{height}", "seed": seed, "bytes": len(payload)}
            row.update(tensor_difference(payload, preprocessing))
            jpeg = (preprocessed(payload, preprocessor, None) - preprocessor(displayed)).abs()
            row["jpeg_max_abs"], row["jpeg_mean_abs"] = round(jpeg.max().item(), 4), round(jpeg.mean().item(), 5)
            log(f"camera {row}")
            rows.append(row)
    return rows


def camera_scale_sweep(
    preprocessing: Preprocessing = IMAGENET, sizes=CAMERA_SIZES, seeds: tuple[int, ...] = (1, 2, 3), log=print
) -> list[dict]:
    """Every DCT scale forced on the camera photos: the difference against the decoded size / ``resize`` (k)."""
    preprocessor, rows = ImagePreprocessor(preprocessing), []
    for seed in seeds:
        for width, height in sizes:
            payload = encode_jpeg(photo_like(width, height, seed), 90, orientation=6 if height > width else 1)
            full = preprocessed(payload, preprocessor, None)
            shorter = min(width, height)
            for scale in (2, 4, 8):
                if shorter // scale < preprocessing.crop:
                    continue
                difference = (preprocessed(payload, preprocessor, shorter // scale) - full).abs()
                row = {
                    "size": f"{width}x{height}",
                    "seed": seed,
                    "scale": f"1/{scale}",
                    "k": round(-(-shorter // scale) / (preprocessing.resize or shorter), 2),
                    "max_abs": round(difference.max().item(), 4),
                    "mean_abs": round(difference.mean().item(), 5),
                }
                log(f"camera sweep {row}")
                rows.append(row)
    return rows


# Held-out digits as photos: paper of each size (3000x4000 stored landscape with EXIF orientation 6),
# the digit's square a fraction of the shorter side.
DIGIT_LAYOUTS = ((4000, 3000), (3000, 4000), (1920, 1080), (640, 480))
DIGIT_FRACTIONS = (0.5, 0.25, 0.125, 0.0625)


def load_archive_program(mar: Path) -> Callable:
    """An archive's program, loaded as its worker loads it (its ``handler:`` settings)."""
    import tempfile
    import zipfile

    import yaml

    from handlers.config import HandlerConfig
    from handlers.model_loading import load_model

    with zipfile.ZipFile(mar) as archive, tempfile.TemporaryDirectory() as tmp:
        program = Path(tmp) / "model.pt"
        program.write_bytes(archive.read("model.pt"))
        config = HandlerConfig.from_dict(yaml.safe_load(archive.read("model-config.yaml")).get("handler"))
        return load_model(program, config)


@torch.inference_mode()
def _labels(program: Callable, tensors: list[torch.Tensor]) -> np.ndarray:
    return np.concatenate(
        [program(torch.stack(tensors[i : i + 64])).argmax(1).numpy() for i in range(0, len(tensors), 64)]
    )


def digits_photo_evaluation(
    programs: dict[str, Callable], preprocessing: Preprocessing, count: int | None = None, log=print
) -> dict:
    """The held-out digits as photos, through full and DCT-scaled decoding: top-1 and agreement per program.

    Image ``i`` is on ``DIGIT_LAYOUTS[i % 4]`` at ``DIGIT_FRACTIONS[(i // 4) % 4]``, so every layout
    meets every fraction. ``lossless`` is the photo before JPEG encoding, for scale.
    """
    from servekit.build.datasets import _digits_arrays

    _, cells, _, truth = _digits_arrays()
    count = len(truth) if count is None else count
    preprocessor = ImagePreprocessor(preprocessing)
    sheets = {layout: paper(*layout, seed=n) for n, layout in enumerate(DIGIT_LAYOUTS)}
    tensors: dict[str, list[torch.Tensor]] = {"lossless": [], "full": [], "scaled": []}
    conditions = []
    for i in range(count):
        (width, height), fraction = DIGIT_LAYOUTS[i % 4], DIGIT_FRACTIONS[(i // 4) % 4]
        displayed = digit_photo_image(cells[i], sheets[(width, height)], fraction, seed=i)
        payload = encode_jpeg(displayed, 90, orientation=6 if height > width else 1)
        tensors["lossless"].append(preprocessor(displayed))
        tensors["full"].append(preprocessed(payload, preprocessor, None))
        tensors["scaled"].append(preprocessed(payload, preprocessor, preprocessor.min_decode_side))
        conditions.append((f"{width}x{height}", fraction))
        if (i + 1) % 50 == 0:
            log(f"digits: {i + 1}/{count} photos")
    labels = np.asarray(truth[:count])
    scaled_vs_full = [(a - b).abs() for a, b in zip(tensors["scaled"], tensors["full"], strict=True)]
    full_vs_lossless = [(a - b).abs() for a, b in zip(tensors["full"], tensors["lossless"], strict=True)]
    result: dict = {
        "images": count,
        "min_decode_side": preprocessor.min_decode_side,
        "tensor": {
            "scaled_vs_full_mean_abs": round(float(np.mean([d.mean().item() for d in scaled_vs_full])), 4),
            "scaled_vs_full_max_abs": round(max(d.max().item() for d in scaled_vs_full), 3),
            "full_vs_lossless_mean_abs": round(float(np.mean([d.mean().item() for d in full_vs_lossless])), 4),
            "full_vs_lossless_max_abs": round(max(d.max().item() for d in full_vs_lossless), 3),
        },
        "programs": {},
    }
    for name, program in programs.items():
        predicted = {kind: _labels(program, items) for kind, items in tensors.items()}
        entry = {f"top1_{kind}": round(100.0 * float(np.mean(p == labels)), 2) for kind, p in predicted.items()}
        entry["agreement_scaled_full"] = round(100.0 * float(np.mean(predicted["scaled"] == predicted["full"])), 2)
        entry["by_condition"] = {}
        for layout in DIGIT_LAYOUTS:
            for fraction in DIGIT_FRACTIONS:
                key = (f"{layout[0]}x{layout[1]}", fraction)
                chosen = [n for n, c in enumerate(conditions) if c == key]
                if chosen:
                    entry["by_condition"][f"{key[0]} digit {fraction:g}"] = {
                        "images": len(chosen),
                        "top1_full": round(100.0 * float(np.mean(predicted["full"][chosen] == labels[chosen])), 1),
                        "top1_scaled": round(100.0 * float(np.mean(predicted["scaled"][chosen] == labels[chosen])), 1),
                        "mean_abs": round(float(np.mean([scaled_vs_full[n].mean().item() for n in chosen])), 4),
                    }
        log(f"digits {name}: { ({k: v for k, v in entry.items() if k != 'by_condition'}) }")
        result["programs"][name] = entry
    return result


def digits_scale_sweep(
    program: Callable,
    preprocessing: Preprocessing,
    count: int = 100,
    fractions: tuple[float, ...] = (0.25, 0.1, 0.05, 0.025, 0.0125),
    size: tuple[int, int] = (4000, 3000),
    log=print,
) -> list[dict]:
    """Each DCT scale forced on ``count`` held-out digit photos per digit size: where does it break?"""
    from servekit.build.datasets import _digits_arrays

    _, cells, _, truth = _digits_arrays()
    labels = np.asarray(truth[:count])
    preprocessor, sheet, shorter, rows = ImagePreprocessor(preprocessing), paper(*size, seed=7), min(size), []
    for fraction in fractions:
        by_scale: dict[int, list[torch.Tensor]] = {1: [], 2: [], 4: [], 8: []}
        for i in range(count):
            payload = digit_photo(cells[i], sheet, fraction, seed=i)
            for scale in by_scale:
                by_scale[scale].append(preprocessed(payload, preprocessor, None if scale == 1 else shorter // scale))
        full = _labels(program, by_scale[1])
        for scale, items in by_scale.items():
            predicted = _labels(program, items)
            differences = [(a - b).abs().mean().item() for a, b in zip(items, by_scale[1], strict=True)]
            row = {
                "digit_px": round(fraction * shorter),
                "scale": f"1/{scale}",
                "digit_px_decoded": round(fraction * shorter / scale),
                "top1": round(100.0 * float(np.mean(predicted == labels)), 1),
                "agreement_with_full": round(100.0 * float(np.mean(predicted == full)), 1),
                "mean_abs": round(float(np.mean(differences)), 4),
            }
            log(f"sweep {row}")
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ speed
def rate(work: Callable[[], object], threads: int, seconds: float) -> float:
    """Calls per second of ``work`` run in a loop on ``threads`` threads for about ``seconds`` (after one warm call)."""
    work()
    counts = [0] * threads
    stop = time.perf_counter() + seconds

    def loop(slot: int) -> None:
        while time.perf_counter() < stop:
            work()
            counts[slot] += 1

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(counts) / (time.perf_counter() - started)


def decode_preprocess(payload: bytes, preprocessing: Preprocessing, scaled: bool) -> Callable[[], torch.Tensor]:
    """One request's decode + preprocess, with a full-size (``scaled=False``) or DCT-scaled decode."""
    preprocessor, limits = ImagePreprocessor(preprocessing), DecodeLimits()
    side = preprocessor.min_decode_side if scaled else None
    return lambda: preprocessor(decode_image(payload, limits, side))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def decode_ceiling(payload: bytes, threads: int, seconds: float = 1.0, rounds: int = 5) -> dict:
    """The most JPEGs per second this machine can decode from ``payload``, whatever is done with them after.

    The bare decode at libjpeg's cheapest scale (1/8 in the DCT domain, PIL's ``draft``): the
    entropy (Huffman) decoding of every byte, which no scale skips, and almost nothing else. No
    handler that decodes the JPEG with libjpeg serves it faster on ``threads`` cores; the served
    rate is bounded by this figure before any preprocessing, inference or transport is paid.
    Best of ``rounds`` runs of ``seconds`` on ``threads`` threads (the decoder releases the GIL).
    """

    def bare() -> Image.Image:
        image = Image.open(io.BytesIO(payload))
        image.draft("RGB", (image.width // 8, image.height // 8))
        image.load()
        return image

    decoded = bare().size
    per_s = max(rate(bare, threads, seconds) for _ in range(rounds))
    return {"threads": threads, "bytes": len(payload), "decoded": list(decoded), "img_per_s": round(per_s, 1),
            "ms_per_img_1t": round(1000 * threads / per_s, 2)}  # fmt: skip


def camera_photo_report(
    model: Callable | None = None,
    preprocessing: Preprocessing = IMAGENET,
    seconds: float = 1.0,
    rounds: int = 5,
    log=print,
) -> dict:
    """640x480 against 4000x3000 photo-like JPEGs (quality 90), full ("before") and DCT-scaled ("after") decoding.

    Images per second through decode + preprocess on 1 and 2 threads. With ``model`` (e.g. the INT8
    ResNet-18 program), also its inference time per image at batch 8 on one thread, and end to end
    (2 threads, each decoding, preprocessing and inferring batches of 8, one torch thread each: the
    bench's served layout of 2 workers x 1 thread). ``served_ratio_estimate`` is the 4000x3000 rate
    over the 640x480 rate that one-thread costs imply: ``(pre_640 + infer) / (pre_4000 + infer)``.

    Each figure is the best of ``rounds`` runs of ``seconds``, the runs of all figures interleaved:
    other processes on the machine can only slow a run down.
    """
    photos = {"640x480": camera_jpeg(640, 480, seed=1), "4000x3000": camera_jpeg(4000, 3000, seed=1)}
    work: dict[str, tuple[Callable[[], object], int, int]] = {}  # key: (call, threads, images per call)
    for name, payload in photos.items():
        for scaled in (False, True):
            one = decode_preprocess(payload, preprocessing, scaled)
            when = "after" if scaled else "before"
            for threads in (1, 2):
                work[f"decode+preprocess {name} {when} {threads}t"] = (one, threads, 1)
            if model is not None:
                work[f"end-to-end {name} {when} 2t"] = (
                    lambda one=one: model(torch.stack([one() for _ in range(8)])),
                    2,
                    8,
                )
    if model is not None:
        batch = torch.randn(8, *preprocessing.input_shape)
        work["inference batch 8 1t"] = (lambda: model(batch), 1, 8)
    best = dict.fromkeys(work, 0.0)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for round_ in range(rounds):
                for key, (call, threads, images) in work.items():
                    best[key] = max(best[key], images * rate(call, threads, seconds))
                log(f"round {round_ + 1}/{rounds}: " + ", ".join(f"{k} {v:.1f}" for k, v in best.items()))
    finally:
        torch.set_num_threads(previous)
    result: dict = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "bytes": {name: len(payload) for name, payload in photos.items()},
        "min_decode_side": preprocessing.min_decode_side(),
        "img_per_s": {key: round(value, 1) for key, value in best.items()},
        "ms_per_img_1t": {
            key.removeprefix("decode+preprocess ").removesuffix(" 1t"): round(1000 / value, 2)
            for key, value in best.items()
            if key.endswith(" 1t")
        },
    }
    if model is not None:
        infer = 1 / best["inference batch 8 1t"]
        result["served_ratio_estimate"] = {}
        result["end_to_end_ratio_2t"] = {}
        for when in ("before", "after"):
            small, large = (1 / best[f"decode+preprocess {n} {when} 1t"] for n in ("640x480", "4000x3000"))
            result["served_ratio_estimate"][when] = round((small + infer) / (large + infer), 3)
            e2e = [best[f"end-to-end {n} {when} 2t"] for n in ("640x480", "4000x3000")]
            result["end_to_end_ratio_2t"][when] = round(e2e[1] / e2e[0], 3)
    return result


def resnet18_int8_program(workdir: Path) -> Callable:
    """The bench's INT8 ResNet-18 (random weights, seed 0), built as ``make bench`` builds it, loaded as served."""
    import zipfile

    from handlers.model_loading import load_model
    from servekit.build.archive import build_all
    from servekit.build.spec import load_spec
    from servekit.perf.resnet18 import SPEC_TEMPLATE, WEIGHTS_FILE, WORKDIR, make_weights

    WORKDIR.mkdir(parents=True, exist_ok=True)
    make_weights(WORKDIR / WEIGHTS_FILE)
    spec = next(s for s in load_spec(SPEC_TEMPLATE) if s.precision == "int8")
    store = workdir / "store"
    build_all([spec], store, workdir / "cache")
    program = workdir / "int8_model.pt"
    with zipfile.ZipFile(store / spec.archive_name) as archive:
        program.write_bytes(archive.read("model.pt"))
    return load_model(program, spec.handler_config())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Camera photos: full vs DCT-scaled JPEG decoding (in-process).")
    commands = parser.add_subparsers(dest="command", required=True)
    speed = commands.add_parser("speed", help="decode + preprocess rates, INT8 ResNet-18 inference, served ratio")
    speed.add_argument("--seconds", type=float, default=1.0, help="duration of each run")
    speed.add_argument("--rounds", type=int, default=5, help="runs per figure (the best counts)")
    speed.add_argument("--program", help="an INT8 ResNet-18 TorchScript program (default: build the bench's)")
    speed.add_argument("--workdir", default="build/photos", help="where the bench's INT8 program is built")
    speed.add_argument("--no-model", action="store_true", help="decode + preprocess only")
    accuracy = commands.add_parser("accuracy", help="tensor differences on camera photos, digits top-1 as photos")
    accuracy.add_argument("--mar", action="append", default=[], help="a digits archive (repeatable)")
    accuracy.add_argument("--count", type=int, help="held-out digits to use (default: all)")
    accuracy.add_argument("--sweep", type=int, default=0, help="also force each scale on this many digit photos")
    for sub in (speed, accuracy):
        sub.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(f"[photos] {message}", file=sys.stderr, flush=True)

    if args.command == "speed":
        model = None
        if args.program:
            from handlers.config import HandlerConfig
            from handlers.model_loading import load_model

            model = load_model(Path(args.program), HandlerConfig(precision="int8"))
        elif not args.no_model:
            model = resnet18_int8_program(Path(args.workdir))
        result = camera_photo_report(model, seconds=args.seconds, rounds=args.rounds, log=log)
    else:
        result = {"cpu": cpu_model(), "camera": camera_tolerance(log=log)}
        if args.mar:
            import yaml

            with __import__("zipfile").ZipFile(args.mar[0]) as archive:
                handler = yaml.safe_load(archive.read("model-config.yaml"))["handler"]
            digits = Preprocessing.from_dict(handler["preprocessing"])
            programs = {Path(mar).stem: load_archive_program(Path(mar)) for mar in args.mar}
            result["digits"] = digits_photo_evaluation(programs, digits, args.count, log=log)
            if args.sweep:
                first = next(iter(programs.values()))
                result["digits_sweep"] = digits_scale_sweep(first, digits, args.sweep, log=log)
        if args.sweep:
            result["camera_sweep"] = camera_scale_sweep(log=log)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
