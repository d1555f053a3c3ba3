"""Signal latency: from a step in a Deployment's connections to the value KEDA reads from Prometheus.

    python -m bench.signal [--intervals 5,15] [--steps 8] [--keda-steps 3] [--json PATH]

On the local control plane: the operator injects a Deployment, its pod runs as a kubelet would (podsim: real
sidecar, pod status written), a real Prometheus finds it through Kubernetes discovery with the documented
`tcp-exporter` job at each scrape interval, and the ScaledObject's own query is polled every 50 ms after each
step (100 connections opened or closed) until it shows the new total. Steps start at random points of the
scrape cycle, as real traffic does.

Then the whole loop with real KEDA and the HPA controller, on the defaults the operator writes (a 15 s scrape
interval, pollingInterval 15 s, the HPA's 15 s sync and 300 s scale-down stabilization): the time from a step
in connections to the Deployment's replica count changing, for scale-out and scale-in.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import time
from typing import Any

from kubernetes import client, config

from bench.common import RESULTS, log, write_results
from harness.helpers import wait_for
from harness.kedastack import Keda
from harness.localkube import cluster as localkube
from harness.netns import lan
from harness.operator_proc import REPO, Operator
from harness.podsim import Kubelet
from harness.promstack import Prometheus, documented_jobs

NAME = "signal-api"
NAMESPACE = "bench-signal"
STEP = 100


def measure(prom: Prometheus, query: str, kubelet: Kubelet, pod: Any, steps: int, interval: float) -> list[float]:
    latencies = []
    for i in range(steps):
        time.sleep(random.uniform(0, interval))
        if i % 2 == 0:
            kubelet.connect(pod, STEP)
        else:
            for _ in range(STEP):
                pod.clients.pop().close()
        want = len(pod.clients)
        started = time.monotonic()
        wait_for(lambda w=want: prom.query(query) == w, 4 * interval + 30, f"the query to show {want}", 0.05)
        latencies.append(time.monotonic() - started)
        log(f"  scrape interval {interval:g} s, step {i + 1}/{steps}: {latencies[-1]:.2f} s")
    return latencies


def keda_reactions(cluster: Any, k: Any, api: Any, kubelet: Kubelet, pod: Any, steps: int) -> dict[str, list[float]]:
    """Successive scale-outs (1 -> 3 -> 5 -> ...: within its stabilization window the HPA keeps the highest
    recommendation, so a scale-out cannot be undone by hand between trials), then one scale-in back to 1 on the
    HPA's own 300 s window. Each time from the step in connections to spec.replicas changing."""
    keda = Keda(cluster, k)
    apps = client.AppsV1Api(api)
    out: dict[str, list[float]] = {"scale-out by 2 replicas": [], "scale-in to 1 (300 s stabilization)": []}

    def replicas() -> int:
        kubelet.sync(NAME)
        return int(apps.read_namespaced_deployment(NAME, NAMESPACE).spec.replicas)

    try:
        wait_for(lambda: k("get", "hpa", "-n", NAMESPACE, "-o", "name").strip(), 60, "KEDA's HPA", 0.5)
        for i in range(steps):
            target = 3 + 2 * i
            time.sleep(random.uniform(0, 15))  # a random phase of the scrape and HPA cycles
            kubelet.connect(pod, target * STEP - STEP // 2 - len(pod.clients))
            started = time.monotonic()
            wait_for(lambda t=target: replicas() == t, 180, f"the scale-out to {target}", 0.2)
            out["scale-out by 2 replicas"].append(time.monotonic() - started)
            log(f"  KEDA scale-out to {target}: {out['scale-out by 2 replicas'][-1]:.1f} s")
        while pod.clients:
            pod.clients.pop().close()
        started = time.monotonic()
        wait_for(lambda: replicas() == 1, 600, "the scale-in to 1", 0.5)
        out["scale-in to 1 (300 s stabilization)"].append(time.monotonic() - started)
        log(f"  KEDA scale-in: {out['scale-in to 1 (300 s stabilization)'][-1]:.1f} s")
    finally:
        keda.stop()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--intervals", default="5,15", help="scrape intervals in seconds, comma-separated")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--keda-steps", type=int, default=3, help="scale-out steps with real KEDA (0: skip KEDA)")
    parser.add_argument("--json", default=str(RESULTS / "signal.json"))
    args = parser.parse_args()
    intervals = [float(x) for x in args.intervals.split(",") if x.strip()]

    cluster = localkube.temporary()
    kubectl = localkube.kubectl()

    def k(*a: str, check: bool = True, input: str | None = None) -> str:
        proc = subprocess.run(
            [kubectl, "--kubeconfig", cluster.kubeconfig, *a], check=check, text=True, capture_output=True, input=input
        )
        return proc.stdout

    rows: list[dict[str, Any]] = []
    reactions: dict[str, list[float]] = {}
    operator = None
    try:
        k("apply", "-k", str(REPO / "manifests"))
        prom = Prometheus(documented_jobs(("tcp-exporter",), cluster.kubeconfig, NAMESPACE), scrape_interval="15s")
        operator = Operator(cluster, k, env={"TCP_EXPORTER_OPERATOR_PROMETHEUS": prom.url})
        api = config.new_client_from_config(config_file=cluster.kubeconfig)
        client.CoreV1Api(api).create_namespace({"metadata": {"name": NAMESPACE}})
        wait_for(
            lambda: client.CoreV1Api(api).list_namespaced_service_account(NAMESPACE).items, 30, "the ServiceAccount"
        )
        labels = {"app": NAME}
        body = {
            "metadata": {"name": NAME, "annotations": {"tcp-exporter/port": "8080"}},
            "spec": {
                "replicas": 0,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "app", "image": "example.test/app:1"}]},
                },
            },
        }
        apps, custom = client.AppsV1Api(api), client.CustomObjectsApi(api)
        apps.create_namespaced_deployment(NAMESPACE, body)
        so = wait_for(
            lambda: custom.list_namespaced_custom_object("keda.sh", "v1alpha1", NAMESPACE, "scaledobjects")["items"],
            60,
            "the ScaledObject",
        )[0]
        query = so["spec"]["triggers"][0]["metadata"]["query"]
        apps.patch_namespaced_deployment(NAME, NAMESPACE, {"spec": {"replicas": 1}})
        with lan(2 * args.keda_steps + 2, host=True) as net:
            kubelet = Kubelet(api, NAMESPACE, net)
            try:
                (pod_body,) = kubelet.pods_of(NAME, 1)
                pod = kubelet.run(pod_body)
                for interval in intervals:
                    jobs = documented_jobs(("tcp-exporter",), cluster.kubeconfig, NAMESPACE)
                    prom = Prometheus(jobs, scrape_interval=f"{interval:g}s")
                    try:
                        wait_for(lambda p=prom: p.query(query) == len(pod.clients), 60, "the first scrape")
                        latencies = measure(prom, query, kubelet, pod, args.steps, interval)
                    finally:
                        prom.stop()
                    rows.append(
                        {
                            "scrape_interval_s": interval,
                            "steps": len(latencies),
                            "min_s": min(latencies),
                            "median_s": statistics.median(latencies),
                            "max_s": max(latencies),
                            "latencies_s": latencies,
                        }
                    )
                if args.keda_steps:
                    reactions = keda_reactions(cluster, k, api, kubelet, pod, args.keda_steps)
            finally:
                kubelet.close()
    finally:
        if operator is not None:
            operator.close()
        prom.stop()
        cluster.stop()

    print("\nFrom a step in connections to the ScaledObject's query showing it (real Prometheus, pod discovery):\n")
    print("| scrape interval | steps | min s | median s | max s |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row['scrape_interval_s']:g} s | {row['steps']} | {row['min_s']:.2f} | {row['median_s']:.2f} "
            f"| {row['max_s']:.2f} |"
        )
    if reactions:
        print("\nFrom a step in connections to the replica count changing, real KEDA and HPA, operator defaults:\n")
        print("| change | trials | min s | median s | max s |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for change, times in reactions.items():
            print(f"| {change} | {len(times)} | {min(times):.1f} | {statistics.median(times):.1f} | {max(times):.1f} |")
    write_results(args.json, {"signal_latency": rows, "keda_reaction_s": reactions})
    return 0


if __name__ == "__main__":
    sys.exit(main())
