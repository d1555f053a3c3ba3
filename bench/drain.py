"""Scale-in without cutting connections, measured on real pods: how many connections each way of scaling in cuts.

    python -m bench.drain [--rounds 2] [--drain 90] [--mean 20] [--endless 6] [--variants default,least,drain]

On the node tier (a real kubelet, containerd and kube-proxy running the sidecar image built from
Dockerfile.sidecar), with real KEDA, the real HPA and a real Prometheus on the host: the sample Deployment
(agnhost netexec, 6 pods), its clients on this host connecting through the Service's ClusterIP. Connections
arrive as a Poisson process and last an exponential time (mean --mean seconds); --endless more never end. While
the arrivals keep some 70 connections open (threshold 10: 6 replicas), the Deployment holds 6 pods; then the
arrivals drop to keep some 12 open, its minimum becomes 3, and KEDA's HPA scales it 6 -> 3 (scale-down
stabilization 30 s). A client whose connection the server ends before the client meant to is cut; it connects
again through the Service for the rest of its lifetime, as real clients do. Each variant is one such scale-in:

  default  today's Kubernetes: the ReplicaSet removes pods by its own ranking, the apps get SIGTERM at once
  least    tcp-exporter/scale-in-by-connections: the least-connected pods are removed
  drain    least + tcp-exporter/drain: the removed pods leave the Service and wait for their clients to leave

Each round runs every variant once, in turn. Reported per variant, per scale-in (the mean over the rounds):
connections cut, split into those that would have ended within the drain and the rest
(endless, or meant to last longer than the drain); the scale-in's time, from the HPA's decision to the last
removed pod gone; and the most replicas the Deployment had afterwards (a drain must not bring replicas back).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import random
import selectors
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.common import RESULTS, log, write_results
from harness.helpers import wait_for

REPO = Path(__file__).resolve().parent.parent
NAME = "echo-server"
PODS, KEEP = 6, 3
THRESHOLD = 10  # connections per replica
HIGH, LOW = 64, 12  # finite connections the arrivals keep open, before and after the drop
STABILIZATION = 30  # seconds of the HPA's scale-down stabilization: time for the deletion costs to be written
VARIANTS = ("default", "least", "drain")


@dataclass
class Session:
    """One client: it means to stay until `until` (inf: never ends), through as many connections as it takes."""

    until: float
    endless: bool
    sock: socket.socket | None = None
    cuts: list[float] = field(default_factory=list)  # when the server ended its connection before it meant to
    retry_at: float = 0.0  # when to connect again after a cut (0: connected, or done)
    done: bool = False


class Clients:
    """The clients of one run, on one thread: Poisson arrivals at `rate` a second (changed while running),
    exponential lifetimes, a selector that sees a connection ended by the server (EOF or reset: agnhost never
    speaks first, so anything readable is an end), and reconnection of a cut client through the Service."""

    def __init__(self, address: tuple[str, int], mean: float, rng: random.Random) -> None:
        self.address, self.mean, self.rng = address, mean, rng
        self.rate = 0.0
        self.sessions: list[Session] = []
        self.failed_connects = 0
        self.selector = selectors.DefaultSelector()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="clients", daemon=True)

    def open(self, finite: int, endless: int) -> None:
        """The starting population: lifetimes are memoryless, so this is already the steady state."""
        now = time.monotonic()
        with self.lock:
            for _ in range(finite):
                self._start(Session(now + self.rng.expovariate(1 / self.mean), endless=False))
            for _ in range(endless):
                self._start(Session(math.inf, endless=True))

    def _start(self, session: Session) -> None:
        self.sessions.append(session)
        self._connect(session)

    def _connect(self, session: Session) -> None:
        try:
            sock = socket.create_connection(self.address, timeout=2)
        except OSError:
            self.failed_connects += 1
            session.retry_at = time.monotonic() + 0.2
            return
        sock.setblocking(False)
        session.sock, session.retry_at = sock, 0.0
        self.selector.register(sock, selectors.EVENT_READ, session)

    def _end(self, session: Session) -> None:
        if session.sock is not None:
            self.selector.unregister(session.sock)
            session.sock.close()
            session.sock = None

    def _run(self) -> None:
        next_arrival = time.monotonic()
        while not self.stop.is_set():
            now = time.monotonic()
            with self.lock:
                if self.rate > 0 and now >= next_arrival:
                    self._start(Session(now + self.rng.expovariate(1 / self.mean), endless=False))
                    next_arrival = now + self.rng.expovariate(self.rate)
                elif self.rate <= 0:
                    next_arrival = now + 0.1
                for session in self.sessions:
                    if session.done:
                        continue
                    if now >= session.until:
                        self._end(session)
                        session.done = True
                    elif session.sock is None and now >= session.retry_at:
                        self._connect(session)
            for key, _ in self.selector.select(timeout=0.05):
                session = key.data
                try:
                    data = session.sock.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    with self.lock:
                        session.cuts.append(time.monotonic())
                        self._end(session)
                        session.retry_at = time.monotonic() + 0.1

    def start(self) -> None:
        self.thread.start()

    def open_count(self) -> int:
        with self.lock:
            return sum(s.sock is not None for s in self.sessions)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        for session in self.sessions:
            self._end(session)
        self.selector.close()


def sample_deployment(variant: str, prometheus: str, drain: int) -> dict[str, Any]:
    body = yaml.safe_load((REPO / "manifests" / "samples" / "deployment.yaml").read_text())
    annotations = body["metadata"]["annotations"]
    annotations.update(
        {
            "tcp-exporter/threshold": str(THRESHOLD),
            "tcp-exporter/prometheus": prometheus,
            "tcp-exporter/min-replicas": str(PODS),  # held at 6 until the load drops
            "tcp-exporter/max-replicas": str(PODS),
            "tcp-exporter/scale-down-stabilization": str(STABILIZATION),
        }
    )
    if variant in ("least", "drain"):
        annotations["tcp-exporter/scale-in-by-connections"] = "true"
    if variant == "drain":
        annotations["tcp-exporter/drain"] = f"{drain}s"
    body["spec"]["replicas"] = PODS
    # The same grace in every variant: long enough for the drain (the operator refuses a drain it cannot hold).
    body["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = drain + 15
    return body


def run_variant(
    variant: str, kubectl: Any, apps: Any, core: Any, prometheus: str, namespace: str, args: argparse.Namespace
) -> dict[str, Any]:
    from harness.nodedemo import _state, endpoints, ready_pods

    rng = random.Random(f"{variant}-{namespace}-{args.seed}")
    core.create_namespaced_service(
        namespace, yaml.safe_load((REPO / "manifests" / "samples" / "service.yaml").read_text())
    )
    apps.create_namespaced_deployment(namespace, sample_deployment(variant, prometheus, args.drain))

    def six() -> list[Any] | None:
        pods = ready_pods(kubectl, namespace)
        hooked = [p for p in pods if (p["spec"]["containers"][0].get("lifecycle") or {}).get("preStop")]
        want = hooked if variant == "drain" else pods
        return pods if len(pods) == PODS and len(want) == PODS else None

    try:
        wait_for(six, 240, "6 injected pods Ready", 1)
        wait_for(lambda: len(endpoints(kubectl, namespace)) == PODS, 60, "the Service's 6 endpoints", 1)
        wait_for(lambda: kubectl("-n", namespace, "get", "hpa", "-o", "name").strip(), 60, "KEDA's HPA", 1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{_state(kubectl, namespace)}") from None
    service = core.read_namespaced_service(NAME, namespace)
    clients = Clients((service.spec.cluster_ip, 8080), args.mean, rng)
    clients.open(HIGH, args.endless)
    clients.rate = HIGH / args.mean
    clients.start()
    replicas: list[tuple[float, int]] = []

    def spec_replicas() -> int:
        return int(apps.read_namespaced_deployment(NAME, namespace).spec.replicas)

    try:
        log(f"{variant}: {clients.open_count()} connections open to 6 pods; the load holds for {args.warm:.0f} s")
        time.sleep(args.warm)  # the experiment's timeline: the high load runs this long
        dropped = time.monotonic()
        clients.rate = LOW / args.mean
        kubectl("-n", namespace, "annotate", "deployment", NAME, "--overwrite", f"tcp-exporter/min-replicas={KEEP}")
        log(f"{variant}: arrivals dropped, minimum {KEEP}: waiting for KEDA's HPA to scale in")
        deadline = dropped + 300
        decided = None
        while decided is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"no scale-in within 300 s\n{_state(kubectl, namespace)}")
            now, n = time.monotonic(), spec_replicas()
            replicas.append((now - dropped, n))
            if n < PODS:
                decided = now
            else:
                time.sleep(1)
        log(f"{variant}: the HPA asked for {replicas[-1][1]} replicas {decided - dropped:.0f} s after the drop")

        def gone() -> bool:
            pods = core.list_namespaced_pod(namespace).items
            replicas.append((time.monotonic() - dropped, spec_replicas()))
            return len(pods) == KEEP and all(not p.metadata.deletion_timestamp for p in pods)

        wait_for(gone, args.drain + 90, "the removed pods to be gone", 1)
        finished = time.monotonic()
        # Watched a while longer: replicas must not climb back once the draining pods are gone either.
        ends = finished + args.after
        while time.monotonic() < ends:
            replicas.append((time.monotonic() - dropped, spec_replicas()))
            time.sleep(1)
    finally:
        clients.close()
    cut_in_time = cut_later = cut_endless = 0
    for session in clients.sessions:
        for _ in session.cuts:
            if session.endless:
                cut_endless += 1
            elif session.until <= decided + args.drain:
                cut_in_time += 1  # it would have ended within the drain
            else:
                cut_later += 1
    after = [n for t, n in replicas if t >= decided - dropped]
    # Replicas climbing back: any rise after the HPA's first step down (a 6 -> 4 -> 3 in two steps is no rise).
    rises = sum(1 for before, now in itertools.pairwise(after) if now > before)
    return {
        "variant": variant,
        "sessions": len(clients.sessions),
        "cut": cut_in_time + cut_later + cut_endless,
        "cut_would_have_ended_within_drain": cut_in_time,
        "cut_meant_to_last_longer": cut_later,
        "cut_endless": cut_endless,
        "scale_in_decided_after_drop_s": decided - dropped,
        "scale_in_seconds": finished - decided,
        "replicas_after_decision_max": max(after),
        "replicas_after_decision_min": min(after),
        "replicas_rises": rises,
        "failed_connects": clients.failed_connects,
        "replicas": replicas,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from kubernetes import client, config
    from tcp_exporter import __version__

    from harness.kedastack import Keda
    from harness.localkube import cluster as lk
    from harness.nodestack import NODE_IP, Node
    from harness.operator_proc import Operator, install
    from harness.promstack import Prometheus, documented_jobs

    runs = [(r, v) for r in range(args.rounds) for v in args.variants]
    namespaces = {run: f"drain-{run[1]}-{run[0]}" for run in runs}
    cluster = lk.temporary(address=NODE_IP)
    kubectl = lk.kubectl_runner(cluster)
    node = keda = prometheus = operator = None
    results = []
    try:
        node = Node(cluster, kubectl)
        # The operator runs on this host, where it reaches the host's Prometheus for the pods' connections: the
        # manifests with the scale-in component install its rights and admission policy; its pod is not run.
        install(kubectl, components=("scale-in",))
        kubectl("-n", "tcp-exporter", "scale", "deployment", "tcp-exporter-operator", "--replicas=0")
        wait_for(lambda: not kubectl("-n", "tcp-exporter", "get", "pods", "-o", "name").strip(), 60, "no operator pod")
        jobs = documented_jobs(("tcp-exporter",), cluster.kubeconfig, "unused")
        for sd in jobs[0]["kubernetes_sd_configs"]:
            sd["namespaces"] = {"names": list(namespaces.values())}
        prometheus = Prometheus(jobs, scrape_interval=args.scrape)
        keda = Keda(cluster, kubectl)
        env = {
            "TCP_EXPORTER_OPERATOR_SIDECAR_IMAGE": f"ghcr.io/tcp-exporter/tcp-exporter:{__version__}",
            "TCP_EXPORTER_OPERATOR_METHOD": "sockdiag",
            "TCP_EXPORTER_OPERATOR_PROMETHEUS": prometheus.url,
            "TCP_EXPORTER_OPERATOR_ALLOWED_PROMETHEUS": prometheus.url,
        }
        operator = Operator(cluster, kubectl, env=env)
        api = config.new_client_from_config(config_file=cluster.kubeconfig)
        apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
        for (round_, variant), namespace in namespaces.items():
            kubectl("create", "namespace", namespace)
            result = run_variant(variant, kubectl, apps, core, prometheus.url, namespace, args)
            result["round"] = round_
            log(
                f"{variant}: {result['cut']} cut ({result['cut_would_have_ended_within_drain']} would have ended "
                f"within the drain), scale-in {result['scale_in_seconds']:.0f} s, replicas after: "
                f"{result['replicas_after_decision_min']}-{result['replicas_after_decision_max']}"
            )
            results.append(result)
            kubectl("delete", "namespace", namespace, "--wait=false", check=False)
    finally:
        for part in (operator, keda, prometheus):
            if part is not None:
                with contextlib.suppress(Exception):
                    (part.close if part is operator else part.stop)()
        if node is not None:
            node.stop()
        cluster.stop()
    return {
        "drain_seconds": args.drain,
        "mean_lifetime_seconds": args.mean,
        "endless": args.endless,
        "threshold": THRESHOLD,
        "high_finite": HIGH,
        "low_finite": LOW,
        "stabilization_seconds": STABILIZATION,
        "scrape_interval": args.scrape,
        "rounds": args.rounds,
        "runs": results,
        "variants": summary(results),
    }


def summary(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant, the mean per scale-in over its rounds (replicas afterwards: the range over all)."""
    out = []
    for variant in VARIANTS:
        runs = [r for r in results if r["variant"] == variant]
        if not runs:
            continue
        mean = {
            key: sum(r[key] for r in runs) / len(runs)
            for key in (
                "cut",
                "cut_would_have_ended_within_drain",
                "cut_meant_to_last_longer",
                "cut_endless",
                "scale_in_seconds",
                "sessions",
                "replicas_rises",
            )
        }
        low = min(r["replicas_after_decision_min"] for r in runs)
        high = max(r["replicas_after_decision_max"] for r in runs)
        out.append({"variant": variant, "scale_ins": len(runs), **mean, "replicas_min": low, "replicas_max": high})
    return out


TITLES = {
    "default": "(a) default: the ReplicaSet's choice, SIGTERM at once",
    "least": "(b) least-connected (`scale-in-by-connections`)",
    "drain": "(c) least-connected + `drain`",
}


def table(r: dict[str, Any]) -> str:
    lines = [
        f"| scale-in 6 -> 3 | connections cut | of them, would have ended within {r['drain_seconds']} s "
        "| meant to last longer | endless | scale-in took (s) | replicas afterwards | replicas rose again |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for v in r["variants"]:
        low, high = v["replicas_min"], v["replicas_max"]
        lines.append(
            f"| {TITLES[v['variant']]} | {v['cut']:.1f} | {v['cut_would_have_ended_within_drain']:.1f} "
            f"| {v['cut_meant_to_last_longer']:.1f} | {v['cut_endless']:.1f} | {v['scale_in_seconds']:.0f} "
            f"| {low if low == high else f'{high} -> {low}'} | {v['replicas_rises']:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="scale-ins of each variant")
    parser.add_argument("--drain", type=int, default=90, help="seconds of tcp-exporter/drain in variant (c)")
    parser.add_argument("--mean", type=float, default=20.0, help="mean connection lifetime, seconds")
    parser.add_argument("--endless", type=int, default=6, help="connections that never end")
    parser.add_argument("--warm", type=float, default=30.0, help="seconds of high load before it drops")
    parser.add_argument("--after", type=float, default=30.0, help="seconds watched after the removed pods are gone")
    parser.add_argument("--scrape", default="5s", help="Prometheus' scrape interval")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--variants", default=",".join(VARIANTS), type=lambda s: s.split(","))
    parser.add_argument("--json", default=str(RESULTS / "drain.json"))
    args = parser.parse_args()
    if unknown := set(args.variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    if os.geteuid() != 0:
        print("bench.drain: a kubelet and containerd need root", file=sys.stderr)
        return 2
    for tool in ("ip", "nft", "iptables", "buildah", "mmdebstrap"):
        if shutil.which(tool) is None:
            print(f"bench.drain: {tool} is needed (make tools)", file=sys.stderr)
            return 2
    r = run(args)
    print(
        f"\n## Scale-in without cutting connections: 6 -> 3 real pods by KEDA's HPA, lifetimes Exp(mean "
        f"{args.mean:.0f} s) + {args.endless} endless, drain {args.drain} s; per scale-in, mean of {args.rounds}\n"
    )
    print(table(r))
    write_results(args.json, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
