"""One version: sidecar/tcp_exporter/__init__.py. Everything that states it elsewhere must agree."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from tcp_exporter import __version__
from tcp_exporter_operator.config import Config

REPO = Path(__file__).resolve().parent.parent


def test_the_package_takes_its_version_from_the_one_source() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__)


def test_the_manifests_install_images_of_this_version() -> None:
    kustomization = yaml.safe_load((REPO / "manifests" / "kustomization.yaml").read_text())
    assert {image["name"]: image["newTag"] for image in kustomization["images"]} == {
        "tcp-exporter-operator": __version__,
        "tcp-exporter": __version__,
    }
    deployment = yaml.safe_load((REPO / "manifests" / "manager" / "deployment.yaml").read_text())
    assert deployment["metadata"]["labels"]["app.kubernetes.io/version"] == __version__
    assert Config().sidecar_image.endswith(f":{__version__}")


def test_the_changelog_has_an_entry_for_this_version() -> None:
    assert f"## [{__version__}]" in (REPO / "CHANGELOG.md").read_text()


def test_the_chart_is_of_this_version() -> None:
    chart = yaml.safe_load((REPO / "charts" / "tcp-exporter" / "Chart.yaml").read_text())
    assert chart["version"] == __version__ and chart["appVersion"] == __version__


def test_the_readmes_compatibility_table_names_the_versions_the_harness_tests() -> None:
    from harness.helmtools import HELM_VERSION
    from harness.kedastack import KEDA_VERSION
    from harness.localkube.cluster import KUBE_VERSION
    from harness.promstack import PROMETHEUS_MODULE_VERSION

    readme = (REPO / "README.md").read_text()
    for version in (KUBE_VERSION, KEDA_VERSION, PROMETHEUS_MODULE_VERSION, HELM_VERSION):
        assert f" {version} " in readme or f"module {version})" in readme, version


def test_the_readmes_install_commands_name_this_version_and_no_other() -> None:
    readme = (REPO / "README.md").read_text()
    install = readme.split("\n## Install on a cluster\n", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"(?<![\d.])v?(\d+\.\d+\.\d+)(?![\d.])", install.split("```sh", 1)[1].split("```", 1)[0]))
    assert named == {__version__}, named
    assert f"## [{__version__}] - " in (REPO / "CHANGELOG.md").read_text(), "the release is dated"
