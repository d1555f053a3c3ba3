"""The decision for one Deployment: given it and the cluster facts around it (`Facts`), every write and Event that
brings it to what its annotations ask for (`Plan`). Pure, so the operator's behaviour is unit-tested without a
cluster, and `render` gives GitOps users the same result offline; the controller applies what it returns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tcp_exporter_operator.annotations import (
    A_METHOD,
    A_PORT,
    A_SCALE_IN,
    A_SCALEDOBJECT,
    CONTAINER,
    InvalidSpec,
    Spec,
    Status,
    annotations_of,
    containers_of,
    parse_spec,
    recorded_status,
    sidecar_of,
    template_of,
    unknown_keys,
)
from tcp_exporter_operator.config import Config
from tcp_exporter_operator.desired import (
    METRICS_PORT_NAME,
    Injection,
    inject,
    injection,
    pod_monitor,
    scaled_object,
    uninject,
)
from tcp_exporter_operator.diff import SCALED_OBJECT_OPTIONAL, child_action, deployment_patch, in_sync
from tcp_exporter_operator.events import MANAGED_BY, Event
from tcp_exporter_operator.workloads import ROLLOUT, STATEFULSET, kind_of, restart_command, workload_ref

# The kinds connection-aware scale-in does not apply to, and why.
SCALE_IN_IGNORED = {
    STATEFULSET: "it always removes its highest ordinal first, whatever its connections (pod deletion cost is a "
    "ReplicaSet's)",
    ROLLOUT: "the operator writes deletion costs for Deployments' pods only (not built for Argo Rollouts yet; its "
    "canary and blue-green steps scale its ReplicaSets themselves)",
}

BLIND_NOTE = (
    "no ScaledObject: Prometheus cannot see this Deployment's sidecars by any discovery path the operator is "
    "configured for ({paths}){why}, and a ScaledObject whose query sees nothing would hold the replica count on "
    "its fallback forever. Add a scrape job on the port name {port!r} and set TCP_EXPORTER_OPERATOR_DISCOVERY "
    "to include port-name, or install the Prometheus Operator's PodMonitor CRD."
)


@dataclass
class Facts:
    """What the plan needs to know about the cluster around the Deployment."""

    psa_level: str | None = None
    keda: bool = True
    pod_monitor_crd: bool = False
    scaled_object: Mapping[str, Any] | None = None  # the one this operator owns for the Deployment
    foreign_autoscalers: tuple[str, ...] = ()  # e.g. "HorizontalPodAutoscaler/web"
    pod_monitor: Mapping[str, Any] | None = None  # the one this operator owns for the Deployment
    # Whether the installed KEDA knows fallback.behavior (2.17+). An older one would drop the field and apply
    # its fixed behavior, scaling to fallback.replicas: there the operator writes no fallback at all.
    keda_fallback_behavior: bool = True
    # Whether the operator may patch pods (the scale-in component, or the chart's scaleIn.enabled): without it a
    # Deployment that asks for connection-aware scale-in is still injected and scaled, with a Warning.
    scale_in_installed: bool = True
    # Webhook injection: (pods of the Deployment created without the sidecar, its pods); None where not counted.
    uninjected_pods: tuple[int, int] | None = None
    # Patch injection of a workloadRef Rollout: the Deployment whose template its pods are made from, read, which is
    # patched in its place (the plan is of the Rollout, with that Deployment's template and status annotation).
    template_from: str | None = None


@dataclass(frozen=True)
class ChildWrite:
    """One write of a child object: `body` is what to create or update it to, or (delete) the object as found."""

    kind: str  # ScaledObject or PodMonitor
    action: str  # create, update or delete
    body: dict[str, Any]


@dataclass
class Plan:
    """The writes that bring one Deployment to its desired state; empty when it is there."""

    deployment_patch: list[dict[str, Any]] | None = None
    children: list[ChildWrite] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    # The Deployment patch is an upgrade: the sidecar changes for the operator's reasons (a new image or default),
    # not the user's. Such rollouts are paced (`deferred`).
    upgrade: bool = False
    upgrade_deferred: bool = False  # an upgrade waits for a slot: its patch and Event are left out
    desired: dict[str, Any] | None = None  # the Deployment as the plan wants it, when it is injected
    # KEDA's Warnings whose condition now says all is well: a Normal Event says so where the Warning was posted.
    cleared: tuple[Event, ...] = ()

    @property
    def writes(self) -> int:
        return (self.deployment_patch is not None) + len(self.children)

    def child(self, kind: str) -> ChildWrite | None:
        return next((c for c in self.children if c.kind == kind), None)

    def deferred(self) -> Plan:
        """The same plan while no upgrade slot is free: everything but the upgrade's patch and its Event."""
        if not self.upgrade:
            return self
        return dataclasses.replace(
            self,
            deployment_patch=None,
            events=[e for e in self.events if e.reason != UPGRADED],
            upgrade=False,
            upgrade_deferred=True,
        )


UPGRADED = "Upgraded"


def allowed_method(spec: Spec, psa_level: str | None) -> tuple[Spec, Event | None]:
    """Pod Security Admission's baseline and restricted levels reject NET_ADMIN: fall back to sockdiag there."""
    if spec.method == "conntrack" and psa_level in ("baseline", "restricted"):
        note = Event(
            "Warning",
            "MethodDowngraded",
            f"the conntrack method needs CAP_NET_ADMIN, which this namespace's Pod Security level "
            f"{psa_level!r} forbids; injecting the unprivileged sockdiag method instead",
        )
        return dataclasses.replace(spec, method="sockdiag"), note
    return spec, None


# Signs that a service mesh's proxy receives the pod's inbound connections (it redirects them to itself with an
# iptables REDIRECT in the pod's namespace): its container in the template, or its injection switch.
MESH_CONTAINERS = {"istio-proxy": "Istio", "linkerd-proxy": "Linkerd"}
MESH_SWITCHES = {
    "sidecar.istio.io/inject": ("true", "Istio"),
    "linkerd.io/inject": ("enabled", "Linkerd"),
}


def mesh(deployment: Mapping[str, Any]) -> str | None:
    """The mesh whose proxy takes the pod's inbound connections, if the pod template shows one."""
    for container in containers_of(deployment) + list(
        template_of(deployment).get("spec", {}).get("initContainers") or []
    ):
        if container.get("name") in MESH_CONTAINERS:
            return MESH_CONTAINERS[container["name"]]
    template_meta = template_of(deployment).get("metadata", {})
    for source in (template_meta.get("annotations") or {}, template_meta.get("labels") or {}):
        for key, (on, name) in MESH_SWITCHES.items():
            if str(source.get(key, "")).lower() == on:
                return name
    return None


def mesh_note(deployment: Mapping[str, Any], spec: Spec) -> Event | None:
    """Behind a mesh's inbound redirect the clients' connections end at the proxy; the watched port sees the
    proxy's own connections to the app. Only conntrack counts the clients there (by original destination)."""
    name = mesh(deployment)
    if name is None or spec.method == "conntrack":
        return None
    return Event(
        "Warning",
        "MeshInbound",
        f"{name}'s proxy receives this pod's inbound connections and opens its own to the app: the {spec.method} "
        "method counts the proxy's connections to the watched port, not the clients' (one per client with a TCP "
        f"proxy, fewer with an HTTP proxy that pools them). Set {A_METHOD}: conntrack to count the clients by "
        "their original destination (it needs CAP_NET_ADMIN)",
    )


def keda_conditions(scaled_object: Mapping[str, Any] | None) -> list[Event]:
    """KEDA's refusals of our ScaledObject, told on the Deployment: Ready=False (KEDA will not scale it, e.g. a
    name KEDA rejects) and Fallback=True (the query failed: replicas held at the fallback). The Warning is posted
    once while the condition holds, and again if it comes back."""
    events = []
    for condition in ((scaled_object or {}).get("status") or {}).get("conditions") or []:
        kind, status = condition.get("type"), condition.get("status")
        detail = f"{condition.get('reason') or 'no reason'}: {condition.get('message') or 'no message'}"
        if kind == "Ready" and status == "False":
            events.append(Event("Warning", "ScaledObjectNotReady", f"KEDA does not scale this Deployment ({detail})"))
        elif kind == "Fallback" and status == "True":
            events.append(
                Event(
                    "Warning",
                    "ScaledObjectFallback",
                    f"KEDA cannot read the connection count and holds the replicas at its fallback ({detail}); "
                    "see docs/troubleshooting.md",
                )
            )
    return events


def keda_cleared(scaled_object: Mapping[str, Any] | None) -> tuple[Event, ...]:
    """For each of `keda_conditions`' Warnings, the Normal Event that says its condition cleared, if it has: posted
    only where that Warning was (the controller knows), so that the workload's latest Event tells its state."""
    events = []
    for condition in ((scaled_object or {}).get("status") or {}).get("conditions") or []:
        kind, status = condition.get("type"), condition.get("status")
        if kind == "Ready" and status == "True":
            events.append(Event("Normal", "ScaledObjectReady", "KEDA scales this workload again"))
        elif kind == "Fallback" and status == "False":
            events.append(
                Event("Normal", "ScaledObjectFallbackCleared", "KEDA reads the connection count again: no fallback")
            )
    return tuple(events)


CLEARS = {"ScaledObjectReady": "ScaledObjectNotReady", "ScaledObjectFallbackCleared": "ScaledObjectFallback"}


def plan(deployment: Mapping[str, Any], facts: Facts, cfg: Config) -> Plan:
    """Every write (and Event) that brings this Deployment to what its annotations ask for."""
    result = Plan()
    annotations = annotations_of(deployment)
    recorded = recorded_status(deployment)
    has_container = sidecar_of(deployment) is not None

    if A_PORT not in annotations:
        if recorded is not None:
            clean = uninject(deployment, recorded)
            result.deployment_patch = deployment_patch(deployment, clean)
            result.events.append(Event("Normal", "Removed", f"{A_PORT} was removed: sidecar removed"))
        if facts.scaled_object is not None:
            result.children.append(ChildWrite("ScaledObject", "delete", dict(facts.scaled_object)))
        if facts.pod_monitor is not None:
            result.children.append(ChildWrite("PodMonitor", "delete", dict(facts.pod_monitor)))
        return result

    if has_container and recorded is None:
        result.events.append(
            Event(
                "Warning",
                "ContainerConflict",
                f"the pod template already has a container named {CONTAINER!r} that this "
                "operator did not inject; rename it or remove the annotation. Nothing changed.",
            )
        )
        return result
    try:
        spec = parse_spec(deployment, cfg)
    except InvalidSpec as exc:
        result.events.append(Event("Warning", "InvalidAnnotation", f"{exc}. Nothing changed."))
        return result
    if spec.scaled_object and facts.foreign_autoscalers:
        result.events.append(
            Event(
                "Warning",
                "AutoscalerConflict",
                f"{', '.join(facts.foreign_autoscalers)} already scales this Deployment; "
                f'it is left in charge and nothing changed. Set {A_SCALEDOBJECT}: "false" '
                "to inject only the exporter.",
            )
        )
        return result
    spec, note = allowed_method(spec, facts.psa_level)
    if note is not None:
        result.events.append(note)
    meshed = mesh_note(deployment, spec)
    if meshed is not None:
        result.events.append(meshed)
    result.events += keda_conditions(facts.scaled_object) if spec.scaled_object else []
    result.cleared = keda_cleared(facts.scaled_object) if spec.scaled_object else ()
    for message in unknown_keys(annotations):
        result.events.append(Event("Warning", "UnknownAnnotation", message))
    if spec.scale_in_by_connections and not facts.scale_in_installed:
        result.events.append(
            Event(
                "Warning",
                "ScaleInNotInstalled",
                f"{A_SCALE_IN} asks for connection-aware scale-in, but it is not installed: the operator may not "
                "set pods' deletion cost (install the scale-in component of manifests/, or the chart with "
                "scaleIn.enabled=true). The Deployment is scaled on its connections; scale-in removes pods as "
                "the ReplicaSet controller chooses",
            )
        )

    if spec.scale_in_by_connections and kind_of(deployment) in SCALE_IN_IGNORED:
        result.events.append(
            Event(
                "Warning",
                "ScaleInByConnectionsIgnored",
                f"{A_SCALE_IN} has no effect on a {kind_of(deployment)}: {SCALE_IN_IGNORED[kind_of(deployment)]}. "
                "tcp-exporter/drain still lets the removed pod's connections end before its app stops",
            )
        )
    ref = workload_ref(deployment)
    if ref is not None and cfg.injection != "webhook" and facts.template_from is None:
        result.events.append(
            Event(
                "Warning",
                "WorkloadRefNotInjected",
                f"this Rollout takes its pod template from {ref.get('kind', 'Deployment')} {ref.get('name')!r} "
                "(spec.workloadRef), which the patch mode cannot inject on its behalf: it is not a Deployment of this "
                "namespace the operator can read, or another Rollout names it too. Nothing changed. Name a "
                "Deployment of its own, or use the webhook injection (TCP_EXPORTER_OPERATOR_INJECTION=webhook), "
                "which injects the Rollout's pods as they are created",
            )
        )
        return result
    added = injection(deployment, spec, recorded)
    paths = discovery_paths(added, facts, cfg)
    if cfg.injection == "webhook":
        webhook_injection(deployment, recorded, facts, result)
    else:
        patch_injection(deployment, spec, added, recorded, result)
    wanted_pm = pod_monitor(deployment, spec) if "podmonitor" in paths else None
    pm_action = child_action(wanted_pm, facts.pod_monitor)
    if pm_action is not None:
        result.children.append(ChildWrite("PodMonitor", pm_action, wanted_pm or dict(facts.pod_monitor or {})))
    if wanted_pm is not None and pm_action in ("create", "update"):
        verb = f"PodMonitor{pm_action.title()}d"
        result.events.append(Event("Normal", verb, f"PodMonitor {wanted_pm['metadata']['name']}"))

    why_none = None
    if not spec.scaled_object:
        why_none = Event("Normal", "ScaledObjectDeleted", f'{A_SCALEDOBJECT} is "false"')
    elif not paths:
        own = "; the pod template's own prometheus.io annotations are kept, so the annotation job scrapes the app"
        why_none = Event(
            "Warning",
            "MetricsDiscovery",
            BLIND_NOTE.format(paths=", ".join(cfg.discovery), why=own if spec.annotate else "", port=METRICS_PORT_NAME),
        )
    if why_none is not None:
        if why_none.type == "Warning":
            result.events.append(why_none)
        if facts.scaled_object is not None:
            result.children.append(ChildWrite("ScaledObject", "delete", dict(facts.scaled_object)))
            if why_none.type == "Normal":
                result.events.append(why_none)
        return result
    if not facts.keda:
        result.events.append(
            Event(
                "Warning",
                "KedaMissing",
                "KEDA's ScaledObject CRD (keda.sh/v1alpha1) is not installed: the sidecar is "
                "injected and the ScaledObject will be created once KEDA is installed",
            )
        )
        return result
    wanted_so = scaled_object(deployment, spec, facts.keda_fallback_behavior)
    current = facts.scaled_object
    current_meta = (current or {}).get("metadata") or {}
    current_name = current_meta.get("name")
    managed = (current_meta.get("labels") or {}).get("app.kubernetes.io/managed-by") == MANAGED_BY
    if (
        current is not None
        and managed
        and current_name
        and len(current_name) > 54
        and current_name != wanted_so["metadata"]["name"]
    ):
        # Ours, under a name KEDA does not accept (longer than 54: an older operator's): deleted first, as KEDA
        # takes one ScaledObject per target, then created under the name it accepts. It never scaled, so no
        # working scaling is interrupted.
        result.children.append(ChildWrite("ScaledObject", "delete", dict(current)))
        current = None
    action = child_action(wanted_so, current, SCALED_OBJECT_OPTIONAL)
    if action is not None:
        result.children.append(ChildWrite("ScaledObject", action, wanted_so))
    if action == "create":
        result.events.append(
            Event(
                "Normal",
                "ScaledObjectCreated",
                f"ScaledObject {wanted_so['metadata']['name']}: {spec.threshold} connections per "
                f"replica, {spec.min_replicas}-{spec.max_replicas} replicas",
            )
        )
    elif action == "update":
        result.events.append(
            Event("Normal", "ScaledObjectUpdated", f"ScaledObject {wanted_so['metadata']['name']} updated")
        )
    return result


def patch_injection(
    deployment: Mapping[str, Any], spec: Spec, added: Injection, recorded: Status | None, result: Plan
) -> None:
    """INJECTION=patch: the sidecar in the Deployment's pod template, patched in when it is not there as wanted."""
    desired = inject(deployment, added, recorded)
    result.desired = desired
    wanted = Status.of(added.status)
    if not in_sync(deployment, recorded, desired, wanted):
        upgrade = (
            recorded is not None
            and recorded != Status()  # an unreadable status tells nothing: not an upgrade
            and recorded.inputs in (None, spec.inputs)  # None: recorded by a release before inputs
            and recorded.hash != wanted.hash
        )
        result.deployment_patch = deployment_patch(deployment, desired)
        result.upgrade = upgrade
        verb = "Updated" if recorded else "Injected"
        what = f"port {','.join(map(str, spec.ports))}, method {spec.method}"
        if upgrade:
            verb, what = UPGRADED, f"{(recorded.version if recorded else None) or '?'} -> {wanted.version}"
        result.events.append(Event("Normal", verb, f"{verb.lower()} the {CONTAINER} sidecar ({what})"))


NOT_INJECTED = "PodsNotInjected"


def webhook_injection(deployment: Mapping[str, Any], recorded: Status | None, facts: Facts, result: Plan) -> None:
    """INJECTION=webhook: the Deployment is left as written; the webhook injects its pods as they are created. A
    template the patch mode injected before is given back as it was (its pods are then created, and injected,
    anew); pods that came up without the sidecar (the webhook did not answer) are reported."""
    if recorded is not None:
        result.deployment_patch = deployment_patch(deployment, uninject(deployment, recorded))
        result.events.append(
            Event(
                "Normal",
                "InjectionMoved",
                f"the {CONTAINER} sidecar is now injected into each pod as it is created (INJECTION=webhook): "
                "taken out of the pod template, which is as written again",
            )
        )
        return
    missing, pods = facts.uninjected_pods or (0, 0)
    if missing:
        name, kind = deployment["metadata"]["name"], kind_of(deployment)
        result.events.append(
            Event(
                "Warning",
                NOT_INJECTED,
                f"{missing} of this {kind}'s {pods} pods run without the {CONTAINER} sidecar, and their connections "
                "are not counted: they were created before it was annotated, or while the injection webhook did not "
                "answer (its failurePolicy Ignore lets pods start without it). Once the webhook runs: "
                f"{restart_command(kind, deployment['metadata'].get('namespace', 'default'), name)} "
                "(docs/troubleshooting.md)",
            )
        )


def discovery_paths(added: Injection, facts: Facts, cfg: Config) -> list[str]:
    """The configured ways by which Prometheus will find this Deployment's sidecars, once injected."""
    paths = []
    if added.pod_annotations:
        paths.append("annotations")
    if "port-name" in cfg.discovery:
        paths.append("port-name")
    if "podmonitor" in cfg.discovery and facts.pod_monitor_crd:
        paths.append("podmonitor")
    return paths
