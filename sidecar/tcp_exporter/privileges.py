"""Privilege held only while needed: started as UID 0, the exporter becomes an unprivileged user before it opens
anything or starts a thread, keeping only the capabilities its method needs (CAP_NET_ADMIN for conntrack: nfnetlink
checks it on the sender of every dump, and the resyncs dump, so it cannot be given up after the start), and none
once the method it chose needs none.

Linux only, through the C library (prctl, capset): no dependency. Capabilities belong to each thread, so this runs
while the process has one thread; every thread started after it inherits the reduced set. Never raises on a
refusal: the exporter must keep counting and serving, so a refusal (no CAP_SETUID in a hand-written pod spec, say)
is logged and it goes on with what it could drop.
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass

CAPABILITIES = {"SETGID": 6, "SETUID": 7, "SETPCAP": 8, "NET_ADMIN": 12}
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
DEFAULT_USER = (65532, 65532)  # the image's and the operator's non-root user (distroless' "nonroot")


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def parse_user(text: str) -> tuple[int, int]:
    """`UID[:GID]`, numeric (no user database in a distroless image); GID defaults to UID."""
    uid_text, _, gid_text = text.strip().partition(":")
    gid_text = gid_text or uid_text
    if not (uid_text.isascii() and uid_text.isdigit() and gid_text.isascii() and gid_text.isdigit()):
        raise ValueError(f"{text!r} is not UID[:GID] in numbers")
    uid, gid = int(uid_text), int(gid_text)
    if uid > 0xFFFFFFFE or gid > 0xFFFFFFFE:
        raise ValueError(f"{text!r}: UID and GID go up to 4294967294")
    return uid, gid


def status() -> dict[str, str]:
    """This thread's identity and capabilities as the kernel reports them (/proc/thread-self/status)."""
    out = {}
    with open("/proc/thread-self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs"):
                out[key] = value.strip()
    return out


def mask(names: tuple[str, ...] | list[str]) -> int:
    bits = 0
    for name in names:
        bits |= 1 << CAPABILITIES[name]
    return bits


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _prctl(libc: ctypes.CDLL, option: int, arg: int, arg3: int = 0) -> None:
    if libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(arg3), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _set_capabilities(libc: ctypes.CDLL, bits: int) -> None:
    """Effective = permitted = `bits` (which must be held already), inheritable none: this thread only."""
    header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)(_Data(bits & 0xFFFFFFFF, bits & 0xFFFFFFFF, 0), _Data(bits >> 32, bits >> 32, 0))
    if libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _held() -> int:
    return int(status()["CapPrm"], 16)


@dataclass(frozen=True)
class Outcome:
    uid: int
    capabilities: tuple[str, ...]  # effective, by name (only the ones this module knows can remain)
    refused: str  # what could not be dropped and why; empty when everything asked was done

    def describe(self) -> str:
        caps = ",".join(self.capabilities) or "none"
        text = f"running as UID {self.uid} with capabilities: {caps}"
        return f"{text} ({self.refused})" if self.refused else text


def drop(user: tuple[int, int] | None, keep: tuple[str, ...]) -> Outcome:
    """Become `user` (when running as UID 0 and `user` is given) holding only the capabilities in `keep` that are
    held now. Call while the process has one thread."""
    if threading.active_count() != 1:
        raise RuntimeError("privileges.drop must run before any thread starts: capabilities are per thread")
    libc = _libc()
    refused = []
    wanted = mask(keep) & _held()
    # The bounding set, so that nothing this process runs can regain a capability (needs CAP_SETPCAP: held by a
    # root process on a host, not in a pod, where the runtime already bounds it to the pod spec's).
    if os.geteuid() == 0 and _held() & (1 << CAPABILITIES["SETPCAP"]):
        try:
            with open("/proc/sys/kernel/cap_last_cap") as f:
                last = int(f.read())
            for cap in range(last + 1):
                if not wanted & (1 << cap):
                    _prctl(libc, PR_CAPBSET_DROP, cap)
        except (OSError, ValueError) as exc:
            refused.append(f"the bounding set could not be reduced: {exc}")
    if os.geteuid() == 0 and user is not None and user[0] != 0:
        uid, gid = user
        try:
            _prctl(libc, PR_SET_KEEPCAPS, 1)  # keep the permitted set across the change of user
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        except OSError as exc:
            refused.append(
                f"still UID {os.geteuid()}: changing user to {uid}:{gid} was refused ({exc.strerror}); it needs "
                "CAP_SETUID and CAP_SETGID at the start, which the operator adds for the conntrack method"
            )
        finally:
            _prctl(libc, PR_SET_KEEPCAPS, 0)
    try:
        _set_capabilities(libc, wanted)
        _prctl(libc, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError as exc:
        refused.append(f"capabilities could not be reduced: {exc.strerror}")
    return outcome(", ".join(refused))


def drop_all_capabilities() -> Outcome:
    """After the method is chosen, when it needs no capability: give up what `drop` kept for it."""
    if threading.active_count() != 1:
        return outcome("capabilities kept: a thread already runs")
    try:
        _set_capabilities(_libc(), 0)
    except OSError as exc:
        return outcome(f"capabilities could not be dropped: {exc.strerror}")
    return outcome("")


def outcome(refused: str) -> Outcome:
    effective = int(status()["CapEff"], 16)
    names = tuple(name for name, bit in CAPABILITIES.items() if effective & (1 << bit))
    if effective & ~mask(list(CAPABILITIES)):
        names += ("others",)
    return Outcome(uid=os.geteuid(), capabilities=names, refused=refused)
