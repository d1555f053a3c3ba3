"""The cluster facts a plan needs, kept by watches instead of read per event: what each index keeps of an object
(only the fields a plan compares), under which keys, and `Indexes.facts_for`, which gathers one Deployment's
`Facts` from them.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tcp_exporter_operator.desired import child_names, is_ours
from tcp_exporter_operator.events import crd_name
from tcp_exporter_operator.kube import hpa_summary
from tcp_exporter_operator.plan import Facts
from tcp_exporter_operator.watch import Index
from tcp_exporter_operator.workloads import DEPLOYMENT, KINDS, key_name, kind_of

PSA_ENFORCE = "pod-security.kubernetes.io/enforce"
KEDA_CRD = crd_name("ScaledObject")
PODMONITOR_CRD = crd_name("PodMonitor")


def child_summary(obj: Mapping[str, Any]) -> tuple[Hashable, Any]:
    """Only what a plan compares of a child object (ScaledObject, PodMonitor): a small copy, not the whole body.
    Indexed under each Deployment it may concern (`child_keys`), so that a plan reads those, not the namespace's."""
    meta = obj["metadata"]
    namespace = meta.get("namespace")
    owners = [
        {"kind": r.get("kind"), "uid": r.get("uid"), "name": r.get("name")} for r in meta.get("ownerReferences") or []
    ]
    spec = dict(obj.get("spec") or {})
    target_ref = spec.get("scaleTargetRef") or {}
    target = target_ref.get("name")
    keys = [("name", namespace, meta["name"])]
    keys += [("owner", namespace, key_name(r["kind"], r["name"])) for r in owners if r["kind"] in KINDS]
    keys += [("target", namespace, key_name(target_ref.get("kind") or DEPLOYMENT, target))] if target else []
    return tuple(keys), {
        "metadata": {
            "name": meta["name"],
            "namespace": namespace,
            "uid": meta.get("uid"),
            "generation": meta.get("generation"),
            "deletionTimestamp": meta.get("deletionTimestamp"),
            "labels": dict(meta.get("labels") or {}),
            "ownerReferences": owners,
        },
        "spec": copy.deepcopy(spec),
        "status": {"conditions": surfaced_conditions(obj)},
    }


SURFACED = ("Ready", "Fallback")  # KEDA's conditions a Deployment's owner is told of


def surfaced_conditions(obj: Mapping[str, Any]) -> list[dict[str, str]]:
    """KEDA's Ready and Fallback conditions of a ScaledObject, bounded (KEDA's message can quote a long error)."""
    out = []
    for condition in ((obj.get("status") or {}).get("conditions") or [])[:20]:
        if isinstance(condition, Mapping) and condition.get("type") in SURFACED:
            out.append({k: str(condition.get(k) or "")[:500] for k in ("type", "status", "reason", "message")})
    return out


def child_keys(namespace: str, name: str, kind: str = DEPLOYMENT) -> list[Hashable]:
    """Where the children that concern the workload `name` are indexed: those it owns, those that target it,
    and those under the names the operator gives its children (adopted from GitOps, with no owner)."""
    return [
        ("owner", namespace, key_name(kind, name)),
        ("target", namespace, key_name(kind, name)),
        *(("name", namespace, child) for child in child_names(name)),
    ]


def hpa_entry(obj: Mapping[str, Any]) -> tuple[Hashable, Any]:
    return obj["metadata"].get("namespace"), hpa_summary(obj)


def psa_level(obj: Mapping[str, Any]) -> tuple[Hashable, Any]:
    return obj["metadata"]["name"], (obj["metadata"].get("labels") or {}).get(PSA_ENFORCE)


def crd_entry(obj: Mapping[str, Any]) -> tuple[Hashable, Any]:
    """CRD name -> whether it has what the plan relies on (for KEDA's: fallback.behavior, KEDA 2.17+)."""
    name = obj["metadata"]["name"]
    if name != KEDA_CRD:
        return name, True
    versions = [v for v in (obj.get("spec") or {}).get("versions") or [] if v.get("name") == "v1alpha1"]
    schema = versions[0].get("schema", {}).get("openAPIV3Schema", {}) if versions else {}
    fallback = schema.get("properties", {}).get("spec", {}).get("properties", {}).get("fallback", {})
    return name, "behavior" in fallback.get("properties", {}) or bool(
        fallback.get("x-kubernetes-preserve-unknown-fields")
    )


@dataclass
class Indexes:
    """The indexes a plan reads, each kept by its own informer (`controller.Controller`)."""

    scaledobjects: Index = field(default_factory=lambda: Index(child_summary, multi=True))
    podmonitors: Index = field(default_factory=lambda: Index(child_summary, multi=True))
    hpas: Index = field(default_factory=lambda: Index(hpa_entry))
    psa_levels: Index = field(default_factory=lambda: Index(psa_level))
    crds: Index = field(default_factory=lambda: Index(crd_entry))

    def children(self, kind: str) -> Index:
        """The index of a child kind: ScaledObject or PodMonitor."""
        return self.scaledobjects if kind == "ScaledObject" else self.podmonitors

    def facts_for(self, deployment: Mapping[str, Any], hpas: list[dict[str, Any]] | None = None) -> Facts:
        """The cluster facts a plan of this Deployment needs, from the indexes; `hpas`, read afresh, replaces the
        index's HPAs (an HPA created just before the Deployment may not be indexed yet when the Deployment's event
        comes: its own watch is faster than kopf's)."""
        namespace, name = deployment["metadata"]["namespace"], deployment["metadata"]["name"]
        kind = kind_of(deployment)
        ours = None
        foreign = []
        keys = child_keys(namespace, name, kind)
        pod_monitor = next(
            (
                pm
                for pm in self.podmonitors.get_any(keys)
                if is_ours(pm, deployment) and not pm["metadata"].get("deletionTimestamp")
            ),
            None,
        )
        for so in self.scaledobjects.get_any(keys):  # a copy: the index is updated from other threads
            ref = so.get("spec", {}).get("scaleTargetRef", {})
            # Another kind's of the same name (a StatefulSet's, for a Deployment) is not another autoscaler of it.
            targets = ref.get("name") == name and (ref.get("kind") or DEPLOYMENT) == kind
            if so["metadata"].get("deletionTimestamp"):
                continue  # on its way out (KEDA's finalizer holds it a moment): as good as gone
            if is_ours(so, deployment):
                ours = so
            elif targets:
                foreign.append(f"ScaledObject/{so['metadata']['name']}")
        for hpa in hpas if hpas is not None else list(self.hpas.get(namespace, [])):
            target = hpa["target"]
            if target.get("kind") == kind and target.get("name") == name and not hpa["keda"]:
                foreign.append(f"HorizontalPodAutoscaler/{hpa['name']}")
        levels = list(self.psa_levels.get(namespace, [None]))
        crd_names = self.crds
        return Facts(
            psa_level=levels[0] if levels else None,
            keda=KEDA_CRD in crd_names,
            keda_fallback_behavior=KEDA_CRD in crd_names and all(crd_names[KEDA_CRD]),
            pod_monitor_crd=PODMONITOR_CRD in crd_names,
            pod_monitor=pod_monitor,
            scaled_object=ours,
            foreign_autoscalers=tuple(sorted(foreign)),
        )
