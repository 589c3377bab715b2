"""The preprocessing parameters as validated data: the spec's ``preprocessing`` section.

Kept apart from ``handlers.transforms`` (which does the work, with torch) so that the spec, the
handler configuration and the operator tools can read and validate them without importing torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

COLOR_MODES = {"L": 1, "RGB": 3}
# A JPEG may be decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (``decode_image``'s ``min_side``)
# only while the decoded image keeps this many times the pixels the resize maps onto the model's
# input: the resize then still shrinks by 2x or more, so its own filter, not libjpeg's, decides what
# the model sees (the reasoning and the measured differences: docs/decoding.md).
RESIZE_DECODE_FACTOR = 2.0
# fit_content: the decoded image's shorter side, as a multiple of the canvas (``crop``). The ink's
# box is found and scaled on the decoded pixels: a digit filling at least 1/16 of the photo's
# shorter side keeps 2x the canvas there, and top-1 held down to about that (docs/decoding.md).
FIT_CONTENT_DECODE_FACTOR = 32


@dataclass(frozen=True)
class Preprocessing:
    """Validated preprocessing parameters (the spec's ``preprocessing`` section)."""

    color_mode: str = "RGB"
    resize: int | None = 256
    crop: int = 224
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    invert: bool = False
    fit_content: bool = False
    margin: int = 0

    def __post_init__(self) -> None:
        if self.color_mode not in COLOR_MODES:
            raise ValueError(f"color_mode: {self.color_mode!r} is not one of {sorted(COLOR_MODES)}")
        channels = COLOR_MODES[self.color_mode]
        if not isinstance(self.crop, int) or isinstance(self.crop, bool) or self.crop < 1:
            raise ValueError(f"crop: must be a positive integer, got {self.crop!r}")
        if self.resize is not None and (not isinstance(self.resize, int) or self.resize < self.crop):
            raise ValueError(f"resize: must be an integer >= crop ({self.crop}) or null, got {self.resize!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) != channels or not all(isinstance(v, int | float) for v in value):
                raise ValueError(f"{name}: needs {channels} numbers for color_mode {self.color_mode}, got {value!r}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std: every value must be > 0, got {self.std!r}")
        if not isinstance(self.margin, int) or not 0 <= 2 * self.margin < self.crop:
            raise ValueError(f"margin: must be an integer with 0 <= 2*margin < crop, got {self.margin!r}")

    @classmethod
    def from_dict(cls, data: dict | None) -> Preprocessing:
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown key (valid keys: {', '.join(sorted(known))})")
        for name in ("mean", "std"):
            if name in data:
                if not isinstance(data[name], list | tuple):
                    raise ValueError(f"{name}: must be a list of numbers, got {data[name]!r}")
                data[name] = tuple(data[name])
        return cls(**data)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    def min_decode_side(self) -> int | None:
        """The shorter side a decoded image must keep for this preprocessing; None: decode at full size.

        ``resize`` + ``crop``: ``RESIZE_DECODE_FACTOR`` x ``resize``. Without ``resize`` the crop is
        taken at the image's own resolution, so no scaling is allowed. ``fit_content``:
        ``FIT_CONTENT_DECODE_FACTOR`` x ``crop``.
        """
        if self.fit_content:
            return FIT_CONTENT_DECODE_FACTOR * self.crop
        if self.resize is None:
            return None
        return math.ceil(RESIZE_DECODE_FACTOR * self.resize)

    @property
    def channels(self) -> int:
        return COLOR_MODES[self.color_mode]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.crop, self.crop)
