"""KEDA scaling real pods on the node tier: the sample, connections through its Service, the HPA's replicas, the
new pods started by the kubelet, and the scale-in once the connections close. Shared by `make demo` (on a node)
and tests/test_node.py, so that what the demo shows is what a test checks."""

from __future__ import annotations

import json
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.helpers import wait_for

REPO = Path(__file__).resolve().parent.parent
NAME = "echo-server"


@dataclass
class Scaled:
    out_to: int = 0
    out_seconds: float = 0.0  # from the connections opened to every new pod Ready
    in_seconds: float = 0.0  # from the connections closed to the replicas back at the minimum
    pods: list[str] = field(default_factory=list)


def ready_pods(kubectl: Callable[..., str], namespace: str, container: str | None = "tcp-exporter") -> list[Any]:
    """The namespace's pods, not terminating, whose every container is Ready (and that have `container`)."""
    out = []
    for pod in json.loads(kubectl("-n", namespace, "get", "pods", "-o", "json"))["items"]:
        statuses = pod.get("status", {}).get("containerStatuses") or []
        names = [c["name"] for c in pod["spec"]["containers"] + (pod["spec"].get("initContainers") or [])]
        if pod["metadata"].get("deletionTimestamp") or (container and container not in names):
            continue
        if statuses and all(c["ready"] for c in statuses):
            out.append(pod)
    return out


def endpoints(kubectl: Callable[..., str], namespace: str) -> list[str]:
    """The Ready addresses of the namespace's EndpointSlices."""
    slices = json.loads(kubectl("-n", namespace, "get", "endpointslices", "-o", "json"))["items"]
    return [a for s in slices for e in s.get("endpoints") or [] if e["conditions"].get("ready") for a in e["addresses"]]


def serves_only(kubectl: Callable[..., str], namespace: str, pod: Any, cluster_ip: str) -> None:
    """Wait until the Service sends to `pod` alone. kube-proxy programs a Service a moment after its EndpointSlice
    changes, and until then may still send to a pod that is going (which refuses once it stops): so the
    EndpointSlice must list `pod` alone, every other pod be gone, and the Service answer from `pod` five times
    running."""
    name, ip = pod["metadata"]["name"], pod["status"]["podIP"]
    wait_for(lambda: endpoints(kubectl, namespace) == [ip], 60, f"the Service's endpoints to be {name} alone")

    def others_gone() -> bool:
        pods = json.loads(kubectl("-n", namespace, "get", "pods", "-o", "json"))["items"]
        return [p["metadata"]["name"] for p in pods] == [name]

    wait_for(others_gone, 120, f"every pod but {name} to be gone")
    wait_for(lambda: all(_answers(cluster_ip) == name for _ in range(5)), 30, f"the Service to answer from {name}")


def scale_on_real_pods(
    kubectl: Callable[..., str],
    namespace: str,
    prometheus_url: str,
    connections: int,
    threshold: int,
    say: Callable[[str], None] = lambda _text: None,
) -> Scaled:
    """Apply the sample (as the quickstart does) with a threshold and this Prometheus, open `connections` to its
    Service, wait for KEDA's HPA to scale it out and every new pod to run, close them, wait for the scale-in."""
    result = Scaled()
    kubectl("create", "namespace", namespace)
    kubectl("apply", "-n", namespace, "-k", str(REPO / "manifests" / "samples"))
    kubectl(
        "-n", namespace, "annotate", "deployment", NAME, "--overwrite",
        f"tcp-exporter/threshold={threshold}", f"tcp-exporter/prometheus={prometheus_url}",
        "tcp-exporter/max-replicas=3",
        # Short, so that the scale-in shows within the run; the default is the HPA's 300 s.
        "tcp-exporter/scale-down-stabilization=5",
    )  # fmt: skip
    (first,) = wait_for(lambda: ready_pods(kubectl, namespace) or None, 180, "the injected pod Ready")
    say(f"pod {first['metadata']['name']} Ready on the node: {first['status']['podIP']}")  # type: ignore[index]
    service = json.loads(kubectl("-n", namespace, "get", "service", NAME, "-o", "json"))["spec"]

    serves_only(kubectl, namespace, first, service["clusterIP"])
    want = min(3, math.ceil(connections / threshold))
    clients = []
    try:
        started = time.monotonic()
        for i in range(connections):
            try:
                clients.append(socket.create_connection((service["clusterIP"], 8080), timeout=5))
            except OSError as exc:
                raise AssertionError(
                    f"connection {i + 1} of {connections} to the Service: {exc}\n{_state(kubectl, namespace)}\n"
                    f"{kubectl('-n', namespace, 'get', 'endpointslices,events', '-o', 'wide', check=False)}"
                ) from None
        say(f"{connections} connections open through the Service's ClusterIP {service['clusterIP']}:8080")

        def scaled_out() -> list[dict[str, object]] | None:
            pods = ready_pods(kubectl, namespace)
            return pods if len(pods) == want else None

        try:
            pods = wait_for(scaled_out, 240, f"KEDA's HPA to scale to {want} and the new pods to run", 1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{_state(kubectl, namespace)}") from None
        result.out_to, result.out_seconds = want, time.monotonic() - started
        result.pods = [p["metadata"]["name"] for p in pods]  # type: ignore[index]
        say(f"1 -> {want} replicas, every pod Ready, {result.out_seconds:.0f} s after the connections opened")
    finally:
        for c in clients:
            c.close()
    started = time.monotonic()

    def scaled_in() -> bool:
        deployment = json.loads(kubectl("-n", namespace, "get", "deployment", NAME, "-o", "json"))
        return int(deployment["spec"]["replicas"]) == 1 and len(ready_pods(kubectl, namespace)) == 1

    wait_for(scaled_in, 240, "the scale-in back to 1", 1)
    result.in_seconds = time.monotonic() - started
    say(f"{want} -> 1 replica {result.in_seconds:.0f} s after the connections closed")
    return result


def _answers(address: str) -> str | None:
    """The pod name the Service's app answers /hostname with (agnhost netexec), or None."""
    try:
        with socket.create_connection((address, 8080), timeout=2) as s:
            s.sendall(b"GET /hostname HTTP/1.0\r\n\r\n")
            answer = b"".join(iter(lambda: s.recv(4096), b""))
    except OSError:
        return None
    head, _, body = answer.partition(b"\r\n\r\n")
    return (
        body.decode(errors="replace") if head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200") else None
    )


def _state(kubectl: Callable[..., str], namespace: str) -> str:
    """What a failed wait shows: the pods, the ScaledObject's conditions, the HPA and its events."""
    parts = [kubectl("-n", namespace, "get", "pods,hpa,scaledobject", "-o", "wide", check=False)]
    for so in json.loads(kubectl("-n", namespace, "get", "scaledobjects", "-o", "json", check=False) or "{}").get(
        "items", []
    ):
        parts.append(json.dumps(so["spec"]["triggers"][0]["metadata"]) + json.dumps(so.get("status", {})))
    parts.append(kubectl("-n", namespace, "describe", "hpa", check=False)[-2500:])
    return "\n".join(parts)
