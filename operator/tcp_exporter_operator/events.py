"""What the planner and the API layer share: the operator's name on what it writes, the kinds it writes (each
group, version and plural in one place), and its Events."""

from __future__ import annotations

from dataclasses import dataclass

MANAGED_BY = "tcp-exporter-operator"
LABELS = {"app.kubernetes.io/managed-by": MANAGED_BY}
# The objects the operator makes for a Deployment, by kind: (group, version, plural).
CHILDREN = {
    "ScaledObject": ("keda.sh", "v1alpha1", "scaledobjects"),
    "PodMonitor": ("monitoring.coreos.com", "v1", "podmonitors"),
}
PEERING = ("kopf.dev", "v1", "clusterkopfpeerings")  # kopf's cluster-wide peering object, ClusterKopfPeering


def api_version(kind: str) -> str:
    group, version, _ = CHILDREN[kind]
    return f"{group}/{version}"


def crd_name(kind: str) -> str:
    group, _, plural = CHILDREN[kind]
    return f"{plural}.{group}"


@dataclass
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str
