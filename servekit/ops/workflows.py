"""Safe deployment workflows over TorchServe's management API.

TorchServe gives the primitives (register, scale, set-default, unregister); this module adds the
checks around them: archives are verified against the build manifest before registration, a
version is promoted only after its golden set answers correctly, the default's history is kept in
an append-only JSON-lines file so it can be rolled back, and tokens are read (and refreshed) from
TorchServe's key file. Every failure is a ``DeployError`` with a one-line message.
"""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

from servekit.ops.history import History
from servekit.ops.proxy import NginxProxy

if TYPE_CHECKING:
    from servekit.build.spec import ModelVersionSpec

__all__ = ["Deployer", "DeployError", "History", "TorchServeClient", "promotions_to_undo", "require_version", "status"]

# A version counts as idle once its job queue has stayed empty this long (see Deployer.wait_until_idle).
QUIET_S = 1.0


class DeployError(RuntimeError):
    """A deployment step failed or was refused; the message is one line for the user."""


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


@dataclass
class TorchServeClient:
    """Management and inference calls with tokens from ``key_file`` (refreshed when expired)."""

    management_url: str
    inference_url: str
    key_file: Path
    timeout: float = 120.0

    def _keys(self) -> dict[str, str]:
        try:
            data = json.loads(Path(self.key_file).read_text())
        except FileNotFoundError:
            raise DeployError(
                f"no TorchServe key file at {self.key_file} (is TorchServe running? --key-file)"
            ) from None
        except (OSError, json.JSONDecodeError) as exc:
            raise DeployError(f"cannot read TorchServe key file {self.key_file}: {exc}") from exc
        return {
            kind.lower(): entry["key"] for kind, entry in data.items() if isinstance(entry, dict) and "key" in entry
        }

    def _refresh(self, kind: str) -> None:
        api_key = self._keys().get("api")
        if not api_key:
            raise DeployError(f"token for {kind} refused and no API key in {self.key_file} to refresh it")
        response = self._send("GET", f"{self.management_url}/token?type={kind}", api_key)
        if response.status_code != 200:
            raise DeployError(f"refreshing the {kind} token failed: {response.status_code} {_one_line(response.text)}")

    def _send(self, method: str, url: str, token: str, **kwargs) -> requests.Response:
        headers = {**kwargs.pop("headers", {}), "Authorization": f"Bearer {token}"}
        try:
            return requests.request(method, url, headers=headers, timeout=self.timeout, **kwargs)
        except requests.ConnectionError:
            base = url.split("/", 3)[:3]
            raise DeployError(f"TorchServe is not reachable at {'/'.join(base)} (is it running?)") from None
        except requests.Timeout:
            raise DeployError(f"TorchServe did not answer {method} {url} within {self.timeout:.0f}s") from None

    def call(self, kind: str, method: str, path: str, **kwargs) -> requests.Response:
        """``kind`` is ``management`` or ``inference``; retries once after refreshing an expired token."""
        base = self.management_url if kind == "management" else self.inference_url
        response = self._send(method, base + path, self._keys()[kind], **kwargs)
        if response.status_code in (400, 401) and "Token Authorization failed" in response.text:
            self._refresh(kind)
            response = self._send(method, base + path, self._keys()[kind], **kwargs)
        return response

    def manage(self, method: str, path: str, ok: tuple[int, ...] = (200,), **kwargs) -> Any:
        response = self.call("management", method, path, **kwargs)
        if response.status_code not in ok:
            raise DeployError(f"TorchServe refused {method} {path}: {response.status_code} {_message(response)}")
        try:
            return response.json()
        except ValueError:
            return {}


def _message(response: requests.Response) -> str:
    try:
        body = response.json()
        return _one_line(body.get("message") or body.get("error") or body)
    except ValueError:
        return _one_line(response.text) or response.reason


# ------------------------------------------------------------------------------------------ state
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


def default_version(client: TorchServeClient, model: str) -> str:
    response = client.call("management", "GET", f"/models/{model}")
    if response.status_code == 404:
        raise DeployError(f"model {model!r} is not registered")
    if response.status_code != 200:
        raise DeployError(f"describing {model} failed: {response.status_code} {_message(response)}")
    return response.json()[0]["modelVersion"]


def versions(client: TorchServeClient, model: str) -> list[VersionState]:
    response = client.call("management", "GET", f"/models/{model}/all")
    if response.status_code == 404:
        raise DeployError(f"model {model!r} is not registered")
    described = response.json()
    default = default_version(client, model)
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
    models = client.manage("GET", "/models").get("models", [])
    return [state for model in models for state in versions(client, model["modelName"])]


def require_version(client: TorchServeClient, model: str, version: str) -> list[VersionState]:
    states = versions(client, model)
    if version not in {s.version for s in states}:
        known = ", ".join(s.version for s in states)
        raise DeployError(f"{model} has no registered version {version!r} (registered: {known})")
    return states


# ------------------------------------------------------------------------------------------ history
def promotions_to_undo(events: list[dict]) -> list[dict]:
    """The promotions not yet rolled back, oldest first: each ``promote`` pushes, each ``rollback`` pops.

    So ``rollback`` walks back through the promotions (a stack) and never re-promotes the version
    it just rolled back: after promote 2.0 (from 1.0) and promote 3.0 (from 2.0), rollbacks give
    2.0, then 1.0, then "nothing left to roll back".
    """
    stack: list[dict] = []
    for event in events:
        if event["action"] == "promote":
            stack.append(event)
        elif event["action"] == "rollback" and stack:
            stack.pop()
    return stack


# ------------------------------------------------------------------------------------------ workflows
@dataclass
class Deployer:
    """The workflows. State-changing ones must run under the ``servekit`` state lock (the CLI takes it).

    ``proxy`` is the nginx whose routes ``retire`` and ``scale`` respect; ``clock`` and ``sleep``
    are injectable so the drain wait can be tested without waiting.
    """

    client: TorchServeClient
    store: Path
    spec_path: Path
    history: History
    proxy: NginxProxy | None = None
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    def archive(self, model: str, version: str) -> Path:
        """The archive for ``model`` ``version``, verified against the build manifest's sha256."""
        from servekit.build.archive import read_manifest  # imports torch: only the commands that need it pay

        name = f"{model}_v{version}.mar"
        path = Path(self.store) / name
        if not path.is_file():
            raise DeployError(f"no archive {name} in {self.store} (run make archive)")
        record = read_manifest(Path(self.store))["archives"].get(name)
        if record is None:
            raise DeployError(f"{name} is not in {Path(self.store) / 'manifest.json'}: refusing an unbuilt archive")
        actual = _file_sha256(path)
        if actual != record["sha256"]:
            raise DeployError(
                f"sha256 mismatch for {name}: manifest {record['sha256'][:16]}..., file {actual[:16]}...; "
                "refusing to register a modified archive"
            )
        return path

    def spec(self, model: str, version: str) -> ModelVersionSpec | None:
        from servekit.build.spec import SpecError, load_spec  # imports torch (preprocessing): register only

        try:
            specs = load_spec(self.spec_path)
        except SpecError as exc:
            raise DeployError(f"spec: {exc}") from exc
        return next((s for s in specs if s.name == model and s.version == version), None)

    def register(self, model: str, version: str) -> dict:
        self.archive(model, version)
        params = {"url": f"{model}_v{version}.mar", "synchronous": "true"}
        spec = self.spec(model, version)
        if spec is not None:
            serving = spec.serving
            params |= {
                "initial_workers": max(1, serving.min_workers),
                "batch_size": serving.batch_size,
                "max_batch_delay": serving.max_batch_delay_ms,
                "response_timeout": serving.response_timeout_s,
            }
        existing = self.client.call("management", "GET", f"/models/{model}/{version}")
        if existing.status_code == 200:
            raise DeployError(f"{model} {version} is already registered")
        result = self.client.manage("POST", "/models", params=params)
        self.history.append("register", model, version=version)
        return result

    def scale(self, model: str, version: str, min_workers: int, max_workers: int, drain_timeout: float = 30.0) -> dict:
        """Set the worker range; refuses to leave the default or a routed version without workers.

        TorchServe stops a worker without draining it, so a scale-down first waits (at most
        ``drain_timeout`` s; 0 = do not wait) for the version's queue to stay empty.
        """
        if min_workers < 0 or max_workers < min_workers:
            raise DeployError(f"--min ({min_workers}) must be >= 0 and --max ({max_workers}) >= --min")
        target = _state_of(require_version(self.client, model, version), version)
        if min_workers == 0:
            self._refuse_zero_workers(target)
        if min_workers < len(target.workers):
            self.wait_until_idle(model, version, drain_timeout, "not scaled down")
        params = {"min_worker": min_workers, "max_worker": max_workers, "synchronous": "true"}
        result = self.client.manage("PUT", f"/models/{model}/{version}", params=params)
        self.history.append("scale", model, version=version, min_workers=min_workers, max_workers=max_workers)
        return result

    def _refuse_zero_workers(self, target: VersionState) -> None:
        model, version = target.model, target.version
        if target.default:
            raise DeployError(
                f"refusing to scale {model} {version} to 0 workers: it is the default version, so every request "
                f"to /predictions/{model} would get 503; promote another version first"
            )
        if routes := self._routes_to(model, version):
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
        states = require_version(self.client, model, version)
        if len(states) == 1:
            raise DeployError(f"refusing to retire {model} {version}: it is the last registered version")
        if _state_of(states, version).default:
            raise DeployError(f"refusing to retire {model} {version}: it is the default (promote another first)")
        routes = self._routes_to(model, version)
        if routes and not drop_routes:
            raise DeployError(
                f"refusing to retire {model} {version}: the proxy still sends it {' and '.join(routes)} traffic; "
                f"{_unroute_hint(model, version)}, or retire with --drop-routes"
            )
        if routes:
            assert self.proxy is not None  # routes come from it
            self.proxy.drop_routes(model, version, drain_timeout=drain_timeout)
            self.history.append("drop-routes", model, version=version, routes=routes)
        self.wait_until_idle(model, version, drain_timeout, "not retired")
        result = self.client.manage("DELETE", f"/models/{model}/{version}")
        self.history.append("retire", model, version=version)
        return result

    def _routes_to(self, model: str, version: str) -> list[str]:
        return self.proxy.routes_to(model, version) if self.proxy is not None else []

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

    def golden_check(self, model: str, version: str) -> list[dict]:
        """Send the archive's golden set to ``/predictions/model/version``; one result per input."""
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
            response = self.client.call("inference", "POST", f"/predictions/{model}/{version}", data=payload)
            got = None
            if response.status_code == 200:
                try:
                    got = response.json()["predictions"][0]["label"]
                except (ValueError, KeyError, IndexError):
                    got = None
            results.append(
                {"file": name, "expected": expected, "got": got, "status": response.status_code, "ok": got == expected}
            )
        return results

    def _golden_gate(self, action: str, model: str, version: str, current: str) -> int:
        """The golden set of ``version`` must be all correct before it becomes the default; the count checked."""
        results = self.golden_check(model, version)
        failed = [r for r in results if not r["ok"]]
        if failed:
            detail = ", ".join(f"{r['file']}: expected {r['expected']}, got {r['got']} ({r['status']})" for r in failed)
            self.history.append(f"{action}-refused", model, version=version, failed=len(failed), total=len(results))
            raise DeployError(
                f"golden set failed for {model} {version} ({len(failed)}/{len(results)}): {detail}; "
                f"default stays {current}"
            )
        return len(results)

    def promote(self, model: str, version: str) -> dict:
        states = require_version(self.client, model, version)
        previous = next(s.version for s in states if s.default)
        if previous == version:
            raise DeployError(f"{model} {version} is already the default")
        golden = self._golden_gate("promote", model, version, previous)
        self.client.manage("PUT", f"/models/{model}/{version}/set-default")
        return self.history.append("promote", model, version=version, previous_default=previous, golden=golden)

    def rollback(self, model: str) -> dict:
        """Undo the latest promotion not yet rolled back (see ``promotions_to_undo``), through the golden gate."""
        events = self.history.events(model)
        pending = promotions_to_undo(events)
        if not pending:
            raise DeployError(_nothing_to_roll_back(model, self.history.path, events))
        last = pending[-1]
        target, current = last["previous_default"], default_version(self.client, model)
        if current != last["version"]:
            raise DeployError(
                f"the default of {model} is {current}, not {last['version']} as the history's last promotion says: "
                "refusing to roll back over a change made outside this tool"
            )
        if target not in {s.version for s in versions(self.client, model)}:
            raise DeployError(
                f"cannot roll back {model} to {target}: it is no longer registered (servekit register {model} {target})"
            )
        golden = self._golden_gate("rollback", model, target, current)
        self.client.manage("PUT", f"/models/{model}/{target}/set-default")
        return self.history.append(
            "rollback", model, version=target, previous_default=current, undoes=last.get("time"), golden=golden
        )

    def compare(self, model: str, v1: str, v2: str, inputs: Path) -> dict:
        files = sorted(p for p in Path(inputs).iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DeployError(f"no input files in {inputs}")
        require_version(self.client, model, v1)
        require_version(self.client, model, v2)
        rows, latencies = [], {v1: [], v2: []}
        for path in files:
            payload, answers = path.read_bytes(), {}
            for version in (v1, v2):
                started = time.perf_counter()
                response = self.client.call("inference", "POST", f"/predictions/{model}/{version}", data=payload)
                latencies[version].append((time.perf_counter() - started) * 1000)
                answers[version] = response.json() if response.status_code == 200 else None
            top = {v: (a["predictions"][0] if a else None) for v, a in answers.items()}
            rows.append(
                {
                    "file": path.name,
                    v1: top[v1]["label"] if top[v1] else None,
                    v2: top[v2]["label"] if top[v2] else None,
                    "agree": bool(top[v1] and top[v2] and top[v1]["label"] == top[v2]["label"]),
                    "probability_diff": round(abs(top[v1]["probability"] - top[v2]["probability"]), 6)
                    if top[v1] and top[v2] and top[v1]["label"] == top[v2]["label"]
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
                v: {"p50": round(_median(latencies[v]), 2), "max": round(max(latencies[v]), 2)} for v in latencies
            },
            "rows": rows,
        }


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


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
