"""Rooms and history with no sockets: who hears what, moving between rooms, and what is kept."""

from __future__ import annotations

import sqlite3

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)

from chatlib.chat import Limits
from chatlib.history import HISTORY_KEPT, HISTORY_SHOWN, MemoryHistory, StoreError
from chatlib.protocol import LOBBY, name_key, parse_notice, parse_server_line
from chatlib.sqlite_history import SQLiteHistory
from tests.helpers import ChatDriver

NO_FLOOD = {"rate": 0}


def notice_of(line):
    parsed = parse_server_line(line)
    return parse_notice(parsed.text) if parsed.kind == "notice" else None


# --- Where you start, where chat goes ------------------------------------------


def test_everyone_starts_in_the_lobby(driver):
    first = driver.connect()
    second = driver.connect()
    assert driver.take(second)[1] == "*** You are in #lobby (2 here): guest1, guest2"
    assert first.room is second.room
    assert driver.chat.rooms == {LOBBY: ["guest1", "guest2"]}


def test_join_moves_you_and_tells_both_rooms(driver, trio):
    alice, bob, carol = trio
    driver.say(bob, "/join #maths")
    assert driver.take(bob) == ["*** You are in #maths (1 here): bob"]
    assert driver.take(alice) == driver.take(carol) == ["*** bob left (for another room)."]
    driver.say(carol, "/join #Maths")  # rooms are told apart as names are
    assert driver.take(carol) == ["*** You are in #maths (2 here): bob, carol"]
    assert driver.take(bob) == ["*** carol joined."]
    assert driver.take(alice) == ["*** carol left (for another room)."]
    assert driver.chat.rooms == {LOBBY: ["alice"], "#maths": ["bob", "carol"]}


def test_chat_and_actions_stay_in_the_room_private_messages_do_not(driver, trio):
    alice, bob, carol = trio
    driver.say(bob, "/join #maths")
    driver.take_all()
    driver.say(bob, "two plus two", "/me counts")
    assert driver.take(bob) == ["<bob> two plus two", "* bob counts"]
    assert driver.take(alice) == driver.take(carol) == []
    driver.say(alice, "/msg bob hello over there")
    assert driver.take(bob) == ["*alice* hello over there"]
    assert driver.take(alice) == ["-> *bob* hello over there"]
    assert driver.take(carol) == []


def test_who_lists_your_room_only_and_renames_tell_your_room(driver, trio):
    alice, bob, carol = trio
    driver.say(bob, "/join #maths")
    driver.take_all()
    driver.say(alice, "/who")
    assert driver.take(alice) == ["*** Online (2): alice, carol"]
    driver.say(bob, "/nick robert")
    assert driver.take(bob) == ["*** bob is now known as robert."]
    assert driver.take(alice) == driver.take(carol) == []
    driver.say(alice, "/nick robert")  # names stay unique across rooms
    assert driver.take(alice) == ["!!! The name robert is taken. Your name is still alice."]


def test_part_goes_back_to_the_lobby_and_an_empty_room_disappears(driver, trio):
    alice, bob, _ = trio
    driver.say(bob, "/join #maths")
    driver.say(bob, "/part")
    assert driver.take(bob)[-1] == "*** You are in #lobby (3 here): alice, carol, bob"
    assert "*** bob joined." in driver.take(alice)
    assert list(driver.chat.rooms) == [LOBBY]
    driver.say(bob, "/part")
    assert driver.take(bob) == ["!!! You are in #lobby already; /join #ROOM goes to another room."]


def test_leaving_the_chat_tells_your_room_only(driver, trio):
    alice, bob, carol = trio
    driver.say(bob, "/join #maths")
    driver.say(carol, "/join #maths")
    driver.take_all()
    driver.eof(carol)
    assert driver.take(bob) == ["*** carol left."]
    assert driver.take(alice) == []
    driver.lose(bob)
    assert driver.take(alice) == []
    assert driver.chat.rooms == {LOBBY: ["alice"]}


def test_rooms_lists_every_room_with_its_count(driver, trio):
    alice, bob, carol = trio
    driver.say(bob, "/join #maths")
    driver.say(carol, "/join #art")
    driver.take_all()
    driver.say(alice, "/rooms")
    assert driver.take(alice) == ["*** Rooms (3): #lobby (1), #maths (1), #art (1)"]


@pytest.mark.parametrize(
    ("command", "answer"),
    [
        ("/join", "!!! Usage: /join #ROOM (go to another room; it is made if needed)."),
        ("/join maths", "!!! A room's name starts with #, as in #lobby."),
        ("/join #a b", "!!! After its #, a room's name is like a person's: A name holds only"),
        ("/join #" + "x" * 33, "!!! After its #, a room's name is like a person's: A name has"),
        ("/join #lobby", "!!! You are in #lobby already."),
        ("/join #LOBBY", "!!! You are in #lobby already."),
        ("/history x", "!!! Usage: /history [N] (show the last N messages of your room again)."),
        ("/history 0", "!!! Usage: /history [N]"),
        ("/history -3", "!!! Usage: /history [N]"),
        ("/history ٣", "!!! Usage: /history [N]"),  # an Arabic-Indic three
    ],
)
def test_bad_room_commands_get_a_clear_error_and_change_nothing(driver, trio, command, answer):
    alice, bob, _ = trio
    driver.say(alice, command)
    [reply] = driver.take(alice)
    assert reply.startswith(answer)
    assert driver.take(bob) == []
    assert driver.chat.rooms == {LOBBY: ["alice", "bob", "carol"]}


def test_the_number_of_rooms_is_bounded(driver):
    driver = ChatDriver(max_rooms=3, **NO_FLOOD)
    conns = [driver.connect() for _ in range(4)]
    for number, conn in enumerate(conns[:2]):
        driver.say(conn, f"/join #room{number}")
    driver.take_all()
    driver.say(conns[2], "/join #room9")
    assert driver.take(conns[2]) == [
        "!!! There are 3 rooms already, as many as this server holds: /rooms lists them."
    ]
    driver.say(conns[2], "/join #room1")  # an existing room is always open
    assert driver.take(conns[2])[0].startswith("*** You are in #room1 (2 here)")
    # Leaving a room of one for a new room makes room for it.
    driver.say(conns[0], "/join #room9")
    assert driver.take(conns[0]) == ["*** You are in #room9 (1 here): guest1"]
    assert list(driver.chat.rooms) == [LOBBY, "#room1", "#room9"]


def test_joining_costs_a_line_of_the_flood_budget():
    driver = ChatDriver(rate=1, burst=3)
    conn = driver.connect()
    driver.take(conn)
    driver.say(conn, "/join #a", "/join #b", "/join #c", "/join #d")
    assert driver.chat.rooms[LOBBY] == []
    assert "#d" not in driver.chat.rooms  # held back until the budget refills
    assert any(line.startswith("*** Slow down") for line in driver.take(conn))


def test_a_big_room_stops_announcing_on_its_own():
    driver = ChatDriver(announce_up_to=2, **NO_FLOOD)
    conns = [driver.connect() for _ in range(4)]
    driver.say(conns[0], "/join #quiet")
    for conn in conns[1:3]:
        driver.say(conn, "/join #quiet")
    assert notice_of(driver.take(conns[0])[-1])[0] == "quiet"
    driver.take_all()
    fresh = driver.connect()  # the lobby, with one member, still announces
    assert driver.take(conns[3]) == [f"*** {fresh.name} joined."]


def test_the_rooms_member_list_fits_a_line():
    driver = ChatDriver(max_clients=2000, max_rooms=1000, **NO_FLOOD)
    conn = driver.connect()
    long = "x" * 31
    for number in range(999):
        driver.say(conn, f"/join #{long}{number:03}"[: 1 + 32])
    driver.take(conn)
    driver.say(conn, "/rooms")
    [line] = driver.take(conn)
    event, fields = notice_of(line)
    assert event == "rooms" and len(line.encode()) < 64 * 1024
    assert fields["count"] == "2"  # each room emptied behind the last


# --- History -------------------------------------------------------------------


def test_a_newcomer_gets_the_rooms_recent_messages_between_two_notices():
    driver = ChatDriver(history=2, **NO_FLOOD)
    alice = driver.connect()
    driver.say(alice, "/nick alice", "one", "/me waves", "/msg alice private", "three")
    late = driver.connect()
    assert driver.take(late)[1:] == [
        "*** You are in #lobby (2 here): alice, guest2",
        "*** Recent messages in #lobby (2):",
        "* alice waves",
        "<alice> three",
        "*** End of recent messages in #lobby.",
    ]


def test_each_room_has_its_own_history_and_join_replays_it():
    driver = ChatDriver(**NO_FLOOD)
    alice, bob = driver.connect(), driver.connect()
    driver.say(alice, "/join #maths", "in maths")
    driver.say(bob, "in the lobby", "/join #maths")
    assert driver.take(bob)[-4:] == [
        "*** You are in #maths (2 here): guest1, guest2",
        "*** Recent messages in #maths (1):",
        "<guest1> in maths",
        "*** End of recent messages in #maths.",
    ]
    driver.say(bob, "/part")
    assert driver.take(bob)[-2] == "<guest2> in the lobby"


def test_no_history_no_notices_and_history_zero_turns_it_off():
    driver = ChatDriver(history=0, **NO_FLOOD)
    alice = driver.connect()
    driver.say(alice, "said before")
    late = driver.connect()
    assert len(driver.take(late)) == 2  # the welcome and the room
    driver.say(late, "/history")  # still there on request
    assert driver.take(late)[1] == "<guest1> said before"
    driver.say(late, "/join #empty", "/history")
    assert driver.take(late)[-1] == "*** No messages in #empty yet."


def test_history_replays_at_most_what_is_kept():
    driver = ChatDriver(**NO_FLOOD)
    alice = driver.connect()
    driver.say(alice, *(f"line {n}" for n in range(HISTORY_KEPT + 5)))
    driver.take(alice)
    driver.say(alice, f"/history {10**9}")
    replay = driver.take(alice)
    assert replay[0] == f"*** Recent messages in #lobby ({HISTORY_KEPT}):"
    assert replay[1] == "<guest1> line 5" and replay[-2] == f"<guest1> line {HISTORY_KEPT + 4}"
    driver.say(alice, "/history")
    assert len(driver.take(alice)) == HISTORY_SHOWN + 2


def test_an_empty_rooms_history_goes_with_it_in_memory(driver):
    alice = driver.connect()
    driver.say(alice, "/join #brief", "said once", "/part", "/join #brief", "/history")
    assert driver.take(alice)[-1] == "*** No messages in #brief yet."


class RecordingStore(MemoryHistory):
    """A memory store that logs its calls, to see when the chat commits."""

    def __init__(self, log):
        super().__init__()
        self.log = log

    def commit(self):
        self.log.append("commit")


def test_the_store_is_committed_once_per_batch_before_anything_is_sent():
    log = []
    driver = ChatDriver(store=RecordingStore(log), **NO_FLOOD)
    alice, _ = driver.connect(), driver.connect()
    original = driver._deliver

    def deliver(conn, data):
        log.append(f"send {conn.name}")
        original(conn, data)

    driver._deliver = deliver
    log.clear()
    driver.say(alice, "one", "two", "three")  # one read, one batch
    assert log == ["commit", "send guest1", "send guest2"]
    log.clear()
    driver.say(alice, "/who")  # nothing kept: nothing to commit
    assert log == ["send guest1"]


# --- The stores ----------------------------------------------------------------


def test_memory_history_is_a_ring_per_room():
    store = MemoryHistory(kept=3)
    for n in range(5):
        store.add("#a", f"a{n}")
    store.add("#b", "b0")
    assert store.recent("#a", 10) == ["a2", "a3", "a4"]
    assert store.recent("#a", 2) == ["a3", "a4"]
    assert store.recent("#b", 0) == [] and store.recent("#c", 5) == []
    store.forget("#a")
    assert store.recent("#a", 5) == []


def test_sqlite_history_keeps_lines_across_reopening_and_trims_each_room(tmp_path):
    path = str(tmp_path / "chat.db")
    store = SQLiteHistory(path, kept=3)
    for n in range(5):
        store.add("#a", f"a{n}")
    store.add("#b", "b0")
    assert store.recent("#a", 10) == ["a0", "a1", "a2", "a3", "a4"]  # not yet committed
    store.commit()
    store.forget("#b")  # a store outlives the room
    store.close()
    reopened = SQLiteHistory(path, kept=3)
    assert reopened.recent("#a", 10) == ["a2", "a3", "a4"]
    assert reopened.recent("#b", 10) == ["b0"]
    assert reopened._db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    reopened.close()


def test_a_room_keeps_its_stored_history_after_it_empties(tmp_path):
    store = SQLiteHistory(str(tmp_path / "chat.db"))
    driver = ChatDriver(store=store, **NO_FLOOD)
    alice = driver.connect()
    driver.say(alice, "/join #kept", "still here", "/part", "/join #kept")
    assert "<guest1> still here" in driver.take(alice)
    store.close()


def test_a_chat_restarted_on_the_same_store_replays_what_was_said(tmp_path):
    path = str(tmp_path / "chat.db")
    store = SQLiteHistory(path)
    first = ChatDriver(store=store, **NO_FLOOD)
    alice = first.connect()
    first.say(alice, "/nick alice", "before the restart")
    store.close()
    second = ChatDriver(store=SQLiteHistory(path), **NO_FLOOD)
    late = second.connect()
    assert "<alice> before the restart" in second.take(late)


def test_a_tampered_store_cannot_inject_escapes(tmp_path):
    path = str(tmp_path / "chat.db")
    SQLiteHistory(path).close()
    with sqlite3.connect(path) as db:
        db.execute(
            "INSERT INTO messages (room, line) VALUES (?, ?)",
            (name_key(LOBBY), "<mallory> \x1b[2J\n*** fake notice"),
        )
    driver = ChatDriver(store=SQLiteHistory(path), **NO_FLOOD)  # the driver checks for controls
    late = driver.connect()
    assert "<mallory> ^[[2J^J*** fake notice" in driver.take(late)


@pytest.mark.parametrize("damage", ["not a database", "truncated", "a directory", "no folder"])
def test_an_unusable_store_is_one_clear_error(tmp_path, damage):
    path = tmp_path / "chat.db"
    if damage == "not a database":
        path.write_bytes(b"this is not SQLite\n" * 100)
    elif damage == "truncated":
        store = SQLiteHistory(str(path))
        store.add("#lobby", "x" * 100_000)
        store.close()
        path.write_bytes(path.read_bytes()[:6000])
    elif damage == "a directory":
        path.mkdir()
    else:
        path = tmp_path / "missing" / "chat.db"  # (Tests run as root: no file is read-only.)
    with pytest.raises(StoreError, match=str(path)):
        SQLiteHistory(str(path))


# --- A model of who is where ---------------------------------------------------

ROOMS = st.sampled_from(["#lobby", "#maths", "#Maths", "#art", "#x"])
NAMES = st.sampled_from(["alice", "bob", "Alice", "carol", "dave"])


class RoomsMachine(RuleBasedStateMachine):
    """Joins, parts, renames, messages and disconnects, checked against a plain model.

    The model is a dict: client -> (name, room key). After every step the chat's
    rooms must be the model's, and every chat line must reach exactly the sender's room.
    """

    clients = Bundle("clients")

    @initialize()
    def start(self):
        # Flood control on, with a budget the rules never exhaust: it is part of the path.
        self.driver = ChatDriver(rate=1000, burst=1000, max_rooms=4)
        self.where: dict[object, str] = {}  # connection -> room key

    @rule(target=clients)
    def connect(self):
        conn = self.driver.connect()
        self.where[conn] = name_key(LOBBY)
        return conn

    @rule(conn=clients, room=ROOMS)
    def join(self, conn, room):
        if conn not in self.where:
            return
        occupied = set(self.where.values()) | {name_key(LOBBY)}
        vanishing = (
            self.where[conn] != name_key(LOBBY)
            and list(self.where.values()).count(self.where[conn]) == 1
        )
        self.driver.say(conn, f"/join {room}")
        if name_key(room) in occupied or len(occupied) - vanishing < 4:
            self.where[conn] = name_key(room)

    @rule(conn=clients)
    def part(self, conn):
        if conn in self.where:
            self.driver.say(conn, "/part")
            self.where[conn] = name_key(LOBBY)

    @rule(conn=clients, name=NAMES)
    def rename(self, conn, name):
        if conn in self.where:
            self.driver.say(conn, f"/nick {name}")

    @rule(conn=consumes(clients))
    def disconnect(self, conn):
        if conn in self.where:
            self.driver.lose(conn)
            del self.where[conn]

    @rule(conn=clients)
    def say(self, conn):
        if conn not in self.where:
            return
        self.driver.take_all()
        self.driver.say(conn, "ping")
        line = f"<{conn.name}> ping"
        heard = {other for other, lines in self.driver.take_all().items() if line in lines}
        room = self.where[conn]
        assert heard == {other for other, key in self.where.items() if key == room}

    @invariant()
    def rooms_match_the_model(self):
        if not hasattr(self, "driver"):
            return
        keys = {name_key(LOBBY), *self.where.values()}  # the lobby stays, empty or not
        actual = {name_key(room): sorted(names) for room, names in self.driver.chat.rooms.items()}
        expected = {
            key: sorted(conn.name for conn, where in self.where.items() if where == key)
            for key in keys
        }
        assert actual == expected
        assert {conn.room.key for conn in self.where} <= set(actual)


TestRoomsMachine = RoomsMachine.TestCase
TestRoomsMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_limits_refuse_a_history_beyond_what_is_kept():
    with pytest.raises(ValueError, match="history"):
        Limits(history=HISTORY_KEPT + 1)
    with pytest.raises(ValueError, match="max_rooms"):
        Limits(max_rooms=0)
