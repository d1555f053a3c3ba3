"""StatefulSets as targets (WORKLOAD_KINDS=Deployment,StatefulSet, manifests/statefulsets) on the real control
plane: injected and scaled like a Deployment, with the ScaledObject's target and owner, and the Events, of the
right kind; no right on StatefulSets and nothing done to them where the kind is not enabled."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from harness.helpers import wait_for
from harness.operator_proc import Audit, Kube, Operator, deployment, operator_may, operator_with_kind, operator_writes

pytestmark = pytest.mark.cluster


def statefulset(name: str, annotations: dict[str, str]) -> dict[str, Any]:
    body = copy.deepcopy(deployment(name, annotations))
    body["kind"] = "StatefulSet"
    body["spec"]["serviceName"] = name
    return body


class Sets:
    def __init__(self, kube: Kube) -> None:
        self.kube = kube

    def create(self, body: dict[str, Any]) -> None:
        self.kube.apps.create_namespaced_stateful_set(self.kube.ns, body)

    def get(self, name: str) -> Any:
        return self.kube.apps.read_namespaced_stateful_set(name, self.kube.ns)

    def annotate(self, name: str, **annotations: str | None) -> None:
        body = {"metadata": {"annotations": {f"tcp-exporter/{k.replace('_', '-')}": v for k, v in annotations.items()}}}
        self.kube.apps.patch_namespaced_stateful_set(name, self.kube.ns, body)

    def inits(self, name: str) -> list[str]:
        return [c.name for c in self.get(name).spec.template.spec.init_containers or []]

    def events(self, name: str, type_: str | None = None) -> list[Any]:
        return [e for e in self.kube.events(name, type_) if e.involved_object.kind == "StatefulSet"]


def test_where_statefulsets_are_not_enabled_the_operator_has_no_right_on_them_and_leaves_them_be(
    operator: Operator, kube: Kube, audit: Audit
) -> None:
    assert not operator_may(kube, "list", "statefulsets", "apps")
    mark = audit.mark()
    Sets(kube).create(statefulset("redis", {"tcp-exporter/port": "8080"}))
    kube.create(deployment("after-it", {"tcp-exporter/port": "8080"}))  # the operator is alive and handles this
    wait_for(lambda: "tcp-exporter" in kube.containers("after-it"), 30, "the Deployment after it injected")
    assert Sets(kube).inits("redis") == []
    assert not [w for w in operator_writes(audit, mark, kube.ns) if "redis" in w[2]]


@pytest.fixture(scope="module")
def operator_with_statefulsets(cluster: Any, kubectl: Callable[..., str], operator: Operator) -> Iterator[Operator]:
    """The operator with StatefulSets enabled (and their RBAC installed), in place of the session's, for the
    tests of this module that need it: they come after the one that needs the session's (module order)."""
    with operator_with_kind(cluster, kubectl, operator, "statefulsets") as op:
        yield op


def test_a_statefulset_is_injected_and_scaled_with_a_scaledobject_of_its_own_kind_and_uninjected(
    operator_with_statefulsets: Operator, kube: Kube
) -> None:
    sets = Sets(kube)
    name = "kafka-broker"
    sets.create(statefulset(name, {"tcp-exporter/port": "web", "tcp-exporter/max-replicas": "5"}))
    wait_for(lambda: sets.inits(name) == ["tcp-exporter"], 30, "the native sidecar in the StatefulSet")
    status = json.loads(sets.get(name).metadata.annotations["tcp-exporter/status"])
    assert status["ports"] == [8080] and status["mode"] == "native"
    so = wait_for(lambda: kube.scaled_object(name), 30, "the ScaledObject")
    assert so["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": name}
    (owner,) = so["metadata"]["ownerReferences"]
    assert owner["kind"] == "StatefulSet" and owner["uid"] == sets.get(name).metadata.uid
    assert f'tcp_exporter_deployment="{name}"' in so["spec"]["triggers"][0]["metadata"]["query"]
    injected = wait_for(lambda: [e for e in sets.events(name) if e.reason == "Injected"], 30, "the Injected Event")
    assert injected[0].involved_object.api_version == "apps/v1"

    sets.annotate(name, scale_in_by_connections="true")
    warned = wait_for(
        lambda: [e for e in sets.events(name, "Warning") if e.reason == "ScaleInByConnectionsIgnored"], 30, "a Warning"
    )
    assert "highest ordinal" in warned[0].message

    sets.annotate(name, port=None, scale_in_by_connections=None)
    wait_for(lambda: sets.inits(name) == [], 30, "the sidecar removed")
    assert "tcp-exporter/status" not in (sets.get(name).metadata.annotations or {})
    wait_for(lambda: kube.scaled_object(name) is None, 30, "the ScaledObject deleted")


def test_a_statefulset_and_a_deployment_of_the_same_name_are_two_workloads(
    operator_with_statefulsets: Operator, kube: Kube
) -> None:
    sets = Sets(kube)
    sets.create(statefulset("web-api", {"tcp-exporter/port": "8080"}))
    kube.create(deployment("web-api", {"tcp-exporter/port": "8080"}))
    wait_for(lambda: sets.inits("web-api") == ["tcp-exporter"], 30, "the StatefulSet injected")
    wait_for(lambda: "tcp-exporter" in kube.containers("web-api"), 30, "the Deployment injected")
    # One ScaledObject name for both: the first one's; the other is told, not given someone else's.
    wait_for(
        lambda: [e for e in kube.events("web-api", "Warning") if e.reason == "ScaledObjectConflict"],
        30,
        "a ScaledObjectConflict on one of them",
    )
