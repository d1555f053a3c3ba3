"""Make connection tracking active in this network namespace, and undo it.

The kernel registers conntrack's hooks in a network namespace only when its
ruleset needs them ("netfilter: conntrack: register hooks in netns when
needed by ruleset"), so a fresh pod tracks nothing. One nftables table of
ours, holding a single `ct state` expression in a chain with no hook, makes
the kernel register them while costing no rule evaluation per packet.
Deleting the table releases them again.

The table is owned by the netlink socket that made it (`NFT_TABLE_F_OWNER`,
Linux 5.12+): the kernel deletes it when that socket closes, so a process
killed with SIGKILL (an OOM kill) leaves nothing behind. Its name is the
process's own (`tcp_exporter_<pid>`), so two instances in one namespace never
touch each other's. On an older kernel the table is made without the flag
(and the log says so): then only a clean exit removes it.

Written with nf_tables netlink directly: no nft or iptables binary needed in
the image. Needs CAP_NET_ADMIN.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct

from tcp_exporter import netlink

log = logging.getLogger(__name__)

TABLE_PREFIX = "tcp_exporter"
CHAIN = "track"

NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NFT_MSG_NEWTABLE = 0
NFT_MSG_DELTABLE = 2
NFT_MSG_NEWCHAIN = 3
NFT_MSG_NEWRULE = 6
NFPROTO_INET = 1

NFTA_TABLE_NAME = 1
NFTA_TABLE_FLAGS = 2
NFT_TABLE_F_OWNER = 0x2
NFTA_CHAIN_TABLE = 1
NFTA_CHAIN_NAME = 3
NFTA_RULE_TABLE = 1
NFTA_RULE_CHAIN = 2
NFTA_RULE_EXPRESSIONS = 4
NFTA_LIST_ELEM = 1
NFTA_EXPR_NAME = 1
NFTA_EXPR_DATA = 2
NFTA_CT_DREG = 1
NFTA_CT_KEY = 2
NFT_REG_1 = 1
NFT_CT_STATE = 0


def _nfgen(family: int, res_id: int = 0) -> bytes:
    return struct.pack("=BBH", family, 0, socket.htons(res_id))


def _string(attr: int, value: str) -> bytes:
    return netlink.nla(attr, value.encode() + b"\0")


def _be32(attr: int, value: int) -> bytes:
    return netlink.nla(attr, struct.pack(">I", value))


def _msg(kind: int, flags: int, seq: int, *attrs: bytes) -> bytes:
    return netlink.nlmsg(
        (NFNL_SUBSYS_NFTABLES << 8) | kind, netlink.NLM_F_REQUEST | flags, seq, _nfgen(NFPROTO_INET) + b"".join(attrs)
    )


def _batch(sock: netlink.Socket, *messages: bytes) -> None:
    seq = sock.next_seq()
    begin = netlink.nlmsg(NFNL_MSG_BATCH_BEGIN, netlink.NLM_F_REQUEST, seq, _nfgen(0, NFNL_SUBSYS_NFTABLES))
    end = netlink.nlmsg(NFNL_MSG_BATCH_END, netlink.NLM_F_REQUEST, seq, _nfgen(0, NFNL_SUBSYS_NFTABLES))
    sock.send(begin + b"".join(messages) + end)
    # Each message asks for an ACK: the batch is applied whole or not at all,
    # so the first error tells the outcome; otherwise wait for every ACK.
    pending = len(messages)
    while pending:
        buf = sock.recv()
        for msg_type, _flags, payload, _end in netlink.iter_messages(buf):
            if msg_type == netlink.NLMSG_ERROR:
                netlink.raise_for_error(buf, payload)
                pending -= 1


def table_name() -> str:
    return f"{TABLE_PREFIX}_{os.getpid()}"


class Tracking:
    """Our table, for as long as this object (and its socket) lives: `close` deletes it, and so does the kernel
    when the process dies, where it supports owned tables."""

    def __init__(self) -> None:
        self.name = table_name()
        self.sock = netlink.Socket(netlink.NETLINK_NETFILTER)
        try:
            try:
                self._install(NFT_TABLE_F_OWNER)
                self.owned = True
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                log.warning(
                    "this kernel has no owned nftables tables (NFT_TABLE_F_OWNER, Linux 5.12+): table %s is "
                    "removed on a clean exit only; after a SIGKILL it stays until the pod's network namespace goes",
                    self.name,
                )
                self._install(0)
                self.owned = False
        except BaseException:
            self.sock.close()
            raise

    def _install(self, flags: int) -> None:
        ack = netlink.NLM_F_ACK
        create = netlink.NLM_F_CREATE | ack
        expr = netlink.nla_nested(
            NFTA_LIST_ELEM,
            _string(NFTA_EXPR_NAME, "ct"),
            netlink.nla_nested(NFTA_EXPR_DATA, _be32(NFTA_CT_DREG, NFT_REG_1), _be32(NFTA_CT_KEY, NFT_CT_STATE)),
        )
        sock, name = self.sock, self.name
        # Add then delete then add: a table left under this name (a pid reused after a SIGKILL on an old kernel)
        # does not stand in the way, and the result is exactly ours.
        _batch(
            sock,
            _msg(NFT_MSG_NEWTABLE, create, sock.next_seq(), _string(NFTA_TABLE_NAME, name)),
            _msg(NFT_MSG_DELTABLE, ack, sock.next_seq(), _string(NFTA_TABLE_NAME, name)),
            _msg(
                NFT_MSG_NEWTABLE,
                create,
                sock.next_seq(),
                _string(NFTA_TABLE_NAME, name),
                *([_be32(NFTA_TABLE_FLAGS, flags)] if flags else []),
            ),
            _msg(
                NFT_MSG_NEWCHAIN,
                create,
                sock.next_seq(),
                _string(NFTA_CHAIN_TABLE, name),
                _string(NFTA_CHAIN_NAME, CHAIN),
            ),
            _msg(
                NFT_MSG_NEWRULE,
                create | netlink.NLM_F_APPEND,
                sock.next_seq(),
                _string(NFTA_RULE_TABLE, name),
                _string(NFTA_RULE_CHAIN, CHAIN),
                netlink.nla_nested(NFTA_RULE_EXPRESSIONS, expr),
            ),
        )

    def close(self) -> None:
        """Delete the table (closing the socket would do it too, where owned; said explicitly for old kernels)."""
        try:
            _batch(
                self.sock,
                _msg(NFT_MSG_DELTABLE, netlink.NLM_F_ACK, self.sock.next_seq(), _string(NFTA_TABLE_NAME, self.name)),
            )
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
        finally:
            self.sock.close()
