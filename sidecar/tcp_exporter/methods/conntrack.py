"""conntrack: connection-tracking events through ctnetlink. Needs CAP_NET_ADMIN.

Tracking is off in a fresh network namespace, so opening this method installs
our nftables table (see tcp_exporter.nftables), and closing it removes it.

How the count stays exact:
- Subscribe to conntrack NEW/UPDATE/DESTROY events first, then read the
  socket table once (the resync): every ESTABLISHED socket on a watched port
  is known, including idle ones that predate us and that conntrack, which only
  sees packets, has never seen.
- Events then move connections in and out: a connection whose handshake was
  seen (SYN_SENT/SYN_RECV, then ESTABLISHED) is counted as accepted, exactly;
  any state past ESTABLISHED, or a DESTROY, removes it.
- Connections known only from the socket table (they predate us) are checked
  against the socket table at each count while any is left, so they cannot
  go stale: conntrack's view of them is unreliable, since it picks up
  connections mid-stream, even from the last ACK of one that is closing.
- A count first drains every queued event, so it sees what happened up to the
  moment of the scrape. Event loss (ENOBUFS) and a periodic timer trigger a
  full resync from the socket table; connections opened since the start are
  tracked by conntrack, so after a resync events keep them again, and an
  update to ESTABLISHED whose earlier events were lost still counts.
Between scrapes the only work is handling events (and the periodic resync).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import struct
import threading
import time

from tcp_exporter import netlink, nftables
from tcp_exporter.methods.base import Counts, Options, Unavailable
from tcp_exporter.sockets import SocketTable

log = logging.getLogger(__name__)

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
NFNLGRP_CONNTRACK_NEW = 1
NFNLGRP_CONNTRACK_UPDATE = 2
NFNLGRP_CONNTRACK_DESTROY = 3

CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_PROTOINFO = 4
CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_PROTOINFO_TCP = 1
CTA_PROTOINFO_TCP_STATE = 1

SYN_SENT, SYN_RECV, ESTABLISHED, SYN_SENT2 = 1, 2, 3, 9
HANDSHAKE = frozenset((SYN_SENT, SYN_RECV, SYN_SENT2))

RTM_NEWADDR = 20
RTM_GETADDR = 22
IFA_ADDRESS, IFA_LOCAL = 1, 2
EVENT_RCVBUF = 8 << 20
LOOPBACK6 = socket.inet_pton(socket.AF_INET6, "::1")
DRAIN_BUDGET = 0.05  # seconds a count spends on queued events at most


def parse_event(buf: bytes | memoryview, start: int, end: int) -> tuple[bytes, bytes, int, int, int | None] | None:
    """(src, dst, sport, dport, TCP state or None) of a conntrack message's original tuple; None if not TCP.

    `start` is where the attributes begin (after the nfgenmsg header).
    """
    src = dst = b""
    sport = dport = proto = 0
    state: int | None = None
    for attr, a, b in netlink.iter_attrs(buf, start, end):
        if attr == CTA_TUPLE_ORIG:
            for inner, c, d in netlink.iter_attrs(buf, a, b):
                if inner == CTA_TUPLE_IP:
                    for ip_attr, e, f in netlink.iter_attrs(buf, c, d):
                        if ip_attr in (CTA_IP_V4_SRC, CTA_IP_V6_SRC):
                            src = bytes(buf[e:f])
                        elif ip_attr in (CTA_IP_V4_DST, CTA_IP_V6_DST):
                            dst = bytes(buf[e:f])
                elif inner == CTA_TUPLE_PROTO:
                    for p_attr, e, f in netlink.iter_attrs(buf, c, d):
                        if p_attr == CTA_PROTO_NUM:
                            proto = buf[e]
                        elif p_attr == CTA_PROTO_SRC_PORT:
                            sport = int.from_bytes(buf[e:f], "big")
                        elif p_attr == CTA_PROTO_DST_PORT:
                            dport = int.from_bytes(buf[e:f], "big")
        elif attr == CTA_PROTOINFO:
            for inner, c, d in netlink.iter_attrs(buf, a, b):
                if inner == CTA_PROTOINFO_TCP:
                    for t_attr, e, _f in netlink.iter_attrs(buf, c, d):
                        if t_attr == CTA_PROTOINFO_TCP_STATE:
                            state = buf[e]
    if proto != socket.IPPROTO_TCP:
        return None
    return src, dst, sport, dport, state


def reply_source_port(buf: bytes | memoryview, start: int, end: int) -> int | None:
    """The source port of a conntrack entry's reply tuple: where the answers come from. Behind an inbound
    REDIRECT (a mesh's proxy) it is the proxy's port, not the original destination port."""
    for attr, a, b in netlink.iter_attrs(buf, start, end):
        if attr == CTA_TUPLE_REPLY:
            for inner, c, d in netlink.iter_attrs(buf, a, b):
                if inner == CTA_TUPLE_PROTO:
                    for p_attr, e, f in netlink.iter_attrs(buf, c, d):
                        if p_attr == CTA_PROTO_SRC_PORT:
                            return int.from_bytes(buf[e:f], "big")
    return None


def loopback(address: bytes) -> bool:
    return address[:1] == b"\x7f" or address == LOOPBACK6


def local_addresses() -> set[bytes]:
    """Every address of this network namespace (4 bytes for IPv4, 16 for IPv6), from RTM_GETADDR."""
    sock = netlink.Socket(netlink.NETLINK_ROUTE)
    out: set[bytes] = set()
    try:
        req = netlink.nlmsg(
            RTM_GETADDR,
            netlink.NLM_F_REQUEST | netlink.NLM_F_DUMP,
            sock.next_seq(),
            struct.pack("=BBBBI", socket.AF_UNSPEC, 0, 0, 0, 0),
        )
        for buf in sock.dump(req):
            messages, done = netlink.walk(buf, RTM_NEWADDR)
            for payload, end in messages:
                for attr, a, b in netlink.iter_attrs(buf, payload + 8, end):
                    if attr in (IFA_ADDRESS, IFA_LOCAL):
                        out.add(bytes(buf[a:b]))
            if done:
                return out
    finally:
        sock.close()
    return out


class Conntrack:
    name = "conntrack"
    exact_accepted = True

    def __init__(
        self,
        ports: tuple[int, ...],
        resync_interval: float = 60.0,
        rcvbuf: int = EVENT_RCVBUF,
        switch_on_tracking: bool = True,
    ) -> None:
        self.ports = ports
        self.port_set = frozenset(ports)
        self.resync_interval = resync_interval
        self.lock = threading.Lock()
        self.established: dict[int, set[bytes]] = {p: set() for p in ports}  # kept by events
        self.unwatched: dict[int, set[bytes]] = {p: set() for p in ports}  # only the socket table knows them
        self.handshakes: set[bytes] = set()
        self.accepted = dict.fromkeys(ports, 0)
        self.local: set[bytes] = set()
        # An inbound REDIRECT in this namespace (a mesh's proxy): then the clients' connections end at the proxy,
        # the socket table shows only the proxy's own connections to the app, and the count comes from conntrack
        # alone, by original destination, without the pod's own (the proxy's) connections to the watched port.
        self.redirect = False
        self.redirect_seen = False  # a redirected event arrived: switch (resync from conntrack) when drained
        self.resyncs = 0  # full resyncs from the socket table, the first at start included
        self.losses = 0  # times the kernel dropped events (ENOBUFS), each made good by a resync
        self.lost = False  # events were dropped: resync when the queue is next empty
        groups = (
            (1 << (NFNLGRP_CONNTRACK_NEW - 1))
            | (1 << (NFNLGRP_CONNTRACK_UPDATE - 1))
            | (1 << (NFNLGRP_CONNTRACK_DESTROY - 1))
        )
        try:
            self.events = netlink.Socket(netlink.NETLINK_NETFILTER, groups=groups, rcvbuf=rcvbuf)
        except OSError as exc:
            raise Unavailable(f"cannot subscribe to conntrack events (needs CAP_NET_ADMIN): {exc}") from exc
        self.table: SocketTable | None = None
        self.tracking: nftables.Tracking | None = None
        try:
            self.events.sock.setblocking(False)
            if switch_on_tracking:
                self.tracking = nftables.Tracking()
            self.table = SocketTable(ports)
            with self.lock:
                self._resync(initial=True)
        except (OSError, Unavailable) as exc:
            self._release()
            raise Unavailable(f"cannot make conntrack active here (needs CAP_NET_ADMIN): {exc}") from exc
        self.wake_r, self.wake_w = os.pipe()
        self.thread = threading.Thread(target=self._run, name="conntrack-events", daemon=True)
        self.thread.start()

    # -- keys ---------------------------------------------------------------

    def _key(self, src: bytes, dst: bytes, sport: int, dport: int) -> tuple[int, bytes] | None:
        """(watched port, key) for a flow to or from a watched local port; None for anything else."""
        if self.redirect and (loopback(src) or src in self.local):
            return None  # behind a redirect, the pod's own connections to the port are the proxy's
        if dport in self.port_set and dst in self.local:
            return dport, dst + src + dport.to_bytes(2, "big") + sport.to_bytes(2, "big")
        # A connection picked up mid-stream from a reply packet has its tuple reversed.
        if sport in self.port_set and src in self.local:
            return sport, src + dst + sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
        return None

    # -- events ---------------------------------------------------------------

    def _handle(self, buf: memoryview) -> None:
        for msg_type, flags, payload, end in netlink.iter_messages(buf):
            if msg_type >> 8 != NFNL_SUBSYS_CTNETLINK:
                continue
            event = parse_event(buf, payload + 4, end)
            if event is None:
                continue
            src, dst, sport, dport, state = event
            if not self.redirect and dport in self.port_set:
                answering = reply_source_port(buf, payload + 4, end)
                if answering is not None and answering != dport:
                    self.redirect_seen = True
            found = self._key(src, dst, sport, dport)
            if found is None:
                continue
            port, key = found
            if (msg_type & 0xFF) == IPCTNL_MSG_CT_DELETE or (
                state is not None and state > ESTABLISHED and state != SYN_SENT2
            ):
                self.established[port].discard(key)
                self.unwatched[port].discard(key)
                self.handshakes.discard(key)
            elif state in HANDSHAKE:
                self.handshakes.add(key)
            elif state == ESTABLISHED and self._is_new(port, key, flags):
                self.handshakes.discard(key)
                self.established[port].add(key)
                self.accepted[port] += 1

    def _is_new(self, port: int, key: bytes, flags: int) -> bool:
        """Whether an ESTABLISHED event is a connection to add: its handshake was seen, or its earlier
        events were lost (an update, not a creation). A creation in ESTABLISHED is conntrack "picking up" a
        connection mid-stream, even from the last ACK of one that is closing: only the socket table is
        trusted for those."""
        if key in self.established[port] or key in self.unwatched[port]:
            return False
        return key in self.handshakes or not flags & netlink.NLM_F_CREATE

    def _drain_once(self) -> bool:
        """Handle one received buffer of events; False when none is queued. Called with the lock held."""
        try:
            buf = self.events.recv()
        except BlockingIOError:
            if self.lost:
                # Resync only once the queue is empty: while it is full the kernel keeps dropping events,
                # and a connection whose every event is dropped after a resync would never be seen.
                self.lost = False
                self._resync(initial=False)
            return False
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                raise
            if not self.lost:
                log.warning("conntrack events were lost (ENOBUFS): will resync from the socket table")
                self.losses += 1
            self.lost = True
            return True
        self._handle(buf)
        if self.redirect_seen and not self.redirect:
            log.info("connections to the watched port are redirected (a mesh's proxy): counting them by their "
                     "original destination, from conntrack alone")  # fmt: skip
            self.redirect = True
            self._resync(initial=False)
        return True

    def _drain(self, budget: float) -> None:
        """Handle queued events for at most `budget` seconds. Called with the lock held.

        Without churn the queue empties at once and the count is exact at the
        moment of the scrape; under heavy churn the budget bounds scrape latency.
        """
        deadline = time.monotonic() + budget
        while self._drain_once() and time.monotonic() < deadline:
            pass

    def _dump(self) -> tuple[list[tuple[bytes, bytes, int, int]], bool]:
        """The (src, dst, sport, dport) of every ESTABLISHED conntrack entry, and whether any to a watched port is
        redirected. Keyed by the caller, once it knows whether the namespace redirects."""
        return dump_established(self.port_set)

    def _resync(self, initial: bool) -> None:
        """Rebuild the connection sets from the socket table (behind a redirect: from conntrack). Called with the
        lock held."""
        assert self.table is not None
        self.local = local_addresses()
        if initial or self.redirect:
            flows, redirected = self._dump()  # one dump: at start it also tells whether the namespace redirects
            self.redirect = self.redirect or redirected
        if self.redirect:
            current: dict[int, set[bytes]] = {port: set() for port in self.ports}
            for flow in flows:
                found = self._key(*flow)
                if found is not None:
                    current[found[0]].add(found[1])
            for port in self.ports:
                now, known = current[port], self.established[port]
                self.accepted[port] += 0 if initial else len(now) - sum(map(known.__contains__, now))
                self.unwatched[port] = set()  # conntrack has seen them all: it was on before the proxy
                self.established[port] = now
            self.handshakes.clear()
            self.resyncs += 1
            return
        current = self.table.connection_sets()
        for port in self.ports:
            now = current[port]
            if initial:
                # They predate us: conntrack may never have seen them, so the socket table keeps watch.
                self.unwatched[port] = now
                continue
            # Since the start conntrack tracks every new connection, so events will report the close of
            # those whose opening events were lost: they join the event-kept set. Sets are reused in place,
            # so that at 100,000 connections no third copy of them exists even for a moment.
            known, unwatched = self.established[port], self.unwatched[port]
            self.accepted[port] += len(now) - sum(map(known.__contains__, now)) - sum(map(unwatched.__contains__, now))
            unwatched &= now
            now -= unwatched
            self.established[port] = now
        # A handshake seen before is either established by now (the socket table has it) or gone; one still
        # under way is counted anyway when its ESTABLISHED update comes (an update, not a creation).
        self.handshakes.clear()
        self.resyncs += 1

    def _run(self) -> None:
        """Handle events as they come, and resync on a fixed schedule whatever the traffic: a deadline, not a
        quiet interval, so that steady traffic cannot postpone it (and the addresses' refresh with it)."""
        interval = self.resync_interval if self.resync_interval > 0 else None
        next_resync = time.monotonic() + interval if interval else float("inf")
        while True:
            timeout = None if interval is None else max(0.0, next_resync - time.monotonic())
            ready, _, _ = select.select([self.events.fileno(), self.wake_r], [], [], timeout)
            if self.wake_r in ready:
                return
            try:
                # One buffer per lock hold, so that a scrape never waits behind a long backlog; and no longer
                # than the next resync is due.
                while ready and time.monotonic() < next_resync:
                    with self.lock:
                        if not self._drain_once():
                            break
                if interval is not None and time.monotonic() >= next_resync:
                    with self.lock:
                        self._drain(DRAIN_BUDGET)
                        self._resync(initial=False)
                    next_resync = time.monotonic() + interval
            except OSError:
                log.exception("conntrack event handling failed")

    # -- the interface ----------------------------------------------------------

    def count(self) -> Counts:
        with self.lock:
            self._drain(DRAIN_BUDGET)
            if any(self.unwatched.values()):
                assert self.table is not None
                alive = self.table.connection_sets()
                for port in self.ports:
                    self.unwatched[port] &= alive[port]
            return Counts(
                established={p: len(self.established[p]) + len(self.unwatched[p]) for p in self.ports},
                accepted=dict(self.accepted),
            )

    def _release(self) -> None:
        if self.table is not None:
            self.table.close()
        self.events.close()
        if self.tracking is not None:
            with contextlib.suppress(OSError):
                self.tracking.close()

    def close(self) -> None:
        os.write(self.wake_w, b"x")
        self.thread.join(timeout=2)
        with self.lock:
            self._release()
        os.close(self.wake_r)
        os.close(self.wake_w)


def dump_established(port_set: frozenset[int]) -> tuple[list[tuple[bytes, bytes, int, int]], bool]:
    """The (src, dst, sport, dport) of every ESTABLISHED conntrack entry of this namespace, and whether any to a
    port of `port_set` is redirected (answered from another port: a REDIRECT to a proxy)."""
    flows: list[tuple[bytes, bytes, int, int]] = []
    redirected = False
    sock = netlink.Socket(netlink.NETLINK_NETFILTER)
    try:
        request = netlink.nlmsg(
            (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
            netlink.NLM_F_REQUEST | netlink.NLM_F_DUMP,
            sock.next_seq(),
            struct.pack("=BBH", socket.AF_UNSPEC, 0, 0),
        )
        for buf in sock.dump(request):
            messages, done = netlink.walk(buf, (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW)
            for payload, end in messages:
                event = parse_event(buf, payload + 4, end)
                if event is None or event[4] != ESTABLISHED:
                    continue
                src, dst, sport, dport, _state = event
                if not redirected and dport in port_set:
                    answering = reply_source_port(buf, payload + 4, end)
                    redirected = answering is not None and answering != dport
                flows.append((src, dst, sport, dport))
            if done:
                break
    finally:
        sock.close()
    return flows, redirected


def tracks_new_connections() -> bool:
    """Whether connection tracking really follows new connections in this namespace: a loopback connection of
    our own must show in the table at once. Entries alone do not prove it (stale ones outlive the rules that
    made conntrack track, and then every new connection goes unseen by the conntrack method)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            port = server.getsockname()[1]
            # connect(), not create_connection(): no name resolution (nor the idna codec it imports).
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
                client.settimeout(1)
                client.connect(("127.0.0.1", port))
                accepted, _ = server.accept()
                with accepted:
                    flows, _ = dump_established(frozenset({port}))
    except OSError:
        return False
    return any(dport == port for _src, _dst, _sport, dport in flows)


def open_method(ports: tuple[int, ...], options: Options) -> Conntrack:
    return Conntrack(ports, options.resync_interval, switch_on_tracking=options.switch_on_tracking)
