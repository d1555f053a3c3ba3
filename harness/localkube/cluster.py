"""Build and run a real local Kubernetes control plane on loopback.

etcd, kube-apiserver and kube-controller-manager come from one binary built
from the published Go modules (see main.go beside this file). The binary is
cached outside the repository, keyed by the Kubernetes version and a hash of
the Go sources, so it is built once per version.

Two ways to run it:
- detached (`make cluster-up`): processes in their own session, state and
  kubeconfig under `.local/`, stopped by `make cluster-down`;
- attached (the pytest fixture): every process dies with its parent
  (PR_SET_PDEATHSIG), so an interrupted test run leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from harness import gobuild, hostaddr
from harness.helpers import die_with_parent, pid_alive, terminate
from harness.pki import make_ca, make_cert

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
LOCAL = REPO / ".local"
KUBE_VERSION = "v1.37.2"
ADMIN_USER = "localkube-admin"
FRONT_PROXY_CLIENT = "front-proxy-client"
# The HPA controller's period; the real default, so that measured reaction times are what users get.
HPA_SYNC_PERIOD = "15s"
# The service range is only allocated from, never routed: the test range keeps
# even a stray connection attempt on addresses this project may use.
SERVICE_CIDR = "198.19.255.0/24"
CRDS = HERE.parent / "crds"

AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: None
    verbs: ["get", "list", "watch"]
  - level: Metadata
"""


def log(msg: str) -> None:
    print(f"[localkube] {msg}", file=sys.stderr, flush=True)


def version_ldflags() -> str:
    """Stamp the version, as Kubernetes' own build does, so clients and servers report it."""
    major, minor, _ = KUBE_VERSION.lstrip("v").split(".", 2)
    flags = ["-s", "-w"]
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={KUBE_VERSION}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
            f"-X {pkg}.buildDate=1970-01-01T00:00:00Z",
        ]
    return " ".join(flags)


def build() -> Path:
    """The control-plane binary, built from Go modules unless the cache already holds it."""
    return gobuild.build("localkube", KUBE_VERSION, HERE, {"localkube": "."}, ldflags=version_ldflags()) / "localkube"


def kubectl() -> str:
    """kubectl of the same version as the control plane: the multi-call binary under that name."""
    link = build().parent / "kubectl"
    if not link.exists():
        link.symlink_to("localkube")
    return str(link)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    """A running control plane: where it is and how to reach it."""

    state_dir: str
    kubeconfig: str
    server: str
    audit_log: str
    log_dir: str
    pids: dict[str, int]
    etcd_url: str
    binary: str
    detached: bool
    info_file: str = ""  # where a detached cluster records itself, for make cluster-down
    address: str = "127.0.0.1"  # where the API server listens; another one is added to lo, and removed on stop

    def save(self, path: Path) -> None:
        self.info_file = str(path)
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> Cluster:
        return cls(**json.loads(path.read_text()))

    def logs_tail(self, lines: int = 40) -> str:
        out = []
        for f in sorted(Path(self.log_dir).glob("*.log")):
            text = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"==> {f} <==\n" + "\n".join(text))
        return "\n".join(out)

    def ready(self) -> bool:
        return _get(self, "/readyz") == "ok"

    def alive(self) -> bool:
        return all(pid_alive(pid) for pid in self.pids.values())

    def stop(self, remove_state: bool = True) -> None:
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            pid = self.pids.get(name)
            if pid is not None:
                terminate(pid)
        if self.address != "127.0.0.1":
            claim = _CLAIMS.pop(self.state_dir, None)
            if claim is not None:
                claim.release()
            else:  # a detached cluster's, from make cluster-down
                subprocess.run(["ip", "addr", "del", f"{self.address}/32", "dev", "lo"], capture_output=True)
        if remove_state:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def restart_apiserver(self) -> None:
        """Kill and start the apiserver again on the same port and state (for resilience tests)."""
        terminate(self.pids["kube-apiserver"])
        self.pids["kube-apiserver"] = _spawn(
            self, "kube-apiserver", json.loads(Path(self.state_dir, "apiserver.args").read_text())
        )
        if self.info_file:  # make cluster-down must find the new process
            self.save(Path(self.info_file))
        _wait(self.ready, 60, "kube-apiserver to be ready again", self)


def _get(cluster: Cluster, path: str) -> str | None:
    token = Path(cluster.state_dir, "admin.token").read_text().strip()
    ctx = ssl.create_default_context(cafile=str(Path(cluster.state_dir, "pki", "ca.crt")))
    req = urllib.request.Request(cluster.server + path, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=2) as resp:
            return str(resp.read().decode())
    except (OSError, ValueError):
        return None


def _wait(check, timeout: float, what: str, cluster: Cluster) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if not cluster.alive():
            raise RuntimeError(f"a control-plane process exited while waiting for {what}\n{cluster.logs_tail()}")
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}\n{cluster.logs_tail()}")


def _spawn(cluster: Cluster, name: str, args: list[str]) -> int:
    logf = open(Path(cluster.log_dir, f"{name}.log"), "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [cluster.binary, name, *args],
        stdin=subprocess.DEVNULL,
        stdout=logf,
        stderr=subprocess.STDOUT,
        start_new_session=cluster.detached,
        preexec_fn=None if cluster.detached else die_with_parent(signal.SIGKILL),
    )
    logf.close()
    return proc.pid


def _make_pki(pki: Path, address: str) -> None:
    pki.mkdir(parents=True)
    make_ca(pki, "ca", "localkube-ca")
    # Pods reach the API server as kubernetes.default.svc, at the Service's first address.
    names = ["IP:127.0.0.1", "DNS:localhost", f"IP:{address}", f"IP:{SERVICE_CIDR.rsplit('.', 1)[0]}.1",
             "DNS:kubernetes", "DNS:kubernetes.default", "DNS:kubernetes.default.svc",
             "DNS:kubernetes.default.svc.cluster.local"]  # fmt: skip
    make_cert(pki, "apiserver", "ca", "kube-apiserver", f"subjectAltName={','.join(dict.fromkeys(names))}\n")
    subprocess.run(["openssl", "genrsa", "-out", "sa.key", "2048"], cwd=pki, check=True, capture_output=True)
    subprocess.run(["openssl", "rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"], cwd=pki, check=True,
                   capture_output=True)  # fmt: skip
    # The aggregation layer: the apiserver proxies to extension API servers (KEDA's metrics adapter) as
    # front-proxy-client, a certificate of its own CA that the extension servers trust for request headers.
    make_ca(pki, "front-proxy-ca", "localkube-front-proxy-ca")
    make_cert(pki, "front-proxy-client", "front-proxy-ca", FRONT_PROXY_CLIENT)


def kubeconfig_text(server: str, ca_file: Path, token: str, user: str) -> str:
    import base64

    ca = base64.b64encode(ca_file.read_bytes()).decode()
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "localkube", "cluster": {"server": server, "certificate-authority-data": ca}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "localkube", "context": {"cluster": "localkube", "user": user}}],
            "current-context": "localkube",
        },
        indent=2,
    )


_CLAIMS: dict[str, hostaddr.Claim] = {}  # state_dir -> the address this process's cluster holds


def start(state_dir: Path, kubeconfig: Path, detached: bool, address: str = "127.0.0.1") -> Cluster:
    """`address` other than loopback (the node tier's): the API server listens there, on the host's loopback
    device, and publishes it as the `kubernetes` Service's endpoint, so that pods on a node reach it."""
    binary = build()
    started = time.monotonic()
    state_dir.mkdir(parents=True, exist_ok=True)
    if address != "127.0.0.1":
        _CLAIMS[str(state_dir)] = hostaddr.Claim(address)  # one run at a time on this host (harness/hostaddr.py)
    pki = state_dir / "pki"
    _make_pki(pki, address)
    log_dir = state_dir / "logs"
    log_dir.mkdir()
    admin_token = os.urandom(16).hex()
    kcm_token = os.urandom(16).hex()
    (state_dir / "admin.token").write_text(admin_token)
    # Static tokens: the admin and the controller-manager act with full rights,
    # under their own names so that the audit log tells their writes apart.
    (state_dir / "tokens.csv").write_text(
        f'{admin_token},{ADMIN_USER},uid-admin,"system:masters"\n'
        f'{kcm_token},system:kube-controller-manager,uid-kcm,"system:masters"\n'
    )
    (state_dir / "audit-policy.yaml").write_text(AUDIT_POLICY)
    etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
    etcd_url = f"http://127.0.0.1:{etcd_port}"
    server = f"https://{address}:{api_port}"
    cluster = Cluster(
        state_dir=str(state_dir),
        kubeconfig=str(kubeconfig),
        server=server,
        audit_log=str(state_dir / "audit.log"),
        log_dir=str(log_dir),
        pids={},
        etcd_url=etcd_url,
        binary=str(binary),
        detached=detached,
        address=address,
    )
    peer = f"http://127.0.0.1:{peer_port}"
    cluster.pids["etcd"] = _spawn(
        cluster,
        "etcd",
        [
            f"--data-dir={state_dir / 'etcd'}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
            "--unsafe-no-fsync",
            "--log-level=warn",
        ],
    )
    apiserver_args = [
        f"--etcd-servers={etcd_url}",
        f"--bind-address={address}",
        f"--secure-port={api_port}",
        f"--advertise-address={address}",
        f"--tls-cert-file={pki / 'apiserver.crt'}",
        f"--tls-private-key-file={pki / 'apiserver.key'}",
        f"--client-ca-file={pki / 'ca.crt'}",
        f"--token-auth-file={state_dir / 'tokens.csv'}",
        "--authorization-mode=RBAC",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={pki / 'sa.pub'}",
        f"--service-account-signing-key-file={pki / 'sa.key'}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--allow-privileged=true",
        # The kubernetes Service's endpoints may not point at loopback: published only where pods need them.
        f"--endpoint-reconciler-type={'none' if address == '127.0.0.1' else 'lease'}",
        f"--audit-policy-file={state_dir / 'audit-policy.yaml'}",
        f"--audit-log-path={cluster.audit_log}",
        "--audit-log-format=json",
        "--audit-log-mode=blocking",
        f"--cert-dir={pki}",
        # Aggregated APIs (external.metrics.k8s.io from KEDA) reached through their EndpointSlices: no
        # kube-proxy runs here to route a Service's cluster IP.
        f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
        f"--requestheader-allowed-names={FRONT_PROXY_CLIENT}",
        "--requestheader-username-headers=X-Remote-User",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
        f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
        "--enable-aggregator-routing=true",
        "--v=1",
    ]
    (state_dir / "apiserver.args").write_text(json.dumps(apiserver_args))
    try:
        cluster.pids["kube-apiserver"] = _spawn(cluster, "kube-apiserver", apiserver_args)
        _wait(cluster.ready, 90, "kube-apiserver /readyz", cluster)
        kcm_kubeconfig = state_dir / "kcm.kubeconfig"
        kcm_kubeconfig.write_text(kubeconfig_text(server, pki / "ca.crt", kcm_token, "kcm"))
        cluster.pids["kube-controller-manager"] = _spawn(
            cluster,
            "kube-controller-manager",
            [
                f"--kubeconfig={kcm_kubeconfig}",
                "--secure-port=0",
                "--leader-elect=false",
                # The node lifecycle controller lifts a Ready node's not-ready taint, the EndpointSlice controller
                # gives kube-proxy its endpoints, and the root CA publisher the kube-root-ca.crt every pod's
                # service account volume mounts: they matter where a node runs (make cluster-up NODE=1).
                "--controllers=garbage-collector-controller,deployment-controller,replicaset-controller,"
                "statefulset-controller,"
                "serviceaccount-controller,namespace-controller,clusterrole-aggregation-controller,"
                "horizontal-pod-autoscaler-controller,node-lifecycle-controller,endpointslice-controller,"
                "root-ca-certificate-publisher-controller",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--horizontal-pod-autoscaler-sync-period={HPA_SYNC_PERIOD}",
                "--concurrent-gc-syncs=5",
                "--v=1",
            ],
        )
        kubeconfig.parent.mkdir(parents=True, exist_ok=True)
        kubeconfig.write_text(kubeconfig_text(server, pki / "ca.crt", admin_token, ADMIN_USER))
        # The serviceaccount controller creating "default" shows the controller-manager is working.
        _wait(
            lambda: _get(cluster, "/api/v1/namespaces/default/serviceaccounts/default") is not None,
            60,
            "the controller-manager to create the default ServiceAccount",
            cluster,
        )
        install_crds(cluster)
    except BaseException:
        cluster.stop(remove_state=False)
        raise
    if detached and str(state_dir) in _CLAIMS:  # the address stays, listened on, until make cluster-down
        _CLAIMS.pop(str(state_dir)).release(remove_address=False)
    log(f"control plane {KUBE_VERSION} ready at {server} in {time.monotonic() - started:.1f} s")
    return cluster


def install_crds(cluster: Cluster) -> None:
    """KEDA's own CRDs, from the KEDA module the tests build KEDA from, applied and established.

    Server-side apply: the ScaledJob CRD is larger than the last-applied annotation may be.
    """
    from harness import kedastack

    def run(*args: str) -> None:
        proc = subprocess.run([kubectl(), "--kubeconfig", cluster.kubeconfig, *args], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")

    run("apply", "--server-side", "-f", str(kedastack.crd_dir()))
    wait_established(cluster, "scaledobjects.keda.sh", 60)


def crd_established(cluster: Cluster, name: str) -> bool:
    """Whether the CRD exists and its Established condition is True.

    Polled rather than `kubectl wait --for=condition=Established`: a CRD created a moment ago has no
    status.conditions yet, and kubectl wait then fails at once instead of waiting.
    """
    body = _get(cluster, f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
    if body is None:
        return False
    conditions = json.loads(body).get("status", {}).get("conditions") or []
    return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)


def wait_established(cluster: Cluster, name: str, timeout: float) -> None:
    _wait(lambda: crd_established(cluster, name), timeout, f"the CRD {name} to be established", cluster)


def local_cluster() -> Cluster | None:
    """The detached cluster of `make cluster-up`, if it is running."""
    info = LOCAL / "cluster.json"
    if not info.exists():
        return None
    cluster = Cluster.load(info)
    if cluster.alive() and cluster.ready():
        return cluster
    return None


def up(node: bool = False) -> Cluster:
    running = local_cluster()
    if running is not None:
        log(f"already running at {running.server}; kubeconfig {running.kubeconfig}")
        return running
    down()
    LOCAL.mkdir(exist_ok=True)
    if node:
        from harness.nodestack import NODE_IP

        cluster = start(LOCAL / "cluster", LOCAL / "kubeconfig", detached=True, address=NODE_IP)
    else:
        cluster = start(LOCAL / "cluster", LOCAL / "kubeconfig", detached=True)
    cluster.save(LOCAL / "cluster.json")
    (LOCAL / "bin").mkdir(exist_ok=True)
    link = LOCAL / "bin" / "kubectl"
    link.unlink(missing_ok=True)
    link.symlink_to(kubectl())
    log(f"kubeconfig: {cluster.kubeconfig} (logs in {cluster.log_dir})")
    log(f"try: {link} --kubeconfig {cluster.kubeconfig} get --raw /readyz")
    return cluster


def up_node(cluster: Cluster) -> None:
    """`make cluster-up NODE=1`: a real node (kubelet, containerd, CNI, kube-proxy, scheduler) joins the cluster."""
    from harness.nodestack import Node

    info = LOCAL / "node.json"
    if info.exists():
        log("the node is already up")
        return
    node = Node(cluster, kubectl_runner(cluster), LOCAL / "node", detached=True)
    node.save(info)


def kubectl_runner(cluster: Cluster) -> Callable[..., str]:
    """kubectl(*args, check=True, input=None) against `cluster`: its stdout; a RuntimeError with stderr when
    it fails and `check`."""

    def run(*args: str, check: bool = True, input: str | None = None) -> str:
        proc = subprocess.run(
            [kubectl(), "--kubeconfig", cluster.kubeconfig, *args], capture_output=True, text=True, input=input
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {proc.stderr}")
        return proc.stdout

    return run


def down() -> None:
    node_info = LOCAL / "node.json"
    info = LOCAL / "cluster.json"
    if node_info.exists():
        from harness.nodestack import Node

        cluster = Cluster.load(info) if info.exists() else None
        Node.load(node_info, cluster, kubectl_runner(cluster) if cluster else lambda *a, **k: "").stop()
        node_info.unlink()
        log("node stopped and removed")
    if info.exists():
        Cluster.load(info).stop()
        info.unlink()
        log("stopped")
    shutil.rmtree(LOCAL / "cluster", ignore_errors=True)
    (LOCAL / "kubeconfig").unlink(missing_ok=True)


def temporary(address: str = "127.0.0.1") -> Cluster:
    """A private cluster whose processes die with this process."""
    state = Path(tempfile.mkdtemp(prefix="localkube-"))
    return start(state, state / "kubeconfig", detached=False, address=address)


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else ""
    if cmd == "build":
        print(build())
    elif cmd == "up":
        node = "--node" in argv[1:]
        cluster = up(node)
        if node:
            if cluster.address == "127.0.0.1":
                log("a cluster without a node is running: make cluster-down first, then make cluster-up NODE=1")
                return 1
            up_node(cluster)
    elif cmd == "down":
        down()
    elif cmd == "env":
        c = local_cluster()
        if c is None:
            print("not running", file=sys.stderr)
            return 1
        print(f"export KUBECONFIG={c.kubeconfig}")
    else:
        print("usage: python -m localkube build|up [--node]|down|env", file=sys.stderr)
        return 2
    return 0
