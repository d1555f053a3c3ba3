"""Injection at pod creation (INJECTION=webhook) on the real control plane: kube-apiserver calls the operator's
webhook for the pods the real ReplicaSet controller creates, over TLS it trusts through the caBundle the operator
keeps. The Deployment stays as written (what Argo CD and Flux compare), its pods get the sidecar; a webhook that
is down blocks no pod and the operator then says which pods lack it; the certificate is renewed under load."""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException
from tcp_exporter import __version__
from tcp_exporter_operator.webhook import INJECTED, issue, remaining

from harness.helpers import wait_for
from harness.operator_proc import (
    NAMESPACE,
    OPERATOR,
    REPO,
    Audit,
    Kube,
    Operator,
    deployment,
    operator_writes,
)
from harness.rolloutstack import Rollouts, rollout
from harness.webhookstack import CONFIGURATION, SECRET, Webhook

pytestmark = pytest.mark.cluster
# manifests/statefulsets' rights, for the tests that enable StatefulSets (the component also sets the kinds).
STATEFULSET_RBAC = (REPO / "manifests" / "statefulsets" / "role.yaml").read_text()
ROLLOUT_RBAC = (REPO / "manifests" / "rollouts" / "role.yaml").read_text()


@pytest.fixture(scope="module")
def installed(cluster: Any, kubectl: Callable[..., str], api: Any, operator: Operator) -> Iterator[Webhook]:
    """The webhook component installed once for this module, in place of the session's patch-mode operator, and
    everything it added removed after (a webhook configuration left behind would be called for every pod of the
    later tests)."""
    operator.stop()
    hook = Webhook(cluster, kubectl, api)
    try:
        hook.install()
        yield hook
    finally:
        hook.remove()
        operator.start()


@pytest.fixture
def webhook(installed: Webhook) -> Iterator[Webhook]:
    """The installed webhook; each test starts its webhook-mode operator, stopped after it."""
    yield installed
    installed.stop()
    installed.validity = 365 * 86400


def pods(kube: Kube, name: str) -> list[Any]:
    dep = kube.get(name)
    selector = ",".join(f"{k}={v}" for k, v in sorted(dep.spec.selector.match_labels.items()))
    listed = kube.core.list_namespaced_pod(kube.ns, label_selector=selector).items
    return [p for p in listed if p.metadata.deletion_timestamp is None]


def sidecar(pod: Any) -> Any:
    return next((c for c in pod.spec.init_containers or [] if c.name == "tcp-exporter"), None)


def all_injected(kube: Kube, name: str, count: int) -> list[Any]:
    def check() -> list[Any] | None:
        found = pods(kube, name)
        return found if len(found) == count and all(sidecar(p) is not None for p in found) else None

    return wait_for(check, 60, f"{count} pods of {name} with the sidecar")


def test_pods_get_the_sidecar_at_creation_and_the_deployment_stays_exactly_as_applied(
    webhook: Webhook, kube: Kube, kubectl: Callable[..., str], audit: Audit
) -> None:
    op = webhook.start()
    name = "checkout.v2"
    manifest = deployment(name, {"tcp-exporter/port": "8080", "tcp-exporter/min-replicas": "2"})
    manifest["spec"]["replicas"] = 2
    manifest["metadata"]["namespace"] = kube.ns
    plain = deployment("web-api")  # not annotated: its pods are left alone
    plain["metadata"]["namespace"] = kube.ns
    applied = yaml.safe_dump_all([manifest, plain])
    kubectl("apply", "--server-side", "--field-manager=argocd-controller", "-f", "-", input=applied)
    found = all_injected(kube, name, 2)
    container = sidecar(found[0])
    assert container.restart_policy == "Always" and "--deployment=checkout.v2" in " ".join(container.args)
    assert found[0].metadata.annotations[INJECTED].count("/") == 1
    assert found[0].metadata.annotations["prometheus.io/port"] == "9100"
    wait_for(lambda: kube.scaled_object(name), 30, "the ScaledObject")
    wait_for(lambda: len(pods(kube, "web-api")) == 1, 30, "the plain Deployment's pod")
    assert sidecar(pods(kube, "web-api")[0]) is None
    dep = kube.get(name)
    assert dep.metadata.generation == 1
    assert not any(k.startswith("tcp-exporter/status") for k in dep.metadata.annotations)
    assert [c.name for c in dep.spec.template.spec.containers] == ["app"] and not dep.spec.template.spec.init_containers

    # Argo CD's sync (or Flux's) applies the same manifest again: nothing to change, nothing written.
    kube.converged(op, name)
    mark = audit.mark()
    version = dep.metadata.resource_version
    kubectl("apply", "--server-side", "--field-manager=argocd-controller", "-f", "-", input=applied)
    assert kube.get(name).metadata.resource_version == version
    kubectl("diff", "--server-side", "--field-manager=argocd-controller", "-f", "-", input=applied)  # exit 0: no diff
    assert [w for w in operator_writes(audit, mark, kube.ns) if w[1] == "deployments"] == []

    # `status` reads what the webhook injected from the pods: nothing of it is in the Deployment.
    cli = str(Path(sys.executable).with_name("tcp-exporter-operator"))
    env = {**os.environ, "KUBECONFIG": webhook.cluster.kubeconfig}
    shown = subprocess.run([cli, "status", "-n", kube.ns, "-o", "json"], capture_output=True, text=True, env=env)
    (row,) = [r for r in json.loads(shown.stdout) if r["name"] == name]
    assert (row["injectedBy"], row["version"], row["sidecar"]) == ("webhook", __version__, "native")
    assert row["problems"] == [], row


def test_a_rollout_injects_the_new_pods_and_starts_no_second_one(webhook: Webhook, kube: Kube) -> None:
    op = webhook.start()
    name = "a" * 50 + "-web-api"  # long, with dashes, as Helm names them
    kube.create(deployment(name, {"tcp-exporter/port": "web"}))
    all_injected(kube, name, 1)
    kube.converged(op, name)
    before = kube.rollouts(name)
    kube.patch(name, {"spec": {"template": {"metadata": {"annotations": {"example.test/restartedAt": "1"}}}}})
    wait_for(lambda: kube.rollouts(name) == before + 1, 30, "the user's rollout")
    new = kube.get(name).metadata.generation

    def rolled() -> bool:
        # The new ReplicaSet's pod (no kubelet here makes it Ready, so the old one stays too).
        found = [p for p in pods(kube, name) if p.metadata.annotations.get("example.test/restartedAt") == "1"]
        return bool(found) and all(sidecar(p) is not None for p in found)

    wait_for(rolled, 60, "the new pods, injected")
    kube.converged(op, name)
    assert kube.rollouts(name) == before + 1 and kube.get(name).metadata.generation == new


def test_a_webhook_that_is_down_blocks_no_pod_and_the_pods_without_the_sidecar_are_reported(
    webhook: Webhook, kube: Kube
) -> None:
    webhook.start()
    name = "ws-gateway"
    kube.create(deployment(name, {"tcp-exporter/port": "8080"}))
    all_injected(kube, name, 1)
    webhook.stop()  # down: the API server cannot reach it, failurePolicy Ignore creates the pod anyway
    kube.patch(name, {"spec": {"replicas": 3}})
    wait_for(lambda: len(pods(kube, name)) == 3, 60, "3 pods, created without the webhook")
    assert sum(sidecar(p) is None for p in pods(kube, name)) == 2
    webhook.start()
    warned = wait_for(
        lambda: [e for e in kube.events(name, "Warning") if e.reason == "PodsNotInjected"], 60, "the Warning"
    )
    assert "2 of this Deployment's 3 pods" in warned[0].message and "rollout restart" in warned[0].message


def test_the_certificate_is_renewed_and_trusted_without_a_restart_and_a_cleared_ca_bundle_is_put_back(
    webhook: Webhook, kube: Kube
) -> None:
    webhook.validity = 12  # renewed once 2/3 of its 13 s have passed (and at once, the Secret's being a year's)
    webhook.start()
    first = webhook.secret()["tls.crt"]
    assert 0 < remaining(first) <= 12
    wait_for(lambda: webhook.secret()["tls.crt"] != first, 60, "a renewed certificate")
    kube.create(deployment("broker", {"tcp-exporter/port": "8080"}))
    all_injected(kube, "broker", 1)  # the API server trusts the renewed one: the same CA signed it
    patch = [{"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": ""}]
    webhook.admission.patch_mutating_webhook_configuration(CONFIGURATION, patch)  # as a GitOps re-apply would
    wait_for(webhook.trusted, 30, "the caBundle put back")


def test_pods_in_the_operators_namespace_and_kube_system_are_never_injected(
    webhook: Webhook, kube: Kube, kubectl: Callable[..., str]
) -> None:
    webhook.start()
    apps = kube.apps
    for namespace in ("kube-system", NAMESPACE):
        body = deployment("never-injected", {"tcp-exporter/port": "8080"})
        body["spec"]["template"]["spec"]["securityContext"] = {  # the operator's namespace enforces restricted
            "runAsNonRoot": True,
            "runAsUser": 65532,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        body["spec"]["template"]["spec"]["containers"][0]["securityContext"] = {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        }
        apps.create_namespaced_deployment(namespace, body)
    try:
        for namespace in ("kube-system", NAMESPACE):
            other = Kube(webhook.api, namespace)
            found = wait_for(lambda o=other: pods(o, "never-injected") or None, 60, f"the pod in {namespace}")
            assert sidecar(found[0]) is None, namespace
    finally:
        for namespace in ("kube-system", NAMESPACE):
            apps.delete_namespaced_deployment("never-injected", namespace)
    assert (
        json.loads(kubectl("get", "mutatingwebhookconfiguration", CONFIGURATION, "-o", "json"))["webhooks"][0][
            "failurePolicy"
        ]
        == "Ignore"
    )


def test_uninstall_says_which_pods_keep_the_sidecar_and_only_a_whole_uninstall_deletes_the_webhook_configuration(
    webhook: Webhook, kube: Kube, cluster: Any
) -> None:
    webhook.start()
    kube.create(deployment("orders-api", {"tcp-exporter/port": "8080"}))
    all_injected(kube, "orders-api", 1)
    wait_for(lambda: kube.scaled_object("orders-api"), 30, "the ScaledObject")
    webhook.stop()  # as the README says: delete the operator first
    env = {**os.environ, "KUBECONFIG": cluster.kubeconfig}

    def uninstall(*args: str) -> str:
        done = subprocess.run(
            [OPERATOR, "uninstall", *args], capture_output=True, text=True, env=env, timeout=120, check=False
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    # One namespace's uninstall: its own objects only; the cluster's webhook configuration stays for the others.
    out = uninstall("-n", kube.ns)
    assert f"kubectl -n {kube.ns} rollout restart deployment/orders-api" in out, out
    assert "MutatingWebhookConfiguration" not in out, out
    assert kube.scaled_object("orders-api") is None
    webhook.admission.read_mutating_webhook_configuration(CONFIGURATION)  # still there
    assert kube.get("orders-api").spec.template.spec.init_containers is None  # nothing was ever in the template
    # The whole cluster's (dry: other tests' namespaces are not this test's to change) deletes it.
    assert "MutatingWebhookConfiguration tcp-exporter: would delete" in uninstall("--dry-run")


def test_with_external_certificates_the_operator_serves_what_cert_manager_wrote_and_writes_neither_secret_nor_bundle(
    webhook: Webhook, kube: Kube, audit: Audit
) -> None:
    issued = issue(("127.0.0.1",), 3600)  # what cert-manager's Certificate would write, and its cainjector
    secret = {k: base64.b64encode(issued[k]).decode() for k in ("tls.crt", "tls.key", "ca.crt")}
    try:
        webhook.core.delete_namespaced_secret(SECRET, NAMESPACE)  # the operator's, of the tests before
    except ApiException as exc:
        assert exc.status == 404
    webhook.core.create_namespaced_secret(
        NAMESPACE, {"metadata": {"name": SECRET}, "type": "kubernetes.io/tls", "data": secret}
    )
    bundle = [{"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": secret["ca.crt"]}]
    webhook.admission.patch_mutating_webhook_configuration(CONFIGURATION, bundle)
    mark = audit.mark()
    webhook.start(TCP_EXPORTER_OPERATOR_WEBHOOK_CERTS="external")
    kube.create(deployment("game-proxy", {"tcp-exporter/port": "8080"}))
    all_injected(kube, "game-proxy", 1)
    assert webhook.secret()["tls.crt"] == issued["tls.crt"]
    written = {w[1] for w in audit.writes(mark)}
    assert not written & {"secrets", "mutatingwebhookconfigurations"}, written


def test_the_pods_of_an_annotated_statefulset_get_the_sidecar_and_the_statefulset_stays_as_written(
    webhook: Webhook, kube: Kube
) -> None:
    webhook.kubectl("apply", "-f", "-", input=STATEFULSET_RBAC)
    try:
        webhook.start(TCP_EXPORTER_OPERATOR_WORKLOAD_KINDS="Deployment,StatefulSet")
        statefulset_pods_injected(webhook, kube)
    finally:
        webhook.kubectl("delete", "-f", "-", "--ignore-not-found", input=STATEFULSET_RBAC)


def statefulset_pods_injected(webhook: Webhook, kube: Kube) -> None:
    body = deployment("nats", {"tcp-exporter/port": "8080"})
    body["kind"] = "StatefulSet"
    body["spec"]["serviceName"] = "nats"
    kube.apps.create_namespaced_stateful_set(kube.ns, body)

    def pod() -> Any:
        try:
            return kube.core.read_namespaced_pod("nats-0", kube.ns)
        except ApiException:
            return None

    created = wait_for(pod, 60, "the StatefulSet's pod nats-0")
    assert sidecar(created) is not None and created.metadata.annotations[INJECTED]
    so = wait_for(lambda: kube.scaled_object("nats"), 30, "the ScaledObject")
    assert so["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"
    sts = kube.apps.read_namespaced_stateful_set("nats", kube.ns)
    assert not sts.spec.template.spec.init_containers and "tcp-exporter/status" not in sts.metadata.annotations


def test_the_pods_of_an_annotated_rollout_get_the_sidecar_in_either_form_and_the_rollouts_stay_as_written(
    webhook: Webhook, kube: Kube, argo_rollouts: Any
) -> None:
    webhook.kubectl("apply", "-f", "-", input=ROLLOUT_RBAC)
    try:
        webhook.start(TCP_EXPORTER_OPERATOR_WORKLOAD_KINDS="Deployment,Rollout")
        rollouts = Rollouts(kube)
        rollouts.create(rollout("game-proxy", {"tcp-exporter/port": "8080"}))
        # The workloadRef form: the pod template is a Deployment's (scaled to nothing), which stays unannotated.
        template = deployment("lobby-template", {})
        template["spec"]["replicas"] = 0
        kube.create(template)
        rollouts.create(rollout("lobby", {"tcp-exporter/port": "8080"}, workload_ref="lobby-template"))
        for name, app in (("game-proxy", "game-proxy"), ("lobby", "lobby-template")):
            pods = wait_for(lambda a=app: rollouts.pods(a) or None, 60, f"the pods of the Rollout {name}")
            assert sidecar(pods[0]) is not None and pods[0].metadata.annotations[INJECTED], name
            assert f"--deployment={name}" in " ".join(sidecar(pods[0]).args)
            so = wait_for(lambda n=name: kube.scaled_object(n), 30, f"the ScaledObject of {name}")
            target = so["spec"]["scaleTargetRef"]
            assert target == {"apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout", "name": name}
            written = rollouts.get(name)
            assert "tcp-exporter/status" not in written["metadata"]["annotations"], name
            assert not (written["spec"].get("template") or {}).get("spec", {}).get("initContainers"), name
        assert "tcp-exporter" not in kube.containers("lobby-template")
    finally:
        webhook.kubectl("delete", "-f", "-", "--ignore-not-found", input=ROLLOUT_RBAC)


def test_a_forged_request_naming_another_workloads_replicaset_gets_no_patch_and_learns_nothing(
    webhook: Webhook, kube: Kube, tmp_path: Any
) -> None:
    webhook.start()
    kube.create(deployment("payments", {"tcp-exporter/port": "8080"}))
    real = all_injected(kube, "payments", 1)[0]
    owner = real.metadata.owner_references[0]
    (tmp_path / "ca.crt").write_bytes(webhook.secret()["ca.crt"])
    trust = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))

    def ask(uid: str) -> dict[str, Any]:
        """What any pod that reaches the port can send: a review it wrote, naming the victim's ReplicaSet."""
        ref = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": owner.name, "uid": uid, "controller": True}
        pod = {
            "metadata": {"labels": dict(real.metadata.labels), "ownerReferences": [ref]},
            "spec": {"containers": [{"name": "app", "image": "example.test/app:1"}]},
        }
        review = {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "1",
                "kind": {"kind": "Pod"},
                "operation": "CREATE",
                "namespace": kube.ns,
                "object": pod,
            },
        }
        request = urllib.request.Request(
            f"https://127.0.0.1:{webhook.port}/mutate-pods", data=json.dumps(review).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=10, context=trust) as resp:
            return dict(json.loads(resp.read())["response"])

    forged = ask("00000000-0000-4000-8000-000000000000")
    assert forged == {"uid": "1", "allowed": True}  # no patch: nothing of the Deployment's settings
    assert "patch" in ask(owner.uid)  # the same request with the ReplicaSet's real UID (the API server's) is injected
