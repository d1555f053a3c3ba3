"""The whole chain on real parts: annotated Deployment -> the operator's ScaledObject -> real KEDA (operator and
metrics adapter behind the aggregation layer) -> the HPA controller -> the Deployment's replica count, with pods
run as a kubelet would (the real sidecar in a network namespace each) and a real Prometheus discovering them.

Nothing here computes KEDA's arithmetic: the replica counts asserted are the ones the HPA writes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import need

from harness.helpers import wait_for
from harness.netns import lan
from harness.operator_proc import Kube, Operator, deployment, injected
from harness.podsim import Kubelet
from harness.promstack import Prometheus, documented_jobs

pytestmark = [pytest.mark.cluster, pytest.mark.netns, pytest.mark.prometheus, pytest.mark.keda]

# 69 characters, dots and dashes: longer than KEDA accepts for a ScaledObject (54) or its HPA's name (63).
NAME = "game-proxy.eu-west-1.canary-release-2026-12-02.payments-gateway-a1b2c"
THRESHOLD = 100
MAX = 6


def status_of(cluster: Any, namespace: str) -> subprocess.CompletedProcess[str]:
    """`tcp-exporter-operator status -o json` as a user runs it, with the cluster's kubeconfig."""
    cli = str(Path(sys.executable).with_name("tcp-exporter-operator"))
    env = {**os.environ, "KUBECONFIG": cluster.kubeconfig}
    return subprocess.run([cli, "status", "-n", namespace, "-o", "json"], capture_output=True, text=True, env=env)


def test_keda_and_the_hpa_scale_out_scale_in_and_hold_on_missing_data(
    operator: Operator, keda: Any, kube: Kube, cluster: Any, api: Any
) -> None:
    need(os.geteuid() == 0, "network namespaces need root")
    with lan(MAX + 1, host=True) as net:
        kubelet = Kubelet(api, kube.ns, net)
        prom = Prometheus(documented_jobs(("tcp-exporter",), cluster.kubeconfig, kube.ns))
        try:
            kube.create(
                deployment(
                    NAME,
                    {
                        "tcp-exporter/port": "web",
                        "tcp-exporter/threshold": str(THRESHOLD),
                        "tcp-exporter/max-replicas": str(MAX),
                        "tcp-exporter/prometheus": prom.url,
                        # Short, so that the scale-in is seen within the test; the default is the HPA's 300 s.
                        "tcp-exporter/scale-down-stabilization": "5",
                    },
                )
            )
            so = injected(kube, NAME)
            query = so["spec"]["triggers"][0]["metadata"]["query"]

            def replicas() -> int:
                kubelet.sync(NAME)
                return int(kube.get(NAME).spec.replicas)

            def settled_at(want: int, timeout: float, what: str) -> float:
                started = time.monotonic()
                wait_for(lambda: replicas() == want, timeout, what, 0.5)
                return time.monotonic() - started

            (first,) = wait_for(lambda: kubelet.sync(NAME) or None, 60, "the first pod to run")
            assert len(so["metadata"]["name"]) <= 54
            hpa_name = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["name"]  # set, and at most 63
            hpa = wait_for(lambda: kube.hpa(hpa_name), 60, "KEDA's HPA, under the name the operator set")
            assert hpa.spec.max_replicas == MAX

            # Step up: 450 connections -> ceil(450 / 100) = 5 replicas, written by the HPA.
            kubelet.connect(first, 450)
            wait_for(lambda: prom.query(query) == 450, 30, "Prometheus to see 450 connections")
            up = settled_at(math.ceil(450 / THRESHOLD), 90, "the HPA to scale out to 5")
            # Step down: 150 -> 2 replicas once the stabilization window has passed.
            for s in first.clients[150:]:
                s.close()
            del first.clients[150:]
            wait_for(lambda: prom.query(query) == 150, 30, "Prometheus to see 150 connections")
            down = settled_at(2, 120, "the HPA to scale in to 2")
            print(f"\nreaction: scale-out {up:.1f} s, scale-in {down:.1f} s (stabilization 5 s)")

            # Every sidecar gone: the query returns nothing, KEDA falls back, and the replicas do not drop.
            for pod in kubelet.sync(NAME):
                kubelet.kill_sidecar(pod)
            wait_for(lambda: prom.query(query) is None, 30, "the query to return nothing")

            def fallback_active() -> bool:
                status = kube.scaled_object(NAME).get("status", {})  # type: ignore[union-attr]
                return any(c["type"] == "Fallback" and c["status"] == "True" for c in status.get("conditions", []))

            wait_for(fallback_active, 120, "KEDA's Fallback condition", 1)
            # Told on the Deployment, with KEDA's own reason.
            warned = wait_for(
                lambda: [e for e in kube.events(NAME, "Warning") if e.reason == "ScaledObjectFallback"],
                30,
                "the ScaledObjectFallback Warning on the Deployment",
            )
            assert "holds the replicas at its fallback" in warned[0].message
            held_until = time.monotonic() + 30  # two more HPA periods on the fallback
            # Meanwhile `status` shows KEDA's conditions as they are, and needs attention (a pipeline gate).
            shown = status_of(cluster, kube.ns)
            assert shown.returncode == 1, shown.stderr
            (row,) = json.loads(shown.stdout)
            assert (row["ready"], row["fallback"], row["replicas"], row["max"]) == ("True", "True", 2, MAX), row
            assert "KEDA: fallback (the query returns nothing)" in row["problems"], row
            while time.monotonic() < held_until:
                assert int(kube.get(NAME).spec.replicas) == 2, "the replica count dropped on missing data"
                time.sleep(1)
        finally:
            prom.stop()
            kubelet.close()


def test_kedas_admission_webhook_runs_and_refuses_what_keda_refuses_but_never_the_operators_scaled_objects(
    operator: Operator, keda: Any, kube: Kube
) -> None:
    # KEDA's webhook refuses ScaledObject names over 54 characters (kedacore/keda#7762): one of 60 written by hand
    # is refused here, so the webhook is really in the path; the operator's for a 69-character Deployment is not.
    from kubernetes.client.exceptions import ApiException

    long_name = "payments-gateway-primary-eu-west-1-canary-release-abc.v2-web"
    assert len(long_name) == 60
    kube.create(deployment(long_name, {"tcp-exporter/port": "web"}))
    by_hand = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": long_name},
        "spec": {
            "scaleTargetRef": {"name": long_name},
            "triggers": [
                {"type": "prometheus", "metadata": {"serverAddress": "http://p:9090", "query": "1", "threshold": "1"}}
            ],
        },
    }
    with pytest.raises(ApiException) as refused:
        kube.custom.create_namespaced_custom_object("keda.sh", "v1alpha1", kube.ns, "scaledobjects", by_hand)
    assert refused.value.status == 403 and "vscaledobject.kb.io" in str(refused.value.body), refused.value.body
    assert "must be no more than 63 characters" in str(refused.value.body)
    so = injected(kube, long_name)  # the operator's own: a 54-character name, accepted by the same webhook
    assert len(so["metadata"]["name"]) <= 54
    assert not kube.events(long_name, "Warning")


def test_kedas_ready_false_is_a_warning_on_the_deployment_and_its_end_a_normal_event(
    operator: Operator, keda: Any, kube: Kube
) -> None:
    # A TriggerAuthentication named before it exists (in the order a GitOps sync may apply them): KEDA cannot build
    # the trigger (no bearer token) and says Ready=False; the operator tells the Deployment, with KEDA's message,
    # and tells it again once KEDA scales it.
    name = "checkout.v2"
    auth = {"tcp-exporter/authentication-ref": "prometheus-creds", "tcp-exporter/auth-modes": "bearer"}
    kube.create(deployment(name, {"tcp-exporter/port": "web", **auth}))
    warned = wait_for(
        lambda: [e for e in kube.events(name, "Warning") if e.reason == "ScaledObjectNotReady"], 90, "the Warning"
    )
    assert "KEDA does not scale this Deployment" in warned[0].message and "bearer token" in warned[0].message
    kube.core.create_namespaced_secret(kube.ns, {"metadata": {"name": "prometheus-creds"}, "stringData": {"t": "x"}})
    kube.custom.create_namespaced_custom_object(
        "keda.sh", "v1alpha1", kube.ns, "triggerauthentications",
        {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "TriggerAuthentication",
            "metadata": {"name": "prometheus-creds"},
            "spec": {"secretTargetRef": [{"parameter": "bearerToken", "name": "prometheus-creds", "key": "t"}]},
        },
    )  # fmt: skip
    wait_for(
        lambda: [e for e in kube.events(name, "Normal") if e.reason == "ScaledObjectReady"], 120, "the Normal Event"
    )
