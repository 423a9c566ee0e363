"""A tiny HTTP server on 127.0.0.1 for download tests: no internet needed, stops by itself.

Example:
    >>> import urllib.request
    >>> with serve_files({"/a.bin": b"hello"}) as server:
    ...     urllib.request.urlopen(server.url("/a.bin")).read(), server.requests["/a.bin"]
    (b'hello', 1)
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["LocalServer", "serve_files"]


@dataclass
class LocalServer:
    port: int
    files: dict[str, bytes]
    requests: Counter = field(default_factory=Counter)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@contextmanager
def serve_files(files: dict[str, bytes], *, lifetime_s: float = 120.0) -> Iterator[LocalServer]:
    """Serve ``{path: bytes}`` (404 for anything else) on a free port; GET requests are counted per path.

    The server stops when the block ends, or after ``lifetime_s`` seconds at the latest.
    """
    state = LocalServer(port=0, files=dict(files))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            state.requests[self.path] += 1
            body = state.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    watchdog = threading.Timer(lifetime_s, server.shutdown)
    watchdog.daemon = True
    thread.start()
    watchdog.start()
    try:
        yield state
    finally:
        watchdog.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
