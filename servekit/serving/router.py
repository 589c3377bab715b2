"""The canary proxy's Unix socket, the OIP front's way in (``servekit.deploy.proxy``, ``servekit.serving.oip_service``).

The front reaches the proxy through this socket, never through the proxy's TCP port: another local program
listening on a port the proxy left free would otherwise receive the front's requests, inference tokens
included. The socket lives in ``/tmp/servekit-router-UID/``, a folder only its user can write (0711), so no
one else can bind its name first; one socket per proxy folder (a hash of its path).
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from servekit.serving.nginx import NginxError

__all__ = ["SOCKET_DIR_MODE", "private_socket_dir", "remove_stale_socket", "router_address", "router_socket"]

SOCKET_DIR_MODE = 0o711  # the router socket's folder: its user writes, others only pass through


def router_socket(prefix: Path) -> Path:
    """Where the proxy of ``prefix`` listens for the OIP front: ``/tmp/servekit-router-UID/HASH.sock``.

    Not under the prefix: the front's nginx workers run as ``nobody`` when it is started as root, and must
    reach the socket through every folder above it (nginx makes the socket itself 0666). The folder is
    this user's, 0711 (``private_socket_dir``): others can pass through it but not create names in it."""
    digest = hashlib.sha256(os.fsencode(Path(prefix).resolve())).hexdigest()[:16]
    return Path("/tmp") / f"servekit-router-{os.getuid()}" / f"{digest}.sock"


def router_address(prefix: Path) -> str:
    """The front's upstream for the proxy of ``prefix`` (``servekit.serving.oip_service``, ``router``)."""
    return f"unix:{router_socket(prefix)}"


def private_socket_dir(socket: Path) -> None:
    """Make the socket's folder (this user's, 0711: another user who could write into it could bind the
    socket's name first) and refuse one that another user owns. nginx binds the socket even for ``nginx -t``,
    so the folder must exist before any check of the configuration."""
    folder = socket.parent
    folder.mkdir(mode=SOCKET_DIR_MODE, exist_ok=True)
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise NginxError(f"refusing {folder} for the proxy's socket: it is not a folder of this user's")
    if stat.S_IMODE(info.st_mode) != SOCKET_DIR_MODE:
        os.chmod(folder, SOCKET_DIR_MODE)


def remove_stale_socket(socket: Path) -> None:
    """Remove the socket an nginx killed without its graceful stop left behind (a new one would not bind);
    only while no proxy of this prefix runs."""
    try:
        if stat.S_ISSOCK(os.lstat(socket).st_mode):
            socket.unlink()
    except FileNotFoundError:
        pass
