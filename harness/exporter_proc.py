"""The real tcp-exporter process, run inside a test's network namespace."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from harness.helpers import die_with_parent, wait_for
from harness.netns import http_get, join_netns

EXPORTER = str(Path(sys.executable).with_name("tcp-exporter"))
# setpriv as root: drop CAP_NET_ADMIN from the bounding and inheritable sets, so the
# exported process runs without it, as in a pod that was not granted it.
# A standalone script (no harness imports), so it runs as a file from any directory.
NO_NETLINK = str(Path(__file__).with_name("no_netlink.py"))
WITHOUT_NET_ADMIN = ["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin"]


def as_security_context(security: dict[str, Any]) -> list[str]:
    """setpriv's arguments that start a process as a runtime would under this container securityContext: its
    user, its capabilities (every one dropped but those added), no_new_privs without privilege escalation."""
    uid = security.get("runAsUser", 0)
    gid = security.get("runAsGroup", 0 if uid == 0 else uid)
    caps = security.get("capabilities", {})
    assert caps.get("drop") == ["ALL"], "the tests know only 'drop ALL, add what is needed'"
    bounding = ",".join(["-all", *(f"+{name.lower()}" for name in caps.get("add", []))])
    return [
        "setpriv",
        *(["--reuid", str(uid), "--regid", str(gid), "--clear-groups"] if uid else []),
        *([] if security.get("allowPrivilegeEscalation", True) else ["--no-new-privs"]),
        "--inh-caps=-all",
        f"--bounding-set={bounding}",
    ]


class Exporter:
    def __init__(
        self,
        ns: str,
        args: list[str],
        port: int = 9100,
        prefix: list[str] | None = None,
        env: dict[str, str] | None = None,
        seccomp_no_netlink: bool = False,
    ) -> None:
        self.ns = ns
        self.port = port
        if seccomp_no_netlink:  # applied after `ip netns exec`, which needs netlink itself
            prefix = [*(prefix or []), sys.executable, NO_NETLINK]
        cmd = ["ip", "netns", "exec", ns, *(prefix or []), EXPORTER, *args]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # These tests change connections between back-to-back scrapes and check each count: every scrape
            # counts afresh (the production default shares a count for 1 s; a unit test covers that).
            env={**os.environ, "TCP_EXPORTER_SHARE_WINDOW": "0", **(env or {})},
            preexec_fn=die_with_parent(),
        )

    def get(self, path: str) -> str | None:
        return http_get(self.ns, f"http://127.0.0.1:{self.port}{path}")

    def wait_ready(self, timeout: float = 20) -> Exporter:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"exporter exited {self.proc.returncode}: {self.output()}")
            return self.get("/healthz") == "ok\n"

        wait_for(ready, timeout, "the exporter to serve /healthz")
        return self

    def samples(self) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        text = self.get("/metrics")
        assert text is not None, "scrape failed"
        out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
        return out

    def established(self, port: int) -> int:
        return int(self.samples()["tcp_exporter_established_connections"][(("port", str(port)),)])

    def accepted(self, port: int) -> int:
        return int(self.samples()["tcp_exporter_accepted_connections_total"][(("port", str(port)),)])

    def identities(self) -> list[dict[str, str]]:
        """Each thread's UID and capabilities, as the kernel reports them."""
        out = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            fields = {}
            for line in (task / "status").read_text().splitlines():
                key, _, value = line.partition(":")
                fields[key] = value.strip()
            out.append({"thread": fields["Name"], "uid": fields["Uid"], "gid": fields["Gid"],
                        "effective": fields["CapEff"], "permitted": fields["CapPrm"]})  # fmt: skip
        return out

    def method(self) -> str:
        (labels,) = self.samples()["tcp_exporter_method_info"]
        return dict(labels)["method"]

    def stop(self, sig: int = signal.SIGTERM) -> float:
        """Signal the exporter; return how long it took to exit."""
        started = time.monotonic()
        self.proc.send_signal(sig)
        self.proc.wait(timeout=10)
        return time.monotonic() - started

    def output(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        out, _ = self.proc.communicate(timeout=10)
        return str(out)

    def __enter__(self) -> Exporter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=120) as resp:
        return str(resp.read().decode())


def gauge(text: str, port: int) -> int:
    prefix = f'tcp_exporter_established_connections{{port="{port}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return int(float(line[len(prefix) :]))
    raise ValueError("no gauge in scrape")


def hammer(ns: str, port: int, seconds: float, scrapers: int, watched: int = 8080) -> dict[str, Any]:
    """`scrapers` threads scraping back to back for `seconds`: failures and latency percentiles."""
    latencies: list[float] = []
    failures = 0
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def scraper() -> None:
        nonlocal failures
        join_netns(ns)
        while time.monotonic() < deadline:
            t = time.perf_counter()
            try:
                gauge(scrape(port), watched)
                with lock:
                    latencies.append(time.perf_counter() - t)
            except (OSError, ValueError):
                with lock:
                    failures += 1

    threads = [threading.Thread(target=scraper) for _ in range(scrapers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies.sort()
    return {
        "scrapers": scrapers,
        "seconds": seconds,
        "scrapes": len(latencies),
        "failures": failures,
        "p50_ms": latencies[len(latencies) // 2] * 1e3,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
    }
