"""kopf's part, and only that: logging in (with the official client's credentials), settings and the start of the
`Controller` at startup, the credentials liveness probe, and cleanup. kopf watches nothing for the operator (its
own informers do, `controller.py`), so nothing of kopf's is written to users' Deployments.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import kopf

from tcp_exporter_operator import webhook
from tcp_exporter_operator.config import Config
from tcp_exporter_operator.controller import Controller
from tcp_exporter_operator.kube import ApiError, Kube, load_configuration


def connection_info(configuration: Any) -> kopf.ConnectionInfo:
    """kopf's credentials from the official client's configuration: the same loader for both, so that kopf's
    watches and the operator's writes log in (and in again, after a 401) the same way."""
    header = configuration.get_api_key_with_prefix("BearerToken") or configuration.get_api_key_with_prefix(
        "authorization"
    )
    scheme, _, token = (header or "").rpartition(" ")
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        username=configuration.username or None,
        password=configuration.password or None,
        scheme=scheme or ("Bearer" if token else None),
        token=token or None,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
    )


@kopf.on.login()
def login_handler(**_: Any) -> kopf.ConnectionInfo:
    """Called at start and again whenever the API server refuses kopf's credentials."""
    try:
        return connection_info(load_configuration())
    except Exception as exc:
        raise kopf.LoginError(f"no usable in-cluster ServiceAccount or kubeconfig: {exc}") from exc


VERSION_TRIES = 10  # reads of the API server's version, 3 s apart, before the start fails


def server_version(kube: Kube) -> tuple[int, int] | None:
    """The API server's version, for SIDECAR_MODE=auto. Never guessed: a wrong guess rolls every injected
    Deployment twice (and native sidecars on an API server without them keep pods in Init), so an API server
    that does not answer fails the start, and the pod restarts."""
    for attempt in range(VERSION_TRIES):
        try:
            return kube.server_version()
        except Exception as exc:
            logging.getLogger(__name__).warning("reading the API server's version (try %d): %s", attempt + 1, exc)
            if attempt + 1 < VERSION_TRIES:
                time.sleep(3)
    raise RuntimeError("the API server's version could not be read: TCP_EXPORTER_OPERATOR_SIDECAR_MODE=auto needs it")


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """kopf's settings, and the controller started: it runs the watches and workers, kopf only logs in and serves
    the liveness probe."""
    # kopf handles no resource, so it keeps no progress, diff-base or finalizer anywhere; it watches only its
    # peering object (when peering is on), with these timeouts.
    settings.posting.enabled = False  # the operator posts its own Events, deduplicated
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 5
    settings.networking.error_backoffs = (1, 1, 2, 3, 5, 8)
    settings.execution.max_workers = 2  # kopf's own handlers: login and probes
    config = memo.config if hasattr(memo, "config") else Config.from_env()
    kube = Kube()
    if config.sidecar_mode == "auto":
        config = config.resolved(server_version(kube))
    logging.getLogger(__name__).info(
        "the sidecar is injected as %s",
        "a native sidecar (an init container that outlives the app)" if config.native() else "a regular container",
    )
    peering = None
    if not settings.peering.standalone and settings.peering.mandatory:
        settings.peering.clusterwide = True  # one ClusterKopfPeering, whatever namespaces are watched
        kube.ensure_peering(settings.peering.name)
        peering = settings.peering.name
    memo.controller = Controller(
        config,
        kube,
        getattr(memo, "namespaces", config.namespaces),
        peering,
        getattr(memo, "identity", ""),
        getattr(memo, "priority", settings.peering.priority),
    )
    memo.controller.start()
    if config.injection == "webhook":
        controller = memo.controller
        memo.webhook = webhook.start(
            config, kube, controller.workload_of, controller.psa_level, controller.conflict, controller.stopping
        )


@kopf.on.probe(id="credentials")
def credentials_probe(memo: kopf.Memo, **_: Any) -> str:
    """Liveness fails once the API server has refused the operator's credentials, loaded afresh, for longer than
    CREDENTIALS_GRACE seconds: a restart is then the way to new ones (a remounted token, a fixed kubeconfig)."""
    controller: Controller = memo.controller
    kube = controller.kube
    if kube.refused_since is not None:
        with contextlib.suppress(ApiError):
            kube.check_credentials()
        if kube.refused_since is None:
            # Accepted again: catch up on what was refused meanwhile, without waiting for the periodic resync.
            controller.full_pass()
    since = kube.refused_since
    if since is not None and time.monotonic() - since > controller.config.credentials_grace:
        raise kopf.PermanentError(
            f"the API server has refused the operator's credentials for {time.monotonic() - since:.0f} s"
        )
    return "ok"


@kopf.on.probe(id="controller")
def controller_probe(memo: kopf.Memo, **_: Any) -> dict[str, Any]:
    """Liveness reports whether the watches have listed and the queue; it fails only when workers are wedged."""
    health: dict[str, Any] = memo.controller.health()
    if health["stalled"]:
        raise kopf.PermanentError(f"no Deployment reconciled for {health['idle_seconds']} s while work waits")
    return health


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    memo.controller.stop()
    if getattr(memo, "webhook", None) is not None:
        memo.webhook.shutdown()
