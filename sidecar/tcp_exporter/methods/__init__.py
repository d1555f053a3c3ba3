"""Counting methods: one module each behind one small interface.

A method that this kernel or privilege does not offer raises `Unavailable`
when opened: an expected outcome that the `auto` fallback chain is made of,
not a crash.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from tcp_exporter import contract

log = logging.getLogger(__name__)


class Unavailable(Exception):
    """This method cannot run here (kernel, privilege, missing library); the message says why."""


@dataclass
class Counts:
    """One count: ESTABLISHED inbound connections now, and accepted since start, per watched port."""

    established: dict[int, int]
    accepted: dict[int, int]


class Method(Protocol):
    name: str
    # True where the accepted counter sees every connection (conntrack events);
    # False where it is sampled at scrapes and misses connections that open and
    # close between two scrapes.
    exact_accepted: bool

    def count(self) -> Counts: ...

    def close(self) -> None: ...


@dataclass
class AcceptedSampler:
    """Accepted-connection counter for methods that only see snapshots.

    A connection is counted the first time a count sees it; the ones present
    when the method opened are the baseline, not counted.
    """

    ports: tuple[int, ...]
    previous: dict[int, set[object]] = field(default_factory=dict)
    totals: dict[int, int] = field(default_factory=dict)

    def baseline(self, current: dict[int, set[object]]) -> None:
        self.previous = current
        self.totals = dict.fromkeys(self.ports, 0)

    def update(self, current: dict[int, set[object]]) -> dict[int, int]:
        for port in self.ports:
            now = current.get(port, set())
            self.totals[port] += len(now - self.previous.get(port, set()))
        self.previous = current
        return dict(self.totals)


@dataclass(frozen=True)
class Options:
    """Settings some methods take."""

    resync_interval: float = 60.0  # conntrack: seconds between full resyncs from the socket table; 0: never
    # conntrack: whether it may switch connection tracking on for the namespace (its own nftables table). `auto`
    # never does: it uses conntrack only where something else already tracks connections.
    switch_on_tracking: bool = True


CONNTRACK_COUNT = "/proc/sys/net/netfilter/nf_conntrack_count"  # of the reader's network namespace


def tracking_active() -> bool:
    """Whether this network namespace already tracks connections (a mesh's or the app's own iptables/nftables
    rules registered conntrack's hooks): then it has entries. A fresh namespace has none."""
    try:
        with open(CONNTRACK_COUNT) as f:
            return int(f.read().strip() or 0) > 0
    except (OSError, ValueError):
        return False


Opener = Callable[[tuple[int, ...], Options], Method]


def _registry() -> dict[str, Opener]:
    from tcp_exporter.methods import conntrack, psutil_method, sockdiag

    return {"conntrack": conntrack.open_method, "sockdiag": sockdiag.open_method, "psutil": psutil_method.open_method}


NAMES = tuple(name for name in contract.METHODS if name != "auto")  # the one list: contract.METHODS
AUTO_ORDER = NAMES


def select(name: str, ports: Iterable[int], options: Options | None = None) -> tuple[Method, str]:
    """Open the named method, or for `auto` the first that is available here.

    Returns the method and a human reason for the choice.
    """
    port_tuple = tuple(sorted(set(ports)))
    options = options or Options()
    registry = _registry()
    if name != "auto":
        method = registry[name](port_tuple, options)
        return method, f"{name} requested"
    skipped = []
    for candidate in AUTO_ORDER:
        if candidate == "conntrack" and not tracking_active():
            skipped.append("conntrack: connection tracking is off in this namespace, and auto does not switch it on")
            continue
        try:
            opts = Options(options.resync_interval, switch_on_tracking=False) if candidate == "conntrack" else options
            method = registry[candidate](port_tuple, opts)
        except Unavailable as exc:
            skipped.append(f"{candidate}: {exc}")
            log.info("method %s unavailable: %s", candidate, exc)
            continue
        reason = f"auto chose {candidate}" + (f" ({'; '.join(skipped)})" if skipped else "")
        return method, reason
    raise Unavailable("no counting method is available: " + "; ".join(skipped))
