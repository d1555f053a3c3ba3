"""Real network namespaces for tests and benchmarks.

A `Pair` is two namespaces joined by a veth pair: the "pod" (where the
exporter and the server run) and a "peer" (the clients, and a server on the
same port for the pod's own outbound connections). Addresses come from the
benchmarking ranges 198.18.0.0/15 and fd00::/8 only.

Sockets are made inside a namespace by a thread that joined it with setns();
a socket stays in its namespace whichever thread uses it afterwards.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def run(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    return proc.stdout


def join_netns(name: str) -> None:
    """Move the calling thread (only it) into network namespace `name`."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns failed")
    finally:
        os.close(fd)


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run fn in a thread that has joined network namespace `name`; return its result.

    Processes that fn starts are in that namespace too (a child inherits its forking thread's).
    """
    box: dict[str, object] = {}

    def target() -> None:
        try:
            join_netns(name)
            box["result"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]


@dataclass
class Pair:
    pod: str
    peer: str
    index: int
    pod_v4: str
    peer_v4: str
    pod_v6: str
    peer_v6: str
    peer_extra_v4: list[str]

    def exec(self, ns: str, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", ns, *cmd]

    def ss_established(self, port: int) -> int:
        """Ground truth, independent of our code: ss(8) on the pod's socket table."""
        out = run(*self.exec(self.pod, "ss", "-Htn", "state", "established", f"( sport = :{port} )"))
        return len([line for line in out.splitlines() if line.strip()])


_counter = 0
_lock = threading.Lock()


@contextlib.contextmanager
def pair(extra_peer_addresses: int = 0) -> Iterator[Pair]:
    """Two fresh namespaces joined by veth, torn down afterwards.

    The peer can get extra IPv4 addresses, as many client sources (each has its own ephemeral ports).
    """
    global _counter
    with _lock:
        _counter += 1
        n = _counter % 250
    tag = uuid.uuid4().hex[:6]
    pod, peer = f"tcpx-pod-{tag}", f"tcpx-peer-{tag}"
    veth_pod, veth_peer = f"tp{tag}", f"tq{tag}"
    # 198.18.N.0/24 and fd00:7c9::N:0/112, N from a per-process counter.
    extra = [f"198.18.{n}.{3 + i}" for i in range(extra_peer_addresses)]
    p = Pair(pod, peer, n, f"198.18.{n}.1", f"198.18.{n}.2", f"fd00:7c9::{n:x}:1", f"fd00:7c9::{n:x}:2", extra)
    run("ip", "netns", "add", pod)
    try:
        run("ip", "netns", "add", peer)
        run("ip", "link", "add", veth_pod, "netns", pod, "type", "veth", "peer", "name", veth_peer, "netns", peer)
        for ns, dev, v4, v6 in ((pod, veth_pod, p.pod_v4, p.pod_v6), (peer, veth_peer, p.peer_v4, p.peer_v6)):
            run(*p.exec(ns, "ip", "link", "set", "lo", "up"))
            run(*p.exec(ns, "ip", "addr", "add", f"{v4}/24", "dev", dev))
            run(*p.exec(ns, "ip", "-6", "addr", "add", f"{v6}/112", "dev", dev, "nodad"))
            run(*p.exec(ns, "ip", "link", "set", dev, "up"))
        for address in extra:
            run(*p.exec(peer, "ip", "addr", "add", f"{address}/24", "dev", veth_peer))
        yield p
    finally:
        for ns in (pod, peer):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def http_get(ns: str, url: str, timeout: float = 5) -> str | None:
    """GET url from inside namespace `ns`; None if it cannot be reached."""
    import urllib.request

    def fetch() -> str | None:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return str(resp.read().decode())
        except OSError:
            return None

    return in_netns(ns, fetch)


def listener(ns: str, port: int, family: int = socket.AF_INET6, host: str = "::", backlog: int = 4096) -> socket.socket:
    """A listening socket in `ns` (dual-stack by default)."""

    def make() -> socket.socket:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind((host, port))
        s.listen(backlog)
        return s

    return in_netns(ns, make)


def connect(ns: str, host: str, port: int, count: int = 1) -> list[socket.socket]:
    """`count` connections from namespace `ns` to host:port, each established when this returns."""

    def make() -> list[socket.socket]:
        out = []
        for _ in range(count):
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM)
            s.connect((host, port))
            out.append(s)
        return out

    return in_netns(ns, make)


def accept(server: socket.socket, count: int) -> list[socket.socket]:
    return [server.accept()[0] for _ in range(count)]


@dataclass
class Lan:
    """A switch: one namespace (the "lan": clients) bridged to several pod namespaces, and optionally to this
    host's namespace (where the control plane and Prometheus listen on loopback), on 198.19.N.0/24 and
    fd00:7ca:N::/64."""

    lan: str
    lan_v4: str
    pods: list[str]
    pod_v4: list[str]
    pod_v6: list[str]
    host_v4: str | None = None


def _free_lan_subnet() -> int:
    """N of a 198.19.N.0/24 this host has no address or route in: another process (a bench next to the tests)
    numbers its LANs too, and two host veths on one subnet would take each other's traffic."""
    global _counter
    with _lock:
        taken = "".join(
            subprocess.run(["ip", "-4", *what], capture_output=True, text=True).stdout
            for what in (["-o", "addr", "show"], ["route", "show"])
        )
        for _ in range(250):
            _counter += 1
            n = (os.getpid() + _counter) % 250
            if f"198.19.{n}." not in taken:
                return n
    raise RuntimeError("no free 198.19.N.0/24 left for a test LAN")


@contextlib.contextmanager
def lan(pods: int, host: bool = False) -> Iterator[Lan]:
    """A bridge in a fresh namespace and `pods` fresh namespaces attached to it; with `host`, a veth from this
    namespace to the bridge too, so that a process here reaches the pods (it goes when the bridge's does)."""
    n = _free_lan_subnet()
    tag = uuid.uuid4().hex[:6]
    hub = f"tcpx-lan-{tag}"
    names = [f"tcpx-p{i}-{tag}" for i in range(pods)]
    result = Lan(
        hub,
        f"198.19.{n}.254",
        names,
        [f"198.19.{n}.{i + 1}" for i in range(pods)],
        [f"fd00:7ca:{n:x}::{i + 1:x}" for i in range(pods)],
        f"198.19.{n}.253" if host else None,
    )
    run("ip", "netns", "add", hub)
    try:
        run("ip", "netns", "exec", hub, "ip", "link", "set", "lo", "up")
        run("ip", "netns", "exec", hub, "ip", "link", "add", "br0", "type", "bridge")
        run("ip", "netns", "exec", hub, "ip", "addr", "add", f"{result.lan_v4}/24", "dev", "br0")
        run("ip", "netns", "exec", hub, "ip", "-6", "addr", "add", f"fd00:7ca:{n:x}::fe/64", "dev", "br0", "nodad")
        run("ip", "netns", "exec", hub, "ip", "link", "set", "br0", "up")
        for i, (ns, v4, v6) in enumerate(zip(names, result.pod_v4, result.pod_v6, strict=True)):
            run("ip", "netns", "add", ns)
            run("ip", "link", "add", f"l{i}{tag}", "netns", hub, "type", "veth", "peer", "name", "eth0", "netns", ns)
            run("ip", "netns", "exec", hub, "ip", "link", "set", f"l{i}{tag}", "master", "br0", "up")
            run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{v4}/24", "dev", "eth0")
            run("ip", "netns", "exec", ns, "ip", "-6", "addr", "add", f"{v6}/64", "dev", "eth0", "nodad")
            run("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
        if host:
            run("ip", "link", "add", f"h{tag}", "type", "veth", "peer", "name", f"j{tag}", "netns", hub)
            run("ip", "netns", "exec", hub, "ip", "link", "set", f"j{tag}", "master", "br0", "up")
            run("ip", "addr", "add", f"{result.host_v4}/24", "dev", f"h{tag}")
            run("ip", "-6", "addr", "add", f"fd00:7ca:{n:x}::fd/64", "dev", f"h{tag}", "nodad")
            run("ip", "link", "set", f"h{tag}", "up")
        yield result
    finally:
        for ns in [*names, hub]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        if host:
            subprocess.run(["ip", "link", "del", f"h{tag}"], capture_output=True)
