"""From an FP32 ``nn.Module`` to the program an archive carries: INT8 quantization, export, evaluation."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from handlers.model_loading import load_model
from handlers.transforms import ImagePreprocessor
from servekit.build.datasets import images
from servekit.build.spec import ModelVersionSpec
from servekit.build.training import to_tensors


def calibration_inputs(spec: ModelVersionSpec) -> torch.Tensor:
    """Training images for calibration (never held-out ones), or random ones for ``synthetic``."""
    q = spec.quantization
    assert q is not None
    if q.calibration == "synthetic":
        generator = torch.Generator().manual_seed(0)
        return torch.randn((q.calibration_images, *spec.preprocessing.input_shape), generator=generator)
    x, _ = to_tensors(images(spec, q.calibration, "train"), ImagePreprocessor(spec.preprocessing))
    return x[: q.calibration_images]


def quantize_static(model: nn.Module, spec: ModelVersionSpec, log: Callable[[str], None]) -> nn.Module:
    """Post-training static INT8 quantization in FX graph mode, calibrated on ``calibration_inputs``."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    q = spec.quantization
    assert q is not None
    torch.backends.quantized.engine = q.backend
    calibration = calibration_inputs(spec)
    example = calibration[:1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FX quantization deprecation notices
        try:
            prepared = prepare_fx(model.eval(), get_default_qconfig_mapping(q.backend), (example,))
        except Exception as exc:  # noqa: BLE001 - a user's module torch.fx cannot trace
            from servekit.build.training import BuildError

            text = " ".join(str(exc).split())[:300]
            raise BuildError(f"precision: static INT8 quantizes in FX graph mode, and torch.fx cannot trace "
                             f"{spec.architecture} ({type(exc).__name__}: {text}); keep control flow that depends "
                             "on tensor values out of forward(), or serve it in fp32 or bf16") from None  # fmt: skip
        with torch.inference_mode():
            batches = range(0, len(calibration), 32)
            for i, start in enumerate(batches, 1):
                prepared(calibration[start : start + 32])
                if i == 1 or i % 4 == 0 or i == len(batches):
                    log(f"calibrating ({q.calibration}): batch {i}/{len(batches)}")
        return convert_fx(prepared)


class ChannelsLastProgram(nn.Module):
    """``net`` with channels-last (NHWC) weights, and image batches made channels-last on the way in.

    oneDNN's FP32 convolutions run on that layout without reordering activations on every call.
    ResNet-18, batch 8, both threads, Intel Xeon (2026-12-06, one run): 78 img/s channels-last
    against 53 img/s in the default layout with ``optimize_for_inference`` (docs/performance.md).
    The answers are the same numbers: only the memory layout changes.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # an image batch (decided when the program is traced: one input rank per model)
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)


def channels_last(model: nn.Module) -> nn.Module:
    """A channels-last copy of ``model`` for the FP32 program (the module given is left as it is)."""
    return ChannelsLastProgram(copy.deepcopy(model)).eval()


class Bf16Program(nn.Module):
    """``net`` in BF16 behind an FP32 interface: the handler's tensors and outputs stay FP32.

    Weights and image batches are channels-last (NHWC): oneDNN's BF16 convolutions (AMX or
    AVX512-BF16) run on that layout without reordering every activation and weight on every call.
    ResNet-18, batch 8, one thread, on the Xeon of docs/performance.md: 113 img/s channels-last
    against 50 img/s in the default layout (FP32 with oneDNN prepacking: 35 img/s).
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.to(torch.bfloat16).to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16)
        if x.dim() == 4:  # an image batch (decided when the program is traced: one input rank per model)
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x).float()


def to_bf16(model: nn.Module) -> nn.Module:
    """A BF16 copy of ``model`` (the FP32 one is left as it is, for the accuracy reference)."""
    return Bf16Program(copy.deepcopy(model)).eval()


def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Trace and freeze ``model`` into a TorchScript program at ``path``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarning and torch.jit deprecation notices
        with torch.inference_mode(False), torch.no_grad():
            traced = torch.jit.trace(model.eval(), example)
            frozen = torch.jit.freeze(traced)
            torch.jit.save(frozen, str(path))


def load_program(path: Path, spec: ModelVersionSpec) -> torch.jit.ScriptModule:
    """Load an exported program exactly as the handler will."""
    return load_model(path, spec.handler_config())


@torch.inference_mode()
def top1_accuracy(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    correct = 0
    for start in range(0, len(x), 128):
        correct += int((model(x[start : start + 128]).argmax(1) == y[start : start + 128]).sum())
    return 100.0 * correct / len(x)


def evaluation_set(spec: ModelVersionSpec) -> tuple[torch.Tensor, torch.Tensor] | None:
    if spec.evaluation is None:
        return None
    return to_tensors(images(spec, spec.evaluation, "holdout"), ImagePreprocessor(spec.preprocessing))
