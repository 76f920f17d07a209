"""Small helpers for the course notebooks: test clients, a naive server, checks.

Nothing here is part of the chat server. The notebooks use these helpers to
poke at real servers without waiting on luck:

- :class:`LineClient` is a blocking line-at-a-time TCP client whose every
  read has a deadline, so a cell that expects a line either gets it or says
  it did not come, instead of hanging the kernel;
- :class:`BackgroundReader` keeps reading a client's lines in a thread (it
  never prints: a print from a thread lands in a random notebook cell);
- :class:`NaiveChatServer` is the broadcast loop of lesson 03, the design
  that lets one client that stops reading stall everyone;
- :class:`LocalFirstChat` is lesson 10's chat that shows its own clients'
  lines before the broker orders them, the design that lets two servers
  show two conversations;
- the ``check_*`` functions are the exercises' self-checks.

Framing and sanitising come from :mod:`chatlib.protocol`, as everywhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import io
import itertools
import math
import os
import select
import selectors
import socket
import struct
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from chatlib import aio_client
from chatlib.chat import Chat, Limits, Room, State
from chatlib.cluster import Cluster, encode_event
from chatlib.engines.base import ServerBase
from chatlib.protocol import (
    CLIENT_MAX_LINE,
    LOBBY,
    READ_SIZE,
    LineFramer,
    encode_line,
    format_notice,
    parse_notice,
    parse_server_line,
    sanitize,
)
from chatlib.server import create_server
from chatlib.sqlite_history import SQLiteHistory

__all__ = [
    "BackgroundReader",
    "CheckFailed",
    "LineClient",
    "LocalFirstChat",
    "NaiveChatServer",
    "NotInstalled",
    "StuckClientRun",
    "check_ask",
    "check_audience",
    "check_bounded_queue",
    "check_broadcast",
    "check_choose_name",
    "check_classify",
    "check_door",
    "check_echo_task",
    "check_give_way",
    "check_how_it_ended",
    "check_line_html",
    "check_lost_copies",
    "check_measure",
    "check_missing",
    "check_percentile",
    "check_read_lines",
    "check_read_to_end",
    "check_recent_from_file",
    "check_recv_exactly",
    "check_ring",
    "check_safe_clients",
    "check_same_order",
    "check_send_queued",
    "check_send_some",
    "check_serve_client",
    "check_stream_broadcast",
    "check_who_is_online",
    "deliver_locally_first",
    "exercise_check",
    "expect",
    "join_as",
    "online",
    "send_in_background",
    "speak_at_once",
    "talk_past_stuck_client",
    "threads_named",
    "two_linked_servers",
    "wait_until",
]

Matcher = str | Callable[[str], bool]
T = TypeVar("T")


def _matches(matcher: Matcher, line: str) -> bool:
    return matcher(line) if callable(matcher) else line == matcher


# --- Clients -----------------------------------------------------------------


class LineClient:
    """A blocking TCP client that reads whole lines, each read with a deadline.

    Reads raise :class:`TimeoutError` when nothing arrives in time and
    return ``None`` once the server has closed the connection. Every line
    read is also kept in :attr:`received`, for transcripts.

    *rcvbuf* sets ``SO_RCVBUF`` before connecting, which keeps the kernel
    from growing the receive buffer: lesson 03 uses it for a client that
    never reads.
    """

    def __init__(
        self,
        address: tuple[str, int],
        *,
        timeout: float = 5.0,
        rcvbuf: int | None = None,
    ) -> None:
        self.address = address
        #: The default deadline, in seconds, of every read.
        self.timeout = timeout
        #: Every line read so far, in order.
        self.received: list[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Before connect(): the window the peer may fill is agreed then.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._framer = LineFramer(CLIENT_MAX_LINE)
        self._eof = False

    # --- Public methods -------------------------------------------------

    def send_line(self, text: str) -> None:
        """Send *text* as one line (UTF-8, ending in ``\\n``)."""
        self.sock.sendall(encode_line(text))

    def read_line(self, timeout: float | None = None) -> str | None:
        """Return the next line, or ``None`` once the server has closed.

        Wait at most *timeout* seconds (default :attr:`timeout`); raise
        :class:`TimeoutError` if no whole line came by then.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while (line := self._framer.next_line()) is None:
            if self._eof:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no line arrived in time")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(READ_SIZE)
            except TimeoutError:
                raise TimeoutError("no line arrived in time") from None
            except ConnectionError:
                data = b""
            finally:
                self.sock.settimeout(self.timeout)
            if not data:
                self._eof = True
                line = self._framer.finish()
                if line is not None:
                    break
                return None
            self._framer.feed(data)
        self.received.append(line)
        return line

    def read_until(self, matcher: Matcher, timeout: float | None = None) -> list[str]:
        """Read lines until one equals *matcher* (or makes it return true).

        Return the lines read, the matching one last. Raise
        :class:`TimeoutError` if it does not come within *timeout* seconds
        in all, and :class:`EOFError` if the server closes first.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        lines = []
        while True:
            line = self.read_line(max(0.0, deadline - time.monotonic()))
            if line is None:
                raise EOFError(f"the server closed the connection after {lines[-3:]}")
            lines.append(line)
            if _matches(matcher, line):
                return lines

    def wait_for(self, matcher: Matcher, timeout: float) -> bool:
        """Return whether a matching line arrives within *timeout* seconds."""
        try:
            self.read_until(matcher, timeout)
        except (TimeoutError, EOFError):
            return False
        return True

    def read_to_end(self, timeout: float | None = None) -> list[str]:
        """Read every line until the server closes the connection."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        lines = []
        while (line := self.read_line(max(0.0, deadline - time.monotonic()))) is not None:
            lines.append(line)
        return lines

    def close(self) -> None:
        """Close the connection (shutting it down first wakes any reader thread)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def __enter__(self) -> LineClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        host, port = self.address
        state = "closed" if self.sock.fileno() < 0 else "open"
        return f"<LineClient to {host}:{port} {state}>"


class BackgroundReader:
    """Read a :class:`LineClient`'s lines in a daemon thread, silently.

    The thread stores lines and never prints (in a notebook, output from a
    thread lands in whichever cell ran last). Ask it questions from the
    notebook instead: :meth:`wait_for`, :attr:`lines`, :attr:`byte_count`.
    It takes over the client (lines the client had received but not yet
    returned come first), so do not call the client's ``read_*`` methods
    any more. It ends when the connection does; close the client to end it.
    """

    def __init__(self, client: LineClient) -> None:
        self.client = client
        self._lines: list[str] = []
        self._bytes = 0
        self._changed = threading.Condition()
        self._done = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="BackgroundReader")
        self._thread.start()

    # --- Public methods -------------------------------------------------

    @property
    def lines(self) -> list[str]:
        """Return a copy of the lines read so far."""
        with self._changed:
            return list(self._lines)

    @property
    def byte_count(self) -> int:
        """Return how many bytes of lines were read (newlines included)."""
        with self._changed:
            return self._bytes

    def wait_for(self, matcher: Matcher, timeout: float) -> bool:
        """Return whether a matching line has arrived, waiting at most *timeout* s."""
        return self.wait_for_count(matcher, 1, timeout)

    def wait_for_count(self, matcher: Matcher, count: int, timeout: float) -> bool:
        """Return whether *count* matching lines have arrived within *timeout* s."""
        checked = found = 0

        def enough() -> bool:
            nonlocal checked, found
            # Look at each line once, however often we are woken.
            found += sum(_matches(matcher, line) for line in self._lines[checked:])
            checked = len(self._lines)
            return found >= count or self._done

        with self._changed:
            self._changed.wait_for(enough, timeout)
            return found >= count

    def join(self, timeout: float) -> bool:
        """Wait for the connection to end; return whether it did in time."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # --- Private methods ------------------------------------------------

    def _run(self) -> None:
        # Take over the client's framer: it may hold lines already received.
        sock, framer = self.client.sock, self.client._framer
        try:
            sock.settimeout(None)  # the owner ends us by closing the client
            while True:
                new = []
                while (line := framer.next_line()) is not None:
                    new.append(line)
                with self._changed:
                    self._lines += new
                    self._bytes += sum(len(line.encode()) + 1 for line in new)
                    self._changed.notify_all()
                data = sock.recv(READ_SIZE)
                if not data:
                    break
                framer.feed(data)
        except OSError:
            pass  # closed under us, or reset: either way, the end
        with self._changed:
            self._done = True
            self._changed.notify_all()


def send_in_background(
    target: LineClient | socket.socket, data: bytes | Iterable[str]
) -> threading.Thread:
    """Send *data* (bytes, or lines of text) from a daemon thread; return the thread.

    Sending blocks once the receiver stops reading, which is exactly what
    lessons 01 and 03 are about; the thread lets the notebook go on
    meanwhile. It never raises or prints: if the connection fails, it just
    ends. Join it to wait.
    """
    sock = target.sock if isinstance(target, LineClient) else target
    if not isinstance(data, bytes):
        data = b"".join(encode_line(line) for line in data)

    def send() -> None:
        with contextlib.suppress(OSError):
            sock.settimeout(None)  # no deadline: it may have to wait for a stall to end
            sock.sendall(data)

    thread = threading.Thread(target=send, daemon=True, name="send_in_background")
    thread.start()
    return thread


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    """Return whether *condition()* became true within *timeout* seconds.

    For states nobody announces (a thread has ended, a count has dropped),
    poll instead of sleeping a guessed amount: a cell then waits only as
    long as it must, and says so when the state never comes.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def threads_named(suffix: str) -> int:
    """Return how many live threads have a name ending in *suffix*.

    Python names an unnamed thread after its target, e.g.
    ``"Thread-7 (_read)"``, so ``threads_named("(_read)")`` counts the
    threaded engine's reader threads.
    """
    return sum(thread.name.endswith(suffix) for thread in threading.enumerate())


# --- The naive server of lesson 03 --------------------------------------------


class NaiveChatServer:
    """A chat server that broadcasts with a loop of ``sendall`` under one lock.

    This is the textbook design, kept small so a learner can read it whole.
    Each client gets a thread that reads its lines; each line goes to every
    client (the sender too) as ``<guestN> text``, one ``sendall`` after
    another. ``sendall`` blocks while a receiver's buffers are full, so a
    single client that stops reading holds the lock and stalls the chat.

    Same life cycle as chatlib's servers: ``start()``, ``address``, ``stop()``.
    With *nodelay* false, Nagle's algorithm stays on (the benchmark shows
    what that costs: ``python -m chatlib.bench.naive --no-nodelay``).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, nodelay: bool = True) -> None:
        self._listener = socket.create_server((host, port))
        self._nodelay = nodelay
        #: ``(host, port)`` the server listens on.
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self.clients: list[socket.socket] = []
        self.lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._names = itertools.count(1)

    # --- Public methods -------------------------------------------------

    def start(self) -> NaiveChatServer:
        """Accept clients in a background thread and return self."""
        self._start_thread(self._accept_forever)
        return self

    def broadcast(self, data: bytes) -> None:
        """Send *data* to every client, one ``sendall`` after another.

        Can you spot the problem? The lock is held while ``sendall`` waits
        for the slowest receiver.
        """
        with self.lock:
            for client in self.clients:
                with contextlib.suppress(OSError):  # its own thread notices
                    client.sendall(data)

    def stop(self) -> None:
        """Stop accepting, disconnect every client and end every thread."""
        # On Linux, shutdown() wakes a thread blocked in accept(), recv() or
        # sendall() on that socket; close() alone would not.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for client in list(self.clients):
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(2.0)

    def __repr__(self) -> str:
        host, port = self.address
        return f"<NaiveChatServer on {host}:{port}>"

    # --- Private methods ------------------------------------------------

    def _start_thread(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_forever(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return  # stop() shut the listener down
            # Nagle's algorithm would hold back each small line for an ACK;
            # that is a different lesson, so send at once.
            if self._nodelay:
                with contextlib.suppress(OSError):  # already reset: _serve will see
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._start_thread(self._serve, sock, f"guest{next(self._names)}")

    def _serve(self, sock: socket.socket, name: str) -> None:
        framer = LineFramer(CLIENT_MAX_LINE)
        with self.lock:
            self.clients.append(sock)
            with contextlib.suppress(OSError):
                sock.sendall(encode_line(f"*** Welcome, {name}!"))
        try:
            while data := sock.recv(READ_SIZE):
                framer.feed(data)
                while (line := framer.next_line()) is not None:
                    self.broadcast(encode_line(f"<{name}> {line}"))
        except OSError:
            pass
        with self.lock:
            self.clients.remove(sock)
        sock.close()


# --- Exercise checks -----------------------------------------------------------
#
# Each exercise defines a function or class between nbgrader's
# "### BEGIN SOLUTION" / "### END SOLUTION" markers; the learner's copy
# (make student) has "raise NotImplementedError()" there instead. A check
# runs the answer against the real thing and either returns one line saying
# what passed or raises CheckFailed, whose message says what was expected and
# what came, in words: a learner should never have to read a bare
# AssertionError or a traceback into this module.


class CheckFailed(AssertionError):
    """An exercise's answer is not right yet; the message says how, in plain English."""

    def _render_traceback_(self) -> list[str]:
        # IPython shows this in place of a traceback into the checker.
        return [f"Not yet: {self}"]


def expect(ok: object, message: str) -> None:
    """Raise :class:`CheckFailed` with *message* unless *ok* is true.

    Unlike ``assert``, this still checks under ``python -O``.
    """
    if not ok:
        raise CheckFailed(message)


def exercise_check(name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Make a check report the learner's own failures as :class:`CheckFailed`.

    *name* is what the learner wrote (``read_lines``, ``Ring``). A stub
    that still raises ``NotImplementedError`` is told to write it first; any
    other exception from their code is named, with its message. Works on
    plain and on ``async`` checks.
    """

    def explain(error: Exception) -> CheckFailed:
        if isinstance(error, NotImplementedError):
            return CheckFailed(
                f"{name} is not written yet: replace `raise NotImplementedError()` in the "
                "exercise cell with your code, run that cell, then this one again."
            )
        return CheckFailed(f"{name} raised {type(error).__name__}: {error}")

    def decorate(check: Callable[..., T]) -> Callable[..., T]:
        if inspect.iscoroutinefunction(check):

            @functools.wraps(check)
            async def run_async(*args: object) -> T:
                try:
                    return await check(*args)
                except CheckFailed:
                    raise
                except Exception as error:
                    raise explain(error) from error

            return run_async

        @functools.wraps(check)
        def run(*args: object) -> T:
            try:
                return check(*args)
            except CheckFailed:
                raise
            except Exception as error:
                raise explain(error) from error

        return run

    return decorate


def _passed(name: str, count: int) -> str:
    return f"{name}: all {count} checks passed"


@exercise_check("read_lines")
def check_read_lines(read_lines: Callable[[list[bytes], int], list[str]]) -> str:
    """Check lesson 01's ``read_lines(chunks, max_line)``; raise CheckFailed if wrong."""
    cases = [
        ([b"he", b"llo\n"], 100, ["hello"]),
        ([b"one\ntwo\nthr", b"ee\n"], 100, ["one", "two", "three"]),
        ([b"crlf\r\n"], 100, ["crlf"]),
        ([b"caf\xc3", b"\xa9\n"], 100, ["caf\u00e9"]),
        ([b"x" * 50 + b"\nok\n"], 10, ["ok"]),
        ([b"no newline yet"], 100, []),
    ]
    for chunks, max_line, expected in cases:
        got = read_lines(chunks, max_line)
        expect(
            got == expected,
            f"read_lines({chunks!r}, {max_line}) should give {expected!r}; it gave {got!r}",
        )
    return _passed("read_lines", len(cases))


@exercise_check("recv_exactly")
def check_recv_exactly(recv_exactly: Callable[[socket.socket, int], bytes]) -> str:
    """Check lesson 01's ``recv_exactly(sock, n)`` against data sent in pieces."""
    pieces = [b"he", b"llo", b" wor", b"ld!", b"extra"]
    a, b = socket.socketpair()
    b.settimeout(5)
    stop = threading.Event()

    def dribble() -> None:
        # Never raise here: a traceback from a thread lands in a random cell.
        with contextlib.suppress(OSError):
            for piece in pieces:
                a.sendall(piece)
                # Give the reader a chance to see each piece alone.
                if stop.wait(0.01):
                    return

    sender = threading.Thread(target=dribble, daemon=True)
    sender.start()
    try:
        first = recv_exactly(b, 5)
        expect(
            first == b"hello",
            f"after b'he' and b'llo' were sent, recv_exactly(sock, 5) should give b'hello'; "
            f"it gave {first!r}",
        )
        second = recv_exactly(b, 7)
        expect(
            second == b" world!",
            f"then recv_exactly(sock, 7) should give b' world!'; it gave {second!r}",
        )
        sender.join(5)
        a.close()
        try:
            early = recv_exactly(b, 10)
        except EOFError:
            pass
        else:
            raise CheckFailed(
                "when the stream ends after 5 of the 10 bytes asked for, recv_exactly should "
                f"raise EOFError; it returned {early!r}"
            )
    finally:
        stop.set()
        sender.join(5)
        a.close()
        b.close()
    return _passed("recv_exactly", 3)


# A check's server answers on 127.0.0.1 in far less; past this, say so rather than hang.
_CHECK_READ_TIMEOUT = 2.0


def _connect_to_chat(address: tuple[str, int]) -> tuple[socket.socket, io.TextIOWrapper]:
    """Connect as lesson 00 does, and read the greeting up to the "You are in" notice."""
    sock = socket.create_connection(address, timeout=_CHECK_READ_TIMEOUT)
    reader = sock.makefile("r", encoding="utf-8", newline="\n")
    while not reader.readline().startswith("*** You are in"):
        pass
    return sock, reader


@exercise_check("choose_name")
def check_choose_name(choose_name: Callable[[socket.socket, io.TextIOWrapper, str], str]) -> str:
    """Check lesson 00's ``choose_name(sock, reader, name)`` against a real chat server."""

    def answers(sock: socket.socket, reader: io.TextIOWrapper, name: str, expected: str) -> None:
        answer = choose_name(sock, reader, name)
        expect(
            isinstance(answer, str) and answer.rstrip("\n") == expected,
            f"choose_name(sock, reader, {name!r}) should return the server's answer, "
            f"{expected!r}; it returned {answer!r}",
        )

    with create_server("threads", "127.0.0.1", 0) as server:
        first, first_reader = _connect_to_chat(server.address)
        with first, first_reader:
            answers(first, first_reader, "alice", "*** guest1 is now known as alice.")
            second, second_reader = _connect_to_chat(server.address)
            with second, second_reader:
                # alice is taken now, in any case.
                taken = "!!! The name Alice is taken. Your name is still guest2."
                answers(second, second_reader, "Alice", taken)
                second.sendall(b"/who\n")
                online = second_reader.readline()
                expect(
                    online == "*** Online (2): alice, guest2\n",
                    f"after choose_name, the server should call guest1 alice; /who gave {online!r}",
                )
    return _passed("choose_name", 3)


@exercise_check("who_is_online")
def check_who_is_online(who_is_online: Callable[[socket.socket, io.TextIOWrapper], list]) -> str:
    """Check lesson 00's ``who_is_online(sock, reader)`` against a real chat server.

    Before each ``/who``, other people's lines are waiting to be read (a
    join, a message), as in a real chat: the answer must skip them.
    """

    def ask(sock: socket.socket, reader: io.TextIOWrapper, name: str, expected: list) -> None:
        got = who_is_online(sock, reader)
        expect(
            got == expected,
            f"with {', '.join(expected)} in the room and other lines waiting to be read, "
            f"who_is_online for {name} should return {expected!r}; it returned {got!r}",
        )

    with create_server("threads", "127.0.0.1", 0) as server:
        alice, alice_reader = _connect_to_chat(server.address)
        alice.sendall(b"/nick alice\n")
        bob, bob_reader = _connect_to_chat(server.address)
        carol, carol_reader = _connect_to_chat(server.address)
        with alice, alice_reader, bob, bob_reader, carol, carol_reader:
            bob.sendall(b"/nick bob\nhi alice\n")
            # Its echo comes once the server has handled both lines.
            while bob_reader.readline() != "<bob> hi alice\n":
                pass
            everyone = ["alice", "bob", "guest3"]
            # alice's reader holds two joins, two renames and bob's message; carol's holds
            # the renames and the message.
            ask(alice, alice_reader, "alice", everyone)
            ask(carol, carol_reader, "guest3", everyone)
            bob.sendall(b"/quit\n")
            while bob_reader.readline():  # the server closes once bob has left
                pass
            ask(alice, alice_reader, "alice", ["alice", "guest3"])
    return _passed("who_is_online", 3)


class _CountingLock:
    """A lock that counts how often it was taken, so a check can tell it was used."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.taken = 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        acquired = self._lock.acquire(blocking, timeout)
        self.taken += acquired
        return acquired

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _has_unread_bytes(sock: socket.socket) -> bool:
    """Return whether received bytes wait in *sock*'s kernel buffer, unread."""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


@exercise_check("serve_client")
def check_serve_client(serve_client: Callable[[socket.socket, list, object], None]) -> str:
    """Check lesson 02's ``serve_client(conn, clients, lock)`` in a small threaded chat.

    Three clients connect on 127.0.0.1, each served by the answer in a
    thread of its own. alice sends a line in two pieces, with carol's line
    in between: a relay that forwards pieces instead of whole lines mixes
    them up. Then bob leaves, and the others carry on.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    clients: list[socket.socket] = []
    lock = _CountingLock()
    errors: list[Exception] = []
    threads: dict[str, threading.Thread] = {}
    conns: dict[str, socket.socket] = {}
    people: dict[str, LineClient] = {}

    def serve(conn: socket.socket) -> None:
        try:
            serve_client(conn, clients, lock)
        except Exception as error:  # reported by the check: a thread must not print
            errors.append(error)

    def count() -> int:
        # Past the counting: only the answer's own use of the lock should count.
        with lock._lock:
            return len(clients)

    def settled(expected_count: int) -> bool:
        return wait_until(lambda: errors or count() == expected_count, _CHECK_READ_TIMEOUT)

    def read(name: str, lines: int) -> list[str]:
        got: list[str] = []
        with contextlib.suppress(TimeoutError):
            for _ in range(lines):
                line = people[name].read_line(_CHECK_READ_TIMEOUT)
                if line is None:
                    break
                got.append(line)
        if errors:
            raise errors[0]
        return got

    try:
        for name in ("alice", "bob", "carol"):
            people[name] = LineClient(listener.getsockname(), timeout=_CHECK_READ_TIMEOUT)
            conns[name], _ = listener.accept()
            threads[name] = threading.Thread(target=serve, args=(conns[name],), daemon=True)
            threads[name].start()
        settled(3)
        if errors:
            raise errors[0]
        expect(
            count() == 3 and lock.taken,
            f"with three clients connected, clients should hold their 3 sockets, added under "
            f"the lock; it holds {count()}, and the lock was taken {lock.taken} times",
        )
        people["alice"].sock.sendall(b"he")
        # Once alice's thread has taken "he" in, a relay that forwards pieces sends it on at
        # once (give it a moment to reach bob); one that forwards lines sends nothing yet.
        wait_until(lambda: not _has_unread_bytes(conns["alice"]), _CHECK_READ_TIMEOUT)
        wait_until(lambda: _has_unread_bytes(people["bob"].sock), 0.2)
        people["carol"].send_line("hi")
        for name in people:
            got = read(name, 1)
            expect(
                got == ["hi"],
                f"alice had sent 'he', the start of a line, when carol sent 'hi': {name} should "
                f"receive ['hi'] but received {got!r}. Forward whole lines only: keep each "
                "client's pieces in a LineFramer of its own.",
            )
        people["alice"].sock.sendall(b"llo\n")
        for name in people:
            got = read(name, 1)
            expect(
                got == ["hello"],
                f"alice's 'he' and 'llo\\n' make the line 'hello': {name} should receive "
                f"['hello'] but received {got!r}",
            )
        people.pop("bob").close()
        settled(2)
        threads["bob"].join(_CHECK_READ_TIMEOUT)
        expect(
            conns["bob"] not in clients and not threads["bob"].is_alive(),
            "when bob disconnected, his serve_client should remove his socket from clients "
            f"and return; clients still holds {count()} sockets, and his thread "
            f"{'is still running' if threads['bob'].is_alive() else 'ended'}",
        )
        people["carol"].send_line("still here?")
        for name in people:
            got = read(name, 1)
            expect(
                got == ["still here?"],
                f"after bob left, carol's line should still reach {name}; {name} received {got!r}",
            )
    finally:
        for client in people.values():
            client.close()
        for conn in conns.values():
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in threads.values():
            thread.join(_CHECK_READ_TIMEOUT)
        for conn in conns.values():
            conn.close()
        listener.close()
    return _passed("serve_client", 5)


@exercise_check("SafeClients")
def check_safe_clients(make_clients: Callable[[], object]) -> str:
    """Check lesson 02's thread-safe client list: ``add``, ``remove``, ``snapshot``.

    Reproduces the lesson's race on purpose: one thread walks the list while
    another adds to it in the middle. The walk must neither fail nor lose
    the new client.
    """
    clients = make_clients()
    clients.add("alice")
    clients.add("bob")
    inside = threading.Event()
    errors: list[BaseException] = []

    def walk() -> None:
        try:
            for _ in clients.snapshot():
                inside.set()
                time.sleep(0.05)  # a slow send, as in lesson 03
        except Exception as error:  # report whatever broke
            errors.append(error)

    walker = threading.Thread(target=walk)
    walker.start()
    walked = inside.wait(5)
    if not walked:
        walker.join(5)
        if errors:
            raise errors[0]
    expect(walked, "after add('alice') and add('bob'), snapshot() gave nothing to walk over")
    clients.add("carol")
    walker.join(5)
    if errors:
        raise CheckFailed(
            f"a thread walking over snapshot() failed when carol was added meanwhile: {errors[0]!r}"
        )
    names = sorted(clients.snapshot())
    expect(
        names == ["alice", "bob", "carol"],
        f"after adding alice, bob and carol, snapshot() should hold those three; it gave {names}",
    )
    clients.remove("bob")
    names = sorted(clients.snapshot())
    expect(
        names == ["alice", "carol"],
        f"after remove('bob'), snapshot() should hold alice and carol; it gave {names}",
    )
    return _passed("SafeClients", 4)


class _SendQueue:
    """A client's bounded send queue, as the check of lesson 03's broadcast drives it."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._chunks: list[bytes] = []
        self._size = 0

    def put(self, data: bytes) -> bool:
        if self._size + len(data) > self.cap:
            return False
        self._chunks.append(data)
        self._size += len(data)
        return True

    def take(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        return data


def _lines_dropped_at(sendq: int, stops_reading: dict[str, int | None], lines: int) -> dict:
    """Run a real Chat; return the line at which it dropped each client (``None``: never).

    A talker says *lines* lines of 400 bytes. Each client in *stops_reading*
    reads everything until the line it maps to, from which on its kernel
    takes nothing more (``None``: it always reads). The chat is sans-I/O, so
    this needs no sockets: the engine's part is played here, line by line.
    """
    chat = Chat(Limits(sendq=sendq, rate=0))
    talker = chat.connect(("talker", 0), 0.0)
    conns = {name: chat.connect((name, 0), 0.0) for name in stops_reading}
    for conn in (talker, *conns.values()):
        conn.data_to_send()  # the welcomes and joins, written out in full
        chat.data_unsent(conn, 0)
    refused = dict.fromkeys(conns, 0)
    dropped_at: dict[str, int | None] = dict.fromkeys(conns)
    for number in range(1, lines + 1):
        chat.receive_data(talker, encode_line(_said(number)), 0.0)
        talker.data_to_send()
        chat.data_unsent(talker, 0)
        for name, conn in conns.items():
            if dropped_at[name] is not None:
                continue
            if conn.state is State.OPEN:
                data = conn.data_to_send()
                stops = stops_reading[name]
                if stops is not None and number >= stops:
                    refused[name] += len(data)  # the kernel takes none of it
                chat.data_unsent(conn, refused[name])
            if conn.state is not State.OPEN:
                dropped_at[name] = number
    return dropped_at


def _said(number: int) -> str:
    return f"line {number} ".ljust(400, ".")


@exercise_check("broadcast")
def check_broadcast(broadcast: Callable[[dict[str, object], bytes], list[str]]) -> str:
    """Check lesson 03's ``broadcast(queues, data)`` against a real Chat's drops.

    Each client gets a queue capped at the chat's ``sendq``; a client that
    reads has its queue emptied after every broadcast, as its writer would.
    The clients ``broadcast`` drops, and the line it drops them at, must be
    those of a real :class:`~chatlib.chat.Chat` with the same limit.
    """
    cases = [
        (4096, {"alice": None, "bob": None}),
        (4096, {"alice": None, "stuck": 1, "bob": None}),
        (10_000, {"slow": 5, "alice": None, "stuck": 1}),
        (4096, {"stuck": 1, "alice": None, "frozen": 1}),
    ]
    lines = 40
    for sendq, stops_reading in cases:
        expected = _lines_dropped_at(sendq, stops_reading, lines)
        queues = {name: _SendQueue(sendq) for name in stops_reading}
        got: dict[str, int | None] = dict.fromkeys(stops_reading)
        for number in range(1, lines + 1):
            data = encode_line(f"<guest1> {_said(number)}")  # as the chat relays it
            before = list(queues)
            dropped = broadcast(queues, data)
            expect(
                isinstance(dropped, list),
                f"broadcast should return the list of names it dropped; it gave {dropped!r}",
            )
            gone = [name for name in before if name not in queues]
            expect(
                dropped == gone,
                f"at line {number}, broadcast removed {gone} from the queues but returned"
                f" {dropped!r}: return the names dropped, in the queues' order",
            )
            for name in dropped:
                got[name] = number
            for name, queue in queues.items():
                stops = stops_reading[name]
                if stops is None or number < stops:
                    queue.take()  # its writer sent it all
        readers = [name for name, stops in stops_reading.items() if stops is None]
        expect(
            got == expected,
            f"with sendq={sendq}, the real chat drops {_drops_in_words(expected)};"
            f" your broadcast dropped {_drops_in_words(got)} (clients that read: {readers})",
        )
    return _passed("broadcast", len(cases))


def _drops_in_words(dropped_at: dict[str, int | None]) -> str:
    drops = [f"{name} at line {line}" for name, line in dropped_at.items() if line is not None]
    return ", ".join(drops) or "nobody"


@exercise_check("BoundedQueue")
def check_bounded_queue(make_queue: Callable[[int], object]) -> str:
    """Check lesson 03's ``BoundedQueue(cap)``: ``put(data) -> bool`` and ``take() -> bytes``."""
    queue = make_queue(10)
    expect(queue.put(b"hello") is True, "put(b'hello') into an empty queue of 10 should give True")
    expect(queue.put(b"world") is True, "then put(b'world') should give True: 10 bytes fit in 10")
    got = queue.take()
    expect(
        got == b"helloworld",
        f"take() should give b'helloworld', all of it in order; it gave {got!r}",
    )
    got = queue.take()
    expect(got == b"", f"take() should empty the queue: a second take() gave {got!r}, not b''")
    expect(queue.put(b"12345678") is True, "after take(), put(b'12345678') should fit again")
    got = queue.put(b"123")
    expect(
        got is False,
        f"with 8 bytes queued, put(b'123') would pass the cap of 10: it should give False,"
        f" not {got!r}",
    )
    got = queue.take()
    expect(got == b"12345678", f"a refused put() must add nothing: take() gave {got!r}")
    return _passed("BoundedQueue", 7)


@exercise_check("read_to_end")
def check_read_to_end(read_to_end: Callable[[socket.socket], list[str]]) -> str:
    """Check lesson 04's ``read_to_end(sock)``: every line until EOF, the last unterminated."""
    cases = [
        ([b"one\ntw", b"o\n"], ["one", "two"]),
        ([b"bye\nlast words"], ["bye", "last words"]),
        ([b"\x1b[2Jboo\n"], ["^[[2Jboo"]),
        ([], []),
    ]
    for chunks, expected in cases:
        a, b = socket.socketpair()
        b.settimeout(5)
        try:
            for chunk in chunks:
                a.sendall(chunk)
            a.shutdown(socket.SHUT_WR)
            got = read_to_end(b)
        finally:
            a.close()
            b.close()
        expect(
            got == expected,
            f"when the peer sends {chunks!r} and then closes its side, read_to_end should give"
            f" {expected!r}; it gave {got!r}",
        )
    return _passed("read_to_end", len(cases))


@exercise_check("how_it_ended")
def check_how_it_ended(how_it_ended: Callable[[socket.socket], str]) -> str:
    """Check lesson 04's ``how_it_ended(sock)`` on real TCP connections that end four ways.

    The peer closes, resets (``SO_LINGER`` 0), or half-closes and stays
    connected, after sending nothing or 100 KB, more than one ``recv()``
    returns. A reader that waits beyond the end meets a 5 s timeout.
    """
    lots = b"x" * 100_000
    cases = [
        ("closes after sending 100 KB", lots, "close", "goodbye"),
        ("resets without sending anything", b"", "reset", "reset"),
        ("resets after sending 100 KB", lots, "reset", "reset"),
        (
            "half-closes (shutdown SHUT_WR) after 100 KB, and stays connected",
            lots,
            "half",
            "goodbye",
        ),
    ]
    with socket.create_server(("127.0.0.1", 0)) as listener:
        for what, data, ending, expected in cases:
            peer = socket.create_connection(listener.getsockname(), timeout=5)
            mine, _ = listener.accept()
            mine.settimeout(5)
            try:
                # Sent from a thread: 100 KB may not fit the buffers before mine reads.
                sender = send_in_background(peer, data)
                sender.join(5)
                if ending == "reset":
                    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    peer.close()
                elif ending == "close":
                    peer.close()
                else:
                    peer.shutdown(socket.SHUT_WR)
                try:
                    got = how_it_ended(mine)
                except TimeoutError:
                    raise CheckFailed(
                        f"when the peer {what}, how_it_ended was still waiting 5 s later:"
                        " stop once recv() says the connection has ended"
                    ) from None
            finally:
                peer.close()
                mine.close()
            expect(
                got == expected,
                f"when the peer {what}, how_it_ended should say {expected!r}; it said {got!r}",
            )
    return _passed("how_it_ended", len(cases))


@exercise_check("Door")
def check_door(make_door: Callable[[int], object]) -> str:
    """Check lesson 04's ``Door(max_per_address)`` against a real Chat's door.

    The same arrivals and departures go to a :class:`~chatlib.chat.Chat`
    with that ``max_per_address`` (flood control off, so only the count
    decides) and to the learner's door, which must admit and refuse alike.
    """
    a, b, c = "10.0.0.1", "10.0.0.2", "192.168.1.7"
    # ("in", address) is a connection arriving; ("out", n) the n-th one admitted leaving.
    script = [("in", a), ("in", a), ("in", a), ("in", b), ("out", 0), ("in", a), ("in", a)]
    script += [("in", c), ("out", 1), ("out", 2), ("in", b), ("in", b), ("out", 3), ("in", a)]
    cases = [2, 1, 3, 0]
    steps = 0
    for most in cases:
        chat = Chat(Limits(max_per_address=most, rate=0))
        door = make_door(most)
        admitted: list[tuple[str, object]] = []
        story: list[str] = []
        for event, what in script:
            if event == "out":
                address, conn = admitted[what]
                chat.connection_lost(conn)
                door.leave(address)
                story.append(f"admitted connection #{what + 1} (from {address}) leaves")
                continue
            conn = chat.connect((what, 40000 + len(story)), 0.0)
            real = conn.state is State.OPEN
            got = door.admit(what)
            story.append(f"one from {what} arrives")
            steps += 1
            if real:
                admitted.append((what, conn))
            expect(
                got is real,
                f"with max_per_address={most}: "
                + "; ".join(story)
                + ". The real chat "
                + ("lets it in" if real else "refuses it")
                + f"; your door's admit gave {got!r}",
            )
    return _passed("Door", steps)


# --- Lesson 05: an event loop, and what waits in it ---------------------------

#: Small kernel buffers for lesson 05's checks: with them a send() of a few
#: kilobytes already fills the socket, so partial sends happen at once
#: instead of after megabytes (Linux doubles the value it is given).
_SMALL_BUFFER = 4096


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Return (server side, client side) of a fresh connection on 127.0.0.1.

    The server side is non-blocking, as in an event loop; both have small
    buffers, so that the kernel soon refuses part of a send.
    """
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SMALL_BUFFER)
        client.connect(listener.getsockname())
        server, _ = listener.accept()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SMALL_BUFFER)
    server.setblocking(False)
    return server, client


def _pattern(size: int) -> bytes:
    """Return *size* bytes that never repeat within 251, so that a lost piece shows."""
    return bytes(i % 251 for i in range(size))


@exercise_check("send_some")
def check_send_some(send_some: Callable[[socket.socket, bytes], bytes]) -> str:
    """Check lesson 05's ``send_some(sock, data)`` on a real non-blocking socket.

    The client does not read at first, so the kernel takes only part of a
    large send and then none at all; once it reads, everything must arrive,
    in order, nothing twice.
    """
    data = _pattern(1024 * 1024)
    server, client = _tcp_pair()

    def send(data: bytes | memoryview) -> bytes | memoryview:
        rest = send_some(server, data)
        expect(
            isinstance(rest, (bytes, bytearray, memoryview)),
            f"send_some should return the bytes the kernel did not take; it returned {rest!r}",
        )
        return rest

    try:
        expect(len(send(b"")) == 0, "send_some(sock, b'') should return b''")
        rest = send(data)
        expect(
            0 < len(rest) < len(data),
            f"the kernel cannot take 1 MB at once: send_some should send part of it and "
            f"return the rest, but it returned {len(rest)} bytes",
        )
        expect(bytes(rest) == data[-len(rest) :], "what send_some returns must be the unsent end")
        # The client still does not read: the kernel takes little or nothing now.
        for _ in range(3):
            before, rest = len(rest), send(rest)
            expect(
                0 < len(rest) <= before,
                f"with the socket full, send_some should return what it could not send "
                f"({before} bytes or a little less); it returned {len(rest)}",
            )
        # Now the client reads, and the server sends whenever its socket is writable.
        received = bytearray()
        client.settimeout(0)
        deadline = time.monotonic() + 10
        with selectors.DefaultSelector() as selector:
            selector.register(server, selectors.EVENT_WRITE)
            while len(received) < len(data) and time.monotonic() < deadline:
                with contextlib.suppress(BlockingIOError):
                    received += client.recv(READ_SIZE * 16)
                if rest and selector.select(0.01):
                    rest = send(rest)
        expect(
            bytes(received) == data,
            f"the client got {len(received)} bytes back in 10 s, not the 1 MB sent"
            if len(received) != len(data)
            else "the client got 1 MB, but not in the order it was sent",
        )
    finally:
        server.close()
        client.close()
    return _passed("send_some", 3)


class _StingySocket:
    """A socket whose ``send()`` takes a little at a time, as a nearly full buffer may.

    With a real kernel, a send after the socket was reported writable
    usually takes everything on loopback, which would hide a task that
    drops what ``send()`` did not take.
    """

    def __init__(self, sock: socket.socket, most: int) -> None:
        self._sock, self._most = sock, most

    def send(self, data: bytes, *flags: int) -> int:
        """Send at most :attr:`_most` bytes of *data*; return how many went."""
        return self._sock.send(data[: self._most], *flags)

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


def _drive_echo(
    echo_task: Callable[[socket.socket], object], payload: bytes, timeout: float
) -> tuple[bytes, bool, bool]:
    """Run ``echo_task`` as an event loop would, while a client sends *payload* and reads.

    Return what the client got back, whether the task finished and
    whether it closed its socket. One thread does it all: select() on the
    task's socket for what the task yielded, and on the client's.
    """
    server, client = _tcp_pair()
    client.setblocking(False)
    sock = _StingySocket(server, 1000)
    task = echo_task(sock)
    expect(inspect.isgenerator(task), "echo_task(sock) should be a generator: use yield")
    unsent, echoed = memoryview(payload), bytearray()
    finished, client_done = False, False
    deadline = time.monotonic() + timeout
    try:
        waiting = next(task)
        # Done once the task has finished and the client has seen the end
        # (or never will: the task left its socket open).
        while not (finished and (client_done or server.fileno() != -1)):
            if time.monotonic() > deadline:
                break
            expect(
                isinstance(waiting, tuple)
                and len(waiting) == 2
                and waiting[0] in ("read", "write")
                and waiting[1] is sock,
                f'echo_task should yield ("read", sock) or ("write", sock); it yielded {waiting!r}',
            )
            readers = [client] + ([server] if not finished and waiting[0] == "read" else [])
            writers = ([client] if unsent else []) + (
                [server] if not finished and waiting[0] == "write" else []
            )
            readable, writable, _ = select.select(readers, writers, [], 0.1)
            if client in readable:
                try:
                    data = client.recv(READ_SIZE * 16)
                except ConnectionResetError:
                    data = b""  # closed with our bytes unread: the length check says so
                echoed += data
                client_done = not data
            if client in writable:
                unsent = unsent[client.send(unsent[:READ_SIZE]) :]
                if not unsent:
                    client.shutdown(socket.SHUT_WR)  # as a client ends its side
            if server in readable or server in writable:
                try:
                    waiting = task.send(None)
                except StopIteration:
                    finished = True
        return bytes(echoed), finished, server.fileno() == -1
    finally:
        task.close()
        server.close()
        client.close()


@exercise_check("echo_task")
def check_echo_task(echo_task: Callable[[socket.socket], object]) -> str:
    """Check lesson 05's generator ``echo_task(sock)`` over a real connection.

    Short and long messages, the long one through small buffers, so that
    the kernel takes part of most sends: everything must come back, then
    the task must close its socket and finish once the client ends its side.
    """
    cases = [b"hello\n", _pattern(256 * 1024)]
    for payload in cases:
        echoed, finished, closed = _drive_echo(echo_task, payload, timeout=10)
        size = f"{len(payload)} bytes" if len(payload) < 1024 else f"{len(payload) // 1024} KB"
        expect(
            echoed == payload,
            f"the client sent {size} and got {len(echoed)} bytes back"
            + (" (the same bytes in another order)" if len(echoed) == len(payload) else "")
            + ": keep what send() did not take, and send it once the socket is writable",
        )
        expect(finished, "after the client ended its side, echo_task should return")
        expect(closed, "echo_task should close its socket before it returns")
    return _passed("echo_task", len(cases) * 3)


# --- Lesson 06: the asyncio rewrite --------------------------------------------
#
# The lesson measures a chat with one client that never reads, three times
# (the naive broadcast, the fixed one, chatlib's engine), and the broadcast
# exercise's check measures the learner's the same way: one helper does it.


@dataclass
class StuckClientRun:
    """What a healthy client received while another never read.

    :func:`talk_past_stuck_client` measures it.
    """

    #: When each of the talker's lines reached the listener, in seconds from the first.
    arrivals: list[float]
    #: How many lines the talker sent.
    sent: int
    #: Whether a batch failed to reach the listener within the patience.
    stalled: bool
    #: Whether the listener was told that the stuck client left.
    stuck_left: bool

    @property
    def delivered(self) -> int:
        """Return how many of the talker's lines reached the listener."""
        return len(self.arrivals)


async def _close_writer(writer: asyncio.StreamWriter) -> None:
    """Close a stream writer and wait until it is closed (a reset is as good)."""
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def talk_past_stuck_client(
    address: tuple[str, int],
    *,
    lines: int = 20_000,
    batch: int = 100,
    line_size: int = 400,
    patience: float = 2.0,
) -> StuckClientRun:
    """Talk through a chat server while one client never reads; time what another hears.

    Three clients connect: a listener, which reads and timestamps every
    line; a talker, which sends *lines* lines of *line_size* bytes in
    batches of *batch* (and reads its own lines back, so that it is no slow
    client itself); and a stuck :class:`LineClient` with a small
    ``SO_RCVBUF``, which says one line and never reads. The default sends
    8 MB, about twice what the kernel's buffers take in for the stuck client
    on loopback, so its backlog must end up in the server.

    After each batch the talker waits at most *patience* seconds for the
    listener to have all of it; if it does not, the chat has stalled and
    the run ends. So a run takes at most a few seconds more than the
    server needs to relay everything. Every client is closed on return.
    """
    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as opened:
        # Whatever was opened is closed again, however this ends.
        listener_reader, listener_writer = await asyncio.open_connection(*address)
        opened.push_async_callback(_close_writer, listener_writer)
        talker_reader, talker_writer = await asyncio.open_connection(*address)
        opened.push_async_callback(_close_writer, talker_writer)
        stuck = opened.enter_context(LineClient(address, rcvbuf=4096))
        heard: list[str] = []
        arrivals: list[float] = []
        changed = asyncio.Condition()
        started = loop.time()

        async def listen() -> None:
            framer = LineFramer(CLIENT_MAX_LINE)
            with contextlib.suppress(ConnectionError):
                while data := await listener_reader.read(READ_SIZE):
                    framer.feed(data)
                    now = loop.time() - started
                    async with changed:
                        while (line := framer.next_line()) is not None:
                            heard.append(line)
                            if "> talk " in line:
                                arrivals.append(now)
                        changed.notify_all()

        async def discard_own_lines() -> None:
            with contextlib.suppress(ConnectionError):
                while await talker_reader.read(READ_SIZE):
                    pass

        async def listener_has(condition: Callable[[], bool]) -> bool:
            async def wait() -> None:
                async with changed:
                    await changed.wait_for(condition)

            try:
                await asyncio.wait_for(wait(), patience)
            except TimeoutError:
                return False
            return True

        tasks = [asyncio.create_task(listen()), asyncio.create_task(discard_own_lines())]
        sent = 0
        stalled = False
        try:
            # Once the listener hears the stuck client, the server has it in the room.
            stuck.send_line("stuck here")
            if not await listener_has(lambda: any(line.endswith("> stuck here") for line in heard)):
                raise TimeoutError(f"the server at {address} never relayed a line")
            started = loop.time()
            while sent < lines and not stalled:
                count = min(batch, lines - sent)
                talker_writer.write(
                    b"".join(
                        encode_line(f"talk {sent + n:06d} ".ljust(line_size - 1, "."))
                        for n in range(count)
                    )
                )
                sent += count
                try:
                    await asyncio.wait_for(talker_writer.drain(), patience)
                except TimeoutError:
                    stalled = True
                    break
                stalled = not await listener_has(lambda sent=sent: len(arrivals) >= sent)
            stuck_line = next(line for line in heard if line.endswith("> stuck here"))
            stuck_name = parse_server_line(stuck_line).name
            stuck_left = any(
                parse_notice(line.removeprefix("*** ")) == ("left", {"name": stuck_name})
                for line in heard
            )
            return StuckClientRun(list(arrivals), sent, stalled, stuck_left)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


@exercise_check("ask")
async def check_ask(ask: Callable[[tuple[str, int], str, str], Awaitable[str]]) -> str:
    """Check lesson 06's ``ask(address, name, text)`` against chatlib's asyncio engine.

    A witness in the room must hear each asker's line, and then hear the
    asker leave: ``ask`` closes its client before it returns.
    """
    from chatlib.engines.asyncio import ChatServer

    cases = [("erin", "anyone?"), ("frank", "me too"), ("gina", "<b>bold</b> & plain")]
    async with ChatServer("127.0.0.1", 0, limits=Limits(rate=0)) as server:
        witness = await aio_client.connect(*server.address, name="witness")
        try:
            for name, text in cases:
                try:
                    got = await asyncio.wait_for(ask(server.address, name, text), 10)
                except TimeoutError:
                    raise CheckFailed(
                        f"ask(address, {name!r}, {text!r}) did not return within 10 s"
                    ) from None
                expected = f"<{name}> {text}"
                expect(
                    got == expected,
                    f"ask(address, {name!r}, {text!r}) should return {expected!r};"
                    f" it returned {got!r}",
                )
                left = f"*** {format_notice('left', name=name, reason='')}"
                expect(
                    await _hears(witness, left, 5),
                    f"after ask(address, {name!r}, ...) returned, {name} was still connected:"
                    " close the client before returning",
                )
        finally:
            await witness.close()
    return _passed("ask", 2 * len(cases))


async def _hears(client: aio_client.AsyncChatClient, expected: str, timeout: float) -> bool:
    """Return whether *client* receives the line *expected* within *timeout* seconds."""

    async def read() -> bool:
        while (line := await client.receive_line()) is not None:
            if line == expected:
                return True
        return False

    try:
        return await asyncio.wait_for(read(), timeout)
    except TimeoutError:
        return False


class _BroadcastRoom:
    """The lesson's chat room, saying everything with the learner's ``broadcast``.

    What the learner's code raises is kept in :attr:`errors` for the check
    to report: raised in a client's handler, it would only be logged.
    """

    def __init__(self, broadcast: Callable[[set, bytes, int], object], sendq: int) -> None:
        self.broadcast = broadcast
        self.sendq = sendq
        self.writers: set[asyncio.StreamWriter] = set()
        self.errors: list[Exception] = []
        self._names = itertools.count(1)

    def say(self, text: str) -> None:
        try:
            self.broadcast(self.writers, encode_line(text), self.sendq)
        except Exception as error:  # the learner's, reported by the check
            self.errors.append(error)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        name = f"guest{next(self._names)}"
        self.writers.add(writer)
        self.say(f"*** {format_notice('joined', name=name)}")
        try:
            while raw := await reader.readline():
                self.say(f"<{name}> {_decode_line(raw)}")
        except (ConnectionError, ValueError):  # reset, or a line past the limit
            pass
        finally:
            self.writers.discard(writer)
            writer.close()
            self.say(f"*** {format_notice('left', name=name, reason='')}")

    def close(self) -> None:
        for writer in list(self.writers):
            writer.transport.abort()


def _decode_line(raw: bytes) -> str:
    """Return one line as ``readline()`` gave it, decoded and safe to show."""
    return sanitize(raw.decode("utf-8", errors="replace").rstrip("\r\n"))


@contextlib.asynccontextmanager
async def _backlogged_writer(backlog: int) -> AsyncIterator[asyncio.StreamWriter]:
    """Yield a stream writer on 127.0.0.1 whose peer never reads, *backlog* bytes behind.

    Small kernel buffers on both ends keep nearly all of the backlog in the
    transport, where ``get_write_buffer_size()`` counts it.
    """
    ours, peer = _tcp_pair()
    _, writer = await asyncio.open_connection(sock=ours)
    writer.write(b"x" * backlog)
    try:
        yield writer
    finally:
        writer.transport.abort()
        peer.close()


@exercise_check("broadcast")
async def check_stream_broadcast(broadcast: Callable[[set, bytes, int], object]) -> str:
    """Check lesson 06's ``broadcast(writers, data, sendq)`` in a real server.

    A room that says everything through it serves three clients, one of
    which never reads (:func:`talk_past_stuck_client`): the others must get
    every line without a stall, and the stuck one must be dropped.
    """
    expect(
        not inspect.iscoroutinefunction(broadcast),
        "broadcast should be a plain function (def, not async def): it must never wait",
    )
    sendq = 256 * 1024
    nobody: set[asyncio.StreamWriter] = set()
    broadcast(nobody, b"hello\n", sendq)  # an empty room: nothing to do, nothing to fail
    async with _backlogged_writer(sendq) as behind:
        size = behind.transport.get_write_buffer_size()
        writers = {behind}
        broadcast(writers, b"hello\n", 2 * size)
        expect(
            writers == {behind} and not behind.transport.is_closing(),
            f"a writer {size} bytes behind was dropped although sendq was {2 * size}:"
            " drop only a writer more than sendq bytes behind",
        )
        expect(
            behind.transport.get_write_buffer_size() == size + len(b"hello\n"),
            "broadcast should write data to a writer that is not too far behind",
        )
        broadcast(writers, b"hello\n", size // 2)
        expect(
            not writers and behind.transport.is_closing(),
            f"a writer {size} bytes behind should be aborted and removed from writers when"
            f" sendq is {size // 2}; writers still holds {len(writers)}, and its transport"
            f" is {'closing' if behind.transport.is_closing() else 'open'}",
        )
    room = _BroadcastRoom(broadcast, sendq)
    server = await asyncio.start_server(room.handle, "127.0.0.1", 0, limit=Limits().max_line + 2)
    try:
        run = await talk_past_stuck_client(server.sockets[0].getsockname()[:2])
    except TimeoutError:
        run = None
    finally:
        server.close()
        room.close()
        await server.wait_closed()
    if room.errors:
        raise room.errors[0]
    expect(
        run is not None,
        "nobody in the room received a line within 2 s: broadcast should write data to every"
        " writer in writers",
    )
    expect(
        not run.stalled,
        f"with a client that never reads, the others got only {run.delivered} of the"
        f" {run.sent} lines sent, then nothing for 2 s: the broadcast stalled",
    )
    expect(
        run.delivered == run.sent,
        f"a client that reads got {run.delivered} of the {run.sent} lines sent",
    )
    expect(
        run.stuck_left,
        f"a client that never read was still in the room after {run.sent} lines: drop a"
        f" client once its transport holds more than sendq ({sendq}) bytes",
    )
    return _passed("broadcast", 7)


@contextlib.asynccontextmanager
async def _loopback_streams() -> AsyncIterator[tuple[asyncio.StreamWriter, asyncio.StreamReader]]:
    """Yield a writer and the reader at the other end of one TCP connection on 127.0.0.1.

    The kernel's buffers are small on both ends, so that a backlog of a
    few hundred kilobytes stays in the writer's transport if nobody reads.
    """
    ours, peer = _tcp_pair()
    _, writer = await asyncio.open_connection(sock=ours)
    reader, peer_writer = await asyncio.open_connection(sock=peer)
    try:
        yield writer, reader
    finally:
        writer.transport.abort()
        peer_writer.transport.abort()


@exercise_check("send_queued")
async def check_send_queued(
    send_queued: Callable[[asyncio.StreamWriter, asyncio.Queue], Awaitable[None]],
) -> str:
    """Check lesson 06's ``send_queued(writer, queue)`` on real connections.

    It must write the queued lines in order, close the connection on
    ``None`` (the peer reads everything, then the end of the stream), and
    wait with ``drain()``: with a peer that never reads it must not take
    the whole queue at once.
    """
    async with _loopback_streams() as (writer, reader):
        queue: asyncio.Queue = asyncio.Queue()
        for line in (b"one\n", b"two\n"):
            queue.put_nowait(line)
        sending = asyncio.create_task(send_queued(writer, queue))
        await asyncio.sleep(0)  # it takes what is queued, then waits for more
        if sending.done():
            sending.result()  # what it raised, the decorator reports
            raise CheckFailed("send_queued returned before it was given None")
        for item in (b"three\n", None):
            queue.put_nowait(item)
        try:
            received = await asyncio.wait_for(reader.read(), 5)  # up to the end of the stream
        except TimeoutError:
            received = None
        finally:
            await asyncio.wait([sending], timeout=5)
            returned = sending.done()
            if not returned:
                sending.cancel()  # still running: the checks below say so
                await asyncio.gather(sending, return_exceptions=True)
        if returned:
            sending.result()  # what it raised, the decorator reports
        expect(
            received is not None,
            "after None the other end did not see the connection close within 5 s: on None,"
            " close the writer (writer.close(), then await writer.wait_closed()) and return",
        )
        expect(
            received == b"one\ntwo\nthree\n",
            f"the other end received {received!r}, not b'one\\ntwo\\nthree\\n'",
        )
        expect(returned, "send_queued did not return within 5 s after it was given None")
    async with _loopback_streams() as (writer, _):
        queue = asyncio.Queue()
        for _ in range(8):
            queue.put_nowait(b"x" * (256 * 1024))
        sending = asyncio.create_task(send_queued(writer, queue))
        for _ in range(10):
            await asyncio.sleep(0)  # turns of the loop, for it to take what it will
        taken = 8 - queue.qsize()
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        expect(
            taken <= 2,
            f"with a peer that never reads, send_queued took {taken} of 8 items of 256 KB at"
            " once: after each write, await writer.drain(), so that it waits for this client",
        )
    return _passed("send_queued", 4)


def _panel_lines() -> list[str]:
    """Return every line two clients of a real server received in a short chat.

    alice and bob say things a panel must show as text (markup, a fake
    notice), act, whisper, and get an error and the server's notices.
    """
    from chatlib.server import create_server

    said = [
        "hello <b>bob</b> & co",
        "<img src=x onerror=alert(1)>",
        "*** not really a notice",
        "\"quoted\" and 'single'",
        "/me waves <i>wildly</i>",
        "/msg bob psst <script>alert(1)</script>",
        "/nosuchcommand",
    ]
    with create_server("threads", "127.0.0.1", 0, limits=Limits(rate=0)) as server:
        alice, bob = LineClient(server.address), LineClient(server.address)
        with alice, bob:
            for client, name in ((alice, "alice"), (bob, "bob")):
                client.send_line(f"/nick {name}")
                client.read_until(lambda line, name=name: line.endswith(f"known as {name}."))
            for line in said:
                alice.send_line(line)
            alice.send_line("the end")
            alice.read_until("<alice> the end")
            bob.read_until("<alice> the end")
            return list(dict.fromkeys(alice.received + bob.received))  # each line once


@exercise_check("classify")
def check_classify(classify: Callable[[str], tuple[str, str | None, str]]) -> str:
    """Check lesson 07's ``classify(raw)`` against ``parse_server_line``, on real lines.

    The lines come from a real server (see :func:`_panel_lines`), with one
    the server never sends, which is ``"other"``.
    """
    from chatlib.protocol import parse_server_line

    lines = [*_panel_lines(), "plain words, from nobody"]
    for raw in lines:
        line = parse_server_line(raw)
        expected = (line.kind, line.name, line.text)
        got = classify(raw)
        expect(
            got is not None and tuple(got) == expected,
            f"the panel sorts {raw!r} as {expected!r}; classify gave {got!r}",
        )
    return _passed("classify", len(lines))


class _Markup(HTMLParser):
    """Collect the tags and the text a browser would make of some HTML."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.ends: list[str] = []
        self.text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))

    def handle_endtag(self, tag: str) -> None:
        self.ends.append(tag)

    def handle_data(self, data: str) -> None:
        self.text += data


@exercise_check("line_html")
def check_line_html(line_html: Callable[[str], str]) -> str:
    """Check lesson 07's ``line_html(raw)`` on real lines, markup and all.

    Each answer is parsed as a browser would: it must be one ``div``, with
    the classes the panel gives the line's kind, whose text is the line
    exactly as it came. No tag or attribute may come from the line itself.
    """
    from chatlib.protocol import parse_server_line
    from chatlib.widget import LINE_CLASSES

    lines = _panel_lines()
    for raw in lines:
        got = line_html(raw)
        expect(isinstance(got, str), f"line_html({raw!r}) should give a str, not {got!r}")
        page = _Markup()
        page.feed(got)
        page.close()
        expect(
            [tag for tag, _ in page.tags] == ["div"] and page.ends == ["div"],
            f"line_html({raw!r}) should give one <div>...</div> and no other tag; in {got!r}"
            f" a browser finds the tags {[tag for tag, _ in page.tags]}",
        )
        attrs = dict(page.tags[0][1])
        wanted = {"chat-line", *LINE_CLASSES[parse_server_line(raw).kind].split()}
        classes = set((attrs.get("class") or "").split())
        expect(
            list(attrs) == ["class"] and wanted <= classes,
            f"the div for {raw!r} should have just a class attribute, with the classes"
            f" {sorted(wanted)}; line_html gave {got!r}",
        )
        expect(
            page.text == raw,
            f"a browser should show {raw!r} exactly as it came; from {got!r} it shows"
            f" {page.text!r}",
        )
    return _passed("line_html", len(lines))


@exercise_check("percentile")
def check_percentile(percentile: Callable[[list[float], float], float]) -> str:
    """Check lesson 08's ``percentile(samples, fraction)``, the benchmark's definition.

    The sample at index ``int(fraction * n)`` of the *n* samples sorted,
    the last one if that is past the end, and NaN for no samples at all;
    the caller's list must come back as it was.
    """
    hundred = [float(n) for n in range(100, 0, -1)]  # 100.0 down to 1.0
    cases = [
        ([5.0, 1.0, 4.0, 2.0, 3.0], 0.5, 3.0),
        (hundred, 0.5, 51.0),
        (hundred, 0.99, 100.0),
        (hundred, 0.0, 1.0),
        (hundred, 1.0, 100.0),
        ([0.25, 9.0], 0.5, 9.0),
        ([7.5], 0.99, 7.5),
    ]
    for samples, fraction, expected in cases:
        before = list(samples)
        got = percentile(samples, fraction)
        shown = samples if len(samples) < 10 else "100.0, 99.0, ... 1.0"
        expect(
            got == expected,
            f"percentile([{shown}], {fraction}) should give {expected}; it gave {got!r}",
        )
        expect(
            samples == before,
            "percentile changed the list it was given (sorted it in place?): sort a copy,"
            " the caller may still need the samples in the order they came",
        )
    got = percentile([], 0.5)
    expect(
        isinstance(got, float) and math.isnan(got),
        f"with no samples there is no percentile: percentile([], 0.5) should give"
        f" float('nan'), not {got!r}",
    )
    return _passed("percentile", len(cases) + 1)


def _chat_of_four() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Chat on a real server, everyone there from the first line to the last.

    Return what each sender said and what each client received, notices
    and all. Nothing may be lost: every client should have every line.
    """
    from chatlib.server import create_server

    sent = {"alice": ["hi", "hi", "anyone?"], "bob": ["yes", "me"], "carol": ["and me"]}
    names = ("alice", "bob", "carol", "dave")
    with create_server("threads", "127.0.0.1", 0, limits=Limits(rate=0)) as server:
        clients = {name: LineClient(server.address) for name in names}
        try:
            for name, client in clients.items():
                client.send_line(f"/nick {name}")
            # dave came last: whoever hears him take his name was there before him.
            for client in clients.values():
                client.read_until(lambda line: line.endswith(" is now known as dave."))
            for name, texts in sent.items():
                for text in texts:
                    clients[name].send_line(text)
                    for client in clients.values():
                        client.read_until(f"<{name}> {text}")
        finally:
            for client in clients.values():
                client.close()
    return sent, {name: client.received for name, client in clients.items()}


def _copies_lost(sent: dict[str, list[str]], received: dict[str, list[str]]) -> int:
    said = Counter(f"<{name}> {text}" for name, texts in sent.items() for text in texts)
    lost = 0
    for lines in received.values():
        got = Counter(lines)
        lost += sum(max(0, count - got[line]) for line, count in said.items())
    return lost


@exercise_check("lost_copies")
def check_lost_copies(lost_copies: Callable[[dict, dict], int]) -> str:
    """Check lesson 08's ``lost_copies(sent, received)`` on a real chat and two made up."""
    sent, received = _chat_of_four()
    cases = [
        (
            f"in a real chat, {sent} was said with everyone there, and each client"
            " received every line (notices besides).",
            sent,
            received,
        ),
        (
            "alice said hi, then bye; bob got hi twice and never got bye.",
            {"alice": ["hi", "bye"]},
            {
                "alice": ["<alice> hi", "<alice> bye"],
                "bob": ["*** alice joined.", "<alice> hi", "<alice> hi"],
            },
        ),
        ("nobody said anything.", {}, {"alice": ["*** Welcome to chatlib, alice!"]}),
    ]
    for what, sent, received in cases:
        expected = _copies_lost(sent, received)
        got = lost_copies(sent, received)
        expect(
            got == expected,
            f"{what} So {expected} copies never arrived; lost_copies gave {got!r}",
        )
    return _passed("lost_copies", len(cases))


def _live_children() -> set[int]:
    """Return the ids of this process's children that still run (Linux only)."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # pid (command) state ppid ...; the command may hold spaces.
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
            if int(ppid) == os.getpid() and state != "Z":
                children.add(int(stat.parent.name))
    return children


@exercise_check("measure")
def check_measure(measure: Callable[[str, int], object]) -> str:
    """Check lesson 08's ``measure(name, clients)`` by running it: 60 clients on selectors."""
    from chatlib.bench import FanoutResult

    before = _live_children()
    result = measure("selectors", 60)
    expect(
        isinstance(result, FanoutResult),
        f"measure should return what run_fanout returned, a FanoutResult; it gave {result!r}",
    )
    got = (result.server, result.clients, result.senders, result.mode)
    expect(
        got == ("selectors", 60, 5, "typing"),
        "measure('selectors', 60) should run a typing fan-out (one line in flight per sender)"
        f" of 60 clients, 5 of them typing, on selectors; it ran {result.mode} with"
        f" {result.clients} clients, {result.senders} typing, on {result.server}",
    )
    expect(result.lost == 0, f"{result.lost} copies were lost: that is a bug somewhere")
    left = _live_children() - before
    expect(
        not left,
        f"the server's process (pid {sorted(left)}) still runs: stop the server before"
        " returning (a with block does it)",
    )
    return _passed("measure", 4)


@exercise_check("audience")
def check_audience(audience: Callable[[dict[str, list[str]], str, str], Iterable[str]]) -> str:
    """Check lesson 09's ``audience(rooms, sender, line)`` against a real Chat.

    Each case starts a fresh chat: alice and bob in #maths, carol in #art,
    dave and erin in #lobby. The sender types one line, and whoever is sent
    anything at all because of it is its audience.
    """
    layout = {"alice": "#maths", "bob": "#maths", "carol": "#art", "dave": None, "erin": None}
    cases = [
        ("alice", "anyone for sums?"),
        ("dave", "hello lobby"),
        ("bob", "/me waves"),
        ("alice", "/msg carol psst"),
        ("carol", "/msg carol a note to self"),
        ("bob", "/who"),
        ("dave", "/rooms"),
        ("bob", "/join #art"),
        ("dave", "/join #maths"),
        ("erin", "/join #music"),
        ("carol", "/part"),
    ]
    for sender, line in cases:
        chat = Chat(Limits(rate=0))
        people = {}
        for name, room in layout.items():
            conn = people[name] = chat.connect((name, 0), 0.0)
            chat.receive_data(conn, encode_line(f"/nick {name}"), 0.0)
            if room:
                chat.receive_data(conn, encode_line(f"/join {room}"), 0.0)
        rooms = chat.rooms
        chat.take_ready()
        for conn in people.values():
            conn.data_to_send()  # the welcomes and joins: not this line's audience
        chat.receive_data(people[sender], encode_line(line), 0.0)
        chat.take_ready()
        heard = {name for name, conn in people.items() if conn.data_to_send()}
        got = audience({room: list(names) for room, names in rooms.items()}, sender, line)
        expect(
            got is not None,
            f"audience should return a set of names; when {sender} types {line!r} it gave None",
        )
        got = set(got)
        expect(
            got == heard,
            f"in {rooms}, when {sender} types {line!r}, the real chat sends something to"
            f" {sorted(heard)}; audience gave {sorted(got)}",
        )
    return _passed("audience", len(cases))


@exercise_check("Ring")
def check_ring(make_ring: Callable[[int], object]) -> str:
    """Check lesson 09's ``Ring(kept)``: ``add(line)`` and ``recent(count)``, oldest first."""
    ring = make_ring(3)
    got = ring.recent(5)
    expect(got == [], f"an empty ring has no recent lines: recent(5) should give [], not {got!r}")
    for line in "abcde":
        ring.add(line)
    cases = [
        (2, ["d", "e"], "the last 2, oldest first"),
        (3, ["c", "d", "e"], "the last 3, oldest first"),
        (10, ["c", "d", "e"], "only the last 3: a ring of 3 keeps no more"),
        (0, [], "nothing (mind that lines[-0:] is all of them)"),
    ]
    for count, expected, why in cases:
        got = ring.recent(count)
        expect(
            got == expected,
            f"after adding a, b, c, d, e to Ring(3), recent({count}) should give {expected!r},"
            f" {why}; it gave {got!r}",
        )
    one = make_ring(1)
    one.add("old")
    one.add("new")
    got = one.recent(1)
    expect(got == ["new"], f"Ring(1) keeps the newest line: recent(1) gave {got!r}, not ['new']")
    return _passed("Ring", len(cases) + 2)


@exercise_check("recent_from_file")
def check_recent_from_file(recent_from_file: Callable[[str, str, int], list[str]]) -> str:
    """Check lesson 09's ``recent_from_file(path, room, count)`` on a store made for it.

    The store is a real :class:`~chatlib.sqlite_history.SQLiteHistory`,
    written, committed and closed, in a temporary directory; the function
    reads it with nothing but ``sqlite3``.
    """
    with tempfile.TemporaryDirectory() as directory:
        path = str(Path(directory) / "chat.db")
        store = SQLiteHistory(path)
        for n in range(30):
            store.add("#maths", f"<alice> sum {n}")
            if n % 3 == 0:
                store.add("#art", f"<carol> sketch {n}")
        store.close()
        cases = [
            ("#maths", 5, [f"<alice> sum {n}" for n in range(25, 30)]),
            ("#art", 20, [f"<carol> sketch {n}" for n in range(0, 30, 3)]),
            ("#maths", 1, ["<alice> sum 29"]),
            ("#music", 5, []),
        ]
        for room, count, expected in cases:
            got = recent_from_file(path, room, count)
            expect(
                got == expected,
                f"recent_from_file(path, {room!r}, {count}) should give {expected!r}; it gave"
                f" {got!r}",
            )
    return _passed("recent_from_file", len(cases))


# --- Lesson 10: several servers, one chat, on Redis ----------------------------
#
# The lesson runs servers that share a Redis (chatlib.cluster), breaks the
# rule that gives everyone one order (LocalFirstChat), and counts how often
# clients on two servers then disagree (speak_at_once). Its two checks run
# the learner's code on transcripts from real servers and against a real
# Chat's gap check.


class NotInstalled(RuntimeError):
    """Something a lesson needs is missing; the message says how to install it."""

    def _render_traceback_(self) -> list[str]:
        # One line in the notebook, not a traceback: the learner has one thing to do.
        return [str(self)]


class LocalFirstChat(Chat):
    """A chat that shows its own clients' messages at once: the wrong way, for lesson 10.

    :class:`~chatlib.chat.Chat` delivers even its own clients' messages
    only as they come back from the broker, so that every server delivers
    them in the broker's one order. This one queues a message for its own
    clients as soon as it is said, then publishes it for the others, and
    skips it when it comes back: each server then shows its own clients'
    lines first. It overrides two of the chat's private methods, as an
    experiment may; give a server one with :func:`deliver_locally_first`.
    """

    def _relay(self, room: Room, line: str) -> None:
        if not self._linked:
            super()._relay(room, line)
            return
        self._broadcast_here(room, line)
        self._keep(room.key, line)
        self._publish("line", room.key, room=room.key, text=line, history=True, skip=None)

    def _on_line(self, origin: str, event: dict) -> None:
        if origin == self.cluster.origin and event["history"]:
            return  # one of our messages: delivered (and kept) when it was said
        super()._on_line(origin, event)


def deliver_locally_first(server: ServerBase) -> ServerBase:
    """Give *server* a :class:`LocalFirstChat` in place of its chat; return the server.

    *server* must have been made with a broker (``create_server(...,
    broker=URL)``) and not be started yet: the engine only looks its chat
    up once it runs.
    """
    if server.chat.cluster is None or server.running:
        raise ValueError("deliver_locally_first needs a server made with a broker, not started")
    chat = server.chat
    server.chat = LocalFirstChat(chat.limits, chat.store, chat.cluster)
    return server


def join_as(server: ServerBase, name: str, timeout: float = 10.0) -> LineClient:
    """Connect a client to *server*, name it *name*, and return it once the rename is back.

    On a server linked to others the rename, as every line for a room, is
    delivered only when it comes back from the broker: then the others
    know the name too.
    """
    client = LineClient(server.address)
    client.send_line(f"/nick {name}")
    client.read_until(lambda line: line.endswith(f" is now known as {name}."), timeout)
    return client


def online(client: LineClient, timeout: float = 5.0) -> str:
    """Send ``/who`` from *client* and return the answer, the ``*** Online (N): ...`` line."""
    client.send_line("/who")
    return client.read_until(lambda line: line.startswith("*** Online ("), timeout)[-1]


def speak_at_once(
    first: LineClient, second: LineClient, trials: int, timeout: float = 5.0
) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """Have two clients in one room each say a line at the same moment, *trials* times.

    In trial *n*, *first* says ``trial n`` and *second* ``trial n too``,
    one right after the other, before either hears anything back; then each
    reads until it has seen both lines. Return, for each trial, the two
    lines in the order *first* saw them and in the order *second* did.
    Raises :class:`TimeoutError` if a line does not come within *timeout*.
    """
    views = []
    for trial in range(trials):
        first.send_line(f"trial {trial}")
        second.send_line(f"trial {trial} too")
        ends = (f"> trial {trial}", f"> trial {trial} too")
        views.append((_read_both(first, ends, timeout), _read_both(second, ends, timeout)))
    return views


def _read_both(client: LineClient, ends: tuple[str, str], timeout: float) -> tuple[str, str]:
    """Read until *client* has seen the two messages ending in *ends*; return them as seen."""
    deadline = time.monotonic() + timeout
    seen = []
    while len(seen) < 2:
        line = client.read_line(max(0.0, deadline - time.monotonic()))
        if line is None:
            raise EOFError(f"the server closed the connection before {ends} came")
        if line.startswith("<") and line.endswith(ends):
            seen.append(line)
    return seen[0], seen[1]


def _same_order(transcript_a: list[str], transcript_b: list[str]) -> bool:
    both = set(transcript_a) & set(transcript_b)
    return [line for line in transcript_a if line in both] == [
        line for line in transcript_b if line in both
    ]


@contextlib.contextmanager
def two_linked_servers(
    local_first: bool, names: tuple[str, str] = ("alice", "bob")
) -> Iterator[tuple[LineClient, LineClient]]:
    """Run a Redis and two servers on it (selectors, asyncio); yield two clients, one on each.

    The clients are called *names*; with *local_first*, both servers deliver
    as a :class:`LocalFirstChat` does. Everything stops when the ``with`` block ends.
    """
    from chatlib.bench.servers import start_server

    with start_server("redis") as redis:
        url = f"redis://{redis.host}:{redis.port}/0"
        servers = []
        try:
            for engine in ("selectors", "asyncio"):
                server = create_server(engine, "127.0.0.1", 0, Limits(rate=0), broker=url)
                if local_first:
                    deliver_locally_first(server)
                servers.append(server.start())
            expect(
                wait_until(
                    lambda: all(len(server.chat.cluster.peers) == 1 for server in servers), 10
                ),
                "two servers on one Redis did not hear of each other within 10 s",
            )
            with join_as(servers[0], names[0]) as first, join_as(servers[1], names[1]) as second:
                yield first, second
        finally:
            for server in servers:
                server.stop()


@exercise_check("same_order")
def check_same_order(same_order: Callable[[list[str], list[str]], bool]) -> str:
    """Check lesson 10's ``same_order(transcript_a, transcript_b)``.

    First on transcripts made up to show one thing each, then on those of
    two clients on two real servers on one Redis, in the chat's broker
    order and with each server delivering its own lines first.
    """
    cases = [
        (["<a> 1", "<b> 2", "<a> 3"], ["<a> 1", "<b> 2", "<a> 3"], "the same lines, in order"),
        (["<a> 2", "<b> 1"], ["<b> 1", "<a> 2"], "the same two lines, the other way round"),
        (
            ["*** Welcome, a!", "<a> 1", "<b> 2", "-> *b* psst"],
            ["*** Welcome, b!", "<a> 1", "*a* psst", "<b> 2"],
            "each saw lines the other did not; the two both saw came in one order",
        ),
        (["<a> 1", "<b> 2", "<c> 3"], ["<a> 1", "<c> 3"], "one saw a line fewer, in order"),
        (["<a> 1", "<x> 0", "<b> 2"], ["<b> 2", "<y> 0", "<a> 1"], "in between, other lines"),
        ([], ["<a> 1"], "one saw nothing at all"),
    ]
    for transcript_a, transcript_b, what in cases:
        expected = _same_order(transcript_a, transcript_b)
        got = same_order(transcript_a, transcript_b)
        expect(
            got == expected,
            f"same_order({transcript_a!r}, {transcript_b!r}) ({what}) should be {expected};"
            f" it gave {got!r}",
        )
    for local_first, how in ((False, "in the broker's order"), (True, "each server's own first")):
        with two_linked_servers(local_first) as (alice, bob):
            speak_at_once(alice, bob, 5)
            transcripts = alice.received, bob.received
        expected = _same_order(*transcripts)
        expect(
            expected or local_first,
            f"alice's and bob's transcripts disagreed in the broker's order: that is a bug in"
            f" chatlib, not in same_order; alice saw {transcripts[0]!r}, bob {transcripts[1]!r}",
        )
        got = same_order(*transcripts)
        expect(
            got == expected,
            f"alice and bob on two servers, lines delivered {how}: alice saw {transcripts[0]!r}"
            f" and bob {transcripts[1]!r}, so same_order should be {expected}; it gave {got!r}",
        )
    return _passed("same_order", len(cases) + 2)


class _Outbox:
    """A broker that keeps what a chat publishes, for a chat without a network."""

    def __init__(self) -> None:
        self.published: list[tuple[str | None, bytes | None]] = []

    def publish(self, messages: list[tuple[str | None, bytes | None]]) -> None:
        self.published.extend(messages)


def _lost_by_chat(events: list[tuple[str, int]]) -> dict[str, int]:
    """Return how many events of each origin a real Chat counts lost, given *events* in order."""
    lost = {}
    for origin in dict.fromkeys(origin for origin, _ in events):
        chat = Chat(Limits(rate=0), cluster=Cluster("00000000", _Outbox()))
        chat.broker_connected({}, 0.0)
        for sender, seq in events:
            if sender == origin:
                chat.receive_broker_message(encode_event(sender, seq, "alive", {}), 0.0)
        lost[origin] = chat.cluster.lost
    return lost


@exercise_check("missing")
def check_missing(missing: Callable[[list[tuple[str, int]]], dict[str, int]]) -> str:
    """Check lesson 10's ``missing(events)`` against a real Chat's gap check.

    Each case's events go, in order, to a :class:`~chatlib.chat.Chat` linked
    to a broker that is only a list; what it counts in ``cluster.lost`` for
    each origin is the answer.
    """
    a, b = "7f3a9c01", "c4d2e8b6"
    cases = [
        ([(a, 1), (a, 2), (a, 3)], "nothing lost"),
        ([(a, 1), (a, 2), (a, 5), (a, 6)], "3 and 4 never came"),
        ([(a, 1), (b, 1), (a, 3), (b, 4), (a, 4)], "two servers, each with its own numbers"),
        ([(a, 7), (a, 8), (a, 10)], "a server first heard at 7: what came before is not lost"),
        ([(a, 1), (a, 2), (a, 2), (a, 1), (a, 3)], "2 and 1 again: replays, not gaps"),
        ([], "no events"),
    ]
    for events, what in cases:
        expected = _lost_by_chat(events)
        got = missing(list(events))
        expect(
            got is not None and dict(got) == expected,
            f"missing({events!r}) ({what}) should give {expected!r}, as the chat counts;"
            f" it gave {got!r}",
        )
    return _passed("missing", len(cases))


def _renamed_by_chat(holders: dict[str, list[str]]) -> set[tuple[str, str]]:
    """Return the ``(server id, name)`` of each user that real Chats rename when they link.

    Each server of *holders* gets a :class:`~chatlib.chat.Chat` of its own,
    with its users; it links, and hears of the other servers' users as
    they announce themselves. The users told of a collision are renamed.
    """
    renamed = set()
    for origin, names in holders.items():
        chat = Chat(Limits(rate=0), cluster=Cluster(origin, _Outbox()))
        users = {}
        for name in names:
            users[name] = chat.connect((name, 0), 0.0)
            chat.receive_data(users[name], encode_line(f"/nick {name}"), 0.0)
        chat.broker_connected({}, 0.0)
        for other, their_names in holders.items():
            for seq, name in enumerate(their_names if other != origin else [], 1):
                member = {"name": name, "room_name": LOBBY}
                chat.receive_broker_message(encode_event(other, seq, "member", member), 0.0)
        chat.take_ready()
        for name, conn in users.items():
            for line in conn.data_to_send().decode().splitlines():
                notice = parse_notice(line.removeprefix("*** "))
                if notice is not None and notice[0] == "collision":
                    renamed.add((origin, name))
    return renamed


@exercise_check("give_way")
def check_give_way(give_way: Callable[[dict[str, list[str]]], Iterable[tuple[str, str]]]) -> str:
    """Check lesson 10's ``give_way(holders)`` against real Chats that link after a split."""
    a, b, c = "3c1d9a02", "3c1d9a10", "e07f5b44"
    cases = [
        ({a: ["erin", "bob"], b: ["erin"]}, "one name on two servers"),
        ({b: ["Erin"], a: ["ERIN"]}, "two spellings of one name, the later id listed first"),
        ({c: ["alice"], a: ["a1ice", "zoe"], b: ["zoe"]}, "a1ice looks like alice"),
        ({a: ["alice"], b: ["bob"], c: ["carol"]}, "no name twice"),
        ({c: ["dave"], b: ["dave"], a: ["dave"]}, "one name on three servers"),
    ]
    for holders, what in cases:
        expected = _renamed_by_chat(holders)
        got = give_way({origin: list(names) for origin, names in holders.items()})
        expect(
            got is not None and set(got) == expected,
            f"give_way({holders!r}) ({what}): the servers rename {sorted(expected)};"
            f" give_way gave {got!r}",
        )
    return _passed("give_way", len(cases))
