"""The real operator process, installed from manifests/ and run under its own ServiceAccount."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers import wait_for

REPO = Path(__file__).resolve().parent.parent
OPERATOR = str(Path(sys.executable).with_name("tcp-exporter-operator"))
NAMESPACE = "tcp-exporter"
SERVICE_ACCOUNT = "tcp-exporter-operator"
USER = f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Audit:
    """Writes in the API server's audit log, by user."""

    def __init__(self, path: str) -> None:
        self.path = path

    def mark(self) -> int:
        return os.path.getsize(self.path)

    def writes(self, since: int, user: str = USER) -> list[tuple[str, str, str, str]]:
        """(verb, resource, namespace, name) of each completed write by `user` since the mark."""
        with open(self.path, "rb") as f:
            f.seek(since)
            lines = f.read().decode().splitlines()
        out = []
        for line in lines:
            if not line.strip():
                continue
            event = json.loads(line)
            if event["user"]["username"] != user or event["stage"] != "ResponseComplete":
                continue
            ref = event.get("objectRef", {})
            out.append((event["verb"], ref.get("resource", ""), ref.get("namespace", ""), ref.get("name", "")))
        return out


class Operator:
    def __init__(self, cluster: Any, kubectl: Callable[..., str], env: dict[str, str] | None = None) -> None:
        self.cluster = cluster
        token = kubectl("-n", NAMESPACE, "create", "token", SERVICE_ACCOUNT, "--duration=24h").strip()
        config = json.loads(Path(cluster.kubeconfig).read_text())
        config["users"][0]["user"] = {"token": token}
        self.dir = Path(tempfile.mkdtemp(prefix="tcpx-operator-"))
        self.kubeconfig = self.dir / "kubeconfig"
        self.kubeconfig.write_text(json.dumps(config))
        self.log_path = self.dir / "operator.log"
        self.env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "TCP_EXPORTER_OPERATOR_SIDECAR_IMAGE": "example.test/tcp-exporter:test",
            "TCP_EXPORTER_OPERATOR_PROMETHEUS": "http://prometheus.test:9090",
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.health = free_port()
        self.log_file = open(self.log_path, "ab")  # noqa: SIM115 - kept for the process's life
        self.proc = subprocess.Popen(
            [OPERATOR, "run", f"--liveness=http://127.0.0.1:{self.health}/healthz", "--log-level=debug"],
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            env=self.env,
        )

        def healthy() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.health}/healthz", timeout=2) as resp:
                    return bool(resp.status == 200)
            except OSError:
                return False

        wait_for(healthy, 60, "the operator's liveness endpoint")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def reconciled(self, namespace: str, name: str, resource_version: str) -> bool:
        return f"reconciled {namespace}/{name} at resourceVersion {resource_version}:" in self.log()

    def wait_reconciled(self, namespace: str, name: str, resource_version: str, timeout: float = 30) -> None:
        wait_for(
            lambda: self.reconciled(namespace, name, resource_version),
            timeout,
            f"the operator to reconcile {namespace}/{name} at {resource_version}",
        )
