"""Metrics produced at scrape time, and the HTTP server that serves them."""

from __future__ import annotations

import logging
import os
import platform
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from tcp_exporter import __version__
from tcp_exporter import contract as c
from tcp_exporter.methods import Counts, Method

log = logging.getLogger(__name__)
T = TypeVar("T")


class Coalescer(Generic[T]):
    """Runs `fn` for callers, one run at a time; callers that arrive during a run share the next one.

    Every caller gets the result of a run that started after it arrived, so
    concurrent scrapes stay exact while costing one count, not one each.
    """

    def __init__(self, fn: Callable[[], T]) -> None:
        self.fn = fn
        self.cond = threading.Condition()
        self.running = False
        self.generation = 0
        self.outcome: tuple[T | None, BaseException | None] = (None, None)

    def __call__(self) -> T:
        with self.cond:
            wanted = self.generation + (2 if self.running else 1)
            while self.generation < wanted:
                if self.running:
                    self.cond.wait()
                    continue
                self.running = True
                self.cond.release()
                try:
                    try:
                        outcome: tuple[T | None, BaseException | None] = (self.fn(), None)
                    except Exception as exc:  # handed to every waiting caller
                        outcome = (None, exc)
                finally:
                    self.cond.acquire()
                    self.running = False
                    self.generation += 1
                    self.outcome = outcome
                    self.cond.notify_all()
            result, error = self.outcome
            if error is not None:
                raise error
            return result  # type: ignore[return-value]


class ConnectionCollector(Collector):
    """Counts on each scrape: the gauge KEDA scales on, the accepted counter, self-metrics."""

    def __init__(self, method: Method, reason: str, deployment: str | None = None) -> None:
        self.method = method
        self.reason = reason
        # A constant label on the connection series, or none: (names, values) added to the port label.
        self.extra: tuple[list[str], list[str]] = ([c.DEPLOYMENT_LABEL], [deployment]) if deployment else ([], [])
        self.failures = 0
        self.last_duration = 0.0
        self.count = Coalescer(self._timed_count)

    def _timed_count(self) -> Counts:
        started = time.perf_counter()
        try:
            return self.method.count()
        except Exception:
            self.failures += 1
            log.exception("counting connections with %s failed", self.method.name)
            raise
        finally:
            self.last_duration = time.perf_counter() - started

    def collect(self) -> Iterator[Metric]:
        try:
            counts: Counts | None = self.count()
        except Exception:
            counts = None
        if counts is not None:
            established = GaugeMetricFamily(
                c.METRIC_ESTABLISHED,
                "Inbound TCP connections in state ESTABLISHED on the watched port, now.",
                labels=[c.PORT_LABEL, *self.extra[0]],
            )
            accepted = CounterMetricFamily(
                c.METRIC_ACCEPTED,
                "Inbound TCP connections established on the watched port since the exporter started"
                + (
                    " (exact, from conntrack events)."
                    if self.method.exact_accepted
                    else " (sampled: only connections still open at a scrape are seen)."
                ),
                labels=[c.PORT_LABEL, *self.extra[0]],
            )
            for port in sorted(counts.established):
                established.add_metric([str(port), *self.extra[1]], counts.established[port])
                accepted.add_metric([str(port), *self.extra[1]], counts.accepted[port])
            yield established
            yield accepted
        yield GaugeMetricFamily(
            c.METRIC_COUNT_SUCCESS, "1 if the last count succeeded, else 0.", value=1 if counts is not None else 0
        )
        yield GaugeMetricFamily(c.METRIC_COUNT_DURATION, "How long the last count took.", value=self.last_duration)
        yield CounterMetricFamily(c.METRIC_COUNT_FAILURES, "Counts that failed since start.", value=self.failures)
        method = InfoMetricFamily(c.METRIC_METHOD_INFO, "The counting method in use and why it was chosen.")
        method.add_metric(
            [],
            {
                "method": self.method.name,
                "reason": self.reason,
                "accepted": "exact" if self.method.exact_accepted else "sampled",
            },
        )
        yield method
        build = InfoMetricFamily(c.METRIC_BUILD_INFO, "Version of tcp-exporter.")
        build.add_metric([], {"version": __version__, "python": platform.python_version()})
        yield build


LANDING = """<!doctype html>
<html><head><title>tcp-exporter</title></head>
<body><h1>tcp-exporter</h1>
<p>Counting ESTABLISHED inbound TCP connections on port(s) {ports} with the {method} method.</p>
<ul><li><a href="/metrics">/metrics</a></li><li><a href="/healthz">/healthz</a></li></ul>
</body></html>
"""


def make_registry(collector: ConnectionCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(namespace=c.METRIC_PREFIX.rstrip("_"), registry=registry)
    return registry


def make_handler(registry: CollectorRegistry, landing: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = f"tcp-exporter/{__version__}"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == c.METRICS_PATH:
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._reply(200, content_type, encoder(registry))
            elif path == c.HEALTH_PATH:
                self._reply(200, "text/plain; charset=utf-8", b"ok\n")
            elif path == "/":
                self._reply(200, "text/html; charset=utf-8", landing.encode())
            else:
                self._reply(404, "text/plain; charset=utf-8", b"not found\n")

        def _reply(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


class V6Server(Server):
    address_family = socket.AF_INET6


class DualStackServer(Server):
    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def parse_listen_address(value: str) -> tuple[str, int]:
    """`:9100`, `0.0.0.0:9100`, `[::1]:9100` -> (host, port); raises ValueError."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"listen address {value!r} is not HOST:PORT (for example :9100)")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"listen port {port} is not in 1-65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


def _serve(server: ThreadingHTTPServer, wake: int) -> None:
    """Serve until `wake` becomes readable, blocking in select between requests: no polling."""
    with selectors.DefaultSelector() as selector:
        selector.register(server, selectors.EVENT_READ)
        selector.register(wake, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                if key.fileobj == wake:
                    return
                server.handle_request()


class Serving:
    """A server running in its own thread; stop() ends it."""

    def __init__(self, server: ThreadingHTTPServer) -> None:
        self.server = server
        self.wake_r, self.wake_w = os.pipe()
        self.thread = threading.Thread(target=_serve, args=(server, self.wake_r), name="http", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        os.write(self.wake_w, b"x")
        self.thread.join(timeout=2)
        self.server.server_close()
        os.close(self.wake_r)
        os.close(self.wake_w)


def serve(listen: tuple[str, int], registry: CollectorRegistry, landing: str) -> Serving:
    """Bind and start serving in a thread; raises OSError if the address cannot be bound."""
    host, port = listen
    handler = make_handler(registry, landing)
    server: ThreadingHTTPServer
    if host in ("", "::"):
        try:
            server = DualStackServer(("::", port), handler)
        except OSError as exc:
            if exc.errno not in (97, 99):  # EAFNOSUPPORT, EADDRNOTAVAIL: no IPv6 here
                raise
            server = Server(("0.0.0.0", port), handler)
    elif ":" in host:
        server = V6Server((host, port), handler)
    else:
        server = Server((host, port), handler)
    server.timeout = None
    return Serving(server)
