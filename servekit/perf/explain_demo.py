"""``make explain-demo``: real explanations from a real TorchServe, for the README's figure and answers.

Serves ``model_store``'s digits 1.0 (FP32) and 2.0 (INT8) and breast_cancer 1.0 on free loopback
ports, asks ``POST /explanations/...`` of each (the digits with ``X-Explain-Heatmap: png``) and writes:

* ``docs/images/explain_digit_7.png``: the heatmap digits 2.0 answered for ``samples/digit_7.png``,
  beside the input as sent (the figure in README.md, "Explanations");
* ``results/explain/*.json``: the answers as they came (the heatmap's base64 shortened).

With ``--load`` it also runs ``servekit.perf.explain_load`` (prediction p99 at c=16 with and without one
explanation client) on digits 2.0 and writes ``results/explain/load.json`` and ``load.md``.

    python -m servekit.perf.explain_demo [--load] [--seconds 10]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import time
from pathlib import Path

import requests
from PIL import Image

from servekit.build.archive import REPO_ROOT
from servekit.serving.server import ADDRESS_KEYS, TorchServeProcess, free_port
from servekit.serving.store import archive_name

STORE = REPO_ROOT / "model_store"
DIGIT = REPO_ROOT / "samples" / "digit_7.png"
RECORD = REPO_ROOT / "samples" / "breast_cancer" / "malignant_0.json"
FIGURE = REPO_ROOT / "docs" / "images" / "explain_digit_7.png"
RESULTS = REPO_ROOT / "results" / "explain"
WORKDIR = REPO_ROOT / "build" / "explain_demo"


def log(message: str) -> None:
    print(f"[explain-demo] {message}", flush=True)


def ask(url: str, token: str, retries: int = 40, **kwargs) -> dict:
    """POST an explanation; waits out the explanations' share of time (429) like a polite client."""
    headers = {"Authorization": f"Bearer {token}", **kwargs.pop("headers", {})}
    for _ in range(retries):
        answer = requests.post(url, headers=headers, timeout=60, **kwargs)
        if answer.status_code != 429:
            break
        time.sleep(0.25)
    if answer.status_code != 200:
        raise SystemExit(f"explain-demo: {url} answered {answer.status_code}: {answer.text[:300]}")
    return answer.json()


def figure(sent: bytes, heatmap_png: str, path: Path) -> None:
    """The input as sent (scaled to the heatmap's height) beside the heatmap over the model's input."""
    heat = Image.open(io.BytesIO(base64.b64decode(heatmap_png))).convert("RGB")
    original = Image.open(io.BytesIO(sent)).convert("RGB")
    scale = heat.height / original.height
    original = original.resize((max(1, round(original.width * scale)), heat.height), Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (original.width + 16 + heat.width, heat.height), "white")
    canvas.paste(original, (0, 0))
    canvas.paste(heat, (original.width + 16, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG", optimize=True)


def shortened(answer: dict) -> dict:
    """The answer with each heatmap's base64 cut to its first 60 characters, for the results file."""
    for item in answer.get("explanations", []):
        if "heatmap_png" in item:
            item["heatmap_png"] = item["heatmap_png"][:60] + f"... ({len(item['heatmap_png'])} characters)"
    return answer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Real explanations for the README's figure (and the load run).")
    parser.add_argument("--load", action="store_true", help="also measure predictions beside explanations")
    parser.add_argument("--seconds", type=float, default=10.0, help="each load run (with --load)")
    args = parser.parse_args(argv)
    archives = [archive_name("digits", "1.0"), archive_name("digits", "2.0"), archive_name("breast_cancer", "1.0")]
    missing = [name for name in archives if not (STORE / name).is_file()]
    if missing:
        print(f"explain-demo: error: {', '.join(missing)} not in {STORE}: run make archive", file=sys.stderr)
        return 1
    RESULTS.mkdir(parents=True, exist_ok=True)
    server = TorchServeProcess(
        workdir=WORKDIR, model_store=STORE, ports={kind: free_port() for kind in ADDRESS_KEYS},
        load_models=",".join(archives), oip=False,
    )  # fmt: skip
    server.start()
    try:
        client = server.client(timeout=120)
        token = client.token("inference")
        sent = DIGIT.read_bytes()
        for version in ("1.0", "2.0"):
            url = client.url("inference", f"/explanations/digits/{version}")
            answer = ask(url, token, data=sent, headers={"Content-Type": "image/png", "X-Explain-Heatmap": "png"})
            item = answer["explanations"][0]
            log(f"digits {version}: {item['target']['label']}, completeness error {item['completeness']['error']} "
                f"(sum {item['completeness']['attribution_sum']}, difference "
                f"{item['completeness']['score'] - item['completeness']['baseline_score']:.6g})")  # fmt: skip
            if version == "2.0":
                figure(sent, item["heatmap_png"], FIGURE)
                log(f"wrote {FIGURE.relative_to(REPO_ROOT)}")
            (RESULTS / f"digits_{version}.json").write_text(json.dumps(shortened(answer), indent=1) + "\n")
        url = client.url("inference", "/explanations/breast_cancer/1.0")
        answer = ask(url, token, json=json.loads(RECORD.read_text()))
        item = answer["explanations"][0]
        log(f"breast_cancer 1.0: {item['target']['label']}, top features {item['ranking'][:3]}, "
            f"completeness error {item['completeness']['error']}")  # fmt: skip
        (RESULTS / "breast_cancer_1.0.json").write_text(json.dumps(answer, indent=1) + "\n")
    finally:
        server.stop()
    if args.load:
        from servekit.perf import explain_load
        from servekit.perf.bench import run_hey

        result = explain_load.measure(WORKDIR, STORE, "digits", "2.0", archive_name("digits", "2.0"), DIGIT,
                                      args.seconds, False, run_hey, log)  # fmt: skip
        (RESULTS / "load.json").write_text(json.dumps(result, indent=2) + "\n")
        (RESULTS / "load.md").write_text("\n".join(explain_load.markdown(result)).lstrip() + "\n")
        log(
            f"p99 ratio, explanations on the pool {result['pool_p99_ratio']}, on the prediction workers "
            f"{result['p99_ratio']}: wrote {RESULTS.relative_to(REPO_ROOT)}/load.json, load.md"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
