"""Container images made here without a container engine or a registry.

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
import tarfile
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
