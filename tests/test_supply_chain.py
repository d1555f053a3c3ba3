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
