"""The node tier's binaries, built from Go modules like the control plane and cached the same way: kubelet,
kube-proxy and kube-scheduler (one multi-call binary, `kube/`, with agnhost), containerd 2 with its runc shim
and ctr and the CNI plugins (`runtime/`), and runc with seccomp support (`runc/`, through cgo and libseccomp)."""

from __future__ import annotations

from pathlib import Path

from harness import gobuild

HERE = Path(__file__).resolve().parent
KUBE_VERSION = "v1.37.2"
CONTAINERD_VERSION = "v2.4.2"
RUNC_VERSION = "v1.4.3"
CNI_PLUGINS_VERSION = "v1.10.0"
CNI_PLUGINS = {
    "bridge": "main/bridge",
    "host-local": "ipam/host-local",
    "loopback": "main/loopback",
    "portmap": "meta/portmap",
}


def kube() -> Path:
    """The folder holding nodekube (kubelet, kube-proxy, kube-scheduler) and agnhost (Kubernetes' test server,
    the sample's app and the node's pause)."""
    from harness.localkube.cluster import version_ldflags  # stamped as the control plane is: the node's version

    outputs = {"nodekube": ".", "agnhost": "k8s.io/kubernetes/test/images/agnhost"}
    return gobuild.build("nodekube", KUBE_VERSION, HERE / "kube", outputs, ldflags=version_ldflags())


def runtime() -> Path:
    """The folder holding containerd, containerd-shim-runc-v2, ctr and the CNI plugins."""
    containerd = "github.com/containerd/containerd/v2/cmd/"
    outputs = {name: containerd + name for name in ("containerd", "containerd-shim-runc-v2", "ctr")}
    outputs.update(
        {name: f"github.com/containernetworking/plugins/plugins/{path}" for name, path in CNI_PLUGINS.items()}
    )
    return gobuild.build("noderuntime", CONTAINERD_VERSION, HERE / "runtime", outputs)


def runc() -> Path:
    """The folder holding runc, with seccomp (without it every pod fails: "seccomp not supported")."""
    return gobuild.build(
        "runc", RUNC_VERSION, HERE / "runc", {"runc": "github.com/opencontainers/runc"}, tags="seccomp", cgo=True
    )


def all_binaries() -> dict[str, Path]:
    return {"kube": kube(), "runtime": runtime(), "runc": runc()}


if __name__ == "__main__":
    for part, folder in all_binaries().items():
        print(part, folder)
