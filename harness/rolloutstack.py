"""Real Argo Rollouts on the local control plane: its controller, built from Argo Rollouts' Go module, and its
CRDs from the same module. It turns a Rollout into ReplicaSets (labelled rollouts-pod-template-hash, owned by the
Rollout), whose pods kube-controller-manager's ReplicaSet controller creates, as in a cluster."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes import client

from harness import gobuild
from harness.helpers import die_with_parent, wait_for
from harness.operator_proc import Kube, deployment, free_port

HERE = Path(__file__).resolve().parent
VERSION = "v1.8.4"  # the newest that builds with this machine's Go (1.9 and later need Go 1.26.10)
MODULE = HERE / "rolloutsbuild"
PACKAGE = "github.com/argoproj/argo-rollouts"
NAMESPACE = "argo-rollouts"
ROLLOUTS = ("argoproj.io", "v1alpha1")


def binaries() -> Path:
    """The folder holding rollouts-controller, built once."""
    return gobuild.build(
        "argo-rollouts",
        VERSION,
        MODULE,
        {"rollouts-controller": f"{PACKAGE}/cmd/rollouts-controller"},
        ldflags=f"-s -w -X {PACKAGE}/utils/version.version={VERSION}",
    )


def crd_dir() -> Path:
    """Argo Rollouts' own CRDs, from the module the controller is built from (in Go's module cache)."""
    out = subprocess.run(
        ["go", "list", "-m", "-f", "{{.Dir}}", PACKAGE], cwd=MODULE, check=True, capture_output=True, text=True
    )
    if not out.stdout.strip():
        subprocess.run(["go", "mod", "download", PACKAGE], cwd=MODULE, check=True)
        return crd_dir()
    return Path(out.stdout.strip()) / "manifests" / "crds"


class ArgoRollouts:
    """Argo Rollouts' CRDs and controller on a local cluster, until stop()."""

    def __init__(self, cluster: Any, kubectl: Callable[..., str]) -> None:
        self.cluster, self.kubectl = cluster, kubectl
        self.dir = Path(tempfile.mkdtemp(prefix="tcpx-rollouts-"))
        self.proc: subprocess.Popen[bytes] | None = None
        binary = binaries() / "rollouts-controller"  # built (or found) before anything is installed
        crds = sorted(crd_dir().glob("*-crd.yaml"))  # the folder also holds their kustomization
        for crd in crds:
            kubectl("apply", "--server-side", "-f", str(crd))
        for crd in crds:
            kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(crd))
        kubectl("create", "namespace", NAMESPACE, check=False)
        log = open(self.dir / "controller.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [
                str(binary),
                f"--kubeconfig={cluster.kubeconfig}",
                "--leader-elect=false",
                f"--metricsport={free_port()}",
                f"--healthzPort={free_port()}",
                "--loglevel=info",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "KUBECONFIG": cluster.kubeconfig, "POD_NAMESPACE": NAMESPACE},
            preexec_fn=die_with_parent(),
        )
        log.close()
        wait_for(self.started, 60, "Argo Rollouts' controller to start its workers", 0.5)

    def started(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, f"rollouts-controller exited:\n{self.logs()}"
        return "Started rollout workers" in self.logs(200)

    def logs(self, lines: int = 60) -> str:
        path = self.dir / "controller.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def rollout(name: str, annotations: dict[str, str], workload_ref: str | None = None) -> dict[str, Any]:
    """A Rollout as users write one: a Deployment's spec under Argo's kind, a canary strategy without steps (each
    new template promoted at once); or its workloadRef form, the template being a Deployment's."""
    body = deployment(name, annotations)
    body.update(apiVersion="argoproj.io/v1alpha1", kind="Rollout")
    body["spec"]["strategy"] = {"canary": {}}
    if workload_ref is not None:
        del body["spec"]["template"]
        body["spec"]["workloadRef"] = {"apiVersion": "apps/v1", "kind": "Deployment", "name": workload_ref}
        body["spec"]["selector"] = deployment(workload_ref)["spec"]["selector"]  # the template's labels
    return body


class Rollouts:
    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self.custom = client.CustomObjectsApi(kube.apps.api_client)

    def create(self, body: dict[str, Any]) -> None:
        self.custom.create_namespaced_custom_object(*ROLLOUTS, self.kube.ns, "rollouts", body)

    def get(self, name: str) -> dict[str, Any]:
        return dict(self.custom.get_namespaced_custom_object(*ROLLOUTS, self.kube.ns, "rollouts", name))

    def annotate(self, name: str, **annotations: str | None) -> None:
        body = {"metadata": {"annotations": {f"tcp-exporter/{k.replace('_', '-')}": v for k, v in annotations.items()}}}
        self.custom.patch_namespaced_custom_object(
            *ROLLOUTS, self.kube.ns, "rollouts", name, body, _content_type="application/merge-patch+json"
        )

    def inits(self, name: str) -> list[str]:
        spec = self.get(name)["spec"]["template"]["spec"]
        return [c["name"] for c in spec.get("initContainers") or []]

    def pods(self, app: str) -> list[Any]:
        found = self.kube.core.list_namespaced_pod(self.kube.ns, label_selector=f"app={app}").items
        return [p for p in found if p.metadata.deletion_timestamp is None]

    def events(self, name: str, type_: str | None = None) -> list[Any]:
        return [e for e in self.kube.events(name, type_) if e.involved_object.kind == "Rollout"]


def sidecar(pod: Any) -> Any:
    return next((c for c in pod.spec.init_containers or [] if c.name == "tcp-exporter"), None)
