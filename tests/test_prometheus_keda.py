"""End to end: real sidecars counting real connections, a real Prometheus scraping them with the documented
scrape job, and exactly the query the operator wrote into the ScaledObject, turned into KEDA's replica count."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import need
from exporter_proc import EXPORTER
from helpers import die_with_parent, wait_for
from netns import connect, lan, listener
from operator_proc import Kube, Operator, deployment, injected
from promstack import Prometheus, discovered, keda_replicas

pytestmark = [pytest.mark.cluster, pytest.mark.netns, pytest.mark.prometheus]
MONITORING = Path(__file__).resolve().parent.parent / "manifests" / "monitoring"
# As the injected securityContext asks: UID 65532, no capability at all.
AS_SIDECAR = ["setpriv", "--reuid=65532", "--regid=65532", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"]


def test_keda_scales_on_the_operators_query_over_real_sidecars(operator: Operator, kube: Kube) -> None:
    need(os.geteuid() == 0, "network namespaces need root")
    need(shutil.which("prometheus") is not None, "Debian's prometheus package is needed")
    kube.create(
        deployment(
            "web", {"tcp-exporter/port": "web", "tcp-exporter/threshold": "100", "tcp-exporter/max-replicas": "10"}
        )
    )
    so = injected(kube, "web")
    trigger = so["spec"]["triggers"][0]
    query, threshold = trigger["metadata"]["query"], int(trigger["metadata"]["threshold"])
    template = kube.get("web").spec.template
    sidecar_args = next(c.args for c in template.spec.containers if c.name == "tcp-exporter")
    annotations = dict(template.metadata.annotations)
    # Three pods of web, and one of web-api, whose connections the query must leave out.
    pods = ["web-7d9c8b5f6d-a1b2c", "web-7d9c8b5f6d-d3e4f", "web-7d9c8b5f6d-g5h6j", "web-api-6c7d8e9f5b-k7m8n"]
    connections = [150, 120, 31, 500]
    keep: list[socket.socket] = []
    sidecars: list[subprocess.Popen[bytes]] = []
    with lan(len(pods)) as net:
        try:
            for ns in net.pods:
                keep.append(listener(ns, 8080))
                sidecars.append(
                    subprocess.Popen(
                        ["ip", "netns", "exec", ns, *AS_SIDECAR, EXPORTER, *sidecar_args, "--log-level=warning"],
                        preexec_fn=die_with_parent(),
                    )
                )
            for address, n in zip(net.pod_v4, connections, strict=True):
                keep += connect(net.lan, address, 8080, n)
            targets = [
                discovered(address, 9100, kube.ns, pod, annotations)
                for address, pod in zip(net.pod_v4, pods, strict=True)
            ]
            prometheus = Prometheus(net.lan, targets, rule_files=(MONITORING / "alerts.yaml",))
            try:
                wait_for(lambda: prometheus.query(query) == 301.0, 60, "Prometheus to see 301 connections")
                assert keda_replicas(301, threshold, so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == 4
                per_pod = {
                    pod: prometheus.query(f'tcp_exporter_established_connections{{namespace="{kube.ns}",pod="{pod}"}}')
                    for pod in pods
                }
                assert per_pod == dict(zip(pods, map(float, connections), strict=True))
                # Connections go away: the same query follows, and KEDA would scale in.
                for s in keep[len(pods) : len(pods) + 100] + keep[len(pods) + 150 : len(pods) + 250]:
                    s.close()
                wait_for(lambda: prometheus.query(query) == 101.0, 60, "Prometheus to see 101 connections")
                assert keda_replicas(101, threshold, 1, 10) == 2
                # The shipped alert rules load and evaluate in this Prometheus.
                groups = prometheus.api("rules")["groups"]
                rules = [r for g in groups for r in g["rules"]]
                assert len(rules) == 3 and all(r["health"] in ("ok", "unknown") for r in rules)
                wait_for(
                    lambda: all(r["health"] == "ok" for g in prometheus.api("rules")["groups"] for r in g["rules"]),
                    30,
                    "the rules to evaluate",
                )
            finally:
                prometheus.stop()
        finally:
            for proc in sidecars:
                proc.terminate()
                proc.wait(timeout=10)
            for s in keep:
                s.close()


def test_shipped_monitoring_files_are_valid() -> None:
    need(shutil.which("promtool") is not None, "promtool (Debian's prometheus package) is needed")
    rules = subprocess.run(
        ["promtool", "check", "rules", str(MONITORING / "alerts.yaml")], capture_output=True, text=True
    )
    assert rules.returncode == 0, rules.stdout + rules.stderr
    dashboard: dict[str, Any] = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    assert dashboard["uid"] == "tcp-exporter"
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert any("tcp_exporter_established_connections" in e for e in exprs)
    assert any("kube_deployment_status_replicas" in e for e in exprs)
    for panel in dashboard["panels"]:
        assert {"id", "type", "title", "gridPos", "targets"} <= set(panel)
