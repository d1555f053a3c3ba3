"""The node tier: a real kubelet, containerd and runc, CNI and kube-proxy on a control plane of its own (the
other tiers' pods stay unscheduled on theirs), running images made here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from ipaddress import ip_address, ip_network
from typing import Any

import pytest
from conftest import need

from harness.helpers import wait_for
from harness.images import SAMPLE_IMAGE

pytestmark = [pytest.mark.node, pytest.mark.cluster]
NS = "node-e2e"


@pytest.fixture(scope="module")
def node_cluster() -> Iterator[tuple[Any, Callable[..., str], Any]]:
    need(os.geteuid() == 0, "a kubelet and containerd need root")
    for tool in ("ip", "nft", "iptables", "gcc"):
        need(shutil.which(tool) is not None, f"{tool} is needed")
    from harness.localkube import cluster as lk
    from harness.localkube.cluster import kubectl as kubectl_path
    from harness.nodestack import Node

    cluster = lk.temporary()
    binary = kubectl_path()

    def kubectl(*args: str, check: bool = True, input: str | None = None) -> str:
        proc = subprocess.run(
            [binary, "--kubeconfig", cluster.kubeconfig, *args], capture_output=True, text=True, input=input
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {proc.stderr}")
        return proc.stdout

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
