"""The few API calls the operator makes, through the official Kubernetes client, with "already exists" and
"already gone" treated as the non-errors they are.

Credentials: the client loads the in-cluster ServiceAccount (whose token file it re-reads) or the kubeconfig in
any of its forms (exec plugins as EKS, GKE and AKS use, client certificates, tokens). A token can be revoked
before the expiry it announced, so a 401 reloads the credentials and retries the call once. kopf logs in through
the same loader (`handlers.login_handler`), so its watches (kopf's peering) refresh the same way.

Answers are read as plain JSON (`_preload_content=False`): the operator needs a few fields, not the client's
generated models, and building those for every Deployment would cost more than the request.
"""

from __future__ import annotations

import base64
import datetime
import json
import logging
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tcp_exporter_operator import metrics
from tcp_exporter_operator.events import CHILDREN, MANAGED_BY, PEERING, Event
from tcp_exporter_operator.workloads import ROLLOUT, ROLLOUTS, STATEFULSET, kind_of, said, split, workload_api_version

log = logging.getLogger(__name__)
T = TypeVar("T")
REQUEST_TIMEOUT = 15.0
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"  # said explicitly: the client would guess merge-patch for some APIs
POOL_SIZE = 16  # the reconcile workers (8) and the Event posters (4) at once, with room: none waits for a connection
Lister = Callable[..., Any]  # (api client, scope, **list parameters) -> the raw response of a list or watch


class ApiError(Exception):
    """The API server answered with an error status."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"{status}: {body[:300]}")
        self.status = status
        self.body = body


class Conflict(Exception):
    """The object changed since it was read: read it again and re-plan."""


def patch_did_not_apply(body: str) -> bool:
    """Whether a 422 answer to a JSON patch says the patch itself did not apply (a failed `test` operation, or a
    path that is gone: what it was planned on changed), as opposed to the patched object being refused
    (validation, a ValidatingAdmissionPolicy). The API server reports the former as a bare Status of reason
    Invalid, naming no kind, object or cause (apiserver's patch handler, NewGenericServerResponse); a refusal
    names the kind and its causes, or the policy in its message."""
    try:
        status = json.loads(body)
    except ValueError:
        return False
    if not isinstance(status, dict) or status.get("reason") != "Invalid":
        return False
    details = status.get("details") or {}
    if not isinstance(details, dict):
        return False
    generic = str(status.get("message", "")).startswith("the server rejected our request due to an error")
    return generic and not (details.get("kind") or details.get("name") or details.get("causes"))


def load_configuration() -> client.Configuration:
    """In-cluster ServiceAccount, else KUBECONFIG or ~/.kube/config, in every form the official client reads."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    configuration.connection_pool_maxsize = POOL_SIZE
    return configuration


class Kube:
    def __init__(self, loader: Callable[[], client.Configuration] = load_configuration) -> None:
        self.loader = loader
        self.lock = threading.Lock()
        self.api = client.ApiClient(loader())
        self.instance = socket.gethostname()
        # Since when every call has been refused as unauthenticated, even with credentials loaded afresh.
        self.refused_since: float | None = None

    def relogin(self, failed: client.ApiClient) -> None:
        """New credentials, unless another thread already got them since `failed` was refused."""
        with self.lock:
            if self.api is failed:
                log.info("the API server refused our credentials (401): loading them again")
                self.api = client.ApiClient(self.loader())

    def call(
        self, fn: Callable[[client.ApiClient], T], write: tuple[str, str] | None = None, stream: bool = False
    ) -> T:
        """Run one API call; a 401 reloads the credentials and retries once; errors become ApiError.
        `write` is (kind, verb) of a write, counted in the operator's metrics by result.

        An answer is read whole before this returns (unless `stream`, for a watch): read with
        `_preload_content=False`, an answer nobody reads keeps its connection out of the pool, and the next call
        opens a new one, TLS handshake included (that was most of the operator's CPU, and the API server's)."""
        for attempt in (1, 2):
            api = self.api
            try:
                result = fn(api)
            except ApiException as exc:
                if exc.status == 401 and attempt == 1:
                    self.relogin(api)
                    continue
                if exc.status == 401 and self.refused_since is None:
                    self.refused_since = time.monotonic()
                if write:
                    metrics.WRITES.labels(*write, metrics.write_result(exc.status)).inc()
                raise ApiError(int(exc.status or 0), str(exc.body or exc.reason)) from None
            except Exception:
                if write:
                    metrics.WRITES.labels(*write, "error").inc()
                raise
            self.refused_since = None
            if write:
                metrics.WRITES.labels(*write, "ok").inc()
            if not stream and isinstance(result, urllib3.response.BaseHTTPResponse):
                result.data  # noqa: B018 - read whole (and cached): the connection goes back to the pool
            return result
        raise AssertionError("unreachable")

    @staticmethod
    def _json(response: Any) -> dict[str, Any]:
        data = response.data
        return dict(json.loads(data)) if data else {}

    def check_credentials(self) -> None:
        """One cheap authenticated read (a namespace list of one), re-logging in if refused; raises ApiError."""
        self.call(lambda api: client.CoreV1Api(api).list_namespace(limit=1, _preload_content=False))

    def server_version(self) -> tuple[int, int] | None:
        """The API server's (major, minor) version; None when it does not say in numbers."""
        info = self.call(lambda api: client.VersionApi(api).get_code(_request_timeout=REQUEST_TIMEOUT))
        major, minor = (re.match(r"[0-9]+", str(v or "")) for v in (info.major, info.minor))
        return (int(major.group()), int(minor.group())) if major and minor else None

    # -- Deployments ------------------------------------------------------------------------------

    def get_deployment(self, namespace: str, name: str, timeout: float = REQUEST_TIMEOUT) -> dict[str, Any] | None:
        """The workload under this key (a Deployment's name, `StatefulSet/NAME` or `Rollout/NAME`: workloads.py),
        kind said."""
        kind, name = split(name)

        def read(api: client.ApiClient) -> Any:
            options: dict[str, Any] = {"_preload_content": False, "_request_timeout": timeout}
            if kind == ROLLOUT:
                return client.CustomObjectsApi(api).get_namespaced_custom_object(
                    ROLLOUTS[0], ROLLOUTS[1], namespace, ROLLOUTS[2], name, **options
                )
            apps = client.AppsV1Api(api)
            if kind == STATEFULSET:
                return apps.read_namespaced_stateful_set(name, namespace, **options)
            return apps.read_namespaced_deployment(name, namespace, **options)

        found = self._get(read)
        return said(found, kind) if found is not None else None

    def _get(self, read: Callable[[client.ApiClient], Any]) -> dict[str, Any] | None:
        """One read of one object (its JSON); None where it does not exist."""
        try:
            return self.call(lambda api: self._json(read(api)))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def list_hpas(self, namespace: str, not_older_than: str | None) -> list[dict[str, Any]]:
        """The namespace's HorizontalPodAutoscalers as of resourceVersion `not_older_than` or later (see
        `hpa_summary`): every HPA written before that version is in the answer.

        Served from the API server's watch cache once it has caught up to that version, which it usually has: a
        Deployment's own version is a moment old when it is planned. A read of the latest state instead (no
        resourceVersion) waits until the cache has caught up to etcd's newest revision, which keeps moving on a
        busy cluster: that wait was a third of the operator's time per Deployment at 1,000 created at once.
        Without a version (never in practice), the latest state."""
        match = "NotOlderThan" if not_older_than else None
        body = self.call(
            lambda api: self._json(
                client.AutoscalingV2Api(api).list_namespaced_horizontal_pod_autoscaler(
                    namespace, resource_version=not_older_than, resource_version_match=match,
                    _preload_content=False, _request_timeout=REQUEST_TIMEOUT,
                )
            )
        )  # fmt: skip
        return [hpa_summary(item) for item in body.get("items") or []]

    def patch_deployment(self, namespace: str, name: str, ops: list[dict[str, Any]]) -> tuple[str, int]:
        """Apply a JSON patch to the workload under this key; return the new resourceVersion and generation."""
        kind, name = split(name)

        def patch(api: client.ApiClient) -> Any:
            options: dict[str, Any] = {
                "_content_type": JSON_PATCH,
                "_preload_content": False,
                "_request_timeout": REQUEST_TIMEOUT,
            }
            if kind == ROLLOUT:
                return client.CustomObjectsApi(api).patch_namespaced_custom_object(
                    ROLLOUTS[0], ROLLOUTS[1], namespace, ROLLOUTS[2], name, ops, **options
                )
            apps = client.AppsV1Api(api)
            if kind == STATEFULSET:
                return apps.patch_namespaced_stateful_set(name, namespace, ops, **options)
            return apps.patch_namespaced_deployment(name, namespace, ops, **options)

        try:
            new = self.call(lambda api: self._json(patch(api)), write=(kind, "patch"))
        except ApiError as exc:
            if exc.status == 409 or (exc.status == 422 and patch_did_not_apply(exc.body)):
                raise Conflict(f"deployment {namespace}/{name} changed") from exc
            raise  # a refusal: validation, an admission policy or webhook (the caller warns, and does not retry)
        return str(new["metadata"]["resourceVersion"]), int(new["metadata"].get("generation") or 0)

    # -- pods: only their deletion cost -------------------------------------------------------------

    def may_patch_pods(self) -> bool:
        """Whether this account may patch pods cluster-wide (the scale-in component or chart value is installed):
        a SelfSubjectAccessReview, which every authenticated account may create."""
        review = client.V1SelfSubjectAccessReview(
            spec=client.V1SelfSubjectAccessReviewSpec(
                resource_attributes=client.V1ResourceAttributes(verb="patch", resource="pods", group="")
            )
        )
        answer = self.call(
            lambda api: self._json(
                client.AuthorizationV1Api(api).create_self_subject_access_review(
                    review, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
                )
            )
        )
        return bool((answer.get("status") or {}).get("allowed"))

    def pod_patches_confined(self, namespace: str, name: str) -> bool | None:
        """Whether the admission policy that confines the operator's pod patches to their deletion cost is in
        force: a dry-run patch of another annotation of this pod must be refused. None if the pod is gone."""
        body = {"metadata": {"annotations": {"tcp-exporter.dev/policy-check": "must-be-refused"}}}
        try:
            self.call(
                lambda api: client.CoreV1Api(api).patch_namespaced_pod(
                    name, namespace, body, dry_run="All", _content_type=MERGE_PATCH, _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT,
                )
            )  # fmt: skip
        except ApiError as exc:
            if exc.status in (403, 404):
                return None  # gone, or no right to patch pods at all (then no deletion cost is written either)
            return exc.status == 422 and "pod-deletion-cost" in exc.body  # the policy's own denial
        return False

    def set_deletion_cost(self, namespace: str, name: str, cost: int) -> bool:
        """Set a pod's controller.kubernetes.io/pod-deletion-cost (a merge patch of that one annotation: the
        admission policy in manifests/rbac lets the operator change nothing else of a pod). False if it is gone."""
        body = {"metadata": {"annotations": {"controller.kubernetes.io/pod-deletion-cost": str(cost)}}}
        try:
            self.call(
                lambda api: client.CoreV1Api(api).patch_namespaced_pod(
                    name, namespace, body, _content_type=MERGE_PATCH, _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT,
                ),
                write=("Pod", "patch"),
            )  # fmt: skip
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def get_replicaset(self, namespace: str, name: str, timeout: float = REQUEST_TIMEOUT) -> dict[str, Any] | None:
        """A ReplicaSet (webhook mode: whether a pod's owner reference is really its Deployment's)."""
        return self._get(
            lambda api: client.AppsV1Api(api).read_namespaced_replica_set(
                name, namespace, _preload_content=False, _request_timeout=timeout
            )
        )

    def list_pods(self, namespace: str, match_labels: Mapping[str, str]) -> list[dict[str, Any]]:
        """The namespace's pods with these labels (webhook mode: which of a Deployment's pods lack the sidecar),
        from the API server's watch cache (resourceVersion 0: no quorum read for a check)."""
        selector = ",".join(f"{k}={v}" for k, v in sorted(match_labels.items()))
        body = self.call(
            lambda api: self._json(
                client.CoreV1Api(api).list_namespaced_pod(
                    namespace, label_selector=selector, resource_version="0", _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT,
                )
            )
        )  # fmt: skip
        return list(body.get("items") or [])

    # -- the webhook's serving certificate (INJECTION=webhook) ---------------------------------------

    def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get(
            lambda api: client.CoreV1Api(api).read_namespaced_secret(
                name, namespace, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
            )
        )

    def write_secret(self, namespace: str, name: str, data: Mapping[str, bytes], version: str | None) -> bool:
        """Create the Secret (version None) or replace it at `version`; False if another writer came first."""
        body: Any = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {"app.kubernetes.io/managed-by": MANAGED_BY},
                **({"resourceVersion": version} if version else {}),
            },
            "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
        }
        core = client.CoreV1Api
        try:
            if version is None:
                self.call(
                    lambda api: core(api).create_namespaced_secret(
                        namespace, body, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
                    ),
                    write=("Secret", "create"),
                )
            else:
                self.call(
                    lambda api: core(api).replace_namespaced_secret(
                        name, namespace, body, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
                    ),
                    write=("Secret", "update"),
                )
        except ApiError as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def set_ca_bundle(self, name: str, bundle: str, replaces: Callable[[str], bool] = lambda current: True) -> bool:
        """Every webhook of the MutatingWebhookConfiguration `name` trusting `bundle` (base64 PEM), where
        `replaces(its current caBundle)`; whether a write was needed. A JSON patch preconditioned on the
        resourceVersion read, so an edit in between is not undone."""
        admission = client.AdmissionregistrationV1Api
        config = self.call(
            lambda api: self._json(
                admission(api).read_mutating_webhook_configuration(
                    name, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
                )
            )
        )
        ops: list[dict[str, Any]] = [
            {"op": "test", "path": "/metadata/resourceVersion", "value": config["metadata"]["resourceVersion"]}
        ]
        for i, hook in enumerate(config.get("webhooks") or []):
            current = (hook.get("clientConfig") or {}).get("caBundle")
            if current != bundle and replaces(str(current or "")):
                ops.append({"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": bundle})
        if len(ops) == 1:
            return False
        self.call(
            lambda api: admission(api).patch_mutating_webhook_configuration(
                name, ops, _content_type=JSON_PATCH, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
            ),
            write=("MutatingWebhookConfiguration", "patch"),
        )
        log.info("webhook: the caBundle of MutatingWebhookConfiguration %s updated", name)
        return True

    # -- children: ScaledObjects and PodMonitors ---------------------------------------------------

    def create_child(self, body: Mapping[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """Create a ScaledObject or PodMonitor: (what was created, None); if one of that name exists, (None, it),
        ours or not; (None, None) if there is nothing to create it in now."""
        group, version, plural = CHILDREN[body["kind"]]
        meta = body["metadata"]
        try:
            created = self.call(
                lambda api: self._json(
                    client.CustomObjectsApi(api).create_namespaced_custom_object(
                        group, version, meta["namespace"], plural, dict(body), _preload_content=False,
                        _request_timeout=REQUEST_TIMEOUT,
                    )
                ),
                write=(body["kind"], "create"),
            )  # fmt: skip
            return created, None
        except ApiError as exc:
            if exc.status == 403 and "NamespaceTerminating" in exc.body:
                log.debug("not creating %s %s: its namespace is being deleted", body["kind"], meta["name"])
                return None, None
            if exc.status == 404:
                # The kind is not served (its CRD is being removed, or not yet there): the CRD's own event
                # re-plans every tracked Deployment; nothing to tell the user that the plan will not say.
                log.info("not creating %s %s: the API server does not serve that kind now", body["kind"], meta["name"])
                return None, None
            if exc.status != 409:
                raise
            return None, self.call(
                lambda api: self._json(
                    client.CustomObjectsApi(api).get_namespaced_custom_object(
                        group, version, meta["namespace"], plural, meta["name"], _preload_content=False,
                        _request_timeout=REQUEST_TIMEOUT,
                    )
                )
            )  # fmt: skip

    def replace_child(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Our child's spec and labels replaced whole: an option the user removed goes too (a merge patch keeps
        what it does not mention). Returns it as written."""
        group, version, plural = CHILDREN[body["kind"]]
        meta = body["metadata"]
        ops = [
            {"op": "add", "path": "/metadata/labels", "value": meta["labels"]},
            {"op": "replace", "path": "/spec", "value": body["spec"]},
        ]
        return self.call(
            lambda api: self._json(
                client.CustomObjectsApi(api).patch_namespaced_custom_object(
                    group, version, meta["namespace"], plural, meta["name"], ops, _content_type=JSON_PATCH,
                    _preload_content=False, _request_timeout=REQUEST_TIMEOUT,
                )
            ),
            write=(body["kind"], "patch"),
        )  # fmt: skip

    def delete_child(self, kind: str, namespace: str, name: str) -> None:
        group, version, plural = CHILDREN[kind]
        try:
            self.call(
                lambda api: client.CustomObjectsApi(api).delete_namespaced_custom_object(
                    group, version, namespace, plural, name, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
                ),
                write=(kind, "delete"),
            )
        except ApiError as exc:
            if exc.status != 404:
                raise

    def ensure_peering(self, name: str) -> None:
        """The cluster-wide kopf peering object the replicas share; created if missing."""
        body = {"apiVersion": f"{PEERING[0]}/{PEERING[1]}", "kind": "ClusterKopfPeering", "metadata": {"name": name}}
        try:
            self.call(
                lambda api: client.CustomObjectsApi(api).create_cluster_custom_object(
                    *PEERING, body, _preload_content=False
                )
            )
        except ApiError as exc:
            if exc.status != 409:
                raise

    # -- Events ----------------------------------------------------------------------------------

    def post_event(self, deployment: Mapping[str, Any], event: Event) -> None:
        """One Event on a Deployment; raises as any call does (the operator posts through EventPoster, which logs)."""
        meta = deployment["metadata"]
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body: Any = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": workload_api_version(kind_of(deployment)),
                "kind": kind_of(deployment),
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
        self.call(
            lambda api: client.CoreV1Api(api).create_namespaced_event(
                meta["namespace"], body, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
            ),
            write=("Event", "create"),
        )


class EventPoster:
    """Events posted off the reconcile path, as kopf posts its own: a worker hands a Deployment's Events over and
    goes on to the next Deployment instead of waiting for two more round trips. One Deployment's Events are posted
    in order: each Deployment (by uid) belongs to one of `threads` queues, each drained by one thread. At most
    `pending` batches wait per queue; beyond that a worker waits for room (the API server is then the bottleneck
    anyway). Daemon threads: Events still waiting at exit are dropped, as kopf's are."""

    def __init__(self, kube: Kube, threads: int = 4, pending: int = 256) -> None:
        self.kube = kube
        self._queues: list[queue.Queue[tuple[Mapping[str, Any], list[Event]]]] = [
            queue.Queue(pending) for _ in range(max(1, threads))
        ]
        for i, q in enumerate(self._queues):
            threading.Thread(target=self._run, args=(q,), name=f"events-{i}", daemon=True).start()

    def post(self, deployment: Mapping[str, Any], events: list[Event]) -> None:
        if events:
            meta = deployment["metadata"]
            shard = hash(meta.get("uid") or (meta.get("namespace"), meta.get("name"))) % len(self._queues)
            self._queues[shard].put((deployment, events))

    def _run(self, q: queue.Queue[tuple[Mapping[str, Any], list[Event]]]) -> None:
        while True:
            deployment, events = q.get()
            for event in events:
                try:
                    self.kube.post_event(deployment, event)
                except Exception as exc:  # refused or unanswered: an Event is worth a log line, never a worker
                    meta = deployment["metadata"]
                    log.warning(
                        "could not post event %s on %s/%s: %s", event.reason, meta["namespace"], meta["name"], exc
                    )


# -- listers: what the informers list and watch, in a namespace (scope) or in all (None) ---------


def custom_lister(group: str, version: str, plural: str, **fixed: Any) -> Lister:
    def lister(api: client.ApiClient, scope: str | None, **kwargs: Any) -> Any:
        custom = client.CustomObjectsApi(api)
        if scope is None:
            return custom.list_cluster_custom_object(group, version, plural, _preload_content=False, **fixed, **kwargs)
        return custom.list_namespaced_custom_object(
            group, version, scope, plural, _preload_content=False, **fixed, **kwargs
        )

    return lister


def deployments_lister(api: client.ApiClient, scope: str | None, **kwargs: Any) -> Any:
    apps = client.AppsV1Api(api)
    if scope is None:
        return apps.list_deployment_for_all_namespaces(_preload_content=False, **kwargs)
    return apps.list_namespaced_deployment(scope, _preload_content=False, **kwargs)


def statefulsets_lister(api: client.ApiClient, scope: str | None, **kwargs: Any) -> Any:
    apps = client.AppsV1Api(api)
    if scope is None:
        return apps.list_stateful_set_for_all_namespaces(_preload_content=False, **kwargs)
    return apps.list_namespaced_stateful_set(scope, _preload_content=False, **kwargs)


def hpas_lister(api: client.ApiClient, scope: str | None, **kwargs: Any) -> Any:
    autoscaling = client.AutoscalingV2Api(api)
    if scope is None:
        return autoscaling.list_horizontal_pod_autoscaler_for_all_namespaces(_preload_content=False, **kwargs)
    return autoscaling.list_namespaced_horizontal_pod_autoscaler(scope, _preload_content=False, **kwargs)


def namespaces_lister(api: client.ApiClient, scope: str | None, **kwargs: Any) -> Any:
    return client.CoreV1Api(api).list_namespace(_preload_content=False, **kwargs)


def crd_lister(name: str) -> Lister:
    def lister(api: client.ApiClient, scope: str | None, **kwargs: Any) -> Any:
        return client.ApiextensionsV1Api(api).list_custom_resource_definition(
            field_selector=f"metadata.name={name}", _preload_content=False, **kwargs
        )

    return lister


def hpa_summary(hpa: Mapping[str, Any]) -> dict[str, Any]:
    """What a plan needs of an HPA: its name, its target, and whether KEDA made it (for a ScaledObject)."""
    meta = hpa.get("metadata") or {}
    owners = {ref.get("kind") for ref in meta.get("ownerReferences") or []}
    return {
        "name": meta.get("name"),
        "target": (hpa.get("spec") or {}).get("scaleTargetRef", {}),
        "keda": "ScaledObject" in owners,
    }
