"""The real operator process, installed from manifests/ and run under its own ServiceAccount."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from harness.helpers import die_with_parent, wait_for

REPO = Path(__file__).resolve().parent.parent
OPERATOR = str(Path(sys.executable).with_name("tcp-exporter-operator"))
NAMESPACE = "tcp-exporter"
SERVICE_ACCOUNT = "tcp-exporter-operator"
USER = f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}"
KEDA = ("keda.sh", "v1alpha1")


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
            if event["user"].get("username") != user or event["stage"] != "ResponseComplete":
                continue
            ref = event.get("objectRef", {})
            out.append((event["verb"], ref.get("resource", ""), ref.get("namespace", ""), ref.get("name", "")))
        return out


class Operator:
    def __init__(
        self,
        cluster: Any,
        kubectl: Callable[..., str],
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
        wrap: list[str] | None = None,
        service_account: tuple[str, str] = (NAMESPACE, SERVICE_ACCOUNT),
    ) -> None:
        """`env` adds to (or, KUBECONFIG included, replaces) the process environment; `wrap` is a command the
        operator runs under (for example a private mount namespace)."""
        self.args = args or []
        self.wrap = wrap or []
        self.cluster = cluster
        token = kubectl("-n", service_account[0], "create", "token", service_account[1], "--duration=24h").strip()
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
        self.metrics_port = free_port()
        self.log_file = open(self.log_path, "ab")  # noqa: SIM115 - kept for the process's life
        self.proc = subprocess.Popen(
            [
                *self.wrap,
                OPERATOR,
                "run",
                f"--liveness=http://127.0.0.1:{self.health}/healthz",
                f"--metrics-address=127.0.0.1:{self.metrics_port}",
                "--log-level=debug",
                *self.args,
            ],
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            env=self.env,
            preexec_fn=die_with_parent(),
        )

        def healthy() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.health}/healthz", timeout=2) as resp:
                    return bool(resp.status == 200)
            except OSError:
                return False

        wait_for(healthy, 60, "the operator's liveness endpoint")

    def liveness(self) -> int:
        """The HTTP status of the operator's liveness endpoint (kopf's, with the operator's probes)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health}/healthz", timeout=5) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as err:
            return int(err.code)

    def metric(self, name: str, **labels: str) -> float:
        """One sample of the operator's /metrics (0 if absent), by name and exact labels."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            series, _, value = line.rpartition(" ")
            metric, _, rest = series.partition("{")
            if metric == name and ",".join(sorted(rest.rstrip("}").split(","))) == want:
                return float(value)
        return 0.0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()

    def close(self) -> None:
        """Stop, and remove the process's folder (its log included)."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def reconciled(self, namespace: str, name: str, resource_version: str) -> bool:
        """Whether the operator has reconciled this version of the Deployment, or a later one (kopf may merge an
        object's events, and the operator skips those older than its own write)."""
        pattern = re.compile(rf"reconciled {re.escape(namespace)}/{re.escape(name)} at resourceVersion (\d+):")
        return any(int(v) >= int(resource_version) for v in pattern.findall(self.log()))

    def wait_reconciled(self, namespace: str, name: str, resource_version: str, timeout: float = 30) -> None:
        wait_for(
            lambda: self.reconciled(namespace, name, resource_version),
            timeout,
            f"the operator to reconcile {namespace}/{name} at {resource_version}",
        )


def install(kubectl: Callable[..., str], components: tuple[str, ...] = ()) -> None:
    """`kubectl apply -k manifests/` as a user does it, with these optional components enabled in its
    kustomization.yaml (e.g. "scale-in"), on a copy."""
    with tempfile.TemporaryDirectory(prefix="tcpx-manifests-") as tmp:
        manifests = Path(tmp) / "manifests"
        shutil.copytree(REPO / "manifests", manifests)
        if components:
            with open(manifests / "kustomization.yaml", "a") as f:
                f.write("components:\n" + "".join(f"  - {c}\n" for c in components))
        kubectl("apply", "-k", str(manifests))


def operator_may(kube: Kube, verb: str, resource: str, group: str) -> bool:
    """Whether the operator's ServiceAccount (as installed from manifests/) may do this, cluster-wide: a
    SubjectAccessReview, the API server's own answer."""
    review = client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user=f"system:serviceaccount:{NAMESPACE}:tcp-exporter-operator",
            resource_attributes=client.V1ResourceAttributes(verb=verb, resource=resource, group=group),
        )
    )
    return bool(client.AuthorizationV1Api(kube.apps.api_client).create_subject_access_review(review).status.allowed)


@contextlib.contextmanager
def operator_with_kind(cluster: Any, kubectl: Callable[..., str], session: Operator, kind: str) -> Iterator[Operator]:
    """The operator with one more workload kind enabled (`kind`: statefulsets or rollouts), its component and RBAC
    installed, in place of the session's operator; after, the kind's rights go again and the session's is back."""
    session.stop()
    install(kubectl, components=("scale-in", kind))
    kinds = {"statefulsets": "Deployment,StatefulSet", "rollouts": "Deployment,Rollout"}[kind]
    op = Operator(cluster, kubectl, env={"TCP_EXPORTER_OPERATOR_WORKLOAD_KINDS": kinds})
    try:
        yield op
    finally:
        op.close()
        install(kubectl, components=("scale-in",))
        kubectl("delete", "clusterrole,clusterrolebinding", f"tcp-exporter-operator-{kind}", "--ignore-not-found")
        session.start()


def deployment(
    name: str,
    annotations: dict[str, str] | None = None,
    ports: list[dict[str, Any]] | None = None,
    extra_containers: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    labels = {"app": name[:63].rstrip("-.")}  # a label value has 63 characters at most; a name, 253
    app = {
        "name": "app",
        "image": "example.test/app:1",
        "ports": ports if ports is not None else [{"name": "web", "containerPort": 8080}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [app, *(extra_containers or [])]}},
        },
    }


class Kube:
    """Admin-side reads and writes for the tests."""

    def __init__(self, api: Any, namespace: str) -> None:
        self.ns = namespace
        self.apps = client.AppsV1Api(api)
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.autoscaling = client.AutoscalingV2Api(api)

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.apps.create_namespaced_deployment(self.ns, body).to_dict()

    def get(self, name: str) -> Any:
        return self.apps.read_namespaced_deployment(name, self.ns)

    def patch(self, name: str, body: dict[str, Any]) -> Any:
        return self.apps.patch_namespaced_deployment(name, self.ns, body)

    def annotate(self, name: str, **annotations: str | None) -> Any:
        return self.patch(
            name,
            {"metadata": {"annotations": {f"tcp-exporter/{k.replace('_', '-')}": v for k, v in annotations.items()}}},
        )

    def containers(self, name: str) -> dict[str, Any]:
        """The pod template's containers by name, a native sidecar (an init container) included."""
        spec = self.get(name).spec.template.spec
        return {c.name: c for c in (spec.init_containers or []) + spec.containers}

    def scaled_object(self, name: str) -> dict[str, Any] | None:
        """The ScaledObject the operator names for the Deployment `name` (the same name up to 54 characters)."""
        from tcp_exporter_operator.desired import child_names

        try:
            return dict(self.custom.get_namespaced_custom_object(*KEDA, self.ns, "scaledobjects", child_names(name)[0]))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def rollouts(self, name: str) -> int:
        """ReplicaSets of the Deployment once the deployment controller has seen its latest template.

        (If the operator injects before the controller's first sync, the original template never gets a
        ReplicaSet: count rollouts relative to a settled count, not from a fixed number.)
        """

        def seen() -> bool:
            dep = self.get(name)
            return bool(dep.status.observed_generation == dep.metadata.generation)

        wait_for(seen, 60, "the deployment controller to see the latest template")
        return self.replicasets(name)

    def hpa(self, name: str) -> Any:
        try:
            return self.autoscaling.read_namespaced_horizontal_pod_autoscaler(name, self.ns)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def replicasets(self, name: str) -> int:
        return len(
            [
                rs
                for rs in self.apps.list_namespaced_replica_set(self.ns).items
                if any(o.name == name for o in rs.metadata.owner_references or [])
            ]
        )

    def events(self, name: str, type_: str | None = None) -> list[Any]:
        items = self.core.list_namespaced_event(self.ns, field_selector=f"involvedObject.name={name}").items
        return [
            e
            for e in items
            if e.source and e.source.component == "tcp-exporter-operator" and (type_ is None or e.type == type_)
        ]

    def create_injected(self, op: Operator, body: dict[str, Any]) -> dict[str, Any]:
        """Create an annotated Deployment and wait until the operator has injected and settled it."""
        name = body["metadata"]["name"]
        self.create(body)
        so = injected(self, name)
        self.converged(op, name)
        return so

    def converged(self, op: Operator, name: str) -> str:
        """Wait until the operator has handled the Deployment's current version; return that version."""
        rv = str(self.get(name).metadata.resource_version)
        op.wait_reconciled(self.ns, name, rv)
        return rv


def injected(kube: Kube, name: str) -> dict[str, Any]:
    wait_for(lambda: "tcp-exporter" in kube.containers(name), 30, "the sidecar")
    return wait_for(lambda: kube.scaled_object(name), 30, "the ScaledObject")


def operator_writes(audit: Audit, since: int, namespace: str) -> list[tuple[str, str, str]]:
    """The operator's writes in a namespace, Events left out."""
    return sorted(
        (verb, resource, name)
        for verb, resource, ns, name in audit.writes(since)
        if ns == namespace and resource != "events"
    )
