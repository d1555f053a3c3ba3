"""The scaling signal end to end, on real parts: the operator's ScaledObject query, run by a real Prometheus that
finds real sidecars through Kubernetes discovery against the real apiserver, with the documented scrape jobs.

Deployment names are the ones users have: a dash, a dot, a shared prefix, and one long enough that Kubernetes
truncates its pod names. The last release's query parsed for none of the first two and matched no pod of the
last one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import need
from tcp_exporter_operator import scalein

from harness.helpers import wait_for
from harness.netns import lan
from harness.operator_proc import Kube, Operator, deployment, injected
from harness.podsim import Kubelet
from harness.promstack import MONITORING, Prometheus, check_queries, documented_jobs, promtool, rule_file

pytestmark = [pytest.mark.cluster, pytest.mark.netns, pytest.mark.prometheus]

LONG = "payments-gateway-primary-eu-west-1-canary-release-ab"  # 52: its pod names are truncated
# Deployment -> connections held by each of its pods. web-api's pod gets an IPv6 pod IP.
CONNECTIONS = {"web": [150, 31], "web-api": [500], "checkout.v2": [7], LONG: [40, 23]}
IPV6 = "web-api"
DRAINED = "web"  # its first pod drains: its connections leave the query


def test_each_scaledobject_query_sums_exactly_its_own_pods_on_real_discovery_with_one_or_two_jobs(
    operator: Operator, kube: Kube, cluster: Any, api: Any
) -> None:
    need(os.geteuid() == 0, "network namespaces need root")
    need(shutil.which("setpriv") is not None, "setpriv (util-linux) is needed")
    queries = {}
    for name in CONNECTIONS:
        annotations = {"tcp-exporter/port": "web", "tcp-exporter/threshold": "100"}
        if name == DRAINED:
            annotations["tcp-exporter/drain"] = "20s"
        body = deployment(name, annotations)
        body["spec"]["replicas"] = 0  # scaled up once injected: every pod then carries the sidecar
        kube.create(body)
    for name, conns in CONNECTIONS.items():
        so = injected(kube, name)
        trigger = so["spec"]["triggers"][0]
        assert trigger["metadata"]["ignoreNullValues"] == "false"
        assert so["spec"]["fallback"]["behavior"] == "currentReplicasIfHigher"
        queries[name] = trigger["metadata"]["query"]
        kube.patch(name, {"spec": {"replicas": len(conns)}})
    assert check_queries(list(queries.values())).returncode == 0

    with lan(sum(map(len, CONNECTIONS.values())), host=True) as net:
        kubelet = Kubelet(api, kube.ns, net)
        running: dict[str, list[Any]] = {}
        one_job = two_jobs = None
        try:
            for name, conns in CONNECTIONS.items():
                pods = kubelet.pods_of(name, len(conns))
                running[name] = [kubelet.run(p, ipv6=name == IPV6) for p in pods]
                for pod, n in zip(running[name], conns, strict=True):
                    kubelet.connect(pod, n)
            # Generated pod names are cut to 63 characters: the dash before the random suffix is gone, and the last
            # release's pattern NAME-<hash>-<suffix> matched none of these pods.
            assert len(running[LONG][0].name) == 63
            assert not re.fullmatch(re.escape(LONG) + "-[a-z0-9]+-[a-z0-9]+", running[LONG][0].name)
            one_job = Prometheus(documented_jobs(("tcp-exporter",), cluster.kubeconfig, kube.ns))
            two_jobs = Prometheus(
                documented_jobs(("tcp-exporter", "kubernetes-pods"), cluster.kubeconfig, kube.ns),
                alert_rules=True,
            )
            for prom in (one_job, two_jobs):
                for name, conns in CONNECTIONS.items():
                    total = sum(conns)
                    wait_for(
                        lambda p=prom, q=queries[name], want=total: p.query(q) == want,
                        60,
                        f"the query of {name} to return {total}",
                    )
            # Both jobs really scrape every sidecar (the IPv6 one through the annotation job's bracketed address),
            # so a plain sum would count each connection twice: the de-duplication is what keeps it exact.
            v6 = f"[{running[IPV6][0].ip}]:9100"
            wait_for(
                lambda: any(t["labels"]["instance"] == v6 and t["health"] == "up" for t in two_jobs.targets()),  # type: ignore[union-attr]
                30,
                "the annotation job to scrape the IPv6 pod",
            )
            for name, conns in CONNECTIONS.items():
                selector = f'namespace="{kube.ns}",tcp_exporter_deployment="{name}"'
                naive = f"sum(tcp_exporter_established_connections{{{selector}}})"
                doubled = 2 * sum(conns)
                wait_for(
                    lambda q=naive, want=doubled: two_jobs.query(q) == want,  # type: ignore[union-attr]
                    30,
                    f"both jobs to scrape every pod of {name}",
                )

            # A draining pod's connections leave the query (the pod is going; its clients must not ask for
            # replicas back); Prometheus still has them. The drain is asked for as the kubelet's preStop hook does.
            status, said = kubelet.pre_stop(running[DRAINED][0], DRAINED, timeout=0.5)
            assert status == 200 and said.startswith("time is up") and "150 connection(s) left" in said, said
            rest = sum(CONNECTIONS[DRAINED][1:])
            for prom in (one_job, two_jobs):
                wait_for(lambda p=prom: p.query(queries[DRAINED]) == rest, 60, f"the query of {DRAINED} to be {rest}")
                for name, conns in CONNECTIONS.items():
                    if name != DRAINED:
                        assert prom.query(queries[name]) == sum(conns)
            # Connection-aware scale-in's query leaves the draining pod out too (it is being deleted already; its
            # connections would hide a second step of the scale-in), and counts each other pod once.
            for prom in (one_job, two_jobs):
                result = prom.api("query", query=scalein.QUERY)["result"]
                per_pod = {
                    s["metric"]["pod"]: float(s["value"][1])
                    for s in result
                    if s["metric"]["namespace"] == kube.ns and s["metric"]["tcp_exporter_deployment"] == DRAINED
                }
                assert sorted(per_pod.values()) == sorted(CONNECTIONS[DRAINED][1:]), per_pod
                assert running[DRAINED][0].name not in per_pod
            selector = f'namespace="{kube.ns}",tcp_exporter_deployment="{DRAINED}"'
            assert one_job.query(f"sum(tcp_exporter_established_connections{{{selector}}})") == sum(
                CONNECTIONS[DRAINED]
            )

            # Missing data is not zero: web-api's sidecar is gone, its query returns nothing; the others hold.
            kubelet.kill_sidecar(running[IPV6][0])
            for prom in (one_job, two_jobs):
                wait_for(lambda p=prom: p.query(queries[IPV6]) is None, 60, "web-api's query to return no value")
                for name, conns in CONNECTIONS.items():
                    if name != IPV6:
                        assert prom.query(queries[name]) == (rest if name == DRAINED else sum(conns))

            # The shipped alert rules load and evaluate here.
            wait_for(
                lambda: all(r["health"] == "ok" for g in two_jobs.api("rules")["groups"] for r in g["rules"]),  # type: ignore[union-attr]
                30,
                "the rules to evaluate",
            )
        finally:
            for prom in (one_job, two_jobs):
                if prom is not None:
                    prom.stop()
            kubelet.close()


def test_shipped_alert_rules_pass_promtool_and_each_has_a_runbook_that_exists(tmp_path: Path) -> None:
    rules = subprocess.run([promtool(), "check", "rules", str(rule_file(tmp_path))], capture_output=True, text=True)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    readme = (MONITORING.parent.parent / "docs" / "runbooks.md").read_text().lower()
    alerts = [r for g in yaml.safe_load(rule_file(tmp_path).read_text())["groups"] for r in g["rules"]]
    assert len(alerts) >= 3
    for alert in alerts:
        anchor = alert["annotations"]["runbook_url"].rsplit("#", 1)[1]
        assert anchor == "runbook-" + alert["alert"].lower()
        assert f"### runbook: {alert['alert'].lower()}" in readme


def test_the_monitoring_component_builds_a_prometheusrule_an_operator_podmonitor_and_a_dashboard_configmap(
    kubectl: Any, tmp_path: Path
) -> None:
    # What the README says to do: list the component in manifests/kustomization.yaml (here in a copy).
    manifests = tmp_path / "manifests"
    shutil.copytree(MONITORING.parent, manifests)
    with open(manifests / "kustomization.yaml", "a") as f:
        f.write("components:\n  - monitoring\n")
    docs = list(yaml.safe_load_all(kubectl("kustomize", str(manifests))))
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert rule["metadata"]["namespace"] == "tcp-exporter"
    (dashboard,) = [d for d in docs if d["metadata"]["name"] == "tcp-exporter-dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["tcp-exporter.json"])["uid"] == "tcp-exporter"
    (monitor,) = [d for d in docs if d["kind"] == "PodMonitor"]
    (operator,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = operator["spec"]["template"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] in ports
    assert f"--metrics-address=:{ports['metrics']}" in pod["spec"]["containers"][0]["args"]


def test_the_grafana_dashboard_queries_the_exporters_metrics() -> None:
    dashboard: dict[str, Any] = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    assert dashboard["uid"] == "tcp-exporter"
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert any("tcp_exporter_established_connections" in e for e in exprs)
    for panel in dashboard["panels"]:
        assert {"id", "type", "title", "gridPos", "targets"} <= set(panel)
