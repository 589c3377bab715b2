"""Getting FP32 weights for a spec entry: train them on a bundled data set, or load a local file.

Trained weights are cached under ``build/cache/`` by a hash of the training recipe (the task's
``recipe``), so the FP32 and INT8 versions of one model are built from the very same weights. How
a task trains is its own (``servekit.build.tasks``); ``train`` below is the image classifier's.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from handlers.transforms import ImagePreprocessor
from servekit.build.datasets import LabelledImages, images
from servekit.build.spec import ModelVersionSpec
from servekit.errors import ServekitError
from servekit.serving.store import file_sha256

TRAIN_SIZES = (16, 32, 64)  # render training digits at several sizes: users send any size


class BuildError(ServekitError):
    """The build of one model version failed; the message names it and says why."""


def to_tensors(data: LabelledImages, preprocessor: ImagePreprocessor) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = torch.stack([preprocessor(image) for image in data.images])
    return inputs, torch.tensor(data.labels, dtype=torch.long)


def recipe_key(spec: ModelVersionSpec) -> str:
    """A short hash of what determines the trained weights (``Task.recipe``): the cache key."""
    recipe = spec.task.recipe(spec)
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _shift(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to one pixel: cheap augmentation for hand-placed digits."""
    dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=generator))
    return torch.roll(batch, shifts=(dy, dx), dims=(2, 3))


def train(spec: ModelVersionSpec, log: Callable[[str], None]) -> dict[str, torch.Tensor]:
    """Train ``spec.architecture`` on the ``train`` split of ``spec.weights.train``."""
    preprocessor = ImagePreprocessor(spec.preprocessing)
    source = spec.data.source if spec.weights.train == "data" else spec.weights.train
    log(f"training {spec.architecture} on {source}: preparing images")
    x, y = to_tensors(images(spec, spec.weights.train, "train", TRAIN_SIZES), preprocessor)
    log(f"training on {len(x)} images of {tuple(x.shape[1:])}")
    torch.manual_seed(spec.weights.seed)
    generator = torch.Generator().manual_seed(spec.weights.seed)
    model = spec.task.build_model(spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=3e-3, total_steps=spec.weights.epochs * ((len(x) + 63) // 64)
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    for epoch in range(1, spec.weights.epochs + 1):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), 64):
            index = order[start : start + 64]
            optimizer.zero_grad()
            loss = loss_fn(model(_shift(x[index], generator)), y[index])
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(index)
        if epoch == 1 or epoch % 5 == 0 or epoch == spec.weights.epochs:
            log(f"epoch {epoch}/{spec.weights.epochs}: train loss {total / len(x):.4f}")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def cached_weights_path(spec: ModelVersionSpec, cache_dir: Path) -> Path:
    """Where the weights trained from ``spec``'s recipe are cached (they may not be there yet)."""
    return cache_dir / f"{spec.name}-{recipe_key(spec)}.pt"


def fp32_weights(spec: ModelVersionSpec, cache_dir: Path, log: Callable[[str], None]) -> Path:
    """Path of a state_dict file holding the version's FP32 weights (trained and cached if needed)."""
    if spec.weights.file:
        path = Path(spec.weights.file)
        if spec.weights.sha256 and file_sha256(path) != spec.weights.sha256:
            raise BuildError(f"weights.file: sha256 of {path} does not match the spec's weights.sha256")
        return path
    if spec.weights.torchvision:
        return _torchvision_weights(spec, cache_dir, log)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cached_weights_path(spec, cache_dir)
    if path.is_file():
        log(f"using cached trained weights {path}")
        return path
    state = spec.task.train(spec, log)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def _torchvision_weights(spec: ModelVersionSpec, cache_dir: Path, log: Callable[[str], None]) -> Path:
    """torchvision's named weights (needs internet the first time; cached as a state_dict)."""
    import torchvision

    weights = torchvision.models.get_weight(spec.weights.torchvision)
    path = cache_dir / f"{spec.weights.torchvision}.pt"
    if not path.is_file():
        log(f"downloading {spec.weights.torchvision}")
        try:
            state = weights.get_state_dict(progress=True)
        except Exception as exc:  # noqa: BLE001 - no network here is the common case
            raise BuildError(
                f"weights.torchvision: cannot download {spec.weights.torchvision} ({exc}); "
                "save a state_dict locally and use weights.file instead"
            ) from exc
        cache_dir.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
    return path


def load_fp32_model(spec: ModelVersionSpec, weights_path: Path) -> nn.Module:
    """The architecture with the weights loaded (never unpickling anything but tensors), or the user's program."""
    from servekit.build.user_model import state_dict_mismatch

    if spec.program is not None:
        return spec.program.load()
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - not a file of tensors (a pickled module, another format)
        text = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(str(exc).split()))  # torch's message has terminal bold
        # weights_only's message is a paragraph of advice; the cause is its "WeightsUnpickler error" sentence.
        cause = re.search(r"WeightsUnpickler error: (.+?)\.(?: |$)", text)
        text = cause.group(1) if cause else text[:200]
        raise BuildError(
            f"weights.file: {Path(weights_path).name} is not a state_dict that loads with "
            f"weights_only=True ({type(exc).__name__}: {text}); save model.state_dict()"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BuildError(f"weights.file: {Path(weights_path).name} holds a {type(state).__name__}, not a state_dict")
    model = spec.task.build_model(spec)
    mismatch = state_dict_mismatch(model, state)
    if mismatch is not None:
        raise BuildError(
            f"weights: {Path(weights_path).name} does not fit architecture {spec.architecture} "
            f"with {len(spec.labels)} classes: {mismatch}"
        )
    model.load_state_dict(state, strict=True)
    return model.eval()
