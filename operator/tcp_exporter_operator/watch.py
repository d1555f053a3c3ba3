"""The operator's own watches: list-then-watch informers through the official client, and a work queue.

kopf keeps a stream, a worker and bookkeeping for every object of a watched resource, and waits until every
object of every indexed resource has been indexed once before it runs any handler, in time that grows with the
square of their number. A cluster has thousands of Deployments, and one ScaledObject per annotated Deployment,
so the operator lists (in pages) and watches what it needs itself, from a resourceVersion, with bookmarks so
that a resumed watch rarely has to list again. Of a Deployment that is not tracked nothing is kept once its
JSON is parsed; of the small resources (ScaledObjects, PodMonitors, HPAs, namespaces, two CRDs) only the few
fields a plan reads, in an `Index`.

The tracked Deployments' events go to a work queue in the manner of client-go's: one entry per Deployment, the
latest state replacing an older one still waiting, and never two workers on the same Deployment.

`Peering` decides, from kopf's peering object, whether this replica's workers run (see its docstring for why
kopf's object and not a Lease, and why liveness is timed on the local clock).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

import urllib3
from kubernetes import client

from tcp_exporter_operator import metrics
from tcp_exporter_operator.events import PEERING
from tcp_exporter_operator.kube import ApiError, Kube, Lister

log = logging.getLogger(__name__)
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
PAGE = 500
WATCH_SECONDS = 300  # the API server ends a watch after this; it is resumed from the last resourceVersion
BACKOFF = (1, 2, 4, 8, 15)
NOT_SERVED_RETRY = 10.0  # seconds between listings of a kind not served (its CRD missing), unless poked
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

    def forget(self, key: K) -> None:
        """Drop what waits under the key (its object is gone); a worker holding it finishes as it is."""
        with self.cond:
            self.pending.pop(key, None)

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


class Informer:
    """List-then-watch of one resource, in each scope (a namespace, or None for all / cluster-scoped kinds).

    `handle(type, obj)` is called from the watch thread for every listed object and every event, and says
    whether the object is worth remembering; of those, the ones missing from a later listing (deleted while no
    watch ran) get a DELETED call. Nothing else of an object is kept here. A kind the API server does not serve
    (its CRD is not installed) counts as listed, and empty; it is retried every little while, or at once on
    `poke` (its CRD appeared).
    """

    def __init__(
        self,
        kube: Kube,
        name: str,
        lister: Lister,
        scopes: tuple[str | None, ...],
        handle: Callable[[str, Mapping[str, Any]], bool],
        on_relist: Callable[[], None] = lambda: None,
    ) -> None:
        self.kube, self.name, self.lister, self.scopes, self.handle = kube, name, lister, scopes or (None,), handle
        # Called after a listing that is not the first: what changed while no watch ran is known only as the
        # state it left (a deletion of an object never seen is not an event), so the caller may look again.
        self.on_relist = on_relist
        self.lock = threading.Lock()
        self.known: dict[str, Key] = {}  # uid -> (namespace, name) of what `handle` kept
        self.synced = threading.Event()  # every scope listed once
        self._listed_scopes: set[str | None] = set()
        self.stopping = threading.Event()
        self._poke = threading.Event()

    def start(self) -> None:
        for scope in self.scopes:
            name = f"watch-{self.name}-{scope or 'all'}"
            threading.Thread(target=self._run, args=(scope,), name=name, daemon=True).start()

    def stop(self) -> None:
        self.stopping.set()
        self._poke.set()

    def poke(self) -> None:
        self._poke.set()

    def known_keys(self) -> list[Key]:
        with self.lock:
            return list(self.known.values())

    def _listed(self, scope: str | None) -> None:
        with self.lock:
            self._listed_scopes.add(scope)
            if len(self._listed_scopes) == len(self.scopes):
                self.synced.set()
                metrics.INFORMER_SYNCED.labels(self.name).set(1)

    def _wait(self, seconds: float) -> None:
        self._poke.wait(seconds)
        self._poke.clear()

    def _run(self, scope: str | None) -> None:
        resource_version: str | None = None
        failures = 0
        first = True
        while not self.stopping.is_set():
            try:
                if resource_version is None:
                    resource_version = self._list(scope)
                    self._listed(scope)
                    if resource_version is None:  # not served: nothing to watch yet
                        self._wait(NOT_SERVED_RETRY)
                        continue
                    if not first:
                        self.on_relist()
                    first = False
                resource_version = self._watch(scope, resource_version)
                if resource_version is None:
                    metrics.WATCH_RESTARTS.labels("true").inc()
                failures = 0
            except Exception as exc:  # a dropped connection, a refused watch, an API server restart: go on
                metrics.WATCH_RESTARTS.labels("false").inc()
                delay = BACKOFF[min(failures, len(BACKOFF) - 1)]
                failures += 1
                level = logging.DEBUG if isinstance(exc, urllib3.exceptions.ProtocolError) else logging.WARNING
                log.log(level, "watching %s in %s: %s; again in %s s", self.name, scope or "all", exc, delay)
                self._wait(delay)

    def _list(self, scope: str | None) -> str | None:
        """One listing in pages, each object handed to `handle`. Returns its resourceVersion; None if the kind is
        not served (then whatever was known of it is gone)."""
        token = None
        seen: set[str] = set()
        resource_version: str | None = ""
        while True:

            def page(api: client.ApiClient, token: str | None = token) -> Any:
                return self.lister(api, scope, limit=PAGE, _continue=token, _request_timeout=60)

            try:
                body = json.loads(self.kube.call(page).data)
            except ApiError as exc:
                if exc.status != 404:
                    raise
                resource_version = None
                break
            for item in body.get("items") or []:
                if self._event("ADDED", item):
                    seen.add(item["metadata"].get("uid", ""))
            meta = body.get("metadata") or {}
            resource_version = meta.get("resourceVersion") or resource_version
            token = meta.get("continue")
            if not token:
                break
        with self.lock:
            gone = [(uid, key) for uid, key in self.known.items() if uid not in seen and scope in (None, key[0])]
        for uid, (namespace, name) in gone:
            self._event("DELETED", {"metadata": {"uid": uid, "namespace": namespace, "name": name}})
        if resource_version is None:
            log.debug("%s: not served (its CRD is not installed); trying again later", self.name)
        else:
            log.info("listed %s in %s: %d kept", self.name, scope or "all", len(seen))
        return resource_version

    def _watch(self, scope: str | None, resource_version: str) -> str | None:
        """Stream events from `resource_version` until the server ends the watch; returns where to resume, or None
        when the version is too old (410 Gone) and a new listing is needed."""

        def watch(api: client.ApiClient) -> Any:
            return self.lister(
                api,
                scope,
                watch=True,
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=WATCH_SECONDS,
                _request_timeout=(5, WATCH_SECONDS + 30),
            )

        try:
            response = self.kube.call(watch, stream=True)
        except ApiError as exc:
            if exc.status in (404, 410):
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
                        log.info("watching %s in %s: resourceVersion too old, listing again", self.name, scope or "all")
                        return None
                    raise ApiError(int(obj.get("code") or 0), str(obj.get("message")))
                resource_version = (obj.get("metadata") or {}).get("resourceVersion") or resource_version
                if kind != "BOOKMARK":
                    self._event(kind, obj)
        finally:
            response.release_conn()
        return resource_version

    def _event(self, kind: str, obj: Mapping[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        uid = meta.get("uid", "")
        with self.lock:
            was_known = uid in self.known
        try:
            kept = self.handle(kind, obj) if kind != "DELETED" or was_known else False
        except Exception:
            # One object must never stop the watch for every other: had this escaped, the watch would restart on
            # the same object forever. The object is skipped as it was (kept if it was known); its next event or
            # a relist tries again.
            metrics.WATCH_EVENT_ERRORS.labels(self.name).inc()
            log.exception(
                "watching %s: the %s event of %s/%s could not be handled; skipped, the watch goes on",
                self.name, kind, meta.get("namespace", ""), meta.get("name", ""),
            )  # fmt: skip
            kept = was_known and kind != "DELETED"
        with self.lock:
            if kept and kind != "DELETED":
                self.known[uid] = (meta.get("namespace", ""), meta.get("name", ""))
            else:
                self.known.pop(uid, None)
        return kept


def revision(version: str | None) -> int:
    """A resourceVersion as the ordered integer (an etcd revision) every etcd-backed API server gives; -1 where
    it is not one (then nothing is to be ordered by it)."""
    try:
        return int(version or "")
    except ValueError:
        return -1


_GONE = object()  # in Index.written: deleted by the operator, its deletion not yet seen


class Index:
    """key -> values, kept from an informer's events: what kopf's indexes were, for the operator's small
    resources. `summarize(obj)` gives (key, value), or None for an object not to index; with `multi`, the key is
    a tuple of keys, under each of which the value is found (so that a look-up reads only what it may need).

    Read-your-writes: `wrote(obj)` shows what the operator itself just created or replaced until the informer
    delivers that object at the written resourceVersion or later (or its deletion), and `removed(uid)` hides what
    it just deleted until the informer delivers the deletion; `ttl` seconds at most. A worker that created a
    ScaledObject can meet its Deployment's next event before the ScaledObject's own event has reached the index;
    planned from the index alone, it would create it again (a 409, a read and a needless patch), or delete again
    what it just deleted. client-go's controllers keep "expectations" for the same reason."""

    def __init__(
        self,
        summarize: Callable[[Mapping[str, Any]], tuple[Hashable, Any] | None],
        ttl: float = 10.0,
        multi: bool = False,
    ) -> None:
        self.summarize = summarize
        self.ttl = ttl
        self.multi = multi
        self.lock = threading.Lock()
        self.data: dict[Hashable, dict[str, Any]] = {}
        self.keys: dict[str, tuple[Hashable, ...]] = {}  # uid -> keys
        self.versions: dict[str, int] = {}  # uid -> the resourceVersion the informer last gave
        self.written: dict[Hashable, dict[str, tuple[Any, int, float]]] = {}  # key -> uid -> (value, version, until)
        self.written_keys: dict[str, tuple[Hashable, ...]] = {}  # uid -> keys, of what is in `written`
        self.deleted: dict[str, float] = {}  # uid -> until when a write that comes after its deletion is ignored

    def _summary(self, obj: Mapping[str, Any]) -> tuple[tuple[Hashable, ...], Any] | None:
        found = self.summarize(obj)
        if found is None:
            return None
        key, value = found
        return (tuple(dict.fromkeys(key)) if self.multi else (key,)), value  # type: ignore[call-overload]

    def update(self, kind: str, obj: Mapping[str, Any]) -> tuple[Any, bool]:
        """Apply an event; returns (the value indexed before under this uid or None, whether it is indexed now)."""
        meta = obj.get("metadata") or {}
        uid = meta.get("uid", "")
        found = None if kind == "DELETED" else self._summary(obj)
        with self.lock:
            previous = None
            for old_key in self.keys.pop(uid, ()):
                previous = self.data.get(old_key, {}).pop(uid, previous)
                if not self.data.get(old_key):
                    self.data.pop(old_key, None)
            if found is not None:
                keys, value = found
                self.keys[uid] = keys
                for key in keys:
                    self.data.setdefault(key, {})[uid] = value
            if kind == "DELETED":
                self.versions.pop(uid, None)
                self._prune_deleted()
                self.deleted[uid] = time.monotonic() + self.ttl
            else:
                self.versions[uid] = revision(meta.get("resourceVersion"))
            written = self.written_keys.get(uid)
            if written and (kind == "DELETED" or self.written[written[0]][uid][1] <= self.versions[uid]):
                self._forget_written(uid)
        return previous, found is not None

    def _prune_deleted(self) -> None:
        if len(self.deleted) > 256:
            now = time.monotonic()
            self.deleted = {uid: until for uid, until in self.deleted.items() if until > now}

    def _forget_written(self, uid: str) -> None:
        for key in self.written_keys.pop(uid, ()):
            del self.written[key][uid]
            if not self.written[key]:
                del self.written[key]

    def _show(self, uid: str, keys: tuple[Hashable, ...], entry: tuple[Any, int, float]) -> None:
        self._forget_written(uid)
        for key in keys:
            self.written.setdefault(key, {})[uid] = entry
        self.written_keys[uid] = keys

    def wrote(self, obj: Mapping[str, Any]) -> None:
        """The operator's own write of `obj` (the API server's answer): shown until the informer catches up."""
        meta = obj.get("metadata") or {}
        uid, version = meta.get("uid", ""), revision(meta.get("resourceVersion"))
        found = self._summary(obj)
        now = time.monotonic()
        with self.lock:
            if found is None or version < 0 or self.versions.get(uid, -1) >= version:
                return  # the informer is there already, or past it
            if self.deleted.get(uid, 0.0) > now:
                return  # deleted before this answer came back: nothing to show
            keys, value = found
            self._show(uid, keys, (value, version, now + self.ttl))

    def removed(self, uid: str) -> None:
        """The operator's own deletion of the object with this uid: hidden until the informer delivers the
        deletion, `ttl` seconds at most (one a finalizer holds shows its deletionTimestamp meanwhile)."""
        with self.lock:
            keys = self.keys.get(uid) or self.written_keys.get(uid)  # indexed, or only written so far
            if keys:
                self._show(uid, keys, (_GONE, sys.maxsize, time.monotonic() + self.ttl))

    def _values(self, key: Hashable) -> dict[str, Any] | None:
        values = self.data.get(key)
        written = self.written.get(key)
        if not written:
            return values
        now = time.monotonic()
        merged = dict(values or {})
        for uid, (value, _, until) in list(written.items()):
            if until <= now:
                self._forget_written(uid)
            elif value is _GONE:
                merged.pop(uid, None)
            else:
                merged[uid] = value
        return merged or None

    def get(self, key: Hashable, default: Iterable[Any] = ()) -> list[Any]:
        with self.lock:
            values = self._values(key)
            return list(values.values()) if values else list(default)

    def get_any(self, keys: Iterable[Hashable]) -> list[Any]:
        """The values found under any of `keys`, each once."""
        found: dict[str, Any] = {}
        with self.lock:
            for key in keys:
                found.update(self._values(key) or {})
        return list(found.values())

    def __getitem__(self, key: Hashable) -> list[Any]:
        with self.lock:
            values = self._values(key)
            if values is None:
                raise KeyError(key)
            return list(values.values())

    def __contains__(self, key: object) -> bool:
        with self.lock:
            return self._values(key) is not None


def _lines(response: Any) -> Iterator[bytes]:
    """The watch stream's lines (one JSON event each), from the raw chunks."""
    buffer = b""
    for chunk in response.stream(amt=None, decode_content=False):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        yield from (line for line in lines if line.strip())


class Peering:
    """Whether this replica is the active one, by kopf's peering object, for the Deployment workers.

    kopf runs no resource handlers here (the operator's own informers and workers do the work); with `--peering`
    kopf only keeps this replica's entry alive in the ClusterKopfPeering object (a heartbeat every lifetime minus
    5-10 s, and removal on a clean exit). This class decides from that object, by the rule kopf applies to its
    own handlers: paused while another live peer has a priority as high as ours or higher.

    Decision (issue 18): keep kopf's peering object rather than a coordination.k8s.io Lease, because kopf
    already writes its heartbeats and a Lease would add a second election to run beside it; but judge a peer
    alive the way client-go's leader election does, by when *this* replica last saw its heartbeat change on
    its own monotonic clock, never by comparing the peer's `lastseen` with the local wall clock. Clock skew
    between nodes therefore cannot leave both replicas active or both paused. The cost, as in client-go: a peer
    that crashed without removing its entry is believed alive for one lifetime after this replica first sees it.
    """

    INTERVAL = 5.0

    def __init__(
        self, kube: Kube, name: str | None, identity: str, priority: int, on_resume: Callable[[], None] = lambda: None
    ) -> None:
        self.name, self.identity, self.priority = name, identity, priority
        self.on_resume = on_resume  # called when this replica becomes active again after a pause
        self._active = threading.Event()
        self._peers: Mapping[str, Any] | None = None  # the object's status; None until read (or when missing)
        self._heard = Heartbeats()
        self._lock = threading.Lock()  # the informer thread and the tick thread both judge
        self._was: bool | None = None
        if name is None:
            self._active.set()
            return

        def lister(api: client.ApiClient, scope: str | None, **kwargs: Any) -> Any:
            return client.CustomObjectsApi(api).list_cluster_custom_object(
                *PEERING, field_selector=f"metadata.name={name}",
                _preload_content=False, **kwargs,
            )  # fmt: skip

        Informer(kube, "peering", lister, (None,), self._seen).start()
        threading.Thread(target=self._tick, name="peering-tick", daemon=True).start()

    def wait_active(self, timeout: float) -> bool:
        return self._active.wait(timeout)

    def _seen(self, kind: str, obj: Mapping[str, Any]) -> bool:
        status = obj.get("status") if kind != "DELETED" else None
        with self._lock:
            self._peers = status if isinstance(status, Mapping) else ({} if kind != "DELETED" else None)
            self._heard.observe(self._peers or {}, time.monotonic())
        self._judge()
        return True

    def _judge(self) -> None:
        with self._lock:
            peers = self._peers
            now_active = peers is not None and active(
                peers, self.identity, self.priority, self._heard, time.monotonic()
            )
            changed, resumed = now_active != self._was, now_active and self._was is False
            self._was = now_active
        (self._active.set if now_active else self._active.clear)()
        if changed:
            log.info("Deployment workers %s (peering %s)", "active" if now_active else "paused", self.name)
            if resumed:
                self.on_resume()

    def _tick(self) -> None:
        while True:
            time.sleep(self.INTERVAL)
            self._judge()


class Heartbeats:
    """When each peer's heartbeat (its `lastseen` value) last changed, on this replica's monotonic clock."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[str, float]] = {}

    def observe(self, peers: Mapping[str, Any], now: float) -> None:
        for peer, info in peers.items():
            beat = str(info.get("lastseen")) if isinstance(info, Mapping) else ""
            if peer not in self._seen or self._seen[peer][0] != beat:
                self._seen[peer] = (beat, now)
        for gone in self._seen.keys() - peers.keys():
            del self._seen[gone]

    def since(self, peer: str, now: float) -> float:
        """Seconds since the peer's heartbeat last changed here (0 for one never observed: it just appeared)."""
        return now - self._seen[peer][1] if peer in self._seen else 0.0


def active(peers: Mapping[str, Any], identity: str, priority: int, heard: Heartbeats, now: float) -> bool:
    """kopf's rule, timed locally: paused while any other peer, heard from within its lifetime, has a priority
    as high as ours or higher. A malformed priority counts as the highest, a malformed lifetime as kopf's 60 s:
    such an entry pauses us only while its heartbeat keeps changing."""
    for peer, info in peers.items():
        if peer == identity:
            continue
        lifetime = _number(info, "lifetime", 60)
        their = _number(info, "priority", 0)
        if heard.since(peer, now) < (60 if lifetime is None else lifetime) and (their is None or their >= priority):
            return False
    return True


def _number(info: object, key: str, default: int) -> int | None:
    """The entry's integer field (the default when absent); None when malformed."""
    value = info.get(key, default) if isinstance(info, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None
