"""`make demo`: the whole path on a real local control plane, from annotation to KEDA's replica count.

1. start etcd, kube-apiserver and kube-controller-manager (built once from Go modules, cached);
2. install tcp-exporter with `kubectl apply -k manifests/` and run the operator as its ServiceAccount;
3. apply the annotated sample Deployment; show the injected pod template and the ScaledObject;
4. run the sidecar, with the injected arguments, in a network namespace standing in for the pod, next to a
   TCP server that the demo opens connections to from another namespace;
5. scrape it with a real Prometheus using the documented scrape job, run the ScaledObject's query, and print
   the replica count KEDA would choose.
Everything it starts is stopped at the end. Needs root (network namespaces).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from typing import Any

from exporter_proc import EXPORTER
from helpers import die_with_parent, wait_for
from kubernetes import client, config
from localkube import cluster as localkube
from netns import connect, in_netns, listener, pair
from operator_proc import REPO, Operator
from promstack import Prometheus, discovered, keda_replicas

CONNECTIONS = 250
NAMESPACE = "demo"


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
        apps, custom = client.AppsV1Api(api), client.CustomObjectsApi(api)

        def sidecar() -> Any:
            dep = apps.read_namespaced_deployment("echo", NAMESPACE)
            return next((c for c in dep.spec.template.spec.containers if c.name == "tcp-exporter"), None)

        wait_for(sidecar, 60, "the operator to inject the sidecar")
        dep = json.loads(apps.read_namespaced_deployment("echo", NAMESPACE, _preload_content=False).data)
        template = dep["spec"]["template"]
        step("The injected pod template (kubectl get deployment echo -o yaml)")
        show(json.dumps({"metadata": template["metadata"], "containers": template["spec"]["containers"]}, indent=2))
        show("tcp-exporter/status: " + dep["metadata"]["annotations"]["tcp-exporter/status"])
        so = wait_for(
            lambda: custom.list_namespaced_custom_object("keda.sh", "v1alpha1", NAMESPACE, "scaledobjects")["items"],
            60,
            "the ScaledObject",
        )[0]
        step("The ScaledObject the operator owns")
        show(json.dumps(so["spec"], indent=2))
        show(k("get", "events", "-n", NAMESPACE, "--field-selector", "involvedObject.name=echo"))

        step(f"Running the sidecar with the injected arguments, and opening {CONNECTIONS} connections to the app")
        args = sidecar().args
        pod = json.loads(k("get", "pods", "-n", NAMESPACE, "-o", "json"))["items"]
        pod_name = next(
            p["metadata"]["name"] for p in pod if any(c["name"] == "tcp-exporter" for c in p["spec"]["containers"])
        )
        with pair() as net:
            server = listener(net.pod, 8080)
            exporter = subprocess.Popen(
                ["ip", "netns", "exec", net.pod, EXPORTER, *args, "--log-level=warning"], preexec_fn=die_with_parent()
            )
            try:
                clients = connect(net.peer, net.pod_v4, 8080, CONNECTIONS)
                accepted = [server.accept()[0] for _ in range(CONNECTIONS)]
                show(f"pod {pod_name} (network namespace {net.pod}, {net.pod_v4}), exporter: {' '.join(args)}")

                def metric() -> str | None:
                    try:
                        with socket.create_connection((net.pod_v4, 9100), timeout=2) as s:
                            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                            body = b"".join(iter(lambda: s.recv(65536), b"")).decode()
                    except OSError:
                        return None
                    lines = [line for line in body.splitlines() if line.startswith("tcp_exporter_established")]
                    return lines[0] if lines else None

                show(
                    "$ curl :9100/metrics | grep established\n"
                    + wait_for(lambda: in_netns(net.peer, metric), 30, "the exporter")
                )
                step("Prometheus scrapes it with the documented scrape job; KEDA's query and replica count")
                annotations = template["metadata"]["annotations"]
                prometheus = Prometheus(
                    net.peer,
                    [discovered(net.pod_v4, int(annotations["prometheus.io/port"]), NAMESPACE, pod_name, annotations)],
                )
                try:
                    trigger = so["spec"]["triggers"][0]["metadata"]
                    value = wait_for(lambda: prometheus.query(trigger["query"]), 60, "Prometheus to scrape")
                    replicas = keda_replicas(
                        value, int(trigger["threshold"]), so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]
                    )
                    show(f"query:     {trigger['query']}")
                    show(f"value:     {value:.0f} connections")
                    show(f"threshold: {trigger['threshold']} per replica (AverageValue)")
                    show(
                        f"KEDA would run ceil({value:.0f} / {trigger['threshold']}) = {replicas} replicas "
                        f"(between {so['spec']['minReplicaCount']} and {so['spec']['maxReplicaCount']})"
                    )
                finally:
                    prometheus.stop()
                for s in clients + accepted:
                    s.close()
            finally:
                exporter.terminate()
                exporter.wait(timeout=10)
                server.close()
    finally:
        step("Cleaning up: operator, control plane, namespaces")
        if operator is not None:
            operator.close()
        cluster.stop()
    show("done; nothing left running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
