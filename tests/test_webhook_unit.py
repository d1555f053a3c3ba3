"""The injection webhook's pure parts and its HTTPS server, without a cluster: the decision for a pod (the same
sidecar as the patch mode injects), the certificates it issues and when it renews them, and a server that answers
the API server's AdmissionReview over TLS whatever other clients do."""

from __future__ import annotations

import base64
import copy
import json
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
from tcp_exporter_operator.annotations import A_STATUS
from tcp_exporter_operator.config import Config
from tcp_exporter_operator.plan import Facts, plan
from tcp_exporter_operator.webhook import (
    INJECTED,
    PATH,
    Decision,
    Server,
    due,
    issue,
    mutation,
    names_of,
    owning_deployment,
    remaining,
    review_response,
)

from harness.operator_proc import deployment

CFG = Config(sidecar_image="example.test/tcp-exporter:1", injection="webhook")


def annotated(name: str = "checkout.v2", **extra: str) -> dict[str, Any]:
    dep = deployment(name, {"tcp-exporter/port": "8080", **extra})
    dep["metadata"].update({"namespace": "shop", "uid": "0d6c1c1e-1111-4a4a-9999-000000000001"})
    return dep


def pod_of(dep: Mapping[str, Any], template_hash: str = "5d8f7c9b4") -> dict[str, Any]:
    template = dep["spec"]["template"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": f"{dep['metadata']['name']}-{template_hash}-",
            "namespace": dep["metadata"]["namespace"],
            "labels": {**template["metadata"]["labels"], "pod-template-hash": template_hash},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": f"{dep['metadata']['name']}-{template_hash}",
                    "uid": "rs-uid",
                    "controller": True,
                }
            ],
        },
        "spec": copy.deepcopy(template["spec"]),
    }


def decide(
    pod: Mapping[str, Any], dep: Mapping[str, Any] | None, namespace: str = "shop", cfg: Config = CFG
) -> Decision:
    return mutation(pod, namespace, lambda ns, pod: dep, lambda ns: None, cfg, "tcp-exporter")


def patched(pod: Mapping[str, Any], decision: Decision) -> dict[str, Any]:
    assert decision.patch is not None, decision.reason
    return dict(jsonpatch.apply_patch(pod, decision.patch))


def test_the_owning_workload_is_the_replicasets_name_without_the_pod_template_hash_or_the_statefulset() -> None:
    long_name = "a" * 57 + "-api"  # Helm-like: dashes, and long
    assert owning_deployment(pod_of(annotated(long_name))) == long_name
    assert owning_deployment(pod_of(annotated("web-api"))) == "web-api"
    bare = pod_of(annotated())
    bare["metadata"]["ownerReferences"] = []
    assert owning_deployment(bare) is None
    stateful = pod_of(annotated())
    stateful["metadata"]["ownerReferences"][0].update(kind="StatefulSet", name="broker")
    assert owning_deployment(stateful) == "StatefulSet/broker"  # its key (workloads.py)
    job = pod_of(annotated())
    job["metadata"]["ownerReferences"][0].update(kind="Job", apiVersion="batch/v1")
    assert owning_deployment(job) is None


def test_a_pod_of_an_argo_rollouts_replicaset_is_the_rollouts_whatever_its_name() -> None:
    rollout = pod_of(annotated("checkout.v2"))
    labels = rollout["metadata"]["labels"]
    labels["rollouts-pod-template-hash"] = labels.pop("pod-template-hash")  # what Argo Rollouts labels
    assert owning_deployment(rollout) == "Rollout/checkout.v2"  # its key (workloads.py)
    labels["rollouts-pod-template-hash"] = "other"  # the hash is not the ReplicaSet's: no claim
    assert owning_deployment(rollout) is None
    rollout_dep = annotated("checkout.v2")
    rollout_dep.update(kind="Rollout", apiVersion="argoproj.io/v1alpha1")
    # The Rollout's own decision is the Deployment's: the very sidecar, for a pod its ReplicaSet creates.
    good = pod_of(annotated("checkout.v2"))
    good["metadata"]["labels"]["rollouts-pod-template-hash"] = good["metadata"]["labels"].pop("pod-template-hash")
    assert decide(good, rollout_dep, cfg=replace(CFG, workload_kinds=("Deployment", "Rollout"))).patch
    assert decide(good, rollout_dep).patch is None  # Rollouts not enabled: left alone


def test_a_pod_gets_the_very_sidecar_the_patch_mode_puts_in_the_template() -> None:
    dep = annotated(**{"tcp-exporter/drain": "20"})
    dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 60
    pod = patched(pod_of(dep), decide(pod_of(dep), dep))
    in_template = plan(dep, Facts(), Config(sidecar_image=CFG.sidecar_image)).desired
    assert in_template is not None
    template = in_template["spec"]["template"]
    assert pod["spec"]["initContainers"] == template["spec"]["initContainers"]  # the native sidecar
    assert pod["spec"]["containers"] == template["spec"]["containers"]  # the app, with its drain hook
    annotations = pod["metadata"]["annotations"]
    assert annotations.pop(INJECTED).startswith("0.")
    assert annotations == template["metadata"]["annotations"]  # prometheus.io/*
    assert pod["metadata"]["labels"] == pod_of(dep)["metadata"]["labels"]


@pytest.mark.parametrize(
    ("why", "change", "namespace"),
    [
        ("the operator's namespace", None, "tcp-exporter"),
        ("kube-system", None, "kube-system"),
        ("not annotated", lambda d, p: d["metadata"].update(annotations={}), "shop"),
        ("invalid annotation", lambda d, p: d["metadata"]["annotations"].update({"tcp-exporter/port": "²"}), "shop"),
        (
            "a StatefulSet's, not enabled",
            lambda d, p: p["metadata"]["ownerReferences"][0].update(kind="StatefulSet"),
            "shop",
        ),
        ("has our container", lambda d, p: p["spec"]["containers"].append({"name": "tcp-exporter"}), "shop"),
        ("patch-mode template", lambda d, p: d["metadata"]["annotations"].update({A_STATUS: "{}"}), "shop"),
    ],
)
def test_a_pod_is_left_unchanged_when(why: str, change: Any, namespace: str) -> None:
    dep = annotated()
    pod = pod_of(dep)
    if change is not None:
        change(dep, pod)
    assert decide(pod, dep, namespace).patch is None, why


def test_a_pod_whose_owner_is_gone_or_not_proven_is_left_unchanged() -> None:
    # `find` answers None for a workload that does not own the pod (its owner reference's UID is not its
    # ReplicaSet's): a forged request then learns nothing of it.
    assert decide(pod_of(annotated()), None).patch is None


def test_a_pod_in_a_namespace_the_operator_does_not_watch_is_left_unchanged() -> None:
    dep = annotated()
    scoped = Config(sidecar_image=CFG.sidecar_image, injection="webhook", namespaces=("payments",))
    assert decide(pod_of(dep), dep, cfg=scoped).patch is None
    assert decide(pod_of(dep), dep, cfg=CFG).patch is not None


def review(pod: Mapping[str, Any], operation: str = "CREATE") -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "7f0e-uid",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": operation,
            "namespace": "shop",
            "object": pod,
        },
    }


def test_every_answer_allows_the_pod_and_only_a_creation_is_patched() -> None:
    dep = annotated()

    def decider(pod: Mapping[str, Any], ns: str) -> Decision:
        return decide(pod, dep, ns)

    answer, reason = review_response(review(pod_of(dep)), decider)
    assert reason == "injected"
    response = answer["response"]
    assert response["uid"] == "7f0e-uid" and response["allowed"] is True and response["patchType"] == "JSONPatch"
    assert json.loads(base64.b64decode(response["patch"]))[0]["path"] == "/metadata/annotations"
    answer, _ = review_response(review(pod_of(dep), "UPDATE"), decider)
    assert answer["response"] == {"uid": "7f0e-uid", "allowed": True}
    with pytest.raises(ValueError, match="AdmissionReview"):
        review_response({"request": "x"}, decider)


def test_an_issued_certificate_is_for_its_hosts_and_renewed_at_two_thirds_of_its_life() -> None:
    hosts = ("tcp-exporter-webhook.tcp-exporter.svc", "127.0.0.1")
    data = issue(hosts, 3600)
    assert names_of(data["tls.crt"]) == set(hosts)
    assert 3500 < remaining(data["tls.crt"]) <= 3600
    assert remaining(data["ca.crt"]) > 2 * 3600
    assert due(data, hosts, 3600) is None
    assert "not" in str(due(data, ("other.svc",), 3600))  # for other names
    assert "longer than" in str(due(data, hosts, 60 * 3))  # the validity shortened: renewed now
    short = issue(hosts, 60)
    assert due(short, hosts, 60) is None  # 66 s of life (valid from 6 s ago: clocks differ), 60 s left
    assert due({}, hosts, 3600) == "no certificate yet"
    again = issue(hosts, 3600, (data["ca.crt"], data["ca.key"]))
    assert again["ca.crt"] == data["ca.crt"] and again["tls.crt"] != data["tls.crt"]  # the same CA signs it


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Server, ssl.SSLContext]]:
    dep = annotated()
    data = issue(("127.0.0.1",), 3600)
    srv = Server(("127.0.0.1", 0), lambda pod, ns: decide(pod, dep, ns))
    srv.use(data["tls.crt"], data["tls.key"])
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    (tmp_path / "ca.crt").write_bytes(data["ca.crt"])
    trust = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    yield srv, trust
    srv.shutdown()
    srv.server_close()


def post(srv: Server, trust: ssl.SSLContext, body: bytes) -> dict[str, Any]:
    port = srv.server_address[1]
    request = urllib.request.Request(
        f"https://127.0.0.1:{port}{PATH}", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10, context=trust) as resp:
        return dict(json.loads(resp.read()))


def test_the_server_answers_over_tls_with_a_certificate_its_ca_vouches_for(
    server: tuple[Server, ssl.SSLContext],
) -> None:
    srv, trust = server
    answer = post(srv, trust, json.dumps(review(pod_of(annotated()))).encode())
    assert answer["response"]["allowed"] is True and "patch" in answer["response"]


def test_a_new_certificate_is_served_to_the_next_connection_without_a_restart(
    server: tuple[Server, ssl.SSLContext], tmp_path: Path
) -> None:
    srv, _ = server
    data = issue(("127.0.0.1",), 3600)
    srv.use(data["tls.crt"], data["tls.key"])
    (tmp_path / "new-ca.crt").write_bytes(data["ca.crt"])
    trust = ssl.create_default_context(cafile=str(tmp_path / "new-ca.crt"))
    assert post(srv, trust, json.dumps(review(pod_of(annotated()))).encode())["response"]["allowed"] is True


def test_clients_that_connect_and_send_nothing_do_not_keep_the_api_server_from_an_answer(
    server: tuple[Server, ssl.SSLContext],
) -> None:
    srv, trust = server
    idle = [socket.create_connection(srv.server_address[:2]) for _ in range(40)]  # no TLS hello, ever
    try:
        started = time.monotonic()
        answer = post(srv, trust, json.dumps(review(pod_of(annotated()))).encode())
        assert answer["response"]["allowed"] is True
        assert time.monotonic() - started < 5
    finally:
        for s in idle:
            s.close()


def test_a_client_that_trickles_bytes_is_closed_at_the_deadline(
    server: tuple[Server, ssl.SSLContext], monkeypatch: pytest.MonkeyPatch
) -> None:
    import tcp_exporter_operator.webhook as module

    srv, trust = server
    monkeypatch.setattr(module, "REQUEST_DEADLINE", 2.0)
    raw = socket.create_connection(srv.server_address[:2])
    tls = trust.wrap_socket(raw, server_hostname="127.0.0.1")
    started = time.monotonic()
    closed = False
    try:
        while time.monotonic() - started < 10:
            tls.send(b"P")  # a byte now and then: each read is within the socket timeout, the request never ends
            time.sleep(0.3)
    except OSError:
        closed = True
    finally:
        tls.close()
    assert closed and time.monotonic() - started < 6


def test_a_body_over_the_cap_is_refused_before_it_is_read(server: tuple[Server, ssl.SSLContext]) -> None:
    srv, trust = server
    port = srv.server_address[1]
    request = urllib.request.Request(
        f"https://127.0.0.1:{port}{PATH}", data=b"{}", headers={"Content-Length": str(64 * 1024 * 1024)}
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10, context=trust)
    assert err.value.code == 413


def test_the_default_address_takes_ipv6_and_ipv4_clients_for_ipv6_only_and_dual_stack_clusters() -> None:
    from tcp_exporter_operator.webhook import parse_address

    host, port = parse_address(":0")
    if host != "::":
        pytest.skip("this kernel has no IPv6")  # then it is 0.0.0.0, as before
    srv = Server((host, port), lambda pod, ns: decide(pod, None, ns))
    try:
        bound = srv.server_address[1]
        for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            with socket.socket(family, socket.SOCK_STREAM) as client:
                client.settimeout(5)
                client.connect((address, bound))  # accepted by the one listening socket
    finally:
        srv.server_close()
    assert parse_address("[fd00::1]:9443") == ("fd00::1", 9443) and parse_address("10.0.0.1:9443")[0] == "10.0.0.1"


def test_a_replica_whose_read_of_the_secret_is_stale_does_not_put_the_previous_ca_bundle_back() -> None:
    """Two replicas share the Secret: this one read it, then the other rotated the CA and set the caBundle."""
    from tcp_exporter_operator.webhook import Certificates

    old, new = issue(("127.0.0.1",), 3600), issue(("127.0.0.1",), 3600)

    class Cluster:  # the Secret and the configuration as the API server holds them
        def __init__(self) -> None:
            self.secret, self.bundle = new, base64.b64encode(new["ca.crt"]).decode()

        def get_secret(self, namespace: str, name: str) -> dict[str, Any]:
            encoded = {k: base64.b64encode(v).decode() for k, v in self.secret.items()}
            return {"metadata": {"resourceVersion": "2"}, "data": encoded}

        def set_ca_bundle(self, name: str, bundle: str, replaces: Any) -> bool:
            if bundle != self.bundle and replaces(self.bundle):
                self.bundle = bundle
                return True
            return False

    cluster = Cluster()
    certificates = Certificates(cluster, Config(webhook_hosts=("127.0.0.1",)), lambda cert, key: None)
    certificates._ca_bundle(old)  # what it read before the rotation
    assert cluster.bundle == base64.b64encode(new["ca.crt"]).decode()  # not put back
    cluster.bundle = ""  # cleared by a re-apply: the Secret's bundle goes back in
    certificates._ca_bundle(new)
    assert cluster.bundle == base64.b64encode(new["ca.crt"]).decode()
