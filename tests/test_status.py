"""`tcp-exporter-operator status` on the real control plane: what a pipeline can gate on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness.helpers import wait_for
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
    kube.apps.delete_namespaced_deployment("checkout.v2", kube.ns)
    wait_for(lambda: status(cluster, kube.ns).returncode == 0, 30, "status to be all ok once it is gone")
