"""Pure builders of desired state: given a Deployment (and a few facts about its cluster), what should be.

Nothing here talks to the API; the handlers do. `plan` is the whole decision
for one Deployment, so the operator's behaviour is unit-tested without a
cluster, and `render` gives GitOps users the same result offline.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from tcp_exporter import __version__
from tcp_exporter import contract as sidecar

from tcp_exporter_operator.config import Config
from tcp_exporter_operator.events import LABELS, Event

PREFIX = "tcp-exporter/"
A_PORT = PREFIX + "port"
A_METHOD = PREFIX + "method"
A_IMAGE = PREFIX + "image"
A_METRICS_PORT = PREFIX + "metrics-port"
A_THRESHOLD = PREFIX + "threshold"
A_MIN = PREFIX + "min-replicas"
A_MAX = PREFIX + "max-replicas"
A_PROMETHEUS = PREFIX + "prometheus"
A_SCALEDOBJECT = PREFIX + "scaledobject"
A_CPU_REQUEST = PREFIX + "cpu-request"
A_CPU_LIMIT = PREFIX + "cpu-limit"
A_MEMORY_REQUEST = PREFIX + "memory-request"
A_MEMORY_LIMIT = PREFIX + "memory-limit"
A_STATUS = PREFIX + "status"
A_POD_MONITOR_LABELS = PREFIX + "pod-monitor-labels"
A_POLLING_INTERVAL = PREFIX + "polling-interval"
A_STABILIZATION = PREFIX + "scale-down-stabilization"
A_FALLBACK_BEHAVIOR = PREFIX + "fallback-behavior"
A_FALLBACK_THRESHOLD = PREFIX + "fallback-failure-threshold"
A_FALLBACK_REPLICAS = PREFIX + "fallback-replicas"
A_AUTH_REF = PREFIX + "authentication-ref"
A_AUTH_MODES = PREFIX + "auth-modes"
A_PROMETHEUS_NAMESPACE = PREFIX + "prometheus-namespace"
A_CUSTOM_HEADERS = PREFIX + "custom-headers"
A_UNSAFE_SSL = PREFIX + "unsafe-ssl"
A_SCALE_IN = PREFIX + "scale-in-by-connections"

# The annotations that shape the injected sidecar (not the ScaledObject): a change of one of them is the user's.
SIDECAR_INPUTS = (
    A_PORT,
    A_METHOD,
    A_IMAGE,
    A_METRICS_PORT,
    A_CPU_REQUEST,
    A_CPU_LIMIT,
    A_MEMORY_REQUEST,
    A_MEMORY_LIMIT,
)

CONTAINER = "tcp-exporter"
METRICS_PORT_NAME = "tcp-metrics"
PROMETHEUS_SCRAPE = "prometheus.io/scrape"
PSA_ENFORCE = "pod-security.kubernetes.io/enforce"
INJECTABLE_METHODS = tuple(m for m in sidecar.METHODS if m != "auto")  # the sidecar's one list
# KEDA's fallback.behavior values (KEDA 2.17+), and "none" for no fallback block at all.
FALLBACK_BEHAVIORS = ("currentReplicasIfHigher", "currentReplicas", "currentReplicasIfLower", "static", "none")
AUTH_MODES = ("basic", "bearer", "tls", "custom")
AUTH_KINDS = ("TriggerAuthentication", "ClusterTriggerAuthentication")
# KEDA names its HPA keda-hpa-<ScaledObject name>, and that name must fit in 253 characters too.
SCALED_OBJECT_NAME_MAX = 253 - len("keda-hpa-")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
NONROOT_UID = 65532
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_SUFFIXES = {
    "m": Decimal("0.001"),
    "k": Decimal(10**3),
    "M": Decimal(10**6),
    "G": Decimal(10**9),
    "T": Decimal(10**12),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
    "": Decimal(1),
}


BLIND_NOTE = (
    "no ScaledObject: Prometheus cannot see this Deployment's sidecars by any discovery path the operator is "
    "configured for ({paths}){why}, and a ScaledObject whose query sees nothing would hold the replica count on "
    "its fallback forever. Add a scrape job on the port name {port!r} and set TCP_EXPORTER_OPERATOR_DISCOVERY "
    "to include port-name, or install the Prometheus Operator's PodMonitor CRD."
)


class InvalidSpec(ValueError):
    """An annotation that cannot be honoured; the message is what the user reads in the Warning Event."""


@dataclass(frozen=True)
class KedaOptions:
    """What the ScaledObject carries beyond the query and bounds, each passed through as KEDA documents it."""

    polling_interval: int = 15
    scale_down_stabilization: int | None = None
    fallback_behavior: str = "currentReplicasIfHigher"
    fallback_failure_threshold: int = 3
    fallback_replicas: int = 1
    authentication_ref: dict[str, str] | None = None
    trigger_metadata: tuple[tuple[str, str], ...] = ()  # authModes, namespace, customHeaders, unsafeSsl


@dataclass(frozen=True)
class Spec:
    """What the annotations (and the operator's configuration) ask for, validated."""

    ports: tuple[int, ...]
    method: str
    image: str
    metrics_port: int
    threshold: int
    min_replicas: int
    max_replicas: int
    prometheus: str
    scaled_object: bool
    resources: dict[str, dict[str, str]]
    inputs: str = ""  # a digest of the user's annotations that shape the sidecar (SIDECAR_INPUTS)
    annotate: bool = True  # whether Prometheus finds sidecars by prometheus.io/* annotations (the discovery setting)
    deployment: str = ""  # the Deployment's name: the sidecar labels its series with it, the query selects on it
    pod_monitor_labels: dict[str, str] = field(default_factory=dict)
    keda: KedaOptions = field(default_factory=KedaOptions)
    scale_in_by_connections: bool = False  # set pods' deletion cost from their connections (scalein.py)


@dataclass
class Facts:
    """What the plan needs to know about the cluster around the Deployment."""

    psa_level: str | None = None
    keda: bool = True
    pod_monitor_crd: bool = False
    scaled_object: Mapping[str, Any] | None = None  # the one this operator owns for the Deployment
    foreign_autoscalers: tuple[str, ...] = ()  # e.g. "HorizontalPodAutoscaler/web"
    pod_monitor: Mapping[str, Any] | None = None  # the one this operator owns for the Deployment
    # Whether an upgrade rollout (a sidecar change that is the operator's, not the user's) may start now.
    rollout_slot: bool = True
    # Whether the installed KEDA knows fallback.behavior (2.17+). An older one would drop the field and apply
    # its fixed behavior, scaling to fallback.replicas: there the operator writes no fallback at all.
    keda_fallback_behavior: bool = True


@dataclass
class Plan:
    """The writes that bring one Deployment to its desired state; empty when it is there."""

    deployment_patch: list[dict[str, Any]] | None = None
    scaled_object: dict[str, Any] | None = None
    scaled_object_action: str | None = None  # create, update, delete
    pod_monitor: dict[str, Any] | None = None
    pod_monitor_action: str | None = None  # create, update, delete
    events: list[Event] = field(default_factory=list)
    # The Deployment patch is an upgrade: the sidecar changes for the operator's reasons (a new image or default),
    # not the user's. Such rollouts are paced; `upgrade_deferred` means one waits for a slot (no patch planned).
    upgrade: bool = False
    upgrade_deferred: bool = False
    desired: dict[str, Any] | None = None  # the Deployment as the plan wants it, when it is injected

    @property
    def writes(self) -> int:
        return (
            (self.deployment_patch is not None)
            + (self.scaled_object_action is not None)
            + (self.pod_monitor_action is not None)
        )


# -- reading the annotations -------------------------------------------------------------------


def _annotations(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return obj.get("metadata", {}).get("annotations") or {}


def _template(deployment: Mapping[str, Any]) -> Mapping[str, Any]:
    template: Mapping[str, Any] = deployment.get("spec", {}).get("template", {})
    return template


def _containers(deployment: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list(_template(deployment).get("spec", {}).get("containers") or [])


def _integer(annotations: Mapping[str, str], key: str, default: int, low: int, high: int | None = None) -> int:
    raw = annotations.get(key)
    if raw is None:
        return default
    text = raw.strip()
    if not re.fullmatch(r"-?[0-9]+", text):
        raise InvalidSpec(f"{key}: {raw!r} is not a whole number")
    value = int(text)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise InvalidSpec(f"{key}: {value} must be {bound}")
    return value


def _resolve_ports(raw: str, deployment: Mapping[str, Any]) -> tuple[int, ...]:
    named: dict[str, int] = {}
    for container in _containers(deployment):
        if container.get("name") == CONTAINER:
            continue
        for port in container.get("ports") or []:
            if port.get("name"):
                named[port["name"]] = int(port["containerPort"])
    ports = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            raise InvalidSpec(f"{A_PORT}: {raw!r} has an empty entry")
        if item.isdigit():
            number = int(item)
            if not 1 <= number <= 65535:
                raise InvalidSpec(f"{A_PORT}: {number} is not a port number in 1-65535")
            ports.append(number)
        elif item in named:
            ports.append(named[item])
        else:
            known = ", ".join(sorted(named)) or "none"
            raise InvalidSpec(
                f"{A_PORT}: {item!r} is neither a port number nor a container port name "
                f"of this pod template (names: {known})"
            )
    return tuple(sorted(set(ports)))


def _quantity(annotations: Mapping[str, str], key: str, default: str) -> str:
    value = annotations.get(key, default).strip()
    if not _QUANTITY.match(value):
        raise InvalidSpec(f"{key}: {value!r} is not a resource quantity (for example 10m, 0.5, 64Mi)")
    return value


def quantity_value(text: str) -> Decimal:
    match = _QUANTITY.match(str(text))
    if not match:
        raise InvalidOperation(text)
    suffix = match.group(2) or ""
    return Decimal(str(text)[: len(str(text)) - len(suffix)]) * _SUFFIXES[suffix]


def _setting(annotations: Mapping[str, str], key: str, default: str) -> tuple[str, str]:
    """The annotation's text, else the operator-wide default's; with the name to blame in an error."""
    if key in annotations:
        return annotations[key].strip(), key
    return default.strip(), f"{key} (the operator's default)"


def _pairs(text: str, where: str, what: str) -> list[tuple[str, str]]:
    """`k=v,k=v` -> [(k, v)]; empty text -> []."""
    out = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidSpec(f"{where}: {item!r} is not {what}=value")
        out.append((key.strip(), value.strip()))
    return out


def parse_pod_monitor_labels(annotations: Mapping[str, str], cfg: Config) -> dict[str, str]:
    labels = {}
    for text, where in (
        (cfg.pod_monitor_labels, "TCP_EXPORTER_OPERATOR_POD_MONITOR_LABELS"),
        (annotations.get(A_POD_MONITOR_LABELS, ""), A_POD_MONITOR_LABELS),
    ):
        for key, value in _pairs(text, where, "label"):
            if not _LABEL_NAME.match(key) or not _LABEL_VALUE.match(value):
                raise InvalidSpec(f"{where}: {key}={value} is not a valid Kubernetes label")
            labels[key] = value
    return {**labels, **LABELS}


def parse_keda(annotations: Mapping[str, str], cfg: Config, min_replicas: int, max_replicas: int) -> KedaOptions:
    """The ScaledObject's KEDA options from the annotations and the operator's defaults; raises InvalidSpec."""

    def number(key: str, default: int | str, low: int, high: int) -> int | None:
        text, where = _setting(annotations, key, str(default))
        if text == "":
            return None
        if not re.fullmatch(r"[0-9]+", text) or not low <= int(text) <= high:
            raise InvalidSpec(f"{where}: {text!r} is not a whole number between {low} and {high}")
        return int(text)

    polling = number(A_POLLING_INTERVAL, cfg.polling_interval, 1, 3600)
    stabilization = number(A_STABILIZATION, cfg.scale_down_stabilization, 0, 3600)  # the HPA's own bounds
    behavior, where = _setting(annotations, A_FALLBACK_BEHAVIOR, cfg.fallback_behavior)
    if behavior not in FALLBACK_BEHAVIORS:
        raise InvalidSpec(f"{where}: {behavior!r} is not one of {', '.join(FALLBACK_BEHAVIORS)}")
    threshold = number(A_FALLBACK_THRESHOLD, cfg.fallback_failure_threshold, 1, 1000)
    fallback_replicas = number(A_FALLBACK_REPLICAS, cfg.fallback_replicas, 0, max_replicas)
    ref_text, where = _setting(annotations, A_AUTH_REF, cfg.authentication_ref)
    ref = None
    if ref_text:
        kind, _, name = ref_text.rpartition("/")
        kind = kind or "TriggerAuthentication"
        if kind not in AUTH_KINDS or not _DNS_SUBDOMAIN.match(name):
            raise InvalidSpec(f"{where}: {ref_text!r} is not NAME or ({'|'.join(AUTH_KINDS)})/NAME")
        ref = {"name": name, "kind": kind}
    metadata = []
    modes, where = _setting(annotations, A_AUTH_MODES, cfg.auth_modes)
    if modes:
        wrong = [m for m in (m.strip() for m in modes.split(",")) if m not in AUTH_MODES]
        if wrong:
            raise InvalidSpec(f"{where}: {', '.join(wrong)} not among KEDA's {', '.join(AUTH_MODES)}")
        if ref is None:
            raise InvalidSpec(f"{where} needs {A_AUTH_REF}: the credentials come from a TriggerAuthentication")
        metadata.append(("authModes", ",".join(m.strip() for m in modes.split(","))))
    elif ref is not None:
        raise InvalidSpec(
            f"{A_AUTH_REF} needs {A_AUTH_MODES} ({', '.join(AUTH_MODES)}): KEDA's Prometheus "
            "trigger uses no credentials without it"
        )
    tenant, where = _setting(annotations, A_PROMETHEUS_NAMESPACE, cfg.prometheus_namespace)
    if tenant:
        if any(ch.isspace() or ch == "," for ch in tenant):
            raise InvalidSpec(f"{where}: {tenant!r} is not a namespace or tenant name")
        metadata.append(("namespace", tenant))
    headers, where = _setting(annotations, A_CUSTOM_HEADERS, cfg.custom_headers)
    if headers:
        pairs = _pairs(headers, where, "Header-Name")
        if any(not _HEADER_NAME.match(k) for k, _ in pairs):
            raise InvalidSpec(f"{where}: {headers!r} has a header name with characters HTTP does not allow")
        metadata.append(("customHeaders", ",".join(f"{k}={v}" for k, v in pairs)))
    unsafe, where = _setting(annotations, A_UNSAFE_SSL, cfg.unsafe_ssl)
    if unsafe:
        if unsafe.lower() not in ("true", "false"):
            raise InvalidSpec(f'{where}: {unsafe!r} must be "true" or "false"')
        metadata.append(("unsafeSsl", unsafe.lower()))
    return KedaOptions(
        polling_interval=polling or 15,
        scale_down_stabilization=stabilization,
        fallback_behavior=behavior,
        fallback_failure_threshold=threshold or 3,
        fallback_replicas=min_replicas if fallback_replicas is None else fallback_replicas,
        authentication_ref=ref,
        trigger_metadata=tuple(metadata),
    )


def parse_spec(deployment: Mapping[str, Any], cfg: Config) -> Spec:
    """The validated Spec of an annotated Deployment; raises InvalidSpec with a message for the user."""
    annotations = _annotations(deployment)
    ports = _resolve_ports(annotations[A_PORT], deployment)
    method = annotations.get(A_METHOD, cfg.method).strip()
    if method not in INJECTABLE_METHODS:
        raise InvalidSpec(f"{A_METHOD}: {method!r} is not one of {', '.join(INJECTABLE_METHODS)}")
    metrics_port = _integer(annotations, A_METRICS_PORT, cfg.metrics_port, 1, 65535)
    if metrics_port in ports:
        raise InvalidSpec(f"{A_METRICS_PORT}: {metrics_port} is also a watched port")
    for container in _containers(deployment):
        if container.get("name") == CONTAINER:
            continue
        if any(int(p.get("containerPort", 0)) == metrics_port for p in container.get("ports") or []):
            raise InvalidSpec(
                f"{A_METRICS_PORT}: {metrics_port} is already used by container "
                f"{container.get('name')!r}; set {A_METRICS_PORT} to a free port"
            )
    threshold = _integer(annotations, A_THRESHOLD, cfg.threshold, 1)
    min_replicas = _integer(annotations, A_MIN, cfg.min_replicas, 1)
    max_replicas = _integer(annotations, A_MAX, cfg.max_replicas, 1)
    if min_replicas > max_replicas:
        raise InvalidSpec(f"{A_MIN} ({min_replicas}) is above {A_MAX} ({max_replicas})")
    toggle = annotations.get(A_SCALEDOBJECT, "true").strip().lower()
    if toggle not in ("true", "false"):
        raise InvalidSpec(f'{A_SCALEDOBJECT}: {toggle!r} must be "true" or "false"')
    scale_in = annotations.get(A_SCALE_IN, cfg.scale_in_by_connections).strip().lower()
    if scale_in not in ("true", "false"):
        raise InvalidSpec(f'{A_SCALE_IN}: {scale_in!r} must be "true" or "false"')
    prometheus = annotations.get(A_PROMETHEUS, cfg.prometheus).strip()
    if not re.match(r"^https?://[^\s/]+", prometheus):
        raise InvalidSpec(f"{A_PROMETHEUS}: {prometheus!r} is not an http(s):// address")
    image = annotations.get(A_IMAGE, cfg.sidecar_image).strip()
    if not image or any(c.isspace() for c in image):
        raise InvalidSpec(f"{A_IMAGE}: {image!r} is not an image reference")
    resources = {
        "requests": {
            "cpu": _quantity(annotations, A_CPU_REQUEST, cfg.cpu_request),
            "memory": _quantity(annotations, A_MEMORY_REQUEST, cfg.memory_request),
        },
        "limits": {
            "cpu": _quantity(annotations, A_CPU_LIMIT, cfg.cpu_limit),
            "memory": _quantity(annotations, A_MEMORY_LIMIT, cfg.memory_limit),
        },
    }
    for kind in ("cpu", "memory"):
        if quantity_value(resources["requests"][kind]) > quantity_value(resources["limits"][kind]):
            raise InvalidSpec(
                f"the {kind} request {resources['requests'][kind]} is above its limit {resources['limits'][kind]}"
            )
    return Spec(
        deployment=deployment["metadata"]["name"],
        inputs=_digest({key: annotations.get(key) for key in SIDECAR_INPUTS}),
        annotate="annotations" in cfg.discovery,
        pod_monitor_labels=parse_pod_monitor_labels(annotations, cfg),
        keda=parse_keda(annotations, cfg, min_replicas, max_replicas),
        ports=ports,
        method=method,
        image=image,
        metrics_port=metrics_port,
        threshold=threshold,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        prometheus=prometheus.rstrip("/"),
        scaled_object=toggle == "true",
        scale_in_by_connections=scale_in == "true",
        resources=resources,
    )


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
    for container in _containers(deployment) + list(_template(deployment).get("spec", {}).get("initContainers") or []):
        if container.get("name") in MESH_CONTAINERS:
            return MESH_CONTAINERS[container["name"]]
    template_meta = _template(deployment).get("metadata", {})
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


# -- the desired objects -------------------------------------------------------------------------


def sidecar_container(spec: Spec) -> dict[str, Any]:
    capabilities = sidecar.METHOD_CAPABILITIES.get(spec.method, ())
    security: dict[str, Any] = {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"], **({"add": list(capabilities)} if capabilities else {})},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if capabilities:
        # A capability added by the pod spec is usable by UID 0 only (no ambient capabilities).
        security.update({"runAsNonRoot": False, "runAsUser": 0})
    else:
        security.update({"runAsNonRoot": True, "runAsUser": NONROOT_UID, "runAsGroup": NONROOT_UID})
    return {
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


def prometheus_annotations(spec: Spec) -> dict[str, str]:
    return {
        PROMETHEUS_SCRAPE: "true",
        "prometheus.io/port": str(spec.metrics_port),
        "prometheus.io/path": sidecar.METRICS_PATH,
    }


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def status(spec: Spec, pod_annotations: Mapping[str, str]) -> dict[str, Any]:
    """What tcp-exporter/status records: enough to undo the injection, a hash to tell drift, and a digest of the
    user's annotations that shape the sidecar, to tell an upgrade of the operator from a change of the user's."""
    injected = {"container": sidecar_container(spec), "podAnnotations": dict(pod_annotations)}
    return {
        "version": __version__,
        "inputs": spec.inputs,
        "ports": list(spec.ports),
        "method": spec.method,
        "podAnnotations": sorted(pod_annotations),
        "hash": _digest(injected),
    }


def recorded_status(deployment: Mapping[str, Any]) -> dict[str, Any] | None:
    raw = _annotations(deployment).get(A_STATUS)
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def prometheus_annotations_wanted(deployment: Mapping[str, Any], spec: Spec) -> dict[str, str]:
    """Our prometheus.io annotations, unless the pod template carries the user's own or discovery is not by them."""
    if not spec.annotate:
        return {}
    current = _annotations(_template(deployment))
    ours = set((recorded_status(deployment) or {}).get("podAnnotations", []))
    if PROMETHEUS_SCRAPE in current and PROMETHEUS_SCRAPE not in ours:
        return {}
    return prometheus_annotations(spec)


def inject(deployment: Mapping[str, Any], spec: Spec) -> dict[str, Any]:
    """The Deployment with the sidecar, its discovery annotations and the status annotation."""
    # Copies of just the maps on the paths written below (the rest is shared with `deployment`, read-only): a
    # deep copy of the whole Deployment, managedFields and all, was most of a plan's time.
    new = dict(deployment)
    new["metadata"] = dict(new.get("metadata") or {})
    new["spec"] = dict(new.get("spec") or {})
    template = new["spec"]["template"] = dict(new["spec"].get("template") or {})
    template_meta = template["metadata"] = dict(template.get("metadata") or {})
    template["spec"] = dict(template.get("spec") or {})
    pod_annotations = prometheus_annotations_wanted(deployment, spec)
    previous = set((recorded_status(deployment) or {}).get("podAnnotations", []))
    annotations = {k: v for k, v in (template_meta.get("annotations") or {}).items() if k not in previous}
    annotations.update(pod_annotations)
    if annotations:
        template_meta["annotations"] = annotations
    else:
        template_meta.pop("annotations", None)
    containers = [c for c in template["spec"].get("containers") or [] if c.get("name") != CONTAINER]
    template["spec"]["containers"] = [*containers, sidecar_container(spec)]
    meta = new["metadata"]
    meta["annotations"] = {
        **(meta.get("annotations") or {}),
        A_STATUS: json.dumps(status(spec, pod_annotations), sort_keys=True),
    }
    return new


def uninject(deployment: Mapping[str, Any]) -> dict[str, Any]:
    """The Deployment without anything this operator added (as recorded in its status annotation)."""
    new = copy.deepcopy(dict(deployment))
    ours = set((recorded_status(deployment) or {}).get("podAnnotations", []))
    template = new.get("spec", {}).get("template", {})
    template_meta = template.get("metadata", {})
    if template_meta.get("annotations"):
        kept = {k: v for k, v in template_meta["annotations"].items() if k not in ours}
        if kept:
            template_meta["annotations"] = kept
        else:
            template_meta.pop("annotations")
    if template.get("spec", {}).get("containers"):
        template["spec"]["containers"] = [c for c in template["spec"]["containers"] if c.get("name") != CONTAINER]
    meta = new.get("metadata", {})
    if meta.get("annotations"):
        meta["annotations"] = {k: v for k, v in meta["annotations"].items() if k != A_STATUS}
    return new


def matches(desired: Any, actual: Any, key: str = "") -> bool:
    """Whether `actual` holds everything `desired` says; fields the API server defaults are ignored."""
    if isinstance(desired, Mapping):
        return isinstance(actual, Mapping) and all(matches(v, actual.get(k), k) for k, v in desired.items())
    if isinstance(desired, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(desired)
            and all(matches(d, a, key) for d, a in zip(desired, actual, strict=True))
        )
    if key in ("cpu", "memory") and actual is not None:
        try:
            return quantity_value(str(desired)) == quantity_value(str(actual))
        except InvalidOperation:
            return False
    return bool(desired == actual)


def in_sync(deployment: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """Whether the Deployment already carries the injection `desired` describes."""
    have, want = recorded_status(deployment) or {}, recorded_status(desired) or {}
    if {k: v for k, v in have.items() if k != "version"} != {k: v for k, v in want.items() if k != "version"}:
        return False
    actual = {c.get("name"): c for c in _containers(deployment)}
    wanted = {c.get("name"): c for c in _containers(desired)}
    if set(actual) != set(wanted) or not matches(wanted[CONTAINER], actual[CONTAINER]):
        return False
    return matches(_annotations(_template(desired)), _annotations(_template(deployment)))


def _pointer(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def deployment_patch(current: Mapping[str, Any], desired: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A JSON patch from current to desired that fails (422) if what it replaces changed since it was read.

    Preconditions cover exactly what is replaced, not the resourceVersion: the
    controllers' status updates then cause no false conflicts, and nobody
    else's annotations are touched.
    """
    ops: list[dict[str, Any]] = []
    old, new = current["metadata"].get("annotations"), desired["metadata"].get("annotations") or {}
    if not old:
        # Adding the whole map could drop one added meanwhile: only if nothing changed.
        ops.append({"op": "test", "path": "/metadata/resourceVersion", "value": current["metadata"]["resourceVersion"]})
        ops.append({"op": "add", "path": "/metadata/annotations", "value": dict(new)})
    else:
        ops += [{"op": "remove", "path": f"/metadata/annotations/{_pointer(k)}"} for k in old if k not in new]
        ops += [
            {"op": "add", "path": f"/metadata/annotations/{_pointer(k)}", "value": v}
            for k, v in new.items()
            if old.get(k) != v
        ]
    template_meta = _template(current).get("metadata", {})
    old_pod, new_pod = template_meta.get("annotations"), _template(desired).get("metadata", {}).get("annotations")
    if (old_pod or {}) != (new_pod or {}):
        ops.append({"op": "test", "path": "/spec/template/metadata", "value": dict(template_meta)})
        if new_pod:
            ops.append({"op": "add", "path": "/spec/template/metadata/annotations", "value": dict(new_pod)})
        else:
            ops.append({"op": "remove", "path": "/spec/template/metadata/annotations"})
    if _containers(current) != _containers(desired):
        ops.append({"op": "test", "path": "/spec/template/spec/containers", "value": _containers(current)})
        ops.append({"op": "replace", "path": "/spec/template/spec/containers", "value": _containers(desired)})
    return ops


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
    """
    selector = f"namespace={promql_string(namespace)},{sidecar.DEPLOYMENT_LABEL}={promql_string(name)}"
    return f"sum(max by (namespace, pod, {sidecar.PORT_LABEL}) ({sidecar.METRIC_ESTABLISHED}{{{selector}}}))"


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
        "apiVersion": "apps/v1",
        "kind": "Deployment",
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
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": meta["name"]},
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
    if options.scale_down_stabilization is not None:
        so_spec["advanced"] = {
            "horizontalPodAutoscalerConfig": {
                "behavior": {"scaleDown": {"stabilizationWindowSeconds": options.scale_down_stabilization}}
            }
        }
    so_spec["triggers"] = [trigger]
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {
            "name": child_name(meta["name"], limit=SCALED_OBJECT_NAME_MAX),
            "namespace": namespace,
            "labels": dict(LABELS),
            "ownerReferences": [owner_reference(deployment)],
        },
        "spec": so_spec,
    }


def pod_monitor(deployment: Mapping[str, Any], spec: Spec) -> dict[str, Any]:
    meta = deployment["metadata"]
    selector = deployment["spec"]["selector"]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
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
    owners = [ref for ref in meta.get("ownerReferences") or [] if ref.get("kind") == "Deployment"]
    if owners:
        return any(ref.get("uid") == deployment["metadata"].get("uid") for ref in owners)
    target = (obj.get("spec") or {}).get("scaleTargetRef", {}).get("name", name)
    return (
        (meta.get("labels") or {}).get("app.kubernetes.io/managed-by") == LABELS["app.kubernetes.io/managed-by"]
        and target == name
        and meta.get("name") in child_names(name)
    )


def child_names(name: str) -> tuple[str, str]:
    """The names this operator gives the children of the Deployment `name`: its ScaledObject, its PodMonitor."""
    return child_name(name, limit=SCALED_OBJECT_NAME_MAX), child_name(name, "tcp-exporter")


# -- the decision ---------------------------------------------------------------------------------


def plan(deployment: Mapping[str, Any], facts: Facts, cfg: Config) -> Plan:
    """Every write (and Event) that brings this Deployment to what its annotations ask for."""
    result = Plan()
    annotations = _annotations(deployment)
    recorded = recorded_status(deployment)
    has_container = any(c.get("name") == CONTAINER for c in _containers(deployment))

    if A_PORT not in annotations:
        if recorded is not None:
            clean = uninject(deployment)
            result.deployment_patch = deployment_patch(deployment, clean)
            result.events.append(Event("Normal", "Removed", f"{A_PORT} was removed: sidecar removed"))
        if facts.scaled_object is not None:
            result.scaled_object_action = "delete"
            result.scaled_object = dict(facts.scaled_object)
        if facts.pod_monitor is not None:
            result.pod_monitor_action = "delete"
            result.pod_monitor = dict(facts.pod_monitor)
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

    desired = inject(deployment, spec)
    result.desired = desired
    paths = discovery_paths(deployment, spec, facts, cfg)
    if not in_sync(deployment, desired):
        wanted_status = recorded_status(desired) or {}
        upgrade = bool(
            recorded
            and recorded.get("inputs") in (None, spec.inputs)  # None: recorded by a release before inputs
            and recorded.get("hash") != wanted_status.get("hash")
        )
        if upgrade and not facts.rollout_slot:
            result.upgrade_deferred = True
        else:
            result.deployment_patch = deployment_patch(deployment, desired)
            result.upgrade = upgrade
            verb = "Updated" if recorded else "Injected"
            what = f"port {','.join(map(str, spec.ports))}, method {spec.method}"
            if upgrade:
                verb, what = "Upgraded", f"{(recorded or {}).get('version', '?')} -> {wanted_status.get('version')}"
            result.events.append(Event("Normal", verb, f"{verb.lower()} the {CONTAINER} sidecar ({what})"))
    wanted_pm = pod_monitor(deployment, spec) if "podmonitor" in paths else None
    result.pod_monitor_action = child_action(wanted_pm, facts.pod_monitor)
    result.pod_monitor = wanted_pm if wanted_pm is not None else dict(facts.pod_monitor or {})
    if wanted_pm is not None and result.pod_monitor_action in ("create", "update"):
        verb = f"PodMonitor{result.pod_monitor_action.title()}d"
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
            result.scaled_object_action = "delete"
            result.scaled_object = dict(facts.scaled_object)
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
    wanted = scaled_object(deployment, spec, facts.keda_fallback_behavior)
    action = child_action(wanted, facts.scaled_object, SCALED_OBJECT_OPTIONAL)
    if action == "create":
        result.scaled_object, result.scaled_object_action = wanted, "create"
        result.events.append(
            Event(
                "Normal",
                "ScaledObjectCreated",
                f"ScaledObject {wanted['metadata']['name']}: {spec.threshold} connections per "
                f"replica, {spec.min_replicas}-{spec.max_replicas} replicas",
            )
        )
    elif action == "update":
        result.scaled_object, result.scaled_object_action = wanted, "update"
        result.events.append(
            Event("Normal", "ScaledObjectUpdated", f"ScaledObject {wanted['metadata']['name']} updated")
        )
    return result


# Fields of the ScaledObject that the operator writes only when asked: their presence alone is a difference.
SCALED_OBJECT_OPTIONAL: tuple[tuple[str | int, ...], ...] = (
    ("pollingInterval",),
    ("fallback",),
    ("fallback", "behavior"),
    ("advanced",),
    ("triggers", 0, "authenticationRef"),
    *(("triggers", 0, "metadata", key) for key in ("authModes", "namespace", "customHeaders", "unsafeSsl")),
)


def _at(obj: Any, path: tuple[str | int, ...]) -> Any:
    for part in path:
        if isinstance(part, int):
            obj = obj[part] if isinstance(obj, list) and len(obj) > part else None
        else:
            obj = obj.get(part) if isinstance(obj, Mapping) else None
        if obj is None:
            return None
    return obj


def child_action(
    wanted: Mapping[str, Any] | None,
    actual: Mapping[str, Any] | None,
    optional: tuple[tuple[str | int, ...], ...] = (),
) -> str | None:
    """create, update, delete or None: what brings an owned child object (`actual`) to `wanted`.

    Fields the API server or the child's controller may add are not differences (`matches`); the `optional`
    fields that `actual` has and `wanted` lacks are (an option the user removed).
    """
    if wanted is None:
        return "delete" if actual is not None else None
    if actual is None:
        return "create"
    spec, have = wanted.get("spec"), actual.get("spec")
    if not matches(spec, have) or not matches(wanted["metadata"]["labels"], actual.get("metadata", {}).get("labels")):
        return "update"
    if any(_at(have, path) is not None and _at(spec, path) is None for path in optional):
        return "update"
    return None


def discovery_paths(deployment: Mapping[str, Any], spec: Spec, facts: Facts, cfg: Config) -> list[str]:
    """The configured ways by which Prometheus will find this Deployment's sidecars, once injected."""
    paths = []
    if prometheus_annotations_wanted(deployment, spec):
        paths.append("annotations")
    if "port-name" in cfg.discovery:
        paths.append("port-name")
    if "podmonitor" in cfg.discovery and facts.pod_monitor_crd:
        paths.append("podmonitor")
    return paths
