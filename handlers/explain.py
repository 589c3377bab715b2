"""Explanations: why the model answered, computed on the FP32 reference of the version that answered.

TorchServe 0.12's frontend marks every request it routes with a request header ``explain``: ``"True"``
for ``POST /explanations/NAME[/VERSION]``, KServe v1 ``POST /v1/models/NAME:explain`` and
``POST /v2/models/NAME/explain``, ``"False"`` for every prediction route (it appends its own value
after the client's headers, so a client cannot turn a prediction into an explanation with that header).
``BatchHandler`` answers such a request through ``explain`` instead of the prediction path.

The method is Integrated Gradients (Captum): the attribution of input element i is
``(x_i - x'_i) * mean over the path x' + a (x - x') of d score / d x_i``, integrated with
Gauss-Legendre quadrature over ``steps`` points. Its completeness property: the attributions sum to
``score(x) - score(x')``; every answer records that difference, the sum and the gap between them
(``completeness``). The score is the target class's output of the program before softmax (a logit).

Attributions need gradients: INT8 programs have none and the FP32 program served is optimised for
inference without them, so the reference is the FP32 TorchScript program of the same weights loaded
without that optimisation: the archive's own ``model.pt`` for FP32 versions, and ``fp32_reference.pt``
(its sha256 in the archive's ``metadata.json``, under ``explain_reference``) for INT8 and BF16 ones.

Limits (``handlers.config.ExplainConfig``, the ``explain:`` section): steps, inputs per request, a
timeout checked between integration chunks (503, the worker goes on), and a machine-wide share of
the wall time per model, one explanation at a time (``ShareBudget``; 429 with the seconds to wait).

Per request options travel in headers, the same for every protocol and request form:
``X-Explain-Steps`` (1..max_steps), ``X-Explain-Target`` (a label, or ``#index``; default: the
class the served program answered) and ``X-Explain-Heatmap: png`` (images: a PNG over the input).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import io
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from handlers.config import ExplainConfig
from handlers.errors import DeadlineExceeded, InvalidInput, NotExplainable, PayloadTooLarge, TooManyRequests
from handlers.protocols import Reply

EXPLAIN_HEADER = "explain"  # set by TorchServe's frontend on every inference request: "True" or "False"
STEPS_HEADER = "x-explain-steps"
TARGET_HEADER = "x-explain-target"
HEATMAP_HEADER = "x-explain-heatmap"
ENV_BUDGET_DIR = "SERVEKIT_EXPLAIN_DIR"  # where the per-model share files live (tests, several tenants)
REFERENCE_FILE = "fp32_reference.pt"
METHOD = "integrated_gradients"
INTEGRATION = "gausslegendre"
# The stated tolerance of completeness: |sum - (score - baseline_score)| <= ABS + REL * |score - baseline_score|.
# Measured: smooth models (softplus, tanh) are within 1e-3 relative at 32 steps; ReLU kinks make the
# integrand non-smooth and leave up to ~4 % at 32 steps on a small difference (tests/unit/test_explain.py).
COMPLETENESS_REL = 0.05
COMPLETENESS_ABS = 5e-3
HEATMAP_MIN_SIDE = 256  # pixels: the PNG is scaled up (nearest) so a 16x16 input stays visible


def explanation_requested(context: Any, idx: int) -> bool:
    """Whether TorchServe routed request ``idx`` as an explanation (its frontend's ``explain`` header).

    Read by its exact name, as the frontend writes it: a client header ``Explain`` on a prediction
    route does not count.
    """
    getter = getattr(context, "get_all_request_header", None)
    headers = getter(idx) if getter is not None else None
    return isinstance(headers, dict) and headers.get(EXPLAIN_HEADER) == "True"


# ------------------------------------------------------------------------------------------ options
@dataclass(frozen=True)
class ExplainOptions:
    """What one request asked of its explanation (the ``X-Explain-*`` headers), checked against the limits."""

    steps: int
    target: str | None = None  # a label, or "#index"; None: the class the served program answered
    heatmap: bool = False


def read_options(headers: dict[str, str], limits: ExplainConfig) -> ExplainOptions:
    """The request's ``X-Explain-*`` headers (lower-case names), checked: 400 when malformed, 413 over a limit."""
    raw_steps = headers.get(STEPS_HEADER)
    steps = limits.steps
    if raw_steps is not None:
        try:
            steps = int(raw_steps.strip())
        except ValueError:
            raise InvalidInput(f"X-Explain-Steps must be a whole number, got {raw_steps[:40]!r}") from None
        if steps < 1:
            raise InvalidInput(f"X-Explain-Steps must be at least 1, got {steps}")
        if steps > limits.max_steps:
            raise PayloadTooLarge(f"X-Explain-Steps is {steps}; this model allows at most {limits.max_steps}")
    heatmap = headers.get(HEATMAP_HEADER, "").strip().lower()
    if heatmap not in ("", "png", "none"):
        raise InvalidInput(f"X-Explain-Heatmap must be 'png' or 'none', got {heatmap[:40]!r}")
    target = headers.get(TARGET_HEADER)
    return ExplainOptions(steps, target.strip() if target is not None else None, heatmap == "png")


def check_inputs(count: int, limits: ExplainConfig) -> None:
    if count > limits.max_inputs:
        raise PayloadTooLarge(
            f"an explanation request may carry at most {limits.max_inputs} inputs (explain.max_inputs); "
            f"this one carries {count}: send them in several requests"
        )


def target_index(target: str | None, labels: list[str], predicted: int) -> int:
    """The class to explain: ``target`` (a label or ``#index``) or the one the served program answered."""
    if target is None or target == "":
        return predicted
    if target.startswith("#"):
        try:
            index = int(target[1:])
        except ValueError:
            index = -1
        if not 0 <= index < len(labels):
            raise InvalidInput(f"X-Explain-Target {target[:40]!r}: an index is #0 to #{len(labels) - 1}")
        return index
    if target in labels:
        return labels.index(target)
    shown = ", ".join(repr(label) for label in labels[:12])
    raise InvalidInput(
        f"X-Explain-Target {target[:40]!r} is not a label of this model ({shown}{', ...' if len(labels) > 12 else ''})"
    )


# ------------------------------------------------------------------------------------------ the reference
def load_reference(
    model_dir: Path, precision: str, serialized: str, runtime: str = "torch"
) -> tuple[torch.jit.ScriptModule, str]:
    """The FP32 program attributions are computed on, its sha256 checked, and what it is (for the answer).

    FP32 versions: the served program file itself, loaded again without inference-only optimisation
    (prepacked kernels have no gradients). INT8 / BF16 versions: ``fp32_reference.pt``, whose sha256
    the build recorded in ``metadata.json`` (``explain_reference``); so do versions served by another
    runtime (``runtime``: OpenVINO and ONNX Runtime give no gradients).
    """
    metadata = json.loads((model_dir / "metadata.json").read_text())
    served = precision.upper() if runtime == "torch" else f"{precision.upper()} on {runtime}"
    if precision == "fp32" and runtime == "torch":
        path, expected = model_dir / serialized, metadata.get("program_sha256")
        what = "the served FP32 program (model.pt), without its inference-only optimisation"
    else:
        record = metadata.get("explain_reference") or {}
        if not record.get("file"):
            raise NotExplainable(
                f"this {served} archive carries no FP32 reference for explanations: rebuild it "
                "with this toolkit version"
            )
        path, expected = model_dir / record["file"], record.get("sha256")
        what = (
            f"the FP32 reference ({record['file']}) of this {served} version, built from the same "
            f"weights: {served} programs have no gradients, so attributions are computed in FP32"
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected:
        raise RuntimeError(f"refusing to explain: {path.name} does not match the sha256 the build recorded")
    with _quiet():
        program = torch.jit.load(str(path), map_location="cpu").eval()
    return program, what


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


# ------------------------------------------------------------------------------------------ the method
@dataclass
class Attribution:
    """Integrated Gradients of a batch: per-input attributions and the completeness figures."""

    attributions: torch.Tensor  # shaped like the inputs
    score: list[float]  # target score at the input
    baseline_score: list[float]  # target score at the baseline
    steps: int

    def completeness(self, i: int) -> dict:
        """Input ``i``'s check of the completeness property (module docstring)."""
        total = float(self.attributions[i].sum())
        difference = self.score[i] - self.baseline_score[i]
        error = abs(total - difference)
        relative = error / abs(difference) if abs(difference) > 0 else math.inf if error else 0.0
        return {
            "attribution_sum": _round(total),
            "score": _round(self.score[i]),
            "baseline_score": _round(self.baseline_score[i]),
            "error": _round(error),
            "relative_error": _round(relative) if math.isfinite(relative) else None,
            "tolerance": f"{COMPLETENESS_ABS:g} + {COMPLETENESS_REL:g} x |score - baseline_score|",
            "within_tolerance": error <= COMPLETENESS_ABS + COMPLETENESS_REL * abs(difference),
        }


def integrated_gradients(
    model: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    baselines: torch.Tensor,
    targets: list[int],
    steps: int,
    deadline: float | None = None,
) -> Attribution:
    """Integrated Gradients of ``model``'s output ``targets[i]`` for each input against its baseline.

    ``deadline`` (``time.monotonic()``): checked before every forward pass Captum makes (the path is
    run in chunks of at most 64 points per input), so a slow explanation stops with 503, not a dead worker.
    In an explanation pool (``serve_as_pool``) the chunks are of 8 points, and each waits for idle time.
    """
    from captum.attr import IntegratedGradients

    gate = _pool_gate
    if gate is not None:
        gate.start()

    def forward(x: torch.Tensor) -> torch.Tensor:
        if gate is not None:  # an explanation pool: each chunk waits for the prediction workers to be idle
            gate.wait(deadline)
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceeded("the explanation ran past explain.timeout_s and was stopped: ask for fewer steps")
        return model(x).float()

    chunk = POOL_CHUNK_POINTS if gate is not None else CHUNK_POINTS

    target = torch.tensor(targets, dtype=torch.long)
    with torch.inference_mode(False), torch.enable_grad():
        # Copies made here: a tensor made under inference mode cannot take part in autograd.
        inputs = inputs.detach().float().clone()
        baselines = baselines.detach().float().expand_as(inputs).clone()
        attributions = IntegratedGradients(forward).attribute(
            inputs,
            baselines=baselines,
            target=target,
            n_steps=steps,
            method=INTEGRATION,
            internal_batch_size=len(targets) * min(steps, chunk),
        )
        with torch.no_grad():
            both = model(torch.cat([inputs, baselines])).float()
    rows = torch.arange(len(targets))
    score = both[: len(targets)][rows, target].tolist()
    baseline_score = both[len(targets) :][rows, target].tolist()
    return Attribution(attributions.detach(), score, baseline_score, steps)


def describe(
    attribution: Attribution, i: int, program: str, baseline: str, prediction: dict, target: int, labels: list[str]
) -> dict:
    """The fields every explanation answer shares: what answered, what is explained, how, and the check."""
    import captum

    return {
        "prediction": prediction,
        "target": {"label": labels[target], "index": target},
        "method": METHOD,
        "library": f"captum {captum.__version__}",
        "output": "the target class's score before softmax (logit)",
        "baseline": baseline,
        "steps": attribution.steps,
        "integration": INTEGRATION,
        "program": program,
        "completeness": attribution.completeness(i),
    }


# ------------------------------------------------------------------------------------------ images
def pooled(grid_values: torch.Tensor, grid: int) -> torch.Tensor:
    """``[H, W]`` attributions sum-pooled so neither side exceeds ``grid`` cells; the total is kept."""
    height, width = grid_values.shape
    factor = max(1, math.ceil(max(height, width) / grid))
    if factor == 1:
        return grid_values
    pad_h, pad_w = (-height) % factor, (-width) % factor
    padded = torch.nn.functional.pad(grid_values[None, None], (0, pad_w, 0, pad_h))
    return torch.nn.functional.avg_pool2d(padded, factor)[0, 0] * factor * factor


def heatmap_png(image: np.ndarray, attributions: np.ndarray) -> bytes:
    """A PNG of ``attributions`` ``[H, W]`` over ``image`` (``[H, W]`` gray, 0..1): red for evidence for the
    class, blue against it, opacity by magnitude; scaled up (nearest) to at least ``HEATMAP_MIN_SIDE``."""
    from PIL import Image

    gray = np.clip(image, 0.0, 1.0) * 0.6 + 0.2
    peak = float(np.abs(attributions).max()) or 1.0
    strength = np.abs(attributions) / peak
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    color = np.where((attributions >= 0)[..., None], np.array([1.0, 0.1, 0.1]), np.array([0.1, 0.3, 1.0]))
    alpha = (strength**0.7)[..., None] * 0.85
    blended = (rgb * (1 - alpha) + color * alpha) * 255
    picture = Image.fromarray(blended.round().astype(np.uint8), "RGB")
    scale = max(1, math.ceil(HEATMAP_MIN_SIDE / max(picture.size)))
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    out = io.BytesIO()
    picture.save(out, format="PNG", optimize=True)
    return out.getvalue()


def image_fields(attributions: torch.Tensor, pixels: torch.Tensor, limits: ExplainConfig, heatmap: bool) -> dict:
    """One image's attribution fields: ``[C, H, W]`` summed over channels, pooled to the grid, and the PNG."""
    per_pixel = attributions.sum(dim=0) if attributions.dim() == 3 else attributions
    cells = pooled(per_pixel, limits.grid)
    fields: dict[str, Any] = {
        "attributions": [[_round(v) for v in row] for row in cells.tolist()],
        "attributions_shape": list(cells.shape),
        "input_shape": list(attributions.shape),
        "attributions_layout": (
            "rows x columns of the model's input (after preprocessing), summed over channels"
            + (
                ""
                if cells.shape == per_pixel.shape
                else f", each cell the sum of {per_pixel.shape[0] // cells.shape[0] or 1}x"
                f"{per_pixel.shape[1] // cells.shape[1] or 1} pixels"
            )
        ),  # fmt: skip
    }
    if heatmap:
        gray = pixels.mean(dim=0) if pixels.dim() == 3 else pixels
        fields["heatmap_png"] = base64.b64encode(heatmap_png(gray.numpy(), per_pixel.numpy())).decode("ascii")
        fields["heatmap"] = "over the model's input (after preprocessing); red: for the target class, blue: against"
    return fields


# ------------------------------------------------------------------------------------------ explainer pools
# A registration named ``NAME-explainer`` (the same archive as NAME, registered under that name) is an
# explanation pool of NAME: its workers answer explanations only, on idle CPU time (SCHED_IDLE), outside
# the prediction workers' CPU budget, so predictions never wait behind an explanation. docs/explanations.md.
EXPLAINER_SUFFIX = "-explainer"


def is_explainer(registered_name: str) -> bool:
    """True for a registration of the explanation pool of a model (``NAME-explainer``)."""
    return len(registered_name) > len(EXPLAINER_SUFFIX) and registered_name.endswith(EXPLAINER_SUFFIX)


def idle_priority() -> int:
    """Put every thread of this process on Linux's SCHED_IDLE policy (threads started later inherit it): they
    run only when no other thread wants the CPU. Returns how many threads were moved."""
    moved = 0
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError, ValueError):
            os.sched_setscheduler(int(task.name), os.SCHED_IDLE, os.sched_param(0))
            moved += 1
    return moved


CHUNK_POINTS = 64  # path points per input in one forward and backward pass
POOL_CHUNK_POINTS = 8  # in a pool: smaller chunks, so the idle gate is asked often
POOL_QUIET_S = 0.01  # a pool's chunk starts only once no prediction batch has run for this long
POOL_POLL_S = 0.001


class IdleGate:
    """A pool's chunk of work starts only on idle time: when no prediction batch has run for ``quiet_s``.

    ``SCHED_IDLE`` alone is not enough. Under load the gaps between prediction batches are real idle
    time, and a pool that fills them still costs the predictions: their caches, and a context switch
    each time a prediction thread wakes on a CPU the pool holds. In ``make bench`` the prediction p99
    doubled. ``busy`` says whether a prediction batch runs now (``handlers.cpu_budget.batches_running``).
    """

    def __init__(
        self,
        busy: Callable[[], bool],
        quiet_s: float = POOL_QUIET_S,
        poll_s: float = POOL_POLL_S,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.busy, self.quiet_s, self.poll_s, self.clock, self.sleep = busy, quiet_s, poll_s, clock, sleep
        self.last_busy = clock()

    def start(self) -> None:
        """A new explanation: it has not yet seen the predictions quiet."""
        self.last_busy = self.clock()

    def wait(self, deadline: float | None) -> None:
        while True:
            now = self.clock()
            if self.busy():
                self.last_busy = now
            elif now - self.last_busy >= self.quiet_s:
                return
            if deadline is not None and now > deadline:
                raise DeadlineExceeded(
                    "the explanation pool found no idle CPU time before explain.timeout_s (the prediction "
                    "workers were busy): retry later, or send it to the prediction workers"
                )
            self.sleep(self.poll_s)


_pool_gate: IdleGate | None = None


def serve_as_pool(gate: IdleGate | None) -> None:
    """This process is an explanation pool: every explanation's chunks wait on ``gate`` (None: they do not)."""
    global _pool_gate
    _pool_gate = gate


def only_explanations(pool: str, model: str) -> InvalidInput:
    """What a prediction sent to the explanation pool ``pool`` of ``model`` gets (400): where predictions go."""
    return InvalidInput(
        f"{pool} answers explanations only (POST /explanations/{pool}): send predictions to /predictions/{model}"
    )


# ------------------------------------------------------------------------------------------ the share of work
def budget_dir() -> Path:
    if env := os.environ.get(ENV_BUDGET_DIR):
        return Path(env)
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return base / f"servekit-explain-{os.getuid()}"


class ShareBudget:
    """One explanation of a model at a time on this machine, and at most ``share`` of the wall time.

    A small JSON file per model under ``budget_dir()``, read and written under ``flock``: ``running``
    (pid and until when) while an explanation runs, and ``next_at``: after one that took ``t`` seconds
    the next may start ``t * (1 / share - 1)`` seconds later. Refusals are 429 with the wait.
    """

    def __init__(self, model: str, share: float, directory: Path | None = None) -> None:
        self.share = share
        self.path = (directory or budget_dir()) / f"{_safe_name(model)}.json"

    @contextlib.contextmanager
    def claim(self, timeout_s: float) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked() as state:
            now = time.time()
            running = state.get("running") or {}
            if running.get("until", 0) > now and _alive(running.get("pid")):
                raise TooManyRequests(
                    "another explanation of this model is running (one at a time): retry in "
                    f"{max(0.1, running['until'] - now):.1f} s at most"
                )
            if state.get("next_at", 0) > now:
                raise TooManyRequests(
                    f"explanations of this model may use at most {self.share:.0%} of the time "
                    f"(explain.max_share): retry in {state['next_at'] - now:.1f} s"
                )
            state["running"] = {"pid": os.getpid(), "until": now + timeout_s + 1.0}
        started = time.monotonic()
        try:
            yield
        finally:
            took = time.monotonic() - started
            with self._locked() as state:
                state["running"] = None
                state["next_at"] = time.time() + took * (1.0 / self.share - 1.0)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict]:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.pread(fd, 4096, 0)
            try:
                state = json.loads(raw) if raw.strip() else {}
            except ValueError:
                state = {}
            yield state
            data = json.dumps(state).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        finally:
            os.close(fd)  # releases the lock


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _safe_name(model: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in model)[:100] or "model"


# ------------------------------------------------------------------------------------------ the answer
def encode(protocol: str, explanations: list[dict], model: str, version: str, request_id: str | None) -> Reply:
    """The explanation answer in the request's protocol: one explanation per input, in the request's order.

    servekit's own: ``{"explanations": [...], "model", "version"}``; KServe v1: ``{"explanations": [...],
    "model_name", "model_version"}``; OIP (``POST /v2/models/NAME/explain``, which the protocol leaves
    free-form): the KServe v1 form with the request's ``id``.
    """
    if protocol == "native":
        return Reply({"explanations": explanations, "model": model, "version": version})
    body: dict[str, Any] = {"explanations": explanations, "model_name": model, "model_version": version}
    if protocol == "oip_v2" and request_id is not None:
        body["id"] = request_id
    return Reply(body)


def _round(value: float) -> float:
    return float(f"{value:.6g}")


__all__ = [
    "EXPLAINER_SUFFIX",
    "EXPLAIN_HEADER",
    "Attribution",
    "ExplainOptions",
    "ShareBudget",
    "check_inputs",
    "describe",
    "encode",
    "explanation_requested",
    "image_fields",
    "idle_priority",
    "integrated_gradients",
    "is_explainer",
    "load_reference",
    "only_explanations",
    "read_options",
    "target_index",
]
