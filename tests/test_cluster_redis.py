"""Several servers, one chat, over real sockets and a real redis-server on 127.0.0.1.

Each test starts its own redis-server on a free port, and its chatlib servers: in this
process (one per engine), or as ``python -m chatlib.server`` processes where the test
kills or pauses one. The sans-I/O side of the same rules is in tests/test_cluster.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from chatlib.chat import Limits
from chatlib.cluster import HEARTBEAT, SERVER_LOST_AFTER
from chatlib.protocol import parse_notice, parse_server_line
from chatlib.server import ENGINES, create_server
from tests.conftest import TEST_LIMITS
from tests.helpers import ROOT, LineClient, wait_until

pytest.importorskip("redis", reason="the cluster needs redis-py: pip install -e '.[redis]'")
pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="needs redis-server (apt-get install redis-server)"
)

import redis  # noqa: E402  (after the skip: redis-py is an optional extra)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A redis-server on 127.0.0.1 that a test can kill and start again on the same port."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        wait_until(self._answers, what=f"redis-server on port {self.port}")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def subscribers(self) -> int:
        """Return how many connections listen on chatlib's channel."""
        with self.client() as client:
            return client.pubsub_numsub("chatlib:events")[0][1]

    def _answers(self) -> bool:
        try:
            with self.client() as client:
                return client.ping()
        except redis.ConnectionError:
            assert self.process.poll() is None, "redis-server exited"
            return False


class ServerProcess:
    """``python -m chatlib.server --broker ...`` in a process of its own, to kill or pause."""

    def __init__(self, broker: str, engine: str = "selectors") -> None:
        command = [sys.executable, "-m", "chatlib.server", "--engine", engine, "--port", "0"]
        command += ["--broker", broker, "--rate", "0", "--history", "0"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
        line = self.process.stdout.readline()  # the [LISTENING] line, or nothing if it failed
        assert "[LISTENING]" in line, f"the server did not start: {line!r}"
        self.address = ("127.0.0.1", int(line.rsplit(":", 1)[1]))
        # Keep reading its log, so that a full pipe never stops it.
        self._reader = threading.Thread(target=self.process.stdout.read, daemon=True)
        self._reader.start()

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._reader.join()
        self.process.stdout.close()


@pytest.fixture
def redis_server():
    server = RedisServer()
    yield server
    if server.process.poll() is None:
        server.kill()


@pytest.fixture
def cluster(redis_server, health):
    """Return a function that starts a chatlib server of an engine on *redis_server*'s Redis."""
    with contextlib.ExitStack() as stack:

        def start(engine: str, **limits):
            limits = Limits(**{**TEST_LIMITS, **limits})
            server = create_server(engine, "127.0.0.1", 0, limits, broker=redis_server.url)
            stack.enter_context(server)
            wait_until(lambda: server.chat.cluster.linked, what=f"{engine} linked")
            return server

        yield start


@pytest.fixture
def processes():
    started: list[ServerProcess] = []

    def start(broker: str, engine: str = "selectors") -> ServerProcess:
        started.append(ServerProcess(broker, engine))
        return started[-1]

    yield start
    for process in started:
        process.close()


def named(connect, server, name: str) -> LineClient:
    """Connect a client to *server*, and wait until it is called *name*."""
    client = connect(server)
    client.say(f"/nick {name}")
    client.expect_notice("renamed", name=name)
    client.name = name
    return client


def wait_for_who(client: LineClient, names: set[str], what: str = "") -> None:
    """Ask /who until it lists exactly *names*."""
    wait_until(lambda: set(client.who()) == names, what=what or f"/who to list {sorted(names)}")


def rooms(client: LineClient) -> str:
    """Ask for /rooms and return the list."""
    client.say("/rooms")
    return client.read_until(lambda line: line.startswith("*** Rooms ("))[-1]


def notices(client: LineClient, event: str) -> list[dict[str, str]]:
    """Read the lines that have come; return the fields of every *event* notice so far."""
    with contextlib.suppress(AssertionError):  # no line within the poll
        while True:
            client.read_line(timeout=0.02)
    found = []
    for line in client.received:
        notice = parse_notice(parse_server_line(line).text)
        if notice is not None and notice[0] == event:
            found.append(notice[1])
    return found


# --- One chat -------------------------------------------------------------------------


def test_servers_of_every_engine_make_one_chat(cluster, connect):
    servers = [cluster(engine) for engine in ENGINES]
    alice, bob, carol = (
        named(connect, server, name)
        for server, name in zip(servers, ("alice", "bob", "carol"), strict=True)
    )
    for client in (alice, bob, carol):
        wait_for_who(client, {"alice", "bob", "carol"})
    carol.say("/rooms")
    carol.expect("*** Rooms (1): #lobby (3)")

    bob.say("/join #maths")
    bob.expect_notice("entered", room="#maths")
    # The other servers learn of it as the broker carries bob's move: a round trip later.
    wait_until(lambda: "#maths (1)" in rooms(alice), what="alice's server to see #maths")
    alice.say("/join #maths")
    bob.expect_notice("joined", name="alice")
    alice.say("hello, maths")
    bob.expect("<alice> hello, maths")
    alice.expect("<alice> hello, maths")  # back from the broker, as for everyone

    carol.say("/msg bob psst")
    carol.expect("-> *bob* psst")
    bob.expect("*carol* psst")


def test_everyone_on_every_server_sees_the_same_order(cluster, connect):
    servers = [cluster(engine) for engine in ENGINES]
    clients = [
        named(connect, server, f"{engine}{i}")
        for server, engine in zip(servers, ENGINES, strict=True)
        for i in range(2)
    ]
    everyone = {client.name for client in clients}
    for client in clients:
        wait_for_who(client, everyone)
    for client in clients:
        client.received.clear()
    lines_each = 30
    # Everyone talks at once: each server relays its own clients' lines, interleaved.
    for n in range(lines_each):
        for client in clients:
            client.say(f"{client.name} line {n}")
    expected = lines_each * len(clients)
    for client in clients:
        client.read_until(lambda _, c=client: len(c.messages()) >= expected)
    transcripts = [client.messages() for client in clients]
    assert len(transcripts[0]) == expected
    assert all(transcript == transcripts[0] for transcript in transcripts)
    for server in servers:
        assert server.chat.cluster.lost == 0


def test_a_name_is_taken_on_every_server(cluster, connect):
    first, second = cluster("asyncio"), cluster("threads")
    named(connect, first, "alice")
    bob = connect(second)
    wait_until(lambda: "alice" in bob.who())
    bob.say("/nick alice", "/nick ALICE")
    bob.expect(f"!!! The name alice is taken. Your name is still {bob.name}.")
    bob.expect(f"!!! The name ALICE is taken. Your name is still {bob.name}.")


def test_guests_on_two_servers_never_share_a_name(cluster, connect):
    first, second = cluster("selectors"), cluster("selectors")
    # Connected at the same moment, before either server hears of the other's guest.
    one, two = LineClient(first.address), LineClient(second.address)
    try:
        assert one.welcome() != two.welcome()
    finally:
        one.close()
        two.close()


def test_a_server_that_joins_late_replays_the_same_history(redis_server, cluster, connect):
    first = cluster("threads", history=20)
    alice = named(connect, first, "alice")
    alice.say("/join #maths", "one", "two", "three")
    alice.expect("<alice> three")
    ann = named(connect, first, "ann")
    ann.say("/join #art", "paint")
    ann.expect("<ann> paint")
    ann.say("/part")  # #art is empty everywhere now: its history goes
    ann.expect_notice("entered", room="#lobby")
    with redis_server.client() as client:
        wait_until(lambda: not client.exists("chatlib:history:#art"), what="#art's stream dropped")
        assert client.xlen("chatlib:history:#maths") == 3

    late = cluster("asyncio", history=20)
    bob = connect(late)
    bob.say("/join #maths")
    replay = bob.read_until(lambda line: line.startswith("*** End of recent messages"))
    assert bob.messages(replay) == ["<alice> one", "<alice> two", "<alice> three"]
    bob.say("/join #art")
    bob.expect_notice("entered", room="#art")
    bob.say("/history")
    bob.expect("*** No messages in #art yet.")


# --- Failures -------------------------------------------------------------------------


def test_redis_killed_and_started_again(redis_server, cluster, connect):
    first, second = cluster("selectors"), cluster("asyncio")
    alice, bob = named(connect, first, "alice"), named(connect, second, "bob")
    wait_for_who(alice, {"alice", "bob"})
    alice_friend = named(connect, first, "ann")

    redis_server.kill()
    alice.expect_notice("split")
    bob.expect_notice("split")
    # Each server goes on serving its own clients, and only them.
    alice.say("still here")
    alice_friend.expect("<alice> still here")
    wait_for_who(alice, {"alice", "ann"})
    wait_for_who(bob, {"bob"})

    redis_server.start()
    alice.expect_notice("linked")
    bob.expect_notice("linked")
    wait_for_who(bob, {"alice", "ann", "bob"})
    bob.say("together again")
    alice.expect("<bob> together again")
    alice_friend.expect("<bob> together again")


def test_a_name_given_on_both_sides_of_a_split_is_settled(redis_server, cluster, connect):
    first, second = cluster("threads"), cluster("asyncio")
    one, two = connect(first), connect(second)
    wait_for_who(one, {one.name, two.name})
    redis_server.kill()
    one.expect_notice("split")
    two.expect_notice("split")
    one.say("/nick sam")
    two.say("/nick sam")
    one.expect_notice("renamed", name="sam")
    two.expect_notice("renamed", name="sam")

    redis_server.start()
    one.expect_notice("linked")
    two.expect_notice("linked")
    # One of them is renamed, and told; both servers agree on who is sam.
    wait_until(lambda: notices(one, "collision") or notices(two, "collision"))
    loser = one if notices(one, "collision") else two
    winner = two if loser is one else one
    new_name = notices(loser, "collision")[0]["name"]
    assert notices(loser, "collision") == [{"old": "sam", "name": new_name}]
    assert not notices(winner, "collision")
    for client in (one, two):
        wait_for_who(client, {"sam", new_name})


def test_a_killed_server_lets_its_names_go(redis_server, cluster, connect, processes):
    server = cluster("asyncio")
    alice = named(connect, server, "alice")
    doomed = processes(redis_server.url)
    zed = LineClient(doomed.address)
    zed.welcome()
    zed.say("/nick zed")
    zed.expect_notice("renamed", name="zed")
    wait_for_who(alice, {"alice", "zed"})

    killed_at = time.monotonic()
    doomed.signal(signal.SIGKILL)
    # The documented time: silent for SERVER_LOST_AFTER, noticed at the next tick.
    alice.read_until(
        lambda line: line == "*** zed left (their server stopped answering).",
        timeout=SERVER_LOST_AFTER + 3 * HEARTBEAT + 5,
    )
    assert time.monotonic() - killed_at <= 30
    wait_for_who(alice, {"alice"})
    alice.say("/nick zed")
    alice.expect_notice("renamed", name="zed")
    zed.close()


def test_a_server_dropped_as_a_slow_subscriber_recovers(redis_server, cluster, connect, processes):
    server = cluster("selectors")
    alice = named(connect, server, "alice")
    paused = processes(redis_server.url, engine="asyncio")
    bob = LineClient(paused.address)
    try:
        bob.welcome()
        bob.say("/nick bob")
        bob.expect_notice("renamed", name="bob")
        wait_for_who(alice, {"alice", "bob"})
        assert redis_server.subscribers() == 2
        # A small buffer, so that a few hundred kilobytes make Redis give up on a
        # subscriber that does not read, as 32 MB would at scale.
        with redis_server.client() as client:
            client.config_set("client-output-buffer-limit", "pubsub 64kb 32kb 1")

        paused.signal(signal.SIGSTOP)
        try:
            text = "x" * 400
            deadline = time.monotonic() + 10
            while redis_server.subscribers() == 2:
                assert time.monotonic() < deadline, "Redis never dropped the paused subscriber"
                alice.say(*[text] * 200)  # 80 KB a round: past the kernel's buffers soon
                alice.read_until(lambda line: line == f"<alice> {text}")
        finally:
            paused.signal(signal.SIGCONT)

        # It notices, tells its users, and joins again: it is never silently deaf.
        bob.expect_notice("split")
        bob.expect_notice("linked")
        wait_until(lambda: redis_server.subscribers() == 2, what="a new subscription")
        alice.say("can you hear me?")
        bob.expect("<alice> can you hear me?")
    finally:
        bob.close()


def test_a_redis_that_stops_taking_messages_counts_as_lost(
    redis_server, cluster, connect, monkeypatch
):
    from chatlib import redis_link

    monkeypatch.setattr(redis_link, "OUTGOING_LIMIT", 20)
    server = cluster("selectors")
    alice, ann = named(connect, server, "alice"), named(connect, server, "ann")
    cluster, link = server.chat.cluster, server.link
    waiting = []  # how many messages wait for Redis after each batch the chat hands over

    def publish(messages, publish=link.publish):
        publish(messages)
        waiting.append(len(link._outgoing))

    monkeypatch.setattr(link, "publish", publish)
    redis_server.process.send_signal(signal.SIGSTOP)  # it takes nothing, and says nothing
    try:
        for n in range(40):  # one at a time: each its own batch for the link
            alice.say(f"line {n}")
            wait_until(lambda n=n: cluster.in_flight > n or not cluster.linked)
        alice.expect_notice("split", reason="publishing failed")
        assert max(waiting) <= 20  # what waits for Redis stays bounded
        # Nothing said is lost here: what never came back is delivered by the server itself.
        ann.read_until(lambda line: line == "<alice> line 39")
        assert ann.messages()[-40:] == [f"<alice> line {n}" for n in range(40)]
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    alice.expect_notice("linked")


# --- Without redis-py -----------------------------------------------------------------


def test_broker_without_redis_py_is_one_clear_error(redis_server):
    # redis-py hidden, as on an install without the chatlib[redis] extra.
    code = (
        "import sys; sys.modules['redis'] = None; from chatlib.server import main;"
        f" sys.exit(main(['--port', '0', '--broker', {redis_server.url!r}]))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=30
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "--broker needs redis-py, chatlib's redis extra: pip install -e '.[redis]'"
        " in chatlib's folder; no client was let in."
    )


# --- The chat panel -------------------------------------------------------------------


def test_the_panel_shows_each_members_server_and_the_link(redis_server, cluster, connect):
    widget = pytest.importorskip("chatlib.widget")
    first, second = cluster("threads"), cluster("selectors")
    bob = named(connect, second, "bob")
    panel = widget.ChatPanel(*first.address, "alice")
    try:
        wait_for_who(bob, {"alice", "bob"})
        panel.send("/who")
        here, there = first.chat.cluster.tag, second.chat.cluster.tag
        wait_until(lambda: panel.member_servers == {"alice": here, "bob": there})
        assert (panel.server, panel.linked) == (here, True)
        assert f"server {here}, linked" in panel.status_view.value
        assert f'bob <span class="chat-member-server">@{there}</span>' in panel.members_view.value

        redis_server.kill()
        wait_until(lambda: panel.linked is False, what="the panel to see the split")
        assert "not linked: this server only" in panel.status_view.value
        redis_server.start()
        # Linked again, the panel asks who is here, and bob is back.
        wait_until(lambda: panel.linked and "bob" in panel.members, what="bob back in the list")
        assert panel.member_servers["bob"] == there
    finally:
        panel.close()
