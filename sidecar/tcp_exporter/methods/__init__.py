"""Counting methods: one module each behind one small interface (`methods.base`), named in one registry here.

`auto` tries them in `AUTO_ORDER` and takes the first that opens here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from tcp_exporter import contract
from tcp_exporter.methods import conntrack, psutil_method, sockdiag
from tcp_exporter.methods.base import (
    AcceptedSampler,
    Counts,
    Method,
    Options,
    Unavailable,
    tracking_active,
)

__all__ = ["AUTO_ORDER", "NAMES", "AcceptedSampler", "Counts", "Method", "Options", "Unavailable", "select"]
log = logging.getLogger(__name__)
Opener = Callable[[tuple[int, ...], Options], Method]


REGISTRY: dict[str, Opener] = {
    "conntrack": conntrack.open_method,
    "sockdiag": sockdiag.open_method,
    "psutil": psutil_method.open_method,
}
NAMES = tuple(name for name in contract.METHODS if name != "auto")  # the one list: contract.METHODS
# auto's order, stated here and nowhere else: conntrack where connection tracking is already on and verified to
# follow new connections (it sees clients behind a mesh's redirect by their original destination), else the
# socket table through netlink (fast, no privilege), else psutil (slow, but needs only /proc).
AUTO_ORDER = ("conntrack", "sockdiag", "psutil")
if set(REGISTRY) != set(NAMES) or set(AUTO_ORDER) != set(NAMES):
    raise ImportError(f"the method registry {sorted(REGISTRY)} and auto's order disagree with contract.METHODS")


def select(name: str, ports: Iterable[int], options: Options | None = None) -> tuple[Method, str]:
    """Open the named method, or for `auto` the first that is available here.

    Returns the method and a human reason for the choice.
    """
    port_tuple = tuple(sorted(set(ports)))
    options = options or Options()
    if name != "auto":
        return REGISTRY[name](port_tuple, options), f"{name} requested"
    chosen, skipped = _first_of_auto(port_tuple, options, skip=())
    if chosen is None:
        raise Unavailable("no counting method is available: " + "; ".join(skipped))
    return chosen, f"auto chose {chosen.name}" + (f" ({'; '.join(skipped)})" if skipped else "")


def _first_of_auto(ports: tuple[int, ...], options: Options, skip: tuple[str, ...]) -> tuple[Method | None, list[str]]:
    """The first method of AUTO_ORDER (but `skip`) that opens here and can be trusted, and why each before it was
    passed over. conntrack only where the namespace already tracks connections (auto never switches it on) and
    a connection of our own shows that new ones are tracked."""
    skipped = []
    for candidate in AUTO_ORDER:
        if candidate in skip:
            continue
        if candidate == "conntrack" and not tracking_active():
            skipped.append("conntrack: connection tracking is off in this namespace, and auto does not switch it on")
            continue
        try:
            opts = Options(options.resync_interval, switch_on_tracking=False) if candidate == "conntrack" else options
            method = REGISTRY[candidate](ports, opts)
        except Unavailable as exc:
            skipped.append(f"{candidate}: {exc}")
            log.info("method %s unavailable: %s", candidate, exc)
            continue
        if candidate == "conntrack" and not conntrack.tracks_new_connections():
            method.close()
            skipped.append(
                "conntrack: the namespace has tracking entries but does not track new connections (stale entries), "
                "so its count would miss them"
            )
            continue
        return method, skipped
    return None, skipped


class Unopened:
    """No method could open: every count fails with the reason, so the exporter keeps serving (count_success 0,
    the reason in tcp_exporter_method_info) instead of exiting and taking the pod's readiness with it."""

    name = "none"
    exact_accepted = False

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def count(self) -> Counts:
        raise Unavailable(self.reason)

    def close(self) -> None:
        pass


def fallback(
    failed: str, error: Unavailable, ports: Iterable[int], options: Options | None = None
) -> tuple[Method, str]:
    """After `failed` could not open: the next method of auto's order that opens (and can be trusted), else
    `Unopened`. Never raises."""
    method, skipped = _first_of_auto(tuple(sorted(set(ports))), options or Options(), skip=(failed,))
    why = "; ".join([f"{failed}: {error}", *skipped])
    if method is None:
        return Unopened(f"no counting method could open: {why}"), f"no method opened ({why})"
    return method, f"fell back to {method.name} ({why})"
