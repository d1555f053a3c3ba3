"""Operator benchmark: N annotated Deployments created at once on a fresh local control plane.

    python -m bench.operator [--counts 100,1000] [--json PATH]

Reports the time until every Deployment is converged (sidecar injected and
ScaledObject created), the operator's API writes per Deployment from the
audit log (successful, and rejected as conflicts), its writes during a no-op
resync (an operator restart re-lists everything), and its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import wait_for
from kubernetes import client, config
from localkube import cluster as localkube
from operator_proc import REPO, USER, Operator

from bench.common import RESULTS, log, write_results


def deployment(name: str) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "metadata": {"name": name, "annotations": {"tcp-exporter/port": "8080"}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [{"name": "app", "image": "example.test/app:1", "ports": [{"containerPort": 8080}]}]
                },
            },
        },
    }


def audit_writes(path: str, since: int, namespace: str) -> Counter[tuple[str, str, int]]:
    """(verb, resource, response code) of the operator's writes in a namespace since an offset."""
    counts: Counter[tuple[str, str, int]] = Counter()
    with open(path, "rb") as f:
        f.seek(since)
        for line in f.read().decode().splitlines():
            if not line:
                continue
            event = json.loads(line)
            ref = event.get("objectRef", {})
            if (
                event["user"]["username"] == USER
                and ref.get("namespace") == namespace
                and event["stage"] == "ResponseComplete"
            ):
                counts[(event["verb"], ref.get("resource", ""), event["responseStatus"]["code"])] += 1
    return counts


def _status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb(pid: int) -> float:
    return _status_mb(pid, "VmHWM")


def rss_now_mb(pid: int) -> float:
    return _status_mb(pid, "VmRSS")


def run_count(api: Any, op: Operator, audit_log: str, n: int) -> dict[str, Any]:
    namespace = f"bench-{n}"
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    custom = client.CustomObjectsApi(api)
    core.create_namespace({"metadata": {"name": namespace}})
    wait_for(lambda: core.list_namespaced_service_account(namespace).items, 30, "the default ServiceAccount")
    mark = Path(audit_log).stat().st_size
    log(f"{n} Deployments: creating")
    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: apps.create_namespaced_deployment(namespace, deployment(f"d{i:04d}")), range(n)))
    created = time.monotonic() - started

    def converged() -> bool:
        # Raw JSON: the client's models would cost the benchmark more CPU than the operator uses.
        raw = apps.list_namespaced_deployment(namespace, _preload_content=False)
        deps = json.loads(raw.data)["items"]
        injected = sum(
            1 for d in deps if any(c["name"] == "tcp-exporter" for c in d["spec"]["template"]["spec"]["containers"])
        )
        if injected < n:
            return False
        sos = custom.list_namespaced_custom_object("keda.sh", "v1alpha1", namespace, "scaledobjects")
        return len(sos["items"]) == n

    wait_for(converged, 600, f"{n} Deployments to converge", interval=0.5)
    took = time.monotonic() - started
    log(f"  converged in {took:.1f} s")
    writes = audit_writes(audit_log, mark, namespace)
    rss = peak_rss_mb(op.proc.pid) if op.proc else float("nan")

    log("  no-op resync: restarting the operator, which re-lists and re-plans every Deployment")
    before = op.log().count(f"reconciled {namespace}/")
    resync_mark = Path(audit_log).stat().st_size
    op.restart()
    wait_for(lambda: op.log().count(f"reconciled {namespace}/") - before >= n, 600, "the resync")
    resync = audit_writes(audit_log, resync_mark, namespace)
    log(f"  writes during the resync: {dict(resync)}; all writes: {dict(writes)}")
    steady = rss_now_mb(op.proc.pid) if op.proc else float("nan")

    def per(verb: str, resource: str, ok: bool = True) -> float:
        return (
            sum(v for (vb, res, code), v in writes.items() if vb == verb and res == resource and (code < 400) == ok) / n
        )

    return {
        "deployments": n,
        "create_seconds": created,
        "converged_seconds": took,
        "deployment_patches_per_deployment": per("patch", "deployments"),
        "scaledobject_creates_per_deployment": per("create", "scaledobjects"),
        "rejected_writes_per_deployment": sum(
            v for (_vb, res, code), v in writes.items() if code >= 400 and res != "events"
        )
        / n,
        "events_per_deployment": per("create", "events"),
        "resync_writes": sum(v for (_vb, res, _c), v in resync.items() if res != "events"),
        "resync_events": sum(v for (_vb, res, _c), v in resync.items() if res == "events"),
        "operator_peak_rss_mb": rss,
        "operator_rss_after_resync_mb": steady,
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    print("\n## Operator: Deployments created at once\n")
    print(
        "| Deployments | converged s | Deployment patches / Deployment | ScaledObject creates / Deployment "
        "| rejected writes / Deployment | Events / Deployment | writes in no-op resync | peak RSS MB "
        "| RSS after resync MB |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['deployments']:,} | {r['converged_seconds']:.1f} | {r['deployment_patches_per_deployment']:.2f} "
            f"| {r['scaledobject_creates_per_deployment']:.2f} | {r['rejected_writes_per_deployment']:.2f} "
            f"| {r['events_per_deployment']:.2f} | {r['resync_writes']} | {r['operator_peak_rss_mb']:.0f} "
            f"| {r['operator_rss_after_resync_mb']:.0f} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="100,1000")
    parser.add_argument("--json", default=str(RESULTS / "operator.json"))
    args = parser.parse_args()
    cluster = localkube.temporary()
    rows = []
    try:
        kubectl = localkube.kubectl()

        def run_kubectl(*a: str) -> str:
            return subprocess.run(
                [kubectl, "--kubeconfig", cluster.kubeconfig, *a], check=True, capture_output=True, text=True
            ).stdout

        run_kubectl("apply", "-k", str(REPO / "manifests"))
        op = Operator(cluster, run_kubectl)
        api = config.new_client_from_config(config_file=cluster.kubeconfig)
        try:
            for n in (int(x) for x in args.counts.split(",") if x):
                rows.append(run_count(api, op, cluster.audit_log, n))
        finally:
            op.close()
    finally:
        cluster.stop()
    print_table(rows)
    write_results(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
