"""The drift reference written into every archive that has an evaluation set (``docs/monitoring.md``).

At build time the held-out split goes through the exported program once more, as the handler
would run it (softmax over the program's output), and the archive records what live traffic is
later compared with: the share of each top-1 class and the top-1 confidence histogram
(``classifier_reference``: every classifier), and for images two cheap input statistics, the
model input's brightness and the decoded image's size (``drift_reference``), in the very bins of
the handler's Prometheus histograms (``handlers.metrics``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from handlers.image_classifier import input_brightness
from handlers.metrics import BRIGHTNESS_BUCKETS, CONFIDENCE_BUCKETS, MEGAPIXEL_BUCKETS, bin_counts


@torch.inference_mode()
def classifier_reference(
    model: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, labels: tuple[str, ...], source: str
) -> dict:
    """Top-1 class shares and the confidence histogram of ``model`` (the exported program) on ``inputs``."""
    top1, confidence = [], []
    for start in range(0, len(inputs), 128):
        probs = torch.softmax(model(inputs[start : start + 128]).float(), dim=1)
        p, i = probs.max(dim=1)
        top1 += i.tolist()
        confidence += p.tolist()
    total = len(top1)
    return {
        "source": source,
        "samples": total,
        "classes": {label: round(top1.count(i) / total, 6) for i, label in enumerate(labels)},
        "confidence": {"edges": list(CONFIDENCE_BUCKETS), "counts": bin_counts(confidence, CONFIDENCE_BUCKETS)},
    }


def drift_reference(
    model: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    labels: tuple[str, ...],
    image_sizes: list[tuple[int, int]],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    source: str,
) -> dict:
    """The reference of one image classifier version: ``inputs`` is the preprocessed held-out set."""
    reference = classifier_reference(model, inputs, labels, source)
    mean_t, std_t = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    brightness = [input_brightness(x, mean_t, std_t) for x in inputs]
    reference["brightness"] = {"edges": list(BRIGHTNESS_BUCKETS), "counts": bin_counts(brightness, BRIGHTNESS_BUCKETS)}
    reference["megapixels"] = {
        "edges": list(MEGAPIXEL_BUCKETS),
        "counts": bin_counts((w * h / 1e6 for w, h in image_sizes), MEGAPIXEL_BUCKETS),
    }
    return reference
