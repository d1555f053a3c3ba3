"""Validation at apply time: the ValidatingAdmissionPolicy of manifests/validation/ is made from the operator's own
rules (rules.py), and refuses each malformed annotation with the very message of the operator's Warning. Checked
rule by rule against the operator's plan, and against the real API server enforcing the committed policy."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from tcp_exporter_operator import rules
from tcp_exporter_operator.config import Config
from tcp_exporter_operator.plan import Facts, plan

from harness.helpers import wait_for
from harness.operator_proc import REPO, Kube, deployment
from harness.rolloutstack import rollout

POLICY_FILE = REPO / "manifests" / "validation" / "policy.yaml"
OPERATOR = str(Path(sys.executable).with_name("tcp-exporter-operator"))
# For every rule: a value it refuses and one it accepts (that the operator also accepts on a plain Deployment).
SAMPLES = {
    "port": ("80 80", "web,8443"),
    "method": ("ebpf", "conntrack"),
    "metrics-port": ("70000", "9102"),
    "threshold": ("²", "250"),
    "min-replicas": ("0", "2"),
    "max-replicas": ("ten", "20"),
    "scaledobject": ("maybe", "False"),
    "scale-in-by-connections": ("yes", "false"),
    "unsafe-ssl": ("1", "true"),
    "polling-interval": ("3601", "30"),
    "scale-down-stabilization": ("-5", "0"),
    "fallback-behavior": ("always", "currentReplicas"),
    "fallback-failure-threshold": ("1e3", "5"),
    "fallback-replicas": ("1.5", "1"),
    "cpu-request": ("lots", "20m"),
    "cpu-limit": ("1 core", "0.5"),
    "memory-request": ("32MB", "48Mi"),
    "memory-limit": ("-1", "128Mi"),
    "image": ("ghcr.io/x/y:1 latest", "registry.example/tcp-exporter:0.2.0"),
    "drain": ("5 min", "90s"),
    "prometheus": ("http://attacker.example/x#", "http://prometheus-operated.monitoring.svc:9090"),
    "authentication-ref": ("Secret/prom", "TriggerAuthentication/prom-creds"),
    "auth-modes": ("oauth", "bearer"),
}


# Values Python's \s or (?i) would take and RE2's would not: refused by both, with the same message.
NOT_ASCII = [("port", "8080\u00a0"), ("scaledobject", "fal\u017fe"), ("image", "registry.example/a\u00a0b:1")]


def annotated(key: str, value: str) -> dict[str, Any]:
    base = {"tcp-exporter/port": "8080"} if key != "port" else {}
    dep = deployment(
        "checkout.v2", {**base, f"tcp-exporter/{key}": value}, ports=[{"name": "web", "containerPort": 8080}]
    )
    if key == "drain":
        dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 120
    if key == "auth-modes":
        dep["metadata"]["annotations"]["tcp-exporter/authentication-ref"] = "prom-creds"
    if key == "authentication-ref":
        dep["metadata"]["annotations"]["tcp-exporter/auth-modes"] = "bearer"
    return dep


def test_every_rule_has_a_sample_it_refuses_and_one_it_accepts() -> None:
    assert set(SAMPLES) == {rule.key.removeprefix("tcp-exporter/") for rule in rules.RULES}
    for key, (bad, good) in SAMPLES.items():
        rule = rules.BY_KEY[f"tcp-exporter/{key}"]
        assert not rule.holds(bad) and rule.holds(good), key


@pytest.mark.parametrize(
    ("key", "bad", "good"), [(k, *SAMPLES[k]) for k in sorted(SAMPLES)] + [(k, v, None) for k, v in NOT_ASCII]
)
def test_the_operators_warning_is_the_rules_message_and_a_valid_value_is_accepted(
    key: str, bad: str, good: str | None
) -> None:
    cfg = Config(
        sidecar_image="example.test/tcp-exporter:1", prometheus="http://prometheus-operated.monitoring.svc:9090"
    )
    refused = plan(annotated(key, bad), Facts(), cfg)
    assert [(e.reason, e.message) for e in refused.events] == [
        ("InvalidAnnotation", f"{rules.BY_KEY['tcp-exporter/' + key].message}. Nothing changed.")
    ]
    if good is None:
        return
    accepted = plan(annotated(key, good), Facts(), cfg)
    assert "InvalidAnnotation" not in [e.reason for e in accepted.events], accepted.events


def test_the_committed_policy_is_the_one_the_rules_make() -> None:
    made = subprocess.run([OPERATOR, "policy"], capture_output=True, text=True, check=True).stdout
    assert made == POLICY_FILE.read_text(), "run: tcp-exporter-operator policy > manifests/validation/policy.yaml"


def refusal(kube: Kube, body: dict[str, Any]) -> str | None:
    """The API server's refusal of a dry-run create, or None if it would create it."""
    try:
        kube.apps.create_namespaced_deployment(kube.ns, body, dry_run="All")
    except ApiException as exc:
        assert exc.status == 422, exc.body
        return str(exc.body)
    return None


@pytest.mark.cluster
def test_the_api_server_refuses_each_malformed_annotation_with_the_operators_message(
    kube: Kube, kubectl: Callable[..., str], api: Any, argo_rollouts: Any
) -> None:
    old = annotated("threshold", "ten")  # applied before the policy: its later unrelated updates still go through
    old["metadata"]["name"] = "orders-api"
    kube.create(old)
    kubectl("apply", "-f", str(POLICY_FILE))
    try:
        wait_for(lambda: refusal(kube, annotated("method", "ebpf")), 30, "the policy in force")
        for key, (bad, good) in sorted(SAMPLES.items()):
            message = rules.BY_KEY[f"tcp-exporter/{key}"].message
            denied = refusal(kube, annotated(key, bad))
            assert denied is not None and message in denied.replace('\\"', '"'), (key, denied)
            assert refusal(kube, annotated(key, good)) is None, key
        for key, bad in NOT_ASCII:
            denied = refusal(kube, annotated(key, bad))
            message = rules.BY_KEY[f"tcp-exporter/{key}"].message
            assert denied is not None and message in denied.replace('\\"', '"'), (key, denied)
        sts = annotated("method", "ebpf")
        sts["kind"], sts["spec"]["serviceName"] = "StatefulSet", "checkout"
        sts["metadata"]["name"] = "checkout"  # a StatefulSet name is a DNS label: no dots
        with pytest.raises(ApiException) as refused:
            kube.apps.create_namespaced_stateful_set(kube.ns, sts, dry_run="All")
        assert rules.BY_KEY["tcp-exporter/method"].message in str(refused.value.body)
        custom = client.CustomObjectsApi(api)
        argo = rollout("checkout.v2", {"tcp-exporter/method": "ebpf"})  # Argo Rollouts' CRD is served here
        with pytest.raises(ApiException) as refused:
            custom.create_namespaced_custom_object("argoproj.io", "v1alpha1", kube.ns, "rollouts", argo, dry_run="All")
        assert rules.BY_KEY["tcp-exporter/method"].message in str(refused.value.body)
        argo["metadata"]["annotations"]["tcp-exporter/method"] = "sockdiag"
        custom.create_namespaced_custom_object("argoproj.io", "v1alpha1", kube.ns, "rollouts", argo, dry_run="All")
        kube.patch("orders-api", {"spec": {"replicas": 2}})  # the old value is left as it was: allowed
        with pytest.raises(ApiException) as err:
            kube.annotate("orders-api", threshold="eleven")  # changed, and still malformed: refused
        assert rules.BY_KEY["tcp-exporter/threshold"].message in str(err.value.body)
        unannotated = copy.deepcopy(deployment("web-api"))
        assert refusal(kube, unannotated) is None
    finally:
        kubectl("delete", "-f", str(POLICY_FILE), "--ignore-not-found")
