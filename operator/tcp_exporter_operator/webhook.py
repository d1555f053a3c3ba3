"""Injection at pod creation (INJECTION=webhook): a mutating admission webhook that adds the sidecar to the pods of
annotated Deployments as the API server creates them, leaving the Deployment as its owner wrote it (no drift for
Argo CD or Flux to see). The ScaledObject and PodMonitor are still the controller's.

Three parts:
- `mutation`: the decision for one pod, pure but for the look-up of its Deployment. The same `injection` and
  `inject` as the patch mode build the pod, so both modes inject the very same sidecar.
- `Certificates`: the serving certificate. Issued by the operator itself (a CA of its own and a certificate it
  signs, kept in a Secret that every replica reads, renewed once two thirds of its life have passed, and the CA
  written into the MutatingWebhookConfiguration's caBundle, as KEDA's cert rotator does), or provided by someone
  else (cert-manager: its Certificate fills the Secret and its cainjector the caBundle), then only read.
- `Server`: HTTPS, bounded: at most MAX_CONNECTIONS at once (more are closed at once), a deadline on every socket
  read and write, a cap on the request body, and every error answered with "allowed, unchanged" (failurePolicy
  Ignore in the configuration covers the case where it does not answer at all).

Every answer allows the pod: the webhook never blocks a pod's creation. A pod created without the sidecar (the
webhook was down) is reported by the controller as a Warning on its Deployment (`uninjected_pods`).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import http.server
import ipaddress
import json
import logging
import os
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from tcp_exporter import __version__

from tcp_exporter_operator import metrics
from tcp_exporter_operator.annotations import (
    A_PORT,
    CONTAINER,
    InvalidSpec,
    parse_spec,
    recorded_status,
    sidecar_of,
)
from tcp_exporter_operator.config import Config
from tcp_exporter_operator.desired import inject, injection
from tcp_exporter_operator.plan import allowed_method
from tcp_exporter_operator.workloads import API_VERSION, ROLLOUT, STATEFULSET, key_name, split, with_template

log = logging.getLogger(__name__)
# The pod annotation that says which injection a pod got: the operator's version and the injection's hash.
INJECTED = "tcp-exporter/injected"
PATH = "/mutate-pods"
OPT_OUT = "tcp-exporter.dev/inject"  # a pod labelled with it "false" is left alone (the configuration's objectSelector)
MAX_BODY = 2 * 1024 * 1024  # an AdmissionReview of the largest pod etcd stores (1.5 MiB), and its envelope
MAX_CONNECTIONS = 64
# Bodies read and parsed at once, at most: a 2 MiB body of tiny JSON objects is some 50 MB of Python objects.
MAX_PARSING = 2
SOCKET_TIMEOUT = 10.0  # each read and write, the TLS handshake included
REQUEST_DEADLINE = 15.0  # from a connection's start, or its last answer, to its next answer; else it is closed
# Namespaces whose pods are never injected, whatever the webhook configuration's selector says.
NEVER = ("kube-system", "kube-public", "kube-node-lease")


# -- the decision for one pod -----------------------------------------------------------------------


def owning_deployment(pod: Mapping[str, Any]) -> str | None:
    """The key name (workloads.py) of the workload that created the pod: the Deployment whose ReplicaSet did (the
    ReplicaSet is named <deployment>-<pod-template-hash>, and the pod carries that hash as a label), the Argo
    Rollout whose ReplicaSet did (`Rollout/NAME`: named alike, the hash labelled rollouts-pod-template-hash), or
    `StatefulSet/NAME`. None for any other pod. A claim only: `Controller.workload_of` proves it by UID."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    for ref in meta.get("ownerReferences") or []:
        if not isinstance(ref, Mapping) or not ref.get("controller") or str(ref.get("apiVersion")) != API_VERSION:
            continue
        name = str(ref.get("name") or "")
        for label, kind in (("pod-template-hash", None), ("rollouts-pod-template-hash", ROLLOUT)):
            template_hash = labels.get(label)
            suffix = f"-{template_hash}"
            if ref.get("kind") == "ReplicaSet" and template_hash and name.endswith(suffix) and len(name) > len(suffix):
                return name[: -len(suffix)] if kind is None else key_name(kind, name[: -len(suffix)])
        if ref.get("kind") == STATEFULSET and name:
            return key_name(STATEFULSET, name)
    return None


def controller_ref(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The pod's controller owner reference (its ReplicaSet's or StatefulSet's), as the request says it."""
    for ref in (pod.get("metadata") or {}).get("ownerReferences") or []:
        if isinstance(ref, Mapping) and ref.get("controller"):
            return ref
    return None


@dataclass(frozen=True)
class Decision:
    """The patch for one pod (None: the pod is left as it is) and why, for the log and the metrics."""

    patch: list[dict[str, Any]] | None
    reason: str


def mutation(
    pod: Mapping[str, Any],
    namespace: str,
    find: Callable[[str, Mapping[str, Any]], Mapping[str, Any] | None],
    psa_level: Callable[[str], str | None],
    cfg: Config,
    own_namespace: str,
    conflict: Callable[[Mapping[str, Any]], str | None] = lambda workload: None,
) -> Decision:
    """The JSON patch that injects the sidecar into a pod being created, if its workload asks for it.

    `find(namespace, pod)` is the workload that really owns the pod, or None: the request's body is not proof
    of anything (any pod that reaches the port can post one), so the owner reference's UID is checked against the
    cluster's objects there (`Controller.workload_of`), and a forged request learns nothing of another
    namespace's settings or drain token. `conflict(workload)`: why the patch mode would not inject it either."""
    if namespace in NEVER or namespace == own_namespace:
        return Decision(None, "namespace never injected")
    if cfg.namespaces and namespace not in cfg.namespaces:
        return Decision(None, "namespace not watched by this operator")
    if sidecar_of({"spec": {"template": {"spec": pod.get("spec") or {}}}}) is not None or any(
        isinstance(c, Mapping) and c.get("name") == CONTAINER for c in (pod.get("spec") or {}).get("containers") or []
    ):
        return Decision(None, "already has a container named tcp-exporter")
    name = owning_deployment(pod)
    if name is None or split(name)[0] not in cfg.workload_kinds:
        return Decision(None, "not a pod of a workload kind the operator handles")
    deployment = find(namespace, pod)
    if deployment is None or A_PORT not in ((deployment.get("metadata") or {}).get("annotations") or {}):
        return Decision(None, "its workload is not annotated (or is not its owner)")
    if recorded_status(deployment) is not None:
        return Decision(None, "its workload's template is injected (patch mode)")
    why = conflict(deployment)
    if why is not None:
        return Decision(None, why)
    meta = pod.get("metadata") or {}
    # A workloadRef Rollout has no template of its own: its checks (hostNetwork, ports, the containers to drain,
    # the pod's own prometheus.io annotations) are made on the pod being created.
    deployment = with_template(deployment, {"spec": {"template": {"metadata": meta, "spec": pod.get("spec") or {}}}})
    try:
        spec = parse_spec(deployment, cfg)
    except InvalidSpec:
        return Decision(None, "its Deployment's annotations are invalid (a Warning on it says why)")
    spec, _ = allowed_method(spec, psa_level(namespace))
    added = injection(deployment, spec, None)
    # The pod as the template of a Deployment, so that the patch mode's `inject` builds it: the same sidecar,
    # discovery annotations and drain hooks, whichever mode injects them.
    wrapper = {"metadata": {}, "spec": {"template": {"metadata": meta, "spec": pod.get("spec") or {}}}}
    template = inject(wrapper, added, None)["spec"]["template"]
    annotations = dict(template["metadata"].get("annotations") or {})
    annotations[INJECTED] = f"{__version__}/{added.status['hash']}"
    patch: list[dict[str, Any]] = [
        {"op": "add", "path": "/metadata/annotations", "value": annotations},
        {"op": "add", "path": "/spec/containers", "value": template["spec"]["containers"]},
    ]
    if template["spec"].get("initContainers"):
        patch.append({"op": "add", "path": "/spec/initContainers", "value": template["spec"]["initContainers"]})
    return Decision(patch, "injected")


def review_response(
    review: Any,
    decide: Callable[[Mapping[str, Any], str], Decision],
) -> tuple[dict[str, Any], str]:
    """The AdmissionReview answer to a request (always allowed), and the decision's reason."""
    request = review.get("request") if isinstance(review, Mapping) else None
    if not isinstance(request, Mapping) or not isinstance(request.get("uid"), str):
        raise ValueError("not an AdmissionReview request")
    response: dict[str, Any] = {"uid": request["uid"], "allowed": True}
    reason = "not a pod creation"
    pod = request.get("object")
    kind = (request.get("kind") or {}).get("kind") if isinstance(request.get("kind"), Mapping) else None
    if request.get("operation") == "CREATE" and kind == "Pod" and isinstance(pod, Mapping):
        decision = decide(pod, str(request.get("namespace") or (pod.get("metadata") or {}).get("namespace") or ""))
        reason = decision.reason
        if decision.patch is not None:
            response["patchType"] = "JSONPatch"
            response["patch"] = base64.b64encode(json.dumps(decision.patch).encode()).decode()
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}, reason


# -- certificates -----------------------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    pkcs8, pem = serialization.PrivateFormat.PKCS8, serialization.Encoding.PEM
    return key.private_bytes(pem, pkcs8, serialization.NoEncryption())


def issue(hosts: tuple[str, ...], validity: int, ca: tuple[bytes, bytes] | None = None) -> dict[str, bytes]:
    """A CA (new, unless `ca` = (cert, key) PEM is given and still valid for a serving certificate's life) and a
    serving certificate it signs for `hosts` (DNS names or IP addresses), valid `validity` seconds; PEM, under the
    Secret's keys."""
    now = datetime.datetime.now(datetime.UTC)
    start = now - datetime.timedelta(seconds=min(300, validity / 10))  # clocks differ a little
    if ca is not None and remaining(ca[0]) > 2 * validity:
        ca_cert = x509.load_pem_x509_certificate(ca[0])
        ca_key = serialization.load_pem_private_key(ca[1], None)
        ca_pem, ca_key_pem = ca
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(_name("tcp-exporter-webhook-ca"))
            .issuer_name(_name("tcp-exporter-webhook-ca"))
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(now + datetime.timedelta(seconds=10 * validity))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )  # keyCertSign, cRLSign
            .sign(ca_key, hashes.SHA256())
        )
        ca_pem, ca_key_pem = ca_cert.public_bytes(serialization.Encoding.PEM), _pem_key(ca_key)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0] if hosts else "tcp-exporter-webhook"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(now + datetime.timedelta(seconds=validity))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return {
        "ca.crt": ca_pem,
        "ca.key": ca_key_pem,
        "tls.crt": cert.public_bytes(serialization.Encoding.PEM),
        "tls.key": _pem_key(key),
    }


def remaining(pem: bytes) -> float:
    """Seconds until the (first) certificate in `pem` expires; negative once it has."""
    cert = x509.load_pem_x509_certificate(pem)
    return (cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)).total_seconds()


def lifetime(pem: bytes) -> float:
    cert = x509.load_pem_x509_certificate(pem)
    return (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds()


def names_of(pem: bytes) -> set[str]:
    """The DNS names and IP addresses a certificate is for."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(n) for n in san.get_values_for_type(x509.DNSName)} | {
        str(n) for n in san.get_values_for_type(x509.IPAddress)
    }


def due(data: Mapping[str, bytes], hosts: tuple[str, ...], validity: int) -> str | None:
    """Why the Secret's certificate must be issued again (None: it need not): missing, unreadable, for other
    names, past two thirds of its life, or valid for longer than the configured validity (it was shortened)."""
    if not data.get("tls.crt") or not data.get("tls.key") or not data.get("ca.crt"):
        return "no certificate yet"
    try:
        left, life, names = remaining(data["tls.crt"]), lifetime(data["tls.crt"]), names_of(data["tls.crt"])
    except ValueError as exc:
        return f"the certificate cannot be read ({exc})"
    if names != {str(ipaddress.ip_address(h)) if _is_ip(h) else h for h in hosts}:
        return f"the certificate is for {sorted(names)}, not {sorted(hosts)}"
    if left < life / 3:
        return f"the certificate expires in {max(left, 0):.0f} s"
    if left > validity + 600:
        return f"the certificate is valid for {left:.0f} s more, longer than WEBHOOK_CERT_VALIDITY ({validity} s)"
    return None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class Certificates:
    """Keeps the serving certificate: in the Secret, in the server, and (when the operator issues it) its CA in
    the webhook configuration's caBundle. `tick` does one round; `run` does them until stopped."""

    def __init__(self, kube: Any, cfg: Config, on_change: Callable[[bytes, bytes], None]) -> None:
        self.kube, self.cfg, self.on_change = kube, cfg, on_change
        self.namespace, _, self.secret = cfg.webhook_secret.partition("/")
        self.loaded: bytes | None = None  # the certificate the server has
        self.ready = threading.Event()  # the server has a certificate

    def period(self) -> float:
        """Seconds between rounds: often enough to renew in time, and to put back a caBundle a re-apply cleared."""
        return max(1.0, min(30.0, self.cfg.webhook_cert_validity / 12))

    def tick(self) -> None:
        data = self._read()
        if self.cfg.webhook_certs == "operator":
            why = due(data, self.cfg.webhook_hosts, self.cfg.webhook_cert_validity)
            if why is not None:
                old_ca = (data["ca.crt"], data["ca.key"]) if data.get("ca.crt") and data.get("ca.key") else None
                issued = issue(self.cfg.webhook_hosts, self.cfg.webhook_cert_validity, old_ca)
                log.info("webhook: issuing a new serving certificate: %s", why)
                data = self._write(issued, data)
            self._ca_bundle(data)
        if not data.get("tls.crt") or not data.get("tls.key"):
            log.warning("webhook: the Secret %s/%s has no tls.crt and tls.key yet", self.namespace, self.secret)
            return
        if data["tls.crt"] != self.loaded:
            self.on_change(data["tls.crt"], data["tls.key"])
            self.loaded = data["tls.crt"]
            self.ready.set()
            metrics.WEBHOOK_CERT_EXPIRY.set(time.time() + remaining(data["tls.crt"]))

    def run(self, stopping: threading.Event) -> None:
        while True:
            try:
                self.tick()
            except Exception:
                log.exception("webhook: keeping the serving certificate failed; trying again")
            if stopping.wait(self.period()):
                return

    def _read(self) -> dict[str, bytes]:
        secret = self.kube.get_secret(self.namespace, self.secret)
        self._version = (secret or {}).get("metadata", {}).get("resourceVersion")
        return {k: base64.b64decode(v) for k, v in ((secret or {}).get("data") or {}).items()}

    def _write(self, issued: dict[str, bytes], current: dict[str, bytes]) -> dict[str, bytes]:
        """Store what was issued; if another replica wrote first (a conflict), use theirs."""
        # The old CA stays in the bundle until the certificates it signed have expired.
        bundle = issued["ca.crt"]
        old = current.get("ca.crt")
        if old and issued["ca.crt"] not in old:
            with_old = [p for p in _pems(old) if remaining(p) > 0 and p not in bundle]
            bundle = b"".join([issued["ca.crt"], *with_old])
        data = {**issued, "ca.crt": bundle}
        if self.kube.write_secret(self.namespace, self.secret, data, self._version):
            return data
        return self._read()

    def _ca_bundle(self, data: Mapping[str, bytes]) -> None:
        bundle = data.get("ca.crt")
        if bundle:
            self.kube.set_ca_bundle(
                self.cfg.webhook_configuration,
                base64.b64encode(bundle).decode(),
                replaces=lambda current: self._still(bundle),
            )

    def _still(self, bundle: bytes) -> bool:
        """Whether the Secret still holds this bundle: read again just before it would replace the configuration's.
        With two replicas, one whose read predates the other's CA rotation would otherwise put the previous bundle
        back, and the API server would distrust the new certificates until the next round. Not by comparing
        dates: clocks differ, and a Secret restored from a backup must still be trusted."""
        return self._read().get("ca.crt") == bundle


def _pems(bundle: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    return [part.strip() + b"\n" + marker + b"\n" for part in bundle.split(marker) if part.strip()]


# -- the HTTPS server -------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"
    # Buffered: an answer's headers and body leave in one write when the request is done (handle_one_request
    # flushes). Unbuffered, the body was a second small write that Nagle held until the API server's delayed ACK
    # came: 40 ms more per pod created (bench/webhook.py measured 48 ms a pod before, against 3 ms without).
    wbufsize = -1

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("webhook: " + format, *args)

    def _answer(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._answer(200, b"ok\n", "text/plain")
        else:
            self._answer(404, b"not found\n", "text/plain")

    def do_POST(self) -> None:
        if self.path.partition("?")[0] != PATH:
            self._answer(404, b"not found\n", "text/plain")
            return
        length = self.headers.get("Content-Length", "")
        if not length.isascii() or not length.isdigit() or int(length) > MAX_BODY:
            self.close_connection = True
            self._answer(413, b"a request of unknown or too large a size\n", "text/plain")
            return
        started = time.monotonic()
        try:
            if not self.server.parsing.acquire(timeout=SOCKET_TIMEOUT):
                raise TimeoutError("too many requests being read at once")
            try:
                review = json.loads(self.rfile.read(int(length)))
            finally:
                self.server.parsing.release()
            answer, reason = review_response(review, self.server.decide)
            result = "injected" if reason == "injected" else "skipped"
        except Exception as exc:
            # Unreadable, or the look-up failed: no answer the API server can use, so failurePolicy Ignore
            # decides (the pod is created without the sidecar, and the controller warns of it).
            log.warning("webhook: a request could not be answered: %s", exc)
            metrics.WEBHOOK_REQUESTS.labels("error").inc()
            self.close_connection = True
            self._answer(400, json.dumps({"error": str(exc)[:200]}).encode())
            return
        metrics.WEBHOOK_REQUESTS.labels(result).inc()
        metrics.WEBHOOK_SECONDS.observe(time.monotonic() - started)
        request = review.get("request") or {}
        log.info("webhook: pod %s/%s: %s", request.get("namespace"), (request.get("object") or {}).get(
            "metadata", {}).get("generateName") or request.get("name"), reason)  # fmt: skip
        self._answer(200, json.dumps(answer).encode())
        self.server.answered(self.request)


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """The webhook's HTTPS server. Each connection is wrapped, in its own thread, with the certificate current
    when it arrived (`use` swaps it without a restart); MAX_CONNECTIONS at most, each socket with a deadline."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # the listen backlog (5 by default: a burst of connections would wait on SYN retries)

    def __init__(self, address: tuple[str, int], decide: Callable[[Mapping[str, Any], str], Decision]) -> None:
        self.decide = decide
        self.context: ssl.SSLContext | None = None
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.parsing = threading.BoundedSemaphore(MAX_PARSING)
        # Each connection's deadline for its next answer: a client that trickles a byte now and then (every read
        # within SOCKET_TIMEOUT) is closed at it all the same, so no slot is held forever.
        self.deadlines: dict[Any, float] = {}
        self.deadlines_lock = threading.Lock()
        threading.Thread(target=self._enforce_deadlines, name="webhook-deadlines", daemon=True).start()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6 and self.server_address[0] == "::":
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 too, as "0.0.0.0" would
        super().server_bind()

    def use(self, cert: bytes, key: bytes) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # load_cert_chain reads files only, and the operator's root filesystem is read-only: memory files.
        fds = [os.memfd_create("tcpx-webhook-cert"), os.memfd_create("tcpx-webhook-key")]
        try:
            for fd, pem in zip(fds, (cert, key), strict=True):
                os.write(fd, pem)
            context.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
        finally:
            for fd in fds:
                os.close(fd)
        self.context = context
        log.info("webhook: serving with a certificate valid for %.0f s more", remaining(cert))

    def verify_request(self, request: Any, client_address: Any) -> bool:
        # No certificate yet, or every slot taken: closed at once.
        return self.context is not None and self.slots.acquire(blocking=False)

    def answered(self, connection: Any) -> None:
        with self.deadlines_lock:
            if connection in self.deadlines:
                self.deadlines[connection] = time.monotonic() + REQUEST_DEADLINE

    def _enforce_deadlines(self) -> None:
        while True:
            time.sleep(1.0)
            now = time.monotonic()
            with self.deadlines_lock:
                late = [c for c, deadline in self.deadlines.items() if deadline < now]
            for connection in late:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)  # its blocked read returns; its thread ends

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        tls = None
        try:
            request.settimeout(SOCKET_TIMEOUT)
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each answer is one write: send it now
            assert self.context is not None
            # Wrapped first (the raw socket is detached from then on), so that the deadline can shut down the
            # TLS socket even while its handshake trickles in.
            tls = self.context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
            with self.deadlines_lock:
                self.deadlines[tls] = time.monotonic() + REQUEST_DEADLINE
            tls.do_handshake()
        except (OSError, ssl.SSLError) as exc:
            log.debug("webhook: TLS handshake with %s failed: %s", client_address, exc)
            self.shutdown_request(tls if tls is not None else request)
            self._done(tls)
            return
        try:
            self.finish_request(tls, client_address)
        except Exception as exc:
            log.debug("webhook: connection from %s: %s", client_address, exc)
        finally:
            self.shutdown_request(tls)
            self._done(tls)

    def _done(self, connection: Any) -> None:
        with self.deadlines_lock:
            self.deadlines.pop(connection, None)
        self.slots.release()


def parse_address(text: str) -> tuple[str, int]:
    """(host, port); an empty host is every address: "::" (IPv6 and IPv4, for IPv6-only and dual-stack clusters)
    where the kernel has IPv6, else "0.0.0.0"."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host:
        host = "::" if socket.has_ipv6 and os.path.exists("/proc/net/if_inet6") else "0.0.0.0"
    return host, int(port)


def start(
    cfg: Config,
    kube: Any,
    find: Callable[[str, Mapping[str, Any]], Mapping[str, Any] | None],
    psa_level: Callable[[str], str | None],
    conflict: Callable[[Mapping[str, Any]], str | None],
    stopping: threading.Event,
) -> Server:
    """The webhook's server and its certificate keeper, each on a thread of its own; every replica serves (the
    Service spreads the API server's calls), whichever one is active for the controller."""

    def decide(pod: Mapping[str, Any], namespace: str) -> Decision:
        return mutation(pod, namespace, find, psa_level, cfg, cfg.own_namespace, conflict)

    server = Server(parse_address(cfg.webhook_address), decide)
    certificates = Certificates(kube, cfg, server.use)
    threading.Thread(target=certificates.run, args=(stopping,), name="webhook-certificates", daemon=True).start()
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="webhook", daemon=True).start()
    log.info("webhook: listening on %s (certificates: %s)", cfg.webhook_address, cfg.webhook_certs)
    return server
