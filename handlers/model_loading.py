"""Loading a serialized model, one loader per precision.

Archives carry a frozen TorchScript program (``model.pt``): a format that needs no Python class
definitions and runs no pickled Python code when loaded. FP32 and INT8 models differ only here:
an INT8 program needs the quantized kernel engine it was converted for. A version whose spec names a
``runtime:`` (OpenVINO or ONNX Runtime) carries an ONNX program (``model.onnx``) instead, run by
``handlers.runtimes.RuntimeProgram``; the sha256 record covers it the same way.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from handlers.config import RuntimeConfig
from handlers.runtimes import RuntimeProgram


class TamperedArchive(RuntimeError):
    """The archive's program is not the one its build recorded: the worker refuses to serve it."""


def verify_program(model_dir: Path, serialized: str) -> str:
    """Check ``model_dir/serialized`` against ``program_sha256`` in the archive's metadata.json.

    The build records the program's sha256 next to it; a program changed after the build (one
    flipped byte is enough to change what a model answers) fails here, at load, so the worker
    never serves it. Returns the verified digest.
    """
    metadata_path = Path(model_dir) / "metadata.json"
    try:
        expected = json.loads(metadata_path.read_text())["program_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TamperedArchive(f"refusing to serve: no program_sha256 in {metadata_path.name} ({exc!r})") from exc
    digest = hashlib.sha256()
    with open(Path(model_dir) / serialized, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    actual = digest.hexdigest()
    if actual != expected:
        raise TamperedArchive(
            f"refusing to serve: {serialized} has sha256 {actual[:16]}... but the build recorded "
            f"{str(expected)[:16]}...: the archive was modified after it was built"
        )
    return actual


def _load_torchscript(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        # torch.jit.load is marked deprecated in favour of torch.export; it is still the format
        # with working quantized CPU kernels for eager serving in this torch release.
        warnings.simplefilter("ignore", FutureWarning)
        model = torch.jit.load(str(path), map_location="cpu")
    return model.eval()


def load_fp32(path: Path, config: RuntimeConfig) -> torch.jit.ScriptModule:
    model = _load_torchscript(path)
    if config.optimize:
        # oneDNN-prepacked convolutions: 1.4-1.9x faster for ResNet-18 on CPU. Done at load time
        # because the optimized graph cannot be serialized.
        model = torch.jit.optimize_for_inference(model)
    return model


def load_int8(path: Path, config: RuntimeConfig) -> torch.jit.ScriptModule:
    engine = config.quantized_engine
    if engine not in torch.backends.quantized.supported_engines:
        raise RuntimeError(
            f"quantized engine {engine!r} is not available here "
            f"(supported: {torch.backends.quantized.supported_engines})"
        )
    torch.backends.quantized.engine = engine
    return _load_torchscript(path)


NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes in BF16 natively (AVX512-BF16 or AMX); elsewhere BF16 is emulated and slow."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def load_bf16(path: Path, config: RuntimeConfig) -> torch.jit.ScriptModule:
    """A BF16 program (it casts its FP32 input itself); refused on CPUs without native BF16."""
    if not native_bf16():
        raise RuntimeError(
            f"precision bf16 needs a CPU with native BF16 ({' or '.join(NATIVE_BF16_FLAGS)}); this one has "
            "neither: serve the fp32 or int8 version of this model here"
        )
    return _load_torchscript(path)


LOADERS: dict[str, Callable[[Path, RuntimeConfig], torch.jit.ScriptModule]] = {
    "fp32": load_fp32,
    "int8": load_int8,
    "bf16": load_bf16,
}


def load_model(path: Path, config: RuntimeConfig) -> torch.jit.ScriptModule | RuntimeProgram:
    """The program at ``path``, loaded the way ``config.precision`` (and ``config.runtime``) needs."""
    if config.runtime != "torch":
        return RuntimeProgram(path, config.runtime, config.precision)
    return LOADERS[config.precision](path, config)
