"""What every benchmark shares: progress lines and the results file."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def write_results(path: str, results: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2))
    log(f"wrote {path}")


def kubectl_for(kubeconfig: str) -> Callable[..., str]:
    """kubectl (the one the local control plane ships) against one cluster: run(*args) -> stdout."""
    from harness.localkube import cluster as localkube

    binary = localkube.kubectl()

    def run(*args: str) -> str:
        return subprocess.run(
            [binary, "--kubeconfig", kubeconfig, *args], check=True, capture_output=True, text=True
        ).stdout

    return run
