"""Helm (for the chart's tests and `make release`) and actionlint (for `make lint`), built from their Go modules
(harness/helmbuild/go.mod) into the cache, like the control plane: no binary is downloaded or committed."""

from __future__ import annotations

from pathlib import Path

from harness import gobuild

HERE = Path(__file__).resolve().parent
HELM_VERSION = "v3.22.0"  # helm.sh/helm/v3, as pinned in helmbuild/go.mod


def binaries() -> Path:
    return gobuild.build(
        "helm",
        HELM_VERSION,
        HERE / "helmbuild",
        {"helm": "helm.sh/helm/v3/cmd/helm", "actionlint": "github.com/rhysd/actionlint/cmd/actionlint"},
    )


def helm() -> str:
    return str(binaries() / "helm")


def actionlint() -> str:
    return str(binaries() / "actionlint")


if __name__ == "__main__":
    print(binaries())
