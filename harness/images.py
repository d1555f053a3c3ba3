"""Container images made here without a container engine or a registry.

The product's images are built from the committed Dockerfiles by buildah (daemonless, vfs storage), on a
Python base made from Debian's packages with mmdebstrap, and exported as OCI archives.

An image of one static binary (agnhost, built from the Kubernetes module at the control plane's version) is
written directly as an OCI image archive: a layer tarball, a config and a manifest, which `ctr images import`
loads under the name given. It serves as the node's sandbox image (`agnhost pause`) and as the sample's app
image, under the exact name `manifests/samples/` uses. Archives are cached by a hash of their inputs.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from harness import gobuild

SAMPLE_IMAGE = "registry.k8s.io/e2e-test-images/agnhost:2.53"  # as manifests/samples/deployment.yaml names it
PAUSE_IMAGE = "tcp-exporter.test/pause:agnhost"


def _blob(folder: Path, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (folder / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (folder / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def single_binary_image(name: str, binary: Path, entrypoint: list[str], out: Path) -> Path:
    """An OCI archive at `out` holding `name`: `binary` as /<its name>, run as `entrypoint`, as UID 65532."""
    key = hashlib.sha256(
        json.dumps([name, entrypoint]).encode() + hashlib.sha256(binary.read_bytes()).digest()
    ).hexdigest()[:16]
    archive = out / f"{name.replace('/', '_').replace(':', '_')}-{key}.tar"
    if archive.exists():
        return archive
    out.mkdir(parents=True, exist_ok=True)
    layout = out / f".layout-{key}"
    layer_tar = io.BytesIO()
    with tarfile.open(fileobj=layer_tar, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tar.gettarinfo(str(binary), arcname=binary.name)
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        info.mode = 0o755
        with open(binary, "rb") as f:
            tar.addfile(info, f)
        tmp = tarfile.TarInfo("tmp")
        tmp.type, tmp.mode, tmp.mtime = tarfile.DIRTYPE, 0o1777, 0
        tar.addfile(tmp)
    raw = layer_tar.getvalue()
    layer = _blob(layout, gzip.compress(raw, mtime=0))
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": entrypoint, "User": "65532:65532", "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(raw).hexdigest()}"]},
    }
    config_desc = _blob(layout, json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config_desc},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer}],
    }
    manifest_desc = _blob(layout, json.dumps(manifest).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **manifest_desc,
                "annotations": {"org.opencontainers.image.ref.name": name, "io.containerd.image.name": name},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    tmp_archive = archive.with_suffix(".tmp")
    with tarfile.open(tmp_archive, "w") as tar:
        for path in sorted(layout.rglob("*")):
            tar.add(str(path), arcname=str(path.relative_to(layout)), recursive=False)
    tmp_archive.rename(archive)
    for path in sorted(layout.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    layout.rmdir()
    return archive


def agnhost_images(agnhost: Path) -> list[Path]:
    """The sandbox (pause) image and the sample's app image, both agnhost."""
    out = gobuild.cache_dir() / "images"
    return [
        single_binary_image(PAUSE_IMAGE, agnhost, ["/agnhost", "pause"], out),
        single_binary_image(SAMPLE_IMAGE, agnhost, ["/agnhost"], out),
    ]


# -- images built from the committed Dockerfiles ---------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
BASE_IMAGE = "localhost/tcp-exporter-base:python3.11-bookworm"
# As python:3.11-slim-bookworm is made: Debian bookworm's minimal system with its Python 3.11 (and venv, which
# the Dockerfiles use), from Debian's packages; documentation and locales left out.
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# What the Dockerfiles copy into the build: a change to any of it is a new image.
BUILD_INPUTS = ("requirements", "pyproject.toml", "README.md", "sidecar", "operator")


def _log(msg: str) -> None:
    print(f"[images] {msg}", file=sys.stderr, flush=True)


def _buildah(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    store = gobuild.cache_dir() / "buildah"
    command = ["buildah", "--storage-driver", "vfs", "--root", str(store / "root"), "--runroot", str(store / "run")]
    done = subprocess.run([*command, *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"buildah {' '.join(args[:2])} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def _has_image(name: str) -> bool:
    return _buildah("inspect", "--type", "image", name, check=False).returncode == 0


def base_image() -> str:
    """The Python base the Dockerfiles build FROM, made once with mmdebstrap and kept in buildah's store."""
    key = hashlib.sha256(json.dumps([BASE_PACKAGES, DEBIAN_MIRROR]).encode()).hexdigest()[:12]
    name = f"{BASE_IMAGE}-{key}"
    if _has_image(name):
        return name
    for tool in ("mmdebstrap", "buildah"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is needed to build the images (apt-get install {tool})")
    started = time.monotonic()
    _log(f"building the base image {name} from Debian's packages (about a minute)")
    with tempfile.TemporaryDirectory(prefix="tcpx-base-") as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        subprocess.run(
            ["mmdebstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
             "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
             "--dpkgopt=path-exclude=/usr/share/locale/*", "--customize-hook=rm -rf $1/var/lib/apt/lists/*",
             "bookworm", str(rootfs), DEBIAN_MIRROR],
            check=True, capture_output=True,
        )  # fmt: skip
        container = _buildah("from", "scratch").stdout.strip()
        try:
            _buildah("add", container, str(rootfs), "/")
            _buildah("config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                     "--env", "LANG=C.UTF-8", "--cmd", "python3", container)  # fmt: skip
            _buildah("commit", container, name)
        finally:
            _buildah("rm", container, check=False)
    _log(f"base image built in {time.monotonic() - started:.0f} s")
    return name


def _inputs_digest(dockerfile: str) -> str:
    digest = hashlib.sha256((REPO / dockerfile).read_bytes())
    for entry in BUILD_INPUTS:
        path = REPO / entry
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            if "__pycache__" in f.parts or f.suffix == ".pyc" or ".egg-info" in str(f):
                continue
            digest.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:16]


def dockerfile_image(dockerfile: str, name: str) -> Path:
    """An OCI archive of `name`, built from the committed `dockerfile` unchanged but for its base-image argument
    (PYTHON_IMAGE: the base made here, since no registry is reachable). Cached by a hash of the build's inputs."""
    out = gobuild.cache_dir() / "images"
    archive = out / f"{name.replace('/', '_').replace(':', '_')}-{_inputs_digest(dockerfile)}.tar"
    if archive.exists():
        return archive
    base = base_image()
    started = time.monotonic()
    _log(f"building {name} from {dockerfile}")
    # RUN steps reach PyPI as this host does: its CA bundle (which may hold a proxy's CA) is mounted where
    # Debian's pip reads it, for the build only; nothing of it is in the image.
    _buildah("bud", "--isolation", "chroot", "--network", "host", "--layers=false",
             "-v", "/etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro",
             "--build-arg", f"PYTHON_IMAGE={base}", "-f", str(REPO / dockerfile), "-t", name, str(REPO))  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{name.replace('/', '_').replace(':', '_')}-*.tar"):
        old.unlink()
    tmp = archive.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    _buildah("push", name, f"oci-archive:{tmp}:{name}")
    tmp.rename(archive)
    _buildah("rmi", name, check=False)  # the store keeps only the base
    _log(f"{name} built in {time.monotonic() - started:.0f} s ({archive.stat().st_size / 2**20:.0f} MiB archive)")
    return archive


def product_images() -> list[Path]:
    """The sidecar's and the operator's images, under the names (and version) the manifests install."""
    from tcp_exporter import __version__

    return [
        dockerfile_image("Dockerfile.sidecar", f"ghcr.io/tcp-exporter/tcp-exporter:{__version__}"),
        dockerfile_image("Dockerfile.operator", f"ghcr.io/tcp-exporter/tcp-exporter-operator:{__version__}"),
    ]
