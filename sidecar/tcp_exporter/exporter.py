"""Metrics produced at scrape time, and the HTTP server that serves them."""

from __future__ import annotations

import logging
import platform
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from tcp_exporter import __version__
from tcp_exporter import contract as c
from tcp_exporter.methods import Counts, Method
from tcp_exporter.server import Response, Route, Server, listening_socket

log = logging.getLogger(__name__)
T = TypeVar("T")


class Coalescer(Generic[T]):
    """Runs `fn` for callers, one run at a time; callers that arrive during a run share the next one.

    Every caller gets the result of a run that started after it arrived, so
    concurrent scrapes stay exact while costing one count, not one each; or,
    within `window` seconds of the end of a successful run, that run's result.
    """

    def __init__(self, fn: Callable[[], T], window: float = 0.0) -> None:
        self.fn = fn
        self.window = window
        self.cond = threading.Condition()
        self.running = False
        self.generation = 0
        self.finished = float("-inf")
        self.outcome: tuple[T | None, BaseException | None] = (None, None)

    def __call__(self) -> T:
        with self.cond:
            if not self.running and self.outcome[1] is None and time.monotonic() - self.finished < self.window:
                # A count that ended moments ago: a tight scrape loop shares it instead of pinning the CPU limit.
                return self.outcome[0]  # type: ignore[return-value]
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
                    self.finished = time.monotonic()
                    self.outcome = outcome
                    self.cond.notify_all()
            result, error = self.outcome
            if error is not None:
                raise error
            return result  # type: ignore[return-value]


class ConnectionCollector(Collector):
    """Counts on each scrape: the gauge KEDA scales on, the accepted counter, self-metrics."""

    def __init__(
        self,
        method: Method,
        reason: str,
        deployment: str | None = None,
        share_window: float = 0.0,
        unhealthy_after: float = 0.0,  # 0: never unhealthy for a failed count
    ) -> None:
        self.method = method
        self.reason = reason
        self.unhealthy_after = unhealthy_after
        self.failing_since: float | None = None
        # A constant label on the connection series, or none: (names, values) added to the port label.
        self.extra: tuple[list[str], list[str]] = ([c.DEPLOYMENT_LABEL], [deployment]) if deployment else ([], [])
        self.failures = 0
        self.last_duration = 0.0
        self.count = Coalescer(self._timed_count, share_window)

    def _timed_count(self) -> Counts:
        started = time.perf_counter()
        try:
            counts = self.method.count()
            self.failing_since = None
            return counts
        except Exception:
            self.failures += 1
            if self.failing_since is None:
                self.failing_since = time.monotonic()
            log.exception("counting connections with %s failed", self.method.name)
            raise
        finally:
            self.last_duration = time.perf_counter() - started

    def failing_for(self) -> float:
        """Seconds since counting started failing without a success since; 0 if the last count succeeded."""
        return 0.0 if self.failing_since is None else time.monotonic() - self.failing_since

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
        if self.method.name == "conntrack":
            yield CounterMetricFamily(
                c.METRIC_CONNTRACK_RESYNCS,
                "Resyncs of the event-kept count from the socket table: at start, on schedule, after lost events.",
                value=getattr(self.method, "resyncs", 0),
            )
            yield CounterMetricFamily(
                c.METRIC_CONNTRACK_LOSSES,
                "Times the kernel dropped conntrack events (ENOBUFS); each is made good by a resync.",
                value=getattr(self.method, "losses", 0),
            )
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
    ProcessCollector(registry=registry)  # the standard process_* names, as every exporter has them
    return registry


def routes(registry: CollectorRegistry, collector: ConnectionCollector, landing: str) -> dict[str, Route]:
    def metrics(headers: dict[str, str]) -> Response:
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        return Response(200, content_type, encoder(registry))

    def health(_headers: dict[str, str]) -> Response:
        failing = collector.failing_for()
        if collector.unhealthy_after and failing > collector.unhealthy_after:
            return Response(503, "text/plain; charset=utf-8", f"counting has failed for {failing:.0f} s\n".encode())
        return Response(200, "text/plain; charset=utf-8", b"ok\n")

    return {
        c.METRICS_PATH: metrics,
        c.HEALTH_PATH: health,
        "/": lambda _headers: Response(200, "text/html; charset=utf-8", landing.encode()),
    }


def parse_listen_address(value: str) -> tuple[str, int]:
    """`:9100`, `0.0.0.0:9100`, `[::1]:9100` -> (host, port); raises ValueError."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not re.fullmatch(r"[0-9]{1,5}", port_text):
        raise ValueError(f"listen address {value!r} is not HOST:PORT (for example :9100)")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"listen port {port} is not in 1-65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


def serve(
    listen: tuple[str, int],
    registry: CollectorRegistry,
    collector: ConnectionCollector,
    landing: str,
    max_connections: int = 64,
) -> Server:
    """Bind and start serving in a thread; raises OSError if the address cannot be bound."""
    return Server(
        listening_socket(*listen),
        routes(registry, collector, landing),
        max_connections=max_connections,
        inline=frozenset({c.HEALTH_PATH, "/"}),  # cheap (no count): answered even while every count thread is busy
    )
