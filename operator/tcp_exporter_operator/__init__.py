"""tcp-exporter-operator: inject the exporter sidecar into annotated Deployments and own their KEDA ScaledObject."""
