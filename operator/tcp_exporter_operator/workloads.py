"""The kinds of workload the operator injects and scales: Deployments, and StatefulSets where enabled
(TCP_EXPORTER_OPERATOR_WORKLOAD_KINDS). Each is known by a key (namespace, name) in the work queue and the
operator's maps; a StatefulSet's name there is `StatefulSet/NAME` (a Kubernetes name has no `/`), so that a
Deployment and a StatefulSet of the same name never share an entry, and a Deployment's key is as it always was.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

DEPLOYMENT = "Deployment"
STATEFULSET = "StatefulSet"
KINDS = (DEPLOYMENT, STATEFULSET)
API_VERSION = "apps/v1"  # of both


def kind_of(body: Mapping[str, Any]) -> str:
    """The workload's kind (a Deployment where the body does not say: list items carry no kind)."""
    kind = body.get("kind")
    return kind if kind in KINDS else DEPLOYMENT


def key_name(kind: str, name: str) -> str:
    return name if kind == DEPLOYMENT else f"{kind}/{name}"


def split(key: str) -> tuple[str, str]:
    """(kind, name) of a key's name part."""
    kind, _, name = key.rpartition("/")
    return (kind or DEPLOYMENT), name


def key_of(body: Mapping[str, Any]) -> tuple[str, str]:
    meta = body["metadata"]
    return meta["namespace"], key_name(kind_of(body), meta["name"])


def with_kind(body: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The body (a shallow copy) with its kind and apiVersion said (a listed item has neither)."""
    return {**body, "kind": body.get("kind") or kind, "apiVersion": body.get("apiVersion") or API_VERSION}
