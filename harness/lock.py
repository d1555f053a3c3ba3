"""`make lock`'s second half: each image's dependencies, pinned as constraints.txt pins them, with the sha256 of
every file PyPI holds for that version, so that the Dockerfiles install them with `pip --require-hashes` (a
changed or substituted file on the index fails the build).

    python -m harness.lock VENV_PYTHON EXTRA OUT

VENV_PYTHON: a fresh virtualenv's python with only `.[EXTRA]` installed (with constraints.txt), whose installed
distributions are the image's closure; setuptools (the build backend, installed without build isolation) is added
at the version constraints.txt pins.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

INDEX = "https://pypi.org/simple"  # the JSON form of the simple API (PEP 691)


def closure(python: str) -> dict[str, str]:
    """name -> version of what that environment has installed, pip and the project itself left out."""
    out = subprocess.run([python, "-m", "pip", "list", "--format=json"], check=True, capture_output=True, text=True)
    return {d["name"]: d["version"] for d in json.loads(out.stdout) if d["name"].lower() not in ("pip", "tcp-exporter")}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def of_release(filename: str, name: str, version: str) -> bool:
    """Whether a file of the index is one of name==version: a wheel (dist-version-...whl) or an sdist."""
    if filename.endswith(".whl"):
        dist, file_version = filename.split("-")[:2]
    elif filename.endswith((".tar.gz", ".zip")):
        dist, _, file_version = filename.removesuffix(".tar.gz").removesuffix(".zip").rpartition("-")
    else:
        return False
    return normalized(dist) == normalized(name) and file_version == version


def hashes(name: str, version: str) -> list[str]:
    """The sha256 of every file of name==version (wheels of every platform, and the sdist)."""
    request = urllib.request.Request(f"{INDEX}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        project = json.load(response)
    found = sorted({f["hashes"]["sha256"] for f in project["files"] if of_release(f["filename"], name, version)})
    if not found:
        raise SystemExit(f"PyPI lists no files for {name}=={version}")
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    python, extra, out = argv
    pins = closure(python)
    constraints = Path(__file__).resolve().parent.parent / "constraints.txt"
    locked = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", constraints.read_text(), re.M))
    pins["setuptools"] = locked["setuptools"]  # the build backend, installed (hashed) before the project
    lines = [
        f"# The {extra} image's dependencies, pinned as constraints.txt pins them, with every file's sha256 on PyPI:",
        "# installed by its Dockerfile with pip --require-hashes. Regenerate: make lock",
    ]
    for name in sorted(pins, key=str.lower):
        lines.append(f"{name}=={pins[name]} \\")
        lines += [f"    --hash=sha256:{h} \\" for h in hashes(name, pins[name])]
        lines[-1] = lines[-1].removesuffix(" \\")
    Path(out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
