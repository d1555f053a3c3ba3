"""The few API calls the operator makes, with "already exists" and "already gone" treated as the non-errors they are.

Bodies go out and come back as plain dicts: the client's model classes are
neither needed nor cheap at a thousand Deployments.
"""

from __future__ import annotations

import datetime
import json
import logging
import socket
from collections.abc import Mapping
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tcp_exporter_operator.builders import MANAGED_BY, Event

log = logging.getLogger(__name__)
KEDA = ("keda.sh", "v1alpha1", "scaledobjects")
PODMONITOR = ("monitoring.coreos.com", "v1", "podmonitors")


class Conflict(Exception):
    """The object changed since it was read: read it again and re-plan."""


class Kube:
    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        if api_client is None:
            try:
                config.load_incluster_config()  # type: ignore[no-untyped-call]
            except config.ConfigException:
                config.load_kube_config()  # type: ignore[no-untyped-call]
            api_client = client.ApiClient()
        self.client = api_client
        self.apps = client.AppsV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.instance = socket.gethostname()

    def close(self) -> None:
        self.client.close()  # type: ignore[no-untyped-call]

    def get_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            resp = self.apps.read_namespaced_deployment(name, namespace, _preload_content=False)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(json.loads(resp.data))  # type: ignore[attr-defined]

    def patch_deployment(self, namespace: str, name: str, ops: list[dict[str, Any]]) -> str:
        """Apply a JSON patch; return the new resourceVersion."""
        try:
            resp = self.apps.patch_namespaced_deployment(
                name, namespace, ops, _preload_content=False, _content_type="application/json-patch+json"
            )
        except ApiException as exc:
            # 422 is a failed `test` operation: what the patch replaces changed since it was read.
            if exc.status in (409, 422):
                raise Conflict(f"deployment {namespace}/{name} changed") from exc
            raise
        return str(json.loads(resp.data)["metadata"]["resourceVersion"])  # type: ignore[attr-defined]

    def create_scaled_object(self, body: Mapping[str, Any]) -> None:
        self._create(KEDA, body)

    def update_scaled_object(self, body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        patch = {"metadata": {"labels": meta["labels"]}, "spec": body["spec"]}
        self.custom.patch_namespaced_custom_object(
            *KEDA[:2], meta["namespace"], KEDA[2], meta["name"], patch, _content_type="application/merge-patch+json"
        )

    def delete_scaled_object(self, namespace: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(*KEDA[:2], namespace, KEDA[2], name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def create_pod_monitor(self, body: Mapping[str, Any]) -> None:
        self._create(PODMONITOR, body)

    def _create(self, resource: tuple[str, str, str], body: Mapping[str, Any]) -> None:
        group, version, plural = resource
        try:
            self.custom.create_namespaced_custom_object(
                group, version, body["metadata"]["namespace"], plural, dict(body)
            )
        except ApiException as exc:
            if exc.status == 403 and "NamespaceTerminating" in str(exc.body):
                log.debug("not creating %s %s: its namespace is being deleted", plural, body["metadata"]["name"])
                return
            if exc.status != 409:
                raise
            log.debug("%s %s already exists", plural, body["metadata"]["name"])

    def ensure_peering(self, name: str) -> None:
        """The cluster-wide kopf peering object the replicas share; created if missing."""
        try:
            self.custom.create_cluster_custom_object(
                "kopf.dev",
                "v1",
                "clusterkopfpeerings",
                {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": name}},
            )
        except ApiException as exc:
            if exc.status != 409:
                raise

    def post_event(self, deployment: Mapping[str, Any], event: Event) -> None:
        meta = deployment["metadata"]
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": event.type,
            "reason": event.reason,
            "message": event.message,
            "source": {"component": MANAGED_BY},
            "reportingComponent": MANAGED_BY,
            "reportingInstance": self.instance,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.core.create_namespaced_event(meta["namespace"], body, _preload_content=False)  # type: ignore[arg-type]
        except ApiException as exc:
            log.warning(
                "could not post event %s on %s/%s: %s", event.reason, meta["namespace"], meta["name"], exc.reason
            )
