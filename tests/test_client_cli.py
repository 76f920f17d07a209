"""``python -m chatlib.client`` as a user runs it: piped, on a terminal, and on failures."""

from __future__ import annotations

import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

from chatlib.chat import Limits
from chatlib.client import ChatClient
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


def test_terminal_redraws_the_line_being_typed(server):
    """An incoming message must not clobber what the user has typed so far."""
    host, port = server.address
    pid, fd = pty.fork()
    if pid == 0:  # the child: the client on a terminal
        os.execv(
            sys.executable,
            [sys.executable, "-m", "chatlib.client", "--port", str(port), "--name", "fay"],
        )
    screen = b""
    status = None

    def read_screen_until(expected: bytes) -> None:
        nonlocal screen
        deadline = time.monotonic() + TIMEOUT
        while expected not in screen:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"never saw {expected!r} in {screen!r}")
            screen += os.read(fd, 4096)

    try:
        read_screen_until(b"is now known as fay.")
        read_screen_until(b"> ")
        os.write(fd, b"half-typ")
        read_screen_until(b"half-typ")
        with ChatClient(host, port) as other:
            other.send("ping from gus")
            # Erase the line, print the message, redraw prompt and typed text.
            read_screen_until(b"\r\x1b[K<guest2> ping from gus\r\n> half-typ")
        # Type only while readline waits for input: keys that arrive while
        # it redraws may be echoed twice.
        read_screen_until(b"*** guest2 left.\r\n> half-typ")
        os.write(fd, b"ed\n")
        read_screen_until(b"<fay> half-typed\r\n> ")
        os.write(fd, b"\x04")  # Ctrl-D on an empty line
        read_screen_until(b"*** Bye, fay!")
        status = _wait_for_exit(pid)
    finally:
        if status is None:  # the test failed first: do not leave the client behind
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    assert b"Traceback" not in screen


def _wait_for_exit(pid: int) -> int:
    """Return the wait status of child *pid* once it exits (bounded)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        finished, status = os.waitpid(pid, os.WNOHANG)
        if finished:
            return status
        time.sleep(0.01)
    raise AssertionError("the client did not exit")
