"""Small helpers shared by tests and benchmarks."""

from __future__ import annotations

import ctypes
import signal
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(check: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll `check` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")
        time.sleep(interval)


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A preexec_fn: the child gets `sig` when the process that started it dies, even by SIGKILL.

    So an interrupted test run leaves no server, exporter or operator behind. SIGTERM (the default) lets
    an exporter undo what it changed in its namespace.
    """

    def preexec() -> None:
        _prctl(1, sig)  # PR_SET_PDEATHSIG

    return preexec


# Resolved once in the parent, so the forked child only makes the call.
_prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
