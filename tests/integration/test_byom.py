"""A user's own models and data, built by ``build_mar.py`` and served by a real TorchServe.

One project is made in a temporary folder, as a user would have it (``tests/byom_project.py``): the
shapes CNN (``shapes_net.py`` + trained weights, FP32 1.0 and INT8 2.0 gated on the user's val
split, ``golden_set: auto``), wine measurements as a CSV (an MLP trained at build time), and a
torchvision builder trained on the image folder. ``build_mar.py`` builds it into a temporary store,
one TorchServe (with the OIP front) serves that store, and the ``servekit`` CLI points at it:

* ``register`` checks each archive's sha256 against the temporary store's manifest (a modified
  copy is refused), and every val image gets the right shape from both versions, with the labels
  and probabilities the archive's program computes in this process;
* the same answers come through OIP (versioned routes, binary and base64 BYTES) and KServe v1;
* ``promote`` passes with the archive's automatic golden set, and ``status`` says 2.0 is gated;
* the CSV model answers JSON records named by the CSV's header, and names a missing feature;
* the torchvision model answers with a label of the user's data set.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import tritonclient.http as triton_http
import yaml
from PIL import Image

from handlers.config import HandlerConfig
from handlers.model_loading import load_model
from handlers.tabular import TabularConfig
from servekit.build.user_data import csv_table
from servekit.serving.server import TorchServeProcess
from servekit.serving.store import archive_name
from tests.byom_project import PREPROCESSING, shapes_model, shapes_project, wine_csv, write_spec
from tests.integration.conftest import (
    Client,
    default_version,
    ok,
    one_error_line,
    operator_cli,
    running_torchserve,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SHAPES = ("circle", "square", "triangle")  # the user's label folders, sorted
TORCHVISION = "shapes_squeezenet"
TOLERANCE = 1e-4  # probabilities: rounded to 6 decimals, and server-side batches differ from ours in the last bits
LOUD = "shapes_loud"  # the user's CNN behind a handler of the user's own (over the built-in image classifier)
LOUD_HANDLER = '''
from handlers.image_classifier import ImageClassifier


class LoudClassifier(ImageClassifier):
    """The built-in image classifier with its labels in capitals and the spec's options.suffix after them."""

    def load(self, context, config):
        super().load(context, config)
        self.labels = [label.upper() + self.options["suffix"] for label in self.labels]
'''
CHUNK = 16  # images per OIP / KServe v1 request (the handler takes up to max_images: 32)


@dataclass
class Project:
    root: Path
    store: Path
    server: TorchServeProcess
    cli: Callable[..., subprocess.CompletedProcess]
    registered: dict[str, str]  # "model version" -> the output of `servekit register`


RUNTIME_VERSIONS = {
    "3.0": {"precision": "fp32", "runtime": "openvino"},
    "4.0": {"precision": "int8", "runtime": "openvino", "quantization": {"max_drop": 3.0}},
}
SHAPES_VERSIONS = ("1.0", "2.0", *RUNTIME_VERSIONS)


def project_spec(root: Path) -> Path:
    one_worker = {"batch_size": 4, "max_batch_delay_ms": 5, "min_workers": 1, "max_workers": 1}
    wine = {
        "description": "A user's wine cultivar classifier",
        "architecture": "mlp",
        "handler": "tabular_classifier",
        "data": {"csv": "wine.csv", "target": "cultivar"},
        "serving": one_worker,
        "versions": {"1.0": {"precision": "fp32", "weights": {"train": "data"}}},
    }
    squeezenet = {
        "description": "SqueezeNet 1.1 trained on the user's shapes",
        "architecture": {"torchvision": "squeezenet1_1"},
        "handler": "image_classifier",
        "data": {"folder": "data"},
        "preprocessing": dict(PREPROCESSING),
        "serving": one_worker,
        "versions": {"1.0": {"precision": "fp32", "weights": {"train": "data", "epochs": 2}}},
    }
    (root / "loud_handler.py").write_text(LOUD_HANDLER)
    loud = shapes_model(
        handler={"file": "loud_handler.py", "class": "LoudClassifier", "options": {"suffix": "!"}},
        versions={"1.0": {"precision": "fp32"}},
    )
    # 3.0 and 4.0: the same module served by OpenVINO (runtime:), FP32 and INT8 (a QDQ graph), each gated.
    shapes = shapes_model()
    shapes["versions"] = {**shapes["versions"], **RUNTIME_VERSIONS}
    return write_spec(root, {"shapes": shapes, "wine": wine, TORCHVISION: squeezenet, LOUD: loud})


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    """The user's project built into a temporary store, served, and every version registered with the CLI."""
    root = shapes_project(tmp_path_factory.mktemp("user_project"))
    wine_csv(root / "wine.csv")
    spec = project_spec(root)
    store, cache = tmp_path_factory.mktemp("store"), tmp_path_factory.mktemp("cache")
    build = subprocess.run(
        [sys.executable, "build_mar.py", "--spec", str(spec), "--store", str(store), "--cache", str(cache)],
        capture_output=True, text=True, timeout=600, check=False, cwd=REPO,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    workdir, state = tmp_path_factory.mktemp("torchserve"), tmp_path_factory.mktemp("state")
    with running_torchserve(workdir, store, load_models="") as server:
        cli = operator_cli(server, store, REPO, state)
        registered = {}
        versions = (*(("shapes", v) for v in SHAPES_VERSIONS), ("wine", "1.0"), (TORCHVISION, "1.0"), (LOUD, "1.0"))
        for model, version in versions:
            registered[f"{model} {version}"] = ok(cli("register", model, version))
        yield Project(root, store, server, cli, registered)


@pytest.fixture(scope="module")
def client(project: Project) -> Client:
    return Client(project.server)


def unpacked(project: Project, model: str, version: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp(f"{model}_{version}")
    with zipfile.ZipFile(project.store / archive_name(model, version)) as mar:
        mar.extractall(folder)
    return folder


def handler_section(folder: Path) -> dict:
    return yaml.safe_load((folder / "model-config.yaml").read_text())["handler"]


@pytest.fixture(scope="module")
def shapes_programs(project: Project, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Each shapes version's program as its worker loads it, and its archive's metadata."""
    loaded = {}
    for version in SHAPES_VERSIONS:
        folder = unpacked(project, "shapes", version, tmp_path_factory)
        config = HandlerConfig.from_dict(handler_section(folder))
        metadata = json.loads((folder / "metadata.json").read_text())
        program = "model.pt" if config.runtime == "torch" else "model.onnx"
        loaded[version] = (load_model(folder / program, config), metadata)
    return loaded


# ------------------------------------------------------------------------------------------ the shapes images
def val_images(project: Project) -> list[tuple[str, bytes]]:
    """Every image of the user's val split as (true label, PNG bytes), shape by shape."""
    folder = project.root / "data" / "val"
    return [(shape, path.read_bytes()) for shape in SHAPES for path in sorted((folder / shape).glob("*.png"))]


def pixels(image: bytes) -> torch.Tensor:
    """The spec's preprocessing, written out: RGB, 32x32 as is (crop 32), mean 0.5, std 0.25."""
    array = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"), dtype=np.float32) / 255.0
    assert array.shape == (32, 32, 3)
    return torch.from_numpy((array - 0.5) / 0.25).permute(2, 0, 1)


def expected_topk(program, images: list[bytes], k: int = 2) -> list[tuple[list[str], list[float]]]:
    """Top-k labels and probabilities of each image, computed here by the archive's program."""
    with torch.inference_mode():
        probabilities = torch.softmax(program(torch.stack([pixels(i) for i in images])).float(), dim=1)
    top_p, top_i = probabilities.topk(k, dim=1)
    return [([SHAPES[i] for i in row_i], row_p) for row_i, row_p in zip(top_i.tolist(), top_p.tolist(), strict=True)]


def assert_same(got: list[tuple[list[str], list[float]]], expected: list[tuple[list[str], list[float]]]) -> None:
    assert [labels for labels, _ in got] == [labels for labels, _ in expected]
    for (_, got_p), (_, want_p) in zip(got, expected, strict=True):
        assert got_p == pytest.approx(want_p, abs=TOLERANCE)


def assert_close(got: list[tuple[list[str], list[float]]], expected: list[tuple[list[str], list[float]]],
                 tolerance: float, stepped: int = 0) -> None:  # fmt: skip
    """Each label's probability within ``tolerance`` of the program's, and the same top label unless the
    program's own top two are within twice that (a near tie that kernels chosen by batch size may tip).
    ``stepped``: up to this many images may be off by up to twice ``tolerance`` (an INT8 output's grid step)."""
    off = []
    for (got_labels, got_p), (want_labels, want_p) in zip(got, expected, strict=True):
        want = dict(zip(want_labels, want_p, strict=True))
        worst = max((abs(p - want[label]) for label, p in zip(got_labels, got_p, strict=True) if label in want),
                    default=0.0)  # fmt: skip
        assert worst <= 2 * tolerance, (got_labels, got_p, want_labels, want_p)
        if worst > tolerance:
            off.append((got_labels, got_p, want_labels, want_p))
        if want_p[0] - want_p[1] > 2 * tolerance:
            assert got_labels[0] == want_labels[0], (got_labels, got_p, want_labels, want_p)
    assert len(off) <= stepped, off


def from_predictions(predictions: list[dict]) -> tuple[list[str], list[float]]:
    return [p["label"] for p in predictions], [p["probability"] for p in predictions]


def chunks(items: list, size: int = CHUNK) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def token(server: TorchServeProcess) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.keys()['inference']}"}


# ------------------------------------------------------------------------------------------ 1. register, predict
def test_register_checks_the_temporary_stores_manifest(project: Project, tmp_path: Path) -> None:
    for key, output in project.registered.items():
        assert f"registered {key}" in output
    versions = {(s["model"], s["version"]) for s in json.loads(ok(project.cli("status", "--json")))}
    assert {("shapes", "1.0"), ("shapes", "2.0"), ("wine", "1.0"), (TORCHVISION, "1.0")} <= versions
    # The same archive, one byte longer, beside the same manifest: the CLI refuses it before TorchServe sees it.
    tampered = tmp_path / "store"
    tampered.mkdir()
    shutil.copyfile(project.store / "manifest.json", tampered / "manifest.json")
    name = archive_name("shapes", "1.0")
    (tampered / name).write_bytes((project.store / name).read_bytes() + b"\0")
    cli = operator_cli(project.server, tampered, REPO, tmp_path)
    line = one_error_line(cli("register", "shapes", "1.0"))
    assert f"sha256 mismatch for {name}" in line


@pytest.mark.parametrize("version", SHAPES_VERSIONS)
def test_every_val_image_gets_its_shape_as_the_archives_program_computes(
    project: Project, client: Client, shapes_programs: dict, version: str
) -> None:
    program, metadata = shapes_programs[version]
    images = val_images(project)

    def predict(image: bytes) -> list[dict]:
        response = client.predict(f"shapes/{version}", data=image, headers={"Content-Type": "image/png"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["model"], body["version"]) == ("shapes", version)
        return body["predictions"]

    with ThreadPoolExecutor(4) as pool:
        answers = [from_predictions(p) for p in pool.map(predict, [image for _, image in images])]
    expected = expected_topk(program, [image for _, image in images])
    if version in RUNTIME_VERSIONS and RUNTIME_VERSIONS[version]["precision"] == "int8":
        # OpenVINO's INT8 kernels depend on the batch's size (the server's batches are not this test's
        # one batch): a near tie flipped in one of 120 images at exact comparison, so scores are compared
        # within 0.05. The QDQ graph's output is quantised too, so its probabilities sit on a grid: in one CI
        # run a logit one grid step away swapped two labels' values exactly (0.4908 and 0.4241, 0.067 apart).
        # Two images of 120 may be one such step away.
        assert_close(answers, expected, tolerance=0.05, stepped=2)
    else:
        assert_same(answers, expected)
    correct = sum(labels[0] == truth for (truth, _), (labels, _) in zip(images, answers, strict=True))
    # The build measured this program on these images: the server gets at least as many right (one image of slack
    # for a near tie that a different batch composition may tip).
    assert 100.0 * correct / len(images) >= metadata["accuracy"]["top1"] - 100.0 / len(images)
    assert metadata["accuracy"]["top1"] >= 90.0
    for shape in SHAPES:  # every shape is recognised, not only the majority of the set
        assert any(labels[0] == shape == truth for (truth, _), (labels, _) in zip(images, answers, strict=True))


# ------------------------------------------------------------------------------------------ 2. OIP and KServe v1
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "base64"])
def test_oip_versioned_routes_give_the_same_answers(project: Project, shapes_programs: dict, binary: bool) -> None:
    server = project.server
    http = triton_http.InferenceServerClient(server.url("oip_http").split("://", 1)[1])
    images = [image for _, image in val_images(project)][::3]  # every third image: all shapes, both versions
    for version in ("1.0", "2.0"):
        answers = []
        for chunk in chunks(images):
            tensor = triton_http.InferInput("image", [len(chunk)], "BYTES")
            data = chunk if binary else [base64.b64encode(i) for i in chunk]
            tensor.set_data_from_numpy(np.array(data, dtype=np.object_), binary_data=binary)
            outputs = [triton_http.InferRequestedOutput(n, binary_data=binary) for n in ("labels", "scores")]
            result = http.infer("shapes", [tensor], model_version=version, outputs=outputs, headers=token(server))
            assert result.get_response()["model_version"] == version
            labels, scores = result.as_numpy("labels"), result.as_numpy("scores")
            assert labels.shape == scores.shape == (len(chunk), 2)
            for row_labels, row_scores in zip(labels, scores, strict=True):
                decoded = [x.decode() if isinstance(x, bytes) else str(x) for x in row_labels]
                answers.append((decoded, row_scores.astype(float).tolist()))
        assert_same(answers, expected_topk(shapes_programs[version][0], images))


def test_kserve_v1_gives_the_default_versions_answers(project: Project, shapes_programs: dict) -> None:
    server = project.server
    default = default_version(project.cli, "shapes")
    images = [image for _, image in val_images(project)][1::3]
    answers = []
    for chunk in chunks(images):
        response = requests.post(
            server.url("oip_http", "/v1/models/shapes:predict"),
            json={"instances": [{"data": base64.b64encode(i).decode()} for i in chunk]},
            headers=token(server),
            timeout=60,
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model_version"] == default
        answers += [from_predictions(p) for p in body["predictions"]]
    assert_same(answers, expected_topk(shapes_programs[default][0], images))


# ------------------------------------------------------------------------------------------ 3. promote
def test_promote_passes_the_archives_auto_golden_set_and_status_shows_2_0_gated(project: Project) -> None:
    with zipfile.ZipFile(project.store / archive_name("shapes", "2.0")) as mar:
        golden = json.loads(mar.read("golden/golden.json"))
    assert sorted({g["label"] for g in golden}) == list(SHAPES)  # auto: held-out images of every class
    assert default_version(project.cli, "shapes") == "1.0"
    promoted = ok(project.cli("promote", "shapes", "2.0"))
    assert f"golden set {len(golden)}/{len(golden)} correct" in promoted
    assert default_version(project.cli, "shapes") == "2.0"
    lines = ok(project.cli("status")).splitlines()
    gate = lines[0].index("GATE")
    gates = {tuple(line.split()[:2]): line[gate:].strip() for line in lines[1:]}
    assert gates[("shapes", "2.0")] == "gated"
    assert gates[("shapes", "1.0")] == "-"
    state = {(s["model"], s["version"]): s for s in json.loads(ok(project.cli("status", "--json")))}
    assert state[("shapes", "2.0")]["gate"] == "gated"


# ------------------------------------------------------------------------------------------ 4. the CSV model
def test_wine_csv_model_answers_held_out_records_named_by_the_csv_header(
    project: Project, client: Client, tmp_path_factory: pytest.TempPathFactory
) -> None:
    table = csv_table({"csv": "wine.csv", "target": "cultivar"}, project.root, None)  # the build's own split
    header = (project.root / "wine.csv").read_text().splitlines()[0].split(",")
    assert list(table.feature_names) == [name for name in header if name != "cultivar"]
    folder = unpacked(project, "wine", "1.0", tmp_path_factory)
    program = load_model(folder / "model.pt", TabularConfig.from_dict(handler_section(folder)))
    metadata = json.loads((folder / "metadata.json").read_text())
    records = [dict(zip(table.feature_names, map(float, row), strict=True)) for row in table.x_val]
    truth = [table.labels[i] for i in table.y_val]
    with torch.inference_mode():
        probabilities, indices = torch.softmax(program(torch.tensor(table.x_val, dtype=torch.float32)), 1).max(1)

    response = client.predict("wine/1.0", data=json.dumps(records), headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["index"] for p in predictions] == indices.tolist()
    assert [p["probability"] for p in predictions] == pytest.approx(probabilities.tolist(), abs=TOLERANCE)
    assert {p["label"] for p in predictions} <= set(table.labels)
    correct = sum(p["label"] == t for p, t in zip(predictions, truth, strict=True))
    assert 100.0 * correct / len(records) == pytest.approx(metadata["accuracy"]["accuracy"])
    assert correct >= 0.9 * len(records)

    for record, label in list(zip(records, truth, strict=True))[:: len(records) // 6][
        :6
    ]:  # six records across the split, one at a time
        response = client.predict("wine", data=json.dumps(record), headers={"Content-Type": "application/json"})
        assert response.status_code == 200, response.text
        (prediction,) = response.json()["predictions"]
        assert prediction["label"] == label


def test_wine_record_with_a_missing_feature_gets_a_4xx_naming_it(project: Project, client: Client) -> None:
    table = csv_table({"csv": "wine.csv", "target": "cultivar"}, project.root, None)
    record = dict(zip(table.feature_names, map(float, table.x_val[0]), strict=True))
    missing = table.feature_names[3]
    del record[missing]
    response = client.predict("wine/1.0", data=json.dumps(record), headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    error = response.json()
    assert error["code"] == response.status_code
    assert f"feature {missing!r} is missing" in error["error"]


# ------------------------------------------------------------------------------------------ 5. the torchvision builder
def test_torchvision_builder_model_answers_with_a_label_of_the_data_set(project: Project, client: Client) -> None:
    for truth, image in val_images(project)[::20]:
        response = client.predict(f"{TORCHVISION}/1.0", data=image, headers={"Content-Type": "image/png"})
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        assert predictions[0]["label"] in SHAPES, truth
        assert sorted(p["label"] for p in predictions) == list(SHAPES)  # topk defaults to min(5, 3 labels)
        assert sum(p["probability"] for p in predictions) == pytest.approx(1.0, abs=1e-4)


# ---------------------------------------------------------------------------------- 6. a handler of the user's own
def test_a_users_handler_over_the_image_classifier_answers_in_its_own_words(project: Project, client: Client) -> None:
    """Same program and preprocessing as shapes 1.0: the same top-1 per image, as the user's handler labels it."""
    for truth, image in val_images(project)[::15]:
        plain = client.predict("shapes/1.0", data=image, headers={"Content-Type": "image/png"})
        loud = client.predict(f"{LOUD}/1.0", data=image, headers={"Content-Type": "image/png"})
        assert loud.status_code == 200, loud.text
        expected = [p["label"].upper() + "!" for p in plain.json()["predictions"]]
        assert [p["label"] for p in loud.json()["predictions"]] == expected, truth
    broken = client.predict(f"{LOUD}/1.0", data=b"not an image", headers={"Content-Type": "image/png"})
    assert broken.status_code == 415, broken.text  # the base's typed errors hold for the user's handler
    assert broken.json()["code"] == 415


# ------------------------------------------------------------------------------------------ runtime: openvino
def test_a_runtime_version_is_served_by_its_runtime_gated_and_explained_on_its_fp32_reference(
    project: Project, shapes_programs: dict
) -> None:
    for version, settings in RUNTIME_VERSIONS.items():
        program, metadata = shapes_programs[version]
        assert (metadata["runtime"]["engine"], program.runtime, program.precision) == (
            "openvino", "openvino", settings["precision"])  # fmt: skip
        fp32_top1 = shapes_programs["1.0"][1]["accuracy"]["top1"]
        assert metadata["accuracy"]["fp32_top1"] == fp32_top1  # gated against the FP32 torch program
    # Explanations of a runtime version run on its FP32 reference (OpenVINO gives no gradients).
    url = project.server.url("inference") + "/explanations/shapes/3.0"
    headers = {**token(project.server), "Content-Type": "image/png"}
    image = val_images(project)[0][1]
    for _ in range(40):  # the model's share of explanation time may say "later" (429)
        response = requests.post(url, data=image, headers=headers, timeout=60)
        if response.status_code != 429:
            break
        time.sleep(0.25)
    assert response.status_code == 200, response.text
    [answer] = response.json()["explanations"]
    assert answer["program"].startswith("the FP32 reference (fp32_reference.pt) of this FP32 on openvino version")
