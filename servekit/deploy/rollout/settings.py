"""The rollout's settings: each from the command's flag, else the spec's ``rollout:`` section, else built in.

Settings (``Settings.resolve``): steps, step_seconds, max_error_rate, max_p99_ratio, min_requests,
max_wait_factor and max_drift each come from the command's flag, else the model's ``rollout:``
section of the spec (``RolloutSpec``, read by ``rollout_settings`` when the rollout starts, never
built into an archive), else the built-in default (``BUILT_IN``).

The section is parsed and validated here, beside the settings it feeds; ``servekit.build.spec``
validates it with the rest of the spec through ``model_rollout`` (the build imports this module,
never the other way round), so an error reads the same from ``make archive`` and ``servekit rollout``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from servekit.deploy.rollout.judging import Thresholds
from servekit.deploy.workflows import DeployError
from servekit.errors import SpecError
from servekit.fields import check_keys, positive_int

DEFAULT_STEPS = (10, 25, 50, 100)
# Every setting and its built-in default, in the order they are shown; None: off.
BUILT_IN: dict[str, Any] = {
    "steps": DEFAULT_STEPS,
    "step_seconds": 30.0,
    "max_error_rate": 0.01,
    "max_p99_ratio": 1.5,
    "min_requests": 50,
    "max_wait_factor": 4.0,
    "max_drift": None,
}


def parse_steps(text: str) -> tuple[int, ...]:
    """``"10,25,50,100"`` -> ``(10, 25, 50, 100)``: whole percentages from 1 to 100, increasing."""
    try:
        steps = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise DeployError(
            f"--steps must be comma-separated whole percentages, e.g. 10,25,50,100; got {text!r}"
        ) from None
    if not steps or any(not 1 <= s <= 100 for s in steps) or list(steps) != sorted(set(steps)):
        raise DeployError(f"--steps must be increasing percentages from 1 to 100, e.g. 10,25,50,100; got {text!r}")
    return steps


@dataclass(frozen=True)
class Settings:
    """Every setting's value and where it came from: ``flag``, ``spec`` or ``default`` (``BUILT_IN``)."""

    values: Mapping[str, Any]
    origins: Mapping[str, str]

    @classmethod
    def resolve(cls, flags: Mapping[str, Any], spec: Mapping[str, Any] | None = None) -> Settings:
        """A flag (not None) wins over the spec's ``rollout:`` section (``RolloutSpec.given()``), then the default."""
        values, origins = {}, {}
        for name, default in BUILT_IN.items():
            for origin, given in (("flag", flags.get(name)), ("spec", (spec or {}).get(name))):
                if given is not None:
                    values[name], origins[name] = given, origin
                    break
            else:
                values[name], origins[name] = default, "default"
        values["steps"] = tuple(values["steps"])
        return cls(values, origins)

    def rollout_arguments(self) -> dict[str, Any]:
        """Keyword arguments of ``Rollout`` for these settings."""
        v = self.values
        return {
            "steps": v["steps"],
            "step_seconds": float(v["step_seconds"]),
            "thresholds": Thresholds(float(v["max_error_rate"]), float(v["max_p99_ratio"]), int(v["min_requests"])),
            "max_wait_factor": float(v["max_wait_factor"]),
            "max_drift": None if v["max_drift"] is None else float(v["max_drift"]),
            "origins": dict(self.origins),
        }


# ------------------------------------------------------------------------------------------ the spec's rollout: section
@dataclass(frozen=True)
class RolloutSpec:
    """A model's ``rollout:`` section: what ``servekit rollout`` holds its canaries to (``Settings``).

    Every field is optional (``None``: not set here); a command-line flag overrides it, and the
    built-in default applies when neither sets it. Model-level only, and not part of any archive:
    ``rollout_settings`` reads it when a rollout starts, so a changed threshold needs no rebuild.

        rollout: {steps: [10, 25, 50, 100], step_seconds: 30, max_error_rate: 0.01, max_p99_ratio: 1.5,
                  min_requests: 50, max_wait_factor: 4, max_drift: 0.2}
    """

    steps: tuple[int, ...] | None = None
    step_seconds: float | None = None
    max_error_rate: float | None = None
    max_p99_ratio: float | None = None
    min_requests: int | None = None
    max_wait_factor: float | None = None
    max_drift: float | None = None

    def __post_init__(self) -> None:
        if self.steps is not None:
            steps = self.steps
            valid = (
                isinstance(steps, list | tuple)
                and steps
                and all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= 100 for s in steps)
            )
            if not valid or list(steps) != sorted(set(steps)):
                raise ValueError(f"steps: must be a list of increasing whole percentages from 1 to 100, "
                                 f"e.g. [10, 25, 50, 100], got {steps!r}")  # fmt: skip
            object.__setattr__(self, "steps", tuple(steps))
        _rollout_number("step_seconds", self.step_seconds, "a number > 0", lambda v: v > 0)
        _rollout_number("max_error_rate", self.max_error_rate, "a number from 0 to 1", lambda v: 0 <= v <= 1)
        _rollout_number("max_p99_ratio", self.max_p99_ratio, "a number > 0", lambda v: v > 0)
        _rollout_number("max_wait_factor", self.max_wait_factor, "a number >= 1", lambda v: v >= 1)
        _rollout_number("max_drift", self.max_drift, "a number > 0 (a PSI)", lambda v: v > 0)
        if self.min_requests is not None:
            positive_int("min_requests", self.min_requests)

    @classmethod
    def from_dict(cls, data: Any) -> RolloutSpec:
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ValueError(f"must be a mapping ({', '.join(f.name for f in fields(cls))}), got {data!r}")
        check_keys(data, {f.name for f in fields(cls)}, "rollout")
        return cls(**data)

    def given(self) -> dict[str, Any]:
        """The settings this section sets (``None`` fields left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def _rollout_number(name: str, value: Any, what: str, ok) -> None:
    if value is None:
        return
    if not isinstance(value, int | float) or isinstance(value, bool) or value != value or not ok(value):
        raise ValueError(f"{name}: must be {what}, got {value!r}")


def model_rollout(name: str, data: Any) -> RolloutSpec:
    """``RolloutSpec.from_dict``, errors located as ``MODEL: rollout.FIELD: ...`` (``parse_spec`` uses it too)."""
    try:
        return RolloutSpec.from_dict(data)
    except (ValueError, TypeError) as exc:
        head, sep, tail = str(exc).partition(": ")
        if sep and " " not in head:
            raise SpecError(tail, name, None, f"rollout.{head}") from None
        raise SpecError(str(exc), name, None, "rollout") from None


def rollout_settings(path: str | Path, model: str) -> RolloutSpec:
    """``model``'s ``rollout:`` section in the spec at ``path``, validated (empty when it has none).

    Reads only that section (no version is resolved, no weights looked at): a rollout starts from
    what the spec says now, whatever the archives were built from.
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SpecError(f"{path} is not a valid YAML spec: {' '.join(str(exc).split())}") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise SpecError(f"{path}: the spec needs a 'models:' mapping at the top level")
    entry = models.get(model)
    if not isinstance(entry, dict):
        return RolloutSpec()
    return model_rollout(model, entry.get("rollout"))
