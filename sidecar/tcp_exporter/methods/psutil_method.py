"""psutil: the portable fallback, reading the socket table the way psutil does (/proc/net/tcp{,6} on Linux).

Needs no privilege, but reads and parses every TCP socket of the namespace
in Python: seconds per count at 100,000 connections.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from tcp_exporter.methods.base import AcceptedSampler, Counts, Options, Unavailable


def load() -> ModuleType | None:
    """The psutil library, or None where it is not installed. Imported only when this method may be used (it
    weighs about 0.5 MB), and before the exporter gives up root: its modules may not be readable afterwards."""
    try:
        return importlib.import_module("psutil")
    except ImportError:
        return None


class Psutil:
    name = "psutil"
    exact_accepted = False

    def __init__(self, ports: tuple[int, ...]) -> None:
        psutil = load()
        if psutil is None:
            raise Unavailable("the psutil library is not installed")
        self.psutil = psutil
        self.ports = ports
        self.sampler = AcceptedSampler(ports)
        try:
            self.sampler.baseline(self._snapshot())
        except (OSError, psutil.Error) as exc:
            raise Unavailable(f"psutil cannot read the socket table: {exc}") from exc

    def _snapshot(self) -> dict[int, set[object]]:
        snap: dict[int, set[object]] = {port: set() for port in self.ports}
        for conn in self.psutil.net_connections(kind="tcp"):
            if conn.status == "ESTABLISHED" and conn.laddr and conn.laddr.port in snap:
                snap[conn.laddr.port].add((conn.laddr, conn.raddr))
        return snap

    def count(self) -> Counts:
        snap = self._snapshot()
        return Counts(established={p: len(snap[p]) for p in self.ports}, accepted=self.sampler.update(snap))

    def close(self) -> None:
        pass


def open_method(ports: tuple[int, ...], options: Options) -> Psutil:
    return Psutil(ports)
