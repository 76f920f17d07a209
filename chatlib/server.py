"""Run a chat server from the command line: ``python -m chatlib.server``.

Pick the engine with ``--engine``; every engine speaks the same protocol,
applies the same limits and writes the same log lines. Ctrl-C (or SIGTERM)
tells the clients, closes every connection and exits with status 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib
import logging
import signal
import sys
import threading

from chatlib.engines.base import ServerBase
from chatlib.protocol import DEFAULT_HOST, DEFAULT_PORT
from chatlib.room import Limits

__all__ = ["ENGINES", "create_server", "main"]

#: The engines, by the name ``--engine`` takes.
ENGINES = ("threads", "selectors", "asyncio")


def create_server(
    engine: str = "threads",
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    limits: Limits | None = None,
) -> ServerBase:
    """Return a bound, not yet started, server of the given *engine*.

    Call ``.start()`` on it (or use it in a ``with`` block) to serve in a
    background thread.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    module = importlib.import_module(f"chatlib.engines.{engine}")
    return module.ChatServer(host, port, limits=limits)


def _parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Limits]:
    parser = argparse.ArgumentParser(
        prog="python -m chatlib.server",
        description="A multi-client TCP chat server. Connect with "
        "'python -m chatlib.client' or 'nc HOST PORT'. docs/protocol.md explains the limits.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="threads",
        help="how to do the I/O (docs/engines.md compares them)",
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port; 0 picks a free one")
    for limit in dataclasses.fields(Limits):
        parser.add_argument(
            "--" + limit.name.replace("_", "-"),
            type=type(limit.default),
            default=limit.default,
            help=limit.metadata["help"],
        )
    args = parser.parse_args(argv)
    try:
        limits = Limits(
            **{field.name: getattr(args, field.name) for field in dataclasses.fields(Limits)}
        )
    except ValueError as error:
        parser.error(str(error).replace("_", "-"))  # the usage, the reason, and status 2
    return args, limits


def main(argv: list[str] | None = None) -> int:
    """Run the server until Ctrl-C or SIGTERM; return the exit status."""
    args, limits = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        server = create_server(args.engine, args.host, args.port, limits)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            print(
                f"Port {args.port} on {args.host} is already in use; "
                "stop the other server or pick another --port.",
                file=sys.stderr,
            )
        else:
            print(f"Cannot listen on {args.host}:{args.port}: {error.strerror}", file=sys.stderr)
        return 1

    stop_requested = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stop_requested.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)  # on Windows, only SIGINT ever arrives
    server.start()
    # Wait in short slices: on Windows a wait without a timeout is not
    # interrupted by Ctrl-C, so the signal handler would never run.
    while not stop_requested.wait(0.2):
        if not server.running:  # it failed, and its thread printed why
            server.stop()
            return 1
    logging.getLogger("chatlib.server").info("[STOPPING] Saying goodbye to the clients.")
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
