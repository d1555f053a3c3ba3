"""Sidecar benchmark: scrape cost of each counting method against ss, conntrack(8) and psutil, in one run.

    python -m bench.sidecar [--scales 1000,10000,100000] [--reliability-seconds 30] [--json PATH]

For each scale, in a fresh pair of network namespaces: N ESTABLISHED
connections to the watched port plus 1,000 to another port, held by several
worker processes (a process may hold 20,000 files here). The three exporters
run side by side in the pod namespace; the conntrack one starts before the
connections open, as it would in a pod. Needs root.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from exporter_proc import EXPORTER, gauge, hammer, scrape
from helpers import die_with_parent, wait_for
from netns import Pair, in_netns, join_netns, pair

from bench.common import RESULTS, log, write_results

WATCHED, OTHER = 8080, 9090
OTHER_CONNECTIONS = 1000
PER_WORKER = 15000
METHOD_PORTS = {"conntrack": 9101, "sockdiag": 9102, "psutil": 9103}


class Workers:
    """Connection-holding worker processes; they exit when their stdin closes."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, ns: str, *args: str) -> str:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "bench.conn_worker", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
            preexec_fn=die_with_parent(),
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        return proc.stdout.readline().strip()

    def close(self) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in self.procs:
            proc.wait(timeout=60)


def open_connections(p: Pair, workers: Workers, n: int) -> None:
    run_in = ["ip", "netns", "exec", p.peer, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"]
    subprocess.run(run_in, check=True)
    servers = math.ceil(n / PER_WORKER) + 1
    for _ in range(servers):
        assert workers.start(p.pod, "server", str(WATCHED)) == "listening"
    assert workers.start(p.pod, "server", str(OTHER)) == "listening"
    sources = [p.peer_v4, *p.peer_extra_v4]
    left, i = n, 0
    while left > 0:
        chunk = min(PER_WORKER, left)
        assert workers.start(p.peer, "client", sources[i], p.pod_v4, str(WATCHED), str(chunk)) == f"ready {chunk}"
        left -= chunk
        i += 1
    src = sources[i]
    ready = workers.start(p.peer, "client", src, p.pod_v4, str(OTHER), str(OTHER_CONNECTIONS))
    assert ready == f"ready {OTHER_CONNECTIONS}"
    wait_for(lambda: p.ss_established(WATCHED) == n, 60, f"{n} ESTABLISHED connections")


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the whole process, threads that have exited included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_exporter(p: Pair, method: str) -> subprocess.Popen[bytes]:
    port = METHOD_PORTS[method]
    proc = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            p.pod,
            EXPORTER,
            f"--watch-port={WATCHED}",
            f"--method={method}",
            f"--listen-address=127.0.0.1:{port}",
            "--log-level=warning",
        ],
        preexec_fn=die_with_parent(),
    )

    def up() -> bool:
        try:
            return in_netns(p.pod, lambda: scrape(port)) != ""
        except OSError:
            return False

    wait_for(up, 30, f"the {method} exporter")
    return proc


def measure_exporter(p: Pair, method: str, proc: subprocess.Popen[bytes], n: int, reps: int) -> dict[str, Any]:
    port = METHOD_PORTS[method]

    def run() -> tuple[list[float], float, int]:
        scrape(port)  # warm
        times = []
        value = -1
        for _ in range(reps):
            t = time.perf_counter()
            text = scrape(port)
            times.append(time.perf_counter() - t)
            value = gauge(text, WATCHED)
        # CPU per scrape over at least two seconds of back-to-back scrapes: the clock ticks are 10 ms.
        cpu0, count, until = cpu_seconds(proc.pid), 0, time.monotonic() + 2.0
        while count < 3 or time.monotonic() < until:
            scrape(port)
            count += 1
        return times, (cpu_seconds(proc.pid) - cpu0) / count, value

    times, cpu, value = in_netns(p.pod, run)
    return {
        "tool": f"tcp-exporter --method={method}",
        "kind": "exporter scrape",
        "median_ms": statistics.median(times) * 1e3,
        "cpu_ms": cpu * 1e3,
        "rss_mb": rss_mb(proc.pid),
        "value": value,
        "exact": value == n,
        "reps": reps,
    }


def measure_command(p: Pair, name: str, command: str, n: int, reps: int) -> dict[str, Any]:
    def run() -> tuple[list[float], int]:
        times, value = [], -1
        for _ in range(reps):
            t = time.perf_counter()
            out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout
            times.append(time.perf_counter() - t)
            value = int(out.split()[0])
        return times, value

    times, value = in_netns(p.pod, run)
    return {
        "tool": name,
        "kind": "whole process",
        "median_ms": statistics.median(times) * 1e3,
        "cpu_ms": None,
        "rss_mb": None,
        "value": value,
        "exact": value == n,
        "reps": reps,
    }


PSUTIL_SNIPPET = (
    "import psutil,time;t=time.perf_counter();"
    f"n=sum(1 for c in psutil.net_connections('tcp') if c.status=='ESTABLISHED' and c.laddr.port=={WATCHED});"
    "print(n, (time.perf_counter()-t)*1e3)"
)


def measure_psutil(p: Pair, n: int, reps: int) -> dict[str, Any]:
    def run() -> tuple[list[float], int]:
        times, value = [], -1
        for _ in range(reps):
            out = subprocess.run(
                [sys.executable, "-c", PSUTIL_SNIPPET], capture_output=True, text=True, check=True
            ).stdout.split()
            value, ms = int(out[0]), float(out[1])
            times.append(ms)
        return times, value

    times, value = in_netns(p.pod, run)
    return {
        "tool": "psutil.net_connections + filter (in-process)",
        "kind": "library call",
        "median_ms": statistics.median(times),
        "cpu_ms": None,
        "rss_mb": None,
        "value": value,
        "exact": value == n,
        "reps": reps,
    }


def idle_cpu(procs: dict[str, subprocess.Popen[bytes]], seconds: float) -> dict[str, float]:
    before = {m: cpu_seconds(pr.pid) for m, pr in procs.items()}
    time.sleep(seconds)  # the measurement window itself, not a wait for an event
    return {m: (cpu_seconds(pr.pid) - before[m]) * 1e3 for m, pr in procs.items()}


def run_scale(n: int) -> dict[str, Any]:
    log(f"scale {n}: setting up namespaces and connections")
    with pair(extra_peer_addresses=math.ceil(n / PER_WORKER) + 2) as p:
        workers = Workers()
        procs: dict[str, subprocess.Popen[bytes]] = {}
        try:
            procs["conntrack"] = start_exporter(p, "conntrack")
            started = time.monotonic()
            open_connections(p, workers, n)
            log(f"  {n} + {OTHER_CONNECTIONS} connections open in {time.monotonic() - started:.1f} s")
            procs["sockdiag"] = start_exporter(p, "sockdiag")
            procs["psutil"] = start_exporter(p, "psutil")
            reps = 20 if n <= 10000 else 10
            rows = [
                measure_command(
                    p,
                    "ss -Htn state established '( sport = :8080 )' | wc -l",
                    f"ss -Htn state established '( sport = :{WATCHED} )' | wc -l",
                    n,
                    reps,
                )
            ]
            for method in ("sockdiag", "conntrack"):
                rows.append(measure_exporter(p, method, procs[method], n, reps))
            rows.append(
                measure_command(
                    p,
                    "conntrack -L -p tcp --dport 8080 --state ESTABLISHED | wc -l",
                    f"conntrack -L -p tcp --dport {WATCHED} --state ESTABLISHED 2>/dev/null | wc -l",
                    n,
                    max(3, reps // 4),
                )
            )
            rows.append(measure_exporter(p, "psutil", procs["psutil"], n, 3 if n > 10000 else reps // 2))
            rows.append(measure_psutil(p, n, 3))
            ss_ms = rows[0]["median_ms"]
            for row in rows:
                row["ratio_to_ss"] = row["median_ms"] / ss_ms
            idle = idle_cpu(procs, 5.0)
            for row in rows:
                for method, ms in idle.items():
                    if row["tool"].endswith(f"={method}"):
                        row["idle_cpu_ms_per_5s"] = ms
            return {"connections": n, "other_port_connections": OTHER_CONNECTIONS, "rows": rows}
        finally:
            for proc in procs.values():
                proc.terminate()
                proc.wait(timeout=10)
            workers.close()


def reliability(n: int, seconds: float, scrapers: int = 50) -> list[dict[str, Any]]:
    """Concurrent scrapers during connection churn: failures and latency percentiles, per method."""
    log(f"reliability: {scrapers} scrapers for {seconds:.0f} s per method, {n} connections plus churn")
    out = []
    with pair(extra_peer_addresses=3) as p:
        workers = Workers()
        procs: dict[str, subprocess.Popen[bytes]] = {}
        try:
            procs["conntrack"] = start_exporter(p, "conntrack")
            open_connections(p, workers, n)
            procs["sockdiag"] = start_exporter(p, "sockdiag")
            procs["psutil"] = start_exporter(p, "psutil")
            stop_churn = threading.Event()
            churned = [0]

            def churn() -> None:
                import socket

                join_netns(p.peer)
                while not stop_churn.is_set():
                    s = socket.create_connection((p.pod_v4, WATCHED))
                    s.close()
                    churned[0] += 1

            churner = threading.Thread(target=churn, daemon=True)
            churner.start()
            for method in ("conntrack", "sockdiag", "psutil"):
                row = hammer(p.pod, METHOD_PORTS[method], seconds, scrapers)
                out.append({"method": method, **row})
                log(f"  {method}: {row['scrapes']} scrapes, {row['failures']} failed")
            stop_churn.set()
            churner.join(timeout=10)
            for row in out:
                row["churned_connections"] = churned[0]
        finally:
            for proc in procs.values():
                proc.terminate()
                proc.wait(timeout=10)
            workers.close()
    return out


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def print_tables(results: dict[str, Any]) -> None:
    print("\n## Sidecar: one full count (median), per scale\n")
    print("| connections | tool | median ms | ratio to ss | CPU ms/scrape | RSS MB | idle CPU ms/5 s | value | exact |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | :---: |")
    for scale in results["scales"]:
        for row in scale["rows"]:
            print(
                f"| {scale['connections']:,} | {row['tool']} | {fmt(row['median_ms'])} | "
                f"{fmt(row['ratio_to_ss'], 2)} | {fmt(row['cpu_ms'])} | {fmt(row['rss_mb'])} | "
                f"{fmt(row.get('idle_cpu_ms_per_5s'))} | {fmt(row['value'])} | {fmt(row['exact'])} |"
            )
    if results.get("reliability"):
        print("\n## Sidecar: concurrent scrapers during connection churn\n")
        print("| method | scrapers | seconds | scrapes | failed | p50 ms | p99 ms | connections churned |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for row in results["reliability"]:
            print(
                f"| {row['method']} | {row['scrapers']} | {fmt(row['seconds'], 0)} | {row['scrapes']:,} | "
                f"{row['failures']} | {fmt(row['p50_ms'])} | {fmt(row['p99_ms'])} | {row['churned_connections']:,} |"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", default="1000,10000,100000")
    parser.add_argument("--reliability-seconds", type=float, default=30.0)
    parser.add_argument("--reliability-connections", type=int, default=10000)
    parser.add_argument("--json", default=str(RESULTS / "sidecar.json"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench.sidecar needs root (network namespaces)", file=sys.stderr)
        return 1
    results: dict[str, Any] = {"kernel": os.uname().release, "cpus": os.cpu_count(), "scales": []}
    for n in (int(x) for x in args.scales.split(",") if x):
        results["scales"].append(run_scale(n))
    if args.reliability_seconds > 0:
        results["reliability"] = reliability(args.reliability_connections, args.reliability_seconds)
    print_tables(results)
    write_results(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
