"""Unit tests of the operator's own watch plumbing: the work queue, the peering rule, rollout slots, the Event queue."""

from __future__ import annotations

import datetime
import threading

from helpers import wait_for
from tcp_exporter_operator.watch import RESYNC, WorkQueue, active, newest


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


NOW = datetime.datetime(2026, 11, 29, 12, 0, tzinfo=datetime.UTC)


def peer(priority: int, seconds_ago: float, lifetime: int = 60) -> dict[str, object]:
    seen = NOW - datetime.timedelta(seconds=seconds_ago)
    return {"priority": priority, "lifetime": lifetime, "lastseen": seen.isoformat()}


def test_peering_rule_pauses_for_a_live_peer_of_higher_or_equal_priority_only() -> None:
    assert active({"me": peer(10, 0)}, "me", 10, NOW)
    assert not active({"me": peer(10, 0), "other": peer(20, 5)}, "me", 10, NOW)
    assert not active({"me": peer(10, 0), "other": peer(10, 5)}, "me", 10, NOW)  # kopf pauses both
    assert active({"me": peer(20, 0), "other": peer(10, 5)}, "me", 20, NOW)
    assert active({"me": peer(10, 0), "other": peer(20, 61)}, "me", 10, NOW)  # dead: its lifetime is over
    assert active({"me": peer(10, 0), "other": {"priority": 20, "lastseen": "2026-11-29T11:59:00"}}, "me", 10, NOW)


def test_a_freed_rollout_slot_goes_to_the_next_deployment_still_waiting_not_to_one_rolled_by_its_user() -> None:
    from tcp_exporter_operator.handlers import Rollouts

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
