"""The test harness: real Kubernetes parts built from Go modules and run on loopback (the control plane, KEDA,
Prometheus, Helm), the real operator and sidecar as processes, network namespaces, and a kubelet's status writes.
Used by the tests, `make demo` and the benchmarks alike; imported as `harness.<module>` from the repository root."""
