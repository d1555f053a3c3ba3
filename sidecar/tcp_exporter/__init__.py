"""tcp-exporter: count ESTABLISHED inbound TCP connections on watched ports, for Prometheus."""

__version__ = "0.2.0"
