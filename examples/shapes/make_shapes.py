#!/usr/bin/env python3
"""Stand-in for a user's own project: a labelled image folder and a trained state_dict of ``ShapesNet``.

    python examples/shapes/make_shapes.py OUT        # OUT/data/{train,val}/<shape>/*.png, OUT/shapes_net.pt

Images: circles, squares and triangles of random colour, size and place on a noisy background of
another colour, 32x32 PNG, drawn with Pillow from a fixed seed (nothing is downloaded). The
weights are trained here with plain PyTorch, as the user would have trained them: the toolkit then
only builds, gates, serves and rolls out what it is given.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

SHAPES = ("circle", "square", "triangle")
SIZE = 32
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # the preprocessing the spec will say


def draw(shape: str, rng: random.Random, size: int = SIZE):
    """One image of ``shape``: a filled shape of random colour, size and place on a noisy background."""
    from PIL import Image, ImageDraw

    background = tuple(rng.randrange(0, 256) for _ in range(3))
    colour = tuple((c + rng.randrange(96, 160)) % 256 for c in background)
    image = Image.new("RGB", (size, size), background)
    pixels = image.load()
    for _ in range(size * size // 8):  # sprinkle of noise
        x, y = rng.randrange(size), rng.randrange(size)
        pixels[x, y] = tuple(min(255, max(0, c + rng.randrange(-40, 41))) for c in background)
    side = rng.randrange(size // 3, size - 4)
    x0, y0 = rng.randrange(0, size - side), rng.randrange(0, size - side)
    box = (x0, y0, x0 + side, y0 + side)
    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse(box, fill=colour)
    elif shape == "square":
        pen.rectangle(box, fill=colour)
    else:
        pen.polygon([(x0 + side / 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=colour)
    return image


def write_images(root: Path, train: int = 60, val: int = 40, seed: int = 0) -> Path:
    """``root/train/<shape>/NNN.png`` and ``root/val/<shape>/NNN.png``: ``train`` and ``val`` images per shape."""
    rng = random.Random(seed)
    for split, count in (("train", train), ("val", val)):
        for shape in SHAPES:
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                draw(shape, rng).save(folder / f"{n:03d}.png")
    return root


def load_split(root: Path, split: str):
    """(images [N, 3, 32, 32] normalised as the spec's preprocessing, labels [N]) of one split."""
    import numpy as np
    import torch
    from PIL import Image

    xs, ys = [], []
    for label, shape in enumerate(SHAPES):
        for path in sorted((root / split / shape).glob("*.png")):
            array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
            xs.append((array - np.array(MEAN, dtype=np.float32)) / np.array(STD, dtype=np.float32))
            ys.append(label)
    return torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous(), torch.tensor(ys)


def train_weights(root: Path, out: Path, epochs: int = 30, seed: int = 0, log=print) -> float:
    """Train ``ShapesNet`` on ``root``'s train split, save its state_dict at ``out``; returns val accuracy (%)."""
    import torch
    from torch import nn

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from shapes_net import ShapesNet

    torch.manual_seed(seed)
    x, y = load_split(root, "train")
    model = ShapesNet(num_classes=len(SHAPES))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=epochs * ((len(x) + 31) // 32))
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 32):
            index = order[start : start + 32]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[index]), y[index])
            loss.backward()
            optimizer.step()
            scheduler.step()
        if epoch == 1 or epoch % 10 == 0 or epoch == epochs:
            log(f"epoch {epoch}/{epochs}: loss {loss.item():.3f}")
    model.eval()
    xv, yv = load_split(root, "val")
    with torch.no_grad():
        accuracy = 100.0 * float((model(xv).argmax(1) == yv).float().mean())
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    log(f"wrote {out} (val accuracy {accuracy:.1f}%)")
    return accuracy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write data/ and shapes_net.pt into")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args(argv)
    data = write_images(args.out / "data")
    print(f"wrote {data}/train and {data}/val ({len(SHAPES)} shapes)")
    train_weights(data, args.out / "shapes_net.pt", args.epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
