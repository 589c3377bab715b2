"""The README's "Bring your own model" block, run as written against a real TorchServe.

The block's lines run in one bash in the repository root, exactly as the README shows them, with
two substitutions a reader's machine would not need: ``my_project`` is a folder under the test's
tmp path (not in the checkout), and ``http://127.0.0.1:8080`` is the test server's inference
address. The servekit CLI and build_mar.py find that server and its store through the
``SERVEKIT_*`` variables (``SERVEKIT_STORE`` is the store both use), and ``$INF`` is its
inference token, as "Try it" sets it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from servekit.serving.server import TorchServeProcess
from tests.integration.conftest import running_torchserve

pytestmark = pytest.mark.integration

START, END = "<!-- byom:start -->", "<!-- byom:end -->"


def readme_block(repo_root: Path) -> list[str]:
    """The commands between the README's markers, continuation lines joined."""
    text = (repo_root / "README.md").read_text()
    block = text[text.index(START) + len(START) : text.index(END)]
    body = re.search(r"```bash\n(.*?)```", block, re.S)
    assert body is not None, "the README's Bring your own model block has no bash fence"
    return [line for line in body.group(1).replace("\\\n", " ").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServeProcess]:
    store = tmp_path_factory.mktemp("byom_store")
    with running_torchserve(tmp_path_factory.mktemp("byom_server"), store, load_models="", oip=False) as ts:
        yield ts


def test_the_readme_block_builds_a_gated_int8_archive_registers_it_and_answers(
    server: TorchServeProcess, repo_root: Path, tmp_path: Path
) -> None:
    project = tmp_path / "my_project"
    lines = [
        line.replace("my_project", str(project)).replace("http://127.0.0.1:8080", server.url("inference"))
        for line in readme_block(repo_root)
    ]
    assert any(line.startswith(".venv/bin/servekit init ") for line in lines)
    assert lines[-1].startswith("curl ")
    env = {
        **os.environ,
        "SERVEKIT_STORE": str(server.model_store),
        "SERVEKIT_MANAGEMENT_URL": server.url("management"),
        "SERVEKIT_INFERENCE_URL": server.url("inference"),
        "SERVEKIT_KEY_FILE": str(server.key_file),
        "SERVEKIT_HISTORY": str(tmp_path / "state" / "deployments.jsonl"),
        "SERVEKIT_PROXY_DIR": str(tmp_path / "state" / "proxy"),
        "INF": server.keys()["inference"],
    }
    script = "set -euo pipefail\n" + "\n".join(lines) + "\n"
    result = subprocess.run(
        ["bash", "-c", script], cwd=repo_root, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # The last command's answer: the circle is a circle, from the INT8 version.
    answer = json.loads(result.stdout[result.stdout.rfind("\n{") + 1 :])  # the JSON document curl printed last
    assert answer["predictions"][0]["label"] == "circle", result.stdout[-2000:]
    assert "registered shapes 2.0" in result.stdout

    # The archive is gated on the user's held-out split, and the figures are in its metadata.
    with zipfile.ZipFile(server.model_store / "shapes_v2.0.mar") as archive:
        metadata = json.loads(archive.read("metadata.json"))
    accuracy = metadata["accuracy"]
    assert metadata["precision"] == "int8"
    assert metadata["ungated"] is False
    assert accuracy["dataset"] == "data"
    assert accuracy["images"] == 3 * 40
    assert accuracy["fp32_top1"] - accuracy["top1"] <= accuracy["gate"]["max_top1_drop"]
    assert (project / "models.yaml").is_file()
    assert not (repo_root / "my_project").exists()
