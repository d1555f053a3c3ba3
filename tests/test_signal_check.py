"""After injection the operator checks that the Deployment's Prometheus has its connection series, on real parts:
pods run as a kubelet would (the real sidecar in a network namespace each), real Prometheus servers, the real
deployment controller reporting the pods Ready."""

from __future__ import annotations

import os
from typing import Any

import pytest
from conftest import need

from harness.helpers import wait_for
from harness.netns import lan
from harness.operator_proc import Kube, Operator, deployment, injected
from harness.podsim import Kubelet
from harness.promstack import Prometheus, documented_jobs

pytestmark = [pytest.mark.cluster, pytest.mark.netns, pytest.mark.prometheus]


def test_a_deployment_whose_prometheus_never_sees_its_pods_gets_a_warning_with_the_likely_cause(
    operator: Operator, kube: Kube, cluster: Any, api: Any, kubectl: Any
) -> None:
    need(os.geteuid() == 0, "network namespaces need root")
    # `blind` discovers nothing: a Prometheus that does not select the PodMonitor (kube-prometheus-stack's default
    # without the release label) or has no job on the annotations. `seeing` has the README's job.
    operator.stop()
    with lan(2, host=True) as net:
        kubelet = Kubelet(api, kube.ns, net)
        blind = Prometheus([])
        seeing = Prometheus(documented_jobs(("tcp-exporter",), cluster.kubeconfig, kube.ns))
        fast = Operator(
            cluster,
            kubectl,
            env={
                "TCP_EXPORTER_OPERATOR_SIGNAL_CHECK_AFTER": "3",
                "TCP_EXPORTER_OPERATOR_ALLOWED_PROMETHEUS": f"{blind.url},{seeing.url}",
            },
        )
        try:
            for name, prom in (("web-api", blind), ("checkout.v2", seeing)):
                body = deployment(name, {"tcp-exporter/port": "web", "tcp-exporter/prometheus": prom.url})
                body["spec"]["replicas"] = 0  # scaled up once injected: the pod then carries the sidecar
                kube.create(body)
                injected(kube, name)
                kube.patch(name, {"spec": {"replicas": 1}})
                (pod,) = kubelet.pods_of(name, 1)
                kubelet.connect(kubelet.run(pod), 3)
            warned = wait_for(
                lambda: kube.events("web-api", "Warning"), 90, "a Warning on the one its Prometheus does not see"
            )
            assert [e.reason for e in warned] == ["NoConnectionMetrics"]
            assert blind.url in warned[0].message and "PodMonitor" in warned[0].message
            wait_for(
                lambda: fast.metric("tcp_exporter_operator_signal_checks_total", result="found") >= 1,
                90,
                "the other one's series found",
            )
            assert not kube.events("checkout.v2", "Warning")
        finally:
            fast.close()
            blind.stop()
            seeing.stop()
            kubelet.close()
            operator.start()
