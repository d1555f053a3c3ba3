"""Pure parts of the sidecar, on recorded kernel bytes and plain values."""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from tcp_exporter import contract, netlink, privileges, sockets
from tcp_exporter.cli import parse_args
from tcp_exporter.exporter import Coalescer, parse_listen_address
from tcp_exporter.methods import AcceptedSampler, Counts
from tcp_exporter.methods import conntrack as ct

from harness.helpers import wait_for

DATA = Path(__file__).parent / "data"


def recorded(name: str) -> list[bytes]:
    """Buffers as the kernel returned them (recorded in a test namespace; see tests/data)."""
    return [bytes.fromhex(line) for line in (DATA / name).read_text().split()]


def test_sockdiag_cookies_reads_every_recorded_socket() -> None:
    found: list[int] = []
    done = False
    for buf in recorded("sockdiag-v6.hex"):
        got, done = sockets.cookies(buf)
        found += got
    assert done
    # 3 IPv4-mapped and 2 IPv6 connections to the dual-stack listener on 8080, each its own cookie.
    assert len(set(found)) == 5
    assert all(c > 0 for c in found)


def test_sockdiag_cookies_handles_messages_of_mixed_length() -> None:
    (buf, *_rest) = recorded("sockdiag-v6.hex")
    first_len = struct.unpack_from("=I", buf)[0]
    message = bytearray(buf[:first_len])
    longer = bytearray(message) + netlink.nla(99, b"\x01\x02\x03\x04")
    struct.pack_into("=I", longer, 0, len(longer))
    done = netlink.nlmsg(netlink.NLMSG_DONE, netlink.NLM_F_MULTI, 1, b"\0\0\0\0")
    found, finished = sockets.cookies(bytes(message) + bytes(longer) + bytes(message) + done)
    assert finished
    assert len(found) == 3
    assert found[0] == found[1] == found[2] == sockets.cookies(bytes(message))[0][0]


def test_sockdiag_parse_tuples_gives_ipv4_mapped_addresses_in_conntracks_4_byte_form() -> None:
    keys: list[bytes] = []
    for buf in recorded("sockdiag-v6.hex"):
        keys += sockets.parse_tuples(buf, socket.AF_INET6)[0]
    assert sorted(len(k) for k in keys) == [12, 12, 12, 36, 36]
    v4 = [k for k in keys if len(k) == 12]
    assert all(k[:4] == socket.inet_aton("127.0.0.1") and k[8:10] == (8080).to_bytes(2, "big") for k in v4)


def test_sockdiag_cookies_raises_the_kernels_error() -> None:
    payload = struct.pack("=i", -13) + netlink.NLMSG_HDR.pack(16, 20, 0, 0, 0)
    with pytest.raises(netlink.NetlinkError) as err:
        sockets.cookies(netlink.nlmsg(netlink.NLMSG_ERROR, 0, 1, payload))
    assert err.value.errno == 13


def test_bytecode_accepts_on_match_and_rejects_past_the_end() -> None:
    # One port: S_EQ (yes -> JMP, no -> reject), port, JMP to the end (accept).
    assert sockets.bytecode((8080,)) == struct.pack("=BBH", 11, 8, 16) + struct.pack("=BBH", 0, 0, 8080) + (
        struct.pack("=BBH", 1, 4, 4)
    )
    program = sockets.bytecode((80, 443, 8080))
    assert len(program) == 36
    # Every `yes` walks to the next op and the walk ends exactly at the end (the kernel's audit).
    offset = 0
    while offset < len(program):
        _code, yes, _no = struct.unpack_from("=BBH", program, offset)
        offset += yes
    assert offset == len(program)


def test_conntrack_parse_event_follows_a_recorded_connection_through_its_states() -> None:
    states: dict[tuple[int, int], list[int | None]] = {}
    for buf in recorded("conntrack-events.hex"):
        for msg_type, _flags, payload, end in netlink.iter_messages(buf):
            event = ct.parse_event(buf, payload + 4, end)
            assert event is not None
            src, _dst, sport, dport, state = event
            assert src in (socket.inet_aton("127.0.0.1"), socket.inet_pton(socket.AF_INET6, "::1"))
            kind = "delete" if msg_type & 0xFF == ct.IPCTNL_MSG_CT_DELETE else state
            states.setdefault((sport, dport), []).append(kind)  # type: ignore[arg-type]
    to_8080 = {k: v for k, v in states.items() if k[1] == 8080}
    assert len(to_8080) == 5
    # Every connection was seen from its SYN to ESTABLISHED; the closed one went on past it.
    for sequence in to_8080.values():
        assert sequence[:3] == [ct.SYN_SENT, ct.SYN_RECV, ct.ESTABLISHED]
    assert sum(1 for s in to_8080.values() if any(x not in (1, 2, 3) for x in s)) == 1


def test_accepted_sampler_counts_each_connection_once_and_not_the_baseline() -> None:
    sampler = AcceptedSampler((80,))
    sampler.baseline({80: {"a", "b"}})
    assert sampler.update({80: {"a", "b", "c"}}) == {80: 1}
    assert sampler.update({80: {"c", "d"}}) == {80: 2}
    assert sampler.update({80: {"c", "d"}}) == {80: 2}


def test_coalescer_gives_each_caller_a_run_that_started_after_it_arrived() -> None:
    started: list[float] = []
    gate = threading.Event()

    def slow() -> float:
        started.append(time.monotonic())
        gate.wait(5)
        return started[-1]

    run = Coalescer(slow)
    results: dict[int, float] = {}
    arrived: dict[int, float] = {}

    def caller(i: int) -> None:
        arrived[i] = time.monotonic()
        results[i] = run()

    first = threading.Thread(target=caller, args=(0,))
    first.start()
    while not started:
        time.sleep(0.001)
    later = [threading.Thread(target=caller, args=(i,)) for i in range(1, 20)]
    for t in later:
        t.start()
    # All 19 wait on the running count (Condition keeps its waiters in _waiters).
    wait_for(lambda: len(run.cond._waiters) == 19, 5, "the callers to queue")  # type: ignore[attr-defined]
    gate.set()
    for t in [first, *later]:
        t.join(5)
    assert len(started) == 2  # 20 callers, two runs
    assert all(results[i] >= arrived[i] for i in results)


def test_coalescer_hands_the_error_to_every_caller() -> None:
    def broken() -> int:
        raise OSError("kernel said no")

    with pytest.raises(OSError, match="kernel said no"):
        Coalescer(broken)()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (":9100", ("", 9100)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
        ("[::1]:9100", ("::1", 9100)),
        ("127.0.0.1:65535", ("127.0.0.1", 65535)),
    ],
)
def test_listen_address_parses(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen_address(text) == expected


@pytest.mark.parametrize("text", ["9100", ":0", ":70000", "host:", "host:port"])
def test_listen_address_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_listen_address(text)


def test_the_operators_container_args_are_what_the_real_cli_accepts() -> None:
    args = parse_args(contract.sidecar_args([8080, 8443], "sockdiag", 9200), {})
    assert args.watch_port == [8080, 8443]
    assert args.method == "sockdiag"
    assert args.listen_address == ("", 9200)


def test_flags_win_over_environment_and_environment_over_defaults() -> None:
    env = {"TCP_EXPORTER_WATCH_PORT": "80,443", "TCP_EXPORTER_METHOD": "psutil", "TCP_EXPORTER_LOG_FORMAT": "json"}
    args = parse_args(["--method", "sockdiag"], env)
    assert (args.watch_port, args.method, args.log_format, args.log_level) == ([80, 443], "sockdiag", "json", "info")
    assert args.listen_address == ("", contract.DEFAULT_METRICS_PORT)


def test_positional_form_sets_listen_and_watch_port() -> None:
    args = parse_args(["9100", "8080"], {})
    assert args.listen_address == ("", 9100)
    assert args.watch_port == [8080]


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--watch-port", "0"], {}),
        (["--watch-port", "http"], {}),
        (["--method", "magic", "--watch-port", "80"], {}),
        ([], {}),
        (["9100"], {}),
        (["9100", "8080", "--watch-port", "80"], {}),
        ([], {"TCP_EXPORTER_WATCH_PORT": "80,x"}),
        (["--watch-port", "80"], {"TCP_EXPORTER_METHOD": "fast"}),
        (["--watch-port", "80", "--listen-address", "9100"], {}),
        (["--watch-port", "80", "--resync-interval", "-1"], {}),
    ],
)
def test_bad_input_exits_2(argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv, env)
    assert exit_.value.code == 2
    assert "usage: tcp-exporter" in capsys.readouterr().err


def test_env_name_follows_the_flag() -> None:
    assert contract.env_name("--watch-port") == "TCP_EXPORTER_WATCH_PORT"


class Flaky:
    """A counting method that fails while `failing` is set: the health logic, over the real HTTP server."""

    name = "flaky"
    exact_accepted = False

    def __init__(self) -> None:
        self.failing = False

    def count(self) -> Counts:
        if self.failing:
            raise OSError("netlink refused")
        return Counts(established={8080: 3}, accepted={8080: 3})

    def close(self) -> None:
        pass


def test_healthz_fails_once_counting_has_failed_for_longer_than_allowed_and_recovers() -> None:
    import urllib.error
    import urllib.request

    from tcp_exporter.exporter import ConnectionCollector, make_registry, serve

    method = Flaky()
    collector = ConnectionCollector(method, "test", unhealthy_after=0.5)  # type: ignore[arg-type]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = serve(("127.0.0.1", port), make_registry(collector), collector, "")

    def get(path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as err:
            return int(err.code)

    try:
        assert get("/metrics") == 200 and get("/healthz") == 200
        method.failing = True
        get("/metrics")  # a count that fails
        assert get("/healthz") == 200  # not yet: a failure is not an outage
        wait_for(lambda: (get("/metrics"), get("/healthz"))[1] == 503, 10, "/healthz to fail")
        method.failing = False
        get("/metrics")
        assert get("/healthz") == 200
    finally:
        server.stop()


def test_back_to_back_calls_within_the_window_share_one_run() -> None:
    runs = []
    shared = Coalescer(lambda: runs.append(1) or len(runs), window=60)
    assert shared() == 1 and shared() == 1 and len(runs) == 1
    fresh = Coalescer(lambda: runs.append(1) or len(runs), window=0)
    assert fresh() == 2 and fresh() == 3


@pytest.mark.parametrize(
    ("text", "expected"), [("65532", (65532, 65532)), ("1000:2000", (1000, 2000)), ("0", (0, 0)), ("7:", (7, 7))]
)
def test_user_is_numeric_uid_and_gid_defaulting_to_the_uid(text: str, expected: tuple[int, int]) -> None:
    assert privileges.parse_user(text) == expected


@pytest.mark.parametrize("text", ["nobody", "", ":1", "1:x", "-1", "²", "4294967295", "1:2:3"])
def test_user_refuses_names_signs_and_non_ascii_digits(text: str) -> None:
    with pytest.raises(ValueError):
        privileges.parse_user(text)


def test_privileges_are_never_dropped_once_a_thread_runs_since_capabilities_are_per_thread() -> None:
    started, done = threading.Event(), threading.Event()
    thread = threading.Thread(target=lambda: (started.set(), done.wait(5)))
    thread.start()
    started.wait(5)
    try:
        with pytest.raises(RuntimeError, match="per thread"):
            privileges.drop(None, ())
        assert privileges.drop_all_capabilities().refused == "capabilities kept: a thread already runs"
    finally:
        done.set()
        thread.join()
