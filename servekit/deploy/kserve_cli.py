"""``servekit kserve canary|promote|abort|rollout``: write a KServe canary step, never apply it.

Each step reads the applied InferenceService (``--current``), writes the next one to ``--out`` (YAML,
for ``kubectl apply -f``) and the JSON merge patch between them beside it (``OUT.patch.json``, for
``kubectl patch --type merge``), and prints both commands. ``rollout`` writes one file per step of
``servekit rollout``'s percentages and the promotion into the folder ``--out``.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from servekit.deploy import kserve
from servekit.deploy.kserve import KServeError

DEFAULT_STEPS = (10, 25, 50, 100)  # servekit rollout's default steps


def _candidate(bundle: Path | None) -> tuple[dict, dict]:
    if bundle is None:
        raise KServeError("--bundle: the new version's bundle folder is required for canary and rollout")
    try:
        record = json.loads((Path(bundle) / "bundle.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise KServeError(f"--bundle {bundle}: no readable bundle.json ({' '.join(str(exc).split())})") from None
    return kserve.read_inferenceservice(Path(bundle) / "kserve" / "inferenceservice.yaml"), record


def _steps(text: str | None) -> list[int]:
    if text is None:
        return list(DEFAULT_STEPS)
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise KServeError(f"--steps {text!r}: use percentages separated by commas, e.g. 10,25,50,100") from None


def _write(current: dict, nxt: dict, out: Path) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(nxt, sort_keys=False, default_flow_style=False))
    patch = kserve.merge_patch(current, nxt)
    patch_file = out.with_name(out.name + ".patch.json")
    patch_file.write_text(json.dumps(patch, indent=2, sort_keys=True) + "\n")
    meta = nxt["metadata"]
    return (
        f"{out}: kubectl apply --server-side -f {out}\n"
        f"{patch_file}: kubectl -n {meta.get('namespace', 'default')} patch inferenceservice {meta['name']} "
        f"--type merge --patch-file {patch_file}"
    )


def run_kserve(
    action: str,
    current_file: Path,
    out: Path,
    candidate: Path | None = None,
    percent: int | None = None,
    name: str | None = None,
    steps: str | None = None,
) -> str:
    current = kserve.read_inferenceservice(current_file)
    if action in ("canary", "rollout"):
        isvc, record = _candidate(candidate)
        name = name or kserve.canary_name(record["models"])
        if action == "canary":
            if percent is None:
                raise KServeError("canary needs --percent P (0 to 100)")
            return _write(current, kserve.canary(current, isvc, percent, name), Path(out))
        lines, previous = [], current
        for index, (label, document) in enumerate(kserve.rollout_plan(current, isvc, _steps(steps), name), 1):
            lines.append(_write(previous, document, Path(out) / f"{index:02d}-{label}.yaml"))
            previous = document
        return "\n".join(lines) + "\njudge each step (servekit rollout's thresholds) before applying the next"
    if action == "promote":
        return _write(current, kserve.promote(current), Path(out))
    if action == "abort":
        return _write(current, kserve.abort(current), Path(out))
    raise KServeError(f"unknown action {action!r}: use canary, promote, abort or rollout")
