"""Connection-aware scale-in, measured end to end: which pods the real ReplicaSet controller removes.

    python -m bench.scalein [--trials 20] [--settle 20] [--scrape 5s] [--json PATH]

A Deployment of 6 pods (run as a kubelet would: the real sidecar in a network namespace each, scraped by a real
Prometheus every --scrape) opted in to tcp-exporter/scale-in-by-connections, with the operator at its default
period. Each trial gives the pods new, different connection counts (real connections), lets them drift by a few
connections every 2 s for --settle seconds (with the default HPA stabilization a real scale-in comes 300 s after
the recommendation drops), scales the Deployment from 6 to 3 through the scale subresource as the HPA does, and
sees which pods went. Reported: connections dropped per scale-in against the optimum (the 3 least connected) and
against a random choice (half the total, on average), the share of trials at the optimum, and the operator's pod
writes per Deployment: per hour in steady state (counts drifting, no scale-in coming), and per scale-in.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from typing import Any

from kubernetes import client, config

from bench.common import RESULTS, kubectl_for, log, write_results
from harness.helpers import wait_for
from harness.localkube import cluster as localkube
from harness.netns import lan
from harness.operator_proc import Audit, Kube, Operator, deployment, injected, install
from harness.podsim import Kubelet, RunningPod
from harness.promstack import Prometheus, documented_jobs

NAME = "ws-gateway.eu-1"
PODS, KEEP = 6, 3


def set_count(kubelet: Kubelet, pod: RunningPod, want: int) -> None:
    """Open or close real connections until the pod holds `want`."""
    if len(pod.clients) < want:
        kubelet.connect(pod, want - len(pod.clients))
    while len(pod.clients) > want:
        pod.clients.pop().close()


def pod_writes(audit: Audit, since: int) -> int:
    return sum(1 for w in audit.writes(since) if w[1] == "pods")


def run(trials: int, settle: float, scrape: str, steady_seconds: float) -> dict[str, Any]:
    cluster = localkube.temporary()
    rng = random.Random(7)
    try:
        run_kubectl = kubectl_for(cluster.kubeconfig)
        install(run_kubectl, components=("scale-in",))
        api = config.new_client_from_config(config_file=cluster.kubeconfig)
        namespace = "bench-scalein"
        client.CoreV1Api(api).create_namespace({"metadata": {"name": namespace}})
        kube = Kube(api, namespace)
        audit = Audit(cluster.audit_log)
        with lan(PODS + 1, host=True) as net:
            kubelet = Kubelet(api, namespace, net)
            prom = Prometheus(documented_jobs(("tcp-exporter",), cluster.kubeconfig, namespace), scrape_interval=scrape)
            # The operator queries this Prometheus itself: an address the admin allows.
            op = Operator(cluster, run_kubectl, env={"TCP_EXPORTER_OPERATOR_ALLOWED_PROMETHEUS": prom.url})
            try:
                annotations = {
                    "tcp-exporter/port": "web",
                    "tcp-exporter/prometheus": prom.url,
                    "tcp-exporter/scale-in-by-connections": "true",
                    "tcp-exporter/threshold": "5",  # steady state first: 6 pods are what KEDA's formula wants
                }
                body = deployment(NAME, annotations)
                body["spec"]["replicas"] = PODS
                kube.create(body)
                injected(kube, NAME)

                def six() -> list[RunningPod]:
                    return wait_for(lambda: (p := kubelet.sync(NAME)) and len(p) == PODS and p, 60, "6 pods")

                pods = six()
                for pod in pods:
                    set_count(kubelet, pod, rng.randint(30, 60))
                log(f"steady state for {steady_seconds:.0f} s: counts drift, no scale-in coming")
                mark = audit.mark()
                ends = time.monotonic() + steady_seconds
                while time.monotonic() < ends:
                    pod = rng.choice(pods)
                    set_count(kubelet, pod, max(30, len(pod.clients) + rng.randint(-3, 3)))
                    time.sleep(2)
                steady_per_hour = pod_writes(audit, mark) * 3600 / steady_seconds

                kube.annotate(NAME, threshold="100")  # 6 pods of some 30 connections: KEDA's formula wants 2
                results = []
                for trial in range(trials):
                    mark = audit.mark()  # each cycle's writes: the pods scaled back out, the counts, the scale-in
                    pods = six()
                    counts = rng.sample(range(1, 60), PODS)
                    for pod, count in zip(pods, counts, strict=True):
                        set_count(kubelet, pod, count)
                    started = time.monotonic()
                    ends = started + settle
                    while time.monotonic() < ends:
                        pod = rng.choice(pods)
                        set_count(kubelet, pod, max(1, len(pod.clients) + rng.randint(-2, 2)))
                        time.sleep(2)
                    now = {pod.name: len(pod.clients) for pod in pods}
                    kube.apps.patch_namespaced_deployment_scale(NAME, namespace, {"spec": {"replicas": KEEP}})
                    left = wait_for(lambda: (p := kubelet.sync(NAME)) and len(p) == KEEP and p, 60, "3 pods left")
                    removed = set(now) - {pod.name for pod in left}
                    dropped = sum(now[n] for n in removed)
                    optimum = sum(sorted(now.values())[: PODS - KEEP])
                    writes = pod_writes(audit, mark)
                    results.append(
                        {
                            "dropped": dropped,
                            "optimum": optimum,
                            "random": sum(now.values()) * (PODS - KEEP) / PODS,
                            "pod_writes": writes,
                            "seconds": time.monotonic() - started,
                        }
                    )
                    log(f"trial {trial + 1}: dropped {dropped}, optimum {optimum}, {writes} pod writes")
                    kube.apps.patch_namespaced_deployment_scale(NAME, namespace, {"spec": {"replicas": PODS}})
            finally:
                prom.stop()
                kubelet.close()
                op.close()
    finally:
        cluster.stop()
    at_optimum = sum(r["dropped"] == r["optimum"] for r in results)
    return {
        "trials": results,
        "settle_seconds": settle,
        "scrape_interval": scrape,
        "at_optimum": at_optimum / len(results),
        "dropped_mean": sum(r["dropped"] for r in results) / len(results),
        "optimum_mean": sum(r["optimum"] for r in results) / len(results),
        "random_mean": sum(r["random"] for r in results) / len(results),
        "steady_seconds": steady_seconds,
        "pod_writes_per_hour_steady": steady_per_hour,
        "pod_writes_per_scale_in": sum(r["pod_writes"] for r in results) / len(results),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--settle", type=float, default=20.0, help="seconds from new counts to the scale-in")
    parser.add_argument("--scrape", default="5s", help="Prometheus' scrape interval")
    parser.add_argument("--steady", type=float, default=60.0, help="seconds of steady state measured")
    parser.add_argument("--json", default=str(RESULTS / "scalein.json"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench.scalein: network namespaces need root", file=sys.stderr)
        return 2
    r = run(args.trials, args.settle, args.scrape, args.steady)
    print(f"\n## Connection-aware scale-in: 6 -> 3 pods, {args.trials} trials, {args.settle:.0f} s settle\n")
    print(
        "| at the optimum | dropped per scale-in | optimum | random choice | pod writes/hour steady "
        "| pod writes per scale-in |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    print(
        f"| {r['at_optimum']:.0%} | {r['dropped_mean']:.1f} | {r['optimum_mean']:.1f} | {r['random_mean']:.1f} "
        f"| {r['pod_writes_per_hour_steady']:.0f} | {r['pod_writes_per_scale_in']:.1f} |"
    )
    write_results(args.json, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
