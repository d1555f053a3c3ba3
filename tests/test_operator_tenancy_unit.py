"""Multi-tenancy rules of the planner: the admin's credentials go only to the addresses the admin allows, and an
annotation cannot name the cluster's credentials unless the admin lets it. Pure: the cluster test is
tests/test_tenants.py."""

from __future__ import annotations

from typing import Any

import pytest
from tcp_exporter_operator.annotations import InvalidSpec, check_settings, prometheus_address
from tcp_exporter_operator.config import Config
from tcp_exporter_operator.plan import Facts, Plan, plan

ATTACKER = "https://attacker.example/x"
CENTRAL = Config(authentication_ref="ClusterTriggerAuthentication/central-prom", auth_modes="bearer")


def plan_with(annotations: dict[str, str], facts: Facts) -> Plan:
    return planned(annotations, Config(), facts)


def planned(annotations: dict[str, str], cfg: Config, facts: Facts | None = None) -> Plan:
    deployment: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "web-api",
            "namespace": "team-a",
            "uid": "u1",
            "resourceVersion": "1",
            "annotations": {"tcp-exporter/port": "8080", **annotations},
        },
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "web-api"}},
            "template": {
                "metadata": {"labels": {"app": "web-api"}},
                "spec": {"containers": [{"name": "app", "image": "app:1", "ports": [{"containerPort": 8080}]}]},
            },
        },
    }
    return plan(deployment, facts or Facts(), cfg)


def refused(result: Plan) -> str:
    assert result.writes == 0, result
    (event,) = result.events
    assert (event.type, event.reason) == ("Warning", "InvalidAnnotation")
    return event.message


def scaled_object(result: Plan) -> dict[str, Any]:
    (write,) = [w for w in result.children if w.kind == "ScaledObject"]
    return write.body


def test_an_annotation_cannot_send_the_operators_cluster_credentials_to_its_own_server() -> None:
    message = refused(planned({"tcp-exporter/prometheus": ATTACKER}, CENTRAL))
    assert "TCP_EXPORTER_OPERATOR_AUTHENTICATION_REF" in message and "ALLOWED_PROMETHEUS" in message
    headers = Config(custom_headers="Authorization=Bearer s3cret")
    assert "CUSTOM_HEADERS" in refused(planned({"tcp-exporter/prometheus": ATTACKER}, headers))
    # The operator's own address (or one the admin allows) still gets them.
    trigger = scaled_object(planned({}, CENTRAL))["spec"]["triggers"][0]
    assert trigger["authenticationRef"] == {"name": "central-prom", "kind": "ClusterTriggerAuthentication"}
    allowed = Config(**{**CENTRAL.__dict__, "allowed_prometheus": ("https://thanos.monitoring.svc:9090/",)})
    so = scaled_object(planned({"tcp-exporter/prometheus": "https://thanos.monitoring.svc:9090/team-a"}, allowed))
    assert so["spec"]["triggers"][0]["metadata"]["serverAddress"] == "https://thanos.monitoring.svc:9090/team-a"


def test_a_fragment_query_or_user_in_the_address_is_refused_whoever_gives_it() -> None:
    for address in (
        ATTACKER + "#",
        "https://prometheus.monitoring.svc:9090/#",
        "https://prometheus.monitoring.svc:9090/api?x=1",
        "https://user:pw@prometheus.monitoring.svc:9090",
        "https://prometheus.monitoring.svc:9090\\@attacker.example",
        "https://prometheus.monitoring.svc:99999",
        "https://prométheus.example",
        "ftp://prometheus.monitoring.svc",
        "https://thanos.example:9090/tenants/team-a/../team-b",
        "https://thanos.example:9090/tenants/team-a/%2e%2e/team-b",
    ):
        with pytest.raises(InvalidSpec, match="is not an http"):
            prometheus_address(address, "tcp-exporter/prometheus")
        assert "is not an http" in refused(planned({"tcp-exporter/prometheus": address}, Config()))
    assert prometheus_address("HTTP://Prometheus.Monitoring.svc:9090/", "x") == "http://prometheus.monitoring.svc:9090"


def test_an_annotation_names_a_cluster_trigger_authentication_only_where_the_admin_allows_it() -> None:
    cluster_ref = {
        "tcp-exporter/authentication-ref": "ClusterTriggerAuthentication/amp",
        "tcp-exporter/auth-modes": "bearer",
    }
    assert "ALLOW_CLUSTER_TRIGGER_AUTH" in refused(planned(cluster_ref, Config()))
    allowed = Config(allow_cluster_trigger_auth=True)
    assert scaled_object(planned(cluster_ref, allowed))["spec"]["triggers"][0]["authenticationRef"]["kind"] == (
        "ClusterTriggerAuthentication"
    )
    # ... and even then those credentials go only to an allowed address.
    assert "ClusterTriggerAuthentication/amp" in refused(
        planned({**cluster_ref, "tcp-exporter/prometheus": ATTACKER}, allowed)
    )


def test_a_namespaces_own_trigger_authentication_goes_where_the_namespace_says() -> None:
    own = {
        "tcp-exporter/authentication-ref": "team-a-prom",
        "tcp-exporter/auth-modes": "bearer",
        "tcp-exporter/prometheus": "https://prometheus.team-a.svc:9090",
        "tcp-exporter/custom-headers": "X-Scope-OrgID=team-a",
    }
    trigger = scaled_object(planned(own, Config()))["spec"]["triggers"][0]
    assert trigger["metadata"]["serverAddress"] == "https://prometheus.team-a.svc:9090"


def test_with_an_allow_list_an_annotation_names_only_its_addresses_and_prefixes_stop_at_a_path_boundary() -> None:
    cfg = Config(allowed_prometheus=("https://thanos.example:9090/tenants/", "http://prom.team-b.svc:9090"))
    for ok in (
        "https://thanos.example:9090/tenants/team-a",
        "http://prom.team-b.svc:9090/",
        "http://prometheus-operated.monitoring.svc:9090",
    ):
        assert scaled_object(planned({"tcp-exporter/prometheus": ok}, cfg))
    for bad in (
        "https://thanos.example:9090/tenants-evil",
        "https://thanos.example:9090",
        "https://thanos.example:9091/tenants/x",
        "http://prom.team-b.svc:9090/other",
        "http://prom.team-b.svc.attacker.example:9090",
    ):
        assert "ALLOWED_PROMETHEUS" in refused(planned({"tcp-exporter/prometheus": bad}, cfg)), bad


def test_connection_aware_scale_in_reads_only_from_an_address_the_admin_allows() -> None:
    message = refused(
        planned({"tcp-exporter/prometheus": ATTACKER, "tcp-exporter/scale-in-by-connections": "true"}, Config())
    )
    assert "tcp-exporter/scale-in-by-connections" in message and "ALLOWED_PROMETHEUS" in message


def test_a_malformed_allow_list_entry_stops_the_operator_at_start_naming_the_setting() -> None:
    with pytest.raises(InvalidSpec, match="TCP_EXPORTER_OPERATOR_ALLOWED_PROMETHEUS"):
        check_settings(Config(allowed_prometheus=("https://ok.example", "attacker.example#")))


def test_a_host_network_deployment_gets_a_warning_and_no_injection() -> None:
    deployment: dict[str, Any] = {
        "metadata": {
            "name": "edge-proxy",
            "namespace": "team-a",
            "uid": "u2",
            "annotations": {"tcp-exporter/port": "443"},
        },
        "spec": {"template": {"spec": {"hostNetwork": True, "containers": [{"name": "proxy", "image": "p:1"}]}}},
    }
    result = plan(deployment, Facts(), Config())
    assert "hostNetwork" in refused(result)


def test_asking_for_scale_in_where_it_is_not_installed_injects_with_a_warning() -> None:
    deployment = {"tcp-exporter/scale-in-by-connections": "true"}
    result = plan_with(deployment, Facts(scale_in_installed=False))
    assert result.deployment_patch is not None
    assert [e.reason for e in result.events if e.type == "Warning"] == ["ScaleInNotInstalled"]
    assert "ScaleInNotInstalled" not in [e.reason for e in plan_with(deployment, Facts()).events]


def test_a_misspelled_key_is_a_warning_naming_the_closest_known_one_and_the_rest_still_applies() -> None:
    result = planned({"tcp-exporter/threshhold": "50", "tcp-exporter/colour": "blue"}, Config())
    assert result.deployment_patch is not None
    warnings = sorted(e.message for e in result.events if e.reason == "UnknownAnnotation")
    assert len(warnings) == 2
    assert warnings[0] == "'tcp-exporter/colour' is not an annotation of tcp-exporter and is ignored"
    assert warnings[1].endswith("did you mean tcp-exporter/threshold?")


def test_kedas_ready_false_and_fallback_true_on_our_scaledobject_become_warnings_with_kedas_message() -> None:
    so = scaled_object(planned({}, Config()))
    so["status"] = {
        "conditions": [
            {"type": "Ready", "status": "False", "reason": "ScaledObjectCheckFailed", "message": "name too long"},
            {"type": "Active", "status": "False"},
            {"type": "Fallback", "status": "True", "reason": "FallbackExists", "message": "query returned nothing"},
        ]
    }
    result = planned({}, Config(), Facts(scaled_object=so))
    warnings = {e.reason: e.message for e in result.events if e.type == "Warning"}
    assert set(warnings) == {"ScaledObjectNotReady", "ScaledObjectFallback"}
    assert "name too long" in warnings["ScaledObjectNotReady"]
    assert "query returned nothing" in warnings["ScaledObjectFallback"]
    so["status"]["conditions"] = [{"type": "Ready", "status": "True"}, {"type": "Fallback", "status": "False"}]
    cleared = planned({}, Config(), Facts(scaled_object=so))
    assert not [e for e in cleared.events if e.type == "Warning"]
    # The controller posts these only where the Warning was posted: a Normal Event that the condition cleared.
    assert [e.reason for e in cleared.cleared] == ["ScaledObjectReady", "ScaledObjectFallbackCleared"]


def test_a_name_over_54_characters_gets_a_scaledobject_name_keda_accepts_and_an_old_long_one_is_replaced() -> None:
    from tcp_exporter_operator.desired import child_name

    long = "payments-gateway-primary-eu-west-1-canary-release-abc.v2-web-api-x1"  # 67 characters
    base: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": long, "namespace": "team-a", "uid": "u3", "annotations": {"tcp-exporter/port": "8080"}},
        "spec": {
            "selector": {"matchLabels": {"app": "x"}},
            "template": {"metadata": {"labels": {"app": "x"}}, "spec": {"containers": [{"name": "a", "image": "a"}]}},
        },
    }
    created = scaled_object(plan(base, Facts(), Config()))
    name = created["metadata"]["name"]
    assert len(name) <= 54 and len("keda-hpa-" + name) <= 63 and name.startswith("payments-gateway-primary")
    assert created["spec"]["scaleTargetRef"]["name"] == long
    assert child_name(long + "2", limit=54) != name  # a hash of the full name: long names sharing a prefix differ
    old = {**created, "metadata": {**created["metadata"], "name": long}}  # what an older operator created
    writes = [(w.action, w.body["metadata"]["name"]) for w in plan(base, Facts(scaled_object=old), Config()).children]
    assert writes == [("delete", long), ("create", name)]
