"""The kinds of workload the operator injects and scales: Deployments, and StatefulSets and Argo Rollouts where
enabled (TCP_EXPORTER_OPERATOR_WORKLOAD_KINDS). Each is known by a key (namespace, name) in the work queue and the
operator's maps; a StatefulSet's name there is `StatefulSet/NAME`, a Rollout's `Rollout/NAME` (a Kubernetes name
has no `/`), so that workloads of one name never share an entry, and a Deployment's key is as it always was.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

DEPLOYMENT = "Deployment"
STATEFULSET = "StatefulSet"
ROLLOUT = "Rollout"  # Argo Rollouts' (argoproj.io/v1alpha1): a Deployment's template, its own ReplicaSets
KINDS = (DEPLOYMENT, STATEFULSET, ROLLOUT)
API_VERSION = "apps/v1"  # of Deployments and StatefulSets
ROLLOUT_API_VERSION = "argoproj.io/v1alpha1"
ROLLOUTS = ("argoproj.io", "v1alpha1", "rollouts")  # group, version, plural
ROLLOUT_CRD = "rollouts.argoproj.io"


def workload_api_version(kind: str) -> str:
    return ROLLOUT_API_VERSION if kind == ROLLOUT else API_VERSION


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


def with_kind(body: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
    """The body with its kind and apiVersion said: as it is when it says them (a watch event's object, or a read
    one: most of the Deployment watch's events, on its hot path), else a shallow copy (a listed item)."""
    if body.get("kind") and body.get("apiVersion"):
        return body
    version = body.get("apiVersion") or workload_api_version(kind)
    return {**body, "kind": body.get("kind") or kind, "apiVersion": version}


def said(body: dict[str, Any], kind: str) -> dict[str, Any]:
    """`with_kind` for a body of our own (freshly parsed): said in place."""
    body.setdefault("kind", kind)
    body.setdefault("apiVersion", workload_api_version(kind))
    return body


def workload_ref(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """A Rollout's `spec.workloadRef` (its pod template is the named Deployment's), or None."""
    if kind_of(body) != ROLLOUT:
        return None
    ref = (body.get("spec") or {}).get("workloadRef")
    return ref if isinstance(ref, Mapping) else None


def made_from(workload: Mapping[str, Any]) -> str | None:
    """The name of the Deployment (of its namespace) whose template a workloadRef Rollout's pods are made from;
    None for any other workload, or a reference to another kind or to no name a Deployment can have."""
    ref = workload_ref(workload)
    name = ref.get("name") if ref is not None and ref.get("kind") == DEPLOYMENT else None
    return name if isinstance(name, str) and name and "/" not in name else None


def with_template(workload: Mapping[str, Any], source: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """A workloadRef Rollout as its pods are made: its spec with the pod template (and, where it names none, the
    selector) of `source`, the referenced Deployment, read afresh (or, in the webhook, the pod being created). What
    a plan checks of a template (hostNetwork, the ports, the containers to drain, the pod annotations) is then
    checked on what runs. Anything else is returned as it is. Never written back: only read."""
    if workload_ref(workload) is None or source is None:
        return workload
    template = (source.get("spec") or {}).get("template")
    if not isinstance(template, Mapping):
        return workload
    spec = dict(workload.get("spec") or {})
    spec["template"] = template
    if not isinstance(spec.get("selector"), Mapping):
        spec["selector"] = (source.get("spec") or {}).get("selector") or {}
    return {**workload, "spec": spec}


def restart_command(kind: str, namespace: str, name: str) -> str:
    """How a user replaces a workload's pods (a Rollout's through Argo Rollouts' kubectl plugin)."""
    if kind == ROLLOUT:
        return f"kubectl argo rollouts -n {namespace} restart {name}"
    return f"kubectl -n {namespace} rollout restart {kind.lower()}/{name}"


def observed_generation(status: Mapping[str, Any]) -> int | None:
    """status.observedGeneration as a number: an integer (Deployments, StatefulSets) or a string of digits (Argo
    Rollouts'); None for anything else (an older Argo Rollouts wrote a hash)."""
    value = status.get("observedGeneration")
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    return None
