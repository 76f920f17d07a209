"""``python -m chatlib.server`` as a user runs it: its output, its signals, its failures."""

from __future__ import annotations

import logging
import os
import queue
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from chatlib.server import (
    ENGINES,
    LOG_FLUSH_TIMEOUT,
    LOG_QUEUE_LINES,
    _DroppingQueueHandler,
    _StdoutWriter,
)
from tests.helpers import TIMEOUT, LineClient, wait_until

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(
    r"\[LISTENING\] Server \((?P<engine>\w+) engine\) is listening on 127\.0\.0\.1:(?P<port>\d+)"
)
BYE_ALL = "*** The server is shutting down. Bye!"


class ServerProcess:
    """``python -m chatlib.server`` in a subprocess, its stdout read line by line."""

    def __init__(self, *args: str, max_files: int | None = None) -> None:
        def limit_files() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chatlib.server", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=limit_files if max_files else None,
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
        return int(self.listening()["port"])

    def listening(self) -> re.Match:
        # Python starts slowly on a busy machine: wait longer than for a line.
        return self.expect(LISTENING, timeout=3 * TIMEOUT)

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

    def run(*args: str, max_files: int | None = None) -> ServerProcess:
        server = ServerProcess(*args, max_files=max_files)
        started.append(server)
        return server

    yield run
    for server in started:
        server.kill()


@pytest.mark.parametrize("engine", ENGINES)
def test_logs_listening_connections_and_disconnections(run_server, engine):
    server = run_server("--engine", engine, "--port", "0")
    listening = server.listening()
    assert listening["engine"] == engine  # the log says which engine runs
    port = int(listening["port"])
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
        "--store",
        "--broker",
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


def test_store_and_broker_together_are_one_clear_error(tmp_path):
    command = [sys.executable, "-m", "chatlib.server", "--port", "0"]
    command += ["--store", str(tmp_path / "history.db"), "--broker", "redis://127.0.0.1:1/0"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=10)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].endswith(
        "error: --store and --broker do not go together: with --broker, history is on Redis"
    )
    assert not (tmp_path / "history.db").exists()


# --- An unread stdout (issue: the log blocks the loops) ----------------------

#: Connections to open and close against an unread stdout. Each logs two lines of about
#: 50 bytes, so 2000 give some 200 KB: more than a 64 KiB pipe plus the log's queue hold.
CHURN = 2000
DROPPED = re.compile(r"\[LOG\] (\d+) log lines? dropped: the output was not being read\.")


def _free_port() -> int:
    # The test must not read the server's stdout, so it cannot learn the port from the
    # [LISTENING] line: it picks a free one and passes it as --port.
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return probe.getsockname()[1]


def _start_unread(engine: str) -> tuple[subprocess.Popen, int]:
    """Start the server with a stdout nobody reads (yet); return it once it accepts."""
    port = _free_port()
    # Buffered, as in a shell: a log written through sys.stdout's buffer from a thread
    # blocked on the pipe made the interpreter abort at exit.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    # --rate 0: the test churns connections, which flood control by address throttles.
    command = ["-m", "chatlib.server", "--engine", engine, "--port", str(port), "--rate", "0"]
    proc = subprocess.Popen(
        [sys.executable, *command],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def accepts() -> bool:
        assert proc.poll() is None, f"the server exited with status {proc.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()
        except ConnectionRefusedError:
            return False
        return True

    wait_until(accepts, timeout=3 * TIMEOUT, what="the server to accept connections")
    return proc, port


def _churn(port: int) -> None:
    """Open and close CHURN connections: each logs [NEW CONNECTION] and [DISCONNECTED]."""
    # A line is at least 40 bytes, so a 64 KiB pipe holds at most 65536 // 40 of them.
    assert 2 * CHURN > 65536 // 40 + LOG_QUEUE_LINES, "too few lines to fill pipe and queue"
    for count in range(CHURN):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
                # Wait for the welcome to start: connecting faster than the server accepts
                # would overflow the kernel's accept queue, and a dropped SYN retries after 1 s.
                assert sock.recv(1) == b"*"
        except TimeoutError:
            raise AssertionError(f"the server stopped serving after {count} connections") from None


@pytest.fixture
def unread_server():
    """Return a function that starts a server whose stdout is not read; killed at teardown."""
    started: list[subprocess.Popen] = []

    def start(engine: str) -> tuple[subprocess.Popen, int]:
        proc, port = _start_unread(engine)
        started.append(proc)
        return proc, port

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=TIMEOUT)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("engine", ENGINES)
def test_an_unread_stdout_never_stops_the_server(unread_server, engine):
    proc, port = unread_server(engine)
    _churn(port)
    client = LineClient(("127.0.0.1", port))
    try:
        assert client.welcome().startswith("guest")
    finally:
        client.close()
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    # Reading from now on lets the log catch up: it says how much it lost, then exits.
    stdout, stderr = proc.communicate(timeout=3 * TIMEOUT)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, stderr
    assert stderr == ""
    # stop() has 2 s, and writing out the queued lines takes far less.
    assert elapsed < 3.0, f"took {elapsed:.2f} s to exit"
    lines = stdout.splitlines()
    dropped = [int(match[1]) for match in map(DROPPED.fullmatch, lines) if match]
    assert dropped and all(count > 0 for count in dropped), lines[-5:]
    written = sum(line.startswith(("[NEW CONNECTION]", "[DISCONNECTED]")) for line in lines)
    # Every line was either written or counted, and the queue stayed bounded: what was
    # written is what the pipe and the queue held when the test began to read.
    assert written + sum(dropped) >= 2 * CHURN
    assert written <= 65536 // 40 + LOG_QUEUE_LINES


@pytest.mark.timeout(60)
def test_exiting_does_not_wait_for_an_unread_stdout(unread_server):
    proc, port = unread_server("threads")  # the log is the same whatever the engine
    _churn(port)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    status = proc.wait(3 * TIMEOUT)
    elapsed = time.monotonic() - started
    _, stderr = proc.communicate(timeout=TIMEOUT)
    assert status == 0, stderr
    assert stderr == ""
    # stop() has 2 s, the log waits LOG_FLUSH_TIMEOUT for a reader; allow for a busy machine.
    assert elapsed < 2.0 + LOG_FLUSH_TIMEOUT + 1.0, f"took {elapsed:.2f} s to exit"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("engine", ENGINES)
def test_out_of_file_descriptors_is_one_warning_per_pause(run_server, engine):
    # Fault (asyncio): one traceback per failed accept(), thousands a second.
    server = run_server("--engine", engine, "--port", "0", max_files=64)
    port = server.listening_port()
    # The kernel completes these connections for the backlog; the server runs out of
    # descriptors accepting them.
    clients = [socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) for _ in range(120)]
    try:
        # Twice: the second comes after a pause of ACCEPT_RETRY_DELAY, the descriptors still
        # short, so the log has had a whole pause to say too much.
        for _ in range(2):
            server.expect(r"\[PAUSED\] Cannot accept: .*")
    finally:
        for client in clients:
            client.close()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(TIMEOUT) == 0
    server._reader.join(TIMEOUT)
    while (line := server._lines.get_nowait()) is not None:
        server.output.append(line)
    log = "\n".join(server.output) + server.stderr()
    assert "Traceback" not in log
    assert all(line.startswith("[PAUSED]") for line in log.splitlines() if "accept" in line)


# Runs in a process of its own, to lower its file-descriptor limit.
_CLOSE_DURING_A_PAUSE = """
import asyncio, resource, socket
resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))
from chatlib.engines.asyncio import ChatServer
async def main():
    loop = asyncio.get_running_loop()
    escaped = []
    loop.set_exception_handler(lambda loop, context: escaped.append(context.get("message")))
    server = ChatServer("127.0.0.1", 0)
    await server.start_serving()
    clients = []
    while len(clients) < 60:
        try:
            clients.append(socket.create_connection(server.address))
        except OSError:  # out of descriptors here too: the server is short of them
            break
    await asyncio.sleep(0.3)
    for client in clients:
        client.close()
    await server.aclose()
    await asyncio.sleep(1.5)  # the loop goes on, as a notebook kernel's does
    print("escaped:", escaped)
asyncio.run(main())
"""


@pytest.mark.timeout(60)
def test_asyncio_closed_during_an_accept_pause_leaves_no_error_behind():
    # Fault (asyncio, seen once in a soak): asyncio's retries of accept(), still due
    # when the server closed, failed on the closed listener with a traceback.
    done = subprocess.run(
        [sys.executable, "-c", _CLOSE_DURING_A_PAUSE],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 3,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "escaped: []"
    assert "Traceback" not in done.stderr


@pytest.mark.timeout(60)
def test_a_server_that_does_not_ignore_sigpipe_survives_resets():
    # Fault (threads): sends relied on SIGPIPE being ignored, as Python does but an
    # application embedding the server may not. (The selectors engine reads a reset before
    # it writes again, and asyncio's transports are asyncio's to fix.)
    engine = "threads"
    code = (
        "import signal, sys; signal.signal(signal.SIGPIPE, signal.SIG_DFL); "
        "from chatlib.server import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--engine", engine, "--port", "0", "--rate", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        port = int(LISTENING.fullmatch(proc.stdout.readline().rstrip("\n"))["port"])
        talker = LineClient(("127.0.0.1", port))
        talker.welcome()
        for _ in range(30):
            doomed = [LineClient(("127.0.0.1", port)) for _ in range(5)]
            for client in doomed:
                client.welcome()
            talker.say(*["x" * 400] * 50)  # the server writes to them as they reset
            for client in doomed:
                client.reset()
            talker.say("still there?")
            talker.expect(f"<{talker.name}> still there?")
            assert proc.poll() is None, f"the server died: status {proc.returncode}"
        talker.close()
    finally:
        proc.kill()
        proc.wait(TIMEOUT)
        proc.stdout.close()


def test_the_log_writer_writes_tracebacks_and_bursts_whole(tmp_path):
    # Planted bug: records queued unformatted, to be formatted off the serving thread,
    # lost their tracebacks.
    handler = _DroppingQueueHandler(queue.Queue(LOG_QUEUE_LINES))
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("tests.log_writer")
    logger.propagate = False
    logger.addHandler(handler)
    path = tmp_path / "log"
    try:
        with open(path, "w") as stream:
            writer = _StdoutWriter(handler, stream)
            writer.start()
            try:
                raise ZeroDivisionError("division by zero")
            except ZeroDivisionError:
                logger.exception("[ERROR] it failed")
            for port in range(300):  # a burst: more than one write's worth
                logger.warning("[NEW CONNECTION] %s connected.", ("127.0.0.1", port))
            writer.stop()
    finally:
        logger.removeHandler(handler)
    lines = path.read_text().splitlines()
    assert lines[0] == "[ERROR] it failed"
    assert lines[1] == "Traceback (most recent call last):"
    assert "ZeroDivisionError: division by zero" in lines
    assert lines[-300:] == [
        f"[NEW CONNECTION] ('127.0.0.1', {port}) connected." for port in range(300)
    ]


# --- The history store ---------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_every_echoed_message_survives_kill_9(run_server, engine, tmp_path):
    # Two clients in two rooms chat in turn (each line waits for the echo of the one
    # before), and the server is killed mid-conversation. Every line whose echo a
    # client saw must be in the history after a restart on the same store.
    store = str(tmp_path / "chat.db")
    server = run_server("--engine", engine, "--port", "0", "--store", store, "--rate", "0")
    address = ("127.0.0.1", server.listening_port())
    rooms = ["#lobby", "#maths"]
    clients = [LineClient(address) for _ in rooms]
    seen: list[list[str]] = [[] for _ in rooms]
    for client, room in zip(clients, rooms, strict=True):
        client.welcome()
        if room != "#lobby":
            client.say(f"/join {room}")
            client.read_until(lambda line, room=room: line.startswith(f"*** You are in {room}"))

    def chat(index: int) -> None:
        client = clients[index]
        try:
            for number in range(45):  # 90 lines in all: fewer than a room keeps
                line = f"<{client.name}> line {number}"
                client.say(f"line {number}")
                if index == 0 and number == 15:
                    # Line 15 is on its way, and the other room mid-conversation.
                    server.proc.send_signal(signal.SIGKILL)
                client.read_until(lambda got, line=line: got == line)
                seen[index].append(line)
        except (OSError, AssertionError):
            pass  # killed

    talkers = [threading.Thread(target=chat, args=(index,)) for index in range(len(rooms))]
    for talker in talkers:
        talker.start()
    for talker in talkers:
        talker.join(3 * TIMEOUT)
        assert not talker.is_alive()
    for client in clients:
        client.close()
    assert server.proc.wait(TIMEOUT) == -signal.SIGKILL
    assert len(seen[0]) in (15, 16), seen[0]  # the echo of line 15 may have beaten the kill

    # No replay on arrival: each room's history comes from /history only.
    restarted = run_server("--engine", engine, "--port", "0", "--store", store, "--history", "0")
    reader = LineClient(("127.0.0.1", restarted.listening_port()))
    reader.welcome()
    for room, echoed in zip(rooms, seen, strict=True):
        if room != "#lobby":
            reader.say(f"/join {room}")
        reader.say("/history 100")
        replay = reader.read_until(
            lambda line: line.startswith(("*** End of recent messages", "*** No messages"))
        )
        missing = [line for line in echoed if line not in replay]
        assert not missing, f"{room}: echoed but lost in the crash: {missing}"
    reader.close()


@pytest.mark.parametrize(
    ("content", "why"), [(b"not a database " * 100, "file is not a database"), (None, "")]
)
def test_an_unusable_store_stops_the_server_with_one_clear_line(tmp_path, content, why):
    path = tmp_path / "chat.db"
    if content is None:
        path = tmp_path / "missing" / "chat.db"
    else:
        path.write_bytes(content)
    result = subprocess.run(
        [sys.executable, "-m", "chatlib.server", "--port", "0", "--store", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3 * TIMEOUT,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    assert str(path) in line and why in line and line.endswith("; no client was let in.")
    assert "LISTENING" not in result.stdout
