"""The foundation: the local control plane really behaves like Kubernetes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from harness.helpers import wait_for

pytestmark = pytest.mark.cluster


def _sa_client(api: Any, cluster: Any, namespace: str, name: str) -> client.ApiClient:
    """An ApiClient authenticated as a fresh ServiceAccount, through TokenRequest."""
    core = client.CoreV1Api(api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": name}})
    token = core.create_namespaced_service_account_token(
        name, namespace, {"spec": {"expirationSeconds": 3600}}
    ).status.token
    cfg = client.Configuration()
    cfg.host = cluster.server
    cfg.ssl_ca_cert = str(Path(cluster.state_dir) / "pki" / "ca.crt")
    cfg.api_key = {"authorization": f"Bearer {token}"}
    return client.ApiClient(cfg)


def test_kubectl_reports_ready_and_server_version(kubectl: Any) -> None:
    assert kubectl("get", "--raw", "/readyz").strip() == "ok"
    version = json.loads(kubectl("version", "-o", "json"))
    assert version["serverVersion"]["gitVersion"].startswith("v1.37")


def test_serviceaccount_token_is_denied_what_rbac_does_not_grant(api: Any, cluster: Any, namespace: str) -> None:
    sa = _sa_client(api, cluster, namespace, "nobody")
    core = client.CoreV1Api(sa)
    with pytest.raises(ApiException) as denied:
        core.list_namespaced_config_map(namespace)
    assert denied.value.status == 403

    rbac = client.RbacAuthorizationV1Api(api)
    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "read-cm"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "read-cm"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-cm"},
            "subjects": [{"kind": "ServiceAccount", "name": "nobody", "namespace": namespace}],
        },
    )
    core.list_namespaced_config_map(namespace)  # now allowed
    with pytest.raises(ApiException) as still_denied:
        core.create_namespaced_config_map(namespace, {"metadata": {"name": "x"}})
    assert still_denied.value.status == 403


def test_garbage_collector_deletes_owned_object_with_its_owner(api: Any, namespace: str) -> None:
    core = client.CoreV1Api(api)
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    core.create_namespaced_config_map(
        namespace,
        {
            "metadata": {
                "name": "owned",
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "kind": "ConfigMap",
                        "name": "owner",
                        "uid": owner.metadata.uid,
                    }
                ],
            }
        },
    )
    core.delete_namespaced_config_map("owner", namespace)

    def owned_gone() -> bool:
        return "owned" not in {cm.metadata.name for cm in core.list_namespaced_config_map(namespace).items}

    wait_for(owned_gone, 60, "the garbage collector to delete the owned ConfigMap")


def _deployment(name: str, image: str = "example.invalid/app:1") -> dict[str, Any]:
    labels = {"app": name}
    return {
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [{"name": "app", "image": image}]}},
        },
    }


def test_deployment_controller_makes_a_replicaset_per_template(api: Any, namespace: str) -> None:
    apps = client.AppsV1Api(api)
    apps.create_namespaced_deployment(namespace, _deployment("web"))

    def replicasets() -> list[Any]:
        return list(apps.list_namespaced_replica_set(namespace).items)

    wait_for(lambda: len(replicasets()) == 1, 60, "a first ReplicaSet")
    apps.patch_namespaced_deployment(
        "web",
        namespace,
        {"spec": {"template": {"spec": {"containers": [{"name": "app", "image": "example.invalid/app:2"}]}}}},
    )
    wait_for(lambda: len(replicasets()) == 2, 60, "a second ReplicaSet after a template change")
    # An edit outside the template (the replica count) makes no new ReplicaSet.
    apps.patch_namespaced_deployment("web", namespace, {"spec": {"replicas": 2}})
    wait_for(
        lambda: apps.read_namespaced_deployment("web", namespace).status.observed_generation == 3,
        30,
        "the deployment controller to observe the scale",
    )
    assert len(replicasets()) == 2


def test_audit_log_records_writes_by_client_name(api: Any, cluster: Any, namespace: str) -> None:
    sa = _sa_client(api, cluster, namespace, "writer")
    rbac = client.RbacAuthorizationV1Api(api)
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "writer-edit"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
            "subjects": [{"kind": "ServiceAccount", "name": "writer", "namespace": namespace}],
        },
    )
    client.CoreV1Api(sa).create_namespaced_config_map(namespace, {"metadata": {"name": "audited"}})
    user = f"system:serviceaccount:{namespace}:writer"

    def writes() -> list[dict[str, Any]]:
        events = [json.loads(line) for line in Path(cluster.audit_log).read_text().splitlines() if line]
        return [e for e in events if e["user"].get("username") == user and e["stage"] == "ResponseComplete"]

    found = wait_for(writes, 10, "the audit event of the ServiceAccount's write")
    assert [(e["verb"], e["objectRef"]["resource"], e["objectRef"]["name"]) for e in found] == [
        ("create", "configmaps", "audited")
    ]


def test_kedas_real_scaledobject_crd_refuses_number_metadata_and_a_nameless_target(api: Any, namespace: str) -> None:
    custom = client.CustomObjectsApi(api)

    def scaled_object(metadata: dict[str, Any], **trigger: Any) -> dict[str, Any]:
        return {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "ScaledObject",
            "metadata": {"name": "so"},
            "spec": {
                "scaleTargetRef": {"name": "web"},
                "triggers": [{"type": "prometheus", "metadata": metadata, **trigger}],
            },
        }

    def create(body: dict[str, Any]) -> None:
        custom.create_namespaced_custom_object("keda.sh", "v1alpha1", namespace, "scaledobjects", body)

    with pytest.raises(ApiException) as number:
        create(scaled_object({"threshold": 100}))
    assert number.value.status == 422
    # (metricType's values are checked by KEDA's admission webhook, not by its CRD: not run here.)
    no_name = scaled_object({"threshold": "100"})
    del no_name["spec"]["scaleTargetRef"]["name"]
    with pytest.raises(ApiException) as missing:
        create(no_name)
    assert missing.value.status == 422
    create(scaled_object({"threshold": "100"}, metricType="AverageValue"))
