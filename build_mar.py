#!/usr/bin/env python3
"""Build versioned TorchServe archives (.mar) from the model spec.

    python build_mar.py                          # every model x version in models.yaml
    python build_mar.py --model digits --version 2.0
    python build_mar.py --force                  # rebuild every version, also those whose inputs changed

Archives go to model_store/ (see model_store/README.md); model_store/manifest.json lists them
with their sha256. Exit status 1 with one line on stderr for any spec or build error.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from servekit.build.spec import SpecError, load_spec, select  # noqa: E402
from servekit.build.training import BuildError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "models.yaml"), help="model spec (default: models.yaml)")
    parser.add_argument(
        "--store",
        default=os.environ.get("SERVEKIT_STORE", str(ROOT / "model_store")),
        help="output folder (default: $SERVEKIT_STORE, the servekit CLI's store, else model_store)",
    )
    parser.add_argument("--cache", default=str(ROOT / "build" / "cache"), help="trained-weights cache")
    parser.add_argument("--model", help="build only this model")
    parser.add_argument("--version", help="build only this version (with --model)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the version exists with other inputs")
    parser.add_argument("--check", action="store_true", help="validate the spec and exit")
    args = parser.parse_args(argv)
    try:
        specs = select(load_spec(args.spec), args.model, args.version)
        if args.check:
            print(f"spec OK: {', '.join(f'{s.name} {s.version}' for s in specs)}")
            return 0
        from servekit.build.archive import build_all

        results = build_all(specs, Path(args.store), Path(args.cache), force=args.force)
    except (SpecError, BuildError) as exc:
        print(f"build_mar: error: {exc}", file=sys.stderr)
        return 1
    for result in results:
        accuracy, task = result.record.get("accuracy") or {}, result.spec.task
        score = f", {task.metric_label} {accuracy[task.metric]:.2f}%" if accuracy.get(task.metric) is not None else ""
        print(f"{result.spec.archive_name}: {result.status}{score}, sha256 {result.record['sha256'][:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
