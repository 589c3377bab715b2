"""Programs served by another CPU runtime: OpenVINO or ONNX Runtime, behind the torch program's call.

A version's ``runtime:`` (docs/spec.md) swaps the engine, not the contract: the archive carries one
ONNX file (``model.onnx``) exported from the version's FP32 module, its sha256 recorded like any
program's; the handler calls it as it calls a TorchScript program, an FP32 ``torch.Tensor`` batch in,
an FP32 ``torch.Tensor`` out; the build gates its accuracy against the FP32 torch program on the
held-out split. Precision is the runtime's: OpenVINO computes a ``bf16`` version in BF16 (its
inference-precision hint: AMX or AVX512-BF16), an ``fp32`` one in FP32, an ``int8`` one from a QDQ
graph (``quantize_qdq``: static INT8, per-channel weights, calibrated like the torch INT8 program).

Threads follow the CPU budget (handlers.cpu_budget): the budget sets torch's thread count per batch,
and a runtime's thread count is fixed when its session is made, so one session per thread count is
made on first use and kept (two at most on a 2-core machine; the ONNX file is read once).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from handlers.config import check_runtime

ONNX_FILE = "model.onnx"
OPENVINO_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # INT8: the QDQ graph says it


def runtime_version(runtime: str) -> str | None:
    """The installed version of ``runtime``'s package (recorded in the archive's metadata)."""
    if runtime == "openvino":
        import openvino

        return openvino.__version__.split("-")[0]
    if runtime == "onnxruntime":
        import onnxruntime

        return onnxruntime.__version__
    return None


def _require(runtime: str) -> None:
    """One clear line when the runtime's package is missing (fail at load, not at the first request)."""
    import importlib.util

    if importlib.util.find_spec(runtime) is None:
        raise RuntimeError(
            f"this version is served by {runtime} (runtime: in its spec), which is not installed in the "
            f"worker's Python: pip install 'servekit[runtimes]' (or {runtime} alone)"
        )


class RuntimeProgram:
    """An ONNX program in OpenVINO or ONNX Runtime, called like a torch program (one thread count per session)."""

    def __init__(self, path: Path, runtime: str, precision: str) -> None:
        check_runtime(runtime, precision)
        self.path, self.runtime, self.precision = Path(path), runtime, precision
        self._sessions: dict[int, object] = {}
        self._requests: dict[int, list] = {}  # OpenVINO: idle infer requests per thread count
        self._input_name = ""  # ONNX Runtime: the program's one input, named at the first session
        self._lock = threading.Lock()
        _require(runtime)
        if runtime == "openvino":
            import openvino

            self._core = openvino.Core()
            self._model = self._core.read_model(str(self.path))
        self._session(torch.get_num_threads())  # a broken file fails at load

    def _session(self, threads: int):
        session = self._sessions.get(threads)
        if session is not None:
            return session
        with self._lock:
            if threads not in self._sessions:
                self._sessions[threads] = self._make(threads)
            return self._sessions[threads]

    def _make(self, threads: int):
        if self.runtime == "openvino":
            return self._core.compile_model(
                self._model,
                "CPU",
                {
                    "INFERENCE_NUM_THREADS": threads,
                    "INFERENCE_PRECISION_HINT": OPENVINO_HINTS[self.precision],
                    "PERFORMANCE_HINT": "LATENCY",  # one stream: the worker's batch is the parallel work
                    # OpenVINO pins its threads to cores by default, the same cores in every process: two
                    # workers of one thread each then share one core (ResNet-18 FP32, 2 processes, Intel
                    # Xeon: 20 img/s each pinned, 42.5 unpinned). The CPU budget shares the cores instead.
                    "ENABLE_CPU_PINNING": False,
                },
            )
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = onnxruntime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self._input_name = session.get_inputs()[0].name
        return session

    @property
    def sessions(self) -> list[int]:
        """The thread counts a session has been made for (the CPU budget's changes, as seen here)."""
        return sorted(self._sessions)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        threads = torch.get_num_threads()
        session = self._session(threads)
        array = np.ascontiguousarray(batch.detach().to(torch.float32).numpy())
        if self.runtime == "onnxruntime":
            output = session.run(None, {self._input_name: array})[0]
            return torch.from_numpy(np.asarray(output, dtype=np.float32))
        # OpenVINO: an infer request is reused (making one allocates its buffers), one per concurrent
        # caller; the batch is read in place (share_inputs) rather than copied into the request's tensor.
        idle = self._requests.setdefault(threads, [])
        try:
            request = idle.pop()
        except IndexError:
            request = session.create_infer_request()
        try:
            output = request.infer({0: array}, share_inputs=True)[0]
            return torch.from_numpy(np.array(output, dtype=np.float32, copy=True))  # the request's buffer is reused
        finally:
            idle.append(request)

    def eval(self) -> RuntimeProgram:  # what callers of a torch program may call
        return self


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """``model`` (FP32) as ONNX at ``path``, the batch dimension dynamic: what a runtime version carries."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(
                model.eval(),
                (example,),
                str(path),
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )


def quantize_qdq(fp32_onnx: Path, calibration: torch.Tensor, path: Path, batch: int = 8) -> None:
    """Static INT8 of the ONNX file ``fp32_onnx`` as a QDQ graph at ``path`` (ONNX Runtime's quantization
    tool): per-channel INT8 weights, UINT8 activations whose ranges come from ``calibration`` (the spec's
    calibration images, never held-out ones). OpenVINO runs the QDQ graph with its INT8 kernels."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    images = calibration.detach().to(torch.float32).numpy()

    class Calibration(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": images[i : i + batch]} for i in range(0, len(images), batch)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    quantize_static(
        str(fp32_onnx), str(path), Calibration(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip
