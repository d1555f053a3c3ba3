"""`tcp-exporter-operator status`: one line per annotated workload, and a non-zero exit when one needs attention.

For each Deployment, StatefulSet or Argo Rollout annotated `tcp-exporter/port` (or still carrying an injection):
the version and method injected (from the status annotation), its ScaledObject's KEDA conditions (Ready, Active,
Fallback), the replicas against the ScaledObject's bounds, the connections now (with `--prometheus`: the
ScaledObject's very query), and the operator's latest Event on it when that is a Warning (a later Normal Event,
the operator having acted since, clears it). Read with the caller's own credentials (kubectl's kubeconfig); it
changes nothing.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from kubernetes import client

from tcp_exporter_operator import scalein
from tcp_exporter_operator.annotations import (
    A_PORT,
    Status,
    asks_for_scaled_object,
    recorded_status,
    sidecar_of,
    tracked,
)
from tcp_exporter_operator.desired import is_ours, query
from tcp_exporter_operator.events import MANAGED_BY
from tcp_exporter_operator.kube import ApiError, Kube
from tcp_exporter_operator.signalcheck import FOUND, NO_SERIES
from tcp_exporter_operator.uninstall import children, deployments, rollouts, statefulsets
from tcp_exporter_operator.watch import revision
from tcp_exporter_operator.webhook import INJECTED, owning_deployment
from tcp_exporter_operator.workloads import DEPLOYMENT, key_of, kind_of, made_from

PROMETHEUS_DEADLINE = 5.0  # seconds per query of --prometheus

# The operator's Normal Events that say a Warning no longer holds: what it was refused is now written (the sidecar
# injected or updated, the ScaledObject created), or Prometheus has the series. A Warning not named here counts
# while its Event is kept (about an hour). KEDA's are not counted from Events: status reads KEDA's conditions.
WRITTEN = frozenset({"Injected", "Updated", "Upgraded", "ScaledObjectCreated", "ScaledObjectUpdated"})
CLEARED_BY = {
    **dict.fromkeys(
        ("InvalidAnnotation", "ContainerConflict", "AutoscalerConflict", "WriteRefused", "ReconcileFailed"), WRITTEN
    ),
    "KedaMissing": frozenset({"ScaledObjectCreated"}),
    "ScaledObjectConflict": frozenset({"ScaledObjectCreated"}),
    NO_SERIES: frozenset({FOUND}),
}
KEDA_WARNINGS = ("ScaledObjectNotReady", "ScaledObjectFallback")


def annotated(kube: Kube, namespace: str | None) -> Iterator[dict[str, Any]]:
    """The annotated workloads of every kind (StatefulSets and Rollouts where served and readable)."""
    for item in (*deployments(kube, namespace), *statefulsets(kube, namespace), *rollouts(kube, namespace)):
        if tracked(item["metadata"].get("annotations") or {}):
            yield item


def last_warning(kube: Kube, workload: Mapping[str, Any]) -> str | None:
    """The latest of the operator's Warnings on this very workload (by uid: not an earlier one of the same name)
    that still holds: no later Normal Event of the operator's clears it (CLEARED_BY)."""
    meta = workload["metadata"]
    selector = f"involvedObject.kind={kind_of(workload)},involvedObject.name={meta['name']}"
    selector += f",involvedObject.uid={meta.get('uid', '')}"

    def listing(api: client.ApiClient) -> Any:
        return client.CoreV1Api(api).list_namespaced_event(
            meta["namespace"], field_selector=selector, _preload_content=False
        )

    return holding_warning(json.loads(kube.call(listing).data).get("items") or [])


def holding_warning(events: list[Mapping[str, Any]]) -> str | None:
    """Of a workload's Events, the operator's latest Warning that no later Normal Event of its clears
    ("REASON: message"), or None."""

    def when(event: Mapping[str, Any]) -> tuple[str, int]:
        """Timestamps are to the second; within one, the Events' own versions (etcd revisions) give the order:
        the operator posts one workload's Events in order."""
        stamp = str(event.get("lastTimestamp") or event.get("eventTime") or event.get("firstTimestamp") or "")
        return stamp, revision((event.get("metadata") or {}).get("resourceVersion"))

    ours = [e for e in events if MANAGED_BY in (e.get("reportingComponent"), (e.get("source") or {}).get("component"))]
    holding: dict[str, str] = {}  # reason -> message, in the order posted
    for event in sorted(ours, key=when):
        reason = str(event.get("reason") or "")
        if event.get("type") == "Warning" and reason not in KEDA_WARNINGS:
            holding.pop(reason, None)
            holding[reason] = str(event.get("message") or "")
        elif event.get("type") == "Normal":
            for held in [r for r in holding if reason in CLEARED_BY.get(r, ())]:
                del holding[held]
    if not holding:
        return None
    reason = list(holding)[-1]
    return f"{reason}: {holding[reason]}"


def connections(url: str, workload: Mapping[str, Any], scaled_object: Mapping[str, Any] | None) -> int | None:
    """The workload's connections now, by its ScaledObject's query (as the operator would write it where there is
    none); None when Prometheus has no answer for it (what makes KEDA's fallback hold). Raises ValueError /
    TimeoutError / OSError."""
    meta = workload["metadata"]
    promql = query(meta["namespace"], meta["name"])
    for trigger in ((scaled_object or {}).get("spec") or {}).get("triggers") or []:
        if isinstance(trigger, Mapping) and isinstance((trigger.get("metadata") or {}).get("query"), str):
            promql = trigger["metadata"]["query"]
    result = scalein.query(url, {}, PROMETHEUS_DEADLINE, promql)
    if not result or not isinstance(result[0], Mapping):
        return None
    value = result[0].get("value")
    try:
        number = float(value[1]) if isinstance(value, list) and len(value) == 2 else float("nan")
    except (TypeError, ValueError):
        return None
    return int(number) if math.isfinite(number) and number >= 0 else None


@dataclass(frozen=True)
class InPods:
    """What the webhook injected, as the workload's running pods show it (INJECTION=webhook: nothing of it is in
    the workload): the pods, those with the sidecar, and the version, method and form of the newest one's."""

    pods: int = 0
    injected: int = 0
    version: str | None = None
    method: str | None = None
    mode: str | None = None


def in_pods(kube: Kube, workload: Mapping[str, Any]) -> InPods:
    """The workload's own pods (by its selector, then by owner), read from the API server's cache; none where the
    caller may not list pods (then only what the workload itself says is shown)."""
    meta = workload["metadata"]
    match = ((workload.get("spec") or {}).get("selector") or {}).get("matchLabels")
    if not isinstance(match, Mapping) or not match:
        return InPods()
    key = key_of(workload)[1]
    try:
        listed = kube.list_pods(meta["namespace"], match)
    except ApiError as exc:
        if exc.status != 403:
            raise
        return InPods()
    pods = [p for p in listed if not p["metadata"].get("deletionTimestamp") and owning_deployment(p) == key]
    injected = [p for p in pods if INJECTED in (p["metadata"].get("annotations") or {})]
    if not injected:
        return InPods(len(pods))
    newest = max(injected, key=lambda p: str(p["metadata"].get("creationTimestamp") or ""))
    container = sidecar_of({"spec": {"template": {"spec": newest.get("spec") or {}}}}) or {}
    method = next((a.split("=", 1)[1] for a in container.get("args") or [] if str(a).startswith("--method=")), None)
    return InPods(
        len(pods),
        len(injected),
        str(newest["metadata"]["annotations"][INJECTED]).split("/", 1)[0],
        method,
        "native" if container.get("restartPolicy") == "Always" else "container",
    )


def row(
    deployment: Mapping[str, Any],
    scaled_object: Mapping[str, Any] | None,
    warning: str | None,
    now: int | str | None = "-",
    pods: InPods | None = None,
    recorded: Status | None = None,
) -> dict[str, Any]:
    """One workload's line, and what needs attention in it (`problems`; empty when all is well). `now`: its
    connections, None when Prometheus returns nothing for it, "-" when not asked. `pods`: what its pods show of a
    sidecar the webhook injected (read where the workload itself carries no injection). `recorded`: the injection
    of the Deployment a workloadRef Rollout is made from, injected on its behalf."""
    meta = deployment["metadata"]
    annotations = meta.get("annotations") or {}
    status = recorded or recorded_status(deployment)
    webhook = pods if status is None and pods is not None and pods.injected else None
    conditions = {
        c.get("type"): c.get("status")
        for c in ((scaled_object or {}).get("status") or {}).get("conditions") or []
        if isinstance(c, Mapping)
    }
    spec = (scaled_object or {}).get("spec") or {}
    replicas = (deployment.get("spec") or {}).get("replicas")
    problems = []
    if A_PORT in annotations and status is None and webhook is None:
        problems.append("not injected")
    if webhook is not None and webhook.injected < webhook.pods:
        problems.append(f"{webhook.pods - webhook.injected} of {webhook.pods} pods without the sidecar")
    if A_PORT not in annotations:
        problems.append("annotation removed, injection still there")
    if asks_for_scaled_object(annotations) and scaled_object is None:
        problems.append("no ScaledObject")
    if conditions.get("Ready") == "False":
        problems.append("KEDA: not ready")
    if conditions.get("Fallback") == "True":
        problems.append("KEDA: fallback (the query returns nothing)")
    low, high = spec.get("minReplicaCount"), spec.get("maxReplicaCount")
    if isinstance(replicas, int) and isinstance(low, int) and isinstance(high, int) and not low <= replicas <= high:
        problems.append(f"replicas {replicas} outside {low}-{high}")
    if now is None and scaled_object is not None:
        problems.append("Prometheus returns nothing for its query")
    if warning is not None:
        problems.append("a Warning")
    return {
        "namespace": meta.get("namespace"),
        "kind": kind_of(deployment),
        "name": meta.get("name"),
        "version": status.version if status else webhook.version if webhook else None,
        "method": status.method if status else webhook.method if webhook else None,
        "sidecar": ("native" if status.mode == "native" else "container") if status else webhook and webhook.mode,
        "injectedBy": "template" if status else "webhook" if webhook else None,
        "scaledObject": (scaled_object or {}).get("metadata", {}).get("name"),
        "ready": conditions.get("Ready"),
        "active": conditions.get("Active"),
        "fallback": conditions.get("Fallback"),
        "replicas": replicas,
        "min": spec.get("minReplicaCount"),
        "max": spec.get("maxReplicaCount"),
        **({"connections": now} if now != "-" else {}),
        "lastWarning": warning,
        "problems": problems,
    }


def status(
    kube: Kube,
    namespaces: tuple[str, ...],
    output: str,
    out: TextIO = sys.stdout,
    prometheus: str | None = None,
    err: TextIO = sys.stderr,
) -> int:
    """Print the lines; 1 if any workload needs attention, else 0."""
    rows = []
    for namespace in namespaces or (None,):
        scaled_objects = list(children(kube, "ScaledObject", namespace))
        for deployment in annotated(kube, namespace):
            meta = deployment["metadata"]
            warning = last_warning(kube, deployment)
            # Owned by it, or adopted from Git (render's: no owner, found by label, name and target).
            ours = next(
                (
                    so
                    for so in scaled_objects
                    if so["metadata"]["namespace"] == meta["namespace"] and is_ours(so, deployment)
                ),
                None,
            )
            now: int | str | None = "-"
            if prometheus is not None:
                try:
                    now = connections(prometheus, deployment, ours)
                except (ValueError, TimeoutError, OSError) as exc:  # unreachable, or not Prometheus: not asked again
                    print(f"tcp-exporter-operator: status: --prometheus {prometheus}: {exc}", file=err)
                    prometheus = None
            recorded, pods = recorded_status(deployment), None
            template_owner = made_from(deployment)
            if recorded is None and template_owner is not None:
                source = kube.get_deployment(meta["namespace"], template_owner)
                recorded = recorded_status(source) if source is not None else None  # injected on its behalf
            if recorded is None:
                pods = in_pods(kube, deployment)
            rows.append(row(deployment, ours, warning, now, pods, recorded))
    if output == "json":
        json.dump(rows, out, indent=2)
        out.write("\n")
    else:
        columns = ("NAMESPACE", "NAME", "VERSION", "METHOD", "READY", "ACTIVE", "FALLBACK", "REPLICAS", "CONNECTIONS")
        lines = [(*columns, "STATUS")]
        for r in rows:
            bounds = f"{r['replicas']} ({r['min']}-{r['max']})" if r["min"] is not None else str(r["replicas"])
            name = str(r["name"]) if r["kind"] == DEPLOYMENT else f"{r['kind'].lower()}/{r['name']}"
            now = r.get("connections", "-")
            lines.append(
                (
                    str(r["namespace"]), name, str(r["version"] or "-"), str(r["method"] or "-"),
                    str(r["ready"] or "-"), str(r["active"] or "-"), str(r["fallback"] or "-"), bounds,
                    "none" if now is None else str(now), "; ".join(r["problems"]) or "ok",
                )
            )  # fmt: skip
        widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
        for line in lines:
            out.write("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=False)) + "  " + line[-1] + "\n")
        for r in rows:
            if r["lastWarning"]:
                out.write(f"{r['kind']} {r['namespace']}/{r['name']}: {r['lastWarning'][:300]}\n")
    return 1 if any(r["problems"] for r in rows) else 0
