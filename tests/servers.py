"""A real HTTP server on 127.0.0.1 for the tests that download weights."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class WeightsServer:
    """A ThreadingHTTPServer on 127.0.0.1 that serves bytes and counts requests per path."""

    url: str = ""
    routes: dict[str, bytes] = field(default_factory=dict)
    failures: dict[str, list[int]] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)
    holds: dict[str, Callable[[], bool]] = field(default_factory=dict)
    released: Counter[str] = field(default_factory=Counter)

    def serve(self, path: str, body: bytes, fail_first: tuple[int, ...] = ()) -> str:
        """Serve ``body`` at ``path`` after answering ``fail_first`` statuses; return its URL."""
        self.routes[path] = body
        self.failures[path] = list(fail_first)
        return self.url + path

    def hold(self, path: str, until: Callable[[], bool], status: int = 503) -> str:
        """Answer requests for ``path`` with ``status`` (503: unavailable), each only once
        ``until()`` is true or 120 s have passed; its URL.

        ``released[path]`` counts the requests answered because ``until()`` came true.
        """
        self.holds[path] = until
        return self.serve(path, b"", fail_first=(status,) * 100)


@contextmanager
def serve_http() -> Iterator[WeightsServer]:
    """Start a ThreadingHTTPServer on a free 127.0.0.1 port; stop it on exit."""
    state = WeightsServer()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.hits[self.path] += 1
            if until := state.holds.get(self.path):
                deadline = time.monotonic() + 120
                while not until() and time.monotonic() < deadline:
                    time.sleep(0.05)
                state.released[self.path] += until()
            pending = state.failures.get(self.path)
            if self.path not in state.routes:
                self.send_error(404)
            elif pending:
                self.send_error(pending.pop(0))
            else:
                body = state.routes[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # keep pytest output readable
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    # A short poll interval makes shutdown quick.
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (a server started next takes it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
