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

from bench.common import RESULTS, log, write_results
from harness.exporter_proc import EXPORTER, gauge, hammer, scrape
from harness.helpers import die_with_parent, wait_for
from harness.netns import Pair, in_netns, join_netns, pair

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


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def idle_clients(clients: int) -> dict[str, Any]:
    """`clients` peers each holding a connection to the metrics port with half a request sent; then scrapes."""
    import socket

    from harness.netns import connect

    with pair() as p:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", p.pod, EXPORTER, f"--watch-port={WATCHED}", "--method=sockdiag",
             "--listen-address=0.0.0.0:9100", "--log-level=error"],
            preexec_fn=die_with_parent(),
        )  # fmt: skip
        try:

            def up() -> bool:
                try:
                    return in_netns(p.pod, lambda: scrape(9100)) != ""
                except OSError:
                    return False

            wait_for(up, 30, "the exporter")
            rss_before = rss_mb(proc.pid)
            held: list[socket.socket] = []
            for _ in range(clients // 500):
                batch = connect(p.peer, p.pod_v4, 9100, 500)
                for s in batch:
                    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # half a request, never finished
                held += batch
            time.sleep(1)  # the exporter reads what they sent
            latencies = []
            for _ in range(20):
                started = time.perf_counter()
                body = in_netns(p.pod, lambda: scrape(9100))
                latencies.append((time.perf_counter() - started) * 1000)
                assert "tcp_exporter_established_connections" in body
            row = {
                "idle_clients": clients,
                "rss_mb_before": rss_before,
                "rss_mb": rss_mb(proc.pid),
                "threads": threads(proc.pid),
                "scrape_median_ms": statistics.median(latencies),
                "scrape_max_ms": max(latencies),
            }
            for s in held:
                s.close()
            return row
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def hostile_clients(count: int) -> list[dict[str, Any]]:
    """For each kind of hostile client (harness.hostile), `count` of them kept open against the metrics port
    (re-opened as the server closes them) while real clients ask for /metrics and /healthz 20 times each."""
    import socket
    import urllib.request

    from harness.hostile import KINDS, Flood

    rows = []
    for kind in KINDS:
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
        proc = subprocess.Popen(
            [EXPORTER, f"--watch-port={WATCHED}", "--method=sockdiag", f"--listen-address=127.0.0.1:{port}",
             "--log-level=error"],
            preexec_fn=die_with_parent(),
        )  # fmt: skip

        def get(path: str, port: int = port) -> float:
            started = time.perf_counter()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
                response.read()
            return (time.perf_counter() - started) * 1000

        def up() -> bool:
            try:
                return get("/healthz") >= 0
            except OSError:
                return False

        try:
            wait_for(up, 30, "the exporter")
            timings: dict[str, list[float]] = {"/metrics": [], "/healthz": []}
            failures = 0
            with Flood(kind, "127.0.0.1", port, count) as flood:
                for _ in range(20):
                    for path, taken in timings.items():
                        try:
                            taken.append(get(path))
                        except OSError:
                            failures += 1
                rss, held = rss_mb(proc.pid), threads(proc.pid)
            rows.append({
                "kind": kind, "clients": count, "opened": flood.opened, "failures": failures,
                "metrics_median_ms": statistics.median(timings["/metrics"] or [math.nan]),
                "metrics_max_ms": max(timings["/metrics"] or [math.nan]),
                "healthz_median_ms": statistics.median(timings["/healthz"] or [math.nan]),
                "healthz_max_ms": max(timings["/healthz"] or [math.nan]),
                "rss_mb": rss, "threads": held,
            })  # fmt: skip
            log(f"hostile {kind}: {rows[-1]}")
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    return rows


def tracking_cost(round_trips: int = 20000, connections: int = 3000, reps: int = 3) -> list[dict[str, Any]]:
    """What switching connection tracking on costs a pod's traffic: TCP round trips on one connection, and
    connection setup and teardown, from a peer namespace, with tracking off (a fresh namespace) and on (the
    conntrack method's own table). Alternated, best of `reps`."""
    import socket

    from tcp_exporter.nftables import Tracking

    from harness.netns import connect

    def echo_server(server: socket.socket, stop: threading.Event) -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=lambda c=conn: _echo(c), daemon=True).start()

    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(64):
                conn.sendall(data)

    def round_trip_us(p: Pair) -> float:
        (client,) = connect(p.peer, p.pod_v4, 7000, 1)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.perf_counter()
        for _ in range(round_trips):
            client.sendall(b"x")
            client.recv(1)
        took = time.perf_counter() - started
        client.close()
        return took / round_trips * 1e6

    def setup_us(p: Pair) -> float:
        started = time.perf_counter()
        for _ in range(connections // 100):
            for s in connect(p.peer, p.pod_v4, 7000, 100):
                s.close()
        return (time.perf_counter() - started) / connections * 1e6

    rows = []
    with pair() as p:
        from harness.netns import listener

        server = listener(p.pod, 7000)
        server.listen(1024)
        stop = threading.Event()
        threading.Thread(target=echo_server, args=(server, stop), daemon=True).start()
        results: dict[bool, dict[str, list[float]]] = {False: {"rt": [], "setup": []}, True: {"rt": [], "setup": []}}
        try:
            for _ in range(reps):
                for on in (False, True):
                    tracking = in_netns(p.pod, Tracking) if on else None
                    try:
                        results[on]["rt"].append(round_trip_us(p))
                        results[on]["setup"].append(setup_us(p))
                    finally:
                        if tracking is not None:
                            in_netns(p.pod, tracking.close)
        finally:
            stop.set()
            server.close()
    for on in (False, True):
        rows.append(
            {
                "tracking": on,
                "round_trip_us": min(results[on]["rt"]),
                "connection_us": min(results[on]["setup"]),
            }
        )
    return rows


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
    if results.get("idle"):
        row = results["idle"]
        table(
            "Sidecar: idle clients holding the metrics port (half a request each)",
            ["idle clients", "RSS MB before", "RSS MB with them", "threads", "scrape median ms", "scrape max ms"],
            [[f"{row['idle_clients']:,}", fmt(row["rss_mb_before"]), fmt(row["rss_mb"]), str(row["threads"]),
              fmt(row["scrape_median_ms"]), fmt(row["scrape_max_ms"])]],
        )  # fmt: skip
    if results.get("hostile"):
        print_hostile(results["hostile"])
    if results.get("tracking"):
        table(
            "What switching connection tracking on costs the pod's traffic (best of 3)",
            ["tracking", "TCP round trip µs", "connection open+close µs"],
            [[("on (conntrack method)" if r["tracking"] else "off (fresh namespace)"), fmt(r["round_trip_us"]),
              fmt(r["connection_us"])] for r in results["tracking"]],
        )  # fmt: skip
    if results.get("reliability"):
        table(
            "Sidecar: concurrent scrapers during connection churn",
            ["method", "scrapers", "seconds", "scrapes", "failed", "p50 ms", "p99 ms", "connections churned"],
            [[r["method"], str(r["scrapers"]), fmt(r["seconds"], 0), f"{r['scrapes']:,}", str(r["failures"]),
              fmt(r["p50_ms"]), fmt(r["p99_ms"]), f"{r['churned_connections']:,}"] for r in results["reliability"]],
        )  # fmt: skip


def print_hostile(rows: list[dict[str, Any]]) -> None:
    table(
        "Sidecar: hostile clients against the metrics port, re-opened as the server closes them",
        ["kind", "clients", "opened", "failed requests", "/metrics median ms", "/metrics max ms",
         "/healthz median ms", "/healthz max ms", "RSS MB", "threads"],
        [[r["kind"], f"{r['clients']:,}", f"{r['opened']:,}", str(r["failures"]), fmt(r["metrics_median_ms"]),
          fmt(r["metrics_max_ms"]), fmt(r["healthz_median_ms"]), fmt(r["healthz_max_ms"]), fmt(r["rss_mb"]),
          str(r["threads"])] for r in rows],
    )  # fmt: skip


def table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """A Markdown table under a heading; the first column left-aligned, the others right."""
    print(f"\n## {title}\n")
    print("| " + " | ".join(columns) + " |")
    print("| --- | " + " | ".join("---:" for _ in columns[1:]) + " |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", default="1000,10000,100000")
    parser.add_argument("--reliability-seconds", type=float, default=30.0)
    parser.add_argument("--reliability-connections", type=int, default=10000)
    parser.add_argument("--idle-clients", type=int, default=3000, help="0: skip that row")
    parser.add_argument("--hostile-clients", type=int, default=1000, help="of each kind; 0: skip those rows")
    parser.add_argument("--tracking-cost", action=argparse.BooleanOptionalAction, default=True)
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
    if args.idle_clients > 0:
        results["idle"] = idle_clients(args.idle_clients)
    if args.hostile_clients > 0:
        results["hostile"] = hostile_clients(args.hostile_clients)
    if args.tracking_cost:
        results["tracking"] = tracking_cost()
    print_tables(results)
    write_results(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
