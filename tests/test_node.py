"""The node tier: a real kubelet, containerd and runc, CNI and kube-proxy on a control plane of its own (the
other tiers' pods stay unscheduled on theirs), running images made here."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest
from conftest import need
from tcp_exporter import __version__
from test_quickstart import quickstart_commands

from harness.helpers import sidecar_in, wait_for
from harness.images import SAMPLE_IMAGE
from harness.localkube.cluster import kubectl as kubectl_path
from harness.nodedemo import endpoints, ready_pods, serves_only

pytestmark = [pytest.mark.node, pytest.mark.cluster]
NS = "node-e2e"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def node_cluster() -> Iterator[tuple[Any, Callable[..., str], Any]]:
    need(os.geteuid() == 0, "a kubelet and containerd need root")
    for tool in ("ip", "nft", "iptables", "gcc", "buildah", "mmdebstrap"):
        need(shutil.which(tool) is not None, f"{tool} is needed")
    from harness.localkube import cluster as lk
    from harness.nodestack import NODE_IP, Node

    cluster = lk.temporary(address=NODE_IP)  # the API server where pods reach it
    kubectl = lk.kubectl_runner(cluster)

    node = None
    try:
        node = Node(cluster, kubectl)
        kubectl("create", "namespace", NS)
        yield cluster, kubectl, node
    finally:
        if node is not None:
            node.stop()
        cluster.stop()


def get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return str(resp.read().decode())
    except OSError:
        return None


def test_a_pod_with_a_native_sidecar_runs_on_the_real_node_reached_by_pod_ip_and_through_kube_proxy(
    node_cluster: tuple[Any, Callable[..., str], Any],
) -> None:
    from harness.nodestack import POD_CIDR

    _cluster, kubectl, _node = node_cluster
    labels = {"app": "web-api"}
    objects = [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web-api", "namespace": NS},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "initContainers": [
                            {"name": "side", "image": SAMPLE_IMAGE, "restartPolicy": "Always",
                             "args": ["netexec", "--http-port=8081", "--udp-port=-1"]},
                        ],
                        "containers": [
                            {"name": "app", "image": SAMPLE_IMAGE, "imagePullPolicy": "IfNotPresent",
                             "args": ["netexec", "--http-port=8080", "--udp-port=-1"],
                             "ports": [{"name": "http", "containerPort": 8080}],
                             "readinessProbe": {"httpGet": {"path": "/hostname", "port": "http"}, "periodSeconds": 1}},
                        ],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web-api", "namespace": NS},
            "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": "http"}]},
        },
    ]  # fmt: skip
    kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))

    def running() -> dict[str, Any] | None:
        pods = json.loads(kubectl("-n", NS, "get", "pods", "-l", "app=web-api", "-o", "json"))["items"]
        ready = [p for p in pods if any(c["type"] == "Ready" and c["status"] == "True"
                                        for c in p.get("status", {}).get("conditions", []))]  # fmt: skip
        return ready[0] if ready else None

    try:
        pod = wait_for(running, 120, "the pod to be Ready on the real node")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{kubectl('-n', NS, 'describe', 'pods', check=False)[-3000:]}") from None
    assert pod["spec"]["nodeName"] == "tcpx-node"
    ip = pod["status"]["podIP"]
    assert ip_address(ip) in ip_network(POD_CIDR)
    name = pod["metadata"]["name"]
    assert get(f"http://{ip}:8080/hostname") == name  # Ready: the probe got this answer
    # The native sidecar, in the same network namespace (Started is not listening yet: polled).
    wait_for(lambda: get(f"http://{ip}:8081/hostname") == name, 30, "the native sidecar to answer")
    cluster_ip = json.loads(kubectl("-n", NS, "get", "service", "web-api", "-o", "json"))["spec"]["clusterIP"]
    wait_for(lambda: get(f"http://{cluster_ip}/hostname") == name, 30, "the ClusterIP through kube-proxy")


def sidecar_processes(deployment: str) -> list[dict[str, str]]:
    """The host's view of each running sidecar of `deployment` (its main process): UID and capabilities."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            status = (proc / "status").read_text()
        except OSError:
            continue
        if b"/venv/bin/tcp-exporter" in cmdline[1:2] and f"--deployment={deployment}".encode() in cmdline:
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            found.append({"pid": proc.name, "uid": fields["Uid"], "effective": fields["CapEff"]})
    return found


def metric(ip: str, port: int = 9100) -> float | None:
    text = get(f"http://{ip}:{port}/metrics")
    for line in (text or "").splitlines():
        if line.startswith('tcp_exporter_established_connections{port="8080"'):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.fixture(scope="module")
def operator_pod(node_cluster: tuple[Any, Callable[..., str], Any]) -> Callable[..., str]:
    """`kubectl apply -k manifests/` as a user runs it: the operator runs as a pod from the image built from
    Dockerfile.operator, under its ServiceAccount, in its namespace at Pod Security `restricted`, and reaches the
    API server through the kubernetes Service (kube-proxy)."""
    _cluster, kubectl, _node = node_cluster
    kubectl("apply", "-k", str(REPO / "manifests"))
    labels = json.loads(kubectl("get", "namespace", "tcp-exporter", "-o", "json"))["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    try:
        wait_for(lambda: ready_pods(kubectl, "tcp-exporter", None), 120, "the operator's pod to be Ready")
    except AssertionError as exc:
        described = kubectl("-n", "tcp-exporter", "describe", "pods", check=False)[-3000:]
        logs = kubectl("-n", "tcp-exporter", "logs", "deploy/tcp-exporter-operator", check=False)[-3000:]
        raise AssertionError(f"{exc}\n{described}\n{logs}") from None
    return kubectl


def test_the_sample_is_injected_and_its_sidecar_runs_from_our_image_counting_connections_through_the_service(
    node_cluster: tuple[Any, Callable[..., str], Any], operator_pod: Callable[..., str]
) -> None:
    # The README quickstart's steps 2 to 4 as written (step 2 is the fixture's `kubectl apply -k manifests/`: the
    # operator runs as the pod it makes); the sidecar the operator's pod injects runs from the image built from
    # Dockerfile.sidecar, under the securityContext the operator wrote, on the real runtime.
    kubectl = operator_pod
    path = f"{Path(kubectl_path()).parent}:{os.environ['PATH']}"
    shell = {**os.environ, "KUBECONFIG": node_cluster[0].kubeconfig, "PATH": path}

    def run(command: str) -> str:
        done = subprocess.run(["bash", "-c", command], cwd=REPO, env=shell, capture_output=True, text=True)
        assert done.returncode == 0, f"{command}: {done.stderr}"
        return done.stdout

    apply_operator, create_namespace, apply_sample, containers, scaled_object = [
        c for c in quickstart_commands() if not c.startswith("helm ")
    ]
    assert apply_operator == "kubectl apply -k manifests/"  # what the fixture ran
    try:
        run(create_namespace)
        run(apply_sample)

        def pod() -> dict[str, Any] | None:
            items = json.loads(kubectl("-n", "demo", "get", "pods", "-o", "json"))["items"]
            for p in items:
                status = p.get("status", {})
                statuses = status.get("containerStatuses", []) + status.get("initContainerStatuses", [])
                # The sidecar is a native one (the operator's auto on this 1.37 API server): an init container
                # that runs for the pod's life, its readiness among the init containers' statuses.
                sidecar = p["spec"]["initContainers"][-1] if p["spec"].get("initContainers") else {}
                if (
                    sidecar.get("name") == "tcp-exporter"
                    and sidecar.get("restartPolicy") == "Always"
                    and statuses
                    and all(c["ready"] for c in statuses)
                ):
                    return dict(p)
            return None

        try:
            running = wait_for(pod, 180, "an injected echo-server pod with every container Ready")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{kubectl('-n', 'demo', 'describe', 'pods', check=False)[-4000:]}") from None
        ip = running["status"]["podIP"]
        statuses = running["status"]["containerStatuses"] + running["status"]["initContainerStatuses"]
        (sidecar,) = [c for c in statuses if c["name"] == "tcp-exporter"]
        assert sidecar["restartCount"] == 0 and sidecar["image"].endswith("tcp-exporter:" + __version__)
        assert (run(containers), run(scaled_object)) == ("tcp-exporter echo-server\n", "echo-server\n")  # step 4
        (process,) = sidecar_processes("echo-server")
        assert process["uid"].split() == ["65532"] * 4 and int(process["effective"], 16) == 0, process
        service = json.loads(kubectl("-n", "demo", "get", "service", "echo-server", "-o", "json"))["spec"]
        # The first pod, without the sidecar, may still be terminating: the Service must send to this one alone.
        serves_only(kubectl, "demo", running, service["clusterIP"])
        wait_for(lambda: metric(ip) == 0, 30, "the probe's connection to close")
        clients = []
        try:
            for _ in range(25):  # through the Service's ClusterIP: kube-proxy's DNAT to the pod
                clients.append(socket.create_connection((service["clusterIP"], 8080), timeout=5))
            wait_for(lambda: metric(ip) == 25, 30, "the sidecar to count the 25 connections")
        finally:
            for c in clients:
                c.close()
        wait_for(lambda: metric(ip) == 0, 30, "the count to fall to 0 once they close")

        # conntrack under the securityContext the operator writes for it, on the real runtime: started as UID 0
        # with NET_ADMIN, SETUID and SETGID, the sidecar serves as UID 65532 holding NET_ADMIN alone.
        kubectl("-n", "demo", "annotate", "deployment", "echo-server", "tcp-exporter/method=conntrack")

        def conntrack_pod() -> dict[str, Any] | None:
            found = pod()
            args = (sidecar_in(found["spec"]) or {}).get("args", []) if found else []
            return (
                found
                if "--method=conntrack" in args and found.get("metadata", {}).get("deletionTimestamp") is None
                else None
            )

        running = wait_for(conntrack_pod, 180, "the conntrack sidecar's pod Ready")
        ip = running["status"]["podIP"]
        # It drops within its first second (after Python's start): polled, and a sidecar left as root fails.
        net_admin_only = {"uid": ["65532"] * 4, "effective": 1 << 12}
        wait_for(
            lambda: (
                [
                    {"uid": p["uid"].split(), "effective": int(p["effective"], 16)}
                    for p in sidecar_processes("echo-server")
                ]
                == [net_admin_only]
            ),
            30,
            "the one conntrack sidecar process to be UID 65532 holding NET_ADMIN alone",
        )

        serves_only(kubectl, "demo", running, service["clusterIP"])
        clients = [socket.create_connection((service["clusterIP"], 8080), timeout=5) for _ in range(7)]
        try:
            wait_for(lambda: metric(ip) == 7, 30, "the conntrack sidecar to count the 7 connections")
        finally:
            for c in clients:
                c.close()
    finally:
        kubectl("delete", "namespace", "demo", "--wait=false", check=False)


def test_under_pod_security_baseline_conntrack_becomes_sockdiag_and_the_pods_are_admitted_and_run(
    operator_pod: Callable[..., str],
) -> None:
    kubectl = operator_pod
    kubectl("create", "namespace", "shared")
    try:
        kubectl("label", "namespace", "shared", "pod-security.kubernetes.io/enforce=baseline")
        kubectl("apply", "-n", "shared", "-k", str(REPO / "manifests" / "samples"))
        kubectl("-n", "shared", "annotate", "deployment", "echo-server", "tcp-exporter/method=conntrack")

        def admitted() -> list[dict[str, Any]]:
            pods = ready_pods(kubectl, "shared", "tcp-exporter")
            args = [sidecar_in(p["spec"]).get("args", []) for p in pods]
            return pods if args and all("--method=sockdiag" in a for a in args) else []

        (pod,) = wait_for(admitted, 180, "a pod with the sockdiag sidecar admitted and Ready under baseline")
        sidecar = sidecar_in(pod["spec"])
        assert "add" not in sidecar["securityContext"]["capabilities"]
        events = json.loads(kubectl("-n", "shared", "get", "events", "-o", "json"))["items"]
        assert any(e["reason"] == "MethodDowngraded" and e["type"] == "Warning" for e in events)
    finally:
        kubectl("delete", "namespace", "shared", "--wait=false", check=False)


def ask_hostname(conn: socket.socket) -> str:
    """One keep-alive request on a held connection to agnhost netexec: the pod's name, if the app still serves."""
    conn.sendall(b"GET /hostname HTTP/1.1\r\nHost: echo\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = conn.recv(4096)
        if not chunk:
            raise ConnectionError("closed")
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    length = int(next(h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")))
    while len(body) < length:
        body += conn.recv(4096)
    return body.decode()


def closed_by_peer(conn: socket.socket, deadline: float) -> float | None:
    """When (monotonic) the server ended the held connection, waiting until `deadline`; None if it did not."""
    conn.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            if conn.recv(4096) == b"":
                return time.monotonic()
        except TimeoutError:
            continue
        except OSError:  # reset: the app was killed
            return time.monotonic()
    return None


def test_a_drained_scale_in_cuts_no_connection_that_ends_in_time_and_the_never_ending_one_at_the_drain(
    node_cluster: tuple[Any, Callable[..., str], Any], operator_pod: Callable[..., str]
) -> None:
    """tcp-exporter/drain on the real kubelet: 3 pods scaled to 1, the two removed chosen by deletion cost. Pod A's
    clients leave 3 s in: A ends then, long before the drain's 12 s. Pod B holds one that never ends: B's app keeps
    serving it until the drain is up, then gets its SIGTERM. Both sidecars export that they drain, new
    connections go to the pod that stays, and every sidecar stops on SIGTERM with exit 0 within the grace."""
    import threading

    from kubernetes import client, config, watch

    cluster, kubectl, _node = node_cluster
    drain = 12
    kubectl("create", "namespace", "scaling")
    api = client.CoreV1Api(config.new_client_from_config(cluster.kubeconfig))
    ended: dict[tuple[str, str], Any] = {}  # (pod, container) -> its terminated state, as the kubelet reports it
    stop = threading.Event()

    def follow() -> None:
        try:
            for event in watch.Watch().stream(api.list_namespaced_pod, "scaling", timeout_seconds=120):
                pod = event["object"]
                for status in (pod.status.container_statuses or []) + (pod.status.init_container_statuses or []):
                    if status.state and status.state.terminated:
                        ended[(pod.metadata.name, status.name)] = status.state.terminated
                if stop.is_set():
                    return
        except Exception:  # the watch ends with the namespace (the test has what it needs by then, or fails)
            return

    held: list[socket.socket] = []
    try:
        kubectl("apply", "-n", "scaling", "-k", str(REPO / "manifests" / "samples"))
        kubectl("-n", "scaling", "annotate", "deployment", "echo-server", f"tcp-exporter/drain={drain}s")
        kubectl("-n", "scaling", "scale", "deployment", "echo-server", "--replicas=3")

        def drained_pods() -> list[dict[str, Any]]:
            pods = ready_pods(kubectl, "scaling", "tcp-exporter")
            hooked = [p for p in pods if (p["spec"]["containers"][0].get("lifecycle") or {}).get("preStop")]
            return hooked if len(hooked) == 3 and len(pods) == 3 else []

        pods = wait_for(drained_pods, 180, "3 pods Ready with the drain's preStop hooks")
        a, b, c = (p["metadata"]["name"] for p in pods)
        ip = {p["metadata"]["name"]: p["status"]["podIP"] for p in pods}
        for name, cost in ((a, "-100"), (b, "-100"), (c, "100")):  # the ReplicaSet removes A and B
            kubectl("-n", "scaling", "annotate", "pod", name, f"controller.kubernetes.io/pod-deletion-cost={cost}")
        leaving = [socket.create_connection((ip[a], 8080), timeout=5) for _ in range(3)]
        forever = socket.create_connection((ip[b], 8080), timeout=5)
        held += [*leaving, forever]
        assert ask_hostname(forever) == b and all(ask_hostname(s) == a for s in leaving)
        wait_for(lambda: metric(ip[a]) == 3 and metric(ip[b]) == 1, 30, "A's 3 and B's 1 connections counted")
        watcher = threading.Thread(target=follow, daemon=True)
        watcher.start()

        kubectl("-n", "scaling", "scale", "deployment", "echo-server", "--replicas=1")
        deleted = time.monotonic()

        def draining(name: str) -> bool:
            text = get(f"http://{ip[name]}:9100/metrics") or ""
            return any(
                line.startswith("tcp_exporter_draining{") and line.endswith(" 1.0") for line in text.splitlines()
            )

        wait_for(lambda: draining(a) and draining(b), 10, "A's and B's sidecars to say they drain")
        # Terminating, both apps still serve their clients; new connections go to C alone.
        assert all(ask_hostname(s) == a for s in leaving) and ask_hostname(forever) == b
        service = json.loads(kubectl("-n", "scaling", "get", "service", "echo-server", "-o", "json"))["spec"]
        wait_for(lambda: endpoints(kubectl, "scaling") == [ip[c]], 30, "the Service's endpoints to be C alone")

        def fresh_to_c() -> bool:  # kube-proxy programs the Service a moment after its EndpointSlice changes
            with socket.create_connection((service["clusterIP"], 8080), timeout=5) as fresh:
                return ask_hostname(fresh) == c

        wait_for(lambda: all(fresh_to_c() for _ in range(5)), 15, "new connections through the Service to go to C")
        while time.monotonic() < deleted + 3:  # A's clients finish their business 3 s in
            assert all(ask_hostname(s) == a for s in leaving)
            time.sleep(0.5)
        for s in leaving:
            s.close()
        left = time.monotonic()

        wait_for(lambda: (a, "echo-server") in ended, 15, "A's app to stop once its clients left")
        a_stopped = time.monotonic() - left
        cut = closed_by_peer(forever, deleted + drain + 15)
        assert cut is not None, "B's never-ending connection was not ended at the drain's end"
        b_cut = cut - deleted
        print(f"\nA stopped {a_stopped:.1f} s after its clients left; B's endless connection was cut {b_cut:.1f} s "
              f"after the scale-in (drain {drain} s)")  # fmt: skip
        assert a_stopped < 5, a_stopped  # within a poll or two of the drain, not at its end
        assert drain - 1 <= b_cut <= drain + 8, b_cut  # held for the drain, then the app's SIGTERM
        wait_for(lambda: all((n, "tcp-exporter") in ended for n in (a, b)), 30, "both sidecars to stop")
        for name in (a, b):
            sidecar, app = ended[(name, "tcp-exporter")], ended[(name, "echo-server")]
            assert sidecar.exit_code == 0 and sidecar.reason == "Completed", sidecar  # SIGTERM: a clean stop
            assert (sidecar.finished_at - app.finished_at).total_seconds() >= -1  # it outlived (or matched) the app
        assert [p["metadata"]["name"] for p in ready_pods(kubectl, "scaling", "tcp-exporter")] == [c]
    finally:
        stop.set()
        for s in held:
            s.close()
        kubectl("delete", "namespace", "scaling", "--wait=false", check=False)


def test_keda_scales_real_pods_out_on_connections_through_the_service_and_back_in_when_they_close(
    node_cluster: tuple[Any, Callable[..., str], Any], operator_pod: Callable[..., str]
) -> None:
    # KEDA (operator, metrics adapter, webhooks) and Prometheus run on the host, as in the other tiers; the pods
    # KEDA's HPA asks for are started by the real kubelet, and Prometheus discovers and scrapes them there.
    from harness.kedastack import Keda
    from harness.nodedemo import scale_on_real_pods
    from harness.promstack import Prometheus, documented_jobs

    cluster, kubectl, _node = node_cluster
    keda = Keda(cluster, kubectl)
    prometheus = Prometheus(documented_jobs(("tcp-exporter",), cluster.kubeconfig, "autoscale"))
    try:
        scaled = scale_on_real_pods(kubectl, "autoscale", prometheus.url, connections=250, threshold=100)
        assert scaled.out_to == 3 and len(scaled.pods) == 3
        print(f"\nscale-out to 3 in {scaled.out_seconds:.0f} s, scale-in in {scaled.in_seconds:.0f} s")
    finally:
        prometheus.stop()
        keda.stop()
        kubectl("delete", "namespace", "autoscale", "--wait=false", check=False)


def test_in_webhook_mode_the_samples_pods_get_the_sidecar_on_the_real_node_and_its_deployment_stays_as_written(
    node_cluster: tuple[Any, Callable[..., str], Any], operator_pod: Callable[..., str]
) -> None:
    """The webhook on the real node: the operator's pod serves it behind its Service (kube-proxy routes the API
    server's call), over the TLS it set up itself; the ReplicaSet controller's pod gets the sidecar at creation and
    the kubelet runs it; the Deployment stays exactly as applied (what Argo CD and Flux compare)."""
    from harness.operator_proc import install

    _cluster, kubectl, _node = node_cluster

    def rolled_out() -> None:
        kubectl("-n", "tcp-exporter", "rollout", "status", "deployment/tcp-exporter-operator", "--timeout=180s")

    def trusted() -> bool:
        config = json.loads(kubectl("get", "mutatingwebhookconfiguration", "tcp-exporter", "-o", "json"))
        return bool(config["webhooks"][0]["clientConfig"].get("caBundle"))

    install(kubectl, components=("webhook",))
    try:
        rolled_out()
        wait_for(trusted, 60, "the operator to set the webhook's caBundle")
        kubectl("create", "namespace", "gitops")
        kubectl("apply", "-n", "gitops", "-k", str(REPO / "manifests" / "samples"))
        try:
            (pod,) = wait_for(lambda: ready_pods(kubectl, "gitops"), 180, "the sample's injected pod Ready")
        except AssertionError as exc:
            logs = kubectl("-n", "tcp-exporter", "logs", "deploy/tcp-exporter-operator", check=False)[-3000:]
            described = kubectl("-n", "gitops", "describe", "pods", check=False)[-3000:]
            raise AssertionError(f"{exc}\n{described}\n{logs}") from None
        assert pod["metadata"]["annotations"]["tcp-exporter/injected"]
        assert sidecar_in(pod["spec"])["restartPolicy"] == "Always"
        wait_for(lambda: metric(pod["status"]["podIP"]) == 0, 30, "the injected sidecar to serve its count")
        dep = json.loads(kubectl("-n", "gitops", "get", "deployment", "echo-server", "-o", "json"))
        assert dep["metadata"]["generation"] == 1 and "tcp-exporter/status" not in dep["metadata"]["annotations"]
        assert sidecar_in(dep["spec"]["template"]["spec"]) is None
    finally:
        kubectl("delete", "namespace", "gitops", "--wait=false", check=False)
        kubectl("delete", "mutatingwebhookconfiguration", "tcp-exporter", "--ignore-not-found", check=False)
        install(kubectl)  # the patch mode again, for the tests after
        rolled_out()


def test_uninstall_leaves_the_pods_running_without_the_sidecar_after_one_rollout(
    node_cluster: tuple[Any, Callable[..., str], Any], operator_pod: Callable[..., str]
) -> None:
    # As the README says: delete the operator first, then `tcp-exporter-operator uninstall`. Last in this module.
    cluster, kubectl, _node = node_cluster
    kubectl("create", "namespace", "leaving")
    try:
        kubectl("apply", "-n", "leaving", "-k", str(REPO / "manifests" / "samples"))
        wait_for(lambda: ready_pods(kubectl, "leaving", "tcp-exporter"), 180, "the injected pod Ready")

        def revision() -> int:
            dep = json.loads(kubectl("-n", "leaving", "get", "deployment", "echo-server", "-o", "json"))
            return int(dep["metadata"]["annotations"]["deployment.kubernetes.io/revision"])

        before = revision()
        kubectl("-n", "tcp-exporter", "delete", "deployment", "tcp-exporter-operator", "--wait=true")
        cli = str(Path(sys.executable).with_name("tcp-exporter-operator"))
        env = {**os.environ, "KUBECONFIG": cluster.kubeconfig}
        done = subprocess.run([cli, "uninstall", "-n", "leaving"], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stdout + done.stderr

        def plain() -> list[dict[str, Any]]:
            pods = json.loads(kubectl("-n", "leaving", "get", "pods", "-o", "json"))["items"]
            ready = ready_pods(kubectl, "leaving", None)
            return (
                ready if len(pods) == len(ready) == 1 and ready_pods(kubectl, "leaving", "tcp-exporter") == [] else []
            )

        wait_for(plain, 120, "the pods to run without the sidecar")
        # One rollout: back to the template as the user wrote it (its first ReplicaSet, reused).
        assert revision() == before + 1
        assert json.loads(kubectl("-n", "leaving", "get", "scaledobjects", "-o", "json"))["items"] == []
    finally:
        kubectl("delete", "namespace", "leaving", "--wait=false", check=False)
