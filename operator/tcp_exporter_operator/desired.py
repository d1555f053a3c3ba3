"""The desired objects, built from a validated `Spec`: the injected sidecar container, the Deployment with it (and
without it), the status annotation, the ScaledObject and its PromQL query, the PodMonitor, and their names.

Pure: given the same Deployment and Spec, the same dicts; nothing here decides whether to write them (`plan`).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tcp_exporter import __version__
from tcp_exporter import contract as sidecar

from tcp_exporter_operator.annotations import (
    A_STATUS,
    CONTAINER,
    Spec,
    Status,
    annotations_of,
    digest,
    is_drain_hook,
    pre_stop,
    template_of,
)
from tcp_exporter_operator.events import LABELS, api_version
from tcp_exporter_operator.workloads import KINDS, kind_of, workload_api_version

METRICS_PORT_NAME = "tcp-metrics"
PROMETHEUS_SCRAPE = "prometheus.io/scrape"
# KEDA names its HPA keda-hpa-<ScaledObject name>, and that name must fit in 253 characters too.
# KEDA's admission webhook refuses ScaledObject names over 54 characters, and KEDA names its HPA keda-hpa-<name>
# and labels objects with the name, both capped at 63 (9 + 54): a longer Deployment name gets a readable prefix
# and a hash of the full name.
HPA_PREFIX = "keda-hpa-"
SCALED_OBJECT_NAME_MAX = 63 - len(HPA_PREFIX)
NONROOT_UID = 65532


def drain_token(deployment: Mapping[str, Any]) -> str:
    """What the kubelet shows the sidecar when a preStop hook asks for a drain: derived from the Deployment's UID,
    which only those who may read the Deployment see (rendered offline, without a UID: from its namespace and name,
    which anyone could guess, so that a pod elsewhere could mark these pods draining; docs/security.md)."""
    meta = deployment.get("metadata") or {}
    seed = meta.get("uid") or f"{meta.get('namespace', 'default')}/{meta.get('name', '')}"
    return hashlib.sha256(f"tcp-exporter/drain:{seed}".encode()).hexdigest()[:32]


def drain_hook(spec: Spec, token: str) -> dict[str, Any]:
    """The preStop hook that holds a container's SIGTERM until the pod's connections end or `spec.drain` passes."""
    return {
        "httpGet": {
            "path": f"{sidecar.DRAIN_PATH}?timeout={spec.drain}",
            "port": spec.metrics_port,
            "scheme": "HTTP",
            "httpHeaders": [{"name": sidecar.DRAIN_HEADER, "value": token}],
        }
    }


def is_native(container: Mapping[str, Any]) -> bool:
    return container.get("restartPolicy") == "Always"


def without_drain_hook(container: Mapping[str, Any]) -> dict[str, Any]:
    """The container without the preStop hook this operator added (and without a lifecycle left empty)."""
    if not is_drain_hook(pre_stop(container)):
        return dict(container)
    lifecycle = {k: v for k, v in container["lifecycle"].items() if k != "preStop"}
    new = {k: v for k, v in container.items() if k != "lifecycle"}
    if lifecycle:
        new["lifecycle"] = lifecycle
    return new


def with_drain_hook(container: Mapping[str, Any], hook: Mapping[str, Any]) -> dict[str, Any]:
    new = dict(container)
    new["lifecycle"] = {**(container.get("lifecycle") or {}), "preStop": copy.deepcopy(dict(hook))}
    return new


def sidecar_container(spec: Spec, token: str = "") -> dict[str, Any]:
    capabilities = sidecar.METHOD_CAPABILITIES.get(spec.method, ())
    security: dict[str, Any] = {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {
            "drop": ["ALL"],
            **({"add": [*capabilities, *sidecar.CHANGE_USER_CAPABILITIES]} if capabilities else {}),
        },
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if capabilities:
        # A capability added by the pod spec is usable by UID 0 only (no ambient capabilities). The sidecar
        # becomes UID 65532 before it opens anything, keeping only the method's capability.
        security.update({"runAsNonRoot": False, "runAsUser": 0})
    else:
        security.update({"runAsNonRoot": True, "runAsUser": NONROOT_UID, "runAsGroup": NONROOT_UID})
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "args": sidecar.sidecar_args(list(spec.ports), spec.method, spec.metrics_port, spec.deployment or None),
        "ports": [{"name": METRICS_PORT_NAME, "containerPort": spec.metrics_port, "protocol": "TCP"}],
        "resources": copy.deepcopy(spec.resources),
        "livenessProbe": {
            "httpGet": {"path": sidecar.HEALTH_PATH, "port": METRICS_PORT_NAME},
            "periodSeconds": 30,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        "securityContext": security,
    }
    if spec.native:
        # A native sidecar: the kubelet starts it before the app containers, keeps it running while they
        # terminate (their preStop hooks included), and stops it only once they have exited.
        container["restartPolicy"] = "Always"
    if spec.drain:
        container["env"] = [{"name": sidecar.env_name("--drain-token"), "value": token}]
        if not spec.native:
            # A regular container is stopped with the app, at once: the sidecar waits on its own drain too, so
            # that it keeps counting and answering the app's hook until the connections end.
            container["lifecycle"] = {"preStop": drain_hook(spec, token)}
    return container


def prometheus_annotations(spec: Spec) -> dict[str, str]:
    return {
        PROMETHEUS_SCRAPE: "true",
        "prometheus.io/port": str(spec.metrics_port),
        "prometheus.io/path": sidecar.METRICS_PATH,
    }


@dataclass(frozen=True)
class Injection:
    """What the operator adds to a Deployment, built once per plan: the sidecar, the pod-template annotations, and
    the status that records both (as the annotation's JSON object)."""

    container: dict[str, Any]  # the sidecar: a native one (an init container) when it has restartPolicy Always
    pod_annotations: dict[str, str]
    status: dict[str, Any]
    # The app containers that wait on the drain, and the preStop hook each gets (None: no drain).
    drain_containers: tuple[str, ...] = ()
    drain_hook: dict[str, Any] | None = None


def injection(deployment: Mapping[str, Any], spec: Spec, recorded: Status | None) -> Injection:
    token = drain_token(deployment) if spec.drain else ""
    container = sidecar_container(spec, token)
    hook = drain_hook(spec, token) if spec.drain else None
    pod_annotations = prometheus_annotations_wanted(deployment, spec, recorded)
    drained = {"containers": list(spec.drain_containers), "hook": hook} if hook else None
    return Injection(
        container, pod_annotations, status(spec, pod_annotations, container, drained), spec.drain_containers, hook
    )


def status(
    spec: Spec,
    pod_annotations: Mapping[str, str],
    container: Mapping[str, Any],
    drained: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What tcp-exporter/status records: enough to undo the injection, a hash to tell drift, and a digest of the
    user's annotations that shape the sidecar, to tell an upgrade of the operator from a change of the user's."""
    injected: dict[str, Any] = {"container": container, "podAnnotations": dict(pod_annotations)}
    if drained:
        injected["drain"] = dict(drained)
    recorded = {
        "version": __version__,
        "inputs": spec.inputs,
        "ports": list(spec.ports),
        "method": spec.method,
        "podAnnotations": sorted(pod_annotations),
        "hash": digest(injected),
    }
    if spec.native:  # absent for a regular container, as before native sidecars: those statuses stay valid
        recorded["mode"] = "native"
    return recorded


def prometheus_annotations_wanted(deployment: Mapping[str, Any], spec: Spec, recorded: Status | None) -> dict[str, str]:
    """Our prometheus.io annotations, unless the pod template carries the user's own or discovery is not by them."""
    if not spec.annotate:
        return {}
    current = annotations_of(template_of(deployment))
    ours = set(recorded.pod_annotations if recorded else ())
    if PROMETHEUS_SCRAPE in current and PROMETHEUS_SCRAPE not in ours:
        return {}
    return prometheus_annotations(spec)


def inject(deployment: Mapping[str, Any], added: Injection, recorded: Status | None) -> dict[str, Any]:
    """The Deployment with the sidecar, its discovery annotations and the status annotation (replacing what the
    `recorded` status says the operator added before)."""
    # Copies of just the maps on the paths written below (the rest is shared with `deployment`, read-only): a
    # deep copy of the whole Deployment, managedFields and all, was most of a plan's time.
    new = dict(deployment)
    new["metadata"] = dict(new.get("metadata") or {})
    new["spec"] = dict(new.get("spec") or {})
    template = new["spec"]["template"] = dict(new["spec"].get("template") or {})
    template_meta = template["metadata"] = dict(template.get("metadata") or {})
    template["spec"] = dict(template.get("spec") or {})
    previous = set(recorded.pod_annotations if recorded else ())
    annotations = {k: v for k, v in (template_meta.get("annotations") or {}).items() if k not in previous}
    annotations.update(added.pod_annotations)
    if annotations:
        template_meta["annotations"] = annotations
    else:
        template_meta.pop("annotations", None)
    containers = [without_drain_hook(c) for c in template["spec"].get("containers") or [] if c.get("name") != CONTAINER]
    if added.drain_hook is not None:
        containers = [
            with_drain_hook(c, added.drain_hook) if c.get("name") in added.drain_containers else c for c in containers
        ]
    inits = [c for c in template["spec"].get("initContainers") or [] if c.get("name") != CONTAINER]
    sidecar = copy.deepcopy(added.container)
    if is_native(sidecar):
        # Last of the init containers: the user's own run first, as they would without it, and it starts just
        # before the app containers.
        template["spec"]["containers"] = containers
        template["spec"]["initContainers"] = [*inits, sidecar]
    else:
        template["spec"]["containers"] = [*containers, sidecar]
        if inits:
            template["spec"]["initContainers"] = inits
        else:
            template["spec"].pop("initContainers", None)
    meta = new["metadata"]
    meta["annotations"] = {**(meta.get("annotations") or {}), A_STATUS: json.dumps(added.status, sort_keys=True)}
    return new


def uninject(deployment: Mapping[str, Any], recorded: Status | None) -> dict[str, Any]:
    """The Deployment without anything this operator added (as its `recorded` status says)."""
    new = copy.deepcopy(dict(deployment))
    ours = set(recorded.pod_annotations if recorded else ())
    template = new.get("spec", {}).get("template", {})
    template_meta = template.get("metadata", {})
    if template_meta.get("annotations"):
        kept = {k: v for k, v in template_meta["annotations"].items() if k not in ours}
        if kept:
            template_meta["annotations"] = kept
        else:
            template_meta.pop("annotations")
    if template.get("spec", {}).get("containers"):
        template["spec"]["containers"] = [
            without_drain_hook(c) for c in template["spec"]["containers"] if c.get("name") != CONTAINER
        ]
    if template.get("spec", {}).get("initContainers"):
        inits = [c for c in template["spec"]["initContainers"] if c.get("name") != CONTAINER]
        if inits:
            template["spec"]["initContainers"] = inits
        else:
            template["spec"].pop("initContainers")
    meta = new.get("metadata", {})
    if meta.get("annotations"):
        meta["annotations"] = {k: v for k, v in meta["annotations"].items() if k != A_STATUS}
    return new


def promql_string(value: str) -> str:
    """A PromQL string literal. PromQL takes Go's escapes only (re.escape's `\\-` is a parse error); JSON's
    escapes are a subset of Go's, and without ensure_ascii no surrogate pairs, which Go rejects, appear."""
    return json.dumps(value, ensure_ascii=False)


def query(namespace: str, name: str) -> str:
    """PromQL: the connections of this Deployment's pods, each pod counted once however many jobs scrape it.

    The sidecar labels its series with the Deployment's name (--deployment), so the selection is an exact
    match; `max by (namespace, pod, port)` keeps one series per pod and port when two scrape jobs (the
    annotation job and a PodMonitor, say) collect the same sidecar. No `or vector(0)`: when no sidecar is
    seen the query returns nothing, KEDA reports an error instead of 0, and the fallback holds the replicas.

    A draining pod's connections are left out (`unless` its tcp_exporter_draining is 1): the pod is going, and
    the clients it still holds must not ask for the replicas back. A sidecar too old to export it is counted.
    """
    selector = f"namespace={promql_string(namespace)},{sidecar.DEPLOYMENT_LABEL}={promql_string(name)}"
    return (
        f"sum(max by (namespace, pod, {sidecar.PORT_LABEL}) ({sidecar.METRIC_ESTABLISHED}{{{selector}}})"
        f" unless on (namespace, pod) (max by (namespace, pod) ({sidecar.METRIC_DRAINING}{{{selector}}}) == 1))"
    )


def child_name(name: str, suffix: str = "", limit: int = 253) -> str:
    """A name for an object made for the Deployment `name`: `name` plus `suffix`, cut to `limit` characters
    with a hash of the full name kept, so two long Deployment names that share a prefix do not collide."""
    full = f"{name}-{suffix}" if suffix else name
    if len(full) <= limit:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:10]
    tail = f"-{digest}" + (f"-{suffix}" if suffix else "")
    return name[: limit - len(tail)].rstrip("-.") + tail


def owner_reference(deployment: Mapping[str, Any]) -> dict[str, Any]:
    meta = deployment["metadata"]
    return {
        "apiVersion": workload_api_version(kind_of(deployment)),
        "kind": kind_of(deployment),
        "name": meta["name"],
        "uid": meta.get("uid", ""),
        "controller": True,
    }


def scaled_object(deployment: Mapping[str, Any], spec: Spec, fallback_behavior: bool = True) -> dict[str, Any]:
    """The ScaledObject for the Deployment; `fallback_behavior`: whether the installed KEDA knows that field."""
    meta = deployment["metadata"]
    namespace = meta.get("namespace", "default")
    options = spec.keda
    trigger: dict[str, Any] = {
        "type": "prometheus",
        "metricType": "AverageValue",
        "metadata": {
            "serverAddress": spec.prometheus,
            "query": query(namespace, meta["name"]),
            "threshold": str(spec.threshold),
            # An empty result is an error, not 0: KEDA then applies the fallback instead of scaling in.
            "ignoreNullValues": "false",
            **dict(options.trigger_metadata),
        },
    }
    if options.authentication_ref is not None:
        trigger["authenticationRef"] = dict(options.authentication_ref)
    so_spec: dict[str, Any] = {
        "scaleTargetRef": {
            "apiVersion": workload_api_version(kind_of(deployment)),
            "kind": kind_of(deployment),
            "name": meta["name"],
        },
        "pollingInterval": options.polling_interval,
        "minReplicaCount": spec.min_replicas,
        "maxReplicaCount": spec.max_replicas,
    }
    if options.fallback_behavior != "none" and (fallback_behavior or options.fallback_behavior == "static"):
        so_spec["fallback"] = {
            "failureThreshold": options.fallback_failure_threshold,
            "replicas": options.fallback_replicas,
            **({"behavior": options.fallback_behavior} if fallback_behavior else {}),
        }
    name = child_name(meta["name"], limit=SCALED_OBJECT_NAME_MAX)
    # The HPA's name, set rather than left to KEDA's default (the same): it is what fits in 63 characters.
    hpa: dict[str, Any] = {"name": f"{HPA_PREFIX}{name}"}
    if options.scale_down_stabilization is not None:
        hpa["behavior"] = {"scaleDown": {"stabilizationWindowSeconds": options.scale_down_stabilization}}
    so_spec["advanced"] = {"horizontalPodAutoscalerConfig": hpa}
    so_spec["triggers"] = [trigger]
    return {
        "apiVersion": api_version("ScaledObject"),
        "kind": "ScaledObject",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": dict(LABELS),
            "ownerReferences": [owner_reference(deployment)],
        },
        "spec": so_spec,
    }


def pod_monitor(deployment: Mapping[str, Any], spec: Spec) -> dict[str, Any] | None:
    """The PodMonitor that selects the workload's pods; None where it names no selector (a workloadRef Rollout
    whose Deployment could not be read): an empty one would select every pod of the namespace."""
    meta = deployment["metadata"]
    selector = (deployment.get("spec") or {}).get("selector")
    if not isinstance(selector, Mapping) or not (selector.get("matchLabels") or selector.get("matchExpressions")):
        return None
    return {
        "apiVersion": api_version("PodMonitor"),
        "kind": "PodMonitor",
        "metadata": {
            "name": child_name(meta["name"], "tcp-exporter"),
            "namespace": meta.get("namespace", "default"),
            "labels": dict(spec.pod_monitor_labels or LABELS),
            "ownerReferences": [owner_reference(deployment)],
        },
        "spec": {
            "selector": {k: copy.deepcopy(v) for k, v in selector.items() if k in ("matchLabels", "matchExpressions")},
            "podMetricsEndpoints": [{"port": METRICS_PORT_NAME, "path": sidecar.METRICS_PATH}],
        },
    }


def is_ours(obj: Mapping[str, Any] | None, deployment: Mapping[str, Any]) -> bool:
    """Whether a ScaledObject or PodMonitor is this operator's for this Deployment: owned by it, or, with no
    owning Deployment at all, labelled managed-by this operator under the name it would give (as `render` writes
    them for GitOps, where no UID is known: applied from Git, they are adopted, not taken for a stranger's)."""
    if not obj:
        return False
    meta = obj.get("metadata", {})
    name = deployment["metadata"]["name"]
    owners = [ref for ref in meta.get("ownerReferences") or [] if ref.get("kind") in KINDS]
    if owners:
        return any(ref.get("uid") == deployment["metadata"].get("uid") for ref in owners)
    target_ref = (obj.get("spec") or {}).get("scaleTargetRef") or {}
    if target_ref.get("kind", "Deployment") != kind_of(deployment):
        return False
    target = target_ref.get("name", name)
    return (
        (meta.get("labels") or {}).get("app.kubernetes.io/managed-by") == LABELS["app.kubernetes.io/managed-by"]
        and target == name
        and meta.get("name") in child_names(name)
    )


def child_names(name: str) -> tuple[str, str]:
    """The names this operator gives the children of the Deployment `name`: its ScaledObject, its PodMonitor."""
    return child_name(name, limit=SCALED_OBJECT_NAME_MAX), child_name(name, "tcp-exporter")
