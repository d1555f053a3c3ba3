"""The images: the Dockerfiles lint-clean and pinned, and what the images built from them (by the node tier's
buildah build) hold. That they run is shown on the real node (tests/test_node.py): the operator's image as the
operator's pod, the sidecar's as the injected sidecar."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import need

REPO = Path(__file__).resolve().parent.parent
HADOLINT = Path(sys.executable).with_name("hadolint")


@dataclass
class Dockerfile:
    copies: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    runs: list[str] = field(default_factory=list)
    workdir: str = "/"
    user: str = ""
    entrypoint: list[str] = field(default_factory=list)
    venv: str = "/venv"


def parse(path: Path) -> Dockerfile:
    """The build stage's COPY/ENV/WORKDIR/RUN, and the final stage's USER and ENTRYPOINT."""
    import json

    out = Dockerfile()
    stage = 0
    # A line ending in a backslash continues on the next, as Docker reads it.
    for raw in path.read_text().replace("\\\n", " ").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word == "FROM":
            stage += 1
        elif stage == 1 and word == "COPY" and "--from" not in rest:
            out.copies += shlex.split(rest)[:-1]
        elif stage == 1 and word == "ENV":
            out.env.update(dict(item.split("=", 1) for item in shlex.split(rest)))
        elif stage == 1 and word == "WORKDIR":
            out.workdir = rest
        elif stage == 1 and word == "RUN":
            out.runs.append(rest)
        elif stage == 2 and word == "USER":
            out.user = rest
        elif stage == 2 and word == "ENTRYPOINT":
            out.entrypoint = json.loads(rest)
    return out


def image_files(archive: Path) -> tuple[dict[str, Any], set[str]]:
    """The image config's `config` and every path its layers hold, read from its OCI archive."""
    with tarfile.open(archive) as tar:

        def blob(digest: str) -> bytes:
            member = tar.extractfile("blobs/sha256/" + digest.split(":", 1)[1])
            assert member is not None
            return member.read()

        index = json.loads(blob_of(tar, "index.json"))
        manifest = json.loads(blob(index["manifests"][0]["digest"]))
        config = json.loads(blob(manifest["config"]["digest"]))["config"]
        paths: set[str] = set()
        for layer in manifest["layers"]:
            with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob(layer["digest"])))) as files:
                paths.update("/" + name.lstrip("./") for name in files.getnames())
    return config, paths


def blob_of(tar: tarfile.TarFile, name: str) -> bytes:
    member = tar.extractfile(name)
    assert member is not None
    return member.read()


def site_packages(paths: set[str]) -> set[str]:
    """Top-level names under the image's /venv site-packages."""
    out = set()
    for path in paths:
        parts = path.split("/")
        if len(parts) > 6 and parts[1:3] == ["venv", "lib"] and parts[4] == "site-packages":
            out.add(parts[5])
    return out


@pytest.fixture(scope="module")
def built() -> dict[str, Path]:
    """The images as the node tier builds them from the committed Dockerfiles (buildah, cached)."""
    need(os.geteuid() == 0, "buildah and mmdebstrap build the images as root")
    for tool in ("buildah", "mmdebstrap"):
        need(shutil.which(tool) is not None, f"{tool} builds the images")
    from harness.images import product_images

    sidecar, operator = product_images()
    return {"sidecar": sidecar, "operator": operator}


def test_dockerfiles_are_hadolint_clean() -> None:
    proc = subprocess.run(
        [str(HADOLINT), "Dockerfile.sidecar", "Dockerfile.operator"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", ["Dockerfile.sidecar", "Dockerfile.operator"])
def test_base_image_is_pinned_by_digest_and_runs_as_non_root(dockerfile: str) -> None:
    text = (REPO / dockerfile).read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:[\w.-]+@sha256:[0-9a-f]{64}$", text, re.M)
    assert parse(REPO / dockerfile).user == "65532:65532"


@pytest.mark.node
def test_the_sidecar_image_holds_the_sidecar_and_its_dependencies_only_and_runs_as_65532(
    built: dict[str, Path],
) -> None:
    config, paths = image_files(built["sidecar"])
    assert config["User"] == "65532:65532" and config["Entrypoint"] == ["tcp-exporter"]
    packages = site_packages(paths)
    assert {"tcp_exporter", "prometheus_client", "psutil"} <= packages
    assert not {"tcp_exporter_operator", "kopf", "kubernetes"} & packages
    assert "/venv/bin/tcp-exporter" in paths and "/venv/bin/tcp-exporter-operator" not in paths


@pytest.mark.node
def test_the_operator_image_holds_the_operator_and_its_dependencies_only_and_runs_as_65532(
    built: dict[str, Path],
) -> None:
    config, paths = image_files(built["operator"])
    assert config["User"] == "65532:65532" and config["Entrypoint"] == ["tcp-exporter-operator"]
    packages = site_packages(paths)
    # kopf, and the official Kubernetes client that every API call of the operator goes through;
    # prometheus_client serves the operator's own /metrics; nothing else of the sidecar's.
    assert {"tcp_exporter_operator", "kopf", "kubernetes", "yaml", "prometheus_client"} <= packages
    assert "psutil" not in packages
