"""Pods as a kubelet would run them, without a kubelet: each pod the ReplicaSet controller created gets a network
namespace of a `lan`, a TCP server on its app port, the real sidecar started with the arguments of the pod's
own tcp-exporter container (as UID 65532 with no capability, as the injected securityContext asks), and a
status written through the status subresource: phase Running, Ready, and its pod IP (IPv4 or IPv6).
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client

from harness.exporter_proc import EXPORTER, as_security_context
from harness.helpers import die_with_parent, sidecar_in, wait_for
from harness.netns import Lan, connect, listener


@dataclass
class RunningPod:
    name: str
    netns: str
    ip: str
    server: socket.socket
    sidecar: subprocess.Popen[bytes]
    clients: list[socket.socket] = field(default_factory=list)


class Kubelet:
    """Runs the pods of a namespace in the slots of a `lan`, one pod per slot."""

    def __init__(self, api: Any, namespace: str, net: Lan, app_port: int = 8080) -> None:
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.ns = namespace
        self.net = net
        self.app_port = app_port
        self.free = list(range(len(net.pods)))
        self.pods: dict[str, RunningPod] = {}
        self.owned: dict[str, set[str]] = {}  # Deployment -> names of the pods run for it by sync()

    def pods_of(self, deployment: str, count: int, timeout: float = 60) -> list[dict[str, Any]]:
        """Wait until the Deployment has `count` pods with the sidecar; return them. Pods of the template before
        the injection may still exist: as on a real cluster, they go once these run and are Ready."""

        labels = self.apps.read_namespaced_deployment(deployment, self.ns).spec.selector.match_labels
        selector = ",".join(f"{k}={v}" for k, v in labels.items())

        def ready() -> list[dict[str, Any]] | None:
            items = self.core.list_namespaced_pod(self.ns, label_selector=selector).items
            pods = [p for p in items if p.metadata.deletion_timestamp is None]
            with_sidecar = [p for p in pods if sidecar_in(p.spec) is not None]
            if len(with_sidecar) == count:
                return [client.ApiClient().sanitize_for_serialization(p) for p in with_sidecar]
            return None

        return wait_for(ready, timeout, f"{count} injected pods of {deployment}")

    def run(self, pod: dict[str, Any], ipv6: bool = False) -> RunningPod:
        slot = self.free.pop(0)
        ns = self.net.pods[slot]
        ip = self.net.pod_v6[slot] if ipv6 else self.net.pod_v4[slot]
        sidecar = sidecar_in(pod["spec"])
        server = listener(ns, self.app_port)
        as_container = as_security_context(sidecar["securityContext"])
        env = {e["name"]: e["value"] for e in sidecar.get("env") or [] if "value" in e}  # the drain's token
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *as_container, EXPORTER, *sidecar["args"], "--log-level=warning"],
            env={**os.environ, **env},
            preexec_fn=die_with_parent(),
        )
        name = pod["metadata"]["name"]
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        ready = [{"type": t, "status": "True", "lastTransitionTime": now} for t in ("Ready", "ContainersReady")]

        native = [c for c in pod["spec"].get("initContainers") or [] if c.get("restartPolicy") == "Always"]

        def started(c: dict[str, Any]) -> dict[str, Any]:
            return {
                "name": c["name"],
                "image": c["image"],
                "imageID": "",
                "ready": True,
                "started": True,
                "restartCount": 0,
                "state": {"running": {"startedAt": now}},
            }

        self.core.patch_namespaced_pod_status(
            name,
            self.ns,
            {
                "status": {
                    "phase": "Running",
                    "podIP": ip,
                    "podIPs": [{"ip": ip}],
                    "startTime": now,
                    "conditions": [*ready, {"type": "PodScheduled", "status": "True", "lastTransitionTime": now}],
                    "containerStatuses": [started(c) for c in pod["spec"]["containers"]],
                    # A native sidecar runs on beside them (an init container that never completes).
                    "initContainerStatuses": [started(c) for c in native],
                }
            },
        )
        running = RunningPod(name, ns, ip, server, proc)
        self.pods[name] = running
        return running

    def sync(self, deployment: str) -> list[RunningPod]:
        """Do what a kubelet does between two looks: run the Deployment's new pods, let go of deleted ones.
        Returns the running pods of the Deployment, oldest first."""
        labels = self.apps.read_namespaced_deployment(deployment, self.ns).spec.selector.match_labels
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        items = self.core.list_namespaced_pod(self.ns, label_selector=selector).items
        live = [
            p
            for p in sorted(items, key=lambda p: (p.metadata.creation_timestamp, p.metadata.name))
            if p.metadata.deletion_timestamp is None and sidecar_in(p.spec) is not None
        ]
        names = {p.metadata.name for p in live}
        owned = self.owned.setdefault(deployment, set())
        for name in owned - names:
            self.release(name)
            owned.discard(name)
        for pod in live:
            if pod.metadata.name not in self.pods:
                self.run(client.ApiClient().sanitize_for_serialization(pod))
                owned.add(pod.metadata.name)
        return [self.pods[p.metadata.name] for p in live]

    def release(self, name: str) -> None:
        """The pod is gone: stop its sidecar, close its sockets, free its slot."""
        pod = self.pods.pop(name)
        if pod.sidecar.poll() is None:
            pod.sidecar.terminate()
            pod.sidecar.wait(timeout=10)
        for s in [*pod.clients, pod.server]:
            s.close()
        self.free.append(self.net.pods.index(pod.netns))

    def connect(self, pod: RunningPod, count: int) -> None:
        """`count` client connections from the lan to the pod's app port, each accepted by its server."""
        pod.clients += connect(self.net.lan, pod.ip, self.app_port, count)

    def pre_stop(self, pod: RunningPod, deployment: str, timeout: float) -> tuple[int, str]:
        """What the kubelet does first when it stops the pod: the sidecar's preStop hook (the drain), from the node
        (this host), the hook's path and headers as the pod spec has them but for a `timeout` of the test's."""
        template = self.apps.read_namespaced_deployment(deployment, self.ns).spec.template
        app = next(c for c in template.spec.containers if c.lifecycle and c.lifecycle.pre_stop)
        hook = app.lifecycle.pre_stop.http_get  # the app's hook (a native sidecar has none: it outlives the app)
        path = hook.path.split("?", 1)[0] + f"?timeout={timeout}"
        headers = {h.name: h.value for h in hook.http_headers or []}
        host = f"[{pod.ip}]" if ":" in pod.ip else pod.ip
        request = urllib.request.Request(f"http://{host}:{hook.port}{path}", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout + 10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def kill_sidecar(self, pod: RunningPod) -> None:
        pod.sidecar.kill()
        pod.sidecar.wait(timeout=10)

    def close(self) -> None:
        for pod in self.pods.values():
            if pod.sidecar.poll() is None:
                pod.sidecar.terminate()
                pod.sidecar.wait(timeout=10)
            for s in [*pod.clients, pod.server]:
                s.close()
        self.pods.clear()
