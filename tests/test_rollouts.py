"""Argo Rollouts as targets (WORKLOAD_KINDS=Deployment,Rollout, manifests/rollouts) on the real control plane with
the real Argo Rollouts controller: a Rollout is injected and scaled like a Deployment, with the ScaledObject's
target and owner and the Events of its own kind and API group, once Argo Rollouts is installed (after the operator:
no restart); the pods its ReplicaSets create run the sidecar; no right on Rollouts where the kind is not enabled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.helpers import wait_for
from harness.operator_proc import Kube, Operator, deployment, operator_may, operator_with_kind
from harness.rolloutstack import Rollouts, rollout, sidecar

pytestmark = pytest.mark.cluster


def test_where_rollouts_are_not_enabled_the_operator_has_no_right_on_them(operator: Operator, kube: Kube) -> None:
    assert not operator_may(kube, "list", "rollouts", "argoproj.io")


@pytest.fixture(scope="module")
def operator_with_rollouts(cluster: Any, kubectl: Callable[..., str], operator: Operator) -> Iterator[Operator]:
    """The operator with Rollouts enabled (and their RBAC installed), in place of the session's, for the tests of
    this module that need it: they come after the one that needs the session's (module order)."""
    with operator_with_kind(cluster, kubectl, operator, "rollouts") as op:
        yield op


def test_a_rollout_is_injected_once_argo_rollouts_is_installed_scaled_through_its_kind_and_uninjected(
    operator_with_rollouts: Operator, kube: Kube, request: pytest.FixtureRequest
) -> None:
    # Argo Rollouts installed after the operator started (the operator retries a kind that is not served yet).
    argo = request.getfixturevalue("argo_rollouts")
    rollouts = Rollouts(kube)
    name = "checkout.v2"
    rollouts.create(rollout(name, {"tcp-exporter/port": "web", "tcp-exporter/max-replicas": "5"}))
    try:
        wait_for(lambda: rollouts.inits(name) == ["tcp-exporter"], 60, "the native sidecar in the Rollout")
    except AssertionError:
        raise AssertionError(f"not injected; operator log:\n{operator_with_rollouts.log()[-4000:]}") from None
    status = json.loads(rollouts.get(name)["metadata"]["annotations"]["tcp-exporter/status"])
    assert status["ports"] == [8080] and status["mode"] == "native"
    so = wait_for(lambda: kube.scaled_object(name), 30, "the ScaledObject")
    assert so["spec"]["scaleTargetRef"] == {"apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout", "name": name}
    (owner,) = so["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"]) == ("Rollout", rollouts.get(name)["metadata"]["uid"])
    injected = wait_for(lambda: [e for e in rollouts.events(name) if e.reason == "Injected"], 30, "the Injected Event")
    assert injected[0].involved_object.api_version == "argoproj.io/v1alpha1"
    # The real Argo Rollouts controller rolls the injected template out: its ReplicaSet's pods run the sidecar.
    try:
        pods = wait_for(lambda: [p for p in rollouts.pods(name) if sidecar(p)] or None, 60, "a pod with the sidecar")
    except AssertionError:
        raise AssertionError(f"no pod; Argo Rollouts' log:\n{argo.logs()}") from None
    assert "rollouts-pod-template-hash" in pods[0].metadata.labels

    rollouts.annotate(name, scale_in_by_connections="true")
    ignored = "ScaleInByConnectionsIgnored"
    warned = wait_for(lambda: [e for e in rollouts.events(name, "Warning") if e.reason == ignored], 30, "a Warning")
    assert "Rollout" in warned[0].message

    rollouts.annotate(name, port=None, scale_in_by_connections=None)
    wait_for(lambda: rollouts.inits(name) == [], 30, "the sidecar removed")
    assert "tcp-exporter/status" not in (rollouts.get(name)["metadata"].get("annotations") or {})
    wait_for(lambda: kube.scaled_object(name) is None, 30, "the ScaledObject deleted")


def test_a_rollout_in_its_workloadref_form_is_injected_through_its_deployments_template_and_uninjected(
    operator_with_rollouts: Operator, kube: Kube, cluster: Any, argo_rollouts: Any
) -> None:
    # The pod template is the Deployment's (scaled to nothing, as Argo's workloadRef users leave it): the patch
    # mode injects it there on the Rollout's behalf; the Rollout itself is not written.
    template = deployment("lobby-template", {})
    template["spec"]["replicas"] = 0
    kube.create(template)
    rollouts = Rollouts(kube)
    rollouts.create(rollout("lobby", {"tcp-exporter/port": "web"}, workload_ref="lobby-template"))
    try:
        wait_for(lambda: "tcp-exporter" in kube.containers("lobby-template"), 60, "the Deployment's template injected")
    except AssertionError:
        raise AssertionError(f"not injected; operator log:\n{operator_with_rollouts.log()[-4000:]}") from None
    sidecar_args = " ".join(kube.containers("lobby-template")["tcp-exporter"].args)
    assert "--deployment=lobby" in sidecar_args  # the Rollout's name: its ScaledObject's query selects it
    assert "tcp-exporter/status" in kube.get("lobby-template").metadata.annotations
    so = wait_for(lambda: kube.scaled_object("lobby"), 30, "the Rollout's ScaledObject")
    assert so["spec"]["scaleTargetRef"] == {"apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout", "name": "lobby"}
    written = rollouts.get("lobby")
    assert "tcp-exporter/status" not in written["metadata"]["annotations"] and "template" not in written["spec"]
    # Argo Rollouts makes the Rollout's pods from that template: they run the sidecar.
    wait_for(lambda: [p for p in rollouts.pods("lobby-template") if sidecar(p)] or None, 60, "a pod with the sidecar")
    cli = str(Path(sys.executable).with_name("tcp-exporter-operator"))
    env = {**os.environ, "KUBECONFIG": cluster.kubeconfig}
    shown = subprocess.run([cli, "status", "-n", kube.ns, "-o", "json"], capture_output=True, text=True, env=env)
    (row,) = [r for r in json.loads(shown.stdout) if r["name"] == "lobby"]
    assert row["injectedBy"] == "template" and "not injected" not in row["problems"], row
    # The user's own change of the template is kept, the sidecar with it; the annotation gone, the template is
    # as the user wrote it.
    kube.patch("lobby-template", {"spec": {"template": {"metadata": {"labels": {"tier": "games"}}}}})
    wait_for(lambda: kube.get("lobby-template").metadata.generation >= 3, 30, "the user's change")
    assert "tcp-exporter" in kube.containers("lobby-template")
    rollouts.annotate("lobby", port=None)
    wait_for(lambda: "tcp-exporter" not in kube.containers("lobby-template"), 30, "the sidecar taken out")
    assert "tcp-exporter/status" not in (kube.get("lobby-template").metadata.annotations or {})
    wait_for(lambda: kube.scaled_object("lobby") is None, 30, "the ScaledObject deleted")


def test_uninstall_takes_the_injection_out_of_a_rollout_and_deletes_its_scaledobject(
    operator_with_rollouts: Operator, kube: Kube, cluster: Any, argo_rollouts: Any
) -> None:
    rollouts = Rollouts(kube)
    rollouts.create(rollout("game-proxy", {"tcp-exporter/port": "8080"}))
    wait_for(lambda: rollouts.inits("game-proxy") == ["tcp-exporter"], 60, "the Rollout injected")
    wait_for(lambda: kube.scaled_object("game-proxy"), 30, "its ScaledObject")
    operator_with_rollouts.stop()  # as the README says: the operator first, then uninstall
    try:
        cli = str(Path(sys.executable).with_name("tcp-exporter-operator"))
        env = {**os.environ, "KUBECONFIG": cluster.kubeconfig}
        done = subprocess.run([cli, "uninstall", "-n", kube.ns], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "game-proxy" in done.stdout
        assert rollouts.inits("game-proxy") == []
        assert "tcp-exporter/status" not in (rollouts.get("game-proxy")["metadata"].get("annotations") or {})
        assert kube.scaled_object("game-proxy") is None
    finally:
        operator_with_rollouts.start()
