"""The chat wire protocol, without any I/O.

Everything here works on values: bytes go in, lines and commands come out,
and lines to send come back as bytes. Nothing opens a socket, starts a thread
or reads a clock, so the same code serves every engine (threads, selectors,
asyncio) and every client, and tests can drive it without a network.

The wire format, in one breath: TCP, UTF-8 text, one message per line ending
in ``\\n`` (``\\r\\n`` accepted). ``docs/protocol.md`` has the full story.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "CLIENT_MAX_LINE",
    "COMMANDS",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "MAX_NAME_LENGTH",
    "NOTICES",
    "READ_SIZE",
    "Command",
    "LineFramer",
    "ServerLine",
    "encode_line",
    "format_notice",
    "name_problem",
    "parse_command",
    "parse_notice",
    "parse_server_line",
    "sanitize",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5050

#: How many bytes an engine asks for in one ``recv()``. Big enough that a
#: busy client costs few system calls, small enough that one read never
#: lets a flooding client park much data in the server.
READ_SIZE = 64 * 1024

MAX_NAME_LENGTH = 32

#: The longest line chatlib's clients accept from a server. The room keeps
#: every line it sends within it (a long member list is cut short), so only
#: a broken server ever hits it.
CLIENT_MAX_LINE = 64 * 1024

# --- Sanitising --------------------------------------------------------------

# Code points that could act on a terminal or reorder text instead of showing
# up as text: C0 controls (ESC starts ANSI sequences), DEL, C1 controls
# (U+009B is a one-character CSI on some terminals), and the bidirectional
# overrides and isolates behind "Trojan Source" (CVE-2021-42574).
_C0 = {c: f"^{chr(c + 64)}" for c in range(0x20)}
_C0[0x09] = " "  # a tab is harmless; a space keeps columns predictable
_DEL = {0x7F: "^?"}
_C1 = dict.fromkeys(range(0x80, 0xA0), "\ufffd")
_BIDI = dict.fromkeys(
    [*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C], "\ufffd"
)
_NEUTRALISE = str.maketrans({**_C0, **_DEL, **_C1, **_BIDI})


def sanitize(text: str) -> str:
    """Return *text* with every control character made visible and inert.

    C0 controls and DEL become caret notation (ESC shows as ``^[``), so a
    reader sees that something odd was sent; C1 controls and bidirectional
    overrides become U+FFFD. The result is safe to print on any terminal.
    """
    return text.translate(_NEUTRALISE)


def encode_line(text: str) -> bytes:
    """Return *text* as one wire line: UTF-8 with a trailing ``\\n``."""
    return text.encode("utf-8") + b"\n"


# --- Framing -----------------------------------------------------------------


class LineFramer:
    """Cut a byte stream into lines, never holding more than one line's worth.

    TCP delivers a stream, not messages: one ``recv()`` may hold half a line,
    or three lines and the start of a fourth. Give every chunk to
    :meth:`feed` in order, then call :meth:`next_line` until it returns
    ``None``. Lines come out decoded and sanitised, without their ending.

    A line longer than *max_line* bytes (not counting ``\\n`` or ``\\r\\n``)
    never comes out: the framer drops it, skips to the next newline and
    counts it in :attr:`overlong`. An endless line therefore costs at most
    *max_line* bytes of memory, however long it runs.
    """

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        #: How many lines were dropped for being too long, ever.
        self.overlong = 0
        self._buffer = bytearray()
        self._start = 0  # where the first unread line begins in _buffer
        self._discarding = False  # inside a too-long line, waiting for its end

    def feed(self, data: bytes) -> None:
        """Append *data*, a chunk of the stream, to what is buffered."""
        if self._discarding:
            newline = data.find(b"\n")
            if newline < 0:
                return
            data = data[newline + 1 :]
            self._discarding = False
        # Forget the lines already read before taking more.
        del self._buffer[: self._start]
        self._start = 0
        self._buffer += data
        tail = self._buffer.rfind(b"\n") + 1
        # +1 leaves room for the "\r" of a "\r\n" whose "\n" is yet to come.
        if len(self._buffer) - tail > self.max_line + 1:
            del self._buffer[tail:]
            self.overlong += 1
            self._discarding = True

    def next_line(self) -> str | None:
        """Return the next complete line, or ``None`` until more data comes."""
        while True:
            end = self._buffer.find(b"\n", self._start)
            if end < 0:
                return None
            raw = bytes(self._buffer[self._start : end]).removesuffix(b"\r")
            self._start = end + 1
            if len(raw) > self.max_line:
                self.overlong += 1
                continue
            return _decode(raw)

    def has_line(self) -> bool:
        """Return whether :meth:`next_line` would return a line now."""
        return self._buffer.find(b"\n", self._start) >= 0

    def finish(self) -> str | None:
        """Return the unterminated last line at the end of the stream, if any.

        Call this once the peer has closed its side and :meth:`next_line`
        has returned ``None``: ``nc`` sends a final line without ``\\n`` when
        the user presses Ctrl-D mid-line. A last line that is too long is
        dropped and counted like any other.
        """
        raw = bytes(self._buffer[self._start :]).removesuffix(b"\r")
        self._buffer.clear()
        self._start = 0
        discarding, self._discarding = self._discarding, False
        if discarding or not raw:
            return None
        if len(raw) > self.max_line:
            self.overlong += 1
            return None
        return _decode(raw)

    @property
    def buffered(self) -> int:
        """Return how many bytes the framer holds that no line has used yet."""
        return len(self._buffer) - self._start


def _decode(raw: bytes) -> str:
    # errors="replace": a client sending broken UTF-8 still gets its line
    # through, and nobody downstream ever receives invalid UTF-8.
    return sanitize(raw.decode("utf-8", errors="replace"))


# --- Commands ----------------------------------------------------------------


class Command(NamedTuple):
    """A line from a client, split into what it asks for.

    *name* is the command without its slash (``"nick"``, ``"msg"``), or
    ``"say"`` for a plain chat message; *args* is the rest of the line.
    """

    name: str
    args: str


#: Every command a client may send, with its one-line help.
COMMANDS = {
    "nick": ("/nick NAME", "choose your name"),
    "who": ("/who", "list who is here"),
    "me": ("/me ACTION", "say what you are doing, e.g. /me waves"),
    "msg": ("/msg NAME TEXT", "send a private message"),
    "help": ("/help", "show this help"),
    "quit": ("/quit", "leave the chat (typing exit works too)"),
}


def parse_command(line: str) -> Command:
    """Split a client's line into a :class:`Command`.

    Spaces around the line do not count: ``" /quit"`` and ``"exit "`` leave
    too. A line that does not start with ``/`` is a chat message
    (``"say"``), and so is one starting with ``//``, which lets users say
    something that starts with a slash. A line that is ``exit`` means
    ``/quit``. Unknown commands come back as they are; the room answers them
    with an error line. Clients use this function too, so that they and the
    server agree on which lines leave.
    """
    line = line.strip()
    if line == "exit":
        return Command("quit", "")
    if not line.startswith("/"):
        return Command("say", line)
    if line.startswith("//"):
        return Command("say", line[1:])
    name, _, args = line[1:].partition(" ")
    return Command(name.lower(), args.strip())


_BAD_NAME_CHARS = re.compile(r"[\s<>*]")


def name_problem(name: str) -> str | None:
    """Return why *name* cannot be used, or ``None`` if it is fine.

    Names are 1 to 32 characters with no spaces, ``<``, ``>``, ``*`` or
    control characters, so a name can never fake another line kind (see
    :func:`parse_server_line`). Uniqueness is the room's business.
    """
    if not name:
        return "A name needs at least one character."
    if len(name) > MAX_NAME_LENGTH:
        return f"A name has at most {MAX_NAME_LENGTH} characters."
    if _BAD_NAME_CHARS.search(name) or any(
        unicodedata.category(c) in ("Cc", "Cf") or c in "^\ufffd" for c in name
    ):
        # "^" and U+FFFD are what sanitize() turned controls into.
        return "A name cannot contain spaces, <, >, *, ^ or control characters."
    return None


# --- Lines from the server ---------------------------------------------------


@dataclass(frozen=True)
class ServerLine:
    """One line from the server, classified for a client to display.

    *kind* is one of ``"message"`` (``<name> text``), ``"action"``
    (``* name text``), ``"private"`` (``*name* text``, sent to you),
    ``"private-sent"`` (``-> *name* text``, your copy of what you sent),
    ``"notice"`` (``*** text``), ``"error"`` (``!!! text``) or ``"other"``.
    *name* is the person involved, when there is one.
    """

    kind: str
    text: str
    name: str | None = None


_SERVER_LINE_PATTERNS = [
    ("message", re.compile(r"<(?P<name>[^\s<>*]+)> (?P<text>.*)")),
    ("private-sent", re.compile(r"-> \*(?P<name>[^\s<>*]+)\* (?P<text>.*)")),
    ("notice", re.compile(r"\*\*\* (?P<text>.*)")),
    ("action", re.compile(r"\* (?P<name>[^\s<>*]+) (?P<text>.*)")),
    ("private", re.compile(r"\*(?P<name>[^\s<>*]+)\* (?P<text>.*)")),
    ("error", re.compile(r"!!! (?P<text>.*)")),
]


def parse_server_line(line: str) -> ServerLine:
    """Classify one line received from the server (without its ``\\n``)."""
    for kind, pattern in _SERVER_LINE_PATTERNS:
        match = pattern.fullmatch(line)
        if match:
            return ServerLine(kind, match["text"], match.groupdict().get("name"))
    return ServerLine("other", line)


# --- Notices about the room --------------------------------------------------

_NAME = r"(?P<name>[^\s<>*]+)"

#: The server's announcements about who is here, as (template, pattern)
#: pairs. The room fills the templates in; clients that keep a member list
#: (the chat panel) read them back with :func:`parse_notice`.
NOTICES = {
    "welcome": (
        "Welcome to chatlib, {name}! Choose a name with /nick NAME; /help lists the commands.",
        re.compile(rf"Welcome to chatlib, {_NAME}! .*"),
    ),
    # A long list is cut short to fit CLIENT_MAX_LINE: "Online (5000): a, b (and 4998 more)".
    "members": (
        "Online ({count}): {names}{more}",
        re.compile(r"Online \((?P<count>\d+)\): (?P<names>.*?)(?: \(and (?P<more>\d+) more\))?"),
    ),
    "joined": ("{name} joined.", re.compile(rf"{_NAME} joined\.")),
    "left": ("{name} left{reason}.", re.compile(rf"{_NAME} left(?: \(.*\))?\.")),
    "renamed": (
        "{old} is now known as {name}.",
        re.compile(rf"(?P<old>[^\s<>*]+) is now known as {_NAME}\."),
    ),
}


def format_notice(event: str, **fields: object) -> str:
    """Return the notice text for *event* (a key of :data:`NOTICES`)."""
    return NOTICES[event][0].format(**fields)


def parse_notice(text: str) -> tuple[str, dict[str, str]] | None:
    """Recognise a notice's text as one of :data:`NOTICES`.

    Return ``(event, fields)``, e.g. ``("renamed", {"old": "guest1",
    "name": "alice"})``; for ``"members"`` the fields hold ``names``, a
    comma-separated list, and ``more``: ``None``, or how many names did not
    fit on the line. Return ``None`` for any other notice.
    """
    for event, (_, pattern) in NOTICES.items():
        match = pattern.fullmatch(text)
        if match:
            return event, match.groupdict()
    return None
