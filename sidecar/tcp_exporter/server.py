"""The sidecar's HTTP server: bounded whatever its clients do.

Any pod of the cluster can reach the metrics port, so a client that connects and sends nothing, or half a
request, must cost next to nothing and must not keep Prometheus out. One asyncio loop serves every
connection (an idle one costs a few kilobytes, not a thread); counting runs on a small fixed pool; a request
head must arrive within `header_timeout` and a kept-alive connection closes after `idle_timeout`; at
`max_connections`, a new connection closes the oldest one that is waiting for a request, so a flood of idle
clients cannot lock out a scraper.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

log = logging.getLogger(__name__)
MAX_HEAD = 8192  # bytes of request line and headers; Prometheus sends a few hundred
COUNT_THREADS = 2


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    body: bytes


REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
# A route: given the request's headers (lower-cased names), the response. Routes run on the counting pool.
Route = Callable[[dict[str, str]], Response]


def listening_socket(host: str, port: int) -> socket.socket:
    """Bound and listening; an empty host or `::` is every address, IPv6 and IPv4 where the kernel has both."""
    if host in ("", "::"):
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            family_host = "::"
        except OSError:
            sock, family_host = socket.socket(socket.AF_INET, socket.SOCK_STREAM), "0.0.0.0"
    else:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        family_host = host
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((family_host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class Server:
    """Serves `routes` (path -> Route) on `sock` from a thread of its own until stop()."""

    def __init__(
        self,
        sock: socket.socket,
        routes: dict[str, Route],
        max_connections: int = 64,
        header_timeout: float = 5.0,
        idle_timeout: float = 30.0,
    ) -> None:
        self.sock = sock
        self.routes = routes
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.pool = ThreadPoolExecutor(COUNT_THREADS, thread_name_prefix="count")
        # Connections in arrival order -> whether each is waiting for a request (evictable) or being answered.
        self.connections: dict[asyncio.StreamWriter, bool] = {}
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, name="http", daemon=True)
        self.thread.start()
        self.started.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, sock=self.sock, limit=MAX_HEAD))
        self.started.set()
        self.loop.run_forever()

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()
            for writer in list(self.connections):
                writer.close()
            await asyncio.sleep(0)

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(timeout=2)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=2)
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _admit(self, writer: asyncio.StreamWriter) -> bool:
        if len(self.connections) >= self.max_connections:
            idle = next((w for w, waiting in self.connections.items() if waiting), None)
            if idle is None:
                return False
            del self.connections[idle]
            idle.close()
        self.connections[writer] = True
        return True

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._admit(writer):
            writer.close()
            return
        timeout = self.header_timeout
        try:
            while True:
                self.connections[writer] = True  # waiting for a request: the first to go under pressure
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
                except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                if writer not in self.connections:
                    return  # evicted meanwhile
                self.connections[writer] = False
                keep_alive = await self._respond(head, writer)
                if not keep_alive:
                    return
                timeout = self.idle_timeout
        finally:
            self.connections.pop(writer, None)
            writer.close()

    async def _respond(self, head: bytes, writer: asyncio.StreamWriter) -> bool:
        try:
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, version = request_line.split(" ")
            headers = {}
            for line in header_lines:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
        except ValueError:
            await self._write(writer, Response(400, "text/plain; charset=utf-8", b"bad request\n"), False, False)
            return False
        keep_alive = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        if method not in ("GET", "HEAD"):
            response = Response(405, "text/plain; charset=utf-8", b"method not allowed\n")
        else:
            route = self.routes.get(target.split("?", 1)[0])
            if route is None:
                response = Response(404, "text/plain; charset=utf-8", b"not found\n")
            else:
                response = await self.loop.run_in_executor(self.pool, route, headers)
        await self._write(writer, response, keep_alive, method == "HEAD")
        return keep_alive

    @staticmethod
    async def _write(writer: asyncio.StreamWriter, response: Response, keep_alive: bool, head_only: bool) -> None:
        lines = [
            f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Unknown')}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
            f"Connection: {'keep-alive' if keep_alive else 'close'}",
            "",
            "",
        ]
        writer.write("\r\n".join(lines).encode("latin-1") + (b"" if head_only else response.body))
        with contextlib.suppress(ConnectionError):  # the client left; nothing to tell it
            await writer.drain()
