"""Pacing of upgrade rollouts: at most a few Deployments restart at once for a sidecar change of the operator's own
making (a new image or default after an operator upgrade), the rest wait their turn in arrival order.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)


class Rollouts:
    """Upgrade rollouts under way (at most `limit`), and the Deployments waiting for one, in arrival order.

    An upgrade rollout is a sidecar change of the operator's own making (a new image or default after an
    operator upgrade): without pacing, every annotated Deployment of the cluster would restart at once.
    Slots are reserved before planning, since several workers plan at once.
    """

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.lock = threading.Lock()
        self.active: dict[str, int | None] = {}  # uid -> generation to complete (None: reserved, not started)
        self.waiting: dict[str, tuple[str, str]] = {}  # uid -> (namespace, name)

    def reserve(self, uid: str) -> bool:
        with self.lock:
            if uid in self.active:
                return True
            if len(self.active) < self.limit:
                self.active[uid] = None
                return True
            return False

    def unreserve(self, uid: str) -> None:
        with self.lock:
            if self.active.get(uid, 0) is None:
                del self.active[uid]

    def started(self, uid: str, generation: int) -> None:
        with self.lock:
            self.active[uid] = generation
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
            if self.active.pop(uid, 0) == 0 or not self.waiting:
                return []
            return [self.waiting.pop(next(iter(self.waiting)))]

    def progress(self, uid: str, deployment: Mapping[str, Any]) -> list[tuple[str, str]]:
        """If this Deployment's paced rollout is over (done, or past its progress deadline), free its slot and
        return the next waiting Deployment to reconcile."""
        with self.lock:
            generation = self.active.get(uid)
            if generation is None or not rollout_over(deployment, generation):
                return []
            del self.active[uid]
            if not self.waiting:
                return []
            next_uid = next(iter(self.waiting))
            return [self.waiting.pop(next_uid)]


def rollout_over(deployment: Mapping[str, Any], generation: int) -> bool:
    """The deployment controller has rolled out `generation`: every replica updated and available, or the rollout
    ran past its progress deadline (then the next may go: one stuck Deployment must not stop the upgrade)."""
    status = deployment.get("status") or {}
    if int(status.get("observedGeneration") or 0) < generation:
        return False
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            return True
    want = int((deployment.get("spec") or {}).get("replicas", 1))
    return all(int(status.get(k) or 0) == want for k in ("updatedReplicas", "replicas", "availableReplicas"))
