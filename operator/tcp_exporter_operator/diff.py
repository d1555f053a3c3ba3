"""Differences between what is and what is wanted: whether a Deployment carries the injection, the JSON patch that
brings it there (with preconditions on what it replaces), and what an owned child object needs (create, update,
delete). Fields the API server or a child's controller adds are not differences. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import InvalidOperation
from typing import Any

from tcp_exporter_operator.annotations import (
    CONTAINER,
    Status,
    annotations_of,
    containers_of,
    init_containers_of,
    is_drain_hook,
    pre_stop,
    quantity_value,
    template_of,
)


def matches(desired: Any, actual: Any, key: str = "") -> bool:
    """Whether `actual` holds everything `desired` says; fields the API server defaults are ignored."""
    if isinstance(desired, Mapping):
        return isinstance(actual, Mapping) and all(matches(v, actual.get(k), k) for k, v in desired.items())
    if isinstance(desired, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(desired)
            and all(matches(d, a, key) for d, a in zip(desired, actual, strict=True))
        )
    if key in ("cpu", "memory") and actual is not None:
        try:
            return quantity_value(str(desired)) == quantity_value(str(actual))
        except InvalidOperation:
            return False
    return bool(desired == actual)


def in_sync(deployment: Mapping[str, Any], recorded: Status | None, desired: Mapping[str, Any], wanted: Status) -> bool:
    """Whether the Deployment (whose status annotation says `recorded`) already carries the injection `desired`
    (whose status is `wanted`) describes."""
    if recorded is None or not recorded.same_injection(wanted):
        return False
    actual = {c.get("name"): c for c in containers_of(deployment)}
    wanted_containers = {c.get("name"): c for c in containers_of(desired)}
    actual_inits = {c.get("name"): c for c in init_containers_of(deployment)}
    wanted_inits = {c.get("name"): c for c in init_containers_of(desired)}
    # The sidecar where it is wanted: among the containers, or a native sidecar among the init containers.
    if set(actual) != set(wanted_containers) or set(actual_inits) != set(wanted_inits):
        return False
    wanted_sidecar = wanted_containers.get(CONTAINER) or wanted_inits.get(CONTAINER)
    if not matches(wanted_sidecar, actual.get(CONTAINER) or actual_inits.get(CONTAINER)):
        return False
    for name, container in wanted_containers.items():  # the drain's preStop hooks on the app containers
        hook, found = pre_stop(container), pre_stop(actual[name])
        if (is_drain_hook(hook) or is_drain_hook(found)) and not matches(hook, found):
            return False
    return matches(annotations_of(template_of(desired)), annotations_of(template_of(deployment)))


def _pointer(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def deployment_patch(current: Mapping[str, Any], desired: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A JSON patch from current to desired that fails (422) if what it replaces changed since it was read.

    Preconditions cover exactly what is replaced, not the resourceVersion: the
    controllers' status updates then cause no false conflicts, and nobody
    else's annotations are touched.
    """
    ops: list[dict[str, Any]] = []
    old, new = current["metadata"].get("annotations"), desired["metadata"].get("annotations") or {}
    if not old:
        # Adding the whole map could drop one added meanwhile: only if nothing changed.
        ops.append({"op": "test", "path": "/metadata/resourceVersion", "value": current["metadata"]["resourceVersion"]})
        ops.append({"op": "add", "path": "/metadata/annotations", "value": dict(new)})
    else:
        ops += [{"op": "remove", "path": f"/metadata/annotations/{_pointer(k)}"} for k in old if k not in new]
        ops += [
            {"op": "add", "path": f"/metadata/annotations/{_pointer(k)}", "value": v}
            for k, v in new.items()
            if old.get(k) != v
        ]
    template_meta = template_of(current).get("metadata", {})
    old_pod, new_pod = template_meta.get("annotations"), template_of(desired).get("metadata", {}).get("annotations")
    if (old_pod or {}) != (new_pod or {}):
        ops.append({"op": "test", "path": "/spec/template/metadata", "value": dict(template_meta)})
        if new_pod:
            ops.append({"op": "add", "path": "/spec/template/metadata/annotations", "value": dict(new_pod)})
        else:
            ops.append({"op": "remove", "path": "/spec/template/metadata/annotations"})
    old_inits = (template_of(current).get("spec") or {}).get("initContainers")
    new_inits = init_containers_of(desired)
    if (old_inits or []) != new_inits:  # the native sidecar, added, moved or removed
        path = "/spec/template/spec/initContainers"
        if old_inits is None:
            # Nothing at that path to test: the pod spec it goes into is the precondition (before the containers'
            # replace below, which would change it). Not the resourceVersion: controllers' status writes move it.
            ops.append({"op": "test", "path": "/spec/template/spec", "value": template_of(current).get("spec")})
        else:
            ops.append({"op": "test", "path": path, "value": old_inits})
        ops.append({"op": "add", "path": path, "value": new_inits} if new_inits else {"op": "remove", "path": path})
    if containers_of(current) != containers_of(desired):
        ops.append({"op": "test", "path": "/spec/template/spec/containers", "value": containers_of(current)})
        ops.append({"op": "replace", "path": "/spec/template/spec/containers", "value": containers_of(desired)})
    return ops


# Fields of the ScaledObject that the operator writes only when asked: their presence alone is a difference.
SCALED_OBJECT_OPTIONAL: tuple[tuple[str | int, ...], ...] = (
    ("pollingInterval",),
    ("fallback",),
    ("fallback", "behavior"),
    ("advanced",),
    ("triggers", 0, "authenticationRef"),
    *(("triggers", 0, "metadata", key) for key in ("authModes", "namespace", "customHeaders", "unsafeSsl")),
)


def _at(obj: Any, path: tuple[str | int, ...]) -> Any:
    for part in path:
        if isinstance(part, int):
            obj = obj[part] if isinstance(obj, list) and len(obj) > part else None
        else:
            obj = obj.get(part) if isinstance(obj, Mapping) else None
        if obj is None:
            return None
    return obj


def child_action(
    wanted: Mapping[str, Any] | None,
    actual: Mapping[str, Any] | None,
    optional: tuple[tuple[str | int, ...], ...] = (),
) -> str | None:
    """create, update, delete or None: what brings an owned child object (`actual`) to `wanted`.

    Fields the API server or the child's controller may add are not differences (`matches`); the `optional`
    fields that `actual` has and `wanted` lacks are (an option the user removed).
    """
    if wanted is None:
        return "delete" if actual is not None else None
    if actual is None:
        return "create"
    spec, have = wanted.get("spec"), actual.get("spec")
    if not matches(spec, have) or not matches(wanted["metadata"]["labels"], actual.get("metadata", {}).get("labels")):
        return "update"
    if any(_at(have, path) is not None and _at(spec, path) is None for path in optional):
        return "update"
    return None
