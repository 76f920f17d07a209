"""Start the servers the benchmark compares, each in its own process on 127.0.0.1.

A server runs as a subprocess so that it and the load generator do not share
an interpreter (or a GIL): on a two-core machine each gets a core of its own.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import IO

__all__ = [
    "CHATLIB_ENGINES",
    "HOST",
    "SERVER_KINDS",
    "STORE_SUFFIX",
    "Server",
    "ServerError",
    "StopResult",
    "available_servers",
    "raise_open_files_limit",
    "start_server",
]

#: The only address the benchmark ever talks to.
HOST = "127.0.0.1"

#: chatlib's engines, as ``python -m chatlib.server --engine`` names them.
CHATLIB_ENGINES = ("threads", "selectors", "asyncio")

#: Every server :func:`start_server` knows, in the order reports list them.
SERVER_KINDS = (*CHATLIB_ENGINES, "naive", "naive-nagle", "redis")

#: What ``start_server(engine, store=True)`` appends to the server's name:
#: ``"asyncio+store"`` is the asyncio engine keeping its history in SQLite.
STORE_SUFFIX = "+store"

# Chat for the biggest crowd (10,000) and its senders, in every server. Redis's
# default maxclients is 10,000, one short of a crowd of 10,000 and its publisher;
# given more than the open-files limit allows, Redis lowers it to fit and says so.
_MAX_CLIENTS = "20000"
# Flood control off, room for the crowd, and a send queue deep enough that
# nobody is dropped for being slow while the load generator catches up.
_CHATLIB_ARGS = ("--port", "0", "--rate", "0", "--max-clients", _MAX_CLIENTS, "--sendq", "4194304")
# chatlib's servers name their engine; the naive server has none to name.
_LISTENING = re.compile(
    rb"\[LISTENING\] Server (?:\(\w+ engine\) )?is listening on ([0-9.]+):([0-9]+)"
)
# The directory holding the chatlib package, for children started from elsewhere
# (a notebook's working directory is notebooks/).
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
# How often terminate() looks for the exit. Popen.wait(timeout) sleeps up to 50 ms
# between looks, too coarse for a stop time measured against a 2 s target.
_EXIT_POLL = 0.005


class ServerError(RuntimeError):
    """A server could not be started, is not installed, or was gone when told to stop."""


@dataclass
class StopResult:
    """How a server took SIGTERM: what :meth:`Server.terminate` measured."""

    seconds: float  #: from SIGTERM until the process had exited, or was killed
    status: int  #: its exit status; negative: killed by that signal (-9: SIGKILL)
    killed: bool  #: it was still running after the timeout, so it was killed


@dataclass
class Server:
    """A chat server (protocol ``"chat"``) or Redis (``"redis"``) on 127.0.0.1.

    :func:`start_server` returns one with its process attached; use it in a
    ``with`` block, or call :meth:`stop`. To benchmark a server you started
    yourself, build one directly: ``Server("mine", "chat", port)``.
    """

    name: str
    protocol: str
    port: int
    process: subprocess.Popen[bytes] | None = None
    host: str = HOST
    #: The SQLite file a chatlib engine keeps its history in (``--store``), if
    #: :func:`start_server` was asked for one; :meth:`stop` removes it.
    store_path: str | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.host != HOST:
            raise ValueError(f"the benchmark only talks to {HOST}, not {self.host}")
        if self.protocol not in ("chat", "redis"):
            raise ValueError(f"protocol must be 'chat' or 'redis', not {self.protocol!r}")

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) to connect to."""
        return (self.host, self.port)

    @property
    def pid(self) -> int | None:
        """The server's process id, if this object started it."""
        return self.process.pid if self.process else None

    def rss_kib(self) -> int | None:
        """Return the server's resident memory in KiB (Linux only), or None."""
        if self.pid is None:
            return None
        try:
            with open(f"/proc/{self.pid}/status", encoding="ascii") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return None

    def cpu_seconds(self) -> float | None:
        """Return the CPU time (user + system, all threads) the server used so far, or None."""
        if self.pid is None:
            return None
        try:
            with open(f"/proc/{self.pid}/stat", encoding="ascii") as stat:
                # Fields 14 and 15 are utime and stime; the name (field 2) may hold spaces.
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def output(self, limit: int = 4000) -> str:
        """Return the last *limit* bytes the server wrote to stdout and stderr."""
        return self._read_log(limit).decode(errors="replace")

    def _read_log(self, limit: int, *, head: bool = False) -> bytes:
        """Return the first (*head*) or last *limit* bytes of the server's output."""
        if self._log is None:
            return b""
        size = os.fstat(self._log.fileno()).st_size
        start = 0 if head else max(0, size - limit)
        # pread leaves the file offset alone: the child shares it and is still writing.
        return os.pread(self._log.fileno(), min(limit, size - start), start)

    def terminate(self, timeout: float = 10.0) -> StopResult:
        """Send the server SIGTERM and time its exit; kill it if it outlives *timeout* s.

        Only for a server :func:`start_server` started. Raises
        :class:`ServerError` if it had exited already. Call :meth:`stop`
        afterwards all the same (a ``with`` block does): it closes the log.
        """
        if self.process is None:
            raise ValueError(f"{self.name} was not started by start_server: no process to stop")
        if self.process.poll() is not None:
            raise ServerError(
                f"{self.name} had exited already, with status {self.process.returncode}"
            )
        return self._signal_and_wait(timeout)

    def stop(self, timeout: float = 5.0) -> int | None:
        """Stop the server with SIGTERM (SIGKILL after *timeout* s); return its exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self._signal_and_wait(timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.store_path is not None:
            # The process is gone, so nothing holds the file (or its -wal and -shm) open.
            shutil.rmtree(os.path.dirname(self.store_path), ignore_errors=True)
        return self.process.returncode

    def _signal_and_wait(self, timeout: float) -> StopResult:
        """SIGTERM, then wait up to *timeout* s for the exit, then SIGKILL."""
        assert self.process is not None
        start = time.perf_counter()
        # Popen skips the signal if the process has exited (and been reaped) meanwhile.
        self.process.send_signal(signal.SIGTERM)
        while (status := self.process.poll()) is None:
            if (elapsed := time.perf_counter() - start) > timeout:
                self.process.kill()
                return StopResult(elapsed, self.process.wait(), killed=True)
            time.sleep(_EXIT_POLL)
        return StopResult(time.perf_counter() - start, status, killed=False)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def raise_open_files_limit() -> tuple[int, int]:
    """Raise this process's soft limit on open files to the hard limit; return (soft, hard).

    Servers started afterwards inherit the raised limit. Each benchmark client
    costs one descriptor here and one in the server.
    """
    try:
        import resource
    except ImportError:  # Windows
        return (-1, -1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def available_servers() -> list[str]:
    """Return the names in :data:`SERVER_KINDS` that can be started on this machine."""
    names = []
    if find_spec("chatlib.server") is not None:
        names += CHATLIB_ENGINES
    names += ["naive", "naive-nagle"]
    if shutil.which("redis-server"):
        names.append("redis")
    return names


def start_server(
    name: str,
    *,
    store: bool = False,
    cpu: int | None = None,
    timeout: float = 10.0,
    broker: str | None = None,
    port: int | None = None,
) -> Server:
    """Start server *name* (one of :data:`SERVER_KINDS`) and return once it accepts clients.

    With *store*, a chatlib engine keeps its history in a fresh SQLite file
    (``--store``, in a new temporary directory that :meth:`Server.stop`
    removes), and its name ends in :data:`STORE_SUFFIX`. *cpu* pins the
    server's process to that CPU (Linux), so that it and the load generator
    each have a core. *broker*, a ``redis://127.0.0.1:PORT/DB`` URL, makes a
    chatlib engine one of the servers on that Redis (``--broker``); it returns
    once the server listens, maybe before it is linked. *port* is for Redis
    only: start it on that port (say, again where one was stopped) instead
    of a free one. Raises
    :class:`ServerError` if the server is missing or does not come up within
    *timeout* seconds.
    """
    if name not in SERVER_KINDS:
        raise ValueError(f"unknown server {name!r}; choose from {', '.join(SERVER_KINDS)}")
    if store and name not in CHATLIB_ENGINES:
        raise ValueError(f"only chatlib's engines keep a history store, not {name}")
    if broker is not None and name not in CHATLIB_ENGINES:
        raise ValueError(f"only chatlib's engines link through a broker, not {name}")
    if broker is not None and not broker.startswith(f"redis://{HOST}:"):
        raise ValueError(f"the benchmark only talks to {HOST}, not to the broker {broker}")
    if port is not None and name != "redis":
        raise ValueError(f"only redis is started on a given port, not {name}")
    raise_open_files_limit()
    if name == "redis":
        return _start_redis(cpu, timeout, port)
    store_path = None
    if name in CHATLIB_ENGINES:
        command = [sys.executable, "-m", "chatlib.server", "--engine", name, *_CHATLIB_ARGS]
        if store:
            # A fresh file each time: a store left by an earlier run would make
            # every join replay its history, and its size would vary by run.
            store_path = os.path.join(tempfile.mkdtemp(prefix="chatlib-bench-"), "history.db")
            command += ["--store", store_path]
            name += STORE_SUFFIX
        if broker is not None:
            command += ["--broker", broker]
    else:
        command = [sys.executable, "-m", "chatlib.bench.naive", "--port", "0"]
        if name == "naive-nagle":
            command.append("--no-nodelay")
    try:
        server = _spawn(name, "chat", command, cpu)
    except ServerError:
        if store_path is not None:
            shutil.rmtree(os.path.dirname(store_path), ignore_errors=True)
        raise
    server.store_path = store_path  # from now on, stop() removes it
    deadline = time.monotonic() + timeout
    while True:
        match = _LISTENING.search(server._read_log(1 << 16, head=True))
        if match:
            host, port = match[1].decode(), int(match[2])
            if host != HOST:
                server.stop()
                raise ServerError(f"{name} listens on {host}, not {HOST}")
            server.port = port
            break
        _check_alive(server, deadline, timeout)
        time.sleep(0.02)
    _pin(server, cpu)  # again, now that its threads exist
    return server


def _start_redis(cpu: int | None, timeout: float, given_port: int | None) -> Server:
    executable = shutil.which("redis-server")
    if executable is None:
        raise ServerError("redis-server is not installed (Debian: apt-get install redis-server)")
    # Redis needs a real port. Another process could grab a free one before Redis
    # binds it; then Redis exits and we try another (a port given is tried once).
    output = ""
    for _attempt in range(3 if given_port is None else 1):
        port = _free_port() if given_port is None else given_port
        command = [executable, "--port", str(port), "--bind", HOST]
        command += ["--save", "", "--appendonly", "no"]  # a message bus here, not a database
        command += ["--maxclients", _MAX_CLIENTS]
        server = _spawn("redis", "redis", command, cpu)
        server.port = port
        deadline = time.monotonic() + timeout
        assert server.process is not None
        while server.process.poll() is None:
            if _redis_answers_ping(port):
                _pin(server, cpu)
                return server
            _check_alive(server, deadline, timeout)
            time.sleep(0.02)
        output = server.output()
        server.stop()
    raise ServerError(f"redis-server did not start:\n{output}")


def _spawn(name: str, protocol: str, command: list[str], cpu: int | None) -> Server:
    # Output goes to an unlinked temporary file rather than a pipe: nobody has to
    # keep draining it, and a chatty server can never block on a full pipe.
    log = tempfile.TemporaryFile()  # noqa: SIM115 -- the Server closes it in stop()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
    try:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
        )
    except OSError as error:
        log.close()
        raise ServerError(f"cannot run {command[0]}: {error}") from error
    server = Server(name, protocol, 0, process, _log=log)
    _pin(server, cpu)
    return server


def _check_alive(server: Server, deadline: float, timeout: float) -> None:
    assert server.process is not None
    if server.process.poll() is not None:
        output = server.output()
        server.stop()
        raise ServerError(
            f"{server.name} exited with status {server.process.returncode}:\n{output}"
        )
    if time.monotonic() > deadline:
        output = server.output()
        server.stop()
        raise ServerError(f"{server.name} was not ready after {timeout} s:\n{output}")


def _pin(server: Server, cpu: int | None) -> None:
    """Pin every thread of the server to *cpu*; threads started later inherit it."""
    if cpu is None or server.pid is None or not hasattr(os, "sched_setaffinity"):
        return
    try:
        threads = [int(tid) for tid in os.listdir(f"/proc/{server.pid}/task")]
    except OSError:
        threads = [server.pid]
    for tid in threads:
        with contextlib.suppress(OSError):  # the thread may be gone already
            os.sched_setaffinity(tid, {cpu})


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _redis_answers_ping(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False
