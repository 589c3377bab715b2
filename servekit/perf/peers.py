"""Model only: this project's programs beside ONNX Runtime and OpenVINO, same model, batch and threads.

The peers are what a CPU user would pick instead of this project, each run as its documentation
advises for one stream of batches: ONNX Runtime's CPU provider on the ONNX export of the same FP32
module, and its static INT8 quantization (QDQ, per-channel weights, calibrated on the same synthetic
images as this project's INT8 program); OpenVINO on the same ONNX file in FP32 and with its BF16
inference-precision hint, and on the same QDQ model for INT8. This project's rows are the programs
of ``make bench``'s archives, loaded as the worker loads them (``handlers.model_loading.load_model``),
including the versions whose ``runtime:`` is OpenVINO.

Every row runs the same random batch for ``seconds``, in rounds (every row once per round, so a
disturbance hits all rows alike); a row's figure is its median round. The ratio per precision is
this project's best row over the best peer row.

    python -m servekit.perf.peers [--seconds 3] [--rounds 3]   # after make bench built the archives
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from handlers.model_loading import load_model, native_bf16
from handlers.runtimes import export_onnx, runtime_version

BATCH = 8
CALIBRATION_IMAGES = 64  # as bench/models.yaml's INT8 version: synthetic images, seed 0
# The bars (issue 25): this project's best at least the best peer's rate at FP32 and BF16, ahead at INT8.
MIN_OVER_PEER = {"fp32": 1.0, "bf16": 1.0, "int8": 1.0}


def _log(message: str) -> None:
    print(f"[peers] {message}", file=sys.stderr, flush=True)


def variant_key(spec) -> str:
    """A bench version's key: its precision (``fp32``, ``int8``, ``bf16``), with its runtime when not torch."""
    return spec.precision if spec.runtime is None else f"{spec.precision}_{spec.engine}"


def resnet18(weights: Path) -> torch.nn.Module:
    """The bench's FP32 ResNet-18 module (``bench/models.yaml``'s weights), the peers' source."""
    import torchvision

    module = torchvision.models.resnet18()
    module.load_state_dict(torch.load(weights, weights_only=True))
    return module.eval()


def export_peer_models(module: torch.nn.Module, workdir: Path, log: Callable[[str], None]) -> dict[str, Path]:
    """The FP32 ONNX export of ``module`` and ONNX Runtime's static INT8 (QDQ) quantization of it."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    workdir.mkdir(parents=True, exist_ok=True)
    fp32, int8 = workdir / "resnet18_fp32.onnx", workdir / "resnet18_int8_qdq.onnx"
    export_onnx(module, torch.zeros(1, 3, 224, 224), fp32)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn((CALIBRATION_IMAGES, 3, 224, 224), generator=generator).numpy()

    class Calibration(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": images[i : i + 8]} for i in range(0, len(images), 8)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    log(f"ONNX Runtime static INT8 (QDQ, per-channel): calibrating on {CALIBRATION_IMAGES} synthetic images")
    quantize_static(
        str(fp32), str(int8), Calibration(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip
    return {"fp32": fp32, "int8": int8}


def peer_rows(models: dict[str, Path], threads: int) -> dict[str, tuple[str, Callable[[np.ndarray], object]]]:
    """name -> (precision, call) for every peer row this CPU can run."""
    import onnxruntime
    import openvino

    rows: dict[str, tuple[str, Callable[[np.ndarray], object]]] = {}
    for precision in ("fp32", "int8"):
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.log_severity_level = 3
        session = onnxruntime.InferenceSession(str(models[precision]), options, providers=["CPUExecutionProvider"])
        rows[f"onnxruntime {precision}"] = (precision, lambda x, s=session: s.run(None, {"input": x}))
    core = openvino.Core()
    hints = [("fp32", "fp32", "f32"), ("int8", "int8", "f32")]
    if native_bf16():
        hints.append(("bf16", "fp32", "bf16"))  # the FP32 ONNX file with OpenVINO's BF16 inference hint
    for precision, model, hint in hints:
        compiled = core.compile_model(
            core.read_model(str(models[model])),
            "CPU",
            {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"},
        )
        request = compiled.create_infer_request()
        rows[f"openvino {precision}"] = (precision, lambda x, r=request: r.infer({0: x}))
    return rows


def our_rows(programs: dict[str, tuple[Path, object]]) -> dict[str, tuple[str, Callable[[torch.Tensor], object]]]:
    """key -> (precision, call) for this project's programs (``programs``: key -> (program file, spec))."""
    rows = {}
    for path, spec in programs.values():
        program = load_model(path, spec.handler_config())
        runtime = f"{spec.engine} runtime" if spec.runtime is not None else "torch"
        rows[f"servekit {spec.precision} ({runtime})"] = (spec.precision, program)
    return rows


def measure(
    module: torch.nn.Module,
    programs: dict[str, tuple[Path, object]],
    workdir: Path,
    seconds: float,
    rounds: int,
    log: Callable[[str], None] = _log,
) -> dict:
    """Every row's img/s (median round), the best of each side per precision, their ratio and the bars."""
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    models = export_peer_models(module, workdir, log)
    batch = torch.randn((BATCH, 3, 224, 224), generator=torch.Generator().manual_seed(1))
    array = batch.numpy()
    ours, peers = our_rows(programs), peer_rows(models, threads)
    calls = {**{name: (p, lambda f=f: f(batch)) for name, (p, f) in ours.items()},
             **{name: (p, lambda f=f: f(array)) for name, (p, f) in peers.items()}}  # fmt: skip
    rates: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for _, call in calls.values():
            for _ in range(3):  # warm-up: first calls compile kernels and pack weights
                call()
        for round_ in range(1, rounds + 1):
            for name, (_, call) in calls.items():
                images, started = 0, time.perf_counter()
                while time.perf_counter() - started < seconds:
                    call()
                    images += BATCH
                rates[name].append(images / (time.perf_counter() - started))
            log(f"round {round_}/{rounds}: " + ", ".join(f"{n} {r[-1]:.0f}" for n, r in rates.items()))
    rows = {
        name: {"precision": precision, "side": "servekit" if name in ours else "peer",
               "img_per_s": round(statistics.median(rates[name]), 1), "rounds": [round(r, 1) for r in rates[name]]}
        for name, (precision, _) in calls.items()
    }  # fmt: skip
    by_precision, bars = {}, {}
    for precision in ("fp32", "bf16", "int8"):
        mine = {n: r for n, r in rows.items() if r["precision"] == precision and r["side"] == "servekit"}
        theirs = {n: r for n, r in rows.items() if r["precision"] == precision and r["side"] == "peer"}
        if not mine or not theirs:
            continue
        best_mine = max(mine, key=lambda n: mine[n]["img_per_s"])
        best_peer = max(theirs, key=lambda n: theirs[n]["img_per_s"])
        ratio = round(mine[best_mine]["img_per_s"] / theirs[best_peer]["img_per_s"], 2)
        by_precision[precision] = {"best_servekit": best_mine, "best_peer": best_peer, "ratio": ratio}
        bars[f"model-only {precision}: servekit's best >= {MIN_OVER_PEER[precision]:g}x the best peer"] = (
            ratio >= MIN_OVER_PEER[precision]
        )
    return {
        "batch": BATCH,
        "threads": threads,
        "seconds": seconds,
        "rounds": rounds,
        "versions": {
            "onnxruntime": runtime_version("onnxruntime"),
            "openvino": runtime_version("openvino"),
            "torch": torch.__version__,
        },  # fmt: skip
        "rows": rows,
        "by_precision": by_precision,
        "bar": bars,
    }


def markdown(result: dict) -> list[str]:
    """The model-only table and the ratio per precision, as ``make bench``'s report shows them."""
    versions = ", ".join(f"{k} {v}" for k, v in result["versions"].items())
    lines = [
        f"### Model only, beside the CPU runtimes (batch {result['batch']}, {result['threads']} threads, "
        f"median of {result['rounds']} rounds of {result['seconds']:g} s; {versions})",
        "",
        "| row | precision | img/s | rounds |",
        "|---|---|---|---|",
    ]
    for name, row in sorted(result["rows"].items(), key=lambda item: (item[1]["precision"], -item[1]["img_per_s"])):
        shown = f"**{name}**" if row["side"] == "servekit" else name
        rounds = ", ".join(f"{r:g}" for r in row["rounds"])
        lines.append(f"| {shown} | {row['precision']} | {row['img_per_s']} | {rounds} |")
    lines += ["", "| precision | servekit's best | best peer | ratio |", "|---|---|---|---|"]
    for precision, entry in result["by_precision"].items():
        lines.append(f"| {precision} | {entry['best_servekit']} | {entry['best_peer']} | **{entry['ratio']}x** |")
    return lines


def main(argv: list[str] | None = None) -> int:
    from servekit.build.spec import load_spec
    from servekit.perf.resnet18 import SPEC_TEMPLATE, WEIGHTS_FILE, WORKDIR

    parser = argparse.ArgumentParser(description="Model-only rates beside ONNX Runtime and OpenVINO")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    module = resnet18(WORKDIR / WEIGHTS_FILE)
    programs = {}
    for spec in load_spec(SPEC_TEMPLATE):
        key = variant_key(spec)
        if key.startswith("bf16") and not native_bf16():
            continue
        archive = WORKDIR / "store" / spec.archive_name
        path = WORKDIR / "peers" / f"{key}_{spec.program_file}"
        path.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(archive) as mar:
            path.write_bytes(mar.read(spec.program_file))
        programs[key] = (path, spec)
    result = measure(module, programs, WORKDIR / "peers", args.seconds, args.rounds)
    print("\n".join(markdown(result)))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
