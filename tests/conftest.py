"""Fixtures for tests over real sockets: an engine, a running server, raw clients, a health check.

Everything listens on 127.0.0.1 port 0. The health check fails a test whose server logged an
error, let an exception escape a thread, or left threads or file descriptors behind.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import pytest

from chatlib.chat import Limits
from chatlib.server import ENGINES, create_server
from tests.helpers import ChatDriver, LineClient, count_fds, wait_until

#: Limits for tests that are not about flood control or history: the default rate (2 lines
#: a second) would make every test that sends a few lines wait, and with recent messages
#: replayed on arrival, what a newcomer reads first would depend on what was said before.
TEST_LIMITS = {"rate": 0, "history": 0}


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Health:
    """What a test's servers left behind: log records, thread exceptions, threads and fds."""

    def __init__(self) -> None:
        self.threads = threading.active_count()
        self.fds = count_fds()
        self.thread_errors: list[threading.ExceptHookArgs] = []
        self.log = _Records()

    def errors(self) -> list[str]:
        return [
            f"{record.name}: {record.getMessage()}"
            for record in self.log.records
            if record.levelno >= logging.ERROR or record.exc_info
        ]

    def check(self) -> None:
        """Fail unless everything the test started is gone and nothing went wrong."""
        wait_until(
            lambda: threading.active_count() <= self.threads,
            what=f"threads back to {self.threads}: {[t.name for t in threading.enumerate()]}",
        )
        wait_until(lambda: count_fds() <= self.fds, what=f"file descriptors back to {self.fds}")
        assert not self.errors(), f"errors logged: {self.errors()}"
        assert not self.thread_errors, "exceptions in threads: " + "; ".join(
            f"{args.thread.name if args.thread else '?'}: {args.exc_type.__name__}: "
            f"{args.exc_value}"
            for args in self.thread_errors
        )


@pytest.fixture
def health(monkeypatch):
    """Record the baseline now; after the test, check the servers cleaned up after themselves."""
    health = Health()
    monkeypatch.setattr(threading, "excepthook", health.thread_errors.append)
    server_log = logging.getLogger("chatlib.server")
    old_level = server_log.level
    server_log.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(health.log)
    try:
        yield health
    finally:
        root.removeHandler(health.log)
        server_log.setLevel(old_level)
    health.check()


@pytest.fixture(params=ENGINES)
def engine(request) -> str:
    """The name of each engine in turn: the same suite runs against all of them."""
    return request.param


@pytest.fixture
def start_server(engine, health):
    """Return a function that starts a server of *engine* with the given limits.

    Each server runs in a background thread inside a ``with`` block, left at teardown
    (after the clients are closed).
    """
    with contextlib.ExitStack() as stack:

        def start(**limits):
            limits = Limits(**{**TEST_LIMITS, **limits})
            return stack.enter_context(create_server(engine, "127.0.0.1", 0, limits=limits))

        yield start


@pytest.fixture
def connect(health):
    """Return a function that connects a :class:`LineClient`; all are closed at teardown.

    By default it reads the welcome, so the client's :attr:`~LineClient.name` is set.
    """
    clients: list[LineClient] = []

    def connect_(server, *, welcome: bool = True, **options) -> LineClient:
        client = LineClient(server.address, **options)
        clients.append(client)
        if welcome:
            client.welcome()
        return client

    yield connect_
    for client in clients:
        client.close()


# --- The chat without sockets ------------------------------------------------------


@pytest.fixture
def driver() -> ChatDriver:
    """A chat driven in memory (see :class:`ChatDriver`), with flood control off."""
    return ChatDriver(rate=0)


@pytest.fixture
def trio(driver):
    """alice, bob and carol, connected to *driver*'s chat (in #lobby), their inboxes emptied."""
    conns = []
    for name in ("alice", "bob", "carol"):
        conn = driver.connect()
        driver.say(conn, f"/nick {name}")
        conns.append(conn)
    driver.take_all()
    return conns
