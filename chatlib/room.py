"""The chat room, without any I/O: who is here, and who gets what.

A :class:`Room` holds one :class:`Connection` per client. An engine (threads,
selectors or asyncio) owns the sockets and does three things only:

1. tell the room what happened: :meth:`Room.connect` for a new client,
   :meth:`Room.receive_data` for bytes read, :meth:`Room.receive_eof` when
   the client closed its side, :meth:`Room.connection_lost` once the socket
   is closed;
2. after each call, take the connections that have something new with
   :meth:`Room.take_ready`, and for each write out
   :meth:`Connection.data_to_send` — or close it at once if its
   :attr:`~Connection.state` is ``CLOSED``, or once everything is written
   if it is ``CLOSING``;
3. stop reading from a connection while :attr:`Connection.resume_at` is
   set, and call :meth:`Room.resume` at that time (flood control).

The room never blocks and never reads a clock: callers pass ``now``.
It is not thread-safe; a threaded engine calls it under one lock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from chatlib.protocol import (
    COMMANDS,
    Command,
    LineFramer,
    encode_line,
    format_notice,
    name_problem,
    parse_command,
)

__all__ = ["Connection", "Limits", "Room", "State"]


def _limit(default: float, help: str) -> Any:
    """Declare a limit with its default and the help ``--help`` shows for it."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Limits:
    """The limits that keep one client from hurting the others.

    Every engine takes its limits from here, and ``python -m chatlib.server``
    makes one option of each field (``max_line`` becomes ``--max-line``).
    ``docs/protocol.md`` explains where each default comes from.
    """

    max_clients: int = _limit(100, "clients at once; one more is told the server is full")
    # IRC's lines are 512 bytes (RFC 1459, section 2.3).
    max_line: int = _limit(
        512, "longest line in bytes, without its ending; longer ones are refused"
    )
    # IRC servers drop clients past 100 KB to 1 MiB ("SendQ exceeded"): we take the top.
    sendq: int = _limit(
        1024 * 1024, "bytes queued for a client that does not read before it is dropped"
    )
    # IRC servers allow about a burst of five to ten lines, then one or two a second.
    rate: float = _limit(
        2.0, "lines a second per client after the burst; 0 turns flood control off"
    )
    burst: int = _limit(10, "lines a client may send at once before --rate applies")

    def __post_init__(self) -> None:
        """Refuse limits that would make the server useless; raise ValueError."""
        for name in ("max_clients", "max_line", "sendq", "burst"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.rate < 0:
            raise ValueError(f"rate must be 0 (no flood control) or more, not {self.rate}")
        if self.sendq < self.max_line:
            # Then one line of one client, sent to everyone, drops everyone.
            raise ValueError(f"sendq ({self.sendq}) must be at least max_line ({self.max_line})")


class State(enum.Enum):
    """Where a connection is in its life."""

    #: In the room: sending and receiving.
    OPEN = "open"
    #: Out of the room. Write what is queued, then close the socket.
    CLOSING = "closing"
    #: Out of the room, and nothing more will be written. Close now.
    CLOSED = "closed"


class Connection:
    """One client's side of the room: its name, its input, its output queue.

    Engines read :attr:`state` and :attr:`resume_at` and call
    :meth:`data_to_send`; everything else is the room's business.
    """

    def __init__(self, room: Room, peer: object, name: str) -> None:
        #: Whatever the engine passed to :meth:`Room.connect`, for its logs.
        self.peer = peer
        #: The client's current name in the room.
        self.name = name
        #: See :class:`State`.
        self.state = State.OPEN
        #: While set, the client is over its flood budget: read nothing
        #: more from it and call :meth:`Room.resume` at this time.
        self.resume_at: float | None = None
        self._framer = LineFramer(room.limits.max_line)
        self._overlong_reported = 0
        self._eof = False
        self._outgoing: list[bytes] = []
        self._outgoing_size = 0
        self._tokens = float(room.limits.burst)
        self._tokens_at: float | None = None  # when _tokens was last topped up
        self._warned_flood = False

    def data_to_send(self) -> bytes:
        """Return everything queued for this client and empty the queue.

        All lines queued since the last call come out as one ``bytes``, so
        an engine writes a client's whole backlog with one system call.
        Take more only once the previous data is fully written: the room
        counts only what it still holds against the client's send queue.
        """
        data = b"".join(self._outgoing)
        self._outgoing.clear()
        self._outgoing_size = 0
        return data

    def __repr__(self) -> str:
        return f"<Connection {self.name} {self.state.name}>"


class Room:
    """Everyone connected to one server, and the rules of the chat."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        # casefold()ed name -> connection: names are unique ignoring case.
        self._members: dict[str, Connection] = {}
        self._ready: dict[Connection, None] = {}  # an ordered set
        self._guest_number = 0

    # --- Public methods -------------------------------------------------

    def connect(self, peer: object) -> Connection:
        """Let a new client in and return its connection.

        When the room is full, the connection comes back ``CLOSING`` with
        a line saying so: the engine sends it and closes, as for any other.
        """
        conn = Connection(self, peer, self._new_guest_name())
        if len(self._members) >= self.limits.max_clients:
            conn.state = State.CLOSING
            self._send(conn, f"*** Sorry, the server is full ({self.limits.max_clients} clients).")
            return conn
        self._broadcast("*** " + format_notice("joined", name=conn.name))
        self._members[conn.name.casefold()] = conn
        self._send(conn, "*** " + format_notice("welcome", name=conn.name))
        self._send_members(conn)
        return conn

    def receive_data(self, conn: Connection, data: bytes, now: float) -> None:
        """Handle *data* read from *conn*'s socket at time *now* (seconds)."""
        if conn.state is State.OPEN:
            conn._framer.feed(data)
            self._process(conn, now)

    def receive_eof(self, conn: Connection, now: float) -> None:
        """Handle the client closing its sending side (``recv()`` gave ``b""``).

        Lines it sent before are still handled, a final line without a
        newline included; then the client leaves and its connection is
        ``CLOSING`` (a half-closed client may still read the goodbye).
        """
        conn._eof = True
        if conn.state is State.OPEN:
            self._process(conn, now)

    def resume(self, conn: Connection, now: float) -> None:
        """Go on with *conn*'s lines once :attr:`Connection.resume_at` is due."""
        if conn.state is State.OPEN:
            self._process(conn, now)

    def connection_lost(self, conn: Connection) -> None:
        """Forget *conn*; call it once its socket is closed, for any reason."""
        if conn.state is State.OPEN:
            self._leave(conn, State.CLOSED)
        conn.state = State.CLOSED
        conn.data_to_send()
        self._ready.pop(conn, None)

    def shut_down(self) -> None:
        """Say goodbye to everyone: all connections become ``CLOSING``."""
        for conn in list(self._members.values()):
            self._send(conn, "*** The server is shutting down. Bye!")
            del self._members[conn.name.casefold()]
            conn.state = State.CLOSING

    def take_ready(self) -> list[Connection]:
        """Return the connections with new output or a new state, once each.

        Call it after every other call and act on each connection returned:
        close it if it is ``CLOSED``; otherwise write its
        :meth:`~Connection.data_to_send` (and close it afterwards if it is
        ``CLOSING``).
        """
        ready = list(self._ready)
        self._ready.clear()
        return ready

    @property
    def members(self) -> list[str]:
        """Return the names of everyone in the room, in order of arrival."""
        return [conn.name for conn in self._members.values()]

    # --- Private methods ------------------------------------------------

    def _process(self, conn: Connection, now: float) -> None:
        """Handle *conn*'s complete lines as far as its flood budget allows."""
        framer = conn._framer
        conn.resume_at = None
        while conn.state is State.OPEN and framer.has_line():
            if not self._take_token(conn, now):
                return
            line = framer.next_line()
            self._report_overlong(conn)
            if line is not None and line.strip():
                self._dispatch(conn, parse_command(line))
        self._report_overlong(conn)  # an endless line shows up before its end
        if conn._eof and conn.state is State.OPEN:
            last_line = framer.finish()
            self._report_overlong(conn)
            if last_line and last_line.strip():
                self._dispatch(conn, parse_command(last_line))
            if conn.state is State.OPEN:
                self._leave(conn, State.CLOSING)

    def _report_overlong(self, conn: Connection) -> None:
        if conn._framer.overlong > conn._overlong_reported:
            conn._overlong_reported = conn._framer.overlong
            limit = self.limits.max_line
            self._send(conn, f"!!! Line too long (the limit is {limit} bytes); it was not sent.")

    def _take_token(self, conn: Connection, now: float) -> bool:
        """Spend one line of *conn*'s flood budget (a token bucket)."""
        rate, burst = self.limits.rate, self.limits.burst
        if rate <= 0:
            return True
        if conn._tokens_at is not None:
            conn._tokens = min(burst, conn._tokens + (now - conn._tokens_at) * rate)
        conn._tokens_at = now
        if conn._tokens >= 1:
            conn._tokens -= 1
            if conn._tokens >= burst - 1:
                conn._warned_flood = False
            return True
        conn.resume_at = now + (1 - conn._tokens) / rate
        if not conn._warned_flood:
            conn._warned_flood = True
            self._send(
                conn,
                f"*** Slow down: over {rate:g} lines a second, your lines are delayed.",
            )
        return False

    def _new_guest_name(self) -> str:
        while True:
            self._guest_number += 1
            name = f"guest{self._guest_number}"
            if name not in self._members:  # someone may have picked it
                return name

    def _dispatch(self, conn: Connection, command: Command) -> None:
        known = command.name == "say" or command.name in COMMANDS
        handler = getattr(self, "_do_" + command.name) if known else None
        if handler is None:
            self._send(conn, f"!!! Unknown command /{command.name}. Type /help for the list.")
        else:
            handler(conn, command.args)

    def _do_say(self, conn: Connection, text: str) -> None:
        self._broadcast(f"<{conn.name}> {text}")

    def _do_me(self, conn: Connection, action: str) -> None:
        if not action:
            self._send_usage(conn, "me")
        else:
            self._broadcast(f"* {conn.name} {action}")

    def _do_msg(self, conn: Connection, args: str) -> None:
        name, _, text = args.partition(" ")
        text = text.strip()
        if not name or not text:
            self._send_usage(conn, "msg")
        elif (target := self._members.get(name.casefold())) is None:
            self._send(conn, f"!!! Nobody here is called {name}.")
        else:
            self._send(target, f"*{conn.name}* {text}")
            if target is not conn:
                self._send(conn, f"-> *{target.name}* {text}")

    def _do_nick(self, conn: Connection, name: str) -> None:
        if not name:
            self._send_usage(conn, "nick")
        elif problem := name_problem(name):
            self._send(conn, f"!!! {problem} Your name is still {conn.name}.")
        elif name.casefold() in self._members and self._members[name.casefold()] is not conn:
            self._send(conn, f"!!! The name {name} is taken. Your name is still {conn.name}.")
        elif name != conn.name:
            old = conn.name
            conn.name = name
            # Rebuild rather than delete and insert: /who keeps arrival order.
            self._members = {member.name.casefold(): member for member in self._members.values()}
            self._broadcast("*** " + format_notice("renamed", old=old, name=name))

    def _do_who(self, conn: Connection, args: str) -> None:
        self._send_members(conn)

    def _do_help(self, conn: Connection, args: str) -> None:
        self._send(conn, "*** Type a line to say it to everyone. Commands:")
        for usage, meaning in COMMANDS.values():
            self._send(conn, f"***   {usage:<16} {meaning}")
        self._send(conn, "***   (start a message with // to say something that starts with /)")

    def _do_quit(self, conn: Connection, args: str) -> None:
        self._send(conn, f"*** Bye, {conn.name}!")
        self._leave(conn, State.CLOSING)

    def _send_usage(self, conn: Connection, command: str) -> None:
        usage, meaning = COMMANDS[command]
        self._send(conn, f"!!! Usage: {usage} ({meaning}).")

    def _send_members(self, conn: Connection) -> None:
        names = self.members
        notice = format_notice("members", count=len(names), names=", ".join(names))
        self._send(conn, "*** " + notice)

    def _leave(self, conn: Connection, state: State, reason: str = "") -> None:
        """Take *conn* out of the room, tell the others, set its *state*."""
        del self._members[conn.name.casefold()]
        conn.state = state
        conn.resume_at = None  # nothing more will be read from it
        self._ready[conn] = None
        self._broadcast("*** " + format_notice("left", name=conn.name, reason=reason))

    def _send(self, conn: Connection, text: str) -> None:
        self._queue([conn], encode_line(text))

    def _broadcast(self, text: str) -> None:
        # Encode once, queue the same bytes object for everyone: the cost
        # per receiver is one list append.
        self._queue(list(self._members.values()), encode_line(text))

    def _queue(self, conns: list[Connection], data: bytes) -> None:
        size = len(data)
        sendq = self.limits.sendq
        over = []
        for conn in conns:
            conn._outgoing.append(data)
            conn._outgoing_size += size
            if conn._outgoing_size > sendq:
                over.append(conn)
        self._ready.update(dict.fromkeys(conns))
        for conn in over:
            # A client that does not read must not make the server hold an
            # ever-growing backlog: drop it, as IRC's "SendQ exceeded" does.
            conn.data_to_send()
            if conn.state is State.OPEN:
                self._leave(conn, State.CLOSED, " (send queue exceeded)")
            conn.state = State.CLOSED
