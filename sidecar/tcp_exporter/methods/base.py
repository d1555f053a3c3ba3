"""The interface every counting method implements, and what methods share: `Unavailable`, `Counts`, `Options`,
the sampled accepted-connection counter, and whether this namespace already tracks connections.

A method that this kernel or privilege does not offer raises `Unavailable` when opened: an expected outcome that
the `auto` fallback chain is made of, not a crash. The registry (`tcp_exporter.methods`) imports the methods;
they import only this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


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
