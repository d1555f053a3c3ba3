"""The operator's handlers: thin, level-based, and without kopf's bookkeeping on anybody's objects.

Deployments come from the operator's own watch (`watch.Deployments`: kopf would keep state for every
Deployment of the cluster) through a work queue and a few worker threads; kopf watches the small resources:
indexes of ScaledObjects, PodMonitors, HPAs, namespaces and CRDs, and events of the children. kopf stores
no progress or diff-base for event handlers or indexes, so nothing of kopf's is written to users'
Deployments. Each event re-derives the whole desired state from the Deployment (`builders.plan`) and writes
only what differs: after convergence a resync, a restart or an unrelated edit costs no write.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import threading
import time
from collections.abc import Hashable, Mapping
from typing import Any

import kopf
import urllib3
from kubernetes import client

from tcp_exporter_operator import builders, metrics
from tcp_exporter_operator.builders import A_PORT, A_STATUS, PSA_ENFORCE, Facts, Plan
from tcp_exporter_operator.config import Config
from tcp_exporter_operator.events import MANAGED_BY, Event
from tcp_exporter_operator.kube import ApiError, Conflict, EventPoster, Kube, hpa_summary, load_configuration
from tcp_exporter_operator.scalein import DeletionCosts, Target, parse_headers
from tcp_exporter_operator.watch import (
    RESYNC,
    Index,
    Informer,
    Item,
    Key,
    Lister,
    Peering,
    WorkQueue,
    newest,
    revision,
)

log = logging.getLogger(__name__)
KEDA_CRD = "scaledobjects.keda.sh"
PODMONITOR_CRD = "podmonitors.monitoring.coreos.com"
RETRY_DELAYS = (0.5, 1, 2, 4, 8, 15)
RESYNC_SECONDS = 300.0
# After its own patch, the operator skips the Deployment's watch events older than its write (they
# would plan the same patch again), for at most this many seconds.
CONSISTENCY_TIMEOUT = 10.0
WORKERS = 8  # threads reconciling Deployments; each holds one Deployment at a time


def tracked(annotations: Mapping[str, str], **_: Any) -> bool:
    """Deployments that ask for the exporter, or still carry what it injected."""
    return A_PORT in annotations or A_STATUS in annotations


def connection_info(configuration: Any) -> kopf.ConnectionInfo:
    """kopf's credentials from the official client's configuration: the same loader for both, so that kopf's
    watches and the operator's writes log in (and in again, after a 401) the same way."""
    header = configuration.get_api_key_with_prefix("BearerToken") or configuration.get_api_key_with_prefix(
        "authorization"
    )
    scheme, _, token = (header or "").rpartition(" ")
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        username=configuration.username or None,
        password=configuration.password or None,
        scheme=scheme or ("Bearer" if token else None),
        token=token or None,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
    )


@kopf.on.login()
def login_handler(**_: Any) -> kopf.ConnectionInfo:
    """Called at start and again whenever the API server refuses kopf's credentials."""
    try:
        return connection_info(load_configuration())
    except Exception as exc:
        raise kopf.LoginError(f"no usable in-cluster ServiceAccount or kubeconfig: {exc}") from exc


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Should kopf ever need to store state, it goes under this project's prefix.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kopf.tcp-exporter.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kopf.tcp-exporter.dev")
    settings.persistence.finalizer = "kopf.tcp-exporter.dev/finalizer"
    settings.posting.enabled = False  # the operator posts its own Events, deduplicated
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 5
    settings.networking.error_backoffs = (1, 1, 2, 3, 5, 8)
    settings.execution.max_workers = 2  # kopf's own handlers: login and probes
    if not hasattr(memo, "config"):
        memo.config = Config.from_env()
    memo.kube = Kube()
    memo.events = EventPoster(memo.kube)
    if not hasattr(memo, "namespaces"):
        memo.namespaces = memo.config.namespaces
    peering = None
    if not settings.peering.standalone and settings.peering.mandatory:
        settings.peering.clusterwide = True  # one ClusterKopfPeering, whatever namespaces are watched
        memo.kube.ensure_peering(settings.peering.name)
        peering = settings.peering.name
    # The state the watch threads, the workers and kopf's probes share: made here, before any of them runs.
    memo.warned = {}
    memo.synced = {}  # uid -> unchanged(): the Deployment as last found in sync
    memo.rollouts = Rollouts(memo.config.max_concurrent_rollouts)
    memo.awaiting = {}
    memo.peering = Peering(
        memo.kube,
        peering,
        getattr(memo, "identity", ""),
        getattr(memo, "priority", settings.peering.priority),
        on_resume=lambda: full_pass(memo),  # what changed while another replica was active
    )
    memo.queue = WorkQueue[Key, Item](newest)
    memo.received = {}  # key -> when its oldest unhandled event arrived
    memo.ready = threading.Event()  # every watch has listed once
    memo.scale_targets = {}  # (namespace, name) -> scalein.Target of each Deployment opted in
    start_informers(memo)
    DeletionCosts(
        memo.kube,
        memo.scale_targets,
        memo.config.deletion_cost_period,
        memo.config.deletion_cost_rate,
        parse_headers(memo.config.custom_headers),
        may_write=lambda: memo.ready.is_set() and memo.peering.wait_active(0),
    ).start()
    for i in range(WORKERS):
        threading.Thread(target=_work, args=(memo,), name=f"reconcile-{i}", daemon=True).start()
    memo.resync = asyncio.get_running_loop().create_task(_resync_forever(memo))


@kopf.on.probe(id="credentials")
def credentials_probe(memo: kopf.Memo, **_: Any) -> str:
    """Liveness fails once the API server has refused the operator's credentials, loaded afresh, for longer than
    CREDENTIALS_GRACE seconds: a restart is then the way to new ones (a remounted token, a fixed kubeconfig)."""
    kube: Kube = memo.kube
    if kube.refused_since is not None:
        with contextlib.suppress(ApiError):
            kube.check_credentials()
        if kube.refused_since is None:
            # Accepted again: catch up on what was refused meanwhile, without waiting for the periodic resync.
            full_pass(memo)
    since = kube.refused_since
    if since is not None and time.monotonic() - since > memo.config.credentials_grace:
        raise kopf.PermanentError(
            f"the API server has refused the operator's credentials for {time.monotonic() - since:.0f} s"
        )
    return "ok"


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    memo.resync.cancel()
    for informer in memo.informers.values():
        informer.stop()


# -- indexes: the cluster facts a plan needs, kept by watches instead of per-event reads ---------


def child_summary(obj: Mapping[str, Any]) -> tuple[Hashable, Any]:
    """Only what a plan compares of a child object (ScaledObject, PodMonitor): a small copy, not the whole body.
    Indexed under each Deployment it may concern (`child_keys`), so that a plan reads those, not the namespace's."""
    meta = obj["metadata"]
    namespace = meta.get("namespace")
    owners = [
        {"kind": r.get("kind"), "uid": r.get("uid"), "name": r.get("name")} for r in meta.get("ownerReferences") or []
    ]
    spec = dict(obj.get("spec") or {})
    target = (spec.get("scaleTargetRef") or {}).get("name")
    keys = [("name", namespace, meta["name"])]
    keys += [("owner", namespace, r["name"]) for r in owners if r["kind"] == "Deployment"]
    keys += [("target", namespace, target)] if target else []
    return tuple(keys), {
        "metadata": {
            "name": meta["name"],
            "namespace": namespace,
            "uid": meta.get("uid"),
            "generation": meta.get("generation"),
            "deletionTimestamp": meta.get("deletionTimestamp"),
            "labels": dict(meta.get("labels") or {}),
            "ownerReferences": owners,
        },
        "spec": copy.deepcopy(spec),
    }


def child_keys(namespace: str, name: str) -> list[Hashable]:
    """Where the children that concern the Deployment `name` are indexed: those it owns, those that target it,
    and those under the names the operator gives its children (adopted from GitOps, with no owner)."""
    return [
        ("owner", namespace, name),
        ("target", namespace, name),
        *(("name", namespace, child) for child in builders.child_names(name)),
    ]


def hpa_entry(obj: Mapping[str, Any]) -> tuple[Hashable, Any]:
    return obj["metadata"].get("namespace"), hpa_summary(obj)


def psa_level(obj: Mapping[str, Any]) -> tuple[Hashable, Any]:
    return obj["metadata"]["name"], (obj["metadata"].get("labels") or {}).get(PSA_ENFORCE)


def crd_entry(obj: Mapping[str, Any]) -> tuple[Hashable, Any]:
    """CRD name -> whether it has what the plan relies on (for KEDA's: fallback.behavior, KEDA 2.17+)."""
    name = obj["metadata"]["name"]
    if name != KEDA_CRD:
        return name, True
    versions = [v for v in (obj.get("spec") or {}).get("versions") or [] if v.get("name") == "v1alpha1"]
    schema = versions[0].get("schema", {}).get("openAPIV3Schema", {}) if versions else {}
    fallback = schema.get("properties", {}).get("spec", {}).get("properties", {}).get("fallback", {})
    return name, "behavior" in fallback.get("properties", {}) or bool(
        fallback.get("x-kubernetes-preserve-unknown-fields")
    )


def _custom(group: str, version: str, plural: str, **fixed: Any) -> Lister:
    def lister(api: client.ApiClient, scope: str | None, **kwargs: Any) -> Any:
        custom = client.CustomObjectsApi(api)
        if scope is None:
            return custom.list_cluster_custom_object(group, version, plural, _preload_content=False, **fixed, **kwargs)
        return custom.list_namespaced_custom_object(
            group, version, scope, plural, _preload_content=False, **fixed, **kwargs
        )

    return lister


def _deployments(api: client.ApiClient, scope: str | None, **kwargs: Any) -> Any:
    apps = client.AppsV1Api(api)
    if scope is None:
        return apps.list_deployment_for_all_namespaces(_preload_content=False, **kwargs)
    return apps.list_namespaced_deployment(scope, _preload_content=False, **kwargs)


def _hpas(api: client.ApiClient, scope: str | None, **kwargs: Any) -> Any:
    autoscaling = client.AutoscalingV2Api(api)
    if scope is None:
        return autoscaling.list_horizontal_pod_autoscaler_for_all_namespaces(_preload_content=False, **kwargs)
    return autoscaling.list_namespaced_horizontal_pod_autoscaler(scope, _preload_content=False, **kwargs)


def _namespaces(api: client.ApiClient, scope: str | None, **kwargs: Any) -> Any:
    return client.CoreV1Api(api).list_namespace(_preload_content=False, **kwargs)


def _crd(name: str) -> Lister:
    def lister(api: client.ApiClient, scope: str | None, **kwargs: Any) -> Any:
        return client.ApiextensionsV1Api(api).list_custom_resource_definition(
            field_selector=f"metadata.name={name}", _preload_content=False, **kwargs
        )

    return lister


def start_informers(memo: kopf.Memo) -> None:
    """The watches the operator runs: Deployments (tracked ones queued, the rest dropped) and the indexes a plan
    reads. The workers start once every one has listed (`memo.ready`)."""
    scopes: tuple[str | None, ...] = memo.namespaces or (None,)
    managed = f"app.kubernetes.io/managed-by={MANAGED_BY}"
    indexes = {
        "scaledobjects": Index(child_summary, multi=True),
        "podmonitors": Index(child_summary, multi=True),
        "hpas": Index(hpa_entry),
        "psa_levels": Index(psa_level),
        "crds": Index(crd_entry),
    }
    memo.indexes = indexes
    informers = {
        "deployments": Informer(
            memo.kube, "deployments", _deployments, scopes, lambda t, o: deployment_seen(memo, t, o)
        ),
        "scaledobjects": Informer(
            memo.kube,
            "scaledobjects",
            _custom("keda.sh", "v1alpha1", "scaledobjects"),
            scopes,
            lambda t, o: child_seen(memo, "scaledobjects", t, o),
            on_relist=lambda: full_pass(memo),
        ),
        "podmonitors": Informer(
            memo.kube,
            "podmonitors",
            _custom("monitoring.coreos.com", "v1", "podmonitors", label_selector=managed),
            scopes,
            lambda t, o: child_seen(memo, "podmonitors", t, o),
            on_relist=lambda: full_pass(memo),
        ),
        "hpas": Informer(memo.kube, "hpas", _hpas, scopes, lambda t, o: indexes["hpas"].update(t, o)[1]),
        "namespaces": Informer(
            memo.kube, "namespaces", _namespaces, (None,), lambda t, o: indexes["psa_levels"].update(t, o)[1]
        ),
        **{
            crd: Informer(memo.kube, crd, _crd(crd), (None,), lambda t, o: crd_seen(memo, t, o))
            for crd in (KEDA_CRD, PODMONITOR_CRD)
        },
    }
    memo.informers = informers
    memo.deployments = informers["deployments"]
    for informer in informers.values():
        informer.start()

    def ready() -> None:
        for informer in informers.values():
            informer.synced.wait()
        log.info("every watch has listed: reconciling Deployments")
        memo.ready.set()

    threading.Thread(target=ready, name="ready", daemon=True).start()


def child_seen(memo: kopf.Memo, index: str, type: str, obj: Mapping[str, Any]) -> bool:
    """A ScaledObject or PodMonitor event: indexed; and one of ours deleted or edited by hand (a new generation;
    KEDA's frequent status updates are not) is put back by reconciling its Deployment."""
    idx: Index = memo.indexes[index]
    previous, kept = idx.update(type, obj)
    meta = obj.get("metadata") or {}
    if previous is None or (type != "DELETED" and previous["metadata"].get("generation") == meta.get("generation")):
        return kept
    if previous["metadata"]["labels"].get("app.kubernetes.io/managed-by") != MANAGED_BY:
        return kept
    for ref in previous["metadata"]["ownerReferences"]:
        if ref.get("kind") == "Deployment" and ref.get("name"):
            enqueue(memo, previous["metadata"]["namespace"], ref["name"])
    return kept


def crd_seen(memo: kopf.Memo, type: str, obj: Mapping[str, Any]) -> bool:
    """KEDA or the Prometheus Operator installed after the operator: watch their kinds now, and create the
    ScaledObjects and PodMonitors that were waiting for them, no restart needed."""
    idx: Index = memo.indexes["crds"]
    previous, kept = idx.update(type, obj)
    if kept:  # added, or changed (say, Established now): the kind's watch tries again at once if it waits
        memo.informers["scaledobjects" if obj["metadata"]["name"] == KEDA_CRD else "podmonitors"].poke()
    if previous is None and kept and memo.ready.is_set():
        full_pass(memo)
    return kept


def facts_for(
    deployment: Mapping[str, Any],
    indexes: Mapping[str, Index],
    hpas: list[dict[str, Any]] | None = None,
) -> Facts:
    """The cluster facts a plan of this Deployment needs, from the indexes; `hpas`, read afresh, replaces the
    index's HPAs (an HPA created just before the Deployment may not be indexed yet when the Deployment's event
    comes: its own watch is faster than kopf's)."""
    namespace, name = deployment["metadata"]["namespace"], deployment["metadata"]["name"]
    ours = None
    foreign = []
    keys = child_keys(namespace, name)
    pod_monitor = next(
        (
            pm
            for pm in indexes["podmonitors"].get_any(keys)
            if builders.is_ours(pm, deployment) and not pm["metadata"].get("deletionTimestamp")
        ),
        None,
    )
    for so in indexes["scaledobjects"].get_any(keys):  # a copy: the index is updated from other threads
        targets = so.get("spec", {}).get("scaleTargetRef", {}).get("name") == name
        if so["metadata"].get("deletionTimestamp"):
            continue  # on its way out (KEDA's finalizer holds it a moment): as good as gone
        if builders.is_ours(so, deployment):
            ours = so
        elif targets:
            foreign.append(f"ScaledObject/{so['metadata']['name']}")
    for hpa in hpas if hpas is not None else list(indexes["hpas"].get(namespace, [])):
        target = hpa["target"]
        if target.get("kind") == "Deployment" and target.get("name") == name and not hpa["keda"]:
            foreign.append(f"HorizontalPodAutoscaler/{hpa['name']}")
    levels = list(indexes["psa_levels"].get(namespace, [None]))
    crd_names = indexes["crds"]
    return Facts(
        psa_level=levels[0] if levels else None,
        keda=KEDA_CRD in crd_names,
        keda_fallback_behavior=KEDA_CRD in crd_names and all(crd_names[KEDA_CRD]),
        pod_monitor_crd=PODMONITOR_CRD in crd_names,
        pod_monitor=pod_monitor,
        scaled_object=ours,
        foreign_autoscalers=tuple(sorted(foreign)),
    )


# -- reconciling one Deployment -----------------------------------------------------------------


def _transient(exc: Exception) -> bool:
    if isinstance(exc, ApiError):
        return exc.status in (429, 500, 502, 503, 504)
    return isinstance(exc, urllib3.exceptions.HTTPError | OSError)


def apply(kube: Kube, deployment: Mapping[str, Any], plan: Plan, memo: kopf.Memo) -> None:
    meta = deployment["metadata"]
    if plan.deployment_patch is not None:
        written, generation = kube.patch_deployment(meta["namespace"], meta["name"], plan.deployment_patch)
        memo.awaiting[meta.get("uid")] = (written, time.monotonic() + CONSISTENCY_TIMEOUT)
        if plan.upgrade:
            memo.rollouts.started(meta.get("uid", ""), generation)
    events = list(plan.events)
    for kind, index, child, action in (
        ("ScaledObject", "scaledobjects", plan.scaled_object, plan.scaled_object_action),
        ("PodMonitor", "podmonitors", plan.pod_monitor, plan.pod_monitor_action),
    ):
        if action is None or child is None:
            continue
        # What is created or replaced is shown in its index until its own event comes: the Deployment's next
        # event, often first, is then planned from it instead of creating it again.
        children: Index = memo.indexes[index]
        if action == "delete":
            kube.delete_child(kind, child["metadata"]["namespace"], child["metadata"]["name"])
            children.removed(child["metadata"].get("uid", ""))
        elif action == "update":
            children.wrote(kube.replace_child(child))
        else:
            created, existing = kube.create_child(child)
            if created is not None:
                children.wrote(created)
            if existing is None:
                continue
            if builders.is_ours(existing, deployment):
                # Ours, but the index had not seen it yet when this plan was made: bring it to what is wanted.
                children.wrote(kube.replace_child(child))
                continue
            name = child["metadata"]["name"]
            events = [e for e in events if not (e.type == "Normal" and e.reason.startswith(kind))]
            events.append(
                Event(
                    "Warning",
                    f"{kind}Conflict",
                    f"a {kind} named {name} already exists and is not owned by this Deployment: it is left as it "
                    f"is, and this Deployment gets no {kind} until it is renamed or deleted",
                )
            )
    warned: dict[str, set[tuple[str, str]]] = memo.warned
    uid = meta.get("uid", "")
    warnings = {(e.reason, e.message) for e in events if e.type == "Warning"}
    # A Warning is posted once while it holds, not on every watch event of the Deployment.
    already = warned.get(uid, set())
    memo.events.post(deployment, [e for e in events if not (e.type == "Warning" and (e.reason, e.message) in already)])
    warned[uid] = warnings


def refused(memo: kopf.Memo, deployment: Mapping[str, Any], exc: ApiError) -> None:
    """A write the API server refused (RBAC, a webhook, validation): one Warning on the Deployment, posted once
    while it holds, and no Normal Event for what was not done. The next event or resync tries again."""
    meta = deployment["metadata"]
    detail = exc.body
    with contextlib.suppress(ValueError, AttributeError):  # a Status object's message, when it is one
        detail = json.loads(exc.body).get("message", exc.body)
    event = Event("Warning", "WriteRefused", f"the API server refused a write ({exc.status}): {detail}"[:1000])
    warned: dict[str, set[tuple[str, str]]] = memo.warned
    if (event.reason, event.message) not in warned.setdefault(meta.get("uid", ""), set()):
        warned[meta.get("uid", "")].add((event.reason, event.message))
        memo.events.post(deployment, [event])
    log.warning("reconciling %s/%s: %s", meta["namespace"], meta["name"], event.message)


class Rollouts:
    """Upgrade rollouts under way (at most `limit`), and the Deployments waiting for one, in arrival order.

    An upgrade rollout is a sidecar change of the operator's own making (a new image or default after an
    operator upgrade): without pacing, every annotated Deployment of the cluster would restart at once.
    Slots are reserved before planning, since several workers plan at once.
    """

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.lock = threading.Lock()
        self.active: dict[str, int | None] = {}  # uid -> generation to complete (None: reserved, not started)
        self.waiting: dict[str, tuple[str, str]] = {}  # uid -> (namespace, name)

    def reserve(self, uid: str) -> bool:
        with self.lock:
            if uid in self.active:
                return True
            if len(self.active) < self.limit:
                self.active[uid] = None
                return True
            return False

    def unreserve(self, uid: str) -> None:
        with self.lock:
            if self.active.get(uid, 0) is None:
                del self.active[uid]

    def started(self, uid: str, generation: int) -> None:
        with self.lock:
            self.active[uid] = generation
            self.waiting.pop(uid, None)

    def wait(self, uid: str, namespace: str, name: str) -> None:
        with self.lock:
            if uid not in self.waiting:
                log.info("upgrade of %s/%s waits: %d rollouts under way", namespace, name, len(self.active))
            self.waiting[uid] = (namespace, name)

    def not_waiting(self, uid: str) -> None:
        with self.lock:
            self.waiting.pop(uid, None)

    def forget(self, uid: str) -> list[tuple[str, str]]:
        """A deleted Deployment: its slot, if it held one, goes to the next waiting one (returned)."""
        with self.lock:
            self.waiting.pop(uid, None)
            if self.active.pop(uid, 0) == 0 or not self.waiting:
                return []
            return [self.waiting.pop(next(iter(self.waiting)))]

    def progress(self, uid: str, deployment: Mapping[str, Any]) -> list[tuple[str, str]]:
        """If this Deployment's paced rollout is over (done, or past its progress deadline), free its slot and
        return the next waiting Deployment to reconcile."""
        with self.lock:
            generation = self.active.get(uid)
            if generation is None or not rollout_over(deployment, generation):
                return []
            del self.active[uid]
            if not self.waiting:
                return []
            next_uid = next(iter(self.waiting))
            return [self.waiting.pop(next_uid)]


def rollout_over(deployment: Mapping[str, Any], generation: int) -> bool:
    """The deployment controller has rolled out `generation`: every replica updated and available, or the rollout
    ran past its progress deadline (then the next may go: one stuck Deployment must not stop the upgrade)."""
    status = deployment.get("status") or {}
    if int(status.get("observedGeneration") or 0) < generation:
        return False
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            return True
    want = int((deployment.get("spec") or {}).get("replicas", 1))
    return all(int(status.get(k) or 0) == want for k in ("updatedReplicas", "replicas", "availableReplicas"))


def unchanged(deployment: Mapping[str, Any]) -> tuple[int, int]:
    """What a plan of this Deployment depends on, of the Deployment itself: its spec (by generation) and its
    annotations. The controllers' status updates, most of a Deployment's watch events, change neither."""
    meta = deployment["metadata"]
    return int(meta.get("generation") or 0), hash(tuple(sorted((meta.get("annotations") or {}).items())))


def reconcile(deployment: Mapping[str, Any], memo: kopf.Memo, indexes: Mapping[str, Index], fresh: bool = False) -> str:
    """Plan and apply; on a conflict read the Deployment again; retry transient API errors a few times.

    Unless `fresh`, the Deployment is read afresh before a patch (a read costs less than a write the API server
    rejects, and often shows the patch is not needed); the HPAs always are.

    Returns the result the metrics count: "wrote", "in_sync" or "failed".
    """
    kube: Kube = memo.kube
    namespace, name = deployment["metadata"]["namespace"], deployment["metadata"]["name"]
    current: Mapping[str, Any] | None = deployment
    hpas = None
    for delay in (*RETRY_DELAYS, None):
        try:
            if current is None or current["metadata"].get("deletionTimestamp"):
                memo.rollouts.unreserve(deployment["metadata"].get("uid", ""))
                return "in_sync"
            facts = facts_for(current, indexes, hpas)
            uid = current["metadata"].get("uid", "")
            plan = builders.plan(current, facts, memo.config)
            if plan.upgrade and not memo.rollouts.reserve(uid):
                facts.rollout_slot = False
                plan = builders.plan(current, facts, memo.config)  # the same, but the paced patch
                memo.rollouts.wait(uid, namespace, name)
            elif not plan.upgrade:
                # Nothing of the operator's own to roll out (any more: the user's change may have carried it):
                # a freed slot must not go to this one.
                memo.rollouts.not_waiting(uid)
            if plan.deployment_patch is not None and hpas is None:
                # Before the rollout a patch starts, the facts it rests on read afresh: the Deployment (unless
                # just read) and the HPAs that would forbid it, all those written before this Deployment's version
                # (an HPA applied with the Deployment may not be indexed yet: its own watch can lag).
                if not fresh:
                    current, fresh = kube.get_deployment(namespace, name), True
                if current is None:
                    continue
                hpas = kube.list_hpas(namespace, current["metadata"].get("resourceVersion"))
                continue
            try:
                apply(kube, current, plan, memo)
            finally:
                memo.rollouts.unreserve(uid)  # a no-op once the rollout has started
            if plan.writes == 0 and not plan.upgrade_deferred:
                memo.synced[uid] = unchanged(current)
            else:
                memo.synced.pop(uid, None)
            log.log(
                logging.INFO if plan.writes else logging.DEBUG,
                "reconciled %s/%s at resourceVersion %s: %d writes",
                namespace,
                name,
                current["metadata"].get("resourceVersion"),
                plan.writes,
            )
            return "wrote" if plan.writes else "in_sync"
        except Conflict:
            current = kube.get_deployment(namespace, name)
            continue
        except Exception as exc:
            if isinstance(exc, ApiError) and not (_transient(exc) and delay is not None):
                refused(memo, current or deployment, exc)
                return "failed"
            if not _transient(exc) or delay is None:
                raise
            log.warning("reconciling %s/%s failed (%s); retrying in %s s", namespace, name, exc, delay)
            time.sleep(delay)
            with contextlib.suppress(Exception):  # the next attempt reports it
                current = kube.get_deployment(namespace, name)
    log.warning(
        "gave up reconciling %s/%s for now: it kept changing; the next event or resync retries", namespace, name
    )
    return "failed"


def older(version: str | None, than: str) -> bool:
    """Whether a watch event predates our write. resourceVersions are etcd revisions, ordered integers, in
    every etcd-backed API server; kopf may coalesce events, so waiting for our exact version could wait forever.
    Anything not comparable counts as not older."""
    ours, theirs = revision(than), revision(version)
    return ours >= 0 and 0 <= theirs < ours


# -- Deployments: the watch thread dispatches, workers reconcile -------------------------------


def deployment_seen(memo: kopf.Memo, type: str, body: Mapping[str, Any]) -> bool:
    """A Deployment's event, from the watch thread: a tracked one (or one that just stopped being tracked, to be
    seen without what it carried) is queued, a deletion forgotten; the rest dropped. Whether it is tracked."""
    meta = body["metadata"]
    is_tracked = type != "DELETED" and tracked(meta.get("annotations") or {})
    if is_tracked or meta.get("uid") in memo.deployments.known:
        dispatch(memo, type, body)
        scale_target(memo, body if is_tracked else None, (meta["namespace"], meta["name"]))
    return is_tracked


def scale_target(memo: kopf.Memo, body: Mapping[str, Any] | None, key: Key) -> None:
    """Keep what connection-aware scale-in needs of an opted-in Deployment (its replicas change with the HPA)."""
    targets: dict[Key, Target] = memo.scale_targets
    annotations = (body or {}).get("metadata", {}).get("annotations") or {}
    opted = builders.A_SCALE_IN in annotations or memo.config.scale_in_by_connections.lower() == "true"
    if body is None or A_PORT not in annotations or not opted:  # not opted in: no need to parse the rest
        targets.pop(key, None)
        return
    try:
        spec = builders.parse_spec(body, memo.config)
    except builders.InvalidSpec:
        spec = None
    if spec is None or not spec.scale_in_by_connections:
        targets.pop(key, None)
        return
    replicas = int((body.get("spec") or {}).get("replicas", 1))
    targets[key] = Target(spec.threshold, spec.min_replicas, replicas, spec.prometheus)


def dispatch(memo: kopf.Memo, type: str, body: Mapping[str, Any]) -> None:
    """Queue a Deployment's event (a deletion is only forgotten)."""
    meta = body["metadata"]
    metrics.TRACKED.set(len(memo.deployments.known))
    if type == "DELETED":
        memo.received.pop((meta["namespace"], meta["name"]), None)
        uid = meta.get("uid")
        memo.warned.pop(uid, None)
        memo.awaiting.pop(uid, None)
        memo.synced.pop(uid, None)
        for namespace_, name_ in memo.rollouts.forget(uid):
            enqueue(memo, namespace_, name_)
        return
    key = (meta["namespace"], meta["name"])
    memo.received.setdefault(key, time.monotonic())  # the oldest event not yet handled, for event_to_write
    memo.queue.put(key, (type, body))
    metrics.QUEUE_DEPTH.set(len(memo.queue))


def enqueue(memo: kopf.Memo, namespace: str, name: str) -> None:
    """Reconcile a Deployment from a fresh read, whether or not it looks in sync."""
    memo.queue.put((namespace, name), (RESYNC, None))


def _work(memo: kopf.Memo) -> None:
    queue: WorkQueue[Key, Item] = memo.queue
    while True:
        memo.ready.wait()
        entry = queue.get()
        if entry is None:
            continue
        key, (type, body) = entry
        metrics.QUEUE_DEPTH.set(len(queue))
        while not memo.peering.wait_active(60):
            pass  # another replica is active (kopf's peering rule): hold the entry until this one is
        received = memo.received.pop(key, None)
        result = None
        try:
            if type == RESYNC:
                deployment = memo.kube.get_deployment(*key)
                if deployment is not None:
                    result = reconcile(deployment, memo, memo.indexes, fresh=True)
            elif body is not None:
                result = deployment_event(body, memo)
        except Exception:
            result = "failed"
            log.exception("reconciling %s/%s failed; the next event or resync retries", *key)
        finally:
            queue.done(key)
        if result is not None:
            metrics.RECONCILES.labels(result).inc()
        if result == "wrote" and received is not None:
            metrics.EVENT_TO_WRITE.observe(time.monotonic() - received)


def deployment_event(body: Mapping[str, Any], memo: kopf.Memo) -> str | None:
    """A tracked Deployment's watch event: reconciled unless it predates our own write or nothing it could
    change has changed since it was last found in sync. Returns the reconcile's result, or None if skipped."""
    indexes = memo.indexes
    uid = body["metadata"].get("uid")
    for namespace_, name_ in memo.rollouts.progress(uid, body):
        enqueue(memo, namespace_, name_)  # a paced upgrade finished here: the next waiting one may roll now
    if uid in memo.awaiting:
        written, deadline = memo.awaiting[uid]
        if older(body["metadata"].get("resourceVersion"), written) and time.monotonic() < deadline:
            log.debug(
                "skipped %s/%s at resourceVersion %s: older than our write %s",
                body["metadata"]["namespace"],
                body["metadata"]["name"],
                body["metadata"].get("resourceVersion"),
                written,
            )
            return None
        del memo.awaiting[uid]
    if memo.synced.get(uid) == unchanged(body):
        # In sync, and nothing the plan reads of the Deployment has changed since: no need to plan again. Its
        # children's edits come through their own events, CRDs through full passes, both planned afresh.
        log.debug(
            "reconciled %s/%s at resourceVersion %s: 0 writes (unchanged)",
            body["metadata"]["namespace"],
            body["metadata"]["name"],
            body["metadata"].get("resourceVersion"),
        )
        return None
    # The body is the watch's latest (the queue keeps only that): as fresh as a read would be. Should it be behind
    # anyway, the patch's preconditions fail (422) on exactly what changed, and the conflict reads it afresh.
    return reconcile(body, memo, indexes, fresh=True)


def full_pass(memo: kopf.Memo) -> None:
    """Reconcile every tracked Deployment, read afresh (queued: each waits for its own worker). Also after a
    child kind's watch had to list again (its CRD came back, or the watch was too far behind)."""
    if not memo.ready.is_set():
        return  # the first reconcile of everything is still to come
    for namespace, name in memo.deployments.known_keys():
        enqueue(memo, namespace, name)


async def _resync_forever(memo: kopf.Memo) -> None:
    """Every few minutes, reconcile every tracked Deployment: a safety net for failures that outlasted the retries.

    In sync, this costs one read per Deployment and no write.
    """
    while True:
        await asyncio.sleep(RESYNC_SECONDS)
        full_pass(memo)
