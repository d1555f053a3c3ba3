"""A test address on this host's loopback device, claimed by one run at a time.

The node tier's control plane listens on a fixed address (the node's, NODE_IP) and the node adds a bridge, cgroups
and nftables tables of fixed names: two runs on one host (a CI run beside a developer's, or after a run that was
killed) would meet each other's. So the address is claimed under a host-wide lock: a second run waits for the first
(with a deadline), an address left behind by a killed run is taken back, and one a live cluster listens on (a
`make cluster-up NODE=1` still up) is refused with what to do.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

LOCK_DIR = Path("/run/lock")
WAIT = 20 * 60.0  # a whole node tier of another run, with room


def log(msg: str) -> None:
    print(f"[hostaddr] {msg}", file=sys.stderr, flush=True)


def on_loopback(address: str) -> bool:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", "lo"], capture_output=True, text=True).stdout
    return any(f"inet {address}/" in line for line in out.splitlines())


def listened_on(address: str) -> bool:
    """Whether a TCP socket of this network namespace listens on `address` (an API server left running)."""
    want = f"{struct.unpack('<I', socket.inet_aton(address))[0]:08X}"
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1].split(":")[0] == want and fields[3] == "0A":  # 0A: LISTEN
                return True
    return False


class Claim:
    """`address` on lo, and the lock that says this process holds it, until release()."""

    def __init__(self, address: str, wait: float = WAIT) -> None:
        self.address = address
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        self.lock_path = LOCK_DIR / f"tcp-exporter-{address}.lock"
        self.fd: int | None = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._lock(wait)
            if on_loopback(address):
                if listened_on(address):
                    raise RuntimeError(
                        f"{address} is in use: a cluster started by `make cluster-up NODE=1` listens there; "
                        "stop it with `make cluster-down` first"
                    )
                log(f"{address} was left on lo by a run that did not finish; taking it back")
                subprocess.run(["ip", "addr", "del", f"{address}/32", "dev", "lo"], capture_output=True)
            subprocess.run(["ip", "addr", "add", f"{address}/32", "dev", "lo"], check=True, capture_output=True)
        except BaseException:
            self.release(remove_address=False)
            raise

    def _lock(self, wait: float) -> None:
        assert self.fd is not None
        deadline = time.monotonic() + wait
        said = 0.0
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = self.lock_path.read_text().strip() or "another process"
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.address} stayed claimed by {holder} for {wait:.0f} s") from None
                if time.monotonic() - said > 30:
                    log(f"waiting for {holder} to finish with {self.address}")
                    said = time.monotonic()
                time.sleep(1)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} ({' '.join(sys.argv)[:200]})\n".encode(), 0)

    def release(self, remove_address: bool = True) -> None:
        if remove_address:
            subprocess.run(["ip", "addr", "del", f"{self.address}/32", "dev", "lo"], capture_output=True)
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)  # the lock goes with it
            self.fd = None
