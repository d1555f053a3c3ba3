"""The few API calls the operator makes, over plain HTTPS, with "already exists" and "already gone" treated as
the non-errors they are.

No Kubernetes client library: kopf's own login functions give the credentials (in-cluster ServiceAccount or
KUBECONFIG), the standard library's http.client sends a handful of JSON requests, and the operator does not
pay the official client's 40 MB of generated models for them.
"""

from __future__ import annotations

import base64
import datetime
import http.client
import json
import logging
import os
import socket
import ssl
import tempfile
import urllib.parse
from collections.abc import Mapping
from typing import Any

import kopf

from tcp_exporter_operator.builders import MANAGED_BY, Event

log = logging.getLogger(__name__)
# The objects the operator makes for a Deployment, by kind: their API group's path.
CHILDREN = {"ScaledObject": "/apis/keda.sh/v1alpha1", "PodMonitor": "/apis/monitoring.coreos.com/v1"}
JSON_PATCH = "application/json-patch+json"
REQUEST_TIMEOUT = 15.0


class ApiError(Exception):
    """The API server answered with an error status."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"{status}: {body[:300]}")
        self.status = status
        self.body = body


class Conflict(Exception):
    """The object changed since it was read: read it again and re-plan."""


def _data(value: str | bytes) -> bytes:
    """kubeconfig *-data fields are base64 of PEM."""
    raw = value.encode() if isinstance(value, str) else value
    return raw if raw.lstrip().startswith(b"-----") else base64.b64decode(raw)


def tls_context(info: kopf.ConnectionInfo) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if info.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif info.ca_path:
        ctx.load_verify_locations(cafile=os.fsdecode(info.ca_path))
    elif info.ca_data:
        ctx.load_verify_locations(cadata=_data(info.ca_data).decode())
    cert, key = info.certificate_path, info.private_key_path
    if info.certificate_data or info.private_key_data:
        folder = tempfile.mkdtemp(prefix="tcpx-operator-tls-")  # load_cert_chain reads files only
        if info.certificate_data:
            cert = os.path.join(folder, "tls.crt")
            with open(cert, "wb") as f:
                f.write(_data(info.certificate_data))
        if info.private_key_data:
            key = os.path.join(folder, "tls.key")
            with open(os.open(key, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
                f.write(_data(info.private_key_data))
    if cert:
        ctx.load_cert_chain(os.fsdecode(cert), os.fsdecode(key) if key else None)
    return ctx


class Kube:
    def __init__(self, info: kopf.ConnectionInfo) -> None:
        url = urllib.parse.urlsplit(info.server)
        self.host, self.port = url.hostname or "localhost", url.port or 443
        self.prefix = url.path.rstrip("/")
        self.ctx = tls_context(info)
        self.headers = {"Accept": "application/json", "User-Agent": f"{MANAGED_BY}"}
        if info.token:
            self.headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
        elif info.username and info.password:
            basic = base64.b64encode(f"{info.username}:{info.password}".encode()).decode()
            self.headers["Authorization"] = f"Basic {basic}"
        self.instance = socket.gethostname()

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        """Send one request; return the decoded JSON answer; raise ApiError for an error status.

        One connection per request: no kept-alive connection can go stale between two requests.
        """
        payload = None if body is None else json.dumps(body).encode()
        headers = dict(self.headers)
        if payload is not None:
            headers["Content-Type"] = content_type
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=REQUEST_TIMEOUT)
        try:
            conn.request(method, self.prefix + path, body=payload, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if resp.status >= 400:
            raise ApiError(resp.status, data.decode(errors="replace"))
        return json.loads(data) if data else None

    def get_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return dict(self.request("GET", f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}"))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def patch_deployment(self, namespace: str, name: str, ops: list[dict[str, Any]]) -> str:
        """Apply a JSON patch; return the new resourceVersion."""
        try:
            new = self.request("PATCH", f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}", ops, JSON_PATCH)
        except ApiError as exc:
            # 422 is a failed `test` operation: what the patch replaces changed since it was read.
            if exc.status in (409, 422):
                raise Conflict(f"deployment {namespace}/{name} changed") from exc
            raise
        return str(new["metadata"]["resourceVersion"])

    def create_child(self, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """Create a ScaledObject or PodMonitor; if one of that name exists, return it (ours or not) instead."""
        meta = body["metadata"]
        try:
            self.request("POST", self._collection(body["kind"], meta["namespace"]), dict(body))
        except ApiError as exc:
            if exc.status == 403 and "NamespaceTerminating" in exc.body:
                log.debug("not creating %s %s: its namespace is being deleted", body["kind"], meta["name"])
                return None
            if exc.status != 409:
                raise
            existing = self.request("GET", f"{self._collection(body['kind'], meta['namespace'])}/{meta['name']}")
            return dict(existing)
        return None

    def replace_child(self, body: Mapping[str, Any]) -> None:
        """Our child's spec and labels replaced whole: an option the user removed goes too (a merge patch keeps
        what it does not mention)."""
        meta = body["metadata"]
        ops = [
            {"op": "add", "path": "/metadata/labels", "value": meta["labels"]},
            {"op": "replace", "path": "/spec", "value": body["spec"]},
        ]
        self.request("PATCH", f"{self._collection(body['kind'], meta['namespace'])}/{meta['name']}", ops, JSON_PATCH)

    def delete_child(self, kind: str, namespace: str, name: str) -> None:
        try:
            self.request("DELETE", f"{self._collection(kind, namespace)}/{name}")
        except ApiError as exc:
            if exc.status != 404:
                raise

    @staticmethod
    def _collection(kind: str, namespace: str) -> str:
        return f"{CHILDREN[kind]}/namespaces/{namespace}/{kind.lower()}s"

    def ensure_peering(self, name: str) -> None:
        """The cluster-wide kopf peering object the replicas share; created if missing."""
        self._create(
            "/apis/kopf.dev/v1/clusterkopfpeerings",
            {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": name}},
        )

    def _create(self, path: str, body: Mapping[str, Any]) -> None:
        try:
            self.request("POST", path, dict(body))
        except ApiError as exc:
            if exc.status == 403 and "NamespaceTerminating" in exc.body:
                log.debug("not creating %s: its namespace is being deleted", path)
                return
            if exc.status != 409:
                raise
            log.debug("%s %s already exists", path, body["metadata"]["name"])

    def post_event(self, deployment: Mapping[str, Any], event: Event) -> None:
        meta = deployment["metadata"]
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
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
            self.request("POST", f"/api/v1/namespaces/{meta['namespace']}/events", body)
        except ApiError as exc:
            log.warning("could not post event %s on %s/%s: %s", event.reason, meta["namespace"], meta["name"], exc)
