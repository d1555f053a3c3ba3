"""The check that a Deployment's Prometheus has its connection series, against a real HTTP server answering as told."""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

from tcp_exporter_operator.config import Config
from tcp_exporter_operator.events import Event
from tcp_exporter_operator.signalcheck import FOUND, NO_SERIES, RECHECK, SignalCheck, ready, series_query

from harness.hostile import Prometheus, answer

NAME = "checkout.v2"


def deployment(ns: str = "shop", name: str = NAME, url: str = "", is_ready: bool = True) -> dict[str, Any]:
    annotations = {"tcp-exporter/port": "8080", **({"tcp-exporter/prometheus": url} if url else {})}
    return {
        "metadata": {"namespace": ns, "name": name, "uid": f"uid-{ns}-{name}", "generation": 2,
                     "annotations": annotations},
        "spec": {"template": {"spec": {"containers": [{"name": "app"}, {"name": "tcp-exporter", "image": "x:1"}]}}},
        "status": {"observedGeneration": 2, "updatedReplicas": 1, "readyReplicas": 1 if is_ready else 0},
    }  # fmt: skip


def vector(deployments: list[str]) -> bytes:
    result = [{"metric": {"tcp_exporter_deployment": d}, "value": [0, "1"]} for d in deployments]
    return json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}}).encode()


class Posted(list[tuple[str, Event]]):
    def __call__(self, body: Any, event: Event) -> None:
        self.append((body["metadata"]["name"], event))


def checker(posted: Posted, allowed: bool = True, after: int = 120) -> SignalCheck:
    return SignalCheck(
        Config(signal_check_after=after), posted, allowed=lambda url: allowed, headers={}, may_run=lambda: True
    )


def test_ready_needs_the_latest_template_rolled_out_to_a_ready_pod() -> None:
    assert ready(deployment())
    assert not ready(deployment(is_ready=False))
    stale = deployment()
    stale["status"]["observedGeneration"] = 1
    assert not ready(stale)
    assert not ready({"metadata": {}, "status": {"observedGeneration": "2", "readyReplicas": "x"}})


def test_the_query_selects_one_namespace_exactly_with_go_escapes() -> None:
    assert series_query('we"ird\\ns') == (
        'count by (tcp_exporter_deployment) (tcp_exporter_established_connections{namespace="we\\"ird\\\\ns",'
        'tcp_exporter_deployment!=""})'
    )


def test_a_deployment_without_series_gets_one_warning_with_the_cause_and_a_normal_event_when_they_appear() -> None:
    present: list[str] = []
    asked: list[str] = []

    def handle(h: Any) -> None:
        asked.append(urllib.parse.parse_qs(urllib.parse.urlsplit(h.path).query)["query"][0])
        answer(h, vector(present))

    with Prometheus(handle) as prom:
        posted = Posted()
        check = checker(posted)
        check.observe(deployment(url=prom.url), ("shop", NAME))
        check.observe(deployment(name="web-api", url=prom.url), ("shop", "web-api"))
        since = check.watched[("shop", NAME)].ready_since
        assert since is not None and check.round(now=since + 119) == 0  # Ready for less than `after` s: not yet
        check.watched[("shop", NAME)].ready_since = check.watched[("shop", "web-api")].ready_since = 0.0
        present.append("web-api")
        assert check.round(now=1000.0) == 1  # one query for the namespace, both judged
        assert 'namespace="shop"' in asked[0]
        assert [(name, e.type, e.reason) for name, e in posted] == [(NAME, "Warning", NO_SERIES)]
        assert "PodMonitor" in posted[0][1].message and "release=" in posted[0][1].message
        assert check.round(now=1001.0) == 0  # judged: not asked again before RECHECK, nor warned again
        present.append(NAME)
        assert check.round(now=1000.0 + RECHECK) == 1
        assert [(name, e.type, e.reason) for name, e in posted][1:] == [(NAME, "Normal", FOUND)]
        assert check.round(now=1000.0 + 10 * RECHECK) == 0  # found: never asked again until it changes


def test_an_answer_that_is_an_error_or_an_address_not_allowed_is_no_verdict() -> None:
    with Prometheus(lambda h: answer(h, b"denied", 401)) as prom:
        posted = Posted()
        check = checker(posted)
        check.observe(deployment(url=prom.url), ("shop", NAME))
        check.watched[("shop", NAME)].ready_since = 0.0
        assert check.round(now=1000.0) == 1 and posted == []  # KEDA may hold credentials the operator has not
        assert check.watched[("shop", NAME)].verdict is None
        not_allowed = checker(posted, allowed=False)
        not_allowed.observe(deployment(url=prom.url), ("shop", NAME))
        not_allowed.watched[("shop", NAME)].ready_since = 0.0
        assert not_allowed.round(now=1000.0) == 0 and len(prom.hits) == 1 and posted == []


def test_a_changed_sidecar_is_judged_anew_and_an_opted_out_or_deleted_one_forgotten() -> None:
    with Prometheus(lambda h: answer(h, vector([]))) as prom:
        posted = Posted()
        check = checker(posted)
        key = ("shop", NAME)
        check.observe(deployment(url=prom.url), key)
        check.watched[key].ready_since = 0.0
        check.round(now=1000.0)
        assert check.watched[key].verdict == "missing" and len(posted) == 1
        changed = deployment(url=prom.url)
        changed["spec"]["template"]["spec"]["containers"][1]["image"] = "x:2"
        check.observe(changed, key)
        assert check.watched[key].verdict is None  # a new sidecar: judged again, warned again if still missing
        opted_out = deployment(url=prom.url)
        opted_out["metadata"]["annotations"]["tcp-exporter/scaledobject"] = "false"
        check.observe(opted_out, key)
        assert key not in check.watched
        check.observe(deployment(url=prom.url), key)
        check.observe(None, key)
        assert key not in check.watched


def test_zero_turns_the_check_off() -> None:
    check = checker(Posted(), after=0)
    check.observe(deployment(url="http://p:9090"), ("shop", NAME))
    assert check.watched == {}
