"""`tcp-exporter-operator status` on the real control plane: what a pipeline can gate on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from harness.helpers import wait_for
from harness.hostile import Prometheus, answer
from harness.operator_proc import Kube, Operator, deployment

pytestmark = pytest.mark.cluster
CLI = str(Path(sys.executable).with_name("tcp-exporter-operator"))


def status(cluster: Any, namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": cluster.kubeconfig}
    return subprocess.run([CLI, "status", "-n", namespace, *args], capture_output=True, text=True, env=env)


def test_status_shows_each_annotated_deployment_and_exits_1_while_one_needs_attention(
    operator: Operator, kube: Kube, cluster: Any
) -> None:
    kube.create_injected(operator, deployment("web-api", {"tcp-exporter/port": "8080"}))
    kube.create(deployment("checkout.v2", {"tcp-exporter/port": "²"}))
    kube.create(deployment("not-ours", {}))
    wait_for(lambda: kube.events("checkout.v2", "Warning"), 30, "the Warning on the malformed one")
    out = status(cluster, kube.ns, "-o", "json")
    assert out.returncode == 1, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert set(rows) == {"web-api", "checkout.v2"}  # the unannotated one is not listed
    assert rows["web-api"]["problems"] == [] and rows["web-api"]["method"] == "sockdiag"
    assert rows["web-api"]["sidecar"] == "native"  # auto, on this 1.37 API server
    assert rows["web-api"]["scaledObject"] == "web-api" and rows["web-api"]["max"] == 10
    assert rows["checkout.v2"]["problems"] == ["not injected", "no ScaledObject", "a Warning"]
    assert "is not a list of port numbers or container port names" in rows["checkout.v2"]["lastWarning"]
    text = status(cluster, kube.ns)
    assert text.returncode == 1 and "checkout.v2" in text.stdout and "not injected" in text.stdout
    # Fixed: the operator injects it, and its Warning, still kept as an Event, no longer counts.
    kube.annotate("checkout.v2", port="8080")
    wait_for(lambda: status(cluster, kube.ns).returncode == 0, 30, "status to be all ok once it is fixed")
    fixed = {r["name"]: r for r in json.loads(status(cluster, kube.ns, "-o", "json").stdout)}["checkout.v2"]
    assert fixed["problems"] == [] and fixed["lastWarning"] is None and kube.events("checkout.v2", "Warning")


def vector(*values: str) -> bytes:
    result = [{"metric": {}, "value": [1.0, v]} for v in values]
    return json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}}).encode()


def test_status_shows_the_connections_now_and_flags_replicas_out_of_bounds_and_a_query_without_answer(
    operator: Operator, kube: Kube, cluster: Any
) -> None:
    annotations = {"tcp-exporter/port": "8080", "tcp-exporter/max-replicas": "3"}
    kube.create_injected(operator, deployment("web-api", annotations))
    asked: list[str] = []

    def handle(handler: Any) -> None:
        asked.append(urllib.parse.unquote_plus(handler.path))
        answer(handler, vector("42") if 'tcp_exporter_deployment="web-api"' in asked[-1] else vector())

    with Prometheus(handle) as prometheus:
        out = status(cluster, kube.ns, "-o", "json", "--prometheus", prometheus.url)
        assert out.returncode == 0, out.stdout + out.stderr
        (row,) = json.loads(out.stdout)
        assert row["connections"] == 42 and row["problems"] == []
        assert "unless on (namespace, pod)" in asked[0]  # the ScaledObject's own query: draining pods left out
        text = status(cluster, kube.ns, "--prometheus", prometheus.url)
        assert "CONNECTIONS" in text.stdout and " 42 " in text.stdout

        kube.patch("web-api", {"spec": {"replicas": 5}})
        out = status(cluster, kube.ns, "-o", "json")
        assert out.returncode == 1 and json.loads(out.stdout)[0]["problems"] == ["replicas 5 outside 1-3"]

    with Prometheus(lambda handler: answer(handler, vector())) as empty:
        kube.patch("web-api", {"spec": {"replicas": 2}})
        out = status(cluster, kube.ns, "-o", "json", "--prometheus", empty.url)
        assert out.returncode == 1
        assert json.loads(out.stdout)[0]["problems"] == ["Prometheus returns nothing for its query"]
    gone = status(cluster, kube.ns, "--prometheus", empty.url)  # stopped: said on stderr, the rest still shown
    assert gone.returncode == 0 and "web-api" in gone.stdout and "--prometheus" in gone.stderr
    usage = status(cluster, kube.ns, "--prometheus", "file:///etc/passwd")
    assert usage.returncode == 2 and "usage:" in usage.stderr
