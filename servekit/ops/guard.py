"""The management guard: a real nginx that is the only way to TorchServe's management API.

TorchServe 0.12 checks ``allowed_urls`` only for strings that parse as URLs. A registration with
a bare directory path (``url=/tmp/x``), or a JSON body naming one, loads that directory as a
model, handler code included; ``handler=`` and ``runtime=`` override the archive's own. So the
management token alone would mean "run any code this host can read". The guard closes that:

* TorchServe's management API listens on a Unix socket in a directory only this user can enter
  (``<workdir>/run``), so nothing else on the host can reach it directly;
* nginx listens on the management address (loopback TCP) and forwards only
  ``GET|HEAD|OPTIONS`` (read-only), ``PUT /models/NAME[/VERSION[/set-default]]`` (scale, set
  default), ``DELETE /models/NAME[/VERSION]`` (unregister) and ``POST /models`` whose whole query
  string is a strict grammar: a bare archive name (``url=<model>_v<version>.mar``) and numeric
  worker settings. Request bodies are never forwarded (the JSON registration form is dropped).
  Everything else gets ``403`` with a JSON body ``{"code", "type", "message"}``;
* ``allowed_urls`` in config.properties matches no URL at all, so every URL form is refused by
  TorchServe too (the second wall, and the only one for the gRPC management port: see README).

Token authorization is still TorchServe's: the guard passes ``Authorization`` through.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from servekit.ops.processes import owned_pid
from servekit.ops.store import NAME_PATTERN, VERSION_PATTERN

# Unix socket paths are limited to 107 bytes by the kernel.
MAX_SOCKET_PATH = 100
REGISTER_NUMERIC = ("initial_workers", "batch_size", "max_batch_delay", "response_timeout", "startup_timeout")
_TOKEN = (
    rf"url={NAME_PATTERN}_v{VERSION_PATTERN}\.mar"
    rf"|model_name={NAME_PATTERN}"
    rf"|(?:{'|'.join(REGISTER_NUMERIC)})=[0-9]{{1,9}}"
    r"|synchronous=(?:true|false)"
)
# The whole query string of an accepted registration: tokens joined by '&', nothing else
# (no percent-encoding, no ';', no handler=/runtime=/s3 options).
# "(?![\s\S])" is the true end of the text in both PCRE and Python ("$" accepts a trailing newline).
_END = r"(?![\s\S])"
REGISTER_QUERY = rf"^(?:(?:{_TOKEN})(?:&(?=.)|{_END}))+{_END}"
REFUSALS = {
    "route": "this method and path are not allowed through the management API guard",
    "register": (
        "registration refused: url must be a bare archive name from the model store (<model>_v<version>.mar) "
        "and the only other parameters allowed are model_name, synchronous, " + ", ".join(REGISTER_NUMERIC)
    ),
}


class GuardError(RuntimeError):
    """The guard could not be configured or started; the message says why."""


def nginx_binary() -> str:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if path is None:
        raise GuardError("nginx is not installed (make tools installs Debian's nginx)")
    return path


def _quoted(text: str) -> str:
    if '"' in text or "\\\\" in text:
        raise ValueError(f"cannot quote {text!r} for nginx")
    return f'"{text}"'


def render_guard_config(prefix: Path, listen: str, socket_path: Path) -> str:
    """The whole nginx.conf of the guard (see module docstring)."""
    # The maps run once per request; "$uri" is nginx's normalised path (percent-decoded, slashes
    # merged), "$args" the raw query string exactly as TorchServe will decode it.
    route_map = "\n".join(
        [
            '        default "route";',
            '        "~^(GET|HEAD|OPTIONS) " "";',
            f'        {_quoted(f"~^POST /models{_END}")} "register";',
            f'        {_quoted(f"~^PUT /models/{NAME_PATTERN}(/{VERSION_PATTERN}(/set-default)?)?{_END}")} "";',
            f'        {_quoted(f"~^DELETE /models/{NAME_PATTERN}(/{VERSION_PATTERN})?{_END}")} "";',
        ]
    )
    # nginx started as root runs its workers as "nobody", which cannot connect to a socket in a
    # 0700 directory; the workers then keep the launcher's user (as TorchServe's own processes do).
    user = "user root root;\n" if os.geteuid() == 0 else ""
    messages = "\n".join(f'        "{key}" "{text}";' for key, text in REFUSALS.items())
    return f"""# Written by servekit.ops.guard: the only way to TorchServe's management API (see servekit/ops/guard.py).
{user}worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{ worker_connections 256; }}
http {{
    access_log {prefix / "access.log"};
    client_body_temp_path {prefix / "tmp" / "body"};
    proxy_temp_path {prefix / "tmp" / "proxy"};
    fastcgi_temp_path {prefix / "tmp" / "fastcgi"};
    uwsgi_temp_path {prefix / "tmp" / "uwsgi"};
    scgi_temp_path {prefix / "tmp" / "scgi"};
    client_max_body_size 64k;
    server_tokens off;
    map "$request_method $uri" $servekit_route {{
{route_map}
    }}
    map $args $servekit_register_query {{
        default "register";
        {_quoted("~" + REGISTER_QUERY)} "";
    }}
    map "$servekit_route:$servekit_register_query" $servekit_refusal {{
        default "";
        "~^route:" "route";
        "register:register" "register";
    }}
    map $servekit_refusal $servekit_refusal_message {{
        default "";
{messages}
    }}
    upstream torchserve_management {{
        server unix:{socket_path};
    }}
    server {{
        listen {listen};
        default_type application/json;
        location / {{
            if ($servekit_refusal) {{
                return 403 '{{"code": 403, "type": "GuardRefusal", "message": "$servekit_refusal_message"}}\\n';
            }}
            proxy_pass http://torchserve_management;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # Never forward a body: TorchServe would read a JSON body as the registration itself.
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header Content-Type "";
            # Synchronous registration waits for workers to load.
            proxy_read_timeout 900s;
        }}
    }}
}}
"""


@dataclass
class ManagementGuard:
    """One nginx of our own in ``prefix``, listening on ``listen`` in front of ``socket_path``."""

    prefix: Path
    listen: str
    socket_path: Path

    def __post_init__(self) -> None:
        self.prefix = Path(self.prefix).resolve()
        self.socket_path = Path(self.socket_path)
        if len(str(self.socket_path)) > MAX_SOCKET_PATH:
            raise GuardError(
                f"management socket path {self.socket_path} is longer than {MAX_SOCKET_PATH} bytes: "
                "use a shorter working directory"
            )

    @property
    def conf(self) -> Path:
        return self.prefix / "nginx.conf"

    @property
    def pid_file(self) -> Path:
        return self.prefix / "nginx.pid"

    def running_pid(self) -> int | None:
        """The guard's nginx master, only if the pid file still names it (never a stale pid's owner)."""
        return owned_pid(self.pid_file, ("nginx", str(self.conf)))

    def write_config(self) -> None:
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.prefix / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        fd, candidate = tempfile.mkstemp(prefix=".nginx.conf.", dir=self.prefix)
        with os.fdopen(fd, "w") as handle:
            handle.write(render_guard_config(self.prefix, self.listen, self.socket_path))
        check = subprocess.run(
            [nginx_binary(), "-t", "-q", "-p", str(self.prefix), "-c", candidate],
            capture_output=True,
            text=True,
            check=False,
        )
        if check.returncode != 0:
            Path(candidate).unlink(missing_ok=True)
            raise GuardError(f"nginx -t rejected the guard configuration: {' '.join(check.stderr.split())[:300]}")
        os.replace(candidate, self.conf)

    def start(self, timeout: float = 10.0) -> None:
        self.prefix.mkdir(parents=True, exist_ok=True)
        if self.running_pid() is not None:
            raise GuardError(f"the management guard is already running (pid {self.running_pid()})")
        self.write_config()
        result = subprocess.run(
            [nginx_binary(), "-p", str(self.prefix), "-c", str(self.conf)], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise GuardError(f"the management guard (nginx) failed to start: {' '.join(result.stderr.split())[:300]}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                requests.get(f"http://{self.listen}/", timeout=1)
                return
            time.sleep(0.1)
        raise GuardError(f"the management guard did not listen on {self.listen} within {timeout:.0f}s")

    def stop(self, timeout: float = 10.0) -> None:
        pid = self.running_pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return
        os.kill(pid, signal.SIGQUIT)  # graceful: finish calls in flight
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except OSError:
                return
            time.sleep(0.1)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
