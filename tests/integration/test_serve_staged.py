"""``make serve`` (servekit/serve.py): TorchServe starts with the first model built, later ones join as built.

A user's spec of two tabular models on their own CSV, and a third version not loaded at start: the
server must be started before the second model is trained, the second must then answer as a registered
model with its archive's workers, and the version not named in ``load_models`` is built but not served.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from servekit.build.archive import build_version
from servekit.build.spec import load_spec, select
from servekit.errors import ServekitError
from servekit.serve import serve
from servekit.serving.server import ADDRESS_KEYS, TorchServeProcess, free_port
from tests.byom_project import wine_csv, write_spec

pytestmark = pytest.mark.integration

RECORD = {
    "alcohol": 13.2, "malic_acid": 1.78, "ash": 2.14, "alcalinity_of_ash": 11.2, "magnesium": 100.0,
    "total_phenols": 2.65, "flavanoids": 2.76, "nonflavanoid_phenols": 0.26, "proanthocyanins": 1.28,
    "color_intensity": 4.38, "hue": 1.05, "od280/od315_of_diluted_wines": 3.4, "proline": 1050.0,
}  # fmt: skip


def wine_model(seed: int) -> dict:
    return {
        "description": "A user's wine cultivar classifier",
        "architecture": "mlp",
        "handler": "tabular_classifier",
        "data": {"csv": "wine.csv", "target": "cultivar"},
        "serving": {"batch_size": 4, "max_batch_delay_ms": 5, "min_workers": 1, "max_workers": 1},
        "versions": {
            "1.0": {"precision": "fp32", "weights": {"train": "data", "seed": seed}},
            "2.0": {"precision": "fp32", "weights": {"train": "data", "seed": seed + 1}},
        },
    }


def test_starts_with_the_first_model_and_registers_the_next_when_built(tmp_path: Path) -> None:
    wine_csv(tmp_path / "wine.csv")
    spec = write_spec(tmp_path, {"wine_a": wine_model(0), "wine_b": wine_model(10)})
    server = TorchServeProcess(
        workdir=tmp_path / "var", model_store=tmp_path / "store", ports={k: free_port() for k in ADDRESS_KEYS},
        load_models="wine_a_v1.0.mar,wine_b_v1.0.mar", snapshots=True,
    )  # fmt: skip
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            serve(server, spec, tmp_path / "cache")
        lines = out.getvalue().splitlines()

        def first(prefix: str) -> int:
            return next(i for i, line in enumerate(lines) if line.startswith(prefix))

        started = first("serve: starting TorchServe with wine_a 1.0 ")
        assert first("[wine_a 1.0] training") < started < first("[wine_b 1.0] training"), out.getvalue()
        assert first("serve: wine_b 1.0 answers") > first("[wine_b 1.0] wrote"), out.getvalue()
        client = server.client()
        assert sorted(client.models()) == ["wine_a", "wine_b"]
        for name in ("wine_a", "wine_b"):
            (described,) = client.describe(name)  # only 1.0: 2.0 is built, not loaded
            assert described["modelVersion"] == "1.0"
            assert [w["status"] for w in described["workers"]] == ["READY"]  # the archive's min_workers
            assert described["batchSize"] == 4
            answer = client.call("inference", "POST", f"/predictions/{name}", json=RECORD)
            assert answer.status_code == 200, answer.text
            (prediction,) = answer.json()["predictions"]
            assert prediction["label"] == "cultivar_A"  # a cultivar A record from the data set
        assert (tmp_path / "store" / "wine_b_v2.0.mar").is_file()
    finally:
        server.stop()


def test_a_failed_build_stops_the_server_it_started(tmp_path: Path) -> None:
    wine_csv(tmp_path / "wine.csv")
    broken = wine_model(10)
    (tmp_path / "broken.pt").write_bytes(b"not a program")  # the spec sees a file; only the build reads it
    broken["program"] = {"file": "broken.pt"}
    del broken["architecture"]
    broken["versions"] = {"1.0": {"precision": "fp32"}}
    spec = write_spec(tmp_path, {"wine_a": wine_model(0), "wine_b": broken})
    server = TorchServeProcess(
        workdir=tmp_path / "var", model_store=tmp_path / "store", ports={k: free_port() for k in ADDRESS_KEYS},
        load_models="wine_a_v1.0.mar,wine_b_v1.0.mar", snapshots=True,
    )  # fmt: skip
    # wine_a built already (as after an earlier make serve): it comes first, then the server starts with it
    build_version(select(load_spec(spec), "wine_a", "1.0")[0], tmp_path / "store", tmp_path / "cache")
    out = io.StringIO()
    try:
        with pytest.raises(ServekitError, match="wine_b 1.0") as raised, contextlib.redirect_stdout(out):
            serve(server, spec, tmp_path / "cache")
        assert "broken.pt" in str(raised.value)
        assert "serve: starting TorchServe with wine_a 1.0 " in out.getvalue()  # it had started
        assert server.running_pid() is None
    finally:
        server.stop()
