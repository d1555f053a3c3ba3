"""The operator's own metrics, served on /metrics (`--metrics-address`).

Names follow Prometheus' conventions and those of controller-runtime operators: counters end in `_total`,
durations are histograms in seconds, and the process metrics are prometheus_client's standard `process_*`.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from tcp_exporter.server import Response, Server, listening_socket

RECONCILES = Counter(
    "tcp_exporter_operator_reconciles_total",
    "Reconciles of a tracked Deployment, by result: wrote (at least one write), in_sync (none needed), failed",
    ["result"],
)
WRITES = Counter(
    "tcp_exporter_operator_writes_total",
    "API writes by kind (Deployment, ScaledObject, PodMonitor, Event) and result: ok, conflict (re-read and "
    "planned again), refused (another 4xx: RBAC, a webhook, validation), error (5xx or no answer)",
    ["kind", "verb", "result"],
)
EVENT_TO_WRITE = Histogram(
    "tcp_exporter_operator_event_to_write_seconds",
    "From a Deployment's watch event to the end of the reconcile that wrote for it",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
QUEUE_DEPTH = Gauge("tcp_exporter_operator_queue_depth", "Deployments waiting for a worker")
TRACKED = Gauge("tcp_exporter_operator_tracked_deployments", "Deployments annotated, or still carrying an injection")
WATCH_RESTARTS = Counter(
    "tcp_exporter_operator_watch_restarts_total",
    "The operator's watches (every kind it lists) that ended and were started again, by whether a new listing "
    "was needed",
    ["relist"],
)
WATCH_EVENT_ERRORS = Counter(
    "tcp_exporter_operator_watch_event_errors_total",
    "Watch events (or listed objects) whose handling raised: the object is skipped, the watch goes on",
    ["resource"],
)
INFORMER_SYNCED = Gauge(
    "tcp_exporter_operator_informer_synced",
    "1 once the operator's watch of this resource has listed every scope, else 0 (client-go's HasSynced)",
    ["resource"],
)
WARNINGS = Counter(
    "tcp_exporter_operator_warnings_total",
    "Warning Events posted on Deployments, by reason (each once while it holds): InvalidAnnotation, "
    "ScaledObjectNotReady, ScaledObjectFallback, WriteRefused, ...",
    ["reason"],
)
POD_PATCHES_CONFINED = Gauge(
    "tcp_exporter_operator_pod_patches_confined",
    "1 when the admission policy that confines the operator's pod patches to their deletion cost was found in "
    "force (a dry-run patch of anything else refused), 0 when it was not; checked before the first such write",
)
DELETION_COST_QUERIES = Counter(
    "tcp_exporter_operator_deletion_cost_queries_total",
    "Prometheus queries for the pods' connections (connection-aware scale-in), by result",
    ["result"],
)
SIGNAL_CHECKS = Counter(
    "tcp_exporter_operator_signal_checks_total",
    "Checks that a Deployment's Prometheus has its connection series once its pods are Ready, by result: found, "
    "missing (a NoConnectionMetrics Warning), error (no verdict: the address answered an error)",
    ["result"],
)

WEBHOOK_REQUESTS = Counter(
    "tcp_exporter_operator_webhook_requests_total",
    "Pod creations the injection webhook answered, by result: injected, skipped (not a pod to inject), error "
    "(unanswerable: the API server's failurePolicy Ignore creates the pod without the sidecar)",
    ["result"],
)
WEBHOOK_SECONDS = Histogram(
    "tcp_exporter_operator_webhook_seconds",
    "Time to answer a pod creation (the look-up of its Deployment included)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
WEBHOOK_CERT_EXPIRY = Gauge(
    "tcp_exporter_operator_webhook_certificate_expiry_seconds",
    "When the webhook's serving certificate expires (Unix time); it is renewed at two thirds of its life",
)


def write_result(status: int | None) -> str:
    """The `result` label of a write answered with this HTTP status (None: no answer)."""
    if status is None or status >= 500 or status == 0:
        return "error"
    if status in (409, 422):
        return "conflict"
    if status >= 400:
        return "refused"
    return "ok"


def serve(address: str) -> Server | None:
    """Serve /metrics on host:port (":8081" for every address); an empty address serves nothing. The sidecar's
    server (tcp_exporter.server): one event loop, bounded whatever any pod that can reach the port does."""
    if not address:
        return None
    host, _, port = address.rpartition(":")
    if not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{port!r} is not a port number")

    def metrics(headers: dict[str, str]) -> Response:
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        return Response(200, content_type, encoder(REGISTRY))

    return Server(listening_socket(host.strip("[]"), int(port)), {"/metrics": metrics})
