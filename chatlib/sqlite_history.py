"""History that survives a restart and a crash: a SQLite file, through ``sqlite3``.

``python -m chatlib.server --store PATH`` keeps every room's recent
messages here. Three choices make it both safe and fast:

- **Commit before the echo.** The chat commits (:meth:`SQLiteHistory.commit`)
  before the engine writes out anything, so a message whose echo its sender
  has seen is on disk: it survives ``kill -9`` of the server.
- **Group commit.** A commit costs about the same for one row as for a
  hundred, so the chat commits once per batch of work (a turn of an event
  loop, a round of the threaded engine's sender), not once per message.
- **WAL, with synchronous=NORMAL.** Appending to the write-ahead log needs
  no fsync per commit; a committed transaction survives a crash of the
  process, though not necessarily a power cut (``synchronous=FULL`` would
  add an fsync to every commit for that).

Each room keeps its last :data:`~chatlib.history.HISTORY_KEPT` messages:
older ones are deleted as part of the commit that pushes them out.
"""

from __future__ import annotations

import logging
import sqlite3

from chatlib.history import HISTORY_KEPT, StoreError

__all__ = ["SQLiteHistory"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    room TEXT NOT NULL,
    line TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_room ON messages (room, id);
"""


class SQLiteHistory:
    """A :class:`~chatlib.history.HistoryStore` in the SQLite database at *path*.

    Opening checks the file: one that is not a SQLite database, is
    corrupt, or cannot be written raises :class:`~chatlib.history.StoreError`
    with a message that says so, before the server takes any client.

    Any thread may call it, one at a time (the threaded engine calls the
    chat under one lock).
    """

    def __init__(self, path: str, kept: int = HISTORY_KEPT) -> None:
        self.path = path
        self._kept = kept
        self._touched: set[str] = set()  # rooms with lines added since the last commit
        try:
            self._db = sqlite3.connect(path, check_same_thread=False)
        except sqlite3.Error as error:
            raise StoreError(f"cannot open the history store {path}: {error}") from None
        try:
            if self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0] != "wal":
                raise StoreError(f"the history store {path} cannot use write-ahead logging")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            # Reading every page finds a damaged file now, not at the first message.
            if (verdict := self._db.execute("PRAGMA quick_check").fetchone()[0]) != "ok":
                raise StoreError(f"the history store {path} is damaged: {verdict}")
            # A write, undone: a read-only file or directory shows up here.
            self._db.execute("INSERT INTO messages (room, line) VALUES ('', '')")
            self._db.rollback()
        except sqlite3.Error as error:
            self._db.close()
            raise StoreError(f"cannot use {path} as the history store: {error}") from None
        except StoreError:
            self._db.close()
            raise

    def add(self, room: str, line: str) -> None:
        """Add *line* to *room*'s history, in the transaction :meth:`commit` ends."""
        try:
            self._db.execute("INSERT INTO messages (room, line) VALUES (?, ?)", (room, line))
        except sqlite3.Error as error:  # the chat goes on without it
            log.error("history store %s: could not keep a message: %s", self.path, error)
        else:
            self._touched.add(room)

    def recent(self, room: str, count: int) -> list[str]:
        """Return *room*'s last *count* lines, oldest first (uncommitted ones too)."""
        rows = self._db.execute(
            "SELECT line FROM messages WHERE room = ? ORDER BY id DESC LIMIT ?",
            (room, max(0, count)),
        ).fetchall()
        return [line for (line,) in reversed(rows)]

    def commit(self) -> None:
        """Trim the rooms written to since the last commit, and commit, as one transaction.

        A failure (a full disk, a file removed under us) is logged, and the
        messages of this batch are lost to the store; the chat goes on.
        """
        if not self._touched:
            return
        try:
            for room in self._touched:
                self._db.execute(
                    "DELETE FROM messages WHERE room = ? AND id <= (SELECT id FROM messages"
                    " WHERE room = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                    (room, room, self._kept),
                )
            self._db.commit()
        except sqlite3.Error as error:
            log.error("history store %s: could not commit: %s", self.path, error)
            self._db.rollback()
        self._touched.clear()

    def forget(self, room: str) -> None:
        """Keep *room*'s lines: the store outlives the room."""

    def close(self) -> None:
        """Commit what is pending and close the database."""
        self.commit()
        self._db.close()
