"""`tcp-exporter-operator uninstall`: take out everything the operator put into the cluster.

For each Deployment that carries the operator's status annotation: one JSON patch that removes the sidecar, the
pod-template annotations the operator added (the status annotation lists them) and the status annotation
itself: one rollout per Deployment. Then every ScaledObject and PodMonitor labelled as the operator's is deleted.
The users' own `tcp-exporter/*` annotations are theirs and stay (an operator installed again would act on them).
Run it after the operator is deleted, or it would inject again whatever is still annotated.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any, TextIO

from kubernetes import client

from tcp_exporter_operator.annotations import A_STATUS
from tcp_exporter_operator.desired import uninject
from tcp_exporter_operator.diff import deployment_patch
from tcp_exporter_operator.events import MANAGED_BY
from tcp_exporter_operator.kube import CHILDREN, ApiError, Conflict, Kube

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


def injected_deployments(kube: Kube, namespace: str | None) -> Iterator[dict[str, Any]]:
    def page(api: client.ApiClient, token: str | None) -> Any:
        apps = client.AppsV1Api(api)
        if namespace is None:
            return apps.list_deployment_for_all_namespaces(limit=500, _continue=token, _preload_content=False)
        return apps.list_namespaced_deployment(namespace, limit=500, _continue=token, _preload_content=False)

    for item in _pages(kube, page):
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


def uninstall(kube: Kube, namespaces: tuple[str, ...], dry_run: bool, out: TextIO = sys.stdout) -> int:
    """Remove what the operator injected; returns the number of objects changed (or, dry, to change)."""
    verb = "would remove" if dry_run else "removed"
    changed = 0
    for namespace in namespaces or (None,):
        for listed in injected_deployments(kube, namespace):
            meta, current = listed["metadata"], listed
            for _attempt in range(5):
                ops = deployment_patch(current, uninject(current))
                try:
                    if not dry_run:
                        kube.patch_deployment(meta["namespace"], meta["name"], ops)
                    break
                except Conflict:  # changed since it was listed: read it again
                    current = kube.get_deployment(meta["namespace"], meta["name"]) or current
            print(f"Deployment {meta['namespace']}/{meta['name']}: {verb} the sidecar and annotations", file=out)
            changed += 1
        for kind in CHILDREN:
            for child in children(kube, kind, namespace):
                cmeta = child["metadata"]
                if not dry_run:
                    kube.delete_child(kind, cmeta["namespace"], cmeta["name"])
                done = "would delete" if dry_run else "deleted"
                print(f"{kind} {cmeta['namespace']}/{cmeta['name']}: {done}", file=out)
                changed += 1
    print(f"{changed} objects {'to change' if dry_run else 'changed'}", file=out)
    return changed
