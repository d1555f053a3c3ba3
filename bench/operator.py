"""Operator benchmark: N annotated Deployments created at once on a fresh local control plane.

    python -m bench.operator [--counts 100,1000] [--json PATH]
    python -m bench.operator --scale [--populations 0,5000,20000] [--annotated 1000] [--namespaces 200]

Reports the time until every Deployment is converged (sidecar injected and
ScaledObject created), the operator's API writes per Deployment from the
audit log (successful, and rejected as conflicts), its writes during a no-op
resync (an operator restart re-lists everything), and its peak RSS.

--scale: the operator among many Deployments that are not its business, as in a real cluster. For each
population of unannotated Deployments (replicas 0, spread over many namespaces; one cluster that grows), a bare
client (8 threads, kept-alive) first does the operator's writes for 1,000 annotated Deployments (read, the
planner's JSON patch, the ScaledObject create, 2 Events), once after creating them all and once pipelined (each
Deployment's writes as soon as its create returns); then the operator starts and 1,000 more annotated
Deployments are created 8 s later: the time to converge them from the first create, against the bare client's
times (the operator works while they are being created); then a restart with one annotation changed
meanwhile: the time to that write, and any other write once in sync; and the RSS.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch

from bench.common import RESULTS, kubectl_for, log, write_results
from harness.helpers import wait_for
from harness.localkube import cluster as localkube
from harness.operator_proc import REPO, USER, Operator


def deployment(name: str, run: str = "") -> dict[str, Any]:
    """An annotated Deployment; `run` labels its pods' template, so that its ReplicaSets can be found by label."""
    labels = {"app": name}
    return {
        "metadata": {"name": name, "annotations": {"tcp-exporter/port": "8080"}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": {**labels, **({"bench-run": run} if run else {})}},
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
                event["user"].get("username") == USER
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


def create_many(apps: Any, bodies: list[tuple[str, dict[str, Any]]]) -> None:
    """Create Deployments from 16 threads over kept-alive connections. Each answer is read whole: an
    answer left unread keeps its connection out of the pool, so every request would open a new connection (a TLS
    handshake on both sides) and the file descriptors would pile up until the garbage collector ran."""
    with ThreadPoolExecutor(16) as pool:
        list(
            pool.map(lambda nb: apps.create_namespaced_deployment(nb[0], nb[1], _preload_content=False).read(), bodies)
        )


def delete_many(apps: Any, bodies: list[tuple[str, dict[str, Any]]]) -> None:
    with ThreadPoolExecutor(16) as pool:
        list(
            pool.map(
                lambda nb: apps.delete_namespaced_deployment(
                    nb[1]["metadata"]["name"], nb[0], propagation_policy="Background", _preload_content=False
                ).read(),
                bodies,
            )
        )


def collected(api: Any, tag: str) -> None:
    """Wait until the garbage collector has deleted what the Deployments of a run (deleted) owned: their
    ReplicaSets and ScaledObjects. Otherwise those deletions load the API server during the next measurement."""
    apps, custom = client.AppsV1Api(api), client.CustomObjectsApi(api)

    def gone() -> bool:
        raw = apps.list_replica_set_for_all_namespaces(label_selector=f"bench-run={tag}", _preload_content=False)
        if json.loads(raw.data)["items"]:
            return False
        raw = custom.list_cluster_custom_object("keda.sh", "v1alpha1", "scaledobjects", _preload_content=False)
        return not any(so["metadata"]["name"].startswith(tag + "-") for so in json.loads(raw.data)["items"])

    wait_for(gone, 600, f"the garbage collector to delete what the {tag} Deployments owned", interval=1)


class Arrivals:
    """When the last of `count` ScaledObjects named `prefix`-* was created, seen by a watch from a given
    resourceVersion: exact to the event, and without listing every ScaledObject each second, which would load the
    API server the operator shares."""

    def __init__(self, api: Any, prefix: str, count: int) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.prefix, self.count = prefix, count
        listed = self.custom.list_cluster_custom_object("keda.sh", "v1alpha1", "scaledobjects", limit=1)
        self.version = listed["metadata"]["resourceVersion"]
        self.seen: set[tuple[str, str]] = set()
        self.at: float | None = None
        self.done = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self.done.is_set():
            stream = watch.Watch().stream(
                self.custom.list_cluster_custom_object,
                "keda.sh",
                "v1alpha1",
                "scaledobjects",
                resource_version=self.version,
                timeout_seconds=300,
            )
            for event in stream:
                meta = event["object"]["metadata"]
                self.version = meta["resourceVersion"]
                if event["type"] == "ADDED" and meta["name"].startswith(self.prefix + "-"):
                    self.seen.add((meta["namespace"], meta["name"]))
                    if len(self.seen) >= self.count:
                        self.at = time.monotonic()
                        self.done.set()
                        return

    def wait(self, timeout: float) -> float:
        if not self.done.wait(timeout):
            raise AssertionError(f"timed out after {timeout} s: {len(self.seen)} of {self.count} ScaledObjects")
        assert self.at is not None
        return self.at


def bare_client(api: Any, namespaces: list[str], count: int, tag: str) -> dict[str, float]:
    """The operator's writes for `count` annotated Deployments, done by a bare official client: the baseline.

    Twice: first the creation of the Deployments, then the writes (8 threads); then, with as many new ones, the
    writes for each Deployment as soon as its create returns (16 threads creating, 8 writing), as the operator
    works. Returns the seconds of the creation, of the writes after it, and of the pipelined run."""
    from tcp_exporter_operator.config import Config
    from tcp_exporter_operator.kube import Kube
    from tcp_exporter_operator.plan import Facts, plan

    apps = client.AppsV1Api(api)
    kube = Kube(lambda: api.configuration)
    cfg = Config()

    def bodies_of(run: str) -> list[tuple[str, dict[str, Any]]]:
        bodies = []
        for i in range(count):
            body = deployment(f"{run}-{i:04d}", run)
            body["spec"]["replicas"] = 0
            bodies.append((namespaces[i % len(namespaces)], body))
        return bodies

    def writes(nb: tuple[str, dict[str, Any]]) -> None:
        namespace, body = nb
        current = kube.get_deployment(namespace, body["metadata"]["name"])
        assert current is not None
        planned = plan(current, Facts(), cfg)
        assert planned.deployment_patch is not None and planned.scaled_object is not None
        kube.patch_deployment(namespace, body["metadata"]["name"], planned.deployment_patch)
        created, _ = kube.create_child(planned.scaled_object)
        assert created is not None
        for event in planned.events[:2]:
            kube.post_event(current, event)

    bodies = bodies_of(tag)
    creating = time.monotonic()
    create_many(apps, bodies)
    created = time.monotonic() - creating
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(writes, bodies))
    took = time.monotonic() - started
    # Gone again before the next run: the operator is to track the 1,000 of its own run, not these too.
    delete_many(apps, bodies)
    collected(api, tag)

    bodies = bodies_of(tag + "p")
    started = time.monotonic()
    with ThreadPoolExecutor(8) as writers, ThreadPoolExecutor(16) as creators:

        def create_then_write(nb: tuple[str, dict[str, Any]]) -> Any:
            apps.create_namespaced_deployment(nb[0], nb[1], _preload_content=False).read()  # read: see create_many
            return writers.submit(writes, nb)

        for future in list(creators.map(create_then_write, bodies)):
            future.result()
    pipelined = time.monotonic() - started
    delete_many(apps, bodies)
    collected(api, tag + "p")
    return {"create": created, "writes": took, "pipelined": pipelined}


def run_scale(
    cluster: Any, run_kubectl: Any, api: Any, populations: list[int], annotated: int, spread: int
) -> list[dict[str, Any]]:
    core, apps, custom = client.CoreV1Api(api), client.AppsV1Api(api), client.CustomObjectsApi(api)
    namespaces = [f"pop-{i:03d}" for i in range(spread)]
    for ns in namespaces:
        core.create_namespace({"metadata": {"name": ns}}, _preload_content=False).read()
    rows: list[dict[str, Any]] = []
    present = 0
    for target in populations:
        log(f"population {target:,}: creating {target - present:,} unannotated Deployments in {spread} namespaces")
        bodies = []
        for i in range(present, target):
            body = deployment(f"other-{i:05d}")
            body["metadata"]["annotations"] = {}
            body["spec"]["replicas"] = 0
            bodies.append((namespaces[i % spread], body))
        create_many(apps, bodies)
        present = target
        bare = bare_client(api, namespaces, annotated, f"base{target}")
        creation, baseline = bare["create"], bare["writes"]
        log(
            f"  bare client: created {annotated} Deployments in {creation:.1f} s, then wrote in {baseline:.1f} s; "
            f"pipelined, {bare['pipelined']:.1f} s"
        )

        # At the log level users run it with: debug lines for every skipped event would cost it CPU.
        op = Operator(cluster, run_kubectl, args=["--log-level=info"])
        started = time.monotonic()
        tag = f"ann{target}"
        try:
            time.sleep(8)  # the operator has started; users keep working
            bodies = []
            for i in range(annotated):
                body = deployment(f"{tag}-{i:04d}", tag)
                body["spec"]["replicas"] = 0
                bodies.append((namespaces[i % spread], body))
            arrivals = Arrivals(api, tag, annotated)
            created_at = time.monotonic()
            create_many(apps, bodies)
            took = arrivals.wait(1200) - created_at
            # The operator works while they are being created: its time counts from the first create, so the
            # baseline it is held to is the bare client's creation and writes, one after the other.
            total = creation + baseline
            peak = peak_rss_mb(op.proc.pid) if op.proc else float("nan")
            after = rss_now_mb(op.proc.pid) if op.proc else float("nan")
            log(f"  operator: converged {took:.1f} s after the first create ({took / total:.2f}x), RSS {peak:.0f} MB")

            op.stop()
            ns0, first = namespaces[0], f"{tag}-0000"
            apps.patch_namespaced_deployment(
                first, ns0, {"metadata": {"annotations": {"tcp-exporter/threshold": "77"}}}
            )
            mark = Path(cluster.audit_log).stat().st_size
            restarted = time.monotonic()
            op.start()

            def updated(ns0: str = ns0, first: str = first) -> bool:
                so = custom.get_namespaced_custom_object("keda.sh", "v1alpha1", ns0, "scaledobjects", first)
                return bool(so["spec"]["triggers"][0]["metadata"]["threshold"] == "77")

            wait_for(updated, 300, "the write after the restart", interval=0.2)
            first_write = time.monotonic() - restarted
            time.sleep(30)  # the writes a restart costs once in sync: counted over a while, not awaited
            writes = 0
            for line in Path(cluster.audit_log).read_bytes()[mark:].decode().splitlines():
                e = json.loads(line) if line else {}
                if e.get("user", {}).get("username") != USER or e["stage"] != "ResponseComplete":
                    continue
                ref = e.get("objectRef", {})
                # Events are not writes to what the operator manages; the threshold's is the one awaited.
                resource = ref.get("resource")
                if resource == "events" or (resource, ref.get("name")) == ("scaledobjects", first):
                    continue
                writes += 1
            log(f"  restart: first write after {first_write:.1f} s; {writes} other writes in the 30 s after it")
        finally:
            op.close()
        # The next population's operator is to track its own 1,000, not these too.
        delete_many(apps, bodies)
        collected(api, tag)
        rows.append(
            {
                "population": target,
                "annotated": annotated,
                "namespaces": spread,
                "create_seconds": creation,
                "bare_client_seconds": baseline,
                "bare_client_pipelined_seconds": bare["pipelined"],
                "operator_seconds": took,
                "ratio": took / (creation + baseline),
                "ratio_to_writes_only": took / baseline,
                "ratio_to_pipelined": took / bare["pipelined"],
                "restart_first_write_seconds": first_write,
                "restart_writes": writes,
                "operator_peak_rss_mb": peak,
                "operator_rss_after_convergence_mb": after,
                "since_start_seconds": time.monotonic() - started,
            }
        )
    return rows


def print_scale(rows: list[dict[str, Any]]) -> None:
    annotated = rows[0]["annotated"] if rows else 0
    print(f"\n## Operator among unannotated Deployments ({annotated:,} annotated created 8 s after start)\n")
    print(
        "| other Deployments | namespaces | bare: create s | bare: writes s | bare: pipelined s | operator s "
        "| ratio to create + writes | ratio to pipelined | ratio to writes only | restart: first write s "
        "| other writes after restart | peak RSS MB | RSS after convergence MB |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['population']:,} | {r['namespaces']} | {r['create_seconds']:.1f} | {r['bare_client_seconds']:.1f} "
            f"| {r['bare_client_pipelined_seconds']:.1f} | {r['operator_seconds']:.1f} | {r['ratio']:.2f} "
            f"| {r['ratio_to_pipelined']:.2f} | {r['ratio_to_writes_only']:.2f} "
            f"| {r['restart_first_write_seconds']:.1f} | {r['restart_writes']} "
            f"| {r['operator_peak_rss_mb']:.0f} | {r['operator_rss_after_convergence_mb']:.0f} |"
        )


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
    parser.add_argument("--scale", action="store_true", help="the operator among many unannotated Deployments")
    parser.add_argument("--populations", default="0,5000,20000")
    parser.add_argument("--annotated", type=int, default=1000)
    parser.add_argument("--namespaces", type=int, default=200)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.json = args.json or str(RESULTS / ("operator-scale.json" if args.scale else "operator.json"))
    cluster = localkube.temporary()
    rows = []
    try:
        run_kubectl = kubectl_for(cluster.kubeconfig)
        run_kubectl("apply", "-k", str(REPO / "manifests"))
        api = config.new_client_from_config(config_file=cluster.kubeconfig)
        api.configuration.connection_pool_maxsize = 16
        if args.scale:
            populations = [int(x) for x in args.populations.split(",") if x]
            scale = run_scale(cluster, run_kubectl, api, populations, args.annotated, args.namespaces)
            print_scale(scale)
            write_results(args.json, scale)
            return 0
        op = Operator(cluster, run_kubectl)
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
