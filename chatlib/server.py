"""Run a chat server from the command line: ``python -m chatlib.server``.

Pick the engine with ``--engine``; every engine speaks the same protocol,
applies the same limits and writes the same log lines. Ctrl-C (or SIGTERM)
tells the clients, closes every connection and exits with status 0.

The log goes to stdout through a bounded queue and a writer thread, so a
stdout nobody reads never stops the serving: lines that find the queue full
are dropped and counted, and the writer says how many once it catches up.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib
import logging
import logging.handlers
import os
import queue
import signal
import sys
import threading
import time
from typing import TextIO

from chatlib.chat import Limits
from chatlib.engines.base import ServerBase
from chatlib.history import HistoryStore, StoreError
from chatlib.protocol import DEFAULT_HOST, DEFAULT_PORT
from chatlib.redis_link import BrokerError
from chatlib.sqlite_history import SQLiteHistory
from chatlib.trace import Trace

__all__ = ["ENGINES", "LOG_FLUSH_TIMEOUT", "LOG_QUEUE_LINES", "create_server", "main"]

#: The engines, by the name ``--engine`` takes.
ENGINES = ("threads", "selectors", "asyncio")

#: Log lines that may wait for stdout. The writer drains them as fast as stdout
#: takes them, so only a burst faster than the terminal waits here: a thousand
#: lines hold a thousand clients arriving at once. A queue that stays full means
#: nobody reads stdout (say, a pipe to a stopped reader); holding more lines
#: would only cost memory, some 600 bytes each.
LOG_QUEUE_LINES = 1000

#: How long exiting waits for the queued lines to be written: a slow reader
#: catches up well within it, and a stdout nobody reads would hold the exit
#: forever.
LOG_FLUSH_TIMEOUT = 1.0

#: How long the writer lets a burst of lines gather before writing them all with
#: one write(), and the most it gathers. Woken for each line of a crowd's
#: thousands, the writer kept taking the interpreter's lock from the serving
#: thread: logging took more time than serving (connecting 5,000 clients took
#: 0.8 s instead of 0.34 s).
LOG_BATCH_DELAY = 0.02
LOG_BATCH_LINES = 256


def create_server(
    engine: str = "threads",
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    limits: Limits | None = None,
    store: HistoryStore | None = None,
    trace: Trace | None = None,
    broker: str | None = None,
) -> ServerBase:
    """Return a bound, not yet started, server of the given *engine*.

    Call ``.start()`` on it (or use it in a ``with`` block) to serve in a
    background thread. Its rooms' history goes to *store* (for instance a
    :class:`~chatlib.sqlite_history.SQLiteHistory`), which the caller
    closes once the server has stopped; without one, it is kept in memory.
    *trace*, if given, receives the engine's :mod:`chatlib.trace` events.
    *broker*, a ``redis://HOST:PORT/DB`` URL, makes it one of the servers
    of one chat on that Redis (see :mod:`chatlib.cluster`); it raises
    :class:`~chatlib.redis_link.BrokerError` if redis-py is missing.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    module = importlib.import_module(f"chatlib.engines.{engine}")
    return module.ChatServer(host, port, limits=limits, store=store, trace=trace, broker=broker)


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """Put each record on a bounded queue without ever waiting; count those that do not fit."""

    def __init__(self, log_queue: queue.Queue) -> None:
        super().__init__(log_queue)
        #: Records dropped and not yet reported. ``Handler.handle()`` holds
        #: ``self.lock`` around ``emit()``, so the serving threads count in turn.
        self.dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        """Queue the record as it is: the writer formats it, off the serving thread.

        The server's records carry only immutable arguments (addresses, numbers),
        so formatting later gives the same line; the stock prepare() formats and
        copies each record here, on the thread that serves the clients.
        """
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            # The stock enqueue lets queue.Full reach handleError(), which prints
            # a traceback for every line lost.
            self.dropped += 1

    def take_dropped(self) -> int:
        """Return how many records were dropped since the last call."""
        with self.lock:
            dropped, self.dropped = self.dropped, 0
        return dropped


class _StdoutWriter(logging.handlers.QueueListener):
    """Write the queued records to *stream* from a daemon thread; report the dropped ones."""

    def __init__(self, handler: _DroppingQueueHandler, stream: TextIO) -> None:
        super().__init__(handler.queue)
        self._handler = handler
        # Past the stream's buffer, and so past its lock: a thread blocked in a write
        # while holding that lock makes the interpreter abort at exit ("could not
        # acquire lock for <_io.BufferedWriter name='<stdout>'> at interpreter shutdown").
        # Under python -u (PYTHONUNBUFFERED) the buffer is the raw file already.
        self._raw = getattr(stream.buffer, "raw", stream.buffer)
        self._encoding = stream.encoding
        self._gathered: list[str] = []

    def handle(self, record: logging.LogRecord) -> None:
        self._gathered.append(self._handler.format(record))  # with its traceback, if any
        caught_up = self.queue.empty()
        if caught_up or len(self._gathered) >= LOG_BATCH_LINES:
            self._write_gathered()
        if caught_up:
            self._report_dropped()  # the lines lost meanwhile can be told now
            # Let the next burst gather: nothing wakes this thread meanwhile,
            # so the serving thread keeps the interpreter's lock.
            time.sleep(LOG_BATCH_DELAY)

    def stop(self, timeout: float = LOG_FLUSH_TIMEOUT) -> None:
        """Write out the queued lines and stop, waiting at most *timeout* seconds.

        If stdout stays blocked that long, give up: the thread is a daemon, so it
        does not hold up the exit, and the lines still queued are lost.
        """
        deadline = time.monotonic() + timeout
        try:
            self.queue.put(self._sentinel, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if not self._thread.is_alive():
            # What it gathered last, and the lines dropped after its last catch-up,
            # while the queue held the sentinel.
            self._write_gathered()
            self._report_dropped()

    def _report_dropped(self) -> None:
        dropped = self._handler.take_dropped()
        if dropped:
            plural = "" if dropped == 1 else "s"
            self._write(f"[LOG] {dropped} log line{plural} dropped: the output was not being read.")

    def _write_gathered(self) -> None:
        if self._gathered:
            self._write(os.linesep.join(self._gathered))
            self._gathered.clear()

    def _write(self, lines: str) -> None:
        data = memoryview((lines + os.linesep).encode(self._encoding, "backslashreplace"))
        try:
            while data:
                written = self._raw.write(data)  # may write part of it, if a signal comes
                if written is None:  # a non-blocking stdout is full
                    raise BlockingIOError
                data = data[written:]
        except OSError:
            # Closed (its reader exited), or non-blocking and full: the line is lost,
            # and the server goes on.
            pass


def _log_to_stdout() -> _StdoutWriter:
    """Send the log to stdout through a bounded queue; return the writer, started."""
    # The server's lines say nothing of threads or processes: skip looking them up
    # for every record.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = _DroppingQueueHandler(queue.Queue(LOG_QUEUE_LINES))
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[handler])
    writer = _StdoutWriter(handler, sys.stdout)
    writer.start()
    return writer


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
    parser.add_argument(
        "--store",
        metavar="PATH",
        default=argparse.SUPPRESS,  # no "(default: None)" in --help
        help="keep the rooms' history in this SQLite file, across restarts and crashes"
        " (made if missing); without it, history is kept in memory",
    )
    parser.add_argument(
        "--broker",
        metavar="redis://HOST:PORT/DB",
        default=argparse.SUPPRESS,
        help="make one chat with every server on this Redis (docs/scaling.md); needs"
        " redis-py, chatlib's redis extra (pip install -e '.[redis]')",
    )
    for limit in dataclasses.fields(Limits):
        parser.add_argument(
            "--" + limit.name.replace("_", "-"),
            type=limit.metadata["type"],
            # A limit whose default depends on --host says so in its help.
            default=argparse.SUPPRESS if limit.default is None else limit.default,
            help=limit.metadata["help"],
        )
    args = parser.parse_args(argv)
    if "store" in args and "broker" in args:
        parser.error("--store and --broker do not go together: with --broker, history is on Redis")
    try:
        limits = Limits(
            **{field.name: getattr(args, field.name, None) for field in dataclasses.fields(Limits)}
        )
    except ValueError as error:
        parser.error(str(error).replace("_", "-"))  # the usage, the reason, and status 2
    return args, limits


def main(argv: list[str] | None = None) -> int:
    """Run the server until Ctrl-C or SIGTERM; return the exit status."""
    args, limits = _parse_args(argv)
    log_writer = _log_to_stdout()
    try:
        return _serve(args, limits)
    finally:
        log_writer.stop()


def _serve(args: argparse.Namespace, limits: Limits) -> int:
    try:
        store = SQLiteHistory(args.store) if "store" in args else None
    except StoreError as error:
        print(f"{error}; no client was let in.", file=sys.stderr)
        return 1
    try:
        return _serve_with(args, limits, store)
    finally:
        if store is not None:
            store.close()


def _serve_with(args: argparse.Namespace, limits: Limits, store: HistoryStore | None) -> int:
    try:
        server = create_server(
            args.engine, args.host, args.port, limits, store, broker=getattr(args, "broker", None)
        )
    except BrokerError as error:
        print(f"{error}; no client was let in.", file=sys.stderr)
        return 1
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
