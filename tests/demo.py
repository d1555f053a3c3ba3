"""`make demo`: the whole path on a real local control plane, from annotation to KEDA's replica count.

1. start etcd, kube-apiserver and kube-controller-manager (built once from Go modules, cached);
2. install tcp-exporter with `kubectl apply -k manifests/` and run the operator as its ServiceAccount;
3. apply the annotated sample Deployment; show the injected pod template and the ScaledObject;
4. run its pod as a kubelet would: a network namespace with a TCP server on the app port and the real sidecar
   with the pod's own arguments, the pod's status (Running, Ready, its IP) written to the apiserver; then open
   connections to it from another namespace;
5. a real Prometheus finds the pod through Kubernetes discovery with the documented scrape jobs; run the
   ScaledObject's query and print the replica count KEDA would choose.
Everything it starts is stopped at the end. Needs root (network namespaces).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from helpers import wait_for
from kubernetes import config
from localkube import cluster as localkube
from netns import in_netns, lan
from operator_proc import REPO, Operator
from podsim import Kubelet
from promstack import Prometheus, documented_jobs, keda_replicas

CONNECTIONS = 250
NAMESPACE = "demo"
NAME = "echo-server"


def step(title: str) -> None:
    print(f"\n\033[1m==> {title}\033[0m", flush=True)


def show(text: str) -> None:
    print("    " + text.rstrip().replace("\n", "\n    "), flush=True)


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root: the sidecar runs in network namespaces it creates", file=sys.stderr)
        return 1
    step("Starting a local Kubernetes control plane (the first run builds it from Go modules)")
    cluster = localkube.temporary()
    kubectl = localkube.kubectl()

    def k(*args: str, input: str | None = None) -> str:
        return subprocess.run(
            [kubectl, "--kubeconfig", cluster.kubeconfig, *args],
            check=True,
            text=True,
            capture_output=True,
            input=input,
        ).stdout

    operator: Operator | None = None
    try:
        show(k("version").strip())
        step("Installing tcp-exporter: kubectl apply -k manifests/")
        show(k("apply", "-k", str(REPO / "manifests")))
        show(
            "(KEDA itself cannot run here; a stand-in of its ScaledObject CRD is installed: "
            + k("apply", "-f", str(localkube.CRDS / "keda.yaml")).strip()
            + ")"
        )
        operator = Operator(cluster, k, env={"TCP_EXPORTER_OPERATOR_PROMETHEUS": "http://prometheus.monitoring:9090"})
        show("operator running as system:serviceaccount:tcp-exporter:tcp-exporter-operator")

        step("Applying the annotated sample: kubectl apply -k manifests/samples/")
        k("create", "namespace", NAMESPACE)
        show(k("apply", "-n", NAMESPACE, "-k", str(REPO / "manifests" / "samples")))
        api = config.new_client_from_config(config_file=cluster.kubeconfig)

        def injected() -> dict[str, object] | None:
            dep = json.loads(k("get", "deployment", NAME, "-n", NAMESPACE, "-o", "json"))
            names = [c["name"] for c in dep["spec"]["template"]["spec"]["containers"]]
            return dep if "tcp-exporter" in names else None

        dep = wait_for(injected, 60, "the operator to inject the sidecar")
        template = dep["spec"]["template"]  # type: ignore[index]
        step(f"The injected pod template (kubectl get deployment {NAME} -o yaml)")
        show(json.dumps({"metadata": template["metadata"], "containers": template["spec"]["containers"]}, indent=2))
        show("tcp-exporter/status: " + dep["metadata"]["annotations"]["tcp-exporter/status"])  # type: ignore[index]
        so = wait_for(
            lambda: json.loads(k("get", "scaledobjects", "-n", NAMESPACE, "-o", "json"))["items"],
            60,
            "the ScaledObject",
        )[0]
        step("The ScaledObject the operator owns")
        show(json.dumps(so["spec"], indent=2))
        show(k("get", "events", "-n", NAMESPACE, "--field-selector", f"involvedObject.name={NAME}"))

        step(f"Running its pod as a kubelet would, and opening {CONNECTIONS} connections to the app")
        with lan(1, host=True) as net:
            kubelet = Kubelet(api, NAMESPACE, net)
            prometheus = None
            try:
                (pod,) = kubelet.pods_of(NAME, 1)
                running = kubelet.run(pod)
                kubelet.connect(running, CONNECTIONS)
                args = next(c["args"] for c in pod["spec"]["containers"] if c["name"] == "tcp-exporter")
                show(f"pod {running.name} ({running.ip}, network namespace {running.netns})")
                show(f"sidecar: tcp-exporter {' '.join(args)}")
                show(k("get", "pods", "-n", NAMESPACE, "-o", "wide"))

                def metric() -> str | None:
                    try:
                        with socket.create_connection((running.ip, 9100), timeout=2) as s:
                            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                            body = b"".join(iter(lambda: s.recv(65536), b"")).decode()
                    except OSError:
                        return None
                    lines = [line for line in body.splitlines() if line.startswith("tcp_exporter_established")]
                    return lines[0] if lines else None

                show(
                    "$ curl :9100/metrics | grep established\n"
                    + wait_for(lambda: in_netns(net.lan, metric), 30, "the exporter")
                )
                step("Prometheus finds the pod through Kubernetes discovery; KEDA's query and replica count")
                prometheus = Prometheus(
                    documented_jobs(("tcp-exporter", "kubernetes-pods"), cluster.kubeconfig, NAMESPACE)
                )
                trigger = so["spec"]["triggers"][0]["metadata"]
                value = wait_for(lambda: prometheus.query(trigger["query"]), 60, "Prometheus to scrape")

                def scraping() -> list[str] | None:
                    up = sorted({t["labels"]["job"] for t in prometheus.targets() if t["health"] == "up"})  # type: ignore[union-attr]
                    return up if len(up) == 2 else None

                jobs = wait_for(scraping, 60, "both scrape jobs to scrape the pod")
                replicas = keda_replicas(
                    value, int(trigger["threshold"]), so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]
                )
                show(f"scraped by: {', '.join(jobs)} (two jobs, each pod counted once)")
                show(f"query:     {trigger['query']}")
                show(f"value:     {value:.0f} connections")
                show(f"threshold: {trigger['threshold']} per replica (AverageValue)")
                show(
                    f"KEDA would run ceil({value:.0f} / {trigger['threshold']}) = {replicas} replicas "
                    f"(between {so['spec']['minReplicaCount']} and {so['spec']['maxReplicaCount']})"
                )
                kubelet.kill_sidecar(running)
                gone = wait_for(lambda: prometheus.query(trigger["query"]) is None, 60, "the value to go")
                show(
                    f"sidecar killed: the query returns {'no value' if gone else 'a value'}, not 0; with "
                    f'ignoreNullValues: "false" KEDA applies its fallback ({so["spec"]["fallback"]["behavior"]}) '
                    "and does not scale in"
                )
            finally:
                if prometheus is not None:
                    prometheus.stop()
                kubelet.close()
    finally:
        step("Cleaning up: operator, control plane, namespaces")
        if operator is not None:
            operator.close()
        cluster.stop()
    show("done; nothing left running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
