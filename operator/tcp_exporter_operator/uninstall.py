"""`tcp-exporter-operator uninstall`: take out everything the operator put into the cluster.

For each Deployment that carries the operator's status annotation: one JSON patch that removes the sidecar, the
pod-template annotations the operator added (the status annotation lists them) and the status annotation
itself: one rollout per Deployment. Then every ScaledObject and PodMonitor labelled as the operator's is deleted,
and the injection webhook's configuration (INJECTION=webhook); the pods that webhook injected keep their sidecar
until replaced, and a line per Deployment says so and how (nothing of it is in the Deployment to take out).
The users' own `tcp-exporter/*` annotations are theirs and stay (an operator installed again would act on them).
Run it after the operator is deleted, or it would inject again whatever is still annotated.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any, TextIO

from kubernetes import client

from tcp_exporter_operator.annotations import A_STATUS, recorded_status
from tcp_exporter_operator.desired import uninject
from tcp_exporter_operator.diff import deployment_patch
from tcp_exporter_operator.events import CHILDREN, MANAGED_BY
from tcp_exporter_operator.kube import ApiError, Conflict, Kube, custom_lister
from tcp_exporter_operator.webhook import INJECTED, owning_deployment
from tcp_exporter_operator.workloads import (
    ROLLOUT,
    ROLLOUTS,
    STATEFULSET,
    key_of,
    kind_of,
    restart_command,
    said,
    split,
)

SELECTOR = f"app.kubernetes.io/managed-by={MANAGED_BY}"


def _pages(kube: Kube, list_page: Any) -> Iterator[dict[str, Any]]:
    token: str | None = None
    while True:

        def page(api: client.ApiClient, token: str | None = token) -> Any:
            return list_page(api, token)

        body = json.loads(kube.call(page).data)
        yield from body.get("items") or []
        token = (body.get("metadata") or {}).get("continue")
        if not token:
            return


def _workloads(kube: Kube, namespace: str | None, plural: str) -> Iterator[dict[str, Any]]:
    """Every Deployment or StatefulSet (`plural`: deployment, stateful_set) of the namespace (None: of the
    cluster), listed in pages."""

    def page(api: client.ApiClient, token: str | None) -> Any:
        apps = client.AppsV1Api(api)
        if namespace is None:
            every = getattr(apps, f"list_{plural}_for_all_namespaces")
            return every(limit=500, _continue=token, _preload_content=False)
        return getattr(apps, f"list_namespaced_{plural}")(namespace, limit=500, _continue=token, _preload_content=False)

    return _pages(kube, page)


def deployments(kube: Kube, namespace: str | None) -> Iterator[dict[str, Any]]:
    return _workloads(kube, namespace, "deployment")


def _optional(listed: Iterator[dict[str, Any]], kind: str) -> Iterator[dict[str, Any]]:
    """The items of a kind the cluster may not serve (a CRD not installed) or this account may not read, kind said;
    none then: the rest is uninstalled all the same."""
    try:
        for item in listed:
            yield said(item, kind)
    except ApiError as exc:
        if exc.status not in (403, 404):
            raise


def statefulsets(kube: Kube, namespace: str | None) -> Iterator[dict[str, Any]]:
    return _optional(_workloads(kube, namespace, "stateful_set"), STATEFULSET)


def rollouts(kube: Kube, namespace: str | None) -> Iterator[dict[str, Any]]:
    """Every Argo Rollout, where its kind is served and this account may read it."""
    lister = custom_lister(*ROLLOUTS)
    listed = _pages(kube, lambda api, token: lister(api, namespace, limit=500, _continue=token))
    return _optional(listed, ROLLOUT)


def injected_deployments(kube: Kube, namespace: str | None) -> Iterator[dict[str, Any]]:
    """Every Deployment, StatefulSet and Rollout that carries the operator's status annotation."""
    for item in (*deployments(kube, namespace), *statefulsets(kube, namespace), *rollouts(kube, namespace)):
        if A_STATUS in (item["metadata"].get("annotations") or {}):
            yield item


def children(kube: Kube, kind: str, namespace: str | None) -> Iterator[dict[str, Any]]:
    group, version, plural = CHILDREN[kind]

    def page(api: client.ApiClient, token: str | None) -> Any:
        custom = client.CustomObjectsApi(api)
        if namespace is None:
            return custom.list_cluster_custom_object(
                group, version, plural, label_selector=SELECTOR, limit=500, _continue=token, _preload_content=False
            )
        return custom.list_namespaced_custom_object(
            group, version, namespace, plural, label_selector=SELECTOR, limit=500, _continue=token,
            _preload_content=False,
        )  # fmt: skip

    try:
        yield from _pages(kube, page)
    except ApiError as exc:
        if exc.status != 404:  # the kind is not installed: nothing of it to remove
            raise


WEBHOOK_SELECTOR = "app.kubernetes.io/name=tcp-exporter-operator,app.kubernetes.io/component=webhook"


def webhook_configurations(kube: Kube) -> list[str]:
    """The injection webhook's MutatingWebhookConfigurations (INJECTION=webhook), by their labels."""
    try:
        body: Any = kube.call(
            lambda api: client.AdmissionregistrationV1Api(api).list_mutating_webhook_configuration(
                label_selector=WEBHOOK_SELECTOR, _preload_content=False
            )
        )
    except ApiError as exc:
        if exc.status == 403:  # a namespace admin's account: not its to delete
            return []
        raise
    return [str(item["metadata"]["name"]) for item in json.loads(body.data).get("items") or []]


def delete_webhook_configuration(kube: Kube, name: str) -> None:
    try:
        kube.call(
            lambda api: client.AdmissionregistrationV1Api(api).delete_mutating_webhook_configuration(
                name, _preload_content=False
            )
        )
    except ApiError as exc:
        if exc.status != 404:
            raise


def webhook_pods(kube: Kube, namespace: str | None) -> list[str]:
    """One line per Deployment whose running pods got the sidecar from the webhook: those pods keep it until they
    are replaced (nothing of it is in the Deployment to take out), so the line says how."""

    def page(api: client.ApiClient, token: str | None) -> Any:
        core = client.CoreV1Api(api)
        if namespace is None:
            return core.list_pod_for_all_namespaces(limit=500, _continue=token, _preload_content=False)
        return core.list_namespaced_pod(namespace, limit=500, _continue=token, _preload_content=False)

    owners: dict[tuple[str, str], int] = {}
    for pod in _pages(kube, page):
        meta = pod["metadata"]
        if INJECTED in (meta.get("annotations") or {}) and not meta.get("deletionTimestamp"):
            owner = (meta.get("namespace", ""), owning_deployment(pod) or f"Pod/{meta.get('name')}")
            owners[owner] = owners.get(owner, 0) + 1
    lines = []
    for (ns, workload), count in sorted(owners.items()):
        kind, name = split(workload)
        if kind == "Pod":  # its workload is not one the operator knows: replacing the pod is its owner's business
            lines.append(f"Pod {ns}/{name}: runs the sidecar the webhook injected until it is replaced")
            continue
        lines.append(
            f"{kind} {ns}/{name}: {count} pods run the sidecar the webhook injected; they keep it until replaced: "
            + restart_command(kind, ns, name)
        )
    return lines


ATTEMPTS = 5  # patches of one Deployment that may meet a conflict (it changed since read) before giving up


def uninject_one(kube: Kube, listed: dict[str, Any], dry_run: bool) -> str:
    """Take the injection out of one listed Deployment: "removed", "gone" (deleted since it was listed, or no
    longer injected) or "failed" (it kept changing under us)."""
    current = listed
    for _attempt in range(ATTEMPTS):
        if A_STATUS not in (current["metadata"].get("annotations") or {}):
            return "gone"
        if dry_run:
            return "removed"
        try:
            kube.patch_deployment(
                *key_of(listed), deployment_patch(current, uninject(current, recorded_status(current)))
            )
            return "removed"
        except Conflict:  # changed since it was read: read it again
            found = kube.get_deployment(*key_of(listed))
        except ApiError as exc:
            if exc.status != 404:
                raise
            found = None
        if found is None:
            return "gone"
        current = found
    return "failed"


def uninstall(kube: Kube, namespaces: tuple[str, ...], dry_run: bool, out: TextIO = sys.stdout) -> tuple[int, int]:
    """Remove what the operator injected; returns the number of objects changed (or, dry, to change) and of those
    that could not be."""
    verb = "would remove" if dry_run else "removed"
    changed = failed = 0
    for namespace in namespaces or (None,):
        for listed in injected_deployments(kube, namespace):
            meta = listed["metadata"]
            result = uninject_one(kube, listed, dry_run)
            where = f"{kind_of(listed)} {meta['namespace']}/{meta['name']}"
            if result == "removed":
                print(f"{where}: {verb} the sidecar and annotations", file=out)
                changed += 1
            elif result == "gone":
                print(f"{where}: deleted or no longer injected since it was listed; nothing to remove", file=out)
            else:
                print(f"{where}: NOT removed: it changed {ATTEMPTS} times while being patched; run again", file=out)
                failed += 1
        for kind in CHILDREN:
            for child in children(kube, kind, namespace):
                cmeta = child["metadata"]
                if not dry_run:
                    kube.delete_child(kind, cmeta["namespace"], cmeta["name"])
                done = "would delete" if dry_run else "deleted"
                print(f"{kind} {cmeta['namespace']}/{cmeta['name']}: {done}", file=out)
                changed += 1
        for line in webhook_pods(kube, namespace):
            print(line, file=out)
    # The webhook configuration is the cluster's, not a namespace's: only a whole uninstall (no -n) deletes it.
    for config in webhook_configurations(kube) if not namespaces else []:
        if not dry_run:
            delete_webhook_configuration(kube, config)
        print(f"MutatingWebhookConfiguration {config}: {'would delete' if dry_run else 'deleted'}", file=out)
        changed += 1
    summary = f"{changed} objects {'to change' if dry_run else 'changed'}"
    print(summary + (f", {failed} could not be changed" if failed else ""), file=out)
    return changed, failed
