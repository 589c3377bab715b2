"""The one-resample resize+crop matches torchvision's Resize + CenterCrop on real photos."""

from __future__ import annotations

import pytest
from PIL import Image
from sklearn.datasets import load_sample_image
from torchvision import transforms

from handlers.transforms import ImagePreprocessor, Preprocessing

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (300, 300), (1000, 200), (230, 500), (224, 224)])
def test_matches_torchvision_within_one_grey_level(size: tuple[int, int]) -> None:
    image = Image.fromarray(load_sample_image("flower.jpg")).resize(size)
    reference = transforms.Compose(
        [transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    )(image)
    ours = ImagePreprocessor(Preprocessing(resize=256, crop=224, mean=MEAN, std=STD))(image)
    assert ours.shape == reference.shape == (3, 224, 224)
    # One grey level is 1/255/std ~ 0.018 in normalised units.
    assert (ours - reference).abs().max().item() <= 1.01 / 255 / min(STD)
