"""The sidecar against real sockets, real network namespaces and real conntrack."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import need

from harness.exporter_proc import WITHOUT_NET_ADMIN, Exporter, as_security_context, hammer
from harness.helpers import wait_for
from harness.netns import Pair, accept, connect, in_netns, join_netns, listener, pair

pytestmark = pytest.mark.netns
WATCHED = 8080
OTHER = 9090
COUNTING = ("conntrack", "sockdiag", "psutil")


@pytest.fixture
def ns() -> Iterator[Pair]:
    need(os.geteuid() == 0, "network namespaces need root")
    for tool in ("ip", "ss", "nft", "conntrack", "setpriv"):
        need(shutil.which(tool) is not None, f"{tool} is needed")
    with pair() as p:
        yield p


def conntrack_entries(p: Pair) -> str:
    return subprocess.run(p.exec(p.pod, "conntrack", "-L"), capture_output=True, text=True).stdout


def nft_tables(p: Pair) -> str:
    return subprocess.run(p.exec(p.pod, "nft", "list", "tables"), capture_output=True, text=True).stdout


def busy_traffic(p: Pair) -> dict[str, list[socket.socket]]:
    """Every kind of socket that must not be counted, around the ones that must."""
    keep: dict[str, list[socket.socket]] = {}
    server = listener(p.pod, WATCHED)
    other = listener(p.pod, OTHER)
    peer_server = listener(p.peer, WATCHED)
    keep["listeners"] = [server, other, peer_server]
    keep["v4"] = connect(p.peer, p.pod_v4, WATCHED, 7)
    keep["v6"] = connect(p.peer, p.pod_v6, WATCHED, 4)
    keep["loopback"] = connect(p.pod, "127.0.0.1", WATCHED, 2)  # the pod to itself: counted once each
    keep["other_port"] = connect(p.peer, p.pod_v4, OTHER, 3)
    # The pod's own outbound connections to the peer's port of the same number: not inbound, not counted.
    keep["outbound"] = connect(p.pod, p.peer_v4, WATCHED, 3) + connect(p.pod, p.peer_v6, WATCHED, 2)
    keep["accepted"] = accept(server, 13) + accept(other, 3) + accept(peer_server, 5)
    # CLOSE_WAIT on the watched port: the client closed, the server has not.
    close_wait = connect(p.peer, p.pod_v4, WATCHED, 2)
    keep["close_wait_server"] = accept(server, 2)
    for s in close_wait:
        s.close()
    # TIME_WAIT on the watched port: the server closed first.
    time_wait = connect(p.peer, p.pod_v4, WATCHED, 2)
    for s in accept(server, 2):
        s.close()
    keep["time_wait_clients"] = time_wait
    wait_for(lambda: p.ss_established(WATCHED) == 13, 10, "the socket table to settle at 13")
    return keep


@pytest.mark.parametrize("method", COUNTING)
def test_each_method_counts_exactly_the_inbound_established_connections(ns: Pair, method: str) -> None:
    with Exporter(
        ns.pod,
        [f"--watch-port={WATCHED}", f"--watch-port={OTHER}", f"--method={method}", "--listen-address=127.0.0.1:9100"],
    ) as exporter:
        exporter.wait_ready()
        keep = busy_traffic(ns)
        assert ns.ss_established(WATCHED) == 13
        assert exporter.established(WATCHED) == 13
        assert exporter.established(OTHER) == 3
        assert exporter.method() == method
        if method == "conntrack":
            # Every inbound connection opened since start, exactly, including the closed ones.
            assert exporter.accepted(WATCHED) == 7 + 4 + 2 + 2 + 2
        del keep


@pytest.mark.parametrize("method", COUNTING)
def test_each_method_counts_idle_connections_that_predate_the_exporter(ns: Pair, method: str) -> None:
    server = listener(ns.pod, WATCHED)
    before = connect(ns.peer, ns.pod_v4, WATCHED, 5) + connect(ns.peer, ns.pod_v6, WATCHED, 3)
    accepted = accept(server, 8)
    with Exporter(
        ns.pod, [f"--watch-port={WATCHED}", f"--method={method}", "--listen-address=127.0.0.1:9100"]
    ) as exporter:
        exporter.wait_ready()
        assert exporter.established(WATCHED) == 8
        assert exporter.accepted(WATCHED) == 0  # they predate the exporter
        for s in before[:3]:  # idle connections closing after the start
            s.close()
        wait_for(lambda: ns.ss_established(WATCHED) == 5, 10, "three connections to leave ESTABLISHED")
        assert exporter.established(WATCHED) == 5
    del accepted


@pytest.mark.parametrize("method", COUNTING)
def test_each_method_follows_connections_opened_and_closed_around_scrapes(ns: Pair, method: str) -> None:
    server = listener(ns.pod, WATCHED)
    with Exporter(
        ns.pod, [f"--watch-port={WATCHED}", f"--method={method}", "--listen-address=127.0.0.1:9100"]
    ) as exporter:
        exporter.wait_ready()
        open_now: list[socket.socket] = []
        for step in range(6):
            open_now += connect(ns.peer, ns.pod_v4 if step % 2 else ns.pod_v6, WATCHED, 4)
            assert exporter.established(WATCHED) == len(open_now) == ns.ss_established(WATCHED)
            for s in open_now[:2]:
                s.close()
            del open_now[:2]
            left = len(open_now)
            wait_for(lambda left=left: ns.ss_established(WATCHED) == left, 10, "closed connections to leave")
            assert exporter.established(WATCHED) == len(open_now)
        accept(server, 0)


@pytest.mark.parametrize("method", COUNTING)
def test_a_watched_port_with_no_listener_reports_zero(ns: Pair, method: str) -> None:
    with Exporter(ns.pod, ["--watch-port=7777", f"--method={method}", "--listen-address=127.0.0.1:9100"]) as exporter:
        exporter.wait_ready()
        assert exporter.established(7777) == 0
        assert exporter.samples()["tcp_exporter_count_success"][()] == 1


def test_conntrack_is_made_active_in_a_fresh_namespace_and_undone_on_sigterm(ns: Pair) -> None:
    server = listener(ns.pod, WATCHED)
    clients = connect(ns.peer, ns.pod_v4, WATCHED, 1)
    assert "dport=8080" not in conntrack_entries(ns)  # tracking is off in a fresh namespace
    assert "tcp_exporter" not in nft_tables(ns)
    exporter = Exporter(ns.pod, [f"--watch-port={WATCHED}", "--method=conntrack", "--listen-address=127.0.0.1:9100"])
    with exporter:
        exporter.wait_ready()
        assert "tcp_exporter" in nft_tables(ns)
        clients += connect(ns.peer, ns.pod_v4, WATCHED, 1)
        assert "dport=8080" in conntrack_entries(ns)
        took = exporter.stop()
        assert took < 1.0
        assert exporter.proc.returncode == 0
        assert "tcp_exporter" not in nft_tables(ns)
    assert len(accept(server, 2)) == len(clients)


def nft_ruleset(p: Pair) -> str:
    return subprocess.run(p.exec(p.pod, "nft", "list", "ruleset"), capture_output=True, text=True).stdout


def test_conntrack_killed_with_sigkill_leaves_the_ruleset_as_it_was(ns: Pair) -> None:
    subprocess.run(ns.exec(ns.pod, "nft", "add", "table", "inet", "the_apps_own"), check=True)
    before = nft_ruleset(ns)
    exporter = Exporter(ns.pod, [f"--watch-port={WATCHED}", "--method=conntrack", "--listen-address=127.0.0.1:9100"])
    with exporter:
        exporter.wait_ready()
        assert f"tcp_exporter_{exporter.proc.pid}" in nft_tables(ns)
        exporter.stop(signal.SIGKILL)
    # The table was owned by the process's netlink socket: the kernel deletes it with the socket.
    wait_for(lambda: nft_ruleset(ns) == before, 5, "the ruleset to be as it was")
    assert "the_apps_own" in nft_tables(ns)


def test_two_conntrack_instances_in_one_namespace_keep_their_own_state(ns: Pair) -> None:
    server = listener(ns.pod, WATCHED)
    args = [f"--watch-port={WATCHED}", "--method=conntrack"]
    first = Exporter(ns.pod, [*args, "--listen-address=127.0.0.1:9100"], port=9100)
    second = Exporter(ns.pod, [*args, "--listen-address=127.0.0.1:9101"], port=9101)
    with first, second:
        first.wait_ready()
        second.wait_ready()
        tables = nft_tables(ns)
        assert f"tcp_exporter_{first.proc.pid}" in tables and f"tcp_exporter_{second.proc.pid}" in tables
        first.stop()
        assert f"tcp_exporter_{first.proc.pid}" not in nft_tables(ns)
        assert f"tcp_exporter_{second.proc.pid}" in nft_tables(ns)
        clients = connect(ns.peer, ns.pod_v4, WATCHED, 4)  # tracking is still on for the second one
        assert second.established(WATCHED) == 4
        assert second.accepted(WATCHED) == 4
    assert len(accept(server, 4)) == len(clients)


def test_conntrack_resyncs_on_schedule_while_events_keep_coming(ns: Pair) -> None:
    """A count corrupted on purpose is repaired within about one interval even though events never stop."""
    from tcp_exporter.methods.conntrack import Conntrack

    server = listener(ns.pod, WATCHED)
    other = listener(ns.pod, OTHER)
    held = connect(ns.peer, ns.pod_v4, WATCHED, 10)
    method = in_netns(ns.pod, lambda: Conntrack((WATCHED,), resync_interval=1.0))
    stop = threading.Event()

    def churn() -> None:  # conntrack events on another port, many a second, for the whole test
        while not stop.is_set():
            for s in connect(ns.peer, ns.pod_v4, OTHER, 5) + accept(other, 5):
                s.close()

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        assert in_netns(ns.pod, method.count).established[WATCHED] == 10
        with method.lock:
            method.established[WATCHED].clear()
            method.unwatched[WATCHED].clear()
            method.handshakes.add(b"stale")
            resyncs = method.resyncs
        wait_for(lambda: method.resyncs > resyncs, 3, "a scheduled resync despite continuous events")
        assert in_netns(ns.pod, method.count).established[WATCHED] == 10
        assert b"stale" not in method.handshakes
    finally:
        stop.set()
        thread.join()
        in_netns(ns.pod, method.close)
    assert len(accept(server, 10)) == len(held)


def test_auto_in_a_fresh_namespace_uses_sockdiag_and_adds_no_netfilter_state(ns: Pair) -> None:
    before = nft_ruleset(ns)
    with Exporter(ns.pod, [f"--watch-port={WATCHED}", "--listen-address=127.0.0.1:9100"]) as exporter:
        exporter.wait_ready()
        assert exporter.method() == "sockdiag"
        (labels,) = exporter.samples()["tcp_exporter_method_info"]
        assert "tracking is off" in dict(labels)["reason"]
        assert nft_ruleset(ns) == before
        assert "dport=8080" not in conntrack_entries(ns)


def test_auto_uses_conntrack_where_the_namespace_already_tracks_and_adds_nothing(ns: Pair) -> None:
    # What a mesh's or the application's own rules do: conntrack is then already paid for.
    rule = ["iptables", "-A", "INPUT", "-p", "tcp", "-m", "conntrack", "--ctstate", "ESTABLISHED", "-j", "ACCEPT"]
    subprocess.run(ns.exec(ns.pod, *rule), check=True)
    server = listener(ns.pod, WATCHED)
    clients = connect(ns.peer, ns.pod_v4, WATCHED, 2)
    before = nft_tables(ns)
    with Exporter(ns.pod, [f"--watch-port={WATCHED}", "--listen-address=127.0.0.1:9100"]) as exporter:
        exporter.wait_ready()
        assert exporter.method() == "conntrack"
        assert nft_tables(ns) == before  # no table of its own
        clients += connect(ns.peer, ns.pod_v4, WATCHED, 3)
        assert exporter.established(WATCHED) == 5
        assert exporter.accepted(WATCHED) == 3
    assert len(accept(server, 5)) == len(clients)


def test_auto_does_not_trust_stale_tracking_entries_and_counts_every_new_connection(ns: Pair) -> None:
    # Entries without the rules that made conntrack track (they outlive them): new connections go unseen by
    # conntrack, and auto used to choose it and report 0 of them until its resync a minute later.
    stale = ["conntrack", "-I", "-p", "tcp", "-s", ns.peer_v4, "-d", ns.pod_v4, "--sport", "40000",
             "--dport", "9", "--state", "ESTABLISHED", "-t", "600", "-u", "ASSURED"]  # fmt: skip
    subprocess.run(ns.exec(ns.pod, *stale), check=True, capture_output=True)
    assert "dport=9 " in conntrack_entries(ns)
    server = listener(ns.pod, WATCHED)
    with Exporter(ns.pod, [f"--watch-port={WATCHED}", "--listen-address=127.0.0.1:9100"]) as exporter:
        exporter.wait_ready()
        assert exporter.method() == "sockdiag"
        (labels,) = exporter.samples()["tcp_exporter_method_info"]
        assert "stale entries" in dict(labels)["reason"]
        clients = connect(ns.peer, ns.pod_v4, WATCHED, 5)
        assert exporter.established(WATCHED) == 5
    assert len(accept(server, 5)) == len(clients)


class PoolingProxy:
    """A mesh's inbound proxy in miniature: clients' connections, redirected to it, end here; it holds a pool of
    `pool` connections of its own to the app's port on loopback (as an HTTP proxy pools them)."""

    def __init__(self, p: Pair, port: int, app_port: int, pool: int) -> None:
        self.server = listener(p.pod, port)
        self.upstream = connect(p.pod, "127.0.0.1", app_port, pool)
        self.clients: list[socket.socket] = []

    def accept(self, count: int) -> None:
        self.clients += accept(self.server, count)

    def close(self) -> None:
        for s in [*self.clients, *self.upstream, self.server]:
            s.close()


@pytest.mark.parametrize(("method", "expected"), [("conntrack", "clients"), ("sockdiag", "pool"), ("psutil", "pool")])
def test_behind_an_inbound_redirect_conntrack_counts_the_clients_and_the_socket_table_the_proxys_pool(
    ns: Pair, method: str, expected: str
) -> None:
    app = listener(ns.pod, WATCHED)
    redirect = ["iptables", "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", str(WATCHED)]
    subprocess.run(ns.exec(ns.pod, *redirect, "-j", "REDIRECT", "--to-ports", "15006"), check=True)
    proxy = PoolingProxy(ns, 15006, WATCHED, pool=2)
    app_side = accept(app, 2)
    try:
        with Exporter(
            ns.pod, [f"--watch-port={WATCHED}", f"--method={method}", "--listen-address=127.0.0.1:9100"]
        ) as exporter:
            exporter.wait_ready()
            clients = connect(ns.peer, ns.pod_v4, WATCHED, 12)  # to the app's port, as the clients see it
            proxy.accept(12)
            want = {"clients": 12, "pool": 2}[expected]
            wait_for(lambda: exporter.established(WATCHED) == want, 10, f"the count to be the {expected}'s {want}")
            for s in clients[:5]:
                s.close()
            want = {"clients": 7, "pool": 2}[expected]
            wait_for(lambda: exporter.established(WATCHED) == want, 10, f"the count to follow the {expected}")
    finally:
        proxy.close()
        for s in [*app_side, app]:
            s.close()


@pytest.mark.parametrize(
    ("withheld", "fallback"),
    [({"prefix": WITHOUT_NET_ADMIN}, "sockdiag"), ({"seccomp_no_netlink": True}, "psutil")],
    ids=["without-net-admin", "without-netlink"],
)
def test_auto_falls_back_when_what_a_method_needs_is_withheld(
    ns: Pair, withheld: dict[str, Any], fallback: str
) -> None:
    with Exporter(ns.pod, [f"--watch-port={WATCHED}", "--listen-address=127.0.0.1:9100"], **withheld) as exporter:
        exporter.wait_ready()
        assert exporter.method() == fallback
        (labels,) = exporter.samples()["tcp_exporter_method_info"]
        assert "conntrack" in dict(labels)["reason"]  # says why conntrack (and what else) was passed over
        assert "tcp_exporter" not in nft_tables(ns)
        server = listener(ns.pod, WATCHED)
        clients = connect(ns.peer, ns.pod_v4, WATCHED, 3)
        assert exporter.established(WATCHED) == 3
        assert len(accept(server, 3)) == len(clients)


def test_asking_for_conntrack_without_net_admin_exits_1_with_the_reason(ns: Pair) -> None:
    exporter = Exporter(ns.pod, [f"--watch-port={WATCHED}", "--method=conntrack"], prefix=WITHOUT_NET_ADMIN)
    assert exporter.proc.wait(timeout=20) == 1
    assert "CAP_NET_ADMIN" in exporter.output()


def test_injected_conntrack_without_net_admin_falls_back_to_sockdiag_and_counts_exactly(ns: Pair) -> None:
    # As the operator injects it: a policy that strips NET_ADMIN must not crash-loop the container.
    args = [
        f"--watch-port={WATCHED}",
        "--method=conntrack",
        "--on-unavailable=fallback",
        "--listen-address=127.0.0.1:9100",
    ]
    with Exporter(ns.pod, args, prefix=WITHOUT_NET_ADMIN) as exporter:
        exporter.wait_ready()
        assert exporter.method() == "sockdiag"
        (labels,) = exporter.samples()["tcp_exporter_method_info"]
        assert "CAP_NET_ADMIN" in dict(labels)["reason"]  # says why conntrack was not used
        server = listener(ns.pod, WATCHED)
        clients = connect(ns.peer, ns.pod_v4, WATCHED, 4)
        assert exporter.established(WATCHED) == 4
        assert len(accept(server, 4)) == len(clients)


def test_injected_sidecar_where_no_method_opens_keeps_serving_with_count_success_0_and_the_reason(ns: Pair) -> None:
    # sock_diag and /proc's socket table both withheld (a sandboxed runtime): it stays up, Ready and live,
    # and says why it cannot count, instead of exiting and holding the app's pod out of its Service.
    args = [
        f"--watch-port={WATCHED}",
        "--method=sockdiag",
        "--on-unavailable=fallback",
        "--listen-address=127.0.0.1:9100",
    ]
    # /proc/<pid>/net hidden under an empty tmpfs, in the private mount namespace `ip netns exec` gives it.
    hide_proc_net = ["sh", "-c", 'mount -t tmpfs none /proc/$$/net && exec "$@"', "sh"]
    with Exporter(ns.pod, args, prefix=hide_proc_net, seccomp_no_netlink=True) as exporter:
        exporter.wait_ready()
        samples = exporter.samples()
        assert samples["tcp_exporter_count_success"] == {(): 0.0}
        (labels,) = samples["tcp_exporter_method_info"]
        assert dict(labels)["method"] == "none" and "sockdiag" in dict(labels)["reason"]
        assert exporter.proc.poll() is None
        assert exporter.get("/healthz") == "ok\n"


@pytest.mark.parametrize("method", ["conntrack", "sockdiag"])
def test_fifty_concurrent_scrapers_during_churn_never_fail(ns: Pair, method: str) -> None:
    server = listener(ns.pod, WATCHED)
    held = connect(ns.peer, ns.pod_v4, WATCHED, 500)
    kept = accept(server, 500)
    stop = threading.Event()

    def serve() -> None:  # the churned connections are accepted and closed by the server
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                server.accept()[0].close()
            except TimeoutError:
                continue

    def churn() -> None:
        join_netns(ns.peer)
        while not stop.is_set():
            socket.create_connection((ns.pod_v4, WATCHED), timeout=5).close()

    with Exporter(
        ns.pod, [f"--watch-port={WATCHED}", f"--method={method}", "--listen-address=127.0.0.1:9100"]
    ) as exporter:
        exporter.wait_ready()
        threads = [threading.Thread(target=serve), threading.Thread(target=churn)]
        for t in threads:
            t.start()
        try:
            result = hammer(ns.pod, 9100, seconds=3, scrapers=50)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert result["failures"] == 0
        assert result["scrapes"] >= 50
        assert exporter.samples()["tcp_exporter_count_failures_total"][()] == 0
    assert len(held) == len(kept) == 500


def test_conntrack_stays_exact_and_cheap_after_losing_events(ns: Pair) -> None:
    """Events lost to a full socket buffer (ENOBUFS) are made good by a resync; counts stay event-kept."""
    from tcp_exporter.methods.conntrack import Conntrack

    server = listener(ns.pod, WATCHED)
    before = connect(ns.peer, ns.pod_v4, WATCHED, 20)
    method = in_netns(ns.pod, lambda: Conntrack((WATCHED,), resync_interval=0, rcvbuf=4096))
    try:
        with method.lock:  # the event thread cannot drain while the connections open: the buffer overflows
            opened = connect(ns.peer, ns.pod_v4, WATCHED, 300)
        wait_for(lambda: ns.ss_established(WATCHED) == 320, 10, "320 connections")
        counts = in_netns(ns.pod, method.count)
        assert method.resyncs >= 2  # the first at start, one more for the lost events
        assert counts.established[WATCHED] == 320
        assert counts.accepted[WATCHED] == 300
        assert len(method.unwatched[WATCHED]) == 20  # only the ones that predate it need the socket table
        for s in opened[:100]:
            s.close()
        wait_for(lambda: ns.ss_established(WATCHED) == 220, 10, "100 to close")
        assert in_netns(ns.pod, method.count).established[WATCHED] == 220
    finally:
        in_netns(ns.pod, method.close)
    assert len(accept(server, 320)) == len(before) + len(opened)


@pytest.mark.parametrize("method", ["sockdiag", "psutil"])
def test_sampled_accepted_counter_sees_each_connection_once_whichever_cpu_counts(ns: Pair, method: str) -> None:
    need(len(os.sched_getaffinity(0)) > 1, "two CPUs, to move the exporter between them")
    server = listener(ns.pod, WATCHED)
    kept: list[socket.socket] = []
    with Exporter(
        ns.pod, [f"--watch-port={WATCHED}", f"--method={method}", "--listen-address=127.0.0.1:9100"]
    ) as exporter:
        exporter.wait_ready()
        cpus = sorted(os.sched_getaffinity(0))
        for round_ in range(1, 13):
            # The kernel hands out socket cookies in per-CPU batches: counting on another CPU must not matter.
            for tid in os.listdir(f"/proc/{exporter.proc.pid}/task"):
                os.sched_setaffinity(int(tid), {cpus[round_ % len(cpus)]})
            kept += connect(ns.peer, ns.pod_v4, WATCHED, 5)
            assert exporter.accepted(WATCHED) == 5 * round_
        for s in kept[:30]:
            s.close()
        assert exporter.accepted(WATCHED) == 60
    assert len(accept(server, 60)) == 60


NET_ADMIN_ONLY = f"{1 << 12:016x}"
NO_CAPABILITY = "0" * 16
NONROOT = "\t".join(["65532"] * 4)


def as_injected(method: str) -> list[str]:
    """setpriv's arguments for the securityContext the operator injects for `method` (from the operator's own code)."""
    from tcp_exporter_operator.annotations import parse_spec
    from tcp_exporter_operator.config import Config
    from tcp_exporter_operator.desired import sidecar_container

    deployment = {
        "metadata": {"name": "web-api", "namespace": "shop", "annotations": {
            "tcp-exporter/port": str(WATCHED), "tcp-exporter/method": method}},
        "spec": {"template": {"spec": {"containers": [{"name": "app", "image": "app"}]}}},
    }  # fmt: skip
    return as_security_context(sidecar_container(parse_spec(deployment, Config()))["securityContext"])


def threads_hold(exporter: Exporter, uid: str, capabilities: str) -> bool:
    held = exporter.identities()
    assert len(held) >= 2, held  # the HTTP server's thread, at least, besides the main one
    return all(t["uid"] == uid and t["effective"] == t["permitted"] == capabilities for t in held)


def test_conntrack_started_as_root_serves_as_uid_65532_with_only_net_admin_and_still_counts_resyncs_and_cleans_up(
    ns: Pair,
) -> None:
    # As injected: UID 0 with NET_ADMIN, SETUID, SETGID and no_new_privs. Every thread, the HTTP server's included,
    # must end up UID 65532 holding NET_ADMIN alone, and the method must still do all it did as root.
    before = nft_ruleset(ns)
    server = listener(ns.pod, WATCHED)
    args = [f"--watch-port={WATCHED}", "--method=conntrack", "--resync-interval=0.5", "--listen-address=127.0.0.1:9100"]
    prefix = as_injected("conntrack")
    assert "--no-new-privs" in prefix and "--reuid" not in prefix  # UID 0, as Kubernetes needs for NET_ADMIN
    with Exporter(ns.pod, args, prefix=prefix) as exporter:
        exporter.wait_ready()
        assert threads_hold(exporter, NONROOT, NET_ADMIN_ONLY), exporter.identities()
        assert f"tcp_exporter_{exporter.proc.pid}" in nft_tables(ns)  # tracking switched on before the drop
        clients = connect(ns.peer, ns.pod_v4, WATCHED, 6) + connect(ns.peer, ns.pod_v6, WATCHED, 3)
        accepted = accept(server, 9)
        assert exporter.established(WATCHED) == 9
        assert exporter.accepted(WATCHED) == 9
        resyncs = exporter.samples()["tcp_exporter_conntrack_resyncs_total"][()]
        # Resyncs dump conntrack, which nfnetlink allows only a sender holding NET_ADMIN: they go on after the drop.
        wait_for(
            lambda: exporter.samples()["tcp_exporter_conntrack_resyncs_total"][()] >= resyncs + 2,
            10,
            "two more resyncs",
        )
        assert exporter.samples()["tcp_exporter_conntrack_event_losses_total"][()] == 0
        for s in clients[:4]:
            s.close()
        wait_for(lambda: exporter.established(WATCHED) == 5, 10, "the count to follow four closes")
        exporter.stop(signal.SIGKILL)
    # The owned table goes with the socket, whoever the process had become.
    wait_for(lambda: nft_ruleset(ns) == before, 5, "the ruleset to be as it was")
    del accepted


@pytest.mark.parametrize("method", ["sockdiag", "psutil", "auto"])
def test_a_method_that_needs_no_capability_started_as_root_serves_as_uid_65532_with_none(ns: Pair, method: str) -> None:
    server = listener(ns.pod, WATCHED)
    args = [f"--watch-port={WATCHED}", f"--method={method}", "--listen-address=127.0.0.1:9100"]
    with Exporter(ns.pod, args) as exporter:  # root with every capability, as on a host
        exporter.wait_ready()
        assert threads_hold(exporter, NONROOT, NO_CAPABILITY), exporter.identities()
        clients = connect(ns.peer, ns.pod_v4, WATCHED, 4)
        accepted = accept(server, 4)
        assert exporter.established(WATCHED) == 4
    del clients, accepted


def test_without_setuid_conntrack_stays_root_says_why_and_still_keeps_only_net_admin(ns: Pair) -> None:
    # A hand-written pod spec that adds NET_ADMIN alone: it cannot change user, and says so, but it counts and
    # gives up every other capability.
    prefix = ["setpriv", "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all,+net_admin"]
    server = listener(ns.pod, WATCHED)
    args = [f"--watch-port={WATCHED}", "--method=conntrack", "--listen-address=127.0.0.1:9100"]
    with Exporter(ns.pod, args, prefix=prefix) as exporter:
        exporter.wait_ready()
        assert threads_hold(exporter, "\t".join(["0"] * 4), NET_ADMIN_ONLY), exporter.identities()
        clients = connect(ns.peer, ns.pod_v4, WATCHED, 3)
        accepted = accept(server, 3)
        assert exporter.established(WATCHED) == 3
        output = exporter.output()
    assert "still UID 0" in output and "CAP_SETUID" in output
    del clients, accepted
