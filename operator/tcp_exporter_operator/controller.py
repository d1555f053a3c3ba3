"""The controller: what the operator runs between its watches and its writes, owned by one `Controller`.

Flow of a Deployment's event: its informer's thread calls `deployment_seen`; a tracked Deployment is put on the
work queue (one entry per Deployment, the latest state winning); one of `WORKERS` threads takes it, skips it if
it predates the operator's own write or nothing the plan reads has changed, else `reconcile`s it: the cluster
facts from the indexes (`indexes.Indexes.facts_for`), the pure `plan.plan`, and `apply` of its writes, with
Warnings posted once while they hold. Children's and CRDs' events queue the Deployments they concern; a periodic
full pass is the safety net. Level-based: each reconcile re-derives the whole desired state, so after convergence
a resync, a restart or an unrelated edit costs no write.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import urllib3

from tcp_exporter_operator import metrics
from tcp_exporter_operator.annotations import (
    A_PORT,
    A_SCALE_IN,
    A_STATUS,
    PREFIX,
    InvalidSpec,
    address_allowed,
    asks_for_scaled_object,
    parse_spec,
    sidecar_of,
    tracked,
)
from tcp_exporter_operator.config import Config
from tcp_exporter_operator.desired import is_ours
from tcp_exporter_operator.diff import SCALED_OBJECT_OPTIONAL, child_action
from tcp_exporter_operator.events import CHILDREN, MANAGED_BY, Event
from tcp_exporter_operator.indexes import KEDA_CRD, PODMONITOR_CRD, Indexes, surfaced_conditions
from tcp_exporter_operator.kube import (
    ApiError,
    Conflict,
    EventPoster,
    Kube,
    crd_lister,
    custom_lister,
    deployments_lister,
    hpas_lister,
    namespaces_lister,
    statefulsets_lister,
)
from tcp_exporter_operator.plan import CLEARS, Plan, plan
from tcp_exporter_operator.rollouts import Rollouts, paced
from tcp_exporter_operator.scalein import DeletionCosts, Target, parse_headers
from tcp_exporter_operator.signalcheck import SignalCheck
from tcp_exporter_operator.watch import RESYNC, Informer, Item, Key, Peering, WorkQueue, newest, revision
from tcp_exporter_operator.webhook import OPT_OUT, controller_ref, owning_deployment
from tcp_exporter_operator.workloads import (
    DEPLOYMENT,
    KINDS,
    ROLLOUT,
    ROLLOUT_CRD,
    ROLLOUTS,
    STATEFULSET,
    key_name,
    key_of,
    kind_of,
    made_from,
    with_kind,
    with_template,
)

log = logging.getLogger(__name__)
RETRY_DELAYS = (0.5, 1, 2, 4, 8, 15)
RESYNC_SECONDS = 300.0
EXPIRY_TICK = 10.0  # seconds between checks for upgrade slots held past their limit
# After its own patch, the operator skips the Deployment's watch events older than its write (they
# would plan the same patch again), for at most this many seconds.
CONSISTENCY_TIMEOUT = 10.0
WORKERS = 8  # threads reconciling Deployments; each holds one Deployment at a time
# Liveness fails when work has waited this long with no worker finishing anything: wedged, a restart helps. A
# reconcile's retries take about 30 s at most, and every API call has a deadline.
STALLED_SECONDS = 300.0
WEBHOOK_READ_TIMEOUT = 3.0  # seconds for the webhook's read of a pod's Deployment (the API server waits 5 at most)


def unchanged(deployment: Mapping[str, Any], pods: bool = False) -> tuple[int, ...]:
    """What a plan of this Deployment depends on, of the Deployment itself: its spec (by generation) and its
    tcp-exporter/ annotations (the only ones a plan reads). The controllers' updates, most of a Deployment's watch
    events, change neither: their status, and the deployment.kubernetes.io/revision annotation the Deployment
    controller adds after a create and after every rollout (had it counted, a write refused for a Deployment just
    created would be tried again once that annotation arrived). With
    `pods` (webhook injection, where the plan also counts the pods without the sidecar), the pod counts of its
    status too: a pod created, or replaced, is planned again."""
    meta = deployment["metadata"]
    ours = sorted(item for item in (meta.get("annotations") or {}).items() if item[0].startswith(PREFIX))
    state = int(meta.get("generation") or 0), hash(tuple(ours))
    if not pods:
        return state
    status = deployment.get("status") or {}
    counts = (status.get(k) for k in ("replicas", "updatedReplicas", "readyReplicas", "availableReplicas"))
    return (*state, *(c if type(c) is int else -1 for c in counts))


def older(version: str | None, than: str) -> bool:
    """Whether a watch event predates our write. resourceVersions are etcd revisions, ordered integers, in
    every etcd-backed API server; kopf may coalesce events, so waiting for our exact version could wait forever.
    Anything not comparable counts as not older."""
    ours, theirs = revision(than), revision(version)
    return ours >= 0 and 0 <= theirs < ours


def _transient(exc: Exception) -> bool:
    if isinstance(exc, ApiError):
        return exc.status in (429, 500, 502, 503, 504)
    return isinstance(exc, urllib3.exceptions.HTTPError | OSError)


class Controller:
    """The informers, the indexes they keep, the work queue and its workers, and the state they share."""

    def __init__(
        self,
        config: Config,
        kube: Kube,
        namespaces: tuple[str, ...],
        peering: str | None = None,
        identity: str = "",
        priority: int = 0,
    ) -> None:
        self.config = config
        self.kube = kube
        self.webhook = config.injection == "webhook"
        self.events = EventPoster(kube)
        self.namespaces = namespaces
        self.indexes = Indexes()
        self.warned: dict[str, set[tuple[str, str]]] = {}  # uid -> the Warnings posted while they hold
        self.synced: dict[str, tuple[int, ...]] = {}  # uid -> unchanged(): the Deployment as last found in sync
        # uid -> unchanged(): the Deployment as it was when the API server refused a write for it. Not retried
        # until it changes, or until the next full pass (an admin may have fixed a policy meanwhile).
        self.refusals: dict[str, tuple[int, ...]] = {}
        self.scale_in_installed = True  # until check_scale_in has asked the API server
        self.rollouts = Rollouts(config.max_concurrent_rollouts, hold=config.max_rollout_seconds)
        self.awaiting: dict[str, tuple[str, float]] = {}  # uid -> (our write's resourceVersion, until when)
        self.peering = Peering(
            kube,
            peering,
            identity,
            priority,
            on_resume=self.full_pass,  # what changed while another replica was active
        )
        self.queue = WorkQueue[Key, Item](newest)
        self.received: dict[Key, float] = {}  # key -> when its oldest unhandled event arrived
        self.ready = threading.Event()  # every watch has listed once
        # Webhook injection: whether each Deployment seen is tracked (annotated), so that a pod of one that is not
        # is answered without an API call.
        self.tracked_keys: dict[Key, bool] = {}
        self.scale_targets: dict[Key, Target] = {}  # (namespace, name) -> what scale-in needs of each opted in
        # Patch injection of workloadRef Rollouts (`as_made`): (namespace, Deployment) -> the key name of the
        # annotated Rollout whose pods it makes, and (namespace, that key name) -> the Deployment.
        self.referenced: dict[Key, str] = {}
        self.references: dict[Key, str] = {}
        self.signal = SignalCheck(
            config,
            post=lambda body, event: self.post(body, [event]),
            allowed=lambda url: address_allowed(url, config),
            headers=parse_headers(config.custom_headers),
            may_run=lambda: self.ready.is_set() and self.peering.wait_active(0),
        )
        self.informers = self._informers()
        self.workload_informers = {
            kind: self.informers[plural]
            for kind, plural in ((DEPLOYMENT, "deployments"), (STATEFULSET, "statefulsets"), (ROLLOUT, "rollouts"))
            if plural in self.informers
        }
        self.stopping = threading.Event()
        self.progress_at = time.monotonic()  # when a worker last finished an entry

    def start(self) -> None:
        """The watches, then (once every one has listed: `ready`) the workers; the deletion costs; the resync."""
        for informer in self.informers.values():
            informer.start()

        def ready() -> None:
            self.check_scale_in()
            for informer in self.informers.values():
                informer.synced.wait()
            log.info("every watch has listed: reconciling Deployments")
            self.ready.set()

        threading.Thread(target=ready, name="ready", daemon=True).start()
        DeletionCosts(
            self.kube,
            self.scale_targets,
            self.config.deletion_cost_period,
            self.config.deletion_cost_rate,
            parse_headers(self.config.custom_headers),
            may_write=lambda: self.ready.is_set() and self.scale_in_installed and self.peering.wait_active(0),
            allowed=lambda url: address_allowed(url, self.config),
        ).start()
        self.signal.start(self.stopping)
        for i in range(WORKERS):
            threading.Thread(target=self._work, name=f"reconcile-{i}", daemon=True).start()
        threading.Thread(target=self._resync_forever, name="resync", daemon=True).start()
        threading.Thread(target=self._expire_rollouts_forever, name="rollout-expiry", daemon=True).start()

    def stop(self) -> None:
        self.stopping.set()
        for informer in self.informers.values():
            informer.stop()

    # -- watches -------------------------------------------------------------------------------------

    def _informers(self) -> dict[str, Informer]:
        """The watches the operator runs: Deployments (tracked ones queued, the rest dropped) and the indexes a plan
        reads."""
        scopes: tuple[str | None, ...] = self.namespaces or (None,)
        managed = f"app.kubernetes.io/managed-by={MANAGED_BY}"
        indexes = self.indexes
        informers = {
            "deployments": Informer(
                self.kube,
                "deployments",
                deployments_lister,
                scopes,
                lambda t, o: self.deployment_seen(t, with_kind(o, DEPLOYMENT)),
            ),
            **(
                {
                    "statefulsets": Informer(
                        self.kube,
                        "statefulsets",
                        statefulsets_lister,
                        scopes,
                        lambda t, o: self.deployment_seen(t, with_kind(o, STATEFULSET)),
                    )
                }
                if STATEFULSET in self.config.workload_kinds
                else {}
            ),
            **(
                {
                    # Argo Rollouts' kind: watched once its CRD is served (until then retried, and at once when
                    # the CRD appears: crd_seen).
                    "rollouts": Informer(
                        self.kube,
                        "rollouts",
                        custom_lister(*ROLLOUTS),
                        scopes,
                        lambda t, o: self.deployment_seen(t, with_kind(o, ROLLOUT)),
                    )
                }
                if ROLLOUT in self.config.workload_kinds
                else {}
            ),
            "scaledobjects": Informer(
                self.kube,
                "scaledobjects",
                custom_lister(*CHILDREN["ScaledObject"]),
                scopes,
                lambda t, o: self.child_seen("ScaledObject", t, o),
                on_relist=self.full_pass,
            ),
            "podmonitors": Informer(
                self.kube,
                "podmonitors",
                custom_lister(*CHILDREN["PodMonitor"], label_selector=managed),
                scopes,
                lambda t, o: self.child_seen("PodMonitor", t, o),
                on_relist=self.full_pass,
            ),
            "hpas": Informer(self.kube, "hpas", hpas_lister, scopes, lambda t, o: indexes.hpas.update(t, o)[1]),
            "namespaces": Informer(
                self.kube, "namespaces", namespaces_lister, (None,), lambda t, o: indexes.psa_levels.update(t, o)[1]
            ),
            **{
                crd: Informer(self.kube, crd, crd_lister(crd), (None,), self.crd_seen)
                for crd in (KEDA_CRD, PODMONITOR_CRD, *([ROLLOUT_CRD] if ROLLOUT in self.config.workload_kinds else []))
            },
        }
        return informers

    def child_seen(self, kind: str, type: str, obj: Mapping[str, Any]) -> bool:
        """A ScaledObject or PodMonitor event: indexed; and one of ours deleted or edited by hand (a new generation;
        KEDA's frequent status updates are not) is put back by reconciling its Deployment, which is also
        reconciled when KEDA's Ready or Fallback condition changes (its Warnings follow them)."""
        previous, kept = self.indexes.children(kind).update(type, obj)
        meta = obj.get("metadata") or {}
        if previous is None:
            return kept
        same_spec = previous["metadata"].get("generation") == meta.get("generation")
        same_conditions = (previous.get("status") or {}).get("conditions") == surfaced_conditions(obj)
        if type != "DELETED" and same_spec and same_conditions:
            return kept
        if previous["metadata"]["labels"].get("app.kubernetes.io/managed-by") != MANAGED_BY:
            return kept
        for ref in previous["metadata"]["ownerReferences"]:
            if ref.get("kind") in KINDS and ref.get("name"):
                self.enqueue(previous["metadata"]["namespace"], key_name(ref["kind"], ref["name"]))
        return kept

    def crd_seen(self, type: str, obj: Mapping[str, Any]) -> bool:
        """KEDA, the Prometheus Operator or Argo Rollouts installed after the operator: watch their kinds now, and
        create the ScaledObjects and PodMonitors that were waiting for them, no restart needed."""
        previous, kept = self.indexes.crds.update(type, obj)
        watch = {KEDA_CRD: "scaledobjects", PODMONITOR_CRD: "podmonitors", ROLLOUT_CRD: "rollouts"}
        if kept:  # added, or changed (say, Established now): the kind's watch tries again at once if it waits
            self.informers[watch[obj["metadata"]["name"]]].poke()
        if previous is None and kept and self.ready.is_set():
            self.full_pass()
        return kept

    # -- Deployments: the watch thread dispatches, workers reconcile ---------------------------------

    def deployment_seen(self, type: str, body: Mapping[str, Any]) -> bool:
        """A Deployment's event, from the watch thread: a tracked one (or one that just stopped being tracked, to
        be seen without what it carried) is queued, a deletion forgotten; the rest dropped. Whether it is tracked."""
        meta = body["metadata"]
        is_tracked = type != "DELETED" and tracked(meta.get("annotations") or {})
        key = key_of(body)
        if kind_of(body) == ROLLOUT and not self.webhook:
            self.refer(key, body if is_tracked else None)
        if self.webhook:
            if type == "DELETED":
                self.tracked_keys.pop(key, None)
            else:
                self.tracked_keys[key] = A_PORT in (meta.get("annotations") or {})
        if is_tracked or meta.get("uid") in self.workload_informers[kind_of(body)].known:
            self.dispatch(type, body)
            self.scale_target(body if is_tracked else None, key)
            self.signal.observe(body if is_tracked else None, key)
        return is_tracked

    def refer(self, key: Key, rollout: Mapping[str, Any] | None) -> None:
        """Keep which Deployment a tracked workloadRef Rollout is made from (from the watch thread). A Deployment
        it no longer names plans itself again: its injection, if it carries one, is nobody's now."""
        namespace = key[0]
        previous = self.references.pop(key, None)
        name = made_from(rollout) if rollout is not None else None
        if name is not None:
            self.references[key] = name
            self.referenced[(namespace, name)] = key[1]
        if previous is not None and previous != name:
            if self.referenced.get((namespace, previous)) == key[1]:
                del self.referenced[(namespace, previous)]
            self.enqueue(namespace, previous)

    def scale_target(self, body: Mapping[str, Any] | None, key: Key) -> None:
        """Keep what connection-aware scale-in needs of an opted-in Deployment (its replicas change with the HPA)."""
        targets = self.scale_targets
        annotations = (body or {}).get("metadata", {}).get("annotations") or {}
        opted = A_SCALE_IN in annotations or self.config.scale_in_by_connections
        # Not opted in (no need to parse the rest), or not a Deployment (plan.SCALE_IN_IGNORED says why).
        if body is None or A_PORT not in annotations or not opted or kind_of(body) != DEPLOYMENT:
            targets.pop(key, None)
            return
        try:
            spec = parse_spec(body, self.config)
        except InvalidSpec:
            spec = None
        if spec is None or not spec.scale_in_by_connections:
            targets.pop(key, None)
            return
        replicas = int((body.get("spec") or {}).get("replicas", 1))
        targets[key] = Target(spec.threshold, spec.min_replicas, replicas, spec.prometheus)

    def dispatch(self, type: str, body: Mapping[str, Any]) -> None:
        """Queue a Deployment's event (a deletion is only forgotten)."""
        meta = body["metadata"]
        metrics.TRACKED.set(sum(len(informer.known) for informer in self.workload_informers.values()))
        if type == "DELETED":
            # Nothing is left to reconcile: a queued entry would patch a gone Deployment and warn of the 404.
            self.queue.forget(key_of(body))
            self.received.pop(key_of(body), None)
            uid = meta.get("uid")
            self.warned.pop(uid, None)
            self.awaiting.pop(uid, None)
            self.synced.pop(uid, None)
            self.refusals.pop(uid, None)
            for namespace_, name_ in self.rollouts.forget(uid):
                self.enqueue(namespace_, name_)
            return
        key = key_of(body)
        self.received.setdefault(key, time.monotonic())  # the oldest event not yet handled, for event_to_write
        self.queue.put(key, (type, body))
        metrics.QUEUE_DEPTH.set(len(self.queue))

    def enqueue(self, namespace: str, name: str) -> None:
        """Reconcile a Deployment from a fresh read, whether or not it looks in sync."""
        self.queue.put((namespace, name), (RESYNC, None))

    def _work(self) -> None:
        queue = self.queue
        while True:
            self.ready.wait()
            entry = queue.get()
            if entry is None:
                continue
            key, (type, body) = entry
            metrics.QUEUE_DEPTH.set(len(queue))
            while not self.peering.wait_active(60):
                pass  # another replica is active (kopf's peering rule): hold the entry until this one is
            received = self.received.pop(key, None)
            result = None
            deployment = body
            try:
                if type == RESYNC:
                    deployment = self.kube.get_deployment(*key)
                    uid = (deployment or {}).get("metadata", {}).get("uid")
                    if deployment is not None and self.refusals.get(uid) == self.state(deployment):
                        # Refused and not changed since: not retried on another object's account (a child's
                        # event), only by a full pass, which forgets the refusals first.
                        result = None
                    elif deployment is not None:
                        result = self.reconcile(deployment, fresh=True)
                elif body is not None:
                    result = self.deployment_event(body)
            except Exception as exc:
                # Per Deployment: a malformed object (any editor can write one) fails alone, with a Warning once.
                result = "failed"
                log.exception("reconciling %s/%s failed; the next event or resync retries", *key)
                if deployment is not None:
                    self.warn_once(
                        deployment,
                        Event(
                            "Warning",
                            "ReconcileFailed",
                            f"the operator could not handle this Deployment ({exc.__class__.__name__}: {exc}); "
                            "nothing changed",
                        ),
                    )
            finally:
                queue.done(key)
                self.progress_at = time.monotonic()
            if result is not None:
                metrics.RECONCILES.labels(result).inc()
            if result == "wrote" and received is not None:
                metrics.EVENT_TO_WRITE.observe(time.monotonic() - received)

    def deployment_event(self, body: Mapping[str, Any]) -> str | None:
        """A tracked Deployment's watch event: reconciled unless it predates our own write or nothing it could
        change has changed since it was last found in sync. Returns the reconcile's result, or None if skipped."""
        uid = body["metadata"].get("uid")
        for namespace_, name_ in self.rollouts.progress(uid, body):
            self.enqueue(namespace_, name_)  # a paced upgrade finished here: the next waiting one may roll now
        awaiting = self.awaiting.get(uid)  # the watch thread may drop it meanwhile (a deletion): read it once
        if awaiting is not None:
            written, deadline = awaiting
            if older(body["metadata"].get("resourceVersion"), written) and time.monotonic() < deadline:
                log.debug(
                    "skipped %s/%s at resourceVersion %s: older than our write %s",
                    body["metadata"]["namespace"],
                    body["metadata"]["name"],
                    body["metadata"].get("resourceVersion"),
                    written,
                )
                return None
            self.awaiting.pop(uid, None)
        state = self.state(body)
        # Nothing the plan reads of the Deployment has changed since it was last found in sync (its children's
        # edits come through their own events, CRDs through full passes, both planned afresh), or since a write
        # for it was refused (retried when it changes, and by every full pass): no need to plan again.
        settled = ("reconciled", "0 writes (unchanged)") if self.synced.get(uid) == state else None
        if settled is None and self.refusals.get(uid) == state:
            settled = ("skipped", "a write for it was refused and it has not changed since")
        if settled is not None:
            meta = body["metadata"]
            log.debug("%s %s/%s at resourceVersion %s: %s", settled[0], meta["namespace"], meta["name"],
                      meta.get("resourceVersion"), settled[1])  # fmt: skip
            return None
        # The body is the watch's latest (the queue keeps only that): as fresh as a read would be. Should it be
        # behind anyway, the patch's preconditions fail (422) on exactly what changed, and the conflict reads it
        # afresh.
        return self.reconcile(body, fresh=True)

    def full_pass(self) -> None:
        """Reconcile every tracked Deployment, read afresh (queued: each waits for its own worker). Also after a
        child kind's watch had to list again (its CRD came back, or the watch was too far behind)."""
        if not self.ready.is_set():
            return  # the first reconcile of everything is still to come
        self.refusals.clear()  # a refused write is tried again once per full pass
        for kind, informer in self.workload_informers.items():
            for namespace, name in informer.known_keys():
                self.enqueue(namespace, key_name(kind, name))

    def check_scale_in(self) -> None:
        """Whether connection-aware scale-in is installed (this account may patch pods): read at start and before
        each periodic resync, so that installing or removing the component is noticed without a restart."""
        try:
            installed = self.kube.may_patch_pods()
        except Exception as exc:  # unknown: keep what was known
            log.warning("checking whether the operator may patch pods: %s", exc)
            return
        if installed != self.scale_in_installed:
            log.info("connection-aware scale-in is %s", "installed" if installed else "not installed (no pod rights)")
        self.scale_in_installed = installed

    def _resync_forever(self) -> None:
        """Every few minutes, reconcile every tracked Deployment: a safety net for failures that outlasted the
        retries. In sync, this costs one read per Deployment and no write."""
        while not self.stopping.wait(RESYNC_SECONDS):
            self.check_scale_in()  # here, not in full_pass: that also runs on watch threads, which must not wait
            self.full_pass()

    def _expire_rollouts_forever(self) -> None:
        """Take back upgrade slots held past their limit, even from Deployments that send no more events."""
        while not self.stopping.wait(EXPIRY_TICK):
            for namespace, name in self.rollouts.expire():
                self.enqueue(namespace, name)

    # -- reconciling one Deployment --------------------------------------------------------------------

    def reconcile(self, deployment: Mapping[str, Any], fresh: bool = False) -> str:
        """Plan and apply; on a conflict read the Deployment again; retry transient API errors a few times.

        Unless `fresh`, the Deployment is read afresh before a patch (a read costs less than a write the API
        server rejects, and often shows the patch is not needed); the HPAs always are.

        Returns the result the metrics count: "wrote", "in_sync" or "failed".
        """
        kube = self.kube
        namespace, name = key_of(deployment)  # the name is StatefulSet/NAME for a StatefulSet (workloads.py)
        current: Mapping[str, Any] | None = deployment
        hpas = None
        for delay in (*RETRY_DELAYS, None):
            try:
                if current is None or current["metadata"].get("deletionTimestamp"):
                    self.rollouts.unreserve(deployment["metadata"].get("uid", ""))
                    return "in_sync"
                owner = self.referenced.get((namespace, name)) if kind_of(current) == DEPLOYMENT else None
                if owner is not None and not self.webhook:
                    # Injected on a workloadRef Rollout's behalf: planned by the Rollout's reconcile, asked for now
                    # (its template may have changed); its status updates are not planned again.
                    self.enqueue(namespace, owner)
                    self.synced[current["metadata"].get("uid", "")] = self.state(current)
                    return "in_sync"
                made, target = self.as_made(current)
                facts = replace(
                    self.indexes.facts_for(current, hpas),
                    scale_in_installed=self.scale_in_installed,
                    uninjected_pods=self.uninjected_pods(made),
                    template_from=target,
                )
                uid = current["metadata"].get("uid", "")
                result = plan(made, facts, self.config)
                if result.upgrade and paced(current) and not self.rollouts.reserve(uid):
                    result = result.deferred()
                    self.rollouts.wait(uid, namespace, name)
                elif not result.upgrade:
                    # Nothing of the operator's own to roll out (any more: the user's change may have carried it):
                    # a freed slot must not go to this one.
                    self.rollouts.not_waiting(uid)
                if result.deployment_patch is not None and hpas is None:
                    # Before the rollout a patch starts, the facts it rests on read afresh: the Deployment (unless
                    # just read) and the HPAs that would forbid it, all those written before this Deployment's
                    # version (an HPA applied with the Deployment may not be indexed yet: its own watch can lag).
                    if not fresh:
                        current, fresh = kube.get_deployment(namespace, name), True
                    if current is None:
                        continue
                    hpas = kube.list_hpas(namespace, current["metadata"].get("resourceVersion"))
                    continue
                try:
                    self.apply(current, result, target)
                finally:
                    self.rollouts.unreserve(uid)  # a no-op once the rollout has started
                if result.writes == 0 and not result.upgrade_deferred:
                    self.synced[uid] = self.state(current)
                else:
                    self.synced.pop(uid, None)
                log.log(
                    logging.INFO if result.writes else logging.DEBUG,
                    "reconciled %s/%s at resourceVersion %s: %d writes",
                    namespace,
                    name,
                    current["metadata"].get("resourceVersion"),
                    result.writes,
                )
                return "wrote" if result.writes else "in_sync"
            except Conflict:
                current = kube.get_deployment(namespace, name)
                continue
            except Exception as exc:
                if delay is None or not _transient(exc):  # not retried
                    failing = current or deployment
                    self.rollouts.unreserve(failing["metadata"].get("uid", ""))  # no slot stays held by a failure
                    if not isinstance(exc, ApiError):
                        raise
                    self.refused(failing, exc)
                    if not _transient(exc):
                        self.refusals[failing["metadata"].get("uid", "")] = self.state(failing)
                    return "failed"
                log.warning("reconciling %s/%s failed (%s); retrying in %s s", namespace, name, exc, delay)
                time.sleep(delay)
                with contextlib.suppress(Exception):  # the next attempt reports it
                    current = kube.get_deployment(namespace, name)
        log.warning(
            "gave up reconciling %s/%s for now: it kept changing; the next event or resync retries", namespace, name
        )
        return "failed"

    def as_made(self, workload: Mapping[str, Any]) -> tuple[Mapping[str, Any], str | None]:
        """The workload as planned, with the pod template its pods are made from, and the Deployment patched in its
        place (None: the workload itself).

        A workloadRef Rollout's template is its Deployment's, read afresh. In the webhook mode it is only checked
        and planned on it. In the patch mode that Deployment is injected on the Rollout's behalf: the plan is of
        the Rollout (its name, kind and uid: the sidecar's label, the ScaledObject's target and owner, the Events;
        its tcp-exporter/ annotations) with the Deployment's template, status annotation and version, and its
        patch goes to the Deployment, whose own reconcile then leaves it to the Rollout's (`referenced`)."""
        name = made_from(workload)
        if name is None:
            return workload, None
        source = self.kube.get_deployment(workload["metadata"]["namespace"], name)
        if source is None:
            return workload, None
        made = with_template(workload, source)
        if self.webhook:
            return made, None
        if self.referenced.get((workload["metadata"]["namespace"], name), key_of(workload)[1]) != key_of(workload)[1]:
            return made, None  # another Rollout named it since: that one injects it (two would undo each other)
        ours = {k: v for k, v in (workload["metadata"].get("annotations") or {}).items() if k.startswith(PREFIX)}
        ours.pop(A_STATUS, None)  # the Rollout's own would be forged: the injection's is the Deployment's
        theirs = source["metadata"]
        if A_STATUS in (theirs.get("annotations") or {}):
            ours[A_STATUS] = theirs["annotations"][A_STATUS]
        meta = {
            **workload["metadata"],
            "annotations": ours,
            "resourceVersion": theirs.get("resourceVersion"),
            "generation": theirs.get("generation"),
        }
        return {**made, "metadata": meta}, name

    def state(self, deployment: Mapping[str, Any]) -> tuple[int, ...]:
        return unchanged(deployment, pods=self.webhook)

    def uninjected_pods(self, deployment: Mapping[str, Any]) -> tuple[int, int] | None:
        """Webhook injection: (pods created without the sidecar, pods) of an annotated Deployment's running pods;
        None in patch mode, or where there is nothing to count."""
        meta = deployment["metadata"]
        match = ((deployment.get("spec") or {}).get("selector") or {}).get("matchLabels")
        if not self.webhook or A_PORT not in (meta.get("annotations") or {}) or not match:
            return None
        if A_STATUS in (meta.get("annotations") or {}):
            return None  # still injected in its template (moving to the webhook): its pods have the sidecar
        live = (None, "Pending", "Running")
        key = key_of(deployment)[1]
        pods = [
            p
            for p in self.kube.list_pods(meta["namespace"], match)
            if not p["metadata"].get("deletionTimestamp")
            and (p.get("status") or {}).get("phase") in live
            and owning_deployment(p) == key  # its own, not another owner's with the same labels
            and (p["metadata"].get("labels") or {}).get(OPT_OUT) != "false"  # opted out: left without, as asked
        ]
        missing = [p for p in pods if sidecar_of({"spec": {"template": {"spec": p.get("spec") or {}}}}) is None]
        return len(missing), len(pods)

    def workload_of(self, namespace: str, pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """The webhook's look-up of the workload that owns a pod being created: read afresh (its settings exactly
        as they are now), unless the watch knows it is not annotated (the pods of most cost no API call); and only
        if it really owns the pod: the owner reference's UID is its StatefulSet's, or its ReplicaSet's, itself
        controlled by the Deployment (or Rollout). A request forged by a pod (any pod can reach the webhook) that
        names a workload it does not own learns nothing of its settings or drain token: the UIDs are not guessable."""
        key, ref = owning_deployment(pod), controller_ref(pod)
        if key is None or ref is None or self.tracked_keys.get((namespace, key)) is False:
            return None
        workload = self.kube.get_deployment(namespace, key, timeout=WEBHOOK_READ_TIMEOUT)
        if workload is None or A_PORT not in (workload["metadata"].get("annotations") or {}):
            return workload
        uid = workload["metadata"].get("uid")
        if kind_of(workload) == STATEFULSET:
            return workload if uid and ref.get("uid") == uid else None
        replicaset = self.kube.get_replicaset(namespace, str(ref.get("name")), timeout=WEBHOOK_READ_TIMEOUT)
        if replicaset is None or replicaset["metadata"].get("uid") != ref.get("uid"):
            return None
        owner = controller_ref(replicaset)
        proven = owner and owner.get("kind") == kind_of(workload) and uid and owner.get("uid") == uid
        return workload if proven else None

    def conflict(self, workload: Mapping[str, Any]) -> str | None:
        """Why the patch mode would not inject this workload either: another autoscaler scales it."""
        if not asks_for_scaled_object(workload["metadata"].get("annotations") or {}):
            return None
        foreign = self.indexes.facts_for(workload).foreign_autoscalers
        return f"{', '.join(foreign)} already scales its workload" if foreign else None

    def psa_level(self, namespace: str) -> str | None:
        levels = list(self.indexes.psa_levels.get(namespace, [None]))
        return levels[0] if levels else None

    def apply(self, deployment: Mapping[str, Any], plan: Plan, target: str | None = None) -> None:
        """The plan's writes; the workload's patch goes to `target` where it names the Deployment that a
        workloadRef Rollout's pods are made from (`as_made`)."""
        kube = self.kube
        meta = deployment["metadata"]
        if plan.deployment_patch is not None:
            key: tuple[str, str] = (meta["namespace"], target) if target is not None else key_of(deployment)
            written, generation = kube.patch_deployment(*key, plan.deployment_patch)
            self.awaiting[meta.get("uid")] = (written, time.monotonic() + CONSISTENCY_TIMEOUT)
            if plan.upgrade and paced(deployment):
                self.rollouts.started(meta.get("uid", ""), generation, deployment)
        events = list(plan.events)
        for write in plan.children:
            kind, child, action = write.kind, write.body, write.action
            # What is created or replaced is shown in its index until its own event comes: the Deployment's next
            # event, often first, is then planned from it instead of creating it again.
            children = self.indexes.children(kind)
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
                if is_ours(existing, deployment):
                    # Ours (or adopted from Git), but the index had not seen it yet when this plan was made: brought
                    # to what is wanted, unless it already is (then nothing was created, and no Event says so).
                    if child_action(child, existing, SCALED_OBJECT_OPTIONAL if kind == "ScaledObject" else ()) is None:
                        children.wrote(existing)
                        events = [e for e in events if not (e.type == "Normal" and e.reason.startswith(kind))]
                    else:
                        children.wrote(kube.replace_child(child))
                    continue
                name = child["metadata"]["name"]
                events = [e for e in events if not (e.type == "Normal" and e.reason.startswith(kind))]
                events.append(
                    Event(
                        "Warning",
                        f"{kind}Conflict",
                        f"a {kind} named {name} already exists and is not owned by this Deployment: it is left as "
                        f"it is, and this Deployment gets no {kind} until it is renamed or deleted",
                    )
                )
        uid = meta.get("uid", "")
        warnings = {(e.reason, e.message) for e in events if e.type == "Warning"}
        # A Warning is posted once while it holds, not on every watch event of the Deployment.
        already = self.warned.get(uid, set())
        # KEDA's Warning posted here whose condition has cleared: a Normal Event says so (once, as the Warning is
        # then forgotten), so that whoever reads the workload's Events sees that it cleared.
        events += [e for e in plan.cleared if any(reason == CLEARS[e.reason] for reason, _ in already)]
        self.post(deployment, [e for e in events if not (e.type == "Warning" and (e.reason, e.message) in already)])
        self.warned[uid] = warnings

    def post(self, deployment: Mapping[str, Any], events: list[Event]) -> None:
        for event in events:
            if event.type == "Warning":
                metrics.WARNINGS.labels(event.reason).inc()
        self.events.post(deployment, events)

    def refused(self, deployment: Mapping[str, Any], exc: ApiError) -> None:
        """A write the API server refused (RBAC, a webhook, validation): one Warning on the Deployment, posted once
        while it holds, and no Normal Event for what was not done. The next event or resync tries again."""
        meta = deployment["metadata"]
        detail = exc.body
        with contextlib.suppress(ValueError, AttributeError):  # a Status object's message, when it is one
            detail = json.loads(exc.body).get("message", exc.body)
        event = Event("Warning", "WriteRefused", f"the API server refused a write ({exc.status}): {detail}")
        self.warn_once(deployment, event)
        log.warning("reconciling %s/%s: %s", meta["namespace"], meta["name"], event.message)

    def warn_once(self, deployment: Mapping[str, Any], event: Event) -> None:
        """A Warning on the Deployment, posted once while it holds (until the Deployment is planned again)."""
        event = Event(event.type, event.reason, event.message[:1000])
        warned = self.warned.setdefault(deployment["metadata"].get("uid", ""), set())
        if (event.reason, event.message) not in warned:
            warned.add((event.reason, event.message))
            self.post(deployment, [event])

    def health(self) -> dict[str, Any]:
        """What the liveness probe reports: whether every watch has listed (client-go's HasSynced), and how long
        the workers have made no progress while work waits (stalled: the probe fails past STALLED_SECONDS)."""
        waiting = len(self.queue)
        idle = time.monotonic() - self.progress_at
        active = self.peering.wait_active(0)
        return {
            "synced": {name: informer.synced.is_set() for name, informer in self.informers.items()},
            "queue": waiting,
            "stalled": bool(waiting and active and self.ready.is_set() and idle > STALLED_SECONDS),
            "idle_seconds": round(idle),
        }
