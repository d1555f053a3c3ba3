"""The images, as far as this machine allows: no container engine runs here, so each Dockerfile's own
install steps (its COPY sources, ENV and RUN lines, unchanged but for the paths) run in a fresh virtualenv,
and its entrypoint is started from there as its USER."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import need

from harness.helpers import wait_for

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


def build(dockerfile: str, tmp: Path) -> Path:
    """Run the Dockerfile's install steps with /src and /venv mapped into tmp; return the venv."""
    spec = parse(REPO / dockerfile)
    src, venv = tmp / "src", tmp / "venv"
    src.mkdir()
    for item in spec.copies:
        source = REPO / item.rstrip("/")
        target = src / item.rstrip("/")
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(source, target)

    def mapped(text: str) -> str:
        return text.replace(spec.venv, str(venv)).replace(spec.workdir, str(src))

    env = {**os.environ, **{k: mapped(v) for k, v in spec.env.items()}}
    env.pop("VIRTUAL_ENV", None)
    for run in spec.runs:
        command = mapped(run).replace("python -m venv", f"{shlex.quote(sys.executable)} -m venv", 1)
        proc = subprocess.run(["sh", "-c", command], cwd=src, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return venv


def importable(venv: Path, module: str) -> bool:
    return subprocess.run([str(venv / "bin" / "python"), "-c", f"import {module}"], capture_output=True).returncode == 0


def as_user(user: str) -> list[str]:
    uid, _, gid = user.partition(":")
    return [
        "setpriv",
        f"--reuid={uid}",
        f"--regid={gid or uid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
    ]


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A build folder the image's non-root USER can read (pytest's own tmp_path is private to root)."""
    need(shutil.which("setpriv") is not None and os.geteuid() == 0, "root and setpriv, to run as the image's USER")
    path = Path(tempfile.mkdtemp(prefix="tcpx-image-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


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


@pytest.mark.install
def test_sidecar_image_install_has_only_its_dependencies_and_serves_as_non_root(workdir: Path) -> None:
    venv = build("Dockerfile.sidecar", workdir)
    assert importable(venv, "prometheus_client") and importable(venv, "psutil")
    assert not importable(venv, "kopf") and not importable(venv, "kubernetes")
    assert not importable(venv, "tcp_exporter_operator") and not (venv / "bin" / "tcp-exporter-operator").exists()
    spec = parse(REPO / "Dockerfile.sidecar")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        listen = probe.getsockname()[1]
    proc = subprocess.Popen(
        [
            *as_user(spec.user),
            str(venv / "bin" / spec.entrypoint[0]),
            f"--watch-port={server.getsockname()[1]}",
            "--method=sockdiag",
            f"--listen-address=127.0.0.1:{listen}",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )

    def serving() -> str | None:
        assert proc.poll() is None, proc.communicate()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{listen}/metrics", timeout=2) as resp:
                return str(resp.read().decode())
        except OSError:
            return None

    body = wait_for(serving, 30, "the image's entrypoint to serve")
    assert "tcp_exporter_established_connections" in body
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    server.close()


@pytest.mark.install
def test_operator_image_install_has_only_its_dependencies_and_starts(workdir: Path) -> None:
    venv = build("Dockerfile.operator", workdir)
    # kopf, and the official Kubernetes client that every API call of the operator goes through.
    assert importable(venv, "kopf") and importable(venv, "yaml") and importable(venv, "kubernetes")
    # Nothing of the sidecar's dependencies (prometheus_client serves the operator's own /metrics).
    assert not importable(venv, "psutil") and importable(venv, "prometheus_client")
    spec = parse(REPO / "Dockerfile.operator")
    entry = [*as_user(spec.user), str(venv / "bin" / spec.entrypoint[0])]
    version = subprocess.run([*entry, "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("tcp-exporter-operator ")
    rendered = subprocess.run(
        [*entry, "render", "-f", "-"],
        input=(REPO / "tests/golden/basic.in.yaml").read_text(),
        capture_output=True,
        text=True,
    )
    assert rendered.returncode == 0, rendered.stderr
    assert "kind: ScaledObject" in rendered.stdout
