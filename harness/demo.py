"""`make demo`: the whole path on a real local control plane, from annotation to the replica count KEDA sets.

1. start etcd, kube-apiserver and kube-controller-manager with the HPA controller (built once from Go modules,
   cached), real KEDA (operator and metrics adapter, also built from Go modules) and a real Prometheus;
2. install tcp-exporter with `kubectl apply -k manifests/` and run the operator as its ServiceAccount;
3. apply the annotated sample Deployment; show the injected pod template and the ScaledObject;
4. run its pods as a kubelet would: a network namespace each with a TCP server on the app port and the real
   sidecar with the pod's own arguments, the pod's status (Running, Ready, its IP) written to the apiserver;
   then open connections to it from another namespace;
5. Prometheus finds the pod through Kubernetes discovery; KEDA's HPA scales the Deployment on the count, and
   the new pods run too; then every sidecar is killed, and KEDA's fallback holds the replica count.
Everything it starts is stopped at the end. Needs root (network namespaces).

Where the node tier can run (root, buildah, mmdebstrap, libseccomp; `NODE=0` turns it off) the demo runs on
real pods instead, and says so: a real kubelet, containerd and kube-proxy; the operator as a pod from the image
built from Dockerfile.operator; the sample's pods started by the kubelet with the sidecar from its image; 250
connections through the Service; KEDA's HPA adding pods that really start, and removing them once the
connections close.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time

from kubernetes import config

from harness.helpers import sidecar_in, wait_for
from harness.kedastack import Keda
from harness.localkube import cluster as localkube
from harness.netns import in_netns, lan
from harness.operator_proc import REPO, Operator
from harness.podsim import Kubelet
from harness.promstack import Prometheus, documented_jobs

CONNECTIONS = 250
MAX_PODS = 6
NAMESPACE = "demo"
NAME = "echo-server"


def step(title: str) -> None:
    print(f"\n\033[1m==> {title}\033[0m", flush=True)


def show(text: str) -> None:
    print("    " + text.rstrip().replace("\n", "\n    "), flush=True)


def node_unavailable() -> str | None:
    """Why the demo cannot run on a real node here, or None when it can."""
    if os.environ.get("NODE") == "0":
        return "NODE=0 was given"
    for tool in ("buildah", "mmdebstrap", "gcc", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if subprocess.run(["dpkg", "-s", "libseccomp-dev"], capture_output=True).returncode != 0:
        return "libseccomp-dev is not installed"
    return None


def node_main() -> int:
    from harness.nodedemo import ready_pods, scale_on_real_pods
    from harness.nodestack import NODE_IP, Node

    step("Starting a local control plane and a real node: kubelet, containerd, runc, CNI, kube-proxy, scheduler")
    show("(the first run builds them from Go modules, and the images from the Dockerfiles)")
    cluster = localkube.temporary(address=NODE_IP)
    k = localkube.kubectl_runner(cluster)

    node: Node | None = None
    keda: Keda | None = None
    prometheus: Prometheus | None = None
    try:
        node = Node(cluster, k)
        show(k("get", "nodes", "-o", "wide"))
        step("Starting KEDA (operator, metrics adapter, webhooks) and Prometheus")
        keda = Keda(cluster, k)
        prometheus = Prometheus(documented_jobs(("tcp-exporter", "kubernetes-pods"), cluster.kubeconfig, NAMESPACE))
        show(f"Prometheus at {prometheus.url}, discovering pods in namespace {NAMESPACE} with the documented jobs")
        step("Installing tcp-exporter: kubectl apply -k manifests/ (the operator runs as a pod)")
        show(k("apply", "-k", str(REPO / "manifests")))

        wait_for(lambda: ready_pods(k, "tcp-exporter", None), 120, "the operator's pod to be Ready")
        show(k("-n", "tcp-exporter", "get", "pods", "-o", "wide"))
        step(f"The annotated sample, {CONNECTIONS} connections through its Service, KEDA scaling real pods")
        scale_on_real_pods(k, NAMESPACE, prometheus.url, CONNECTIONS, 100, say=show)
        show(k("get", "hpa,deployment,pods", "-n", NAMESPACE, "-o", "wide"))
    finally:
        step("Cleaning up: KEDA, Prometheus, the node (pods, mounts, rules, cgroups), the control plane")
        if prometheus is not None:
            prometheus.stop()
        if keda is not None:
            keda.stop()
        if node is not None:
            node.stop()
        cluster.stop()
    show("done; nothing left running")
    return 0


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root: the sidecar runs in network namespaces it creates", file=sys.stderr)
        return 1
    why_not = node_unavailable()
    if why_not is None:
        step("The node tier is available: this demo runs on real pods")
        return node_main()
    step(f"No real node ({why_not}): the pods run as a kubelet would, each in a network namespace")
    step("Starting a local Kubernetes control plane (the first run builds it from Go modules)")
    cluster = localkube.temporary()
    k = localkube.kubectl_runner(cluster)

    operator: Operator | None = None
    keda: Keda | None = None
    prometheus: Prometheus | None = None
    try:
        show(k("version").strip())
        step("Starting KEDA (operator and metrics adapter, built from KEDA's Go module) and Prometheus")
        keda = Keda(cluster, k)
        show(
            "KEDA serves v1beta1.external.metrics.k8s.io: " + k("get", "apiservice", "v1beta1.external.metrics.k8s.io")
        )
        prometheus = Prometheus(documented_jobs(("tcp-exporter", "kubernetes-pods"), cluster.kubeconfig, NAMESPACE))
        show(f"Prometheus at {prometheus.url}, discovering pods in namespace {NAMESPACE} with the documented jobs")

        step("Installing tcp-exporter: kubectl apply -k manifests/")
        show(k("apply", "-k", str(REPO / "manifests")))
        operator = Operator(cluster, k, env={"TCP_EXPORTER_OPERATOR_PROMETHEUS": prometheus.url})
        show("operator running as system:serviceaccount:tcp-exporter:tcp-exporter-operator")

        step("Applying the annotated sample: kubectl apply -k manifests/samples/")
        k("create", "namespace", NAMESPACE)
        show(k("apply", "-n", NAMESPACE, "-k", str(REPO / "manifests" / "samples")))
        api = config.new_client_from_config(config_file=cluster.kubeconfig)

        def injected() -> dict[str, object] | None:
            dep = json.loads(k("get", "deployment", NAME, "-n", NAMESPACE, "-o", "json"))
            return dep if sidecar_in(dep["spec"]["template"]["spec"]) is not None else None

        dep = wait_for(injected, 60, "the operator to inject the sidecar")
        template = dep["spec"]["template"]  # type: ignore[index]
        step(f"The injected pod template (kubectl get deployment {NAME} -o yaml)")
        shown = {k: template["spec"][k] for k in ("initContainers", "containers") if k in template["spec"]}
        show(json.dumps({"metadata": template["metadata"], **shown}, indent=2))
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
        with lan(MAX_PODS, host=True) as net:
            kubelet = Kubelet(api, NAMESPACE, net)
            try:
                (running,) = wait_for(lambda: kubelet.sync(NAME) or None, 60, "the pod")
                kubelet.connect(running, CONNECTIONS)
                args = sidecar_in(template["spec"])["args"]
                show(f"pod {running.name} ({running.ip}, network namespace {running.netns})")
                show(f"sidecar: tcp-exporter {' '.join(args)}")

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
                step("Prometheus finds the pod through Kubernetes discovery; KEDA reads the query")
                trigger = so["spec"]["triggers"][0]["metadata"]
                value = wait_for(lambda: prometheus.query(trigger["query"]), 60, "Prometheus to scrape")  # type: ignore[union-attr]
                show(f"query:     {trigger['query']}")
                show(f"value:     {value:.0f} connections, threshold {trigger['threshold']} per replica")

                step("KEDA's HPA scales the Deployment (kubectl get hpa,deployment)")
                started = time.monotonic()
                want = math.ceil(value / int(trigger["threshold"]))

                def replicas() -> int:
                    kubelet.sync(NAME)
                    return int(
                        json.loads(k("get", "deployment", NAME, "-n", NAMESPACE, "-o", "json"))["spec"]["replicas"]
                    )

                wait_for(lambda: replicas() == want, 120, f"the HPA to scale to {want}", 0.5)
                took = time.monotonic() - started
                wait_for(lambda: len(kubelet.sync(NAME)) == want, 60, f"{want} pods to run")
                show(k("get", "hpa,deployment", "-n", NAMESPACE))
                show(f"1 -> {want} replicas, {took:.0f} s after Prometheus saw {value:.0f} connections")
                show(k("get", "pods", "-n", NAMESPACE, "-o", "wide"))

                step("Every sidecar killed: the query returns nothing, KEDA falls back and does not scale in")
                for pod in kubelet.sync(NAME):
                    kubelet.kill_sidecar(pod)
                wait_for(lambda: prometheus.query(trigger["query"]) is None, 60, "the value to go")  # type: ignore[union-attr]

                def fallback() -> bool:
                    status = json.loads(k("get", "scaledobject", NAME, "-n", NAMESPACE, "-o", "json")).get("status", {})
                    return any(c["type"] == "Fallback" and c["status"] == "True" for c in status.get("conditions", []))

                wait_for(fallback, 120, "KEDA's Fallback condition", 1)
                show(k("get", "scaledobject", NAME, "-n", NAMESPACE))
                show(f"fallback ({so['spec']['fallback']['behavior']}): still {replicas()} replicas")
            finally:
                kubelet.close()
    finally:
        step("Cleaning up: operator, KEDA, Prometheus, control plane, namespaces")
        if operator is not None:
            operator.close()
        if prometheus is not None:
            prometheus.stop()
        if keda is not None:
            keda.stop()
        cluster.stop()
    show("done; nothing left running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
