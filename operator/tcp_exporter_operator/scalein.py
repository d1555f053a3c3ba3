"""Connection-aware scale-in: each opted-in pod's `controller.kubernetes.io/pod-deletion-cost` follows its
ESTABLISHED connections, so that when the ReplicaSet controller removes pods, the least-connected go first.

Where the counts come from: Prometheus, in one query per period for every opted-in pod of the cluster (per
Prometheus address), from the very series KEDA scales on. The operator then needs no route to the pods, no
watch of pods (the most numerous objects of a cluster) and no scrape of its own; the price is Prometheus' scrape
interval of lag, which the write policy below allows for.

When it writes (the pod-deletion-cost KEP and Kubernetes' documentation warn against updating the annotation from
a metric continuously): only while a scale-in is coming, that is while KEDA's formula, max(min-replicas,
ceil(total / threshold)), is below the Deployment's replicas and the usage is below the HPA's tolerance (draining
pods left out, as KEDA's query leaves them out), which is what the HPA recommends all through its scale-down
stabilization window before it acts. Then every pod whose count differs from what was written is
written, so the ranking is exact when the HPA acts, and the period is `URGENCY` times shorter, so that the costs
trail the counts by little more than Prometheus' scrape interval. In steady state (no scale-in coming) nothing is
written at all, however the counts move: a cost left from an earlier scale-in is only read when pods are removed,
and before that the next imminent scale-in rewrites it. Never more than `PER_DEPLOYMENT` pods per Deployment per
period, nor more than the configured rate overall (a token bucket); what does not fit waits for the next period,
the largest changes first.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import math
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tcp_exporter import contract as sidecar

from tcp_exporter_operator import metrics
from tcp_exporter_operator.kube import ApiError, Kube

log = logging.getLogger(__name__)
COST = "controller.kubernetes.io/pod-deletion-cost"
_BY = f"namespace, pod, {sidecar.DEPLOYMENT_LABEL}"
# Every opted-in pod's connections, each pod once however many jobs scrape it (as the ScaledObject's query).
# Draining pods left out, as the ScaledObject's query leaves them out: they are being deleted already, and their
# connections would make a second step of a scale-in look not coming.
QUERY = (
    f"sum by ({_BY}) (max by ({_BY}, {sidecar.PORT_LABEL}) "
    f'({sidecar.METRIC_ESTABLISHED}{{{sidecar.DEPLOYMENT_LABEL}!=""}}))'
    f" unless on (namespace, pod) (max by (namespace, pod) "
    f'({sidecar.METRIC_DRAINING}{{{sidecar.DEPLOYMENT_LABEL}!=""}}) == 1)'
)
TOLERANCE = 0.1  # the HPA's: a usage ratio within 10% of 1 changes no replicas
PER_DEPLOYMENT = 50  # pods written per Deployment per period at most
QUERY_TIMEOUT = 10.0  # seconds for the whole exchange, connecting included
MAX_ANSWER = 64 * 2**20  # bytes: 20,000 pods' samples are about 4 MB
RECHECK_SECONDS = 600  # between checks of the pod admission policy, while it is not found in force
URGENCY = 5  # while a scale-in is imminent somewhere, the period is this many times shorter (1 s at least)


@dataclass(frozen=True)
class Target:
    """What the policy needs of an opted-in Deployment, from its latest watch event."""

    threshold: int
    min_replicas: int
    replicas: int
    prometheus: str


def imminent(counts: Mapping[str, int], target: Target) -> bool:
    """Whether the HPA, fed KEDA's metric, recommends fewer replicas than the Deployment has: a scale-in may come
    any moment. KEDA's formula, max(min-replicas, ceil(total / threshold)), below the replicas, and the usage
    ratio, total / (threshold x replicas), below the HPA's tolerance (within it the HPA changes nothing)."""
    total = sum(counts.values())
    wanted = max(target.min_replicas, math.ceil(total / target.threshold))
    return wanted < target.replicas and total < (1 - TOLERANCE) * target.threshold * target.replicas


def decide(counts: Mapping[str, int], written: Mapping[str, int], coming: bool) -> list[tuple[str, int]]:
    """(pod, cost) to write, most needed first: nothing unless a scale-in is coming; then every pod whose count
    differs from what was written, pods never written first, then by how far their count has moved."""
    if not coming:
        return []
    out = []
    for pod, count in counts.items():
        old = written.get(pod)
        if old != count:
            out.append((pod, count, math.inf if old is None else abs(count - old)))
    out.sort(key=lambda entry: -entry[2])
    return [(pod, count) for pod, count, _ in out]


class TokenBucket:
    """`rate` tokens a second, at most `rate` (one second's worth) saved up."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = max(rate, 0.1)
        self.clock = clock
        self.tokens = self.rate
        self.at = clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


def query(
    url: str, headers: Mapping[str, str], deadline: float = QUERY_TIMEOUT, promql: str = QUERY
) -> list[dict[str, Any]]:
    """The query's instant vector from Prometheus' HTTP API, the whole exchange (connecting, the status line and
    headers, the body) within `deadline` seconds: a watchdog shuts the socket down at the deadline, so a server
    that drips any part of its answer is cut off. No redirect is followed (the request carries the admin's
    headers); at most MAX_ANSWER bytes are read."""
    parts = urllib.parse.urlsplit(url)
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_class(parts.hostname or "", parts.port, timeout=deadline)
    path = f"{parts.path}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    expired = threading.Event()

    def cut() -> None:
        expired.set()
        if connection.sock is not None:
            with contextlib.suppress(OSError):
                connection.sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked read at once

    watchdog = threading.Timer(deadline, cut)
    watchdog.daemon = True
    watchdog.start()
    chunks, size = [], 0
    try:
        connection.request("GET", path, headers=dict(headers))
        response = connection.getresponse()
        if response.status != 200:
            raise ValueError(f"Prometheus answered {response.status} {response.reason} (no redirect is followed)")
        while not expired.is_set():
            chunk = response.read1(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_ANSWER:
                raise ValueError(f"Prometheus' answer is larger than {MAX_ANSWER} bytes")
            chunks.append(chunk)
    except (OSError, http.client.HTTPException) as exc:
        if expired.is_set():
            raise TimeoutError(f"Prometheus' answer took more than {deadline:g} s") from exc
        raise ValueError(f"querying Prometheus: {exc}") from exc
    finally:
        watchdog.cancel()
        connection.close()
    if expired.is_set():
        raise TimeoutError(f"Prometheus' answer took more than {deadline:g} s")
    try:
        body = json.loads(b"".join(chunks))
    except RecursionError as exc:  # nesting deeper than any answer of Prometheus'
        raise ValueError("Prometheus' answer is nested too deeply") from exc
    if not isinstance(body, dict) or body.get("status") != "success":
        raise ValueError(f"Prometheus did not answer success: {str(body)[:200]}")
    result = (body.get("data") or {}).get("result") if isinstance(body.get("data"), dict) else None
    if not isinstance(result, list):
        raise ValueError("Prometheus' answer has no result list")
    return result


MAX_COST = 2**31 - 1  # pod-deletion-cost is an int32


def parse_sample(sample: Any) -> tuple[tuple[str, str], str, int] | None:
    """((namespace, deployment), pod, connections) of one sample of QUERY's answer; None for anything else (NaN,
    ±Inf, a negative or non-numeric value, a missing label): a Prometheus answers what it likes, and one bad sample
    must cost only itself."""
    if not isinstance(sample, Mapping):
        return None
    labels, value = sample.get("metric"), sample.get("value")
    if not isinstance(labels, Mapping) or not isinstance(value, list) or len(value) != 2:
        return None
    namespace, deployment, pod = (labels.get(k) for k in ("namespace", sidecar.DEPLOYMENT_LABEL, "pod"))
    if not all(isinstance(v, str) and v for v in (namespace, deployment, pod)):
        return None
    try:
        number = float(value[1])
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number) or number < 0:
        return None
    return (str(namespace), str(deployment)), str(pod), min(int(number), MAX_COST)


def parse_headers(raw: str) -> dict[str, str]:
    """KEDA's customHeaders form, key=value,key=value."""
    return dict(part.split("=", 1) for part in raw.split(",") if "=" in part)


class DeletionCosts:
    """The periodic loop: one query per Prometheus, then the writes the policy and the limits allow."""

    def __init__(
        self,
        kube: Kube,
        targets: dict[tuple[str, str], Target],
        period: float,
        rate: float,
        headers: Mapping[str, str],
        may_write: Callable[[], bool],
        allowed: Callable[[str], bool],
    ) -> None:
        self.kube, self.targets, self.period, self.headers, self.may_write = kube, targets, period, headers, may_write
        self.allowed = allowed  # the addresses the admin allows (the planner refuses others; checked again here)
        self.bucket = TokenBucket(rate)
        self.written: dict[tuple[str, str], dict[str, int]] = {}  # (namespace, deployment) -> pod -> cost
        self.urgent = False  # a scale-in is imminent somewhere: look again sooner
        self.confined = False  # the pod admission policy found in force (checked before writes until it is)
        self.check_after = 0.0

    def start(self) -> None:
        threading.Thread(target=self._run, name="deletion-costs", daemon=True).start()

    def check_confined(self, namespace: str, pod: str) -> None:
        """Before the first pod write (and until it holds): is the admission policy that lets this account change
        nothing of a pod but its deletion cost in force? Said in a metric, and in an error log when it is not
        (then asked again every RECHECK_SECONDS)."""
        try:
            confined = self.kube.pod_patches_confined(namespace, pod)
        except Exception as exc:  # refused, or no answer: checked again at the next write
            log.warning("checking the pod admission policy on %s/%s: %s", namespace, pod, exc)
            return
        if confined is None:
            return  # the pod is gone: the next write checks again
        self.confined = confined
        self.check_after = time.monotonic() + RECHECK_SECONDS  # not found in force: looked for again that much later
        metrics.POD_PATCHES_CONFINED.set(1 if confined else 0)
        if not confined:
            log.error(
                "the admission policy tcp-exporter-operator-pod-deletion-cost-only is not in force: this operator "
                "could change any field of any pod it may patch, not only its deletion cost; install the scale-in "
                "component (or the chart) whole, on Kubernetes 1.30+"
            )

    def _run(self) -> None:
        while True:
            time.sleep(max(1.0, self.period / URGENCY) if self.urgent else self.period)
            if not self.may_write():
                continue
            try:
                self.round()
            except Exception:
                log.exception("setting pod deletion costs failed; the next period tries again")

    def round(self) -> int:
        """One period: query, decide, write. Returns the number of pods written."""
        targets = dict(self.targets)  # the watch thread updates it meanwhile
        counts: dict[tuple[str, str], dict[str, int]] = {}
        for url in {t.prometheus for t in targets.values()}:
            if not self.allowed(url):
                log.warning("not querying %s for the pods' connections: not an address the operator allows", url)
                continue
            try:
                series = query(url, self.headers)
                metrics.DELETION_COST_QUERIES.labels("ok").inc()
            except Exception as exc:  # whatever one address answers costs that address's round only
                metrics.DELETION_COST_QUERIES.labels("error").inc()
                log.warning("querying %s for the pods' connections: %s", url, exc)
                continue
            for sample in series:
                parsed = parse_sample(sample)
                if parsed is None:
                    metrics.DELETION_COST_QUERIES.labels("bad_sample").inc()
                    continue
                key, pod, count = parsed
                if key in targets and targets[key].prometheus == url:
                    counts.setdefault(key, {})[pod] = count
        for key in list(self.written):
            if key not in targets:
                del self.written[key]  # opted out, or gone: nothing more is written for it
        writes = 0
        coming = {key: imminent(pods, targets[key]) for key, pods in counts.items()}
        self.urgent = any(coming.values())  # for every Deployment, before the rate limit may end the round
        for key, pods in counts.items():
            written = self.written.setdefault(key, {})
            for gone in set(written) - set(pods):
                del written[gone]
            for pod, cost in decide(pods, written, coming[key])[:PER_DEPLOYMENT]:
                if not self.bucket.take():
                    return writes  # the overall limit: the rest next period
                if not self.confined and time.monotonic() >= self.check_after:
                    self.check_confined(key[0], pod)
                try:
                    found = self.kube.set_deletion_cost(key[0], pod, cost)
                except ApiError as exc:  # refused (RBAC, the admission policy): counted; the others still go
                    log.warning("setting the deletion cost of pod %s/%s: %s", key[0], pod, exc)
                    continue
                if found:
                    written[pod] = cost
                    writes += 1
                else:
                    written.pop(pod, None)
        return writes
