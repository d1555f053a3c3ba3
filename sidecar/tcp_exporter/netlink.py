"""Minimal netlink plumbing shared by the sock_diag and conntrack methods.

Reading (sockets, recv) is kept apart from parsing (pure functions over
bytes), so parsing is tested on recorded messages.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NLA_HDR = struct.Struct("=HH")  # len, type

NLMSG_ERROR = 2
NLMSG_DONE = 3

NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_ROOT = 0x100
NLM_F_MATCH = 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
NLM_F_CREATE = 0x400
NLM_F_APPEND = 0x800

NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

NETLINK_ROUTE = 0
NETLINK_SOCK_DIAG = 4
NETLINK_NETFILTER = 12

RECV_SIZE = 1 << 16


class NetlinkError(OSError):
    """The kernel answered a request with an error."""


def align(n: int) -> int:
    return (n + 3) & ~3


def nlmsg(msg_type: int, flags: int, seq: int, payload: bytes) -> bytes:
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(payload), msg_type, flags, seq, 0) + payload


def nla(attr_type: int, payload: bytes) -> bytes:
    length = NLA_HDR.size + len(payload)
    return NLA_HDR.pack(length, attr_type) + payload + b"\0" * (align(length) - length)


def nla_nested(attr_type: int, *children: bytes) -> bytes:
    return nla(attr_type | NLA_F_NESTED, b"".join(children))


def iter_messages(buf: bytes | memoryview) -> Iterator[tuple[int, int, int, int]]:
    """(type, flags, offset of payload, end of message) for each message in a buffer."""
    offset, end = 0, len(buf)
    while offset + NLMSG_HDR.size <= end:
        length, msg_type, flags, _seq, _pid = NLMSG_HDR.unpack_from(buf, offset)
        if length < NLMSG_HDR.size or offset + length > end:
            raise ValueError(f"malformed netlink message at offset {offset}")
        yield msg_type, flags, offset + NLMSG_HDR.size, offset + length
        offset += align(length)


def iter_attrs(buf: bytes | memoryview, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type without flags, payload start, payload end) for each attribute in buf[start:end]."""
    while start + NLA_HDR.size <= end:
        length, attr_type = NLA_HDR.unpack_from(buf, start)
        if length < NLA_HDR.size:
            return
        yield attr_type & NLA_TYPE_MASK, start + NLA_HDR.size, start + length
        start += align(length)


def error_code(buf: bytes | memoryview, payload: int) -> int:
    """The (negative) errno of an NLMSG_ERROR payload; 0 is an ACK."""
    return int(struct.unpack_from("=i", buf, payload)[0])


class Socket:
    """A netlink socket that sends requests and walks their answers."""

    def __init__(self, protocol: int, groups: int = 0, rcvbuf: int = 0) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
        self.seq = 0
        if rcvbuf:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE (needs CAP_NET_ADMIN)
            except PermissionError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind((0, groups))
        self.buf = bytearray(RECV_SIZE)

    def close(self) -> None:
        self.sock.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, (0, 0))

    def recv(self) -> memoryview:
        n = self.sock.recv_into(self.buf)
        return memoryview(self.buf)[:n]

    def dump(self, request: bytes) -> Iterator[memoryview]:
        """Send a dump request and yield each received buffer; the caller stops at NLMSG_DONE.

        Buffers are yielded whole so that callers can walk them at C speed.
        """
        self.send(request)
        while True:
            yield self.recv()


def walk(buf: bytes | memoryview, wanted: int) -> tuple[list[tuple[int, int]], bool]:
    """(payload start, end) of every message of type `wanted` in a dump buffer, and whether the dump ended.

    An error message raises NetlinkError.
    """
    found: list[tuple[int, int]] = []
    done = False
    for msg_type, _flags, payload, end in iter_messages(buf):
        if msg_type == wanted:
            found.append((payload, end))
        elif msg_type == NLMSG_DONE:
            done = True
        elif msg_type == NLMSG_ERROR:
            raise_for_error(buf, payload)
            done = True
    return found, done


def raise_for_error(buf: bytes | memoryview, payload: int) -> None:
    code = error_code(buf, payload)
    if code:
        raise NetlinkError(-code, os.strerror(-code))
