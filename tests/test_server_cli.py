"""``python -m chatlib.server`` as a user runs it: its output, its signals, its failures."""

from __future__ import annotations

import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from chatlib.server import ENGINES
from tests.helpers import TIMEOUT, LineClient

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"\[LISTENING\] Server is listening on 127\.0\.0\.1:(\d+)")
BYE_ALL = "*** The server is shutting down. Bye!"


class ServerProcess:
    """``python -m chatlib.server`` in a subprocess, its stdout read line by line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chatlib.server", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.output: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def expect(self, pattern: str | re.Pattern, timeout: float = TIMEOUT) -> re.Match:
        """Read stdout until a line matches *pattern* in full; return the match."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r}; got {self.output}") from None
            if line is None:
                raise AssertionError(f"stdout closed before {pattern!r}; got {self.output}")
            self.output.append(line)
            match = re.fullmatch(pattern, line)
            if match:
                return match

    def listening_port(self) -> int:
        # Python starts slowly on a busy machine: wait longer than for a line.
        return int(self.expect(LISTENING, timeout=3 * TIMEOUT)[1])

    def stderr(self) -> str:
        return self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)
        self._reader.join(TIMEOUT)
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def run_server():
    """Return a function that starts ``python -m chatlib.server ARGS``; all killed at teardown."""
    started: list[ServerProcess] = []

    def run(*args: str) -> ServerProcess:
        server = ServerProcess(*args)
        started.append(server)
        return server

    yield run
    for server in started:
        server.kill()


@pytest.mark.parametrize("engine", ENGINES)
def test_logs_listening_connections_and_disconnections(run_server, engine):
    server = run_server("--engine", engine, "--port", "0")
    port = server.listening_port()
    assert port != 0
    client = LineClient(("127.0.0.1", port))
    try:
        client.welcome()
        local_port = client.sock.getsockname()[1]
        server.expect(re.escape(f"[NEW CONNECTION] ('127.0.0.1', {local_port}) connected."))
    finally:
        client.close()
    server.expect(re.escape(f"[DISCONNECTED] ('127.0.0.1', {local_port}) disconnected."))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("engine", ENGINES)
def test_a_signal_says_goodbye_and_exits_cleanly(run_server, engine, signum):
    server = run_server("--engine", engine, "--port", "0", "--rate", "0")
    port = server.listening_port()
    clients = [LineClient(("127.0.0.1", port)) for _ in range(2)]
    try:
        for client in clients:
            client.welcome()
        clients[0].say("hello before the end")
        clients[1].expect(f"<{clients[0].name}> hello before the end")
        started = time.monotonic()
        server.proc.send_signal(signum)
        for client in clients:
            # Told, then the connection closed cleanly.
            assert client.read_to_eof()[-1:] == [BYE_ALL]
        status = server.proc.wait(TIMEOUT)
        elapsed = time.monotonic() - started
    finally:
        for client in clients:
            client.close()
    stderr = server.stderr()
    assert status == 0, stderr
    assert "Traceback" not in stderr, stderr
    assert stderr == ""
    # stop() has 2 s; allow for a busy machine and the interpreter's exit.
    assert elapsed < 3.0, f"took {elapsed:.2f} s to exit"


def test_a_port_in_use_gives_one_clear_line(run_server):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        server = run_server("--port", str(port))
        status = server.proc.wait(3 * TIMEOUT)
        stderr = server.stderr()
    assert status != 0
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert str(port) in lines[0]
    assert "in use" in lines[0]


def test_help_mentions_every_option():
    result = subprocess.run(
        [sys.executable, "-m", "chatlib.server", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3 * TIMEOUT,
    )
    assert result.returncode == 0
    options = [
        "--engine",
        "--host",
        "--port",
        "--max-clients",
        "--max-line",
        "--sendq",
        "--rate",
        "--burst",
    ]
    for option in options:
        assert option in result.stdout
    for engine in ENGINES:
        assert engine in result.stdout


@pytest.mark.parametrize("engine", ENGINES)
def test_limits_from_the_command_line_are_applied(run_server, engine):
    server = run_server("--engine", engine, "--port", "0", "--max-clients", "1", "--max-line", "8")
    port = server.listening_port()
    first = LineClient(("127.0.0.1", port))
    extra = LineClient(("127.0.0.1", port))
    try:
        first.welcome()
        (line,) = extra.read_to_eof()
        assert "full" in line
        first.say("123456789", "12345678")
        assert first.read_line().startswith("!!! ")
        assert first.read_line() == f"<{first.name}> 12345678"
    finally:
        first.close()
        extra.close()
    assert server.proc.poll() is None  # refusing clients and lines does not stop the server


def test_a_useless_limit_is_one_clear_error():
    proc = subprocess.run(
        [sys.executable, "-m", "chatlib.server", "--port", "0", "--sendq", "10"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].endswith(
        "error: sendq (10) must be at least max-line (512)"
    )
    assert "Traceback" not in proc.stderr
