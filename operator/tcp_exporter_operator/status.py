"""`tcp-exporter-operator status`: one line per annotated Deployment, and a non-zero exit when one needs attention.

For each Deployment annotated `tcp-exporter/port` (or still carrying an injection): the version and method
injected (from the status annotation), its ScaledObject's KEDA conditions (Ready, Active, Fallback), the
replicas against the ScaledObject's bounds, and the latest Warning Event on it. Read with the caller's own
credentials (kubectl's kubeconfig); it changes nothing.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

from kubernetes import client

from tcp_exporter_operator.annotations import A_PORT, asks_for_scaled_object, recorded_status, tracked
from tcp_exporter_operator.desired import is_ours
from tcp_exporter_operator.kube import Kube
from tcp_exporter_operator.uninstall import children, deployments


def annotated(kube: Kube, namespace: str | None) -> Iterator[dict[str, Any]]:
    for item in deployments(kube, namespace):
        if tracked(item["metadata"].get("annotations") or {}):
            yield item


def last_warning(kube: Kube, namespace: str, name: str, uid: str) -> str | None:
    """The latest Warning on this very Deployment (by uid: not an earlier one of the same name)."""
    selector = f"involvedObject.kind=Deployment,involvedObject.name={name},involvedObject.uid={uid},type=Warning"

    def listing(api: client.ApiClient) -> Any:
        return client.CoreV1Api(api).list_namespaced_event(namespace, field_selector=selector, _preload_content=False)

    body = json.loads(kube.call(listing).data)

    def when(event: Mapping[str, Any]) -> str:
        return str(event.get("lastTimestamp") or event.get("eventTime") or event.get("firstTimestamp") or "")

    events = sorted(body.get("items") or [], key=when)
    return f"{events[-1].get('reason')}: {events[-1].get('message')}" if events else None


def row(deployment: Mapping[str, Any], scaled_object: Mapping[str, Any] | None, warning: str | None) -> dict[str, Any]:
    """One Deployment's line, and what needs attention in it (`problems`; empty when all is well)."""
    meta = deployment["metadata"]
    annotations = meta.get("annotations") or {}
    status = recorded_status(deployment)
    conditions = {
        c.get("type"): c.get("status")
        for c in ((scaled_object or {}).get("status") or {}).get("conditions") or []
        if isinstance(c, Mapping)
    }
    spec = (scaled_object or {}).get("spec") or {}
    replicas = (deployment.get("spec") or {}).get("replicas")
    problems = []
    if A_PORT in annotations and status is None:
        problems.append("not injected")
    if A_PORT not in annotations:
        problems.append("annotation removed, injection still there")
    if asks_for_scaled_object(annotations) and scaled_object is None:
        problems.append("no ScaledObject")
    if conditions.get("Ready") == "False":
        problems.append("KEDA: not ready")
    if conditions.get("Fallback") == "True":
        problems.append("KEDA: fallback (the query returns nothing)")
    if warning is not None:
        problems.append("a Warning")
    return {
        "namespace": meta.get("namespace"),
        "name": meta.get("name"),
        "version": status.version if status else None,
        "method": status.method if status else None,
        "sidecar": ("native" if status.mode == "native" else "container") if status else None,
        "scaledObject": (scaled_object or {}).get("metadata", {}).get("name"),
        "ready": conditions.get("Ready"),
        "active": conditions.get("Active"),
        "fallback": conditions.get("Fallback"),
        "replicas": replicas,
        "min": spec.get("minReplicaCount"),
        "max": spec.get("maxReplicaCount"),
        "lastWarning": warning,
        "problems": problems,
    }


def status(kube: Kube, namespaces: tuple[str, ...], output: str, out: TextIO = sys.stdout) -> int:
    """Print the lines; 1 if any Deployment needs attention, else 0."""
    rows = []
    for namespace in namespaces or (None,):
        scaled_objects = list(children(kube, "ScaledObject", namespace))
        for deployment in annotated(kube, namespace):
            meta = deployment["metadata"]
            warning = last_warning(kube, meta["namespace"], meta["name"], meta.get("uid", ""))
            # Owned by it, or adopted from Git (render's: no owner, found by label, name and target).
            ours = next(
                (
                    so
                    for so in scaled_objects
                    if so["metadata"]["namespace"] == meta["namespace"] and is_ours(so, deployment)
                ),
                None,
            )
            rows.append(row(deployment, ours, warning))
    if output == "json":
        json.dump(rows, out, indent=2)
        out.write("\n")
    else:
        columns = ("NAMESPACE", "NAME", "VERSION", "METHOD", "READY", "ACTIVE", "FALLBACK", "REPLICAS", "STATUS")
        lines = [columns]
        for r in rows:
            bounds = f"{r['replicas']} ({r['min']}-{r['max']})" if r["min"] is not None else str(r["replicas"])
            lines.append(
                (
                    str(r["namespace"]), str(r["name"]), str(r["version"] or "-"), str(r["method"] or "-"),
                    str(r["ready"] or "-"), str(r["active"] or "-"), str(r["fallback"] or "-"), bounds,
                    "; ".join(r["problems"]) or "ok",
                )
            )  # fmt: skip
        widths = [max(len(line[i]) for line in lines) for i in range(len(columns) - 1)]
        for line in lines:
            out.write("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=False)) + "  " + line[-1] + "\n")
        for r in rows:
            if r["lastWarning"]:
                out.write(f"{r['namespace']}/{r['name']}: {r['lastWarning'][:300]}\n")
    return 1 if any(r["problems"] for r in rows) else 0
