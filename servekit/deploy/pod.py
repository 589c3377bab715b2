"""A pod's entrypoint: TorchServe, its OIP front and the routing proxy, in the foreground.

    python -m servekit.deploy.pod --config C --model-store S --workdir W --bind 0.0.0.0 \\
        --http-port 8080 --routing /home/model-server/routing/routing.json [the server's run flags]

The same routing plane as on one host (``servekit.deploy.proxy``) runs inside every pod, so a
canary or a shadow applies to each protocol a pod serves: ``/predictions`` on ``--http-port`` (the
proxy's port, the Service's ``http``), OIP HTTP and KServe v1 on the front, and OIP gRPC through the
front; the front reaches the proxy through its private socket, as on one host. TorchServe's own
inference listener stays on 127.0.0.1 (``inference_address`` in the bundle's config.properties).

The routes come from ``--routing``: a JSON file in the deployment state's ``routes`` form,

    {"routes": {"digits": {"canary": {"version": "2.0", "percent": 30}, "shadow": "2.0"}}}

the ``routing.json`` key of the ``servekit-routing`` ConfigMap on Kubernetes (``servekit bundle``
writes it from the deployment state; ``servekit pod-routes`` writes a changed one), and no file
means no routes (KServe's form: KServe splits the traffic between revisions itself). Every route
must name a model and a version this pod serves (the config's ``model_snapshot``). The file is read
once a second: a change is checked, rendered, checked by ``nginx -t`` and applied by a reload, with
one log line saying what now routes where; a change that fails any check is refused with one line
and the pod keeps the routes it has. At start a file that fails the checks stops the pod with one
line (exit 2), so a bad ConfigMap shows as a pod that does not start, never as traffic sent to a
version the pod lacks.

The proxy starts before TorchServe, so it listens before the readiness probe can pass (until
TorchServe answers, it answers 502). On SIGTERM the pod drains as ``servekit.serving.server run``
does; then the proxy stops gracefully (requests in flight finish), then TorchServe.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from servekit.deploy.proxy import NginxProxy, ProxyError
from servekit.deploy.state import DeploymentState, StateError, write_state
from servekit.errors import ServekitError, one_line
from servekit.serving.router import router_address
from servekit.serving.server import (
    ADDRESS_KEYS,
    ServerError,
    add_run_arguments,
    read_properties,
    run_server,
    serve_in_foreground,
)
from servekit.serving.tracing import CONFIG_KEY as OTLP_CONFIG_KEY

__all__ = ["PodRouting", "RoutingError", "main", "read_routes", "served_versions"]

POLL_S = 1.0  # how often the routing file is read


class RoutingError(ServekitError):
    """A routing file this pod cannot apply; the message says why."""

    exit_code = 2


def served_versions(config: Path) -> dict[str, set[str]]:
    """Every model and version that the pod's configuration registers (its ``model_snapshot``)."""
    try:
        snapshot = json.loads(read_properties(Path(config)).get("model_snapshot", "{}"))
        return {name: set(versions) for name, versions in (snapshot.get("models") or {}).items()}
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise RoutingError(f"{config}: no readable model_snapshot ({one_line(str(exc))})") from None


def read_routes(raw: bytes, served: dict[str, set[str]], source: Path) -> DeploymentState:
    """The routes in ``raw`` (a routing file's bytes; empty: none), checked against what the pod serves."""
    try:
        data = json.loads(raw) if raw.strip() else {}
    except ValueError as exc:
        raise RoutingError(f"{source}: not JSON ({one_line(str(exc))})") from None
    if not isinstance(data, dict) or set(data) - {"routes"}:
        raise RoutingError(f'{source}: expected {{"routes": {{MODEL: {{"canary": ..., "shadow": ...}}}}}}')
    try:
        state = DeploymentState.from_json({"routes": data.get("routes", {})})
    except StateError as exc:
        raise RoutingError(f"{source}: {exc}") from None
    for name, model in sorted(state.models.items()):
        wanted = [v for v in (model.canary.version if model.canary else None, model.shadow) if v is not None]
        if name not in served:
            raise RoutingError(f"{source}: routes {name}, which this pod does not serve ({', '.join(sorted(served))})")
        missing = sorted(set(wanted) - served[name])
        if missing:
            raise RoutingError(
                f"{source}: routes {name} to {', '.join(missing)}, which this pod does not serve "
                f"(it serves {name} {', '.join(sorted(served[name]))})"
            )
    return state


def describe(state: DeploymentState) -> str:
    """What routes where, e.g. ``digits: canary 2.0 (30%), shadow 2.0``."""
    routes = []
    for name, model in sorted(state.models.items()):
        parts = [f"canary {model.canary.version} ({model.canary.percent}%)"] if model.canary else []
        parts += [f"shadow {model.shadow}"] if model.shadow else []
        if parts:
            routes.append(f"{name}: {', '.join(parts)}")
    return "; ".join(routes) if routes else "no routes (every request goes to its model's default version)"


@dataclass
class PodRouting:
    """The pod's proxy and the routing file it follows (see the module docstring)."""

    proxy: NginxProxy
    listen: str  # the proxy's address: the pod's http port
    source: Path | None  # None: no routing file (KServe's form), the proxy passes everything on
    served: dict[str, set[str]]
    applied: bytes | None = None  # the file's bytes the proxy runs with
    refused: bytes | None = None  # the last bytes refused (said once)
    said: list[str] = field(default_factory=list)

    def read(self) -> bytes:
        if self.source is None:
            return b""
        try:
            return self.source.read_bytes()
        except FileNotFoundError:
            return b""
        except OSError as exc:
            raise RoutingError(f"{self.source}: unreadable ({one_line(str(exc))})") from None

    def routes(self, raw: bytes) -> DeploymentState:
        """``raw``'s routes, checked, with the proxy's address and upstream."""
        state = read_routes(raw, self.served, self.source or Path("-"))
        state.listen, state.upstream = self.listen, self.proxy.upstream
        return state

    def start(self) -> None:
        """Start the proxy with the file's routes; a file that fails the checks stops the start."""
        raw = self.read()
        state = self.routes(raw)
        self.proxy.prefix.mkdir(parents=True, exist_ok=True)
        write_state(self.proxy.state_file, state)  # a pod starts from its routing file, never a leftover state
        self.proxy.start()
        self.applied = raw
        self.say(f"routing: {describe(state)}")

    def poll(self) -> None:
        """Apply a changed routing file, or refuse it with one line; the proxy must still run."""
        if self.proxy.running_pid() is None:
            raise ServerError(f"the pod's routing proxy (nginx under {self.proxy.prefix}) exited")
        try:
            raw = self.read()
        except RoutingError as exc:
            self.refuse(b"\0unreadable", exc)
            return
        if raw in (self.applied, self.refused):
            return
        try:
            state = self.routes(raw)
            self.proxy.apply(state)
        except (RoutingError, ProxyError) as exc:
            self.refuse(raw, exc)
            return
        self.applied, self.refused = raw, None
        self.say(f"routing: now {describe(state)}")

    def refuse(self, raw: bytes, exc: Exception) -> None:
        if raw != self.refused:
            self.refused = raw
            self.say(f"routing: change refused, the routes stay as they were: {one_line(str(exc))}")

    def say(self, line: str) -> None:
        self.said.append(line)
        print(line, flush=True)


class Ticker:
    """Calls ``routing.poll`` at most every ``POLL_S`` seconds (the server's loop ticks faster)."""

    def __init__(self, routing: PodRouting) -> None:
        self.routing, self.next = routing, 0.0

    def __call__(self) -> None:
        now = time.monotonic()
        if now >= self.next:
            self.next = now + POLL_S
            self.routing.poll()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A servekit pod: TorchServe, its OIP front and the routing proxy.")
    add_run_arguments(parser)
    parser.add_argument("--http-port", type=int, default=8080, help="the routing proxy's port (/predictions)")
    parser.add_argument("--routing", help="the routes' JSON file (a ConfigMap's key); absent file: no routes")
    args = parser.parse_args(argv)
    try:
        props = read_properties(Path(args.config))
        inference = props.get(ADDRESS_KEYS["inference"], "")
        if not inference.startswith("http://127.0.0.1:"):
            raise RoutingError(
                f"{args.config}: inference_address must be on 127.0.0.1, behind the routing proxy, not {inference!r}"
            )
        # With the deployment's trace export on, the proxy is a hop with its own spans, as on one host.
        proxy = NginxProxy(Path(args.workdir).resolve() / "proxy", args.http_port, inference.removeprefix("http://"),
                           otlp_endpoint=props.get(OTLP_CONFIG_KEY) or None)  # fmt: skip
        source = Path(args.routing) if args.routing else None
        routing = PodRouting(proxy, f"{args.bind}:{args.http_port}", source, served_versions(Path(args.config)))
        routing.routes(routing.read())  # a bad routing file stops the pod before TorchServe starts
        server = run_server(args, loopback=("inference",), router=router_address(proxy.prefix))
        return serve_in_foreground(server, args.drain_timeout, before_start=routing.start, tick=Ticker(routing),
                                   drained=proxy.stop)  # fmt: skip
    except ServekitError as exc:
        print(f"pod: error: {one_line(str(exc))}", file=sys.stderr, flush=True)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
