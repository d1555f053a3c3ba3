"""Small helpers shared by tests and benchmarks."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def sidecar_in(pod_spec: Any) -> Any:
    """The tcp-exporter container of a pod (or pod template) spec, as a dict or the client's object: a regular
    container, or a native sidecar among the init containers; None if it has none."""
    if isinstance(pod_spec, dict):
        every = (pod_spec.get("containers") or []) + (pod_spec.get("initContainers") or [])
        return next((c for c in every if c.get("name") == "tcp-exporter"), None)
    every = (pod_spec.containers or []) + (pod_spec.init_containers or [])
    return next((c for c in every if c.name == "tcp-exporter"), None)


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


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie child of ours is reaped and counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0): reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def terminate(pid: int, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; returns once it is gone (5 s at most after the SIGKILL)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.05)
