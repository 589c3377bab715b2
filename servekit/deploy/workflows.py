"""Safe deployment workflows over TorchServe's management API and the canary/shadow proxy.

TorchServe gives the primitives (register, scale, set-default, unregister); ``Deployer`` adds the
checks around them: archives are verified against the build manifest before registration and
registered with the serving settings they carry, a version becomes the default only after its
golden set answers correctly, the default and scale are never left without workers, and routed
versions are never retired behind the proxy's back. Each workflow reads and writes the one
deployment state (``servekit.deploy.state``: default, versions, canary, shadow, history) and asks the
proxy to re-render nginx only when a route changed. Every refusal is a ``DeployError`` with a
one-line message.
"""

from __future__ import annotations

import json
import statistics
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servekit.deploy.history import History
from servekit.deploy.proxy import NginxProxy
from servekit.deploy.state import DeploymentState, DeploymentStore
from servekit.errors import ServekitError
from servekit.serving.client import TorchServeClient
from servekit.serving.store import archive_name, verify_archive

__all__ = ["Deployer", "DeployError", "VersionState", "require_version", "serving_settings", "status", "versions"]

# A version counts as idle once its job queue has stayed empty this long (see Deployer.wait_until_idle).
QUIET_S = 1.0
# model-config.yaml keys (TorchServe's frontend settings) -> the registration parameter that sets each.
SERVING_PARAMS = {
    "minWorkers": "initial_workers",
    "batchSize": "batch_size",
    "maxBatchDelay": "max_batch_delay",
    "responseTimeout": "response_timeout",
    "startupTimeout": "startup_timeout",
}


class DeployError(ServekitError):
    """A deployment step failed or was refused; the message is one line for the user."""


# ------------------------------------------------------------------------------------------ TorchServe's view
@dataclass(frozen=True)
class VersionState:
    model: str
    version: str
    default: bool
    min_workers: int
    max_workers: int
    workers: tuple[dict, ...]
    pending: int
    batch_size: int

    def as_dict(self) -> dict:
        return {
            "model": self.model,
            "version": self.version,
            "default": self.default,
            "min_workers": self.min_workers,
            "max_workers": self.max_workers,
            "workers": [{"pid": w.get("pid"), "status": w.get("status")} for w in self.workers],
            "pending_requests": self.pending,
            "batch_size": self.batch_size,
        }


def versions(client: TorchServeClient, model: str) -> list[VersionState]:
    described = client.describe(model)
    default = client.default_version(model)
    return [
        VersionState(
            model=model,
            version=d["modelVersion"],
            default=d["modelVersion"] == default,
            min_workers=d.get("minWorkers", 0),
            max_workers=d.get("maxWorkers", 0),
            workers=tuple(d.get("workers", [])),
            pending=d.get("jobQueueStatus", {}).get("pendingRequests", 0),
            batch_size=d.get("batchSize", 1),
        )
        for d in described
    ]


def status(client: TorchServeClient) -> list[VersionState]:
    return [state for model in client.models() for state in versions(client, model)]


def require_version(client: TorchServeClient, model: str, version: str) -> list[VersionState]:
    states = versions(client, model)
    if version not in {s.version for s in states}:
        known = ", ".join(s.version for s in states)
        raise DeployError(f"{model} has no registered version {version!r} (registered: {known})")
    return states


def serving_settings(archive: Path) -> dict[str, int]:
    """The registration parameters for the serving settings in the archive's own ``model-config.yaml``.

    The build wrote them from the spec, so the archive alone says how it is served: no spec and no
    torch are needed to register it. At least one worker is asked for, whatever ``minWorkers`` says.
    """
    import yaml  # only register needs it

    try:
        with zipfile.ZipFile(archive) as mar:
            config = yaml.safe_load(mar.read("model-config.yaml")) or {}
    except KeyError:
        config = {}
    except (zipfile.BadZipFile, yaml.YAMLError, OSError) as exc:
        raise DeployError(f"cannot read the serving settings of {archive.name}: {exc}") from exc
    if not isinstance(config, dict):
        raise DeployError(f"{archive.name}: model-config.yaml is not a mapping")
    params = {}
    for key, param in SERVING_PARAMS.items():
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 10**9:
            raise DeployError(f"{archive.name}: model-config.yaml {key} must be a whole number >= 0, got {value!r}")
        params[param] = value
    params["initial_workers"] = max(1, params.get("initial_workers", 1))
    return params


# ------------------------------------------------------------------------------------------ workflows
@dataclass
class Deployer:
    """The workflows. State-changing ones must run under the ``servekit`` state lock (the CLI takes it).

    ``deployments`` is the deployment state and history; ``proxy`` the nginx that renders its routes
    (``None``: the state is saved and no nginx is configured). ``clock`` and ``sleep`` are
    injectable so the drain wait can be tested without waiting.
    """

    client: TorchServeClient
    store: Path
    deployments: DeploymentStore
    proxy: NginxProxy | None = None
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    @property
    def history(self) -> History:
        return self.deployments.history

    # ------------------------------------------------------------------ state
    def _observe(self, state: DeploymentState, model: str, version: str | None = None) -> list[VersionState]:
        """TorchServe's versions of ``model`` now (``version`` must be one), recorded in ``state`` as last seen."""
        states = versions(self.client, model) if version is None else require_version(self.client, model, version)
        default = next((s.version for s in states if s.default), None)
        state.model(model).observe(default, [s.version for s in states])
        return states

    def _save(self, state: DeploymentState, reroute: bool = False, drain_timeout: float = 10.0) -> None:
        """Save ``state``; through the proxy (nginx checked, reloaded, drained) when its routes changed."""
        if reroute and self.proxy is not None:
            self.proxy.apply(state, drain_timeout=drain_timeout)
        else:
            self.deployments.save(state)

    # ------------------------------------------------------------------ register, scale, retire
    def archive(self, model: str, version: str) -> Path:
        """The archive for ``model`` ``version``, verified against the build manifest's sha256."""
        return verify_archive(Path(self.store), archive_name(model, version))

    def register(self, model: str, version: str) -> dict:
        state = self.deployments.load()
        path = self.archive(model, version)
        params: dict[str, Any] = {"url": path.name, "synchronous": "true", **serving_settings(path)}
        existing = self.client.call("management", "GET", f"/models/{model}/{version}")
        if existing.status_code == 200:
            raise DeployError(f"{model} {version} is already registered")
        result = self.client.manage("POST", "/models", params=params)
        self.deployments.record("register", model, version=version)
        self._observe(state, model)
        self._save(state)
        return result

    def scale(self, model: str, version: str, min_workers: int, max_workers: int, drain_timeout: float = 30.0) -> dict:
        """Set the worker range; refuses to leave the default or a routed version without workers.

        TorchServe stops a worker without draining it, so a scale-down first waits (at most
        ``drain_timeout`` s; 0 = do not wait) for the version's queue to stay empty.
        """
        if min_workers < 0 or max_workers < min_workers:
            raise DeployError(f"--min ({min_workers}) must be >= 0 and --max ({max_workers}) >= --min")
        state = self.deployments.load()
        target = _state_of(self._observe(state, model, version), version)
        if min_workers == 0:
            self._refuse_zero_workers(target, state.model(model).routes_to(version))
        if min_workers < len(target.workers):
            self.wait_until_idle(model, version, drain_timeout, "not scaled down")
        params = {"min_worker": min_workers, "max_worker": max_workers, "synchronous": "true"}
        result = self.client.manage("PUT", f"/models/{model}/{version}", params=params)
        self.deployments.record("scale", model, version=version, min_workers=min_workers, max_workers=max_workers)
        self._save(state)
        return result

    @staticmethod
    def _refuse_zero_workers(target: VersionState, routes: list[str]) -> None:
        model, version = target.model, target.version
        if target.default:
            raise DeployError(
                f"refusing to scale {model} {version} to 0 workers: it is the default version, so every request "
                f"to /predictions/{model} would get 503; promote another version first"
            )
        if routes:
            raise DeployError(
                f"refusing to scale {model} {version} to 0 workers: the proxy sends it {' and '.join(routes)} "
                f"traffic, which would get 503; {_unroute_hint(model, version)}"
            )

    def retire(self, model: str, version: str, drop_routes: bool = False, drain_timeout: float = 30.0) -> dict:
        """Unregister a version that is neither the default, the last one, nor (unless ``drop_routes``) routed.

        With ``drop_routes`` the proxy's canary/shadow routes to it are removed first (nginx checked,
        reloaded, its old workers' requests finished); then its queue must stay empty for ``QUIET_S``
        within ``drain_timeout`` s, because TorchServe never answers requests still queued for a
        version it unregisters.
        """
        state = self.deployments.load()
        states = self._observe(state, model, version)
        if len(states) == 1:
            raise DeployError(f"refusing to retire {model} {version}: it is the last registered version")
        if _state_of(states, version).default:
            raise DeployError(f"refusing to retire {model} {version}: it is the default (promote another first)")
        record = state.model(model)
        routes = record.routes_to(version)
        if routes and not drop_routes:
            raise DeployError(
                f"refusing to retire {model} {version}: the proxy still sends it {' and '.join(routes)} traffic; "
                f"{_unroute_hint(model, version)}, or retire with --drop-routes"
            )
        if routes:
            record.drop_routes(version)
            self._save(state, reroute=True, drain_timeout=drain_timeout)
            self.deployments.record("drop-routes", model, version=version, routes=routes)
        self.wait_until_idle(model, version, drain_timeout, "not retired")
        result = self.client.manage("DELETE", f"/models/{model}/{version}")
        self.deployments.record("retire", model, version=version)
        record.observe(record.default, [v for v in record.versions if v != version])
        self._save(state)
        return result

    def wait_until_idle(self, model: str, version: str, timeout: float, refusal: str) -> None:
        """Return once the version's job queue has been empty for ``QUIET_S`` s in a row; refuse after ``timeout``.

        TorchServe reports queued requests only (``jobQueueStatus.pendingRequests``), not the batch a
        worker holds: a quiet queue means no request arrived for ``QUIET_S`` s, which a batch in
        progress has almost always finished within. ``timeout`` 0 skips the wait.
        """
        if timeout <= 0:
            return
        deadline = self.clock() + timeout
        quiet_since: float | None = None
        while True:
            pending, now = self._pending(model, version), self.clock()
            quiet_since = None if pending else (now if quiet_since is None else quiet_since)
            if quiet_since is not None and now - quiet_since >= QUIET_S:
                return
            if now >= deadline:
                raise DeployError(
                    f"{model} {version} still had queued requests ({pending} pending) after {timeout:g}s: "
                    f"{refusal}; retry when its traffic has stopped, or pass --drain-timeout 0 to go ahead "
                    "(TorchServe then fails the requests in flight)"
                )
            self.sleep(0.1)

    def _pending(self, model: str, version: str) -> int:
        described = self.client.manage("GET", f"/models/{model}/{version}")
        return int(described[0].get("jobQueueStatus", {}).get("pendingRequests", 0))

    # ------------------------------------------------------------------ promote, rollback
    def golden_check(self, model: str, version: str) -> list[dict]:
        """Send the archive's golden set to ``/predictions/model/version``; one result per input.

        Each file is the raw body (an image, or a JSON record sent as ``application/json``); the
        answer's label (``_top_label``) must be the expected one.
        """
        path = self.archive(model, version)
        with zipfile.ZipFile(path) as archive:
            try:
                entries = json.loads(archive.read("golden/golden.json"))
            except KeyError:
                raise DeployError(
                    f"{path.name} has no golden set (golden_set in the spec): refusing to make it the default"
                ) from None
            inputs = [(e["file"], e["label"], archive.read(f"golden/{e['file']}")) for e in entries]
        results = []
        for name, expected, payload in inputs:
            response = self.client.call(
                "inference", "POST", f"/predictions/{model}/{version}", data=payload, headers=_content_type(name)
            )
            results.append(
                {
                    "file": name,
                    "expected": expected,
                    "got": (got := _top_label(response)),
                    "status": response.status_code,
                    "ok": got == expected,
                }
            )
        return results

    def _golden_gate(self, action: str, model: str, version: str, current: str) -> int:
        """The golden set of ``version`` must be all correct before it becomes the default; the count checked."""
        results = self.golden_check(model, version)
        failed = [r for r in results if not r["ok"]]
        if failed:
            detail = ", ".join(f"{r['file']}: expected {r['expected']}, got {r['got']} ({r['status']})" for r in failed)
            self.deployments.record(f"{action}-refused", model, version=version, failed=len(failed), total=len(results))
            raise DeployError(
                f"golden set failed for {model} {version} ({len(failed)}/{len(results)}): {detail}; "
                f"default stays {current}"
            )
        return len(results)

    def promote(self, model: str, version: str) -> dict:
        """Golden set, then set-default (blue-green); a canary of ``version`` is complete and its split goes."""
        state = self.deployments.load()  # a damaged state stops us before the default changes, not after
        states = self._observe(state, model, version)
        previous = next(s.version for s in states if s.default)
        if previous == version:
            raise DeployError(f"{model} {version} is already the default")
        golden = self._golden_gate("promote", model, version, previous)
        self.client.manage("PUT", f"/models/{model}/{version}/set-default")
        event = self.deployments.record("promote", model, version=version, previous_default=previous, golden=golden)
        self._save(state, reroute=state.model(model).promoted(version))
        return event

    def rollback(self, model: str) -> dict:
        """Undo the latest promotion not yet rolled back (the history's promotion stack), through the golden gate."""
        state = self.deployments.load()
        events = self.deployments.events(model)
        pending = self.deployments.promotions(model)
        if not pending:
            raise DeployError(_nothing_to_roll_back(model, self.history.path, events))
        last = pending[-1]
        target, current = last["previous_default"], self.client.default_version(model)
        if current != last["version"]:
            raise DeployError(
                f"the default of {model} is {current}, not {last['version']} as the history's last promotion says: "
                "refusing to roll back over a change made outside this tool"
            )
        if target not in {s.version for s in self._observe(state, model)}:
            raise DeployError(
                f"cannot roll back {model} to {target}: it is no longer registered (servekit register {model} {target})"
            )
        golden = self._golden_gate("rollback", model, target, current)
        self.client.manage("PUT", f"/models/{model}/{target}/set-default")
        event = self.deployments.record(
            "rollback", model, version=target, previous_default=current, undoes=last.get("time"), golden=golden
        )
        state.model(model).default = target
        self._save(state)
        return event

    # ------------------------------------------------------------------ canary, shadow
    def canary(self, model: str, version: str, percent: int) -> dict:
        """``percent`` % of ``/predictions/model`` through the proxy to ``version``; 0 removes the split."""
        state = self.deployments.load()
        state.model(model).set_canary(version, percent)
        if percent > 0:
            self._observe(state, model, version)
        self._save(state, reroute=True)
        return self.deployments.record("canary", model, version=version, percent=percent)

    def shadow(self, model: str, version: str, on: bool = True) -> dict:
        """Mirror every ``/predictions/model`` request through the proxy to ``version`` (or stop)."""
        state = self.deployments.load()
        state.model(model).set_shadow(version if on else None)
        if on:
            self._observe(state, model, version)
        self._save(state, reroute=True)
        return self.deployments.record("shadow" if on else "shadow-off", model, version=version)

    # ------------------------------------------------------------------ compare
    def compare(self, model: str, v1: str, v2: str, inputs: Path) -> dict:
        files = sorted(p for p in Path(inputs).iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DeployError(f"no input files in {inputs}")
        require_version(self.client, model, v1)
        require_version(self.client, model, v2)
        rows, latencies = [], {v1: [], v2: []}
        for path in files:
            payload, top = path.read_bytes(), {}
            for version in (v1, v2):
                started = time.perf_counter()
                response = self.client.call(
                    "inference",
                    "POST",
                    f"/predictions/{model}/{version}",
                    data=payload,
                    headers=_content_type(path.name),
                )
                latencies[version].append((time.perf_counter() - started) * 1000)
                top[version] = response.json()["predictions"][0] if response.status_code == 200 else None
            same = bool(top[v1] and top[v2] and top[v1]["label"] == top[v2]["label"])
            rows.append(
                {
                    "file": path.name,
                    v1: top[v1]["label"] if top[v1] else None,
                    v2: top[v2]["label"] if top[v2] else None,
                    "agree": same,
                    "probability_diff": round(abs(top[v1]["probability"] - top[v2]["probability"]), 6)
                    if same
                    else None,
                }
            )
        diffs = [r["probability_diff"] for r in rows if r["probability_diff"] is not None]
        return {
            "model": model,
            "versions": [v1, v2],
            "inputs": len(rows),
            "agreement": round(sum(r["agree"] for r in rows) / len(rows), 4),
            "max_probability_diff": max(diffs, default=None),
            "mean_probability_diff": round(sum(diffs) / len(diffs), 6) if diffs else None,
            "latency_ms": {
                v: {"p50": round(statistics.median(latencies[v]), 2), "max": round(max(latencies[v]), 2)}
                for v in latencies
            },
            "rows": rows,
        }


def _content_type(file_name: str) -> dict[str, str]:
    """A golden file's ``Content-Type``: JSON files as JSON; other files (images) as TorchServe reads a raw body."""
    return {"Content-Type": "application/json"} if file_name.lower().endswith(".json") else {}


def _top_label(response: Any) -> str | None:
    """An answer's label: its top-level ``label`` if it has one (a detector's page read left to right),
    else its first prediction's (a classifier's top-1)."""
    if response.status_code != 200:
        return None
    try:
        body = response.json()
        label = body.get("label") if isinstance(body, dict) else None
        return label if isinstance(label, str) else body["predictions"][0]["label"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def _nothing_to_roll_back(model: str, path: Path, events: list[dict]) -> str:
    if any(e["action"] == "rollback" for e in events):
        return (
            f"no promotion of {model} left to roll back: every promotion in {path} has been rolled back "
            "(promote a version to change the default)"
        )
    return f"no promotion of {model} in {path}: nothing to roll back"


def _state_of(states: list[VersionState], version: str) -> VersionState:
    return next(s for s in states if s.version == version)


def _unroute_hint(model: str, version: str) -> str:
    return (
        f"remove the routes first (servekit canary {model} {version} --percent 0; "
        f"servekit shadow {model} {version} --off)"
    )
