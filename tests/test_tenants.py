"""Safety among tenants, on the real control plane: nothing one namespace writes stops the operator for others."""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from typing import Any

import pytest

from harness.helpers import wait_for
from harness.hostile import Prometheus, answer
from harness.operator_proc import Audit, Kube, Operator, deployment, injected, operator_writes

pytestmark = pytest.mark.cluster

# Helm-style names as users have them: dots, dashes, 60 characters.
LONG = "payments-gateway-primary-eu-west-1-canary-release-abc.v2-web"
assert len(LONG) == 60
ATTACKER = "https://attacker.example/x"
COST = "controller.kubernetes.io/pod-deletion-cost"


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
    assert "is not a list of port numbers or container port names" in warned[0].message
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
        so = wait_for(lambda: kube.scaled_object("checkout.v2"), 30, "its ScaledObject")
        assert so["spec"]["triggers"][0]["authenticationRef"]["kind"] == "ClusterTriggerAuthentication"
        warned = wait_for(lambda: kube.events("web-api", "Warning"), 30, "a Warning on the attacker's one")
        assert "TCP_EXPORTER_OPERATOR_AUTHENTICATION_REF" in warned[0].message, warned[0].message
        assert kube.scaled_object("web-api") is None
        assert "tcp-exporter" not in kube.containers("web-api")
    finally:
        central.close()
        operator.start()


def test_a_write_an_admission_policy_refuses_is_one_warning_and_not_retried_until_the_deployment_changes(
    operator: Operator, kube: Kube, api: Any, audit: Audit
) -> None:
    from kubernetes import client

    admission = client.AdmissionregistrationV1Api(api)
    policy = f"no-sidecars-{kube.ns}"
    admission.create_validating_admission_policy(
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": policy},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {"apiGroups": ["apps"], "apiVersions": ["v1"], "operations": ["UPDATE"],
                         "resources": ["deployments"]}
                    ]
                },
                "validations": [
                    {
                        "expression": "!object.spec.template.spec.containers.exists(c, c.name == 'tcp-exporter')"
                        " && !(has(object.spec.template.spec.initContainers) &&"
                        " object.spec.template.spec.initContainers.exists(c, c.name == 'tcp-exporter'))",
                        "message": "no sidecars in this namespace",
                    }
                ],
            },
        }
    )  # fmt: skip
    admission.create_validating_admission_policy_binding(
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": policy},
            "spec": {
                "policyName": policy,
                "validationActions": ["Deny"],
                "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": kube.ns}}},
            },
        }
    )
    try:
        # A policy takes effect once the API server has compiled it: wait until it refuses a write of our own.
        probe = kube.create(deployment("probe", {}))

        def enforced() -> bool:
            body = [{"op": "add", "path": "/spec/template/spec/containers/-",
                     "value": {"name": "tcp-exporter", "image": "x"}}]  # fmt: skip
            try:
                kube.apps.patch_namespaced_deployment(
                    probe["metadata"]["name"], kube.ns, body, _content_type="application/json-patch+json"
                )
            except client.ApiException as exc:
                return exc.status == 422
            kube.apps.patch_namespaced_deployment(
                probe["metadata"]["name"], kube.ns, [{"op": "remove", "path": "/spec/template/spec/containers/1"}],
                _content_type="application/json-patch+json",
            )  # fmt: skip
            return False

        wait_for(enforced, 30, "the policy to be enforced")

        # Past the operator's start (the test before restarts it): a Deployment created while it first lists
        # was seen planned twice at once in one CI run (cause not found yet; see the stop note of 2026-12-03).
        def listed_since_start() -> bool:  # the log spans the operator's restarts: read its last start's part
            return "every watch has listed" in operator.log().rpartition("the sidecar is injected as")[2]

        wait_for(listed_since_start, 60, "the operator's first listing")
        mark = audit.mark()
        kube.create(deployment("web-api", {"tcp-exporter/port": "8080"}))
        warned = wait_for(lambda: kube.events("web-api", "Warning"), 30, "the WriteRefused Warning")
        assert warned[0].reason == "WriteRefused" and "no sidecars in this namespace" in warned[0].message
        # Watch events that change nothing the plan reads (a label, the controllers' status) bring no retry.
        for i in range(3):
            touched = kube.patch("web-api", {"metadata": {"labels": {"touched": str(i)}}})
        skipped = f"skipped {kube.ns}/web-api at resourceVersion {touched.metadata.resource_version}: a write for it"
        wait_for(lambda: skipped in operator.log(), 30, "the last label change to be seen and skipped")
        patches = [w for w in operator_writes(audit, mark, kube.ns) if w == ("patch", "deployments", "web-api")]
        assert len(patches) == 1, patches
        assert [e.reason for e in kube.events("web-api", "Warning")] == ["WriteRefused"]
        # A change of the Deployment is tried again.
        kube.annotate("web-api", threshold="50")
        wait_for(
            lambda: [w for w in operator_writes(audit, mark, kube.ns) if w == ("patch", "deployments", "web-api")][1:],
            30,
            "a retry after the change",
        )
    finally:
        admission.delete_validating_admission_policy_binding(policy)
        admission.delete_validating_admission_policy(policy)


def test_the_api_servers_answer_to_a_failed_test_operation_is_told_apart_from_a_refusal(kube: Kube) -> None:
    from kubernetes import client
    from tcp_exporter_operator.kube import patch_did_not_apply

    kube.create(deployment("checkout.v2", {}))
    failed_test = [{"op": "test", "path": "/metadata/annotations", "value": {"x": "y"}},
                   {"op": "add", "path": "/metadata/labels/x", "value": "y"}]  # fmt: skip
    gone_path = [{"op": "test", "path": "/metadata/annotations/nothing-here", "value": "y"},
                 {"op": "add", "path": "/metadata/labels/x", "value": "y"}]  # fmt: skip
    invalid = [{"op": "replace", "path": "/spec/replicas", "value": -1}]
    answers = {}
    for name, body in (("failed_test", failed_test), ("gone_path", gone_path), ("invalid", invalid)):
        try:
            kube.apps.patch_namespaced_deployment(
                "checkout.v2", kube.ns, body, _content_type="application/json-patch+json"
            )
        except client.ApiException as exc:
            assert exc.status == 422, (name, exc.body)
            answers[name] = patch_did_not_apply(exc.body)
    assert answers == {"failed_test": True, "gone_path": True, "invalid": False}


def test_a_prometheus_answering_inf_for_one_namespace_leaves_another_namespaces_deletion_costs_written(
    operator: Operator, kube: Kube, api: Any, cluster: Any, kubectl: Callable[..., str]
) -> None:
    # Two teams, one Deployment name. Team A names a Prometheus that answers +Inf for its pods, and a cost for
    # team B's pods too; team B's Prometheus answers honestly. B's costs are written, from B's server only.
    namespace = f"{kube.ns}-b"
    kube.core.create_namespace({"metadata": {"name": namespace}})
    team_b = Kube(api, namespace)

    def vector(samples: list[tuple[str, str, Any]]) -> bytes:
        result = [
            {"metric": {"namespace": ns, "tcp_exporter_deployment": "web-api", "pod": pod}, "value": [0, value]}
            for ns, pod, value in samples
        ]
        return json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}}).encode()

    def pods(k: Kube) -> list[str]:
        return sorted(p.metadata.name for p in k.core.list_namespaced_pod(k.ns, label_selector="app=web-api").items)

    def honest_count(pod: str) -> int:  # whichever pods exist when it is asked (a rollout replaces them)
        return zlib.crc32(pod.encode()) % 1000 + 1

    def hostile(h: Any) -> None:
        answer(h, vector([(kube.ns, p, "+Inf") for p in pods(kube)] + [(namespace, p, "999") for p in pods(team_b)]))

    def honest(h: Any) -> None:
        answer(h, vector([(namespace, p, str(honest_count(p))) for p in pods(team_b)]))

    operator.stop()
    with Prometheus(hostile) as bad, Prometheus(honest) as good:
        env = {
            "TCP_EXPORTER_OPERATOR_DELETION_COST_PERIOD": "1",
            "TCP_EXPORTER_OPERATOR_ALLOWED_PROMETHEUS": f"{bad.url},{good.url}",
        }
        fast = Operator(cluster, kubectl, env=env)
        try:
            for k, url in ((kube, bad.url), (team_b, good.url)):
                body = deployment(
                    "web-api",
                    {
                        "tcp-exporter/port": "web",
                        "tcp-exporter/prometheus": url,
                        "tcp-exporter/scale-in-by-connections": "true",
                        # No count reaches it: KEDA's formula wants 1 of the 3 replicas, a scale-in is coming, and
                        # costs are written only then.
                        "tcp-exporter/threshold": "100000",
                    },
                )
                body["spec"]["replicas"] = 3
                k.create(body)
            # The ReplicaSet controller makes the pods (nothing runs them: their costs are what is checked).
            injected(kube, "web-api")
            injected(team_b, "web-api")

            def costs(k: Kube) -> dict[str, str | None]:
                items = k.core.list_namespaced_pod(k.ns, label_selector="app=web-api").items
                return {p.metadata.name: (p.metadata.annotations or {}).get(COST) for p in items}

            def b_written() -> bool:
                now = costs(team_b)
                return len(now) >= 3 and now == {pod: str(honest_count(pod)) for pod in now}

            wait_for(b_written, 60, "team B's pods' costs from team B's Prometheus")
            assert len(costs(kube)) >= 3
            assert set(costs(kube).values()) == {None}, "no cost written from an +Inf answer"
            assert bad.hits and good.hits
            assert fast.metric("tcp_exporter_operator_deletion_cost_queries_total", result="bad_sample") >= 3
            assert fast.liveness() == 200
        finally:
            fast.close()
            operator.start()
            kube.core.delete_namespace(namespace)


def test_no_paused_or_never_finishing_rollout_holds_the_upgrade_slot_past_the_admins_limit(
    operator: Operator, kube: Kube, cluster: Any, kubectl: Callable[..., str]
) -> None:
    """Upgrade pacing that no editor can freeze (one slot): a paused Deployment is upgraded without taking the
    slot (nothing rolls until its owner resumes it), and a rollout that never finishes (no kubelet runs its pods
    here, as where an editor breaks the pods on purpose) gives the slot back at MAX_ROLLOUT_SECONDS, so the
    waiting one rolls next instead of waiting for ever."""
    names = ["stuck.web-api", "next.web-api"]
    for name in [*names, "paused.web-api"]:
        kube.create_injected(operator, deployment(name, {"tcp-exporter/port": "8080"}))
    kube.patch("paused.web-api", {"spec": {"paused": True}})
    operator.stop()
    limit = 6
    upgraded = Operator(
        cluster,
        kubectl,
        env={
            "TCP_EXPORTER_OPERATOR_SIDECAR_IMAGE": "example.test/tcp-exporter:next",
            "TCP_EXPORTER_OPERATOR_MAX_CONCURRENT_ROLLOUTS": "1",
            "TCP_EXPORTER_OPERATOR_MAX_ROLLOUT_SECONDS": str(limit),
        },
        args=[f"--namespace={kube.ns}"],  # this test's Deployments only (others' rollouts never finish either)
    )

    def image(name: str) -> str:
        return str(kube.containers(name)["tcp-exporter"].image)

    try:
        wait_for(lambda: image("paused.web-api").endswith(":next"), 30, "the paused one upgraded without a slot")
        first = wait_for(lambda: [n for n in names if image(n).endswith(":next")] or None, 30, "one to roll")
        assert len(first) == 1, f"both rolled at once with one slot: {first}"
        (other,) = [n for n in names if n not in first]
        wait_for(lambda: f"upgrade of {kube.ns}/{other} waits" in upgraded.log(), 30, "the other to wait")
        assert image(other).endswith(":test")
        # Its pods never become Ready: at the limit (taken back within the 10 s expiry tick) the slot moves on.
        wait_for(lambda: image(other).endswith(":next"), limit + 30, "the waiting one to roll after the limit")
        assert "held its slot to its limit" in upgraded.log()
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nthe upgraded operator's log:\n{upgraded.log()[-6000:]}") from None
    finally:
        upgraded.close()
        operator.start()
