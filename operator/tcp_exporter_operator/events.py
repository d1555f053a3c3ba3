"""What the planner and the API layer share: the operator's name on what it writes, and its Events."""

from __future__ import annotations

from dataclasses import dataclass

MANAGED_BY = "tcp-exporter-operator"
LABELS = {"app.kubernetes.io/managed-by": MANAGED_BY}


@dataclass
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str
