"""kopf handlers: thin, level-based, and without kopf's bookkeeping on anybody's objects.

Every handler here is an event handler or an index: kopf stores no progress
or diff-base for those, so nothing of kopf's is written to users'
Deployments. Each event re-derives the whole desired state from the
Deployment (`builders.plan`) and writes only what differs: after convergence
a resync, a restart or an unrelated edit costs no write.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import http.client
import logging
import time
from collections.abc import Mapping
from typing import Any

import kopf

from tcp_exporter_operator import builders
from tcp_exporter_operator.builders import A_PORT, A_STATUS, MANAGED_BY, PSA_ENFORCE, Event, Facts, Plan
from tcp_exporter_operator.config import Config
from tcp_exporter_operator.kube import ApiError, Conflict, Kube

log = logging.getLogger(__name__)
KEDA_CRD = "scaledobjects.keda.sh"
PODMONITOR_CRD = "podmonitors.monitoring.coreos.com"
RETRY_DELAYS = (0.5, 1, 2, 4, 8, 15)
RESYNC_SECONDS = 300.0
# After its own patch, the operator skips the Deployment's watch events older than its write (they
# would plan the same patch again), for at most this many seconds.
CONSISTENCY_TIMEOUT = 10.0


def tracked(annotations: Mapping[str, str], **_: Any) -> bool:
    """Deployments that ask for the exporter, or still carry what it injected."""
    return A_PORT in annotations or A_STATUS in annotations


def login(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo:
    """In-cluster ServiceAccount, else KUBECONFIG: kopf's own minimal logins, no client library."""
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)
    if info is None:
        raise kopf.LoginError("no in-cluster ServiceAccount and no KUBECONFIG or ~/.kube/config")
    return info


@kopf.on.login()
def login_handler(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
    return login(settings)


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
    settings.execution.max_workers = 8
    if not hasattr(memo, "config"):
        memo.config = Config.from_env()
    memo.kube = Kube(login(settings))
    if not settings.peering.standalone and settings.peering.mandatory:
        settings.peering.clusterwide = True  # one ClusterKopfPeering, whatever namespaces are watched
        memo.kube.ensure_peering(settings.peering.name)
    # kopf gives each object a shallow copy of this memo: state shared by all of them lives in mutable
    # containers made here, never in attributes set later from a handler.
    memo.warned = {}
    memo.awaiting = {}
    memo.so_generations = {}
    memo.shared = {"indexes": None}
    memo.resync = asyncio.get_running_loop().create_task(_resync_forever(memo))


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    memo.resync.cancel()


# -- indexes: the cluster facts a plan needs, kept by watches instead of per-event reads ---------


@kopf.index("apps", "v1", "deployments", when=tracked)
def deployments(namespace: str | None, name: str, **_: Any) -> dict[tuple[str | None, str], bool]:
    # Names only: keeping every body would cost ~50 kB per Deployment; the rare full passes read afresh.
    return {(namespace, name): True}


def _child_summary(namespace: str | None, body: kopf.Body) -> dict[str | None, Any]:
    """Only what a plan compares of a child object (ScaledObject, PodMonitor): a small copy, not the whole body."""
    meta = body["metadata"]
    return {
        namespace: {
            "metadata": {
                "name": meta["name"],
                "namespace": namespace,
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
def hpas(namespace: str | None, name: str, spec: kopf.Spec, meta: kopf.Meta, **_: Any) -> dict[str | None, Any]:
    owners = {ref.get("kind") for ref in meta.get("ownerReferences") or []}
    return {namespace: {"name": name, "target": spec.get("scaleTargetRef", {}), "keda": "ScaledObject" in owners}}


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


def facts_for(deployment: Mapping[str, Any], indexes: Mapping[str, kopf.Index[Any, Any]]) -> Facts:
    namespace, name = deployment["metadata"]["namespace"], deployment["metadata"]["name"]
    ours = None
    foreign = []
    pod_monitor = next(
        (pm for pm in list(indexes["podmonitors"].get(namespace, [])) if builders.is_ours(pm, deployment)), None
    )
    # Indexes are live and updated from other threads: copy (atomically, in C) before walking.
    for so in list(indexes["scaledobjects"].get(namespace, [])):
        targets = so.get("spec", {}).get("scaleTargetRef", {}).get("name") == name
        if builders.is_ours(so, deployment):
            ours = so
        elif targets:
            foreign.append(f"ScaledObject/{so['metadata']['name']}")
    for hpa in list(indexes["hpas"].get(namespace, [])):
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
    return isinstance(exc, http.client.HTTPException | OSError)


def apply(kube: Kube, deployment: Mapping[str, Any], plan: Plan, memo: kopf.Memo) -> None:
    meta = deployment["metadata"]
    if plan.deployment_patch is not None:
        written = kube.patch_deployment(meta["namespace"], meta["name"], plan.deployment_patch)
        memo.awaiting[meta.get("uid")] = (written, time.monotonic() + CONSISTENCY_TIMEOUT)
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


def reconcile(
    deployment: Mapping[str, Any], memo: kopf.Memo, indexes: Mapping[str, kopf.Index[Any, Any]], fresh: bool = False
) -> None:
    """Plan and apply; on a conflict read the Deployment again; retry transient API errors a few times.

    A watch event's body can be a little behind (kopf's first listing, or events queued behind our own
    write): before patching a Deployment from one, read it afresh and plan again. A read costs less than
    a write the API server rejects, and usually shows the patch is not needed.
    """
    kube: Kube = memo.kube
    namespace, name = deployment["metadata"]["namespace"], deployment["metadata"]["name"]
    current: Mapping[str, Any] | None = deployment
    for delay in (*RETRY_DELAYS, None):
        try:
            if current is None or current["metadata"].get("deletionTimestamp"):
                return
            plan = builders.plan(current, facts_for(current, indexes), memo.config)
            if plan.deployment_patch is not None and not fresh:
                current, fresh = kube.get_deployment(namespace, name), True
                continue
            apply(kube, current, plan, memo)
            log.log(
                logging.INFO if plan.writes else logging.DEBUG,
                "reconciled %s/%s at resourceVersion %s: %d writes",
                namespace,
                name,
                current["metadata"].get("resourceVersion"),
                plan.writes,
            )
            return
        except Conflict:
            current = kube.get_deployment(namespace, name)
            continue
        except Exception as exc:
            if not _transient(exc) or delay is None:
                raise
            log.warning("reconciling %s/%s failed (%s); retrying in %s s", namespace, name, exc, delay)
            time.sleep(delay)
            with contextlib.suppress(Exception):  # the next attempt reports it
                current = kube.get_deployment(namespace, name)
    log.warning(
        "gave up reconciling %s/%s for now: it kept changing; the next event or resync retries", namespace, name
    )


def older(version: str | None, than: str) -> bool:
    """Whether a watch event predates our write. resourceVersions are etcd revisions, ordered integers, in
    every etcd-backed API server; kopf may coalesce events, so waiting for our exact version could wait forever.
    Anything not comparable counts as not older."""
    try:
        return int(version or "") < int(than)
    except ValueError:
        return False


INDEXES = ("deployments", "scaledobjects", "podmonitors", "hpas", "psa_levels", "crds")


def _indexes(kwargs: Mapping[str, Any]) -> dict[str, kopf.Index[Any, Any]]:
    """The indexes kopf hands every handler as keyword arguments named after them."""
    return {name: kwargs[name] for name in INDEXES}


@kopf.on.event("apps", "v1", "deployments", when=tracked)
def deployment_event(type: str, body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    indexes = _indexes(kwargs)
    memo.shared["indexes"] = indexes  # live views, for the periodic resync
    uid = body["metadata"].get("uid")
    if type == "DELETED":
        memo.warned.pop(uid, None)
        memo.awaiting.pop(uid, None)
        return
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
            return
        del memo.awaiting[uid]
    reconcile(body, memo, indexes)


@kopf.on.event("keda.sh", "v1alpha1", "scaledobjects", labels={"app.kubernetes.io/managed-by": MANAGED_BY})
@kopf.on.event("monitoring.coreos.com", "v1", "podmonitors", labels={"app.kubernetes.io/managed-by": MANAGED_BY})
def child_event(type: str, body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
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
    namespace = meta["namespace"]
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == "Deployment":
            deployment = memo.kube.get_deployment(namespace, ref["name"])
            if deployment is not None and deployment["metadata"].get("uid") == ref.get("uid"):
                reconcile(deployment, memo, _indexes(kwargs), fresh=True)


def _child_crd(name: str, **_: Any) -> bool:
    return name in (KEDA_CRD, PODMONITOR_CRD)


@kopf.on.event("apiextensions.k8s.io", "v1", "customresourcedefinitions", when=_child_crd)
def child_crd_installed(type: str, memo: kopf.Memo, **kwargs: Any) -> None:
    """KEDA or the Prometheus Operator installed after the operator: create the ScaledObjects and PodMonitors
    that were waiting for them, no restart needed."""
    if type != "ADDED":
        return
    indexes = _indexes(kwargs)
    for namespace, name in list(indexes["deployments"]):
        deployment = memo.kube.get_deployment(namespace, name)
        if deployment is not None:
            reconcile(deployment, memo, indexes, fresh=True)


async def _resync_forever(memo: kopf.Memo) -> None:
    """Every few minutes, reconcile every tracked Deployment: a safety net for failures that outlasted the retries.

    In sync, this costs one read per Deployment and no write.
    """
    while True:
        await asyncio.sleep(RESYNC_SECONDS)
        indexes = memo.shared["indexes"]
        if indexes is None:
            continue
        for namespace, name in list(indexes["deployments"]):
            try:
                deployment = await asyncio.to_thread(memo.kube.get_deployment, namespace, name)
                if deployment is not None:
                    await asyncio.to_thread(reconcile, deployment, memo, indexes, True)
            except Exception:
                log.exception("resync of %s/%s failed", namespace, name)
