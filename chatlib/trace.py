"""What an engine did, as data: an optional trace hook, off by default.

Pass any callable as ``trace`` to an engine (``ChatServer(..., trace=f)``
or ``create_server(..., trace=f)``) and the engine calls ``f(event)`` with
one of the small records below each time it waits, reads, writes, accepts
or closes. Without one (``trace=None``, the default) each point costs one
``is not None`` test: no event is built and nothing is called.

Every engine reports at the same points, so one trace reads the same
whatever the engine:

- :class:`Accepted` when a client's connection is accepted;
- :class:`Ready` when the engine finds sockets ready to read. The
  selectors engine reports every client socket one ``select()`` found
  readable, in one event per turn of its loop (empty when only the
  listener, the wake-up socket, a timer or a client's writable socket woke
  it); a reader thread of the threaded engine, and asyncio's loop, which
  calls one protocol at a time, report the one socket whose read has just
  returned, right before its :class:`Received`;
- :class:`Received` with what one read returned (``b""``: the end of the
  client's stream);
- :class:`Sent` with what one write handed over: to the kernel (threads,
  selectors) or to asyncio's transport, which passes it on as the kernel
  takes it;
- :class:`Closed` when the engine closes the connection's socket.

Connections are named by their peer address, ``(host, port)``: the
address a client's own socket has (``sock.getsockname()``).

The threaded engine calls the hook from its reader, sender and writer
threads: the hook must be safe to call from several threads at once.
``list.append`` is, and :class:`Recorder` uses it. Whatever the engine,
the hook runs inside the engine's loop or threads, so it must be quick and
must never block (and in a notebook, never print).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "EVENTS",
    "Accepted",
    "Closed",
    "Event",
    "Peer",
    "Ready",
    "Received",
    "Recorder",
    "Sent",
    "Trace",
]

#: A connection, named by the client's address: ``(host, port)``.
Peer = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Accepted:
    """The engine accepted a client's connection."""

    peer: Peer


@dataclass(frozen=True, slots=True)
class Ready:
    """The engine found these connections' sockets ready to read."""

    peers: tuple[Peer, ...]


@dataclass(frozen=True, slots=True)
class Received:
    """One read from *peer* returned *data* (``b""``: the client ended its stream)."""

    peer: Peer
    data: bytes


@dataclass(frozen=True, slots=True)
class Sent:
    """One write handed *data* over, on its way to *peer*."""

    peer: Peer
    data: bytes


@dataclass(frozen=True, slots=True)
class Closed:
    """The engine closed *peer*'s socket; *cut_off*: with a reset, not a goodbye."""

    peer: Peer
    cut_off: bool


Event = Accepted | Ready | Received | Sent | Closed

#: Every kind of event, in the order a connection meets them.
EVENTS = (Accepted, Ready, Received, Sent, Closed)

#: What an engine's ``trace`` argument takes.
Trace = Callable[[Event], None]


class Recorder:
    """A trace hook that keeps every event, in the order they came.

    It keeps every payload too, with no bound: for a short run, a test
    or a notebook, not for a server left running.

    ``recorder = Recorder()``, then ``ChatServer(..., trace=recorder)``;
    read :attr:`events` while or after the server runs.
    """

    def __init__(self) -> None:
        #: Every event so far. Appending is atomic, so any thread may add.
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def of(self, peer: Peer) -> list[Event]:
        """Return the events about *peer*, in order (a :class:`Ready` that lists it included)."""
        return [
            event
            for event in list(self.events)
            if (peer in event.peers if isinstance(event, Ready) else event.peer == peer)
        ]

    def sent_to(self, peer: Peer) -> bytes:
        """Return everything written to *peer* so far, joined."""
        return b"".join(event.data for event in self.of(peer) if isinstance(event, Sent))

    def received_from(self, peer: Peer) -> bytes:
        """Return everything read from *peer* so far, joined."""
        return b"".join(event.data for event in self.of(peer) if isinstance(event, Received))
