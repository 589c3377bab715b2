"""A real nginx in front of TorchServe for canary and shadow traffic, configured from the deployment state.

The proxy is the one routing plane of every protocol. ``render_config`` is a pure function of the
deployment state (``servekit.deploy.state``): where the proxy listens, what it forwards to, and each
model's canary and shadow, applied alike to each inference path of the model (``ROUTED_PATHS``):
``/predictions/NAME``, OIP ``/v2/models/NAME/infer`` and KServe v1 ``/v1/models/NAME:predict``. The
OIP front sends its inference through the proxy, and the gRPC gateway through the front
(``servekit.serving.oip_service``, ``router``), so OIP HTTP, KServe v1 and gRPC clients obey it too:

* canary: ``split_clients`` on ``$request_id`` sends P % of each path to ``/predictions/NAME/CANARY``
  (the handler tells the protocols apart by the body, on any route) and the rest keeps its path
  (TorchServe's default version, so a later ``set-default`` needs no proxy change);
* shadow: ``mirror`` sends a copy of every request to ``/predictions/NAME/SHADOW``; its answers are
  discarded, clients only ever see the served version's;
* explanations (``/explanations/NAME``, OIP ``/v2/models/NAME/explain``, KServe v1
  ``/v1/models/NAME:explain``: ``EXPLAINED_PATHS``) follow the same split, the canary's share to
  ``/explanations/NAME/CANARY``, so an explanation comes from the version a prediction would; a shadow
  gets no copies of them (an explanation costs tens of inferences and a shadow compares predictions),
  and the rollout does not count them (their latency is not a prediction's);
* explicit versions (``/predictions/NAME/V``, ``/v2/models/NAME/versions/V/infer``) pass untouched.

Every answer of a servekit handler names the version that served it (``X-Model-Version``, and
``model_version`` / ``version`` in the body).

Every request the proxy serves is logged as one JSON line in ``requests.jsonl`` under the prefix
(``log_format ... escape=json``): ``msec`` (epoch seconds), ``uri``, ``status``,
``request_time`` (seconds), ``target``, the version the split sent it to (``"/2.0"``; empty: the
default) and ``served``, the version that answered (its ``X-Model-Version``). ``servekit.deploy.rollout``
reads it to compare a canary with the default, every protocol together.

With span export on (``NginxProxy.otlp_endpoint``; ``servekit proxy start`` takes config.properties'
``servekit_otlp_endpoint`` or ``--otlp-endpoint``) the proxy is a hop with a span of its own, as the
OIP front is (``servekit.serving.tracing``): the incoming ``traceparent``'s span is its parent, its own
span ID (the last 16 digits of its ``$request_id``) goes on as the parent to TorchServe and to a
shadow's mirrored copy, and every request it routes to TorchServe (prediction, explanation and
explicit-version paths, ``location /``) is one JSON line in ``spans.jsonl`` under the prefix, with
``target`` and ``served`` as in the request log. A span shipper (``servekit.serving.span_shipper``)
started and stopped with nginx exports those lines as ``proxy`` spans (service ``servekit-proxy``). The
proxy records the endpoint it was started with (``SPANS_FILE``), so ``apply`` (``servekit canary``,
``shadow``) renders the same hop whoever calls it. Without span export the proxy passes the incoming
``traceparent`` through untouched, writes no span log and imports nothing of OpenTelemetry.

The OIP front reaches the proxy through a Unix socket in a folder only this user can write
(``servekit.serving.router``), never through its TCP port, which another local program could hold
while the proxy is stopped and so receive the front's requests, inference tokens included.

``NginxProxy.apply`` installs the rendering of a changed state (checked with ``nginx -t`` first: a
configuration that fails the check is never installed), then the state, then reloads nginx; both
files are replaced whole (``servekit.serving.nginx``). The proxy listens on its own loopback port and
passes TorchServe's ``Authorization`` header through.

nginx cannot rotate a log by size, so ``NginxProxy.start`` also starts a log keeper
(``servekit.serving.logkeeper``) and ``stop`` stops it: ``requests.jsonl``, ``error.log`` and
``access.log`` (and ``spans.jsonl`` with span export on) are each rotated past ``log_max_bytes``
(``FILE.1`` ... ``FILE.<log_keep>``) and nginx opens them anew (``SIGHUP`` to its checked master: a
reload, see there why not ``SIGUSR1``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from servekit.deploy.state import DeploymentState, StateError, read_state, write_state
from servekit.serving.logkeeper import (
    DEFAULT_INTERVAL,
    DEFAULT_KEEP,
    DEFAULT_MAX_BYTES,
    LogKeeperError,
    LogKeeperProcess,
)
from servekit.serving.nginx import NginxError, NginxInstance, config_head
from servekit.serving.router import private_socket_dir, remove_stale_socket, router_socket
from servekit.serving.span_shipper import SpanShipperError, SpanShipperProcess
from servekit.serving.tracing import PROXY_HOP, SPAN_LOG, span_context_maps, span_log_format

__all__ = ["EXPLAINED_PATHS", "REQUEST_LOG", "SPAN_LOG", "NginxProxy", "ProxyError", "render_config"]

REQUEST_LOG = "requests.jsonl"
# The header every answer of a servekit handler carries: the version that answered (``handlers.base``).
VERSION_HEADER = "X-Model-Version"
# One JSON object per request; ``target`` is what the canary split chose ("" = TorchServe's default),
# ``served`` the version that answered (the handler's X-Model-Version; "" when no handler answered). The log's
# variable has a prefix of its own: ``servekit_`` + a model's name is that model's split (a model named ``target``).
LOG_FORMAT = (
    "    log_format servekit_json escape=json\n"
    '        \'{"msec":$msec,"uri":"$uri","status":$status,"request_time":$request_time,'
    '"target":"$servekitlog_target","served":"$upstream_http_x_model_version"}\';\n'
)


# Span export on (servekit.serving.tracing): the proxy's own span. Its variables' prefix is no model's split,
# route or explanation variable (``servekit_``, ``servekitroute_``, ``servekitexplain_`` + the model's name).
SPAN_VAR = "servekitspan"
SPAN_CONTEXT_MAPS = span_context_maps(SPAN_VAR)
# One JSON line per request routed to TorchServe, with the versions of the request log: the fields the shipper turns
# into PROXY_HOP's attributes (a field it names and nothing here logs fails at import).
_VERSIONS = {"target": "$servekitlog_target", "served": "$upstream_http_x_model_version"}
SPAN_LOG_FORMAT = span_log_format("servekit_spans", SPAN_VAR, {key: _VERSIONS[key] for key, _ in PROXY_HOP.versions})
SPAN_HEADER = f"proxy_set_header traceparent ${SPAN_VAR}_traceparent;  # the proxy's span: the next hop's parent\n"
# Where a running proxy records the collector it was started with: ``apply`` (``servekit canary``, ``shadow``)
# renders the same hop as the proxy's start did, whoever calls it.
SPANS_FILE = "otlp-endpoint"


class ProxyError(NginxError):
    """The proxy could not be configured, checked, started or reloaded."""


def _variable(model: str) -> str:
    return "servekit_" + re.sub(r"[^A-Za-z0-9_]", "_", model)


def _route_variable(model: str) -> str:
    """The canary route's variable; never another model's split variable (those all start ``servekit_``)."""
    return "servekitroute_" + re.sub(r"[^A-Za-z0-9_]", "_", model)


# The inference routes of every protocol the proxy routes: (name in the log, the path for model NAME).
# A canary's share of each goes to ``/predictions/NAME/VERSION``, where the same handler answers every
# protocol (it tells them apart by the body: ``handlers.protocols.read_envelope``); the rest keeps its path.
ROUTED_PATHS = (
    ("native", "/predictions/{name}"),
    ("oip_v2", "/v2/models/{name}/infer"),
    ("kserve_v1", "/v1/models/{name}:predict"),
)


# Explanation routes of every protocol: the canary's share goes to ``/explanations/NAME/VERSION`` (the handler
# reads the protocol from the body there too); never mirrored, never in the rollout's figures.
EXPLAINED_PATHS = (
    ("native", "/explanations/{name}"),
    ("oip_v2", "/v2/models/{name}/explain"),
    ("kserve_v1", "/v1/models/{name}:explain"),
)


def _explain_variable(model: str) -> str:
    """The canary's explanation route (its own prefix: never a split or prediction route variable)."""
    return "servekitexplain_" + re.sub(r"[^A-Za-z0-9_]", "_", model)


def _explained_locations(name: str, split: str) -> str:
    """The exact locations of ``name``'s explanation paths, split like its predictions (``split``: the variable)."""
    return "".join(
        f"        location = {form.format(name=name)} {{\n"
        f"            set $servekitlog_target {split};\n"
        f"            proxy_pass http://torchserve${_explain_variable(name)};\n"
        "        }\n"
        for _protocol, form in EXPLAINED_PATHS
    )


def _routed_locations(name: str, split: str | None, shadow: bool) -> str:
    """The exact locations of ``name``'s inference paths: the canary split (``split``: its variable), the mirror."""
    blocks = [] if split is None else [_explained_locations(name, split)]
    for _protocol, form in ROUTED_PATHS:
        path = form.format(name=name)
        lines, target = "", path
        if split is not None:
            # The split's choice, for the request log ("" means TorchServe's default), and its route.
            lines += f"            set $servekitlog_target {split};\n"
            target = f"${_route_variable(name)}"
        if shadow:
            lines += f"            mirror /_shadow/{name};\n            mirror_request_body on;\n"
        blocks.append(
            f"        location = {path} {{\n{lines}            proxy_pass http://torchserve{target};\n        }}\n"
        )
    return "".join(blocks)


def render_config(state: DeploymentState | dict, prefix: Path, spans: bool = False) -> str:
    """The whole nginx.conf for ``state`` (a ``DeploymentState`` or its JSON form), every path under ``prefix``;
    ``spans``: span export on, the proxy is a hop with a span of its own (module docstring)."""
    try:  # through the JSON form: whatever reaches nginx has passed the state's validation
        state = DeploymentState.from_json(state if isinstance(state, dict) else state.to_json())
    except StateError as exc:
        raise ProxyError(f"cannot render the proxy configuration: {exc}") from None
    if state.listen is None or state.upstream is None:
        raise ProxyError("cannot render the proxy configuration: the state has no listen or upstream address")
    splits, locations = [], []
    for name, model in sorted(state.models.items()):
        split = None
        if model.canary is not None:
            var, percent, version = _variable(name), model.canary.percent, model.canary.version
            cases = f'        {percent}% "/{version}";\n' if percent < 100 else ""
            fallback = f'"/{version}"' if percent >= 100 else '""'
            splits.append(f'    split_clients "${{request_id}}" ${var} {{\n{cases}        * {fallback};\n    }}\n')
            # The route of a split request: its own path (an exact location: $uri is that path) for the
            # default's share, the versioned route for the canary's.
            route = _route_variable(name)
            splits.append(
                f'    map ${var} ${route} {{\n        "" $uri;\n        default /predictions/{name}${var};\n    }}\n'
            )
            explain = _explain_variable(name)
            splits.append(
                f'    map ${var} ${explain} {{\n        "" $uri;\n        default /explanations/{name}${var};\n    }}\n'
            )
            split = f"${var}"
        if model.shadow is not None:
            # A mirror shares its request's variables and runs the server's ``set`` again (its target ""):
            # with a canary it sets the split's choice back, or the logs would name the default for every request.
            target = f"            set $servekitlog_target {split};\n" if split is not None else ""
            locations.append(
                f"        location = /_shadow/{name} {{\n"
                "            internal;\n"
                f"{target}"
                f"            proxy_pass http://torchserve/predictions/{name}/{model.shadow};\n"
                "            proxy_set_header Content-Type $http_content_type;\n"
                '            proxy_set_header X-Request-Start "t=${msec}";\n'
                + (f"            {SPAN_HEADER}" if spans else "")  # its own headers: the server's are not inherited
                + "        }\n"
            )
        if split is not None or model.shadow is not None:
            locations.append(_routed_locations(name, split, model.shadow is not None))
    span_maps, span_lines = "", ""
    if spans:
        span_maps = SPAN_CONTEXT_MAPS + SPAN_LOG_FORMAT
        span_lines = f"        {SPAN_HEADER}        access_log {prefix / SPAN_LOG} servekit_spans;\n"
    state_file = prefix / "state.json"
    written = f"# Written by servekit.deploy.proxy from {state_file}: do not edit, run `servekit canary/shadow`."
    return f"""{written}
{config_head(prefix, 1024)}    client_max_body_size 7m;
    client_body_buffer_size 7m;
    upstream torchserve {{
        server {state.upstream};
        keepalive 32;
    }}
{LOG_FORMAT}{span_maps}{"".join(splits)}    server {{
        listen {state.listen};
        listen unix:{router_socket(prefix)};  # the OIP front's way in (module docstring)
        set $servekitlog_target "";
        proxy_set_header X-Request-Start "t=${{msec}}";  # when the request left here: the worker's queue wait
        access_log {prefix / REQUEST_LOG} servekit_json;
{span_lines}        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_read_timeout 120s;
{"".join(locations)}        location / {{
            proxy_pass http://torchserve;
        }}
    }}
}}
"""


@dataclass
class NginxProxy(NginxInstance):
    """The canary/shadow nginx, its files (and the deployment state, ``state.json``) under ``prefix``.

    ``listen_port`` and ``upstream`` apply until the state records its own (the first time the
    proxy writes it); callers that change the state must hold the ``servekit`` state lock.
    ``log_max_bytes``, ``log_keep`` and ``log_interval`` are the log keeper's cap, rotated files
    kept per log, and seconds between its checks (``servekit.serving.logkeeper``). ``otlp_endpoint``:
    span export from the next start, a span of the proxy's own per request (see the module docstring).
    """

    listen_port: int = 8090
    upstream: str = "127.0.0.1:8080"
    log_max_bytes: int = DEFAULT_MAX_BYTES
    log_keep: int = DEFAULT_KEEP
    log_interval: float = DEFAULT_INTERVAL
    otlp_endpoint: str | None = None  # span export (OTLP/HTTP traces URL) from the next start; None: off
    label = "the proxy"
    error = ProxyError

    @property
    def state_file(self) -> Path:
        return self.prefix / "state.json"

    @property
    def request_log(self) -> Path:
        """The JSON-lines log of every request the proxy served (see the module docstring)."""
        return self.prefix / REQUEST_LOG

    @property
    def span_log(self) -> Path:
        """With span export on, one JSON line per request routed to TorchServe: the proxy's spans."""
        return self.prefix / SPAN_LOG

    @property
    def spans_file(self) -> Path:
        return self.prefix / SPANS_FILE

    def started_endpoint(self) -> str | None:
        """The collector the proxy was last started with (``SPANS_FILE``); None: it was started with spans off."""
        try:
            return self.spans_file.read_text().strip() or None
        except FileNotFoundError:
            return None

    @property
    def log_keeper(self) -> LogKeeperProcess:
        """The process that keeps this proxy's logs bounded (started and stopped with nginx)."""
        logs = (self.request_log, self.prefix / "error.log", self.prefix / "access.log")
        if self.otlp_endpoint:
            logs += (self.span_log,)
        return LogKeeperProcess(self.prefix, logs, self.log_max_bytes, self.log_keep, self.log_interval,
                                warn=self.warn)  # fmt: skip

    @property
    def span_shipper(self) -> SpanShipperProcess:
        """The process that exports the span log to ``otlp_endpoint`` (started and stopped with nginx when on)."""
        return SpanShipperProcess(self.prefix, self.span_log, self.otlp_endpoint or None, PROXY_HOP.name,
                                  warn=self.warn)  # fmt: skip

    def install(self, text: str) -> None:
        try:  # nginx -t binds the front's socket: its folder first
            private_socket_dir(router_socket(self.prefix))
        except NginxError as exc:
            raise ProxyError(str(exc)) from None
        super().install(text)

    def current(self) -> DeploymentState:
        """The deployment state, with this proxy's address and upstream where it records none yet."""
        return self._addressed(read_state(self.state_file))

    def _addressed(self, state: DeploymentState) -> DeploymentState:
        state.listen = state.listen or f"127.0.0.1:{self.listen_port}"
        state.upstream = state.upstream or self.upstream
        return state

    def state(self) -> dict:
        """The deployment state as JSON (``listen``, ``upstream``, ``routes``, ``models``)."""
        return self.current().to_json()

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.current().listen.rsplit(':', 1)[1]}{path}"

    def start(self, timeout: float = 10.0) -> None:
        """Start nginx and its log keeper (and, with ``otlp_endpoint``, its span shipper); return once nginx answers
        on its address."""
        self.refuse_if_running()
        keeper = self.log_keeper  # invalid log settings fail here, before anything starts
        try:
            shipper = self.span_shipper if self.otlp_endpoint else None  # an invalid endpoint fails here too
        except SpanShipperError as exc:
            raise ProxyError(str(exc)) from None
        state = self.current()
        remove_stale_socket(router_socket(self.prefix))  # no proxy of ours runs (refuse_if_running)
        self.install(render_config(state, self.prefix, spans=shipper is not None))
        write_state(self.state_file, state)
        if shipper is None:
            self.spans_file.unlink(missing_ok=True)
        else:
            self.spans_file.write_text(self.otlp_endpoint + "\n")
        # What nginx logs from its start on is the shipper's, however long the shipper takes to start.
        offset = self.span_log.stat().st_size if self.span_log.is_file() else 0
        self.launch(state.listen, timeout)
        try:
            keeper.start()
            if shipper is not None:
                shipper.start(offset)
        except (LogKeeperError, SpanShipperError) as exc:
            self.stop()
            raise ProxyError(f"{exc}: the proxy was stopped again") from None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop nginx (requests in flight finish, then firmly after ``timeout`` s), then its log keeper and span
        shipper (which exports what is left)."""
        super().stop(timeout)
        self.log_keeper.stop()
        SpanShipperProcess(self.prefix, self.span_log, None, warn=self.warn).stop()  # whatever this object's endpoint

    def apply(self, state: DeploymentState, drain_timeout: float = 10.0) -> None:
        """Check and install ``state``'s configuration, save ``state``, and reload nginx if it runs.

        Returns once nginx runs workers with the new configuration and its old workers, which
        finish the requests they hold (mirrors included), have exited; at most ``drain_timeout``
        seconds are spent waiting for them.
        """
        spans = self.started_endpoint() is not None  # the hop the running proxy's shipper exports
        self.install(render_config(self._addressed(state), self.prefix, spans=spans))
        write_state(self.state_file, state)
        self.reload(drain_timeout)
