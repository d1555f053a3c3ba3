"""Connection-aware scale-in on real parts: pods run as a kubelet would (the real sidecar in a network namespace
each), a real Prometheus discovering them, the operator setting each pod's deletion cost from it, and the real
ReplicaSet controller choosing which pods go when the Deployment is scaled in through its scale subresource.

The admission policy that confines the operator's pod writes to that one annotation runs in the real API server.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import need
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from harness.helpers import wait_for
from harness.netns import lan
from harness.operator_proc import NAMESPACE, SERVICE_ACCOUNT, Audit, Kube, Operator, deployment, injected
from harness.podsim import Kubelet
from harness.promstack import Prometheus, documented_jobs

pytestmark = [pytest.mark.cluster]

COST = "controller.kubernetes.io/pod-deletion-cost"
NAME = "ws-gateway.eu-1"
COUNTS = [12, 3, 41, 27, 8, 19]  # per pod, in creation order: 110 in all, so KEDA's formula wants 2 of 6


def costs(kube: Kube, selector: str) -> dict[str, str | None]:
    pods = kube.core.list_namespaced_pod(kube.ns, label_selector=selector).items
    live = [p for p in pods if not p.metadata.deletion_timestamp]
    return {p.metadata.name: (p.metadata.annotations or {}).get(COST) for p in live}


def when(value: Any, ok: bool) -> Any:
    return value if ok else None


@pytest.mark.netns
@pytest.mark.prometheus
def test_scaled_in_from_6_to_3_the_replicaset_removes_the_3_least_connected_pods(
    operator: Operator, kube: Kube, cluster: Any, api: Any, kubectl: Callable[..., str], audit: Audit
) -> None:
    need(os.geteuid() == 0, "network namespaces need root")
    operator.stop()
    fast: Operator | None = None
    try:
        with lan(len(COUNTS) + 1, host=True) as net:
            kubelet = Kubelet(api, kube.ns, net)
            prom = Prometheus(documented_jobs(("tcp-exporter",), cluster.kubeconfig, kube.ns))
            try:
                # The operator reads the counts from this Prometheus itself: it must be an address the admin allows.
                env = {
                    "TCP_EXPORTER_OPERATOR_DELETION_COST_PERIOD": "1",
                    "TCP_EXPORTER_OPERATOR_ALLOWED_PROMETHEUS": prom.url,
                }
                fast = Operator(cluster, kubectl, env=env)
                annotations = {
                    "tcp-exporter/port": "web",
                    "tcp-exporter/prometheus": prom.url,
                    "tcp-exporter/scale-in-by-connections": "true",
                }
                body = deployment(NAME, annotations)
                body["spec"]["replicas"] = len(COUNTS)
                kube.create(body)
                other = deployment("ws-opted-out", {"tcp-exporter/port": "web", "tcp-exporter/prometheus": prom.url})
                kube.create(other)
                injected(kube, NAME)
                injected(kube, "ws-opted-out")
                mark = audit.mark()
                running = wait_for(
                    lambda: when(pods := kubelet.sync(NAME), len(pods) == len(COUNTS)), 60, "6 pods to run"
                )
                (lone,) = wait_for(lambda: kubelet.sync("ws-opted-out") or None, 60, "the opted-out pod to run")
                kubelet.connect(lone, 30)
                for pod, count in zip(running, COUNTS, strict=True):
                    kubelet.connect(pod, count)
                want = {pod.name: str(count) for pod, count in zip(running, COUNTS, strict=True)}
                try:
                    wait_for(
                        lambda: costs(kube, f"app={NAME}") == want, 60, "each pod's deletion cost = its connections"
                    )
                except AssertionError as exc:
                    raise AssertionError(
                        f"{exc}\n{costs(kube, f'app={NAME}')} != {want}\n{fast.log()[-4000:]}"
                    ) from None
                # Checked before the first write: the admission policy installed with the grant is in force.
                assert fast.metric("tcp_exporter_operator_pod_patches_confined") == 1

                kube.apps.patch_namespaced_deployment_scale(NAME, kube.ns, {"spec": {"replicas": 3}})
                left = wait_for(lambda: when(c := costs(kube, f"app={NAME}"), len(c) == 3), 60, "3 pods to be left")
                by_count = sorted(want, key=lambda name: int(want[name]))
                assert set(left) == set(by_count[3:]), "the most-connected pods are the ones kept"
                dropped = sum(int(want[name]) for name in by_count[:3])
                print(f"\ndropped {dropped} connections; optimum {sum(sorted(COUNTS)[:3])}")

                pod_writes = [w for w in audit.writes(mark) if w[1] == "pods"]
                assert pod_writes and all(w[3] in want for w in pod_writes), "only the opted-in pods are written"
                assert (costs(kube, "app=ws-opted-out").popitem()[1]) is None
            finally:
                prom.stop()
                kubelet.close()
    finally:
        if fast is not None:
            fast.close()
        operator.start()


def test_the_admission_policy_lets_the_operator_change_only_a_pods_deletion_cost(
    kube: Kube, cluster: Any, kubectl: Callable[..., str], operator: Operator
) -> None:
    """The operator's account may patch pods (RBAC), but the API server refuses anything but the annotation."""
    kube.core.create_namespaced_pod(
        kube.ns,
        {
            "metadata": {"name": "app-0", "labels": {"app": "x"}, "annotations": {"team": "web"}},
            "spec": {"containers": [{"name": "app", "image": "example.test/app:1"}]},
        },
    )
    token = kubectl("-n", NAMESPACE, "create", "token", SERVICE_ACCOUNT, "--duration=1h").strip()
    configuration = client.Configuration()
    configuration.host = cluster.server
    configuration.ssl_ca_cert = str(Path(cluster.state_dir) / "pki" / "ca.crt")
    configuration.api_key = {"authorization": f"Bearer {token}"}
    core = client.CoreV1Api(client.ApiClient(configuration))

    def patch(body: Any, content_type: str = "application/merge-patch+json") -> int:
        try:
            core.patch_namespaced_pod("app-0", kube.ns, body, _content_type=content_type)
            return 200
        except ApiException as exc:
            assert exc.status == 403 or "pod-deletion-cost-only" in str(exc.body), exc.body
            return int(exc.status or 0)

    def policy_active() -> bool:
        # The API server loads a new policy within a moment: until then, a probe that got through is undone.
        if patch({"metadata": {"labels": {"probe": "1"}}}) != 200:
            return True
        kube.core.patch_namespaced_pod("app-0", kube.ns, {"metadata": {"labels": {"probe": None}}})
        return False

    wait_for(policy_active, 30, "the admission policy to be in force")
    assert patch({"metadata": {"annotations": {COST: "42"}}}) == 200
    assert patch({"metadata": {"annotations": {COST: None}}}) == 200
    # The one spec field a pod update may change, so that nothing but the policy stands in the way.
    image = [{"op": "replace", "path": "/spec/containers/0/image", "value": "example.test/evil:1"}]
    assert patch(image, "application/json-patch+json") != 200, "the operator's account could change an image"
    refused = [
        {"metadata": {"labels": {"app": "y"}}},
        {"metadata": {"annotations": {"team": "evil"}}},
        {"metadata": {"annotations": {"team": None}}},
        {"metadata": {"annotations": {"new": "1", COST: "1"}}},
        {"metadata": {"finalizers": ["example.test/hold"]}},
    ]
    for body in refused:
        assert patch(body) != 200, f"the operator's account could patch {json.dumps(body)}"
    pod = kube.core.read_namespaced_pod("app-0", kube.ns)
    assert pod.spec.containers[0].image == "example.test/app:1"
    assert pod.metadata.labels == {"app": "x"} and pod.metadata.annotations == {"team": "web"}
    # Nor may the account do anything else with pods (RBAC): not even read one.
    with pytest.raises(ApiException) as denied:
        core.read_namespaced_pod("app-0", kube.ns)
    assert denied.value.status == 403
