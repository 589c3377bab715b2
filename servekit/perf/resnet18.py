"""The benchmark's model: ResNet-18 from a locally saved, randomly initialised state_dict.

Speed does not depend on the weight values, so nothing is downloaded: ``make_weights`` writes the
seeded weights and the 1,000 labels into ``WORKDIR`` (``build/bench``), where ``SPEC_TEMPLATE``
(``bench/models.yaml``: FP32 1.0 and INT8 2.0) reads them. ``make bench`` (``servekit.perf.bench``)
and the camera-photo measurement (``servekit.perf.photos``) both build from here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from servekit.build.archive import REPO_ROOT

WORKDIR = REPO_ROOT / "build" / "bench"
SPEC_TEMPLATE = REPO_ROOT / "bench" / "models.yaml"
WEIGHTS_NOTE = "ResNet-18 with random-initialised weights (seed 0): speed does not depend on the weight values"
WEIGHTS_FILE = "resnet18_random.pt"  # bench/models.yaml's weights.file, inside WORKDIR


def make_weights(path: Path) -> None:
    import torchvision

    (path.parent / "labels.json").write_text(json.dumps([f"class_{i}" for i in range(1000)]))
    if not path.is_file():
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18().state_dict(), path)
