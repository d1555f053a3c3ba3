"""The operator's credentials refresh while it runs, on the real control plane, as its own ServiceAccount.

Tokens come from TokenRequest bound to a Secret: deleting the Secret revokes the token at once, the way a
cloud provider's short-lived tokens stop working. A token revoked before any expiry it announced is the hard
case: nothing tells the client to refresh but the 401.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import need

from harness.helpers import wait_for
from harness.localkube.cluster import kubectl as kubectl_path
from harness.operator_proc import NAMESPACE, SERVICE_ACCOUNT, USER, Audit, Kube, Operator, deployment, injected

pytestmark = pytest.mark.cluster


def bound_token(kubectl: Callable[..., str], secret: str) -> str:
    """A token of the operator's ServiceAccount that works until the Secret `secret` is deleted."""
    kubectl("-n", NAMESPACE, "create", "secret", "generic", secret)
    return kubectl(
        "-n", NAMESPACE, "create", "token", SERVICE_ACCOUNT, "--bound-object-kind=Secret",
        f"--bound-object-name={secret}", "--duration=1h",
    ).strip()  # fmt: skip


def revoke(kubectl: Callable[..., str], secret: str) -> None:
    kubectl("-n", NAMESPACE, "delete", "secret", secret, "--wait=false")


def exec_kubeconfig(cluster: Any, folder: Path, issued: Path, broken: Path | None = None) -> Path:
    """A kubeconfig whose exec plugin mints a new revocable token per call and logs "SECRET ISSUED-AT" to
    `issued`; while the file `broken` exists, it hands out a token the API server does not know."""
    issued.touch()
    binary = kubectl_path()
    credential = json.dumps(
        {"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential", "status": {"token": "TOKEN"}}
    )
    plugin = folder / "token-plugin"
    plugin.write_text(
        "#!/bin/sh\nset -e\n"
        + (f"if [ -e {broken} ]; then echo '{credential}' | sed s/TOKEN/not-a-token/; exit 0; fi\n" if broken else "")
        + f'k="{binary} --kubeconfig {cluster.kubeconfig} -n {NAMESPACE}"\n'
        "n=tok-$(date +%s%N)\n"
        "$k create secret generic $n >/dev/null\n"
        f"t=$($k create token {SERVICE_ACCOUNT} --bound-object-kind=Secret --bound-object-name=$n --duration=1h)\n"
        f'echo "$n $(date +%s)" >> {issued}\n'
        f"echo '{credential}' | sed \"s/TOKEN/$t/\"\n"  # a JWT has no '/'
    )
    plugin.chmod(plugin.stat().st_mode | stat.S_IEXEC)
    config = json.loads(Path(cluster.kubeconfig).read_text())
    config["users"][0]["user"] = {
        "exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": str(plugin), "interactiveMode": "Never"}
    }
    kubeconfig = folder / "kubeconfig"
    kubeconfig.write_text(json.dumps(config))
    return kubeconfig


def injects_while(kube: Kube, stop_after: float, prefix: str) -> int:
    """Create a Deployment every few seconds until `stop_after` (monotonic) and check each is injected."""
    count = 0
    while time.monotonic() < stop_after:
        name = f"{prefix}-{count}"
        kube.create(deployment(name, {"tcp-exporter/port": "8080"}))
        injected(kube, name)
        count += 1
        time.sleep(2)  # the pace of new Deployments, not a wait for anything
    return count


def test_an_exec_plugin_whose_tokens_are_each_revoked_seconds_after_issue_keeps_the_operator_writing(
    operator: Operator, cluster: Any, kubectl: Callable[..., str], kube: Kube, audit: Audit, tmp_path: Path
) -> None:
    """As EKS, GKE and AKS kubeconfigs do: an exec plugin prints a token; here each is revoked after 3 s."""
    issued = tmp_path / "issued"
    kubeconfig = exec_kubeconfig(cluster, tmp_path, issued)

    stop = threading.Event()
    revoked: set[str] = set()

    def revoker() -> None:
        while not stop.wait(0.5):
            for line in issued.read_text().splitlines():
                name, at = line.split()
                if name not in revoked and time.time() - int(at) >= 3:
                    revoke(kubectl, name)
                    revoked.add(name)

    operator.stop()
    mark = audit.mark()
    thread = threading.Thread(target=revoker, daemon=True)
    thread.start()
    exec_operator = Operator(cluster, kubectl, env={"KUBECONFIG": str(kubeconfig)})
    try:
        created = injects_while(kube, time.monotonic() + 36, "exec")
        assert created >= 8
        assert len(revoked) >= 5, f"only {len(revoked)} tokens were revoked: the test did not exercise re-login"
        writes = [w for w in audit.writes(mark, USER) if w[1] == "deployments" and w[2] == kube.ns]
        assert len(writes) >= created
    finally:
        stop.set()
        thread.join()
        exec_operator.close()
        operator.start()


def test_an_in_cluster_token_file_replaced_and_its_old_token_revoked_keeps_the_operator_writing(
    operator: Operator, cluster: Any, kubectl: Callable[..., str], kube: Kube, tmp_path: Path
) -> None:
    """In a pod, the kubelet rotates the projected token file; here the operator runs in a private mount
    namespace whose /var/run/secrets/kubernetes.io/serviceaccount is a folder the test rotates."""
    need(os.geteuid() == 0 and shutil.which("unshare") is not None, "a private mount namespace needs root")
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    shutil.copy(Path(cluster.state_dir) / "pki" / "ca.crt", sa / "ca.crt")
    (sa / "namespace").write_text(NAMESPACE)

    def rotate(secret: str) -> None:
        new = sa / f".token-{secret}"
        new.write_text(bound_token(kubectl, secret))
        new.rename(sa / "token")  # atomically, as the kubelet swaps its ..data link

    rotate("sa-0")
    port = cluster.server.rsplit(":", 1)[1]
    mount = (
        "mount -t tmpfs tmpfs /run && mkdir -p /run/secrets/kubernetes.io/serviceaccount"
        f' && mount --bind {sa} /run/secrets/kubernetes.io/serviceaccount && exec "$@"'
    )
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    env.update(KUBERNETES_SERVICE_HOST="127.0.0.1", KUBERNETES_SERVICE_PORT=port, KUBECONFIG="/nonexistent")
    operator.stop()
    in_cluster = Operator(
        cluster, kubectl, env=env, wrap=["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, "sh"]
    )
    try:
        kube.create(deployment("before-0", {"tcp-exporter/port": "8080"}))
        injected(kube, "before-0")
        for i in range(1, 4):
            rotate(f"sa-{i}")
            revoke(kubectl, f"sa-{i - 1}")
            name = f"after-{i}"
            kube.create(deployment(name, {"tcp-exporter/port": "8080"}))
            injected(kube, name)
    finally:
        in_cluster.close()
        operator.start()
        revoke(kubectl, "sa-3")


def test_liveness_fails_while_the_credentials_are_refused_and_recovers_with_new_ones(
    operator: Operator, cluster: Any, kubectl: Callable[..., str], kube: Kube, tmp_path: Path
) -> None:
    issued, broken = tmp_path / "issued", tmp_path / "broken"
    kubeconfig = exec_kubeconfig(cluster, tmp_path, issued, broken)
    operator.stop()
    op = Operator(cluster, kubectl, env={"KUBECONFIG": str(kubeconfig), "TCP_EXPORTER_OPERATOR_CREDENTIALS_GRACE": "2"})
    try:
        assert op.liveness() == 200
        broken.touch()
        for line in issued.read_text().splitlines():
            revoke(kubectl, line.split()[0])
        kube.create(deployment("refused", {"tcp-exporter/port": "8080"}))  # a write it cannot make
        wait_for(lambda: op.liveness() == 500, 60, "liveness to fail on refused credentials", 1)
        broken.unlink()
        wait_for(lambda: op.liveness() == 200, 60, "liveness to recover with new credentials", 1)
        injected(kube, "refused")
    finally:
        op.close()
        operator.start()
