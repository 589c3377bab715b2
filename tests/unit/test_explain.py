"""Explanations (handlers.explain): Integrated Gradients' completeness, models whose answer provably depends
on one image quadrant or one tabular feature, and the request path through the real handlers with a fake
context: the frontend's ``explain`` header, the limits (413, 429, 503), 501 for a handler without
``explain``, and predictions of the same batch answered as usual."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from handlers import explain
from handlers.config import ExplainConfig
from handlers.errors import DeadlineExceeded, TooManyRequests
from handlers.image_classifier import ImageClassifier
from handlers.tabular_classifier import TabularClassifier
from tests.fake_clock import FakeClock
from tests.fake_context import FakeContext

pytestmark = pytest.mark.unit

EXPLAIN = {"explain": "True"}  # what TorchServe's frontend adds to /explanations and :explain requests
PREDICT = {"explain": "False"}


# ------------------------------------------------------------------------------------------ models the tests build
class QuadrantNet(torch.nn.Module):
    """A 2-class classifier of 1x16x16 inputs that looks ONLY at the top-left 8x8 quadrant: class 1's
    score is a ReLU of that quadrant's weighted ink, class 0's its negation. Nothing else reaches the output."""

    def __init__(self) -> None:
        super().__init__()
        weights = torch.zeros(1, 16, 16)
        weights[0, :8, :8] = torch.linspace(0.5, 1.5, 64).reshape(8, 8)
        self.register_buffer("weights", weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        evidence = torch.relu((x * self.weights).sum(dim=(1, 2, 3)) + 0.3)
        return torch.stack([-evidence, evidence], dim=1)


class OneFeatureNet(torch.nn.Module):
    """A 2-class tabular model of 5 features whose answer depends on feature 3 only (through a small MLP)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(1, 4)
        with torch.no_grad():
            self.hidden.weight.copy_(torch.tensor([[1.0], [-0.5], [2.0], [0.25]]))
            self.hidden.bias.copy_(torch.tensor([0.1, 0.2, -0.3, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.hidden(x[:, 3:4]))
        score = h.sum(dim=1)
        return torch.stack([-score, score], dim=1)


def frozen(module: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    with torch.no_grad():
        traced = torch.jit.freeze(torch.jit.trace(module.eval(), example))
    traced.save(str(path))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model_dir(tmp_path: Path, name: str, program: Path, handler: dict, labels: list[str], **metadata) -> FakeContext:
    """An unpacked archive as the build writes it (program, sha256 record, labels, handler section) and its context."""
    folder = program.parent
    (folder / "labels.json").write_text(json.dumps(labels))
    (folder / "metadata.json").write_text(json.dumps({"program_sha256": sha256(program), **metadata}))
    manifest = {"model": {"modelName": name, "modelVersion": "1.0", "serializedFile": program.name}}
    config = {"handler": handler}
    yaml.safe_dump(config)  # the section must be what YAML can carry
    return FakeContext(folder, manifest, config, batch_size=4)


@pytest.fixture(autouse=True)
def budget_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "explain-budget"
    monkeypatch.setenv(explain.ENV_BUDGET_DIR, str(folder))
    return folder


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array.astype(np.uint8), "L").save(out, format="PNG")
    return out.getvalue()


IMAGE_SECTION = {
    "labels_file": "labels.json",
    "topk": 2,
    "preprocessing": {"color_mode": "L", "resize": None, "crop": 16, "mean": [0.5], "std": [0.5]},
    "explain": {"steps": 32, "max_steps": 64, "max_inputs": 2, "timeout_s": 10, "max_share": 1.0, "grid": 16},
}


@pytest.fixture
def quadrant_handler(tmp_path: Path) -> tuple[ImageClassifier, FakeContext]:
    folder = tmp_path / "quadrant"
    folder.mkdir()
    program = frozen(QuadrantNet(), torch.zeros(1, 1, 16, 16), folder / "model.pt")
    context = model_dir(tmp_path, "quadrant", program, IMAGE_SECTION, ["no", "yes"])
    handler = ImageClassifier()
    handler.initialize(context)
    return handler, context


def bright_everywhere() -> bytes:
    """A 16x16 image with ink in every quadrant: the model sees only the top-left one's."""
    rng = np.random.default_rng(0)
    return png(rng.integers(120, 255, size=(16, 16)))


def ask(handler, context: FakeContext, bodies: list, headers: list[dict]) -> list:
    context.reset(headers=headers, request_ids=[f"r{i}" for i in range(len(bodies))])
    return handler.handle([{"body": body} for body in bodies], context)


# ------------------------------------------------------------------------------------------ completeness
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_integrated_gradients_attributions_sum_to_the_score_difference_within_tolerance(seed: int) -> None:
    """Completeness: sum(attributions) = score(x) - score(baseline), within 1e-3 relative with 32 steps
    (a ReLU CNN with max pooling and a softplus head: the integrand is not linear along the path)."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(6, 8, 3, padding=1), torch.nn.Softplus(), torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10),
    ).eval()  # fmt: skip
    x = torch.randn(3, 1, 16, 16)
    baseline = torch.full((1, 1, 16, 16), -0.4)
    result = explain.integrated_gradients(net, x, baseline, [1, 4, 9], steps=32)
    for i in range(3):
        check = result.completeness(i)
        difference = check["score"] - check["baseline_score"]
        assert abs(check["attribution_sum"] - difference) <= 1e-3 * max(1.0, abs(difference)) + 1e-5
        assert check["within_tolerance"] is True


def test_completeness_holds_on_a_frozen_relu_program_within_the_stated_tolerance_and_converges(
    tmp_path: Path,
) -> None:
    """A ReLU MLP as an archive holds it (traced, frozen, loaded): within the answers' stated tolerance
    (0.005 + 0.05 x |difference|) at the default 32 steps, and the error shrinks with more steps."""
    torch.manual_seed(3)
    mlp = torch.nn.Sequential(torch.nn.Linear(30, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    program = torch.jit.load(str(frozen(mlp, torch.zeros(1, 30), tmp_path / "p.pt")))
    x, baseline = torch.randn(4, 30), torch.zeros(1, 30)
    errors = {}
    for steps in (8, 32, 128):
        result = explain.integrated_gradients(program, x, baseline, [0, 1, 0, 1], steps=steps)
        errors[steps] = sum(result.completeness(i)["error"] for i in range(4))
        if steps >= 32:
            assert all(result.completeness(i)["within_tolerance"] for i in range(4))
    assert errors[128] < errors[32] < errors[8]


# ------------------------------------------------------------------------------------------ known region, known feature
def test_a_model_that_looks_at_one_quadrant_gets_it_ranked_first(quadrant_handler) -> None:
    handler, context = quadrant_handler
    [body] = ask(handler, context, [bright_everywhere()], [EXPLAIN])
    assert context.statuses == {}
    [answer] = body["explanations"]
    cells = np.array(answer["attributions"])
    assert cells.shape == (16, 16)
    assert answer["attributions_shape"] == [16, 16]
    quadrants = {
        "top-left": cells[:8, :8],
        "top-right": cells[:8, 8:],
        "bottom-left": cells[8:, :8],
        "bottom-right": cells[8:, 8:],
    }
    ranked = sorted(quadrants, key=lambda q: -np.abs(quadrants[q]).sum())
    assert ranked[0] == "top-left"
    for other in ranked[1:]:
        assert np.abs(quadrants[other]).sum() == 0.0  # no gradient ever reaches them
    assert answer["target"] == {"label": "yes", "index": 1}
    assert answer["prediction"]["label"] == "yes"
    assert answer["completeness"]["within_tolerance"] is True
    assert answer["method"] == "integrated_gradients"
    assert answer["steps"] == 32
    assert answer["program"].startswith("the served FP32 program")


def test_a_tabular_model_that_uses_one_feature_gets_it_ranked_first(tmp_path: Path) -> None:
    folder = tmp_path / "onefeature"
    folder.mkdir()
    program = frozen(OneFeatureNet(), torch.zeros(1, 5), folder / "model.pt")
    names = ["age", "income", "debt", "late_payments", "tenure"]
    features = [{"name": n, "min": 0.0, "max": 10.0, "lower": -5.0, "upper": 15.0, "unit": "u"} for n in names]
    section = {"labels_file": "labels.json", "features": features, "max_records": 8, "explain": {"max_share": 1.0}}
    context = model_dir(tmp_path, "credit", program, section, ["refuse", "grant"])
    handler = TabularClassifier()
    handler.initialize(context)
    record = {"age": 9.0, "income": 1.0, "debt": 8.0, "late_payments": 8.5, "tenure": 0.5}
    [body] = ask(handler, context, [json.dumps(record).encode()], [EXPLAIN])
    assert context.statuses == {}
    [answer] = body["explanations"]
    assert [f["name"] for f in answer["features"]] == names  # the schema's order
    assert answer["ranking"][0] == "late_payments"
    by_name = {f["name"]: f for f in answer["features"]}
    assert by_name["late_payments"]["attribution"] != 0.0
    assert all(by_name[n]["attribution"] == 0.0 for n in names if n != "late_payments")
    assert by_name["late_payments"]["value"] == 8.5
    assert by_name["late_payments"]["baseline"] == 5.0
    assert answer["completeness"]["within_tolerance"] is True
    # Signed: the attribution of the class refused is the negation of the class granted.
    [other] = ask(handler, context, [json.dumps(record).encode()], [{**EXPLAIN, "X-Explain-Target": "#0"}])[0][
        "explanations"
    ]
    assert other["target"]["label"] == "refuse"
    assert other["features"][3]["attribution"] == pytest.approx(-by_name["late_payments"]["attribution"], rel=1e-4)


# ------------------------------------------------------------------------------------------ the request path
def test_predictions_and_an_explanation_in_one_batch_are_each_answered_as_asked(quadrant_handler) -> None:
    handler, context = quadrant_handler
    image = bright_everywhere()
    bodies = ask(handler, context, [image, image, image], [PREDICT, EXPLAIN, {"Explain": "True"}])
    assert context.statuses == {}
    assert "predictions" in bodies[0]
    assert "explanations" not in bodies[0]
    assert "explanations" in bodies[1]
    # A client's own "Explain" header on a prediction route is not TorchServe's flag: a prediction.
    assert "predictions" in bodies[2]
    assert bodies[0]["predictions"][0]["label"] == bodies[1]["explanations"][0]["prediction"]["label"]


def test_kserve_v1_explain_answers_one_explanation_per_instance_with_a_heatmap(quadrant_handler) -> None:
    handler, context = quadrant_handler
    b64 = base64.b64encode(bright_everywhere()).decode()
    [body] = ask(
        handler, context, [{"instances": [{"b64": b64}, {"b64": b64}]}], [{**EXPLAIN, "X-Explain-Heatmap": "png"}]
    )
    assert context.statuses == {}
    assert set(body) == {"explanations", "model_name", "model_version"}
    assert len(body["explanations"]) == 2
    picture = Image.open(io.BytesIO(base64.b64decode(body["explanations"][0]["heatmap_png"])))
    assert picture.format == "PNG"
    assert picture.size == (256, 256)


@pytest.mark.parametrize(
    ("headers", "status", "words"),
    [
        ({"X-Explain-Steps": "65"}, 413, "at most 64"),
        ({"X-Explain-Steps": "many"}, 400, "whole number"),
        ({"X-Explain-Target": "maybe"}, 400, "not a label"),
        ({"X-Explain-Heatmap": "gif"}, 400, "png"),
    ],
)
def test_a_bad_explanation_request_fails_alone_with_a_json_error(quadrant_handler, headers, status, words) -> None:
    handler, context = quadrant_handler
    image = bright_everywhere()
    bodies = ask(handler, context, [image, image], [{**EXPLAIN, **headers}, PREDICT])
    assert context.statuses[0][0] == status
    assert 1 not in context.statuses
    assert bodies[0]["code"] == status
    assert words in bodies[0]["error"]
    assert bodies[1]["predictions"][0]["label"] == "yes"


def test_more_inputs_than_max_inputs_is_413(quadrant_handler) -> None:
    handler, context = quadrant_handler
    b64 = base64.b64encode(bright_everywhere()).decode()
    [body] = ask(handler, context, [{"instances": [b64, b64, b64]}], [EXPLAIN])
    assert body["code"] == 413
    assert "explain.max_inputs" in body["error"]


def test_the_share_of_time_refuses_the_next_explanation_with_429_then_lets_it_through(tmp_path: Path) -> None:
    budget = explain.ShareBudget("m", share=0.5, directory=tmp_path)
    with budget.claim(timeout_s=5):
        with pytest.raises(TooManyRequests, match="one at a time"), budget.claim(timeout_s=5):
            pass
        time.sleep(0.2)
    with pytest.raises(TooManyRequests, match="at most 50% of the time"), budget.claim(timeout_s=5):
        pass
    time.sleep(0.25)
    with budget.claim(timeout_s=5):
        pass


def test_a_429_from_the_share_reaches_the_client_as_json(quadrant_handler, budget_dir: Path) -> None:
    handler, context = quadrant_handler
    explain.ShareBudget("quadrant", 1.0, budget_dir)  # the handler's own file, made busy by "another worker"
    budget_dir.mkdir(parents=True, exist_ok=True)
    (budget_dir / "quadrant.json").write_text(json.dumps({"running": {"pid": 1, "until": time.time() + 30}}))
    image = bright_everywhere()
    bodies = ask(handler, context, [image, image], [EXPLAIN, PREDICT])
    assert bodies[0]["code"] == 429
    assert bodies[0]["type"] == "TooManyRequests"
    assert "predictions" in bodies[1]


def test_an_explanation_past_its_timeout_is_stopped_with_503(tmp_path: Path) -> None:
    slow_calls = []

    def slow(x: torch.Tensor) -> torch.Tensor:
        slow_calls.append(len(x))
        time.sleep(0.05)
        return x.flatten(1)[:, :2]

    x = torch.randn(1, 4)
    with pytest.raises(DeadlineExceeded, match="explain.timeout_s"):
        explain.integrated_gradients(slow, x, torch.zeros(1, 4), [0], steps=128, deadline=time.monotonic() + 0.01)
    assert len(slow_calls) <= 2


def test_a_handler_without_explain_answers_501(quadrant_handler) -> None:
    handler, context = quadrant_handler
    handler.explain = lambda *args: ImageClassifier.__mro__[1].explain(handler, *args)  # the base's
    [body] = ask(handler, context, [bright_everywhere()], [EXPLAIN])
    assert body["code"] == 501
    assert "offers no explanations" in body["error"]


def test_an_int8_version_is_explained_on_its_recorded_fp32_reference(tmp_path: Path) -> None:
    folder = tmp_path / "int8"
    folder.mkdir()
    net = QuadrantNet()
    reference = frozen(net, torch.zeros(1, 1, 16, 16), folder / explain.REFERENCE_FILE)
    program = frozen(net, torch.zeros(1, 1, 16, 16), folder / "model.pt")  # stands in for the INT8 program
    record = {"file": reference.name, "sha256": sha256(reference), "precision": "fp32"}
    context = model_dir(tmp_path, "q8", program, IMAGE_SECTION, ["no", "yes"], explain_reference=record)
    handler = ImageClassifier()
    handler.initialize(context)
    handler.settings = type(handler.settings).from_dict({**IMAGE_SECTION, "precision": "int8"})
    [body] = ask(handler, context, [bright_everywhere()], [EXPLAIN])
    assert "INT8 programs have no gradients" in body["explanations"][0]["program"]
    # A reference changed after the build is refused, as the served program would be.
    handler._reference = None
    reference.write_bytes(reference.read_bytes() + b"\0")
    [body] = ask(handler, context, [bright_everywhere()], [EXPLAIN])
    assert body["code"] == 500
    assert "sha256" in body["error"]


def test_explain_config_refuses_bad_limits_naming_the_key() -> None:
    with pytest.raises(ValueError, match="explain.max_steps"):
        ExplainConfig.from_dict({"max_steps": 0})
    with pytest.raises(ValueError, match="explain.max_share"):
        ExplainConfig.from_dict({"max_share": 1.5})
    with pytest.raises(ValueError, match="explain.colour: unknown key"):
        ExplainConfig.from_dict({"colour": 1})
    assert ExplainConfig.from_dict({"max_steps": 8, "steps": 8}).to_dict()["max_steps"] == 8


def test_pooling_keeps_the_sum_of_attributions() -> None:
    values = torch.randn(224, 224)
    cells = explain.pooled(values, 32)
    assert cells.shape == (32, 32)
    assert float(cells.sum()) == pytest.approx(float(values.sum()), abs=1e-3)


# ------------------------------------------------------------------------------------------ explanation pools
def test_a_registration_named_model_explainer_is_an_explanation_pool_outside_the_cpu_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "quadrant"
    folder.mkdir()
    program = frozen(QuadrantNet(), torch.zeros(1, 1, 16, 16), folder / "model.pt")
    section = {**IMAGE_SECTION, "explain": {**IMAGE_SECTION["explain"], "max_share": 0.1}}
    context = model_dir(tmp_path, "quadrant", program, section, ["no", "yes"])
    context.model_name = "quadrant-explainer"  # the same archive, registered under the pool's name
    moved = []
    monkeypatch.setattr(explain, "idle_priority", lambda: moved.append(True) or 1)  # not this test process's threads
    handler = ImageClassifier()
    handler.initialize(context)
    assert handler.explainer
    assert moved == [True]
    assert handler.cpu is None  # never a member of the prediction workers' budget
    image = bright_everywhere()
    bodies = ask(handler, context, [image, image], [EXPLAIN, PREDICT])
    assert bodies[0]["explanations"][0]["target"] == {"label": "yes", "index": 1}
    assert bodies[0]["model"] == "quadrant"  # answers name the model, as its prediction workers' do
    assert set(context.statuses) == {1}
    assert context.statuses[1][0] == 400
    assert "answers explanations only" in bodies[1]["error"]
    assert "/predictions/quadrant" in bodies[1]["error"]
    # Its own idle time is all its share: a second explanation right away is answered, not refused (429).
    assert "explanations" in ask(handler, context, [image], [EXPLAIN])[0]


def test_a_model_name_that_only_ends_like_a_pool_is_not_one() -> None:
    assert explain.is_explainer("digits-explainer")
    assert not explain.is_explainer("-explainer")
    assert not explain.is_explainer("digits")
    assert not explain.is_explainer("digits-explainers")


def test_idle_priority_moves_every_thread_and_the_threads_started_after_it() -> None:
    script = """
import os, threading
from handlers.explain import idle_priority
before = threading.Event(); done = threading.Event()
threading.Thread(target=lambda: (before.set(), done.wait())).start(); before.wait()
moved = idle_priority()
after = threading.Thread(target=done.wait); after.start()
policies = {int(t): os.sched_getscheduler(int(t)) for t in os.listdir("/proc/self/task")}
done.set()
print(moved, len(policies), sorted(set(policies.values())) == [os.SCHED_IDLE])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    assert done.returncode == 0, done.stderr
    moved, threads, all_idle = done.stdout.split()
    assert int(moved) >= 2  # the main thread and the one started before
    assert int(threads) >= 3  # and the one started after, which inherited the policy
    assert all_idle == "True"


def test_a_pool_chunk_starts_only_once_the_predictions_have_been_quiet_for_a_while() -> None:
    clock = FakeClock(100.0)
    busy_until = 100.05  # prediction batches run for the first 50 ms
    gate = explain.IdleGate(lambda: clock() < busy_until, quiet_s=0.01, poll_s=0.001, clock=clock, sleep=clock.sleep)
    gate.start()
    gate.wait(deadline=None)
    # Not at the first idle poll: 10 ms after the last poll that saw a batch (at most one poll before its end).
    assert clock() >= busy_until - 0.001 + 0.01 - 1e-9
    assert clock() < busy_until + 0.013
    started = clock()
    gate.wait(deadline=None)  # the next chunk of the same explanation, still quiet: at once
    assert clock() == started
    gate.start()  # a new explanation has not seen the quiet itself
    gate.wait(deadline=None)
    assert clock() >= started + 0.01


def test_a_pool_explanation_that_never_finds_idle_time_stops_at_its_deadline() -> None:
    clock = FakeClock(100.0)
    gate = explain.IdleGate(lambda: True, clock=clock, sleep=clock.sleep)
    gate.start()
    with pytest.raises(DeadlineExceeded, match="no idle CPU time"):
        gate.wait(deadline=clock() + 0.5)
    assert clock() <= 100.5 + 0.002


def test_a_pool_explains_in_small_chunks_each_waiting_on_the_gate() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    x, baseline = torch.randn(1, 4), torch.zeros(1, 4)
    asked: list[int] = []
    gate = explain.IdleGate(lambda: asked.append(1) or False, quiet_s=0.0)
    explain.serve_as_pool(gate)
    try:
        pooled = explain.integrated_gradients(net, x, baseline, [2], steps=32)
    finally:
        explain.serve_as_pool(None)
    plain = explain.integrated_gradients(net, x, baseline, [2], steps=32)
    assert len(asked) == 32 // explain.POOL_CHUNK_POINTS  # one question per chunk of 8 points
    assert torch.allclose(pooled.attributions, plain.attributions, atol=1e-6)
