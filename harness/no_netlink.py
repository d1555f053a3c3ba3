"""`python no_netlink.py CMD ARGS...`: run CMD with socket(AF_NETLINK, ...) failing, as where netlink is withheld.

Standalone on purpose (standard library only): the harness runs it as a file after `ip netns exec`,
where the harness package is not importable.
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys


def no_netlink_seccomp() -> None:
    """preexec_fn: make socket(AF_NETLINK, ...) fail with EAFNOSUPPORT, as where netlink is withheld."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    ld_w, ld_abs, jeq, ret = 0x00, 0x20, 0x15, 0x06
    # seccomp_data: nr at 0, arch at 4, args[0] at 16 (low 32 bits on little-endian).
    program = [
        (ld_w | ld_abs, 0, 0, 4),
        (jeq, 0, 4, 0xC000003E),  # AUDIT_ARCH_X86_64, else allow
        (ld_w | ld_abs, 0, 0, 0),
        (jeq, 0, 2, 41),  # __NR_socket
        (ld_w | ld_abs, 0, 0, 16),
        (jeq, 1, 0, 16),  # AF_NETLINK
        (ret, 0, 0, 0x7FFF0000),  # SECCOMP_RET_ALLOW
        (ret, 0, 0, 0x00050000 | 97),  # SECCOMP_RET_ERRNO | EAFNOSUPPORT
    ]
    raw = b"".join(struct.pack("=HBBI", *op) for op in program)
    buf = ctypes.create_string_buffer(raw)
    prog = struct.pack("@HP", len(program), ctypes.addressof(buf))
    prog_buf = ctypes.create_string_buffer(prog)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if libc.prctl(22, 2, ctypes.addressof(prog_buf), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print("usage: no_netlink.py CMD [ARGS...]", file=sys.stderr)
        sys.exit(2)
    no_netlink_seccomp()
    os.execv(sys.argv[1], sys.argv[1:])  # noqa: S606 - the test chose the command
