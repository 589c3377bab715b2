"""``make bench``: our served ResNet-18 (FP32 and INT8) against TorchServe's stock handler and the
machine's own in-process limit, measured side by side in one run.

Steps (each printed as it goes):

1. build ResNet-18 archives in FP32 and INT8 from one locally saved, randomly initialised
   state_dict (speed does not depend on the weight values), plus an archive of the same FP32
   weights for TorchServe's stock ``image_classifier`` handler;
2. the in-process limit: one Python process, all cores, decode + preprocess + infer the same JPEG
   at each batch size, FP32 and INT8; the best batch size counts;
3. one real TorchServe on loopback; each archive in turn is registered (cold start: registration
   to first answer), loaded by ``hey`` at each concurrency for a bounded time, and unregistered.
   The INT8 archive (the fast one) is also loaded through the Open Inference Protocol (KServe v2,
   ``POST /v2/models/NAME/infer``) with the binary tensor extension tritonclient uses, each OIP run
   right after the ``/predictions`` run at the same concurrency, so their ratio is fair. Then the
   tabular model of ``models.yaml`` (``breast_cancer``, FP32 and INT8, its spec's serving settings):
   JSON bodies of 64 held-out records through the whole request path, in records/s at the
   concurrency that gives the best rate (the bar: ``TABULAR_MIN_RECORDS_PER_S``); then the
   object detector of ``models.yaml`` (``digit_pages``, FP32 and INT8): one held-out page PNG per
   request through ``/predictions``, in pages/s at ``DETECTOR_CONCURRENCY`` (reported, no bar);
4. ``results/bench/latest.json``, ``latest.md`` (tables and ratios) and ``latency_vs_throughput.png``.

    python -m servekit.perf.bench [--quick] [--seconds 10] [--out results/bench]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from handlers.image_io import DecodeLimits, decode_image
from handlers.model_loading import load_model, native_bf16
from handlers.protocols import ProtocolConfig
from handlers.transforms import ImagePreprocessor
from servekit.build.archive import REPO_ROOT, build_all
from servekit.build.spec import load_spec, select
from servekit.errors import ServekitError
from servekit.perf import (
    explain_load,  # issue 27: predictions beside explanations
    peers,  # issue 25: model only, beside ONNX Runtime and OpenVINO
    trace_load,  # issue 24: span export on vs off
)
from servekit.perf.overhead import (
    counter_bar,
    counter_cost_us,
    cpu_note,
    metrics_overhead,
    overhead_bar,
    rounds_note,
    with_counter_share,
)
from servekit.perf.photos import camera_jpeg, decode_ceiling
from servekit.perf.resnet18 import SPEC_TEMPLATE, WEIGHTS_FILE, WEIGHTS_NOTE, WORKDIR, make_weights
from servekit.perf.stats import percentile
from servekit.perf.sweep import Target, sweep_bars, worker_sweep
from servekit.serving.client import TorchServeClient
from servekit.serving.server import ADDRESS_KEYS, TorchServeProcess, free_port
from servekit.serving.store import archive_name, file_sha256

CAMERA_VARIANTS = ("stock", "int8")  # also served a 4000x3000 phone photo (issue: camera photos)
CAMERA_MIN_RATIO = 0.35  # the 4000x3000 rate over the 640x480 rate, INT8
STOCK_MODEL, STOCK_VERSION = "resnet18_stock", "1.0"
STOCK_ARCHIVE = archive_name(STOCK_MODEL, STOCK_VERSION)  # <name>_v<version>.mar: the only form the guard registers
OIP_MIN_RATIO = 0.90  # the bar: OIP binary costs at most 10 % of the req/s of /predictions
OIP_PAR_RATIO = 0.97  # the bar at every concurrency (issue 25): OIP at par with /predictions
# The OIP comparison: rounds of /predictions, OIP, OIP, /predictions (full runs: OIP_ROUNDS of them, each run
# OIP_ROUND_SECONDS at most); the judged ratio is the median of the rounds'. One pair of runs moved 5-7 %
# between two runs of the same code (2026-12-07), more than the cost being judged.
OIP_ROUNDS = 3
OIP_ROUND_SECONDS = 5.0
IN_PROCESS_ROUNDS = 3  # full runs: each batch size's two ways in 3 rounds of a third of the time (in_process_limit)
TABULAR_MODEL = "breast_cancer"  # in the repository's models.yaml
TABULAR_RECORDS = 64  # records in one request body
TABULAR_CONCURRENCY = (4, 16, 64)  # full run; --quick uses --concurrency
TABULAR_MIN_RECORDS_PER_S = 5000.0  # the bar, at the best concurrency (issue 14)
DETECTOR_MODEL = "digit_pages"  # in the repository's models.yaml
DETECTOR_CONCURRENCY = 4  # one concurrency: the detector's speed is reported, not gated
DETECTOR_PAGE = 1  # the held-out evaluation page sent (servekit.build.detection.evaluation_pages)
# The metrics overhead is also measured on the smallest model, where a request costs least and the
# per-request counting weighs most: the repository's digits INT8 version and one of its samples.
SMALL_MODEL, SMALL_VERSION = "digits", "2.0"
SMALL_BODY = REPO_ROOT / "samples" / "digit_3.png"


class BenchError(ServekitError):
    """The benchmark cannot go on (a check of an answer failed)."""


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ inputs
def make_photo(path: Path) -> bytes:
    """A real photograph (scikit-learn's bundled china.jpg) as a 640x480 JPEG."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    image = Image.fromarray(load_sample_image("china.jpg")).resize((640, 480), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


STOCK_MODEL_FILE = '''"""ResNet-18 as a class with a no-argument constructor, as TorchServe's stock handler expects."""
from torchvision.models.resnet import BasicBlock, ResNet


class ResNet18(ResNet):
    def __init__(self):
        super().__init__(BasicBlock, [2, 2, 2, 2])
'''


def build_stock_archive(weights: Path, store: Path) -> Path:
    """The same FP32 weights for TorchServe's stock image_classifier handler, with its defaults."""
    target = store / STOCK_ARCHIVE
    stage = WORKDIR / "stock"
    stage.mkdir(parents=True, exist_ok=True)
    (stage / "model.py").write_text(STOCK_MODEL_FILE)
    (stage / "index_to_name.json").write_text(json.dumps({str(i): [f"n{i:08d}", f"class_{i}"] for i in range(1000)}))
    fingerprint = file_sha256(weights)
    marker = stage / "built_from"
    if target.is_file() and marker.is_file() and marker.read_text() == fingerprint:
        return target
    command = [
        sys.executable, "-m", "model_archiver.model_packaging",
        "--model-name", STOCK_MODEL, "--version", STOCK_VERSION,
        "--model-file", str(stage / "model.py"), "--serialized-file", str(weights),
        "--handler", "image_classifier", "--extra-files", str(stage / "index_to_name.json"),
        "--export-path", str(store), "--force",
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)
    (store / f"{STOCK_MODEL}.mar").replace(target)  # torch-model-archiver names it <name>.mar
    marker.write_text(fingerprint)
    return target


# ------------------------------------------------------------------------------------------ in-process limit
def in_process_limit(
    program_path: Path, spec, jpeg: bytes, batch_sizes: list[int], seconds: float, rounds: int = 1
) -> dict:
    """Decode + preprocess + infer ``jpeg`` in this process with all cores; img/s per batch size.

    Two ways are tried at each batch size and the faster counts: one image after another, and
    decoding the batch's images on a thread pool of one thread per core (PIL releases the GIL
    while it decodes and resamples), as the served path decodes in several workers at once.
    With ``rounds`` > 1 each way runs that many times for ``seconds / rounds``, the two ways in
    turn, and counts with its median round: a disturbance of a few seconds then hits one round of
    each way, not one whole figure (the single image, batch 1, moved 8 % between two runs).
    """
    from concurrent.futures import ThreadPoolExecutor

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    model = load_model(program_path, spec.handler_config())
    preprocess = ImagePreprocessor(spec.preprocessing)
    limits = DecodeLimits()
    each = seconds / max(1, rounds)

    def one(_: int) -> torch.Tensor:
        return preprocess(decode_image(jpeg, limits, preprocess.min_decode_side))

    def measure(size: int, mapper) -> float:
        def step() -> None:
            model(torch.stack(list(mapper(one, range(size)))))

        for _ in range(3):
            step()
        images, started = 0, time.perf_counter()
        while time.perf_counter() - started < each:
            step()
            images += size
        return images / (time.perf_counter() - started)

    by_batch, how, spread = {}, {}, {}
    with torch.inference_mode(), ThreadPoolExecutor(cores) as pool:
        for size in batch_sizes:
            runs: dict[str, list[float]] = {"serial": [], "thread pool": []}
            for _ in range(max(1, rounds)):
                runs["serial"].append(measure(size, map))
                runs["thread pool"].append(measure(size, pool.map))
            medians = {way: statistics.median(rates) for way, rates in runs.items()}
            how[size] = max(medians, key=medians.get)
            by_batch[size] = round(medians[how[size]], 1)
            spread[size] = {way: [round(r, 1) for r in rates] for way, rates in runs.items()}
            shown = ", ".join(f"{way} {medians[way]:.1f}" for way in runs)
            if rounds > 1:
                shown += (
                    " (rounds: " + "; ".join(f"{way} {', '.join(map(str, spread[size][way]))}" for way in runs) + ")"
                )
            log(f"in-process {spec.precision}: batch {size}: {shown} img/s")
    best = max(by_batch, key=by_batch.get)
    result = {"best_batch": best, "img_per_s": by_batch[best], "decode": how[best], "by_batch": by_batch}
    if rounds > 1:
        result["rounds"] = spread
    return result


# ------------------------------------------------------------------------------------------ served
@dataclass(frozen=True)
class Variant:
    key: str  # stock | fp32 | int8
    archive: str
    model: str
    version: str
    register_params: dict[str, int]  # registration parameters beyond the archive name
    description: str
    oip: ProtocolConfig | None = None  # also load it through OIP v2 (binary), with these tensor names


def run_hey(
    url: str,
    token: str,
    body_path: Path,
    concurrency: int,
    seconds: float,
    requests_n: int | None,
    *,
    content_type: str = "image/jpeg",
    headers: Mapping[str, str] | None = None,
) -> dict:
    """POST ``body_path`` to ``url`` with ``hey``; ``headers``: extra request headers beside the token."""
    hey = shutil.which("hey")
    if hey is None:
        raise SystemExit("bench: error: the load generator 'hey' is not installed (make bench installs it)")
    bound = ["-n", str(requests_n)] if requests_n else ["-z", f"{seconds}s"]
    extra = [arg for name, value in (headers or {}).items() for arg in ("-H", f"{name}: {value}")]
    command = [
        hey, *bound, "-c", str(concurrency), "-m", "POST", "-T", content_type, "-D", str(body_path),
        "-H", f"Authorization: Bearer {token}", *extra, "-t", "60", "-o", "csv", url,
    ]  # fmt: skip
    started = time.perf_counter()
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - started
    rows = list(csv.DictReader(io.StringIO(output)))
    latencies = sorted(float(r["response-time"]) * 1000 for r in rows if r.get("status-code") == "200")
    errors = sum(1 for r in rows if r.get("status-code") != "200")
    # hey's wall time includes its start-up; the requests' own span is the fairer denominator.
    span = max((float(r["offset"]) + float(r["response-time"]) for r in rows), default=wall)
    return {
        "concurrency": concurrency,
        "requests": len(rows),
        "errors": errors,
        "rps": round(len(latencies) / span, 1) if span else 0.0,
        **{f"p{q}_ms": _rounded(percentile(latencies, q)) for q in (50, 95, 99)},
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


# ------------------------------------------------------------------------------------------ OIP v2
def oip_binary_body(jpeg: bytes, input_name: str = "image") -> tuple[bytes, int]:
    """An OIP v2 request with the binary tensor extension: one BYTES element holding ``jpeg``.

    The body is the JSON inference header, then the raw tensor data: a 4-byte little-endian length
    and the JPEG. Returns the body and the JSON header's length in bytes (the request header
    ``Inference-Header-Content-Length``); binary outputs are asked for, as tritonclient does.
    """
    if not jpeg:
        raise ValueError("the image is empty")
    data = struct.pack("<I", len(jpeg)) + jpeg
    document = {
        "inputs": [
            {"name": input_name, "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(data)}}
        ],
        "parameters": {"binary_data_output": True},
    }
    header = json.dumps(document, separators=(",", ":")).encode()
    return header + data, len(header)


def check_oip_answer(
    status: int, headers: Mapping[str, str], body: bytes, outputs: Iterable[str], version: str | None = None
) -> dict:
    """The answer to one binary OIP request, checked: 200, a JSON header that parses and names ``outputs``.

    ``headers``: the response's headers (any case). Raises ``BenchError`` saying what is wrong;
    returns what was found (output names, version, sizes).
    """
    what = "the OIP v2 check request (POST /v2/models/NAME/infer, binary tensors)"
    excerpt = body[:300].decode("utf-8", "replace")
    if status != 200:
        raise BenchError(f"{what} was answered {status}, not 200: {excerpt}")
    lower = {name.lower(): value for name, value in headers.items()}
    declared = lower.get("inference-header-content-length")
    if declared is None:
        raise BenchError(f"{what}: the answer has no Inference-Header-Content-Length header (binary output asked)")
    try:
        length = int(declared)
    except ValueError:
        raise BenchError(f"{what}: Inference-Header-Content-Length is not an integer: {declared!r}") from None
    if not 0 < length <= len(body):
        raise BenchError(f"{what}: Inference-Header-Content-Length is {length} but the body has {len(body)} bytes")
    try:
        document = json.loads(body[:length])
    except ValueError as exc:
        raise BenchError(f"{what}: the JSON header does not parse ({exc}): {excerpt}") from None
    tensors = document.get("outputs") if isinstance(document, dict) else None
    if not isinstance(tensors, list) or not all(isinstance(t, dict) for t in tensors):
        raise BenchError(f"{what}: the JSON header has no list of outputs: {excerpt}")
    names = [t.get("name") for t in tensors]
    missing = [name for name in outputs if name not in names]
    if missing:
        raise BenchError(f"{what}: the answer names outputs {names}, not {missing}")
    sizes = [(t.get("parameters") or {}).get("binary_data_size", 0) for t in tensors]
    if not all(isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in sizes):
        raise BenchError(f"{what}: an output's binary_data_size is not a non-negative integer: {excerpt}")
    binary = sum(sizes)
    if binary != len(body) - length:
        raise BenchError(
            f"{what}: the outputs declare {binary} binary bytes but {len(body) - length} follow the JSON header"
        )
    if version is not None and document.get("model_version") != version:
        raise BenchError(f"{what}: answered by version {document.get('model_version')!r}, not {version!r}")
    return {
        "status": status,
        "outputs": names,
        "model_version": document.get("model_version"),
        "json_header_bytes": length,
        "binary_bytes": binary,
    }


def _rps_ratio(run: dict, baseline: dict) -> float | None:
    return round(run["rps"] / baseline["rps"], 2) if baseline["rps"] else None


def _short(run: dict) -> dict:
    return {key: run[key] for key in ("requests", "errors", "rps", "p50_ms", "p99_ms")}


def oip_ratio_and_bar(oip: dict, top: int) -> tuple[float | None, dict[str, bool]]:
    """OIP req/s over /predictions req/s at concurrency ``top`` (the rounds' median), the bar on it
    (>= ``OIP_MIN_RATIO``), and the bar at every concurrency (>= ``OIP_PAR_RATIO``)."""
    pair = next(r for r in oip["runs"] if r["concurrency"] == top)
    ratio = pair["oip_over_predictions"]
    name = (
        f"{oip['variant']} OIP binary c={top} costs at most {1 - OIP_MIN_RATIO:.0%} of req/s "
        f"(>= {OIP_MIN_RATIO:g}x /predictions)"
    )
    every = [r["oip_over_predictions"] for r in oip["runs"]]
    par = f"{oip['variant']} OIP binary >= {OIP_PAR_RATIO:g}x /predictions at every concurrency"
    return ratio, {
        name: ratio is not None and ratio >= OIP_MIN_RATIO,
        par: bool(every) and all(r is not None and r >= OIP_PAR_RATIO for r in every),
    }


def serve_variant(
    client: TorchServeClient,
    variant: Variant,
    jpeg_path: Path,
    concurrencies: list[int],
    seconds: float,
    quick: bool,
    camera: Path | None = None,
) -> tuple[dict, dict | None]:
    """Register ``variant`` (cold start: registration to first answer), load it with ``hey``, unregister it.

    With ``variant.oip`` it is also loaded through OIP v2 with binary tensors, each OIP run right
    after the /predictions run at the same concurrency; the second value is that comparison (else None).
    With ``camera`` (a 4000x3000 phone-photo JPEG) it is also loaded with that at the top concurrency.
    """
    path = f"/models/{variant.model}/{variant.version}"
    log(f"{variant.key}: registering {variant.archive}")
    started = time.perf_counter()
    params = {"url": variant.archive, "synchronous": "true", **variant.register_params}
    client.manage("POST", "/models", params=params, timeout=600)
    registered = time.perf_counter()
    predictions = f"/predictions/{variant.model}/{variant.version}"
    first = client.call(
        "inference", "POST", predictions, data=jpeg_path.read_bytes(), headers={"Content-Type": "image/jpeg"}
    )
    answered = time.perf_counter()
    described = client.describe(variant.model, variant.version)[0]
    result = {
        "description": variant.description,
        "settings": {
            "workers": len(described.get("workers", [])),
            "batch_size": described.get("batchSize"),
            "max_batch_delay_ms": described.get("maxBatchDelay"),
        },
        "cold_start": {
            "first_status": first.status_code,
            "registration_s": round(registered - started, 2),
            "registration_to_first_answer_s": round(answered - started, 2),
            "first_answer_ms": round((answered - registered) * 1000, 1),
        },
        "runs": [],
    }
    oip, oip_body = _prepare_oip(client, variant, jpeg_path) if variant.oip is not None else (None, None)
    url, token = client.url("inference", predictions), client.token("inference")
    for concurrency in concurrencies:
        bound = 4 * concurrency if quick else None
        before = frontend_totals(client, variant.model, variant.version)
        run = run_hey(url, token, jpeg_path, concurrency, seconds, bound)
        run["queue_wait_ms"] = mean_queue_wait_ms(before, frontend_totals(client, variant.model, variant.version))
        log(
            f"{variant.key}: c={concurrency}: {run['rps']} req/s, p50 {run['p50_ms']} ms, "
            f"p99 {run['p99_ms']} ms, {run['errors']} errors of {run['requests']}, "
            f"frontend queue wait {run['queue_wait_ms']} ms per request"
        )
        result["runs"].append(run)
        if oip is not None:  # rounds of /predictions, OIP, OIP, /predictions right after that run
            rounds = 1 if quick else OIP_ROUNDS
            seconds_each = min(seconds, OIP_ROUND_SECONDS)
            pair = oip_rounds(
                partial(run_hey, url, token, jpeg_path, concurrency, seconds_each, bound),
                partial(
                    run_hey, client.url("inference", oip["oip_route"]), token, oip_body, concurrency, seconds_each,
                    bound, content_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(oip["json_header_bytes"])},
                ),
                rounds,
            )  # fmt: skip
            binary = pair["oip"]
            log(
                f"{variant.key} OIP: c={concurrency}: {binary['rps']} req/s, p50 {binary['p50_ms']} ms, "
                f"p99 {binary['p99_ms']} ms, {binary['errors']} errors in its {2 * rounds} runs; over /predictions "
                f"{pair['oip_over_predictions']} (median of {rounds} rounds: {[r['ratio'] for r in pair['rounds']]})"
            )
            oip["runs"].append({"concurrency": concurrency, **pair})
    if camera is not None:  # a phone photo at the top concurrency, right after the 640x480 runs
        top = max(concurrencies)
        run = run_hey(url, token, camera, top, seconds, 4 * top if quick else None)
        small = next(r for r in result["runs"] if r["concurrency"] == top)
        run["over_640x480"] = _rps_ratio(run, small)
        log(f"{variant.key} camera photo: c={top}: {run['rps']} req/s ({run['over_640x480']}x 640x480), "
            f"p99 {run['p99_ms']} ms, {run['errors']} errors of {run['requests']}")  # fmt: skip
        result["camera_photo"] = run
    steady_p50 = next(r["p50_ms"] for r in result["runs"] if r["concurrency"] == concurrencies[0])
    result["cold_start"]["steady_p50_ms"] = steady_p50
    result["cold_start"]["first_over_steady_p50"] = round(result["cold_start"]["first_answer_ms"] / steady_p50, 2)
    client.manage("DELETE", path)
    return result, oip


def frontend_totals(client: TorchServeClient, model: str, version: str) -> tuple[float, float] | None:
    """TorchServe's counters for one version: microseconds its requests spent queued in the frontend (which
    includes the ``max_batch_delay`` a request waits for company) and the requests; None if absent."""
    labels = f'model_name="{model}",model_version="{version}"'
    totals = {}
    for line in client.metrics().splitlines():
        for name in ("ts_queue_latency_microseconds", "ts_inference_requests_total"):
            if line.startswith(name + "{") and labels in line:
                totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    if len(totals) < 2:
        return None
    return totals["ts_queue_latency_microseconds"], totals["ts_inference_requests_total"]


def mean_queue_wait_ms(before: tuple[float, float] | None, after: tuple[float, float] | None) -> float | None:
    if before is None or after is None or after[1] <= before[1]:
        return None
    return round((after[0] - before[0]) / (after[1] - before[1]) / 1000.0, 2)


def oip_rounds(predictions: Callable[[], dict], binary: Callable[[], dict], rounds: int) -> dict:
    """``rounds`` rounds of /predictions, OIP, OIP, /predictions: each round's OIP req/s over its /predictions
    req/s (both runs of each summed), and their median as the comparison's ratio.

    A slow drift of the machine (a neighbour, a frequency change) falls on both sides of a round alike.
    The first round's first run of each kind stands for the pair in the tables (rate, p50, p99); the errors
    are every run's of that kind.
    """
    if rounds < 1:
        raise ValueError("at least one round")
    firsts: dict[str, dict] = {}
    rows, errors = [], {"predictions": 0, "oip": 0}
    for _ in range(rounds):
        a1 = predictions()
        o1, o2 = binary(), binary()
        a2 = predictions()
        firsts.setdefault("predictions", a1)
        firsts.setdefault("oip", o1)
        errors["predictions"] += a1["errors"] + a2["errors"]
        errors["oip"] += o1["errors"] + o2["errors"]
        base = a1["rps"] + a2["rps"]
        ratio = round((o1["rps"] + o2["rps"]) / base, 3) if base else None
        rows.append({"predictions_rps": [a1["rps"], a2["rps"]], "oip_rps": [o1["rps"], o2["rps"]], "ratio": ratio})
    ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
    median = statistics.median(ratios) if ratios else None
    return {
        "predictions": {**_short(firsts["predictions"]), "errors": errors["predictions"]},
        "oip": {**firsts["oip"], "errors": errors["oip"]},
        "rounds": rows,
        "oip_over_predictions": None if median is None else round(median, 2),
    }


def _prepare_oip(client: TorchServeClient, variant: Variant, jpeg_path: Path) -> tuple[dict, Path]:
    """Write the OIP binary body next to the JPEG and check one answer before any load.

    Returns the start of the ``oip`` section of the result, and the body's file for ``hey``.
    """
    config = variant.oip
    body, header_length = oip_binary_body(jpeg_path.read_bytes(), config.image_input)
    body_path = jpeg_path.with_name(f"oip_{variant.key}_binary.bin")
    body_path.write_bytes(body)
    route = f"/v2/models/{variant.model}/infer"  # the default version: the only one registered now
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(header_length)}
    answer = client.call("inference", "POST", route, data=body, headers=headers)
    check = check_oip_answer(answer.status_code, answer.headers, answer.content, config.outputs, variant.version)
    log(f"{variant.key} OIP: {route} answered 200 with outputs {check['outputs']} (version {check['model_version']})")
    return {
        "variant": variant.key,
        "description": f"{variant.description}; the same archive through /predictions (raw JPEG) and OIP v2 binary",
        "predictions_route": f"/predictions/{variant.model}/{variant.version}",
        "oip_route": route,
        "body_bytes": len(body),
        "json_header_bytes": header_length,
        "check": check,
        "runs": [],
    }, body_path


# ------------------------------------------------------------------------------------------ tabular
def tabular_body(path: Path, count: int = TABULAR_RECORDS) -> int:
    """A JSON list of ``count`` held-out breast cancer records (cycled) at ``path``; returns its size in bytes."""
    from servekit.build.tabular import breast_cancer

    data = breast_cancer("holdout")
    rows = [data.x[i % len(data)] for i in range(count)]
    records = [dict(zip(data.feature_names, map(float, row), strict=True)) for row in rows]
    path.write_text(json.dumps(records))
    return path.stat().st_size


def serve_versions(
    client: TorchServeClient,
    specs: list,
    body: Path,
    content_type: str,
    check: Callable[[Any], str | None],
    concurrencies: list[int],
    seconds: float,
    quick: bool,
    what: str,
    per_request: int = 1,
    unit: str = "req/s",
    key: str = "per_s",
) -> dict[str, dict]:
    """Each version of ``specs`` in turn, alone with its archive's settings: registered, checked, loaded, removed.

    The check request's answer goes to ``check``, which returns what is wrong with it (None: right);
    then hey posts ``body`` at each concurrency. Each run gets ``key``: its req/s times
    ``per_request`` (records or pages per request), logged in ``unit``.
    """
    versions = {}
    for spec in specs:
        log(f"{what} {spec.version}: registering {spec.archive_name}")
        client.manage("POST", "/models", params={"url": spec.archive_name, "synchronous": "true"}, timeout=600)
        path = f"/predictions/{spec.name}/{spec.version}"
        try:
            headers = {"Content-Type": content_type}
            first = client.call("inference", "POST", path, data=body.read_bytes(), headers=headers)
            problem = check(first)
            if problem is not None:
                raise BenchError(f"{spec.archive_name}: the check request was answered {first.status_code}: "
                                 f"{first.text[:300]} ({problem})")  # fmt: skip
            described = client.describe(spec.name, spec.version)[0]
            url, token = client.url("inference", path), client.token("inference")
            runs = []
            for concurrency in concurrencies:
                run = run_hey(url, token, body, concurrency, seconds, 4 * concurrency if quick else None,
                              content_type=content_type)  # fmt: skip
                run[key] = round(run["rps"] * per_request, 1)
                log(f"{what} {spec.version}: c={concurrency}: {run[key]} {unit} ({run['rps']} req/s), "
                    f"p99 {run['p99_ms']} ms, {run['errors']} errors of {run['requests']}")  # fmt: skip
                runs.append(run)
        finally:
            client.manage("DELETE", f"/models/{spec.name}/{spec.version}")
        versions[spec.version] = {
            "precision": spec.precision,
            "workers": len(described.get("workers", [])),
            "batch_size": described.get("batchSize"),
            "runs": runs,
        }
    return versions


def serve_tabular(
    client: TorchServeClient, specs: list, body: Path, concurrencies: list[int], seconds: float, quick: bool
) -> dict:
    """Each tabular version in turn (``serve_versions``) with a JSON body of records at each concurrency.

    A run's ``records_per_s`` is its req/s times the records per body; ``best`` is the run with the
    highest (errors count against nothing here: the zero-error bar holds every run).
    """
    count = len(json.loads(body.read_text()))

    def check(answer) -> str | None:
        ok = answer.status_code == 200 and len(answer.json().get("predictions", [])) == count
        return None if ok else f"expected {count} predictions"

    versions = serve_versions(client, specs, body, "application/json", check, concurrencies, seconds, quick,
                              "tabular", per_request=count, unit="records/s", key="records_per_s")  # fmt: skip
    for entry in versions.values():
        best = max(entry["runs"], key=lambda r: r["records_per_s"])
        entry["best"] = {"concurrency": best["concurrency"], "records_per_s": best["records_per_s"]}
    return {
        "model": specs[0].name,
        "description": f"{specs[0].name}: JSON bodies of {count} held-out records to /predictions/NAME/VERSION "
        "(Content-Type application/json), each version alone with its spec's serving settings",
        "records_per_request": count,
        "body_bytes": body.stat().st_size,
        "versions": versions,
    }


def tabular_bars(tabular: dict) -> tuple[dict[str, float], dict[str, bool]]:
    """The best records/s of each tabular version, and the bar on it."""
    ratios, bars = {}, {}
    for version, entry in tabular["versions"].items():
        best = entry["best"]
        ratios[f"tabular_{version}_records_per_s"] = best["records_per_s"]
        name = (f"tabular {version} ({entry['precision']}) >= {TABULAR_MIN_RECORDS_PER_S:,.0f} records/s "
                f"(best concurrency, {tabular['records_per_request']} records per request)")  # fmt: skip
        bars[name] = best["records_per_s"] >= TABULAR_MIN_RECORDS_PER_S
    return ratios, bars


# ------------------------------------------------------------------------------------------ detector
def detector_body(path: Path, index: int = DETECTOR_PAGE) -> tuple[int, str]:
    """Held-out evaluation page ``index`` as a PNG at ``path``; its size in bytes and its digits."""
    from servekit.build.detection import evaluation_pages

    page = evaluation_pages(index + 1)[index]
    page.image.save(path, format="PNG")
    return path.stat().st_size, page.text()


def serve_detector(
    client: TorchServeClient, specs: list, body: Path, digits: str, concurrency: int, seconds: float, quick: bool
) -> dict:
    """Each detector version in turn (``serve_versions``) with the page at ``concurrency``.

    One page per request, so pages/s is req/s; the check request must read the page's ``digits``.
    """
    width, height = _png_size(body.read_bytes())

    def check(answer) -> str | None:
        ok = answer.status_code == 200 and answer.json().get("label") == digits
        return None if ok else f"expected the label {digits!r}"

    versions = serve_versions(client, specs, body, "image/png", check, [concurrency], seconds, quick, "detector",
                              unit="pages/s", key="pages_per_s")  # fmt: skip
    return {
        "model": specs[0].name,
        "description": f"{specs[0].name}: one held-out {width}x{height} page PNG ({len(digits)} digits) per request "
        "to /predictions/NAME/VERSION, each version alone with its spec's serving settings",
        "body_bytes": body.stat().st_size,
        "versions": versions,
    }


def _png_size(data: bytes) -> tuple[int, int]:
    return struct.unpack(">II", data[16:24])


def serve_all(
    store: Path,
    variants: list[Variant],
    concurrencies: list[int],
    seconds: float,
    quick: bool,
    sweep: tuple,
    tabular: tuple[list, Path, list[int]] | None = None,
    detector: tuple[list, Path, str, int] | None = None,
    camera: Path | None = None,
    small: Target | None = None,
    overheads: bool = True,
) -> tuple[dict, dict | None, list[dict], list[dict], dict | None, dict | None]:
    """One TorchServe on free loopback ports serving ``store``: every variant in turn, then the worker sweep;
    then the handler metrics on and off (``servekit.perf.overhead``) for the INT8 ResNet-18 and, with
    ``small`` (in ``store``), for that small model with ``SMALL_BODY``.

    With ``camera`` (a 4000x3000 JPEG), the variants in ``CAMERA_VARIANTS`` are also loaded with it.

    With ``tabular`` (its version specs, the body file and the concurrencies), the tabular model
    is loaded after the variants (``serve_tabular``); with ``detector`` (its version specs, the
    page, its digits and the concurrency), the detector after it (``serve_detector``). Returns the
    served variants, the OIP comparison (of the variant with ``oip``; None without), the sweep, the
    metrics overheads (the INT8 ResNet-18's first), the tabular runs and the detector runs (None without).
    """
    server = TorchServeProcess(
        workdir=WORKDIR / "torchserve",
        model_store=store,
        ports={kind: free_port() for kind in ADDRESS_KEYS},
        load_models="",
    )
    server.start()
    try:
        photo, client = WORKDIR / "photo_640x480.jpg", server.client(timeout=120)
        served, oip = {}, None
        for variant in variants:
            with_camera = camera if camera is not None and variant.key in CAMERA_VARIANTS else None
            served[variant.key], compared = serve_variant(
                client, variant, photo, concurrencies, seconds, quick, with_camera
            )
            oip = compared or oip
        tabular_result = serve_tabular(client, *tabular[:2], tabular[2], seconds, quick) if tabular else None
        detector_result = serve_detector(client, *detector, seconds, quick) if detector else None
        main, other = sweep
        layouts = worker_sweep(client, run_hey, photo, main, other, max(concurrencies), seconds, quick, log)
    finally:
        server.stop()
    if not overheads:
        return served, oip, layouts, [], tabular_result, detector_result
    log("tracing overhead: the INT8 archive on two servers, span export on and off")
    tracing = trace_load.tracing_overhead(WORKDIR, store, main, photo, max(concurrencies), seconds, quick, run_hey, log)
    log("handler metrics overhead: the INT8 archive on two servers, metrics on and off")
    overheads = [metrics_overhead(WORKDIR, store, main, photo, max(concurrencies), seconds, quick, run_hey, log)]
    overheads[0]["tracing"] = tracing
    if small is not None:
        log(f"handler metrics overhead: {small.model} {small.version} on two servers, metrics on and off")
        overheads.append(
            metrics_overhead(WORKDIR, store, small, SMALL_BODY, max(concurrencies), seconds, quick, run_hey, log,
                             content_type="image/png")
        )  # fmt: skip
    return served, oip, layouts, overheads, tabular_result, detector_result


# ------------------------------------------------------------------------------------------ report
def machine() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(memory, 1),
        "gpu": "none",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchserve": _version("torchserve"),
    }


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def run_at(result: dict, key: str, concurrency: int) -> dict:
    return next(r for r in result["served"][key]["runs"] if r["concurrency"] == concurrency)


# A lone request (c=1): its p50 against the stock handler's and against the same program in this process at
# batch 1 on every core (issue 28). None: not judged.
LONE_BARS = {"fp32": (1.0, 1.3), "int8": (None, 1.5), "bf16": (None, None)}


def lone_request(result: dict) -> dict[str, dict]:
    """Per variant at c=1: p50 ms, the in-process single-image ms (batch 1, all cores) and their ratios."""
    served, limit = result["served"], result["in_process"]
    if not any(r["concurrency"] == 1 for r in served.get("stock", {}).get("runs", [])):
        return {}
    stock = run_at(result, "stock", 1)["p50_ms"]
    rows = {"stock": {"p50_ms": stock, "queue_wait_ms": run_at(result, "stock", 1).get("queue_wait_ms")}}
    for key in served:
        if key == "stock":
            continue
        p50 = run_at(result, key, 1)["p50_ms"]
        single = limit.get(key, {}).get("by_batch", {}).get(1) or limit.get(key, {}).get("by_batch", {}).get("1")
        single_ms = round(1000.0 / single, 1) if single else None
        rows[key] = {
            "p50_ms": p50,
            "queue_wait_ms": run_at(result, key, 1).get("queue_wait_ms"),
            "in_process_single_ms": single_ms,
            "over_stock": round(p50 / stock, 2) if stock else None,
            "over_in_process": round(p50 / single_ms, 2) if single_ms else None,
        }
    return rows


def lone_request_bars(result: dict) -> tuple[dict[str, float], dict[str, bool]]:
    rows = lone_request(result)
    result["lone_request"] = rows
    ratios, bars = {}, {}
    for key, (max_stock, max_in_process) in LONE_BARS.items():
        row = rows.get(key)
        if row is None:
            continue
        ratios[f"{key}_c1_p50_vs_stock"] = row["over_stock"]
        ratios[f"{key}_c1_p50_vs_in_process_single"] = row["over_in_process"]
        if max_stock is not None and row["over_stock"] is not None:
            bars[f"{key} c=1 p50 <= {max_stock:g}x stock's"] = row["over_stock"] <= max_stock
        if max_in_process is not None and row["over_in_process"] is not None:
            bars[f"{key} c=1 p50 <= {max_in_process:g}x in-process single image"] = (
                row["over_in_process"] <= max_in_process
            )
    return ratios, bars


def compute_ratios_and_bars(result: dict, top: int) -> None:
    served, limit = result["served"], result["in_process"]
    stock = run_at(result, "stock", top)["rps"]
    ratios, bars = {}, {}
    for key, min_stock, min_limit in (("int8", 10.0, 0.70), ("fp32", 3.0, 0.80)):
        rps = run_at(result, key, top)["rps"]
        ratios[f"{key}_vs_stock"] = round(rps / stock, 2) if stock else None
        ratios[f"{key}_vs_in_process"] = round(rps / limit[key]["img_per_s"], 2)
        bars[f"{key} c={top} >= {min_stock:g}x stock"] = bool(
            ratios[f"{key}_vs_stock"] and ratios[f"{key}_vs_stock"] >= min_stock
        )
        bars[f"{key} c={top} >= {min_limit:.0%} of in-process limit"] = ratios[f"{key}_vs_in_process"] >= min_limit
    ratios_c1, bars_c1 = lone_request_bars(result)
    ratios.update(ratios_c1)
    bars.update(bars_c1)
    if "bf16" in served:
        ratios["bf16_vs_fp32"] = round(run_at(result, "bf16", top)["rps"] / run_at(result, "fp32", top)["rps"], 2)
        bars[f"bf16 c={top} >= 1.5x fp32 (native BF16 CPU)"] = ratios["bf16_vs_fp32"] >= 1.5
    bars.update(sweep_bars(result["sweep"]))
    if any(r["concurrency"] == 4 for r in served["int8"]["runs"]):
        bars["int8 p99 at c=4 < 150 ms"] = run_at(result, "int8", 4)["p99_ms"] < 150
    runs = [r for v in served.values() for r in v["runs"]]
    if result.get("oip"):
        ratios["oip_vs_predictions"], oip_bars = oip_ratio_and_bar(result["oip"], top)
        bars.update(oip_bars)
        runs += [r[kind] for r in result["oip"]["runs"] for kind in ("predictions", "oip")]
    camera = served["int8"].get("camera_photo")
    if camera is not None:
        ratios["int8_camera_over_640x480"] = camera["over_640x480"]
        bars[f"int8 4000x3000 photo >= {CAMERA_MIN_RATIO:.0%} of the 640x480 rate (c={top})"] = bool(
            camera["over_640x480"] and camera["over_640x480"] >= CAMERA_MIN_RATIO
        )
        if served["stock"].get("camera_photo"):
            ratios["int8_vs_stock_camera"] = _rps_ratio(camera, served["stock"]["camera_photo"])
        ceiling = result.get("camera_decode_ceiling")
        if ceiling:  # the most photos/s libjpeg can decode here: the rate no handler can pass
            rate = run_at(result, "int8", top)["rps"]  # the INT8 640x480 rate
            ratios["camera_decode_ceiling_over_640x480"] = round(ceiling["img_per_s"] / rate, 2) if rate else None
            ratios["int8_camera_over_decode_ceiling"] = round(camera["rps"] / ceiling["img_per_s"], 2)
        runs += [v["camera_photo"] for v in served.values() if v.get("camera_photo")]
    if result.get("tabular"):
        tabular_ratios, tabular_bar = tabular_bars(result["tabular"])
        ratios.update(tabular_ratios)
        bars.update(tabular_bar)
        runs += [r for entry in result["tabular"]["versions"].values() for r in entry["runs"]]
    if result.get("detector"):  # reported, no bar of its own; its runs count for zero errors
        for version, entry in result["detector"]["versions"].items():
            ratios[f"detector_{version}_pages_per_s"] = max(r["pages_per_s"] for r in entry["runs"])
        runs += [r for entry in result["detector"]["versions"].values() for r in entry["runs"]]
    tracing = (result.get("metrics_overhead") or {}).get("tracing")
    if tracing:
        ratios["tracing_on_over_off"] = tracing["on_over_off"]
        bars.update(trace_load.tracing_bar(tracing))
        runs += [r for rs in tracing["runs"].values() for r in rs]
    if result.get("metrics_overhead"):
        ratios["metrics_on_over_off"] = result["metrics_overhead"]["on_over_off"]
        bars.update(overhead_bar(result["metrics_overhead"]))
        runs += [r for rs in result["metrics_overhead"]["runs"].values() for r in rs]
    small = result.get("metrics_overhead_small")
    if small:  # served on/off reported; the bar is on the counters' measured cost (served runs vary more here)
        ratios["metrics_on_over_off_small"] = small["on_over_off"]
        if small.get("counter_share") is not None:
            ratios["metrics_counter_share_small"] = small["counter_share"]
            bars.update({f"{name} ({SMALL_MODEL})": ok for name, ok in counter_bar(small).items()})
        runs += [r for rs in small["runs"].values() for r in rs]
    bars["zero errors in every served run"] = all(r["errors"] == 0 for r in runs)
    for key in ("fp32", "int8"):
        bars[f"{key} first answer <= 1.5x steady p50"] = served[key]["cold_start"]["first_over_steady_p50"] <= 1.5
    sizes = result["archives"]
    bars["int8 archive <= 30% of fp32"] = sizes["int8_bytes"] <= 0.30 * sizes["fp32_bytes"]
    result["ratios"], result["bars"] = ratios, bars


def run_kind(result: dict) -> str:
    kind = "quick" if result["quick"] else "full"
    return f"{kind}, served rows only (--only-served)" if result.get("only_served") else kind


def write_markdown(result: dict, path: Path) -> None:
    m = result["machine"]
    lines = [
        f"# Benchmark: ResNet-18, 640x480 JPEG ({run_kind(result)} run, {result['date']})",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, no GPU; Python {m['python']}, "
        f"torch {m['torch']}, TorchServe {m['torchserve']}. {WEIGHTS_NOTE}.",
        "",
        "## In-process limit (one Python process, all cores, decode + preprocess + infer)",
        "",
        "| precision | best batch | decoding | img/s | img/s by batch size |",
        "|---|---|---|---|---|",
    ]
    for key, limit in result["in_process"].items():
        by_batch = ", ".join(f"{b}: {v}" for b, v in limit["by_batch"].items())
        lines.append(f"| {key} | {limit['best_batch']} | {limit['decode']} | {limit['img_per_s']} | {by_batch} |")
    rounds = next((limit["rounds"] for limit in result["in_process"].values() if limit.get("rounds")), None)
    if rounds:
        count = len(next(iter(rounds.values()))["serial"])
        lines += ["", f"Each batch size's two ways ran in {count} rounds, in turn; each counts with its median round."]
    lines += [
        "",
        "## Served by TorchServe (hey on loopback)",
        "",
        "| variant | workers | batch | concurrency | requests | req/s | p50 ms | p95 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, served in result["served"].items():
        s = served["settings"]
        for r in served["runs"]:
            lines.append(
                f"| {key} | {s['workers']} | {s['batch_size']} | {r['concurrency']} | {r['requests']} | {r['rps']} "
                f"| {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {r['errors']} |"
            )
    lone = result.get("lone_request") or {}
    if lone:
        lines += ["", "## A lone request (c=1)", "",
                  "The frontend's queue wait is TorchServe's own count (ts_queue_latency_microseconds over the "
                  "run's requests): at c=1 it is the max_batch_delay a lone request waits for company.", "",
                  "| variant | p50 ms | frontend queue wait ms | in-process single image ms (batch 1, all cores) "
                  "| over stock | over in-proc |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for key, row in lone.items():
            wait = row.get("queue_wait_ms")
            lines.append(f"| {key} | {row['p50_ms']} | {'' if wait is None else wait} "
                         f"| {row.get('in_process_single_ms', '')} "
                         f"| {row.get('over_stock', '')} | {row.get('over_in_process', '')} |")  # fmt: skip
    cameras = {key: v["camera_photo"] for key, v in result["served"].items() if v.get("camera_photo")}
    if cameras:
        lines += ["", "| variant | 4000x3000 phone photo (3 MB): concurrency | req/s | p50 ms | p99 ms | errors "
                  "| over 640x480 req/s |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for key, r in cameras.items():
            lines.append(f"| {key} | {r['concurrency']} | {r['rps']} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} "
                         f"| {r['over_640x480']} |")  # fmt: skip
        ceiling, ratios = result.get("camera_decode_ceiling"), result.get("ratios", {})
        if ceiling:
            lines += [
                "",
                f"Ceiling on this machine: libjpeg alone decodes this photo (at 1/8 scale, its cheapest: the entropy "
                f"decoding of all {ceiling['bytes']:,} bytes and little else) at {ceiling['img_per_s']} photos/s on "
                f"{ceiling['threads']} threads ({ceiling['ms_per_img_1t']} ms per photo per core), "
                f"{ratios.get('camera_decode_ceiling_over_640x480')}x the INT8 640x480 rate before any preprocessing, "
                f"inference or transport; the INT8 photo rate is {ratios.get('int8_camera_over_decode_ceiling')}x "
                "that ceiling (docs/decoding.md).",
            ]
    lines += ["", "| variant | registration s | registration to first answer s | first answer ms | steady p50 ms |"]
    lines.append("|---|---|---|---|---|")
    for key, served in result["served"].items():
        c = served["cold_start"]
        lines.append(
            f"| {key} | {c['registration_s']} | {c['registration_to_first_answer_s']} | {c['first_answer_ms']} "
            f"| {c['steady_p50_ms']} |"
        )
    oip = result.get("oip")
    if oip:
        lines += [
            "",
            f"## Open Inference Protocol v2, binary tensors ({oip['variant']}: {oip['oip_route']} vs "
            f"{oip['predictions_route']}, in rounds of /predictions, OIP, OIP, /predictions)",
            "",
            f"Body: {oip['json_header_bytes']} bytes of JSON header + one BYTES element (4-byte length + the JPEG), "
            f"{oip['body_bytes']} bytes; binary outputs {', '.join(oip['check']['outputs'])}. The ratio is the "
            "median of the rounds' (each round: its two OIP runs' req/s over its two /predictions runs'); p50 and "
            "p99 are the first round's, the errors every OIP run's.",
            "",
            "| concurrency | /predictions req/s | p50 ms | p99 ms | OIP req/s | p50 ms | p99 ms | OIP errors "
            "| OIP / predictions | rounds |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in oip["runs"]:
            a, b = r["predictions"], r["oip"]
            rounds = ", ".join(str(x["ratio"]) for x in r.get("rounds", []))
            lines.append(
                f"| {r['concurrency']} | {a['rps']} | {a['p50_ms']} | {a['p99_ms']} | {b['rps']} | {b['p50_ms']} "
                f"| {b['p99_ms']} | {b['errors']} | {r['oip_over_predictions']} | {rounds} |"
            )
    tabular = result.get("tabular")
    if tabular:
        lines += [
            "",
            f"## Tabular ({tabular['description']}; {tabular['body_bytes']:,} bytes per body)",
            "",
            "| version | precision | workers | batch | concurrency | req/s | records/s | p50 ms | p99 ms | errors |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for version, entry in tabular["versions"].items():
            for r in entry["runs"]:
                lines.append(
                    f"| {version} | {entry['precision']} | {entry['workers']} | {entry['batch_size']} "
                    f"| {r['concurrency']} | {r['rps']} | {r['records_per_s']} | {r['p50_ms']} | {r['p99_ms']} "
                    f"| {r['errors']} |"
                )
    detector = result.get("detector")
    if detector:
        lines += [
            "",
            f"## Detector ({detector['description']}; {detector['body_bytes']:,} bytes per body)",
            "",
            "| version | precision | workers | batch | concurrency | pages/s | p50 ms | p99 ms | errors |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for version, entry in detector["versions"].items():
            for r in entry["runs"]:
                lines.append(
                    f"| {version} | {entry['precision']} | {entry['workers']} | {entry['batch_size']} "
                    f"| {r['concurrency']} | {r['pages_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} |"
                )
    lines += [
        "",
        "## Worker sweep (the CPU budget: same total concurrency, layouts reached with the management API; "
        "full runs: each layout twice in mirrored order, the mean of the passes)",
        "",
        "| layout | workers | requests | req/s | p99 ms | errors | passes (req/s, p99 ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for layout in result["sweep"]:
        passes = "; ".join(f"{p['rps']}, {p['p99_ms']}" for p in layout.get("passes", []))
        lines.append(
            f"| {layout['layout']} | {layout['workers']} | {layout['requests']} | {layout['rps']} "
            f"| {layout['p99_ms']} | {layout['errors']} | {passes} |"
        )
    for key in ("metrics_overhead", "metrics_overhead_small"):
        overhead = result.get(key)
        if not overhead:
            continue
        lines += ["", f"## Handler metrics overhead ({overhead['description']})", "",
                  "| metrics | req/s per run | mean req/s |", "|---|---|---|"]  # fmt: skip
        for mode in ("on", "off"):
            rates = ", ".join(str(r["rps"]) for r in overhead["runs"][mode])
            lines.append(f"| {mode} | {rates} | {overhead[f'rps_{mode}']} |")
        lines += [
            "",
            f"On over off: {overhead['on_over_off']} (overhead {overhead['overhead']:.1%}){rounds_note(overhead)}.",
        ]
        if cpu_note(overhead):
            lines += ["", cpu_note(overhead)]
        if overhead.get("counter_share") is not None:
            lines += [
                "",
                "The counting itself, in-process (a fresh process writing a multiprocess folder, every "
                f"handler-metrics call of one request, best of 5 loops): {overhead['counter_us_per_request']} µs per "
                f"request, {overhead['counter_share']:.2%} of the {overhead['cpu_us_per_request']} µs of CPU one "
                "request had here (all cores over the req/s with metrics off).",
            ]
        if key == "metrics_overhead_small":
            lines += [
                "",
                "For this model the served on/off runs vary more than the cost itself on a 2-core machine (five runs "
                "of the same code: 0.89 to 1.07, docs/performance.md): its bar is on the counting's measured cost.",
            ]
    if result.get("peers"):
        lines += ["", *peers.markdown(result["peers"])]
    lines += explain_load.markdown(result.get("explain_load"))
    lines += trace_load.markdown((result.get("metrics_overhead") or {}).get("tracing"))
    lines += ["", "## Ratios and bars", ""]
    lines += [f"- {name}: {value}" for name, value in result["ratios"].items()]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in result["bars"].items()]
    a = result["archives"]
    lines += ["", f"Archives: FP32 {a['fp32_bytes'] / 1e6:.1f} MB, INT8 {a['int8_bytes'] / 1e6:.1f} MB.", ""]
    path.write_text("\n".join(lines))


def write_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = [(key, served["runs"]) for key, served in result["served"].items()]
    if result.get("oip"):
        series.append((f"{result['oip']['variant']} OIP", [r["oip"] for r in result["oip"]["runs"]]))
    for key, runs in series:
        rps = [r["rps"] for r in runs]
        line = ax.plot(rps, [r["p50_ms"] for r in runs], marker="o", label=f"{key} p50")[0]
        ax.plot(
            rps, [r["p99_ms"] for r in runs], marker="x", linestyle="--", color=line.get_color(), label=f"{key} p99"
        )
        for r in runs:
            ax.annotate(
                f"c={r['concurrency']}", (r["rps"], r["p50_ms"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
    for key, limit in result["in_process"].items():
        ax.axvline(limit["img_per_s"], linestyle=":", color="grey")
        ax.text(limit["img_per_s"], 0.03, f" {key} in-process limit", transform=ax.get_xaxis_transform(),
                rotation=90, fontsize=7, color="grey")  # fmt: skip
    ax.set_xlabel("throughput (req/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title(f"ResNet-18, 640x480 JPEG, {result['machine']['cores']} cores ({result['date']})")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Served vs stock vs in-process benchmark (ResNet-18).")
    parser.add_argument("--quick", action="store_true", help="few requests: a smoke run for the test suite")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each load run (full mode)")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--out", default=str(REPO_ROOT / "results" / "bench"))
    parser.add_argument("--spec", default=str(SPEC_TEMPLATE), help="bench spec (ResNet-18 fp32 1.0 and int8 2.0)")
    parser.add_argument(
        "--only-served",
        action="store_true",
        help="only the ResNet-18 rows (in-process, served, lone request, OIP, worker sweep): no photos, tabular, "
        "detector, metrics overhead or explanations; written as served.{json,md,png}",
    )
    args = parser.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    WORKDIR.mkdir(parents=True, exist_ok=True)
    warnings.simplefilter("ignore")

    log(f"step 1/4: archives ({WEIGHTS_NOTE})")
    make_weights(WORKDIR / WEIGHTS_FILE)
    jpeg = make_photo(WORKDIR / "photo_640x480.jpg")
    specs = {peers.variant_key(s): s for s in load_spec(args.spec)}
    for key in [k for k in specs if k.startswith("bf16")]:
        if not native_bf16():
            log(f"{key}: this CPU has no native BF16 (avx512_bf16 or amx_bf16): the BF16 version is left out")
            specs.pop(key)
    store = WORKDIR / "store"
    build_all(list(specs.values()), store, WORKDIR / "cache", force=True)
    build_stock_archive(WORKDIR / WEIGHTS_FILE, store)
    tabular_specs = select(load_spec(REPO_ROOT / "models.yaml"), TABULAR_MODEL, None)
    build_all(tabular_specs, store, REPO_ROOT / "build" / "cache", force=True)  # trained weights: the repo's cache
    tabular_body(WORKDIR / f"tabular_{TABULAR_RECORDS}_records.json")
    detector_specs = select(load_spec(REPO_ROOT / "models.yaml"), DETECTOR_MODEL, None)
    build_all(detector_specs, store, REPO_ROOT / "build" / "cache", force=True)  # trained weights: the repo's cache
    _, page_digits = detector_body(WORKDIR / "detector_page.png")
    small_specs = select(load_spec(REPO_ROOT / "models.yaml"), SMALL_MODEL, SMALL_VERSION)
    build_all(small_specs, store, REPO_ROOT / "build" / "cache", force=True)  # trained weights: the repo's cache
    camera = WORKDIR / "camera_4000x3000.jpg"
    camera.write_bytes(camera_jpeg(4000, 3000))
    fp32, int8 = specs["fp32"], specs["int8"]
    bf16 = specs.get("bf16")

    log("step 2/4: in-process limit")
    import zipfile

    programs = {}
    for key, spec in specs.items():
        with zipfile.ZipFile(store / spec.archive_name) as archive:
            programs[key] = WORKDIR / f"{key}_{spec.program_file}"
            programs[key].write_bytes(archive.read(spec.program_file))
    batch_sizes = [1, 8] if args.quick else [1, 4, 8, 16]
    seconds = 0.5 if args.quick else 4.0
    rounds = 1 if args.quick else IN_PROCESS_ROUNDS
    in_process = {key: in_process_limit(programs[key], specs[key], jpeg, batch_sizes, seconds, rounds) for key in specs}
    ceiling = decode_ceiling(camera.read_bytes(), os.cpu_count() or 1, seconds=0.5 if args.quick else 1.0,
                             rounds=2 if args.quick else 5)  # fmt: skip
    log(f"4000x3000 photo, bare libjpeg decode at 1/8 on {ceiling['threads']} threads: {ceiling['img_per_s']} photos/s")
    log("model only, beside ONNX Runtime and OpenVINO (same model, batch and threads)")
    module = peers.resnet18(WORKDIR / WEIGHTS_FILE)
    beside = peers.measure(module, {key: (programs[key], specs[key]) for key in specs}, WORKDIR / "peers",
                           seconds=0.3 if args.quick else 3.0, rounds=1 if args.quick else 3, log=log)  # fmt: skip

    log("step 3/4: served (one TorchServe on loopback)")
    cores = os.cpu_count() or 1
    stock_note = f"TorchServe's stock image_classifier, its defaults: {cores} workers (one per core), batch size 1"
    variants = [
        Variant("stock", STOCK_ARCHIVE, STOCK_MODEL, STOCK_VERSION, {"initial_workers": cores, "batch_size": 1},
                stock_note),
        Variant("fp32", fp32.archive_name, fp32.name, fp32.version, {}, "servekit handler, FP32, spec's settings"),
        Variant("int8", int8.archive_name, int8.name, int8.version, {}, "servekit handler, INT8, spec's settings",
                oip=int8.protocol),
    ]  # fmt: skip
    if bf16 is not None:
        variants.append(Variant("bf16", bf16.archive_name, bf16.name, bf16.version, {}, "servekit handler, BF16"))
    for key, spec in specs.items():  # the versions served by another runtime (runtime: in the spec)
        if spec.runtime is not None:
            variants.append(Variant(key, spec.archive_name, spec.name, spec.version, {},
                                    f"servekit handler, {spec.served_as}"))  # fmt: skip
    second = f"{int8.name}_second"  # the same INT8 archive registered again: a second version of equal cost
    sweep = (Target(int8.name, int8.version, int8.archive_name), Target(second, int8.version, int8.archive_name))
    tabular = (tabular_specs, WORKDIR / f"tabular_{TABULAR_RECORDS}_records.json",
               concurrencies if args.quick else list(TABULAR_CONCURRENCY))  # fmt: skip
    detector = (detector_specs, WORKDIR / "detector_page.png", page_digits, DETECTOR_CONCURRENCY)
    small_target = Target(SMALL_MODEL, SMALL_VERSION, archive_name(SMALL_MODEL, SMALL_VERSION))
    if args.only_served:
        tabular = detector = camera = small_target = None
    try:
        served, oip, layouts, overheads, tabular_result, detector_result = serve_all(
            store, variants, concurrencies, args.seconds, args.quick, sweep, tabular, detector, camera, small_target,
            overheads=not args.only_served,
        )  # fmt: skip
    except ServekitError as exc:
        print(f"bench: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1

    small = (SMALL_MODEL, SMALL_VERSION, archive_name(SMALL_MODEL, SMALL_VERSION), SMALL_BODY)
    explained = None if args.only_served else explain_load.measure(
        WORKDIR, store, *small, args.seconds, args.quick, run_hey, log
    )  # fmt: skip

    log("step 4/4: report")
    counter_us = counter_cost_us(2000 if args.quick else 20000)
    log(f"handler metrics: {counter_us} µs per request in-process")
    overheads = [with_counter_share(o, counter_us, cores) for o in overheads]
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "quick": args.quick,
        "only_served": args.only_served,
        "machine": machine(),
        "weights": WEIGHTS_NOTE,
        "input": "scikit-learn's china.jpg resized to 640x480, JPEG quality 90",
        "load": f"hey, concurrency {concurrencies}, "
        + ("4 x concurrency requests" if args.quick else f"{args.seconds:g} s each"),
        "in_process": in_process,
        "camera_decode_ceiling": ceiling,
        "served": served,
        "oip": oip,
        "sweep": layouts,
        "metrics_overhead": overheads[0] if overheads else None,
        "metrics_overhead_small": overheads[1] if len(overheads) > 1 else None,
        "tabular": tabular_result,
        "detector": detector_result,
        "explain_load": explained,
        "peers": beside,
        "archives": {
            "fp32_bytes": (store / fp32.archive_name).stat().st_size,
            "int8_bytes": (store / int8.archive_name).stat().st_size,
            "stock_bytes": (store / STOCK_ARCHIVE).stat().st_size,
        },
    }
    compute_ratios_and_bars(result, max(concurrencies))
    if explained is not None:
        result["bars"].update(explained["bar"])
    result["bars"].update(beside["bar"])
    stem = "quick" if args.quick else "served" if args.only_served else "latest"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, out / f"{stem}.md")
    write_plot(result, out / f"{stem}_latency_vs_throughput.png")
    print((out / f"{stem}.md").read_text())
    log(f"wrote {out / f'{stem}.json'}, {stem}.md, {stem}_latency_vs_throughput.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
