"""A real Prometheus with Kubernetes service discovery, built from its Go module, finding real sidecars
through the local apiserver with the documented scrape jobs, unchanged.

Debian's prometheus package is built without Kubernetes discovery, so the build here is Prometheus' own
`cmd/prometheus` and `cmd/promtool` (harness/prombuild/go.mod), with only the Kubernetes discoverer compiled in,
cached outside the repository like the control plane.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from harness import gobuild
from harness.helpers import die_with_parent, wait_for

HERE = Path(__file__).resolve().parent
PROMETHEUS_MODULE_VERSION = "v0.316.0"  # github.com/prometheus/prometheus's Go module version of Prometheus 3
MONITORING = HERE.parent / "manifests" / "monitoring"
SCRAPE_CONFIG = MONITORING / "prometheus-scrape-config.yaml"


def binaries() -> Path:
    """The folder holding `prometheus` and `promtool`, built once."""
    return gobuild.build(
        "prometheus",
        PROMETHEUS_MODULE_VERSION,
        HERE / "prombuild",
        {
            "prometheus": "github.com/prometheus/prometheus/cmd/prometheus",
            "promtool": "github.com/prometheus/prometheus/cmd/promtool",
        },
        tags="remove_all_sd,enable_kubernetes_sd",
    )


def promtool() -> str:
    return str(binaries() / "promtool")


def check_queries(queries: list[str]) -> subprocess.CompletedProcess[str]:
    """Parse every query with the real PromQL parser: promtool checks a rule file of one recording rule each."""
    with tempfile.TemporaryDirectory(prefix="tcpx-promtool-") as tmp:
        rules = {"groups": [{"name": "q", "rules": [{"record": f"q{i}", "expr": q} for i, q in enumerate(queries)]}]}
        path = Path(tmp) / "queries.yaml"
        path.write_text(yaml.safe_dump(rules))
        return subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True)


def rule_file(folder: Path) -> Path:
    """The shipped PrometheusRule's spec as a plain Prometheus rule file, in `folder`."""
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    path = folder / "tcp-exporter-rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    return path


def documented_jobs(names: tuple[str, ...], kubeconfig: str, namespace: str) -> list[dict[str, Any]]:
    """The documented scrape jobs by name, their relabeling as shipped; only where discovery connects is added
    (this control plane's kubeconfig, and the test's namespace so that other tests' pods stay out)."""
    jobs = {job["job_name"]: job for job in yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"]}
    out = []
    for name in names:
        job = jobs[name]
        for sd in job["kubernetes_sd_configs"]:
            sd["kubeconfig_file"] = kubeconfig
            sd["namespaces"] = {"names": [namespace]}
        out.append(job)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """A Prometheus process on this host's loopback, scraping what discovery finds."""

    def __init__(
        self,
        scrape_configs: list[dict[str, Any]],
        scrape_interval: str = "1s",
        alert_rules: bool = False,
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tcpx-prometheus-"))
        rules = [str(rule_file(self.dir))] if alert_rules else []
        config = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
            "rule_files": rules,
            "scrape_configs": scrape_configs,
        }
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(self.dir / "prometheus.log", "wb")  # noqa: SIM115 - kept for the process's life
        self.proc = subprocess.Popen(
            [
                str(binaries() / "prometheus"),
                f"--config.file={self.dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent(),
        )
        wait_for(lambda: self._get("/-/ready") is not None, 60, "Prometheus to be ready")

    def _get(self, path: str) -> str | None:
        assert self.proc.poll() is None, (self.dir / "prometheus.log").read_text()
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as resp:
                return str(resp.read().decode())
        except OSError:
            return None

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

    def targets(self) -> list[dict[str, Any]]:
        return list(self.api("targets", state="active")["activeTargets"])

    def logs(self) -> str:
        return (self.dir / "prometheus.log").read_text(errors="replace")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
