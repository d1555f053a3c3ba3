"""`uninstall`'s handling of what changes under it between its listing and its patch. The API server's answers
(a 404, a failed precondition) are stood in for by a Kube whose two calls raise them; the patch itself and the
listing are tested on the real control plane (test_uninstall.py)."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from tcp_exporter_operator import uninstall as module
from tcp_exporter_operator.kube import ApiError, Conflict


def injected(name: str) -> dict[str, Any]:
    status = {"version": "0.2.0", "podAnnotations": [], "hash": "x"}
    return {
        "metadata": {
            "name": name,
            "namespace": "shop",
            "resourceVersion": "7",
            "annotations": {"tcp-exporter/port": "8080", "tcp-exporter/status": json.dumps(status)},
        },
        "spec": {"template": {"spec": {"containers": [{"name": "app"}, {"name": "tcp-exporter"}]}}},
    }


class Answers:
    """patch_deployment answers per Deployment name: "ok", "gone" (404) or "conflict" (always changed)."""

    def __init__(self, **answers: str) -> None:
        self.answers = answers
        self.patched: list[str] = []

    def patch_deployment(self, namespace: str, name: str, ops: list[dict[str, Any]]) -> tuple[str, int]:
        answer = self.answers[name]
        if answer == "gone":
            raise ApiError(404, '{"kind":"Status","reason":"NotFound"}')
        if answer == "conflict":
            raise Conflict(name)
        self.patched.append(name)
        return "8", 2

    def get_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        return injected(name)


def run(monkeypatch: pytest.MonkeyPatch, kube: Answers, names: list[str]) -> tuple[str, tuple[int, int]]:
    monkeypatch.setattr(module, "injected_deployments", lambda kube, namespace: iter(injected(n) for n in names))
    monkeypatch.setattr(module, "children", lambda kube, kind, namespace: iter(()))
    monkeypatch.setattr(module, "webhook_pods", lambda kube, namespace: [])
    monkeypatch.setattr(module, "webhook_configurations", lambda kube: [])
    out = io.StringIO()
    result = module.uninstall(kube, (), False, out)  # type: ignore[arg-type]
    return out.getvalue(), result


def test_a_deployment_deleted_between_listing_and_patch_is_skipped_and_the_rest_still_uninstalled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kube = Answers(**{"checkout.v2": "gone", "web-api": "ok"})
    out, (changed, failed) = run(monkeypatch, kube, ["checkout.v2", "web-api"])
    assert kube.patched == ["web-api"]
    assert (changed, failed) == (1, 0)
    assert "shop/checkout.v2: deleted or no longer injected" in out


def test_a_deployment_that_keeps_changing_is_reported_not_removed_and_not_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kube = Answers(**{"checkout.v2": "conflict", "web-api": "ok"})
    out, (changed, failed) = run(monkeypatch, kube, ["checkout.v2", "web-api"])
    assert (changed, failed) == (1, 1)
    assert "shop/checkout.v2: NOT removed" in out
    assert "removed the sidecar" not in out.split("\n")[0]
    assert out.strip().endswith("1 objects changed, 1 could not be changed")
