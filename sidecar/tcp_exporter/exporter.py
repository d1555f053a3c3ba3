"""Metrics produced at scrape time, and the HTTP server that serves them."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import platform
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from tcp_exporter import __version__
from tcp_exporter import contract as c
from tcp_exporter.methods import Counts, Method
from tcp_exporter.server import Request, Response, Route, Server, listening_socket

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

    def __call__(self, fresh: bool = False) -> T:
        """`fresh`: a run that started after the call, whatever the window (a drain must not end on a count
        taken before it began)."""
        with self.cond:
            if (
                not fresh
                and not self.running
                and self.outcome[1] is None
                and time.monotonic() - self.finished < self.window
            ):
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
        self.draining_since: float | None = None  # monotonic time a drain began (Drain)
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
        draining = GaugeMetricFamily(
            c.METRIC_DRAINING,
            "1 once a drain began (the pod is terminating: leave its connections out of the scaling signal), else 0.",
            labels=self.extra[0],
        )
        draining.add_metric(self.extra[1], 0 if self.draining_since is None else 1)
        yield draining
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


class Drain:
    """GET /drain?timeout=SECONDS[&floor=N]: mark the sidecar draining (for good), then answer once the watched
    ports hold at most N ESTABLISHED connections (default 0) or SECONDS have passed, counting every `poll` seconds.

    A preStop hook of the pod calls it, so that the app gets its SIGTERM only once its clients have left. Only from
    inside the pod (loopback) or with the token (the kubelet, from the node): another pod that could mark this one
    draining would take its connections out of its Deployment's scaling signal.
    """

    def __init__(self, collector: ConnectionCollector, token: str | None, poll: float = 1.0) -> None:
        self.collector = collector
        self.token = token
        self.poll = poll

    def allowed(self, request: Request) -> bool:
        given = request.headers.get(c.DRAIN_HEADER.lower(), "")
        if self.token and hmac.compare_digest(given.encode("latin-1"), self.token.encode()):
            return True
        try:
            peer = ipaddress.ip_address(request.peer.split("%", 1)[0])
        except ValueError:
            return False
        mapped = getattr(peer, "ipv4_mapped", None)
        return (mapped or peer).is_loopback

    @staticmethod
    def parse(query: str) -> tuple[float, int]:
        """(timeout, floor) from the query string; ValueError with what is wrong."""
        fields = urllib.parse.parse_qs(query, keep_blank_values=True, max_num_fields=4)
        unknown = set(fields) - {"timeout", "floor"}
        if unknown or any(len(v) != 1 for v in fields.values()):
            raise ValueError("give timeout=SECONDS and optionally floor=N, once each")
        timeout_text = fields.get("timeout", [""])[0]
        if not re.fullmatch(r"[0-9]{1,6}(\.[0-9]{1,3})?", timeout_text) or float(timeout_text) > c.DRAIN_MAX_SECONDS:
            raise ValueError(f"timeout: seconds from 0 to {c.DRAIN_MAX_SECONDS}")
        floor_text = fields.get("floor", ["0"])[0]
        if not re.fullmatch(r"[0-9]{1,9}", floor_text):
            raise ValueError("floor: a whole number of connections")
        return float(timeout_text), int(floor_text)

    def established(self) -> int | None:
        try:
            return sum(self.collector.count(fresh=True).established.values())
        except Exception:  # counted again at the next poll; the timeout bounds the wait
            return None

    async def __call__(self, server: Server, request: Request) -> Response:
        text = "text/plain; charset=utf-8"
        if not self.allowed(request):
            return Response(403, text, b"a drain is asked for from inside the pod, or with the pod's token\n")
        try:
            timeout, floor = self.parse(request.query)
        except ValueError as exc:
            return Response(400, text, f"{exc}\n".encode())
        started = time.monotonic()
        if self.collector.draining_since is None:
            self.collector.draining_since = started
            log.info("draining: waiting up to %.0f s for at most %d connection(s)", timeout, floor)
        while True:
            left = await server.off_loop(self.established)
            waited = time.monotonic() - started
            if left is not None and left <= floor:
                log.info("drained: %d connection(s) left after %.1f s", left, waited)
                return Response(200, text, f"drained: {left} connection(s) left after {waited:.1f} s\n".encode())
            if waited >= timeout:
                log.info("drain time is up after %.1f s: %s connection(s) left", waited, left)
                return Response(200, text, f"time is up after {waited:.1f} s: {left} connection(s) left\n".encode())
            await asyncio.sleep(min(self.poll, timeout - waited))


LANDING = """<!doctype html>
<html><head><title>tcp-exporter</title></head>
<body><h1>tcp-exporter</h1>
<p>Counting ESTABLISHED inbound TCP connections on port(s) {ports} with the {method} method.</p>
<ul><li><a href="/metrics">/metrics</a></li><li><a href="/healthz">/healthz</a></li>
<li>/drain?timeout=SECONDS: wait for the connections to end (from inside the pod, or with its token)</li></ul>
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
    drain_token: str | None = None,
) -> Server:
    """Bind and start serving in a thread; raises OSError if the address cannot be bound."""
    return Server(
        listening_socket(*listen),
        routes(registry, collector, landing),
        max_connections=max_connections,
        inline=frozenset({c.HEALTH_PATH, "/"}),  # cheap (no count): answered even while every count thread is busy
        waiting={c.DRAIN_PATH: Drain(collector, drain_token)},
    )
