"""Safety among tenants, on the real control plane: nothing one namespace writes stops the operator for others."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from harness.helpers import wait_for
from harness.operator_proc import Kube, Operator, deployment

pytestmark = pytest.mark.cluster

# Helm-style names as users have them: dots, dashes, 60 characters.
LONG = "payments-gateway-primary-eu-west-1-canary-release-abc.v2-web"
assert len(LONG) == 60
ATTACKER = "https://attacker.example/x"


def test_a_superscript_port_and_a_forged_status_stop_nothing_and_twenty_valid_deployments_after_them_inject(
    operator: Operator, kube: Kube
) -> None:
    # "²".isdigit() is True and int("²") raises: this one stopped the Deployment watch for the whole cluster.
    kube.create(deployment("web-api", {"tcp-exporter/port": "²", "tcp-exporter/scale-in-by-connections": "true"}))
    forged = {"tcp-exporter/port": "8080", "tcp-exporter/status": json.dumps({"podAnnotations": 5, "ports": "x"})}
    kube.create(deployment("checkout.v2", forged))
    names = [f"tenant-{i:02d}.web-api" for i in range(19)] + [LONG]
    for name in names:
        kube.create(deployment(name, {"tcp-exporter/port": "8080"}))
    wait_for(lambda: all("tcp-exporter" in kube.containers(n) for n in names), 30, "all 20 valid Deployments injected")
    assert operator.metric("tcp_exporter_operator_informer_synced", resource="deployments") == 1
    warned = wait_for(lambda: kube.events("web-api", "Warning"), 30, "a Warning on the malformed one")
    assert "is neither a port number nor a container port name" in warned[0].message
    assert "tcp-exporter" not in kube.containers("web-api")
    # The forged status is read as untrusted: the Deployment is injected, its status written anew.
    wait_for(lambda: "tcp-exporter" in kube.containers("checkout.v2"), 30, "the forged one injected")
    status = json.loads(kube.get("checkout.v2").metadata.annotations["tcp-exporter/status"])
    assert status["ports"] == [8080]
    assert operator.liveness() == 200


def test_an_editor_cannot_point_the_operators_cluster_credentials_at_their_own_server(
    operator: Operator, kube: Kube, cluster: Any, kubectl: Callable[..., str]
) -> None:
    operator.stop()
    central = Operator(
        cluster,
        kubectl,
        env={
            "TCP_EXPORTER_OPERATOR_AUTHENTICATION_REF": "ClusterTriggerAuthentication/central-prom",
            "TCP_EXPORTER_OPERATOR_AUTH_MODES": "bearer",
        },
        args=[f"--namespace={kube.ns}"],
    )
    try:
        kube.create(deployment("web-api", {"tcp-exporter/port": "8080", "tcp-exporter/prometheus": ATTACKER}))
        kube.create(deployment("checkout.v2", {"tcp-exporter/port": "8080"}))
        wait_for(
            lambda: "tcp-exporter" in kube.containers("checkout.v2"), 30, "the one on the admin's address injected"
        )
        so = kube.scaled_object("checkout.v2") or {}
        assert so["spec"]["triggers"][0]["authenticationRef"]["kind"] == "ClusterTriggerAuthentication"
        warned = wait_for(lambda: kube.events("web-api", "Warning"), 30, "a Warning on the attacker's one")
        assert "TCP_EXPORTER_OPERATOR_AUTHENTICATION_REF" in warned[0].message, warned[0].message
        assert kube.scaled_object("web-api") is None
        assert "tcp-exporter" not in kube.containers("web-api")
    finally:
        central.close()
        operator.start()
