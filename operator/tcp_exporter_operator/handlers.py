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
from collections.abc import Mapping
from typing import Any

import kopf
import urllib3

from tcp_exporter_operator import builders, metrics
from tcp_exporter_operator.builders import A_PORT, A_STATUS, PSA_ENFORCE, Facts, Plan
from tcp_exporter_operator.config import Config
from tcp_exporter_operator.events import MANAGED_BY, Event
from tcp_exporter_operator.kube import ApiError, Conflict, Kube, hpa_summary, load_configuration
from tcp_exporter_operator.watch import RESYNC, Deployments, Item, Key, Peering, WorkQueue, newest

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
    settings.execution.max_workers = 4  # kopf's own handlers: indexes and children, all quick
    if not hasattr(memo, "config"):
        memo.config = Config.from_env()
    memo.kube = Kube()
    if not hasattr(memo, "namespaces"):
        memo.namespaces = memo.config.namespaces
    peering = None
    if not settings.peering.standalone and settings.peering.mandatory:
        settings.peering.clusterwide = True  # one ClusterKopfPeering, whatever namespaces are watched
        memo.kube.ensure_peering(settings.peering.name)
        peering = settings.peering.name
    # kopf gives each object a shallow copy of this memo: state shared by all of them lives in mutable
    # containers made here, never in attributes set later from a handler.
    memo.warned = {}
    memo.synced = {}  # uid -> unchanged(): the Deployment as last found in sync
    memo.rollouts = Rollouts(memo.config.max_concurrent_rollouts)
    memo.awaiting = {}
    memo.so_generations = {}
    memo.shared = {"indexes": None}  # kopf's live indexes, once all are filled (`indexes_ready`)
    memo.ready = threading.Event()
    memo.peering = Peering(
        memo.kube,
        peering,
        getattr(memo, "identity", ""),
        getattr(memo, "priority", settings.peering.priority),
        on_resume=lambda: full_pass(memo),  # what changed while another replica was active
    )
    memo.queue = WorkQueue[Key, Item](newest)
    memo.received = {}  # key -> when its oldest unhandled event arrived
    memo.deployments = Deployments(memo.kube, memo.namespaces, tracked, lambda t, b: dispatch(memo, t, b))
    memo.deployments.start()  # lists while kopf fills its indexes; the workers wait for both
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
    memo.deployments.stop()


# -- indexes: the cluster facts a plan needs, kept by watches instead of per-event reads ---------


# No index of Deployments, and no kopf watch of them: until every object of an indexed resource has been
# indexed once, kopf runs no handler, its bookkeeping for that grows with the square of the count (150 s of a
# core for 5,000 Deployments), and it keeps a stream and a worker per watched object. Deployments are the
# resource a cluster has thousands of: the operator watches them itself (`watch.Deployments`).


def _child_summary(namespace: str | None, body: kopf.Body) -> dict[str | None, Any]:
    """Only what a plan compares of a child object (ScaledObject, PodMonitor): a small copy, not the whole body."""
    meta = body["metadata"]
    return {
        namespace: {
            "metadata": {
                "name": meta["name"],
                "namespace": namespace,
                "deletionTimestamp": meta.get("deletionTimestamp"),
                "labels": dict(meta.get("labels") or {}),
                "ownerReferences": [
                    {"kind": r.get("kind"), "uid": r.get("uid")} for r in meta.get("ownerReferences") or []
                ],
            },
            "spec": copy.deepcopy(dict(body.get("spec") or {})),
        }
    }


@kopf.index("keda.sh", "v1alpha1", "scaledobjects")
def scaledobjects(namespace: str | None, body: kopf.Body, **_: Any) -> dict[str | None, Any]:
    return _child_summary(namespace, body)


@kopf.index("monitoring.coreos.com", "v1", "podmonitors", labels={"app.kubernetes.io/managed-by": MANAGED_BY})
def podmonitors(namespace: str | None, body: kopf.Body, **_: Any) -> dict[str | None, Any]:
    return _child_summary(namespace, body)


@kopf.index("autoscaling", "v2", "horizontalpodautoscalers")
def hpas(namespace: str | None, body: kopf.Body, **_: Any) -> dict[str | None, Any]:
    return {namespace: hpa_summary(body)}


@kopf.index("", "v1", "namespaces")
def psa_levels(name: str, labels: kopf.Labels, **_: Any) -> dict[str, str | None]:
    return {name: labels.get(PSA_ENFORCE)}


@kopf.index("apiextensions.k8s.io", "v1", "customresourcedefinitions")
def crds(name: str, spec: kopf.Spec, **_: Any) -> dict[str, bool]:
    """CRD name -> whether it has what the plan relies on (for KEDA's: fallback.behavior, KEDA 2.17+)."""
    if name != KEDA_CRD:
        return {name: True}
    versions = [v for v in spec.get("versions") or [] if v.get("name") == "v1alpha1"]
    schema = versions[0].get("schema", {}).get("openAPIV3Schema", {}) if versions else {}
    fallback = schema.get("properties", {}).get("spec", {}).get("properties", {}).get("fallback", {})
    return {
        name: "behavior" in fallback.get("properties", {}) or bool(fallback.get("x-kubernetes-preserve-unknown-fields"))
    }


def facts_for(
    deployment: Mapping[str, Any],
    indexes: Mapping[str, kopf.Index[Any, Any]],
    hpas: list[dict[str, Any]] | None = None,
) -> Facts:
    """The cluster facts a plan of this Deployment needs, from the indexes; `hpas`, read afresh, replaces the
    index's HPAs (an HPA created just before the Deployment may not be indexed yet when the Deployment's event
    comes: its own watch is faster than kopf's)."""
    namespace, name = deployment["metadata"]["namespace"], deployment["metadata"]["name"]
    ours = None
    foreign = []
    pod_monitor = next(
        (
            pm
            for pm in list(indexes["podmonitors"].get(namespace, []))
            if builders.is_ours(pm, deployment) and not pm["metadata"].get("deletionTimestamp")
        ),
        None,
    )
    # Indexes are live and updated from other threads: copy (atomically, in C) before walking.
    for so in list(indexes["scaledobjects"].get(namespace, [])):
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
    for kind, child, action in (
        ("ScaledObject", plan.scaled_object, plan.scaled_object_action),
        ("PodMonitor", plan.pod_monitor, plan.pod_monitor_action),
    ):
        if action is None or child is None:
            continue
        if action == "delete":
            kube.delete_child(kind, child["metadata"]["namespace"], child["metadata"]["name"])
        elif action == "update":
            kube.replace_child(child)
        else:
            existing = kube.create_child(child)
            if existing is None:
                continue
            if builders.is_ours(existing, deployment):
                # Ours, but the index had not seen it yet when this plan was made: bring it to what is wanted.
                kube.replace_child(child)
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
    for event in events:
        # A Warning is posted once while it holds, not on every watch event of the Deployment.
        if event.type == "Warning" and (event.reason, event.message) in warned.get(uid, set()):
            continue
        kube.post_event(deployment, event)
    warned[uid] = warnings


def refused(kube: Kube, memo: kopf.Memo, deployment: Mapping[str, Any], exc: ApiError) -> None:
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
        kube.post_event(deployment, event)
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


def reconcile(
    deployment: Mapping[str, Any], memo: kopf.Memo, indexes: Mapping[str, kopf.Index[Any, Any]], fresh: bool = False
) -> str:
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
            if plan.deployment_patch is not None and hpas is None:
                # Before the rollout a patch starts, the facts it rests on read afresh: the Deployment (unless
                # just read) and the HPAs that would forbid it.
                if not fresh:
                    current, fresh = kube.get_deployment(namespace, name), True
                hpas = kube.list_hpas(namespace)
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
                refused(kube, memo, current or deployment, exc)
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
    try:
        return int(version or "") < int(than)
    except ValueError:
        return False


INDEXES = ("scaledobjects", "podmonitors", "hpas", "psa_levels", "crds")


def _indexes(kwargs: Mapping[str, Any]) -> dict[str, kopf.Index[Any, Any]]:
    """The indexes kopf hands every handler as keyword arguments named after them."""
    return {name: kwargs[name] for name in INDEXES}


@kopf.on.event("", "v1", "namespaces")
def indexes_ready(memo: kopf.Memo, **kwargs: Any) -> None:
    """kopf runs no handler before every index is filled: the first one run says the Deployment workers may start
    (before that, every ScaledObject would look missing, and the plans would write what exists)."""
    if memo.shared["indexes"] is None:
        memo.shared["indexes"] = _indexes(kwargs)  # live views, kept current by kopf
        memo.ready.set()
        log.info("indexes filled: reconciling Deployments")


# -- Deployments: the watch thread dispatches, workers reconcile -------------------------------


def dispatch(memo: kopf.Memo, type: str, body: Mapping[str, Any]) -> None:
    """An event of a tracked Deployment, from the watch thread: queue it (a deletion is only forgotten)."""
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
                    result = reconcile(deployment, memo, memo.shared["indexes"], fresh=True)
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
    indexes = memo.shared["indexes"]
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


@kopf.on.event("keda.sh", "v1alpha1", "scaledobjects", labels={"app.kubernetes.io/managed-by": MANAGED_BY})
@kopf.on.event("monitoring.coreos.com", "v1", "podmonitors", labels={"app.kubernetes.io/managed-by": MANAGED_BY})
def child_event(type: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A ScaledObject or PodMonitor of ours deleted or edited by hand is put back.

    KEDA updates its status often; only a new generation (a spec edit) or a deletion is worth a look.
    """
    meta = body["metadata"]
    generations: dict[str, int] = memo.so_generations
    seen = generations.get(meta["uid"])
    if type == "DELETED":
        generations.pop(meta["uid"], None)
    else:
        generations[meta["uid"]] = meta.get("generation", 0)
        if type != "MODIFIED" or seen == meta.get("generation", 0):
            return
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == "Deployment":
            enqueue(memo, meta["namespace"], ref["name"])


def _child_crd(name: str, **_: Any) -> bool:
    return name in (KEDA_CRD, PODMONITOR_CRD)


@kopf.on.event("apiextensions.k8s.io", "v1", "customresourcedefinitions", when=_child_crd)
def child_crd_installed(type: str, memo: kopf.Memo, **_: Any) -> None:
    """KEDA or the Prometheus Operator installed after the operator: create the ScaledObjects and PodMonitors
    that were waiting for them, no restart needed."""
    if type == "ADDED":
        full_pass(memo)


def full_pass(memo: kopf.Memo) -> None:
    """Reconcile every tracked Deployment, read afresh (queued: each waits for its own worker)."""
    for namespace, name in memo.deployments.tracked_keys():
        enqueue(memo, namespace, name)


async def _resync_forever(memo: kopf.Memo) -> None:
    """Every few minutes, reconcile every tracked Deployment: a safety net for failures that outlasted the retries.

    In sync, this costs one read per Deployment and no write.
    """
    while True:
        await asyncio.sleep(RESYNC_SECONDS)
        full_pass(memo)
