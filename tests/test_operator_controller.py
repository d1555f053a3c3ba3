"""Unit tests of the controller's dispatch: what the watch thread and the workers share, without a cluster.

The controller is built over a client that is never called (nothing here reaches an API server); the cluster
tests drive the same code through the real operator process.
"""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client
from tcp_exporter_operator.config import Config
from tcp_exporter_operator.controller import Controller, unchanged
from tcp_exporter_operator.kube import Kube


@pytest.fixture
def controller() -> Controller:
    configuration = client.Configuration()
    configuration.host = "https://127.0.0.1:1"  # never called: nothing listens there
    return Controller(Config(), Kube(lambda: configuration), ())


def deployment(name: str = "checkout.v2", version: str = "20") -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "shop",
            "uid": f"uid-{name}",
            "resourceVersion": version,
            "generation": 1,
            "annotations": {"tcp-exporter/port": "8080"},
        },
        "spec": {"replicas": 2},
    }


def test_a_deletion_drops_the_deployments_queued_event_so_no_worker_patches_a_gone_deployment(
    controller: Controller,
) -> None:
    controller.dispatch("ADDED", deployment())
    controller.dispatch("ADDED", deployment("web-api"))
    assert len(controller.queue) == 2
    controller.dispatch("DELETED", deployment())
    entry = controller.queue.get(timeout=0)
    assert entry is not None and entry[0] == ("shop", "web-api")
    assert controller.queue.get(timeout=0) is None


def test_an_event_survives_the_watch_thread_dropping_the_awaited_write_meanwhile(controller: Controller) -> None:
    class DroppedOnRead(dict[str, tuple[str, float]]):
        """The watch thread's deletion pops the entry right after a worker first reads it."""

        def __getitem__(self, key: str) -> tuple[str, float]:
            value = dict.__getitem__(self, key)
            dict.pop(self, key)
            return value

    body = deployment(version="30")
    controller.awaiting = DroppedOnRead({"uid-checkout.v2": ("25", float("inf"))})
    controller.synced["uid-checkout.v2"] = unchanged(body)  # in sync: nothing to plan after the check
    assert controller.deployment_event(body) is None
    assert "uid-checkout.v2" not in controller.awaiting


def test_what_the_deployment_controller_adds_does_not_count_as_a_change_but_our_annotations_and_the_spec_do() -> None:
    body = deployment()
    before = unchanged(body)
    body["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = "1"  # the controller's, after a create
    body["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"] = "{}"
    body["status"] = {"replicas": 2, "readyReplicas": 1}
    assert unchanged(body) == before
    assert unchanged(body, pods=True) != unchanged(deployment(), pods=True)  # webhook mode counts its pods
    body["metadata"]["annotations"]["tcp-exporter/threshold"] = "50"
    assert unchanged(body) != before
    assert unchanged({**deployment(), "metadata": {**deployment()["metadata"], "generation": 2}}) != before


def test_a_keda_warning_that_cleared_gets_one_normal_event_and_only_where_it_was_posted(controller: Controller) -> None:
    from tcp_exporter_operator.events import Event
    from tcp_exporter_operator.plan import Plan

    posted: list[str] = []

    class Poster:
        def post(self, body: Any, events: list[Event]) -> None:
            posted.extend(e.reason for e in events)

    controller.events = Poster()  # type: ignore[assignment]
    cleared = (Event("Normal", "ScaledObjectFallbackCleared", "again"), Event("Normal", "ScaledObjectReady", "again"))
    body = deployment()
    controller.warned["uid-checkout.v2"] = {("ScaledObjectFallback", "KEDA holds the replicas")}
    controller.apply(body, Plan(cleared=cleared))
    assert posted == ["ScaledObjectFallbackCleared"]  # Ready was never warned of: nothing to clear
    controller.apply(body, Plan(cleared=cleared))
    assert posted == ["ScaledObjectFallbackCleared"]  # once


def test_a_deployment_two_workloadref_rollouts_name_is_injected_for_one_only(controller: Controller) -> None:
    """The patch mode injects a workloadRef Rollout's Deployment on its behalf; where another Rollout names it too,
    only the one that named it last does (the other is told): two would undo each other's injection."""
    template = {"metadata": {"name": "lobby-template", "namespace": "shop", "resourceVersion": "7"}}
    pods = {"spec": {"containers": [{"name": "app"}]}}
    template["spec"] = {"template": pods, "selector": {"matchLabels": {"a": "b"}}}
    controller.kube.get_deployment = lambda namespace, name, timeout=0: template  # type: ignore[assignment,misc]

    def rollout(name: str) -> dict[str, Any]:
        body = deployment(name)
        body.update(kind="Rollout", apiVersion="argoproj.io/v1alpha1")
        body["spec"] = {"workloadRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "lobby-template"}}
        return body

    controller.refer(("shop", "Rollout/lobby"), rollout("lobby"))
    made, target = controller.as_made(rollout("lobby"))
    assert target == "lobby-template" and made["metadata"]["resourceVersion"] == "7"  # planned as the Deployment is
    assert made["metadata"]["name"] == "lobby" and made["spec"]["template"] == template["spec"]["template"]
    controller.refer(("shop", "Rollout/lobby-b"), rollout("lobby-b"))  # a second one names it: it alone injects
    assert controller.as_made(rollout("lobby"))[1] is None and controller.as_made(rollout("lobby-b"))[1] is not None
    controller.refer(("shop", "Rollout/lobby-b"), None)  # no longer: the Deployment plans itself again
    entry = controller.queue.get(timeout=0)
    assert entry is not None and entry[0] == ("shop", "lobby-template")
