"""Webhook injection's cost at pod creation, on a fresh local control plane: the latency of a pod create through
the API server with no webhook (the reference), with the operator's webhook for a pod that is not its business
(no owner it handles; or a pod of a Deployment that is not annotated, known so from the watch: both answered
without an API call), and for a pod of an annotated Deployment (the webhook reads the Deployment and the pod's
ReplicaSet, then injects the sidecar).

    python -m bench.webhook [--pods 300] [--json PATH]

Pods are created one after another by one client (the API server's own latency, not its throughput); a pod of
the annotated Deployment names that Deployment's real ReplicaSet as its owner, as the ReplicaSet controller's do.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from kubernetes import client, config

from bench.common import RESULTS, kubectl_for, log, write_results
from harness.helpers import wait_for
from harness.localkube import cluster as localkube
from harness.operator_proc import install
from harness.webhookstack import Webhook

NAMESPACE = "bench-webhook"


def pod(name: str, labels: dict[str, str], owner: dict[str, Any] | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels}
    if owner is not None:
        meta["ownerReferences"] = [owner]
    app = {"name": "app", "image": "example.test/app:1", "ports": [{"name": "web", "containerPort": 8080}]}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {"containers": [app]}}


def create_pods(core: client.CoreV1Api, case: str, count: int, labels: dict[str, str], owner: Any) -> dict[str, Any]:
    latencies, injected = [], 0
    for i in range(count):
        started = time.perf_counter()
        created = core.create_namespaced_pod(NAMESPACE, pod(f"{case}-{i}", labels, owner))
        latencies.append((time.perf_counter() - started) * 1000)
        injected += any(c.name == "tcp-exporter" for c in created.spec.init_containers or [])
    core.delete_collection_namespaced_pod(NAMESPACE, label_selector=f"bench-case={case}", grace_period_seconds=0)
    ordered = sorted(latencies)
    row = {
        "case": case,
        "pods": count,
        "injected": injected,
        "p50_ms": round(statistics.median(ordered), 2),
        "p90_ms": round(ordered[int(0.9 * (count - 1))], 2),
        "p99_ms": round(ordered[int(0.99 * (count - 1))], 2),
        "max_ms": round(ordered[-1], 2),
    }
    log(f"{case}: {row}")
    return row


def replicaset_of(
    apps: client.AppsV1Api, name: str, annotations: dict[str, str]
) -> tuple[dict[str, str], dict[str, Any]]:
    """A Deployment (no replicas) and its ReplicaSet: the labels and owner reference of a pod that ReplicaSet makes."""
    labels = {"app": name}
    deployment = {
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": pod("x", labels, None)["spec"]},
        },
    }
    apps.create_namespaced_deployment(NAMESPACE, deployment)

    def replicaset() -> Any:
        found = apps.list_namespaced_replica_set(NAMESPACE, label_selector=f"app={name}").items
        return found[0] if found else None

    rs = wait_for(replicaset, 60, f"the ReplicaSet of {name}")
    owner = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs.metadata.name, "uid": rs.metadata.uid}
    return {**labels, "pod-template-hash": rs.metadata.labels["pod-template-hash"]}, {**owner, "controller": True}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pods", type=int, default=300, help="pods created per case (default 300)")
    parser.add_argument("--json", default=str(RESULTS / "webhook.json"))
    args = parser.parse_args()
    cluster = localkube.temporary()
    rows = []
    try:
        kubectl = kubectl_for(cluster.kubeconfig)
        api = config.new_client_from_config(config_file=cluster.kubeconfig)
        core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
        kubectl("create", "namespace", NAMESPACE)
        install(kubectl)
        rows.append(create_pods(core, "no-webhook", args.pods, {"bench-case": "no-webhook"}, None))

        hook = Webhook(cluster, kubectl, api)
        hook.install()
        hook.start()
        rows.append(create_pods(core, "webhook-no-owner", args.pods, {"bench-case": "webhook-no-owner"}, None))
        for case, name, annotations in (
            ("webhook-not-annotated", "web-api", {}),
            ("webhook-injected", "checkout.v2", {"tcp-exporter/port": "8080"}),
        ):
            labels, owner = replicaset_of(apps, name, annotations)
            rows.append(create_pods(core, case, args.pods, {**labels, "bench-case": case}, owner))
        hook.remove()
    finally:
        cluster.stop()
    print_table(rows)
    write_results(args.json, rows)
    return 0


def print_table(rows: list[dict[str, Any]]) -> None:
    columns = ("case", "pods", "injected", "p50_ms", "p90_ms", "p99_ms", "max_ms")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")


if __name__ == "__main__":
    sys.exit(main())
