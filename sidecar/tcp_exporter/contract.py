"""The sidecar's interface, in one place: flags, environment, ports, metric names.

The operator builds the injected container from this module, and the tests
check it against the real CLI, so the two cannot drift apart. Pure: no
dependency beyond the standard library.
"""

from __future__ import annotations

ENV_PREFIX = "TCP_EXPORTER_"
DEFAULT_METRICS_PORT = 9100
DEFAULT_LISTEN_ADDRESS = f":{DEFAULT_METRICS_PORT}"
METRICS_PATH = "/metrics"
HEALTH_PATH = "/healthz"

METHODS = ("auto", "conntrack", "sockdiag", "psutil")
# What the sidecar does when the method asked for cannot open: exit 1 (standalone default), or fall back to the
# next method that opens, else keep serving with tcp_exporter_count_success 0 and the reason (the operator's).
ON_UNAVAILABLE = ("exit", "fallback")
# Linux capabilities each method needs; the others need none.
METHOD_CAPABILITIES: dict[str, tuple[str, ...]] = {"conntrack": ("NET_ADMIN",)}
# A method that needs a capability runs the sidecar as UID 0 (Kubernetes grants added capabilities to UID 0 only);
# these let it become UID 65532 before it opens anything, and it gives them up then (tcp_exporter.privileges).
CHANGE_USER_CAPABILITIES = ("SETGID", "SETUID")

METRIC_ESTABLISHED = "tcp_exporter_established_connections"
METRIC_ACCEPTED = "tcp_exporter_accepted_connections"  # exposed with the _total suffix
METRIC_METHOD_INFO = "tcp_exporter_method"  # exposed as tcp_exporter_method_info
METRIC_COUNT_DURATION = "tcp_exporter_count_duration_seconds"
METRIC_COUNT_SUCCESS = "tcp_exporter_count_success"
METRIC_COUNT_FAILURES = "tcp_exporter_count_failures"  # exposed with the _total suffix
METRIC_BUILD_INFO = "tcp_exporter_build"  # exposed as tcp_exporter_build_info
METRIC_CONNTRACK_RESYNCS = "tcp_exporter_conntrack_resyncs"  # exposed with the _total suffix; conntrack only
METRIC_CONNTRACK_LOSSES = "tcp_exporter_conntrack_event_losses"  # exposed with the _total suffix; conntrack only
METRIC_DRAINING = "tcp_exporter_draining"  # 1 once a drain began (the pod is terminating), else 0
PORT_LABEL = "port"
# Set by --deployment: which Deployment's pods a connection series belongs to, so that a query selects one
# Deployment exactly (pod-name patterns cannot: names have dots and dashes, share prefixes, and are truncated).
DEPLOYMENT_LABEL = "tcp_exporter_deployment"

# A drain: GET DRAIN_PATH?timeout=SECONDS[&floor=N] holds its answer until the watched ports' ESTABLISHED
# connections are at most N (default 0) or SECONDS have passed, and marks the sidecar as draining for good. The
# operator puts it in the pod's preStop hooks. Asked for from inside the pod (loopback), or by whoever shows the
# token (DRAIN_HEADER: the kubelet running a preStop hook, which connects from the node): never by another pod.
DRAIN_PATH = "/drain"
DRAIN_HEADER = "X-Tcp-Exporter-Drain"
DRAIN_MAX_SECONDS = 86400


def env_name(flag: str) -> str:
    """`--watch-port` -> `TCP_EXPORTER_WATCH_PORT`."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def sidecar_args(
    ports: list[int], method: str, metrics_port: int = DEFAULT_METRICS_PORT, deployment: str | None = None
) -> list[str]:
    """The container args that run the sidecar on `ports` with `method`, serving on `metrics_port`, labelling its
    connection series with `deployment` when given."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    return [
        f"--listen-address=:{metrics_port}",
        *(f"--watch-port={port}" for port in ports),
        f"--method={method}",
        # Injected: a method that cannot open here must not crash-loop the container and stall the app's rollout.
        "--on-unavailable=fallback",
        *([f"--deployment={deployment}"] if deployment else []),
    ]
