"""The kernel's socket table through netlink inet_diag, as ss(8) reads it: what the sockdiag method counts, and
what the conntrack method resyncs from. Shared by both as equals.

The kernel filters by state (ESTABLISHED) and by local port (a small bytecode program), so only the sockets that
count cross into Python; the answers are walked at C speed with struct.iter_unpack. No privilege needed.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from operator import itemgetter
from typing import TypeVar

from tcp_exporter import netlink

SOCK_DIAG_BY_FAMILY = 20
TCP_ESTABLISHED = 1
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_JMP = 1
INET_DIAG_BC_S_EQ = 11

REQ_V2 = struct.Struct("=BBBxI48x")  # family, protocol, ext, states, zeroed sockid
BC_OP = struct.Struct("=BBH")  # code, yes, no
# Offsets inside a SOCK_DIAG_BY_FAMILY message (nlmsghdr + inet_diag_msg).
SPORT_AT = 20
SRC_AT = 24
DST_AT = 40
COOKIE_AT = 60
MIN_MSG = 88
T = TypeVar("T")
V4_MAPPED = b"\0" * 10 + b"\xff\xff"


def bytecode(ports: tuple[int, ...]) -> bytes:
    """An inet_diag program accepting sockets whose local port is one of `ports`.

    Per port: S_EQ port (true: go on to a JMP that accepts; false: skip to the
    next port, or past the end, which rejects). The kernel's audit walks the
    `yes` chain, so every `yes` lands on the next op and the chain ends at the
    program's end.
    """
    length = 12 * len(ports)
    ops = []
    for i, port in enumerate(ports):
        remaining = length - 12 * i
        last = i == len(ports) - 1
        ops.append(BC_OP.pack(INET_DIAG_BC_S_EQ, 8, remaining + 4 if last else 12))
        ops.append(BC_OP.pack(0, 0, port))
        ops.append(BC_OP.pack(INET_DIAG_BC_JMP, 4, remaining - 8))
    return b"".join(ops)


def request(family: int, ports: tuple[int, ...], seq: int) -> bytes:
    payload = REQ_V2.pack(family, socket.IPPROTO_TCP, 0, 1 << TCP_ESTABLISHED)
    payload += netlink.nla(INET_DIAG_REQ_BYTECODE, bytecode(ports))
    return netlink.nlmsg(SOCK_DIAG_BY_FAMILY, netlink.NLM_F_REQUEST | netlink.NLM_F_DUMP, seq, payload)


_layouts: dict[int, tuple[struct.Struct, struct.Struct]] = {}


def _layout(length: int) -> tuple[struct.Struct, struct.Struct]:
    """For messages of one length: a header check, and the socket cookie (a native u64) of each."""
    if length not in _layouts:
        _layouts[length] = (
            struct.Struct(f"=IH{length - 6}x"),
            struct.Struct(f"={COOKIE_AT}xQ{length - COOKIE_AT - 8}x"),
        )
    return _layouts[length]


def cookies(buf: bytes | memoryview) -> tuple[list[int], bool]:
    """The socket cookie of each socket in one received buffer, and whether the dump ended.

    A dump's messages usually share one length; then the whole buffer is
    checked and read in C-level passes, with no Python code per socket.
    Otherwise, message by message.
    """
    found: list[int] = []
    if len(buf) < netlink.NLMSG_HDR.size:
        return found, False
    first_len, first_type = struct.unpack_from("=IH", buf, 0)
    start = 0
    if first_type == SOCK_DIAG_BY_FAMILY and first_len >= MIN_MSG and first_len % 4 == 0:
        n = len(buf) // first_len
        region = buf[: n * first_len]
        head, fields = _layout(first_len)
        if list(head.iter_unpack(region)).count((first_len, SOCK_DIAG_BY_FAMILY)) == n:
            found = list(map(itemgetter(0), fields.iter_unpack(region)))
            start = n * first_len
    rest = buf[start:]
    messages, done = netlink.walk(rest, SOCK_DIAG_BY_FAMILY)
    header = netlink.NLMSG_HDR.size
    found += [
        struct.unpack_from("=Q", rest, payload - header + COOKIE_AT)[0]
        for payload, end in messages
        if end - payload >= MIN_MSG - header
    ]
    return found, done


def parse_tuples(buf: bytes | memoryview, family: int) -> tuple[list[bytes], bool]:
    """Connection keys (local ip, remote ip, local port, remote port) of each socket, for conntrack's resync.

    IPv4 addresses, and IPv4-mapped IPv6 ones, are 4 bytes: the form conntrack reports them in.
    """
    keys: list[bytes] = []
    messages, done = netlink.walk(buf, SOCK_DIAG_BY_FAMILY)
    for payload, _end in messages:
        off = payload - netlink.NLMSG_HDR.size
        ports = bytes(buf[off + SPORT_AT : off + SPORT_AT + 4])
        src = bytes(buf[off + SRC_AT : off + SRC_AT + 16])
        dst = bytes(buf[off + DST_AT : off + DST_AT + 16])
        if family == socket.AF_INET:
            src, dst = src[:4], dst[:4]
        elif src.startswith(V4_MAPPED) and dst.startswith(V4_MAPPED):
            src, dst = src[12:], dst[12:]
        keys.append(src + dst + ports)
    return keys, done


@dataclass
class SocketTable:
    """Dumps of the ESTABLISHED sockets on the watched local ports, both address families."""

    ports: tuple[int, ...]

    def __post_init__(self) -> None:
        self.sock = netlink.Socket(netlink.NETLINK_SOCK_DIAG)  # OSError where sock_diag is refused
        self.lock = threading.Lock()

    def close(self) -> None:
        self.sock.close()

    def _dump(self, ports: tuple[int, ...], parse: Callable[[memoryview, int], tuple[T, bool]]) -> Iterator[T]:
        """Dump both address families for `ports`, yielding what `parse(buffer, family)` makes of each buffer."""
        with self.lock:
            try:
                for family in (socket.AF_INET, socket.AF_INET6):
                    for buf in self.sock.dump(request(family, ports, self.sock.next_seq())):
                        items, done = parse(buf, family)
                        yield items
                        if done:
                            break
            except BaseException:
                self._reopen()  # a dump cut short leaves answers queued that the next one would read
                raise

    def _reopen(self) -> None:
        self.sock.close()
        self.sock = netlink.Socket(netlink.NETLINK_SOCK_DIAG)

    def cookies(self, port: int) -> list[int]:
        """The socket cookie of every ESTABLISHED socket on one local port (both families).

        Cookies identify sockets for their whole life. (They are not handed out in order: the kernel
        gives each CPU a batch of them, so only set membership tells a new socket from an old one.)
        """
        found: list[int] = []
        for batch in self._dump((port,), lambda buf, _family: cookies(buf)):
            found += batch
        return found

    def connection_sets(self) -> dict[int, set[bytes]]:
        """Per watched port, the keys (local ip, remote ip, local port, remote port) of its connections."""
        out: dict[int, set[bytes]] = {port: set() for port in self.ports}
        for keys in self._dump(self.ports, parse_tuples):
            if len(self.ports) == 1:
                out[self.ports[0]].update(keys)
            else:
                for key in keys:
                    out[int.from_bytes(key[-4:-2], "big")].add(key)
        return out
