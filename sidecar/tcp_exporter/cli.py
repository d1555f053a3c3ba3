"""The `tcp-exporter` command."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from tcp_exporter import __version__, privileges
from tcp_exporter import contract as c
from tcp_exporter.exporter import LANDING, ConnectionCollector, make_registry, parse_listen_address, serve
from tcp_exporter.logs import TEXT_FORMAT, JsonFormatter
from tcp_exporter.methods import Options, Unavailable, fallback, psutil_method, select

log = logging.getLogger("tcp_exporter")

EXIT_USAGE = 2
EXIT_FAILURE = 1


def port_number(text: str) -> int:
    if not text.strip().isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number in 1-65535")
    return int(text)


def listen_address(text: str) -> tuple[str, int]:
    try:
        return parse_listen_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return value


def user(text: str) -> tuple[int, int]:
    try:
        return privileges.parse_user(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def drain_token(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{16,128}", text):
        raise argparse.ArgumentTypeError("give a token of 16 to 128 letters, digits, '-' or '_'")
    return text


def label_value(text: str) -> str:
    if not text or text != text.strip() or any(not ch.isprintable() for ch in text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a name: empty, padded or with control characters")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tcp-exporter",
        description="Count ESTABLISHED inbound TCP connections on the watched port(s) of this network "
        "namespace and serve them as Prometheus metrics. Every flag can also be set through an environment "
        f"variable {c.ENV_PREFIX}<FLAG> (for example {c.env_name('--watch-port')}=8080,8443); a flag wins over "
        "its variable.",
        epilog="The original form `tcp-exporter LISTEN_PORT WATCH_PORT` still works.",
    )
    parser.add_argument("legacy", nargs="*", metavar="LISTEN_PORT WATCH_PORT", help=argparse.SUPPRESS)
    parser.add_argument(
        "--listen-address",
        type=listen_address,
        default=None,
        help=f"HOST:PORT to serve /metrics on (default {c.DEFAULT_LISTEN_ADDRESS}: every address)",
    )
    parser.add_argument(
        "--watch-port",
        type=port_number,
        action="append",
        default=None,
        help="local port whose inbound connections are counted; repeat for several (env: comma-separated)",
    )
    parser.add_argument(
        "--method",
        choices=c.METHODS,
        default=None,
        help="how to count: conntrack (needs CAP_NET_ADMIN), sockdiag, psutil, or auto (default): conntrack where "
        "the namespace already tracks connections and a connection of its own proves it tracks new ones (never "
        "switching tracking on), else sockdiag, else psutil",
    )
    parser.add_argument(
        "--on-unavailable",
        choices=c.ON_UNAVAILABLE,
        default=None,
        help="when the method cannot open here: exit 1 (default), or fall back to the next that opens, else keep "
        "serving with tcp_exporter_count_success 0 and the reason (the operator injects it so)",
    )
    parser.add_argument(
        "--resync-interval",
        type=non_negative,
        default=None,
        metavar="SECONDS",
        help="conntrack: seconds between full resyncs from the socket table, 0 for never (default 60)",
    )
    parser.add_argument(
        "--deployment",
        type=label_value,
        default=None,
        metavar="NAME",
        help=f"label the connection series {c.DEPLOYMENT_LABEL}=NAME, so that a query selects one Deployment's "
        "pods exactly (the operator sets it); default: no such label",
    )
    parser.add_argument(
        "--max-connections",
        type=positive_int,
        default=None,
        help="open connections to the metrics port at most; past it a new one closes the one that has kept the "
        "server waiting longest (default 64)",
    )
    parser.add_argument(
        "--share-window",
        type=non_negative,
        default=None,
        metavar="SECONDS",
        help="scrapes within this long after a count share it, so a tight scrape loop costs one count "
        "(default 1; 0: every scrape counts)",
    )
    parser.add_argument(
        "--unhealthy-after",
        type=non_negative,
        default=None,
        metavar="SECONDS",
        help="/healthz fails once counting has failed for this long without a success; 0 (default): never, "
        "so a liveness probe restarts only a server that does not answer",
    )
    parser.add_argument(
        "--user",
        type=user,
        default=None,
        metavar="UID[:GID]",
        help="started as root: become this user before opening anything, keeping only the capability the method "
        "needs (conntrack: NET_ADMIN) and none once the method chosen needs none (default 65532:65532; 0 stays "
        "root, still with no other capability)",
    )
    parser.add_argument(
        "--drain-token",
        type=drain_token,
        default=None,
        metavar="TOKEN",
        help=f"who shows it in the {c.DRAIN_HEADER} header may ask for {c.DRAIN_PATH} from outside the pod (the "
        "kubelet running a preStop hook); without it, only from inside the pod (loopback). Better given as "
        f"{c.env_name('--drain-token')}",
    )
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default=None, help="default info")
    parser.add_argument("--log-format", choices=("text", "json"), default=None, help="default text")
    parser.add_argument("--version", action="version", version=f"tcp-exporter {__version__}")
    return parser


def parse_args(argv: Sequence[str], environ: dict[str, str]) -> argparse.Namespace:
    """Flags, then TCP_EXPORTER_* variables, then defaults. Exits 2 with usage on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)

    def from_env(flag: str, convert, default):  # type: ignore[no-untyped-def]
        name = c.env_name(flag)
        if name not in environ:
            return default
        try:
            return convert(environ[name])
        except (argparse.ArgumentTypeError, ValueError) as exc:
            parser.error(f"{name}: {exc}")

    def choice(options: Sequence[str]):  # type: ignore[no-untyped-def]
        def check(text: str) -> str:
            if text not in options:
                raise ValueError(f"{text!r} is not one of {', '.join(options)}")
            return text

        return check

    if args.legacy:
        if len(args.legacy) != 2:
            parser.error("the positional form takes exactly two ports: LISTEN_PORT WATCH_PORT")
        if args.listen_address is not None or args.watch_port is not None:
            parser.error("give the ports either positionally or with --listen-address/--watch-port, not both")
        try:
            args.listen_address = ("", port_number(args.legacy[0]))
            args.watch_port = [port_number(args.legacy[1])]
        except argparse.ArgumentTypeError as exc:
            parser.error(str(exc))
    if args.listen_address is None:
        args.listen_address = from_env("--listen-address", listen_address, listen_address(c.DEFAULT_LISTEN_ADDRESS))
    if args.watch_port is None:
        args.watch_port = from_env("--watch-port", lambda v: [port_number(p) for p in v.split(",") if p.strip()], [])
    if not args.watch_port:
        parser.error(f"no port to watch: give --watch-port (or {c.env_name('--watch-port')})")
    if args.method is None:
        args.method = from_env("--method", choice(c.METHODS), "auto")
    if args.on_unavailable is None:
        args.on_unavailable = from_env("--on-unavailable", choice(c.ON_UNAVAILABLE), "exit")
    if args.resync_interval is None:
        args.resync_interval = from_env("--resync-interval", non_negative, 60.0)
    if args.max_connections is None:
        args.max_connections = from_env("--max-connections", positive_int, 64)
    if args.share_window is None:
        args.share_window = from_env("--share-window", non_negative, 1.0)
    if args.unhealthy_after is None:
        args.unhealthy_after = from_env("--unhealthy-after", non_negative, 0.0)
    if args.user is None:
        args.user = from_env("--user", user, privileges.DEFAULT_USER)
    if args.deployment is None:
        args.deployment = from_env("--deployment", label_value, None)
    if args.drain_token is None:
        args.drain_token = from_env("--drain-token", drain_token, None)
    if args.log_level is None:
        args.log_level = from_env("--log-level", choice(("debug", "info", "warning", "error")), "info")
    if args.log_format is None:
        args.log_format = from_env("--log-format", choice(("text", "json")), "text")
    return args


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv, dict(os.environ))
    setup_logging(args.log_level, args.log_format)
    ports = sorted(set(args.watch_port))
    options = Options(resync_interval=args.resync_interval)
    # Before anything is opened and before any thread starts (capabilities are per thread).
    may_need = [m for m in c.METHODS if m != "auto"] if args.method == "auto" else [args.method]
    keep = tuple(sorted({cap for name in may_need for cap in c.METHOD_CAPABILITIES.get(name, ())}))
    # What is imported on first use is imported now: the user we become may not be able to read the Python
    # installation (a root-only home, as pyenv's), and an import failing later would fail a count, not the start.
    if "psutil" in may_need or args.on_unavailable == "fallback":
        psutil_method.load()
    import encodings.idna  # noqa: F401  (any str host given to getaddrinfo)

    dropped = privileges.drop(args.user, keep)
    try:
        method, reason = select(args.method, ports, options)
    except Unavailable as exc:
        if args.on_unavailable == "exit":
            log.error("cannot count with method %s: %s", args.method, exc)
            return EXIT_FAILURE
        method, reason = fallback(args.method, exc, ports, options)
        log.warning("cannot count with method %s: %s; %s", args.method, exc, reason)
    log.info(
        "counting ESTABLISHED inbound connections on port(s) %s with %s: %s",
        ",".join(map(str, ports)),
        method.name,
        reason,
    )
    if dropped.capabilities and not c.METHOD_CAPABILITIES.get(method.name):
        dropped = privileges.drop_all_capabilities()
    (log.warning if dropped.refused else log.info)("%s", dropped.describe())
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        collector = ConnectionCollector(
            method,
            reason,
            deployment=args.deployment,
            share_window=args.share_window,
            unhealthy_after=args.unhealthy_after,
        )
        landing = LANDING.format(ports=", ".join(map(str, ports)), method=method.name)
        try:
            server = serve(
                args.listen_address,
                make_registry(collector),
                collector,
                landing,
                args.max_connections,
                drain_token=args.drain_token,
            )
        except OSError as exc:
            host, port = args.listen_address
            hint = ""
            if exc.errno == errno.EADDRINUSE:
                # Injected, the pod's other containers share its network: one of them (not declaring it) has it.
                hint = "; another process (another container of the pod?) has it: give the exporter a free port "
                hint += "(--listen-address, or the annotation tcp-exporter/metrics-port where the operator injects it)"
            log.error("cannot listen on %s:%d: %s%s", host or "*", port, exc.strerror or exc, hint)
            return EXIT_FAILURE
        log.info("serving metrics on %s:%d%s", args.listen_address[0] or "*", args.listen_address[1], c.METRICS_PATH)
        stop.wait()
        server.stop()
    finally:
        method.close()
    log.info("stopped")
    return 0
