"""The chat wire protocol, without any I/O.

Everything here works on values: bytes go in, lines and commands come out,
and lines to send come back as bytes. Nothing opens a socket, starts a thread
or reads a clock, so the same code serves every engine (threads, selectors,
asyncio) and every client, and tests can drive it without a network.

The wire format, in one breath: TCP, UTF-8 text, one message per line ending
in ``\\n`` (``\\r\\n`` accepted). ``docs/protocol.md`` has the full story.
"""

from __future__ import annotations

import collections
import re
import unicodedata
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "CLIENT_MAX_LINE",
    "COMMANDS",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "LOBBY",
    "MAX_NAME_LENGTH",
    "NAME_SEPARATORS",
    "NOTICES",
    "READ_SIZE",
    "Command",
    "LineFramer",
    "RoomTracker",
    "ServerLine",
    "encode_line",
    "format_notice",
    "name_key",
    "name_problem",
    "normalize_name",
    "parse_command",
    "parse_notice",
    "parse_server_line",
    "room_problem",
    "sanitize",
    "split_member",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5050

#: How many bytes an engine asks for in one ``recv()``. Big enough that a
#: busy client costs few system calls, small enough that one read never
#: lets a flooding client park much data in the server.
READ_SIZE = 64 * 1024

MAX_NAME_LENGTH = 32

#: The room everyone starts in, and goes back to with ``/part``.
LOBBY = "#lobby"

#: The longest line chatlib's clients accept from a server. The room keeps
#: every line it sends within it (a long member list is cut short), so only
#: a broken server ever hits it.
CLIENT_MAX_LINE = 64 * 1024

# --- Sanitising --------------------------------------------------------------

# Code points that could act on a terminal or reorder text instead of showing
# up as text: C0 controls (ESC starts ANSI sequences), DEL, C1 controls
# (U+009B is a one-character CSI on some terminals), the bidirectional
# overrides and isolates behind "Trojan Source" (CVE-2021-42574), and the
# line and paragraph separators, at which some displays start a new line
# that would look like a line from the server.
_C0 = {c: f"^{chr(c + 64)}" for c in range(0x20)}
_C0[0x09] = " "  # a tab is harmless; a space keeps columns predictable
_DEL = {0x7F: "^?"}
_C1 = dict.fromkeys(range(0x80, 0xA0), "\ufffd")
_BIDI = dict.fromkeys(
    [*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C], "\ufffd"
)
_SEPARATORS = {0x2028: "\ufffd", 0x2029: "\ufffd"}
_NEUTRALISE = str.maketrans({**_C0, **_DEL, **_C1, **_BIDI, **_SEPARATORS})


def sanitize(text: str) -> str:
    """Return *text* with every control character made visible and inert.

    C0 controls and DEL become caret notation (ESC shows as ``^[``), so a
    reader sees that something odd was sent; C1 controls, bidirectional
    overrides and the line and paragraph separators (U+2028, U+2029) become
    U+FFFD. The result is safe to print on any terminal.
    """
    return text.translate(_NEUTRALISE)


def encode_line(text: str) -> bytes:
    """Return *text* as one wire line: UTF-8 with a trailing ``\\n``."""
    return text.encode("utf-8") + b"\n"


# --- Framing -----------------------------------------------------------------


# Telnet's commands (RFC 854): each starts with IAC, a byte that never occurs
# in UTF-8 text, so they can be told from the text without any doubt.
_IAC, _SB, _SE = 255, 250, 240
_WILL, _WONT, _DO, _DONT = 251, 252, 253, 254
#: How to refuse an option: "do X" is answered "I won't", "I will X" is
#: answered "don't". Refusing is always allowed (RFC 854), and a refusal is
#: never answered, so no negotiation can loop.
_REFUSAL = {_DO: _WONT, _WILL: _DONT}


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

    With *telnet* true, as a server's framer is, the Telnet commands a
    ``telnet`` client mixes into the stream are taken out, subnegotiations
    included, and every option it offers or asks for is refused: send what
    :meth:`take_telnet_replies` returns back to the client. (After Ctrl-C,
    ``telnet`` discards everything it receives until its DO TIMING-MARK is
    answered.)
    """

    def __init__(self, max_line: int, telnet: bool = False) -> None:
        self.max_line = max_line
        #: How many lines were dropped for being too long, ever.
        self.overlong = 0
        self._buffer = bytearray()
        self._start = 0  # where the first unread line begins in _buffer
        self._discarding = False  # inside a too-long line, waiting for its end
        self._telnet = telnet
        # The Telnet command being read (it may be cut by a read boundary),
        # or None between commands.
        self._command: bytearray | None = None
        self._in_subnegotiation = False
        self._replies = bytearray()

    def feed(self, data: bytes) -> None:
        """Append *data*, a chunk of the stream, to what is buffered."""
        if self._telnet and (
            b"\xff" in data or self._command is not None or self._in_subnegotiation
        ):
            data = self._strip_telnet(data)
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

    def take_telnet_replies(self) -> bytes:
        """Return the answers to the Telnet commands fed so far, and forget them."""
        replies = bytes(self._replies)
        self._replies.clear()
        return replies

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

    def _strip_telnet(self, data: bytes) -> bytes:
        """Return *data* without its Telnet commands; queue the refusals they call for."""
        text = bytearray()
        position = 0
        while position < len(data):
            if self._command is not None:
                self._command.append(data[position])
                position += 1
                self._end_command()
                continue
            start = data.find(b"\xff", position)
            if start < 0:
                start = len(data)
            else:
                self._command = bytearray([_IAC])
            if not self._in_subnegotiation:  # a subnegotiation's bytes are dropped
                text += data[position:start]
            position = start + 1
        return bytes(text)

    def _end_command(self) -> None:
        """Act on the Telnet command in ``_command`` if it is complete."""
        command = self._command
        verb = command[1]
        if self._in_subnegotiation:
            # Only IAC SE ends it; IAC IAC is a 0xFF byte of its data.
            self._in_subnegotiation = verb != _SE
        elif verb in (_WILL, _WONT, _DO, _DONT):
            if len(command) < 3:
                return  # the option is still to come
            if verb in _REFUSAL:
                self._replies += bytes([_IAC, _REFUSAL[verb], command[2]])
        elif verb == _SB:
            self._in_subnegotiation = True
        # Anything else (IAC IP after Ctrl-C, IAC AYT, IAC IAC) is dropped.
        self._command = None

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
    "who": ("/who", "list who is in your room"),
    "me": ("/me ACTION", "say what you are doing, e.g. /me waves"),
    "msg": ("/msg NAME TEXT", "send a private message, to anyone in any room"),
    "join": ("/join #ROOM", "go to another room; it is made if needed"),
    "part": ("/part", f"go back to {LOBBY}"),
    "rooms": ("/rooms", "list the rooms and how many are in each"),
    "history": ("/history [N]", "show the last N messages of your room again"),
    "help": ("/help", "show this help"),
    "quit": ("/quit", "leave the chat (typing exit works too)"),
}


def parse_command(line: str) -> Command:
    """Split a client's line into a :class:`Command`.

    Spaces around the line do not count: ``" /quit"`` and ``"exit "`` leave
    too. A line that does not start with ``/`` is a chat message
    (``"say"``), and so is one starting with ``//``, which lets users say
    something that starts with a slash. A line that is ``exit`` means
    ``/quit``. Unknown commands come back as they are; the chat answers them
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


# --- Names -------------------------------------------------------------------

#: The characters besides letters and digits that a name may hold. Everything
#: else is refused: spaces and commas (they separate names in lists), and the
#: symbols and punctuation that make up or mimic the line markers (``*``,
#: ``<``, ``>``, ``!``, and lookalikes such as U+2217 ASTERISK OPERATOR,
#: U+204E LOW ASTERISK or U+2039 SINGLE LEFT-POINTING ANGLE QUOTATION MARK).
NAME_SEPARATORS = "-_."

# Unicode's Default_Ignorable_Code_Point (DerivedCoreProperties.txt): code
# points that display as nothing. Most are format characters, refused anyway;
# these ranges also catch the invisible letters and marks: the Hangul fillers,
# the combining grapheme joiner, the variation selectors.
_INVISIBLE = [
    (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160),
    (0x17B4, 0x17B5), (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E),
    (0x2060, 0x206F), (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
]  # fmt: skip

# A character's script, as the first word of its Unicode name says ("LATIN
# SMALL LETTER A", "CYRILLIC SMALL LETTER A"), with the few whose first word
# is not the script's name. ASCII digits and the separators belong to every
# script.
_SCRIPT_ALIASES = {
    "CJK": "HAN",
    "IDEOGRAPHIC": "HAN",
    "ARABIC-INDIC": "ARABIC",
    "EXTENDED": "ARABIC",  # EXTENDED ARABIC-INDIC DIGIT ...
    "KATAKANA-HIRAGANA": "KATAKANA",  # the prolonged sound mark, ー
}
#: Scripts a name may mix, as people write in them: Japanese mixes kanji,
#: hiragana and katakana, Korean hangul and hanja, Chinese han and bopomofo
#: (UTS #39's "highly restrictive" level). Any other name keeps to one script.
_SCRIPT_MIXES = [{"HAN", "HIRAGANA", "KATAKANA"}, {"HAN", "HANGUL"}, {"HAN", "BOPOMOFO"}]

# A skeleton for the letters of Cyrillic and Greek that look like Latin ones
# (after casefold(): the lower-case letters, and the lower-case forms of
# capitals that look Latin, such as Cyrillic and Greek capital H), and the
# Latin digits and pairs that look like letters: a small part of Unicode's
# confusables.txt (UTS #39). Names whose skeletons are equal cannot both be
# taken.
_SKELETON = str.maketrans(
    {
        **dict(zip("авеһнікӏмјорстуүхѕԁԛԝ", "abehhiklmjopctyyxsdqw", strict=True)),
        **dict(zip("αβεζηικμνοπρτυχ", "abezhikmvonptyx", strict=True)),
        "0": "o",
        "1": "l",
    }
)


def normalize_name(name: str) -> str:
    """Return *name* in the form the server keeps: NFKC, spaces around it removed.

    NFKC turns compatibility forms into plain ones: ``alice`` in fullwidth
    letters (U+FF41...) or in mathematical bold ones becomes plain ``alice``.
    """
    return unicodedata.normalize("NFKC", name).strip()


def name_key(name: str) -> str:
    """Return what two names must differ in to be told apart.

    Names that give the same key cannot both be in use: ``Alice``,
    ``ALICE``, ``a1ice``, and ``alice`` spelt with a Cyrillic a (U+0430) or
    in fullwidth letters all give ``alice``. The key is the name normalised, case-folded, and
    mapped to a confusables skeleton.
    """
    return normalize_name(name).casefold().replace("rn", "m").translate(_SKELETON)


def name_problem(name: str) -> str | None:
    """Return why *name* cannot be used, or ``None`` if it is fine.

    *name* must be normalised already (:func:`normalize_name`). A name is 1
    to 32 letters and digits of one script (see :data:`NAME_SEPARATORS` for
    the others), starting with a letter or digit, with nothing invisible in
    it: so it can never fake another line kind (see
    :func:`parse_server_line`) or pass for someone else. Uniqueness is the
    room's business.
    """
    if not name:
        return "A name needs at least one character."
    if len(name) > MAX_NAME_LENGTH:
        return f"A name has at most {MAX_NAME_LENGTH} characters."
    if any(_is_invisible(char) for char in name):
        return "A name cannot contain invisible characters."
    if not all(_is_name_char(char) for char in name):
        return "A name holds only letters, digits and the characters - _ . (no spaces or symbols)."
    if not _is_letter_or_digit(name[0]):
        return "A name starts with a letter or a digit."
    scripts = {_script(char) for char in name if _script(char) is not None}
    if len(scripts) > 1 and not any(scripts <= mix for mix in _SCRIPT_MIXES):
        return "A name keeps to one script: its letters cannot look like another alphabet's."
    return None


def room_problem(room: str) -> str | None:
    """Return why *room* cannot be a room's name, or ``None`` if it is fine.

    *room* must be normalised already (:func:`normalize_name`). A room's
    name is ``#`` and then a name under the rules of :func:`name_problem`,
    and two rooms are told apart by :func:`name_key`, as people are.
    """
    if not room.startswith("#"):
        return f"A room's name starts with #, as in {LOBBY}."
    if problem := name_problem(room[1:]):
        return f"After its #, a room's name is like a person's: {problem}"
    return None


def _is_invisible(char: str) -> bool:
    code = ord(char)
    return any(first <= code <= last for first, last in _INVISIBLE)


def _is_letter_or_digit(char: str) -> bool:
    return unicodedata.category(char)[0] == "L" or unicodedata.category(char) == "Nd"


# Letters that look like punctuation: the click letters (U+01C0 to U+01C3
# look like |, ||, a crossed bar and !), and the modifier letters, which look
# like quotes, primes and accents.
_PUNCTUATION_LETTERS = re.compile(r"[\u01c0-\u01c3\u02b0-\u02ff]")


def _is_name_char(char: str) -> bool:
    # Marks (accents, vowel signs) are fine as part of a letter: NFKC leaves
    # them where no precomposed letter exists, as in Devanagari.
    category = unicodedata.category(char)
    if _PUNCTUATION_LETTERS.match(char):
        return False
    return char in NAME_SEPARATORS or category[0] in "LM" or category == "Nd"


def _script(char: str) -> str | None:
    """Return the script of a letter, digit or mark; ``None`` for ASCII and separators."""
    if char.isascii() and not char.isalpha():
        return None  # digits and separators go with every script
    word = unicodedata.name(char, "UNKNOWN").split()[0]
    return _SCRIPT_ALIASES.get(word, word)


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


# --- Notices about the rooms -------------------------------------------------

_NAME = r"(?P<name>[^\s<>*]+)"
_ROOM = r"(?P<room>#[^\s<>*,]+)"

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
    # Entering a room, at connect or with /join: where you are and who is there.
    "entered": (
        "You are in {room} ({count} here): {names}{more}",
        re.compile(
            rf"You are in {_ROOM} \((?P<count>\d+) here\): (?P<names>.*?)"
            r"(?: \(and (?P<more>\d+) more\))?"
        ),
    ),
    "rooms": (
        "Rooms ({count}): {rooms}{more}",
        re.compile(r"Rooms \((?P<count>\d+)\): (?P<rooms>.*?)(?: \(and (?P<more>\d+) more\))?"),
    ),
    # Recent messages, replayed between these two notices: clients show them apart.
    "history": (
        "Recent messages in {room} ({count}):",
        re.compile(rf"Recent messages in {_ROOM} \((?P<count>\d+)\):"),
    ),
    "history-end": (
        "End of recent messages in {room}.",
        re.compile(rf"End of recent messages in {_ROOM}\."),
    ),
    # With several servers (chatlib.cluster), a newcomer's server is named:
    # "alice joined on server 1f0a."; member lists then give each name's
    # server too, "alice@1f0a" (see split_member).
    "joined": (
        "{name} joined{where}.",
        re.compile(rf"{_NAME} joined(?: on server (?P<server>[0-9a-f]+))?\."),
    ),
    "left": ("{name} left{reason}.", re.compile(rf"{_NAME} left(?: \(.*\))?\.")),
    "renamed": (
        "{old} is now known as {name}.",
        re.compile(rf"(?P<old>[^\s<>*]+) is now known as {_NAME}\."),
    ),
    # Several servers on a broker (chatlib.cluster): which one you are on, told
    # on arrival; the link down, and up again.
    "server": (
        "You are on server {server} ({state}).",
        re.compile(r"You are on server (?P<server>[0-9a-f]+) \((?P<state>.*)\)\."),
    ),
    "split": (
        "Lost the link to the other servers ({reason}): until it is back, only the people"
        " on this server see what you say.",
        re.compile(r"Lost the link to the other servers \((?P<reason>.*)\): until it is back, .*"),
    ),
    "linked": (
        "Linked with the other servers again.",
        re.compile(r"Linked with the other servers again\."),
    ),
    "lost-messages": (
        "{count} messages from another server were lost on the way.",
        re.compile(r"(?P<count>\d+) messages from another server were lost on the way\."),
    ),
    # Two servers gave one name at once, or during a split: one side is renamed.
    "collision": (
        "The name {old} was taken on another server at the same time: you are now {name}.",
        re.compile(
            rf"The name (?P<old>[^\s<>*]+) was taken on another server at the same time:"
            rf" you are now {_NAME}\."
        ),
    ),
    # A room past Limits.announce_up_to members stops announcing joins and leaves.
    "quiet": (
        "More than {limit} here: joins and leaves are no longer announced; /who lists everyone.",
        re.compile(r"More than (?P<limit>\d+) here: joins and leaves are no longer announced; .*"),
    ),
    "announcing": (
        "{count} here now: joins and leaves are announced again.",
        re.compile(r"(?P<count>\d+) here now: joins and leaves are announced again\."),
    ),
}


def format_notice(event: str, **fields: object) -> str:
    """Return the notice text for *event* (a key of :data:`NOTICES`); missing fields are empty."""
    return NOTICES[event][0].format_map(collections.defaultdict(str, fields))


def split_member(entry: str) -> tuple[str, str | None]:
    """Split an entry of a member list into the name and its server, if the list gives it.

    ``"alice@1f0a"`` is alice on server 1f0a; a server on its own lists
    ``"alice"``, with no server. A name never holds ``@``.
    """
    name, _, server = entry.partition("@")
    return name, server or None


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


class RoomTracker:
    """Follow which room you are in, and which lines replay earlier messages.

    Give :meth:`track` every line the server sends, in order. A client
    learns its room from the "entered" notice (``*** You are in #maths (2
    here): ...``), sent on arrival and after each ``/join`` or ``/part``; the
    lines between the "history" and "history-end" notices (see
    :data:`~chatlib.protocol.NOTICES`) are earlier messages replayed, which a
    client should show apart from live ones. Nothing here does I/O.
    """

    def __init__(self) -> None:
        #: The room the server last said you are in; ``None`` until it has.
        self.room: str | None = None
        #: The room whose recent messages are being replayed; ``None`` between replays.
        self.replaying: str | None = None

    def track(self, line: ServerLine) -> str:
        """Note what *line* tells about the room; return its part in the conversation.

        The part is ``"history"`` for the notice that starts a replay,
        ``"replayed"`` for each line replayed, ``"history-end"`` for the
        notice that ends it, and ``"live"`` for everything else. A replay
        also ends at any other notice or error line: the server sends one in
        a single piece, so either means its end notice went missing, and
        live lines must not pass for old ones.
        """
        notice = parse_notice(line.text) if line.kind == "notice" else None
        event, fields = notice or (None, {})
        if self.replaying is not None:
            if line.kind not in ("notice", "error"):
                return "replayed"
            self.replaying = None
            if event == "history-end":
                return "history-end"
        if event == "history":
            self.replaying = fields["room"]
            return "history"
        if event == "entered":
            self.room = fields["room"]
        return "live"
