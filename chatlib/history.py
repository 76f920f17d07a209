"""Where each room's recent messages are kept, for whoever arrives late.

The chat (:class:`chatlib.chat.Chat`) talks to a :class:`HistoryStore`
only: it adds every chat line and ``/me`` it relays, asks for the last few
when someone enters a room or types ``/history``, and commits once per batch
of work, before the engine writes anything out. So a message whose echo its
sender has seen is in the store already.

:class:`MemoryHistory`, a ring of lines per room, is the default: nothing to
set up, gone when the server stops. :class:`chatlib.sqlite_history.SQLiteHistory`
keeps history in a file, across restarts and crashes.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

__all__ = ["HISTORY_KEPT", "HISTORY_SHOWN", "HistoryStore", "MemoryHistory", "StoreError"]

#: Messages kept per room, in memory or in a store: the most ``/history N``
#: and ``--history`` can replay. A screenful or two of scrollback, as
#: InspIRCd's channel history keeps; a store never grows past it.
HISTORY_KEPT = 100

#: How many recent messages someone entering a room is shown, unless
#: ``--history`` says otherwise; and what ``/history`` shows without a number.
HISTORY_SHOWN = 20


class StoreError(Exception):
    """A history store that cannot be opened or used, with a message for the user."""


class HistoryStore(Protocol):
    """What the chat needs from wherever history is kept.

    Rooms are given by their key (:func:`chatlib.protocol.name_key` of the
    name), so ``#Maths`` and ``#maths`` share one history. Lines are the
    text the chat relayed, without their newline.
    """

    def add(self, room: str, line: str) -> None:
        """Keep *line*, just relayed in *room*; it may wait for :meth:`commit`."""

    def recent(self, room: str, count: int) -> list[str]:
        """Return *room*'s last *count* lines (at most), oldest first, uncommitted ones too."""

    def commit(self) -> None:
        """Make every line added so far durable; the chat calls it before anything is sent."""

    def forget(self, room: str) -> None:
        """*room* is empty and gone; a store that outlives rooms keeps its lines."""

    def close(self) -> None:
        """Commit and let go of whatever the store holds open."""


class MemoryHistory:
    """History as a ring of the last :data:`HISTORY_KEPT` lines per room, in memory.

    An empty room's ring goes with it: only a store keeps history for nobody.
    """

    def __init__(self, kept: int = HISTORY_KEPT) -> None:
        self._kept = kept
        self._rooms: dict[str, deque[str]] = {}

    def add(self, room: str, line: str) -> None:
        """Keep *line*; the oldest of *room*'s lines goes once it holds ``kept``."""
        if room not in self._rooms:
            self._rooms[room] = deque(maxlen=self._kept)
        self._rooms[room].append(line)

    def recent(self, room: str, count: int) -> list[str]:
        """Return *room*'s last *count* lines, oldest first."""
        ring = self._rooms.get(room, ())
        return list(ring)[-count:] if count > 0 else []

    def commit(self) -> None:
        """Do nothing: memory has nothing to make durable."""

    def forget(self, room: str) -> None:
        """Drop *room*'s ring."""
        self._rooms.pop(room, None)

    def close(self) -> None:
        """Do nothing: memory holds nothing open."""
