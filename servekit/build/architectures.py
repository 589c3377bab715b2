"""Model architectures the spec can name, each a factory ``num_classes -> nn.Module``."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision
from torch import nn


class DigitsCNN(nn.Module):
    """A small CNN for 1x16x16 digit images (about 0.1M parameters); FX-quantizable as is."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 4x4
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(0.25),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


ARCHITECTURES: dict[str, Callable[[int], nn.Module]] = {
    "digits_cnn": DigitsCNN,
    "resnet18": lambda n: torchvision.models.resnet18(num_classes=n),
    "resnet50": lambda n: torchvision.models.resnet50(num_classes=n),
    "mobilenet_v2": lambda n: torchvision.models.mobilenet_v2(num_classes=n),
    "mobilenet_v3_small": lambda n: torchvision.models.mobilenet_v3_small(num_classes=n),
    "mobilenet_v3_large": lambda n: torchvision.models.mobilenet_v3_large(num_classes=n),
}


def build_architecture(name: str, num_classes: int) -> nn.Module:
    return ARCHITECTURES[name](num_classes)
