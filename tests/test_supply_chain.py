"""What can be checked here of the supply chain: the workflows pin every action by commit SHA and give each job
only the permissions it names; every dependency is pinned in the lock."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yaml"))


def test_every_action_in_every_workflow_is_pinned_by_a_full_commit_sha() -> None:
    assert WORKFLOWS
    for path in WORKFLOWS:
        uses = re.findall(r"uses:\s*(\S+)", path.read_text())
        assert uses, path
        for action in uses:
            assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", action), f"{path.name}: {action} is not pinned"


def test_no_workflow_grants_permissions_at_the_top_and_each_job_names_its_own() -> None:
    for path in WORKFLOWS:
        workflow = yaml.safe_load(path.read_text())
        assert workflow.get("permissions") == {}, f"{path.name}: the top level must grant nothing"
        for name, job in workflow["jobs"].items():
            assert "permissions" in job, f"{path.name}: job {name} must name its permissions"
            assert "write-all" not in str(job["permissions"])


def test_every_dependency_in_the_lock_is_pinned_to_one_version() -> None:
    lines = [line for line in (REPO / "constraints.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert lines
    for line in lines:
        assert re.fullmatch(r"[A-Za-z0-9_.-]+==[A-Za-z0-9_.+!-]+", line), line


def test_each_images_requirements_carry_hashes_and_the_locks_pins_and_its_dockerfile_requires_them() -> None:
    locked = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (REPO / "constraints.txt").read_text(), re.M))
    locked = {name.lower().replace("_", "-"): version for name, version in locked.items()}
    for image in ("sidecar", "operator"):
        text = (REPO / "requirements" / f"{image}.txt").read_text()
        entries = re.findall(
            r"^([A-Za-z0-9_.-]+)==(\S+) \\\n((?:    --hash=sha256:[0-9a-f]{64}(?: \\\n)?)+)", text, re.M
        )
        assert entries and len(entries) == len(re.findall(r"^\S+==", text, re.M)), f"{image}: an entry without hashes"
        for name, version, _hashes in entries:
            assert locked[name.lower().replace("_", "-")] == version, f"{image}: {name} {version} is not the lock's"
        dockerfile = (REPO / f"Dockerfile.{image}").read_text()
        assert f"--require-hashes --no-deps -r requirements/{image}.txt" in dockerfile
        assert "--no-build-isolation --no-index ." in dockerfile  # the project itself, from the source only
