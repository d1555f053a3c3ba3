"""Real KEDA on the local control plane: its operator, metrics adapter and admission webhooks, built from KEDA's
Go module.

The adapter serves `v1beta1.external.metrics.k8s.io` through the apiserver's aggregation layer: an APIService,
a selectorless Service and an EndpointSlice pointing at the adapter's port on a test address of this host (an
EndpointSlice may not hold a 127.0.0.0/8 address, and no kube-proxy runs here, so the apiserver routes to the
endpoint itself). The operator and the adapter talk gRPC with mutual TLS from one test CA. KEDA's own CRDs
come from the same module. The HPA controller in kube-controller-manager does the scaling, as in a cluster.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from harness import gobuild, hostaddr
from harness.helpers import die_with_parent, wait_for
from harness.pki import make_ca, make_cert

HERE = Path(__file__).resolve().parent
KEDA_VERSION = "v2.21.0"
MODULE = HERE / "kedabuild"
NAMESPACE = "keda"
ADAPTER_SERVICE = "keda-metrics-apiserver"
OPERATOR_SERVICE = "keda-operator"
WEBHOOK_CONFIG = "keda-admission"


def binaries() -> Path:
    """The folder holding keda-operator, keda-adapter and keda-webhooks, built once."""
    version = KEDA_VERSION.lstrip("v")
    return gobuild.build(
        "keda",
        KEDA_VERSION,
        MODULE,
        {
            "keda-operator": "github.com/kedacore/keda/v2/cmd/operator",
            "keda-adapter": "github.com/kedacore/keda/v2/cmd/adapter",
            "keda-webhooks": "github.com/kedacore/keda/v2/cmd/webhooks",
        },
        ldflags=f"-s -w -X github.com/kedacore/keda/v2/version.Version={version}",
    )


def crd_dir() -> Path:
    """KEDA's own CRDs, from the module the binaries are built from (downloaded into Go's module cache)."""
    out = subprocess.run(
        ["go", "list", "-m", "-f", "{{.Dir}}", "github.com/kedacore/keda/v2"],
        cwd=MODULE,
        check=True,
        capture_output=True,
        text=True,
    )
    if not out.stdout.strip():
        subprocess.run(["go", "mod", "download", "github.com/kedacore/keda/v2"], cwd=MODULE, check=True)
        return crd_dir()
    return Path(out.stdout.strip()) / "config" / "crd" / "bases"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_certs(folder: Path, address: str) -> None:
    """ca.crt, and tls.crt/tls.key for both ends of KEDA's gRPC link and the adapter's HTTPS, signed by it."""
    names = [
        f"DNS:{OPERATOR_SERVICE}",
        f"DNS:{OPERATOR_SERVICE}.{NAMESPACE}.svc",
        f"DNS:{OPERATOR_SERVICE}.{NAMESPACE}.svc.cluster.local",
        f"DNS:{ADAPTER_SERVICE}.{NAMESPACE}.svc",
        "DNS:localhost",
        "IP:127.0.0.1",
        f"IP:{address}",
    ]
    make_ca(folder, "ca", "keda-test-ca")
    make_cert(
        folder, "tls", "ca", "keda", f"subjectAltName={','.join(names)}\nextendedKeyUsage=serverAuth,clientAuth\n"
    )


class Keda:
    """KEDA's operator and metrics adapter, running against a local cluster until stop()."""

    def __init__(self, cluster: Any, kubectl: Callable[..., str]) -> None:
        self.cluster = cluster
        self.kubectl = kubectl
        self.dir = Path(tempfile.mkdtemp(prefix="tcpx-keda-"))
        self.certs = self.dir / "certs"
        self.certs.mkdir()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        # A test address for the adapter's endpoint, on this host's loopback device (an EndpointSlice may not
        # hold 127.0.0.0/8, and this kernel has no dummy links); removed on stop.
        self.address = f"198.18.254.{os.getpid() % 250 + 1}"
        self.claim = hostaddr.Claim(self.address)
        try:
            make_certs(self.certs, self.address)
            self._start()
        except BaseException:
            self.stop()
            raise

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            "KUBECONFIG": self.cluster.kubeconfig,
            "WATCH_NAMESPACE": "",
            "POD_NAMESPACE": NAMESPACE,
            "POD_NAME": "keda-local",
            "KEDA_CLUSTER_OBJECT_NAMESPACE": NAMESPACE,
        }

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.dir / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        self.procs[name] = subprocess.Popen(
            [str(binaries() / name), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self._env(),
            preexec_fn=die_with_parent(),
        )
        log.close()

    def _start(self) -> None:
        self.kubectl("create", "namespace", NAMESPACE, check=False)
        grpc = _free_port()
        self._spawn(
            "keda-operator",
            [
                f"--metrics-bind-address=127.0.0.1:{_free_port()}",
                f"--health-probe-bind-address=127.0.0.1:{_free_port()}",
                f"--metrics-service-bind-address=127.0.0.1:{grpc}",
                f"--cert-dir={self.certs}",
                f"--ca-dir={self.certs}",
                "--enable-cert-rotation=false",
                "--enable-webhook-patching=false",
                "--enable-apiservice-patching=false",
                "--leader-elect=false",
                "--zap-log-level=info",
            ],
        )
        https = _free_port()
        self._spawn(
            "keda-adapter",
            [
                f"--secure-port={https}",
                f"--bind-address={self.address}",
                f"--tls-cert-file={self.certs / 'tls.crt'}",
                f"--tls-private-key-file={self.certs / 'tls.key'}",
                f"--cert-dir={self.certs}",
                f"--metrics-service-address=127.0.0.1:{grpc}",
                f"--metrics-service-grpc-authority={OPERATOR_SERVICE}.{NAMESPACE}.svc.cluster.local",
                f"--port={_free_port()}",
                f"--authentication-kubeconfig={self.cluster.kubeconfig}",
                f"--authorization-kubeconfig={self.cluster.kubeconfig}",
                f"--lister-kubeconfig={self.cluster.kubeconfig}",
                "--v=1",
            ],
        )
        ca = base64.b64encode((self.certs / "ca.crt").read_bytes()).decode()
        objects = [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": ADAPTER_SERVICE, "namespace": NAMESPACE},
                "spec": {"ports": [{"name": "https", "port": 443, "targetPort": https}]},
            },
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"{ADAPTER_SERVICE}-local",
                    "namespace": NAMESPACE,
                    "labels": {"kubernetes.io/service-name": ADAPTER_SERVICE},
                },
                "addressType": "IPv4",
                "endpoints": [{"addresses": [self.address], "conditions": {"ready": True}}],
                "ports": [{"name": "https", "port": https, "protocol": "TCP"}],
            },
            {
                "apiVersion": "apiregistration.k8s.io/v1",
                "kind": "APIService",
                "metadata": {"name": "v1beta1.external.metrics.k8s.io"},
                "spec": {
                    "group": "external.metrics.k8s.io",
                    "version": "v1beta1",
                    "groupPriorityMinimum": 100,
                    "versionPriority": 100,
                    "caBundle": ca,
                    "service": {"name": ADAPTER_SERVICE, "namespace": NAMESPACE, "port": 443},
                },
            },
        ]
        self.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))

        def available() -> bool:
            for name, proc in self.procs.items():
                assert proc.poll() is None, f"{name} exited:\n{self.logs(name)}"
            out = self.kubectl("get", "apiservice", "v1beta1.external.metrics.k8s.io", "-o", "json")
            conditions = json.loads(out).get("status", {}).get("conditions", [])
            return any(c["type"] == "Available" and c["status"] == "True" for c in conditions)

        wait_for(available, 120, "KEDA's metrics adapter to be Available through the aggregation layer", 0.5)
        self._start_webhooks(ca)

    def _start_webhooks(self, ca: str) -> None:
        """KEDA's admission webhooks, registered as KEDA's own manifest registers them but called by URL (no
        Service routes here) and with failurePolicy Fail: what KEDA would reject is rejected, and a webhook that
        is not answering fails the test instead of being skipped over silently."""
        port, probe = _free_port(), _free_port()
        self._spawn(
            "keda-webhooks",
            [
                f"--port={port}",
                f"--cert-dir={self.certs}",
                f"--metrics-bind-address=127.0.0.1:{_free_port()}",
                f"--health-probe-bind-address=127.0.0.1:{probe}",
                "--zap-log-level=info",
            ],
        )

        def serving() -> bool:
            assert self.procs["keda-webhooks"].poll() is None, f"keda-webhooks exited:\n{self.logs('keda-webhooks')}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{probe}/readyz", timeout=2) as resp:
                    ready = bool(resp.status == 200)
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                return ready
            except OSError:
                return False

        wait_for(serving, 60, "KEDA's admission webhooks to serve", 0.5)
        config = yaml.safe_load((crd_dir().parents[1] / "webhooks" / "validation_webhooks.yaml").read_text())
        for hook in config["webhooks"]:
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}", "caBundle": ca}
            hook["failurePolicy"] = "Fail"
        self.kubectl("apply", "-f", "-", input=json.dumps(config))
        assert config["metadata"]["name"] == WEBHOOK_CONFIG, "KEDA renamed its webhook configuration"

    def logs(self, name: str, lines: int = 60) -> str:
        path = self.dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self) -> None:
        """Undo everything, whatever fails on the way: the APIService, KEDA's finalizers, the processes, the
        address, the folder."""
        try:
            # First: with failurePolicy Fail, a registration left behind would refuse every ScaledObject write.
            self.kubectl("delete", "validatingwebhookconfiguration", WEBHOOK_CONFIG, "--ignore-not-found", check=False)
            self.kubectl("delete", "apiservice", "v1beta1.external.metrics.k8s.io", "--ignore-not-found", check=False)
            # KEDA's finalizers on ScaledObjects left behind would hold them (and their namespaces, and a deletion
            # of the CRD) forever once KEDA is gone: release them, as uninstalling KEDA requires.
            out = self.kubectl("get", "scaledobjects", "--all-namespaces", "-o", "json", check=False)
            for item in json.loads(out or "{}").get("items", []):
                meta = item["metadata"]
                if meta.get("finalizers"):
                    self.kubectl(
                        "-n", meta["namespace"], "patch", "scaledobject", meta["name"], "--type=merge",
                        "-p", '{"metadata":{"finalizers":null}}', check=False,
                    )  # fmt: skip
        finally:
            for proc in self.procs.values():
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
            self.claim.release()
            shutil.rmtree(self.dir, ignore_errors=True)
