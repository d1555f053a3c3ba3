"""Unit tests of what every workload kind shares (workloads.py) and of `status`'s reading of Events: pure functions,
no cluster."""

from __future__ import annotations

from typing import Any

from tcp_exporter_operator.config import Config
from tcp_exporter_operator.plan import Facts, plan
from tcp_exporter_operator.rollouts import paced
from tcp_exporter_operator.status import holding_warning
from tcp_exporter_operator.webhook import mutation
from tcp_exporter_operator.workloads import observed_generation, restart_command, with_template


def referenced_rollout(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Rollout",
        "metadata": {"name": "lobby", "namespace": "games", "uid": "r1", "annotations": {"tcp-exporter/port": "web"}},
        "spec": {"workloadRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "lobby-template"}, **spec},
    }


def template(host_network: bool = False) -> dict[str, Any]:
    app = {"name": "app", "image": "example.test/app:1", "ports": [{"name": "web", "containerPort": 8080}]}
    return {
        "spec": {
            "selector": {"matchLabels": {"app": "lobby"}},
            "template": {
                "metadata": {"labels": {"app": "lobby"}},
                "spec": {"containers": [app], "hostNetwork": host_network},
            },
        }
    }


def test_a_workloadref_rollout_is_planned_on_its_deployments_template_and_selector() -> None:
    made = with_template(referenced_rollout(), template())
    assert made["spec"]["template"]["spec"]["containers"][0]["name"] == "app"
    assert made["spec"]["selector"] == {"matchLabels": {"app": "lobby"}}
    assert made["spec"]["workloadRef"]["name"] == "lobby-template"  # still that form: the patch mode refuses it
    webhook = plan(made, Facts(pod_monitor_crd=True), Config(injection="webhook", discovery=("podmonitor",)))
    monitor = next(c.body for c in webhook.children if c.kind == "PodMonitor")
    assert monitor["spec"]["selector"] == {"matchLabels": {"app": "lobby"}}  # the named port "web" resolved too
    # Its Deployment unreadable: no PodMonitor rather than one selecting every pod of the namespace.
    unread = referenced_rollout()
    unread["metadata"]["annotations"]["tcp-exporter/port"] = "8080"
    both = Config(injection="webhook", discovery=("podmonitor", "port-name"))
    alone = plan(unread, Facts(pod_monitor_crd=True), both)
    assert [c.kind for c in alone.children] == ["ScaledObject"], alone.events  # planned, without a PodMonitor
    assert with_template({"kind": "Deployment", "metadata": {}, "spec": {}}, template())["spec"] == {}  # not a Rollout


def test_the_webhook_checks_a_workloadref_rollouts_pod_itself_so_a_host_network_pod_is_left_alone() -> None:
    cfg = Config(injection="webhook", workload_kinds=("Deployment", "Rollout"))
    pod = {
        "metadata": {
            "namespace": "games",
            "labels": {"app": "lobby", "rollouts-pod-template-hash": "6d9f"},
            "ownerReferences": [
                {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "lobby-6d9f", "controller": True}
            ],
        },
        "spec": template(host_network=True)["spec"]["template"]["spec"],
    }
    decided = mutation(pod, "games", lambda ns, p: referenced_rollout(), lambda ns: None, cfg, "tcp-exporter")
    assert decided.patch is None and "invalid" in decided.reason
    pod["spec"]["hostNetwork"] = False
    assert mutation(pod, "games", lambda ns, p: referenced_rollout(), lambda ns: None, cfg, "tcp-exporter").patch


def test_a_rollouts_observed_generation_is_a_string_and_rollouts_are_never_paced() -> None:
    assert observed_generation({"observedGeneration": "7"}) == 7 and observed_generation({"observedGeneration": 7}) == 7
    for odd in ("5d8f7c9b4", "\uff17", True, None, 1.5):  # a hash; a fullwidth 7, which isdigit() takes
        assert observed_generation({"observedGeneration": odd}) is None
    assert not paced({"kind": "Rollout", "spec": {}}) and paced({"kind": "Deployment", "spec": {}})
    assert restart_command("Rollout", "games", "lobby") == "kubectl argo rollouts -n games restart lobby"
    assert restart_command("StatefulSet", "games", "nats") == "kubectl -n games rollout restart statefulset/nats"


def event(kind: str, reason: str, second: int, version: int) -> dict[str, Any]:
    return {
        "type": kind,
        "reason": reason,
        "message": reason.lower(),
        "lastTimestamp": f"2026-12-03T14:00:{second:02d}Z",
        "metadata": {"resourceVersion": str(version)},
        "source": {"component": "tcp-exporter-operator"},
    }


def test_status_counts_a_warning_until_a_normal_event_says_what_it_asked_for_was_done() -> None:
    # Posted in one plan: the Warning first, then the injection's Normal Event, which does not clear it.
    assert holding_warning([event("Warning", "UnknownAnnotation", 1, 10), event("Normal", "Injected", 1, 11)]) == (
        "UnknownAnnotation: unknownannotation"
    )
    fixed = [event("Warning", "InvalidAnnotation", 1, 10), event("Normal", "Injected", 5, 20)]
    assert holding_warning(fixed) is None
    again = [*fixed, event("Warning", "InvalidAnnotation", 9, 30)]
    assert holding_warning(again) == "InvalidAnnotation: invalidannotation"
    # Within one second, the Events' versions order them; KEDA's Warnings are read from KEDA's conditions instead.
    assert holding_warning([event("Normal", "Injected", 3, 12), event("Warning", "WriteRefused", 3, 11)]) is None
    assert holding_warning([event("Warning", "ScaledObjectFallback", 1, 10)]) is None
    foreign = {**event("Warning", "FailedCreate", 1, 10), "source": {"component": "replicaset-controller"}}
    assert holding_warning([foreign]) is None


def test_status_reads_a_webhook_injection_from_the_pods_and_says_how_many_lack_the_sidecar() -> None:
    from tcp_exporter_operator.status import InPods, row

    workload = {"kind": "Deployment", "metadata": {"name": "web-api", "namespace": "shop", "annotations": {}}}
    workload["metadata"]["annotations"]["tcp-exporter/port"] = "8080"
    so = {"metadata": {"name": "web-api"}, "spec": {"minReplicaCount": 1, "maxReplicaCount": 10}}
    shown = row(workload, so, None, pods=InPods(3, 2, "0.2.0", "sockdiag", "native"))
    assert (shown["injectedBy"], shown["version"], shown["method"], shown["sidecar"]) == (
        "webhook", "0.2.0", "sockdiag", "native"
    )  # fmt: skip
    assert shown["problems"] == ["1 of 3 pods without the sidecar"]
    assert row(workload, so, None, pods=InPods(2, 0))["problems"] == ["not injected"]
