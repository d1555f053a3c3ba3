"""Unit tests of connection-aware scale-in's write policy and limits (the end-to-end test is test_scale_in.py)."""

from __future__ import annotations

from typing import Any

import pytest
from tcp_exporter_operator import scalein
from tcp_exporter_operator.scalein import DeletionCosts, Target, TokenBucket, decide, imminent

from harness.hostile import Prometheus, answer


def test_nothing_is_written_in_steady_state_and_every_difference_once_a_scale_in_is_coming() -> None:
    counts = {"a": 10, "b": 50}
    # No scale-in coming: not even a pod never written, however far a count moves.
    assert decide(counts, {}, coming=False) == []
    assert decide({"a": 500, "b": 0}, counts, coming=False) == []
    # Coming: pods never written first, then every difference, the largest first; nothing already right.
    assert decide({"a": 11, "b": 52, "c": 0}, counts, coming=True) == [("c", 0), ("b", 52), ("a", 11)]
    assert decide(counts, counts, coming=True) == []


def test_scale_in_is_imminent_when_kedas_formula_wants_fewer_replicas_and_the_hpas_tolerance_lets_it_act() -> None:
    target = Target(threshold=100, min_replicas=2, replicas=6, prometheus="http://p")
    assert imminent({"a": 150, "b": 200}, target)  # ceil(350 / 100) = 4 < 6
    assert not imminent({"a": 300, "b": 300}, target)  # 6
    assert imminent({"a": 0}, target)  # the minimum, 2, is still below 6
    assert not imminent({"a": 0}, Target(100, 6, 6, "http://p"))  # already at the minimum
    # KEDA's formula wants 19 of 20, but 185 / 200 is within the HPA's 10% tolerance: no scale-in comes.
    assert not imminent({"a": 185}, Target(10, 1, 20, "http://p"))
    assert imminent({"a": 179}, Target(10, 1, 20, "http://p"))


def test_the_token_bucket_allows_its_rate_and_no_more() -> None:
    now = [0.0]
    bucket = TokenBucket(5, clock=lambda: now[0])
    assert sum(bucket.take() for _ in range(20)) == 5  # a second's worth saved up, no more
    now[0] += 2.0  # two seconds later: refilled to the burst, not to 10
    assert sum(bucket.take() for _ in range(20)) == 5
    now[0] += 0.5  # 2.5 tokens: 2 writes
    assert sum(bucket.take() for _ in range(20)) == 2


def costs_for(pods: Any, targets: dict[tuple[str, str], Target]) -> DeletionCosts:
    return DeletionCosts(pods, targets, period=1, rate=30, headers={}, may_write=lambda: True, allowed=lambda url: True)


class Pods:
    """Stands in for the API server's answer to the pod patches: records them."""

    def __init__(self) -> None:
        self.written: list[tuple[str, str, int]] = []

    def pod_patches_confined(self, namespace: str, name: str) -> bool:
        return True

    def set_deletion_cost(self, namespace: str, name: str, cost: int) -> bool:
        self.written.append((namespace, name, cost))
        return True


def test_writes_stay_within_the_overall_rate_under_churn_and_the_rest_waits(monkeypatch: Any) -> None:
    series: list[dict[str, Any]] = []
    monkeypatch.setattr(scalein, "query", lambda url, headers: series)
    # A threshold no count reaches: KEDA's formula wants 1 of 10 replicas, a scale-in is coming throughout.
    targets = {("shop", f"web-{d}"): Target(10**6, 1, 10, "http://p") for d in range(4)}
    pods = Pods()
    costs = DeletionCosts(
        pods, targets, period=1, rate=30, headers={}, may_write=lambda: True, allowed=lambda url: True
    )  # type: ignore[arg-type]
    costs.bucket = TokenBucket(30, clock=lambda: 0.0)  # no time passes: the burst is all there is
    for round_ in range(3):
        # Churn: every pod's count jumps each round.
        series[:] = [
            {
                "metric": {"namespace": "shop", "tcp_exporter_deployment": d, "pod": f"{d}-{p}"},
                "value": [0, str(1 + p * 50 * (round_ + 1))],
            }
            for (_, d) in targets
            for p in range(20)
        ]
        costs.round()
    assert len(pods.written) == 30  # 80 pods wanted writing three times over: the bucket allowed 30
    assert len({name for _, name, _ in pods.written}) == 30  # never-written pods first, none twice


def test_an_opted_out_deployment_is_forgotten_and_never_written(monkeypatch: Any) -> None:
    sample = {"metric": {"namespace": "shop", "tcp_exporter_deployment": "web", "pod": "web-1"}, "value": [0, "7"]}
    monkeypatch.setattr(scalein, "query", lambda url, headers: [sample])
    targets: dict[tuple[str, str], Target] = {}
    pods = Pods()
    costs = DeletionCosts(
        pods, targets, period=1, rate=30, headers={}, may_write=lambda: True, allowed=lambda url: True
    )  # type: ignore[arg-type]
    assert costs.round() == 0 and pods.written == []
    targets[("shop", "web")] = Target(100, 1, 2, "http://p")
    assert costs.round() == 1 and pods.written == [("shop", "web-1", 7)]
    del targets[("shop", "web")]
    assert costs.round() == 0 and costs.written == {}


def test_a_prometheus_answering_inf_nan_or_garbage_for_one_namespace_leaves_anothers_costs_written(
    monkeypatch: Any,
) -> None:
    def sample(namespace: str, pod: str, value: Any) -> dict[str, Any]:
        return {
            "metric": {"namespace": namespace, "tcp_exporter_deployment": "web-api", "pod": pod},
            "value": [0, value],
        }

    series: list[Any] = [
        sample("team-a", "web-api-1", "+Inf"),
        sample("team-a", "web-api-2", "NaN"),
        sample("team-a", "web-api-3", "-3"),
        sample("team-a", "web-api-4", {"x": 1}),
        {"metric": "garbage"},
        "not a sample",
        sample("team-b", "web-api-1", "12"),
        sample("team-b", "web-api-2", "1e12"),  # capped at the int32 the annotation holds
    ]
    monkeypatch.setattr(scalein, "query", lambda url, headers: series)
    # A threshold no count reaches: a scale-in is coming, so every valid count is written.
    targets = {(ns, "web-api"): Target(2**32, 1, 2, "http://p") for ns in ("team-a", "team-b")}
    pods = Pods()
    costs = DeletionCosts(
        pods, targets, period=1, rate=30, headers={}, may_write=lambda: True, allowed=lambda url: True
    )  # type: ignore[arg-type]
    assert costs.round() == 2
    assert sorted(pods.written) == [("team-b", "web-api-1", 12), ("team-b", "web-api-2", 2**31 - 1)]


OK = b'{"status": "success", "data": {"resultType": "vector", "result": []}}'


def test_a_redirect_is_refused_and_the_admins_headers_never_reach_where_it_points() -> None:
    import pytest

    with Prometheus(lambda h: answer(h, OK)) as elsewhere:
        with Prometheus(lambda h: answer(h, b"", 302, {"Location": elsewhere.url + "/api/v1/query"})) as prom:
            with pytest.raises(ValueError, match="no redirect is followed"):
                scalein.query(prom.url, {"Authorization": "Bearer s3cret"})
            assert prom.hits and prom.hits[0]["Authorization"] == "Bearer s3cret"
        assert elsewhere.hits == []


@pytest.mark.parametrize("part", ["status line", "body"])
def test_a_server_that_drips_any_part_of_its_answer_is_cut_off_at_the_deadline(part: str) -> None:
    import time

    def drip(h: Any) -> None:
        try:
            if part == "body":
                h.send_response(200)
                h.send_header("Content-Length", "1000000")
                h.end_headers()
                h.wfile.flush()
            for byte in b"HTTP/1.1 200 OK\r\n" if part == "status line" else b" " * 100:
                h.wfile.write(bytes([byte]))
                h.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass

    with Prometheus(drip) as prom:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            scalein.query(prom.url, {}, deadline=1.0)
        assert time.monotonic() - started < 1.5


def test_an_answer_nested_too_deeply_costs_only_its_own_address() -> None:
    with Prometheus(lambda h: answer(h, b"[" * 200000)) as prom, pytest.raises(ValueError, match="nested"):
        scalein.query(prom.url, {})


def test_an_answer_larger_than_the_cap_is_refused_without_being_kept() -> None:
    import pytest

    def huge(h: Any) -> None:
        h.send_response(200)
        h.end_headers()
        try:
            block = b" " * 65536
            for _ in range(scalein.MAX_ANSWER // len(block) + 2):
                h.wfile.write(block)
        except OSError:
            pass

    with Prometheus(huge) as prom, pytest.raises(ValueError, match="larger than"):
        scalein.query(prom.url, {})


def test_an_address_the_admin_does_not_allow_is_never_queried() -> None:
    with Prometheus(lambda h: answer(h, OK)) as prom:
        targets = {("team-a", "web-api"): Target(100, 1, 2, prom.url)}
        costs = DeletionCosts(
            Pods(), targets, period=1, rate=30, headers={"Authorization": "Bearer s3cret"},  # type: ignore[arg-type]
            may_write=lambda: True, allowed=lambda url: False,
        )  # fmt: skip
        assert costs.round() == 0
        assert prom.hits == []
