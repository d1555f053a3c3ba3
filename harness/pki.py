"""Test certificates, made with openssl: a CA, and certificates it signs (for the control plane and KEDA)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(folder: Path, name: str, common_name: str) -> None:
    """NAME.crt and NAME.key in `folder`: a self-signed CA valid for 30 days."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj", f"/CN={common_name}",
             "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=folder)  # fmt: skip


def make_cert(folder: Path, name: str, ca: str, common_name: str, extensions: str = "") -> None:
    """NAME.crt and NAME.key in `folder`, signed by the CA `ca` there; `extensions` is openssl extfile text
    (subjectAltName=..., extendedKeyUsage=...)."""
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={common_name}", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", cwd=folder)  # fmt: skip
    extfile = []
    if extensions:
        (folder / f"{name}.ext").write_text(extensions)
        extfile = ["-extfile", f"{name}.ext"]
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-days", "30", *extfile, "-out", f"{name}.crt", cwd=folder)  # fmt: skip
