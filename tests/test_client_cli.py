"""``python -m chatlib.client`` as a user runs it: piped, on a terminal, and on failures.

The room tracker it shares with the chat panel is tested here too, without a network.
"""

from __future__ import annotations

import contextlib
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from chatlib.chat import Limits
from chatlib.client import ChatClient
from chatlib.protocol import RoomTracker, format_notice, parse_server_line
from chatlib.server import ENGINES, create_server

TIMEOUT = 10


@pytest.fixture(params=ENGINES)
def server(request):
    with create_server(request.param, "127.0.0.1", 0, Limits(rate=0)) as server:
        yield server


def run_client(server, *args: str, **kwargs) -> subprocess.Popen:
    host, port = server.address
    return subprocess.Popen(
        [sys.executable, "-m", "chatlib.client", "--host", host, "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def read_until(client: ChatClient, predicate) -> list[str]:
    """Collect lines from *client* until one satisfies *predicate* (bounded)."""
    client._sock.settimeout(TIMEOUT)
    lines = []
    for line in client:
        lines.append(line)
        if predicate(line):
            return lines
    raise AssertionError(f"connection ended or timed out first; got {lines}")


def wait_for_exit(proc: subprocess.Popen) -> int:
    """Return *proc*'s exit status once it exits; kill it and fail if it does not (bounded)."""
    try:
        return proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"the client did not exit within {TIMEOUT} s") from None


def test_piped_stdin_sends_each_line_then_leaves(server):
    with ChatClient(*server.address) as watcher:
        proc = run_client(server, "--name", "carol", stdin=subprocess.PIPE)
        out, err = proc.communicate("hello\n/me waves\n", timeout=TIMEOUT)
        seen = read_until(watcher, lambda line: line == "*** carol left.")
    assert proc.returncode == 0
    assert err == ""
    assert "<carol> hello" in out.splitlines()
    assert "* carol waves" in out.splitlines()
    assert "<carol> hello" in seen
    assert "* carol waves" in seen


# Spaces around a command do not count (chatlib.protocol.parse_command), and
# commands are not case-sensitive: the client must agree with the server.
@pytest.mark.parametrize("leave", ["/quit", "exit", "exit ", " exit", " /quit", "/quit ", "/QUIT"])
def test_quit_and_exit_leave_cleanly(server, leave):
    proc = run_client(server, "--name", "dave", stdin=subprocess.PIPE)
    proc.stdin.write(f"hi\n{leave}\n")
    proc.stdin.flush()
    # stdin stays open (no communicate() until it has exited): the client
    # must leave because of the command alone, not because its input ended.
    assert wait_for_exit(proc) == 0
    out, err = proc.communicate()
    assert "*** Bye, dave!" in out
    assert "Disconnected" not in out  # it knew it was leaving
    assert err == ""


@pytest.mark.parametrize("last", ["hello", "/quit", "exit "])
def test_end_of_input_ends_the_client_even_if_the_server_never_answers(last):
    # A listener that never accepts: the connection completes in its
    # backlog, and nothing is ever sent back, not even a goodbye.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        host, port = silent.getsockname()
        with subprocess.Popen(
            [sys.executable, "-m", "chatlib.client", "--host", host, "--port", str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as proc:
            proc.stdin.write(f"{last}\n")
            proc.stdin.close()  # the end of the input
            assert wait_for_exit(proc) == 0
            out, err = proc.stdout.read(), proc.stderr.read()
        assert err == ""
        assert "Disconnected" not in out
        silent.settimeout(TIMEOUT)
        conn, _ = silent.accept()
        with conn:
            heard = b""
            while data := conn.recv(4096):
                heard += data
    # One goodbye: /quit at the end of the input, unless the last line left already.
    said = {"hello": b"hello\n/quit\n", "/quit": b"/quit\n", "exit ": b"exit \n"}
    assert heard == said[last]


def test_refused_connection_is_one_clear_line():
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        port = placeholder.getsockname()[1]
    # Nothing listens on that port any more.
    proc = subprocess.run(
        [sys.executable, "-m", "chatlib.client", "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"Cannot connect to 127.0.0.1:{port}: Connection refused."
    ]


def test_server_going_away_is_reported(server):
    proc = run_client(server, stdin=subprocess.PIPE)  # stdin left open: blocked reading it
    with ChatClient(*server.address) as watcher:
        read_until(watcher, lambda line: line.endswith("joined."))
    server.stop()
    # Not communicate(): closing stdin would make the client leave by itself.
    assert proc.wait(timeout=TIMEOUT) == 0
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.stdin.close()
    assert out.splitlines()[-2:] == [
        "*** The server is shutting down. Bye!",
        "*** Disconnected: the server closed the connection.",
    ]
    assert err == ""


def test_ctrl_c_leaves_without_traceback(server):
    proc = run_client(server, "--name", "erin", stdin=subprocess.PIPE)
    with ChatClient(*server.address) as watcher:
        read_until(watcher, lambda line: line.endswith("is now known as erin."))
        proc.send_signal(signal.SIGINT)
        read_until(watcher, lambda line: line == "*** erin left.")
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0
    assert "Traceback" not in err
    assert "*** Bye, erin!" in out


class Screen:
    """The client running on a pseudo-terminal: what it has drawn, and keys to type."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        #: Everything the client has written to the terminal so far.
        self.drawn = b""
        self._seen = 0  # where the next expect() starts looking

    def expect(self, expected: bytes) -> None:
        """Wait until *expected* is drawn after what the last call found (bounded)."""
        deadline = time.monotonic() + TIMEOUT
        while (found := self.drawn.find(expected, self._seen)) < 0:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"never saw {expected!r} in {self.drawn[self._seen :]!r}")
            self.drawn += os.read(self.fd, 4096)
        self._seen = found + len(expected)

    def type(self, keys: bytes) -> None:
        """Type *keys*; only do so while readline waits (a prompt was just expected).

        Keys that arrive while it redraws may be echoed twice.
        """
        os.write(self.fd, keys)


@contextlib.contextmanager
def on_a_terminal(port: int, *args: str) -> Iterator[Screen]:
    """Run the client on a pseudo-terminal; on leaving, check that it exited cleanly.

    The body must make the client exit (Ctrl-D, say); if the body fails
    first, the client is killed, never left behind.
    """
    pid, fd = pty.fork()
    if pid == 0:  # the child: the client on a terminal
        os.execv(
            sys.executable, [sys.executable, "-m", "chatlib.client", "--port", str(port), *args]
        )
    screen = Screen(fd)
    status = None
    try:
        yield screen
        status = _wait_for_exit(pid)
    finally:
        if status is None:  # the test failed first: do not leave the client behind
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    assert b"Traceback" not in screen.drawn


def test_terminal_redraws_the_line_being_typed(server):
    """An incoming message must not clobber what the user has typed so far."""
    host, port = server.address
    with on_a_terminal(port, "--name", "fay") as screen:
        screen.expect(b"is now known as fay.")
        screen.expect(b"> ")
        screen.type(b"half-typ")
        screen.expect(b"half-typ")
        with ChatClient(host, port) as other:
            other.send("ping from gus")
            # Erase the line, print the message, redraw prompt and typed text.
            screen.expect(b"\r\x1b[K<guest2> ping from gus\r\n#lobby> half-typ")
        screen.expect(b"*** guest2 left.\r\n#lobby> half-typ")
        screen.type(b"ed\n")
        screen.expect(b"<fay> half-typed\r\n#lobby> ")
        screen.type(b"\x04")  # Ctrl-D on an empty line
        screen.expect(b"*** Bye, fay!")


@pytest.mark.parametrize("name", [None, "fay"])
def test_on_a_terminal_only_a_guest_is_invited_to_choose_a_name(history_server, name):
    port = history_server.address[1]
    with on_a_terminal(port, *(["--name", name] if name else [])) as screen:
        if name:
            screen.expect(b"*** guest1 is now known as fay.")
        screen.expect(b"#lobby> ")
        screen.type(b"\x04")
        screen.expect(b"*** Bye, ")
    welcome = ("*** " + format_notice("welcome", name="guest1")).encode()
    assert (welcome in screen.drawn) == (name is None)


@pytest.fixture
def history_server(health):
    """A server (one engine: this is about the client) that replays recent messages."""
    with create_server("threads", "127.0.0.1", 0, Limits(rate=0, history=5)) as server:
        yield server


def test_the_prompt_names_the_room_and_replayed_lines_are_dim(history_server):
    host, port = history_server.address
    with ChatClient(host, port) as alice:
        alice.send("/nick alice\nsaid before")
        read_until(alice, lambda line: line == "<alice> said before")
        with on_a_terminal(port, "--name", "fay") as screen:
            screen.expect(b"*** Recent messages in #lobby (1):")
            # Faint (SGR 2), then normal intensity again (SGR 22).
            screen.expect(b"\x1b[2m<alice> said before\x1b[22m")
            screen.expect(b"*** End of recent messages in #lobby.")
            screen.expect(b"is now known as fay.")
            screen.expect(b"#lobby> ")
            alice.send("said now")  # live: not dim
            screen.expect(b"\r\x1b[K<alice> said now\r\n#lobby> ")
            screen.type(b"/join #maths\n")
            screen.expect(b"*** You are in #maths (1 here): fay")
            screen.expect(b"#maths> ")
            screen.type(b"/part\n")
            screen.expect(b"*** You are in #lobby (2 here): alice, fay")
            screen.expect(b"#lobby> ")
            screen.type(b"\x04")
            screen.expect(b"*** Bye, fay!")


def test_piped_output_is_the_servers_lines_replays_and_rooms_included(history_server):
    host, port = history_server.address
    with ChatClient(host, port) as alice:
        alice.send("/nick alice\nsaid before")
        read_until(alice, lambda line: line == "<alice> said before")
        proc = run_client(history_server, "--name", "carol", stdin=subprocess.PIPE)
        out, err = proc.communicate("/join #maths\nhello\n", timeout=TIMEOUT)
    assert proc.returncode == 0
    assert err == ""
    # No prompt, no escape sequences: exactly the lines the server sent.
    assert out.splitlines() == [
        "*** " + format_notice("welcome", name="guest2"),
        "*** You are in #lobby (2 here): alice, guest2",
        "*** Recent messages in #lobby (1):",
        "<alice> said before",
        "*** End of recent messages in #lobby.",
        "*** guest2 is now known as carol.",
        "*** You are in #maths (1 here): carol",
        "<carol> hello",
        "*** Bye, carol!",
    ]


# --- The room tracker, without a network ------------------------------------


def track(tracker: RoomTracker, *lines: str) -> list[str]:
    """Return the part :meth:`RoomTracker.track` gives each of *lines*, in order."""
    return [tracker.track(parse_server_line(line)) for line in lines]


def test_the_room_tracker_follows_the_room_and_the_replays():
    tracker = RoomTracker()
    assert tracker.room is None
    parts = track(
        tracker,
        "*** " + format_notice("welcome", name="guest1"),
        "*** You are in #lobby (3 here): guest1, alice, bob",
        "*** Recent messages in #lobby (2):",
        "<alice> hi",
        "* bob waves",
        "*** End of recent messages in #lobby.",
        "<alice> live",
    )
    assert parts == ["live", "live", "history", "replayed", "replayed", "history-end", "live"]
    assert tracker.room == "#lobby" and tracker.replaying is None
    assert track(tracker, "*** You are in #maths (1 here): guest1") == ["live"]
    assert tracker.room == "#maths"


@pytest.mark.parametrize("interruption", ["*** bob joined.", "!!! Something went wrong."])
def test_a_replay_without_its_end_ends_at_the_next_notice_or_error(interruption):
    tracker = RoomTracker()
    parts = track(tracker, "*** Recent messages in #x (2):", "<a> old", interruption, "<a> new")
    assert parts == ["history", "replayed", "live", "live"]
    assert tracker.replaying is None


def test_entering_a_room_ends_a_replay_left_open():
    tracker = RoomTracker()
    track(tracker, "*** Recent messages in #lobby (5):", "<a> old")
    assert track(tracker, "*** You are in #maths (1 here): me", "<a> new") == ["live", "live"]
    assert tracker.room == "#maths"


def _wait_for_exit(pid: int) -> int:
    """Return the wait status of child *pid* once it exits (bounded)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        finished, status = os.waitpid(pid, os.WNOHANG)
        if finished:
            return status
        time.sleep(0.01)
    raise AssertionError("the client did not exit")
