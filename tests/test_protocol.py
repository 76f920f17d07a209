"""The wire protocol on values alone: framing, sanitising, commands, server lines, notices."""

from __future__ import annotations

import itertools
import tracemalloc
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatlib.protocol import (
    COMMANDS,
    MAX_NAME_LENGTH,
    NOTICES,
    Command,
    LineFramer,
    ServerLine,
    encode_line,
    format_notice,
    name_key,
    name_problem,
    normalize_name,
    parse_command,
    parse_notice,
    parse_server_line,
    room_problem,
    sanitize,
    split_member,
)
from tests.helpers import FORBIDDEN, forbidden_in


def drain(framer: LineFramer) -> list[str]:
    """Return every complete line the framer has, as the docstring says to read them."""
    lines = []
    while (line := framer.next_line()) is not None:
        lines.append(line)
    return lines


def frame(chunks: list[bytes], max_line: int = 512) -> tuple[list[str], LineFramer]:
    framer = LineFramer(max_line)
    lines = []
    for chunk in chunks:
        framer.feed(chunk)
        lines += drain(framer)
    return lines, framer


# --- LineFramer ----------------------------------------------------------------


def test_lf_and_crlf_endings_are_both_removed():
    assert frame([b"one\ntwo\r\n"])[0] == ["one", "two"]


def test_several_lines_in_one_chunk_come_out_in_order():
    assert frame([b"a\nb\nc\nd"])[0] == ["a", "b", "c"]


def test_a_line_split_across_chunks_comes_out_whole():
    assert frame([b"hel", b"lo wo", b"rld", b"\n"])[0] == ["hello world"]


def test_crlf_split_between_chunks_still_counts_as_one_ending():
    assert frame([b"hello\r", b"\nnext\n"])[0] == ["hello", "next"]


def test_next_line_returns_none_until_the_line_is_complete():
    framer = LineFramer(512)
    framer.feed(b"partial")
    assert framer.next_line() is None
    assert not framer.has_line()
    framer.feed(b" line\n")
    assert framer.has_line()
    assert framer.next_line() == "partial line"
    assert framer.next_line() is None


@pytest.mark.parametrize("text", ["é", "€", "😀", "日本語"])
def test_a_utf8_character_split_across_chunks_is_rebuilt(text):
    data = f"<{text}>\n".encode()
    for cut in range(1, len(data)):
        assert frame([data[:cut], data[cut:]])[0] == [f"<{text}>"], cut
    assert frame([bytes([byte]) for byte in data])[0] == [f"<{text}>"]


def test_a_line_of_exactly_max_line_bytes_passes():
    assert frame([b"x" * 16 + b"\n", b"y" * 16 + b"\r\n"], max_line=16)[0] == ["x" * 16, "y" * 16]


def test_an_overlong_line_is_dropped_and_counted():
    lines, framer = frame([b"ok\n" + b"x" * 17 + b"\nafter\n"], max_line=16)
    assert lines == ["ok", "after"]
    assert framer.overlong == 1


def test_an_overlong_line_split_across_chunks_is_dropped_once():
    chunks = [b"x" * 10] * 10 + [b"\nafter\n"]
    lines, framer = frame(chunks, max_line=16)
    assert lines == ["after"]
    assert framer.overlong == 1


def test_an_overlong_line_is_counted_before_its_end_arrives():
    framer = LineFramer(16)
    framer.feed(b"x" * 100)
    assert framer.overlong == 1
    assert framer.next_line() is None


def test_an_endless_line_never_holds_more_than_max_line_plus_one():
    framer = LineFramer(64)
    for size in [1, 7, 63, 64, 65, 1000, 65536] * 20:
        framer.feed(b"z" * size)
        assert framer.next_line() is None
        assert framer.buffered <= 64 + 1
    assert framer.overlong == 1
    framer.feed(b"tail\nnext\n")
    assert drain(framer) == ["next"]
    assert framer.buffered == 0


def test_cr_just_before_the_limit_waits_for_its_lf():
    # max_line bytes, then the "\r" of "\r\n": not too long yet, the "\n" may follow.
    framer = LineFramer(8)
    framer.feed(b"x" * 8 + b"\r")
    assert framer.overlong == 0
    framer.feed(b"\n")
    assert drain(framer) == ["x" * 8]
    # max_line bytes, "\r" and something else: the line is too long after all.
    framer.feed(b"y" * 8 + b"\r")
    framer.feed(b"z\n")
    assert drain(framer) == []
    assert framer.overlong == 1


def test_finish_returns_the_unterminated_last_line():
    framer = LineFramer(512)
    framer.feed(b"done\nlast words")
    assert drain(framer) == ["done"]
    assert framer.finish() == "last words"
    assert framer.buffered == 0


def test_finish_strips_a_trailing_cr_and_ignores_an_empty_rest():
    framer = LineFramer(512)
    framer.feed(b"last\r")
    assert framer.finish() == "last"
    framer.feed(b"line\n")
    assert drain(framer) == ["line"]
    assert framer.finish() is None


def test_finish_drops_the_rest_of_an_overlong_line():
    framer = LineFramer(8)
    framer.feed(b"x" * 100)
    assert framer.finish() is None
    assert framer.overlong == 1


def test_finish_drops_a_final_line_one_byte_over_the_limit():
    framer = LineFramer(8)
    framer.feed(b"x" * 9)
    assert framer.finish() is None
    assert framer.overlong == 1


def _frame_with_has_line(framer: LineFramer, chunk: bytes, rounds: int) -> None:
    # The loop Chat._process uses: ask has_line() first, so next_line() never returns None.
    for _ in range(rounds):
        framer.feed(chunk)
        while framer.has_line():
            assert framer.next_line() is not None


def test_lines_read_until_none_are_freed():
    framer = LineFramer(512)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(2000):
            framer.feed(b"x" * 100 + b"\n" + b"y" * 100 + b"\n")
            assert drain(framer) == ["x" * 100, "y" * 100]
        growth = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert growth < 64 * 1024, f"framer kept {growth} bytes after 400 kB of read lines"


def test_lines_read_after_has_line_are_freed():
    framer = LineFramer(512)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        _frame_with_has_line(framer, b"x" * 100 + b"\n" + b"y" * 100 + b"\n", rounds=2000)
        growth = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert growth < 64 * 1024, f"framer kept {growth} bytes after 400 kB of read lines"


def test_invalid_utf8_becomes_replacement_characters():
    lines = frame([b"caf\xc3 \xff\xfe ok \xed\xa0\x80 \xc0\xaf\n"])[0]
    assert lines == ["caf\ufffd \ufffd\ufffd ok \ufffd\ufffd\ufffd \ufffd\ufffd"]


def test_framed_lines_are_sanitised():
    assert frame([b"\x1b[31mred\x07\x7f\n"])[0] == ["^[[31mred^G^?"]


# Lines of arbitrary bytes (no "\n"), some longer than the small max_line used below.
_line_bytes = st.binary(max_size=24).map(lambda b: b.replace(b"\n", b""))
_endings = st.sampled_from([b"\n", b"\r\n"])


def _expected(raw: bytes, max_line: int) -> str | None:
    raw = raw.removesuffix(b"\n").removesuffix(b"\r")
    return None if len(raw) > max_line else sanitize(raw.decode("utf-8", errors="replace"))


@settings(deadline=None)  # a shared machine may pause any example
@given(
    lines=st.lists(st.tuples(_line_bytes, _endings), max_size=12),
    rest=_line_bytes,
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=20),
    max_line=st.integers(min_value=1, max_value=20),
)
def test_framing_does_not_depend_on_how_bytes_are_chunked(lines, rest, cuts, max_line):
    stream = b"".join(line + ending for line, ending in lines) + rest
    points = sorted({cut for cut in cuts if cut < len(stream)} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in itertools.pairwise(points)]

    whole, whole_framer = frame([stream], max_line)
    chunked, chunked_framer = frame(chunks, max_line)

    assert chunked == whole
    assert chunked_framer.overlong == whole_framer.overlong
    assert chunked_framer.finish() == whole_framer.finish()
    # Both agree with what the lines should be, overlong ones left out.
    wanted = [_expected(line + ending, max_line) for line, ending in lines]
    assert whole == [line for line in wanted if line is not None]


@settings(deadline=None)  # a shared machine may pause any example
@given(st.text())
def test_sanitize_leaves_no_control_or_bidi_character(text):
    clean = sanitize(text)
    assert not forbidden_in(clean)
    assert clean.encode("utf-8").decode("utf-8") == clean


@settings(deadline=None)  # a shared machine may pause any example
@given(st.text().filter(lambda t: not any(ord(c) in FORBIDDEN for c in t)))
def test_sanitize_leaves_safe_text_alone(text):
    assert sanitize(text) == text


@settings(deadline=None)  # a shared machine may pause any example
@given(st.binary(max_size=200).map(lambda b: b.replace(b"\n", b"")))
def test_any_bytes_come_out_as_valid_clean_utf8(data):
    framer = LineFramer(1000)
    framer.feed(data + b"\n")
    (line,) = drain(framer)
    assert line.encode("utf-8").decode("utf-8") == line  # no lone surrogates
    assert not forbidden_in(line)


def test_sanitize_shows_controls_in_caret_notation():
    assert sanitize("\x00\x1b[2J\x7f") == "^@^[[2J^?"
    assert sanitize("a\tb") == "a b"
    assert (
        sanitize("\x9b31m \u202eevil \u2066x\u2069 \u200f")
        == "\ufffd31m \ufffdevil \ufffdx\ufffd \ufffd"
    )


def test_encode_line_is_utf8_with_one_newline():
    assert encode_line("héllo") == "héllo\n".encode()


# --- Commands ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "command"),
    [
        ("hello there", Command("say", "hello there")),
        ("//help is a command", Command("say", "/help is a command")),
        ("//", Command("say", "/")),
        ("exit", Command("quit", "")),
        ("exit now", Command("say", "exit now")),
        ("/quit", Command("quit", "")),
        ("/QUIT", Command("quit", "")),
        ("/Nick  alice ", Command("nick", "alice")),
        ("/msg bob hi there", Command("msg", "bob hi there")),
        ("/me waves", Command("me", "waves")),
        ("/who", Command("who", "")),
        ("/help", Command("help", "")),
        ("/frobnicate x", Command("frobnicate", "x")),
        ("/", Command("", "")),
    ],
)
def test_parse_command(line, command):
    assert parse_command(line) == command


# The terminal client decides with parse_command whether a line leaves, so
# the server and it agree on every one of these.
@pytest.mark.parametrize(
    ("line", "command"),
    [
        ("exit ", Command("quit", "")),
        (" exit", Command("quit", "")),
        ("  exit  ", Command("quit", "")),
        (" /quit", Command("quit", "")),
        ("/quit ", Command("quit", "")),
        (" /nick alice ", Command("nick", "alice")),
        (" // slash", Command("say", "/ slash")),
        ("  hello  ", Command("say", "hello")),
        (" exit now ", Command("say", "exit now")),
        ("   ", Command("say", "")),
    ],
)
def test_spaces_around_a_line_do_not_count(line, command):
    assert parse_command(line) == command


def test_every_command_has_usage_and_help():
    assert set(COMMANDS) == {
        *("nick", "who", "me", "msg", "join", "part", "rooms", "history", "help", "quit")
    }
    for name, (usage, meaning) in COMMANDS.items():
        assert usage.startswith("/" + name)
        assert meaning


@pytest.mark.parametrize("name", ["a", "x" * MAX_NAME_LENGTH, "Ünïcødé", "bob_2", "日本"])
def test_good_names(name):
    assert name_problem(name) is None


@pytest.mark.parametrize(
    "name",
    [
        "",
        "x" * (MAX_NAME_LENGTH + 1),
        "two words",
        "tab\there",
        "nb\u00a0sp",
        "<bob>",
        "a<b",
        "a>b",
        "star*",
        "ctl\x01",
        "esc\x1b",
        "del\x7f",
        "c1\x9b",
        "rlo\u202e",
        "zwj\u200d",
        "caret^A",
        "repl\ufffd",
    ],
)
def test_bad_names(name):
    problem = name_problem(name)
    assert problem and problem.endswith(".")


def test_max_name_length_is_32():
    assert MAX_NAME_LENGTH == 32


# --- Server lines --------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "parsed"),
    [
        ("<alice> hi <there>", ServerLine("message", "hi <there>", "alice")),
        ("<alice> ", ServerLine("message", "", "alice")),
        ("* alice waves", ServerLine("action", "waves", "alice")),
        ("*alice* psst", ServerLine("private", "psst", "alice")),
        ("-> *bob* psst", ServerLine("private-sent", "psst", "bob")),
        ("*** alice joined.", ServerLine("notice", "alice joined.")),
        ("!!! Unknown command /x.", ServerLine("error", "Unknown command /x.")),
        ("hello", ServerLine("other", "hello")),
        ("<two words> x", ServerLine("other", "<two words> x")),
    ],
)
def test_parse_server_line(line, parsed):
    assert parse_server_line(line) == parsed


@pytest.mark.parametrize(
    ("event", "fields", "text"),
    [
        (
            "welcome",
            {"name": "guest1"},
            "Welcome to chatlib, guest1! Choose a name with /nick NAME; /help lists the commands.",
        ),
        ("joined", {"name": "alice", "server": None}, "alice joined."),
        (
            "joined",
            {"name": "alice", "where": " on server 1f0a", "server": "1f0a"},
            "alice joined on server 1f0a.",
        ),
        ("left", {"name": "alice", "reason": ""}, "alice left."),
        (
            "left",
            {"name": "alice", "reason": " (send queue exceeded)"},
            "alice left (send queue exceeded).",
        ),
        ("renamed", {"old": "guest1", "name": "alice"}, "guest1 is now known as alice."),
        ("history", {"room": "#maths", "count": 3}, "Recent messages in #maths (3):"),
        ("history-end", {"room": "#maths"}, "End of recent messages in #maths."),
    ],
)
def test_notices_round_trip(event, fields, text):
    assert format_notice(event, **fields) == text
    parsed_event, parsed = parse_notice(text)
    assert parsed_event == event
    wanted = {
        key: value if value is None else str(value)
        for key, value in fields.items()
        if key not in ("reason", "where")  # told in words, not read back
    }
    assert parsed == wanted


@pytest.mark.parametrize(
    ("fields", "text", "parsed"),
    [
        (
            {"count": 2, "names": "alice, bob", "more": ""},
            "Online (2): alice, bob",
            {"count": "2", "names": "alice, bob", "more": None},
        ),
        (
            {"count": 1, "names": "alice", "more": ""},
            "Online (1): alice",
            {"count": "1", "names": "alice", "more": None},
        ),
        (
            {"count": 5000, "names": "a, b, c", "more": " (and 4997 more)"},
            "Online (5000): a, b, c (and 4997 more)",
            {"count": "5000", "names": "a, b, c", "more": "4997"},
        ),
    ],
)
def test_the_member_list_may_be_cut_short(fields, text, parsed):
    # A long list is cut short to fit CLIENT_MAX_LINE; the count is everyone.
    assert format_notice("members", **fields) == text
    assert parse_notice(text) == ("members", parsed)
    # Entering a room lists its members the same way, with the room's name.
    entered = format_notice("entered", room="#maths", **fields)
    assert entered == text.replace("Online (", "You are in #maths (").replace("):", " here):")
    assert parse_notice(entered) == ("entered", {"room": "#maths", **parsed})


def test_the_room_list_round_trips():
    text = format_notice("rooms", count=2, rooms="#lobby (3), #maths (1)", more="")
    assert text == "Rooms (2): #lobby (3), #maths (1)"
    assert parse_notice(text) == (
        "rooms",
        {"count": "2", "rooms": "#lobby (3), #maths (1)", "more": None},
    )


@pytest.mark.parametrize("room", ["#lobby", "#maths", "#日本", "#x" + "y" * 31])
def test_good_room_names(room):
    assert room_problem(room) is None


@pytest.mark.parametrize(
    ("room", "why"),
    [
        ("lobby", "starts with #"),
        ("#", "at least one character"),
        ("##a", "only letters"),
        ("#a b", "only letters"),
        ("#a,b", "only letters"),
        ("#x" + "y" * 32, "at most 32"),
        ("#p\u0430ypal", "one script"),  # a Cyrillic a
    ],
)
def test_bad_room_names(room, why):
    assert why in room_problem(room)


def test_every_notice_is_covered():
    assert set(NOTICES) == {
        *("welcome", "members", "joined", "left", "renamed"),
        *("quiet", "announcing"),
        *("entered", "rooms", "history", "history-end"),
        *("server", "split", "linked", "lost-messages", "collision"),
    }


@pytest.mark.parametrize(
    ("event", "fields"),
    [
        ("server", {"server": "1f0a", "state": "linked with 2 other servers"}),
        ("split", {"reason": "Connection refused"}),
        ("linked", {}),
        ("lost-messages", {"count": "3"}),
        ("collision", {"old": "alice", "name": "guest7-1a2b"}),
    ],
)
def test_the_cluster_notices_round_trip(event, fields):
    assert parse_notice(format_notice(event, **fields)) == (event, fields)


def test_other_notices_are_not_recognised():
    assert parse_notice("The server is shutting down. Bye!") is None
    assert parse_notice("alice joined. really") is None


@settings(deadline=None)  # a shared machine may pause any example
@given(st.text(min_size=1, max_size=MAX_NAME_LENGTH).filter(lambda n: name_problem(n) is None))
def test_any_good_name_round_trips_through_notices_and_lines(name):
    joined = ("joined", {"name": name, "server": None})
    assert parse_notice(format_notice("joined", name=name)) == joined
    assert parse_server_line(f"<{name}> hi") == ServerLine("message", "hi", name)
    assert parse_server_line(f"* {name} hi") == ServerLine("action", "hi", name)


# --- Telnet ----------------------------------------------------------------------

IAC, DONT, DO, WONT, WILL, SB, SE = 255, 254, 253, 252, 251, 250, 240
TELNET_STREAM = (
    b"hi "
    + bytes([IAC, WILL, 24])  # terminal type: refused with DONT
    + bytes([IAC, SB, 24, 0]) + b"vt100" + bytes([IAC, IAC, IAC, SE])  # dropped whole
    + bytes([IAC, 244, IAC, DO, 6])  # Ctrl-C: IP, then DO TIMING-MARK: refused with WONT
    + bytes([IAC, WONT, 1, IAC, DONT, 3])  # refusals are never answered
    + bytes([IAC, IAC])  # a 0xFF byte: never text in UTF-8
    + b"there\r\n"
)  # fmt: skip


def test_telnet_commands_are_taken_out_and_options_refused():
    framer = LineFramer(512, telnet=True)
    framer.feed(TELNET_STREAM)
    assert drain(framer) == ["hi there"]
    assert framer.take_telnet_replies() == bytes([IAC, DONT, 24, IAC, WONT, 6])
    assert framer.take_telnet_replies() == b""


@settings(deadline=None)  # a shared machine may pause any example
@given(st.sets(st.integers(1, len(TELNET_STREAM) - 1)))
def test_telnet_commands_cut_anywhere_by_reads_give_the_same_result(cuts):
    framer = LineFramer(512, telnet=True)
    points = [0, *sorted(cuts), len(TELNET_STREAM)]
    replies = b""
    for start, end in itertools.pairwise(points):
        framer.feed(TELNET_STREAM[start:end])
        replies += framer.take_telnet_replies()
    assert drain(framer) == ["hi there"]
    assert replies == bytes([IAC, DONT, 24, IAC, WONT, 6])


def test_an_endless_subnegotiation_costs_no_memory():
    framer = LineFramer(512, telnet=True)
    framer.feed(bytes([IAC, SB, 24]))
    for _ in range(1000):
        framer.feed(b"x" * 1000)
    assert framer.buffered == 0
    framer.feed(bytes([IAC, SE]) + b"back\n")
    assert drain(framer) == ["back"]


def test_a_client_framer_leaves_0xff_to_the_decoder():
    framer = LineFramer(512)
    framer.feed(bytes([IAC, DO, 6]) + b"x\n")
    assert drain(framer) == ["\ufffd\ufffd^Fx"]
    assert framer.take_telnet_replies() == b""


def test_line_and_paragraph_separators_are_neutralised():
    assert sanitize("a\u2028*** b\u2029c") == "a\ufffd*** b\ufffdc"


# --- Names that cannot pass for others ---------------------------------------------

GOOD_NAMES = [
    "José",
    "Zoë",
    "李雷",
    "Дмитрий",
    "やまだ太郎",
    "김철수",
    "नमस्ते",
    "محمد",
    "a.b-c_d",
    "R2D2",
]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_names_of_one_script_are_fine(name):
    assert name_problem(normalize_name(name)) is None


@pytest.mark.parametrize(
    "name",
    [
        "\u0430lice",  # Cyrillic a among Latin letters
        "alice\u034f",  # combining grapheme joiner
        "alice\ufe0f",  # variation selector 16
        "\u3164",  # Hangul filler
        "\u115f\u1160",
        "a\u200bb",  # zero-width space
        "a\U000e0041b",  # a tag character
        "\u2217",  # asterisk operator, and other lookalikes of the line markers
        "\u204e",
        "\u2731",
        "x\u01c3",  # Latin letter retroflex click, which looks like !
        "x,admin",
        "x\u2800admin",  # braille blank
        "-x",
        ".",
        "a\u02bcb",  # modifier letter apostrophe
    ],
)
def test_lookalikes_and_invisible_characters_are_refused(name):
    assert name_problem(normalize_name(name))


def test_nfkc_makes_compatibility_forms_plain():
    assert normalize_name("\uff41\uff4c\uff49\uff43\uff45") == "alice"
    assert normalize_name("\uff0a") == "*"  # and then refused


@pytest.mark.parametrize(
    "name",
    ["ALICE", "a1ice", "\u0430\u04cf\u0456\u0441\u0435", "\uff41lice", "\U0001d41alice"],
)
def test_names_that_look_alike_have_one_key(name):
    assert name_key(name) == name_key("alice")


def test_different_names_have_different_keys():
    assert len({name_key(name) for name in [*GOOD_NAMES, "alice", "bob", "alicia"]}) == 13


@settings(deadline=None)  # a shared machine may pause any example
@given(st.text(min_size=1, max_size=MAX_NAME_LENGTH))
def test_no_accepted_name_holds_a_space_symbol_or_punctuation_but_the_separators(name):
    name = normalize_name(name)
    if name_problem(name) is None:
        for char in name:
            category = unicodedata.category(char)
            assert char in "-_." or category[0] in "LMN", f"{char!r} ({category}) in {name!r}"
            assert category not in ("Cf", "Zs", "So"), name


@pytest.mark.parametrize(
    ("entry", "split"),
    [
        ("alice", ("alice", None)),
        ("alice@1f0a", ("alice", "1f0a")),
        ("a.b-c@00ff", ("a.b-c", "00ff")),
    ],
)
def test_a_member_list_entry_gives_the_name_and_its_server(entry, split):
    assert split_member(entry) == split
