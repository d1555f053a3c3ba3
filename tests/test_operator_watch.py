"""Unit tests of the operator's own watch plumbing: the work queue, the peering rule, rollout slots, the Event queue."""

from __future__ import annotations

import threading
import time

from tcp_exporter_operator.watch import RESYNC, Heartbeats, Index, WorkQueue, active, newest

from harness.helpers import wait_for


def test_work_queue_keeps_one_entry_per_key_with_the_latest_state_in_arrival_order() -> None:
    queue: WorkQueue[str, int] = WorkQueue()
    queue.put("a", 1)
    queue.put("b", 1)
    queue.put("a", 2)
    assert len(queue) == 2
    assert queue.get(0) == ("a", 2)
    assert queue.get(0) == ("b", 1)
    assert queue.get(0) is None


def test_work_queue_never_hands_a_held_key_to_a_second_worker_until_done() -> None:
    queue: WorkQueue[str, int] = WorkQueue()
    queue.put("a", 1)
    assert queue.get(0) == ("a", 1)
    queue.put("a", 2)
    queue.put("b", 1)
    assert queue.get(0) == ("b", 1)  # "a" is held: skipped, not lost
    assert queue.get(0) is None
    got: list[tuple[str, int] | None] = []
    waiter = threading.Thread(target=lambda: got.append(queue.get(5)))
    waiter.start()
    queue.done("a")
    waiter.join(5)
    assert got == [("a", 2)]


def test_a_waiting_resync_is_not_replaced_by_an_event_but_replaces_one() -> None:
    event = ("MODIFIED", {"metadata": {}})
    resync = (RESYNC, None)
    assert newest(resync, event) == resync
    assert newest(event, resync) == resync
    assert newest(event, ("MODIFIED", {"metadata": {"x": 1}})) == ("MODIFIED", {"metadata": {"x": 1}})


def peer(priority: object, lastseen: str = "2026-11-29T12:00:00+00:00", lifetime: object = 60) -> dict[str, object]:
    return {"priority": priority, "lifetime": lifetime, "lastseen": lastseen}


def judged(peers: dict[str, object], me: int, seconds_later: float, heard: Heartbeats | None = None) -> bool:
    heard = heard or Heartbeats()
    heard.observe(peers, 1000.0)
    return active(peers, "me", me, heard, 1000.0 + seconds_later)


def test_peering_rule_pauses_for_a_live_peer_of_higher_or_equal_priority_only() -> None:
    assert judged({"me": peer(10)}, 10, 0)
    assert not judged({"me": peer(10), "other": peer(20)}, 10, 5)
    assert not judged({"me": peer(10), "other": peer(10)}, 10, 5)  # kopf pauses both
    assert judged({"me": peer(20), "other": peer(10)}, 20, 5)
    assert judged({"me": peer(10), "other": peer(20)}, 10, 61)  # dead: not heard from within its lifetime
    assert judged({"me": peer(10), "other": peer(20, lifetime=10)}, 10, 11)


def test_peer_liveness_is_timed_on_the_local_clock_so_a_skewed_lastseen_changes_nothing() -> None:
    # A peer whose clock runs an hour behind (its lastseen long past by ours) but which keeps beating is alive.
    behind = Heartbeats()
    for i, t in enumerate((1000.0, 1050.0, 1100.0)):
        beat = {"me": peer(10), "other": peer(20, f"2026-11-29T11:0{i}:00+00:00")}
        behind.observe(beat, t)
    assert not active(beat, "me", 10, behind, 1140.0)
    # A peer whose clock runs an hour ahead (its lastseen in our future) but which stopped beating is dead.
    ahead = Heartbeats()
    stopped = {"me": peer(10), "other": peer(20, "2026-11-29T13:00:00+00:00")}
    ahead.observe(stopped, 1000.0)
    ahead.observe(stopped, 1030.0)  # the same heartbeat seen again: not a new one
    assert not active(stopped, "me", 10, ahead, 1059.0)
    assert active(stopped, "me", 10, ahead, 1061.0)


def test_a_malformed_peer_entry_pauses_only_while_it_keeps_beating() -> None:
    garbage = {"me": peer(10), "other": peer("high", lifetime="forever")}
    assert not judged(garbage, 10, 30)
    assert judged(garbage, 10, 61)
    assert judged({"me": peer(10), "other": "not a mapping"}, 10, 61)
    assert judged({"me": peer(10), "other": peer(True)}, 10, 61)


def test_a_freed_rollout_slot_goes_to_the_next_deployment_still_waiting_not_to_one_rolled_by_its_user() -> None:
    from tcp_exporter_operator.rollouts import Rollouts

    rollouts = Rollouts(1)
    assert rollouts.reserve("a")
    rollouts.started("a", 2)
    assert not rollouts.reserve("b") and not rollouts.reserve("c")
    rollouts.wait("b", "ns", "b")
    rollouts.wait("c", "ns", "c")
    rollouts.not_waiting("b")  # the user's own change rolled b, new sidecar included
    done = {"metadata": {"generation": 2}, "spec": {"replicas": 1}}
    done["status"] = {"observedGeneration": 2, "updatedReplicas": 1, "replicas": 1, "availableReplicas": 1}
    assert rollouts.progress("a", done) == [("ns", "c")]


def test_no_deployment_holds_an_upgrade_slot_past_its_progress_deadline_or_the_cap_even_without_events() -> None:
    from tcp_exporter_operator.rollouts import Rollouts, paced

    now = [0.0]
    rollouts = Rollouts(2, hold=600, clock=lambda: now[0])
    stuck = {"metadata": {"namespace": "ns", "name": "stuck"}, "spec": {"progressDeadlineSeconds": 60}}
    forged = {"metadata": {"namespace": "ns", "name": "forged"}, "spec": {"progressDeadlineSeconds": 10**9}}
    for uid, deployment in (("stuck", stuck), ("forged", forged)):
        assert rollouts.reserve(uid)
        rollouts.started(uid, 5, deployment)
    for uid in ("next-1", "next-2"):
        assert not rollouts.reserve(uid)
        rollouts.wait(uid, "ns", uid)
    now[0] = 59.0
    assert rollouts.expire() == []
    now[0] = 61.0  # the stuck one's own deadline: its slot goes to the first waiting
    assert rollouts.expire() == [("ns", "next-1")]
    now[0] = 601.0  # a deadline of 10^9 s is capped by the setting
    assert rollouts.expire() == [("ns", "next-2")]
    # A reservation never started (the worker died between reserve and patch) is taken back too.
    assert rollouts.reserve("reserved-only")
    now[0] = 1202.0
    rollouts.expire()
    assert "reserved-only" not in rollouts.active
    # A paused Deployment takes no slot: nothing rolls until its owner resumes it.
    assert not paced({"spec": {"paused": True}}) and paced({"spec": {}})


def test_the_event_poster_keeps_a_deployments_events_in_order_and_outlives_a_failed_post() -> None:
    from tcp_exporter_operator.events import Event
    from tcp_exporter_operator.kube import EventPoster

    posted: list[tuple[str, str]] = []

    class Recorder:  # stands in for Kube.post_event only: the posting itself is tested on the real API server
        def post_event(self, deployment: dict, event: Event) -> None:
            if event.reason == "Refused":
                raise OSError("connection reset")
            posted.append((deployment["metadata"]["name"], event.reason))

    # Two threads, two Deployments whose first Event fails: were a failure to end a thread or the rest of a
    # Deployment's Events, some would never be posted.
    poster = EventPoster(Recorder(), threads=2, pending=2)  # type: ignore[arg-type]
    reasons = [f"R{i}" for i in range(20)]
    for name in ("web-api", "checkout.v2"):
        body = {"metadata": {"name": name, "namespace": "shop"}}
        poster.post(body, [Event("Normal", "Refused", "x"), *(Event("Normal", r, "x") for r in reasons)])
    wait_for(lambda: len(posted) == 2 * len(reasons), 10, "every Event but the failed ones")
    for name in ("web-api", "checkout.v2"):
        assert [r for n, r in posted if n == name] == reasons


def test_two_batches_of_one_deployments_events_go_out_in_order_whatever_the_posting_threads() -> None:
    import threading

    from tcp_exporter_operator.events import Event
    from tcp_exporter_operator.kube import EventPoster

    posted: list[str] = []
    first_started = threading.Event()

    class Slow:  # the first post of the first batch is slow: another thread taking the second batch would overtake
        def post_event(self, deployment: dict, event: Event) -> None:
            if event.reason == "Injected":
                first_started.set()
                time.sleep(0.3)
            posted.append(event.reason)

    poster = EventPoster(Slow(), threads=4)  # type: ignore[arg-type]
    body = {"metadata": {"name": "checkout.v2", "namespace": "shop", "uid": "u-1"}}
    poster.post(body, [Event("Normal", "Injected", "x")])
    assert first_started.wait(5)
    poster.post(body, [Event("Normal", "ScaledObjectCreated", "x")])
    wait_for(lambda: len(posted) == 2, 10, "both Events")
    assert posted == ["Injected", "ScaledObjectCreated"]


def _so(uid: str, version: int, threshold: str = "100") -> dict:
    return {
        "metadata": {"uid": uid, "namespace": "shop", "name": "web-api", "resourceVersion": str(version)},
        "spec": {"threshold": threshold},
    }


def _index(ttl: float = 10.0) -> Index:
    return Index(lambda o: (o["metadata"]["namespace"], o["spec"]["threshold"]), ttl=ttl)


def test_an_index_shows_the_operators_own_write_until_the_informer_delivers_it_or_a_later_state() -> None:
    index = _index()
    index.wrote(_so("u1", 10))
    assert index.get("shop") == ["100"] and "shop" in index  # before its own event: no second create
    index.update("ADDED", _so("u1", 10))
    assert index.get("shop") == ["100"] and not index.written
    index.wrote(_so("u1", 12, "77"))  # a replace
    index.update("MODIFIED", _so("u1", 11))  # an older event still in flight does not hide it
    assert index.get("shop") == ["77"]
    index.update("MODIFIED", _so("u1", 13, "5"))  # a later state, say a hand edit, wins
    assert index.get("shop") == ["5"] and not index.written


def test_an_index_never_shows_a_write_its_informer_has_already_passed_or_seen_deleted() -> None:
    index = _index()
    index.update("ADDED", _so("u1", 10))
    index.update("DELETED", _so("u1", 11))
    index.wrote(_so("u1", 10))  # the create's answer came after the watch's ADDED and DELETED: no ghost
    assert index.get("shop") == [] and "shop" not in index
    index.update("ADDED", _so("u2", 20, "5"))
    index.wrote(_so("u2", 20))  # the informer is there already
    assert index.get("shop") == ["5"] and not index.written
    index.wrote(_so("u3", 30))
    index.update("DELETED", _so("u3", 30))  # deleted before its ADDED ever came (a relist)
    assert index.get("shop") == ["5"]


def test_an_index_forgets_the_operators_write_after_its_ttl() -> None:
    index = _index(ttl=0.05)
    index.wrote(_so("u1", 10))
    assert index.get("shop") == ["100"]
    wait_for(lambda: index.get("shop") == [], 5, "the write to expire")
    assert not index.written and not index.written_keys


def test_an_index_hides_what_the_operator_deleted_until_the_informer_delivers_the_deletion() -> None:
    index = _index()
    index.update("ADDED", _so("u1", 10))
    index.removed("u1")
    assert index.get("shop") == [] and "shop" not in index  # no second delete meanwhile
    index.update("MODIFIED", _so("u1", 11))  # a finalizer holds it: still as good as gone
    assert index.get("shop") == []
    index.update("DELETED", _so("u1", 12))
    assert index.get("shop") == [] and not index.written
    index.removed("u9")  # never indexed: nothing to hide
    assert not index.written
    index.wrote(_so("u2", 20))
    index.removed("u2")  # created and deleted before the informer saw either
    assert index.get("shop") == []
    index.update("ADDED", _so("u2", 20))  # the informer catching up meanwhile shows nothing either
    assert index.get("shop") == []
    index.update("DELETED", _so("u2", 21))
    assert index.get("shop") == [] and not index.written


def _child(uid: str, version: int, target: str, owner: str | None = None) -> dict:
    owners = [{"kind": "Deployment", "name": owner, "uid": f"d-{owner}"}] if owner else []
    return {
        "metadata": {
            "uid": uid, "namespace": "shop", "name": f"so-{uid}", "resourceVersion": str(version),
            "ownerReferences": owners,
        },
        "spec": {"scaleTargetRef": {"name": target}},
    }  # fmt: skip


def test_a_child_index_finds_a_scaledobject_under_each_deployment_it_concerns_and_no_other() -> None:
    from tcp_exporter_operator.indexes import child_keys, child_summary

    index = Index(child_summary, multi=True)
    for i in range(500):  # the namespace's other ScaledObjects: not read when planning web-api
        index.update("ADDED", _child(f"x{i}", 1, f"other-{i}", owner=f"other-{i}"))
    index.update("ADDED", _child("a", 2, "web-api", owner="web-api"))
    index.update("ADDED", _child("b", 3, "web-api", owner="checkout.v2"))  # checkout.v2's, aimed at web-api

    def names(deployment: str) -> list[str]:
        return sorted(v["metadata"]["name"] for v in index.get_any(child_keys("shop", deployment)))

    assert names("web-api") == ["so-a", "so-b"]  # each once, though found under two keys
    assert names("checkout.v2") == ["so-b"]
    index.update("MODIFIED", _child("b", 4, "checkout.v2", owner="checkout.v2"))  # retargeted: moves
    assert names("web-api") == ["so-a"] and names("checkout.v2") == ["so-b"]
    index.wrote(_child("c", 9, "cart", owner="cart"))  # the operator's own write, shown under each key
    assert names("cart") == ["so-c"]
    index.removed("a")
    assert names("web-api") == []
    index.update("DELETED", _child("a", 10, "web-api", owner="web-api"))
    index.update("ADDED", _child("c", 9, "cart", owner="cart"))
    assert names("cart") == ["so-c"] and not index.written and not index.written_keys
    index.update("DELETED", _child("b", 11, "checkout.v2", owner="checkout.v2"))
    assert names("checkout.v2") == [] and all(not k[2].startswith(("web-api", "checkout")) for k in index.data)


def test_an_object_whose_handling_raises_is_skipped_and_the_watch_goes_on_to_the_next() -> None:
    from tcp_exporter_operator.watch import Informer

    handled: list[str] = []

    def handle(kind: str, obj: dict) -> bool:
        if obj["metadata"]["name"] == "web-api":
            int("²")  # what a malformed annotation did in the Deployment handler
        handled.append(obj["metadata"]["name"])
        return True

    informer = Informer(None, "deployments", lambda *a, **k: None, (None,), handle)  # type: ignore[arg-type]
    for uid, name in (("1", "web-api"), ("2", "checkout.v2")):
        informer._event("ADDED", {"metadata": {"uid": uid, "namespace": "shop", "name": name}})
    assert handled == ["checkout.v2"]
    assert informer.known_keys() == [("shop", "checkout.v2")]
