"""ChatPanel against a real server, without a browser.

The panels run outside a kernel here: ipywidgets then gives each widget a
comm that goes nowhere, and everything else (threads, sockets, widget
values) is real. The front end's part is simulated the way it talks to the
kernel: on Enter it sets the text box's value; a click calls the button's
handlers. The ``health`` fixture (conftest.py) fails a test that leaves a
thread or a socket behind, or lets an exception escape a thread.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

widgets = pytest.importorskip("ipywidgets")

from chatlib import widget as widget_module  # noqa: E402
from chatlib.chat import Limits  # noqa: E402
from chatlib.protocol import CLIENT_MAX_LINE, LOBBY, ServerLine, format_notice  # noqa: E402
from chatlib.server import create_server  # noqa: E402
from chatlib.widget import ChatPanel  # noqa: E402
from tests.helpers import TIMEOUT, wait_until  # noqa: E402

XSS = "<img src=x onerror=alert(1)>"


def text_is(text: str) -> Callable[[ServerLine], bool]:
    return lambda line: line.text == text


def count(panel: ChatPanel, text: str) -> int:
    return sum(received.line.text == text for received in panel.messages)


def receiver(panel: ChatPanel) -> threading.Thread:
    assert panel._session is not None and panel._session.thread is not None
    return panel._session.thread


@pytest.fixture
def server(health, request):
    # No flood control: some tests send many lines at once. No recent messages
    # replayed, unless a test asks for them by parametrising this fixture
    # indirectly ({"history": 5}): what a panel reads first must not depend
    # on what an earlier panel said.
    limits = Limits(**{"rate": 0, "history": 0, **getattr(request, "param", {})})
    with create_server("threads", "127.0.0.1", 0, limits) as server:
        yield server


@pytest.fixture
def make_panel(server) -> Iterator[Callable[..., ChatPanel]]:
    panels: list[ChatPanel] = []

    def make(name: str | None = None, **kwargs) -> ChatPanel:
        host, port = server.address
        panel = ChatPanel(host, port, name, timeout=TIMEOUT, **kwargs)
        panels.append(panel)
        return panel

    yield make
    for panel in panels:
        panel.close()


@pytest.fixture
def alice(make_panel) -> ChatPanel:
    return make_panel("alice")


@pytest.fixture
def bob(make_panel, alice) -> ChatPanel:
    bob = make_panel("bob")
    alice.wait_for(text_is("guest2 is now known as bob."))
    return bob


class ScriptedServer:
    """A one-client server whose lines the test writes, recording what the client sends.

    It welcomes the client as ``guest1`` and puts it in #lobby at once (a
    panel waits for both), then sends whatever :meth:`send` is given, and
    closes when the client says ``/quit``, as the room does.
    """

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(TIMEOUT)
        self.port = self._listener.getsockname()[1]
        #: Every line the client sent, in order.
        self.heard: list[str] = []
        self._conn: socket.socket | None = None
        self._accepted = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="ScriptedServer", daemon=True)
        self._thread.start()

    def send(self, *lines: str) -> None:
        """Send each of *lines* to the client, as notices or messages are written."""
        assert self._accepted.wait(TIMEOUT), "no client connected"
        self._conn.sendall(b"".join(line.encode() + b"\n" for line in lines))

    def close(self) -> None:
        """Disconnect the client if it has not left, and end the server's thread."""
        if self._conn is not None:
            with contextlib.suppress(OSError):  # gone already
                self._conn.shutdown(socket.SHUT_RDWR)  # wakes the thread's recv()
        self._thread.join(TIMEOUT)
        self._listener.close()

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        with conn:
            self._conn = conn
            self._accepted.set()
            welcome = format_notice("welcome", name="guest1")
            entered = format_notice("entered", room=LOBBY, count=1, names="guest1", more="")
            conn.sendall(f"*** {welcome}\n*** {entered}\n".encode())
            received = b""
            while "/quit" not in self.heard and (data := conn.recv(4096)):
                received += data
                *lines, rest = received.split(b"\n")
                self.heard += [line.decode() for line in lines]
                received = rest


@pytest.fixture
def scripted(health) -> Iterator[tuple[ScriptedServer, ChatPanel]]:
    """A :class:`ScriptedServer` and a panel connected to it, both closed at teardown."""
    server = ScriptedServer()
    try:
        panel = ChatPanel("127.0.0.1", server.port, timeout=TIMEOUT)
        try:
            yield server, panel
        finally:
            panel.close()
    finally:
        server.close()


def say_and_sync(sender: ChatPanel, *readers: ChatPanel) -> None:
    """Send a marker line and wait until every reader has it.

    The server keeps each sender's lines in order, so once a reader has
    the marker it has had everything *sender* sent before it.
    """
    marker = f"marker {time.monotonic_ns()}"
    sender.send(marker)
    for reader in readers:
        reader.wait_for(text_is(marker))


# --- Connecting and names ----------------------------------------------------


def test_panels_learn_their_names_and_the_members(alice, bob):
    assert (alice.name, bob.name) == ("alice", "bob")
    assert alice.connected and bob.connected
    assert alice.members == bob.members == ["alice", "bob"]
    assert "connected as <b>alice</b>" in alice.status_view.value
    assert ">alice</div>" in alice.members_view.value


def test_a_taken_name_leaves_the_guest_name_the_server_gave(alice, make_panel):
    imposter = make_panel("alice")
    assert imposter.name == "guest2"
    assert imposter.messages[-1].line == ServerLine(
        "error", "The name alice is taken. Your name is still guest2."
    )
    assert "connected as <b>guest2</b>" in imposter.status_view.value


def test_a_panel_without_a_name_keeps_its_guest_name(make_panel):
    guest = make_panel()
    assert guest.name == "guest1" and guest.members == ["guest1"]


def test_a_refused_connection_shows_an_error_instead_of_raising(server):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
    panel = ChatPanel("127.0.0.1", port, "alice", timeout=1.0)
    assert not panel.connected
    assert 'class="chat-line chat-error chat-local"' in panel.log_view.value
    assert "Cannot connect" in panel.log_view.value
    assert "disconnected" in panel.status_view.value
    assert panel.input.disabled and panel.send_button.disabled
    with pytest.raises(ConnectionError):
        panel.send("hello")


# --- Sending: code, Enter, Send button ----------------------------------------


def test_send_from_code_reaches_everyone(alice, bob):
    alice.send("hello, bob")
    assert bob.wait_for(text_is("hello, bob")) == ServerLine("message", "hello, bob", "alice")
    alice.wait_for(text_is("hello, bob"))
    assert alice.log_lines[-1].startswith('<div class="chat-line chat-message chat-own">')
    assert bob.log_lines[-1].startswith('<div class="chat-line chat-message">')


def test_enter_in_the_text_box_sends_once_and_clears_it(alice, bob):
    alice.input.value = "typed and Enter"  # what the front end does on Enter
    assert alice.input.value == ""
    say_and_sync(alice, alice, bob)
    assert count(bob, "typed and Enter") == 1
    assert count(alice, "typed and Enter") == 1


def test_send_button_sends_what_the_box_holds_once(alice, bob):
    # Clicking Send takes the focus from the box, so the front end first
    # reports the box's value (like Enter), then the click.
    alice.input.value = "typed and clicked"
    alice.send_button.click()
    alice.send_button.click()  # an empty box: nothing more to send
    say_and_sync(alice, bob)
    assert count(bob, "typed and clicked") == 1
    assert alice.input.value == ""


def test_blank_input_sends_nothing(alice, bob):
    alice.input.value = "   "
    assert alice.input.value == ""
    say_and_sync(alice, bob)
    assert not any(m.line.text.strip() == "" for m in bob.messages)


def test_typing_while_disconnected_shows_an_error(alice):
    alice.close()
    # The box is disabled in the browser then; a value set from code still arrives.
    alice.input.value = "into the void"
    assert "Not sent" in alice.log_lines[-1]
    assert 'class="chat-line chat-error chat-local"' in alice.log_lines[-1]


# --- Kinds of lines ------------------------------------------------------------


def test_actions_and_private_messages_are_classified_and_styled(alice, bob, make_panel):
    carol = make_panel("carol")
    bob.wait_for(text_is("guest3 is now known as carol."))
    alice.send("/me waves")
    assert bob.wait_for(text_is("waves")) == ServerLine("action", "waves", "alice")
    assert 'class="chat-line chat-action"' in bob.log_view.value
    alice.wait_for(text_is("waves"))
    assert 'class="chat-line chat-action chat-own"' in alice.log_view.value

    alice.send("/msg bob psst")
    assert bob.wait_for(text_is("psst")) == ServerLine("private", "psst", "alice")
    assert alice.wait_for(text_is("psst")) == ServerLine("private-sent", "psst", "bob")
    assert 'class="chat-line chat-private"' in bob.log_lines[-1]
    assert 'class="chat-line chat-private chat-sent chat-own"' in alice.log_lines[-1]
    say_and_sync(alice, carol)
    assert not [m for m in carol.messages if m.line.kind.startswith("private")]

    bob.send("/frobnicate")
    error = bob.wait_for(lambda line: line.kind == "error")
    assert error.text.startswith("Unknown command /frobnicate")
    assert 'class="chat-line chat-error"' in bob.log_lines[-1]
    assert 'class="chat-line chat-notice"' in bob.log_view.value


def test_every_line_has_a_time(alice, bob):
    alice.send("what time is it?")
    bob.wait_for(text_is("what time is it?"))
    received = bob.messages[-1]
    assert time.strptime(received.time, "%H:%M:%S")
    assert f'<span class="chat-time">{received.time}</span>' in bob.log_lines[-1]


# --- Members -------------------------------------------------------------------


def test_members_follow_joins_renames_and_leaves(alice, bob, make_panel):
    carol = make_panel("carol")
    alice.wait_for(text_is("guest3 is now known as carol."))
    assert alice.members == ["alice", "bob", "carol"]
    assert carol.members == ["alice", "bob", "carol"]

    bob.send("/nick robert")
    for panel in (alice, bob, carol):
        panel.wait_for(text_is("bob is now known as robert."))
    assert alice.members == ["alice", "robert", "carol"]
    assert bob.name == "robert"
    assert "connected as <b>robert</b>" in bob.status_view.value

    carol.close()
    alice.wait_for(text_is("carol left."))
    assert alice.members == ["alice", "robert"]
    assert "Online (2)" in alice.members_view.value
    assert carol.members == []


def test_a_member_list_cut_short_still_counts_everyone(scripted):
    server, panel = scripted
    # What the room sends in a big room: the names that fit on one line.
    server.send("*** Online (5000): a, b, c (and 4997 more)")
    panel.wait_for(text_is("Online (5000): a, b, c (and 4997 more)"))
    assert "Online (5000)" in panel.members_view.value
    assert "and 4997 more" in panel.members_view.value
    assert panel.members == ["a", "b", "c"]
    assert panel.member_count == 5000

    server.send(
        "*** zed left.",  # one of those the list left out
        "*** ghost is now known as spook.",  # another
        "*** a left.",
        "*** dan joined.",
        "*** the end",
    )
    panel.wait_for(text_is("the end"))
    assert panel.members == ["b", "c", "dan"]
    assert panel.member_count == 4999
    assert "Online (4999)" in panel.members_view.value
    assert "and 4996 more" in panel.members_view.value
    panel.close()
    # Names it was never given are no sign of a missed notice: no /who.
    assert server.heard == ["/quit"]


def test_each_members_server_follows_joins_renames_and_leaves(scripted):
    server, panel = scripted
    # A server of several lists each member's server, and names a newcomer's.
    server.send(
        "*** Online (3): guest1@aaaa, bob@bbbb, cy@bbbb",
        "*** dan joined on server cccc.",
        "*** bob left (their server stopped answering).",
        "*** cy is now known as cyd.",
        "*** the end",
    )
    panel.wait_for(text_is("the end"))
    assert panel.members == ["guest1", "cyd", "dan"]
    # Who left takes their server along: a long session keeps no one it no longer lists.
    assert panel.member_servers == {"guest1": "aaaa", "cyd": "bbbb", "dan": "cccc"}
    assert "@bbbb" in panel.members_view.value and "bob" not in panel.members_view.value


def test_a_big_room_announcing_again_makes_the_panel_ask_who_is_here(scripted):
    server, panel = scripted
    server.send(
        "*** Online (150): a, b (and 148 more)",
        "*** More than 100 here: joins and leaves are no longer announced; /who lists everyone.",
        "*** 50 here now: joins and leaves are announced again.",
    )
    panel.wait_for(text_is("50 here now: joins and leaves are announced again."))
    # Nobody said who came and went meanwhile: the panel asks.
    wait_until(lambda: "/who" in server.heard, what="the panel's /who")


def test_a_line_of_client_max_line_bytes_is_shown_and_a_longer_one_dropped(scripted):
    server, panel = scripted
    longest = "<bob> " + "x" * (CLIENT_MAX_LINE - len("<bob> "))
    server.send(longest, longest + "x", "*** the end")
    panel.wait_for(text_is("the end"))
    texts = [received.line.text for received in panel.messages]
    assert texts[-2:] == [longest.removeprefix("<bob> "), "the end"]


def test_an_out_of_step_member_list_asks_the_server(alice, bob):
    with alice._lock:
        alice._members.remove("bob")  # as if a notice had been missed
    bob.close()
    # "bob left." names someone alice's list lacks: she asks with /who.
    alice.wait_for(text_is("Online (1): alice"))
    assert alice.members == ["alice"]


# --- Rooms and replayed messages ----------------------------------------------


def test_panels_learn_their_room_and_show_it(alice, bob):
    assert alice.room == bob.room == "#lobby"
    assert '<span class="chat-room">#lobby</span> · Online (2)' in alice.members_view.value


def test_joining_a_room_moves_the_panel_and_its_member_list(alice, bob, make_panel):
    alice.join("maths")  # the # may be left out
    alice.wait_for(text_is("You are in #maths (1 here): alice"))
    assert alice.room == "#maths"
    assert alice.members == ["alice"]  # bob stayed behind: the list starts again
    assert '<span class="chat-room">#maths</span> · Online (1)' in alice.members_view.value
    bob.wait_for(text_is("alice left (for another room)."))
    assert bob.room == "#lobby" and bob.members == ["bob"]

    # The room box: Enter in it (then a click on Join, which finds it empty).
    bob.room_input.value = "#maths"
    bob.join_button.click()
    assert bob.room_input.value == ""
    bob.wait_for(text_is("You are in #maths (2 here): alice, bob"))
    alice.wait_for(text_is("bob joined."))
    assert alice.members == bob.members == ["alice", "bob"]
    assert bob.room == "#maths"
    say_and_sync(bob, alice, bob)
    # A second /join would have been answered "You are in #maths already."
    assert not [m for m in bob.messages if m.line.kind == "error"]

    # Chat stays in its room; a private message reaches the lobby, after it.
    carol = make_panel("carol")
    assert carol.room == "#lobby" and carol.members == ["carol"]
    alice.send("for #maths only")
    alice.send("/msg carol psst")
    carol.wait_for(text_is("psst"))
    assert count(carol, "for #maths only") == 0

    bob.send("/part")
    bob.wait_for(text_is("You are in #lobby (2 here): carol, bob"))
    assert bob.room == "#lobby" and bob.members == ["carol", "bob"]
    alice.wait_for(text_is("bob left (for another room)."))
    assert alice.members == ["alice"]


def test_the_room_box_asks_once_and_the_room_changes_when_the_server_says(scripted):
    server, panel = scripted
    server.send("*** alice joined.")
    panel.wait_for(text_is("alice joined."))
    assert panel.members == ["guest1", "alice"]
    panel.room_input.value = "maths"  # Enter
    panel.join_button.click()  # the box is empty by now: nothing more
    wait_until(lambda: "/join #maths" in server.heard, what="the panel's /join")
    assert panel.room == "#lobby"  # not until the server says so
    server.send("*** You are in #maths (2 here): carol, guest1")
    panel.wait_for(text_is("You are in #maths (2 here): carol, guest1"))
    assert panel.room == "#maths"
    assert panel.members == ["carol", "guest1"]
    assert '<span class="chat-room">#maths</span> · Online (2)' in panel.members_view.value
    panel.close()
    assert server.heard == ["/join #maths", "/quit"]


@pytest.mark.parametrize("server", [{"history": 5}], indirect=True)
def test_replayed_messages_are_styled_apart_from_live_ones(make_panel):
    alice = make_panel("alice")
    alice.send("said before")
    alice.send("/me waved before")
    alice.wait_for(text_is("waved before"))
    carol = make_panel("carol")
    carol.wait_for(text_is("End of recent messages in #lobby."))
    assert [m.line.text for m in carol.messages if m.replayed] == ["said before", "waved before"]
    lines = list(carol.log_lines)
    start = next(i for i, line in enumerate(lines) if "Recent messages in #lobby (2):" in line)
    opening, said, waved, closing = lines[start : start + 4]
    assert 'class="chat-line chat-notice chat-history"' in opening
    assert 'class="chat-line chat-message chat-replayed"' in said
    assert 'class="chat-line chat-action chat-replayed"' in waved
    for replayed in (said, waved):
        # No receive time on a line said earlier: a label instead.
        assert '<span class="chat-label chat-earlier">earlier</span>' in replayed
        assert "chat-time" not in replayed
    assert 'class="chat-line chat-notice chat-history-end"' in closing
    assert ".chat-panel .chat-replayed {" in carol.log_view.value  # styled, not just marked

    alice.send("said now")
    carol.wait_for(text_is("said now"))
    assert not carol.messages[-1].replayed
    assert carol.log_lines[-1].startswith('<div class="chat-line chat-message">')

    # /history replays in the same form.
    carol.send("/history 1")
    wait_until(lambda: count(carol, "End of recent messages in #lobby.") == 2, what="a replay")
    assert [m.line.text for m in carol.messages if m.replayed][-1] == "said now"
    assert "chat-replayed" in carol.log_lines[-2]


def test_a_replay_ends_at_a_notice_even_without_its_end(scripted):
    server, panel = scripted
    server.send(
        "*** Recent messages in #lobby (2):",
        "<alice> old",
        "*** bob joined.",  # a broken server: no end notice
        "<bob> new",
    )
    panel.wait_for(text_is("new"))
    assert [(m.line.text, m.replayed) for m in panel.messages[-3:]] == [
        ("old", True),
        ("bob joined.", False),
        ("new", False),
    ]


# --- Safety ----------------------------------------------------------------------


def test_html_in_a_chat_line_is_shown_as_text(alice, bob):
    alice.send(XSS)
    alice.send("fish & chips")
    bob.wait_for(text_is("fish & chips"))
    log = bob.log_view.value
    assert "&lt;img src=x onerror=alert(1)&gt;" in log
    assert "<img" not in log
    assert "fish &amp; chips" in log


def test_the_receiving_thread_never_prints(alice, bob, capsys):
    alice.send("quietly")
    bob.wait_for(text_is("quietly"))
    bob.close()
    assert capsys.readouterr() == ("", "")


# --- History -------------------------------------------------------------------


def test_history_is_bounded(make_panel, alice):
    reader = make_panel("reader", history=5)
    for number in range(20):
        alice.send(f"line {number}")
    reader.wait_for(text_is("line 19"))
    assert [m.line.text for m in reader.messages] == [f"line {n}" for n in range(15, 20)]
    assert len(reader.log_lines) == 5
    assert reader.log_view.value.count('class="chat-line ') == 5


def test_wait_for_gives_up_after_its_timeout(alice):
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        alice.wait_for(text_is("never sent"), timeout=0.2)
    assert time.monotonic() - started < 2


# --- Closing and reconnecting ---------------------------------------------------


def test_close_ends_the_thread_and_the_socket(alice, bob):
    thread = receiver(alice)
    sock = alice._session.client._sock
    alice.close()
    assert not thread.is_alive()  # close() waits for it (bounded)
    assert sock.fileno() == -1
    assert not alice.connected and alice.members == [] and alice.room is None
    assert "disconnected" in alice.status_view.value
    assert alice.input.disabled and alice.send_button.disabled and alice.close_button.disabled
    assert alice.room_input.disabled and alice.join_button.disabled
    assert not alice.reconnect_button.disabled
    bob.wait_for(text_is("alice left."))
    assert bob.members == ["bob"]
    alice.close()  # a second close does nothing


def test_reconnect_gets_the_same_name_back(alice, bob):
    alice.join("#maths")
    alice.wait_for(text_is("You are in #maths (1 here): alice"))
    alice.close()
    alice.reconnect()
    assert alice.connected and alice.name == "alice"
    assert alice.room == "#lobby"  # a new connection starts in the lobby
    assert alice.members == ["bob", "alice"]
    alice.send("back again")
    bob.wait_for(text_is("back again"))


def test_the_buttons_disconnect_and_reconnect(alice, bob):
    thread = receiver(alice)
    alice.close_button.click()
    assert not thread.is_alive() and not alice.connected
    alice.reconnect_button.click()
    assert alice.connected and alice.name == "alice"
    assert receiver(alice) is not thread
    assert "connected as <b>alice</b>" in alice.status_view.value


def test_reconnect_while_connected_replaces_the_connection(alice):
    thread = receiver(alice)
    alice.reconnect()
    assert not thread.is_alive()
    assert alice.connected and alice.name == "alice"


def test_closing_the_widget_closes_the_connection(alice):
    thread = receiver(alice)
    alice.widget.close()
    assert not thread.is_alive() and not alice.connected
    assert alice.input.comm is None  # the parts are closed with it


def test_a_server_that_stops_disconnects_the_panel(make_panel, server):
    panel = make_panel("alice")
    thread = receiver(panel)
    server.stop()
    panel.wait_for(text_is("The server is shutting down. Bye!"))
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    wait_until(lambda: not panel.connected, what="the panel to see the server go")
    assert "Disconnected: the server closed the connection." in panel.log_lines[-1]
    assert "disconnected" in panel.status_view.value


def test_exit_handler_ends_every_open_connection(make_panel):
    panel = make_panel("alice")
    thread = receiver(panel)
    widget_module._end_open_sessions(budget=TIMEOUT)
    assert not thread.is_alive()
    assert not widget_module._open_sessions


# --- Display ---------------------------------------------------------------------


def test_repr_is_stable_for_nbval(alice, bob):
    assert repr(alice) == "ChatPanel(name='alice')"
    assert repr(widgets.HBox([alice.widget, bob.widget])) == (
        "HBox(children=(<widget of ChatPanel(name='alice')>, <widget of ChatPanel(name='bob')>))"
    )
    bundle = alice._repr_mimebundle_()
    assert bundle["text/plain"] == "ChatPanel(name='alice')"
    assert "application/vnd.jupyter.widget-view+json" in bundle


def test_widgets_carry_the_css_classes_tests_select_on(alice):
    classes = {
        "chat-panel": alice.widget,
        "chat-log": alice.log_view,
        "chat-input": alice.input,
        "chat-send": alice.send_button,
        "chat-members": alice.members_view,
        "chat-status": alice.status_view,
        "chat-close": alice.close_button,
        "chat-reconnect": alice.reconnect_button,
        "chat-room-input": alice.room_input,
        "chat-join": alice.join_button,
    }
    for css_class, part in classes.items():
        assert css_class in part._dom_classes
    assert alice.input.continuous_update is False
    assert alice.room_input.continuous_update is False
