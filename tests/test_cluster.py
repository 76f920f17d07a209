"""Several servers on one broker, with no sockets and no Redis: the cluster core in memory.

Each :class:`Server` is a :class:`Chat` with a :class:`Cluster` whose broker is an
:class:`Outbox`: a list of what the server published. The test plays the broker, as h11's
tests play the network: it decides in which order the servers' events go out, and hands each
one to every server, the sender included, as Redis pub/sub does (one order for every
subscriber; each publisher's events in the order it sent them). What each client would be
sent is collected as an engine would, and checked for control characters on the way.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatlib.chat import Chat, Connection, Limits
from chatlib.cluster import HEARTBEAT, SERVER_LOST_AFTER, Cluster
from chatlib.protocol import CLIENT_MAX_LINE, format_notice, name_key
from tests.helpers import ChatDriver, decode_line

#: The servers' ids, in the order they sort: on a name claimed on two servers at once, the
#: one whose id sorts last renames its user. Their first four characters tag guests' names.
ORIGINS = ("aaaa0001", "bbbb0002", "cccc0003")

SPLIT = "*** " + format_notice("split", reason="connection refused")
LINKED = "*** " + format_notice("linked")


class Outbox:
    """The broker as one server sees it: it keeps what the server publishes, in order."""

    def __init__(self) -> None:
        #: Published and not yet delivered by the test, oldest first.
        self.messages: list[bytes] = []
        #: The rooms whose history the server had the broker drop, in order.
        self.forgotten: list[str] = []

    def publish(self, messages: list[tuple[str | None, bytes | None]]) -> None:
        """Keep the events in *messages* until the test delivers them."""
        for room, event in messages:
            if event is None:
                self.forgotten.append(room)
            else:
                self.messages.append(event)

    def events(self) -> list[dict]:
        """Return the pending messages, decoded."""
        return [json.loads(message) for message in self.messages]


class Server:
    """One server of the net: its chat, its cluster, and what each of its clients was sent."""

    def __init__(self, origin: str, limits: Limits) -> None:
        self.outbox = Outbox()
        self.cluster = Cluster(origin, self.outbox)
        self.chat = Chat(limits, cluster=self.cluster)
        self.inbox: dict[Connection, list[str]] = {}

    @property
    def origin(self) -> str:
        """This server's id, as its events carry it."""
        return self.cluster.origin

    def collect(self) -> None:
        """Act as an engine after each call: flush events out, take what each client gets."""
        while ready := self.chat.take_ready():
            for conn in ready:
                data = conn.data_to_send()
                if data:
                    assert data.endswith(b"\n")
                    self.inbox[conn].extend(decode_line(raw) for raw in data[:-1].split(b"\n"))


class Net:
    """Servers linked through one broker, played by the test, and a clock the test moves."""

    def __init__(self, servers: int = 2) -> None:
        self.now = 0.0
        self.servers = [Server(origin, Limits(rate=0)) for origin in ORIGINS[:servers]]
        #: Every event the broker delivered, decoded, in the broker's order.
        self.delivered: list[dict] = []
        self._home: dict[Connection, Server] = {}
        for server in self.servers:
            server.chat.broker_connected({}, self.now)
            server.collect()
        self.deliver_all()

    # --- Clients ---------------------------------------------------------------------------

    def connect(self, server: Server) -> Connection:
        """Let a new client in on *server*; its arrival is not delivered yet."""
        conn = server.chat.connect(("127.0.0.1", 40000 + len(self._home)), self.now)
        server.inbox[conn] = []
        self._home[conn] = server
        server.collect()
        return conn

    def join(self, server: Server, name: str) -> Connection:
        """Return a client called *name* on *server*, once every server knows it.

        Everyone's inbox is emptied: a test starts from a quiet chat.
        """
        conn = self.connect(server)
        self.say(conn, f"/nick {name}")
        self.deliver_all()
        assert conn.name == name
        self.clear()
        return conn

    def say(self, conn: Connection, *lines: str) -> None:
        """Have *conn* type *lines*."""
        server = self._home[conn]
        data = "".join(line + "\n" for line in lines).encode()
        server.chat.receive_data(conn, data, self.now)
        server.collect()

    def take(self, conn: Connection) -> list[str]:
        """Return the lines *conn* was sent since the last call, and forget them."""
        inbox = self._home[conn].inbox
        lines, inbox[conn] = inbox[conn], []
        return lines

    def ask(self, conn: Connection, command: str) -> list[str]:
        """Return what *conn* is answered at once to *command*, with nothing delivered."""
        self.take(conn)
        self.say(conn, command)
        return self.take(conn)

    def clear(self) -> None:
        """Forget what every client was sent so far."""
        for conn in self._home:
            self.take(conn)

    # --- The broker ------------------------------------------------------------------------

    def deliver(self, sender: Server, to: list[Server] | None = None) -> None:
        """Pass on *sender*'s oldest pending event to every server (or only those in *to*)."""
        data = sender.outbox.messages.pop(0)
        self.delivered.append(json.loads(data))
        for server in self.servers if to is None else to:
            server.chat.receive_broker_message(data, self.now)
            server.collect()

    def deliver_all(self, pick=None, to: list[Server] | None = None) -> None:
        """Deliver until nothing is pending; *pick* chooses whose event goes next.

        By default the first server with anything pending goes first.
        """
        while pending := [server for server in self.servers if server.outbox.messages]:
            self.deliver(pick(pending) if pick else pending[0], to)

    def inject(self, server: Server, data: bytes) -> None:
        """Hand *server* a message as if the broker carried it: anyone can publish."""
        server.chat.receive_broker_message(data, self.now)
        server.collect()

    # --- The links -------------------------------------------------------------------------

    def tick(self, *servers: Server) -> None:
        """Give *servers* their link's heartbeat at the current time."""
        for server in servers:
            server.chat.broker_tick(self.now)
            server.collect()

    def lose_link(self, server: Server) -> None:
        """Tell *server* its link to the broker failed."""
        server.chat.broker_lost("connection refused", self.now)
        server.collect()

    def link_again(self, server: Server) -> None:
        """Tell *server* its link to the broker is up (again)."""
        server.chat.broker_connected({}, self.now)
        server.collect()

    def shut_down(self, server: Server) -> None:
        """Stop *server* as its engine would: everyone is told goodbye."""
        server.chat.shut_down(self.now)
        server.collect()


def said(net: Net) -> list[str]:
    """Return the chat lines (kept in history) the broker delivered, in its order."""
    return [
        event["text"] for event in net.delivered if event["kind"] == "line" and event["history"]
    ]


def welcome(name: str) -> str:
    """Return the line a client called *name* is greeted with."""
    return "*** " + format_notice("welcome", name=name)


# --- One order, through the broker -------------------------------------------------------------


def test_a_line_reaches_its_own_server_only_when_it_comes_back_from_the_broker():
    net = Net()
    a, b = net.servers
    alice, bob, carol = net.join(a, "alice"), net.join(a, "bob"), net.join(b, "carol")
    net.say(alice, "hello")
    assert [net.take(conn) for conn in (alice, bob, carol)] == [[], [], []]
    assert a.chat.store.recent("#lobby", 10) == []
    [event] = a.outbox.events()
    assert event["kind"] == "line" and event["origin"] == a.origin
    assert (event["room"], event["text"], event["history"]) == ("#lobby", "<alice> hello", True)

    net.deliver(a)
    assert [net.take(conn) for conn in (alice, bob, carol)] == [["<alice> hello"]] * 3
    assert a.chat.store.recent("#lobby", 10) == b.chat.store.recent("#lobby", 10)
    assert a.chat.store.recent("#lobby", 10) == ["<alice> hello"]


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(st.tuples(st.sampled_from(["say", "deliver"]), st.integers(0, 3)), max_size=20),
    data=st.data(),
)
def test_every_client_on_every_server_sees_the_lines_in_the_brokers_order(steps, data):
    net = Net()
    a, b = net.servers
    clients = [net.join(a, "alice"), net.join(a, "bob"), net.join(b, "carol"), net.join(b, "dave")]
    lines = []
    for action, who in steps:
        if action == "say":
            lines.append(f"<{clients[who].name}> line {len(lines) + 1}")
            net.say(clients[who], f"line {len(lines)}")
        elif pending := [server for server in net.servers if server.outbox.messages]:
            net.deliver(pending[who % len(pending)])
    net.deliver_all(pick=lambda pending: data.draw(st.sampled_from(pending)))
    in_broker_order = said(net)
    assert sorted(in_broker_order) == sorted(lines)
    for conn in clients:
        assert net.take(conn) == in_broker_order


def test_a_newcomer_is_not_told_of_its_own_arrival_on_any_server():
    net = Net()
    a, b = net.servers
    alice, carol = net.join(a, "alice"), net.join(b, "carol")

    newcomer = net.connect(a)
    net.deliver_all()
    assert net.take(newcomer) == [
        welcome("guest2-aaaa"),
        "*** You are in #lobby (3 here): alice@aaaa, guest2-aaaa@aaaa, carol@bbbb",
        "*** You are on server aaaa (linked with 1 other server).",
    ]
    assert net.take(alice) == net.take(carol) == ["*** guest2-aaaa joined on server aaaa."]

    other = net.connect(b)
    net.deliver_all()
    assert net.take(other) == [
        welcome("guest2-bbbb"),
        "*** You are in #lobby (4 here): "
        + "carol@bbbb, guest2-bbbb@bbbb, alice@aaaa, guest2-aaaa@aaaa",
        "*** You are on server bbbb (linked with 1 other server).",
    ]
    for conn in (alice, carol, newcomer):
        assert net.take(conn) == ["*** guest2-bbbb joined on server bbbb."]


# --- Commands that see every server ------------------------------------------------------------


def test_who_and_rooms_list_every_servers_users_and_rooms():
    net = Net()
    a, b = net.servers
    alice, bob = net.join(a, "alice"), net.join(a, "bob")
    carol, dave = net.join(b, "carol"), net.join(b, "dave")
    net.say(bob, "/join #maths")
    net.say(dave, "/join #Art")
    net.deliver_all()
    assert net.ask(alice, "/who") == ["*** Online (2): alice@aaaa, carol@bbbb"]
    assert net.ask(carol, "/who") == ["*** Online (2): carol@bbbb, alice@aaaa"]
    assert net.ask(bob, "/who") == ["*** Online (1): bob@aaaa"]
    assert net.ask(alice, "/rooms") == ["*** Rooms (3): #lobby (2), #maths (1), #Art (1)"]
    assert net.ask(carol, "/rooms") == ["*** Rooms (3): #lobby (2), #Art (1), #maths (1)"]

    # A room made on another server keeps its name as spelt there.
    net.say(alice, "/join #ART")
    net.deliver_all()
    assert alice.room.name == "#Art"
    assert net.ask(alice, "/who") == ["*** Online (2): alice@aaaa, dave@bbbb"]


def test_a_private_message_reaches_a_user_on_another_server():
    net = Net()
    a, b = net.servers
    alice, bob, carol = net.join(a, "alice"), net.join(a, "bob"), net.join(b, "carol")
    assert net.ask(alice, "/msg CAROL see you at noon") == ["-> *carol* see you at noon"]
    assert net.take(carol) == []
    net.deliver_all()
    assert net.take(carol) == ["*alice* see you at noon"]
    assert net.take(alice) == net.take(bob) == []
    # As /who lists her, with her server.
    assert net.ask(alice, "/msg carol@bbbb and bring the notes") == [
        "-> *carol* and bring the notes"
    ]
    net.deliver_all()
    assert net.take(carol) == ["*alice* and bring the notes"]


def test_a_private_message_to_a_name_nobody_has_on_any_server_is_refused():
    net = Net()
    a, b = net.servers
    alice = net.join(a, "alice")
    net.join(b, "carol")
    assert net.ask(alice, "/msg zed hello") == ["!!! Nobody here is called zed."]
    assert a.outbox.messages == []


# --- Names held on several servers -------------------------------------------------------------


def test_a_name_held_on_another_server_is_refused():
    net = Net()
    a, b = net.servers
    alice = net.join(a, "alice")
    net.join(b, "carol")
    assert net.ask(alice, "/nick Carol") == [
        "!!! The name Carol is taken. Your name is still alice."
    ]
    assert net.ask(alice, "/nick caro1") == [
        "!!! The name caro1 looks too much like carol, who is here. Your name is still alice."
    ]
    assert a.outbox.messages == []


@pytest.mark.parametrize("first", [0, 1], ids=["broker takes A first", "broker takes B first"])
def test_one_name_given_on_two_servers_at_once_ends_with_one_holder(first):
    net = Net()
    a, b = net.servers
    on_a, on_b = net.connect(a), net.connect(b)
    net.deliver_all()
    net.clear()
    net.say(on_a, "/nick sam")
    net.say(on_b, "/nick sam")
    assert on_a.name == on_b.name == "sam"  # neither server knows of the other's yet
    net.deliver_all(
        pick=lambda pending: net.servers[first] if net.servers[first] in pending else pending[0]
    )

    # B's id sorts last: its user is renamed and told.
    assert (on_a.name, on_b.name) == ("sam", "guest2-bbbb")
    room_lines = net.take(on_a)
    collision = (
        "*** The name sam was taken on another server at the same time: you are now guest2-bbbb."
    )
    seen_on_b = net.take(on_b)
    assert seen_on_b.count(collision) == 1  # told at once, as B settles it
    assert [line for line in seen_on_b if line != collision] == room_lines
    assert sorted(room_lines) == sorted(
        [
            "*** guest1-aaaa is now known as sam.",
            "*** guest1-bbbb is now known as sam.",
            "*** sam is now known as guest2-bbbb.",
        ]
    )
    # Both servers agree on who holds what.
    assert (a.chat.members, a.cluster.holder(name_key("sam"))) == (["sam"], None)
    assert a.cluster.holder(name_key("guest2-bbbb")) == (b.origin, "guest2-bbbb")
    assert b.chat.members == ["guest2-bbbb"]
    assert b.cluster.holder(name_key("sam")) == (a.origin, "sam")
    assert net.ask(on_a, "/who") == ["*** Online (2): sam@aaaa, guest2-bbbb@bbbb"]
    assert net.ask(on_b, "/who") == ["*** Online (2): guest2-bbbb@bbbb, sam@aaaa"]


@settings(max_examples=60, deadline=None)
@given(claimants=st.sets(st.integers(0, 2), min_size=2), data=st.data())
def test_however_the_broker_orders_claims_to_one_name_one_server_keeps_it(claimants, data):
    net = Net(servers=3)
    clients = [net.connect(server) for server in net.servers]
    net.deliver_all()
    for index in sorted(claimants):
        net.say(clients[index], "/nick sam")
    net.deliver_all(pick=lambda pending: data.draw(st.sampled_from(pending)))
    # The claimant on the server whose id sorts first keeps it; every server agrees on all names.
    assert [conn.name == "sam" for conn in clients] == [i == min(claimants) for i in range(3)]
    everyone = sorted(conn.name for conn in clients)
    for server in net.servers:
        elsewhere = [
            name for peer in server.cluster.peers.values() for name, _ in peer.members.values()
        ]
        assert sorted(server.chat.members + elsewhere) == everyone


# --- Lost events and lost servers --------------------------------------------------------------


def test_a_gap_in_another_servers_numbering_is_counted_told_and_repaired():
    net = Net()
    a, b = net.servers
    alice, carol = net.join(a, "alice"), net.join(b, "carol")
    net.say(carol, "one")
    net.say(carol, "two")
    net.deliver(b, to=[b])  # A's subscription missed it: pub/sub is at most once
    net.deliver(b)

    assert (a.cluster.lost, b.cluster.lost) == (1, 0)
    assert net.take(alice) == [
        "*** 1 messages from another server were lost on the way.",
        "<carol> two",
    ]
    assert net.take(carol) == ["<carol> one", "<carol> two"]
    [roster] = a.outbox.events()
    assert roster["kind"] == "roster" and roster["origin"] == a.origin
    assert (roster["members"], roster["reply"]) == ([["alice", "#lobby"]], True)

    already = len(net.delivered)
    net.deliver_all()
    answers = [(e["kind"], e["reply"]) for e in net.delivered[already:] if e["origin"] == b.origin]
    assert answers == [("roster", False)]  # B says again who is on it
    assert net.take(alice) == net.take(carol) == []
    assert a.cluster.lost == 1


def test_a_server_that_shuts_down_lets_its_users_go_on_the_others():
    net = Net()
    a, b = net.servers
    alice, bob = net.join(a, "alice"), net.join(a, "bob")
    carol = net.join(b, "carol")
    net.say(bob, "/join #maths")
    net.say(carol, "/join #maths")
    net.deliver_all()
    net.clear()

    net.shut_down(b)
    assert net.take(carol) == ["*** The server is shutting down. Bye!"]
    assert [e["kind"] for e in b.outbox.events()] == ["bye"]
    net.deliver_all()
    assert net.take(bob) == ["*** carol left (their server shut down)."]
    assert net.take(alice) == []  # no room of hers had anyone from there
    assert a.cluster.peers == {}
    assert net.ask(bob, "/who") == ["*** Online (1): bob@aaaa"]
    assert net.ask(alice, "/rooms") == ["*** Rooms (2): #lobby (1), #maths (1)"]


def test_a_server_silent_too_long_is_forgotten_and_one_heard_from_is_kept():
    net = Net(servers=3)
    a, b, c = net.servers
    alice, carol, erin = net.join(a, "alice"), net.join(b, "carol"), net.join(c, "erin")
    net.deliver_all()
    heard_from_b = net.now
    # B dies without a word: it neither ticks nor reads any more; A and C go on.
    while net.now < heard_from_b + SERVER_LOST_AFTER:
        net.now += HEARTBEAT
        net.tick(a, c)
        net.deliver_all(to=[a, c])
    assert net.now == heard_from_b + SERVER_LOST_AFTER
    assert set(a.cluster.peers) == {b.origin, c.origin}  # not silent for *more* than that
    assert net.take(alice) == []

    net.now += HEARTBEAT / 2
    net.tick(a, c)
    assert list(a.cluster.peers) == [c.origin]
    assert list(c.cluster.peers) == [a.origin]
    gone = "*** carol left (their server stopped answering)."
    assert net.take(alice) == net.take(erin) == [gone]
    assert net.ask(alice, "/who") == ["*** Online (2): alice@aaaa, erin@cccc"]
    assert net.take(carol) == []


def test_a_server_back_from_silence_is_learned_again_with_its_members():
    net = Net()
    a, b = net.servers
    alice, carol = net.join(a, "alice"), net.join(b, "carol")
    net.tick(a, b)
    net.deliver_all()
    # B pauses (SIGSTOP): it neither ticks nor reads; A, ticking on, gives up on it.
    paused_at, kept_for_b = net.now, []
    while net.now <= paused_at + SERVER_LOST_AFTER:
        net.now += HEARTBEAT
        net.tick(a)
        kept_for_b += a.outbox.messages  # Redis holds them for B, which does not read
        net.deliver_all(to=[a])
    assert net.take(alice) == ["*** carol left (their server stopped answering)."]

    # B resumes: it ticks, reads what waited for it, and speaks. Its word is from a
    # server A no longer knows, so A asks who is on it.
    net.tick(b)
    for data in kept_for_b:
        net.inject(b, data)
    net.deliver_all()
    assert net.take(alice) == ["*** carol joined on server bbbb."]
    assert net.ask(alice, "/who") == ["*** Online (2): alice@aaaa, carol@bbbb"]
    # B stood still, so it gave A time to be heard rather than give up on it.
    assert net.take(carol) == []
    assert list(b.cluster.peers) == [a.origin]


def test_a_quiet_server_says_it_is_alive_on_its_tick():
    net = Net()
    a, _ = net.servers
    alice = net.join(a, "alice")
    net.now += HEARTBEAT / 2
    net.tick(a)
    assert a.outbox.messages == []  # it published less than a heartbeat ago

    net.now += HEARTBEAT / 2
    net.tick(a)
    [alive] = a.outbox.events()
    assert (alive["origin"], alive["kind"]) == (a.origin, "alive")
    net.deliver_all()

    net.now += HEARTBEAT / 2
    net.say(alice, "busy")
    net.now += HEARTBEAT / 2
    net.tick(a)
    assert [e["kind"] for e in a.outbox.events()] == ["line"]  # a line is as good as alive


# --- The link to the broker down, and up again -------------------------------------------------


def test_when_the_link_falls_the_server_serves_its_own_clients_alone():
    net = Net()
    a, b = net.servers
    alice, bob, carol = net.join(a, "alice"), net.join(a, "bob"), net.join(b, "carol")
    net.say(alice, "one")  # published, not back yet
    net.lose_link(a)
    assert net.take(alice) == net.take(bob) == ["<alice> one", SPLIT]
    assert net.take(carol) == []
    assert a.cluster.peers == {}
    assert net.ask(bob, "/who") == ["*** Online (2): alice@aaaa, bob@aaaa"]

    net.say(bob, "two")
    assert net.take(alice) == net.take(bob) == ["<bob> two"]
    assert a.chat.store.recent("#lobby", 10) == ["<alice> one", "<bob> two"]
    assert len(a.outbox.messages) == 1  # only "one", from before the split

    net.say(carol, "three")
    net.deliver(b)  # reaches A while its link counts as down: dropped
    assert net.take(alice) == []
    assert net.take(carol) == ["<carol> three"]


def test_when_the_link_is_back_users_are_told_and_the_servers_learn_each_other_again():
    net = Net()
    a, b = net.servers
    alice, bob, carol = net.join(a, "alice"), net.join(a, "bob"), net.join(b, "carol")
    net.say(alice, "one")
    net.lose_link(a)
    net.clear()

    net.link_again(a)
    assert net.take(alice) == net.take(bob) == [LINKED]
    assert net.take(carol) == []
    roster = a.outbox.events()[-1]
    assert (roster["kind"], roster["members"], roster["reply"]) == (
        "roster",
        [["alice", "#lobby"], ["bob", "#lobby"]],
        True,
    )
    net.deliver_all()  # "one" comes back after all: A delivered it already
    # B's roster tells A who is there again, as a netjoin; B knew A's already.
    assert net.take(alice) == net.take(bob) == ["*** carol joined on server bbbb."]
    assert net.take(carol) == ["<alice> one"]  # B was linked all along
    assert list(a.cluster.peers) == [b.origin]
    assert net.ask(alice, "/who") == ["*** Online (3): alice@aaaa, bob@aaaa, carol@bbbb"]
    net.say(carol, "welcome back")
    net.deliver_all()
    assert net.take(alice) == net.take(bob) == ["<carol> welcome back"]


def test_a_name_taken_during_a_split_is_settled_when_the_link_is_back():
    net = Net()
    a, b = net.servers
    alice, carol = net.join(a, "alice"), net.join(b, "carol")
    net.lose_link(a)
    net.say(alice, "/nick carol")  # A cannot know that B has one
    assert alice.name == "carol"
    net.link_again(a)
    net.deliver_all()
    assert (alice.name, carol.name) == ("carol", "guest2-bbbb")
    assert net.take(carol)[0] == (
        "*** The name carol was taken on another server at the same time: you are now guest2-bbbb."
    )
    assert a.cluster.holder(name_key("guest2-bbbb")) == (b.origin, "guest2-bbbb")
    assert b.cluster.holder(name_key("carol")) == (a.origin, "carol")


def test_who_left_during_a_split_is_gone_from_the_others_once_the_link_is_back():
    net = Net()
    a, b = net.servers
    net.join(a, "alice")
    bob, carol = net.join(a, "bob"), net.join(b, "carol")
    net.lose_link(a)
    net.say(bob, "/quit")  # B is not told: A's link is down
    assert net.ask(carol, "/who") == ["*** Online (3): carol@bbbb, alice@aaaa, bob@aaaa"]
    net.link_again(a)
    net.deliver_all()
    assert net.ask(carol, "/who") == ["*** Online (2): carol@bbbb, alice@aaaa"]


# --- Whatever the broker carries ---------------------------------------------------------------


def _event(**fields: object) -> bytes:
    """Return an event from a server nobody has heard of, with *fields*."""
    return json.dumps({"origin": "eeee0000", "seq": 1, **fields}).encode()


#: Messages no server sent, or sent broken: each must be dropped, or used only as far as it is
#: sound, without raising and without a control character reaching any client.
HOSTILE = {
    "not JSON": b"not json",
    "not UTF-8": b"\xff\xfe\x00garbage",
    "a JSON list": b"[1, 2]",
    "JSON null": b"null",
    "no origin or seq": b'{"kind": "alive"}',
    "seq a string": _event(kind="alive", seq="1"),
    "seq a boolean": _event(kind="alive", seq=True),
    "seq a float": _event(kind="alive", seq=1.0),
    "origin a number": _event(kind="alive", origin=7),
    "origin with escapes": _event(kind="member", origin="\x1b[31mbad", name="x", room_name="#a"),
    "origin too short for a tag": _event(kind="member", origin="ee", name="x", room_name="#a"),
    "hid not a string": _event(
        kind="line", room="#lobby", text="x", history=True, skip=None, hid=7
    ),
    "unknown kind": _event(kind="shout"),
    "kind a list": _event(kind=["line"]),
    "kind an object": _event(kind={"line": 1}),
    "nested too deep": b"[" * 100_000,
    "a huge number": b'{"origin": "eeee0000", "seq": 1' + b"0" * 5000 + b', "kind": "alive"}',
    "line with wrong types": _event(kind="line", room=1, text=["x"], history="yes", skip="no"),
    "line with escapes": _event(
        kind="line",
        room="#lobby",
        text="\x1b[2J\x1b]0;pwned\x07\r\n\u202e\u2028",
        history=True,
        skip=None,
    ),
    "private with escapes": _event(kind="private", to="alice", text="\x1b[31mred\x9b\x00"),
    "member with a control in its name": _event(kind="member", name="ev\x1bil", room_name="#lobby"),
    "member with a space in its name": _event(kind="member", name="two words", room_name="#lobby"),
    "member of a room without #": _event(kind="member", name="mallory", room_name="lobby"),
    "member of a room with a bidi override": _event(
        kind="member", name="mallory", room_name="#\u202eab"
    ),
    "roster not a list": _event(kind="roster", members="everyone", reply=False),
    "roster of garbage": _event(
        kind="roster",
        members=[1, None, ["a"], ["a", "#b", "c"], [1, 2], ["bad name", "#lobby"], ["x\x1b", "#y"]],
        reply=True,
    ),
    "renamed from nobody": _event(kind="renamed", old="nobody", name="somebody"),
    "gone of nobody": _event(kind="gone", name="\x1b"),
    "bye from a stranger": _event(kind="bye"),
    "spoofing this server": json.dumps(
        {
            "origin": ORIGINS[0],
            "seq": 999,
            "kind": "line",
            "room": "#lobby",
            "text": "x",
            "history": True,
            "skip": None,
        }
    ).encode(),
}


@pytest.mark.parametrize("data", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_or_broken_message_never_raises_nor_reaches_a_client_raw(data):
    net = Net()
    a, b = net.servers
    alice, carol = net.join(a, "alice"), net.join(b, "carol")
    net.inject(a, data)  # collect() fails on a control character
    net.deliver_all()
    # The chat goes on as before.
    net.say(carol, "still there?")
    net.deliver_all()
    assert net.take(alice)[-1:] == ["<carol> still there?"]
    assert net.ask(alice, "/who")[0].startswith("*** Online (")


def test_escapes_from_the_broker_show_as_visible_text():
    net = Net()
    a, _ = net.servers
    alice = net.join(a, "alice")
    net.inject(a, HOSTILE["line with escapes"])
    net.inject(a, _event(kind="private", to="alice", text="\x1b[31mred\x9b\x00", seq=2))
    assert net.take(alice) == ["^[[2J^[]0;pwned^G^M^J\ufffd\ufffd", "^[[31mred\ufffd^@"]
    assert a.chat.store.recent("#lobby", 1) == ["^[[2J^[]0;pwned^G^M^J\ufffd\ufffd"]


def test_names_that_break_the_rules_are_never_listed():
    net = Net()
    a, _ = net.servers
    alice = net.join(a, "alice")
    members = [
        ["two words", "#lobby"],
        ["ev\x1bil", "#lobby"],
        ["mallory", "#lobby"],
        ["eve", "no-hash"],
    ]
    net.inject(a, _event(kind="roster", members=members, reply=False))
    assert net.ask(alice, "/who") == ["*** Online (2): alice@aaaa, mallory@eeee"]
    assert net.ask(alice, "/rooms") == ["*** Rooms (1): #lobby (2)"]


def test_a_line_from_the_broker_is_never_longer_than_a_client_accepts():
    # The chat keeps every line it sends within CLIENT_MAX_LINE; one from the broker too.
    net = Net()
    a, _ = net.servers
    alice = net.join(a, "alice")
    text = "x" * (2 * CLIENT_MAX_LINE)
    net.inject(a, _event(kind="line", room="#lobby", text=text, history=True, skip=None))
    net.inject(a, _event(kind="private", to="alice", text=text, seq=2))
    assert [len(line.encode()) <= CLIENT_MAX_LINE for line in net.take(alice)] == [True, True]


# --- History --------------------------------------------------------------------------------------


def test_every_server_keeps_a_rooms_history_in_the_brokers_order():
    net = Net()
    a, b = net.servers
    alice, carol = net.join(a, "alice"), net.join(b, "carol")
    net.say(alice, "first from A")
    net.say(carol, "first from B")
    net.say(alice, "second from A")
    net.deliver_all(pick=lambda pending: pending[-1])  # B's go first
    kept = ["<carol> first from B", "<alice> first from A", "<alice> second from A"]
    assert said(net) == kept
    assert a.chat.store.recent("#lobby", 10) == b.chat.store.recent("#lobby", 10) == kept

    newcomer = net.connect(a)
    assert net.take(newcomer)[2:] == [
        "*** Recent messages in #lobby (3):",
        *kept,
        "*** End of recent messages in #lobby.",
        "*** You are on server aaaa (linked with 1 other server).",
    ]


def test_joining_a_room_made_on_another_server_replays_its_history():
    net = Net()
    a, b = net.servers
    alice, carol = net.join(a, "alice"), net.join(b, "carol")
    net.say(carol, "/join #art", "art is long")
    net.deliver_all()
    net.clear()
    net.say(alice, "/join #art")
    assert net.take(alice) == [
        "*** You are in #art (2 here): alice@aaaa, carol@bbbb",
        "*** Recent messages in #art (1):",
        "<carol> art is long",
        "*** End of recent messages in #art.",
    ]


def test_a_rooms_history_goes_once_nobody_is_in_it_on_any_server():
    net = Net()
    a, b = net.servers
    alice, carol = net.join(a, "alice"), net.join(b, "carol")
    net.say(alice, "/join #maths")
    net.say(carol, "/join #maths")
    net.deliver_all()
    net.say(carol, "x = 2")
    net.deliver_all()
    assert (
        a.chat.store.recent("#maths", 10) == b.chat.store.recent("#maths", 10) == ["<carol> x = 2"]
    )

    net.say(carol, "/part")
    net.deliver_all()
    # Still used on A: both keep it.
    assert (
        a.chat.store.recent("#maths", 10) == b.chat.store.recent("#maths", 10) == ["<carol> x = 2"]
    )

    net.say(alice, "/part")
    net.deliver_all()
    assert a.chat.store.recent("#maths", 10) == b.chat.store.recent("#maths", 10) == []


def test_a_line_still_on_its_way_when_its_room_empties_is_not_kept():
    # Alone on one server, a room's last words go with the room; a cluster must do the same.
    net = Net()
    a, b = net.servers
    alice = net.join(a, "alice")
    net.join(b, "carol")
    net.say(alice, "/join #maths")
    net.deliver_all()
    net.say(alice, "bye all", "/part")  # the line comes back after the room is gone
    net.deliver_all()
    assert a.chat.store.recent("#maths", 10) == b.chat.store.recent("#maths", 10) == []
    net.say(alice, "/join #maths")
    net.deliver_all()
    assert net.ask(alice, "/history") == ["*** No messages in #maths yet."]


# --- A server on its own --------------------------------------------------------------------------


def test_without_a_cluster_nothing_of_the_cluster_shows():
    driver = ChatDriver(rate=0)
    first, second = driver.connect(), driver.connect()
    assert driver.chat.cluster is None
    assert driver.take(first) == [
        welcome("guest1"),
        "*** You are in #lobby (1 here): guest1",
        "*** guest2 joined.",
    ]
    assert driver.take(second) == [
        welcome("guest2"),
        "*** You are in #lobby (2 here): guest1, guest2",
    ]
    driver.say(first, "hello")  # delivered at once: there is no broker to go round
    assert driver.take_all() == {first: ["<guest1> hello"], second: ["<guest1> hello"]}
    driver.say(first, "/who", "/rooms")
    assert driver.take(first) == ["*** Online (2): guest1, guest2", "*** Rooms (1): #lobby (2)"]
    assert driver.chat.store.recent("#lobby", 10) == ["<guest1> hello"]


def test_until_its_link_first_comes_up_a_server_serves_alone_and_then_says_nothing():
    server = Server(ORIGINS[0], Limits(rate=0))
    outbox = server.outbox
    conn = server.chat.connect(("127.0.0.1", 40000), 0.0)
    server.inbox[conn] = []
    server.chat.receive_data(conn, b"hello\n", 0.0)
    server.collect()
    assert conn.name == "guest1-aaaa"
    assert server.inbox[conn][-1] == "<guest1-aaaa> hello"
    assert outbox.messages == []
    server.inbox[conn].clear()

    server.chat.broker_connected({}, 1.0)
    server.collect()
    assert server.inbox[conn] == []  # no "linked" notice for a first link
    [roster] = outbox.events()
    assert (roster["kind"], roster["members"], roster["reply"]) == (
        "roster",
        [["guest1-aaaa", "#lobby"]],
        True,
    )


def test_history_loaded_from_the_broker_replaces_the_stores_and_is_not_kept_twice():
    net = Net()
    a, _ = net.servers
    alice = net.join(a, "alice")
    older = json.dumps(
        {"origin": "dddd0004", "seq": 1, "kind": "line", "room": "#lobby", "text": "<dan> old"}
        | {"history": True, "skip": None}
    ).encode()
    newer = older.replace(b"old", b"newer").replace(b'"seq": 1', b'"seq": 2')
    # The link read the stream once subscribed; the newer line also came on the channel.
    a.chat.broker_connected({"#lobby": [("100-0", older), ("100-1", newer)]}, net.now)
    a.collect()
    assert a.chat.store.recent("#lobby", 10) == ["<dan> old", "<dan> newer"]
    echo = json.loads(newer) | {"hid": "100-1", "origin": "dddd0004"}
    a.chat.receive_broker_message(json.dumps(echo).encode(), net.now)
    a.collect()
    assert net.take(alice)[-1] == "<dan> newer"  # delivered: it is live
    assert a.chat.store.recent("#lobby", 10) == ["<dan> old", "<dan> newer"]  # kept once
    later = echo | {"seq": 3, "hid": "100-2", "text": "<dan> later"}
    a.chat.receive_broker_message(json.dumps(later).encode(), net.now)
    a.collect()
    assert a.chat.store.recent("#lobby", 10) == ["<dan> old", "<dan> newer", "<dan> later"]


def test_a_rooms_history_said_during_a_split_goes_if_the_broker_kept_none():
    # A Redis that restarted empty (no persistence) has no stream for the room: every server
    # must then agree on no history, not keep what each said while alone.
    net = Net()
    a, b = net.servers
    alice, carol = net.join(a, "alice"), net.join(b, "carol")
    net.lose_link(a)
    net.lose_link(b)
    net.say(alice, "can anyone hear me?")
    assert a.chat.store.recent("#lobby", 10) == ["<alice> can anyone hear me?"]
    net.link_again(a)
    net.link_again(b)
    net.deliver_all()
    assert a.chat.store.recent("#lobby", 10) == b.chat.store.recent("#lobby", 10) == []
    assert net.ask(carol, "/history") == net.ask(alice, "/history")
