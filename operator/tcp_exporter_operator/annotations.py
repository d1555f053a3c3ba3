"""The user's side of the contract: the `tcp-exporter/*` annotation keys, and their parsing into a validated `Spec`.

Everything here reads what a namespace editor wrote (and the operator's defaults, `Config`) and either returns
typed values or raises `InvalidSpec` with the message the user reads in a Warning Event. Pure: no API calls.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from tcp_exporter import contract as sidecar

from tcp_exporter_operator import rules
from tcp_exporter_operator.config import PREFIX as SETTING_PREFIX
from tcp_exporter_operator.config import Config
from tcp_exporter_operator.events import LABELS

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
A_DRAIN = PREFIX + "drain"
# Every tcp-exporter/* key the operator reads: any other under the prefix is a mistake the user is told of.
KNOWN_KEYS = frozenset(value for name, value in dict(globals()).items() if name.startswith("A_"))
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
# Seconds a drained app keeps, after its drain, to stop on SIGTERM within the pod's grace period.
DRAIN_SHUTDOWN = 5
DEFAULT_GRACE = 30  # Kubernetes' terminationGracePeriodSeconds
# The operator setting (TCP_EXPORTER_OPERATOR_...) that holds an annotation's default, where it is not named after it.
SETTINGS = {A_IMAGE: "SIDECAR_IMAGE"}
# The sidecar's methods but auto; KEDA's fallback.behavior values (2.17+) and "none" for no fallback block; KEDA's
# authModes: in rules.py, the one list the operator and the admission policy both read.
INJECTABLE_METHODS = rules.INJECTABLE_METHODS
FALLBACK_BEHAVIORS = rules.FALLBACK_BEHAVIORS
AUTH_MODES = rules.AUTH_MODES
AUTH_KINDS = ("TriggerAuthentication", "ClusterTriggerAuthentication")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
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
    # Where credentials that are not the namespace's own come from (an operator setting, or a
    # ClusterTriggerAuthentication): they may go only to an address the admin allows. None: none such.
    cluster_credentials: str | None = None


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
    drain: int = 0  # seconds a terminating pod waits for its connections to end before its app's SIGTERM; 0: none
    drain_containers: tuple[str, ...] = ()  # the app containers that wait (a preStop hook each)
    native: bool = False  # injected as a native sidecar (an init container with restartPolicy Always)


def tracked(annotations: Mapping[str, str]) -> bool:
    """Deployments that ask for the exporter, or still carry what it injected."""
    return A_PORT in annotations or A_STATUS in annotations


def asks_for_scaled_object(annotations: Mapping[str, str]) -> bool:
    """Whether the Deployment asks for the exporter and did not turn its ScaledObject off."""
    return A_PORT in annotations and str(annotations.get(A_SCALEDOBJECT, "true")).strip().lower() != "false"


def annotations_of(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return obj.get("metadata", {}).get("annotations") or {}


def template_of(deployment: Mapping[str, Any]) -> Mapping[str, Any]:
    template: Mapping[str, Any] = deployment.get("spec", {}).get("template", {})
    return template


def containers_of(deployment: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list(template_of(deployment).get("spec", {}).get("containers") or [])


def init_containers_of(deployment: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list(template_of(deployment).get("spec", {}).get("initContainers") or [])


def sidecar_of(deployment: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The container named tcp-exporter, as a regular container or a native sidecar (an init container)."""
    sidecars = [c for c in init_containers_of(deployment) if c.get("restartPolicy") == "Always"]  # run with it
    for container in containers_of(deployment) + sidecars:
        if isinstance(container, Mapping) and container.get("name") == CONTAINER:
            return container
    return None


def _integer(annotations: Mapping[str, str], key: str, default: int, low: int, high: int | None = None) -> int:
    text, where = _setting(annotations, key, str(default))
    if not re.fullmatch(r"-?[0-9]+", text):  # ASCII digits only: "²".isdigit() is True, and int("²") raises
        raise InvalidSpec(f"{where}: {text!r} is not a whole number")
    value = int(text)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise InvalidSpec(f"{where}: {value} must be {bound}")
    return value


def _boolean(annotations: Mapping[str, str], key: str, default: bool) -> bool:
    text, where = _setting(annotations, key, str(default).lower())
    if text.lower() not in ("true", "false"):
        raise InvalidSpec(f'{where}: {text!r} must be "true" or "false"')
    return text.lower() == "true"


def _resolve_ports(raw: str, deployment: Mapping[str, Any]) -> tuple[int, ...]:
    named: dict[str, int] = {}
    for container in containers_of(deployment):
        if container.get("name") == CONTAINER:
            continue
        for port in container.get("ports") or []:
            if port.get("name"):
                named[port["name"]] = int(port["containerPort"])
    ports = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            raise InvalidSpec(f"{A_PORT}: {raw!r} has an empty entry")
        if re.fullmatch(r"[0-9]+", item):  # ASCII digits only: "²".isdigit() is True, and int("²") raises
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


_DURATION = re.compile(r"^([0-9]{1,6})(s|m|h)?$")
_DURATION_UNIT = {"s": 1, "m": 60, "h": 3600, None: 1}


def duration(text: str, where: str, high: int) -> int:
    """`90`, `90s`, `5m`, `1h` -> seconds, 0 to `high`; InvalidSpec naming `where` otherwise."""
    found = _DURATION.fullmatch(text.strip()) if text.isascii() else None
    seconds = int(found.group(1)) * _DURATION_UNIT[found.group(2)] if found else -1
    if not 0 <= seconds <= high:
        raise InvalidSpec(f"{where}: {text[:40]!r} is not a duration from 0 to {high} s (such as 90, 90s, 5m, 1h)")
    return seconds


def is_drain_hook(hook: Any) -> bool:
    """Whether a container's preStop hook is the one this operator adds (a GET of the sidecar's drain)."""
    if not isinstance(hook, Mapping) or not isinstance(hook.get("httpGet"), Mapping):
        return False
    headers = hook["httpGet"].get("httpHeaders")
    return isinstance(headers, list) and any(
        isinstance(h, Mapping) and h.get("name") == sidecar.DRAIN_HEADER for h in headers
    )


def pre_stop(container: Mapping[str, Any]) -> Any:
    lifecycle = container.get("lifecycle")
    return lifecycle.get("preStop") if isinstance(lifecycle, Mapping) else None


def _drain(
    annotations: Mapping[str, str], cfg: Config, deployment: Mapping[str, Any], ports: tuple[int, ...]
) -> tuple[int, tuple[str, ...]]:
    """(seconds, the containers that wait) of the drain asked for; InvalidSpec when the pod cannot have it."""
    if A_DRAIN in annotations:
        where = A_DRAIN
        seconds = duration(annotations[A_DRAIN], A_DRAIN, sidecar.DRAIN_MAX_SECONDS)
    else:
        where, seconds = f"the operator setting {SETTING_PREFIX}DRAIN", cfg.drain
    if seconds == 0:
        return 0, ()
    apps = [c for c in containers_of(deployment) if c.get("name") != CONTAINER]
    serving = [
        c for c in apps if any(isinstance(p, Mapping) and p.get("containerPort") in ports for p in c.get("ports") or [])
    ]
    targets = serving or apps  # the containers that declare a watched port; if none does, every app container
    for container in targets:
        hook = pre_stop(container)
        if hook is not None and not is_drain_hook(hook):
            raise InvalidSpec(
                f"{where} asks for a drain, but container {str(container.get('name'))[:63]!r} has a preStop hook of "
                f'its own, which the drain\'s would replace; remove one of them (set {A_DRAIN}: "0" for none)'
            )
    grace = (template_of(deployment).get("spec") or {}).get("terminationGracePeriodSeconds")
    grace = grace if type(grace) is int else DEFAULT_GRACE
    if seconds + DRAIN_SHUTDOWN > grace:
        raise InvalidSpec(
            f"{where} asks for a drain of {seconds} s, but the pods' terminationGracePeriodSeconds is {grace}"
            f"{' (the default)' if grace == DEFAULT_GRACE else ''}: Kubernetes kills a pod at its end, drain or not. "
            f"Set it to {seconds + DRAIN_SHUTDOWN} or more ({DRAIN_SHUTDOWN} s for the app to stop after its drain), "
            "or drain for less"
        )
    return seconds, tuple(str(c.get("name")) for c in targets)


def _quantity(annotations: Mapping[str, str], key: str, default: str) -> str:
    value, where = _setting(annotations, key, default)
    if not _QUANTITY.match(value):
        raise InvalidSpec(f"{where}: {value!r} is not a resource quantity (for example 10m, 0.5, 64Mi)")
    return value


def quantity_value(text: str) -> Decimal:
    match = _QUANTITY.match(str(text))
    if not match:
        raise InvalidOperation(text)
    suffix = match.group(2) or ""
    return Decimal(str(text)[: len(str(text)) - len(suffix)]) * _SUFFIXES[suffix]


def _setting(annotations: Mapping[str, str], key: str, default: str) -> tuple[str, str]:
    """The annotation's text, else the operator-wide default's; with the name to blame in an error: the annotation,
    or the operator setting (TCP_EXPORTER_OPERATOR_...) its default comes from."""
    if key in annotations:
        return annotations[key].strip(), key
    setting = SETTINGS.get(key) or key.removeprefix(PREFIX).replace("-", "_").upper()
    return default.strip(), f"the operator setting {SETTING_PREFIX}{setting}"


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

    def number(key: str, default: int | None, low: int, high: int) -> int | None:
        text, where = _setting(annotations, key, "" if default is None else str(default))
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
    ref_text, ref_where = _setting(annotations, A_AUTH_REF, cfg.authentication_ref)
    ref = None
    cluster_credentials = None
    if ref_text:
        kind, _, name = ref_text.rpartition("/")
        kind = kind or "TriggerAuthentication"
        if kind not in AUTH_KINDS or not _DNS_SUBDOMAIN.match(name):
            raise InvalidSpec(f"{ref_where}: {ref_text!r} is not NAME or ({'|'.join(AUTH_KINDS)})/NAME")
        if kind == "ClusterTriggerAuthentication" and ref_where == A_AUTH_REF and not cfg.allow_cluster_trigger_auth:
            raise InvalidSpec(
                f"{A_AUTH_REF}: a ClusterTriggerAuthentication holds the cluster's credentials, and the operator "
                f"setting {SETTING_PREFIX}ALLOW_CLUSTER_TRIGGER_AUTH does not let annotations name one; use a "
                "TriggerAuthentication of this namespace"
            )
        ref = {"name": name, "kind": kind}
        if ref_where != A_AUTH_REF:
            cluster_credentials = ref_where  # the operator's setting
        elif kind == "ClusterTriggerAuthentication":
            cluster_credentials = f"{kind}/{name}"
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
            f"{ref_where} needs {A_AUTH_MODES} ({', '.join(AUTH_MODES)}): KEDA's Prometheus "
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
        if where != A_CUSTOM_HEADERS:
            cluster_credentials = cluster_credentials or where
    unsafe, where = _setting(annotations, A_UNSAFE_SSL, "" if cfg.unsafe_ssl is None else str(cfg.unsafe_ssl).lower())
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
        cluster_credentials=cluster_credentials,
    )


def check_settings(cfg: Config) -> None:
    """The operator's settings, checked at start as the defaults of a Deployment that sets no annotation but its
    port would use them; raises InvalidSpec naming the setting."""
    for entry in cfg.allowed_prometheus:
        prometheus_address(entry, f"the operator setting {SETTING_PREFIX}ALLOWED_PROMETHEUS")
    parse_spec({"metadata": {"name": "settings", "annotations": {A_PORT: "1"}}}, cfg)


def parse_spec(deployment: Mapping[str, Any], cfg: Config) -> Spec:
    """The validated Spec of an annotated Deployment; raises InvalidSpec with a message for the user."""
    annotations = annotations_of(deployment)
    if (template_of(deployment).get("spec") or {}).get("hostNetwork") is True:
        raise InvalidSpec(
            "the pods run in the node's network namespace (hostNetwork): a sidecar there would count every "
            "connection of the node to the port and take the node's metrics port (node_exporter's 9100); "
            "not injected"
        )
    broken = rules.check(annotations)  # the syntax, as the admission policy checks it at apply time
    if broken is not None:
        raise InvalidSpec(broken)
    ports = _resolve_ports(annotations[A_PORT], deployment)
    method, where = _setting(annotations, A_METHOD, cfg.method)
    if method not in INJECTABLE_METHODS:
        raise InvalidSpec(f"{where}: {method!r} is not one of {', '.join(INJECTABLE_METHODS)}")
    metrics_port = _integer(annotations, A_METRICS_PORT, cfg.metrics_port, 1, 65535)
    if metrics_port in ports:
        raise InvalidSpec(f"{A_METRICS_PORT}: {metrics_port} is also a watched port")
    for container in containers_of(deployment) + init_containers_of(deployment):
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
    toggle = _boolean(annotations, A_SCALEDOBJECT, True)
    scale_in = _boolean(annotations, A_SCALE_IN, cfg.scale_in_by_connections)
    prometheus, where = _setting(annotations, A_PROMETHEUS, cfg.prometheus)
    prometheus = prometheus_address(prometheus, where)
    keda = parse_keda(annotations, cfg, min_replicas, max_replicas)
    if not address_allowed(prometheus, cfg):
        if cfg.allowed_prometheus:
            raise InvalidSpec(
                f"{where}: {prometheus!r} is not among the addresses the operator setting "
                f"{SETTING_PREFIX}ALLOWED_PROMETHEUS allows"
            )
        if keda.cluster_credentials:
            raise InvalidSpec(
                f"{where}: {prometheus!r} is not the operator's Prometheus, and the credentials of "
                f"{keda.cluster_credentials} go only to it or to the addresses of the operator setting "
                f"{SETTING_PREFIX}ALLOWED_PROMETHEUS"
            )
        if scale_in:
            raise InvalidSpec(
                f"{A_SCALE_IN}: the operator reads the connections from Prometheus itself, and only from its own "
                f"({cfg.prometheus}) or from the addresses of the operator setting "
                f"{SETTING_PREFIX}ALLOWED_PROMETHEUS; {where} names {prometheus!r}"
            )
    image, where = _setting(annotations, A_IMAGE, cfg.sidecar_image)
    if not image or any(c.isspace() for c in image):
        raise InvalidSpec(f"{where}: {image!r} is not an image reference")
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
    drain, drain_containers = _drain(annotations, cfg, deployment, ports)
    inputs = {key: annotations.get(key) for key in SIDECAR_INPUTS}
    if A_DRAIN in annotations:  # only when set: the digests recorded before the drain existed stay valid
        inputs[A_DRAIN] = annotations[A_DRAIN]
    return Spec(
        deployment=deployment["metadata"]["name"],
        inputs=digest(inputs),
        drain=drain,
        drain_containers=drain_containers,
        annotate="annotations" in cfg.discovery,
        pod_monitor_labels=parse_pod_monitor_labels(annotations, cfg),
        keda=keda,
        ports=ports,
        method=method,
        image=image,
        metrics_port=metrics_port,
        threshold=threshold,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        prometheus=prometheus,
        scaled_object=toggle,
        scale_in_by_connections=scale_in,
        resources=resources,
        native=cfg.native(),
    )


# scheme://host[:port][/path]: no user, query or fragment (a `#` would cut off the path KEDA appends, sending the
# request, credentials included, wherever the text before it points), no whitespace or backslash.
_ADDRESS = re.compile(
    r"^(https?://(?:[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?|\[[0-9a-f:.]+\]))(:[0-9]{1,5})?((?:/[A-Za-z0-9._~%!$&'()*+;=:-]*)*)$",
    re.IGNORECASE,
)


def prometheus_address(text: str, where: str) -> str:
    """A Prometheus address as KEDA and the operator use it: scheme://host[:port][/path], without a trailing
    slash; raises InvalidSpec for anything else (user info, a query, a fragment, a non-ASCII host)."""
    match = _ADDRESS.match(text.strip().rstrip("/"))
    segments = match.group(3).split("/") if match else []
    dots = any(seg in (".", "..") for seg in segments) or re.search(r"%(2e|2f|5c)", text, re.IGNORECASE)
    if not match or dots or (match.group(2) and not 1 <= int(match.group(2)[1:]) <= 65535):
        raise InvalidSpec(
            f"{where}: {text!r} is not an http(s)://host[:port][/path] address (no user, query, fragment or "
            "dot segments)"
        )
    return match.group(1).lower() + (match.group(2) or "") + match.group(3)


def address_allowed(address: str, cfg: Config) -> bool:
    """The operator's own Prometheus, or an address of ALLOWED_PROMETHEUS: an entry ending in `/` allows the
    paths under it, any other that address exactly."""
    exact, prefixes = _allowed(cfg)
    return address in exact or any(address.startswith(prefix) for prefix in prefixes)


@functools.lru_cache(maxsize=4)
def _allowed(cfg: Config) -> tuple[frozenset[str], tuple[str, ...]]:
    """The allowed addresses, normalized once per configuration (not on every plan): exact ones, and prefixes
    (each ending in `/`)."""
    exact = {prometheus_address(cfg.prometheus, "TCP_EXPORTER_OPERATOR_PROMETHEUS")}
    prefixes = []
    for entry in cfg.allowed_prometheus:
        allowed = prometheus_address(entry, "TCP_EXPORTER_OPERATOR_ALLOWED_PROMETHEUS")
        exact.add(allowed)
        if entry.endswith("/"):
            prefixes.append(allowed + "/")
    return frozenset(exact), tuple(prefixes)


def unknown_keys(annotations: Mapping[str, str]) -> list[str]:
    """One message per `tcp-exporter/*` key the operator does not know (a typo is otherwise silently ignored),
    naming the closest known key."""
    messages = []
    for key in sorted(k for k in annotations if k.startswith(PREFIX) and k not in KNOWN_KEYS):
        names = sorted(k.removeprefix(PREFIX) for k in KNOWN_KEYS)
        close = difflib.get_close_matches(key.removeprefix(PREFIX), names, n=1, cutoff=0.75)
        hint = f"; did you mean {PREFIX}{close[0]}?" if close else ""
        messages.append(f"{key[:100]!r} is not an annotation of tcp-exporter and is ignored{hint}")
    return messages


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Status:
    """What the tcp-exporter/status annotation records, read as the untrusted input it is (any namespace editor can
    write it): a field of the wrong type reads as absent, never as an error."""

    version: str | None = None
    inputs: str | None = None
    ports: tuple[int, ...] = ()
    method: str | None = None
    pod_annotations: tuple[str, ...] = ()  # the pod-template annotations the operator added
    hash: str | None = None
    mode: str | None = None  # "native" for a native sidecar; absent for a regular container

    @classmethod
    def of(cls, value: Any) -> Status:
        if not isinstance(value, Mapping):
            return cls()

        def text(key: str) -> str | None:
            found = value.get(key)
            return found if isinstance(found, str) else None

        def items(key: str, kind: type) -> tuple[Any, ...]:
            found = value.get(key)
            return tuple(v for v in found if type(v) is kind) if isinstance(found, list) else ()

        return cls(
            version=text("version"),
            inputs=text("inputs"),
            ports=items("ports", int),
            method=text("method"),
            pod_annotations=items("podAnnotations", str),
            hash=text("hash"),
            mode=text("mode"),
        )

    def same_injection(self, other: Status) -> bool:
        """Whether both record the same injection (the operator's version aside)."""
        return dataclasses.replace(self, version=None) == dataclasses.replace(other, version=None)


def recorded_status(deployment: Mapping[str, Any]) -> Status | None:
    """The Deployment's status annotation, parsed; None where it has none (never injected, or cleaned up)."""
    raw = annotations_of(deployment).get(A_STATUS)
    if raw is None:
        return None
    try:
        return Status.of(json.loads(raw))
    except (ValueError, RecursionError):
        return Status()
