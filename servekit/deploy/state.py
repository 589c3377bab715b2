"""The deployment state: one record per model of what serves it, read and written only through this module.

    DeploymentState
      listen, upstream       where the proxy listens and what it forwards to (set when the proxy writes)
      models[NAME]: ModelState
        default              TorchServe's default version, as a servekit command last saw it
        versions             the registered versions, as last seen (``seen``: when, UTC)
        canary               Canary(version, percent): that share of /predictions/NAME through the proxy
        shadow               the version that gets a copy of every request through the proxy
    DeploymentStore.promotions(NAME)   the promotion stack that ``rollback`` pops, from the history
    DeploymentStore.record(...)        the history: who did what when (``servekit.deploy.history``)

Every workflow loads the state, changes it and saves it through ``DeploymentStore`` under the
``servekit`` state lock (``servekit.deploy.state_lock``); the nginx configuration is a pure rendering
of it (``servekit.deploy.proxy.render_config``). TorchServe stays the authority on what is registered
and which version is the default: the state records what the commands last saw, and the proxy
routes that only the state knows.

The file is ``state.json`` in the proxy directory (``var/proxy/state.json``), replaced whole:

    {"format": 2, "listen": "127.0.0.1:8090", "upstream": "127.0.0.1:8080",
     "routes": {"digits": {"canary": {"version": "2.0", "percent": 20}, "shadow": "2.0"}},
     "models": {"digits": {"default": "1.0", "versions": ["1.0", "2.0"], "seen": "2026-11-25T18:00:00+00:00"}}}

``routes`` keeps the layout of format 1 (what servekit wrote before there was one state: ``listen``,
``upstream`` and ``routes`` only), so an operator's existing file is read as it is: its routes stay
live, each model's default and versions are filled in by the next command that talks to TorchServe,
and the next save writes format 2. The history (``var/deployments.jsonl``) is kept as it was and
appended to; the promotion stack is folded from it on demand (``promotions_to_undo``), so rollback
and the audit log can never disagree.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servekit.deploy.history import History
from servekit.errors import ServekitError
from servekit.files import atomic_write_text
from servekit.serving.store import NAME_RE, VERSION_RE, version_key

FORMAT = 2
# host:port, or [IPv6]:port: the proxy's listen and upstream go into nginx.conf verbatim.
ADDRESS_RE = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}\Z")
REPAIR = "fix it, or remove it to start again from no routes (then servekit proxy stop and start)"


class StateError(ServekitError):
    """The deployment state file cannot be read, or a change to the state is not valid."""


@dataclass(frozen=True)
class Canary:
    version: str
    percent: int  # 1..100: 0 is no canary


@dataclass
class ModelState:
    """What serves one model: TorchServe's view as last seen, and the proxy's routes."""

    name: str
    default: str | None = None
    versions: tuple[str, ...] = ()
    seen: str | None = None
    canary: Canary | None = None
    shadow: str | None = None

    # ------------------------------------------------------------------ routes
    def routes_to(self, version: str) -> list[str]:
        """What the proxy sends to ``version``: e.g. ``["canary (20%)", "shadow"]``."""
        routes = []
        if self.canary is not None and self.canary.version == version:
            routes.append(f"canary ({self.canary.percent}%)")
        if self.shadow == version:
            routes.append("shadow")
        return routes

    def set_canary(self, version: str, percent: int) -> None:
        """``percent`` % of ``/predictions/NAME`` to ``version`` (0 removes the canary)."""
        if not 0 <= percent <= 100:
            raise StateError(f"--percent must be between 0 and 100, got {percent}")
        check_version(version)
        self.canary = Canary(version, percent) if percent > 0 else None

    def set_shadow(self, version: str | None) -> None:
        if version is not None:
            check_version(version)
        self.shadow = version

    def drop_routes(self, version: str) -> list[str]:
        """Remove every route to ``version``; the routes removed."""
        dropped = self.routes_to(version)
        if self.canary is not None and self.canary.version == version:
            self.canary = None
        if self.shadow == version:
            self.shadow = None
        return dropped

    # ------------------------------------------------------------------ TorchServe's view
    def observe(self, default: str | None, versions: list[str] | tuple[str, ...]) -> None:
        """Record the default and the registered versions as TorchServe reported them just now."""
        self.default = default
        self.versions = tuple(sorted(versions, key=version_key))
        self.seen = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")

    def promoted(self, version: str) -> bool:
        """``version`` became the default: a canary of it is complete, so its split goes. True if it did."""
        self.default = version
        if self.canary is not None and self.canary.version == version:
            self.canary = None
            return True
        return False

    def routes(self) -> dict:
        """This model's entry in ``routes`` (format 1's layout); empty when the proxy routes nothing special."""
        route: dict[str, Any] = {}
        if self.canary is not None:
            route["canary"] = {"version": self.canary.version, "percent": self.canary.percent}
        if self.shadow is not None:
            route["shadow"] = self.shadow
        return route

    def as_dict(self) -> dict:
        return {"default": self.default, "versions": list(self.versions), "seen": self.seen, **self.routes()}


@dataclass
class DeploymentState:
    """Every model's ``ModelState``, and where the proxy listens and forwards."""

    listen: str | None = None
    upstream: str | None = None
    models: dict[str, ModelState] = field(default_factory=dict)

    def model(self, name: str) -> ModelState:
        """The record of ``name``, created empty on first use."""
        check_name(name)
        return self.models.setdefault(name, ModelState(name))

    def routes(self) -> dict[str, dict]:
        return {name: route for name, model in sorted(self.models.items()) if (route := model.routes())}

    # ------------------------------------------------------------------ the file format
    def to_json(self) -> dict:
        data: dict[str, Any] = {"format": FORMAT}
        if self.listen is not None:
            data["listen"] = self.listen
        if self.upstream is not None:
            data["upstream"] = self.upstream
        data["routes"] = self.routes()
        data["models"] = {
            name: {"default": m.default, "versions": list(m.versions), "seen": m.seen}
            for name, m in sorted(self.models.items())
            if m.default is not None or m.versions
        }
        return data

    @classmethod
    def from_json(cls, data: object) -> DeploymentState:
        """The state in ``data`` (format 1 or 2); ``StateError`` saying what is wrong, for a file that is not."""
        problem = _problem(data)
        if problem is not None:
            raise StateError(problem)
        assert isinstance(data, dict)
        state = cls(listen=data.get("listen"), upstream=data.get("upstream"))
        for name, seen in (data.get("models") or {}).items():
            model = state.model(name)
            model.default, model.seen = seen.get("default"), seen.get("seen")
            model.versions = tuple(seen.get("versions", ()))
        for name, route in data.get("routes", {}).items():
            model = state.model(name)
            canary = route.get("canary")
            model.canary = Canary(canary["version"], canary["percent"]) if canary and canary["percent"] > 0 else None
            model.shadow = route.get("shadow")
        return state


def _problem(data: object) -> str | None:
    """Why ``data`` is not a deployment state, or None; a hand-edited or cut file must not reach nginx."""
    if not isinstance(data, dict):
        return "not a JSON object"
    if data.get("format", 1) not in (1, FORMAT):
        return f"format {data.get('format')!r} is not one this servekit reads (1 or {FORMAT})"
    if any(key in data and not isinstance(data[key], str) for key in ("listen", "upstream")):
        return "listen and upstream must be strings"
    if any(key in data and not ADDRESS_RE.match(data[key]) for key in ("listen", "upstream")):
        return "listen and upstream must be host:port addresses"
    routes, models = data.get("routes", {}), data.get("models", {})
    if not isinstance(routes, dict) or not all(isinstance(r, dict) for r in routes.values()):
        return "routes must map model names to objects"
    if not isinstance(models, dict) or not all(isinstance(m, dict) for m in models.values()):
        return "models must map model names to objects"
    for name in [*routes, *models]:
        if not NAME_RE.match(name):
            return f"bad model name {name!r}"
    for model, route in routes.items():
        canary, shadow = route.get("canary"), route.get("shadow")
        if canary is not None and not (
            isinstance(canary, dict) and _is_version(canary.get("version")) and canary.get("percent") in range(101)
        ):
            return f"{model}: canary must be {{version, percent 0-100}}"
        if shadow is not None and not _is_version(shadow):
            return f"{model}: shadow must be a version string"
    for model, seen in models.items():
        default, versions = seen.get("default"), seen.get("versions", [])
        if default is not None and not _is_version(default):
            return f"{model}: default must be a version string"
        if not isinstance(versions, list) or not all(_is_version(v) for v in versions):
            return f"{model}: versions must be a list of version strings"
    return None


def _is_version(value: object) -> bool:
    return isinstance(value, str) and VERSION_RE.match(value) is not None


def check_name(model: str) -> None:
    if not NAME_RE.match(model):
        raise StateError(f"bad model name {model!r}")


def check_version(version: str) -> None:
    if not VERSION_RE.match(version):
        raise StateError(f"bad version {version!r}")


def read_state(path: Path) -> DeploymentState:
    """The state in ``path``; an empty state when there is no file yet."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return DeploymentState()
    except UnicodeDecodeError as exc:
        raise StateError(f"proxy state {path} is corrupt ({exc}): {REPAIR}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StateError(f"proxy state {path} is corrupt ({exc}): {REPAIR}") from None
    try:
        return DeploymentState.from_json(data)
    except StateError as exc:
        raise StateError(f"proxy state {path} is invalid ({exc}): {REPAIR}") from None


def write_state(path: Path, state: DeploymentState) -> None:
    """Replace ``path`` with ``state`` in one step (readers see the old file or the new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(state.to_json(), indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------ the history
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


@dataclass
class DeploymentStore:
    """The state file and the history: the one way workflows read and change the deployment state.

    Callers that change it must hold the ``servekit`` state lock: ``load`` ... ``save`` is a
    read-modify-write of one file.
    """

    path: Path
    history: History

    def load(self) -> DeploymentState:
        return read_state(self.path)

    def save(self, state: DeploymentState) -> None:
        write_state(self.path, state)

    def record(self, action: str, model: str, **fields: Any) -> dict:
        """Append one event to the history; the event as written."""
        return self.history.append(action, model, **fields)

    def events(self, model: str | None = None) -> list[dict]:
        return self.history.events(model)

    def promotions(self, model: str) -> list[dict]:
        """``model``'s promotion stack, oldest first (see ``promotions_to_undo``)."""
        return promotions_to_undo(self.events(model))

    def describe(self, model: str | None = None) -> dict[str, dict]:
        """Each model's whole record: the state, its promotion stack, and its latest event."""
        state = self.load()
        events = self.events(model)
        names = [model] if model is not None else sorted({*state.models, *(e["model"] for e in events)})
        records = {}
        for name in names:
            own = [e for e in events if e["model"] == name]
            records[name] = {
                **(state.models.get(name) or ModelState(name)).as_dict(),
                "promotions": [
                    {"version": e["version"], "previous_default": e["previous_default"], "time": e.get("time")}
                    for e in promotions_to_undo(own)
                ],
                "last_event": own[-1] if own else None,
            }
        return records
