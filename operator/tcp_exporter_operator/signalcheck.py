"""After injection: does the Deployment's Prometheus have its connection series? Checked once its pods are Ready
(and again whenever the sidecar or the address changes), so that a ScaledObject whose query can never return
anything (no scrape job discovers the pods, a PodMonitor that Prometheus does not select) is a Warning on the
Deployment, with the likely cause, instead of a fallback that holds the replicas forever in silence.

One query per Prometheus address and namespace per period, whatever the number of Deployments waiting: which of
the namespace's Deployments have series (`count by` the sidecar's Deployment label). An address the operator may
not query (multi-tenancy) or cannot (it answers an error: KEDA may hold credentials the operator does not) is not
judged: no Warning from a guess. The watch thread only records (`observe`, cheap); the queries run in one thread.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tcp_exporter import contract as sidecar

from tcp_exporter_operator import metrics, scalein
from tcp_exporter_operator.annotations import (
    A_PROMETHEUS,
    A_PROMETHEUS_NAMESPACE,
    InvalidSpec,
    annotations_of,
    asks_for_scaled_object,
    prometheus_address,
    sidecar_of,
)
from tcp_exporter_operator.config import Config
from tcp_exporter_operator.desired import promql_string
from tcp_exporter_operator.events import Event
from tcp_exporter_operator.workloads import kind_of, observed_generation

log = logging.getLogger(__name__)
Key = tuple[str, str]
NO_SERIES = "NoConnectionMetrics"
FOUND = "ConnectionMetricsFound"
PERIOD = 10.0  # seconds between rounds
RECHECK = 60.0  # seconds between checks of a Deployment found without series (until they appear)


@dataclass
class Watched:
    meta: dict[str, Any]  # namespace, name, uid: what an Event needs
    url: str
    digest: str  # the sidecar and the address: a change is checked anew
    kind: str = "Deployment"
    ready_since: float | None = None
    verdict: str | None = None  # None: not judged yet; "found" or "missing"
    checked_at: float = 0.0


def ready(deployment: Mapping[str, Any]) -> bool:
    """The latest pod template rolled out to at least one Ready pod."""
    meta, status = deployment.get("metadata") or {}, deployment.get("status") or {}
    observed = observed_generation(status)  # a Rollout's is a string of digits
    return (
        observed is not None
        and observed >= (meta.get("generation") or 0)
        and (status.get("updatedReplicas") or 0) >= 1
        and (status.get("readyReplicas") or 0) >= 1
    )


def series_query(namespace: str) -> str:
    return (
        f"count by ({sidecar.DEPLOYMENT_LABEL}) "
        f'({sidecar.METRIC_ESTABLISHED}{{namespace={promql_string(namespace)},{sidecar.DEPLOYMENT_LABEL}!=""}})'
    )


def likely_cause(config: Config, url: str, namespace: str) -> str:
    ways = []
    if "podmonitor" in config.discovery:
        labels = config.pod_monitor_labels or "none"
        ways.append(
            "a PodMonitor is created where the Prometheus Operator's CRD exists: check that your Prometheus selects "
            f"it (labels set: {labels}; kube-prometheus-stack selects release=<its release> unless "
            "podMonitorSelectorNilUsesHelmValues=false: set TCP_EXPORTER_OPERATOR_POD_MONITOR_LABELS) and may "
            f"watch namespace {namespace}"
        )
    if "annotations" in config.discovery:
        ways.append(
            "the pods carry prometheus.io/scrape: is there a scrape job on those annotations (docs/prometheus-keda.md)?"
        )
    if "port-name" in config.discovery:
        ways.append("is there a scrape job on the container port name tcp-metrics (docs/prometheus-keda.md)?")
    return (
        f"Prometheus at {url} has no {sidecar.METRIC_ESTABLISHED} series for this Deployment's pods although they "
        f"are Ready: the ScaledObject's query returns nothing, and KEDA's fallback holds the replicas. "
        + "; ".join(ways)
    )


class SignalCheck:
    def __init__(
        self,
        config: Config,
        post: Callable[[Mapping[str, Any], Event], None],
        allowed: Callable[[str], bool],
        headers: Mapping[str, str],
        may_run: Callable[[], bool],
    ) -> None:
        self.config = config
        self.post = post
        self.allowed = allowed
        self.headers = dict(headers)
        self.may_run = may_run
        self.after = config.signal_check_after
        self.lock = threading.Lock()
        self.watched: dict[Key, Watched] = {}

    def observe(self, deployment: Mapping[str, Any] | None, key: Key) -> None:
        """From the watch thread, on every event of a tracked Deployment (None: forget it)."""
        if self.after <= 0:
            return
        annotations = annotations_of(deployment or {})
        sidecar_spec = None
        if deployment is not None and asks_for_scaled_object(annotations) and A_PROMETHEUS_NAMESPACE not in annotations:
            sidecar_spec = sidecar_of(deployment)
        url = None
        if sidecar_spec is not None:
            try:
                url = prometheus_address(str(annotations.get(A_PROMETHEUS, self.config.prometheus)), A_PROMETHEUS)
            except InvalidSpec:
                url = None
        with self.lock:
            if url is None or deployment is None:
                self.watched.pop(key, None)
                return
            digest = hashlib.sha256(json.dumps([url, sidecar_spec], sort_keys=True).encode()).hexdigest()
            entry = self.watched.get(key)
            if entry is None or entry.digest != digest:
                meta = deployment["metadata"]
                entry = Watched(
                    {k: meta.get(k) for k in ("namespace", "name", "uid")}, url, digest, kind_of(deployment)
                )
                self.watched[key] = entry
            if ready(deployment):
                entry.ready_since = entry.ready_since or time.monotonic()
            else:
                entry.ready_since = None

    def round(self, now: float | None = None) -> int:
        """Judge every Deployment Ready for `after` seconds and not judged yet (or judged missing: a fix is seen).
        Returns the number of queries made."""
        now = time.monotonic() if now is None else now
        with self.lock:
            due = [
                (key, entry)
                for key, entry in self.watched.items()
                if entry.ready_since is not None
                and now - entry.ready_since >= self.after
                and (entry.verdict is None or (entry.verdict == "missing" and now - entry.checked_at >= RECHECK))
            ]
        groups: dict[tuple[str, str], list[tuple[Key, Watched]]] = {}
        for key, entry in due:
            groups.setdefault((entry.url, key[0]), []).append((key, entry))
        queries = 0
        for (url, namespace), entries in groups.items():
            if not self.allowed(url):
                continue  # not the operator's to query; no guess
            queries += 1
            try:
                series = scalein.query(url, self.headers, promql=series_query(namespace))
            except Exception as exc:  # an address's failure costs only its own check, and is not a verdict
                metrics.SIGNAL_CHECKS.labels("error").inc(len(entries))
                log.info("checking %s for namespace %s's connection series: %s", url, namespace, exc)
                continue
            present = {
                s["metric"].get(sidecar.DEPLOYMENT_LABEL)
                for s in series
                if isinstance(s, dict) and isinstance(s.get("metric"), dict)
            }
            for key, entry in entries:
                self._judge(key, entry, entry.meta.get("name") in present, now)
        return queries

    def _judge(self, key: Key, entry: Watched, found: bool, now: float) -> None:
        with self.lock:
            if self.watched.get(key) is not entry:
                return  # changed meanwhile: judged anew later
            before, entry.verdict = entry.verdict, "found" if found else "missing"
            entry.checked_at = now
        metrics.SIGNAL_CHECKS.labels(entry.verdict).inc()
        body = {"kind": entry.kind, "metadata": entry.meta}
        if not found and before is None:
            self.post(body, Event("Warning", NO_SERIES, likely_cause(self.config, entry.url, key[0])))
        elif found and before == "missing":
            self.post(body, Event("Normal", FOUND, f"Prometheus at {entry.url} now has this Deployment's series"))

    def run(self, stopping: threading.Event) -> None:
        while not stopping.wait(PERIOD):
            if not self.may_run():
                continue
            try:
                self.round()
            except Exception:  # never the end of the checks
                log.exception("checking Prometheus for the Deployments' series failed")

    def start(self, stopping: threading.Event) -> None:
        if self.after > 0:
            threading.Thread(target=self.run, args=(stopping,), name="signal-check", daemon=True).start()
