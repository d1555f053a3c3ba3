"""`tcp-exporter-operator uninstall` on the real control plane: after it, nothing the operator added remains."""

from __future__ import annotations

import os
import subprocess
from typing import Any

import pytest

from harness.operator_proc import KEDA, OPERATOR, Kube, Operator, deployment, injected

pytestmark = pytest.mark.cluster

NAMES = ("orders-api", "checkout.v2")


def uninstall(cluster: Any, kube: Kube, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": cluster.kubeconfig}
    return subprocess.run(
        [OPERATOR, "uninstall", "-n", kube.ns, *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_uninstall_removes_every_sidecar_annotation_and_child_in_one_rollout_each_and_dry_run_changes_nothing(
    operator: Operator, kube: Kube, cluster: Any
) -> None:
    for name in NAMES:
        body = deployment(name, {"tcp-exporter/port": "8080"})
        body["spec"]["template"]["metadata"]["annotations"] = {"team": "payments"}
        kube.create(body)
        injected(kube, name)
    before = {name: kube.get(name) for name in NAMES}
    operator.stop()
    try:
        dry = uninstall(cluster, kube, "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "4 objects to change" in dry.stdout, dry.stdout
        for name in NAMES:
            assert kube.get(name).metadata.generation == before[name].metadata.generation
            assert kube.scaled_object(name) is not None

        done = uninstall(cluster, kube)
        assert done.returncode == 0, done.stderr
        for name in NAMES:
            after = kube.get(name)
            assert after.metadata.generation == before[name].metadata.generation + 1  # one rollout
            assert "tcp-exporter" not in kube.containers(name)
            assert "tcp-exporter/status" not in after.metadata.annotations
            assert after.metadata.annotations["tcp-exporter/port"] == "8080"  # the user's own stays
            assert after.spec.template.metadata.annotations == {"team": "payments"}  # only the operator's went
            assert kube.scaled_object(name) is None
        leftovers = kube.custom.list_namespaced_custom_object(*KEDA, kube.ns, "scaledobjects")["items"]
        assert leftovers == []

        again = uninstall(cluster, kube)
        assert again.returncode == 0 and "0 objects changed" in again.stdout
    finally:
        operator.start()
