"""The sidecar's HTTP server: bounded whatever its clients do.

Any pod of the cluster can reach the metrics port, so no client may cost more than a bounded share, nor keep
Prometheus or the kubelet's probes out:
- one asyncio loop serves every connection (an idle one costs a few kilobytes, not a thread); counting runs on a
  small fixed pool, and cheap routes (`/healthz`) on the loop itself, never queued behind a count;
- a request head must arrive within `header_timeout` and fit in MAX_HEAD bytes; a kept-alive connection closes
  after `idle_timeout` or MAX_REQUESTS requests; an answer must be taken by the client within `write_timeout`;
- requests are read one at a time: a pipelined request is read only once the previous answer is sent, and a
  request with a body is refused and the connection closed (a body is never parsed as the next request);
- at `max_connections`, a new connection is always admitted. It closes, first, the connection that has kept
  the server waiting on its client longest, once that is more than GRACE seconds (idle clients, half requests,
  endless headers, clients that do not read their answers); else one asking faster than a request a second
  (pipelining; a kept-alive scraper asks once per interval); else one waiting on its client before one being
  answered. A
  scraper that has just connected or is being answered goes last, and old connections can never hold every
  slot. A request whose connection was closed while it waited for a counting thread is dropped unanswered.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)
MAX_HEAD = 8192  # bytes of request line and headers; Prometheus sends a few hundred
MAX_REQUESTS = 100  # per kept-alive connection (Prometheus reuses one per scrape interval: ~4 a minute)
COUNT_THREADS = 2
T = TypeVar("T")
GRACE = 0.5  # seconds a new or kept-alive connection may wait for its next request before it is first to go


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    body: bytes


REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    503: "Service Unavailable",
}
# A route: given the request's headers (lower-cased names), the response. Routes run on the counting pool.
Route = Callable[[dict[str, str]], Response]


@dataclass(frozen=True)
class Request:
    """What a waiting route is given: the headers (lower-cased names), the query string, the peer's address."""

    headers: dict[str, str]
    query: str
    peer: str


# A waiting route (a drain): a coroutine on the server's loop, which may wait long without holding a thread; it
# runs blocking work (a count) through `Server.off_loop`.
WaitingRoute = Callable[["Server", Request], Awaitable[Response]]


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
        write_timeout: float = 10.0,
        inline: frozenset[str] = frozenset(),
        waiting: dict[str, WaitingRoute] | None = None,
    ) -> None:
        self.sock = sock
        self.routes = routes
        self.waiting = waiting or {}
        self.inline = inline  # paths whose route is cheap: run on the loop, not queued on the counting pool
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.write_timeout = write_timeout
        self.pool = ThreadPoolExecutor(COUNT_THREADS, thread_name_prefix="count")
        # Each connection -> (waiting on its client, requests read, since when in that state, when admitted):
        # eviction's order.
        self.connections: dict[asyncio.StreamWriter, tuple[bool, int, float, float]] = {}
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
            # Each connection's handler ends on its closed stream (a read sees EOF): let them, and take their
            # outcomes, rather than leave them to the loop's stop, which asyncio logs as errors ("Task was
            # destroyed but it is pending"). Not cancelled: asyncio's stream callback logs a cancelled handler too.
            others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            if others:
                await asyncio.wait(others, timeout=1)
            for task in others:
                if task.done() and not task.cancelled():
                    task.exception()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(timeout=2)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=2)
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _admit(self, writer: asyncio.StreamWriter) -> None:
        """Always admitted: when full, another goes (see the module's docstring for which)."""
        if len(self.connections) >= self.max_connections:
            now = self.loop.time()
            victim = min(self.connections, key=lambda w: self._eviction_order(now, *self.connections[w]))
            del self.connections[victim]
            victim.transport.abort()  # at once: close() would wait to flush to a client that may never read
        now = self.loop.time()
        self.connections[writer] = (True, 0, now, now)

    @staticmethod
    def _eviction_order(
        now: float, on_client: bool, served: int, since: float, admitted: float
    ) -> tuple[bool, float, bool, float]:
        """Which connection goes first when one must: one that has kept us waiting on it past GRACE (idle, half a
        request, endless headers, not reading its answer); else one asking faster than a request a second
        (pipelining; a kept-alive scraper asks once per interval), the fastest first; else one waiting on its
        client before one being answered; the longest in its state first."""
        stale = on_client and now - since > GRACE
        rate = served / max(now - admitted, 1.0)
        return (not stale, -rate if rate > 1 else 0.0, not on_client, since)

    def _note(self, writer: asyncio.StreamWriter, on_client: bool, request: bool = False) -> None:
        """The connection's state: waiting on its client (for a request, or to take an answer) or on us; `request`:
        one more request read."""
        if writer not in self.connections:
            return
        _, served, _, admitted = self.connections[writer]
        self.connections[writer] = (on_client, served + request, self.loop.time(), admitted)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._admit(writer)
        timeout = self.header_timeout
        try:
            for served in range(1, MAX_REQUESTS + 1):
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
                except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                if writer not in self.connections:
                    return  # evicted meanwhile
                self._note(writer, on_client=False, request=True)
                keep_alive = await self._respond(head, writer, last=served == MAX_REQUESTS)
                if not keep_alive or writer not in self.connections:
                    return
                self._note(writer, on_client=True)
                timeout = self.idle_timeout
        finally:
            self.connections.pop(writer, None)
            writer.close()

    async def _respond(self, head: bytes, writer: asyncio.StreamWriter, last: bool = False) -> bool:
        """Answer one request; whether the connection stays open for the next."""
        try:
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, version = request_line.split(" ")
            headers = {}
            for line in header_lines:
                if line:
                    name, sep, value = line.partition(":")
                    if not sep:
                        raise ValueError(line)
                    headers[name.strip().lower()] = value.strip()
        except ValueError:
            return await self._write(writer, Response(400, "text/plain; charset=utf-8", b"bad request\n"), False, False)
        if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
            # Nothing here takes a body; not reading it would parse it as the next request.
            response = Response(413, "text/plain; charset=utf-8", b"request bodies are not accepted\n")
            return await self._write(writer, response, False, False)
        keep_alive = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close" and not last
        path, _, query = target.partition("?")
        route = self.routes.get(path)
        if method not in ("GET", "HEAD"):
            response = Response(405, "text/plain; charset=utf-8", b"method not allowed\n")
        elif path in self.waiting:
            peer = writer.get_extra_info("peername")
            response = await self.waiting[path](self, Request(headers, query, str(peer[0]) if peer else ""))
        elif route is None:
            response = Response(404, "text/plain; charset=utf-8", b"not found\n")
        elif path in self.inline:
            response = route(headers)
        else:
            response = await self.loop.run_in_executor(self.pool, self._unless_gone, writer, route, headers)
        self._note(writer, on_client=True)  # from here the client has to take the answer
        return await self._write(writer, response, keep_alive, method == "HEAD")

    async def off_loop(self, fn: Callable[[], T]) -> T:
        """`fn` on the counting pool, awaited from a waiting route."""
        return await self.loop.run_in_executor(self.pool, fn)

    @staticmethod
    def _unless_gone(writer: asyncio.StreamWriter, route: Route, headers: dict[str, str]) -> Response:
        """On the pool: the route, unless its connection was evicted while the request waited for a thread."""
        if writer.transport.is_closing():
            return Response(503, "text/plain; charset=utf-8", b"")
        return route(headers)

    async def _write(self, writer: asyncio.StreamWriter, response: Response, keep_alive: bool, head_only: bool) -> bool:
        """Send the answer; whether the connection may stay open (False when the client did not take it in time)."""
        lines = [
            f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Unknown')}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
            f"Connection: {'keep-alive' if keep_alive else 'close'}",
            "",
            "",
        ]
        if writer.is_closing():
            return False  # evicted while its answer was being made
        writer.write("\r\n".join(lines).encode("latin-1") + (b"" if head_only else response.body))
        try:
            await asyncio.wait_for(writer.drain(), self.write_timeout)
        except (TimeoutError, ConnectionError):
            writer.transport.abort()  # the client does not read (or left): dropped, unsent answer and all
            return False
        return keep_alive
