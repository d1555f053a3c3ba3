"""Make connection tracking active in this network namespace, and undo it.

The kernel registers conntrack's hooks in a network namespace only when its
ruleset needs them ("netfilter: conntrack: register hooks in netns when
needed by ruleset"), so a fresh pod tracks nothing. One nftables table of
ours, `inet tcp_exporter`, holding a single `ct state` expression in a chain
with no hook, makes the kernel register them while costing no rule
evaluation per packet. Deleting the table releases them again.

Written with nf_tables netlink directly: no nft or iptables binary needed in
the image. Needs CAP_NET_ADMIN.
"""

from __future__ import annotations

import socket
import struct

from tcp_exporter import netlink

TABLE = "tcp_exporter"
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


def install() -> None:
    """Create (or re-create, idempotently) our table: conntrack becomes active here."""
    sock = netlink.Socket(netlink.NETLINK_NETFILTER)
    try:
        ack = netlink.NLM_F_ACK
        create = netlink.NLM_F_CREATE | ack
        expr = netlink.nla_nested(
            NFTA_LIST_ELEM,
            _string(NFTA_EXPR_NAME, "ct"),
            netlink.nla_nested(NFTA_EXPR_DATA, _be32(NFTA_CT_DREG, NFT_REG_1), _be32(NFTA_CT_KEY, NFT_CT_STATE)),
        )
        # Add then delete then add: whatever was there before, the result is exactly ours.
        _batch(
            sock,
            _msg(NFT_MSG_NEWTABLE, create, sock.next_seq(), _string(NFTA_TABLE_NAME, TABLE)),
            _msg(NFT_MSG_DELTABLE, ack, sock.next_seq(), _string(NFTA_TABLE_NAME, TABLE)),
            _msg(NFT_MSG_NEWTABLE, create, sock.next_seq(), _string(NFTA_TABLE_NAME, TABLE)),
            _msg(
                NFT_MSG_NEWCHAIN,
                create,
                sock.next_seq(),
                _string(NFTA_CHAIN_TABLE, TABLE),
                _string(NFTA_CHAIN_NAME, CHAIN),
            ),
            _msg(
                NFT_MSG_NEWRULE,
                create | 0x800,
                sock.next_seq(),  # NLM_F_APPEND
                _string(NFTA_RULE_TABLE, TABLE),
                _string(NFTA_RULE_CHAIN, CHAIN),
                netlink.nla_nested(NFTA_RULE_EXPRESSIONS, expr),
            ),
        )
    finally:
        sock.close()


def remove() -> None:
    """Delete our table if it is there."""
    sock = netlink.Socket(netlink.NETLINK_NETFILTER)
    try:
        ack = netlink.NLM_F_ACK
        _batch(
            sock,
            _msg(NFT_MSG_NEWTABLE, netlink.NLM_F_CREATE | ack, sock.next_seq(), _string(NFTA_TABLE_NAME, TABLE)),
            _msg(NFT_MSG_DELTABLE, ack, sock.next_seq(), _string(NFTA_TABLE_NAME, TABLE)),
        )
    finally:
        sock.close()
