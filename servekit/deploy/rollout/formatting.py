"""Rollout events and status documents as lines for a person (``--json`` prints the documents themselves)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from servekit.deploy.rollout.settings import BUILT_IN
from servekit.deploy.rollout.status import position


def format_event(event: dict) -> str:
    """One human line per rollout event (``--json`` prints the event itself); the start has a second line."""
    action, model, version = event["action"], event["model"], event.get("version")
    if action == "rollout-start":
        steps = ",".join(str(s) for s in event["steps"])
        head = f"rollout {model} {version}: default {event['default']}, steps {steps}%, figures from {event['source']}"
        return f"{head}\nsettings: {_settings_line(event['settings'], event.get('settings_from') or {})}"
    if action == "rollout-step":
        canary, default = event["canary"], event["default"]
        ratio = f"{event['p99_ratio']:.2f}" if event["p99_ratio"] is not None else "n/a"
        line = (
            f"step {event['step']}/{event['of']} {event['percent']:>3}% ({event['window_s']:.0f}s): "
            f"canary {_side(canary)} | default {_side(default)} | error limit {event['error_limit']:.1%}, "
            f"p99 ratio {ratio}{_drift_text(event.get('drift'))} -> {event['verdict']}"
        )
        return line + (f": {event['reason']}" if event.get("reason") else "")
    if action == "rollout-done":
        golden = f"{event['golden']}/{event['golden']}"
        return f"promoted {model} {version} (golden set {golden}); previous default {event['previous_default']}"
    if action == "rollout-aborted":
        return f"aborted {model} {version}: {event['reason']} (canary removed: {str(event['canary_removed']).lower()})"
    return json.dumps(event, sort_keys=True)


def _side(figures: dict) -> str:
    latency = f"{figures['p99_ms']:g} ms" if figures["p99_ms"] is not None else "n/a"
    return f"{figures['requests']} req, {figures['error_rate']:.1%} errors, p99 {latency}"


def _drift_text(drift: dict | None) -> str:
    if not drift:
        return ""
    if not drift["judged"]:
        return f", class PSI not judged ({drift['predictions']} of {drift['min_samples']} predictions)"
    return f", class PSI {drift['psi']:.3f}"


def _settings_line(settings: Mapping[str, Any], origins: Mapping[str, str]) -> str:
    parts = []
    order = {name: i for i, name in enumerate(BUILT_IN)}  # the status file's keys come back sorted
    for name, value in sorted(settings.items(), key=lambda item: order.get(item[0], len(order))):
        shown = "off" if value is None else ",".join(map(str, value)) if isinstance(value, list) else f"{value:g}"
        parts.append(f"{name} {shown} ({origins.get(name, 'given')})")
    return ", ".join(parts)


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}min"
    return f"{seconds / 3600:.1f}h"


def _clock_time(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) if isinstance(epoch, int | float) else "?"


def format_status(status: Mapping[str, Any] | None, model: str, alive: bool, now: float | None = None) -> str:
    """``servekit rollout --status NAME`` for a person (``alive``: the recorded process still runs the rollout)."""
    if status is None:
        return f"no rollout of {model} has run"
    now = time.time() if now is None else now
    version, pid, state = status.get("version"), status.get("pid"), status.get("state")
    source = f"; figures from {status['source']}" if status.get("source") else ""
    lines = []
    if state == "running" and alive:
        since = status.get("step_started_at")
        where = position(status)
        if since is not None and status.get("phase") == "step":
            where += f" for {_ago(now - since)}"
        lines.append(f"rollout of {model} {version}: running (pid {pid}), {where}{source}")
    elif state == "running":
        lines.append(
            f"rollout of {model} {version}: not running: pid {pid} is no longer this rollout and it recorded no "
            f"outcome (killed?); it was at {position(status)} {_ago(now - status.get('updated_at', now))} ago: "
            f"check servekit state {model} for a canary left behind"
        )
    else:
        outcome = status.get("outcome") or {}
        ended = f"at {_clock_time(outcome.get('at'))}"
        process = f"pid {pid} still running" if alive else f"pid {pid} has ended"
        if state == "promoted":
            lines.append(f"rollout of {model} {version}: promoted {ended} ({process}); previous default "
                         f"{outcome.get('previous_default')}{source}")  # fmt: skip
        else:
            removed = "canary removed" if outcome.get("canary_removed") else "canary not removed by it"
            lines.append(f"rollout of {model} {version}: {state} {ended} ({process}): {outcome.get('reason')}; "
                         f"{removed}{source}")  # fmt: skip
    window = status.get("window")
    if state == "running" and window:
        ratio = f"{window['p99_ratio']:.2f}" if window.get("p99_ratio") is not None else "n/a"
        lines.append(
            f"  window {window['seconds']:.0f}s: canary {_side(window['canary'])} | default {_side(window['default'])}"
            f" | error limit {window['error_limit']:.1%}, p99 ratio {ratio}{_drift_text(window.get('drift'))}"
        )
    if status.get("read_error"):
        lines.append(f"  last read failed: {status['read_error']}")
    last = status.get("last_step")
    if last:
        lines.append(f"  last verdict: {format_event(last)}")
    if status.get("settings"):
        lines.append(f"  settings: {_settings_line(status['settings'], status.get('settings_from') or {})}")
    updated = _ago(now - status.get("updated_at", now))
    lines.append(f"  started {_clock_time(status.get('started_at'))}, updated {updated} ago")
    return "\n".join(lines)
