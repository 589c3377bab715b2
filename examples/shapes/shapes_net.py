"""A small CNN of the kind a user brings: 3-channel 32x32 images -> ``num_classes`` logits.

It is the user's code, not the toolkit's: the spec names it (``architecture: {file: shapes_net.py,
class: ShapesNet, kwargs: {...}}``), the build imports it to load the weights and export the
program, and the archive keeps a copy of it beside the program.
"""

from torch import nn


class ShapesNet(nn.Module):
    def __init__(self, num_classes: int = 3, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width, num_classes))

    def forward(self, x):
        return self.head(self.features(x))
