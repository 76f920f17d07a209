"""Run lesson 03's naive chat server as the benchmark's baseline.

``python -m chatlib.bench.naive --port 0`` serves
:class:`chatlib.lessons.NaiveChatServer`, the design the course starts from:
one thread per client, and a broadcast that calls ``sendall`` once per client
per line, under one lock. Add ``--no-nodelay`` to leave Nagle's algorithm on
and watch echo latency get about ten times worse.

It prints the same ``[LISTENING]`` line as ``python -m chatlib.server``, but
for the engine, and
stops on Ctrl-C or SIGTERM, so the benchmark drives both the same way.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from chatlib.lessons import NaiveChatServer

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Serve until Ctrl-C or SIGTERM; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m chatlib.bench.naive", description=__doc__)
    parser.add_argument("--port", type=int, default=5050, help="port on 127.0.0.1; 0 picks one")
    parser.add_argument(
        "--no-nodelay",
        dest="nodelay",
        action="store_false",
        help="leave Nagle's algorithm on (no TCP_NODELAY on accepted sockets)",
    )
    args = parser.parse_args(argv)
    stop_requested = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, frame: stop_requested.set())
    server = NaiveChatServer("127.0.0.1", args.port, nodelay=args.nodelay).start()
    host, port = server.address
    print(f"[LISTENING] Server is listening on {host}:{port}", flush=True)
    while not stop_requested.wait(0.2):  # short waits: see chatlib.server.main
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
