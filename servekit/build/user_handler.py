"""The user's own handler, and the user's own task, as the spec names them.

    handler: image_classifier                                   # a built-in task and its handler
    handler: {file: my_handler.py, class: MyHandler}            # your handler over a built-in task
    handler: {file: my_handler.py, class: MyHandler, task: image_classifier, options: {...}}
    handler: {file: text_handler.py, class: TextClassifier,     # your handler and your own task
              task: {file: text_task.py, class: TextTask}}

The handler is a subclass of ``handlers.base.BatchHandler`` (directly, or of a built-in task's
handler such as ``handlers.image_classifier.ImageClassifier`` to change only its pre- or
post-processing), in a file that defines exactly one class (TorchServe's rule for an entry point).
The file becomes the archive's entry point beside the ``handlers`` package, so its imports of
``handlers.*`` work in the worker; its content is part of the version's fingerprint. ``options``
(any mapping of plain values) reach the worker as ``self.options``.

The task says how the build trains, converts, exports and measures the version (``servekit.build.
tasks.Task``). Without ``task`` it is the built-in task whose handler the class subclasses. A task of
your own is a ``Task`` subclass in its own file: its data sets, model, metric, reduced precision,
handler config (a ``handlers.config.RuntimeConfig`` subclass) and archive files; its settings come
from the spec's ``options:`` section (``Task.parse_options``), and its ``handler`` attribute names it
in logs and the manifest.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servekit.build.user_model import ModelSourceError, _check_kwargs, _one_line
from servekit.build.user_model import import_user_file as _import_file

_TASK_CACHE: dict[tuple[str, str], Any] = {}


def _own_classes(module) -> list[type]:
    return [v for v in vars(module).values() if inspect.isclass(v) and v.__module__ == module.__name__]


def _file(value: dict, base_dir: Path, field_name: str, example: str) -> Path:
    for key in ("file", "class"):
        if not isinstance(value.get(key), str) or not value[key]:
            raise ModelSourceError(f"{field_name}.{key}: is required ({field_name}: {example})")
    path = (base_dir / value["file"]).resolve()
    if not path.is_file():
        raise ModelSourceError(f"{field_name}.file: file not found: {path}")
    if path.suffix != ".py":
        raise ModelSourceError(f"{field_name}.file: {path} is not a Python file (.py)")
    return path


@dataclass(frozen=True)
class UserTask:
    """``task: {file, class}``: the user's ``servekit.build.tasks.Task`` subclass."""

    file: str
    class_name: str
    sha256: str

    def to_dict(self) -> dict:
        return {"file": Path(self.file).name, "class": self.class_name, "sha256": self.sha256}

    def instance(self) -> Any:
        key = (self.sha256, self.class_name)
        if key not in _TASK_CACHE:
            from servekit.build.tasks import Task

            module = _import_file(Path(self.file), "servekit_user_task", "handler.task")
            cls = getattr(module, self.class_name, None)
            if not (inspect.isclass(cls) and issubclass(cls, Task)):
                found = ", ".join(sorted(c.__name__ for c in _own_classes(module) if issubclass(c, Task))) or "none"
                raise ModelSourceError(f"handler.task.class: {Path(self.file).name} has no Task subclass "
                                       f"{self.class_name!r} (its Task classes: {found})")  # fmt: skip
            try:
                task = cls()
            except Exception as exc:  # noqa: BLE001 - the user's constructor
                raise ModelSourceError(f"handler.task.class: {self.class_name}() failed: {_one_line(exc)}") from None
            if not task.handler or not task.metric:
                raise ModelSourceError(f"handler.task.class: {self.class_name} must set handler (its name) and metric")
            _TASK_CACHE[key] = task
        return _TASK_CACHE[key]


@dataclass(frozen=True)
class UserHandler:
    """``handler: {file, class, task?, options?}``: the user's handler class and the task it serves."""

    file: str
    class_name: str
    sha256: str
    task_name: str | None = None  # a built-in task
    task: UserTask | None = None  # or the user's own
    options: dict = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict:
        data: dict[str, Any] = {"file": Path(self.file).name, "class": self.class_name, "sha256": self.sha256}
        data["task"] = self.task.to_dict() if self.task is not None else self.task_name
        if self.options:
            data["options"] = self.options
        return data


def builtin_task_of(cls: type) -> str | None:
    """The built-in task whose handler ``cls`` subclasses, if any."""
    from servekit.build.tasks import TASKS, task_for

    for name in TASKS:
        module = importlib.import_module(Path(task_for(name).handler_file).with_suffix("").as_posix().replace("/", "."))
        if any(issubclass(cls, base) for base in _own_classes(module)):
            return name
    return None


def parse_handler(value: dict, base_dir: Path) -> UserHandler:
    """Check ``handler: {file, class, task, options}``: the file defines exactly one class, a BatchHandler."""
    from handlers.base import BatchHandler
    from servekit.build.tasks import TASKS

    unknown = sorted(set(value) - {"file", "class", "task", "options"})
    if unknown:
        raise ModelSourceError(f"handler.{unknown[0]}: unknown key (valid: file, class, task, options)")
    path = _file(value, base_dir, "handler", "{file: my_handler.py, class: MyHandler}")
    module = _import_file(path, "servekit_user_handler", "handler.file")
    own = _own_classes(module)
    cls = getattr(module, value["class"], None)
    if cls is None or cls not in own:
        names = ", ".join(c.__name__ for c in own) or "none"
        raise ModelSourceError(f"handler.class: {path.name} defines no class {value['class']!r} (its classes: {names})")
    if len(own) != 1:
        names = ", ".join(c.__name__ for c in own)
        raise ModelSourceError(
            f"handler.file: {path.name} defines {len(own)} classes ({names}); TorchServe loads an entry point "
            "that defines exactly one: move the others to a module it imports"
        )
    if not issubclass(cls, BatchHandler):
        raise ModelSourceError(f"handler.class: {value['class']} does not subclass handlers.base.BatchHandler "
                               "(or a built-in task's handler)")  # fmt: skip
    options = _check_kwargs(value.get("options"), "handler.options")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    task = value.get("task")
    if isinstance(task, dict):
        unknown = sorted(set(task) - {"file", "class"})
        if unknown:
            raise ModelSourceError(f"handler.task.{unknown[0]}: unknown key (valid: file, class)")
        task_path = _file(task, base_dir, "handler.task", "{file: my_task.py, class: MyTask}")
        user_task = UserTask(str(task_path), task["class"], hashlib.sha256(task_path.read_bytes()).hexdigest())
        user_task.instance()  # imported and checked now: one line for a missing class
        return UserHandler(str(path), value["class"], digest, None, user_task, options)
    if task is None:
        task = builtin_task_of(cls)
        if task is None:
            raise ModelSourceError(f"handler.task: {value['class']} subclasses no built-in task's handler: name the "
                                   f"task ({', '.join(sorted(TASKS))}) or your own {{file, class}}")  # fmt: skip
    if task not in TASKS:
        raise ModelSourceError(f"handler.task: unknown task {task!r} (built-in: {sorted(TASKS)}, or {{file, class}})")
    return UserHandler(str(path), value["class"], digest, task, None, options)
