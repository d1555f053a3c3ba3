"""The operator's configuration: one typed object, from TCP_EXPORTER_OPERATOR_* variables at start-up.

Every per-Deployment annotation has a field here as its operator-wide default; the annotation wins.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace

from tcp_exporter import __version__

PREFIX = "TCP_EXPORTER_OPERATOR_"
# How the sidecar is injected: native (an init container with restartPolicy Always, which the kubelet starts
# before the app and stops after it: Kubernetes 1.33+, where native sidecars are GA and cannot be turned off),
# container (a regular container, stopped with the app), or auto: native where the API server is 1.33 or later.
SIDECAR_MODES = ("auto", "native", "container")
NATIVE_SINCE = (1, 33)
# How the cluster's Prometheus finds the sidecars (see manifests/monitoring):
#  annotations: a scrape job on the pods' prometheus.io/* annotations (the operator adds them);
#  port-name:   a scrape job on the sidecar's container port name, tcp-metrics;
#  podmonitor:  the Prometheus Operator, through a PodMonitor the operator creates when that CRD exists.
DISCOVERY_PATHS = ("annotations", "port-name", "podmonitor")
INJECTIONS = ("patch", "webhook")


@dataclass(frozen=True)
class Config:
    sidecar_image: str = f"ghcr.io/tcp-exporter/tcp-exporter:{__version__}"
    prometheus: str = "http://prometheus-operated.monitoring.svc:9090"
    method: str = "sockdiag"
    threshold: int = 100
    min_replicas: int = 1
    max_replicas: int = 10
    metrics_port: int = 9100
    cpu_request: str = "10m"
    cpu_limit: str = "250m"
    memory_request: str = "32Mi"
    memory_limit: str = "96Mi"
    namespaces: tuple[str, ...] = field(default=())
    credentials_grace: int = 60  # seconds of refused credentials before liveness fails
    # Upgrade rollouts (the sidecar changes because the operator's image or defaults did) at once, at most.
    max_concurrent_rollouts: int = 3
    # Seconds an upgrade rollout may hold its slot at most (less when the Deployment's progress deadline is less).
    max_rollout_seconds: int = 600
    discovery: tuple[str, ...] = ("annotations", "podmonitor")
    pod_monitor_labels: str = ""  # key=value,key=value, e.g. release=kube-prometheus-stack
    # KEDA: the ScaledObject and its Prometheus trigger. Empty means "not set": KEDA's own default applies.
    polling_interval: int = 15
    scale_down_stabilization: int | None = None  # seconds; the HPA's default is 300
    fallback_behavior: str = "currentReplicasIfHigher"
    fallback_failure_threshold: int = 3
    fallback_replicas: int | None = None  # default: the Deployment's min-replicas
    authentication_ref: str = ""  # NAME, TriggerAuthentication/NAME or ClusterTriggerAuthentication/NAME
    auth_modes: str = ""
    prometheus_namespace: str = ""
    custom_headers: str = ""
    unsafe_ssl: bool | None = None
    # Multi-tenancy: the Prometheus addresses annotations may name beside `prometheus` (an entry ending in `/`
    # allows the paths under it); empty: any, unless credentials of the operator's are involved (docs/security.md).
    allowed_prometheus: tuple[str, ...] = ()
    # Whether an annotation may name a ClusterTriggerAuthentication (the cluster's credentials, in KEDA's namespace).
    allow_cluster_trigger_auth: bool = False
    # Connection-aware scale-in (scalein.py): the default of the tcp-exporter/scale-in-by-connections annotation,
    # seconds between the Prometheus queries, and pod writes per second at most, over all Deployments.
    scale_in_by_connections: bool = False
    deletion_cost_period: int = 10
    deletion_cost_rate: int = 20
    # Seconds a Deployment's pods are Ready before the operator checks that its Prometheus has their connection
    # series (a Warning, NoConnectionMetrics, when not); 0: no check.
    signal_check_after: int = 120
    # Seconds a terminating pod waits for its connections to end: the default of the tcp-exporter/drain annotation.
    drain: int = 0
    sidecar_mode: str = "auto"
    # Where the sidecar is injected: patch (into the Deployment's pod template) or webhook (into each pod as it is
    # created, by a mutating admission webhook: the Deployment stays as written, for GitOps). webhook.py.
    injection: str = "patch"
    # The kinds of workload annotations are read on: Deployment, StatefulSet, Rollout (Argo Rollouts'); each needs
    # its RBAC: the chart's workloadKinds, or the statefulsets / rollouts components.
    workload_kinds: tuple[str, ...] = ("Deployment",)
    webhook_address: str = ":9443"  # where the webhook's HTTPS server listens (host:port)
    # The MutatingWebhookConfiguration whose caBundle the operator keeps (WEBHOOK_CERTS=operator).
    webhook_configuration: str = "tcp-exporter"
    # The Secret (namespace/name) of the serving certificate; its namespace is the operator's, never injected.
    webhook_secret: str = "tcp-exporter/tcp-exporter-webhook-tls"  # noqa: S105 - a name, not a secret
    # The names (or IP addresses) the serving certificate is for: those of the webhook's Service.
    webhook_hosts: tuple[str, ...] = ("tcp-exporter-webhook.tcp-exporter.svc",)  # how the API server calls it
    # operator: the operator issues and renews the certificate and keeps the caBundle; external: something else
    # (cert-manager) fills the Secret and the caBundle, the operator only reads the Secret.
    webhook_certs: str = "operator"
    webhook_cert_validity: int = 365 * 86400  # seconds a certificate the operator issues is valid

    def __post_init__(self) -> None:
        wrong = [k for k in self.workload_kinds if k not in ("Deployment", "StatefulSet", "Rollout")]
        if wrong or not self.workload_kinds:
            raise ValueError(
                f"{PREFIX}WORKLOAD_KINDS={','.join(self.workload_kinds)!r}: give one or more of Deployment, "
                "StatefulSet, Rollout"
            )
        if self.injection not in INJECTIONS:
            raise ValueError(f"{PREFIX}INJECTION={self.injection!r}: give one of {', '.join(INJECTIONS)}")
        if self.webhook_certs not in ("operator", "external"):
            raise ValueError(f"{PREFIX}WEBHOOK_CERTS={self.webhook_certs!r}: give operator or external")
        namespace, slash, name = self.webhook_secret.partition("/")
        if not (namespace and slash and name):
            raise ValueError(f"{PREFIX}WEBHOOK_SECRET={self.webhook_secret!r}: give NAMESPACE/NAME")
        if self.webhook_cert_validity < 10:
            raise ValueError(f"{PREFIX}WEBHOOK_CERT_VALIDITY={self.webhook_cert_validity}: give 10 seconds or more")
        _, colon, port = self.webhook_address.rpartition(":")
        if not colon or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{PREFIX}WEBHOOK_ADDRESS={self.webhook_address!r}: give HOST:PORT or :PORT")
        if self.injection == "webhook" and not self.webhook_hosts:
            raise ValueError(f"{PREFIX}WEBHOOK_HOSTS is empty: give the webhook Service's DNS names")
        if self.sidecar_mode not in SIDECAR_MODES:
            raise ValueError(f"{PREFIX}SIDECAR_MODE={self.sidecar_mode!r}: give one of {', '.join(SIDECAR_MODES)}")
        if self.max_rollout_seconds < 1:
            raise ValueError(
                f"{PREFIX}MAX_ROLLOUT_SECONDS={self.max_rollout_seconds}: give a number of seconds, 1 or more"
            )
        if self.signal_check_after < 0:
            raise ValueError(
                f"{PREFIX}SIGNAL_CHECK_AFTER={self.signal_check_after}: give a number of seconds, 0 (no check) or more"
            )
        if not 0 <= self.drain <= 86400:
            raise ValueError(f"{PREFIX}DRAIN={self.drain}: give a number of seconds from 0 (no drain) to 86400")
        unknown = [d for d in self.discovery if d not in DISCOVERY_PATHS]
        if unknown or not self.discovery:
            raise ValueError(
                f"{PREFIX}DISCOVERY={','.join(self.discovery)!r}: give one or more of {', '.join(DISCOVERY_PATHS)}"
            )

    @property
    def own_namespace(self) -> str:
        """The operator's namespace (the webhook Secret's): its pods are never injected."""
        return self.webhook_secret.partition("/")[0]

    def native(self) -> bool:
        """Whether the sidecar is injected as a native sidecar. `auto` is resolved against the API server's version
        when the operator starts (`resolved`); left unresolved (render, offline) it means native, as on every
        Kubernetes version still supported."""
        return self.sidecar_mode != "container"

    def resolved(self, server: tuple[int, int] | None) -> Config:
        """`auto` made native or container for an API server of this (major, minor) version (None: unknown)."""
        if self.sidecar_mode != "auto" or server is None:
            return self
        return replace(self, sidecar_mode="native" if server >= NATIVE_SINCE else "container")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Defaults, overridden by TCP_EXPORTER_OPERATOR_<FIELD> variables; raises ValueError on a bad value."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            name = PREFIX + f.name.upper()
            if name not in environ:
                continue
            raw = environ[name].strip()
            kind = str(f.type)
            if kind.startswith("tuple"):
                values[f.name] = tuple(n.strip() for n in raw.split(",") if n.strip())
            elif raw == "" and kind.endswith("| None"):
                values[f.name] = None
            elif kind.startswith("int"):
                if not re.fullmatch(r"-?[0-9]+", raw):
                    raise ValueError(f"{name}={raw!r} is not a whole number")
                values[f.name] = int(raw)
            elif kind.startswith("bool"):
                if raw.lower() not in ("true", "false"):
                    raise ValueError(f'{name}={raw!r} must be "true" or "false"')
                values[f.name] = raw.lower() == "true"
            else:
                values[f.name] = raw
        return cls(**values)  # type: ignore[arg-type]
