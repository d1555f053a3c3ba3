"""The syntax of each `tcp-exporter/*` annotation, in one place for two enforcers: the operator (a Warning Event,
`check`) and, at apply time, a ValidatingAdmissionPolicy in CEL (`policy`, written to manifests/validation/ by
`tcp-exporter-operator policy`). Both give the very same message for the same value; a test holds them to it.

A rule is a full-match regular expression in the syntax both Python's `re` and CEL's RE2 read the same (no
backreferences or lookarounds), and for whole numbers a range. What needs more than one annotation, the pod
template or the operator's settings (min-replicas not above max-replicas, a port name the template declares, a
drain the grace period can hold) stays the operator's alone, as a Warning after the apply.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tcp_exporter import contract as sidecar

P = "tcp-exporter/"
# ASCII only, spelled out: Python's \s and (?i) take Unicode spaces and letters (NBSP, the long s U+017F)
# that RE2's do not.
_WS = "[ \t\n\f\r]*"
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = rf"{_DNS_LABEL}(\.{_DNS_LABEL})*"
_PORT_ITEM = _WS + r"([0-9]{1,5}|[a-z0-9]([-a-z0-9]*[a-z0-9])?)" + _WS
_QUANTITY = r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?"
_BOOLEAN = _WS + r"([Tt][Rr][Uu][Ee]|[Ff][Aa][Ll][Ss][Ee])" + _WS
# scheme://host[:port][/path], as annotations.prometheus_address reads it (which also refuses dot segments).
_ADDRESS = (
    _WS + r"[Hh][Tt][Tt][Pp][Ss]?://([A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?"
    r"(/[A-Za-z0-9._~%!$&'()*+;=:-]*)*/?" + _WS
)
INJECTABLE_METHODS = tuple(m for m in sidecar.METHODS if m != "auto")
FALLBACK_BEHAVIORS = ("currentReplicasIfHigher", "currentReplicas", "currentReplicasIfLower", "static", "none")
AUTH_MODES = ("basic", "bearer", "tls", "custom")


@dataclass(frozen=True)
class Rule:
    key: str
    pattern: str  # the whole value must match
    message: str  # what the user reads, from the operator's Warning or the API server's refusal
    low: int | None = None  # for whole numbers: the range (the pattern allows at most 9 digits)
    high: int | None = None

    def holds(self, value: str) -> bool:
        import re

        if not re.fullmatch(self.pattern, value):
            return False
        number = int(value) if self.low is not None or self.high is not None else None
        return number is None or (
            (self.low is None or number >= self.low) and (self.high is None or number <= self.high)
        )


def _whole(key: str, low: int, high: int | None = None) -> Rule:
    bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
    return Rule(P + key, r"[0-9]{1,9}", f"{P}{key} is not a whole number {bound} (digits only)", low, high)


def _one_of(key: str, values: tuple[str, ...]) -> Rule:
    return Rule(P + key, _WS + "(" + "|".join(values) + ")" + _WS, f"{P}{key} is not one of {', '.join(values)}")


def _boolean(key: str) -> Rule:
    return Rule(P + key, _BOOLEAN, f'{P}{key} is not "true" or "false"')


def _quantity(key: str) -> Rule:
    return Rule(P + key, _WS + _QUANTITY + _WS, f"{P}{key} is not a resource quantity (such as 10m, 0.5, 64Mi)")


RULES: tuple[Rule, ...] = (
    Rule(
        P + "port",
        _PORT_ITEM + "(," + _PORT_ITEM + ")*",
        f"{P}port is not a list of port numbers or container port names (such as 8080 or web,8443)",
    ),
    _one_of("method", INJECTABLE_METHODS),
    _whole("metrics-port", 1, 65535),
    _whole("threshold", 1),
    _whole("min-replicas", 1),
    _whole("max-replicas", 1),
    _boolean("scaledobject"),
    _boolean("scale-in-by-connections"),
    _boolean("unsafe-ssl"),
    _whole("polling-interval", 1, 3600),
    _whole("scale-down-stabilization", 0, 3600),
    _one_of("fallback-behavior", FALLBACK_BEHAVIORS),
    _whole("fallback-failure-threshold", 1, 1000),
    _whole("fallback-replicas", 0),
    _quantity("cpu-request"),
    _quantity("cpu-limit"),
    _quantity("memory-request"),
    _quantity("memory-limit"),
    Rule(P + "image", _WS + "[!-~]+" + _WS, f"{P}image is not an image reference (printable ASCII, no spaces)"),
    Rule(
        P + "drain",
        _WS + "[0-9]{1,6}(s|m|h)?" + _WS,
        f"{P}drain is not a duration (such as 90, 90s, 5m, 1h)",
    ),
    Rule(
        P + "prometheus",
        _ADDRESS,
        f"{P}prometheus is not an http(s)://host[:port][/path] address (no user, query or fragment)",
    ),
    Rule(
        P + "authentication-ref",
        _WS + "((TriggerAuthentication|ClusterTriggerAuthentication)/)?" + _DNS_SUBDOMAIN + _WS,
        f"{P}authentication-ref is not NAME, TriggerAuthentication/NAME or ClusterTriggerAuthentication/NAME",
    ),
    Rule(
        P + "auth-modes",
        _WS + "(" + "|".join(AUTH_MODES) + ")" + _WS + "(," + _WS + "(" + "|".join(AUTH_MODES) + ")" + _WS + ")*",
        f"{P}auth-modes is not a comma-separated list of KEDA's {', '.join(AUTH_MODES)}",
    ),
)
BY_KEY = {rule.key: rule for rule in RULES}


def check(annotations: Mapping[str, str]) -> str | None:
    """The message of the first rule an annotation breaks (in RULES' order), or None."""
    for rule in RULES:
        value = annotations.get(rule.key)
        if value is not None and not rule.holds(str(value)):
            return rule.message
    return None


POLICY = "tcp-exporter-annotations"


def _cel(rule: Rule) -> str:
    """The rule in CEL: it holds where the annotation is absent, unchanged by this request (a Deployment applied
    before the policy is not refused for an update that leaves it be), or valid."""
    key = json.dumps(rule.key)
    value = f"object.metadata.annotations[{key}]"
    valid = f"{value}.matches({json.dumps('^(' + rule.pattern + ')$')})"
    if rule.low is not None:
        valid += f" && int({value}) >= {rule.low}"
    if rule.high is not None:
        valid += f" && int({value}) <= {rule.high}"
    unchanged = (
        f"(oldObject != null && has(oldObject.metadata.annotations) && {key} in oldObject.metadata.annotations "
        f"&& oldObject.metadata.annotations[{key}] == {value})"
    )
    return f"!has(object.metadata.annotations) || !({key} in object.metadata.annotations) || {unchanged} || ({valid})"


def policy(account: str = "system:serviceaccount:tcp-exporter:tcp-exporter-operator") -> list[dict[str, Any]]:
    """The ValidatingAdmissionPolicy and its binding (Deny) that refuse a malformed annotation of a Deployment,
    StatefulSet or Argo Rollout at apply time (a kind not installed is simply never matched).
    The operator's own writes (`account`) are left to it."""
    labels = {"app.kubernetes.io/name": "tcp-exporter-operator", "app.kubernetes.io/component": "validation"}
    return [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": POLICY, "labels": labels},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": ["apps"],
                            "apiVersions": ["v1"],
                            "operations": ["CREATE", "UPDATE"],
                            "resources": ["deployments", "statefulsets"],
                        },
                        {
                            "apiGroups": ["argoproj.io"],
                            "apiVersions": ["v1alpha1"],
                            "operations": ["CREATE", "UPDATE"],
                            "resources": ["rollouts"],
                        },
                    ]
                },
                "matchConditions": [
                    {"name": "not-the-operator", "expression": f"request.userInfo.username != {json.dumps(account)}"}
                ],
                "validations": [{"expression": _cel(rule), "message": rule.message} for rule in RULES],
            },
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": POLICY, "labels": labels},
            "spec": {"policyName": POLICY, "validationActions": ["Deny"]},
        },
    ]


HEADER = """\
# Generated by `tcp-exporter-operator policy` from operator/tcp_exporter_operator/rules.py: do not edit
# (tests/test_validation.py fails if it differs). Refuses a malformed tcp-exporter/* annotation when a
# Deployment, StatefulSet or Argo Rollout is applied, with the message the operator's Warning would give
# (Kubernetes 1.30+).
"""
