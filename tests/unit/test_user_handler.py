"""``handler: {file, class, task, options}``: a user's handler and task, checked when the spec is read.

Each mistake is one line naming the model, version and field; a good entry resolves to the task the
handler serves, fingerprints the handler file by content and carries ``options`` to model-config.yaml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from servekit.build.spec import SpecError, load_spec

REPO = Path(__file__).resolve().parents[2]
TEXT_EXAMPLE = REPO / "examples" / "text_classifier"

OVER_IMAGES = '''
from handlers.image_classifier import ImageClassifier


class LoudClassifier(ImageClassifier):
    """The built-in image classifier, with its labels in capitals."""

    def load(self, context, config):
        super().load(context, config)
        self.labels = [label.upper() for label in self.labels]
'''

TWO_CLASSES = (
    OVER_IMAGES
    + """

class Helper:
    pass
"""
)

NOT_A_HANDLER = """
class LoudClassifier:
    pass
"""

ON_THE_BASE = """
from handlers.base import BatchHandler


class Bare(BatchHandler):
    pass
"""


def digits_entry(handler, **extra) -> dict:
    return {
        "architecture": "digits_cnn",
        "handler": handler,
        "labels": [str(i) for i in range(10)],
        "preprocessing": {"color_mode": "L", "resize": None, "crop": 16, "mean": [0.1], "std": [0.25]},
        "weights": {"train": "digits", "epochs": 1},
        "versions": {"1.0": {"precision": "fp32"}},
        **extra,
    }


def write(tmp_path: Path, entry: dict, source: str | None = OVER_IMAGES) -> Path:
    if source is not None:
        (tmp_path / "loud.py").write_text(source)
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": {"digits": entry}}))
    return path


def test_a_handler_over_a_built_in_task_resolves_to_that_task_and_fingerprints_its_file(tmp_path: Path) -> None:
    entry = digits_entry({"file": "loud.py", "class": "LoudClassifier", "options": {"shout": True}})
    spec = load_spec(write(tmp_path, entry))[0]

    assert spec.handler == "image_classifier"
    assert spec.task.handler == "image_classifier"
    assert spec.handler_file == str(tmp_path / "loud.py")
    assert spec.handler_options == {"shout": True}
    before = spec.spec_hash()
    (tmp_path / "loud.py").write_text(OVER_IMAGES + "\n# changed\n")
    assert load_spec(tmp_path / "models.yaml")[0].spec_hash() != before


def test_the_text_example_names_its_own_task(tmp_path: Path) -> None:
    shutil.copytree(TEXT_EXAMPLE, tmp_path / "text", ignore=shutil.ignore_patterns("__pycache__"))
    specs = load_spec(tmp_path / "text" / "models.yaml")

    assert [(s.handler, s.precision) for s in specs] == [("text_classifier", "fp32"), ("text_classifier", "int8")]
    assert type(specs[0].task).__name__ == "TextTask"
    assert specs[0].options.max_length == 32


@pytest.mark.parametrize(
    ("handler", "source", "extra", "field", "message"),
    [
        ({"file": "missing.py", "class": "X"}, None, {}, "handler.file", "file not found: {tmp}/missing.py"),
        (
            {"file": "loud.py", "class": "Quiet"},
            OVER_IMAGES,
            {},
            "handler.class",
            "loud.py defines no class 'Quiet' (its classes: LoudClassifier)",
        ),
        (
            {"file": "loud.py", "class": "LoudClassifier"},
            TWO_CLASSES,
            {},
            "handler.file",
            "loud.py defines 2 classes (LoudClassifier, Helper); TorchServe loads an entry point that defines exactly "
            "one: move the others to a module it imports",
        ),
        (
            {"file": "loud.py", "class": "LoudClassifier"},
            NOT_A_HANDLER,
            {},
            "handler.class",
            "LoudClassifier does not subclass handlers.base.BatchHandler (or a built-in task's handler)",
        ),
        (
            {"file": "loud.py", "class": "Bare"},
            ON_THE_BASE,
            {},
            "handler.task",
            "Bare subclasses no built-in task's handler: name the task (image_classifier, object_detector, "
            "tabular_classifier) or your own {file, class}",
        ),
        (
            {"file": "loud.py", "class": "LoudClassifier", "task": "speech"},
            OVER_IMAGES,
            {},
            "handler.task",
            "unknown task 'speech' (built-in: ['image_classifier', 'object_detector', 'tabular_classifier'], or "
            "{file, class})",
        ),
        (
            {"file": "loud.py", "class": "LoudClassifier", "task": {"file": "loud.py", "class": "LoudTask"}},
            OVER_IMAGES,
            {},
            "handler.task.class",
            "loud.py has no Task subclass 'LoudTask' (its Task classes: none)",
        ),
        (
            {"file": "loud.py", "class": "LoudClassifier", "colour": 1},
            OVER_IMAGES,
            {},
            "handler.colour",
            "unknown key (valid: file, class, task, options)",
        ),
        (
            {"file": "loud.py", "class": "LoudClassifier"},
            OVER_IMAGES,
            {"options": {"a": 1}},
            "options",
            "applies to a task of your own (handler: {task: {file, class}}); handler image_classifier takes no section",
        ),
    ],  # fmt: skip
    ids=[
        "missing-file",
        "no-such-class",
        "two-classes",
        "not-a-handler",
        "no-task",
        "unknown-task",
        "task-class-missing",
        "unknown-key",
        "options-on-a-built-in-task",
    ],  # fmt: skip
)
def test_a_mistake_in_the_handler_is_one_line_naming_the_field(
    tmp_path: Path, handler: dict, source: str | None, extra: dict, field: str, message: str
) -> None:
    with pytest.raises(SpecError) as caught:
        load_spec(write(tmp_path, digits_entry(handler, **extra), source))

    expected = message.replace("{tmp}", str(tmp_path))
    assert str(caught.value) == f"digits 1.0: {field}: {expected}"
    assert (caught.value.model, caught.value.version, caught.value.field) == ("digits", "1.0", field)
