"""Building versioned ``.mar`` archives from the spec, and the manifest of what was built.

For each model version: get the FP32 weights (train or load), convert them to the version's
precision, export a frozen TorchScript program, measure the held-out metric (and gate reduced
precision against FP32), then package the program, the handler package, ``model-config.yaml``,
labels, the task's own files and metadata with torch-model-archiver into
``<store>/<name>_v<version>.mar`` and record it in ``<store>/manifest.json``. What differs between
tasks (image classifier, tabular classifier, ...) is asked of the version's task
(``servekit.build.tasks``); nothing here branches on the task.

Versions are immutable: the manifest keeps a fingerprint of each archive's inputs (the resolved
spec entry, the handler code, the weights' source); rebuilding a version whose inputs changed is
refused unless ``force`` is given, and rebuilding with the same inputs is skipped.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

import servekit
from handlers.model_loading import native_bf16
from handlers.runtimes import runtime_version
from servekit.build.convert import export_torchscript, load_program
from servekit.build.spec import ModelVersionSpec
from servekit.build.training import BuildError, fp32_weights, load_fp32_model, recipe_key
from servekit.progress import Progress
from servekit.serving.store import file_sha256, read_manifest, write_manifest

REPO_ROOT = Path(__file__).resolve().parents[2]
HANDLERS_DIR = REPO_ROOT / "handlers"


def handler_code_sha256() -> str:
    digest = hashlib.sha256()
    for path in sorted(HANDLERS_DIR.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def inputs_fingerprint(spec: ModelVersionSpec) -> str:
    """What determines an archive: a change to any of these makes it a different version."""
    if spec.weights.file:
        source = file_sha256(spec.weights.file)
    elif spec.weights.torchvision:
        source = spec.weights.torchvision
    else:
        source = f"train:{recipe_key(spec)}"
    parts = {"spec": spec.spec_hash(), "handler_code": handler_code_sha256(), "weights_source": source}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------- build
@dataclass(frozen=True)
class BuildResult:
    spec: ModelVersionSpec
    status: str  # "built" | "up to date"
    record: dict


def build_version(
    spec: ModelVersionSpec, store: Path, cache_dir: Path, force: bool = False, stream=None
) -> BuildResult:
    """Build one version into ``store`` (or skip it when the same inputs built it already).

    Every failure is one ``BuildError`` naming the model and version (and the field, for a mistake in the
    user's model or data); nothing is written to ``store`` before the archive is complete.
    """
    from servekit.build.user_data import DataError
    from servekit.build.user_model import ModelSourceError

    where = f"{spec.name} {spec.version}"
    try:
        return _build_version(spec, store, cache_dir, force, stream)
    except (DataError, ModelSourceError) as exc:
        raise BuildError(f"{where}: {exc}") from None
    except BuildError as exc:
        if str(exc).startswith(f"{where}: "):
            raise
        raise BuildError(f"{where}: {exc}") from None


def _build_version(spec: ModelVersionSpec, store: Path, cache_dir: Path, force: bool, stream) -> BuildResult:
    log = Progress(f"{spec.name} {spec.version}", stream)
    store.mkdir(parents=True, exist_ok=True)
    fingerprint = inputs_fingerprint(spec)
    existing = _existing_record(spec, store, fingerprint, force)
    if existing is not None:
        log("up to date, skipped")
        return BuildResult(spec, "up to date", existing)

    weights_path = fp32_weights(spec, cache_dir, log)
    model = _runs_on_example(spec, load_fp32_model(spec, weights_path))
    # The spec as built: what the task chooses from the FP32 model (a detector's score threshold); the
    # spec as written stays the fingerprint's and spec_hash's (the choice follows from it and the weights).
    tuned = spec.task.tune(model, spec, log)
    with tempfile.TemporaryDirectory(prefix=f"build-{spec.name}-") as tmp:
        stage = Path(tmp)
        program_path = stage / spec.program_file
        accuracy = _export_and_evaluate(tuned, model, program_path, stage, log)
        metadata = {
            **_metadata(tuned, fingerprint, weights_path, program_path, accuracy),
            "spec_hash": spec.spec_hash(),
            "tuned": _tuned_sections(spec, tuned),
        }
        if spec.gated and (spec.explain is None or spec.explain.reference):
            metadata["explain_reference"] = _explain_reference(tuned, model, stage, log)
        log("packaging with torch-model-archiver")
        built = _package(tuned, stage, metadata)
        tmp_target = store / f".{spec.archive_name}.{os.getpid()}.tmp"
        shutil.copyfile(built, tmp_target)
        tmp_target.replace(store / spec.archive_name)
    record = _record_in_manifest(spec, store, metadata)
    log(f"wrote {store / spec.archive_name} ({record['size_bytes'] / 1e6:.2f} MB, sha256 {record['sha256'][:12]})")
    return BuildResult(spec, "built", record)


def _runs_on_example(spec: ModelVersionSpec, model: torch.nn.Module) -> torch.nn.Module:
    """The user's module or program on one input of the spec's shape (the one the program is traced with):
    one line naming it when it cannot take it (a preprocessing that does not fit it), not a traceback."""
    if spec.program is None and isinstance(spec.architecture, str):
        return model  # a built-in architecture takes its task's input
    example = spec.task.example_input(spec)
    field, what = ("program", spec.program) if spec.program is not None else ("architecture", spec.architecture)
    try:
        with torch.no_grad():
            output = model(example)
    except Exception as exc:  # noqa: BLE001 - the user's forward on the spec's input shape
        text = " ".join(str(exc).split())[:300]
        raise BuildError(f"{field}: {what} cannot take an input of shape {list(example.shape)} (the spec's "
                         f"preprocessing or data decide it): {type(exc).__name__}: {text}") from None  # fmt: skip
    classes = len(spec.labels)
    if spec.task.classifier and (not isinstance(output, torch.Tensor) or tuple(output.shape) != (1, classes)):
        got = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise BuildError(f"{field}: {what} answers {got} for one input; a classifier of {classes} labels "
                         f"{list(spec.labels)[:10]} must answer [1, {classes}] (one score per label)")  # fmt: skip
    return model


def is_current(spec: ModelVersionSpec, store: Path) -> bool:
    """Whether ``build_version`` would skip ``spec`` (its archive is built from these inputs), without building."""
    try:
        return _existing_record(spec, store, inputs_fingerprint(spec), False) is not None
    except BuildError:
        return False  # build_version will say why


def _existing_record(spec: ModelVersionSpec, store: Path, fingerprint: str, force: bool) -> dict | None:
    """The manifest record if this exact version is already built; refuses a changed immutable version."""
    existing = read_manifest(store)["archives"].get(spec.archive_name)
    archive_path = store / spec.archive_name
    if not existing or not archive_path.is_file() or force:
        return None
    if existing.get("inputs_fingerprint") != fingerprint:
        raise BuildError(
            f"{spec.name} {spec.version}: {spec.archive_name} was already built from different inputs "
            "(spec, handler code or weights changed). Versions are immutable: give the change a new "
            "version in the spec, or rebuild this one with --force"
        )
    if file_sha256(archive_path) != existing.get("sha256"):
        raise BuildError(
            f"{spec.name} {spec.version}: {archive_path} does not match the sha256 in the manifest "
            "(modified after the build?); rebuild it with --force"
        )
    return existing


def _export_program(spec: ModelVersionSpec, model: torch.nn.Module, example: torch.Tensor, path: Path, log) -> None:
    """The program of ``spec.precision``: FP32 as trained, or the task's conversion (INT8, BF16 on native CPUs)."""
    if spec.precision == "bf16" and not native_bf16():
        raise BuildError(
            f"{spec.name} {spec.version}: precision bf16 needs a CPU with native BF16 (avx512_bf16 or "
            "amx_bf16) to build and to serve; this CPU has neither"
        )
    if spec.program is not None:
        from servekit.build.user_model import freeze_program

        log(f"freezing the user's program {Path(spec.program.file).name} as TorchScript")
        freeze_program(model, example, path)
        return
    if spec.runtime is not None:
        from handlers.runtimes import export_onnx, quantize_qdq

        log(f"exporting the FP32 module as ONNX for {spec.engine} (computes in {spec.precision.upper()})")
        if spec.precision != "int8":
            export_onnx(model, example, path)
            return
        fp32 = path.with_name("fp32_module.onnx")
        export_onnx(model, example, fp32)
        calibration = spec.task.calibration_inputs(spec)
        log(f"static INT8 as a QDQ graph: calibrating on {len(calibration)} {spec.quantization.calibration} inputs")
        quantize_qdq(fp32, calibration, path)
        fp32.unlink()
        return
    reduced = spec.precision != "fp32"
    model = spec.task.convert(model, spec, log) if reduced else spec.task.fp32_program(model, spec)
    log(f"exporting {spec.precision.upper()} TorchScript program")
    export_torchscript(model, example, path)


def _export_and_evaluate(
    spec: ModelVersionSpec, model: torch.nn.Module, program_path: Path, stage: Path, log
) -> dict | None:
    """Export the program and measure it on the held-out split, gating reduced precision against FP32."""
    task = spec.task
    example = task.example_input(spec)
    eval_data = task.evaluation_data(spec) if spec.evaluation is not None else None
    fp32_score = None
    if spec.gated and eval_data is not None:
        reference = stage / "fp32_reference.pt"
        export_torchscript(model, example, reference)
        fp32_score = task.evaluate(load_program(reference, _as_fp32(spec)), eval_data, spec)
    _export_program(spec, model, example, program_path, log)
    if eval_data is None:
        if spec.gated:
            log(f"WARNING: no evaluation set, so the {spec.served_as} accuracy gate cannot run")
        return None
    count = len(eval_data)
    log(f"evaluating on {spec.data_source} held-out split ({count} {task.unit})")
    program = load_program(program_path, spec)
    score, details = task.measure(program, eval_data, spec)
    accuracy = {"dataset": spec.evaluation, "split": "holdout", task.unit: count, task.metric: score, **details}
    if spec.data_source != spec.evaluation:
        accuracy["source"] = spec.data_source  # the user's folder or CSV, and its sha256
        accuracy["data_sha256"] = spec.data.sha256
    shown = "".join(f", {name.replace('_', ' ')} {value:.2f}%" for name, value in details.items())
    log(f"held-out {task.metric_label} {score:.2f}%{shown}")
    accuracy["drift_reference"] = task.drift_reference(program, eval_data, spec)
    if fp32_score is not None:
        accuracy.update(accuracy_gate(spec, fp32_score, score))
        log(f"accuracy gate passed: FP32 {fp32_score:.2f}% -> {spec.served_as} {score:.2f}% (max drop {spec.max_drop})")
    return accuracy


def _metadata(
    spec: ModelVersionSpec, fingerprint: str, weights_path: Path, program_path: Path, accuracy: dict | None
) -> dict:
    """metadata.json inside the archive: what it was built from, and the program's sha256 the worker checks."""
    accuracy = dict(accuracy) if accuracy is not None else None
    reference = accuracy.pop("drift_reference", None) if accuracy is not None else None
    return {
        "model": spec.name,
        "version": spec.version,
        "architecture": spec.architecture_key,
        "precision": spec.precision,
        "spec_hash": spec.spec_hash(),
        "inputs_fingerprint": fingerprint,
        "weights_sha256": file_sha256(weights_path),
        "program_sha256": file_sha256(program_path),
        **({"runtime": {"engine": spec.engine, "version": runtime_version(spec.engine)}} if spec.runtime else {}),
        "accuracy": accuracy,
        # True: a reduced-precision version built without evaluation data (allow_ungated), never compared
        # with FP32; servekit status shows it.
        "ungated": spec.ungated,
        "monitoring": spec.monitoring.to_dict(),
        "drift_reference": reference,
        "oip": spec.oip_metadata(),
        "built_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "toolkit_version": servekit.__version__,
        "torch_version": torch.__version__,
    }


def _record_in_manifest(spec: ModelVersionSpec, store: Path, metadata: dict) -> dict:
    archive_path = store / spec.archive_name
    record = {
        **{k: metadata[k] for k in ("model", "version", "precision", "spec_hash", "inputs_fingerprint")},
        "weights_sha256": metadata["weights_sha256"],
        "accuracy": metadata["accuracy"],
        "ungated": metadata["ungated"],
        "sha256": file_sha256(archive_path),
        # explanations' FP32 program inside a reduced-precision archive (handlers.explain); absent for FP32
        **(
            {"explain_reference_sha256": metadata["explain_reference"]["sha256"]}
            if metadata.get("explain_reference")
            else {}
        ),
        "size_bytes": archive_path.stat().st_size,
        "built_at": metadata["built_at"],
    }
    manifest = read_manifest(store)  # re-read: another build may have finished meanwhile
    manifest["archives"][spec.archive_name] = record
    write_manifest(store, manifest)
    return record


def _explain_reference(spec: ModelVersionSpec, model: torch.nn.Module, stage: Path, log) -> dict:
    """The FP32 program explanations of a reduced-precision version run on (INT8 programs have no gradients):
    the same weights before conversion, packed beside the served program and recorded with its sha256 in
    metadata.json, which the archive's own sha256 in the manifest covers (handlers.explain.load_reference)."""
    reference = stage / "fp32_reference.pt"
    if not reference.is_file():  # the accuracy gate exported it already when there was evaluation data
        export_torchscript(model, spec.task.example_input(spec), reference)
    log(f"FP32 reference for explanations: {reference.stat().st_size / 1e6:.2f} MB")
    return {"file": reference.name, "sha256": file_sha256(reference), "precision": "fp32"}


def _tuned_sections(spec: ModelVersionSpec, tuned: ModelVersionSpec) -> dict:
    """The spec sections ``Task.tune`` changed, as built (``{}``: none): what the archive differs from the spec by."""
    written, built = spec.to_dict(), tuned.to_dict()
    return {key: value for key, value in built.items() if written.get(key) != value}


def _as_fp32(spec: ModelVersionSpec) -> ModelVersionSpec:
    from dataclasses import replace

    return replace(spec, precision="fp32", quantization=None, bf16=None, runtime=None)


def accuracy_gate(spec: ModelVersionSpec, fp32_score: float, score: float) -> dict:
    """The gate of a reduced-precision version: at most ``max_drop`` points of the task's metric below
    FP32, else BuildError. Recorded as ``fp32_<metric>`` and ``gate: {max_<metric>_drop, drop}``."""
    allowed, metric = spec.max_drop, spec.task.metric
    if score < fp32_score - allowed:
        raise BuildError(
            f"{spec.name} {spec.version}: accuracy gate failed: {spec.served_as} {spec.task.metric_label} "
            f"{score:.2f}% is more than {allowed} points below FP32 {fp32_score:.2f}%"
        )
    return {f"fp32_{metric}": fp32_score, "gate": {f"max_{metric}_drop": allowed, "drop": round(fp32_score - score, 4)}}


def _package(spec: ModelVersionSpec, stage: Path, metadata: dict) -> Path:
    extra = stage / "extra"
    shutil.copytree(HANDLERS_DIR, extra / "handlers", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    spec.task.archive_files(spec, extra)
    user_file = getattr(spec.architecture, "file", None)
    if user_file:  # the user's module, as torch-model-archiver's --model-file keeps it (the program serves)
        (extra / "model_source").mkdir()
        shutil.copyfile(user_file, extra / "model_source" / Path(user_file).name)
    if spec.golden_set:
        golden = extra / "golden"
        golden.mkdir()
        for item in spec.golden_set:
            if item.content is not None:  # golden_set: auto, picked from the user's held-out data
                (golden / item.name).write_bytes(item.content)
            else:
                shutil.copyfile(item.path, golden / item.name)
        entries = [{"file": item.name, "label": item.label} for item in spec.golden_set]
        (golden / "golden.json").write_text(json.dumps(entries, indent=1))
    if metadata.get("explain_reference"):
        shutil.copyfile(stage / metadata["explain_reference"]["file"], extra / metadata["explain_reference"]["file"])
    (extra / "metadata.json").write_text(json.dumps(metadata, indent=2))
    config = {**spec.serving.model_config(), "handler": spec.handler_config().to_dict()}
    if spec.handler_options:
        config["handler_options"] = spec.handler_options  # the user handler's self.options
    (stage / "model-config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    out = stage / "out"
    out.mkdir()
    command = [
        sys.executable,
        "-m",
        "model_archiver.model_packaging",
        "--model-name",
        spec.name,
        "--version",
        spec.version,
        "--serialized-file",
        str(stage / spec.program_file),
        "--handler",
        spec.handler_file,
        "--extra-files",
        str(extra),
        "--config-file",
        str(stage / "model-config.yaml"),
        "--export-path",
        str(out),
        "--archive-format",
        "default",
        "--force",
    ]
    # torch-model-archiver stages in $TMPDIR/<model name> and deletes that folder first and after: a private
    # TMPDIR keeps it from removing a user's /tmp/<model name> (their data, say) along the way.
    private_tmp = stage / "archiver-tmp"
    private_tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(private_tmp)}
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    archive = out / f"{spec.name}.mar"
    if result.returncode != 0 or not archive.is_file():
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise BuildError(
            f"{spec.name} {spec.version}: torch-model-archiver failed: {detail[-1] if detail else result.returncode}"
        )
    return archive


def build_all(
    specs: list[ModelVersionSpec], store: Path, cache_dir: Path, force: bool = False, stream=None
) -> list[BuildResult]:
    return [build_version(spec, store, cache_dir, force, stream) for spec in specs]
