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
configuration that fails the check is never installed. The proxy listens on its own loopback port
and passes TorchServe's ``Authorization`` header through.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from servekit.server import process_table

NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
VERSION_RE = re.compile(r"^\d+(\.\d+){0,2}\Z")


class ProxyError(RuntimeError):
    """The proxy could not be configured, checked, started or reloaded."""


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
    return f"""# Written by servekit.proxy from {prefix / "state.json"}: do not edit, run `servekit canary/shadow`.
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
    """One nginx process of our own, its files under ``prefix``."""

    prefix: Path
    listen_port: int = 8090
    upstream: str = "127.0.0.1:8080"

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

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.state()['listen'].rsplit(':', 1)[1]}{path}"

    def state(self) -> dict:
        if self.state_file.is_file():
            return json.loads(self.state_file.read_text())
        return {"listen": f"127.0.0.1:{self.listen_port}", "upstream": self.upstream, "routes": {}}

    def _write_checked(self, state: dict) -> None:
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.prefix / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        candidate = self.prefix / "nginx.conf.new"
        candidate.write_text(render_config(state, self.prefix))
        check = subprocess.run(
            [nginx_binary(), "-t", "-q", "-p", str(self.prefix), "-c", str(candidate)],
            capture_output=True,
            text=True,
            check=False,
        )
        if check.returncode != 0:
            detail = " ".join(check.stderr.split())[:300]
            raise ProxyError(f"nginx -t rejected the new configuration (kept the old one): {detail}")
        candidate.replace(self.conf)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.state_file)

    def running_pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def start(self, timeout: float = 10.0) -> None:
        self.prefix.mkdir(parents=True, exist_ok=True)
        if self.running_pid():
            raise ProxyError(f"the proxy is already running (pid {self.running_pid()})")
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
        os.kill(pid, signal.SIGQUIT)  # graceful: finish requests in flight
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except OSError:
                return
            time.sleep(0.1)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)

    def apply(self, state: dict) -> None:
        """Check and install ``state``'s configuration, and reload nginx if it runs."""
        self.prefix.mkdir(parents=True, exist_ok=True)
        self._write_checked(state)
        pid = self.running_pid()
        if pid is not None:
            result = subprocess.run(
                [nginx_binary(), "-p", str(self.prefix), "-c", str(self.conf), "-s", "reload"],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                raise ProxyError(f"nginx reload failed: {' '.join(result.stderr.split())[:300]}")
            self._wait_reloaded(pid)

    def _wait_reloaded(self, master: int, timeout: float = 10.0) -> None:
        """A reload replaces the worker processes; wait until the old ones are gone."""
        before = set(_children(master))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            current = set(_children(master))
            if current and not (current & before):
                return
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


def _check_route(model: str, version: str) -> None:
    if not NAME_RE.match(model):
        raise ProxyError(f"bad model name {model!r}")
    if not VERSION_RE.match(version):
        raise ProxyError(f"bad version {version!r}")


def _children(pid: int) -> list[int]:
    return [child for child, _, parent, _ in process_table() if parent == pid]
