"""Real labelled images that ship with installed packages, for training, calibration and evaluation.

``digits``: scikit-learn's bundled handwritten digits (1,797 images of 8x8, values 0..16), split
once, stratified and seeded, into 75% train / 25% held out. Each digit is rendered the way people
make digit images: dark ink on light paper, at a chosen size in pixels.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from PIL import Image

from servekit.build.splits import LabelledImages

SPLIT_SEED = 0
HOLDOUT_FRACTION = 0.25


def render_digit(cells: np.ndarray, size: int = 32, mode: str = "L") -> Image.Image:
    """An 8x8 array of ink amounts (0..16) as dark ink on light paper, ``size`` x ``size`` pixels."""
    ink = np.clip(cells.reshape(8, 8) / 16.0, 0, 1)
    paper = (255 * (1.0 - ink)).astype(np.uint8)
    image = Image.fromarray(paper, "L").resize((size, size), Image.Resampling.BICUBIC)
    return image.convert(mode)


@cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    return train_test_split(
        digits.data, digits.target, test_size=HOLDOUT_FRACTION, random_state=SPLIT_SEED, stratify=digits.target
    )


def digits(split: str, sizes: tuple[int, ...] = (32,)) -> LabelledImages:
    """The ``train`` or ``holdout`` split, each image rendered once per size in ``sizes``."""
    x_train, x_holdout, y_train, y_holdout = _digits_arrays()
    x, y = {"train": (x_train, y_train), "holdout": (x_holdout, y_holdout)}[split]
    images = tuple(render_digit(cells, size) for size in sizes for cells in x)
    labels = tuple(int(label) for _ in sizes for label in y)
    return LabelledImages(images, labels)


DATASETS = {"digits": digits}


def images(spec, name: str, split: str, sizes: tuple[int, ...] = (32,)) -> LabelledImages:
    """The ``split`` of data set ``name`` for ``spec``: a bundled one, or ``data``, the user's image folder
    (decoded as the handler decodes requests, within ``spec.limits``; ``sizes`` applies to rendered ones)."""
    if name == "data":
        from servekit.build.user_data import folder_split

        return folder_split(spec.data, split, spec.limits)
    return DATASETS[name](split, sizes)


def write_digit_samples(directory, size: int = 128) -> list[str]:
    """Write the first held-out image of each class as ``digit_<label>.png`` (RGB, ``size`` px)."""
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _, x_holdout, _, y_holdout = _digits_arrays()
    written = []
    for label in range(10):
        index = int(np.flatnonzero(y_holdout == label)[0])
        path = directory / f"digit_{label}.png"
        render_digit(x_holdout[index], size, "RGB").save(path)
        written.append(str(path))
    return written
