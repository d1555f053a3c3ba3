"""Build test tooling from published Go modules, once, into a cache outside the repository.

A build is keyed by a hash of everything that decides its output (the module's go.mod, go.sum and Go
files, the build tags and linker flags), so a change rebuilds and an unchanged tree reuses the binaries.
Cold builds take minutes on two cores: progress is printed every 30 s so `make test` never looks stuck.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path


def log(msg: str) -> None:
    print(f"[gobuild] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    base = os.environ.get("TCP_EXPORTER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tcp-exporter"
    )
    return Path(base)


def build_dir(name: str, version: str, module: Path, tags: str = "", ldflags: str = "", cgo: bool = False) -> Path:
    """Where the binaries of this exact build live: cache/<name>/<version>-<hash>/."""
    digest = hashlib.sha256(f"{tags}\0{ldflags}".encode() + (b"\0cgo" if cgo else b""))
    for path in sorted([module / "go.mod", module / "go.sum", *module.glob("*.go")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return cache_dir() / name / f"{version}-{digest.hexdigest()[:12]}"


def build(
    name: str,
    version: str,
    module: Path,
    outputs: Mapping[str, str],
    tags: str = "",
    ldflags: str = "",
    cgo: bool = False,
) -> Path:
    """Build each `outputs` binary name from its package path in `module`, unless cached; return the folder.
    Static (CGO_ENABLED=0) unless `cgo` (runc's seccomp support needs libseccomp through cgo)."""
    target = build_dir(name, version, module, tags, ldflags, cgo)
    if all((target / binary).exists() for binary in outputs):
        return target
    if shutil.which("go") is None:
        raise RuntimeError(f"Go is needed to build {name} and was not found on PATH")
    target.mkdir(parents=True, exist_ok=True)
    log(f"building {name} {version} ({', '.join(outputs)}) from Go modules into {target}")
    log("a cold build takes several minutes on two cores; later runs reuse it")
    started = time.monotonic()
    for binary, package in outputs.items():
        if (target / binary).exists():
            continue
        tmp = target / f".{binary}.tmp"
        command = ["go", "build", "-trimpath", "-ldflags", ldflags or "-s -w", "-o", str(tmp)]
        if tags:
            command += ["-tags", tags]
        proc = subprocess.Popen([*command, package], cwd=module, env={**os.environ, "CGO_ENABLED": "1" if cgo else "0"})
        while True:
            try:
                rc = proc.wait(timeout=30)
                break
            except subprocess.TimeoutExpired:
                log(f"  still building {binary} ({time.monotonic() - started:.0f} s)")
        if rc != 0:
            raise RuntimeError(f"go build of {package} failed with exit code {rc}")
        tmp.rename(target / binary)
    log(f"built {name} in {time.monotonic() - started:.0f} s")
    for old in target.parent.iterdir():  # earlier builds, by version or source hash
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    return target
