"""The operator's pure builders: golden files through the real render command, and the plan's decisions."""

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
from tcp_exporter_operator import builders
from tcp_exporter_operator.builders import Facts, plan
from tcp_exporter_operator.config import Config

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


def test_rendered_sidecar_args_are_accepted_by_the_real_sidecar_cli() -> None:
    docs = list(yaml.safe_load_all(render("named-ports", None).stdout))
    (sidecar,) = [c for c in docs[0]["spec"]["template"]["spec"]["containers"] if c["name"] == "tcp-exporter"]
    args = parse_args(sidecar["args"], {})
    assert args.watch_port == [1883, 5672]
    assert args.listen_address == ("", 9200)
    assert sidecar["ports"][0]["containerPort"] == 9200


# -- plan -----------------------------------------------------------------------------------------

CFG = Config()


def stored(name: str = "basic") -> dict[str, Any]:
    """An input Deployment as the API server would return it (uid, resourceVersion, defaults)."""
    dep = yaml.safe_load((GOLDEN / f"{name}.in.yaml").read_text())
    dep["metadata"].update(uid="uid-1", resourceVersion="10")
    return dep


def applied(dep: dict[str, Any], result: builders.Plan) -> dict[str, Any]:
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
    assert first.deployment_patch and first.scaled_object_action == "create"
    after = applied(dep, first)
    again = plan(after, Facts(scaled_object=first.scaled_object), CFG)
    assert again.writes == 0 and again.events == []


def test_equal_quantities_in_another_form_cause_no_patch() -> None:
    dep = applied(stored(), plan(stored(), Facts(), CFG))
    (sidecar,) = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "tcp-exporter"]
    sidecar["resources"]["requests"]["cpu"] = "0.01"  # the API server may write 10m back as 0.01 or vice versa
    sidecar["resources"]["limits"]["memory"] = str(96 * 1024 * 1024)
    assert plan(dep, Facts(scaled_object={"spec": {}}), CFG).deployment_patch is None


def test_a_new_operator_version_alone_does_not_roll_the_pods() -> None:
    dep = applied(stored(), plan(stored(), Facts(), CFG))
    status = json.loads(dep["metadata"]["annotations"][builders.A_STATUS])
    status["version"] = "0.0.1"
    dep["metadata"]["annotations"][builders.A_STATUS] = json.dumps(status)
    assert plan(dep, Facts(scaled_object={"spec": {}}), CFG).deployment_patch is None


def test_a_sidecar_removed_by_hand_is_planned_back() -> None:
    dep = applied(stored(), plan(stored(), Facts(), CFG))
    dep["spec"]["template"]["spec"]["containers"] = dep["spec"]["template"]["spec"]["containers"][:1]
    assert plan(dep, Facts(), CFG).deployment_patch is not None


def test_removing_the_port_annotation_undoes_exactly_what_was_added() -> None:
    original = stored()
    first = plan(original, Facts(), CFG)
    dep = applied(original, first)
    del dep["metadata"]["annotations"][builders.A_PORT]
    undo = plan(dep, Facts(scaled_object=first.scaled_object), CFG)
    assert undo.scaled_object_action == "delete"
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
    assert builders.A_STATUS not in clean["metadata"]["annotations"]


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
    assert result.deployment_patch is not None and result.scaled_object_action is None
    assert "KedaMissing" in [e.reason for e in result.events]


def test_a_scaledobject_edited_by_hand_is_planned_back() -> None:
    dep = stored()
    desired = builders.scaled_object(dep, builders.parse_spec(dep, CFG))
    edited = copy.deepcopy(desired)
    edited["spec"]["maxReplicaCount"] = 99
    after = applied(dep, plan(dep, Facts(), CFG))
    result = plan(after, Facts(scaled_object=edited), CFG)
    assert result.scaled_object_action == "update" and result.deployment_patch is None


def test_the_query_matches_only_this_deployments_pods() -> None:
    import re

    q = builders.query("shop", "web")
    pattern = re.search(r'pod=~"([^"]+)"', q).group(1)  # type: ignore[union-attr]
    assert re.fullmatch(pattern, "web-5d4f8b7c9d-x2x7k")
    assert not re.fullmatch(pattern, "web-api-5d4f8b7c9d-x2x7k")
    assert contract.METRIC_ESTABLISHED in q and q.endswith("or vector(0)")


def test_config_reads_prefixed_environment_and_rejects_bad_numbers() -> None:
    cfg = Config.from_env({"TCP_EXPORTER_OPERATOR_THRESHOLD": "7", "TCP_EXPORTER_OPERATOR_NAMESPACES": "a, b"})
    assert cfg.threshold == 7 and cfg.namespaces == ("a", "b")
    with pytest.raises(ValueError, match="TCP_EXPORTER_OPERATOR_MAX_REPLICAS"):
        Config.from_env({"TCP_EXPORTER_OPERATOR_MAX_REPLICAS": "many"})
