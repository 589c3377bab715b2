"""Image preprocessing as one named, parameterised object, built once per worker.

``ImagePreprocessor`` turns a decoded PIL image into the model's input tensor. The same object is
used by the archive build (training, calibration, evaluation) and by the handler, so the model is
always evaluated on exactly what it will see when served.

Two geometries are supported:

* ``resize`` + ``crop`` (ImageNet style): scale the shorter side, then take the centre square;
* ``fit_content`` (digit style): find the ink, crop to it, pad to a square and scale it into a
  ``crop`` x ``crop`` canvas with ``margin`` pixels of border, so a digit drawn anywhere on a page
  of any size lands where the model expects it.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from handlers.errors import InvalidInput
from handlers.image_io import FULL_FRAME, FullFrame
from handlers.preprocessing import COLOR_MODES, Preprocessing

__all__ = ["COLOR_MODES", "ImagePreprocessor", "Preprocessing", "to_model_mode"]  # Preprocessing: its old home


def to_model_mode(image: Image.Image, color_mode: str) -> Image.Image:
    """Convert any PIL mode (16-bit, float, palette, alpha, CMYK, ...) to ``L`` or ``RGB``.

    Transparent pixels are composited on white: a drawing exported with a transparent background
    is ink on paper to the person who made it. Every step makes at most one full-size copy, so a
    25-megapixel image does not cost several hundred megabytes here.
    """
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        image = _to_eight_bit_gray(image)
    elif mode == "La":  # premultiplied alpha (TIFF "associated" alpha): PIL converts it only to LA
        image = image.convert("LA")
    elif mode == "PA" or (mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
    elif mode in ("P", "CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
    elif mode == "1":
        image = image.convert("L")

    if image.mode in ("RGBA", "LA", "RGBa"):
        image = _on_white_paper(image, color_mode)
    if image.mode != color_mode:
        image = image.convert(color_mode)
    return image


def _to_eight_bit_gray(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float images as 8-bit gray.

    16-bit data (and 32-bit integers beyond 255) are scaled from 0..65535; float data in 0..1 (the
    convention of PFM and float TIFF) from 0..1; NaN is black and infinities saturate.
    """
    array = np.array(image, dtype=np.float32)  # a copy, so the arithmetic can work in place
    if image.mode == "F":
        np.nan_to_num(array, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
        if array.size and array.max() <= 1.0:
            array *= 255.0
    elif image.mode.startswith("I;16") or array.max(initial=0) > 255:
        array /= 257.0
    np.clip(array, 0, 255, out=array)
    return Image.fromarray(array.astype(np.uint8), "L")


def _on_white_paper(image: Image.Image, color_mode: str) -> Image.Image:
    """The image composited over opaque white, in ``color_mode``.

    Pasting through the alpha channel gives the pixels of ``Image.alpha_composite`` over white
    without its three full-size RGBA copies (the same for colour; for gray, within one level,
    since the gray conversion comes before the blend instead of after it).
    """
    if image.mode == "RGBa":
        image = image.convert("RGBA")
    paper = Image.new(color_mode, image.size, "white")
    paper.paste(image.convert(color_mode), mask=image.getchannel("A"))
    return paper


class ImagePreprocessor:
    """Callable: PIL image -> float tensor of shape ``input_shape``.

    >>> pre = ImagePreprocessor(Preprocessing(color_mode="L", resize=None, crop=16, mean=(0.5,), std=(0.5,)))
    >>> pre(Image.new("L", (40, 30))).shape
    torch.Size([1, 16, 16])
    """

    def __init__(self, params: Preprocessing) -> None:
        self.params = params
        # For decode_image: once per worker, not per request.
        self.min_decode_side = params.min_decode_side()
        std = torch.tensor(params.std, dtype=torch.float32).view(-1, 1, 1)
        mean = torch.tensor(params.mean, dtype=torch.float32).view(-1, 1, 1)
        # x/255 then (x - mean)/std folded into one multiply-add.
        self._scale = 1.0 / (255.0 * std)
        self._shift = -mean / std

    def __call__(self, image: Image.Image) -> torch.Tensor:
        p = self.params
        # A DCT-scaled decode: the full size, and the box of these pixels it covers (image_io.FULL_FRAME).
        frame = image.info.get(FULL_FRAME)
        if not isinstance(frame, tuple):
            frame = (image.size, (0, 0, *image.size))
        image = to_model_mode(image, p.color_mode)
        if p.invert:
            image = Image.eval(image, lambda v: 255 - v)
        image = self._fit_content(image) if p.fit_content else self._resize_crop(image, frame)
        array = np.asarray(image, dtype=np.uint8)
        if array.ndim == 2:
            array = array[:, :, None]
        tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float()
        return tensor * self._scale + self._shift

    def _resize_crop(self, image: Image.Image, frame: FullFrame) -> Image.Image:
        """Resize the shorter side to ``resize`` then centre-crop ``crop``, as one resampling.

        The crop is mapped back to a box in the source image and resized straight to the output:
        the same pixels as resize-then-crop at a fraction of the cost (no full-size intermediate).
        The geometry is that of the full-size image (``frame``), so a DCT-scaled decode crops
        exactly the same part of the scene.
        """
        p = self.params
        (w, h), (x0, y0, x1, y1) = frame
        short = max(p.crop, p.resize if p.resize is not None else min(w, h))
        # The resized size and crop offsets torchvision's Resize + CenterCrop would use ...
        if w <= h:
            rw, rh = short, int(short * h / w)
        else:
            rw, rh = int(short * w / h), short
        left, top = int(round((rw - p.crop) / 2.0)), int(round((rh - p.crop) / 2.0))
        # ... mapped back to a box in the source image (its pixels: the frame's box).
        sx, sy = (x1 - x0) / rw, (y1 - y0) / rh
        box = (x0 + left * sx, y0 + top * sy, x0 + (left + p.crop) * sx, y0 + (top + p.crop) * sy)
        return image.resize((p.crop, p.crop), Image.Resampling.BILINEAR, box=box)

    def _fit_content(self, image: Image.Image) -> Image.Image:
        """Crop to the ink (bright after inversion), pad to a square, scale into the canvas."""
        p = self.params
        gray = np.asarray(image if image.mode == "L" else image.convert("L"))
        lo, hi = int(gray.min()), int(gray.max())
        if hi - lo < 16:
            raise InvalidInput("image has no visible content (it is blank or nearly uniform)")
        # Per-level arithmetic in float32 on the 256 possible values, applied as a threshold and a
        # lookup table: the same pixels as doing it on the whole image in float32, without the
        # full-size float arrays (several hundred MB for a 25-megapixel image).
        levels = np.arange(256, dtype=np.float32)
        # Ink: more than 35 % of the way from the darkest to the brightest level.
        first_ink_level = int(np.argmax((levels - lo) > 0.35 * (hi - lo)))
        ink = gray >= first_ink_level
        rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
        box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
        # Stretch contrast so faint pencil on grey paper looks like the training ink.
        stretch = np.clip((levels - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8).tolist()
        content = image.crop(box).point(stretch * len(image.getbands()))
        # Scale first, then pad: padding a W x 1 strip to a W x W square first would cost W^2 pixels
        # (a 276-byte PNG could ask for 40 G), while the result is the same either way.
        inner = p.crop - 2 * p.margin
        w, h = content.size
        side = max(w, h)
        size = (max(1, round(w * inner / side)), max(1, round(h * inner / side)))
        scaled = content.resize(size, Image.Resampling.BILINEAR)
        canvas = Image.new(image.mode, (p.crop, p.crop), 0)
        canvas.paste(scaled, (p.margin + (inner - size[0]) // 2, p.margin + (inner - size[1]) // 2))
        return canvas
