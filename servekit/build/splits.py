"""One split of a data set, whoever provides it: images with their labels, or a table of records.

``LabelledImages`` come from the bundled image data sets (``servekit.build.datasets``) and from the
user's image folder (``servekit.build.user_data``); ``TabularData`` from the bundled tables
(``servekit.build.tabular``) and from the user's CSV. Both providers build them, so they live
below both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class LabelledImages:
    images: tuple[Image.Image, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class TabularData:
    """One split: ``x`` ``[N, F]`` float64, ``y`` ``[N]`` class indices, and the names of both."""

    x: np.ndarray
    y: np.ndarray
    feature_names: tuple[str, ...]
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.y)
