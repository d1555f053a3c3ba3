"""The operator's own watch of Deployments: a cluster holds thousands of them, and almost none are its business.

kopf keeps a stream, a worker and bookkeeping for every object of a watched resource, annotated or not, and waits
for all of them before it runs any handler. Deployments are the one resource a cluster has thousands of, so the
operator lists and watches them itself, through the official client: a list in pages, then a watch from its
resourceVersion (with bookmarks, so that a resumed watch rarely has to list again). What is not tracked is
dropped as soon as its JSON is parsed; nothing of it is kept. kopf keeps the small resources (ScaledObjects,
PodMonitors, HPAs, namespaces, CRDs) in its indexes.

The tracked Deployments' events go to a work queue in the manner of client-go's: one entry per Deployment, the
latest state replacing an older one still waiting, and never two workers on the same Deployment.
"""

from __future__ import annotations

import datetime
import json
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any, Generic, TypeVar

import urllib3
from kubernetes import client

from tcp_exporter_operator import metrics
from tcp_exporter_operator.kube import ApiError, Kube

log = logging.getLogger(__name__)
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
PAGE = 500
WATCH_SECONDS = 300  # the API server ends a watch after this; it is resumed from the last resourceVersion
BACKOFF = (1, 2, 4, 8, 15)
RESYNC = "RESYNC"  # a queue entry that says: read the Deployment afresh and reconcile it, even if it looks in sync


class WorkQueue(Generic[K, V]):
    """Keyed, coalescing, and exclusive per key: `put` replaces what waits under the key (`merge` decides how),
    and `get` hands out only keys no other worker holds. A key put again while held waits until `done`."""

    def __init__(self, merge: Callable[[V, V], V] = lambda old, new: new) -> None:
        self.cond = threading.Condition()
        self.pending: dict[K, V] = {}  # in arrival order
        self.busy: set[K] = set()
        self.merge = merge

    def put(self, key: K, item: V) -> None:
        with self.cond:
            self.pending[key] = self.merge(self.pending[key], item) if key in self.pending else item
            self.cond.notify()

    def get(self, timeout: float | None = None) -> tuple[K, V] | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while True:
                key = next((k for k in self.pending if k not in self.busy), None)
                if key is not None:
                    self.busy.add(key)
                    return key, self.pending.pop(key)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self.cond.wait(remaining)

    def done(self, key: K) -> None:
        with self.cond:
            self.busy.discard(key)
            self.cond.notify_all()

    def __len__(self) -> int:
        with self.cond:
            return len(self.pending)


Key = tuple[str, str]  # (namespace, name)
Item = tuple[str, Mapping[str, Any] | None]  # (event type or RESYNC, the Deployment as the event had it)


def newest(old: Item, new: Item) -> Item:
    """A waiting RESYNC stays a RESYNC (it reads afresh, which covers any event); otherwise the latest wins."""
    return old if old[0] == RESYNC else new


class Deployments:
    """List-then-watch of Deployments in each watched namespace (or all), keeping only the tracked ones' keys.

    `dispatch(type, body)` is called, from the watch thread, for each event of a tracked Deployment (and for one
    that just stopped being tracked, so that it is seen without what it carried); DELETED included.
    """

    def __init__(
        self,
        kube: Kube,
        namespaces: tuple[str, ...],
        tracked: Callable[[Mapping[str, str]], bool],
        dispatch: Callable[[str, Mapping[str, Any]], None],
    ) -> None:
        self.kube = kube
        self.scopes: tuple[str | None, ...] = namespaces or (None,)
        self.tracked = tracked
        self.dispatch = dispatch
        self.lock = threading.Lock()
        self.known: dict[str, Key] = {}  # uid -> (namespace, name) of every tracked Deployment
        self.listed = threading.Event()  # every scope listed once
        self._listed_scopes: set[str | None] = set()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        for scope in self.scopes:
            thread = threading.Thread(target=self._run, args=(scope,), name=f"watch-{scope or 'all'}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def stop(self) -> None:
        self.stopping.set()

    def tracked_keys(self) -> list[Key]:
        with self.lock:
            return list(self.known.values())

    # -- one scope ---------------------------------------------------------------------------------

    def _apps(self, api: client.ApiClient, scope: str | None, **kwargs: Any) -> Any:
        apps = client.AppsV1Api(api)
        if scope is None:
            return apps.list_deployment_for_all_namespaces(_preload_content=False, **kwargs)
        return apps.list_namespaced_deployment(scope, _preload_content=False, **kwargs)

    def _run(self, scope: str | None) -> None:
        resource_version: str | None = None
        failures = 0
        while not self.stopping.is_set():
            try:
                if resource_version is None:
                    resource_version = self._list(scope)
                    with self.lock:
                        self._listed_scopes.add(scope)
                        if len(self._listed_scopes) == len(self.scopes):
                            self.listed.set()
                resource_version = self._watch(scope, resource_version)
                if resource_version is None:
                    metrics.WATCH_RESTARTS.labels("true").inc()
                failures = 0
            except Exception as exc:  # a dropped connection, a refused watch, an API server restart: go on
                metrics.WATCH_RESTARTS.labels("false").inc()
                delay = BACKOFF[min(failures, len(BACKOFF) - 1)]
                failures += 1
                level = logging.DEBUG if isinstance(exc, urllib3.exceptions.ProtocolError) else logging.WARNING
                log.log(level, "watching Deployments in %s: %s; again in %s s", scope or "all namespaces", exc, delay)
                self.stopping.wait(delay)

    def _list(self, scope: str | None) -> str:
        """One listing in pages; tracked Deployments are dispatched, the rest dropped. Returns its resourceVersion.
        A Deployment known before but not listed now was deleted while no watch ran."""
        token = None
        seen: set[str] = set()
        resource_version = ""
        while True:

            def page(api: client.ApiClient, token: str | None = token) -> Any:
                return self._apps(api, scope, limit=PAGE, _continue=token, _request_timeout=60)

            body = json.loads(self.kube.call(page).data)
            for item in body.get("items") or []:
                uid = item["metadata"].get("uid", "")
                if self._event("ADDED", item):
                    seen.add(uid)
            meta = body.get("metadata") or {}
            resource_version = meta.get("resourceVersion") or resource_version
            token = meta.get("continue")
            if not token:
                break
        with self.lock:
            gone = [
                (uid, key) for uid, key in self.known.items() if uid not in seen and (scope is None or key[0] == scope)
            ]
        for uid, (namespace, name) in gone:
            self._event("DELETED", {"metadata": {"uid": uid, "namespace": namespace, "name": name}})
        log.info("listed Deployments in %s: %d tracked", scope or "all namespaces", len(seen))
        return resource_version

    def _watch(self, scope: str | None, resource_version: str) -> str | None:
        """Stream events from `resource_version` until the server ends the watch; returns where to resume, or None
        when the version is too old (410 Gone) and a new listing is needed."""

        def watch(api: client.ApiClient) -> Any:
            return self._apps(
                api,
                scope,
                watch=True,
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=WATCH_SECONDS,
                _request_timeout=(5, WATCH_SECONDS + 30),
            )

        try:
            response = self.kube.call(watch)
        except ApiError as exc:
            if exc.status == 410:
                return None
            raise
        try:
            for line in _lines(response):
                if self.stopping.is_set():
                    break
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        log.info("watching Deployments in %s: resourceVersion too old, listing again", scope or "all")
                        return None
                    raise ApiError(int(obj.get("code") or 0), str(obj.get("message")))
                resource_version = (obj.get("metadata") or {}).get("resourceVersion") or resource_version
                if kind != "BOOKMARK":
                    self._event(kind, obj)
        finally:
            response.release_conn()
        return resource_version

    def _event(self, kind: str, obj: Mapping[str, Any]) -> bool:
        """Dispatch an event if it concerns a tracked Deployment; whether it does (and still is tracked)."""
        meta = obj.get("metadata") or {}
        uid = meta.get("uid", "")
        is_tracked = kind != "DELETED" and self.tracked(meta.get("annotations") or {})
        with self.lock:
            was_known = uid in self.known
            if is_tracked:
                self.known[uid] = (meta["namespace"], meta["name"])
            else:
                self.known.pop(uid, None)
        if is_tracked or was_known:
            self.dispatch(kind, obj)
        return is_tracked


def _lines(response: Any) -> Iterator[bytes]:
    """The watch stream's lines (one JSON event each), from the raw chunks."""
    buffer = b""
    for chunk in response.stream(amt=None, decode_content=False):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        yield from (line for line in lines if line.strip())


class Peering:
    """Whether this replica is the active one, by kopf's rule, for the work kopf does not schedule itself.

    kopf pauses its own watches while a live peer of higher (or equal) priority exists; the operator's
    Deployment workers follow the same rule, from a watch of the same ClusterKopfPeering object (so that they
    learn of a peer when kopf does), re-judged every few seconds as peers expire.
    """

    INTERVAL = 5.0

    def __init__(
        self, kube: Kube, name: str | None, identity: str, priority: int, on_resume: Callable[[], None] = lambda: None
    ) -> None:
        self.kube, self.name, self.identity, self.priority = kube, name, identity, priority
        self.on_resume = on_resume  # called when this replica becomes active again after a pause
        self._active = threading.Event()
        self._peers: Mapping[str, Any] | None = None  # the object's status; None until read (or when missing)
        self._was: bool | None = None
        if name is None:
            self._active.set()
        else:
            threading.Thread(target=self._watch, name="peering-watch", daemon=True).start()
            threading.Thread(target=self._tick, name="peering-tick", daemon=True).start()

    def wait_active(self, timeout: float) -> bool:
        return self._active.wait(timeout)

    def _judge(self) -> None:
        peers = self._peers
        now_active = peers is not None and active(peers, self.identity, self.priority)
        (self._active.set if now_active else self._active.clear)()
        if now_active != self._was:
            log.info("Deployment workers %s (peering %s)", "active" if now_active else "paused", self.name)
            if now_active and self._was is False:
                self.on_resume()
            self._was = now_active

    def _tick(self) -> None:
        while True:
            time.sleep(self.INTERVAL)
            self._judge()

    def _watch(self) -> None:
        selector = f"metadata.name={self.name}"
        while True:
            try:

                def listing(api: client.ApiClient) -> Any:
                    return client.CustomObjectsApi(api).list_cluster_custom_object(
                        "kopf.dev", "v1", "clusterkopfpeerings", field_selector=selector, _preload_content=False
                    )

                body = json.loads(self.kube.call(listing).data)
                items = body.get("items") or []
                self._peers = (items[0].get("status") or {}) if items else None
                self._judge()
                version = (body.get("metadata") or {}).get("resourceVersion")

                def watch(api: client.ApiClient, version: str | None = version) -> Any:
                    return client.CustomObjectsApi(api).list_cluster_custom_object(
                        "kopf.dev",
                        "v1",
                        "clusterkopfpeerings",
                        field_selector=selector,
                        watch=True,
                        resource_version=version,
                        timeout_seconds=WATCH_SECONDS,
                        _preload_content=False,
                        _request_timeout=(5, WATCH_SECONDS + 30),
                    )

                response = self.kube.call(watch)
                try:
                    for line in _lines(response):
                        event = json.loads(line)
                        if event.get("type") in ("ADDED", "MODIFIED"):
                            self._peers = event["object"].get("status") or {}
                        elif event.get("type") == "DELETED":
                            self._peers = None
                        else:
                            continue
                        self._judge()
                finally:
                    response.release_conn()
            except Exception as exc:
                log.warning("watching the peering object %s: %s", self.name, exc)
                time.sleep(1)


def active(peers: Mapping[str, Any], identity: str, priority: int, now: datetime.datetime | None = None) -> bool:
    """kopf's rule: paused while any other live peer has a priority as high as ours or higher."""
    now = now or datetime.datetime.now(datetime.UTC)
    for peer, info in peers.items():
        if peer == identity or not isinstance(info, Mapping):
            continue
        try:
            lastseen = datetime.datetime.fromisoformat(str(info.get("lastseen")))
            if lastseen.tzinfo is None:
                lastseen = lastseen.replace(tzinfo=datetime.UTC)
            alive = lastseen + datetime.timedelta(seconds=int(info.get("lifetime", 60))) > now
        except (TypeError, ValueError):
            alive = True
        if alive and int(info.get("priority", 0)) >= priority:
            return False
    return True
