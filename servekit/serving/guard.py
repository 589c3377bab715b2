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
  TorchServe too (the second wall, and the only one for the gRPC management port: docs/security.md,
  "Registration is confined to the model store").

Token authorization is still TorchServe's: the guard passes ``Authorization`` through.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from servekit.serving.nginx import NginxError, NginxInstance, config_head
from servekit.serving.store import ARCHIVE_PATTERN, NAME_PATTERN, VERSION_PATTERN

__all__ = ["REGISTER_QUERY", "GuardError", "ManagementGuard", "render_guard_config"]

# Unix socket paths are limited to 107 bytes by the kernel.
MAX_SOCKET_PATH = 100
REGISTER_NUMERIC = ("initial_workers", "batch_size", "max_batch_delay", "response_timeout", "startup_timeout")
_TOKEN = (
    rf"url={ARCHIVE_PATTERN}"
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


class GuardError(NginxError):
    """The guard could not be configured or started; the message says why."""


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
    written = "# Written by servekit.serving.guard: the only way to TorchServe's management API (see that module)."
    return f"""{written}
{config_head(prefix, 256, user)}    client_max_body_size 64k;
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
class ManagementGuard(NginxInstance):
    """One nginx of our own in ``prefix``, listening on ``listen`` in front of ``socket_path``."""

    listen: str
    socket_path: Path
    label = "the management guard"
    error = GuardError
    rejected = "the guard configuration"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.socket_path = Path(self.socket_path)
        if len(str(self.socket_path)) > MAX_SOCKET_PATH:
            raise GuardError(
                f"management socket path {self.socket_path} is longer than {MAX_SOCKET_PATH} bytes: "
                "use a shorter working directory"
            )

    def write_config(self) -> None:
        self.install(render_guard_config(self.prefix, self.listen, self.socket_path))

    def start(self, timeout: float = 10.0) -> None:
        self.refuse_if_running()
        self.write_config()
        self.launch(self.listen, timeout)
