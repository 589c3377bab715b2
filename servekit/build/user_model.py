"""The user's own model, as the spec names it: a module file, a torchvision builder, or a finished program.

    architecture: {file: nets/shapes_net.py, class: ShapesNet, kwargs: {num_classes: 3}}
    architecture: {torchvision: squeezenet1_1, kwargs: {dropout: 0.2}}
    program: {file: exported/model.ts}       # TorchScript (torch.jit.save) or torch.export (.pt2)

``file``: the user's ``nn.Module`` class, instantiated with ``kwargs``; the weights (``weights:
{file: ...}`` or ``{train: data}``) load into it with ``weights_only=True``. The file goes into the
archive (``model_source/``) and, by content, into the version's fingerprint; it is imported at
build time only (the archive serves the exported program, never the user's source).

``torchvision``: any classification builder in ``torchvision.models`` (``list_models(module=
torchvision.models)``: EfficientNet, ConvNeXt, RegNet, SqueezeNet, ViT, ...), called with
``num_classes`` = the number of labels unless ``kwargs`` sets it. Detection and segmentation
builders are not offered: the detector task builds its own model (``servekit.build.detection``)
and no task serves segmentation masks.

``program``: a program the user already has, served as given in FP32 (no ``architecture`` or
``weights``); it is measured on the evaluation data like any version. Reduced precision needs the
``nn.Module`` (FX quantization and the BF16 cast rewrite the module), so a program with ``precision:
int8`` or ``bf16`` is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

JSONISH = (str, int, float, bool, type(None))


class ModelSourceError(ValueError):
    """A mistake in the user's model; the message starts with the field (``architecture.class: ...``)."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_kwargs(kwargs: Any, field_name: str) -> dict:
    def plain(value: Any) -> bool:
        if isinstance(value, list | tuple):
            return all(plain(v) for v in value)
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        return isinstance(value, JSONISH)

    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs) or not plain(kwargs):
        raise ModelSourceError(f"{field_name}: must be a mapping of names to plain values (numbers, strings, lists), "
                               f"got {kwargs!r}")  # fmt: skip
    return dict(kwargs)


@dataclass(frozen=True)
class UserArchitecture:
    """``architecture: {file, class, kwargs}`` or ``{torchvision, kwargs}``."""

    file: str | None = None
    class_name: str | None = None
    torchvision: str | None = None
    kwargs: dict = field(default_factory=dict, hash=False)
    sha256: str | None = None

    def __str__(self) -> str:
        return f"{Path(self.file).name}:{self.class_name}" if self.file else f"torchvision:{self.torchvision}"

    def to_dict(self) -> dict:
        """What the fingerprint holds: the file by content, not by location."""
        if self.file:
            name = Path(self.file).name
            return {"file": name, "class": self.class_name, "kwargs": self.kwargs, "sha256": self.sha256}
        return {"torchvision": self.torchvision, "kwargs": self.kwargs}

    def build(self, num_classes: int) -> nn.Module:
        """A fresh instance (ModelSourceError naming the field when the class is missing or its constructor fails)."""
        if self.torchvision:
            import torchvision

            kwargs = {"num_classes": num_classes, **self.kwargs}
            try:
                return torchvision.models.get_model(self.torchvision, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any constructor failure is the user's kwargs
                raise ModelSourceError(f"architecture.kwargs: torchvision {self.torchvision}(**{kwargs}) failed: "
                                       f"{_one_line(exc)}") from None  # fmt: skip
        cls = load_class(Path(self.file), self.class_name)
        try:
            model = cls(**self.kwargs)
        except Exception as exc:  # noqa: BLE001 - the user's constructor
            raise ModelSourceError(f"architecture.kwargs: {self}(**{self.kwargs}) failed: {_one_line(exc)}") from None
        if not isinstance(model, nn.Module):
            raise ModelSourceError(f"architecture.class: {self} is not an nn.Module (got {type(model).__name__})")
        return model


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def torchvision_classifiers() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def parse_architecture(value: dict, base_dir: Path) -> UserArchitecture:
    """Check ``architecture: {file, class, kwargs}`` / ``{torchvision, kwargs}`` (the file is not imported yet)."""
    keys = set(value)
    if "torchvision" in keys:
        unknown = sorted(keys - {"torchvision", "kwargs"})
        if unknown:
            raise ModelSourceError(f"architecture.{unknown[0]}: unknown key (with torchvision: torchvision, kwargs)")
        name = value["torchvision"]
        known = torchvision_classifiers()
        if name not in known:
            raise ModelSourceError(f"architecture.torchvision: {name!r} is not a torchvision classification builder "
                                   f"(known: {', '.join(known)})")  # fmt: skip
        return UserArchitecture(torchvision=name, kwargs=_check_kwargs(value.get("kwargs"), "architecture.kwargs"))
    unknown = sorted(keys - {"file", "class", "kwargs"})
    if unknown:
        raise ModelSourceError(f"architecture.{unknown[0]}: unknown key (valid: file, class, kwargs; or torchvision, "
                               "kwargs)")  # fmt: skip
    for key in ("file", "class"):
        if not isinstance(value.get(key), str) or not value[key]:
            raise ModelSourceError(f"architecture.{key}: is required (architecture: {{file: net.py, class: Net}})")
    path = (base_dir / value["file"]).resolve()
    if not path.is_file():
        raise ModelSourceError(f"architecture.file: model file not found: {path}")
    if path.suffix != ".py":
        raise ModelSourceError(f"architecture.file: {path} is not a Python file (.py)")
    kwargs = _check_kwargs(value.get("kwargs"), "architecture.kwargs")
    return UserArchitecture(str(path), value["class"], None, kwargs, _sha256(path))


def import_user_file(path: Path, prefix: str, field_name: str):
    """Import the user's ``path`` once per content (its folder on ``sys.path`` meanwhile, for its own imports);
    ModelSourceError naming ``field_name`` when it fails."""
    module_name = f"{prefix}_{path.stem}_{_sha256(path)[:16]}"
    module = sys.modules.get(module_name)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # before it runs: dataclasses and pickling look their module up there
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's module failed to import
        del sys.modules[module_name]
        raise ModelSourceError(f"{field_name}: importing {path.name} failed: {_one_line(exc)}") from None
    finally:
        sys.path.remove(str(path.parent))
    return module


def load_class(path: Path, name: str) -> type:
    """Import the user's file and get its ``nn.Module`` class ``name``."""
    module = import_user_file(path, "servekit_user_model", "architecture.file")
    module_name = module.__name__
    cls = getattr(module, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        found = sorted(n for n, v in vars(module).items() if inspect.isclass(v) and issubclass(v, nn.Module)
                       and v.__module__ == module_name)  # fmt: skip
        what = "no class" if cls is None else "a name that is not an nn.Module class:"
        raise ModelSourceError(f"architecture.class: {path.name} has {what} {name!r} "
                               f"(its nn.Module classes: {', '.join(found) or 'none'})")  # fmt: skip
    return cls


def state_dict_mismatch(model: nn.Module, state: dict) -> str | None:
    """Why ``state`` does not load into ``model`` (missing, unexpected and mis-shaped keys named), or None."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    parts = []
    for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped", shapes)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            parts.append(f"{what}: {', '.join(keys[:3])}{more}")
    return "; ".join(parts) or None


# ------------------------------------------------------------------------------------------ programs
@dataclass(frozen=True)
class UserProgram:
    """``program: {file}``: a TorchScript archive or a ``torch.export`` program (``.pt2``)."""

    file: str
    sha256: str

    @property
    def exported(self) -> bool:
        return Path(self.file).suffix == ".pt2"

    def __str__(self) -> str:
        return f"program:{Path(self.file).name}"

    def to_dict(self) -> dict:
        return {"file": Path(self.file).name, "sha256": self.sha256}

    def load(self) -> nn.Module:
        """The program as a callable module (ModelSourceError naming the file when it is neither kind)."""
        try:
            if self.exported:
                return torch.export.load(self.file).module()
            return torch.jit.load(self.file, map_location="cpu").eval()
        except Exception as exc:  # noqa: BLE001 - whatever the file is, it is not a program we can load
            kind = "torch.export program (.pt2)" if self.exported else "TorchScript program (torch.jit.save)"
            raise ModelSourceError(f"program.file: {Path(self.file).name} is not a {kind}: {_one_line(exc)}") from None


def parse_program(value: Any, base_dir: Path) -> UserProgram:
    if not isinstance(value, dict) or set(value) != {"file"} or not isinstance(value["file"], str):
        raise ModelSourceError(f"program: must be {{file: path/to/program}} (TorchScript, or torch.export .pt2), "
                               f"got {value!r}")  # fmt: skip
    path = (base_dir / value["file"]).resolve()
    if not path.is_file():
        raise ModelSourceError(f"program.file: program file not found: {path}")
    return UserProgram(str(path), _sha256(path))


def freeze_program(program: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Save ``program`` as the frozen TorchScript the handler loads: a ScriptModule as given (frozen if it is
    not yet), an exported program traced once."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.inference_mode(False), torch.no_grad():
            if isinstance(program, torch.jit.ScriptModule):
                script = program.eval()
                with contextlib.suppress(RuntimeError):  # already frozen: freeze needs an unfrozen module
                    script = torch.jit.freeze(script)
            else:
                # An exported program's module cannot be put in eval mode (it is traced in it): its trace can.
                script = torch.jit.freeze(torch.jit.trace(program, example).eval())
            torch.jit.save(script, str(path))
