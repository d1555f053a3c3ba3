"""The operator in its webhook injection mode on a local control plane, installed as manifests/'s webhook component
and called by the API server on loopback: what the webhook tests and bench/webhook.py share."""

from __future__ import annotations

import base64
import socket
import ssl
from collections.abc import Callable
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from harness.helpers import wait_for
from harness.operator_proc import NAMESPACE, Operator, free_port, install

CONFIGURATION = "tcp-exporter"
SECRET = "tcp-exporter-webhook-tls"  # noqa: S105 - a name


class Webhook:
    """The operator in webhook mode, installed with manifests/'s webhook component; the API server calls it on
    loopback (the configuration's Service reference replaced by its URL: no kube-proxy on this control plane)."""

    def __init__(self, cluster: Any, kubectl: Callable[..., str], api: Any, validity: int = 365 * 86400) -> None:
        self.cluster, self.kubectl, self.api = cluster, kubectl, api
        self.port = free_port()
        self.admission = client.AdmissionregistrationV1Api(api)
        self.core = client.CoreV1Api(api)
        self.validity = validity
        self.op: Operator | None = None

    def install(self) -> None:
        install(self.kubectl, components=("scale-in", "webhook"))
        url = f"https://127.0.0.1:{self.port}/mutate-pods"
        patch = [
            {"op": "remove", "path": "/webhooks/0/clientConfig/service"},
            {"op": "add", "path": "/webhooks/0/clientConfig/url", "value": url},
        ]
        self.admission.patch_mutating_webhook_configuration(CONFIGURATION, patch)

    def start(self, **extra: str) -> Operator:
        env = {
            "TCP_EXPORTER_OPERATOR_INJECTION": "webhook",
            "TCP_EXPORTER_OPERATOR_WEBHOOK_ADDRESS": f"127.0.0.1:{self.port}",
            "TCP_EXPORTER_OPERATOR_WEBHOOK_HOSTS": "127.0.0.1",
            "TCP_EXPORTER_OPERATOR_WEBHOOK_CERT_VALIDITY": str(self.validity),
            **extra,
        }
        self.op = Operator(self.cluster, self.kubectl, env=env)
        wait_for(self.trusted, 30, "the caBundle and the Secret")
        wait_for(self.serving, 30, "the webhook serving TLS")
        return self.op

    def serving(self) -> bool:
        """Whether the webhook completes a TLS handshake (it has loaded a certificate): what its readiness probe,
        an HTTPS GET of /healthz, sees."""
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as raw, context.wrap_socket(raw):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.op is not None:
            self.op.close()
            self.op = None

    def secret(self) -> dict[str, bytes]:
        data = self.core.read_namespaced_secret(SECRET, NAMESPACE).data or {}
        return {k: base64.b64decode(v) for k, v in data.items()}

    def ca_bundle(self) -> bytes:
        config = self.admission.read_mutating_webhook_configuration(CONFIGURATION)
        return base64.b64decode(config.webhooks[0].client_config.ca_bundle or "")

    def trusted(self) -> bool:
        try:
            secret = self.secret()
        except ApiException:
            return False
        return bool(secret.get("ca.crt")) and self.ca_bundle() == secret["ca.crt"]

    def remove(self) -> None:
        self.stop()
        for delete in (
            lambda: self.admission.delete_mutating_webhook_configuration(CONFIGURATION),
            lambda: self.core.delete_namespaced_secret(SECRET, NAMESPACE),
        ):
            try:
                delete()
            except ApiException as exc:
                if exc.status != 404:
                    raise
