"""Shared fixtures: the real local control plane, namespaces, polling.

A tier that needs something this machine lacks (root, Go, a tool) skips with
the reason; under CI=true that skip is a failure instead, so a green CI run
always means the real-component tiers ran.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from harness.helpers import wait_for

IN_CI = os.environ.get("CI", "").lower() == "true"


def need(condition: bool, reason: str) -> None:
    """Skip (or, under CI, fail) a test whose prerequisite is missing."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"prerequisite missing under CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest) -> Iterator[Any]:
    need(shutil.which("go") is not None, "Go is needed to build the local control plane")
    need(shutil.which("openssl") is not None, "openssl is needed for the control plane's certificates")
    from harness.localkube import cluster as lk

    running = lk.local_cluster()
    if running is not None:
        yield running
        return
    c = lk.temporary()
    try:
        yield c
    finally:
        # After a failure the logs stay, and the report says where.
        failed = request.session.testsfailed > 0
        c.stop(remove_state=not failed)
        if failed:
            print(f"\ncontrol-plane logs kept in {c.log_dir}")


@pytest.fixture(scope="session")
def kubectl(cluster: Any) -> Callable[..., str]:
    import subprocess

    from harness.localkube.cluster import kubectl as kubectl_path

    binary = kubectl_path()

    def run(*args: str, check: bool = True, input: str | None = None) -> str:
        proc = subprocess.run(
            [binary, "--kubeconfig", cluster.kubeconfig, *args],
            capture_output=True,
            text=True,
            input=input,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc.stdout + (proc.stderr if not check else "")

    return run


@pytest.fixture(scope="session")
def api(cluster: Any) -> Any:
    """An admin kubernetes.client.ApiClient for the local control plane."""
    from kubernetes import config

    return config.new_client_from_config(config_file=cluster.kubeconfig)


@pytest.fixture
def namespace(api: Any) -> Iterator[str]:
    from kubernetes import client

    name = f"t-{uuid.uuid4().hex[:10]}"
    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": name}})
    # Pods need the namespace's default ServiceAccount, made by the controller-manager.
    wait_for(
        lambda: any(sa.metadata.name == "default" for sa in core.list_namespaced_service_account(name).items),
        30,
        "the default ServiceAccount",
    )
    yield name
    core.delete_namespace(name)


@pytest.fixture(scope="session")
def operator(cluster: Any, kubectl: Callable[..., str]) -> Iterator[Any]:
    """The real operator, installed from manifests/ and running as its ServiceAccount."""
    from harness.operator_proc import Operator, install

    install(kubectl, components=("scale-in",))  # connection-aware scale-in's tests need its pod rights
    op = Operator(cluster, kubectl)
    yield op
    op.close()


@pytest.fixture(scope="module")
def keda(cluster: Any, kubectl: Callable[..., str]) -> Iterator[Any]:
    """Real KEDA (operator and metrics adapter, built from its Go module) serving external metrics, for the
    tests of one module: the operator's other tests delete and reinstall KEDA's CRD under it."""
    need(os.geteuid() == 0, "KEDA's adapter listens on a test address this host gets for it, which needs root")
    from harness.kedastack import Keda

    k = Keda(cluster, kubectl)
    yield k
    k.stop()


@pytest.fixture(scope="session")
def argo_rollouts(cluster: Any, kubectl: Callable[..., str]) -> Iterator[Any]:
    """Real Argo Rollouts (its CRDs and controller, built from its Go module), from the first test that asks for
    it to the end of the session: the CRDs are then installed after the operator, as users may."""
    from harness.rolloutstack import ArgoRollouts

    argo = ArgoRollouts(cluster, kubectl)
    yield argo
    argo.stop()


@pytest.fixture(scope="session")
def audit(cluster: Any) -> Any:
    from harness.operator_proc import Audit

    return Audit(cluster.audit_log)


@pytest.fixture
def kube(api: Any, namespace: str) -> Any:
    from harness.operator_proc import Kube

    return Kube(api, namespace)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failing test that used the operator or the control plane shows their latest logs."""
    report = yield
    if report.failed and call.when == "call":
        funcargs = getattr(item, "funcargs", {})
        if "operator" in funcargs:
            report.sections.append(("operator log (tail)", "\n".join(funcargs["operator"].log().splitlines()[-60:])))
        if "cluster" in funcargs:
            report.sections.append(("control plane", funcargs["cluster"].logs_tail(20)))
        if "keda" in funcargs:
            for name in ("keda-operator", "keda-adapter"):
                report.sections.append((f"{name} log (tail)", funcargs["keda"].logs(name, 40)))
    return report
