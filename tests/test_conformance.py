"""One suite over real sockets, run against every engine: the contract a chat server keeps.

The clients are raw TCP sockets, as ``nc`` would be (see :class:`tests.helpers.LineClient`):
every line they receive is decoded strictly as UTF-8 and checked for control and bidi
characters, so every test here also checks that nothing unsafe ever reaches a client.
After each test the ``health`` fixture checks that the server logged no error, let no
exception escape a thread, and left no thread or file descriptor behind once stopped.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from chatlib.chat import Limits
from chatlib.protocol import COMMANDS, parse_notice, parse_server_line
from chatlib.server import create_server
from chatlib.sqlite_history import SQLiteHistory
from tests.helpers import LineClient, count_fds, forbidden_in, rss_bytes, wait_until

MB = 1024 * 1024
BYE_ALL = "*** The server is shutting down. Bye!"


def left_notice(client: LineClient):
    """Return a predicate: is this line the notice that *client* left?"""

    def is_left(line: str) -> bool:
        notice = parse_notice(parse_server_line(line).text) if line.startswith("*** ") else None
        return notice is not None and notice[0] == "left" and notice[1]["name"] == client.name

    return is_left


def sync(sender: LineClient, *readers: LineClient, tag: str = "sync") -> list[list[str]]:
    """Send a marker from *sender*; return what each reader got up to and including it.

    Everyone sees lines in one order, so a line meant for a reader arrives before the
    marker: anything not among the returned lines was never sent to that reader.
    """
    marker = f"<{sender.name}> {tag}"
    sender.say(tag)
    return [reader.expect(marker) for reader in readers]


def send_in_pieces(client: LineClient, data: bytes, cuts: list[int]) -> None:
    """Send *data* cut at *cuts*, one packet per piece.

    The short pause between pieces only makes it likely that the server reads each piece
    on its own; nothing waits on it, and the test holds however the pieces arrive.
    """
    points = [0, *cuts, len(data)]
    for start, end in itertools.pairwise(points):
        client.send(data[start:end])
        time.sleep(0.002)


# --- Arriving and the wire format -------------------------------------------------------


def test_a_new_client_gets_a_guest_name_and_a_welcome(start_server, connect):
    server = start_server()
    first = connect(server, welcome=False)
    welcome = first.read_line()
    event, fields = parse_notice(parse_server_line(welcome).text)
    assert event == "welcome"
    assert re.fullmatch(r"guest\d+", fields["name"])
    assert "/nick NAME" in welcome  # tells how to pick a name
    assert first.read_line() == f"*** You are in #lobby (1 here): {fields['name']}"

    second = connect(server)
    assert second.name != fields["name"]
    first.expect(f"*** {second.name} joined.")


def test_a_message_reaches_everyone_including_the_sender(start_server, connect):
    server = start_server()
    clients = [connect(server) for _ in range(3)]
    clients[1].say("hello, <world> & all")
    for client in clients:
        client.expect(f"<{clients[1].name}> hello, <world> & all")


def test_crlf_and_lf_line_endings_are_both_accepted(start_server, connect):
    server = start_server()
    sender, reader = connect(server), connect(server)
    sender.send(b"with crlf\r\nwith lf\n")
    lines = reader.messages(sync(sender, reader)[0])
    assert lines == [
        f"<{sender.name}> with crlf",
        f"<{sender.name}> with lf",
        f"<{sender.name}> sync",
    ]


@pytest.mark.timeout(60)
def test_everyone_sees_all_messages_in_the_same_order(start_server, connect):
    server = start_server()
    clients = [connect(server) for _ in range(4)]
    per_sender = 50

    def send_all(client: LineClient) -> None:
        for i in range(per_sender):
            client.say(f"{client.name} says {i}")

    with ThreadPoolExecutor(len(clients)) as pool:
        for future in [pool.submit(send_all, client) for client in clients]:
            future.result()

    total = per_sender * len(clients)
    sequences = []
    for client in clients:
        messages: list[str] = []
        while len(messages) < total:
            line = client.read_line()
            if line.startswith("<"):
                messages.append(line)
        sequences.append(messages)
    for sequence in sequences[1:]:
        assert sequence == sequences[0]
    for client in clients:
        own = [line for line in sequences[0] if line.startswith(f"<{client.name}> ")]
        assert own == [f"<{client.name}> {client.name} says {i}" for i in range(per_sender)]


def test_only_chat_messages_start_with_a_bracket(start_server, connect):
    server = start_server(max_line=64)
    alice, bob = connect(server), connect(server)
    alice.say(
        "/nick alice",
        "/help",
        "/who",
        "/me waves",
        f"/msg {bob.name} psst",
        "/msg nobody hi",
        "/msg",
        "/nick two words",
        "/nick <x>",
        f"/nick {bob.name.upper()}",
        "/frobnicate",
        "x" * 65,
        "//slash",
    )
    alice.name = "alice"
    sync(alice, alice)  # bob leaves only after all of that (his name was taken above)
    bob.say("/quit")
    bob.read_to_eof()
    carol = connect(server)
    sync(alice, alice, carol, tag="sync again")
    said = {"<alice> /slash", "<alice> sync", "<alice> sync again"}
    for line in alice.received + bob.received + carol.received:
        kind = parse_server_line(line).kind
        assert kind != "other", f"unclassifiable server line {line!r}"
        if line.startswith("<"):
            assert line in said, f"{line!r} looks like a chat message but is not one"
    assert "<alice> /slash" in alice.received


# --- Commands -------------------------------------------------------------------------


def test_nick_renames_and_everyone_is_told(start_server, connect):
    server = start_server()
    alice, bob = connect(server), connect(server)
    old = alice.name
    alice.say("/nick alice")
    for client in (alice, bob):
        client.expect(f"*** {old} is now known as alice.")
    alice.name = "alice"
    sync(alice, alice, bob)
    assert bob.who() == ["alice", bob.name]


def test_names_are_checked_and_a_refused_name_is_kept(start_server, connect):
    server = start_server()
    alice, bob = connect(server), connect(server)
    old = alice.name
    refused = [
        "x" * 33,
        "two words",
        "<bob>",
        "a>b",
        "a<b",
        "star*",
        "ctl\x01",
        "esc\x1b[31m",
        "del\x7f",
        "c1\u009b",
        "rlo\u202eevil",
        "zwj\u200d",
        bob.name.upper(),  # taken, ignoring case
        bob.name.capitalize(),
    ]
    sync(bob, alice)  # from here on, alice's next line answers her command
    for name in refused:
        alice.say(f"/nick {name}")
        error = alice.read_line()
        assert error.startswith("!!! "), (name, error)
        assert error.endswith(f"Your name is still {old}."), (name, error)
    alice.say("/nick")
    assert alice.read_line().startswith("!!! Usage: /nick")
    assert alice.who() == [old, bob.name]

    for name in ["n" * 32, "Ünïcødé", "a"]:
        alice.say(f"/nick {name}")
        alice.expect(f"*** {old} is now known as {name}.")
        old = alice.name = name
    renames = [line for line in sync(alice, bob)[0] if "is now known as" in line]
    assert len(renames) == 3  # the refused ones told nobody
    assert bob.who() == ["a", bob.name]


def test_who_lists_everyone_in_order_of_arrival(start_server, connect):
    server = start_server()
    clients = [connect(server) for _ in range(3)]
    assert clients[2].who() == [client.name for client in clients]
    clients[0].say("/nick zed")
    clients[1].expect(f"*** {clients[0].name} is now known as zed.")
    assert clients[1].who() == ["zed", clients[1].name, clients[2].name]


def test_me_is_shown_to_everyone(start_server, connect):
    server = start_server()
    alice, bob = connect(server), connect(server)
    alice.say("/me waves")
    for client in (alice, bob):
        client.expect(f"* {alice.name} waves")


def test_msg_is_seen_only_by_the_two_parties(start_server, connect):
    server = start_server()
    alice, bob, carol = (connect(server) for _ in range(3))
    alice.say(f"/msg {bob.name.upper()} the secret word")
    bob.expect(f"*{alice.name}* the secret word")
    alice.expect(f"-> *{bob.name}* the secret word")
    (carol_lines,) = sync(alice, carol)
    assert not [line for line in carol_lines if "secret" in line]
    alice.say("/msg nobody hello")
    assert alice.read_until(lambda line: line.startswith("!!! "))[-1] == (
        "!!! Nobody here is called nobody."
    )


def test_help_lists_every_command(start_server, connect):
    server = start_server()
    alice, bob = connect(server), connect(server)
    alice.say("/help")
    lines = sync(alice, alice)[0]
    text = "\n".join(lines)
    for usage, _ in COMMANDS.values():
        assert usage in text
    assert "exit" in text
    (bob_lines,) = sync(alice, bob, tag="sync again")
    assert not [line for line in bob_lines if "/nick NAME" in line]


@pytest.mark.parametrize("command", ["/quit", "exit"])
def test_quit_says_bye_closes_and_tells_the_others(start_server, connect, command):
    server = start_server()
    leaver, other = connect(server), connect(server)
    leaver.say(command)
    leaver.expect(f"*** Bye, {leaver.name}!")
    assert leaver.read_to_eof() == []
    other.read_until(left_notice(leaver))
    assert other.who() == [other.name]


def test_quit_with_more_input_pending_still_ends_with_a_clean_close(start_server, connect):
    server = start_server()
    leaver = connect(server)
    # Lines after /quit that the server will never read: closing a socket with unread
    # input makes the kernel send a reset (RST), which a client may see instead of
    # the goodbye (Windows drops unread data on a reset).
    leaver.sock.setblocking(False)
    sent = leaver.sock.send(b"/quit\n" + b"never read\n" * 20_000)
    leaver.sock.settimeout(leaver.timeout)
    assert sent > 6
    assert leaver.read_to_eof() == [f"*** Bye, {leaver.name}!"]  # EOF, not a reset


def test_an_unknown_command_gets_an_error(start_server, connect):
    server = start_server()
    bob, alice = connect(server), connect(server)  # alice last: nothing pending for her
    alice.say("/frobnicate now")
    error = alice.read_line()
    assert error.startswith("!!! ") and "/frobnicate" in error
    (bob_lines,) = sync(alice, bob)
    assert not [line for line in bob_lines if "frobnicate" in line]


# --- Framing --------------------------------------------------------------------------


def test_a_line_sent_byte_by_byte_arrives_whole(start_server, connect):
    server = start_server()
    sender, reader = connect(server), connect(server)
    data = "split ünïcødé € 😀 line\r\n".encode()
    send_in_pieces(sender, data, list(range(1, len(data))))
    reader.expect(f"<{sender.name}> split ünïcødé € 😀 line")


def test_several_lines_in_one_packet_arrive_in_order(start_server, connect):
    server = start_server()
    sender, reader = connect(server), connect(server)
    sender.send(b"one\ntwo\r\nthree\n")
    assert reader.messages(sync(sender, reader)[0]) == [
        f"<{sender.name}> {text}" for text in ("one", "two", "three", "sync")
    ]


@pytest.mark.parametrize("char", ["é", "€", "😀"])
def test_a_utf8_character_split_across_packets_arrives_whole(start_server, connect, char):
    server = start_server()
    sender, reader = connect(server), connect(server)
    data = f"[{char}]\n".encode()
    send_in_pieces(sender, data, list(range(2, 1 + len(char.encode()))))
    reader.expect(f"<{sender.name}> [{char}]")


# --- Limits and bad input ---------------------------------------------------------------


def test_an_overlong_line_is_never_relayed_and_the_sender_told(start_server, connect):
    server = start_server()  # max_line 512, the default
    reader, sender = connect(server), connect(server)  # sender last: nothing pending for it
    sender.send(b"x" * 513 + b"\n" + b"y" * 512 + b"\n" + b"z" * 512 + b"\r\n")
    error = sender.read_line()
    assert error.startswith("!!! ") and "512" in error
    assert reader.messages(sync(sender, reader)[0]) == [
        f"<{sender.name}> " + "y" * 512,
        f"<{sender.name}> " + "z" * 512,
        f"<{sender.name}> sync",
    ]


@pytest.mark.timeout(90)
def test_an_endless_line_is_refused_without_memory_growth_or_delay(start_server, connect):
    server = start_server()
    streamer, alice, bob = (connect(server) for _ in range(3))
    chunk = b"x" * (64 * 1024)
    total, pings = 20 * MB, 0
    base = peak = rss_bytes()
    for sent in range(0, total, len(chunk)):
        streamer.send(chunk)
        if sent % (2 * MB) == 0:
            # Others keep chatting while the stream goes on.
            alice.say(f"ping {pings}")
            bob.expect(f"<{alice.name}> ping {pings}")
            pings += 1
            peak = max(peak, rss_bytes())
    peak = max(peak, rss_bytes())
    streamer.send(b"\nrecovered\n")
    lines = streamer.expect(f"<{streamer.name}> recovered")
    errors = [line for line in lines if line.startswith("!!! ")]
    assert len(errors) == 1 and "512" in errors[0]
    bob_messages = bob.messages(bob.expect(f"<{streamer.name}> recovered"))
    assert all(len(line) < 100 for line in bob_messages)
    assert len(bob_messages) == 1  # the pings were read above
    growth = peak - base
    assert growth < 10 * MB, f"memory grew by {growth / MB:.1f} MB for a 20 MB line"


@pytest.mark.timeout(90)
def test_many_short_lines_do_not_accumulate_in_memory(start_server, connect):
    server = start_server(sendq=4 * MB)
    sender = connect(server)
    line = b"y" * 200 + b"\n"
    count = 16 * MB // len(line) // 1000 * 1000
    echoes = 0

    def drain() -> None:
        nonlocal echoes
        while echoes < count:
            data = sender.sock.recv(1 << 20)
            assert data, "connection closed"
            echoes += data.count(b"\n")

    reader = threading.Thread(target=drain, daemon=True)
    base = peak = rss_bytes()
    reader.start()
    batch = line * 1000
    for _ in range(count // 1000):
        sender.send(batch)
        peak = max(peak, rss_bytes())
    reader.join(60)
    assert not reader.is_alive() and echoes >= count, f"{echoes} of {count} lines came back"
    peak = max(peak, rss_bytes())
    assert peak - base < 8 * MB, f"memory grew by {(peak - base) / MB:.1f} MB for 16 MB of lines"


def test_invalid_utf8_comes_out_as_valid_utf8(start_server, connect):
    server = start_server()
    sender, reader = connect(server), connect(server)
    # Not 0xFF: that is Telnet's command byte (see the Telnet tests).
    sender.send(b"bad \xfe\xfe \xc3( \xed\xa0\x80 \xc0\xaf end\n")
    sender.send(b"/me \xf0\x9f\x98\n")
    sender.send(b"/nick caf\xe9\n")
    lines = sync(sender, reader, sender)  # LineClient decodes strictly: bad UTF-8 fails
    assert (
        f"<{sender.name}> bad \ufffd\ufffd \ufffd( \ufffd\ufffd\ufffd \ufffd\ufffd end" in lines[0]
    )
    assert f"* {sender.name} \ufffd" in lines[0]
    assert [line for line in lines[1] if line.startswith("!!! ")]  # the name was refused


NASTY = [
    "\x1b[2J\x1b[H\x1b[31mcleared and red",
    "\x1b]0;new title\x07",
    "\x1b[6n query cursor",
    "fake\rline",
    "back\x08\x08space",
    "nul\x00 and bell\x07",
    "del\x7f",
    "c1 csi \u009b31m and nel \u0085",
    "\u202eevil reversed",
    "\u2066isolated\u2069 \u200f",
]


def test_escape_injection_never_reaches_anyone(start_server, connect, caplog):
    caplog.set_level(logging.INFO, logger="chatlib.server")
    server = start_server()
    attacker, victim = connect(server), connect(server)
    for text in NASTY:
        attacker.say(text, f"/me {text}", f"/msg {victim.name} {text}", f"/nick {text}")
        attacker.say(f"/{text}", f"/msg {text} hi")
    victim_lines, attacker_lines = sync(attacker, victim, attacker)
    # Every line was checked on arrival; check the nasty ones did arrive, made visible.
    assert f"<{attacker.name}> ^[[2J^[[H^[[31mcleared and red" in victim_lines
    assert f"* {attacker.name} fake^Mline" in victim_lines
    assert f"*{attacker.name}* \ufffdevil reversed" in victim_lines
    assert len(attacker_lines) > len(NASTY) * 5
    messages = [record.getMessage() for record in caplog.records]
    assert any("[NEW CONNECTION]" in message for message in messages)
    for message in messages:
        assert not forbidden_in(message), f"server log has control characters: {message!r}"


@pytest.mark.timeout(120)
def test_a_client_that_stops_reading_is_dropped_without_holding_up_others(start_server, connect):
    server = start_server(sendq=64 * 1024)
    sleeper = connect(server, rcvbuf=4096)  # reads its welcome, then nothing more
    talker, listener = connect(server), connect(server)
    fds_with_sleeper = count_fds()
    payload = "x" * 400
    pushed, batch, number = 0, 50, 0
    dropped = False
    # Loopback buffers take some 4 MB before send() blocks; 16 MB is well past that.
    while not dropped:
        assert pushed < 16 * MB, f"{sleeper.name} was never dropped"
        talker.say(*[f"{number + i} {payload}" for i in range(batch)])
        number += batch
        last = f"<{talker.name}> {number - 1} {payload}"
        for client in (talker, listener):
            # The readers get every message promptly while the sleeper's backlog grows.
            lines = client.expect(last)
            dropped = dropped or any(left_notice(sleeper)(line) for line in lines)
        pushed += batch * len(payload)
    assert talker.who() == [talker.name, listener.name]
    # The server lets go of its socket even though the sleeper still reads nothing.
    wait_until(lambda: count_fds() == fds_with_sleeper - 1, what="the sleeper's socket closed")
    sleeper.read_to_eof(timeout=30, cut_off_ok=True)
    talker.say("still here")
    listener.expect(f"<{talker.name}> still here")


@pytest.mark.timeout(60)
def test_a_flood_is_throttled_without_delaying_anyone_else(start_server, connect):
    rate, burst, count = 20, 5, 60
    server = start_server(rate=rate, burst=burst)
    flooder, other = connect(server), connect(server)
    started = time.monotonic()
    flooder.say(*[f"flood {i}" for i in range(count)])
    other.expect(f"<{flooder.name}> flood {burst - 1}")
    other.say("ping")
    other.expect(f"<{other.name}> ping")
    last = f"<{flooder.name}> flood {count - 1}"
    if last not in other.received:
        other.expect(last, timeout=30)
    elapsed = time.monotonic() - started
    messages = other.messages()
    # No flood line was lost, and the ping came back while the flood was still held back.
    assert [line for line in messages if line.startswith(f"<{flooder.name}>")] == [
        f"<{flooder.name}> flood {i}" for i in range(count)
    ]
    assert messages.index(f"<{other.name}> ping") < messages.index(last)
    assert elapsed >= (count - burst) / rate * 0.9, "the flood was not throttled"
    flooder_lines = flooder.expect(last)
    assert [line for line in flooder_lines if line.startswith("*** Slow down")]


@pytest.mark.timeout(60)
def test_flood_control_is_on_by_default(start_server, connect):
    defaults = Limits()
    server = start_server(**dataclasses.asdict(defaults))
    flooder, other = connect(server), connect(server)
    count = defaults.burst + 2
    flooder.say(*[f"flood {i}" for i in range(count)])
    other.expect(f"<{flooder.name}> flood {defaults.burst - 1}")
    other.say("ping")
    other.expect(f"<{other.name}> ping")
    last = f"<{flooder.name}> flood {count - 1}"
    if last not in other.received:
        other.expect(last)
    messages = other.messages()
    assert [line for line in messages if line.startswith(f"<{flooder.name}>")] == [
        f"<{flooder.name}> flood {i}" for i in range(count)
    ]
    assert messages.index(f"<{other.name}> ping") < messages.index(last)
    flooder_lines = flooder.expect(last)
    assert [line for line in flooder_lines if line.startswith("*** Slow down")]


# --- Clients going away -----------------------------------------------------------------


def test_a_reset_connection_leaves_cleanly(start_server, connect):
    server = start_server()
    stayer = connect(server)
    resetter = connect(server)
    resetter.send(b"half a li")
    resetter.reset()
    stayer.read_until(left_notice(resetter))
    # Reset while the server still has output queued for it.
    busy = connect(server)
    busy.say(*["/help"] * 50)
    busy.reset()
    stayer.read_until(left_notice(busy))
    assert stayer.who() == [stayer.name]


def test_half_close_delivers_the_final_line_and_the_goodbye(start_server, connect):
    server = start_server()
    stayer, leaver = connect(server), connect(server)
    leaver.send(b"said before\n/quit\n")
    leaver.half_close()
    assert leaver.read_to_eof() == [f"<{leaver.name}> said before", f"*** Bye, {leaver.name}!"]
    lines = stayer.read_until(left_notice(leaver))
    assert f"<{leaver.name}> said before" in lines


def test_a_final_line_without_newline_is_delivered_at_eof(start_server, connect):
    server = start_server()
    stayer, leaver = connect(server), connect(server)
    leaver.send(b"last words, no newline")
    leaver.half_close()
    assert leaver.read_to_eof() == [f"<{leaver.name}> last words, no newline"]
    lines = stayer.read_until(left_notice(leaver))
    assert lines[-2:] == [f"<{leaver.name}> last words, no newline", lines[-1]]


def test_a_client_vanishing_mid_line_leaves_cleanly(start_server, connect):
    server = start_server()
    stayer = connect(server)
    vanisher = connect(server)
    vanisher.send(b"i was in the middle of")
    vanisher.close()
    lines = stayer.read_until(left_notice(vanisher))
    assert stayer.messages(lines) in ([], [f"<{vanisher.name}> i was in the middle of"])
    assert stayer.who() == [stayer.name]


@pytest.mark.timeout(120)
def test_connection_churn_leaves_exactly_the_remaining_members(start_server, connect):
    server = start_server()
    observer, keeper = connect(server), connect(server)

    def churn(i: int) -> None:
        client = LineClient(server.address)
        try:
            mode = i % 6
            if mode == 1:
                client.welcome()
            elif mode == 2:
                client.send(b"vanishing mid-li")
            elif mode == 3:
                client.say("/help", "/help", "/who")
            elif mode == 4:
                client.welcome()
                client.say("/quit")
                client.read_until(lambda line: line.startswith("*** Bye, "))
            elif mode == 5:
                client.half_close()
        finally:
            if i % 2:
                client.reset()
            else:
                client.close()

    with ThreadPoolExecutor(4) as pool:
        for future in [pool.submit(churn, i) for i in range(200)]:
            future.result()
    wait_until(lambda: observer.who() == [observer.name, keeper.name], what="churners gone")
    keeper.say("still here")
    observer.expect(f"<{keeper.name}> still here")


# --- Limits on clients, and stopping ----------------------------------------------------


def test_a_full_server_turns_clients_away_until_someone_leaves(start_server, connect):
    server = start_server(max_clients=2)
    first, second = connect(server), connect(server)
    extra = connect(server, welcome=False)
    (line,) = extra.read_to_eof()
    assert line.startswith("*** ") and "full" in line
    first.say("/quit")
    second.read_until(left_notice(first))
    newcomer = connect(server)  # reads the welcome
    assert second.who() == [second.name, newcomer.name]


@pytest.mark.timeout(60)
def test_stop_says_goodbye_to_everyone_and_returns_quickly(engine, health, connect):
    server = create_server(engine, "127.0.0.1", 0, limits=Limits(rate=0, sendq=64 * MB))
    server.start()
    try:
        talker = connect(server)
        stalled = connect(server, rcvbuf=4096)
        # Fill the stalled client's buffers: its server side is blocked writing to it.
        payload = "s" * 400
        for number in range(0, 8 * MB // len(payload), 100):
            talker.say(*[f"{number + i} {payload}" for i in range(100)])
            talker.expect(f"<{talker.name}> {number + 99} {payload}")
        idle, partial = connect(server), connect(server)
        partial.send(b"half a line")
        started = time.monotonic()
    finally:
        server.stop()
    elapsed = time.monotonic() - started
    for client in (talker, idle, partial):
        assert client.read_to_eof()[-1:] == [BYE_ALL]
    stalled.read_to_eof(timeout=30, cut_off_ok=True)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(server.address, timeout=5).close()
    assert elapsed < 3.0, f"stop() took {elapsed:.2f} s"


def test_leaving_the_with_block_stops_the_server(engine, health, connect):
    with create_server(engine, "127.0.0.1", 0) as server:
        client = connect(server)
    assert client.read_to_eof() == [BYE_ALL]


def test_stop_twice_is_harmless(engine, health):
    server = create_server(engine, "127.0.0.1", 0).start()
    server.stop()
    server.stop()


def test_connections_are_logged(start_server, engine, caplog):
    caplog.set_level(logging.INFO, logger="chatlib.server")
    server = start_server()
    host, port = server.address
    wait_until(lambda: any("[LISTENING]" in r.getMessage() for r in caplog.records))
    assert f"[LISTENING] Server ({engine} engine) is listening on {host}:{port}" in caplog.messages
    client = LineClient(server.address)
    client.welcome()
    peer = client.sock.getsockname()[:2]
    wait_until(lambda: f"[NEW CONNECTION] {peer} connected." in caplog.messages)
    client.close()
    wait_until(lambda: f"[DISCONNECTED] {peer} disconnected." in caplog.messages)


# --- Rooms and history --------------------------------------------------------------


def test_rooms_route_chat_and_private_messages_cross_them(start_server, connect):
    server = start_server()
    ann, ben, cat = (connect(server) for _ in range(3))
    ben.say("/join #maths")
    ben.expect(f"*** You are in #maths (1 here): {ben.name}")
    ann.expect(f"*** {ben.name} left (for another room).")
    cat.say("/join #maths")
    ben.expect(f"*** {cat.name} joined.")
    cat.say("in maths", f"/msg {ann.name} psst")
    ann.expect(f"*{cat.name}* psst")
    ben.expect(f"<{cat.name}> in maths")
    ann.say("in the lobby", "/rooms")
    lines = ann.expect("*** Rooms (2): #lobby (1), #maths (2)")
    assert f"<{cat.name}> in maths" not in lines
    cat.say("/who")
    assert cat.expect(f"*** Online (2): {ben.name}, {cat.name}")
    # ben sees no lobby line: the next thing after cat's message is cat's own /part.
    cat.say("/part")
    assert ben.read_line() == f"*** {cat.name} left (for another room)."


def test_history_is_replayed_to_whoever_enters_a_room(start_server, connect):
    server = start_server(history=3)
    talker = connect(server)  # the lobby had no history yet: nothing follows the welcome
    talker.say("/join #late", "one", "/me two", "three", "four")
    talker.expect(f"<{talker.name}> four")
    late = connect(server)
    late.say("/join #late")
    assert late.expect("*** End of recent messages in #late.") == [
        f"*** You are in #late (2 here): {talker.name}, {late.name}",
        "*** Recent messages in #late (3):",
        f"* {talker.name} two",
        f"<{talker.name}> three",
        f"<{talker.name}> four",
        "*** End of recent messages in #late.",
    ]
    late.say("/history 1")
    assert late.expect("*** End of recent messages in #late.")[-2] == f"<{talker.name}> four"


def test_a_store_keeps_history_on_every_engine(engine, health, tmp_path, connect):
    # The threaded engine calls the store from its reader and sender threads, one at a time.
    path = str(tmp_path / "chat.db")
    for attempt in ("first", "second"):
        store = SQLiteHistory(path)
        limits = Limits(rate=0, history=5)
        with create_server(engine, "127.0.0.1", 0, limits=limits, store=store) as server:
            client = connect(server)
            if attempt == "first":
                client.say("kept across restarts")
                client.expect(f"<{client.name}> kept across restarts")
            else:
                client.say("/history")
                assert client.expect("*** End of recent messages in #lobby.")[-2].endswith(
                    "> kept across restarts"
                )
            client.close()
        store.close()
