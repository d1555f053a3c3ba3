"""The operator's configuration: one typed object, from TCP_EXPORTER_OPERATOR_* variables at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from tcp_exporter import __version__

PREFIX = "TCP_EXPORTER_OPERATOR_"


@dataclass(frozen=True)
class Config:
    sidecar_image: str = f"ghcr.io/tcp-exporter/tcp-exporter:{__version__}"
    prometheus: str = "http://prometheus-operated.monitoring.svc:9090"
    method: str = "sockdiag"
    threshold: int = 100
    min_replicas: int = 1
    max_replicas: int = 10
    metrics_port: int = 9100
    cpu_request: str = "10m"
    cpu_limit: str = "250m"
    memory_request: str = "32Mi"
    memory_limit: str = "96Mi"
    namespaces: tuple[str, ...] = field(default=())

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Defaults, overridden by TCP_EXPORTER_OPERATOR_<FIELD> variables; raises ValueError on a bad value."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            name = PREFIX + f.name.upper()
            if name not in environ:
                continue
            raw = environ[name]
            if f.type in ("int", int):
                try:
                    values[f.name] = int(raw)
                except ValueError:
                    raise ValueError(f"{name}={raw!r} is not an integer") from None
            elif f.name == "namespaces":
                values[f.name] = tuple(n.strip() for n in raw.split(",") if n.strip())
            else:
                values[f.name] = raw
        return cls(**values)  # type: ignore[arg-type]
