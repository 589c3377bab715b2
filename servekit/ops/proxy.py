"""A real nginx in front of TorchServe for canary and shadow traffic.

The deployment state (``state.json`` in the proxy's directory) says, per model, which version gets
a canary share and which version receives shadow copies. ``render_config`` turns it into an nginx
configuration:

* canary: ``split_clients`` on ``$request_id`` sends P % of ``/predictions/NAME`` to
  ``/predictions/NAME/CANARY`` and the rest to ``/predictions/NAME`` (TorchServe's default
  version, so a later ``set-default`` needs no proxy change);
* shadow: ``mirror`` sends a copy of every request to ``/predictions/NAME/SHADOW``; its answers are
  discarded, clients only ever see the served version's.

Every change writes the configuration, checks it with ``nginx -t`` and reloads nginx; a
configuration that fails the check is never installed. ``nginx.conf`` and ``state.json`` are each
replaced whole through a unique temporary file (``servekit.ops.state_lock.atomic_write_text``). nginx is
signalled by us, never through ``nginx -s``, and only after its pid file's process is checked to be
this prefix's nginx master (``servekit.ops.pidfile``): a stale pid file is reported and removed. The proxy
listens on its own loopback port and passes TorchServe's ``Authorization`` header through.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests

from servekit.ops.pidfile import pid_matches, signal_if_matches, verified_pid
from servekit.ops.server import process_table
from servekit.ops.state_lock import atomic_write_text

NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
VERSION_RE = re.compile(r"^\d+(\.\d+){0,2}\Z")


class ProxyError(RuntimeError):
    """The proxy could not be configured, checked, started or reloaded."""


def _warn(message: str) -> None:
    print(f"servekit: warning: {message}", file=sys.stderr)


def nginx_binary() -> str:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if path is None:
        raise ProxyError("nginx is not installed (make tools installs Debian's nginx)")
    return path


def _variable(model: str) -> str:
    return "servekit_" + re.sub(r"[^A-Za-z0-9_]", "_", model)


def render_config(state: dict, prefix: Path) -> str:
    """The whole nginx.conf for ``state`` (see module docstring), with every path under ``prefix``."""
    upstream = state["upstream"]
    listen = state["listen"]
    splits, locations = [], []
    for model, route in sorted(state.get("routes", {}).items()):
        if not NAME_RE.match(model):
            raise ProxyError(f"bad model name {model!r}")
        target = ""
        canary = route.get("canary")
        if canary and canary["percent"] > 0:
            var = _variable(model)
            percent = canary["percent"]
            cases = f'        {percent}% "/{canary["version"]}";\n' if percent < 100 else ""
            fallback = f'"/{canary["version"]}"' if percent >= 100 else '""'
            splits.append(f'    split_clients "${{request_id}}" ${var} {{\n{cases}        * {fallback};\n    }}\n')
            target = f"${var}"
        mirror = ""
        if route.get("shadow"):
            mirror = f"            mirror /_shadow/{model};\n            mirror_request_body on;\n"
            locations.append(
                f"        location = /_shadow/{model} {{\n"
                "            internal;\n"
                f"            proxy_pass http://torchserve/predictions/{model}/{route['shadow']};\n"
                "            proxy_set_header Content-Type $http_content_type;\n"
                "        }\n"
            )
        locations.append(
            f"        location = /predictions/{model} {{\n{mirror}"
            f"            proxy_pass http://torchserve/predictions/{model}{target};\n"
            "        }\n"
        )
    return f"""# Written by servekit.ops.proxy from {prefix / "state.json"}: do not edit, run `servekit canary/shadow`.
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{ worker_connections 1024; }}
http {{
    access_log {prefix / "access.log"};
    client_body_temp_path {prefix / "tmp" / "body"};
    proxy_temp_path {prefix / "tmp" / "proxy"};
    fastcgi_temp_path {prefix / "tmp" / "fastcgi"};
    uwsgi_temp_path {prefix / "tmp" / "uwsgi"};
    scgi_temp_path {prefix / "tmp" / "scgi"};
    client_max_body_size 7m;
    client_body_buffer_size 7m;
    upstream torchserve {{
        server {upstream};
        keepalive 32;
    }}
{"".join(splits)}    server {{
        listen {listen};
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_read_timeout 120s;
{"".join(locations)}        location / {{
            proxy_pass http://torchserve;
        }}
    }}
}}
"""


@dataclass
class NginxProxy:
    """One nginx process of our own, its files under ``prefix``.

    Callers that change routes from several processes must hold the ``servekit`` state lock
    (``servekit.ops.state_lock``): every change here is read-modify-write of ``state.json``.
    """

    prefix: Path
    listen_port: int = 8090
    upstream: str = "127.0.0.1:8080"
    warn: Callable[[str], None] = _warn

    def __post_init__(self) -> None:
        self.prefix = Path(self.prefix).resolve()

    @property
    def state_file(self) -> Path:
        return self.prefix / "state.json"

    @property
    def conf(self) -> Path:
        return self.prefix / "nginx.conf"

    @property
    def pid_file(self) -> Path:
        return self.prefix / "nginx.pid"

    @property
    def master_fragments(self) -> tuple[str, ...]:
        """What our master's command line holds (nginx rewrites it to "nginx: master process ... -c CONF")."""
        return ("nginx: master process", f"-p {self.prefix}", f"-c {self.conf}")

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.state()['listen'].rsplit(':', 1)[1]}{path}"

    def state(self) -> dict:
        if not self.state_file.is_file():
            return {"listen": f"127.0.0.1:{self.listen_port}", "upstream": self.upstream, "routes": {}}
        try:
            state = json.loads(self.state_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProxyError(f"proxy state {self.state_file} is corrupt ({exc}): {_STATE_REPAIR}") from None
        problem = _state_problem(state)
        if problem:
            raise ProxyError(f"proxy state {self.state_file} is invalid ({problem}): {_STATE_REPAIR}")
        return state

    def routes_to(self, model: str, version: str) -> list[str]:
        """What the proxy state sends to ``model`` ``version``: e.g. ``["canary (20%)", "shadow"]``."""
        route = self.state()["routes"].get(model, {})
        routes = []
        if route.get("canary", {}).get("version") == version:
            routes.append(f"canary ({route['canary']['percent']}%)")
        if route.get("shadow") == version:
            routes.append("shadow")
        return routes

    def _write_checked(self, state: dict) -> None:
        """Install ``state``'s configuration, then the state: each file replaced whole, never half-written."""
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.prefix / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.conf, render_config(state, self.prefix), check=_nginx_check)
        atomic_write_text(self.state_file, json.dumps(state, indent=2, sort_keys=True) + "\n")

    def running_pid(self) -> int | None:
        """Our nginx master's pid; a pid file naming anything else is reported, removed and never signalled."""
        return verified_pid(self.pid_file, self.master_fragments, warn=self.warn)

    def start(self, timeout: float = 10.0) -> None:
        self.prefix.mkdir(parents=True, exist_ok=True)
        if (pid := self.running_pid()) is not None:
            raise ProxyError(f"the proxy is already running (pid {pid})")
        self._write_checked(self.state())
        result = subprocess.run(
            [nginx_binary(), "-p", str(self.prefix), "-c", str(self.conf)], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise ProxyError(f"nginx failed to start: {' '.join(result.stderr.split())[:300]}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                requests.get(self.url("/"), timeout=1)
                return
            time.sleep(0.1)
        raise ProxyError(f"nginx did not listen on {self.state()['listen']} within {timeout:.0f}s")

    def stop(self, timeout: float = 10.0) -> None:
        pid = self.running_pid()
        if pid is None:
            return
        signal_if_matches(pid, self.master_fragments, signal.SIGQUIT)  # graceful: finish requests in flight
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not pid_matches(pid, self.master_fragments):
                return
            time.sleep(0.1)
        signal_if_matches(pid, self.master_fragments, signal.SIGTERM)

    def apply(self, state: dict, drain_timeout: float = 10.0) -> None:
        """Check and install ``state``'s configuration, and reload nginx if it runs.

        Returns once nginx runs workers with the new configuration and its old workers, which
        finish the requests they hold (mirrors included), have exited; at most ``drain_timeout``
        seconds are spent waiting for them.
        """
        self.prefix.mkdir(parents=True, exist_ok=True)
        self._write_checked(state)
        pid = self.running_pid()
        if pid is not None:
            before = set(_children(pid))
            if not signal_if_matches(pid, self.master_fragments, signal.SIGHUP):
                raise ProxyError(f"nginx (pid {pid}) exited before it could be reloaded; servekit proxy start")
            self._wait_reloaded(pid, before, drain_timeout)

    def _wait_reloaded(self, master: int, before: set[int], drain_timeout: float, timeout: float = 10.0) -> None:
        """A good reload starts new workers (a bad one logs an error and keeps the old ones); wait for both."""
        deadline = time.monotonic() + timeout
        while not set(_children(master)) - before:
            if time.monotonic() >= deadline:
                raise ProxyError(
                    f"nginx did not start workers with the new configuration within {timeout:.0f}s "
                    f"(see {self.prefix / 'error.log'}): the previous routes may still be live"
                )
            time.sleep(0.05)
        deadline = time.monotonic() + drain_timeout
        while set(_children(master)) & before and time.monotonic() < deadline:
            time.sleep(0.05)

    def set_canary(self, model: str, version: str, percent: int) -> dict:
        if not 0 <= percent <= 100:
            raise ProxyError(f"--percent must be between 0 and 100, got {percent}")
        _check_route(model, version)
        state = self.state()
        route = state["routes"].setdefault(model, {})
        if percent == 0:
            route.pop("canary", None)
        else:
            route["canary"] = {"version": version, "percent": percent}
        self._prune(state, model)
        self.apply(state)
        return state

    def set_shadow(self, model: str, version: str | None) -> dict:
        if version is not None:
            _check_route(model, version)
        state = self.state()
        route = state["routes"].setdefault(model, {})
        if version is None:
            route.pop("shadow", None)
        else:
            route["shadow"] = version
        self._prune(state, model)
        self.apply(state)
        return state

    def drop_routes(self, model: str, version: str, drain_timeout: float = 30.0) -> list[str]:
        """Remove every route to ``model`` ``version`` and wait for nginx to finish the requests on them."""
        dropped = self.routes_to(model, version)
        if not dropped:
            return []
        state = self.state()
        route = state["routes"][model]
        if route.get("canary", {}).get("version") == version:
            route.pop("canary")
        if route.get("shadow") == version:
            route.pop("shadow")
        self._prune(state, model)
        self.apply(state, drain_timeout=drain_timeout)
        return dropped

    def promoted(self, model: str, version: str) -> None:
        """After ``version`` became the default: a canary of it is complete, so drop the split."""
        state = self.state()
        route = state["routes"].get(model, {})
        if route.get("canary", {}).get("version") == version:
            route.pop("canary")
            self._prune(state, model)
            self.apply(state)

    @staticmethod
    def _prune(state: dict, model: str) -> None:
        if not state["routes"].get(model):
            state["routes"].pop(model, None)


_STATE_REPAIR = "fix it, or remove it to start again from no routes (then servekit proxy stop and start)"


def _state_problem(state: object) -> str | None:
    """Why ``state`` cannot be rendered, or None; a hand-edited or cut file must not reach nginx."""
    if not isinstance(state, dict):
        return "not a JSON object"
    if not isinstance(state.get("listen"), str) or not isinstance(state.get("upstream"), str):
        return "listen and upstream must be strings"
    routes = state.get("routes")
    if not isinstance(routes, dict) or not all(isinstance(r, dict) for r in routes.values()):
        return "routes must map model names to objects"
    for model, route in routes.items():
        canary, shadow = route.get("canary"), route.get("shadow")
        if canary is not None and not (
            isinstance(canary, dict) and isinstance(canary.get("version"), str) and canary.get("percent") in range(101)
        ):
            return f"{model}: canary must be {{version, percent 0-100}}"
        if shadow is not None and not isinstance(shadow, str):
            return f"{model}: shadow must be a version string"
    return None


def _nginx_check(candidate: Path) -> None:
    prefix = candidate.parent
    check = subprocess.run(
        [nginx_binary(), "-t", "-q", "-p", str(prefix), "-c", str(candidate)],
        capture_output=True,
        text=True,
        check=False,
    )
    if check.returncode != 0:
        detail = " ".join(check.stderr.split())[:300]
        raise ProxyError(f"nginx -t rejected the new configuration (kept the old one): {detail}")


def _check_route(model: str, version: str) -> None:
    if not NAME_RE.match(model):
        raise ProxyError(f"bad model name {model!r}")
    if not VERSION_RE.match(version):
        raise ProxyError(f"bad version {version!r}")


def _children(pid: int) -> list[int]:
    return [child for child, _, parent, _ in process_table() if parent == pid]
