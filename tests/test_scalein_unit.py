"""Unit tests of connection-aware scale-in's write policy and limits (the end-to-end test is test_scale_in.py)."""

from __future__ import annotations

from typing import Any

from tcp_exporter_operator import scalein
from tcp_exporter_operator.scalein import DeletionCosts, Target, TokenBucket, decide, imminent


def test_every_pod_is_written_once_then_only_on_a_material_change_unless_scale_in_is_imminent() -> None:
    counts = {"a": 10, "b": 50}
    assert decide(counts, {}, exact=False) == [("a", 10), ("b", 50)]
    # b moved by 2 (not more than max(2, 20% of 50)): not material; a by 3 of 10: material.
    assert decide({"a": 13, "b": 52}, counts, exact=False) == [("a", 13)]
    # Imminent: every difference is written, the largest first.
    assert decide({"a": 11, "b": 52}, counts, exact=True) == [("b", 52), ("a", 11)]
    assert decide(counts, counts, exact=True) == []


def test_scale_in_is_imminent_when_kedas_formula_wants_fewer_replicas_than_there_are() -> None:
    target = Target(threshold=100, min_replicas=2, replicas=6, prometheus="http://p")
    assert imminent({"a": 150, "b": 200}, target)  # ceil(350 / 100) = 4 < 6
    assert not imminent({"a": 300, "b": 300}, target)  # 6
    assert imminent({"a": 0}, target)  # the minimum, 2, is still below 6
    assert not imminent({"a": 0}, Target(100, 6, 6, "http://p"))  # already at the minimum


def test_the_token_bucket_allows_its_rate_and_no_more() -> None:
    now = [0.0]
    bucket = TokenBucket(5, clock=lambda: now[0])
    assert sum(bucket.take() for _ in range(20)) == 5  # a second's worth saved up, no more
    now[0] += 2.0  # two seconds later: refilled to the burst, not to 10
    assert sum(bucket.take() for _ in range(20)) == 5
    now[0] += 0.5  # 2.5 tokens: 2 writes
    assert sum(bucket.take() for _ in range(20)) == 2


class Pods:
    """Stands in for the API server's answer to the pod patches: records them."""

    def __init__(self) -> None:
        self.written: list[tuple[str, str, int]] = []

    def set_deletion_cost(self, namespace: str, name: str, cost: int) -> bool:
        self.written.append((namespace, name, cost))
        return True


def test_writes_stay_within_the_overall_rate_under_churn_and_the_rest_waits(monkeypatch: Any) -> None:
    series: list[dict[str, Any]] = []
    monkeypatch.setattr(scalein, "query", lambda url, headers: series)
    targets = {("shop", f"web-{d}"): Target(100, 1, 10, "http://p") for d in range(4)}
    pods = Pods()
    costs = DeletionCosts(pods, targets, period=1, rate=30, headers={}, may_write=lambda: True)  # type: ignore[arg-type]
    costs.bucket = TokenBucket(30, clock=lambda: 0.0)  # no time passes: the burst is all there is
    for round_ in range(3):
        # Churn: every pod's count jumps each round, far beyond the hysteresis.
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
    costs = DeletionCosts(pods, targets, period=1, rate=30, headers={}, may_write=lambda: True)  # type: ignore[arg-type]
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
    targets = {(ns, "web-api"): Target(100, 1, 2, "http://p") for ns in ("team-a", "team-b")}
    pods = Pods()
    costs = DeletionCosts(pods, targets, period=1, rate=30, headers={}, may_write=lambda: True)  # type: ignore[arg-type]
    assert costs.round() == 2
    assert sorted(pods.written) == [("team-b", "web-api-1", 12), ("team-b", "web-api-2", 2**31 - 1)]
