"""The object detector (``digit_pages``) against a real TorchServe: reading pages, geometry, options, hostile batches.

* both versions (FP32 1.0, INT8 2.0) read held-out pages (held-out digits only) left to right:
  at least 90 % of 50 pages give the exact digit string;
* boxes come back in the pixels of the image as sent: a page scaled, padded to another aspect ratio,
  or stored rotated in a JPEG with an EXIF orientation, finds its digits where they are;
* KServe v1 and OIP v2 (JSON) answer each image of a request;
* per-request options (multipart fields, JSON fields) are validated: a bad ``score_threshold`` or
  ``max_detections`` is a 400 naming it;
* a server-side batch of hostile images and good pages: each bad one fails alone, the good ones are
  read right, and the worker does not restart;
* ``servekit promote`` checks the archive's golden pages (the answer's ``label``, the page's digits)
  before switching the default, and ``servekit rollback`` goes back through the same gate.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from torchvision.ops import box_iou

from servekit.build.detection import Page, evaluation_pages
from servekit.serving.server import TorchServeProcess
from servekit.serving.store import archive_name
from tests.integration.conftest import Client, default_version, ok, operator_cli, running_torchserve, send_together

pytestmark = pytest.mark.integration

MODEL = "digit_pages"
BATCH_MODEL = "digit_pages_batch"  # 1.0 registered again with a long batch delay
BATCH = 8
PAGES = 50
MIN_PAGE_ACCURACY = 0.9


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> Iterator[TorchServeProcess]:
    workdir = tmp_path_factory.mktemp("detector")
    with running_torchserve(workdir, model_store, load_models=archive_name(MODEL, "1.0"), oip=False) as torchserve:
        client = Client(torchserve)
        params = {"url": archive_name(MODEL, "2.0"), "initial_workers": 1, "synchronous": "true"}
        response = client.manage("POST", "/models", params=params)
        assert response.status_code == 200, response.text
        yield torchserve


@pytest.fixture(scope="module")
def client(server: TorchServeProcess) -> Client:
    return Client(server)


@pytest.fixture(scope="module")
def pages() -> list[Page]:
    return evaluation_pages(PAGES)


def encoded(image: Image.Image, kind: str = "PNG", **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=kind, **options)
    return out.getvalue()


def found_where_drawn(answer: dict, boxes: np.ndarray, labels: np.ndarray) -> int:
    """How many drawn digits have a detection of their label overlapping their box by IoU >= 0.5."""
    found = answer["detections"]
    if not found:
        return 0
    predicted = torch.tensor([d["box"] for d in found], dtype=torch.float32)
    overlaps = box_iou(torch.as_tensor(boxes, dtype=torch.float32), predicted)
    return sum(
        any(overlaps[i, j] >= 0.5 and found[j]["index"] == int(label) for j in range(len(found)))
        for i, label in enumerate(labels)
    )


# ------------------------------------------------------------------------------------------ reading pages
@pytest.mark.parametrize("version", ["1.0", "2.0"])
def test_both_versions_read_held_out_pages(client: Client, pages: list[Page], version: str) -> None:
    bodies = [encoded(page.image) for page in pages]
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda body: client.predict(f"{MODEL}/{version}", data=body), bodies))

    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200][:1]
    answers = [r.json() for r in responses]
    assert {a["version"] for a in answers} == {version}
    right = sum(a["label"] == page.text() for a, page in zip(answers, pages, strict=True))
    assert right / len(pages) >= MIN_PAGE_ACCURACY, f"{version}: {right}/{len(pages)} pages read right"
    assert [a["image_size"] for a in answers] == [list(page.image.size) for page in pages]


def test_boxes_in_original_pixels_for_other_sizes_aspects_and_exif(client: Client, pages: list[Page]) -> None:
    page = next(p for p in pages if len(p.labels) >= 3 and max(p.image.size) / min(p.image.size) > 1.3)
    width, height = page.image.size
    scaled = page.image.resize((width * 3, height * 3), Image.Resampling.BICUBIC)
    side = max(width, height)  # the page in the bottom-right corner of a square sheet: another aspect ratio
    square = Image.new("L", (side, side), 235)
    square.paste(page.image, (side - width, side - height))
    shift = np.array([side - width, side - height] * 2, dtype=np.float32)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed after rotating 90 degrees clockwise: stored rotated the other way
    rotated = encoded(page.image.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif.tobytes())
    cases = {
        "scaled x3": (encoded(scaled), page.boxes * 3, (width * 3, height * 3)),
        "padded to a square": (encoded(square), page.boxes + shift, (side, side)),
        "EXIF-rotated JPEG": (rotated, page.boxes, (width, height)),
        "as drawn": (encoded(page.image), page.boxes, (width, height)),
    }
    for name, (body, boxes, size) in cases.items():
        response = client.predict(f"{MODEL}/1.0", data=body)
        assert response.status_code == 200, (name, response.text)
        answer = response.json()
        assert answer["image_size"] == list(size), name
        # a digit may be misread (about 1 page in 20 is), but the boxes must land where the digits are
        assert found_where_drawn(answer, boxes, page.labels) >= len(page.labels) - 1, (name, answer, boxes.tolist())


def test_kserve_v1_and_oip_answer_every_image(client: Client, pages: list[Page]) -> None:
    chosen = pages[:3]
    images = [base64.b64encode(encoded(page.image)).decode() for page in chosen]
    texts = [page.text() for page in chosen]

    v1 = client.api.send("inference", "POST", f"/v1/models/{MODEL}:predict", json={"instances": images}, timeout=60)
    oip = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [3], "data": images}], "id": "pages"}
    v2 = client.api.send("inference", "POST", f"/v2/models/{MODEL}/infer", json=oip, timeout=60)

    assert v1.status_code == 200, v1.text
    predictions = v1.json()["predictions"]
    assert sum(p["label"] == t for p, t in zip(predictions, texts, strict=True)) >= 2
    assert v2.status_code == 200, v2.text
    outputs = {o["name"]: o for o in v2.json()["outputs"]}
    assert v2.json()["id"] == "pages"
    k = outputs["scores"]["shape"][1]
    assert outputs["boxes"]["shape"] == [3, k, 4]
    assert outputs["counts"]["data"] == [len(p["detections"]) for p in predictions]
    labels = outputs["labels"]["data"]
    assert [labels[i * k : i * k + n] for i, n in enumerate(outputs["counts"]["data"])] == [
        [d["label"] for d in p["detections"]] for p in predictions
    ]


# ------------------------------------------------------------------------------------------ options
def ask(client: Client, page: Page, options: dict, form: str):
    """``page`` with ``options`` as multipart fields beside the image, or as JSON fields beside its base64."""
    if form == "multipart":
        files = {"data": ("page.png", encoded(page.image), "image/png")}
        return client.predict(MODEL, files=files, data={k: str(v) for k, v in options.items()})
    return client.predict(MODEL, json={"data": base64.b64encode(encoded(page.image)).decode(), **options})


@pytest.mark.parametrize("form", ["multipart", "json"])
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"score_threshold": 2}, "score_threshold must be a number from 0.01 to 1, got 2"),
        ({"score_threshold": "nan"}, "score_threshold must be a number from 0.01 to 1, got nan"),
        ({"max_detections": 0}, "max_detections must be a whole number from 1 to 100, got 0"),
        ({"max_detections": "two"}, "max_detections must be a whole number from 1 to 100, got 'two'"),
    ],
)
def test_bad_options_are_a_400_naming_the_option(
    client: Client, pages: list[Page], options: dict, message: str, form: str
) -> None:
    response = ask(client, pages[0], options, form)

    assert response.status_code == 400
    assert response.json() == {"error": message, "code": 400, "type": "InvalidInput"}


@pytest.mark.parametrize("form", ["multipart", "json"])
def test_options_change_the_answer(client: Client, pages: list[Page], form: str) -> None:
    page = next(p for p in pages if len(p.labels) >= 3)
    one = ask(client, page, {"max_detections": 1}, form).json()
    none = ask(client, page, {"score_threshold": 1}, form).json()

    assert len(one["detections"]) == 1
    assert none["detections"] == []
    assert none["label"] == ""


# ------------------------------------------------------------------------------------------ hostile
def test_hostile_images_in_a_server_side_batch_fail_alone(client: Client, pages: list[Page]) -> None:
    with client.one_batch_copy(archive_name(MODEL, "1.0"), BATCH_MODEL, "1.0", BATCH):
        good = [encoded(page.image) for page in pages[:4]]
        huge = encoded(Image.new("L", (6000, 6000), 230))  # 36 megapixels: over limits.max_pixels
        hostile = [
            (b"%PDF-1.4 not an image", {}, 415),
            (good[0][:60], {}, 400),  # a truncated PNG
            (huge, {}, 413),
            (good[1], {"score_threshold": "-1"}, 400),  # a multipart field
        ]
        batch = [case for pair in zip(hostile, [(g, {}, 200) for g in good], strict=True) for case in pair]

        def send(case: tuple) -> requests.Response:
            body, options, _ = case
            if options:
                return client.predict(BATCH_MODEL, files={"data": ("page.png", body, "image/png")}, data=options)
            return client.predict(BATCH_MODEL, data=body)

        responses = send_together(batch, send)
        assert [r.status_code for r in responses] == [status for _, _, status in batch], [r.text for r in responses]
        read = [r.json()["label"] for r in responses if r.status_code == 200]
        assert sum(label == page.text() for label, page in zip(read, pages[:4], strict=True)) >= 3


def test_the_top_detection_feeds_the_prediction_counter(
    client: Client, server: TorchServeProcess, pages: list[Page]
) -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    answer = client.predict(f"{MODEL}/1.0", data=encoded(pages[1].image)).json()
    top = answer["detections"][0]["label"]
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(server.metrics_dir))  # what servekit's /metrics serves

    lines = [line for line in generate_latest(registry).decode().splitlines()
             if line.startswith("servekit_predictions_total{") and f'model="{MODEL}"' in line]  # fmt: skip

    assert any(f'class="{top}"' in line and 'version="1.0"' in line for line in lines), lines


# ------------------------------------------------------------------------------------------ promotion
@pytest.fixture
def cli(server: TorchServeProcess, model_store: Path, repo_root: Path, tmp_path: Path):
    return operator_cli(server, model_store, repo_root, tmp_path)


def test_promote_and_rollback_pass_the_golden_pages(cli, repo_root: Path) -> None:
    golden = len(json.loads((repo_root / "samples/pages/golden.json").read_text()))

    assert f"golden set {golden}/{golden} correct" in ok(cli("promote", MODEL, "2.0"))
    assert default_version(cli, MODEL) == "2.0"
    rolled = ok(cli("rollback", MODEL))
    assert f"default is 1.0 again (was 2.0; golden set {golden}/{golden} correct)" in rolled
    assert default_version(cli, MODEL) == "1.0"
