"""Pacing of upgrade rollouts: at most a few Deployments restart at once for a sidecar change of the operator's own
making (a new image or default after an operator upgrade), the rest wait their turn in arrival order.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tcp_exporter_operator.workloads import ROLLOUT, kind_of, observed_generation

log = logging.getLogger(__name__)


DEFAULT_PROGRESS_DEADLINE = 600  # seconds: Kubernetes' default progressDeadlineSeconds


@dataclass
class Slot:
    generation: int | None  # the generation whose rollout holds it; None: reserved, not started
    until: float  # monotonic time after which it is taken back, whatever the Deployment does
    name: tuple[str, str] = ("", "")


class Rollouts:
    """Upgrade rollouts under way (at most `limit`), and the Deployments waiting for one, in arrival order.

    An upgrade rollout is a sidecar change of the operator's own making (a new image or default after an
    operator upgrade): without pacing, every annotated Deployment of the cluster would restart at once.
    Slots are reserved before planning, since several workers plan at once.

    No Deployment holds a slot for long, whatever its editor writes: a slot is taken back once the rollout is over,
    past the Deployment's progress deadline, or after `hold` seconds at most (an operator setting), even if
    no event of that Deployment ever comes (`expire`, every 10 s from a thread of the controller's). Paused
    Deployments are not paced (the controller never tells them to roll; see `paced`).
    """

    def __init__(
        self, limit: int, hold: float = DEFAULT_PROGRESS_DEADLINE, clock: Callable[[], float] = time.monotonic
    ):
        self.limit = max(1, limit)
        self.hold = hold
        self.clock = clock
        self.lock = threading.Lock()
        self.active: dict[str, Slot] = {}  # uid -> its slot
        self.waiting: dict[str, tuple[str, str]] = {}  # uid -> (namespace, name)

    def reserve(self, uid: str) -> bool:
        with self.lock:
            if uid in self.active:
                return True
            if len(self.active) < self.limit:
                self.active[uid] = Slot(None, self.clock() + self.hold)
                return True
            return False

    def unreserve(self, uid: str) -> None:
        with self.lock:
            slot = self.active.get(uid)
            if slot is not None and slot.generation is None:
                del self.active[uid]

    def started(self, uid: str, generation: int, deployment: Mapping[str, Any] | None = None) -> None:
        """The patch that starts the rollout was written: the slot is held until it is over, at most the
        Deployment's progress deadline (capped by `hold`)."""
        deadline = progress_deadline(deployment or {})
        meta = (deployment or {}).get("metadata") or {}
        with self.lock:
            self.active[uid] = Slot(
                generation, self.clock() + min(deadline, self.hold), (meta.get("namespace", ""), meta.get("name", ""))
            )
            self.waiting.pop(uid, None)

    def wait(self, uid: str, namespace: str, name: str) -> None:
        with self.lock:
            if uid not in self.waiting:
                log.info("upgrade of %s/%s waits: %d rollouts under way", namespace, name, len(self.active))
            self.waiting[uid] = (namespace, name)

    def not_waiting(self, uid: str) -> None:
        with self.lock:
            self.waiting.pop(uid, None)

    def forget(self, uid: str) -> list[tuple[str, str]]:
        """A deleted Deployment: its slot, if it held one, goes to the next waiting one (returned)."""
        with self.lock:
            self.waiting.pop(uid, None)
            if self.active.pop(uid, None) is None:
                return []
            return self._next()

    def progress(self, uid: str, deployment: Mapping[str, Any]) -> list[tuple[str, str]]:
        """If this Deployment's paced rollout is over (done, or past its progress deadline), free its slot and
        return the next waiting Deployment to reconcile."""
        with self.lock:
            slot = self.active.get(uid)
            if slot is None or slot.generation is None or not rollout_over(deployment, slot.generation):
                return []
            del self.active[uid]
            return self._next()

    def expire(self) -> list[tuple[str, str]]:
        """Take back every slot held past its time (the Deployment's rollout never reported being over: stuck
        without a progress deadline, edited to look stuck, or gone quiet); return as many waiting Deployments."""
        now, freed = self.clock(), []
        with self.lock:
            for uid, slot in list(self.active.items()):
                if now >= slot.until:
                    del self.active[uid]
                    log.warning(
                        "upgrade rollout of %s/%s held its slot to its limit: the slot goes to the next",
                        *slot.name,
                    )
                    freed.extend(self._next())
        return freed

    def _next(self) -> list[tuple[str, str]]:
        if not self.waiting:
            return []
        return [self.waiting.pop(next(iter(self.waiting)))]


def paced(deployment: Mapping[str, Any]) -> bool:
    """Whether an upgrade of this Deployment takes a slot: not when it is paused (nothing rolls until its owner
    resumes it, and then it is the owner's rollout), and never for an Argo Rollout (its own strategy paces it:
    canary steps and pauses would hold a slot until MAX_ROLLOUT_SECONDS)."""
    return kind_of(deployment) != ROLLOUT and not bool((deployment.get("spec") or {}).get("paused"))


def progress_deadline(deployment: Mapping[str, Any]) -> float:
    value = (deployment.get("spec") or {}).get("progressDeadlineSeconds")
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return float(value)
    return float(DEFAULT_PROGRESS_DEADLINE)


def rollout_over(deployment: Mapping[str, Any], generation: int) -> bool:
    """The deployment controller has rolled out `generation`: every replica updated and available, or the rollout
    ran past its progress deadline (then the next may go: one stuck Deployment must not stop the upgrade)."""
    status = deployment.get("status") or {}
    observed = observed_generation(status)
    if observed is None or observed < generation:
        return False  # not a number (an older Argo Rollouts wrote a hash): the slot is taken back at its limit
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            return True
    want = int((deployment.get("spec") or {}).get("replicas", 1))
    return all(int(status.get(k) or 0) == want for k in ("updatedReplicas", "replicas", "availableReplicas"))
