"""The `tcp-exporter-operator` command: run the operator, or render an injection offline."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import socket
import sys
import urllib.parse
from collections.abc import Sequence
from typing import Any

import yaml
from tcp_exporter import __version__
from tcp_exporter.logs import TEXT_FORMAT, JsonFormatter

from tcp_exporter_operator.annotations import A_PORT, asks_for_scaled_object, check_settings
from tcp_exporter_operator.config import Config
from tcp_exporter_operator.plan import Facts, plan
from tcp_exporter_operator.workloads import workload_api_version


def prometheus_url(value: str) -> str:
    """--prometheus: an http(s) address with a host (a wrong one exits 2 with the usage)."""
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{value!r}: give an http:// or https:// address of a Prometheus")
    return value.rstrip("/")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tcp-exporter-operator",
        description="Inject the tcp-exporter sidecar into Deployments annotated tcp-exporter/port and own a KEDA "
        "ScaledObject for each. Configuration comes from TCP_EXPORTER_OPERATOR_* variables.",
    )
    parser.add_argument("--version", action="version", version=f"tcp-exporter-operator {__version__}")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the operator (the default)")
    add_run_flags(run)
    render = sub.add_parser("render", help="print the injected Deployment and its ScaledObject, without a cluster")
    render.add_argument("-f", "--filename", required=True, help="a Deployment manifest (YAML or JSON), - for stdin")
    render.add_argument(
        "--psa-level",
        choices=("privileged", "baseline", "restricted"),
        default=None,
        help="the namespace's Pod Security Admission enforce level",
    )
    render.add_argument(
        "--namespace", "-n", default="default", help="the namespace of Deployments that name none (default default)"
    )
    render.add_argument(
        "--config-map",
        metavar="FILE",
        default=None,
        help="the operator's ConfigMap (as installed: kubectl get configmap -o yaml) instead of this shell's "
        "TCP_EXPORTER_OPERATOR_* variables, so that render plans with the cluster's settings",
    )
    render.add_argument(
        "--podmonitor-crd",
        action="store_true",
        help="the cluster has the Prometheus Operator's PodMonitor CRD: print the PodMonitor too when the "
        "discovery setting includes podmonitor",
    )
    show = sub.add_parser(
        "status",
        help="one line per annotated workload: version and method injected, KEDA's conditions, replicas, "
        "connections (with --prometheus), the operator's Warning; exits 1 when one needs attention",
    )
    show.add_argument(
        "--namespace", "-n", action="append", default=[], help="only in this namespace (repeatable); default: all"
    )
    show.add_argument("--output", "-o", choices=("text", "json"), default="text", help="default text")
    show.add_argument(
        "--prometheus",
        type=prometheus_url,
        metavar="URL",
        help="also show each workload's connections now, by its ScaledObject's query, from this Prometheus (e.g. "
        "http://127.0.0.1:9090 through kubectl port-forward); a workload it has no answer for needs attention",
    )
    remove = sub.add_parser(
        "uninstall",
        help="remove what the operator injected (sidecars, their annotations, ScaledObjects, PodMonitors); "
        "run it once the operator itself is deleted",
    )
    remove.add_argument("--dry-run", action="store_true", help="print what would be removed, change nothing")
    remove.add_argument(
        "--namespace", "-n", action="append", default=[], help="only in this namespace (repeatable); default: all"
    )
    policy = sub.add_parser(
        "policy",
        help="print the ValidatingAdmissionPolicy that refuses malformed tcp-exporter/* annotations at apply time "
        "(manifests/validation/ holds it)",
    )
    policy.add_argument(
        "--account",
        default="system:serviceaccount:tcp-exporter:tcp-exporter-operator",
        help="the operator's user name, whose own writes the policy leaves alone (default %(default)s)",
    )
    return parser


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        help="watch this namespace (repeatable); default: all namespaces",
    )
    parser.add_argument(
        "--peering",
        default=None,
        metavar="NAME",
        help="kopf peering name, to run more than one replica (one is active); default: standalone",
    )
    parser.add_argument(
        "--priority",
        type=int,
        default=None,
        help="peering priority; the highest alive is active (default: random, so that identical replicas "
        "differ: kopf pauses every replica of equal priority)",
    )
    parser.add_argument(
        "--liveness", default="http://0.0.0.0:8080/healthz", help="liveness endpoint kopf serves (default %(default)s)"
    )
    parser.add_argument(
        "--metrics-address",
        default=":8081",
        metavar="HOST:PORT",
        help="serve the operator's own Prometheus metrics on /metrics here; empty: not at all (default %(default)s)",
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text lines, or one JSON object per line for log collectors (default %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="the operator's own log level (default info); kopf's is warning",
    )


# Render refuses what the operator would refuse: nothing is injected for these.
RENDER_ERRORS = ("InvalidAnnotation", "ContainerConflict", "AutoscalerConflict", "WorkloadRefNotInjected")


def render(
    path: str, psa_level: str | None, cfg: Config, namespace: str = "default", podmonitor_crd: bool = False
) -> int:
    """What the operator would do to each annotated workload of a manifest (a Deployment, or a StatefulSet or Argo
    Rollout where the configuration enables its kind), printed: the same `plan`, with the
    facts a cluster would give assumed (KEDA installed, the PodMonitor CRD as told, no other autoscaler).
    Exits 1 when the operator would refuse a Deployment, or write no ScaledObject for one that did not ask for
    none (`tcp-exporter/scaledobject: "false"`)."""
    try:
        text = sys.stdin.read() if path == "-" else open(path).read()  # noqa: SIM115
        documents = [d for d in yaml.safe_load_all(text) if d]
    except OSError as exc:
        print(f"tcp-exporter-operator: render: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except yaml.YAMLError as exc:
        print(f"tcp-exporter-operator: render: {path} is not valid YAML: {exc}", file=sys.stderr)
        return 2
    if not all(isinstance(d, dict) for d in documents):
        print(f"tcp-exporter-operator: render: {path}: every document must be a Kubernetes object", file=sys.stderr)
        return 2

    def workload(doc: dict[str, Any]) -> bool:
        kind = doc.get("kind")
        return kind in cfg.workload_kinds and doc.get("apiVersion") == workload_api_version(str(kind))

    if cfg.sidecar_mode == "auto" and any(workload(d) for d in documents):
        # The operator resolves auto against the API server's version; offline, render cannot.
        print(
            "tcp-exporter-operator: render: SIDECAR_MODE=auto renders a native sidecar, as the operator injects it on "
            "Kubernetes 1.33+; for an older cluster set TCP_EXPORTER_OPERATOR_SIDECAR_MODE=container (or in the "
            "--config-map) so that what you commit is what the operator keeps",
            file=sys.stderr,
        )
    out: list[dict[str, Any]] = []
    failed = False
    for doc in documents:
        if not workload(doc):
            out.append(doc)
            continue
        doc.setdefault("metadata", {}).setdefault("namespace", namespace)
        annotations = doc["metadata"].get("annotations") or {}
        if A_PORT not in annotations:
            out.append(doc)
            continue
        name = doc["metadata"].get("name")
        result = plan(doc, Facts(psa_level=psa_level, pod_monitor_crd=podmonitor_crd), cfg)
        for event in result.events:
            if event.type == "Warning":
                print(f"tcp-exporter-operator: {name}: {event.message}", file=sys.stderr)
                failed = failed or event.reason in RENDER_ERRORS
        out.append(result.desired if result.desired is not None else doc)
        if asks_for_scaled_object(annotations) and result.child("ScaledObject") is None and not failed:
            print(f"tcp-exporter-operator: {name}: the operator would write no ScaledObject for it", file=sys.stderr)
            failed = True
        for kind in ("ScaledObject", "PodMonitor"):
            write = result.child(kind)
            if write is not None and write.action == "create":
                # Offline there is no Deployment UID to own it by: applied from Git, the operator adopts it by its
                # managed-by label and name.
                write.body["metadata"].pop("ownerReferences", None)
                out.append(write.body)
    if failed:
        return 1
    yaml.safe_dump_all(out, sys.stdout, sort_keys=False)
    return 0


def config_from_map(path: str) -> Config:
    """The operator's configuration from its ConfigMap's manifest (its `data`; or a List of that one ConfigMap),
    checked as at start."""
    with open(path) as f:
        doc = yaml.safe_load(f)
    if isinstance(doc, dict) and isinstance(doc.get("items"), list) and len(doc["items"]) == 1:
        doc = doc["items"][0]  # kubectl get -l ... -o yaml: a List of the one ConfigMap
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, dict):
        raise ValueError("not a ConfigMap with data")
    cfg = Config.from_env({str(k): str(v) for k, v in data.items()})
    check_settings(cfg)
    return cfg


def on_cluster(args: argparse.Namespace) -> int:
    """status and uninstall: with the caller's credentials; a missing kubeconfig or a refusal in one line."""
    import urllib3
    from kubernetes.config import ConfigException

    from tcp_exporter_operator.kube import ApiError, Kube

    try:
        if args.command == "status":
            from tcp_exporter_operator.status import status

            return status(Kube(), tuple(args.namespace), args.output, prometheus=args.prometheus)
        from tcp_exporter_operator.uninstall import uninstall

        _, failed = uninstall(Kube(), tuple(args.namespace), args.dry_run)
        return 1 if failed else 0
    except ConfigException as exc:
        print(f"tcp-exporter-operator: {args.command}: no cluster credentials: {exc}", file=sys.stderr)
    except (ApiError, OSError, urllib3.exceptions.HTTPError) as exc:  # refused, or no answer
        print(f"tcp-exporter-operator: {args.command}: {exc}", file=sys.stderr)
    return 2 if args.command == "status" else 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["run", *argv]
    args = build_parser().parse_args(argv)
    try:
        cfg = Config.from_env()
        check_settings(cfg)
    except ValueError as exc:  # InvalidSpec included: it names the setting
        print(f"tcp-exporter-operator: {exc}", file=sys.stderr)
        return 2
    if args.command == "render":
        if args.config_map is not None:
            try:
                cfg = config_from_map(args.config_map)
            except (OSError, yaml.YAMLError, ValueError) as exc:
                print(f"tcp-exporter-operator: render: --config-map {args.config_map}: {exc}", file=sys.stderr)
                return 2
        return render(args.filename, args.psa_level, cfg, args.namespace, args.podmonitor_crd)
    if args.command == "policy":
        from tcp_exporter_operator import rules

        sys.stdout.write(rules.HEADER + yaml.safe_dump_all(rules.policy(args.account), sort_keys=False, width=1000))
        return 0
    if args.command in ("status", "uninstall"):
        return on_cluster(args)
    import kopf

    from tcp_exporter_operator import (
        handlers,  # noqa: F401 - registers the handlers
        metrics,
    )

    logging.basicConfig(level=logging.WARNING, format=TEXT_FORMAT)
    if args.log_format == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
    try:
        metrics.serve(args.metrics_address)
    except (OSError, ValueError) as exc:
        print(f"tcp-exporter-operator: --metrics-address {args.metrics_address!r}: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("tcp_exporter_operator").setLevel(args.log_level.upper())
    logging.getLogger("kopf._core.engines.peering").setLevel(logging.INFO)  # pausing and resuming replicas
    namespaces = args.namespace or list(cfg.namespaces)
    priority = args.priority if args.priority is not None else secrets.randbelow(1 << 30)
    # Named here, not by kopf: the operator's own Deployment workers apply kopf's peering rule by this identity.
    identity = os.environ.get("POD_ID") or f"{socket.gethostname()}/{secrets.token_hex(4)}"
    kopf.run(
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=args.peering is None,
        peering_name=args.peering,
        priority=priority,
        identity=identity,  # type: ignore[arg-type]  # kopf.Identity, a NewType of str kopf does not export
        liveness_endpoint=args.liveness,
        memo=kopf.Memo(config=cfg, namespaces=tuple(namespaces), identity=identity, priority=priority),
    )
    return 0
