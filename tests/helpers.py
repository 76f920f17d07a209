"""Test helpers: a condition waiter, a raw line client, a room driven in memory, the tools.

Nothing here sleeps for a guessed time: waiting is always for a condition, with a deadline,
so a broken server makes a test fail (after the deadline) instead of hang or pass by luck.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType

from chatlib.chat import Chat, Connection, Limits, State
from chatlib.history import HistoryStore
from chatlib.protocol import parse_notice, parse_server_line, split_member

#: The repository: the folder that holds chatlib/, tests/ and tools/.
ROOT = Path(__file__).resolve().parent.parent

#: How long a test waits for a line it expects. Generous: the machine is shared, and a
#: deadline only bounds how long a failing test takes, never how long a passing one does.
TIMEOUT = 10.0

#: Code points that must never reach a client: C0 controls (the ``\n`` ending is cut off
#: before the check), DEL, C1 controls, and the bidirectional overrides, isolates and marks
#: behind "Trojan Source" (CVE-2021-42574), and the separators some displays break lines at.
FORBIDDEN = frozenset(
    [
        *range(0x00, 0x20),
        0x7F,
        *range(0x80, 0xA0),
        *range(0x202A, 0x202F),
        *range(0x2066, 0x206A),
        0x200E,
        0x200F,
        0x2028,  # the line and paragraph separators
        0x2029,
    ]
)


def wait_until(predicate: Callable[[], object], timeout: float = TIMEOUT, what: str = "") -> None:
    """Return as soon as *predicate()* is true; fail if it is still false after *timeout*."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(0.01)


def _names(listed: str) -> list[str]:
    """Return the names in a member list, without the servers a cluster gives (alice@1f0a)."""
    return [split_member(entry)[0] for entry in listed.split(", ")] if listed else []


def forbidden_in(text: str) -> list[str]:
    """Return the forbidden code points in *text*, as ``U+XXXX`` strings."""
    return [f"U+{ord(c):04X}" for c in text if ord(c) in FORBIDDEN]


def decode_line(raw: bytes) -> str:
    """Decode one received line strictly and check it is safe to print; return it."""
    line = raw.decode("utf-8")  # strict: invalid UTF-8 from the server fails the test here
    bad = forbidden_in(line)
    assert not bad, f"server sent control or bidi characters {bad} in {line!r}"
    return line


def count_fds() -> int:
    """Return how many file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    """Return this process's resident set size in bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --- A raw client over TCP, as nc would be ---------------------------------


class ConnectionClosed(AssertionError):
    """The server closed the connection while the test expected a line."""


class LineClient:
    """A raw TCP client that reads whole lines, each decoded strictly and checked.

    Every line received is kept in :attr:`received`. Reads wait at most *timeout* seconds.
    """

    def __init__(
        self,
        address: tuple[str, int],
        *,
        rcvbuf: int | None = None,
        timeout: float = TIMEOUT,
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Set before connect() so the window the server sees is small from the start.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        # Every send() becomes its own packet: lines split across sends reach the server split.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(address)
        except OSError:
            self.sock.close()  # a server that resets at once can fail the connect itself
            raise
        self.timeout = timeout
        self.received: list[str] = []
        self.name: str | None = None
        self.eof = False
        self._pending = bytearray()

    # Sending

    def send(self, data: bytes | str) -> None:
        """Send *data* as it is (no line ending added)."""
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def say(self, *lines: str) -> None:
        """Send each of *lines* with a ``\\n`` ending, all in one packet."""
        self.send("".join(line + "\n" for line in lines))

    # Receiving

    def read_line(self, timeout: float | None = None) -> str:
        """Return the next line (without its ``\\n``); fail on timeout or EOF."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            end = self._pending.find(b"\n")
            if end >= 0:
                raw = bytes(self._pending[:end])
                del self._pending[: end + 1]
                line = decode_line(raw)
                self.received.append(line)
                return line
            if self.eof:
                raise ConnectionClosed(f"{self.name}: connection closed; last lines {self.tail()}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{self.name}: no complete line in time; got {self.tail()}")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            finally:
                self.sock.settimeout(self.timeout)
            if not data:
                self.eof = True
            self._pending += data

    def read_until(
        self, predicate: Callable[[str], object], timeout: float | None = None
    ) -> list[str]:
        """Read lines up to and including the first one *predicate* accepts; return them all."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        lines = []
        while True:
            line = self.read_line(max(0.0, deadline - time.monotonic()))
            lines.append(line)
            if predicate(line):
                return lines

    def expect(self, line: str, timeout: float | None = None) -> list[str]:
        """Read until exactly *line* arrives; return the lines read (it last)."""
        return self.read_until(lambda got: got == line, timeout)

    def expect_notice(self, event: str, **fields: str) -> list[str]:
        """Read until a ``***`` notice of *event* with these *fields* arrives."""

        def matches(line: str) -> bool:
            parsed = parse_server_line(line)
            notice = parse_notice(parsed.text) if parsed.kind == "notice" else None
            return notice is not None and notice[0] == event and fields.items() <= notice[1].items()

        return self.read_until(matches)

    def read_to_eof(self, timeout: float | None = None, cut_off_ok: bool = False) -> list[str]:
        """Read every line until the server closes; return them.

        A final line without ``\\n`` or a connection reset fails the test, unless
        *cut_off_ok*: a client the server drops may be cut off mid-line or reset.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        lines = []
        while True:
            try:
                lines.append(self.read_line(max(0.0, deadline - time.monotonic())))
            except ConnectionClosed:
                assert cut_off_ok or not self._pending, f"unterminated {bytes(self._pending)!r}"
                return lines
            except ConnectionResetError:
                if not cut_off_ok:
                    raise
                return lines

    def welcome(self) -> str:
        """Read the welcome and the lobby's member list; remember and return the guest name."""
        line = self.read_line()
        notice = parse_notice(parse_server_line(line).text)
        assert notice is not None and notice[0] == "welcome", f"not a welcome: {line!r}"
        self.name = notice[1]["name"]
        members = parse_notice(parse_server_line(self.read_line()).text)
        assert members is not None and members[0] == "entered"
        assert members[1]["room"] == "#lobby"
        assert self.name in _names(members[1]["names"])
        return self.name

    def who(self) -> list[str]:
        """Ask for ``/who`` and return the names listed, in the server's order."""
        self.say("/who")
        line = self.read_until(lambda got: got.startswith("*** Online ("))[-1]
        _, fields = parse_notice(parse_server_line(line).text)
        names = _names(fields["names"])
        assert int(fields["count"]) == len(names)
        return names

    def messages(self, lines: Iterable[str] | None = None) -> list[str]:
        """Return the chat lines (``<name> text``) among *lines* (default: all received)."""
        return [line for line in (self.received if lines is None else lines) if line[:1] == "<"]

    def tail(self, count: int = 5) -> list[str]:
        return self.received[-count:]

    # Ending

    def half_close(self) -> None:
        """Close the sending side only, as nc does on Ctrl-D."""
        self.sock.shutdown(socket.SHUT_WR)

    def reset(self) -> None:
        """Close with a TCP reset (RST) instead of a clean FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


# --- The room in memory, h11 style -------------------------------------------


class ChatDriver:
    """Drive a :class:`Chat` as an engine would, with a fake clock and no sockets.

    After every call it acts on the ready connections exactly as the module docstring of
    :mod:`chatlib.chat` tells engines to, and collects what each would be sent into
    :attr:`inbox` (decoded strictly, checked for controls). Connections in :attr:`stalled`
    stand for clients that do not read: the first backlog they are given stays unsent, and
    they are given nothing more until :meth:`release`.
    """

    def __init__(self, store: HistoryStore | None = None, **limits: object) -> None:
        self.chat = Chat(Limits(**limits), store)
        self.now = 0.0
        self.inbox: dict[Connection, list[str]] = {}
        self.stalled: set[Connection] = set()
        #: What a stalled connection took and has not sent.
        self.unsent: dict[Connection, bytes] = {}
        #: How each connection the engine has ended went: "our side ended" once its EOF is
        #: sent, then "closed" or "cut off".
        self.ended: dict[Connection, str] = {}

    def connect(self, peer: object = None) -> Connection:
        conn = self.chat.connect(peer, self.now)
        self.inbox[conn] = []
        self._collect()
        return conn

    def send(self, conn: Connection, data: bytes | str) -> None:
        self.chat.receive_data(conn, data.encode() if isinstance(data, str) else data, self.now)
        self._collect()

    def say(self, conn: Connection, *lines: str) -> None:
        self.send(conn, "".join(line + "\n" for line in lines))

    def eof(self, conn: Connection) -> None:
        self.chat.receive_eof(conn, self.now)
        self._collect()

    def deadline_reached(self, conn: Connection) -> None:
        """Tell the room that *conn*'s deadline is due (at the driver's :attr:`now`)."""
        self.chat.deadline_reached(conn, self.now)
        self._collect()

    def release(self, conn: Connection) -> None:
        """Let a stalled connection read again: its unsent backlog is delivered."""
        self.stalled.discard(conn)
        self._deliver(conn, self.unsent.pop(conn, b""))
        self.chat.data_unsent(conn, 0)
        self._collect()

    def lose(self, conn: Connection) -> None:
        self.chat.connection_lost(conn)
        self._collect()

    def shut_down(self) -> None:
        self.chat.shut_down(self.now)
        self._collect()

    def take(self, conn: Connection) -> list[str]:
        """Return the lines *conn* received since the last call, and forget them."""
        lines, self.inbox[conn] = self.inbox[conn], []
        return lines

    def take_all(self) -> dict[Connection, list[str]]:
        return {conn: self.take(conn) for conn in self.inbox}

    def _collect(self) -> None:
        while ready := self.chat.take_ready():
            for conn in ready:
                self._act_on(conn)

    def _act_on(self, conn: Connection) -> None:
        if conn.state is State.CLOSED:
            assert conn.data_to_send() == b"", "a CLOSED connection still has data"
            self.ended[conn] = "cut off" if conn.cut_off else "closed"
            self.unsent.pop(conn, None)
            return
        if conn in self.stalled:
            if conn not in self.unsent:
                self.unsent[conn] = conn.data_to_send()
                self.chat.data_unsent(conn, len(self.unsent[conn]))
            return
        self._deliver(conn, conn.data_to_send())
        self.chat.data_unsent(conn, 0)
        if conn.state is State.CLOSING:
            self.ended[conn] = "our side ended"
            self.chat.eof_sent(conn)

    def _deliver(self, conn: Connection, data: bytes) -> None:
        if data:
            assert data.endswith(b"\n")
            self.inbox[conn].extend(decode_line(raw) for raw in data[:-1].split(b"\n"))


def load_tool(name: str) -> ModuleType:
    """Import ``tools/NAME.py``, a script rather than a package, for its tests."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
