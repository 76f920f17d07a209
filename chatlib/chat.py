"""The chat, without any I/O: who is here, in which room, who gets what, and when to close.

A :class:`Chat` holds one :class:`Connection` per client, and the
:class:`Room` each is in. An engine (threads,
selectors or asyncio) owns the sockets and carries out what the chat decides,
mechanically:

1. tell the chat what happened: :meth:`Chat.connect` for a new client,
   :meth:`Chat.receive_data` for bytes read, :meth:`Chat.receive_eof` when
   the client ended its side, :meth:`Chat.deadline_reached` when a
   connection's :attr:`~Connection.deadline` is due, and
   :meth:`Chat.connection_lost` when its socket fails;
2. after each call, take the connections with news from
   :meth:`Chat.take_ready` (until it returns none) and act on each as its
   :attr:`~Connection.state` says (see :data:`LIFECYCLE`): write out
   :meth:`Connection.data_to_send` and report with :meth:`Chat.data_unsent`
   what the kernel did not take; once a ``CLOSING`` connection has nothing
   left to write, end our side of the stream and call :meth:`Chat.eof_sent`;
   close a ``CLOSED`` one (abortively if :attr:`~Connection.cut_off`) and
   forget it: the chat has forgotten it already;
3. read from a connection only while :attr:`Connection.reading` is true.

A chat that is one of several servers (see :mod:`chatlib.cluster`) is also
told what its link to the broker says: :meth:`Chat.broker_connected`,
:meth:`Chat.receive_broker_messages`, :meth:`Chat.broker_lost` and
:meth:`Chat.broker_tick`; it hands the link its events in
:meth:`Chat.take_ready`, and the engine acts on the connections as above.

The chat never blocks and never reads a clock: callers pass ``now``. It is
not thread-safe; a threaded engine calls it under one lock.
"""

from __future__ import annotations

import enum
import ipaddress
import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Any

from chatlib.cluster import TAG_LENGTH, Cluster, Peer, decode_event, history_id
from chatlib.history import HISTORY_KEPT, HISTORY_SHOWN, HistoryStore, MemoryHistory
from chatlib.protocol import (
    CLIENT_MAX_LINE,
    COMMANDS,
    LOBBY,
    Command,
    LineFramer,
    encode_line,
    format_notice,
    name_key,
    name_problem,
    normalize_name,
    parse_command,
    room_problem,
    sanitize,
    split_member,
)

#: Why a user on another server is gone without leaving, as their ``left`` notice says.
_PEER_GONE = {
    "bye": " (their server shut down)",
    "silent": " (their server stopped answering)",
}

__all__ = [
    "LIFECYCLE",
    "LINGER",
    "PER_ADDRESS_BEYOND_LOOPBACK",
    "Chat",
    "Connection",
    "Limits",
    "Room",
    "State",
]

#: How long a leaving client has, from the moment it leaves the chat, to read
#: its last lines (its goodbye) and end its side before it is cut off. It
#: also bounds how long stopping a server takes.
LINGER = 1.0

#: ``--max-per-address`` for a server that listens beyond loopback, unless
#: set: a class behind one NAT shares an address, one student should not
#: hold the whole room.
PER_ADDRESS_BEYOND_LOOPBACK = 10


def _limit(default: float | None, help: str, type: type = float) -> Any:
    """Declare a limit with its default and the help ``--help`` shows for it."""
    return field(default=default, metadata={"help": help, "type": type})


@dataclass(frozen=True)
class Limits:
    """The limits that keep one client from hurting the others.

    Every engine takes its limits from here, and ``python -m chatlib.server``
    makes one option of each field (``max_line`` becomes ``--max-line``).
    ``docs/protocol.md`` explains where each default comes from.
    """

    max_clients: int = _limit(100, "clients at once; one more is told the server is full", int)
    # IRC servers' connection classes limit clients per host; Redis has maxclients only.
    max_per_address: int | None = _limit(
        None,
        "clients at once from one IP address (one IPv6 /64); one more is told why; 0: no"
        f" limit (default: {PER_ADDRESS_BEYOND_LOOPBACK} when listening beyond loopback, 0 on"
        " loopback)",
        int,
    )
    # IRC's lines are 512 bytes (RFC 1459, section 2.3).
    max_line: int = _limit(
        512, "longest line in bytes, without its ending; longer ones are refused", int
    )
    # IRC servers drop clients past 100 KB to 1 MiB ("SendQ exceeded"): we take the top.
    sendq: int = _limit(
        1024 * 1024, "bytes queued for a client that does not read before it is dropped", int
    )
    # IRC servers allow about a burst of five to ten lines, then one or two a second.
    rate: float = _limit(
        2.0,
        "lines a second per client after the burst, and joins and leaves a second per"
        " address that reconnects; 0 turns flood control off",
    )
    burst: int = _limit(10, "lines a client may send at once before --rate applies", int)
    # Twitch's chat stops sending joins and parts past 1,000 viewers; a classroom is far below.
    announce_up_to: int = _limit(
        100,
        "members up to which every join and leave is announced; a bigger room stops"
        " announcing them until it is down to half as many",
        int,
    )
    # IRC servers ping idle clients and drop them after a few minutes.
    idle_timeout: float = _limit(
        0.0, "seconds a client may go without sending a line before it is closed; 0: never"
    )
    # IRC networks cap channels per user; one server's rooms need a cap of their own.
    max_rooms: int = _limit(
        100, f"rooms at once, {LOBBY} included; making one more is refused", int
    )
    # InspIRCd's channel history replays a few dozen lines on join.
    history: int = _limit(
        HISTORY_SHOWN,
        f"recent messages shown to whoever enters a room; 0: none; at most {HISTORY_KEPT}",
        int,
    )

    def __post_init__(self) -> None:
        """Refuse limits that would make the server useless; raise ValueError."""
        for name in ("max_clients", "max_line", "sendq", "burst", "announce_up_to", "max_rooms"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.rate < 0:
            raise ValueError(f"rate must be 0 (no flood control) or more, not {self.rate}")
        if self.idle_timeout < 0:
            raise ValueError(f"idle_timeout must be 0 (none) or more, not {self.idle_timeout}")
        if self.max_per_address is not None and self.max_per_address < 0:
            raise ValueError(
                f"max_per_address must be 0 (none) or more, not {self.max_per_address}"
            )
        if not 0 <= self.history <= HISTORY_KEPT:
            raise ValueError(f"history must be 0 (none) to {HISTORY_KEPT}, not {self.history}")
        if self.sendq < self.max_line:
            # Then one line of one client, sent to everyone, drops everyone.
            raise ValueError(f"sendq ({self.sendq}) must be at least max_line ({self.max_line})")

    def for_listener(self, host: str) -> Limits:
        """Return these limits for a server listening on *host*, an IP address.

        ``max_per_address`` unset becomes :data:`PER_ADDRESS_BEYOND_LOOPBACK`
        beyond loopback, and 0 (none) on loopback, where every client, a
        whole class of notebooks and tests included, comes from 127.0.0.1.
        """
        if self.max_per_address is not None:
            return self
        loopback = ipaddress.ip_address(host).is_loopback
        return replace(self, max_per_address=0 if loopback else PER_ADDRESS_BEYOND_LOOPBACK)


class State(enum.Enum):
    """Where a connection is in its life; :data:`LIFECYCLE` says how it moves."""

    #: In the chat. Read its lines (while :attr:`Connection.reading`), write
    #: what is queued.
    OPEN = "open"
    #: Out of the chat, saying goodbye. Write what is queued, then end our
    #: side of the stream (``SHUT_WR``) and call :meth:`Chat.eof_sent`.
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
    """One client's side of the chat: its name, its input, its output queue.

    Engines read :attr:`state`, :attr:`deadline`, :attr:`reading` and
    :attr:`cut_off`, and call :meth:`data_to_send`; everything else is the
    room's business.
    """

    __slots__ = (
        "_flood_until",
        "_framer",
        "_idle_at",
        "_last_line_at",
        "_outgoing",
        "_overlong_reported",
        "_peer_eof",
        "_queued",
        "_tokens",
        "_tokens_at",
        "_unsent",
        "_warned_flood",
        "address",
        "cut_off",
        "deadline",
        "name",
        "peer",
        "room",
        "serial",
        "state",
    )

    def __init__(self, room: Chat, peer: object, name: str, now: float) -> None:
        #: Whatever the engine passed to :meth:`Chat.connect`, for its logs.
        self.peer = peer
        #: This connection's number on its server, which events name it by.
        self.serial = next(room._serials)
        #: Where the client comes from, as the per-address limits count it.
        self.address = _address_of(peer)
        #: The client's current name, the same in every room.
        self.name = name
        #: The room the client is in; ``None`` once it has left the chat.
        self.room: Room | None = None
        #: See :class:`State`.
        self.state = State.OPEN
        #: When to call :meth:`Chat.deadline_reached`, or ``None``. While the
        #: connection is ``OPEN``, the chat checks then whether the client
        #: may go on after a flood, or has been idle too long; once it leaves,
        #: it is when the client is cut off if it has not ended its side.
        self.deadline: float | None = None
        #: Whether a ``CLOSED`` connection ended without a clean goodbye: the
        #: engine closes it with a reset, so the kernel keeps nothing for it.
        self.cut_off = False
        self._framer = LineFramer(room.limits.max_line, telnet=True)
        self._overlong_reported = 0
        self._peer_eof = False
        self._outgoing: list[bytes] = []
        self._queued = 0  # bytes in _outgoing
        self._unsent = 0  # bytes the engine took and the kernel has not yet
        self._tokens = float(room.limits.burst)
        self._tokens_at: float | None = None  # when _tokens was last topped up
        self._warned_flood = False
        self._flood_until: float | None = None  # over its budget: not read until then
        self._last_line_at = now
        self._idle_at: float | None = None  # when to check whether it is idle

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
        return self.state is not State.OPEN or self._flood_until is None

    def data_to_send(self) -> bytes:
        """Return everything queued for this client and empty the queue.

        All lines queued since the last call come out as one ``bytes``, so
        an engine writes a client's whole backlog with one system call.
        Then tell the chat with :meth:`Chat.data_unsent` how much of it the
        kernel did not take, and take more only once that is written.
        """
        data = b"".join(self._outgoing)
        self._outgoing.clear()
        self._queued = 0
        return data

    def __repr__(self) -> str:
        return f"<Connection {self.name} {self.state.name}>"


class Room:
    """One room: its name, who is in it, and whether it announces who comes and goes.

    Chat lines and ``/me`` go to the members of the sender's room only;
    each client is in one room at a time (see docs/protocol.md for why).
    """

    __slots__ = ("announcing", "key", "members", "name")

    def __init__(self, name: str) -> None:
        #: The room's name as first spelt, ``#`` included.
        self.name = name
        #: What rooms are told apart by, and history is kept under: ``name_key(name)``.
        self.key = name_key(name)
        #: The connections in the room, in order of arrival (an ordered set).
        self.members: dict[Connection, None] = {}
        # N joins told to N members cost N² lines, 12.5 million for 5,000, so
        # a big room stops announcing them.
        self.announcing = True

    def __repr__(self) -> str:
        return f"<Room {self.name} ({len(self.members)})>"


class Chat:
    """Everyone connected to one server, the rooms they are in, and the rules of the chat."""

    def __init__(
        self,
        limits: Limits | None = None,
        store: HistoryStore | None = None,
        cluster: Cluster | None = None,
    ) -> None:
        #: The chat's limits; ``max_per_address`` unset means none (see
        #: :meth:`Limits.for_listener`).
        self.limits = limits or Limits()
        #: This server's part in a chat of several servers (see
        #: :mod:`chatlib.cluster`); ``None`` for a server on its own.
        self.cluster = cluster
        self._serials = itertools.count(1)
        #: Where recent messages are kept: a ring per room in memory unless
        #: a store is given. The chat commits it in :meth:`take_ready`.
        self.store = store if store is not None else MemoryHistory()
        self._unsaved = False  # lines added to the history since its last commit
        # name_key(name) -> connection, whatever its room: no two names look alike.
        self._members: dict[str, Connection] = {}
        self._lobby = Room(LOBBY)
        self._rooms: dict[str, Room] = {self._lobby.key: self._lobby}  # in order of making
        self._per_address: dict[object, int] = {}  # members from each address
        # address -> (tokens, when): the flood budget that the connections
        # from an address left behind, so that reconnecting does not refill
        # it (IRC's throttle). Oldest first; an entry goes once it would be
        # full again.
        self._budgets: dict[object, tuple[float, float]] = {}
        self._ready: dict[Connection, None] = {}  # an ordered set
        # Connections past their send queue, dropped once the fan-out that
        # pushed them over is done (Redis's CLIENT_CLOSE_ASAP): a drop tells
        # the others, and telling them inside the fan-out would re-enter it.
        self._over_limit: dict[Connection, None] = {}
        self._guest_number = 0
        self._clock = float("-inf")  # the latest time a caller gave
        # room key -> the id of the newest line of its history on the broker
        # that the store holds: older ones coming back are not kept twice.
        self._history_ids: dict[str, tuple[int, int]] = {}

    # --- Public methods -------------------------------------------------

    def connect(self, peer: object, now: float) -> Connection:
        """Let a new client in, to the lobby, and return its connection.

        *peer* is the client's ``(host, port)``; the per-address limits count
        its host. When the server is full, when the address has as many
        members as ``max_per_address`` allows, or when it reconnects faster
        than its flood budget allows, the connection comes back ``CLOSING``
        with a line saying why: the engine sends it and closes, as for any
        other.
        """
        self._clock = now
        conn = Connection(self, peer, self._new_guest_name(), now)
        refusal = self._refusal(conn, now)
        if refusal:
            self._send(conn, f"*** Sorry, {refusal}.")
            self._move(conn, "leave", now)
        else:
            self._inherit_budget(conn, now)
            self._members[name_key(conn.name)] = conn
            self._per_address[conn.address] = self._per_address.get(conn.address, 0) + 1
            if self.limits.idle_timeout:
                conn._idle_at = now + self.limits.idle_timeout
                self._reschedule(conn)
            self._send(conn, "*** " + format_notice("welcome", name=conn.name))
            self._enter(conn, self._lobby)
            if self.cluster is not None:
                self._send(conn, "*** " + self._server_notice())
        self._drop_over_limit()
        return conn

    def receive_data(self, conn: Connection, data: bytes, now: float) -> None:
        """Handle *data* read from *conn*'s socket at time *now* (seconds).

        A connection that is leaving has its input dropped. Telnet's option
        requests are answered (refused) at once, even while flood control
        holds the client's lines back.
        """
        self._clock = now
        if conn.state is State.OPEN:
            conn._framer.feed(data)
            if replies := conn._framer.take_telnet_replies():
                self._queue([conn], replies)
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
        self._clock = now
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
        queued in the chat: it is about what a client leaves unread, so a
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
        self._clock = now
        if conn.state is not State.OPEN:
            self._move(conn, "cut off")
        else:
            if conn._flood_until is not None and conn._flood_until <= now:
                self._process(conn, now)  # the flood budget has refilled
            # (Unless the lines it sent meanwhile made it leave.)
            if conn.state is State.OPEN and conn._idle_at is not None and conn._idle_at <= now:
                self._check_idle(conn, now)
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
        self._clock = now
        if self._linked:
            self._publish("bye")  # the other servers let our members go at once
        leaving = list(self._members.values())
        self._members.clear()  # nobody is told about the others leaving
        self._per_address.clear()
        self._rooms = {self._lobby.key: self._lobby}
        self._lobby.members.clear()
        for conn in leaving:
            conn.room = None
            self._send(conn, "*** The server is shutting down. Bye!")
            self._move(conn, "leave", now)
        self._drop_over_limit()

    # --- Several servers (see chatlib.cluster) ---------------------------

    def broker_connected(self, history: dict[str, list[tuple[str, bytes]]], now: float) -> None:
        """Handle the link to the broker coming up: say who is here, and ask the others.

        From now on every line for a room goes through the broker, and comes
        back to be delivered. *history* is every room's history as the broker
        keeps it, read once subscribed: room key -> ``(entry id, event)``,
        oldest first. It replaces what the store held, rooms the broker has
        no history of included (a Redis that restarted empty), so that
        every server replays the same. Coming back after a split is told to
        everyone.
        """
        self._clock = now
        for room in self._rooms.keys() - history.keys():
            self._load_history(room, [])
        for room, entries in history.items():
            self._load_history(room, entries)
        cluster = self.cluster
        cluster.linked = True
        cluster.forget_peers()  # what they said before may be stale; they answer anew
        self._publish("roster", members=self._roster(), reply=True)
        if cluster.ever_linked:
            self._send_everyone("*** " + format_notice("linked"))
        cluster.ever_linked = True

    def broker_lost(self, reason: str, now: float) -> None:
        """Handle the link to the broker failing: serve this server's clients alone.

        This server's lines still on their way are delivered here, as they
        would have been; whoever is on the other servers may miss them.
        Everyone here is told. Once the link is down, this does nothing.
        """
        cluster = self.cluster
        if not cluster.linked:
            return
        self._clock = now
        cluster.linked = False
        for kind, fields in cluster.take_in_flight():
            if kind in ("line", "private"):
                getattr(self, "_on_" + kind)(cluster.origin, fields)
        rooms = set(cluster.room_sizes)
        cluster.forget_peers()
        for room in rooms:
            self._forget_if_empty(room)
        self._send_everyone("*** " + format_notice("split", reason=reason))
        self._drop_over_limit()

    def receive_broker_message(self, data: bytes, now: float) -> None:
        """Handle one event from the broker (see :mod:`chatlib.cluster`), in the broker's order.

        What is not an event, and what arrives while the link counts as
        down, is dropped. A gap in another server's numbering is told to
        everyone here, and makes every server say again who is on it.
        """
        cluster = self.cluster
        event = decode_event(data) if cluster.linked else None
        if event is None:
            return
        self._clock = now
        origin, seq, kind = event["origin"], event["seq"], event["kind"]
        if origin == cluster.origin:
            # Our own: only lines are delivered on the way back, and only once.
            if cluster.came_back(seq) and kind in ("line", "private"):
                getattr(self, "_on_" + kind)(origin, event)
            self._drop_over_limit()
            return
        peer = cluster.peers.get(origin)
        if peer is None:
            cluster.peers[origin] = Peer(seq, now)
            if kind != "roster":
                # A server we did not know of (or had given up on): learn who is on it.
                self._publish("roster", members=self._roster(), reply=True)
        elif seq <= peer.last_seq:
            return  # a replay of something seen
        else:
            missed = seq - peer.last_seq - 1
            peer.last_seq, peer.heard_at = seq, now
            if missed:
                cluster.lost += missed
                self._send_everyone("*** " + format_notice("lost-messages", count=missed))
                self._publish("roster", members=self._roster(), reply=True)
        getattr(self, "_on_" + kind)(origin, event)
        self._drop_over_limit()

    def receive_broker_messages(self, batch: list[bytes], now: float) -> None:
        """Handle the events in *batch*, in order: what the link read at once."""
        for data in batch:
            self.receive_broker_message(data, now)

    def broker_tick(self, now: float) -> None:
        """Handle the link's heartbeat: say we are alive, give up on servers gone silent."""
        cluster = self.cluster
        if not cluster.linked:
            return
        self._clock = now
        for origin in cluster.silent_peers(now):
            self._forget_peer(origin, _PEER_GONE["silent"])
        if cluster.quiet_since(now):
            self._publish("alive")
        self._drop_over_limit()

    def take_ready(self) -> list[Connection]:
        """Return the connections with news since the last call, once each.

        News is output queued, a change of state, or a change of deadline.
        Act on each connection returned (see the module's docstring), then
        call this again: acting on one may give news to others.
        """
        if self._unsaved:
            # Before any of it is written out: a sender who has seen its
            # echo can rely on the message being kept. One commit for the
            # whole batch (a group commit).
            self._unsaved = False
            self.store.commit()
        if self.cluster is not None:
            self.cluster.flush()
        ready = list(self._ready)
        self._ready.clear()
        return ready

    @property
    def members(self) -> list[str]:
        """Return the names of everyone on this server, in any room, in order of arrival."""
        return [conn.name for conn in self._members.values()]

    @property
    def rooms(self) -> dict[str, list[str]]:
        """Return each room's name and its members' names on this server, in order of making."""
        return {room.name: [conn.name for conn in room.members] for room in self._rooms.values()}

    # --- Private methods ------------------------------------------------

    def _process(self, conn: Connection, now: float) -> None:
        """Handle *conn*'s complete lines as far as its flood budget allows."""
        framer = conn._framer
        if conn._flood_until is not None:
            conn._flood_until = None
            self._reschedule(conn)  # reading resumes
        while conn.state is State.OPEN and framer.has_line():
            if not self._take_token(conn, now):
                return
            line = framer.next_line()
            self._report_overlong(conn)
            if line is not None and line.strip():
                conn._last_line_at = now
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
        conn._tokens = self._refilled(conn._tokens, conn._tokens_at, now)
        conn._tokens_at = now
        if conn._tokens >= 1:
            conn._tokens -= 1
            if conn._tokens >= burst - 1:
                conn._warned_flood = False
            return True
        conn._flood_until = now + (1 - conn._tokens) / rate
        self._reschedule(conn)  # reading stops until then
        if not conn._warned_flood:
            conn._warned_flood = True
            self._send(
                conn,
                f"*** Slow down: over {rate:g} lines a second, your lines are delayed.",
            )
        return False

    def _check_idle(self, conn: Connection, now: float) -> None:
        """Close *conn* if it sent no line for ``idle_timeout``; else check again later."""
        timeout = self.limits.idle_timeout
        if conn._framer.has_line():
            conn._idle_at = now + timeout  # its lines wait for flood control: not idle
        elif now - conn._last_line_at < timeout:
            conn._idle_at = conn._last_line_at + timeout
        else:
            # Bytes with no newline (a slowloris) count as nothing.
            self._send(conn, f"*** Closing: you sent nothing for {timeout:g} s (the idle timeout).")
            self._leave(conn, now, " (idle)")
            return
        self._reschedule(conn)

    def _reschedule(self, conn: Connection) -> None:
        """Set an ``OPEN`` connection's deadline to the first check it needs."""
        checks = [when for when in (conn._flood_until, conn._idle_at) if when is not None]
        conn.deadline = min(checks, default=None)
        self._ready[conn] = None  # the deadline, or whether to read, has changed

    def _refusal(self, conn: Connection, now: float) -> str | None:
        """Return why *conn* may not come in, or ``None``."""
        limits = self.limits
        if len(self._members) >= limits.max_clients:
            return f"the server is full ({limits.max_clients} clients)"
        if limits.max_per_address and (
            self._per_address.get(conn.address, 0) >= limits.max_per_address
        ):
            return f"too many connections from your address ({limits.max_per_address})"
        if conn.address in self._budgets:
            tokens = self._budget_left(conn.address, now)
            if tokens < 1:
                wait = math.ceil((1 - tokens) / limits.rate)
                return f"you are reconnecting too fast; try again in {wait} s"
        return None

    def _inherit_budget(self, conn: Connection, now: float) -> None:
        """Start *conn* with the flood budget its address left, if it left one."""
        if conn.address in self._budgets:
            # Its "joined" notice is a line on everyone's screen: it costs one.
            tokens = self._budget_left(conn.address, now) - 1
            self._keep_budget(conn.address, tokens, now)
            conn._tokens, conn._tokens_at = tokens, now
        # Otherwise nobody from there left lately: a full budget of its own.

    def _budget_left(self, address: object, now: float) -> float:
        """Return the flood budget that the recent connections from *address* left."""
        return self._refilled(*self._budgets[address], now)

    def _refilled(self, tokens: float, since: float | None, now: float) -> float:
        """Return a flood budget of *tokens* at *since*, topped up at ``rate`` until *now*."""
        if since is None:
            return tokens
        return min(self.limits.burst, tokens + (now - since) * self.limits.rate)

    def _keep_budget(self, address: object, tokens: float, now: float) -> None:
        self._budgets.pop(address, None)
        self._budgets[address] = (tokens, now)  # now the newest
        # Forget the budgets that are full again: they are never below -1, so
        # that is this long after they were kept. The newest stays.
        refill_time = (self.limits.burst + 1) / self.limits.rate
        while (oldest := next(iter(self._budgets))) != address:
            if self._budgets[oldest][1] + refill_time > now:
                break
            del self._budgets[oldest]

    def _remove_member(self, conn: Connection) -> None:
        """Take *conn* out of the member lists; keep the flood budget it leaves behind."""
        del self._members[name_key(conn.name)]
        if self._linked:
            self._publish("gone", name=conn.name)
        count = self._per_address.pop(conn.address) - 1
        if count:
            self._per_address[conn.address] = count
        if self.limits.rate > 0:
            # A reset has no time of its own: the chat's clock is the last
            # time it was given, which errs on the side of less refill.
            now = self._clock
            tokens = self._refilled(conn._tokens, conn._tokens_at, now)
            if conn.address in self._budgets:
                tokens = min(tokens, self._budget_left(conn.address, now))
            # The "left" notice costs a line too.
            self._keep_budget(conn.address, tokens - 1, now)

    def _new_guest_name(self) -> str:
        # A server of several tags its guests: two servers that let someone
        # in at the same moment never pick one name.
        tag = "" if self.cluster is None else "-" + self.cluster.tag
        while True:
            self._guest_number += 1
            name = f"guest{self._guest_number}{tag}"
            if self._holder_name(name_key(name)) is None:  # someone may have picked it
                return name

    def _holder_name(self, key: str, asking: Connection | None = None) -> str | None:
        """Return the name of whoever but *asking* holds a name with *key*, on any server."""
        holder = self._members.get(key)
        if holder is not None and holder is not asking:
            return holder.name
        remote = self.cluster.holder(key) if self.cluster is not None else None
        return remote[1] if remote is not None else None

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
            unknown = "!!! Unknown command /{}. Type /help for the list."
            self._send_fitted(conn, unknown, command.name)
        else:
            handler(conn, command.args)

    def _do_say(self, conn: Connection, text: str) -> None:
        self._relay(conn.room, f"<{conn.name}> {text}")

    def _do_me(self, conn: Connection, action: str) -> None:
        if not action:
            self._send_usage(conn, "me")
        else:
            self._relay(conn.room, f"* {conn.name} {action}")

    def _do_msg(self, conn: Connection, args: str) -> None:
        entry, _, text = args.partition(" ")
        name = split_member(entry)[0]  # as /who lists it, alice@1f0a will do
        text = text.strip()
        if not name or not text:
            self._send_usage(conn, "msg")
        elif (target := self._members.get(name_key(name))) is not None:
            self._send(target, f"*{conn.name}* {text}")
            if target is not conn:
                self._send(conn, f"-> *{target.name}* {text}")
        elif self._linked and (remote := self.cluster.holder(name_key(name))) is not None:
            self._publish("private", to=name_key(name), text=f"*{conn.name}* {text}")
            self._send(conn, f"-> *{remote[1]}* {text}")
        else:
            self._send_fitted(conn, "!!! Nobody here is called {}.", name)

    def _do_nick(self, conn: Connection, name: str) -> None:
        name = normalize_name(name)
        holder = self._holder_name(name_key(name), asking=conn)
        if not name:
            self._send_usage(conn, "nick")
        elif problem := name_problem(name):
            self._send(conn, f"!!! {problem} Your name is still {conn.name}.")
        elif holder is not None:
            taken = (
                "is taken"
                if holder.casefold() == name.casefold()
                else f"looks too much like {holder}, who is here"
            )
            self._send(conn, f"!!! The name {name} {taken}. Your name is still {conn.name}.")
        elif name != conn.name:
            self._rename(conn, name)

    def _rename(self, conn: Connection, name: str) -> None:
        """Give *conn* the free *name*, and tell its room and the other servers."""
        old = conn.name
        conn.name = name
        # Rebuild rather than delete and insert: /who keeps arrival order.
        self._members = {name_key(member.name): member for member in self._members.values()}
        if self._linked:
            self._publish("renamed", old=old, name=name)
        self._broadcast(conn.room, "*** " + format_notice("renamed", old=old, name=name))

    def _do_who(self, conn: Connection, args: str) -> None:
        self._send_members(conn, "members")

    def _do_join(self, conn: Connection, args: str) -> None:
        name = normalize_name(args)
        room = self._rooms.get(name_key(name))
        if room is None and self.cluster is not None:
            name = self.cluster.room_names.get(name_key(name), name)  # as first spelt there
        # Leaving a room of one makes room for another.
        vanishing = conn.room is not self._lobby and len(conn.room.members) == 1
        if not name:
            self._send_usage(conn, "join")
        elif problem := room_problem(name):
            self._send(conn, f"!!! {problem}")
        elif room is conn.room:
            self._send(conn, f"!!! You are in {room.name} already.")
        elif room is None and len(self._rooms) - vanishing >= self.limits.max_rooms:
            self._send(
                conn,
                f"!!! There are {self.limits.max_rooms} rooms already, as many as this server"
                " holds: /rooms lists them.",
            )
        else:
            self._move_to(conn, room or Room(name))

    def _do_part(self, conn: Connection, args: str) -> None:
        if conn.room is self._lobby:
            self._send(conn, f"!!! You are in {LOBBY} already; /join #ROOM goes to another room.")
        else:
            self._move_to(conn, self._lobby)

    def _do_rooms(self, conn: Connection, args: str) -> None:
        sizes = {room.key: [room.name, len(room.members)] for room in self._rooms.values()}
        if self.cluster is not None:
            for key, count in self.cluster.room_sizes.items():
                sizes.setdefault(key, [self.cluster.room_names[key], 0])[1] += count
        rooms = [f"{name} ({count})" for name, count in sizes.values()]
        self._send(conn, "*** " + self._fitted_list("rooms", rooms, len(rooms), "rooms"))

    def _do_history(self, conn: Connection, args: str) -> None:
        if args and not (args.isascii() and args.isdigit() and int(args) > 0):
            self._send_usage(conn, "history")
        elif not self._replay(conn, conn.room, min(int(args or HISTORY_SHOWN), HISTORY_KEPT)):
            self._send(conn, f"*** No messages in {conn.room.name} yet.")

    def _do_help(self, conn: Connection, args: str) -> None:
        self._send(conn, "*** Type a line to say it to everyone in your room. Commands:")
        for usage, meaning in COMMANDS.values():
            self._send(conn, f"***   {usage:<16} {meaning}")
        self._send(conn, "***   (start a message with // to say something that starts with /)")

    def _send_fitted(self, conn: Connection, template: str, echo: str) -> None:
        """Send *template* with what the client typed in it, cut to fit ``max_line``."""
        room_left = self.limits.max_line - len(template.format("").encode())
        if len(echo.encode()) > room_left:
            echo = echo.encode()[: max(0, room_left - 3)].decode(errors="ignore") + "…"
        self._send(conn, template.format(echo))

    def _send_usage(self, conn: Connection, command: str) -> None:
        usage, meaning = COMMANDS[command]
        self._send(conn, f"!!! Usage: {usage} ({meaning}).")

    def _send_members(self, conn: Connection, event: str, most: int | None = None) -> None:
        """Send *conn* the *event* notice listing its room: its first *most* names, or all."""
        room = conn.room
        # With several servers, each name comes with its server: alice@1f0a.
        here = "" if self.cluster is None else "@" + self.cluster.tag
        names = [member.name + here for member in itertools.islice(room.members, most)]
        count = len(room.members)
        if self.cluster is not None and (elsewhere := self.cluster.members_in(room.key)):
            names += elsewhere[: None if most is None else max(0, most - len(names))]
            count += len(elsewhere)
        notice = self._fitted_list(event, names, count, "names", room=room.name)
        self._send(conn, "*** " + notice)

    def _fitted_list(
        self, event: str, items: list[str], count: int, field: str, **fields: object
    ) -> str:
        """Return the *event* notice listing *items* of *count*, cut short to fit one line.

        A long list (a big room's members, many rooms) stays within what
        chatlib's clients accept: the items that fit, then ``(and N more)``.
        """
        empty = format_notice(event, count=count, **{field: ""}, more="", **fields)
        budget = CLIENT_MAX_LINE - len("*** " + empty) - len(f" (and {count} more)")
        # Only a list that could outgrow one line is measured: an item is at
        # most 4 bytes a character, and a few more for what goes with it.
        if len(items) * (4 * max(map(len, items), default=0) + 2) > budget:
            size = 0
            for shown, item in enumerate(items):
                size += len(item.encode()) + 2  # and ", "
                if size > budget:
                    items = items[:shown]
                    break
        more = f" (and {count - len(items)} more)" if len(items) < count else ""
        return format_notice(event, count=count, **{field: ", ".join(items)}, more=more, **fields)

    def _enter(self, conn: Connection, room: Room) -> None:
        """Put *conn* in *room*: tell the room, then tell *conn* who is there and what was said."""
        self._rooms.setdefault(room.key, room)
        self._announce("joined", conn, room)
        room.members[conn] = None
        conn.room = room
        if self._linked:
            self._publish("member", name=conn.name, room_name=room.name)
        # Entering a big room costs no walk of the whole list: the first names will do.
        self._send_members(conn, "entered", most=self.limits.announce_up_to)
        if not room.announcing:  # so that nobody expects to see who comes and goes
            self._send(conn, "*** " + format_notice("quiet", limit=self.limits.announce_up_to))
        self._replay(conn, room, self.limits.history)

    def _exit(self, conn: Connection, reason: str = "") -> None:
        """Take *conn* out of its room and tell the others; an empty room goes."""
        room = conn.room
        del room.members[conn]
        conn.room = None
        self._announce("left", conn, room, reason)
        if not room.members and room is not self._lobby:
            del self._rooms[room.key]
            self._forget_if_empty(room.key, here=True)

    def _move_to(self, conn: Connection, room: Room) -> None:
        """Move *conn* from its room to *room*; both rooms are told."""
        self._exit(conn, " (for another room)")
        self._enter(conn, room)

    def _replay(self, conn: Connection, room: Room, count: int) -> bool:
        """Send *conn* *room*'s last *count* messages, between two notices; return if any."""
        lines = self.store.recent(room.key, count) if count else []
        if lines:
            self._send(conn, "*** " + format_notice("history", room=room.name, count=len(lines)))
            for line in lines:
                # The lines were sanitised as they came in; a store is a file
                # anyone could have edited since.
                self._send(conn, sanitize(line))
            self._send(conn, "*** " + format_notice("history-end", room=room.name))
        return bool(lines)

    def _announce(self, event: str, conn: Connection, room: Room, reason: str = "") -> None:
        """Tell *room* that *conn* joined or left it, while the room is small enough.

        Call it before a join and after a leave. The join that takes the room
        past ``announce_up_to`` is not announced; instead, everyone in it is
        told that joins and leaves no longer are, until it is down to half.
        """
        count, limit = self._room_size(room) + (event == "joined"), self.limits.announce_up_to
        # The newcomer is not told of its own arrival, even once it is a
        # member: when the line comes back from the broker.
        skip = conn if event == "joined" else None
        if room.announcing and count > limit:
            room.announcing = False
            self._broadcast(room, "*** " + format_notice("quiet", limit=limit), skip)
        elif not room.announcing and count <= limit // 2:
            room.announcing = True
            self._broadcast(room, "*** " + format_notice("announcing", count=count), skip)
        elif room.announcing:
            where = "" if self.cluster is None else f" on server {self.cluster.tag}"
            notice = format_notice(event, name=conn.name, reason=reason, where=where)
            self._broadcast(room, "*** " + notice, skip)

    def _leave(self, conn: Connection, now: float, reason: str = "") -> None:
        """Take *conn* out of the chat to say goodbye, and tell its room."""
        self._remove_member(conn)
        self._move(conn, "leave", now)
        self._exit(conn, reason)

    def _cut_off(self, conn: Connection, reason: str = "") -> None:
        """End *conn* at once, without a goodbye; tell its room if it was in one."""
        was_member = conn.room is not None
        if was_member:
            self._remove_member(conn)
        conn.data_to_send()  # nobody will read it
        conn._unsent = 0
        self._move(conn, "cut off")
        if was_member:
            self._exit(conn, reason)

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

    def _broadcast(self, room: Room, text: str, skip: Connection | None = None) -> None:
        """Send *text* to *room*'s members but *skip*, on every server.

        With a broker it goes out as an event, and reaches this server's
        members too only when it comes back: in the broker's order.
        """
        if self._linked:
            self._publish("line", room=room.key, text=text, history=False, skip=_serial(skip))
        else:
            self._broadcast_here(room, text, skip)

    def _broadcast_here(self, room: Room, text: str, skip: Connection | None = None) -> None:
        """Send *text* to this server's members of *room* but *skip*."""
        # Encode once, queue the same bytes object for everyone: the cost
        # per receiver is one list append.
        members = list(room.members) if skip is None else [m for m in room.members if m is not skip]
        self._queue(members, encode_line(text))

    def _relay(self, room: Room, line: str) -> None:
        """Broadcast a message to *room*, and keep it in the room's history."""
        if self._linked:
            # Every server keeps it when it comes back, in the broker's order.
            self._publish("line", room.key, room=room.key, text=line, history=True, skip=None)
        else:
            self._broadcast_here(room, line)
            self._keep(room.key, line)

    def _keep(self, room: str, line: str) -> None:
        self.store.add(room, line)
        self._unsaved = True

    def _send_everyone(self, text: str) -> None:
        self._queue(list(self._members.values()), encode_line(text))

    def _server_notice(self) -> str:
        cluster = self.cluster
        others = len(cluster.peers)
        state = (
            f"linked with {others} other server{'s' if others != 1 else ''}"
            if cluster.linked
            else "not linked to the other servers right now"
        )
        return format_notice("server", server=cluster.tag, state=state)

    def _room_size(self, room: Room) -> int:
        """Return how many are in *room*, on every server."""
        elsewhere = self.cluster.room_sizes.get(room.key, 0) if self.cluster is not None else 0
        return len(room.members) + elsewhere

    # --- Events from the other servers (see chatlib.cluster.EVENTS) -------

    @property
    def _linked(self) -> bool:
        return self.cluster is not None and self.cluster.linked

    def _publish(self, kind: str, keep_in: str | None = None, **fields: object) -> None:
        self.cluster.publish(kind, self._clock, keep_in, **fields)

    def _roster(self) -> list[list[str]]:
        return [[conn.name, conn.room.name] for conn in self._members.values()]

    def _on_line(self, origin: str, event: dict) -> None:
        key, text = event["room"], self._from_elsewhere(event["text"])
        if (room := self._rooms.get(key)) is not None:
            skip = event["skip"] if origin == self.cluster.origin else None
            self._queue([m for m in room.members if m.serial != skip], encode_line(text))
        # A room that emptied while the line was on its way has no history left to keep it in.
        if event["history"] and (room is not None or key in self.cluster.room_sizes):
            hid = history_id(event.get("hid", ""))
            if hid is None or hid > self._history_ids.get(key, (0, 0)):
                self._keep(key, text)
                if hid is not None:
                    self._history_ids[key] = hid

    def _load_history(self, room: str, entries: list[tuple[str, bytes]]) -> None:
        """Make the store hold *room*'s history as the broker keeps it."""
        self.store.forget(room)
        self._history_ids.pop(room, None)
        for hid, data in entries:
            event = decode_event(data)
            if event is not None and event["kind"] == "line" and history_id(hid) is not None:
                self._keep(room, sanitize(event["text"]))
                self._history_ids[room] = history_id(hid)

    def _on_private(self, origin: str, event: dict) -> None:
        if (target := self._members.get(event["to"])) is not None:
            self._send(target, self._from_elsewhere(event["text"]))

    def _from_elsewhere(self, text: str) -> str:
        """Return a line another server sent, made safe: anyone may publish on the broker.

        Its controls are made inert, and it is cut to what clients accept:
        another server may allow longer lines than this one.
        """
        text = sanitize(text)
        if len(text.encode()) > CLIENT_MAX_LINE:
            text = text.encode()[: CLIENT_MAX_LINE - 3].decode(errors="ignore") + "…"
        return text

    def _on_member(self, origin: str, event: dict) -> None:
        name, room = normalize_name(event["name"]), normalize_name(event["room_name"])
        if name_problem(name) is None and (room == LOBBY or room_problem(room) is None):
            self._forget_if_empty(self.cluster.set_member(origin, name, room))
            self._settle_claim(origin, name_key(name))

    def _on_gone(self, origin: str, event: dict) -> None:
        self._forget_if_empty(self.cluster.drop_member(origin, name_key(event["name"])))

    def _on_renamed(self, origin: str, event: dict) -> None:
        entry = self.cluster.peers[origin].members.get(name_key(event["old"]))
        if entry is not None:
            self.cluster.drop_member(origin, name_key(event["old"]))
            self._on_member(origin, {"name": event["name"], "room_name": entry[1]})

    def _on_roster(self, origin: str, event: dict) -> None:
        peer = self.cluster.peers[origin]
        before = dict(peer.members)
        left = [self.cluster.drop_member(origin, key) for key in list(peer.members)]
        for entry in event["members"]:
            if isinstance(entry, list) and len(entry) == 2 and all(map(_is_str, entry)):
                self._on_member(origin, {"name": entry[0], "room_name": entry[1]})
        for room in left:
            self._forget_if_empty(room)
        # Who came and went while we could not hear (a split, a server back
        # from a pause) is told here, as an IRC network tells a netjoin.
        after = peer.members
        for key, (name, room_name) in after.items():
            if before.get(key) != (name, room_name):
                self._announce_here("joined", name, room_name, f" on server {origin[:TAG_LENGTH]}")
        for key, (name, room_name) in before.items():
            if after.get(key, (None, None))[1] != room_name:
                self._announce_here("left", name, room_name)
        if event["reply"]:
            self._publish("roster", members=self._roster(), reply=False)

    def _announce_here(self, event: str, name: str, room_name: str, where: str = "") -> None:
        """Tell this server's members of a room that someone elsewhere joined or left it.

        *where* is the newcomer's server, or why they left.
        """
        room = self._rooms.get(name_key(room_name))
        if room is not None and room.announcing:
            notice = format_notice(event, name=name, reason=where, where=where)
            self._broadcast_here(room, "*** " + notice)

    def _on_alive(self, origin: str, event: dict) -> None:
        pass  # being heard from was the point

    def _on_bye(self, origin: str, event: dict) -> None:
        self._forget_peer(origin, _PEER_GONE["bye"])

    def _forget_peer(self, origin: str, reason: str) -> None:
        """Let a server's members go, as it shut down or went silent; tell their rooms here."""
        peer = self.cluster.drop_peer(origin)
        for name, room_name in peer.members.values():
            self._announce_here("left", name, room_name, reason)
            # Nobody else will ever leave it: drop the broker's copy too.
            self._forget_if_empty(name_key(room_name), here=True)

    def _settle_claim(self, origin: str, key: str) -> None:
        """Settle a name that a member here and one on *origin* both hold.

        Two servers can give one name in the same moment, or during a split.
        As IRC settles a nick collision, one side is renamed and told: the
        server whose id sorts last, which both decide alike without a word.
        """
        holder = self._members.get(key)
        if holder is not None and self.cluster.origin > origin:
            new = self._new_guest_name()
            self._send(holder, "*** " + format_notice("collision", old=holder.name, name=new))
            self._rename(holder, new)

    def _forget_if_empty(self, room: str | None, here: bool = False) -> None:
        """Drop the history of the room whose key is *room* if nobody is in it on any server.

        *here* says that the last one left from this server: the broker's
        copy of the history goes too, so that a server that joins later
        does not bring the room's old lines back.
        """
        if (
            room is not None
            and room not in self._rooms
            and (self.cluster is None or room not in self.cluster.room_sizes)
        ):
            self.store.forget(room)
            self._history_ids.pop(room, None)
            if here and self._linked:
                self.cluster.forget_history(room)

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


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _serial(conn: Connection | None) -> int | None:
    return None if conn is None else conn.serial


def _address_of(peer: object) -> object:
    """Return what the per-address limits count *peer*, a ``(host, port)``, as.

    That is its host, except that an IPv6 host counts as its /64: one
    machine is handed a whole /64, and could take a fresh address for every
    connection (ergo's IRC server limits IPv6 clients by /64 for the same
    reason). An IPv4 client on a dual-stack socket counts as its IPv4 address.
    """
    host = peer[0] if isinstance(peer, tuple) else peer
    if isinstance(host, str) and ":" not in host:
        return host  # IPv4, as accept() spells it: parsing it costs more than the rest of a join
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host  # not an address: a label a test gave
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if ip.version == 6:
        return str(ipaddress.ip_network((ip, 64), strict=False))
    return str(ip)
