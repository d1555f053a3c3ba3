"""The Helm chart (charts/tcp-exporter), with a real `helm` built from its Go module: lint, its defaults against
what `kubectl apply -k manifests/` installs, and the operator running under what the chart installed."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml
from tcp_exporter_operator.config import Config

from harness.helmtools import helm
from harness.localkube.cluster import kubectl as kubectl_binary
from harness.operator_proc import REPO, Kube, Operator, deployment, injected

# Needs Helm and kubectl built from their Go modules; the last test also the control plane.
pytestmark = pytest.mark.gobuild
CHART = REPO / "charts" / "tcp-exporter"


def render(*args: str, namespace: str = "tcp-exporter") -> list[dict[str, Any]]:
    out = subprocess.run(
        [helm(), "template", "tcpx", str(CHART), "--namespace", namespace, "--kube-version", "1.37.0", *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def kustomized(path: Path = REPO / "manifests") -> list[dict[str, Any]]:
    """What `kubectl kustomize` makes of it: the kubectl built with the control plane, no cluster needed."""
    out = subprocess.run([kubectl_binary(), "kustomize", str(path)], check=True, capture_output=True, text=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def kustomized_with(tmp_path: Path, *components: str) -> list[dict[str, Any]]:
    """What `kubectl kustomize` makes of manifests/ with these optional components enabled (on a copy)."""
    import shutil

    manifests = tmp_path / "manifests"
    shutil.copytree(REPO / "manifests", manifests)
    with open(manifests / "kustomization.yaml", "a") as f:
        f.write("components:\n" + "".join(f"  - {c}\n" for c in components))
    return kustomized(manifests)


def test_helm_lint_passes_for_the_defaults_and_with_every_option_on() -> None:
    for extra in ([], ["--set", "peering.enabled=true,monitoring.podMonitor.enabled=true"]):
        every = ["--set", "monitoring.prometheusRule.enabled=true,monitoring.dashboard.enabled=true"] if extra else []
        result = subprocess.run(
            [helm(), "lint", "--strict", str(CHART), *extra, *every], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_chart_sets_every_operator_variable_and_nothing_unknown() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    names = {re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower() for key in values["config"]}
    assert names == {f.name for f in fields(Config)} - {"sidecar_image"}  # that one is the sidecar image value
    (configmap,) = [d for d in render() if d["kind"] == "ConfigMap"]
    tag = Config().sidecar_image.split(":")[-1]
    assert configmap["data"]["TCP_EXPORTER_OPERATOR_SIDECAR_IMAGE"] == f"ghcr.io/tcp-exporter/tcp-exporter:{tag}"
    Config.from_env(configmap["data"])  # every value is one the operator accepts


def test_the_charts_defaults_make_the_same_kinds_and_rbac_as_the_kustomize_install() -> None:
    chart, kustomize = render(), kustomized()
    kinds = sorted(d["kind"] for d in kustomize if d["kind"] != "Namespace")  # helm install --create-namespace
    assert sorted(d["kind"] for d in chart) == kinds
    (chart_role,) = [d for d in chart if d["kind"] == "ClusterRole"]
    (kustomize_role,) = [d for d in kustomize if d["kind"] == "ClusterRole"]
    assert chart_role["rules"] == kustomize_role["rules"]
    (chart_cm,) = [d for d in chart if d["kind"] == "ConfigMap"]
    (kustomize_cm,) = [d for d in kustomize if d["kind"] == "ConfigMap"]
    assert kustomize_cm["data"].items() <= chart_cm["data"].items()
    (chart_op,) = [d for d in chart if d["kind"] == "Deployment"]
    (kustomize_op,) = [d for d in kustomize if d["kind"] == "Deployment"]
    for key in ("securityContext", "serviceAccountName"):
        assert chart_op["spec"]["template"]["spec"][key] == kustomize_op["spec"]["template"]["spec"][key]
    chart_c = chart_op["spec"]["template"]["spec"]["containers"][0]
    kustomize_c = kustomize_op["spec"]["template"]["spec"]["containers"][0]
    for key in ("ports", "livenessProbe", "resources", "securityContext"):
        assert chart_c[key] == kustomize_c[key], key
    assert chart_c["image"] == kustomize_c["image"]


def test_without_scale_in_neither_install_grants_any_right_on_pods_and_with_it_the_policy_comes_along() -> None:
    for docs in (render(), kustomized()):
        rules = [r for d in docs if d["kind"] == "ClusterRole" for r in d["rules"]]
        assert not [r for r in rules if "pods" in r["resources"]], rules
        assert not [d for d in docs if d["kind"].startswith("ValidatingAdmissionPolicy")]
    enabled = render("--set", "scaleIn.enabled=true", namespace="platform-x")
    kinds = sorted(
        d["kind"] for d in enabled if "scale-in" in d["metadata"]["name"] or "deletion-cost" in d["metadata"]["name"]
    )
    assert kinds == [
        "ClusterRole",
        "ClusterRoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ]
    (policy,) = [d for d in enabled if d["kind"] == "ValidatingAdmissionPolicy"]
    assert "system:serviceaccount:platform-x:" in policy["spec"]["matchConditions"][0]["expression"]


def test_the_optional_parts_match_their_kustomize_components(tmp_path: Path) -> None:
    kustomize = kustomized_with(tmp_path, "peering", "monitoring", "scale-in", "validation", "statefulsets")
    chart = render(
        "--set",
        "peering.enabled=true,monitoring.podMonitor.enabled=true,monitoring.prometheusRule.enabled=true,"
        "monitoring.dashboard.enabled=true,scaleIn.enabled=true,validation.enabled=true",
        "--set-string",
        "config.workloadKinds=Deployment\\,StatefulSet",
    )
    assert sorted(d["kind"] for d in chart) == sorted(d["kind"] for d in kustomize if d["kind"] != "Namespace")
    (chart_rule,) = [d for d in chart if d["kind"] == "PrometheusRule"]
    (kustomize_rule,) = [d for d in kustomize if d["kind"] == "PrometheusRule"]
    assert chart_rule["spec"] == kustomize_rule["spec"]

    def peering(docs: list[dict[str, Any]]) -> Any:
        (role,) = [d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"].endswith("-peering")]
        return role["rules"]

    assert peering(chart) == peering(kustomize)

    def scale_in(docs: list[dict[str, Any]]) -> Any:
        (role,) = [d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"].endswith("-scale-in")]
        (policy,) = [
            d for d in docs if d["kind"] == "ValidatingAdmissionPolicy" and "deletion-cost" in d["metadata"]["name"]
        ]
        return role["rules"], policy["spec"]

    assert scale_in(chart) == scale_in(kustomize)

    def validation(docs: list[dict[str, Any]]) -> Any:
        return [
            (d["kind"], d["spec"])
            for d in docs
            if d["kind"].startswith("ValidatingAdmissionPolicy") and "annotations" in d["metadata"]["name"]
        ]

    assert validation(chart) == validation(kustomize) and len(validation(chart)) == 2

    def statefulsets(docs: list[dict[str, Any]]) -> Any:
        (role,) = [d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"].endswith("-statefulsets")]
        (configmap,) = [
            d for d in docs if d["kind"] == "ConfigMap" and "TCP_EXPORTER_OPERATOR_METHOD" in (d.get("data") or {})
        ]
        return role["rules"], Config.from_env(configmap["data"]).workload_kinds

    assert statefulsets(chart) == statefulsets(kustomize)
    for docs in (render(), kustomized()):  # not enabled: no right on StatefulSets at all
        assert not [
            r for d in docs if d["kind"] == "ClusterRole" for r in d["rules"] if "statefulsets" in r["resources"]
        ]
    (operator,) = [d for d in chart if d["kind"] == "Deployment"]
    assert operator["spec"]["replicas"] == 2
    assert "--peering=tcp-exporter" in operator["spec"]["template"]["spec"]["containers"][0]["args"]


def test_rollouts_as_targets_grant_the_same_rights_on_rollouts_alone_in_the_chart_and_the_component(
    tmp_path: Path,
) -> None:
    kustomize = kustomized_with(tmp_path, "rollouts")
    chart = render("--set-string", "config.workloadKinds=Deployment\\,Rollout")

    def rollouts(docs: list[dict[str, Any]]) -> Any:
        (role,) = [d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"].endswith("-rollouts")]
        (configmap,) = [
            d for d in docs if d["kind"] == "ConfigMap" and "TCP_EXPORTER_OPERATOR_METHOD" in (d.get("data") or {})
        ]
        return role["rules"], Config.from_env(configmap["data"]).workload_kinds

    assert rollouts(chart) == rollouts(kustomize)
    assert rollouts(chart) == (
        [{"apiGroups": ["argoproj.io"], "resources": ["rollouts"], "verbs": ["get", "list", "watch", "patch"]}],
        ("Deployment", "Rollout"),
    )
    for docs in (render(), kustomized()):  # not enabled: no right on Rollouts at all
        assert not [r for d in docs if d["kind"] == "ClusterRole" for r in d["rules"] if "rollouts" in r["resources"]]


def test_webhook_injection_matches_the_kustomize_component_and_points_at_the_releases_namespace(
    tmp_path: Path,
) -> None:
    kustomize = kustomized_with(tmp_path, "webhook")
    chart = render("--set", "config.injection=webhook", namespace="platform-x")
    assert sorted(d["kind"] for d in chart) == sorted(d["kind"] for d in kustomize if d["kind"] != "Namespace")

    def webhook_parts(docs: list[dict[str, Any]]) -> Any:
        roles = sorted(
            (d["kind"], d["rules"])
            for d in docs
            if d["kind"] in ("ClusterRole", "Role") and "webhook" in d["metadata"]["name"]
        )
        (config,) = [d for d in docs if d["kind"] == "MutatingWebhookConfiguration"]
        return roles, config["webhooks"]

    chart_roles, chart_hooks = webhook_parts(chart)
    kustomize_roles, kustomize_hooks = webhook_parts(kustomize)
    assert chart_roles == kustomize_roles
    assert chart_hooks[0]["clientConfig"]["service"]["namespace"] == "platform-x"
    assert "platform-x" in chart_hooks[0]["namespaceSelector"]["matchExpressions"][0]["values"]
    for hooks in (chart_hooks, kustomize_hooks):  # the rest the same
        hooks[0]["clientConfig"]["service"].pop("namespace")
        hooks[0]["namespaceSelector"]["matchExpressions"][0]["values"].pop()
    assert chart_hooks == kustomize_hooks
    (configmap,) = [d for d in chart if d["kind"] == "ConfigMap"]
    cfg = Config.from_env(configmap["data"])
    assert cfg.injection == "webhook" and cfg.own_namespace == "platform-x"
    assert cfg.webhook_hosts[0] == "tcp-exporter-webhook.platform-x.svc"
    (kustomize_cm,) = [d for d in kustomize if d["kind"] == "ConfigMap"]
    assert Config.from_env(kustomize_cm["data"]).injection == "webhook"
    for docs in (chart, kustomize):
        (operator,) = [d for d in docs if d["kind"] == "Deployment"]
        ports = operator["spec"]["template"]["spec"]["containers"][0]["ports"]
        assert {"name": "webhook", "containerPort": 9443} in ports
        assert operator["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"


@pytest.mark.cluster
def test_the_operator_runs_under_what_the_chart_installs(
    cluster: Any, kubectl: Callable[..., str], operator: Operator, kube: Kube, tmp_path: Path
) -> None:
    """Installed under another name and namespace than the kustomize install, so that only the chart's
    ServiceAccount, RBAC and admission policy are in play."""
    namespace = "tcpx-chart"
    kubectl("create", "namespace", namespace)
    docs = render("--set", "nameOverride=tcpx-chart", namespace=namespace)
    path = tmp_path / "chart.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    kubectl("apply", "-f", str(path))
    operator.stop()
    op = Operator(cluster, kubectl, service_account=(namespace, "tcpx-chart"))
    try:
        kube.create(deployment("chart-web-api", {"tcp-exporter/port": "8080"}))
        so = injected(kube, "chart-web-api")
        assert so["metadata"]["ownerReferences"][0]["name"] == "chart-web-api"
    finally:
        op.close()
        kubectl("delete", "-f", str(path), "--wait=false")
        kubectl("delete", "namespace", namespace, "--wait=false")
        operator.start()


def test_make_release_uses_the_kubectl_the_tooling_builds_not_one_on_the_path(tmp_path: Path) -> None:
    # A fresh machine has no kubectl, and one found on the PATH may be of any version: a decoy that fails.
    decoy = tmp_path / "kubectl"
    decoy.write_text("#!/bin/sh\necho 'the kubectl on the PATH was used' >&2\nexit 97\n")
    decoy.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    out = subprocess.run(["make", "release"], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    docs = list(yaml.safe_load_all((REPO / "dist" / "install.yaml").read_text()))
    assert any(d and d["kind"] == "Deployment" for d in docs)


@pytest.mark.cluster
def test_a_second_install_of_the_chart_is_refused_saying_which_install_is_already_there(
    cluster: Any, operator: Operator
) -> None:
    # The operator fixture installed with kubectl apply -k manifests/: a chart release must not add a second.
    out = subprocess.run(
        [helm(), "install", "second", str(CHART), "--namespace", "tcpx-second", "--create-namespace",
         "--dry-run=server", "--kubeconfig", cluster.kubeconfig],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode != 0
    assert "already installed in this cluster" in out.stderr and "kubectl apply -k manifests/" in out.stderr, out.stderr
