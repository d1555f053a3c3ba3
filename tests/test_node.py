"""The node tier: a real kubelet, containerd and runc, CNI and kube-proxy on a control plane of its own (the
other tiers' pods stay unscheduled on theirs), running images made here."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest
from conftest import need
from tcp_exporter import __version__

from harness.helpers import wait_for
from harness.images import SAMPLE_IMAGE
from harness.nodedemo import ready_pods, serves_only

pytestmark = [pytest.mark.node, pytest.mark.cluster]
NS = "node-e2e"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def node_cluster() -> Iterator[tuple[Any, Callable[..., str], Any]]:
    need(os.geteuid() == 0, "a kubelet and containerd need root")
    for tool in ("ip", "nft", "iptables", "gcc", "buildah", "mmdebstrap"):
        need(shutil.which(tool) is not None, f"{tool} is needed")
    from harness.localkube import cluster as lk
    from harness.nodestack import NODE_IP, Node

    cluster = lk.temporary(address=NODE_IP)  # the API server where pods reach it
    kubectl = lk.kubectl_runner(cluster)

    node = None
    try:
        node = Node(cluster, kubectl)
        kubectl("create", "namespace", NS)
        yield cluster, kubectl, node
    finally:
        if node is not None:
            node.stop()
        cluster.stop()


def get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return str(resp.read().decode())
    except OSError:
        return None


def test_a_pod_with_a_native_sidecar_runs_on_the_real_node_reached_by_pod_ip_and_through_kube_proxy(
    node_cluster: tuple[Any, Callable[..., str], Any],
) -> None:
    from harness.nodestack import POD_CIDR

    _cluster, kubectl, _node = node_cluster
    labels = {"app": "web-api"}
    objects = [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web-api", "namespace": NS},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "initContainers": [
                            {"name": "side", "image": SAMPLE_IMAGE, "restartPolicy": "Always",
                             "args": ["netexec", "--http-port=8081", "--udp-port=-1"]},
                        ],
                        "containers": [
                            {"name": "app", "image": SAMPLE_IMAGE, "imagePullPolicy": "IfNotPresent",
                             "args": ["netexec", "--http-port=8080", "--udp-port=-1"],
                             "ports": [{"name": "http", "containerPort": 8080}],
                             "readinessProbe": {"httpGet": {"path": "/hostname", "port": "http"}, "periodSeconds": 1}},
                        ],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web-api", "namespace": NS},
            "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": "http"}]},
        },
    ]  # fmt: skip
    kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))

    def running() -> dict[str, Any] | None:
        pods = json.loads(kubectl("-n", NS, "get", "pods", "-l", "app=web-api", "-o", "json"))["items"]
        ready = [p for p in pods if any(c["type"] == "Ready" and c["status"] == "True"
                                        for c in p.get("status", {}).get("conditions", []))]  # fmt: skip
        return ready[0] if ready else None

    try:
        pod = wait_for(running, 120, "the pod to be Ready on the real node")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{kubectl('-n', NS, 'describe', 'pods', check=False)[-3000:]}") from None
    assert pod["spec"]["nodeName"] == "tcpx-node"
    ip = pod["status"]["podIP"]
    assert ip_address(ip) in ip_network(POD_CIDR)
    name = pod["metadata"]["name"]
    assert get(f"http://{ip}:8080/hostname") == name  # Ready: the probe got this answer
    # The native sidecar, in the same network namespace (Started is not listening yet: polled).
    wait_for(lambda: get(f"http://{ip}:8081/hostname") == name, 30, "the native sidecar to answer")
    cluster_ip = json.loads(kubectl("-n", NS, "get", "service", "web-api", "-o", "json"))["spec"]["clusterIP"]
    wait_for(lambda: get(f"http://{cluster_ip}/hostname") == name, 30, "the ClusterIP through kube-proxy")


def sidecar_processes(deployment: str) -> list[dict[str, str]]:
    """The host's view of each running sidecar of `deployment` (its main process): UID and capabilities."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            status = (proc / "status").read_text()
        except OSError:
            continue
        if b"/venv/bin/tcp-exporter" in cmdline[1:2] and f"--deployment={deployment}".encode() in cmdline:
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            found.append({"pid": proc.name, "uid": fields["Uid"], "effective": fields["CapEff"]})
    return found


def metric(ip: str, port: int = 9100) -> float | None:
    text = get(f"http://{ip}:{port}/metrics")
    for line in (text or "").splitlines():
        if line.startswith('tcp_exporter_established_connections{port="8080"'):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.fixture(scope="module")
def operator_pod(node_cluster: tuple[Any, Callable[..., str], Any]) -> Callable[..., str]:
    """`kubectl apply -k manifests/` as a user runs it: the operator runs as a pod from the image built from
    Dockerfile.operator, under its ServiceAccount, in its namespace at Pod Security `restricted`, and reaches the
    API server through the kubernetes Service (kube-proxy)."""
    _cluster, kubectl, _node = node_cluster
    kubectl("apply", "-k", str(REPO / "manifests"))
    labels = json.loads(kubectl("get", "namespace", "tcp-exporter", "-o", "json"))["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    try:
        wait_for(lambda: ready_pods(kubectl, "tcp-exporter", None), 120, "the operator's pod to be Ready")
    except AssertionError as exc:
        described = kubectl("-n", "tcp-exporter", "describe", "pods", check=False)[-3000:]
        logs = kubectl("-n", "tcp-exporter", "logs", "deploy/tcp-exporter-operator", check=False)[-3000:]
        raise AssertionError(f"{exc}\n{described}\n{logs}") from None
    return kubectl


def test_the_sample_is_injected_and_its_sidecar_runs_from_our_image_counting_connections_through_the_service(
    operator_pod: Callable[..., str],
) -> None:
    # The sample is applied as the quickstart says; the sidecar the operator's pod injects runs from the image
    # built from Dockerfile.sidecar, under the securityContext the operator wrote, on the real runtime.
    kubectl = operator_pod
    try:
        kubectl("create", "namespace", "demo")
        kubectl("apply", "-n", "demo", "-k", str(REPO / "manifests" / "samples"))

        def pod() -> dict[str, Any] | None:
            items = json.loads(kubectl("-n", "demo", "get", "pods", "-o", "json"))["items"]
            for p in items:
                names = [c["name"] for c in p["spec"]["containers"]]
                statuses = p.get("status", {}).get("containerStatuses", [])
                if "tcp-exporter" in names and statuses and all(c["ready"] for c in statuses):
                    return dict(p)
            return None

        try:
            running = wait_for(pod, 180, "an injected echo-server pod with every container Ready")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{kubectl('-n', 'demo', 'describe', 'pods', check=False)[-4000:]}") from None
        ip = running["status"]["podIP"]
        (sidecar,) = [c for c in running["status"]["containerStatuses"] if c["name"] == "tcp-exporter"]
        assert sidecar["restartCount"] == 0 and sidecar["image"].endswith("tcp-exporter:" + __version__)
        (process,) = sidecar_processes("echo-server")
        assert process["uid"].split() == ["65532"] * 4 and int(process["effective"], 16) == 0, process
        service = json.loads(kubectl("-n", "demo", "get", "service", "echo-server", "-o", "json"))["spec"]
        # The first pod, without the sidecar, may still be terminating: the Service must send to this one alone.
        serves_only(kubectl, "demo", running, service["clusterIP"])
        wait_for(lambda: metric(ip) == 0, 30, "the probe's connection to close")
        clients = []
        try:
            for _ in range(25):  # through the Service's ClusterIP: kube-proxy's DNAT to the pod
                clients.append(socket.create_connection((service["clusterIP"], 8080), timeout=5))
            wait_for(lambda: metric(ip) == 25, 30, "the sidecar to count the 25 connections")
        finally:
            for c in clients:
                c.close()
        wait_for(lambda: metric(ip) == 0, 30, "the count to fall to 0 once they close")

        # conntrack under the securityContext the operator writes for it, on the real runtime: started as UID 0
        # with NET_ADMIN, SETUID and SETGID, the sidecar serves as UID 65532 holding NET_ADMIN alone.
        kubectl("-n", "demo", "annotate", "deployment", "echo-server", "tcp-exporter/method=conntrack")

        def conntrack_pod() -> dict[str, Any] | None:
            found = pod()
            args = next((c["args"] for c in (found or {}).get("spec", {}).get("containers", [])
                         if c["name"] == "tcp-exporter"), [])  # fmt: skip
            return (
                found
                if "--method=conntrack" in args and found.get("metadata", {}).get("deletionTimestamp") is None
                else None
            )

        running = wait_for(conntrack_pod, 180, "the conntrack sidecar's pod Ready")
        ip = running["status"]["podIP"]
        # It drops within its first second (after Python's start): polled, and a sidecar left as root fails.
        net_admin_only = {"uid": ["65532"] * 4, "effective": 1 << 12}
        wait_for(
            lambda: (
                [
                    {"uid": p["uid"].split(), "effective": int(p["effective"], 16)}
                    for p in sidecar_processes("echo-server")
                ]
                == [net_admin_only]
            ),
            30,
            "the one conntrack sidecar process to be UID 65532 holding NET_ADMIN alone",
        )

        serves_only(kubectl, "demo", running, service["clusterIP"])
        clients = [socket.create_connection((service["clusterIP"], 8080), timeout=5) for _ in range(7)]
        try:
            wait_for(lambda: metric(ip) == 7, 30, "the conntrack sidecar to count the 7 connections")
        finally:
            for c in clients:
                c.close()
    finally:
        kubectl("delete", "namespace", "demo", "--wait=false", check=False)


def test_under_pod_security_baseline_conntrack_becomes_sockdiag_and_the_pods_are_admitted_and_run(
    operator_pod: Callable[..., str],
) -> None:
    kubectl = operator_pod
    kubectl("create", "namespace", "shared")
    try:
        kubectl("label", "namespace", "shared", "pod-security.kubernetes.io/enforce=baseline")
        kubectl("apply", "-n", "shared", "-k", str(REPO / "manifests" / "samples"))
        kubectl("-n", "shared", "annotate", "deployment", "echo-server", "tcp-exporter/method=conntrack")

        def admitted() -> list[dict[str, Any]]:
            pods = ready_pods(kubectl, "shared", "tcp-exporter")
            args = [c.get("args", []) for p in pods for c in p["spec"]["containers"] if c["name"] == "tcp-exporter"]
            return pods if args and all("--method=sockdiag" in a for a in args) else []

        (pod,) = wait_for(admitted, 180, "a pod with the sockdiag sidecar admitted and Ready under baseline")
        (sidecar,) = [c for c in pod["spec"]["containers"] if c["name"] == "tcp-exporter"]
        assert "add" not in sidecar["securityContext"]["capabilities"]
        events = json.loads(kubectl("-n", "shared", "get", "events", "-o", "json"))["items"]
        assert any(e["reason"] == "MethodDowngraded" and e["type"] == "Warning" for e in events)
    finally:
        kubectl("delete", "namespace", "shared", "--wait=false", check=False)


def test_a_scale_in_terminates_a_pod_and_its_sidecar_stops_cleanly_on_sigterm_within_the_grace_period(
    node_cluster: tuple[Any, Callable[..., str], Any], operator_pod: Callable[..., str]
) -> None:
    import datetime
    import threading

    from kubernetes import client, config, watch

    cluster, kubectl, _node = node_cluster
    kubectl("create", "namespace", "scaling")
    api = client.CoreV1Api(config.new_client_from_config(cluster.kubeconfig))
    seen: dict[str, dict[str, Any]] = {}  # pod -> the last state the kubelet reported of its sidecar, and more
    stop = threading.Event()

    def follow() -> None:
        for event in watch.Watch().stream(api.list_namespaced_pod, "scaling", timeout_seconds=120):
            pod = event["object"]
            for status in pod.status.container_statuses or []:
                if status.name == "tcp-exporter":
                    seen[pod.metadata.name] = {"state": status.state, "deleted": pod.metadata.deletion_timestamp,
                                               "grace": pod.metadata.deletion_grace_period_seconds}  # fmt: skip
            if stop.is_set():
                return

    try:
        kubectl("apply", "-n", "scaling", "-k", str(REPO / "manifests" / "samples"))
        kubectl("-n", "scaling", "scale", "deployment", "echo-server", "--replicas=2")
        wait_for(lambda: len(ready_pods(kubectl, "scaling", "tcp-exporter")) == 2, 180, "2 injected pods Ready")
        watcher = threading.Thread(target=follow, daemon=True)
        watcher.start()
        before = {p["metadata"]["name"] for p in ready_pods(kubectl, "scaling", "tcp-exporter")}
        kubectl("-n", "scaling", "scale", "deployment", "echo-server", "--replicas=1")

        def removed() -> str | None:
            left = {
                p["metadata"]["name"]
                for p in json.loads(kubectl("-n", "scaling", "get", "pods", "-o", "json"))["items"]
            }
            gone = before - left
            return next(iter(gone)) if len(gone) == 1 and len(left) == 1 else None

        name = wait_for(removed, 60, "one pod to be removed")
        wait_for(lambda: seen.get(name, {}).get("state") and seen[name]["state"].terminated, 10, "its sidecar's end")
        ended = seen[name]
        terminated = ended["state"].terminated
        assert terminated.exit_code == 0 and terminated.reason == "Completed", terminated  # SIGTERM: a clean stop
        took = terminated.finished_at - ended["deleted"] + datetime.timedelta(seconds=ended["grace"] or 0)
        assert took.total_seconds() <= (ended["grace"] or 30), took  # within the grace period
    finally:
        stop.set()
        kubectl("delete", "namespace", "scaling", "--wait=false", check=False)


def test_keda_scales_real_pods_out_on_connections_through_the_service_and_back_in_when_they_close(
    node_cluster: tuple[Any, Callable[..., str], Any], operator_pod: Callable[..., str]
) -> None:
    # KEDA (operator, metrics adapter, webhooks) and Prometheus run on the host, as in the other tiers; the pods
    # KEDA's HPA asks for are started by the real kubelet, and Prometheus discovers and scrapes them there.
    from harness.kedastack import Keda
    from harness.nodedemo import scale_on_real_pods
    from harness.promstack import Prometheus, documented_jobs

    cluster, kubectl, _node = node_cluster
    keda = Keda(cluster, kubectl)
    prometheus = Prometheus(documented_jobs(("tcp-exporter",), cluster.kubeconfig, "autoscale"))
    try:
        scaled = scale_on_real_pods(kubectl, "autoscale", prometheus.url, connections=250, threshold=100)
        assert scaled.out_to == 3 and len(scaled.pods) == 3
        print(f"\nscale-out to 3 in {scaled.out_seconds:.0f} s, scale-in in {scaled.in_seconds:.0f} s")
    finally:
        prometheus.stop()
        keda.stop()
        kubectl("delete", "namespace", "autoscale", "--wait=false", check=False)


def test_uninstall_leaves_the_pods_running_without_the_sidecar_after_one_rollout(
    node_cluster: tuple[Any, Callable[..., str], Any], operator_pod: Callable[..., str]
) -> None:
    # As the README says: delete the operator first, then `tcp-exporter-operator uninstall`. Last in this module.
    cluster, kubectl, _node = node_cluster
    kubectl("create", "namespace", "leaving")
    try:
        kubectl("apply", "-n", "leaving", "-k", str(REPO / "manifests" / "samples"))
        wait_for(lambda: ready_pods(kubectl, "leaving", "tcp-exporter"), 180, "the injected pod Ready")

        def revision() -> int:
            dep = json.loads(kubectl("-n", "leaving", "get", "deployment", "echo-server", "-o", "json"))
            return int(dep["metadata"]["annotations"]["deployment.kubernetes.io/revision"])

        before = revision()
        kubectl("-n", "tcp-exporter", "delete", "deployment", "tcp-exporter-operator", "--wait=true")
        cli = str(Path(sys.executable).with_name("tcp-exporter-operator"))
        env = {**os.environ, "KUBECONFIG": cluster.kubeconfig}
        done = subprocess.run([cli, "uninstall", "-n", "leaving"], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stdout + done.stderr

        def plain() -> list[dict[str, Any]]:
            pods = json.loads(kubectl("-n", "leaving", "get", "pods", "-o", "json"))["items"]
            ready = ready_pods(kubectl, "leaving", None)
            return (
                ready if len(pods) == len(ready) == 1 and ready_pods(kubectl, "leaving", "tcp-exporter") == [] else []
            )

        wait_for(plain, 120, "the pods to run without the sidecar")
        # One rollout: back to the template as the user wrote it (its first ReplicaSet, reused).
        assert revision() == before + 1
        assert json.loads(kubectl("-n", "leaving", "get", "scaledobjects", "-o", "json"))["items"] == []
    finally:
        kubectl("delete", "namespace", "leaving", "--wait=false", check=False)
