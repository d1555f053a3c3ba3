"""The operator's pure planner and builders: golden files through the real render command, and the plan's decisions."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from tcp_exporter import contract
from tcp_exporter.cli import parse_args
from tcp_exporter_operator.annotations import A_PORT, A_STATUS, parse_spec, sidecar_of
from tcp_exporter_operator.config import Config
from tcp_exporter_operator.desired import (
    SCALED_OBJECT_NAME_MAX,
    child_name,
    promql_string,
    query,
    scaled_object,
    sidecar_container,
)
from tcp_exporter_operator.diff import _at
from tcp_exporter_operator.plan import Facts, Plan, plan

GOLDEN = Path(__file__).parent / "golden"
RENDER = str(Path(sys.executable).with_name("tcp-exporter-operator"))
ENV = {
    "TCP_EXPORTER_OPERATOR_SIDECAR_IMAGE": "ghcr.io/tcp-exporter/tcp-exporter:0.1.0",
    "TCP_EXPORTER_OPERATOR_PROMETHEUS": "http://prometheus-operated.monitoring.svc:9090",
}
CASES = [
    ("basic", None),
    ("named-ports", None),
    ("conntrack", None),
    ("conntrack", "restricted"),
    ("own-prometheus", None),
    ("drain", None),
]


def render(name: str, psa: str | None) -> subprocess.CompletedProcess[str]:
    cmd = [RENDER, "render", "-f", str(GOLDEN / f"{name}.in.yaml")] + (["--psa-level", psa] if psa else [])
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ENV})


@pytest.mark.parametrize(("name", "psa"), CASES)
def test_render_matches_the_golden_file(name: str, psa: str | None) -> None:
    """Set UPDATE_GOLDEN=1 to rewrite the expected files after an intended change; review the diff."""
    out = render(name, psa)
    assert out.returncode == 0, out.stderr
    expected = GOLDEN / f"{name}{'.' + psa if psa else ''}.out.yaml"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        expected.write_text(out.stdout)
    assert out.stdout == expected.read_text()


def test_render_refuses_a_wrong_annotation_with_exit_1(tmp_path: Path) -> None:
    bad = yaml.safe_load((GOLDEN / "basic.in.yaml").read_text())
    bad["metadata"]["annotations"]["tcp-exporter/port"] = "99999"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    out = subprocess.run([RENDER, "render", "-f", str(path)], capture_output=True, text=True)
    assert out.returncode == 1
    assert "not a port number" in out.stderr
    assert out.stdout == ""


def test_render_takes_a_namespace_the_clusters_configmap_and_prints_the_podmonitor_when_asked(tmp_path: Path) -> None:
    body = yaml.safe_load((GOLDEN / "basic.in.yaml").read_text())
    body["metadata"].pop("namespace", None)
    manifest = tmp_path / "deployment.yaml"
    manifest.write_text(yaml.safe_dump(body))
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "tcp-exporter-operator"},
        "data": {"TCP_EXPORTER_OPERATOR_THRESHOLD": "42", "TCP_EXPORTER_OPERATOR_SIDECAR_IMAGE": "registry.test/te:1"},
    }
    # As `kubectl get configmap -l ... -o yaml` prints it: a List of the one ConfigMap.
    (tmp_path / "cm.yaml").write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": [configmap]}))
    cmd = [RENDER, "render", "-f", str(manifest), "-n", "shop", "--config-map", str(tmp_path / "cm.yaml")]
    out = subprocess.run([*cmd, "--podmonitor-crd"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    docs = {d["kind"]: d for d in yaml.safe_load_all(out.stdout)}
    assert set(docs) == {"Deployment", "ScaledObject", "PodMonitor"}
    assert {d["metadata"]["namespace"] for d in docs.values()} == {"shop"}
    assert docs["ScaledObject"]["spec"]["triggers"][0]["metadata"]["threshold"] == "42"  # the ConfigMap's
    assert "ownerReferences" not in docs["PodMonitor"]["metadata"]
    assert sidecar_of(docs["Deployment"])["image"] == "registry.test/te:1"
    assert "PodMonitor" not in {
        d["kind"] for d in yaml.safe_load_all(subprocess.run(cmd, capture_output=True, text=True).stdout)
    }
    configmap["data"]["TCP_EXPORTER_OPERATOR_METHOD"] = "ebpf"
    (tmp_path / "cm.yaml").write_text(yaml.safe_dump(configmap))
    bad = subprocess.run(cmd, capture_output=True, text=True)
    assert bad.returncode == 2 and "TCP_EXPORTER_OPERATOR_METHOD" in bad.stderr, bad.stderr


def test_render_renders_statefulsets_and_rollouts_where_their_kinds_are_enabled_and_leaves_them_be_elsewhere(
    tmp_path: Path,
) -> None:
    base = yaml.safe_load((GOLDEN / "basic.in.yaml").read_text())
    sts = {**copy.deepcopy(base), "kind": "StatefulSet"}
    sts["spec"]["serviceName"] = "web"
    argo = {**copy.deepcopy(base), "apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout"}
    (tmp_path / "w.yaml").write_text(yaml.safe_dump_all([sts, argo]))
    cmd = [RENDER, "render", "-f", str(tmp_path / "w.yaml")]
    kinds = {**os.environ, "TCP_EXPORTER_OPERATOR_WORKLOAD_KINDS": "Deployment,StatefulSet,Rollout"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=kinds)
    assert out.returncode == 0, out.stderr
    docs = list(yaml.safe_load_all(out.stdout))
    assert [d["kind"] for d in docs] == ["StatefulSet", "ScaledObject", "Rollout", "ScaledObject"]
    assert sidecar_of(docs[0]) is not None and sidecar_of(docs[2]) is not None
    assert docs[3]["spec"]["scaleTargetRef"]["apiVersion"] == "argoproj.io/v1alpha1"
    plain = subprocess.run(cmd, capture_output=True, text=True)  # kinds not enabled: as the operator would
    assert plain.returncode == 0 and list(yaml.safe_load_all(plain.stdout)) == [sts, argo]
    del argo["spec"]["template"]
    argo["spec"]["workloadRef"] = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web-template"}
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(argo))
    refused = subprocess.run(cmd, capture_output=True, text=True, env=kinds)
    assert refused.returncode == 1 and "INJECTION=webhook" in refused.stderr


def test_render_exits_1_when_the_operator_would_write_no_scaledobject_unless_none_was_asked_for(tmp_path: Path) -> None:
    body = yaml.safe_load((GOLDEN / "basic.in.yaml").read_text())
    manifest = tmp_path / "deployment.yaml"
    manifest.write_text(yaml.safe_dump(body))
    # Discovery by PodMonitor only, and no PodMonitor CRD assumed: Prometheus could not see the sidecars.
    env = {**os.environ, "TCP_EXPORTER_OPERATOR_DISCOVERY": "podmonitor"}
    out = subprocess.run([RENDER, "render", "-f", str(manifest)], capture_output=True, text=True, env=env)
    assert out.returncode == 1 and "would write no ScaledObject" in out.stderr, out
    body["metadata"]["annotations"]["tcp-exporter/scaledobject"] = "false"
    manifest.write_text(yaml.safe_dump(body))
    out = subprocess.run([RENDER, "render", "-f", str(manifest)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr


def test_the_clis_answer_a_missing_or_malformed_file_and_missing_credentials_in_words(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("a: [\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    for name, said in (("missing.yaml", "cannot read"), ("bad.yaml", "is not valid YAML"), ("list.yaml", "object")):
        out = subprocess.run([RENDER, "render", "-f", str(tmp_path / name)], capture_output=True, text=True)
        assert (out.returncode, out.stdout) == (2, ""), out
        assert said in out.stderr and "Traceback" not in out.stderr, out.stderr
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "none"), "KUBERNETES_SERVICE_HOST": ""}
    out = subprocess.run([RENDER, "uninstall", "--dry-run"], capture_output=True, text=True, env=env)
    assert out.returncode == 1 and "no cluster credentials" in out.stderr and "Traceback" not in out.stderr, out


def test_rendered_sidecar_args_are_accepted_by_the_real_sidecar_cli() -> None:
    docs = list(yaml.safe_load_all(render("named-ports", None).stdout))
    sidecar = sidecar_of(docs[0])
    args = parse_args(sidecar["args"], {})
    assert args.watch_port == [1883, 5672]
    assert args.listen_address == ("", 9200)
    assert sidecar["ports"][0]["containerPort"] == 9200


# -- plan -----------------------------------------------------------------------------------------

CFG = Config()  # auto, unresolved: a native sidecar
CONTAINER_CFG = Config(sidecar_mode="container")


def stored(name: str = "basic") -> dict[str, Any]:
    """An input Deployment as the API server would return it (uid, resourceVersion, defaults)."""
    dep = yaml.safe_load((GOLDEN / f"{name}.in.yaml").read_text())
    dep["metadata"].update(uid="uid-1", resourceVersion="10")
    return dep


def action(result: Plan, kind: str) -> str | None:
    write = result.child(kind)
    return write.action if write else None


def body(result: Plan, kind: str) -> dict[str, Any] | None:
    write = result.child(kind)
    return write.body if write else None


def applied(dep: dict[str, Any], result: Plan) -> dict[str, Any]:
    """The Deployment after the plan's JSON patch, applied the way the API server does, defaults added."""
    new = copy.deepcopy(dep)
    for op in result.deployment_patch or []:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
        parent = new
        for part in parts[:-1]:
            parent = parent[part]
        if op["op"] == "test":
            assert parent.get(parts[-1]) == op["value"], op
        elif op["op"] in ("add", "replace"):
            parent[parts[-1]] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            del parent[parts[-1]]
    for container in new["spec"]["template"]["spec"]["containers"]:
        container.setdefault("terminationMessagePath", "/dev/termination-log")
        for port in container.get("ports", []):
            port.setdefault("protocol", "TCP")
    new["metadata"]["resourceVersion"] = "11"
    return new


def test_after_injection_the_plan_is_empty() -> None:
    dep = stored()
    first = plan(dep, Facts(), CFG)
    assert first.deployment_patch and action(first, "ScaledObject") == "create"
    after = applied(dep, first)
    again = plan(after, Facts(scaled_object=body(first, "ScaledObject")), CFG)
    assert again.writes == 0 and again.events == []


def test_planning_leaves_the_deployment_it_reads_as_it_was() -> None:
    """The plan shares the Deployment's unchanged parts with what it builds (no deep copy): the watch's object,
    which the worker and the next event may still read, must come out untouched."""
    fresh = stored()
    fresh["spec"]["template"]["metadata"]["annotations"] = {"team": "a"}
    injected = applied(fresh, plan(fresh, Facts(), CFG))
    injected["metadata"]["annotations"]["tcp-exporter/port"] = "9090"  # an update: the sidecar is replaced
    for dep in (fresh, injected):
        before = copy.deepcopy(dep)
        result = plan(dep, Facts(), CFG)
        assert result.deployment_patch and result.desired is not None
        result.desired["spec"]["template"]["spec"]["containers"].append({"name": "x"})
        result.desired["spec"]["template"]["metadata"]["annotations"]["y"] = "z"
        assert dep == before


def test_equal_quantities_in_another_form_cause_no_patch() -> None:
    dep = applied(stored(), plan(stored(), Facts(), CFG))
    sidecar = sidecar_of(dep)
    sidecar["resources"]["requests"]["cpu"] = "0.01"  # the API server may write 10m back as 0.01 or vice versa
    sidecar["resources"]["limits"]["memory"] = str(96 * 1024 * 1024)
    assert plan(dep, Facts(scaled_object={"spec": {}}), CFG).deployment_patch is None


def test_a_new_operator_version_alone_does_not_roll_the_pods() -> None:
    dep = applied(stored(), plan(stored(), Facts(), CFG))
    status = json.loads(dep["metadata"]["annotations"][A_STATUS])
    status["version"] = "0.0.1"
    dep["metadata"]["annotations"][A_STATUS] = json.dumps(status)
    assert plan(dep, Facts(scaled_object={"spec": {}}), CFG).deployment_patch is None


@pytest.mark.parametrize("cfg", [CFG, CONTAINER_CFG], ids=["native", "container"])
def test_a_sidecar_removed_by_hand_is_planned_back(cfg: Config) -> None:
    dep = applied(stored(), plan(stored(), Facts(), cfg))
    pod = dep["spec"]["template"]["spec"]
    pod["containers"] = [c for c in pod["containers"] if c["name"] != "tcp-exporter"]
    pod.pop("initContainers", None)
    assert sidecar_of(applied(dep, plan(dep, Facts(), cfg))) is not None


def test_a_native_sidecar_is_the_last_init_container_and_a_mode_change_moves_it_with_the_users_own_kept() -> None:
    original = stored()
    original["spec"]["template"]["spec"]["initContainers"] = [{"name": "migrate", "image": "registry.test/m:1"}]
    native = applied(original, plan(original, Facts(), CFG))
    pod = native["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["migrate", "tcp-exporter"]
    assert pod["initContainers"][1]["restartPolicy"] == "Always"
    assert "tcp-exporter" not in [c["name"] for c in pod["containers"]]
    assert json.loads(native["metadata"]["annotations"][A_STATUS])["mode"] == "native"
    # The operator configured for regular containers moves it (one rollout), and back; nothing else changes.
    moved = applied(native, plan(native, Facts(), CONTAINER_CFG))
    pod = moved["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["migrate"]
    assert pod["containers"][-1]["name"] == "tcp-exporter" and "restartPolicy" not in pod["containers"][-1]
    assert "mode" not in json.loads(moved["metadata"]["annotations"][A_STATUS])
    assert plan(moved, Facts(scaled_object={"spec": {}}), CONTAINER_CFG).deployment_patch is None
    back = applied(moved, plan(moved, Facts(), CFG))
    assert back["spec"]["template"] == native["spec"]["template"]
    # Removing the annotation leaves the user's init container alone, and no empty list behind.
    del back["metadata"]["annotations"]["tcp-exporter/port"]
    clean = applied(back, plan(back, Facts(), CFG))
    assert clean["spec"]["template"]["spec"]["initContainers"] == original["spec"]["template"]["spec"]["initContainers"]
    without = applied(stored(), plan(stored(), Facts(), CFG))
    del without["metadata"]["annotations"]["tcp-exporter/port"]
    assert "initContainers" not in applied(without, plan(without, Facts(), CFG))["spec"]["template"]["spec"]


def test_auto_means_native_from_kubernetes_1_33_where_native_sidecars_cannot_be_turned_off() -> None:
    assert Config().resolved((1, 37)).sidecar_mode == "native"
    assert Config().resolved((1, 33)).sidecar_mode == "native"
    assert Config().resolved((1, 32)).sidecar_mode == "container"  # the feature gate may be off there
    assert Config().resolved(None).native()  # unknown (render, offline): every supported version has it
    assert Config(sidecar_mode="container").resolved((1, 37)).sidecar_mode == "container"
    with pytest.raises(ValueError, match="SIDECAR_MODE"):
        Config(sidecar_mode="init")


def test_removing_the_port_annotation_undoes_exactly_what_was_added() -> None:
    original = stored()
    first = plan(original, Facts(), CFG)
    dep = applied(original, first)
    del dep["metadata"]["annotations"][A_PORT]
    undo = plan(dep, Facts(scaled_object=body(first, "ScaledObject")), CFG)
    assert action(undo, "ScaledObject") == "delete"
    clean = applied(dep, undo)
    assert clean["spec"]["template"] == {
        **original["spec"]["template"],
        "spec": {
            "containers": [
                {
                    **original["spec"]["template"]["spec"]["containers"][0],
                    "terminationMessagePath": "/dev/termination-log",
                    "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                }
            ]
        },
    }
    assert A_STATUS not in clean["metadata"]["annotations"]


@pytest.mark.parametrize(
    ("annotations", "reason"),
    [
        ({"tcp-exporter/port": "0"}, "InvalidAnnotation"),
        ({"tcp-exporter/port": "8080,"}, "InvalidAnnotation"),
        ({"tcp-exporter/port": "8080", "tcp-exporter/min-replicas": "0"}, "InvalidAnnotation"),
        ({"tcp-exporter/port": "8080", "tcp-exporter/threshold": "ten"}, "InvalidAnnotation"),
        ({"tcp-exporter/port": "8080", "tcp-exporter/scaledobject": "maybe"}, "InvalidAnnotation"),
        ({"tcp-exporter/port": "8080", "tcp-exporter/prometheus": "prometheus:9090"}, "InvalidAnnotation"),
        ({"tcp-exporter/port": "8080", "tcp-exporter/cpu-request": "lots"}, "InvalidAnnotation"),
        (
            {"tcp-exporter/port": "8080", "tcp-exporter/cpu-request": "2", "tcp-exporter/cpu-limit": "1"},
            "InvalidAnnotation",
        ),
        ({"tcp-exporter/port": "8080", "tcp-exporter/metrics-port": "8080"}, "InvalidAnnotation"),
    ],
)
def test_wrong_annotations_plan_a_warning_and_no_write(annotations: dict[str, str], reason: str) -> None:
    dep = stored()
    dep["metadata"]["annotations"] = annotations
    result = plan(dep, Facts(), CFG)
    assert result.writes == 0
    assert [e.reason for e in result.events] == [reason]


def test_a_foreign_autoscaler_is_left_in_charge() -> None:
    result = plan(stored(), Facts(foreign_autoscalers=("HorizontalPodAutoscaler/web",)), CFG)
    assert result.writes == 0 and result.events[0].reason == "AutoscalerConflict"


def test_without_keda_the_sidecar_is_injected_and_a_warning_says_why() -> None:
    result = plan(stored(), Facts(keda=False), CFG)
    assert result.deployment_patch is not None and action(result, "ScaledObject") is None
    assert "KedaMissing" in [e.reason for e in result.events]


def test_a_scaledobject_edited_by_hand_is_planned_back() -> None:
    dep = stored()
    desired = scaled_object(dep, parse_spec(dep, CFG))
    edited = copy.deepcopy(desired)
    edited["spec"]["maxReplicaCount"] = 99
    after = applied(dep, plan(dep, Facts(), CFG))
    result = plan(after, Facts(scaled_object=edited), CFG)
    assert action(result, "ScaledObject") == "update" and result.deployment_patch is None


# Valid Deployment names (DNS subdomains up to 253 characters) of every shape the selection must keep apart.
NAMES = [
    "web",
    "web-api",
    "web-api-v2",
    "checkout.v2",
    "a" * 63,
    "payments-gateway-primary-eu-west-1-canary-release-ab",
    ".".join(["x" * 61 + "-9"] * 4)[:253].rstrip(".-"),
    "-".join(["segment"] * 31)[:253],
]


@pytest.mark.gobuild
def test_every_query_for_names_with_dots_dashes_and_253_characters_parses_in_promtool() -> None:
    from harness.promstack import check_queries

    queries = [query(ns, name) for name in NAMES for ns in ("default", "team-a")]
    assert max(map(len, NAMES)) == 253
    out = check_queries(queries)
    assert out.returncode == 0, out.stdout + out.stderr
    # Exactly one Deployment each: an exact label match, no pattern, no escaping the name needed.
    for name in NAMES:
        q = query("shop", name)
        assert f'{contract.DEPLOYMENT_LABEL}="{name}"' in q and "=~" not in q and "vector(0)" not in q


@pytest.mark.gobuild
def test_the_last_releases_escaped_query_is_rejected_by_promtool_so_the_check_can_fail() -> None:
    from harness.promstack import check_queries

    out = check_queries(['sum(tcp_exporter_established_connections{pod=~"web\\-api-[a-z0-9]+"})'])
    assert out.returncode != 0 and "unknown escape sequence" in out.stdout + out.stderr


def test_promql_strings_escape_what_go_needs() -> None:
    assert promql_string('a"b\\c') == '"a\\"b\\\\c"'


def test_the_sidecar_labels_its_series_with_the_deployment_name_the_query_selects_on() -> None:
    dep = stored()
    dep["metadata"]["name"] = "checkout.v2"
    spec = parse_spec(dep, CFG)
    args = parse_args(sidecar_container(spec)["args"], {})
    assert args.deployment == "checkout.v2"


def test_child_names_fit_kubernetes_and_kedas_hpa_and_stay_distinct() -> None:
    long_a, long_b = "a" * 250, "a" * 249 + "b"
    for name in (long_a, long_b):
        so = child_name(name, limit=SCALED_OBJECT_NAME_MAX)
        assert len("keda-hpa-" + so) <= 253
        assert len(child_name(name, "tcp-exporter")) <= 253
    assert child_name(long_a, "x") != child_name(long_b, "x")
    assert child_name("web-api", "tcp-exporter") == "web-api-tcp-exporter"


def so_for(annotations: dict[str, str], cfg: Config = CFG, facts: Facts | None = None) -> dict[str, Any]:
    dep = stored()
    dep["metadata"]["annotations"].update(annotations)
    result = plan(dep, facts or Facts(), cfg)
    assert action(result, "ScaledObject") == "create", result.events
    return body(result, "ScaledObject") or {}


def test_missing_data_is_an_error_and_the_fallback_never_scales_in() -> None:
    so = so_for({})
    assert so["spec"]["triggers"][0]["metadata"]["ignoreNullValues"] == "false"
    assert so["spec"]["fallback"] == {"failureThreshold": 3, "replicas": 1, "behavior": "currentReplicasIfHigher"}


def test_an_old_keda_without_fallback_behavior_gets_no_fallback_that_would_scale_to_its_replicas() -> None:
    assert "fallback" not in so_for({}, facts=Facts(keda_fallback_behavior=False))["spec"]
    static = so_for({"tcp-exporter/fallback-behavior": "static"}, facts=Facts(keda_fallback_behavior=False))
    assert static["spec"]["fallback"] == {"failureThreshold": 3, "replicas": 1}


@pytest.mark.parametrize(
    ("annotations", "path", "value"),
    [
        ({"tcp-exporter/polling-interval": "5"}, ("pollingInterval",), 5),
        (
            {"tcp-exporter/scale-down-stabilization": "120"},
            ("advanced", "horizontalPodAutoscalerConfig", "behavior", "scaleDown", "stabilizationWindowSeconds"),
            120,
        ),
        ({"tcp-exporter/fallback-behavior": "currentReplicas"}, ("fallback", "behavior"), "currentReplicas"),
        ({"tcp-exporter/fallback-failure-threshold": "6"}, ("fallback", "failureThreshold"), 6),
        ({"tcp-exporter/fallback-replicas": "4"}, ("fallback", "replicas"), 4),
        (
            {"tcp-exporter/authentication-ref": "prom-auth", "tcp-exporter/auth-modes": "bearer"},
            ("triggers", 0, "authenticationRef"),
            {"name": "prom-auth", "kind": "TriggerAuthentication"},
        ),
        (
            {
                "tcp-exporter/authentication-ref": "TriggerAuthentication/amp",
                "tcp-exporter/auth-modes": "tls,basic",
            },
            ("triggers", 0, "metadata", "authModes"),
            "tls,basic",
        ),
        ({"tcp-exporter/prometheus-namespace": "tenant-1"}, ("triggers", 0, "metadata", "namespace"), "tenant-1"),
        (
            {"tcp-exporter/custom-headers": "X-Scope-OrgID=team-a, X-Client=keda"},
            ("triggers", 0, "metadata", "customHeaders"),
            "X-Scope-OrgID=team-a,X-Client=keda",
        ),
        ({"tcp-exporter/unsafe-ssl": "True"}, ("triggers", 0, "metadata", "unsafeSsl"), "true"),
    ],
)
def test_each_keda_option_is_passed_through_as_keda_documents_it(
    annotations: dict[str, str], path: tuple[Any, ...], value: Any
) -> None:
    assert _at(so_for(annotations)["spec"], path) == value
    # The same from the operator's configuration, as its default for every Deployment.
    names = {"tcp-exporter/" + k.replace("_", "-"): k for k in Config.__dataclass_fields__}
    env = {"TCP_EXPORTER_OPERATOR_" + names[k].upper(): v for k, v in annotations.items()}
    assert _at(so_for({}, Config.from_env(env))["spec"], path) == value


@pytest.mark.parametrize(
    "annotations",
    [
        {"tcp-exporter/polling-interval": "0"},
        {"tcp-exporter/scale-down-stabilization": "3601"},
        {"tcp-exporter/fallback-behavior": "sometimes"},
        {"tcp-exporter/fallback-replicas": "11"},
        {"tcp-exporter/authentication-ref": "prom-auth"},
        {"tcp-exporter/auth-modes": "bearer"},
        {"tcp-exporter/authentication-ref": "Secret/x", "tcp-exporter/auth-modes": "bearer"},
        {"tcp-exporter/authentication-ref": "a", "tcp-exporter/auth-modes": "kerberos"},
        {"tcp-exporter/custom-headers": "X Bad=1"},
        {"tcp-exporter/custom-headers": "novalue"},
        {"tcp-exporter/unsafe-ssl": "yes"},
        {"tcp-exporter/pod-monitor-labels": "release=a b"},
    ],
)
def test_wrong_keda_or_podmonitor_options_are_a_warning_and_no_write(annotations: dict[str, str]) -> None:
    dep = stored()
    dep["metadata"]["annotations"].update(annotations)
    result = plan(dep, Facts(), CFG)
    assert result.writes == 0 and [e.reason for e in result.events] == ["InvalidAnnotation"]


def test_an_option_removed_by_the_user_is_removed_from_the_scaledobject() -> None:
    with_ref = so_for({"tcp-exporter/authentication-ref": "a", "tcp-exporter/auth-modes": "bearer"})
    after = applied(stored(), plan(stored(), Facts(), CFG))
    result = plan(after, Facts(scaled_object=with_ref), CFG)
    assert action(result, "ScaledObject") == "update"
    assert "authenticationRef" not in (body(result, "ScaledObject") or {})["spec"]["triggers"][0]


def test_the_podmonitor_is_created_labelled_updated_and_deleted_with_the_annotation() -> None:
    cfg = Config(pod_monitor_labels="release=kube-prometheus-stack")
    dep = stored()
    first = plan(dep, Facts(pod_monitor_crd=True), cfg)
    pm = body(first, "PodMonitor") or {}
    assert action(first, "PodMonitor") == "create"
    assert pm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert pm["spec"]["podMetricsEndpoints"] == [{"port": "tcp-metrics", "path": "/metrics"}]
    after = applied(dep, first)
    so = body(first, "ScaledObject")
    assert plan(after, Facts(pod_monitor_crd=True, pod_monitor=pm, scaled_object=so), cfg).writes == 0
    after["metadata"]["annotations"]["tcp-exporter/pod-monitor-labels"] = "release=prom-b"
    relabel = plan(after, Facts(pod_monitor_crd=True, pod_monitor=pm, scaled_object=so), cfg)
    assert action(relabel, "PodMonitor") == "update" and relabel.deployment_patch is None
    assert (body(relabel, "PodMonitor") or {})["metadata"]["labels"]["release"] == "prom-b"
    del after["metadata"]["annotations"]["tcp-exporter/port"]
    gone = plan(after, Facts(pod_monitor_crd=True, pod_monitor=pm, scaled_object=so), cfg)
    assert action(gone, "PodMonitor") == "delete" and action(gone, "ScaledObject") == "delete"


def test_without_a_discovery_path_there_is_no_scaledobject_and_a_warning_says_why() -> None:
    dep = stored("own-prometheus")
    del dep["metadata"]["annotations"]["tcp-exporter/scaledobject"]
    blind = plan(dep, Facts(), CFG)
    assert blind.deployment_patch is not None and action(blind, "ScaledObject") is None
    assert [e.reason for e in blind.events if e.type == "Warning"] == ["MetricsDiscovery"]
    # The same Deployment where a PodMonitor or the port-name job finds the sidecar: a ScaledObject.
    assert action(plan(dep, Facts(pod_monitor_crd=True), CFG), "ScaledObject") == "create"
    assert action(plan(dep, Facts(), Config(discovery=("port-name",))), "ScaledObject") == "create"
    # An existing ScaledObject of ours is removed when it turns blind: its fallback would hold replicas forever.
    existing = {"metadata": {"name": "game", "namespace": "play"}, "spec": {}}
    assert action(plan(dep, Facts(scaled_object=existing), CFG), "ScaledObject") == "delete"


def test_discovery_without_annotations_leaves_the_pod_annotations_alone() -> None:
    dep = stored()
    after = applied(dep, plan(dep, Facts(), Config(discovery=("port-name",))))
    assert "prometheus.io/scrape" not in (after["spec"]["template"]["metadata"].get("annotations") or {})


def test_config_reads_prefixed_environment_and_rejects_bad_numbers() -> None:
    cfg = Config.from_env({"TCP_EXPORTER_OPERATOR_THRESHOLD": "7", "TCP_EXPORTER_OPERATOR_NAMESPACES": "a, b"})
    assert cfg.threshold == 7 and cfg.namespaces == ("a", "b")
    with pytest.raises(ValueError, match="TCP_EXPORTER_OPERATOR_MAX_REPLICAS"):
        Config.from_env({"TCP_EXPORTER_OPERATOR_MAX_REPLICAS": "many"})
    with pytest.raises(ValueError, match="TCP_EXPORTER_OPERATOR_DISCOVERY"):
        Config.from_env({"TCP_EXPORTER_OPERATOR_DISCOVERY": "annotations,dns"})
    assert Config.from_env({"TCP_EXPORTER_OPERATOR_DISCOVERY": "port-name"}).discovery == ("port-name",)


def test_a_new_sidecar_image_in_the_configuration_is_a_paced_upgrade_the_users_change_is_not() -> None:
    dep = applied(stored(), plan(stored(), Facts(), CFG))
    so = body(plan(stored(), Facts(), CFG), "ScaledObject")
    new_image = Config(sidecar_image="ghcr.io/tcp-exporter/tcp-exporter:9.9.9")
    going = plan(dep, Facts(scaled_object=so), new_image)
    waiting = going.deferred()  # no slot free
    assert waiting.upgrade_deferred and waiting.deployment_patch is None and waiting.events == []
    assert going.upgrade and going.deployment_patch is not None
    assert [e.reason for e in going.events] == ["Upgraded"]
    # The user's own change is never held back, even with no slot free.
    dep["metadata"]["annotations"]["tcp-exporter/cpu-limit"] = "500m"
    mine = plan(dep, Facts(scaled_object=so), new_image)
    assert mine.deployment_patch is not None and not mine.upgrade
    assert mine.deferred() is mine


def test_a_status_written_before_inputs_were_recorded_counts_as_an_upgrade() -> None:
    dep = applied(stored(), plan(stored(), Facts(), CFG))
    status = json.loads(dep["metadata"]["annotations"][A_STATUS])
    del status["inputs"]
    status["hash"] = "0" * 16  # and its sidecar differs from today's
    dep["metadata"]["annotations"][A_STATUS] = json.dumps(status)
    assert plan(dep, Facts(), CFG).upgrade


@pytest.mark.parametrize(
    ("edit", "meshed"),
    [
        (lambda t: t["spec"]["containers"].append({"name": "istio-proxy", "image": "istio/proxyv2"}), True),
        (lambda t: t["metadata"].setdefault("annotations", {}).update({"linkerd.io/inject": "enabled"}), True),
        (lambda t: t["metadata"].setdefault("labels", {}).update({"sidecar.istio.io/inject": "true"}), True),
        (lambda t: t["metadata"].setdefault("labels", {}).update({"sidecar.istio.io/inject": "false"}), False),
        (lambda t: None, False),
    ],
    ids=["istio-container", "linkerd-annotation", "istio-label", "istio-off", "no-mesh"],
)
def test_a_mesh_proxy_in_the_pod_template_is_a_warning_and_the_injection_still_happens(edit: Any, meshed: bool) -> None:
    dep = stored()
    edit(dep["spec"]["template"])
    result = plan(dep, Facts(), CFG)
    assert result.deployment_patch is not None
    assert ("MeshInbound" in [e.reason for e in result.events if e.type == "Warning"]) == meshed
    # conntrack counts the clients behind the redirect: nothing to warn about.
    dep["metadata"]["annotations"]["tcp-exporter/method"] = "conntrack"
    assert "MeshInbound" not in [e.reason for e in plan(dep, Facts(), CFG).events]


@pytest.mark.parametrize(
    "forged",
    ['{"podAnnotations": 5}', '{"ports": "8080", "hash": 3}', "[]", '"x"', "not json", "[" * 100_000, "{}"],
)
def test_a_forged_status_annotation_is_read_as_untrusted_and_the_injection_made_right(forged: str) -> None:
    dep = applied(stored(), plan(stored(), Facts(), CFG))
    dep["metadata"]["annotations"][A_STATUS] = forged
    result = plan(dep, Facts(), CFG)
    assert result.deployment_patch is not None and not result.upgrade  # rewritten, and not paced as an upgrade
    fixed = applied(dep, result)
    assert json.loads(fixed["metadata"]["annotations"][A_STATUS])["ports"] == [8080]
    assert plan(fixed, Facts(scaled_object=body(result, "ScaledObject")), CFG).writes == 0  # in sync after it


@pytest.mark.parametrize(
    ("setting", "value", "said"),
    [
        ("METHOD", "ebpf", "the operator setting TCP_EXPORTER_OPERATOR_METHOD: 'ebpf' is not one of"),
        ("THRESHOLD", "0", "the operator setting TCP_EXPORTER_OPERATOR_THRESHOLD: 0 must be at least 1"),
        ("THRESHOLD", "²", "TCP_EXPORTER_OPERATOR_THRESHOLD='²' is not a whole number"),
        ("SIDECAR_IMAGE", "a b", "the operator setting TCP_EXPORTER_OPERATOR_SIDECAR_IMAGE: 'a b'"),
        ("SCALE_IN_BY_CONNECTIONS", "yes", "TCP_EXPORTER_OPERATOR_SCALE_IN_BY_CONNECTIONS='yes' must be \"true\""),
        (
            "AUTHENTICATION_REF",
            "central",
            "the operator setting TCP_EXPORTER_OPERATOR_AUTHENTICATION_REF needs tcp-exporter/auth-modes",
        ),
    ],
)
def test_a_wrong_operator_setting_exits_2_at_start_naming_the_setting_not_an_annotation(
    setting: str, value: str, said: str
) -> None:
    env = {**os.environ, **ENV, f"TCP_EXPORTER_OPERATOR_{setting}": value}
    out = subprocess.run(
        [RENDER, "render", "-f", str(GOLDEN / "basic.in.yaml")], capture_output=True, text=True, env=env
    )
    assert out.returncode == 2 and out.stdout == ""
    assert said in out.stderr


def test_a_port_annotation_of_non_ascii_digits_is_refused_with_a_warning_not_a_crash() -> None:
    dep = stored()
    dep["metadata"]["annotations"]["tcp-exporter/port"] = "²"
    result = plan(dep, Facts(), CFG)
    assert result.writes == 0
    assert [e.reason for e in result.events] == ["InvalidAnnotation"]


# -- drain ----------------------------------------------------------------------------------------


def drained(dep: dict[str, Any]) -> dict[str, Any]:
    """Container name -> its preStop hook, in the Deployment (init containers included)."""
    pod = dep["spec"]["template"]["spec"]
    return {
        c["name"]: (c.get("lifecycle") or {}).get("preStop") for c in pod["containers"] + pod.get("initContainers", [])
    }


@pytest.mark.parametrize("cfg", [CFG, CONTAINER_CFG], ids=["native", "container"])
def test_a_drain_hooks_the_container_serving_the_port_and_the_sidecar_and_keeps_the_others_own_hooks(
    cfg: Config,
) -> None:
    dep = applied(stored("drain"), plan(stored("drain"), Facts(), cfg))
    hooks = drained(dep)
    assert hooks["log-shipper"] == {"exec": {"command": ["/bin/flush"]}}  # not serving 8443: its own hook is kept
    ours = hooks["gateway"]["httpGet"]
    assert ours["path"] == "/drain?timeout=300" and ours["port"] == 9100
    if cfg.native():  # the kubelet keeps a native sidecar running until the app has exited: no hook of its own
        assert hooks["tcp-exporter"] is None
    else:  # a regular container is stopped with the app: it waits on its own drain too
        assert hooks["tcp-exporter"] == hooks["gateway"]
    sidecar = sidecar_of(dep)
    token = ours["httpHeaders"][0]["value"]
    assert sidecar["env"] == [{"name": "TCP_EXPORTER_DRAIN_TOKEN", "value": token}]
    # The token follows the Deployment's UID: a Deployment of the same name elsewhere has another.
    other = stored("drain")
    other["metadata"]["uid"] = "uid-2"
    assert drained(applied(other, plan(other, Facts(), cfg)))["gateway"]["httpGet"]["httpHeaders"][0]["value"] != token
    assert parse_args(sidecar["args"], {"TCP_EXPORTER_DRAIN_TOKEN": token}).drain_token == token
    assert plan(dep, Facts(scaled_object=body(plan(stored("drain"), Facts(), cfg), "ScaledObject")), cfg).writes == 0


@pytest.mark.parametrize("cfg", [CFG, CONTAINER_CFG], ids=["native", "container"])
def test_a_drain_hook_removed_by_hand_is_planned_back_and_turning_the_drain_off_removes_every_hook(
    cfg: Config,
) -> None:
    dep = applied(stored("drain"), plan(stored("drain"), Facts(), cfg))
    lost = copy.deepcopy(dep)
    del lost["spec"]["template"]["spec"]["containers"][0]["lifecycle"]
    assert drained(applied(lost, plan(lost, Facts(), cfg)))["gateway"] == drained(dep)["gateway"]
    dep["metadata"]["annotations"]["tcp-exporter/drain"] = "0"
    off = applied(dep, plan(dep, Facts(), cfg))
    assert drained(off) == {"gateway": None, "log-shipper": {"exec": {"command": ["/bin/flush"]}}, "tcp-exporter": None}
    assert "lifecycle" not in off["spec"]["template"]["spec"]["containers"][0]
    # And removing the port annotation leaves the app as it was before, its own hook and all.
    dep = applied(stored("drain"), plan(stored("drain"), Facts(), cfg))
    del dep["metadata"]["annotations"]["tcp-exporter/port"]
    clean = applied(dep, plan(dep, Facts(), cfg))
    assert drained(clean) == {"gateway": None, "log-shipper": {"exec": {"command": ["/bin/flush"]}}}


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda d: d["metadata"]["annotations"].update({"tcp-exporter/drain": "5 min"}), "not a duration"),
        (lambda d: d["metadata"]["annotations"].update({"tcp-exporter/drain": "²"}), "not a duration"),
        (lambda d: d["metadata"]["annotations"].update({"tcp-exporter/drain": "25h"}), "not a duration"),
        (lambda d: d["spec"]["template"]["spec"].pop("terminationGracePeriodSeconds"), "30 (the default)"),
        (lambda d: d["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=300), "Set it to 305"),
        (
            lambda d: d["spec"]["template"]["spec"]["containers"][0].update(
                lifecycle={"preStop": {"sleep": {"seconds": 5}}}
            ),
            "'gateway' has a preStop hook of its own",
        ),
    ],
)
def test_a_drain_the_pod_cannot_have_is_a_warning_and_no_write(edit: Any, words: str) -> None:
    dep = stored("drain")
    edit(dep)
    result = plan(dep, Facts(), CFG)
    assert result.writes == 0
    assert [e.reason for e in result.events] == ["InvalidAnnotation"] and words in result.events[0].message


def test_the_operators_drain_default_applies_where_no_annotation_says_otherwise() -> None:
    dep = stored()  # basic: web serves 8080, grace 30 by default
    cfg = Config(drain=20)
    assert drained(applied(dep, plan(dep, Facts(), cfg)))["web"]["httpGet"]["path"] == "/drain?timeout=20"
    refused = plan(dep, Facts(), Config(drain=26))  # 26 + 5 s to stop > the default grace of 30
    assert refused.writes == 0 and "the operator setting TCP_EXPORTER_OPERATOR_DRAIN" in refused.events[0].message
    dep["metadata"]["annotations"]["tcp-exporter/drain"] = "0"
    assert drained(applied(dep, plan(dep, Facts(), Config(drain=26))))["web"] is None


def rollout(workload_ref: bool = False) -> dict[str, Any]:
    """An Argo Rollout: a Deployment's spec under another kind, or its workloadRef form (no template)."""
    dep = stored()
    dep.update(kind="Rollout", apiVersion="argoproj.io/v1alpha1")
    dep["metadata"]["uid"] = "rollout-uid"
    if workload_ref:
        del dep["spec"]["template"]
        dep["spec"]["workloadRef"] = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "checkout-template"}
    return dep


def test_a_rollout_is_injected_like_a_deployment_and_scaled_through_its_own_kind_and_api_group() -> None:
    result = plan(rollout(), Facts(), CFG)
    assert result.deployment_patch and sidecar_of(applied(rollout(), result)) is not None
    so = body(result, "ScaledObject") or {}
    target = {"apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout", "name": rollout()["metadata"]["name"]}
    assert so["spec"]["scaleTargetRef"] == target
    (owner,) = so["metadata"]["ownerReferences"]
    assert (owner["apiVersion"], owner["kind"], owner["uid"]) == ("argoproj.io/v1alpha1", "Rollout", "rollout-uid")


def test_a_rollout_asking_for_connection_aware_scale_in_is_told_it_does_not_apply() -> None:
    dep = rollout()
    dep["metadata"]["annotations"]["tcp-exporter/scale-in-by-connections"] = "true"
    warned = [e for e in plan(dep, Facts(), CFG).events if e.reason == "ScaleInByConnectionsIgnored"]
    assert warned and "Rollout" in warned[0].message


def test_a_workloadref_rollout_is_planned_on_its_deployments_template_or_refused_where_that_is_unread() -> None:
    refused = plan(rollout(workload_ref=True), Facts(), CFG)
    assert refused.deployment_patch is None and not refused.children
    assert [e.reason for e in refused.events] == ["WorkloadRefNotInjected"]
    assert "checkout-template" in refused.events[0].message
    # Its Deployment read (the controller's `as_made`): planned with that template, patched in its place.
    made = rollout(workload_ref=True)
    made["spec"]["template"] = stored()["spec"]["template"]
    behalf = plan(made, Facts(template_from="checkout-template"), CFG)
    assert behalf.deployment_patch and sidecar_of(applied(made, behalf)) is not None
    assert (body(behalf, "ScaledObject") or {})["spec"]["scaleTargetRef"]["kind"] == "Rollout"
    webhook = plan(rollout(workload_ref=True), Facts(), Config(injection="webhook"))
    assert webhook.deployment_patch is None  # the pods get the sidecar as they are created
    so = body(webhook, "ScaledObject") or {}
    assert so["spec"]["scaleTargetRef"]["kind"] == "Rollout"
