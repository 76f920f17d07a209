"""Several servers, one chat: what a server tells the others through a broker, without I/O.

Servers that share a broker (``python -m chatlib.server --broker
redis://...``) form one chat. Each keeps its own clients, as a single server
does, and tells the others everything that concerns them as an *event*: a
line said in a room, who is here and in which room, a private message.
The broker carries every event to every server, itself included, in one
order; a server delivers even its own clients' lines only as they come back,
so every client on every server sees a room's lines in that order.

A :class:`Cluster` is the bookkeeping: this server's events on their way out
(each numbered, so that a gap is seen), those not yet back, and what it
knows of the other servers (:class:`Peer`). :class:`chatlib.chat.Chat`
decides what to say and what an event means; a link
(:class:`chatlib.redis_link.RedisLink`) carries the bytes. Nothing here
reads a clock or a socket.

An event on the wire is one JSON object: ``origin`` (the server's id),
``seq`` (1, 2, 3... per origin), ``kind`` (a key of :data:`EVENTS`), and
the fields that kind has. A line kept in a room's history also carries
``hid``, its entry's id in the room's history on the broker (a Redis
stream id, ``"<ms>-<n>"``): the broker numbers history, so that a server
that joins late loads the same history as everyone, and knows which lines
it has already.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from chatlib.protocol import name_key

__all__ = [
    "EVENTS",
    "HEARTBEAT",
    "SERVER_LOST_AFTER",
    "TAG_LENGTH",
    "Broker",
    "Cluster",
    "Outgoing",
    "Peer",
    "decode_event",
    "encode_event",
    "history_id",
]

#: How often a link ticks (:meth:`chatlib.chat.Chat.broker_tick`), and how
#: long a server may go without publishing before it says it is alive.
HEARTBEAT = 1.0

#: How long a server may be silent before the others count it gone, with
#: its members: a server killed without a goodbye (SIGKILL, a machine lost)
#: frees its users' names this long after its last word. Ten heartbeats,
#: so that a loaded machine's late ticks never pass for a death.
SERVER_LOST_AFTER = 10.0

#: How many characters of a server's id name it to users: ``guest3-1f0a``, ``alice@1f0a``.
TAG_LENGTH = 4

_OPTIONAL_INT = (int, type(None))
_ORIGIN = re.compile(rf"[0-9a-f]{{{TAG_LENGTH},32}}")

#: Each kind of event, and its fields with their types. ``name`` and ``old``
#: are users' names, ``room`` a room's key (``name_key``) and ``room_name``
#: its name as spelt; ``members`` is a list of ``[name, room name]``.
EVENTS: dict[str, dict[str, type | tuple[type, ...]]] = {
    # A line for a room's members, but the one whose serial is skip on the
    # origin (a newcomer is not told of its own arrival); kept in its
    # history if history is true.
    "line": {"room": str, "text": str, "history": bool, "skip": _OPTIONAL_INT},
    # A line for one user, wherever they are.
    "private": {"to": str, "text": str},
    # A user of the origin is (now) in a room.
    "member": {"name": str, "room_name": str},
    # A user of the origin left the chat.
    "gone": {"name": str},
    "renamed": {"old": str, "name": str},
    # Everyone on the origin, replacing what the others knew of it; if reply
    # is true, every other server answers with its own.
    "roster": {"members": list, "reply": bool},
    # Nothing else to say for a heartbeat: the origin is alive.
    "alive": {},
    # The origin is shutting down: its members are gone.
    "bye": {},
}


#: What a server hands its link, in order: ``(room, event)``. An event for
#: every server, this one included, kept in *room*'s history on the broker
#: unless *room* is ``None``; or, with no event, *room*'s history to drop,
#: as the room is gone from every server.
Outgoing = tuple[str | None, bytes | None]


class Broker(Protocol):
    """What the chat needs of a link to the other servers: somewhere to put its events."""

    def publish(self, messages: list[Outgoing]) -> None:
        """Carry out *messages* (see :data:`Outgoing`) in order; never block."""


@dataclass
class Peer:
    """Another server, as this one knows it from its events."""

    #: The seq of the last event seen from it.
    last_seq: int
    #: When it was last heard from (the chat's clock).
    heard_at: float
    #: Its members: ``name_key(name)`` -> ``(name, room name)``.
    members: dict[str, tuple[str, str]] = field(default_factory=dict)


def encode_event(origin: str, seq: int, kind: str, fields: dict[str, Any]) -> bytes:
    """Return the wire form of an event: one JSON object, UTF-8."""
    event = {"origin": origin, "seq": seq, "kind": kind, **fields}
    return json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()


def decode_event(data: bytes) -> dict[str, Any] | None:
    """Return the event in *data*, or ``None`` if it is not one a server sent.

    Anyone who can publish to the broker can send anything: every field is
    checked against :data:`EVENTS` before the chat looks at it.
    """
    try:
        event = json.loads(data)
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
        return None
    if (
        not isinstance(event, dict)
        or not isinstance(event.get("kind"), str)
        or not isinstance(event.get("origin"), str)
        # Users see a server's tag: an id is hex, as Cluster's users make it.
        or _ORIGIN.fullmatch(event["origin"]) is None
    ):
        return None
    fields = EVENTS.get(event["kind"])
    if (
        fields is None
        or type(event.get("seq")) is not int
        or not all(isinstance(event.get(name), kind) for name, kind in fields.items())
        or not isinstance(event.get("hid", ""), str)
    ):
        return None
    return event


def history_id(hid: str) -> tuple[int, int] | None:
    """Return a history entry's id (``"<ms>-<n>"``) as a pair that sorts as the broker's order."""
    ms, _, n = hid.partition("-")
    if not (ms.isascii() and ms.isdigit() and n.isascii() and n.isdigit()):
        return None
    return int(ms), int(n)


class Cluster:
    """This server's side of the cluster: its events out, and what it knows of the others.

    *origin* tells this server's events apart from everyone else's: make it
    new for every run, so that numbering starts again without looking like
    a gap. *broker* takes the events out (:meth:`flush`).
    """

    def __init__(self, origin: str, broker: Broker) -> None:
        #: This server's id in every event it sends.
        self.origin = origin
        #: A short form of the id, which guests' names carry so that two
        #: servers never hand out the same one.
        self.tag = origin[:TAG_LENGTH]
        self.broker = broker
        #: Whether the link to the broker is up: events go out and come back.
        #: While it is down, the chat serves this server's clients alone.
        self.linked = False
        #: Whether it was ever up: coming back after a split is told to users.
        self.ever_linked = False
        #: The other servers heard from since the link came up, by origin.
        self.peers: dict[str, Peer] = {}
        #: Events from other servers that never arrived, seen as gaps in their numbering.
        self.lost = 0
        #: Room key -> how many of the other servers' members are in it, and its name as spelt.
        self.room_sizes: dict[str, int] = {}
        self.room_names: dict[str, str] = {}
        self._seq = 0
        self._outbox: list[Outgoing] = []
        # seq -> (kind, fields) of this server's events not yet back: what
        # its own clients would miss if the link fell now.
        self._in_flight: dict[int, tuple[str, dict[str, Any]]] = {}
        self._published_at = float("-inf")
        self._ticked_at: float | None = None

    def publish(self, kind: str, now: float, keep_in: str | None = None, **fields: Any) -> None:
        """Queue an event of *kind* for every server; it leaves at :meth:`flush`.

        *keep_in*, a room's key, has the broker keep it in that room's history.
        """
        self._seq += 1
        self._outbox.append((keep_in, encode_event(self.origin, self._seq, kind, fields)))
        self._in_flight[self._seq] = (kind, fields)
        self._published_at = now

    def forget_history(self, room: str) -> None:
        """Queue the dropping of *room*'s history on the broker: nobody is in it any more."""
        self._outbox.append((room, None))

    def flush(self) -> None:
        """Hand the queued events to the broker, all at once."""
        if self._outbox:
            outbox, self._outbox = self._outbox, []
            self.broker.publish(outbox)

    @property
    def in_flight(self) -> int:
        """Return how many of this server's events have not come back from the broker yet."""
        return len(self._in_flight)

    def came_back(self, seq: int) -> bool:
        """Record that this server's event *seq* came back; return whether it was still due.

        An event the chat delivered itself when the link fell may come back
        after all, once the link is up again: it must not be delivered twice.
        """
        return self._in_flight.pop(seq, None) is not None

    def take_in_flight(self) -> list[tuple[str, dict[str, Any]]]:
        """Return this server's events that never came back, oldest first, and forget them."""
        events = list(self._in_flight.values())
        self._in_flight.clear()
        self._outbox.clear()
        return events

    def quiet_since(self, now: float) -> bool:
        """Return whether this server has published nothing for a heartbeat."""
        return now - self._published_at >= HEARTBEAT

    def forget_peers(self) -> None:
        """Forget every other server: the link fell, or is up again and they say who they are."""
        self.peers.clear()
        self.room_sizes.clear()
        self.room_names.clear()

    def silent_peers(self, now: float) -> list[str]:
        """Return the origins of the servers not heard from for :data:`SERVER_LOST_AFTER`.

        Call it on every tick. A tick long after the last one means that
        this server stood still (paused, or starved of CPU): the others'
        words wait unread, so they get a fresh :data:`SERVER_LOST_AFTER`
        rather than being given up on for this server's silence.
        """
        stalled = self._ticked_at is not None and now - self._ticked_at > 3 * HEARTBEAT
        self._ticked_at = now
        if stalled:
            for peer in self.peers.values():
                peer.heard_at = max(peer.heard_at, now)
            return []
        return [
            origin for origin, peer in self.peers.items() if now - peer.heard_at > SERVER_LOST_AFTER
        ]

    def holder(self, key: str) -> tuple[str, str] | None:
        """Return ``(origin, name)`` of the user on another server whose name has *key*."""
        for origin, peer in self.peers.items():
            if key in peer.members:
                return origin, peer.members[key][0]
        return None

    def members_in(self, room: str) -> list[str]:
        """Return the other servers' members in the room whose key is *room*, as ``name@server``."""
        if not self.room_sizes.get(room):
            return []
        return [
            f"{name}@{origin[:TAG_LENGTH]}"
            for origin, peer in self.peers.items()
            for name, room_name in peer.members.values()
            if name_key(room_name) == room
        ]

    def set_member(self, origin: str, name: str, room_name: str) -> str | None:
        """Record that *name*, on *origin*, is in *room_name*; return the room it left, if any."""
        members = self.peers[origin].members
        left = self.drop_member(origin, name_key(name))
        members[name_key(name)] = (name, room_name)
        room = name_key(room_name)
        self.room_sizes[room] = self.room_sizes.get(room, 0) + 1
        self.room_names.setdefault(room, room_name)
        return left

    def drop_member(self, origin: str, key: str) -> str | None:
        """Forget the member with name *key* on *origin*; return the key of the room it was in."""
        entry = self.peers[origin].members.pop(key, None)
        if entry is None:
            return None
        room = name_key(entry[1])
        self.room_sizes[room] -= 1
        if not self.room_sizes[room]:
            del self.room_sizes[room], self.room_names[room]
        return room

    def drop_peer(self, origin: str) -> Peer:
        """Forget the server *origin* and its members; return what was known of it."""
        members = dict(self.peers[origin].members)
        for key in members:
            self.drop_member(origin, key)
        peer = self.peers.pop(origin)
        peer.members = members
        return peer
