"""Faults found by probing the engines as hostile or unlucky clients would, over real sockets.

Each test here reproduces a fault measured on an earlier version (the issue "Correct under
every fault") and runs against every engine; the ``health`` fixture then checks that the
server left no thread or file descriptor behind and logged no error.
"""

from __future__ import annotations

import os
import socket
import threading

import pytest

from chatlib.chat import LINGER
from chatlib.lessons import threads_named
from chatlib.server import create_server
from tests.helpers import ConnectionClosed, LineClient, count_fds, wait_until

MB = 1024 * 1024


def server_side_sockets(port: int) -> list[socket.socket]:
    """Return duplicates of this process's sockets accepted on *port* (close them after)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = os.dup(int(name))
        except OSError:
            continue  # the directory's own descriptor, closed by now
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)  # not a socket
            continue
        try:
            if sock.family == socket.AF_INET and sock.getsockname()[1] == port:
                sock.getpeername()  # raises for the listener: only accepted ones count
                found.append(sock)
                continue
        except OSError:
            pass
        sock.close()
    return found


def reader_thread(client: LineClient, last: str) -> tuple[threading.Thread, list[str]]:
    """Start reading *client*'s lines until *last* in a thread; return it and the lines."""
    lines: list[str] = []

    def read() -> None:
        lines.extend(client.read_until(lambda line: line == last or "left" in line))

    thread = threading.Thread(target=read)
    thread.start()
    return thread, lines


# --- Clients that read are never dropped -------------------------------------------


@pytest.mark.timeout(120)
def test_pipelined_lines_fanned_out_past_sendq_in_one_read_drop_nobody_who_reads(
    start_server, connect
):
    # Fault: with --sendq 65536 --rate 0, one 64 KiB read of 900-byte lines was queued to
    # everyone before anything was written, and readers were dropped (all engines); the
    # threaded engine's single sender also fell behind a flooder's reader thread.
    server = start_server(sendq=64 * 1024, max_line=1024)
    sender = connect(server)
    readers = [connect(server) for _ in range(5)]
    count = 2000
    last = f"<{sender.name}> {count - 1} " + "z" * 890
    threads = [reader_thread(reader, last) for reader in readers]
    sender.say(*[f"{i} " + "z" * 890 for i in range(count)])
    for thread, _ in threads:
        thread.join(60)
    for reader, (_, lines) in zip(readers, threads, strict=True):
        assert lines and lines[-1] == last, f"{reader.name} lost lines: {reader.tail()}"
        assert len(reader.messages(lines)) == count
    assert sender.who() == [sender.name] + [reader.name for reader in readers]


@pytest.mark.timeout(120)
def test_a_slow_reader_gets_every_line_intact_and_in_order(start_server, connect, engine):
    # 8 MB through a 4 KB receive window: the server's sends are partial again and again.
    server = start_server(sendq=64 * MB)
    sender = connect(server)
    slow = connect(server, rcvbuf=4096)
    if engine == "threads":
        sender.who()
        # Clients that keep up cost one thread each, their reader.
        assert (threads_named("(_read)"), threads_named("(_write)")) == (2, 0)
    count, payload = 16_000, "p" * 500
    last = f"<{sender.name}> {count - 1} {payload}"
    thread, lines = reader_thread(slow, last)
    for start in range(0, count, 500):
        sender.say(*[f"{i} {payload}" for i in range(start, start + 500)])
    thread.join(90)
    assert lines[-1:] == [last]
    assert slow.messages(lines) == [f"<{sender.name}> {i} {payload}" for i in range(count)]
    if engine == "threads":
        # The kernel refused part of a send to it (and to the sender, which reads nothing
        # meanwhile): each got a writer thread of its own.
        assert threads_named("(_write)") == 2


# --- Leaving: the goodbye, then a prompt and clean end ---------------------------------


@pytest.mark.parametrize("ending", ["close", "reset"])
def test_quit_and_vanish_at_once_still_tells_the_others(start_server, connect, ending):
    # Fault (asyncio): `printf '/quit\n' | nc -q0`: write_eof() on the reset connection
    # raised ENOTCONN, and the others were never told that the client left.
    server = start_server()
    observer = connect(server)
    for _ in range(10):
        quitter = connect(server)
        quitter.say("/quit")
        getattr(quitter, ending)()
        observer.expect(f"*** {quitter.name} left.")


def test_a_leaving_client_gets_a_clean_end_right_after_its_goodbye(start_server, connect):
    # Planted bug: the end of stream waited for the LINGER fallback (a reset) instead of
    # following the goodbye.
    server = start_server()
    leaver = connect(server)
    leaver.say("/quit")
    lines = leaver.read_to_eof(timeout=LINGER * 0.9)  # a reset or a late end fails here
    assert lines[-1] == f"*** Bye, {leaver.name}!"


@pytest.mark.timeout(120)
def test_a_leaving_client_that_reads_nothing_is_cut_off_at_its_deadline(
    start_server, connect, engine
):
    # Fault (threads): its writer blocked in sendall() with no deadline, and LINGER only
    # started once that returned: the connection was held forever.
    server = start_server(sendq=256 * MB)
    sleeper = connect(server, rcvbuf=4096)
    talker = connect(server)
    fds_before = count_fds()
    # Loopback buffers take some 4 MB; 12 MB leaves the server holding the rest.
    payload = "s" * 500
    for batch in range(48):
        talker.say(*[f"{batch} {payload}"] * 500)
        talker.expect(f"<{talker.name}> {batch} {payload}", timeout=30)
    sleeper.say("/quit")
    talker.expect(f"*** {sleeper.name} left.")
    # The server lets go of the socket within its deadline, though the client reads nothing.
    wait_until(lambda: count_fds() <= fds_before - 1, what="the leaver's socket closed")


# --- Full rooms and the door ----------------------------------------------------------------


def test_turned_away_clients_cost_no_thread_and_no_descriptor(start_server, connect):
    # Faults: a full room's refusals ran two threads each (threads), and connect-and-close
    # against a full room leaked a descriptor each (asyncio: 973 fds after 1,000 tries).
    server = start_server(max_clients=2)
    members = [connect(server), connect(server)]
    threads_before, fds_before = threading.enumerate(), count_fds()
    refused = [LineClient(server.address) for _ in range(20)]
    try:
        for client in refused:
            assert client.read_line() == "*** Sorry, the server is full (2 clients)."
        assert threading.active_count() <= len(threads_before), (
            f"{threading.enumerate()} after, {threads_before} before"
        )
    finally:
        for client in refused:
            client.close()
    for i in range(300):
        client = LineClient(server.address)
        client.reset() if i % 2 else client.close()
    wait_until(lambda: count_fds() <= fds_before, what=f"descriptors back to {fds_before}")
    assert members[0].who() == [member.name for member in members]


def test_a_failed_thread_start_refuses_one_client_and_keeps_serving(
    start_server, connect, engine, monkeypatch
):
    # Fault (threads): "can't start new thread" killed the acceptor, then stop() failed.
    if engine != "threads":
        pytest.skip("only the threaded engine starts threads per client")
    server = start_server()
    first = connect(server)  # its welcome comes once its threads run
    real_start = threading.Thread.start
    failures = iter([True])

    def start(thread: threading.Thread) -> None:
        if next(failures, False):
            raise RuntimeError("can't start new thread")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    # Cut off with a reset at once: even the connect() may fail (EPIPE, ECONNRESET).
    with pytest.raises((ConnectionClosed, ConnectionResetError, BrokenPipeError)):
        refused = LineClient(server.address)
        try:
            refused.read_to_eof(cut_off_ok=True)
            refused.read_line()
        finally:
            refused.close()
    later = connect(server)
    later.say("still serving")
    first.expect(f"<{later.name}> still serving")


# --- Engine details -------------------------------------------------------------------


def test_every_accepted_socket_has_nagle_off(start_server, connect):
    server = start_server()
    connect(server)
    connect(server)
    accepted = server_side_sockets(server.address[1])
    try:
        assert len({sock.getpeername() for sock in accepted}) == 2
        assert all(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for sock in accepted)
    finally:
        for sock in accepted:
            sock.close()


def test_an_application_default_timeout_does_not_drop_idle_clients(health, engine):
    # Fault (threads): accepted sockets inherited socket.getdefaulttimeout(), so a client
    # idle for longer was dropped. The default stays set while clients are accepted.
    socket.setdefaulttimeout(0.2)
    try:
        with create_server(engine, "127.0.0.1", 0) as server:
            idle, talker = LineClient(server.address), LineClient(server.address)
            idle.welcome()
            talker.welcome()
            # Idle for longer than that timeout: the very thing under test, not a guess.
            threading.Event().wait(0.6)
            talker.say("are you there?")
            idle.expect(f"<{talker.name}> are you there?")
            idle.close()
            talker.close()
    finally:
        socket.setdefaulttimeout(None)


def test_asyncio_keeps_its_write_buffer_limits(start_server, connect, engine):
    # Planted bug: a transport with asyncio's default limits (64 KiB) holds backlogs the
    # room never sees.
    if engine != "asyncio":
        pytest.skip("asyncio only")
    server = start_server()
    connect(server)
    wait_until(lambda: server._clients, what="the client in the engine")
    for client in server._clients.values():
        assert client.transport.get_write_buffer_limits() == (0, 0)


def test_reading_resumes_after_flood_control(start_server, connect):
    # Planted bug: a throttled client was never read again (caught only by a teardown).
    server = start_server(rate=20, burst=2)
    flooder, other = connect(server), connect(server)
    flooder.say(*[f"flood {i}" for i in range(8)])
    other.expect(f"<{flooder.name}> flood 7")
    flooder.say("after the flood")
    other.expect(f"<{flooder.name}> after the flood")


def test_a_reset_client_is_cleaned_up_at_once(start_server, connect):
    # Planted bug: a reader returning on an error without cleaning up (seen only by the
    # health fixture's teardown): the client must be gone from the room and the server.
    server = start_server()
    stayer = connect(server)
    fds_before = count_fds()
    resetter = connect(server)
    resetter.reset()
    stayer.expect(f"*** {resetter.name} left.")
    assert stayer.who() == [stayer.name]
    wait_until(lambda: count_fds() <= fds_before, what="the reset client's socket closed")
