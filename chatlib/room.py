"""The chat room, without any I/O: who is here, who gets what, and when to close.

A :class:`Room` holds one :class:`Connection` per client. An engine (threads,
selectors or asyncio) owns the sockets and carries out what the room decides,
mechanically:

1. tell the room what happened: :meth:`Room.connect` for a new client,
   :meth:`Room.receive_data` for bytes read, :meth:`Room.receive_eof` when
   the client ended its side, :meth:`Room.deadline_reached` when a
   connection's :attr:`~Connection.deadline` is due, and
   :meth:`Room.connection_lost` when its socket fails;
2. after each call, take the connections with news from
   :meth:`Room.take_ready` (until it returns none) and act on each as its
   :attr:`~Connection.state` says (see :data:`LIFECYCLE`): write out
   :meth:`Connection.data_to_send` and report with :meth:`Room.data_unsent`
   what the kernel did not take; once a ``CLOSING`` connection has nothing
   left to write, end our side of the stream and call :meth:`Room.eof_sent`;
   close a ``CLOSED`` one (abortively if :attr:`~Connection.cut_off`) and
   forget it: the room has forgotten it already;
3. read from a connection only while :attr:`Connection.reading` is true.

The room never blocks and never reads a clock: callers pass ``now``. It is
not thread-safe; a threaded engine calls it under one lock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from chatlib.protocol import (
    CLIENT_MAX_LINE,
    COMMANDS,
    Command,
    LineFramer,
    encode_line,
    format_notice,
    name_problem,
    parse_command,
)

__all__ = ["LIFECYCLE", "LINGER", "Connection", "Limits", "Room", "State"]

#: How long a leaving client has, from the moment it leaves the room, to read
#: its last lines (its goodbye) and end its side before it is cut off. It
#: also bounds how long stopping a server takes.
LINGER = 1.0


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
    """Where a connection is in its life; :data:`LIFECYCLE` says how it moves."""

    #: In the room. Read its lines (while :attr:`Connection.reading`), write
    #: what is queued.
    OPEN = "open"
    #: Out of the room, saying goodbye. Write what is queued, then end our
    #: side of the stream (``SHUT_WR``) and call :meth:`Room.eof_sent`.
    #: Read and drop what the client still sends.
    CLOSING = "closing"
    #: Our side has ended. Read and drop what the client sends until it ends
    #: its side too, or the deadline passes.
    DRAINING = "draining"
    #: Close the socket now: abortively (a reset) if
    #: :attr:`Connection.cut_off`, so that nothing unsent lingers in the kernel.
    CLOSED = "closed"


#: The life of a connection, as data: for each state, the events that move it
#: on and where they take it. Every change of state goes through this table,
#: and docs/engines.md draws its diagram from it.
#:
#: - *leave*: ``/quit``, its end of stream, a full room, the server shutting down;
#: - *our side ended*: the engine wrote everything and sent its end of stream;
#: - *both sides ended*: ours, and the client's;
#: - *cut off*: a reset, the send queue exceeded, or the deadline passed.
LIFECYCLE: dict[State, dict[str, State]] = {
    State.OPEN: {"leave": State.CLOSING, "cut off": State.CLOSED},
    State.CLOSING: {
        "our side ended": State.DRAINING,
        "both sides ended": State.CLOSED,
        "cut off": State.CLOSED,
    },
    State.DRAINING: {"both sides ended": State.CLOSED, "cut off": State.CLOSED},
    State.CLOSED: {},
}


class Connection:
    """One client's side of the room: its name, its input, its output queue.

    Engines read :attr:`state`, :attr:`deadline`, :attr:`reading` and
    :attr:`cut_off`, and call :meth:`data_to_send`; everything else is the
    room's business.
    """

    __slots__ = (
        "_framer",
        "_outgoing",
        "_overlong_reported",
        "_peer_eof",
        "_queued",
        "_tokens",
        "_tokens_at",
        "_unsent",
        "_warned_flood",
        "cut_off",
        "deadline",
        "name",
        "peer",
        "state",
    )

    def __init__(self, room: Room, peer: object, name: str) -> None:
        #: Whatever the engine passed to :meth:`Room.connect`, for its logs.
        self.peer = peer
        #: The client's current name in the room.
        self.name = name
        #: See :class:`State`.
        self.state = State.OPEN
        #: When to call :meth:`Room.deadline_reached`, or ``None``. While the
        #: connection is ``OPEN`` it means the client is over its flood budget
        #: (and :attr:`reading` is false); once it leaves, it is when the
        #: client is cut off if it has not ended its side.
        self.deadline: float | None = None
        #: Whether a ``CLOSED`` connection ended without a clean goodbye: the
        #: engine closes it with a reset, so the kernel keeps nothing for it.
        self.cut_off = False
        self._framer = LineFramer(room.limits.max_line)
        self._overlong_reported = 0
        self._peer_eof = False
        self._outgoing: list[bytes] = []
        self._queued = 0  # bytes in _outgoing
        self._unsent = 0  # bytes the engine took and the kernel has not yet
        self._tokens = float(room.limits.burst)
        self._tokens_at: float | None = None  # when _tokens was last topped up
        self._warned_flood = False

    @property
    def reading(self) -> bool:
        """Return whether the engine should read from this connection now.

        Not after the client's end of stream (a level-triggered selector
        would report it readable forever), not while it is over its flood
        budget (TCP then pushes back on it), and not once it is closed. A
        leaving client is read, and what it sends is dropped: closing a
        socket with input unread makes the kernel send a reset, which can
        destroy the goodbye before the client has read it.
        """
        if self._peer_eof or self.state is State.CLOSED:
            return False
        return self.state is not State.OPEN or self.deadline is None

    def data_to_send(self) -> bytes:
        """Return everything queued for this client and empty the queue.

        All lines queued since the last call come out as one ``bytes``, so
        an engine writes a client's whole backlog with one system call.
        Then tell the room with :meth:`Room.data_unsent` how much of it the
        kernel did not take, and take more only once that is written.
        """
        data = b"".join(self._outgoing)
        self._outgoing.clear()
        self._queued = 0
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
        # Connections past their send queue, dropped once the fan-out that
        # pushed them over is done (Redis's CLIENT_CLOSE_ASAP): a drop tells
        # the others, and telling them inside the fan-out would re-enter it.
        self._over_limit: dict[Connection, None] = {}
        self._guest_number = 0

    # --- Public methods -------------------------------------------------

    def connect(self, peer: object, now: float) -> Connection:
        """Let a new client in and return its connection.

        When the room is full, the connection comes back ``CLOSING`` with
        a line saying so: the engine sends it and closes, as for any other.
        """
        conn = Connection(self, peer, self._new_guest_name())
        if len(self._members) >= self.limits.max_clients:
            self._send(conn, f"*** Sorry, the server is full ({self.limits.max_clients} clients).")
            self._move(conn, "leave", now)
        else:
            self._broadcast("*** " + format_notice("joined", name=conn.name))
            self._members[conn.name.casefold()] = conn
            self._send(conn, "*** " + format_notice("welcome", name=conn.name))
            self._send_members(conn)
        self._drop_over_limit()
        return conn

    def receive_data(self, conn: Connection, data: bytes, now: float) -> None:
        """Handle *data* read from *conn*'s socket at time *now* (seconds).

        A connection that is leaving has its input dropped.
        """
        if conn.state is State.OPEN:
            conn._framer.feed(data)
            self._process(conn, now)
            self._drop_over_limit()

    def receive_eof(self, conn: Connection, now: float) -> None:
        """Handle the client ending its sending side (``recv()`` gave ``b""``).

        Lines it sent before are still handled, a final line without a
        newline included; then the client leaves and its connection is
        ``CLOSING`` (a half-closed client still reads the answers to them).
        """
        if conn.state is State.CLOSED:
            return
        conn._peer_eof = True
        self._ready[conn] = None  # reading has stopped
        if conn.state is State.OPEN:
            self._process(conn, now)
        elif conn.state is State.DRAINING:
            self._move(conn, "both sides ended")
        self._drop_over_limit()

    def data_unsent(self, conn: Connection, size: int) -> None:
        """Record that *size* bytes the engine took still wait for the kernel.

        Call it after each write with what is left (0 once everything is
        written). The send queue limit counts these bytes and those still
        queued in the room: it is about what a client leaves unread, so a
        client whose writes the kernel takes in full is never dropped,
        however much one turn sent it.
        """
        conn._unsent = size
        if size and conn.state is not State.CLOSED:
            self._check_send_queue(conn)
            self._drop_over_limit()

    def eof_sent(self, conn: Connection) -> None:
        """Record that the engine wrote everything and ended our side of the stream."""
        if conn.state is State.CLOSING:
            self._move(conn, "both sides ended" if conn._peer_eof else "our side ended")

    def deadline_reached(self, conn: Connection, now: float) -> None:
        """Act on *conn*'s :attr:`~Connection.deadline`, which is due at *now*.

        An early or stale call does nothing, so an engine need not cancel
        the timers it set for deadlines that have moved since.
        """
        if conn.deadline is None or conn.deadline > now:
            return
        if conn.state is State.OPEN:
            self._process(conn, now)  # the flood budget has refilled
        else:
            self._move(conn, "cut off")
        self._drop_over_limit()

    def connection_lost(self, conn: Connection) -> None:
        """Handle *conn*'s socket failing: a reset, a broken pipe, a transport lost.

        The connection is cut off (``CLOSED``) and the engine closes it as
        any other. Once a connection is ``CLOSED`` this does nothing.
        """
        if conn.state is not State.CLOSED:
            self._cut_off(conn)
            self._drop_over_limit()

    def shut_down(self, now: float) -> None:
        """Say goodbye to everyone: every member becomes ``CLOSING``."""
        leaving = list(self._members.values())
        self._members.clear()  # nobody is told about the others leaving
        for conn in leaving:
            self._send(conn, "*** The server is shutting down. Bye!")
            self._move(conn, "leave", now)
        self._drop_over_limit()

    def take_ready(self) -> list[Connection]:
        """Return the connections with news since the last call, once each.

        News is output queued, a change of state, or a change of deadline.
        Act on each connection returned (see the module's docstring), then
        call this again: acting on one may give news to others.
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
        if conn.deadline is not None:
            conn.deadline = None
            self._ready[conn] = None  # reading resumes
        while conn.state is State.OPEN and framer.has_line():
            if not self._take_token(conn, now):
                return
            line = framer.next_line()
            self._report_overlong(conn)
            if line is not None and line.strip():
                self._dispatch(conn, parse_command(line), now)
        self._report_overlong(conn)  # an endless line shows up before its end
        if conn._peer_eof and conn.state is State.OPEN:
            last_line = framer.finish()
            self._report_overlong(conn)
            if last_line and last_line.strip():
                self._dispatch(conn, parse_command(last_line), now)
            if conn.state is State.OPEN:
                self._leave(conn, now)

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
        conn.deadline = now + (1 - conn._tokens) / rate
        self._ready[conn] = None  # reading stops until then
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

    def _dispatch(self, conn: Connection, command: Command, now: float) -> None:
        if command.name == "quit":
            # The only command that changes the connection's life, so the
            # only one that needs the time (its deadline to leave).
            self._send(conn, f"*** Bye, {conn.name}!")
            self._leave(conn, now)
            return
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

    def _send_usage(self, conn: Connection, command: str) -> None:
        usage, meaning = COMMANDS[command]
        self._send(conn, f"!!! Usage: {usage} ({meaning}).")

    def _send_members(self, conn: Connection) -> None:
        names = self.members
        # Cut a long list short, so that the line stays within what chatlib's
        # clients accept: past about 1,900 members it would not.
        budget = CLIENT_MAX_LINE - len(
            "*** " + format_notice("members", count=len(names), names="", more="")
        )
        budget -= len(f" (and {len(names)} more)")
        shown, size = [], 0
        for name in names:
            size += len(name.encode()) + 2  # and ", "
            if size > budget:
                break
            shown.append(name)
        more = f" (and {len(names) - len(shown)} more)" if len(shown) < len(names) else ""
        notice = format_notice("members", count=len(names), names=", ".join(shown), more=more)
        self._send(conn, "*** " + notice)

    def _leave(self, conn: Connection, now: float, reason: str = "") -> None:
        """Take *conn* out of the room to say goodbye, and tell the others."""
        del self._members[conn.name.casefold()]
        self._move(conn, "leave", now)
        self._broadcast("*** " + format_notice("left", name=conn.name, reason=reason))

    def _cut_off(self, conn: Connection, reason: str = "") -> None:
        """End *conn* at once, without a goodbye; tell the others if it was in the room."""
        was_member = self._members.get(conn.name.casefold()) is conn
        if was_member:
            del self._members[conn.name.casefold()]
        conn.data_to_send()  # nobody will read it
        conn._unsent = 0
        self._move(conn, "cut off")
        if was_member:
            self._broadcast("*** " + format_notice("left", name=conn.name, reason=reason))

    def _move(self, conn: Connection, event: str, now: float | None = None) -> None:
        """Move *conn* on through :data:`LIFECYCLE`; its engine acts on the new state."""
        conn.state = LIFECYCLE[conn.state][event]
        if conn.state is State.CLOSING:
            # One deadline for the whole way out: writing the goodbye (which
            # a client that does not read would hold up forever) and draining.
            conn.deadline = now + LINGER
        elif conn.state is State.CLOSED:
            conn.deadline = None
            conn.cut_off = event == "cut off"
        self._ready[conn] = None

    def _send(self, conn: Connection, text: str) -> None:
        self._queue([conn], encode_line(text))

    def _broadcast(self, text: str) -> None:
        # Encode once, queue the same bytes object for everyone: the cost
        # per receiver is one list append.
        self._queue(list(self._members.values()), encode_line(text))

    def _queue(self, conns: list[Connection], data: bytes) -> None:
        size = len(data)
        for conn in conns:
            conn._outgoing.append(data)
            conn._queued += size
            if conn._unsent:
                # The kernel is not taking what it has: this may be a client
                # that does not read. (Whatever is queued for one that does
                # leaves at the end of this turn.)
                self._check_send_queue(conn)
        self._ready.update(dict.fromkeys(conns))

    def _check_send_queue(self, conn: Connection) -> None:
        if conn._unsent + conn._queued > self.limits.sendq:
            self._over_limit[conn] = None

    def _drop_over_limit(self) -> None:
        """Drop the clients past their send queue, now that no fan-out is running.

        Each drop tells the others, which may push more clients over: the
        loop takes them too, with no recursion however many there are.
        """
        while self._over_limit:
            conn = next(iter(self._over_limit))
            del self._over_limit[conn]
            if conn.state is not State.CLOSED:
                # A client that does not read must not make the server hold an
                # ever-growing backlog: drop it, as IRC's "SendQ exceeded" does.
                self._cut_off(conn, " (send queue exceeded)")
