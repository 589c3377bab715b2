"""The rollout's settings: each from the command's flag, else the spec's ``rollout:`` section, else built in.

Settings (``Settings.resolve``): steps, step_seconds, max_error_rate, max_p99_ratio, min_requests,
max_wait_factor and max_drift each come from the command's flag, else the model's ``rollout:``
section of the spec (``servekit.build.spec.rollout_settings``: read when the rollout starts, never
built into an archive), else the built-in default (``BUILT_IN``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from servekit.deploy.rollout.judging import Thresholds
from servekit.deploy.workflows import DeployError

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
