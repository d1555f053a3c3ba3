"""A real Prometheus (Debian's package) in a test namespace, scraping real sidecars."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from helpers import die_with_parent, wait_for
from netns import http_get

PROMETHEUS_PORT = 9090


def keda_replicas(value: float, threshold: int, minimum: int, maximum: int) -> int:
    """What KEDA (through the HPA) asks for with metricType AverageValue: ceil(value / threshold), clamped."""
    return max(minimum, min(maximum, math.ceil(value / threshold)))


SCRAPE_CONFIG = Path(__file__).resolve().parent.parent / "manifests" / "monitoring" / "prometheus-scrape-config.yaml"


def scrape_job(targets: list[tuple[str, dict[str, str]]]) -> dict[str, Any]:
    """The documented scrape job, with its relabeling as is, but the targets and their __meta_kubernetes_*
    labels given statically, as Kubernetes service discovery would give them (no kubelet runs pods here)."""
    (job,) = yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"]
    del job["kubernetes_sd_configs"]
    job["static_configs"] = [{"targets": [address], "labels": labels} for address, labels in targets]
    return dict(job)


def discovered(
    pod_ip: str, container_port: int, namespace: str, pod: str, annotations: dict[str, str]
) -> tuple[str, dict[str, str]]:
    """A target as Kubernetes pod discovery gives it: the pod IP and port, and its metadata as __meta labels."""
    labels = {"__meta_kubernetes_namespace": namespace, "__meta_kubernetes_pod_name": pod}
    for key, value in annotations.items():
        name = "".join(c if c.isalnum() else "_" for c in key)
        labels[f"__meta_kubernetes_pod_annotation_{name}"] = value
    return f"{pod_ip}:{container_port}", labels


class Prometheus:
    def __init__(self, ns: str, targets: list[tuple[str, dict[str, str]]], rule_files: tuple[Path, ...] = ()) -> None:
        self.ns = ns
        self.dir = Path(tempfile.mkdtemp(prefix="tcpx-prometheus-"))
        rules = []
        for i, path in enumerate(rule_files):
            copy = self.dir / f"rules-{i}.yaml"
            shutil.copy(path, copy)
            rules.append(str(copy))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": rules,
            "scrape_configs": [scrape_job(targets)],
        }
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(self.dir / "prometheus.log", "wb")  # noqa: SIM115 - kept for the process's life
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                ns,
                "prometheus",
                f"--config.file={self.dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}",
                "--log.level=warn",
            ],
            stdout=self.log,
            preexec_fn=die_with_parent(),
            stderr=subprocess.STDOUT,
        )
        wait_for(lambda: self._get("/-/ready") is not None, 60, "Prometheus to be ready")

    def _get(self, path: str) -> str | None:
        assert self.proc.poll() is None, (self.dir / "prometheus.log").read_text()
        return http_get(self.ns, f"http://127.0.0.1:{PROMETHEUS_PORT}{path}")

    def api(self, path: str, **params: str) -> Any:
        text = self._get(f"/api/v1/{path}?{urllib.parse.urlencode(params)}")
        assert text is not None
        body = json.loads(text)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> float | None:
        """The value of a query returning one sample (as KEDA reads it), None if it returns nothing."""
        result = self.api("query", query=promql)["result"]
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
