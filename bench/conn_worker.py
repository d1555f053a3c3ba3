"""Holds many TCP connections open for the benchmarks, in whatever namespace it was started in.

    python -m bench.conn_worker server PORT        accept on PORT (SO_REUSEPORT) and keep every connection
    python -m bench.conn_worker client SRC DST PORT N   open N connections from SRC to DST:PORT and keep them

Each prints one line when ready ("listening", or "ready N") and exits when its
standard input closes. One process holds at most 20,000 files here, so a
benchmark spreads connections over several workers.
"""

from __future__ import annotations

import resource
import socket
import sys
import threading


def raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def server(port: int) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(4096)
    kept: list[socket.socket] = []

    def accept_forever() -> None:
        while True:
            try:
                kept.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept_forever, daemon=True).start()
    print("listening", flush=True)
    sys.stdin.read()


def client(src: str, dst: str, port: int, n: int) -> None:
    kept = []
    for _ in range(n):
        s = socket.socket()
        s.bind((src, 0))
        s.connect((dst, port))
        kept.append(s)
    print(f"ready {len(kept)}", flush=True)
    sys.stdin.read()


def main(argv: list[str]) -> None:
    raise_fd_limit()
    if argv[0] == "server":
        server(int(argv[1]))
    elif argv[0] == "client":
        client(argv[1], argv[2], int(argv[3]), int(argv[4]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
