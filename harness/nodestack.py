"""A real node for the local control plane: containerd 2 with runc, CNI (bridge, host-local, loopback, portmap),
the kubelet, kube-proxy (nftables mode) and the scheduler, all built from Go modules (harness/nodebuild).

Pods get addresses from POD_CIDR on a bridge of the host, so the host (Prometheus, the tests) reaches them; the
node's address is NODE_IP on the host's loopback device. Everything the node adds to the host is taken away by
`stop()`: processes (the pods' included, found through their cgroups), mounts under the state folder, the
network namespaces containerd made, the bridge, kube-proxy's nftables tables and the kubelet's iptables chains,
the cgroups, the address, the state folder.

What this host needs, measured (FIELD-NOTES): cgroup v1 is accepted only with `failCgroupV1: false`; no process
may lower its oom_score_adj here, so containerd runs with `restrict_oom_score_adj`; runc needs seccomp support.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import images, nodebuild
from harness.helpers import die_with_parent, terminate, wait_for

NODE_NAME = "tcpx-node"
POD_CIDR = "198.19.240.0/24"
NODE_IP = "198.19.241.1"
BRIDGE = "tcpx0"
CGROUP_ROOT = Path("/sys/fs/cgroup")
KUBELET_CHAINS = ("KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT")


def log(msg: str) -> None:
    print(f"[node] {msg}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check)


class Node:
    """One node joined to `cluster` until stop()."""

    def __init__(
        self,
        cluster: Any,
        kubectl: Callable[..., str],
        state_dir: Path | None = None,
        detached: bool = False,
        start: bool = True,
    ) -> None:
        self.cluster = cluster
        self.kubectl = kubectl
        self.dir = state_dir or Path(tempfile.mkdtemp(prefix="tcpx-node-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.detached = detached
        self.pids: dict[str, int] = {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.netns_before: set[str] = set(self._netns())
        self.tables_before: set[str] = set(self._nft_tables())
        self.started = time.monotonic()
        self.socket = self.dir / "containerd.sock"
        if not start:
            return
        self.kube_bin = nodebuild.kube()
        self.runtime_bin = nodebuild.runtime()
        self.runc_bin = nodebuild.runc()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def save(self, path: Path) -> None:
        """What `make cluster-down` needs to stop a detached node."""
        saved = {"dir": str(self.dir), "pids": self.pids, "added_address": getattr(self, "added_address", True)}
        path.write_text(json.dumps({**saved, "netns": sorted(self.netns_before), "tables": sorted(self.tables_before)}))

    @classmethod
    def load(cls, path: Path, cluster: Any, kubectl: Callable[..., str]) -> Node:
        saved = json.loads(path.read_text())
        node = cls(cluster, kubectl, Path(saved["dir"]), detached=True, start=False)
        node.pids = {name: int(pid) for name, pid in saved["pids"].items()}
        node.netns_before, node.tables_before = set(saved.get("netns", [])), set(saved.get("tables", []))
        node.added_address = saved.get("added_address", True)
        return node

    # -- start -------------------------------------------------------------------------------------

    def _spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> None:
        logf = open(self.dir / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=self.detached,
            preexec_fn=None if self.detached else die_with_parent(signal.SIGKILL),
        )
        logf.close()
        self.procs[name] = proc
        self.pids[name] = proc.pid

    def logs(self, name: str, lines: int = 40) -> str:
        path = self.dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            assert proc.poll() is None, f"{name} exited {proc.returncode}:\n{self.logs(name)}"

    def _start(self) -> None:
        self._sweep_leftovers()
        # The node's address: the control plane's own where it listens there (pods reach the API server), else
        # added here.
        self.added_address = NODE_IP not in _run("ip", "-4", "addr", "show", "dev", "lo").stdout
        if self.added_address:
            _run("ip", "addr", "add", f"{NODE_IP}/32", "dev", "lo", check=True)
        self._containerd()
        archives = images.agnhost_images(self.kube_bin / "agnhost") + images.product_images()
        for archive in archives:
            self.ctr("images", "import", "--no-unpack=false", str(archive))
        kubeconfig = self.cluster.kubeconfig  # the admin's: RBAC is the only authorizer here (no Node authorizer)
        self._kubelet(kubeconfig)
        self._kube_proxy(kubeconfig)
        self._spawn(
            "kube-scheduler",
            [str(self.kube_bin / "nodekube"), "kube-scheduler", f"--kubeconfig={kubeconfig}",
             "--leader-elect=false", f"--secure-port={_free_port()}", "--bind-address=127.0.0.1", "--v=1"],
        )  # fmt: skip
        wait_for(self.ready, 120, f"node {NODE_NAME} to be Ready", 0.5)
        log(f"node {NODE_NAME} Ready in {time.monotonic() - self.started:.1f} s (state in {self.dir})")

    def _containerd(self) -> None:
        cni = self.dir / "cni"
        (cni / "net.d").mkdir(parents=True, exist_ok=True)
        (cni / "net.d" / "10-tcpx.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": "tcpx",
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": BRIDGE,
                            "isGateway": True,
                            "ipMasq": False,
                            "hairpinMode": True,
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": POD_CIDR}]],
                                "routes": [{"dst": "0.0.0.0/0"}],
                                "dataDir": str(cni / "ipam"),
                            },
                        },
                        {"type": "portmap", "capabilities": {"portMappings": True}},
                    ],
                }
            )
        )
        config = f"""version = 3
root = "{self.dir / "containerd" / "root"}"
state = "{self.dir / "containerd" / "state"}"

[grpc]
  address = "{self.socket}"

[ttrpc]
  address = "{self.socket}.ttrpc"

[plugins.'io.containerd.cri.v1.runtime']
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "{self.runc_bin / "runc"}"
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["{self.runtime_bin}"]
    conf_dir = "{cni / "net.d"}"

[plugins.'io.containerd.cri.v1.images']
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{images.PAUSE_IMAGE}"

[plugins.'io.containerd.grpc.v1.cri']
  [plugins.'io.containerd.grpc.v1.cri'.x509_key_pair_streaming]
"""
        (self.dir / "containerd.toml").write_text(config)
        path = f"{self.runtime_bin}:{self.runc_bin}:{os.environ['PATH']}"
        self._spawn(
            "containerd",
            [str(self.runtime_bin / "containerd"), "--config", str(self.dir / "containerd.toml")],
            env={"PATH": path},
        )

        def serving() -> bool:
            self._check_alive()
            return self.ctr("version", check=False).returncode == 0

        wait_for(serving, 30, "containerd to serve", 0.2)

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.runtime_bin / "ctr"), "--address", str(self.socket), "--namespace", "k8s.io", *args],
            capture_output=True,
            text=True,
            check=check,
        )

    def _kubelet(self, kubeconfig: str) -> None:
        root = self.dir / "kubelet"
        root.mkdir(exist_ok=True)
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "failCgroupV1": False,  # this host's cgroups are v1 (KEP-5573)
            "cgroupDriver": "cgroupfs",
            "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            # On the node's address (the API server reaches it there for logs and exec), on the host's loopback
            # device; anonymous and unauthorized, as a test node whose address nothing else routes to.
            "address": NODE_IP,
            "port": _free_port(),
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": _free_port(),
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "clusterDomain": "cluster.local",
            "resolvConf": "",
            "podCIDR": POD_CIDR,
            "registerNode": True,
            "serializeImagePulls": False,
            # A test machine's disk may be fuller than a node's defaults allow: no eviction or image GC by disk.
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "0%", "imagefs.available": "0%"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "protectKernelDefaults": False,
            "makeIPTablesUtilChains": True,
            "localStorageCapacityIsolation": True,
            "maxPods": 60,
        }
        (self.dir / "kubelet.yaml").write_text(json.dumps(config))
        self._spawn(
            "kubelet",
            [str(self.kube_bin / "nodekube"), "kubelet", f"--config={self.dir / 'kubelet.yaml'}",
             f"--kubeconfig={kubeconfig}", f"--root-dir={root}", f"--hostname-override={NODE_NAME}",
             f"--node-ip={NODE_IP}", "--v=1"],
            env={"PATH": f"{self.runtime_bin}:{os.environ['PATH']}"},
        )  # fmt: skip

    def _kube_proxy(self, kubeconfig: str) -> None:
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "mode": "nftables",
            "clientConnection": {"kubeconfig": kubeconfig},
            "hostnameOverride": NODE_NAME,
            "clusterCIDR": POD_CIDR,
            "bindAddress": "127.0.0.1",
            "healthzBindAddress": f"127.0.0.1:{_free_port()}",
            "metricsBindAddress": f"127.0.0.1:{_free_port()}",
            "conntrack": {"maxPerCore": 0, "min": 0},  # leave the host's conntrack limits as they are
            "nodePortAddresses": [f"{NODE_IP}/32"],
        }
        (self.dir / "kube-proxy.yaml").write_text(json.dumps(config))
        self._spawn(
            "kube-proxy",
            [str(self.kube_bin / "nodekube"), "kube-proxy", f"--config={self.dir / 'kube-proxy.yaml'}", "--v=1"],
        )

    def ready(self) -> bool:
        self._check_alive()
        out = self.kubectl("get", "node", NODE_NAME, "-o", "json", check=False)
        if not out.strip().startswith("{"):
            return False
        conditions = json.loads(out).get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def _sweep_leftovers(self) -> None:
        """What a killed run's node left on this host: its pods, shims, bridge, kube-proxy tables and cgroups.

        Safe to take: the control plane holds the node's address (harness/hostaddr.py), so no other node of ours
        is running here."""
        if not (Path(f"/sys/class/net/{BRIDGE}").exists() or self._cgroups() or self._proxy_tables()):
            return
        log("a node from a run that did not finish was left on this host; removing it")
        self._kill_pods()
        _run("pkill", "-KILL", "-f", r"containerd-shim-runc-v2 .*(tcpx-node-[^/ ]*|\.local/node)/containerd\.sock")
        _run("ip", "link", "delete", BRIDGE)
        for table in self._proxy_tables():
            _run("nft", "delete", "table", *table.split(" "))
        self._remove_cgroups()

    def _proxy_tables(self) -> list[str]:
        return [t for t in self._nft_tables() if t.endswith(" kube-proxy")]

    # -- stop --------------------------------------------------------------------------------------

    @staticmethod
    def _nft_tables() -> list[str]:
        return [line.removeprefix("table ") for line in _run("nft", "list", "tables").stdout.splitlines() if line]

    @staticmethod
    def _netns() -> list[str]:
        with contextlib.suppress(FileNotFoundError):
            return [p.name for p in Path("/var/run/netns").iterdir()]
        return []

    def _cgroups(self) -> list[Path]:
        """The cgroups the kubelet and runc made (kubepods, in every hierarchy), deepest first."""
        found = []
        for hierarchy in CGROUP_ROOT.iterdir():
            top = hierarchy / "kubepods"
            with contextlib.suppress(OSError):  # a cgroup may go while it is walked
                if top.is_dir():
                    found += [p for p in top.rglob("*") if p.is_dir()] + [top]
        return sorted(found, key=lambda p: len(p.parts), reverse=True)

    def stop(self) -> None:
        """Undo everything; each step runs whatever an earlier one met, and what failed is said."""
        for step in (self._stop_processes, self._remove_mounts_and_namespaces, self._remove_network_rules,
                     self._remove_cgroups_and_state):  # fmt: skip
            try:
                step()
            except Exception as exc:  # the rest still runs
                log(f"cleaning up the node: {step.__name__}: {exc!r}")

    def _stop_processes(self) -> None:
        with contextlib.suppress(Exception):
            self.kubectl("delete", "node", NODE_NAME, "--ignore-not-found", "--wait=false", check=False)
        for name in ("kube-scheduler", "kube-proxy", "kubelet"):
            if name in self.pids:
                terminate(self.pids[name])
        # The pods' processes, by their cgroups (the shims outlive containerd, and the pods the shims).
        for _ in range(3):
            self._kill_pods()
            _run("pkill", "-KILL", "-f", f"containerd-shim-runc-v2 .*{self.socket}")
            time.sleep(0.2)
        if "containerd" in self.pids:
            terminate(self.pids["containerd"])
        _run("pkill", "-KILL", "-f", f"containerd-shim-runc-v2 .*{self.dir}")

    def _kill_pods(self) -> None:
        for group in self._cgroups():
            with contextlib.suppress(OSError, ValueError):
                for pid in (group / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)

    def _remove_mounts_and_namespaces(self) -> None:
        # Mounts under the state folder (the kubelet's root dir, containerd's snapshots and shm), deepest first.
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        for point in sorted({m for m in mounts if m.startswith(str(self.dir))}, key=len, reverse=True):
            _run("umount", "-l", point)
        for name in set(self._netns()) - self.netns_before:
            if name.startswith("cni-"):
                _run("ip", "netns", "delete", name)

    def _remove_network_rules(self) -> None:
        _run("ip", "link", "delete", BRIDGE)
        for family in ("ip", "ip6"):
            _run("nft", "delete", "table", family, "kube-proxy")
        for table, chains in (("filter", KUBELET_CHAINS), ("mangle", ("KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT")),
                              ("nat", ("KUBE-KUBELET-CANARY",))):  # fmt: skip
            for tool in ("iptables", "ip6tables"):
                for chain in chains:
                    for parent in ("INPUT", "OUTPUT", "FORWARD"):
                        while _run(tool, "-t", table, "-D", parent, "-j", chain).returncode == 0:
                            pass
                    _run(tool, "-t", table, "-F", chain)
                    _run(tool, "-t", table, "-X", chain)
        # The iptables-nft tables the kubelet's chains brought into being, if nothing else uses them now.
        for table in set(self._nft_tables()) - self.tables_before:
            family, _, name = table.partition(" ")
            tool = {"ip": "iptables", "ip6": "ip6tables"}.get(family)
            if tool and all(line.startswith("-P ") for line in _run(tool, "-t", name, "-S").stdout.splitlines()):
                _run("nft", "delete", "table", family, name)
        if getattr(self, "added_address", True):
            _run("ip", "addr", "del", f"{NODE_IP}/32", "dev", "lo")

    def _remove_cgroups_and_state(self) -> None:
        self._remove_cgroups()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _remove_cgroups(self) -> None:
        for _ in range(3):  # a cgroup empties a moment after its last process is killed
            for group in self._cgroups():
                with contextlib.suppress(OSError):
                    group.rmdir()
            if not self._cgroups():
                break
            time.sleep(0.5)
