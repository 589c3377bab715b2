"""Run a stand-in HTTP server for a test: in a daemon thread, shut down, closed and joined after the block.

    with serving(loopback(Handler)) as server:               # 127.0.0.1, a port the kernel picks
        url = f"http://127.0.0.1:{server.server_address[1]}"
    with serving(FakeMetricsServer(pages=[...])) as server:  # any socketserver subclass of one's own
        ...

Every test module with a fake TorchServe, Prometheus, exporter or gateway starts it this way.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import ThreadingHTTPServer
from socketserver import BaseRequestHandler, BaseServer
from typing import TypeVar

Server = TypeVar("Server", bound=BaseServer)


@contextmanager
def serving(server: Server) -> Iterator[Server]:
    """``server.serve_forever`` in a daemon thread for the block (polled every 20 ms, so shutdown is quick)."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def loopback(handler: type[BaseRequestHandler], port: int = 0) -> ThreadingHTTPServer:
    """A threading HTTP server on 127.0.0.1 (``port`` 0: a free one) whose request threads never block exit."""
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    return server
