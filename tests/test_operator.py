"""The operator on the real local control plane, as its own ServiceAccount with the RBAC from manifests/."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from harness.helpers import wait_for
from harness.localkube.cluster import CRDS, install_crds, wait_established
from harness.operator_proc import KEDA, REPO, Audit, Kube, Operator, deployment, injected, operator_writes

pytestmark = pytest.mark.cluster


NAME = "checkout-api.v2"


def test_injection_is_one_patch_one_create_and_one_rollout(operator: Operator, kube: Kube, audit: Audit) -> None:
    mark = audit.mark()
    kube.create(deployment(NAME, {"tcp-exporter/port": "web", "tcp-exporter/threshold": "50"}))
    so = injected(kube, NAME)
    kube.converged(operator, NAME)
    assert operator_writes(audit, mark, kube.ns) == [
        ("create", "scaledobjects", NAME),
        ("patch", "deployments", NAME),
    ]
    sidecar = kube.containers(NAME)["tcp-exporter"]
    assert sidecar.args == [
        "--listen-address=:9100",
        "--watch-port=8080",
        "--method=sockdiag",
        "--on-unavailable=fallback",  # a method that cannot open must not crash-loop the app's pods
        f"--deployment={NAME}",
    ]
    assert sidecar.image == "example.test/tcp-exporter:test"
    assert sidecar.security_context.capabilities.drop == ["ALL"] and not sidecar.security_context.capabilities.add
    assert sidecar.security_context.run_as_non_root and sidecar.security_context.read_only_root_filesystem
    template = kube.get(NAME).spec.template.metadata.annotations
    assert template["prometheus.io/scrape"] == "true" and template["prometheus.io/port"] == "9100"
    status = json.loads(kube.get(NAME).metadata.annotations["tcp-exporter/status"])
    assert status["ports"] == [8080] and status["method"] == "sockdiag" and status["hash"]
    trigger = so["spec"]["triggers"][0]
    assert trigger["metadata"]["threshold"] == "50"
    assert f'namespace="{kube.ns}",tcp_exporter_deployment="{NAME}"' in trigger["metadata"]["query"]
    assert so["metadata"]["ownerReferences"][0]["name"] == NAME
    # One patch, so at most one rollout beyond the creation's (none, if the operator won the race to it).
    assert kube.rollouts(NAME) in (1, 2)
    reasons = {e.reason for e in kube.events(NAME, "Normal")}
    assert {"Injected", "ScaledObjectCreated"} <= reasons
    # kopf keeps nothing of its own on the user's Deployment.
    assert not [k for k in kube.get(NAME).metadata.annotations if "kopf" in k]


def test_unrelated_edits_resyncs_and_restarts_cost_no_write(operator: Operator, kube: Kube, audit: Audit) -> None:
    kube.create_injected(operator, deployment("calm", {"tcp-exporter/port": "8080"}))
    rollouts = kube.rollouts("calm")
    mark = audit.mark()
    kube.patch("calm", {"spec": {"replicas": 3}})
    kube.annotate("calm", unrelated="x")
    kube.converged(operator, "calm")
    operator.restart()
    kube.converged(operator, "calm")
    assert operator_writes(audit, mark, kube.ns) == []
    assert kube.rollouts("calm") == rollouts


def test_changing_the_threshold_updates_only_the_scaledobject(operator: Operator, kube: Kube, audit: Audit) -> None:
    kube.create_injected(operator, deployment("thr", {"tcp-exporter/port": "8080"}))
    rollouts = kube.rollouts("thr")
    mark = audit.mark()
    kube.annotate("thr", threshold="250", max_replicas="40")
    wait_for(lambda: (kube.scaled_object("thr") or {})["spec"]["maxReplicaCount"] == 40, 30, "the update")
    kube.converged(operator, "thr")
    assert operator_writes(audit, mark, kube.ns) == [("patch", "scaledobjects", "thr")]
    assert (kube.scaled_object("thr") or {})["spec"]["triggers"][0]["metadata"]["threshold"] == "250"
    assert kube.rollouts("thr") == rollouts


def test_changing_the_port_updates_the_sidecar_in_one_patch(operator: Operator, kube: Kube, audit: Audit) -> None:
    ports = [{"name": "a", "containerPort": 8080}, {"name": "b", "containerPort": 8443}]
    kube.create_injected(operator, deployment("prt", {"tcp-exporter/port": "8080"}, ports=ports))
    rollouts = kube.rollouts("prt")
    mark = audit.mark()
    kube.annotate("prt", port="a,b")
    wait_for(lambda: "--watch-port=8443" in kube.containers("prt")["tcp-exporter"].args, 30, "the new port")
    kube.converged(operator, "prt")
    assert operator_writes(audit, mark, kube.ns) == [("patch", "deployments", "prt")]
    assert kube.rollouts("prt") == rollouts + 1


def test_removing_the_annotation_removes_everything_and_adding_it_back_injects(
    operator: Operator, kube: Kube, audit: Audit
) -> None:
    kube.create_injected(operator, deployment("rm", {"tcp-exporter/port": "8080"}))
    mark = audit.mark()
    kube.annotate("rm", port=None)
    wait_for(lambda: "tcp-exporter" not in kube.containers("rm"), 30, "the sidecar to go")
    wait_for(lambda: kube.scaled_object("rm") is None, 30, "the ScaledObject to go")
    # Untracked from then on, the Deployment's later events do not reach the operator: wait on the writes.
    expected = [("delete", "scaledobjects", "rm"), ("patch", "deployments", "rm")]
    wait_for(lambda: operator_writes(audit, mark, kube.ns) == expected, 30, "the two writes of the removal")
    assert operator_writes(audit, mark, kube.ns) == expected
    dep = kube.get("rm")
    assert "tcp-exporter/status" not in (dep.metadata.annotations or {})
    assert not (dep.spec.template.metadata.annotations or {})
    kube.annotate("rm", port="8080")
    injected(kube, "rm")


@pytest.mark.parametrize(
    ("annotations", "expected"),
    [
        ({"tcp-exporter/port": "0"}, "not a port number"),
        ({"tcp-exporter/port": "70000"}, "not a port number"),
        ({"tcp-exporter/port": "grpc"}, "neither a port number nor a container port name"),
        ({"tcp-exporter/port": "8080", "tcp-exporter/min-replicas": "5", "tcp-exporter/max-replicas": "2"}, "is above"),
        ({"tcp-exporter/port": "8080", "tcp-exporter/max-replicas": "-1"}, "is not a whole number of at least 1"),
        ({"tcp-exporter/port": "8080", "tcp-exporter/threshold": "1.5"}, "not a whole number"),
        ({"tcp-exporter/port": "8080", "tcp-exporter/method": "magic"}, "is not one of"),
    ],
)
def test_a_wrong_annotation_is_a_warning_event_and_no_write(
    operator: Operator, kube: Kube, audit: Audit, annotations: dict[str, str], expected: str
) -> None:
    mark = audit.mark()
    kube.create(deployment("bad", annotations))
    warning = wait_for(lambda: kube.events("bad", "Warning"), 30, "a Warning Event")
    assert warning[0].reason == "InvalidAnnotation"
    assert expected in warning[0].message
    kube.converged(operator, "bad")
    assert operator_writes(audit, mark, kube.ns) == []
    assert "tcp-exporter" not in kube.containers("bad")
    # The same Warning is not posted again on each later event of the Deployment.
    kube.patch("bad", {"spec": {"replicas": 2}})
    kube.converged(operator, "bad")
    assert len(kube.events("bad", "Warning")) == 1


def test_a_container_named_tcp_exporter_that_is_not_ours_is_left_alone(
    operator: Operator, kube: Kube, audit: Audit
) -> None:
    mark = audit.mark()
    kube.create(
        deployment(
            "own", {"tcp-exporter/port": "8080"}, extra_containers=[{"name": "tcp-exporter", "image": "someone/else:1"}]
        )
    )
    warning = wait_for(lambda: kube.events("own", "Warning"), 30, "a Warning Event")
    assert warning[0].reason == "ContainerConflict"
    kube.converged(operator, "own")
    assert operator_writes(audit, mark, kube.ns) == []
    assert kube.containers("own")["tcp-exporter"].image == "someone/else:1"


def cpu_hpa(name: str, target: str) -> dict[str, Any]:
    """A user's HPA on a Deployment, as one is usually written."""
    return {
        "metadata": {"name": name},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
            "minReplicas": 1,
            "maxReplicas": 3,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}},
                }
            ],
        },
    }


def test_a_users_hpa_on_the_deployment_is_respected(operator: Operator, kube: Kube, audit: Audit) -> None:
    kube.autoscaling.create_namespaced_horizontal_pod_autoscaler(kube.ns, cpu_hpa("theirs", "hpa"))
    mark = audit.mark()
    kube.create(deployment("hpa", {"tcp-exporter/port": "8080"}))
    warning = wait_for(lambda: kube.events("hpa", "Warning"), 30, "a Warning Event")
    assert warning[0].reason == "AutoscalerConflict"
    assert "HorizontalPodAutoscaler/theirs" in warning[0].message
    kube.converged(operator, "hpa")
    assert operator_writes(audit, mark, kube.ns) == []
    # Inject-only is allowed next to the user's HPA.
    kube.annotate("hpa", scaledobject="false")
    wait_for(lambda: "tcp-exporter" in kube.containers("hpa"), 30, "the sidecar")
    assert kube.scaled_object("hpa") is None


def test_the_hpa_read_before_a_patch_holds_every_hpa_written_before_the_deployments_version(
    kube: Kube, api: Any
) -> None:
    """The operator reads a namespace's HPAs as of the Deployment's own resourceVersion (served from the API
    server's cache, not a read of etcd's latest): an HPA applied just before the Deployment is in that answer."""
    from tcp_exporter_operator.kube import Kube as OperatorKube

    kube.autoscaling.create_namespaced_horizontal_pod_autoscaler(kube.ns, cpu_hpa("applied-first", "web-api"))
    created = client.AppsV1Api(api).create_namespaced_deployment(kube.ns, deployment("web-api", {}))
    hpas = OperatorKube(lambda: api.configuration).list_hpas(kube.ns, created.metadata.resource_version)
    assert [(h["name"], h["target"]["name"], h["keda"]) for h in hpas] == [("applied-first", "web-api", False)]


def test_conntrack_gets_net_admin_only_where_pod_security_allows_it(operator: Operator, kube: Kube, api: Any) -> None:
    kube.create(deployment("ct", {"tcp-exporter/port": "8080", "tcp-exporter/method": "conntrack"}))
    wait_for(lambda: "tcp-exporter" in kube.containers("ct"), 30, "the sidecar")
    security = kube.containers("ct")["tcp-exporter"].security_context
    # NET_ADMIN for the method; SETGID and SETUID only to become UID 65532 at the start (then given up).
    assert security.capabilities.add == ["NET_ADMIN", "SETGID", "SETUID"] and security.capabilities.drop == ["ALL"]
    assert security.run_as_user == 0 and not security.allow_privilege_escalation

    client.CoreV1Api(api).patch_namespace(
        kube.ns, {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "baseline"}}}
    )
    kube.create(deployment("ct2", {"tcp-exporter/port": "8080", "tcp-exporter/method": "conntrack"}))
    wait_for(lambda: "tcp-exporter" in kube.containers("ct2"), 30, "the sidecar")
    sidecar = kube.containers("ct2")["tcp-exporter"]
    assert "--method=sockdiag" in sidecar.args
    assert not sidecar.security_context.capabilities.add
    warning = wait_for(lambda: kube.events("ct2", "Warning"), 30, "a Warning Event")
    assert warning[0].reason == "MethodDowngraded"


def test_deleting_the_deployment_deletes_its_scaledobject(operator: Operator, kube: Kube) -> None:
    kube.create(deployment("gone", {"tcp-exporter/port": "8080"}))
    injected(kube, "gone")
    kube.apps.delete_namespaced_deployment("gone", kube.ns)
    wait_for(lambda: kube.scaled_object("gone") is None, 60, "the garbage collector to delete the ScaledObject")


def test_auto_injects_a_native_sidecar_on_1_37_and_a_mode_change_moves_it_in_one_rollout_each_way(
    operator: Operator, kube: Kube, cluster: Any, kubectl: Callable[..., str]
) -> None:
    name = "ws-gateway.eu-1"
    body = deployment(name, {"tcp-exporter/port": "8080"})
    body["spec"]["template"]["spec"]["initContainers"] = [
        {"name": "migrate", "image": "example.test/migrate:1", "command": ["/migrate"]}
    ]
    kube.create(body)
    injected(kube, name)
    kube.converged(operator, name)

    def where() -> tuple[list[tuple[str, str | None]], list[str]]:
        spec = kube.get(name).spec.template.spec
        return [(c.name, c.restart_policy) for c in spec.init_containers or []], [c.name for c in spec.containers]

    # auto, against this API server (1.37): a native sidecar, last of the init containers, the user's kept first.
    assert where() == ([("migrate", None), ("tcp-exporter", "Always")], ["app"])
    status = json.loads(kube.get(name).metadata.annotations["tcp-exporter/status"])
    assert status["mode"] == "native"
    rollouts = kube.rollouts(name)

    def revision() -> int:
        return int(kube.get(name).metadata.annotations["deployment.kubernetes.io/revision"])

    first = revision()
    operator.stop()
    regular = Operator(cluster, kubectl, env={"TCP_EXPORTER_OPERATOR_SIDECAR_MODE": "container"})
    try:
        wait_for(lambda: where() == ([("migrate", None)], ["app", "tcp-exporter"]), 30, "the sidecar moved")
        assert "mode" not in json.loads(kube.get(name).metadata.annotations["tcp-exporter/status"])
        kube.converged(regular, name)
        assert kube.rollouts(name) == rollouts + 1 and revision() == first + 1
    finally:
        regular.close()
        operator.start()
    wait_for(lambda: where() == ([("migrate", None), ("tcp-exporter", "Always")], ["app"]), 30, "moved back")
    kube.converged(operator, name)
    # Back to the very template of before: its ReplicaSet is rolled back to, no third one; one revision more.
    assert kube.rollouts(name) == rollouts + 1 and revision() == first + 2


def test_a_scaledobject_deleted_or_a_sidecar_removed_by_hand_is_restored(operator: Operator, kube: Kube) -> None:
    kube.create(deployment("heal", {"tcp-exporter/port": "8080"}))
    injected(kube, "heal")
    kube.custom.delete_namespaced_custom_object(*KEDA, kube.ns, "scaledobjects", "heal")
    wait_for(lambda: kube.scaled_object("heal"), 30, "the ScaledObject to come back")
    dep = kube.get("heal")
    index = [c.name for c in dep.spec.template.spec.init_containers].index("tcp-exporter")  # a native sidecar
    kube.apps.patch_namespaced_deployment(
        "heal", kube.ns, [{"op": "remove", "path": f"/spec/template/spec/initContainers/{index}"}]
    )
    wait_for(lambda: "tcp-exporter" in kube.containers("heal"), 30, "the sidecar to come back")


def test_scaledobjects_appear_when_keda_is_installed_after_the_operator(
    operator: Operator, kube: Kube, kubectl: Callable[..., str], cluster: Any
) -> None:
    # A ScaledObject an earlier test left under KEDA's finalizer, its KEDA stopped since, would hold the CRD's
    # deletion (and every later test of this cluster) forever: that finalizer has nobody to remove it here.
    for so in json.loads(kubectl("get", "scaledobjects", "-A", "-o", "json"))["items"]:
        if so["metadata"].get("finalizers"):
            meta = so["metadata"]
            patch = '{"metadata": {"finalizers": null}}'
            kubectl("-n", meta["namespace"], "patch", "scaledobject", meta["name"], "--type=merge", "-p", patch)
    kubectl("delete", "crd", "scaledobjects.keda.sh", "--wait=true", "--timeout=60s")
    try:
        kube.create(deployment("late", {"tcp-exporter/port": "8080"}))
        wait_for(lambda: "tcp-exporter" in kube.containers("late"), 30, "the sidecar, without KEDA")
        wait_for(
            lambda: "KedaMissing" in {e.reason for e in kube.events("late", "Warning")}, 30, "the KedaMissing Warning"
        )
    finally:
        install_crds(cluster)
    wait_for(lambda: kube.scaled_object("late"), 60, "the ScaledObject once KEDA is there")


def test_the_operator_keeps_working_through_an_apiserver_restart(operator: Operator, kube: Kube, cluster: Any) -> None:
    cluster.restart_apiserver()
    kube.create(deployment("after", {"tcp-exporter/port": "8080"}))
    injected(kube, "after")


def test_concurrent_edits_converge_to_the_last_annotation(operator: Operator, kube: Kube) -> None:
    kube.create(deployment("busy", {"tcp-exporter/port": "8080"}))
    for i in range(10):  # edits racing the operator's own patches: 409s must be retried, not lost
        kube.annotate("busy", threshold=str(100 + i))
        kube.patch("busy", {"spec": {"replicas": 1 + i % 3}})
    wait_for(
        lambda: (
            (
                (kube.scaled_object("busy") or {})
                .get("spec", {})
                .get("triggers", [{}])[0]
                .get("metadata", {})
                .get("threshold")
            )
            == "109"
        ),
        60,
        "the last threshold",
    )
    assert "tcp-exporter" in kube.containers("busy")


def test_a_foreign_scaledobject_of_the_same_name_gets_a_warning_no_false_event_and_is_left_alone(
    operator: Operator, kube: Kube
) -> None:
    foreign = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "orders-api", "namespace": kube.ns},
        "spec": {
            "scaleTargetRef": {"name": "something-else"},
            "triggers": [{"type": "cpu", "metadata": {"value": "50"}}],
        },
    }
    kube.custom.create_namespaced_custom_object(*KEDA, kube.ns, "scaledobjects", foreign)
    kube.create(deployment("orders-api", {"tcp-exporter/port": "8080"}))
    wait_for(lambda: "tcp-exporter" in kube.containers("orders-api"), 30, "the sidecar")
    warning = wait_for(
        lambda: [e for e in kube.events("orders-api", "Warning") if e.reason == "ScaledObjectConflict"],
        30,
        "the ScaledObjectConflict Warning",
    )
    assert "orders-api" in warning[0].message
    assert "ScaledObjectCreated" not in {e.reason for e in kube.events("orders-api", "Normal")}
    so = kube.scaled_object("orders-api") or {}
    assert so["spec"]["scaleTargetRef"]["name"] == "something-else" and "ownerReferences" not in so["metadata"]


def test_the_operators_metrics_count_writes_by_kind_and_result_and_time_events_to_writes(
    operator: Operator, kube: Kube
) -> None:
    def sample(name: str, **labels: str) -> float:
        return operator.metric(f"tcp_exporter_operator_{name}", **labels)

    patches = sample("writes_total", kind="Deployment", verb="patch", result="ok")
    creates = sample("writes_total", kind="ScaledObject", verb="create", result="ok")
    conflicts = sample("writes_total", kind="ScaledObject", verb="create", result="conflict")
    wrote = sample("reconciles_total", result="wrote")
    timed = sample("event_to_write_seconds_count")
    kube.create_injected(operator, deployment("metered-api", {"tcp-exporter/port": "8080"}))
    assert sample("writes_total", kind="Deployment", verb="patch", result="ok") == patches + 1
    assert sample("writes_total", kind="ScaledObject", verb="create", result="ok") == creates + 1
    assert sample("reconciles_total", result="wrote") >= wrote + 1
    assert sample("event_to_write_seconds_count") >= timed + 1
    assert sample("tracked_deployments") >= 1
    kube.custom.create_namespaced_custom_object(
        *KEDA,
        kube.ns,
        "scaledobjects",
        {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "ScaledObject",
            "metadata": {"name": "taken-api", "namespace": kube.ns},
            "spec": {"scaleTargetRef": {"name": "else"}, "triggers": [{"type": "cpu", "metadata": {"value": "5"}}]},
        },
    )
    kube.create(deployment("taken-api", {"tcp-exporter/port": "8080"}))
    wait_for(
        lambda: sample("writes_total", kind="ScaledObject", verb="create", result="conflict") > conflicts,
        30,
        "the refused create to be counted",
    )


def test_what_render_prints_applied_as_gitops_would_is_in_sync_adopted_and_costs_no_write(
    operator: Operator, kube: Kube, audit: Audit
) -> None:
    import subprocess

    import yaml

    from harness.operator_proc import OPERATOR

    body = deployment("gitops-web-api", {"tcp-exporter/port": "8080"})
    body["metadata"]["namespace"] = kube.ns
    rendered = subprocess.run(
        [OPERATOR, "render", "-f", "-"], input=yaml.safe_dump(body), capture_output=True, text=True, env=operator.env
    )
    assert rendered.returncode == 0, rendered.stderr
    injected_body, scaled = yaml.safe_load_all(rendered.stdout)
    assert "ownerReferences" not in scaled["metadata"]
    mark = audit.mark()
    kube.custom.create_namespaced_custom_object(*KEDA, kube.ns, "scaledobjects", scaled)
    kube.create(injected_body)
    kube.converged(operator, "gitops-web-api")
    # The Deployment's event can reach the operator before the ScaledObject's: then its create is refused
    # (already exists; nothing written) and it adopts the one from Git. Anything else would be a write.
    race = ("create", "scaledobjects", "gitops-web-api")
    assert [w for w in operator_writes(audit, mark, kube.ns) if w != race] == []
    assert kube.events("gitops-web-api", "Warning") == []
    assert "ScaledObjectCreated" not in {e.reason for e in kube.events("gitops-web-api", "Normal")}


def test_the_podmonitor_is_created_when_its_crd_appears_relabelled_restored_and_deleted_with_the_annotation(
    operator: Operator, kube: Kube, kubectl: Callable[..., str], cluster: Any
) -> None:
    def pod_monitor() -> Any:
        try:
            return kube.custom.get_namespaced_custom_object(
                "monitoring.coreos.com", "v1", kube.ns, "podmonitors", "pm-api-tcp-exporter"
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    kube.create(deployment("pm-api", {"tcp-exporter/port": "8080"}))
    injected(kube, "pm-api")
    assert pod_monitor() is None
    kubectl("apply", "-f", str(CRDS / "podmonitor.yaml"))
    try:
        wait_established(cluster, "podmonitors.monitoring.coreos.com", 30)
        found = wait_for(pod_monitor, 60, "the PodMonitor, once its CRD exists")
        assert found["spec"]["selector"]["matchLabels"] == {"app": "pm-api"}
        assert found["spec"]["podMetricsEndpoints"] == [{"port": "tcp-metrics", "path": "/metrics"}]
        assert found["metadata"]["ownerReferences"][0]["name"] == "pm-api"
        # kube-prometheus-stack selects PodMonitors by its release label.
        kube.annotate("pm-api", pod_monitor_labels="release=kube-prometheus-stack")
        wait_for(
            lambda: (
                (pod_monitor() or {}).get("metadata", {}).get("labels", {}).get("release") == "kube-prometheus-stack"
            ),
            30,
            "the PodMonitor's release label",
        )
        kube.custom.delete_namespaced_custom_object(
            "monitoring.coreos.com", "v1", kube.ns, "podmonitors", "pm-api-tcp-exporter"
        )
        wait_for(pod_monitor, 30, "the PodMonitor deleted by hand to be restored")
        kube.annotate("pm-api", port=None)
        wait_for(lambda: pod_monitor() is None, 30, "the PodMonitor to go with the annotation")
        wait_for(lambda: kube.scaled_object("pm-api") is None, 30, "the ScaledObject to go with the annotation")
    finally:
        kubectl("delete", "crd", "podmonitors.monitoring.coreos.com", "--wait=true")


def test_a_namespaced_operator_leaves_other_namespaces_alone(
    cluster: Any, kubectl: Callable[..., str], api: Any, namespace: str, operator: Operator
) -> None:
    operator.stop()
    try:
        watched = Kube(api, namespace)
        client.CoreV1Api(api).create_namespace({"metadata": {"name": f"{namespace}-other"}})
        other = Kube(api, f"{namespace}-other")
        scoped = Operator(cluster, kubectl, args=[f"--namespace={namespace}"])
        try:
            other.create(deployment("ignored", {"tcp-exporter/port": "8080"}))
            watched.create(deployment("seen", {"tcp-exporter/port": "8080"}))
            injected(watched, "seen")
            assert "tcp-exporter" not in other.containers("ignored")
            assert not scoped.reconciled(other.ns, "ignored", str(other.get("ignored").metadata.resource_version))
        finally:
            scoped.close()
            client.CoreV1Api(api).delete_namespace(f"{namespace}-other")
    finally:
        operator.start()


def test_a_scaledobject_edited_by_hand_is_put_back_in_one_write_and_status_updates_cost_none(
    operator: Operator, kube: Kube, audit: Audit
) -> None:
    kube.create_injected(operator, deployment("edit", {"tcp-exporter/port": "8080"}))
    mark = audit.mark()
    kube.custom.patch_namespaced_custom_object_status(
        *KEDA, kube.ns, "scaledobjects", "edit", {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    )
    kube.custom.patch_namespaced_custom_object(
        *KEDA, kube.ns, "scaledobjects", "edit", {"spec": {"maxReplicaCount": 99}}
    )
    wait_for(lambda: (kube.scaled_object("edit") or {})["spec"]["maxReplicaCount"] == 10, 30, "the edit to be undone")
    assert operator_writes(audit, mark, kube.ns) == [("patch", "scaledobjects", "edit")]


def test_with_peering_two_replicas_run_and_only_the_higher_priority_one_writes(
    cluster: Any, kubectl: Callable[..., str], kube: Kube, audit: Audit, operator: Operator
) -> None:
    for name in ("crd.yaml", "role.yaml"):
        kubectl("apply", "-f", str(REPO / "manifests" / "peering" / name))
    wait_established(cluster, "clusterkopfpeerings.kopf.dev", 30)
    operator.stop()
    replicas = [Operator(cluster, kubectl, args=["--peering=tcp-exporter", f"--priority={p}"]) for p in (10, 20)]
    try:
        standby, active = replicas
        wait_for(lambda: "Pausing operations" in standby.log(), 60, "the lower-priority replica to pause")
        mark = audit.mark()
        kube.create_injected(active, deployment("ha", {"tcp-exporter/port": "8080"}))
        assert operator_writes(audit, mark, kube.ns) == [
            ("create", "scaledobjects", "ha"),
            ("patch", "deployments", "ha"),
        ], f"standby's log:\n{standby.log()[-3000:]}"
        assert f"reconciled {kube.ns}/ha" not in standby.log()
    finally:
        for replica in replicas:
            replica.close()
        operator.start()


def ready_pods(kube: Kube, name: str) -> int:
    """Write Running and Ready on the Deployment's pods, as a kubelet would once they run; return how many."""
    pods = kube.core.list_namespaced_pod(kube.ns, label_selector=f"app={name}").items
    for pod in pods:
        if pod.metadata.deletion_timestamp is None and not (pod.status and pod.status.phase == "Running"):
            condition = {"type": "Ready", "status": "True"}
            try:
                kube.core.patch_namespaced_pod_status(
                    pod.metadata.name, kube.ns, {"status": {"phase": "Running", "conditions": [condition]}}
                )
            except ApiException as exc:  # deleted since the list (a rollout removing it): a kubelet moves on
                if exc.status != 404:
                    raise
    return len(pods)


def test_a_new_sidecar_image_rolls_one_deployment_at_a_time_and_the_users_change_is_not_held(
    operator: Operator, kube: Kube, cluster: Any, kubectl: Callable[..., str]
) -> None:
    names = ["up-a", "up-b", "up-c"]
    for name in names:
        kube.create_injected(operator, deployment(name, {"tcp-exporter/port": "8080"}))

    def images() -> dict[str, str]:
        return {n: kube.containers(n)["tcp-exporter"].image for n in names}

    operator.stop()
    upgraded = Operator(
        cluster,
        kubectl,
        env={
            "TCP_EXPORTER_OPERATOR_SIDECAR_IMAGE": "example.test/tcp-exporter:next",
            "TCP_EXPORTER_OPERATOR_MAX_CONCURRENT_ROLLOUTS": "1",
        },
        # Only this test's Deployments: other tests leave some whose rollouts never complete (no kubelet), and
        # each would hold the one slot until its progress deadline, 600 s.
        args=[f"--namespace={kube.ns}"],
    )

    def cpu_limit(name: str) -> str:
        return str(kube.containers(name)["tcp-exporter"].resources.limits["cpu"])

    def rolled_out(name: str) -> bool:
        ready_pods(kube, name)
        status = kube.get(name).status
        return bool(status.updated_replicas == status.available_replicas == status.replicas == 1)

    def queued(waiting: list[str]) -> bool:
        return all(f"upgrade of {kube.ns}/{n} waits" in upgraded.log() for n in waiting)

    def next_rolling(done: list[str]) -> list[str] | None:
        return [n for n, image in images().items() if image.endswith(":next") and n not in done] or None

    try:
        done: list[str] = []
        while len(done) < len(names):
            new = wait_for(lambda d=done: next_rolling(d), 60, "the next Deployment to roll")
            assert len(new) == 1, f"more than one upgrade rollout at once: {new}"
            rolling, waiting = new[0], [n for n in names if n not in done and n != new[0]]
            if waiting:
                wait_for(lambda w=waiting: queued(w), 30, "the others to queue")
                assert all(images()[n].endswith(":test") for n in waiting)
            if not done:
                # While the slot is taken, the user's own change goes through at once (with the new image).
                kube.annotate(waiting[0], cpu_limit="300m")
                wait_for(lambda n=waiting[0]: cpu_limit(n) == "300m", 30, "the user's change")
                done.append(waiting[0])
            wait_for(lambda r=rolling: rolled_out(r), 60, f"{rolling}'s rollout to complete")
            done.append(rolling)
        assert all(image.endswith(":next") for image in images().values())
        reasons = [e.reason for n in names for e in kube.events(n, "Normal")]
        assert reasons.count("Upgraded") >= 2
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nthe upgraded operator's log:\n{upgraded.log()[-6000:]}") from None
    finally:
        upgraded.close()
        operator.start()
