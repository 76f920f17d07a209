"""The chat with no sockets: drive Chat directly and read what each client would be sent."""

from __future__ import annotations

import re
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatlib.chat import LIFECYCLE, LINGER, Chat, Limits, State
from chatlib.protocol import CLIENT_MAX_LINE, COMMANDS, parse_notice, parse_server_line
from tests.helpers import ChatDriver

NO_FLOOD = {"rate": 0}
BYE_ALL = "*** The server is shutting down. Bye!"


def notices(lines):
    """Return the recognised notices among *lines*, as (event, fields)."""
    found = []
    for line in lines:
        parsed = parse_server_line(line)
        notice = parse_notice(parsed.text) if parsed.kind == "notice" else None
        if notice:
            found.append(notice)
    return found


def test_limits_defaults_match_the_docs():
    assert Limits() == Limits(max_clients=100, max_line=512, sendq=1024 * 1024, rate=2, burst=10)


# --- Arriving, leaving, names --------------------------------------------------


def test_a_new_client_gets_a_guest_name_and_a_welcome(driver):
    first = driver.connect()
    second = driver.connect()
    assert (first.name, second.name) == ("guest1", "guest2")
    assert first.state is State.OPEN
    welcome, members = driver.take(second)
    assert welcome == (
        "*** Welcome to chatlib, guest2! Choose a name with /nick NAME; /help lists the commands."
    )
    assert members == "*** You are in #lobby (2 here): guest1, guest2"
    assert driver.chat.members == ["guest1", "guest2"]


def test_a_join_is_announced_to_the_others_only(driver):
    first = driver.connect()
    driver.take(first)
    second = driver.connect()
    assert driver.take(first) == ["*** guest2 joined."]
    assert "*** guest2 joined." not in driver.take(second)


def test_a_rename_is_announced_to_everyone(driver):
    first, second = driver.connect(), driver.connect()
    driver.take_all()
    driver.say(first, "/nick alice")
    assert driver.take_all() == {
        first: ["*** guest1 is now known as alice."],
        second: ["*** guest1 is now known as alice."],
    }
    assert first.name == "alice"
    driver.say(second, "/who")
    assert driver.take(second) == ["*** Online (2): alice, guest2"]


def test_guest_names_skip_names_someone_took(driver):
    first = driver.connect()
    driver.say(first, "/nick GUEST2")
    assert driver.connect().name == "guest3"


def test_a_leave_is_announced_to_the_others(trio, driver):
    alice, bob, carol = trio
    driver.lose(bob)
    assert driver.take(alice) == ["*** bob left."]
    assert driver.take(carol) == ["*** bob left."]
    assert driver.chat.members == ["alice", "carol"]
    assert bob.state is State.CLOSED


def test_connection_lost_announces_the_leave_once(trio, driver):
    alice, bob, _ = trio
    driver.lose(bob)
    driver.lose(bob)
    assert driver.take(alice) == ["*** bob left."]


def test_connection_lost_after_quit_does_not_announce_again(trio, driver):
    alice, bob, _ = trio
    driver.say(bob, "/quit")
    driver.lose(bob)
    assert driver.take(alice) == ["*** bob left."]


@pytest.mark.parametrize(
    "name",
    [
        "x" * 33,
        "two words",
        "<bob>",
        "a>b",
        "star*",
        "ctl\x01",
        "esc\x1b[31m",
        "rlo\u202e",
        "zwj\u200d",
    ],
)
def test_a_bad_name_is_refused_and_the_name_kept(trio, driver, name):
    alice, bob, _ = trio
    driver.say(alice, f"/nick {name}")
    (error,) = driver.take(alice)
    assert error.startswith("!!! ")
    assert error.endswith("Your name is still alice.")
    assert alice.name == "alice"
    assert driver.take(bob) == []


@pytest.mark.parametrize("name", ["bob", "BOB", "Bob", "bOb"])
def test_a_taken_name_is_refused_ignoring_case(trio, driver, name):
    alice, bob, _ = trio
    driver.say(alice, f"/nick {name}")
    assert driver.take(alice) == [f"!!! The name {name} is taken. Your name is still alice."]
    assert alice.name == "alice"
    assert driver.take(bob) == []


def test_nick_without_a_name_shows_the_usage(trio, driver):
    alice = trio[0]
    driver.say(alice, "/nick")
    assert driver.take(alice) == ["!!! Usage: /nick NAME (choose your name)."]


def test_changing_the_case_of_your_own_name_is_allowed(trio, driver):
    alice, bob, _ = trio
    driver.say(alice, "/nick ALICE")
    assert driver.take(bob) == ["*** alice is now known as ALICE."]


def test_a_name_of_32_characters_is_fine(trio, driver):
    alice = trio[0]
    driver.say(alice, "/nick " + "n" * 32)
    assert alice.name == "n" * 32


# --- Messages and commands -----------------------------------------------------


def test_a_message_goes_to_everyone_including_the_sender(trio, driver):
    driver.say(trio[0], "hello <everyone>")
    assert driver.take_all() == {conn: ["<alice> hello <everyone>"] for conn in trio}


def test_everyone_sees_messages_in_the_same_order(trio, driver):
    for round_ in range(5):
        for conn in trio:
            driver.say(conn, f"{conn.name} {round_}")
    inboxes = list(driver.take_all().values())
    assert inboxes[0] == inboxes[1] == inboxes[2]
    assert len(inboxes[0]) == 15


def test_blank_lines_are_ignored(trio, driver):
    driver.send(trio[0], "\n  \r\n\t\n")
    assert driver.take_all() == {conn: [] for conn in trio}


def test_double_slash_says_a_line_starting_with_a_slash(trio, driver):
    driver.say(trio[0], "//help is a command")
    assert driver.take(trio[1]) == ["<alice> /help is a command"]


def test_me_is_an_action_for_everyone(trio, driver):
    driver.say(trio[0], "/me waves")
    assert driver.take_all() == {conn: ["* alice waves"] for conn in trio}
    driver.say(trio[0], "/me")
    assert driver.take(trio[0]) == [
        "!!! Usage: /me ACTION (say what you are doing, e.g. /me waves)."
    ]


def test_msg_reaches_only_the_two_parties(trio, driver):
    alice, bob, carol = trio
    driver.say(alice, "/msg BOB meet me at  noon")
    assert driver.take_all() == {
        alice: ["-> *bob* meet me at  noon"],
        bob: ["*alice* meet me at  noon"],
        carol: [],
    }


def test_msg_to_yourself_arrives_once(trio, driver):
    alice = trio[0]
    driver.say(alice, "/msg alice note to self")
    assert driver.take_all() == {alice: ["*alice* note to self"], trio[1]: [], trio[2]: []}


def test_msg_errors(trio, driver):
    alice = trio[0]
    driver.say(alice, "/msg nobody hi", "/msg bob", "/msg")
    usage = "!!! Usage: /msg NAME TEXT (send a private message, to anyone in any room)."
    assert driver.take(alice) == ["!!! Nobody here is called nobody.", usage, usage]
    assert driver.take(trio[1]) == []


def test_who_lists_everyone_in_order_of_arrival(trio, driver):
    driver.say(trio[2], "/who")
    assert driver.take_all() == {
        trio[0]: [],
        trio[1]: [],
        trio[2]: ["*** Online (3): alice, bob, carol"],
    }


def test_help_lists_every_command(trio, driver):
    driver.say(trio[0], "/HELP")
    lines = driver.take(trio[0])
    assert all(line.startswith("*** ") for line in lines)
    text = "\n".join(lines)
    for usage, meaning in COMMANDS.values():
        assert usage in text and meaning in text
    assert "//" in text
    assert driver.take(trio[1]) == []


@pytest.mark.parametrize("line", ["/quit", "/QUIT", "exit"])
def test_quit_says_bye_and_closes(trio, driver, line):
    alice, bob, _ = trio
    driver.say(alice, line, "after quit")
    assert driver.take(alice) == ["*** Bye, alice!"]
    assert driver.take(bob) == ["*** alice left."]
    assert alice.state is State.DRAINING
    assert driver.ended[alice] == "our side ended"
    assert driver.chat.members == ["bob", "carol"]


def test_an_unknown_command_gets_an_error(trio, driver):
    driver.say(trio[0], "/frobnicate now", "/")
    assert driver.take(trio[0]) == [
        "!!! Unknown command /frobnicate. Type /help for the list.",
        "!!! Unknown command /. Type /help for the list.",
    ]
    assert driver.take(trio[1]) == []


def test_commands_ignore_case(trio, driver):
    driver.say(trio[0], "/Me waves", "/WHO")
    assert driver.take(trio[0]) == ["* alice waves", "*** Online (3): alice, bob, carol"]


# --- Bad input -----------------------------------------------------------------


def test_an_overlong_line_is_never_relayed_and_the_sender_told():
    driver = ChatDriver(max_line=16, **NO_FLOOD)
    alice, bob = driver.connect(), driver.connect()
    driver.take_all()
    driver.say(alice, "x" * 17, "y" * 16)
    assert driver.take(alice) == [
        "!!! Line too long (the limit is 16 bytes); it was not sent.",
        "<guest1> " + "y" * 16,
    ]
    assert driver.take(bob) == ["<guest1> " + "y" * 16]


def test_an_endless_line_is_reported_before_it_ends():
    driver = ChatDriver(max_line=16, **NO_FLOOD)
    alice, bob = driver.connect(), driver.connect()
    driver.take_all()
    for _ in range(100):
        driver.send(alice, "z" * 100)
    assert driver.take(alice) == ["!!! Line too long (the limit is 16 bytes); it was not sent."]
    driver.send(alice, "zzz\nfine\n")
    assert driver.take_all() == {alice: ["<guest1> fine"], bob: ["<guest1> fine"]}


def test_short_lines_do_not_pile_up_in_memory():
    driver = ChatDriver(**NO_FLOOD)
    alice = driver.connect()
    driver.say(alice, "warm up")
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        chunk = b"".join(b"line %d\n" % i for i in range(100))
        for _ in range(150):
            driver.send(alice, chunk)
            driver.take(alice)
        growth = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert growth < 64 * 1024, f"the room kept {growth} bytes after {150 * len(chunk)} bytes read"


def test_invalid_utf8_comes_out_as_valid_utf8(trio, driver):
    # Not 0xFF: that is Telnet's command byte, taken out before decoding.
    driver.send(trio[0], b"caf\xc3 \xfe ok \xed\xa0\x80\n")
    # ChatDriver decodes strictly: invalid UTF-8 would fail here.
    assert driver.take(trio[1]) == ["<alice> caf\ufffd \ufffd ok \ufffd\ufffd\ufffd"]


@pytest.mark.parametrize(
    ("sent", "shown"),
    [
        ("\x1b[2J\x1b[31mred", "^[[2J^[[31mred"),
        ("\x1b]0;pwned\x07", "^[]0;pwned^G"),
        ("fake\rline", "fake^Mline"),
        ("back\x08\x08space", "back^H^Hspace"),
        ("del\x7f", "del^?"),
        ("c1 \u009b31m csi", "c1 \ufffd31m csi"),
        ("\u202eevil", "\ufffdevil"),
        ("\u2066iso\u2069", "\ufffdiso\ufffd"),
        ("nul\x00", "nul^@"),
    ],
)
def test_escape_injection_is_neutralised(trio, driver, sent, shown):
    driver.say(trio[0], sent, "/me " + sent, "/msg bob " + sent, "/" + sent)
    assert driver.take(trio[1])[:3] == [f"<alice> {shown}", f"* alice {shown}", f"*alice* {shown}"]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=8))
def test_any_bytes_in_give_clean_utf8_out(chunks):
    driver = ChatDriver(max_line=40, **NO_FLOOD)
    sender, other = driver.connect(), driver.connect()
    for chunk in chunks:
        driver.send(sender, chunk)  # ChatDriver checks every line sent out
    driver.eof(sender)
    assert driver.ended[sender] == "closed"  # both sides ended cleanly
    assert ("left", {"name": sender.name}) in notices(driver.take(other))


def test_a_client_over_its_send_queue_is_dropped():
    driver = ChatDriver(sendq=1000, **NO_FLOOD)
    reader, sleeper, sender = driver.connect(), driver.connect(), driver.connect()
    driver.stalled.add(sleeper)
    driver.take_all()
    sent = 0
    while sleeper.state is State.OPEN:
        driver.say(sender, "x" * 80)
        sent += 1
        assert sent < 20, "the sleeper was never dropped"
    assert sleeper.state is State.CLOSED
    assert driver.ended[sleeper] == "cut off"
    assert sleeper.data_to_send() == b""  # its queue was freed
    assert driver.chat.members == ["guest1", "guest3"]
    lines = driver.take(reader)
    assert lines[-1] == "*** guest2 left (send queue exceeded)."
    assert sum(line.startswith("<") for line in lines) == sent
    driver.lose(sleeper)
    assert driver.take(reader) == []  # told once


def test_a_reading_client_is_never_dropped():
    driver = ChatDriver(sendq=1000, **NO_FLOOD)
    reader, sender = driver.connect(), driver.connect()
    for _ in range(100):
        driver.say(sender, "x" * 80)
    assert reader.state is State.OPEN


# --- Flood control ------------------------------------------------------------


def test_a_burst_passes_then_lines_are_delayed_not_lost():
    driver = ChatDriver(rate=2, burst=3)
    flooder, other = driver.connect(), driver.connect()
    driver.take_all()
    driver.say(flooder, *[f"line {i}" for i in range(6)])
    assert driver.take(other) == ["<guest1> line 0", "<guest1> line 1", "<guest1> line 2"]
    assert driver.take(flooder)[-1] == (
        "*** Slow down: over 2 lines a second, your lines are delayed."
    )
    assert flooder.deadline == pytest.approx(0.5)

    # Someone else is not held up by the flooder.
    driver.say(other, "unaffected")
    assert driver.take(other) == ["<guest2> unaffected"]

    # One line every 1/rate seconds from now on, none lost, in order.
    for i in range(3, 6):
        driver.now = flooder.deadline
        driver.deadline_reached(flooder)
        assert driver.take(other) == [f"<guest1> line {i}"]
    assert flooder.deadline is None
    assert driver.take(flooder) == ["<guest2> unaffected"] + [
        f"<guest1> line {i}" for i in range(3, 6)
    ]


def test_resuming_early_delays_again():
    driver = ChatDriver(rate=4, burst=1)
    flooder, other = driver.connect(), driver.connect()
    driver.say(flooder, "a", "b")
    driver.take_all()
    assert flooder.deadline == pytest.approx(0.25)
    driver.now = 0.1
    driver.deadline_reached(flooder)
    assert driver.take(other) == []
    assert flooder.deadline == pytest.approx(0.25)
    driver.now = 0.25
    driver.deadline_reached(flooder)
    assert driver.take(other) == ["<guest1> b"]


def test_the_budget_refills_at_the_rate_up_to_the_burst():
    driver = ChatDriver(rate=2, burst=3)
    flooder, other = driver.connect(), driver.connect()
    driver.say(flooder, "a", "b", "c")
    driver.now = 1.0  # two lines' worth back
    driver.take_all()
    driver.say(flooder, "d", "e", "f")
    assert len(driver.take(other)) == 2
    assert flooder.deadline == pytest.approx(1.5)
    driver.now = 100.0  # a long pause refills only up to the burst: f, g and h
    driver.deadline_reached(flooder)
    driver.say(flooder, *"ghijk")
    assert driver.take(other) == [f"<guest1> {c}" for c in "fgh"]


def test_the_slow_down_notice_is_sent_once_per_flood():
    driver = ChatDriver(rate=10, burst=2)
    flooder = driver.connect()
    driver.take(flooder)
    driver.say(flooder, *"abcde")
    while flooder.deadline is not None:
        driver.now = flooder.deadline
        driver.deadline_reached(flooder)
    lines = driver.take(flooder)
    assert sum(line.startswith("*** Slow down") for line in lines) == 1
    assert [line for line in lines if line.startswith("<")] == [f"<guest1> {c}" for c in "abcde"]


def test_rate_zero_turns_flood_control_off():
    driver = ChatDriver(rate=0, burst=1)
    flooder, other = driver.connect(), driver.connect()
    driver.take_all()
    driver.say(flooder, *[str(i) for i in range(500)])
    assert len(driver.take(other)) == 500
    assert flooder.deadline is None
    assert not any(line.startswith("*** Slow down") for line in driver.take(flooder))


def test_default_limits_throttle_after_a_burst_of_ten():
    driver = ChatDriver()
    flooder, other = driver.connect(), driver.connect()
    driver.take_all()
    driver.say(flooder, *[str(i) for i in range(12)])
    assert len(driver.take(other)) == 10
    assert flooder.deadline == pytest.approx(0.5)


# --- End of stream, lost connections, full room, shutdown -------------------------


def test_eof_delivers_the_final_line_then_closes(trio, driver):
    alice, bob, _ = trio
    driver.send(alice, "first\nlast words")
    assert driver.take(bob) == ["<alice> first"]
    driver.take(alice)
    driver.eof(alice)
    assert driver.take(bob) == ["<alice> last words", "*** alice left."]
    assert driver.take(alice) == ["<alice> last words"]
    assert driver.ended[alice] == "closed"
    assert driver.chat.members == ["bob", "carol"]


def test_eof_while_throttled_keeps_the_lines():
    driver = ChatDriver(rate=1, burst=1)
    flooder, other = driver.connect(), driver.connect()
    driver.take_all()
    driver.send(flooder, "one\ntwo\nthree")
    driver.eof(flooder)
    assert flooder.state is State.OPEN  # still owes lines: the engine calls resume()
    while flooder.deadline is not None:
        driver.now = flooder.deadline
        driver.deadline_reached(flooder)
    assert driver.take(other) == [
        "<guest1> one",
        "<guest1> two",
        "<guest1> three",
        "*** guest1 left.",
    ]
    assert driver.ended[flooder] == "closed"


def test_a_final_line_over_the_limit_is_not_relayed_at_eof():
    driver = ChatDriver(max_line=16, **NO_FLOOD)
    alice, bob = driver.connect(), driver.connect()
    driver.take_all()
    driver.send(alice, "x" * 17)
    driver.eof(alice)
    assert driver.take(bob) == ["*** guest1 left."]
    assert driver.take(alice) == ["!!! Line too long (the limit is 16 bytes); it was not sent."]


def test_a_full_room_turns_the_next_client_away():
    driver = ChatDriver(max_clients=2, **NO_FLOOD)
    first, second = driver.connect(), driver.connect()
    driver.take_all()
    extra = driver.connect()
    assert driver.ended[extra] == "our side ended"
    assert driver.take(extra) == ["*** Sorry, the server is full (2 clients)."]
    assert driver.take(first) == [] and driver.take(second) == []
    assert driver.chat.members == ["guest1", "guest2"]
    driver.say(extra, "let me in")  # ignored: it is not in the room
    driver.lose(extra)
    assert driver.take_all() == {first: [], second: [], extra: []}

    driver.lose(first)
    newcomer = driver.connect()
    assert newcomer.state is State.OPEN
    assert driver.take(newcomer)[0].startswith("*** Welcome to chatlib, ")
    assert len(driver.chat.members) == 2


def test_shut_down_says_bye_to_everyone(trio, driver):
    driver.shut_down()
    assert driver.take_all() == {conn: [BYE_ALL] for conn in trio}
    assert all(driver.ended[conn] == "our side ended" for conn in trio)
    assert driver.chat.members == []


def test_take_ready_returns_each_connection_once(trio, driver):
    chat = driver.chat
    chat.receive_data(trio[0], b"a\nb\n", 0.0)
    ready = chat.take_ready()
    assert sorted(conn.name for conn in ready) == ["alice", "bob", "carol"]
    assert chat.take_ready() == []
    assert trio[1].data_to_send() == b"<alice> a\n<alice> b\n"
    assert trio[1].data_to_send() == b""


@pytest.mark.parametrize(
    ("limits", "complaint"),
    [
        ({"max_clients": 0}, "max_clients must be at least 1"),
        ({"max_line": 0}, "max_line must be at least 1"),
        ({"burst": 0}, "burst must be at least 1"),
        ({"rate": -1}, "rate must be 0"),
        ({"sendq": 100, "max_line": 512}, "sendq (100) must be at least max_line (512)"),
    ],
)
def test_useless_limits_are_refused(limits, complaint):
    with pytest.raises(ValueError, match=re.escape(complaint)):
        Limits(**limits)


# --- The lifecycle: drops that never re-enter, deadlines, the way out ----------------


def test_a_goodbye_that_overflows_a_send_queue_at_shutdown_drops_that_client_only():
    # Fault: shut_down() raised KeyError when the goodbye pushed a member past --sendq.
    driver = ChatDriver(sendq=550, **NO_FLOOD)
    reader, sleeper = driver.connect(), driver.connect()
    driver.stalled.add(sleeper)
    driver.say(reader, "x" * 200)  # the sleeper takes this backlog and sends none of it
    driver.say(reader, "y" * 300)  # queued behind it: 520 bytes of 550; the goodbye is 38
    assert sleeper.state is State.OPEN
    driver.shut_down()
    assert driver.ended[sleeper] == "cut off"
    assert driver.ended[reader] == "our side ended"
    assert driver.take(reader)[-1] == BYE_ALL
    assert driver.chat.members == []


def test_hundreds_of_clients_dropped_at_once_do_not_recurse():
    # Fault: each drop told the others inside the fan-out that caused it, one level of
    # recursion per dropped client; about 350 raised RecursionError.
    count = 600  # about 350 were enough to raise RecursionError
    # Every leave announced, as in a small room: the notices are what used to recurse.
    driver = ChatDriver(sendq=2000, max_clients=count + 1, announce_up_to=count + 1, **NO_FLOOD)
    sleepers = [driver.connect() for _ in range(count)]
    driver.stalled.update(sleepers)
    talker = driver.connect()
    while any(conn.state is State.OPEN for conn in sleepers):
        driver.say(talker, "x" * 500)
    assert all(driver.ended[conn] == "cut off" for conn in sleepers)
    assert driver.chat.members == [talker.name]
    assert talker.state is State.OPEN
    lefts = [line for line in driver.take(talker) if line.endswith("(send queue exceeded).")]
    assert len(lefts) == count  # told once about each


@pytest.mark.parametrize(("extra", "dropped"), [(0, False), (1, True)])
def test_the_send_queue_keeps_exactly_sendq_bytes(extra, dropped):
    driver = ChatDriver(sendq=1000, **NO_FLOOD)
    sender, sleeper = driver.connect(), driver.connect()
    driver.take_all()
    driver.stalled.add(sleeper)
    driver.say(sender, "x" * 91)  # "<guest1> " and "\n" make it 101 bytes, all unsent
    assert len(driver.unsent[sleeper]) == 101
    for _ in range(8):
        driver.say(sender, "y" * 90)  # 100 bytes each, queued in the room
    driver.say(sender, "z" * (89 + extra))  # 1,000 bytes in all, or 1,001
    assert (sleeper.state is State.CLOSED) is dropped


def test_one_turn_fanning_out_more_than_sendq_keeps_clients_that_read():
    # Fault: one 64 KiB read of 900-byte lines was queued to everyone before anything was
    # written, so with --sendq 65536 even prompt readers were dropped.
    driver = ChatDriver(sendq=65536, max_line=1024, **NO_FLOOD)
    sender, reader = driver.connect(), driver.connect()
    driver.take_all()
    driver.send(sender, ("z" * 900 + "\n") * 72)  # one read's worth
    assert reader.state is State.OPEN
    assert len(driver.take(reader)) == 72


def test_a_leaving_client_has_linger_seconds_then_is_cut_off(trio, driver):
    alice, bob, _ = trio
    driver.stalled.add(alice)
    driver.now = 5.0
    driver.say(alice, "/quit")
    assert alice.state is State.CLOSING  # its goodbye is not written yet
    assert alice.deadline == pytest.approx(5.0 + LINGER)
    driver.now = 5.0 + LINGER / 2
    driver.deadline_reached(alice)  # early: nothing happens
    assert alice.state is State.CLOSING
    driver.now = 5.0 + LINGER
    driver.deadline_reached(alice)
    assert driver.ended[alice] == "cut off"
    assert driver.take(bob) == ["*** alice left."]


def test_a_leaving_client_that_ends_its_side_is_closed_cleanly(trio, driver):
    alice, _, _ = trio
    driver.say(alice, "/quit")
    assert alice.state is State.DRAINING
    assert alice.reading  # what it still sends is read and dropped
    driver.send(alice, "ignored\n")
    driver.eof(alice)
    assert driver.ended[alice] == "closed"
    assert not alice.cut_off


def test_a_throttled_client_is_not_read_until_its_deadline():
    driver = ChatDriver(rate=1, burst=1)
    flooder = driver.connect()
    driver.say(flooder, "a", "b")
    assert not flooder.reading
    driver.now = flooder.deadline
    driver.deadline_reached(flooder)
    assert flooder.reading


def test_every_change_of_state_follows_the_lifecycle_table():
    assert set(LIFECYCLE) == set(State)
    reachable = {State.OPEN}
    for targets in LIFECYCLE.values():
        reachable.update(targets.values())
    assert reachable == set(State)
    assert LIFECYCLE[State.CLOSED] == {}, "CLOSED is the end"


def test_a_huge_member_list_is_cut_short_to_what_clients_accept():
    # Fault: past about 1,900 members the list outgrew chatlib's own clients' 64 KiB limit.
    count = 2100
    chat = Chat(Limits(max_clients=count, **NO_FLOOD))
    for i in range(count):  # straight into the room: a driver would decode every join
        conn = chat.connect(None, 0.0)
        chat.receive_data(conn, f"/nick {'n' * 27}{i:05}\n".encode(), 0.0)
    chat.take_ready()
    conn.data_to_send()
    chat.receive_data(conn, b"/who\n", 0.0)
    line = conn.data_to_send()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert len(line) <= CLIENT_MAX_LINE
    event, fields = parse_notice(parse_server_line(line[:-1].decode()).text)
    assert event == "members" and fields["count"] == str(count)
    shown = fields["names"].split(", ")
    assert shown == chat.members[: len(shown)]
    assert int(fields["more"]) == count - len(shown) > 0


# --- The door: per-address limits, idle clients, reconnects, names -----------------------

ALICE_AT = ("192.0.2.7", 1000)  # a documentation address (RFC 5737)


def test_the_per_address_limit_counts_members_and_frees_their_places():
    driver = ChatDriver(max_per_address=2, **NO_FLOOD)
    first, second = driver.connect(ALICE_AT), driver.connect(("192.0.2.7", 1001))
    third = driver.connect(("192.0.2.7", 1002))
    assert driver.take(third) == ["*** Sorry, too many connections from your address (2)."]
    assert third.state is not State.OPEN
    assert driver.connect(("192.0.2.8", 1000)).state is State.OPEN  # another address
    driver.say(first, "/quit")
    assert driver.connect(("192.0.2.7", 1003)).state is State.OPEN
    assert second.state is State.OPEN


@pytest.mark.parametrize(
    ("one", "other", "same"),
    [
        ("2001:db8::1", "2001:db8::ffff", True),  # one /64: one machine's addresses
        ("2001:db8::1", "2001:db8:0:1::1", False),
        ("::ffff:192.0.2.7", "192.0.2.7", True),  # IPv4 on a dual-stack socket
        ("192.0.2.7", "192.0.2.8", False),
    ],
)
def test_an_address_is_an_ipv4_host_or_an_ipv6_slash_64(one, other, same):
    driver = ChatDriver(max_per_address=1, **NO_FLOOD)
    driver.connect((one, 1000))
    assert (driver.connect((other, 1001)).state is State.OPEN) is not same


@pytest.mark.parametrize(
    ("host", "expected"),
    [("127.0.0.1", 0), ("::1", 0), ("0.0.0.0", 10), ("::", 10), ("192.0.2.7", 10)],
)
def test_the_per_address_limit_is_on_beyond_loopback_unless_set(host, expected):
    assert Limits().for_listener(host).max_per_address == expected
    assert Limits(max_per_address=3).for_listener(host).max_per_address == 3


def test_a_reconnect_inherits_the_budget_its_address_left():
    driver = ChatDriver(rate=2, burst=10)
    flooder = driver.connect(ALICE_AT)
    driver.say(flooder, *[f"spam {i}" for i in range(9)], "/quit")
    assert driver.take(flooder)[-1] == "*** Bye, guest1!"
    # Its budget is spent, and its "left" notice cost one more line: -1 line.
    again = driver.connect(ALICE_AT)
    assert driver.take(again) == ["*** Sorry, you are reconnecting too fast; try again in 1 s."]
    driver.now = 1.0  # the budget is +1 again, which the "joined" notice takes
    back = driver.connect(ALICE_AT)
    assert back.state is State.OPEN
    driver.say(back, "hi")
    assert driver.take(back)[-1].startswith("*** Slow down")
    elsewhere = driver.connect(("192.0.2.8", 1000))  # other addresses are not held back
    driver.say(elsewhere, *[f"line {i}" for i in range(10)])
    assert driver.take(elsewhere)[-1] == "<guest4> line 9"


def test_an_address_budget_is_forgotten_once_it_would_be_full_again():
    driver = ChatDriver(rate=2, burst=10)
    driver.say(driver.connect(ALICE_AT), "/quit")
    driver.now = 5.4  # 9 lines left, then 10.8: full again at 5.5 s
    assert driver.chat._budgets
    driver.now = 5.5
    driver.say(driver.connect(("192.0.2.8", 1000)), "/quit")  # any change forgets old ones
    assert list(driver.chat._budgets) == ["192.0.2.8"]


def test_clients_at_once_from_one_address_each_have_their_own_budget():
    driver = ChatDriver(rate=2, burst=10)
    clients = [driver.connect(ALICE_AT) for _ in range(20)]
    for client in clients:
        driver.say(client, *[f"line {i}" for i in range(10)])
    inboxes = driver.take_all()
    assert all(f"<{client.name}> line 9" in inboxes[clients[0]] for client in clients)
    assert not [line for inbox in inboxes.values() for line in inbox if "Slow down" in line]


def test_a_silent_client_is_closed_after_the_idle_timeout():
    driver = ChatDriver(idle_timeout=10, **NO_FLOOD)
    silent, talker = driver.connect(), driver.connect()
    assert silent.deadline == 10
    driver.now = 6
    driver.say(talker, "hello")
    driver.send(silent, b"no newline, ever")  # a slowloris
    driver.now = 10
    driver.deadline_reached(talker)  # too early for the talker: checked again at 16
    driver.deadline_reached(silent)
    assert talker.state is State.OPEN and talker.deadline == 16
    assert driver.take(silent)[-1] == "*** Closing: you sent nothing for 10 s (the idle timeout)."
    assert silent.state is State.DRAINING
    assert driver.take(talker)[-1] == "*** guest1 left (idle)."


def test_a_client_whose_lines_wait_for_flood_control_is_not_idle():
    driver = ChatDriver(idle_timeout=1, rate=1, burst=1)
    flooder = driver.connect()
    driver.say(flooder, "one", "two", "three")
    for _ in range(2):  # each second, one line goes, and the idle check moves on
        driver.now = flooder.deadline
        driver.deadline_reached(flooder)
    assert driver.take(flooder)[-1] == "<guest1> three"
    assert flooder.deadline == 3
    assert flooder.state is State.OPEN


@pytest.mark.parametrize(
    "name",
    [
        "\u0430lice",  # Cyrillic a in a Latin name
        "ALICE",
        "Alice",
        "a1ice",
        "\u0430\u04cf\u0456\u0441\u0435",  # all Cyrillic, and looks like alice
        "\u03b1lice",  # Greek alpha
        "\uff41\uff4c\uff49\uff43\uff45",  # fullwidth
        "\U0001d41alice",  # mathematical bold a
    ],
)
def test_a_name_like_a_members_is_taken(trio, driver, name):
    driver.say(trio[1], f"/nick {name}")
    error = driver.take(trio[1])[-1]
    assert error.startswith("!!! ") and error.endswith("Your name is still bob.")
    assert driver.chat.members == ["alice", "bob", "carol"]


def test_a_fullwidth_name_is_kept_normalised(driver):
    conn = driver.connect()
    driver.say(conn, "/nick \uff4a\uff4f\uff53\uff45")
    assert driver.chat.members == ["jose"]


def test_a_held_quit_and_the_idle_check_falling_due_together_leave_once():
    # Planted bug: the idle check ran after the held /quit had taken the client out, and
    # gave the leaving client an idle deadline instead of its LINGER.
    driver = ChatDriver(idle_timeout=0.5, rate=1, burst=1)
    quitter, other = driver.connect(), driver.connect()
    driver.say(quitter, "one", "/quit")
    for now in (0.5, 1.0):  # the idle check (moved on: a line waits), then both at once
        assert quitter.deadline == now
        driver.now = now
        driver.deadline_reached(quitter)
    assert driver.take(quitter)[-1] == "*** Bye, guest1!"
    assert driver.take(other)[-1] == "*** guest1 left."
    assert quitter.deadline == 1.0 + LINGER


# --- Presence at scale -----------------------------------------------------------------


def test_a_big_room_stops_announcing_joins_and_leaves_and_says_so():
    # Fault: each of N joins went to all N, N² lines: 12.5 million for 5,000 people.
    driver = ChatDriver(announce_up_to=4, max_clients=10, **NO_FLOOD)
    first = driver.connect()
    others = [driver.connect() for _ in range(3)]
    assert driver.take(first)[-3:] == [f"*** guest{n} joined." for n in (2, 3, 4)]
    fifth = driver.connect()
    quiet = "*** More than 4 here: joins and leaves are no longer announced; /who lists everyone."
    assert driver.take(first) == [quiet]
    assert driver.take(fifth) == [
        "*** Welcome to chatlib, guest5! Choose a name with /nick NAME; /help lists the commands.",
        "*** You are in #lobby (5 here): guest1, guest2, guest3, guest4 (and 1 more)",
        quiet,
    ]
    driver.connect()
    for conn in [fifth, *others]:
        driver.say(conn, "/quit")
    assert driver.take(first) == ["*** 2 here now: joins and leaves are announced again."]
    driver.connect()
    assert driver.take(first) == ["*** guest7 joined."]


def test_small_rooms_announce_as_before(trio, driver):
    driver.say(trio[0], "/quit")
    assert driver.take(trio[1]) == ["*** alice left."]
    assert Limits().announce_up_to == 100  # a class of 30 is far below
