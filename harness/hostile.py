"""Hostile HTTP clients, as any pod of a cluster can be to a sidecar's metrics port (tests and bench/sidecar.py).

`Prometheus` is the other side: a server that answers Prometheus' API as a test tells it to, as any address an
editor names may answer the operator.

Each kind holds a connection in a different way: `idle` sends nothing; `half-request` sends half a request head
and stops; `pipelining` sends many requests at once and never reads an answer; `slow-reading` asks for answers
and takes one byte of them; `oversized-headers` sends a request head that never ends. `Flood` keeps `count`
of one kind open (re-opening those the server closes) while the caller measures what real clients get.
"""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
from types import TracebackType
from typing import Any

KINDS = ("idle", "half-request", "pipelining", "slow-reading", "oversized-headers")
REQUEST = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"


def open_hostile(kind: str, host: str, port: int) -> socket.socket:
    """One connection of `kind`, in the state that kind leaves it in."""
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    if kind in ("pipelining", "slow-reading"):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # fills at once: the server's writes block
    s.settimeout(5)
    s.connect((host, port))
    s.setblocking(False)
    try:
        if kind == "half-request":
            s.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        elif kind == "pipelining":
            s.send(REQUEST * 200)
        elif kind == "slow-reading":
            s.send(REQUEST * 20)
            with contextlib.suppress(BlockingIOError):
                s.recv(1)
        elif kind == "oversized-headers":
            s.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"a" * 16384)
    except OSError:
        pass  # the server closed it already: counted as a re-open by Flood
    return s


class Flood:
    """`count` connections of `kind` kept open against host:port, re-opened as the server closes them."""

    def __init__(self, kind: str, host: str, port: int, count: int) -> None:
        if kind not in KINDS:
            raise ValueError(f"{kind!r} is not one of {', '.join(KINDS)}")
        self.kind, self.host, self.port, self.count = kind, host, port, count
        self.sockets: list[socket.socket] = []
        self.opened = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._keep, name=f"flood-{kind}", daemon=True)

    def __enter__(self) -> Flood:
        for _ in range(self.count):
            self.sockets.append(self._open())
        self.thread.start()
        return self

    def _open(self) -> socket.socket:
        self.opened += 1
        return open_hostile(self.kind, self.host, self.port)

    def _alive(self, s: socket.socket) -> bool:
        try:
            data = s.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True  # nothing to read: still open
        except OSError:
            return False  # reset by the server
        return data != b""  # b"": closed by the server; data: an answer it sent (still open)

    def _keep(self) -> None:
        """Re-open, at most 100 a second, the connections the server has closed: the pressure stays on."""
        while not self.stopping.wait(0.01):
            for i, s in enumerate(self.sockets):
                if self.stopping.is_set():
                    return
                if not self._alive(s):
                    s.close()
                    try:
                        self.sockets[i] = self._open()
                    except OSError:
                        continue
                    break

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        for s in self.sockets:
            s.close()


class Prometheus:
    """A real HTTP server on loopback that answers Prometheus' API as it is told to (well or badly): what any
    server an editor names may do."""

    def __init__(self, handle: Any) -> None:
        hits = self.hits = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits.append(dict(self.headers))
                handle(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self) -> Prometheus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def answer(handler: Any, body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> None:
    handler.send_response(status)
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)
