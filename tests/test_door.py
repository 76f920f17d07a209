"""Holding the door, over real sockets on every engine: the attacks of the issue "Hold the door".

Each test replays what one playful student did to a class's server on an earlier version:
filling the room with silent connections, reconnecting to refill the flood budget, taking a
name that looks like someone else's or like the server's, and talking with ``telnet``.
"""

from __future__ import annotations

import os
import pty
import select
import shutil
import socket
import subprocess
import threading
import time

import pytest

from chatlib.engines.base import KEEPALIVE
from chatlib.protocol import parse_notice, parse_server_line
from tests.helpers import TIMEOUT, LineClient, wait_until
from tests.test_lifecycle import server_side_sockets

IAC, DONT, DO, WONT, WILL, SB, SE, IP = 255, 254, 253, 252, 251, 250, 240, 244
TERMINAL_TYPE, TIMING_MARK = 24, 6


def notices(lines: list[str], *events: str) -> list[str]:
    """Return the ``***`` notices among *lines* that are one of *events*."""
    found = []
    for line in lines:
        parsed = parse_server_line(line)
        notice = parse_notice(parsed.text) if parsed.kind == "notice" else None
        if notice is not None and notice[0] in events:
            found.append(line)
    return found


def first_line(server) -> tuple[LineClient, str]:
    """Connect a client and return it with the first line the server sends it."""
    client = LineClient(server.address)
    return client, client.read_line()


# --- Connections from one address ------------------------------------------------


def test_one_address_gets_max_per_address_connections(start_server, connect):
    # Fault: nothing limited how many connections one address held.
    server = start_server(max_per_address=2)
    first, second = connect(server), connect(server)
    extra, line = first_line(server)
    assert line == "*** Sorry, too many connections from your address (2)."
    assert extra.read_to_eof() == []
    extra.close()
    first.close()
    second.expect(f"*** {first.name} left.")
    connect(server)  # the place is free again


def test_loopback_has_no_per_address_limit_by_default(start_server, connect):
    # Every notebook, test and benchmark client comes from 127.0.0.1.
    server = start_server(max_per_address=None)
    assert server.chat.limits.max_per_address == 0
    clients = [connect(server) for _ in range(15)]
    assert len(clients[0].who()) == 15


# --- Idle connections -------------------------------------------------------------


def test_silent_and_trickling_connections_are_closed_and_free_their_places(start_server, connect):
    # Fault: connections that sent nothing, or a byte a second with no newline, filled
    # --max-clients for as long as they stayed open, and everyone else was turned away.
    server = start_server(max_clients=3, idle_timeout=1.0)
    silent, trickler, talker = connect(server), connect(server), connect(server)
    turned_away, line = first_line(server)
    assert line == "*** Sorry, the server is full (3 clients)."
    turned_away.close()
    endings: dict[str, list[str]] = {}
    readers = [
        threading.Thread(target=lambda c=c: endings.setdefault(c.name, c.read_to_eof()))
        for c in (silent, trickler)
    ]
    for reader in readers:
        reader.start()
    give_up = time.monotonic() + TIMEOUT
    while any(reader.is_alive() for reader in readers) and time.monotonic() < give_up:
        trickler.send(b"x")  # bytes, never a line
        talker.say("still here")  # a line every 0.1 s: far from idle
        for reader in readers:
            reader.join(0.1)
    assert not any(reader.is_alive() for reader in readers), "idle clients were not closed"
    closing = "*** Closing: you sent nothing for 1 s (the idle timeout)."
    assert closing in endings[silent.name]
    assert closing in endings[trickler.name]
    talker.expect(f"*** {silent.name} left (idle).")
    talker.expect(f"*** {trickler.name} left (idle).")
    newcomer = connect(server)
    assert set(talker.who()) == {talker.name, newcomer.name}


def test_every_client_socket_has_tcp_keepalive(start_server, connect):
    # Fault: a peer that vanished without a reset held its place for as long as the server ran.
    server = start_server()
    connect(server)
    accepted = server_side_sockets(server.address[1])
    try:
        assert accepted
        for sock in accepted:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE["idle"]
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == KEEPALIVE["probes"]
    finally:
        for sock in accepted:
            sock.close()


# --- The flood budget belongs to the address ------------------------------------------


def test_reconnecting_does_not_refill_the_flood_budget(start_server, connect):
    # Fault: each new connection started with a full burst of 10 lines: a connect-burst-close
    # loop put about 1,600 lines a second on everyone's screen.
    rate, burst = 2, 10
    server = start_server(rate=rate, burst=burst)
    watcher = connect(server)
    started = time.monotonic()
    refusals = []
    for cycle in range(5):
        attacker, line = first_line(server)
        if "reconnecting too fast" in line:
            refusals.append(line)
        else:
            attacker.name = parse_notice(parse_server_line(line).text)[1]["name"]
            attacker.read_line()  # the member list
            attacker.say(*[f"spam {cycle}" for _ in range(burst)])
        attacker.close()
        if not line.startswith("*** Sorry"):
            # Once the server has seen it go. (A reconnect that overtakes the close
            # is a second connection at once, with a budget of its own.)
            watcher.expect_notice("left", name=attacker.name)
    watcher.say("marker")
    lines = watcher.expect(f"<{watcher.name}> marker")
    elapsed = time.monotonic() - started
    spam = [line for line in lines if " spam " in line]
    assert len(spam) <= burst + rate * elapsed + 1, f"{len(spam)} lines in {elapsed:.2f} s"
    assert refusals, "no reconnect was throttled"
    assert refusals[0].startswith("*** Sorry, you are reconnecting too fast; try again in ")


def test_connect_close_churn_cannot_flood_everyone_with_notices(start_server, connect):
    # Fault: connect/close churn alone put 120-790 join and leave notices a second on
    # everyone's screen, and dropped the chat panel, which could not keep up.
    rate, burst = 2, 10
    server = start_server(rate=rate, burst=burst)
    watcher = connect(server)
    started = time.monotonic()
    for _ in range(30):
        churner, line = first_line(server)
        churner.close()
        if not line.startswith("*** Sorry"):
            # As in a slow loop; one faster than the server sees each close is not
            # churn but connections at once, each joining with a budget of its own.
            name = parse_notice(parse_server_line(line).text)[1]["name"]
            watcher.expect_notice("left", name=name)
    watcher.say("marker")
    lines = watcher.expect(f"<{watcher.name}> marker")
    elapsed = time.monotonic() - started
    presence = notices(lines, "joined", "left")
    # The first join of an address that has not churned is free; each notice after it
    # costs one line of the address's budget.
    assert len(presence) <= 1 + burst + rate * elapsed + 1, (
        f"{len(presence)} notices in {elapsed:.2f} s"
    )


def test_a_throttled_address_may_come_back_when_the_server_says(start_server, connect):
    server = start_server(rate=2, burst=2)
    watcher, flooder = connect(server), connect(server)
    flooder.say("one", "two")
    flooder.close()
    watcher.expect_notice("left", name=flooder.name)
    refused, line = first_line(server)
    refused.close()
    wait = int(line.removeprefix("*** Sorry, you are reconnecting too fast; try again in ")[:-3])
    threading.Event().wait(wait)  # the time the server named, not a guess
    connect(server).say("back")


def test_concurrent_clients_from_one_address_each_get_a_full_burst(start_server, connect):
    # Tests, notebooks and the benchmark connect many clients at once from 127.0.0.1.
    server = start_server(rate=2, burst=10)
    clients = [connect(server) for _ in range(12)]
    for client in clients:
        client.say(*[f"hi from {client.name}" for _ in range(10)])
    for client in clients:
        own_line, heard = f"<{client.name}> hi from {client.name}", 0
        # Everyone's lines interleave in any order: count this client's own.
        while heard < 10:
            line = client.read_line()
            heard += line == own_line
            assert not line.startswith("*** Slow down"), f"{client.name} was throttled"


# --- Names that cannot pass for others or for the server -----------------------------

LOOKALIKES = [
    "\u0430lice",  # Cyrillic a
    "\uff41\uff4c\uff49\uff43\uff45",  # fullwidth: NFKC makes it alice
    "alice\u034f",  # combining grapheme joiner
    "alice\ufe0f",  # variation selector 16
    "\u3164",  # Hangul filler
    "ALICE",
    "a1ice",
    "\u0430\u04cf\u0456\u0441\u0435",  # all Cyrillic, and looks like alice
]


def test_names_that_look_like_a_member_are_refused(start_server, connect):
    # Fault: a Cyrillic alice, a fullwidth one, alice with an invisible mark, and the
    # Hangul filler were all accepted next to a real alice.
    server = start_server()
    alice, mallory = connect(server), connect(server)
    alice.say("/nick alice")
    mallory.expect_notice("renamed", name="alice")
    for name in LOOKALIKES:
        mallory.say(f"/nick {name}")
        error = mallory.read_line()
        assert error.startswith("!!! ") and error.endswith(f"Your name is still {mallory.name}.")
    assert alice.who() == ["alice", mallory.name]


# Every line kind's marker, and characters that look like one.
MARKERS = ["<", ">", "*", "***", "!!!", "->", "-> *", ",", "*** Online (3): alice, admin"]
MARKER_LOOKALIKES = [
    "\u2217",  # asterisk operator
    "\uff0a",  # fullwidth asterisk
    "\u204e",  # low asterisk
    "\u2731",  # heavy asterisk
    "\ufe61",  # small asterisk
    "\u2039",  # single left-pointing angle quotation mark
    "\u203a",
    "\uff1c",  # fullwidth less-than
    "\uff1e",
    "\u2329",  # left-pointing angle bracket
    "\u01c3",  # Latin letter retroflex click: looks like !
    "\uff01",  # fullwidth exclamation mark
    "\u2757",  # heavy exclamation mark
    "\u2192",  # rightwards arrow
    "\u2800",  # braille blank
    "\u2028",  # line separator
    "\u2029",  # paragraph separator
]


def test_no_name_or_message_can_fake_another_kind_of_line(start_server, connect):
    # Fault: a user named U+2217 sent "/msg alice The server is shutting down. Bye!", and
    # alice saw "*\u2217* The server is shutting down. Bye!"; a user named "x,\u2800admin"
    # made /who list a member "admin" who was not there.
    server = start_server()
    alice, mallory = connect(server), connect(server)
    alice.say("/nick alice")
    alice.expect_notice("renamed", name="alice")
    mallory.expect_notice("renamed", name="alice")
    fake = "The server is shutting down. Bye!"
    for marker in MARKERS + MARKER_LOOKALIKES:
        for name in (marker, f"{marker}x", f"x{marker}", f"x{marker}admin"):
            mallory.say(f"/nick {name}")
        mallory.say(f"{marker} {fake}", f"{marker}{fake}", f"x{marker}*** {fake}")
        mallory.say(f"/me {marker} {fake}", f"/msg alice {marker} {fake}")
    mallory.say("/nick x,\u2800admin", "sync")
    lines = alice.expect(f"<{mallory.name}> sync")
    for line in lines:
        parsed = parse_server_line(line)
        assert parsed.kind in ("message", "action", "private"), line
        assert parsed.name == mallory.name, line
    assert not [line for line in lines if "\u2028" in line or "\u2029" in line]
    assert alice.who() == ["alice", mallory.name]


def test_the_unknown_command_echo_stays_within_max_line(start_server, connect):
    server = start_server(max_line=64)
    client = connect(server)
    client.say("/" + "x" * 63, "/msg " + "y" * 55 + " hi")
    for line in (client.read_line(), client.read_line()):
        assert line.startswith("!!! ") and line.endswith(".")
        assert len(line.encode()) <= 64, line


# --- Telnet ---------------------------------------------------------------------------


def read_raw_until(sock: socket.socket, pending: bytearray, wanted: bytes) -> None:
    """Read from *sock* into *pending* until it holds *wanted*; fail after TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while wanted not in pending:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = sock.recv(4096)
        assert data, f"closed; got {bytes(pending)!r}"
        pending += data


def test_telnet_commands_are_stripped_and_refused_in_any_pieces(start_server, connect):
    # Fault: Telnet commands were relayed to everyone as garbage ("<guest1> \ufffd\ufffd^F"),
    # and nobody answered telnet's DO TIMING-MARK, so after Ctrl-C it discarded all output.
    server = start_server()
    watcher = connect(server)
    telnet = socket.create_connection(server.address, timeout=TIMEOUT)
    telnet.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pending = bytearray()
    read_raw_until(telnet, pending, b"*** You are in #lobby")
    stream = (
        b"hel"
        + bytes([IAC, WILL, TERMINAL_TYPE])  # an offer
        + b"lo "
        + bytes([IAC, SB, TERMINAL_TYPE, 0]) + b"xterm" + bytes([IAC, IAC, IAC, SE])
        + b"wor"
        + bytes([IAC, IP, IAC, DO, TIMING_MARK])  # what Ctrl-C sends
        + b"ld"
        + bytes([IAC, WONT, 1, IAC, DONT, 3])  # refusals, which are never answered
        + b"\r\n"
    )  # fmt: skip
    for byte in stream:  # one packet each: commands cut at every point
        telnet.send(bytes([byte]))
    line = watcher.read_until(lambda got: got.startswith("<"))[-1]
    assert line.endswith("> hello world"), line
    read_raw_until(telnet, pending, b"> hello world\n")
    assert bytes([IAC, DONT, TERMINAL_TYPE]) in pending
    assert bytes([IAC, WONT, TIMING_MARK]) in pending
    assert pending.count(IAC) == 2, bytes(pending)
    telnet.close()


# CI installs telnet (.ci/run): there a missing one fails instead of skipping.
@pytest.mark.skipif(not shutil.which("telnet") and not os.environ.get("CI"), reason="needs telnet")
def test_the_real_telnet_client_chats_and_hears_after_ctrl_c(start_server, connect):
    server = start_server()
    watcher = connect(server)
    host, port = server.address
    controller, terminal = pty.openpty()
    # setsid --ctty makes the pseudo-terminal telnet's own, so that Ctrl-C reaches it.
    proc = subprocess.Popen(
        ["setsid", "--ctty", "telnet", host, str(port)],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
    )
    os.close(terminal)
    screen = bytearray()

    def wait_for_screen(text: bytes) -> None:
        deadline = time.monotonic() + TIMEOUT
        while text not in screen:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"telnet never showed {text!r}; it showed {bytes(screen)!r}"
            if select.select([controller], [], [], remaining)[0]:
                screen.extend(os.read(controller, 4096))

    try:
        wait_for_screen(b"#lobby (2 here)")
        os.write(controller, b"hello from telnet\r")
        line = watcher.read_until(lambda got: got.startswith("<"))[-1]
        assert line.endswith("> hello from telnet"), line
        name = parse_server_line(line).name
        os.write(controller, b"\x03")  # Ctrl-C: IAC IP, IAC DO TIMING-MARK
        os.write(controller, b"after ctrl-c\r")
        watcher.expect(f"<{name}> after ctrl-c")
        watcher.say("can you hear me?")
        wait_for_screen(b"can you hear me?")
    finally:
        proc.kill()
        proc.wait(TIMEOUT)
        os.close(controller)
    wait_until(lambda: name not in watcher.who(), what="telnet gone from the room")
