"""A live chat panel for JupyterLab, built from ipywidgets: :class:`ChatPanel`.

A panel is one chat client. It shows the conversation, which room it is in
and who is there, whether it is connected, a box to type in, and a box to
go to another room (``#maths``, then Join)::

    from ipywidgets import HBox
    alice = ChatPanel("127.0.0.1", 5050, "alice")
    bob = ChatPanel("127.0.0.1", 5050, "bob")
    HBox([alice.widget, bob.widget])  # side by side; a bare `alice` shows one

Lines from the server are classified by
:func:`chatlib.protocol.parse_server_line`, the member list is kept from
the server's notices (:func:`chatlib.protocol.parse_notice`), and the room
and the replays of recent messages are followed by
:class:`chatlib.protocol.RoomTracker`, so the panel never parses the protocol
itself. Replayed messages are shown dim, with "earlier" in place of a time,
between two dashed rules.

Two rules keep it safe in a notebook:

- Every piece of text is HTML-escaped before it is rendered: ipywidgets'
  ``HTML`` widget sets ``innerHTML`` unsanitised, so a chat line such as
  ``<img src=x onerror=alert(1)>`` would otherwise run in the reader's browser.
- The receiving thread only sets widget values, under a lock. It never
  prints and never uses ``with output:``: since ipykernel 7.1 output from a
  background thread lands in whichever cell ran last.

This is the only chatlib module with a third-party import (ipywidgets, from
the ``notebooks`` extra); the rest of chatlib is stdlib-only.
"""

from __future__ import annotations

import atexit
import contextlib
import html
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

import ipywidgets as widgets

from chatlib.client import ChatClient
from chatlib.protocol import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    RoomTracker,
    ServerLine,
    parse_notice,
    parse_server_line,
    split_member,
)

__all__ = ["HISTORY", "LINE_CLASSES", "PART_CLASSES", "ChatPanel", "Received"]

#: Lines a panel keeps (in its log and in :attr:`ChatPanel.messages`). Old
#: lines go first: a long-running panel must not grow without bound, and
#: re-rendering the log costs time in proportion to its length.
HISTORY = 500

#: Longest wait for a connection, and for the server to confirm our name.
TIMEOUT = 5.0

#: How long :meth:`ChatPanel.close` lets the server answer ``/quit`` before
#: cutting the connection.
QUIT_GRACE = 1.0

#: CSS class of each kind of line (kinds as :class:`~chatlib.protocol.ServerLine`
#: has them). ``chat-own`` is added to lines you wrote.
LINE_CLASSES = {
    "message": "chat-message",
    "action": "chat-action",
    "private": "chat-private",
    "private-sent": "chat-private chat-sent",
    "notice": "chat-notice",
    "error": "chat-error",
    "other": "chat-other",
}

#: CSS class added to a line for its part in a replay of recent messages
#: (parts as :meth:`chatlib.protocol.RoomTracker.track` returns them); live
#: lines get none.
PART_CLASSES = {
    "history": "chat-history",
    "replayed": "chat-replayed",
    "history-end": "chat-history-end",
}

# The log is a fixed-height box that scrolls. With `flex-direction:
# column-reverse` on it (and the lines in normal order in one child), a
# browser starts the box scrolled to its end, so the newest line shows
# without any JavaScript, each time the HTML widget replaces its content.
# Colours use JupyterLab's theme variables, with fallbacks elsewhere.
_STYLE = """<style>
.chat-panel .chat-scroll {
  height: 16em; overflow-y: auto; display: flex; flex-direction: column-reverse;
  border: 1px solid var(--jp-border-color2, #ccc); border-radius: 3px; padding: 2px 6px;
  background: var(--jp-layout-color0, #fff);
  font-family: var(--jp-code-font-family, monospace); font-size: var(--jp-code-font-size, 13px);
}
.chat-panel .widget-html-content { line-height: 1.4; }
.chat-panel .chat-line {
  white-space: pre-wrap; overflow-wrap: anywhere; padding: 1px 2px 1px 2em; text-indent: -1.8em;
}
.chat-panel .chat-time { color: var(--jp-ui-font-color3, #999); }
.chat-panel .chat-name { font-weight: bold; }
.chat-panel .chat-own { background: var(--jp-brand-color4, #e3f2fd); }
.chat-panel .chat-own .chat-name { color: var(--jp-brand-color0, #0d47a1); }
.chat-panel .chat-action { font-style: italic; color: var(--jp-success-color0, #1b5e20); }
.chat-panel .chat-private { color: #8e24aa; }  /* JupyterLab's themes have no purple */
.chat-panel .chat-label {
  font-size: 85%; border: 1px solid currentColor; border-radius: 3px; padding: 0 3px;
  margin-right: 0.4em; text-indent: 0; display: inline-block;
}
.chat-panel .chat-notice { color: var(--jp-ui-font-color2, #666); font-style: italic; }
.chat-panel .chat-error { color: var(--jp-error-color1, #c62828); font-weight: bold; }
.chat-panel .chat-empty { color: var(--jp-ui-font-color3, #999); font-style: italic; }
.chat-panel .chat-replayed { opacity: 0.6; }
.chat-panel .chat-history { border-top: 1px dashed var(--jp-border-color1, #bbb); margin-top: 3px; }
.chat-panel .chat-history-end {
  border-bottom: 1px dashed var(--jp-border-color1, #bbb); margin-bottom: 3px;
}
.chat-panel .chat-room { color: var(--jp-brand-color1, #1976d2); }
.chat-panel .chat-members { padding-left: 0.6em; }
.chat-panel .chat-members-title { font-weight: bold; }
.chat-panel .chat-member.chat-own { background: none; font-weight: bold; }
.chat-panel .chat-members-more { color: var(--jp-ui-font-color3, #999); font-style: italic; }
.chat-panel .chat-member-server { color: var(--jp-ui-font-color3, #999); font-size: 85%; }
.chat-panel .chat-status-on { color: var(--jp-success-color1, #2e7d32); }
.chat-panel .chat-status-off { color: var(--jp-error-color1, #c62828); }
</style>"""


class Received(NamedTuple):
    """A line the panel received: when (local ``HH:MM:SS``), what, and if it was replayed.

    *replayed* is true for an earlier message the server replayed (on
    entering a room, or for ``/history``): *time* is then when it arrived
    again, not when it was said.
    """

    time: str
    line: ServerLine
    replayed: bool = False


class _PanelBox(widgets.VBox):
    """The panel's outer box; only its repr differs from a VBox.

    nbval compares the ``text/plain`` repr of every displayed widget, and a
    VBox's repr spells out its children's values (times, ports): this one
    stays the same from run to run.
    """

    def __init__(self, panel: ChatPanel, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._panel_repr = repr(panel)

    def __repr__(self) -> str:
        return f"<widget of {self._panel_repr}>"


class _Session:
    """One connection: its client, its receiving thread, its handshake."""

    def __init__(self, client: ChatClient, wanted_name: str | None) -> None:
        self.client = client
        self.wanted_name = wanted_name
        self.thread: threading.Thread | None = None
        #: Whether the server has told us our name (welcome, then the answer to /nick).
        self.name_settled = False
        #: Set once our name is settled and the server has said which room
        #: we are in (or the connection ended): the constructor waits for it.
        self.ready = threading.Event()
        #: Set at interpreter exit: the receiver must leave the widgets alone.
        self.abandoned = False

    def end(self, timeout: float, *, quit_grace: float = 0.0) -> None:
        """End the connection and wait at most *timeout* seconds for the thread.

        With a *quit_grace*, say ``/quit`` first and give the server that
        long to close its side: once it has, we are out of the room, so a
        reconnect can take the same name again at once.
        """
        joinable = self.thread is not None and self.thread is not threading.current_thread()
        if quit_grace > 0 and joinable:
            with contextlib.suppress(OSError):  # already gone: nothing to say goodbye to
                self.client.send("/quit")
                self.thread.join(min(quit_grace, timeout))
        # shutdown() inside close() wakes the receiver if it still waits.
        self.client.close()
        if joinable:
            self.thread.join(timeout)


class ChatPanel:
    """A chat client with a face: an ipywidgets panel connected to a server.

    Show it by ending a cell with the panel, or put :attr:`widget` in a
    layout (``HBox([alice.widget, bob.widget])``). Type in the box and press
    Enter, or click Send; lines starting with ``/`` are commands (``/me``,
    ``/msg NAME TEXT``, ``/nick``, ``/who``, ``/join #ROOM``, ``/help``).
    ipywidgets reports a finished edit on Enter and also when the box loses
    focus with new text in it, so leaving the box sends what it holds, once.
    The room box at the top works the same way: type a room's name and
    press Enter or click Join.

    The same things work from code: :meth:`send`, :meth:`join`,
    :attr:`messages`, :meth:`wait_for`, :attr:`room`, :attr:`members`,
    :attr:`member_count`, :attr:`member_servers`, :attr:`server`,
    :attr:`linked`, :attr:`name`, :attr:`connected`, :meth:`close` and
    :meth:`reconnect`.

    On a server that is one of several on a broker (``--broker``), the
    member list shows each member's server, and the status line the
    panel's own server and whether it is linked to the others.

    *name* is the name to ask for; the server may refuse it (taken, or not a
    valid name), and then :attr:`name` is the guest name it gave. A panel
    that cannot connect says why in its log instead of raising; check
    :attr:`connected`.
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        name: str | None = None,
        *,
        history: int = HISTORY,
        timeout: float = TIMEOUT,
    ) -> None:
        """Build the panel, connect to *host*:*port* and wait until named and placed.

        The wait ends once the server has answered the name request and
        said which room the panel is in, or after *timeout* seconds.
        """
        self.host = host
        self.port = port
        self.requested_name = name
        self.timeout = timeout
        # One lock for everything the receiving thread and the kernel's
        # main thread share, widget values included; the condition wakes
        # wait_for() whenever a line arrives or the connection ends.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._session: _Session | None = None
        self._name: str | None = None
        self._rooms = RoomTracker()
        self._members: list[str] = []
        # How many are online that the member list leaves out: in a big room
        # the server cuts its list short to keep the line within what
        # clients accept ("Online (5000): a, b (and 4998 more)").
        self._unlisted = 0
        # With several servers: each member's server, this panel's server, and
        # whether it is linked to the others (None on a server on its own).
        self._servers: dict[str, str] = {}
        self._server: str | None = None
        self._linked: bool | None = None
        self._messages: deque[Received] = deque(maxlen=history)
        self._log_lines: deque[str] = deque(maxlen=history)
        # Set while the panel empties one of its text boxes (the message box
        # or the room box): that change of its value must not send anything.
        self._clearing_input = False

        self.status_view = widgets.HTML()
        self.close_button = widgets.Button(
            description="Disconnect",
            tooltip="Close the connection; Reconnect opens a new one",
            layout=widgets.Layout(width="auto"),
        )
        self.reconnect_button = widgets.Button(
            description="Reconnect",
            tooltip="Close the connection if open, then connect again",
            layout=widgets.Layout(width="auto"),
        )
        self.log_view = widgets.HTML(layout=widgets.Layout(flex="1 1 auto", width="auto"))
        self.members_view = widgets.HTML(layout=widgets.Layout(flex="0 0 9em", width="9em"))
        self.input = widgets.Text(
            placeholder="Say something, or /help",
            continuous_update=False,  # the value arrives on Enter (or on leaving the box)
            layout=widgets.Layout(flex="1 1 auto", width="auto"),
        )
        self.send_button = widgets.Button(description="Send", button_style="primary")
        self.room_input = widgets.Text(
            placeholder="#room",
            continuous_update=False,  # as the message box: Enter, or leaving the box
            layout=widgets.Layout(width="8em"),
        )
        self.join_button = widgets.Button(
            description="Join",
            tooltip="Go to the room named in the box (it is made if needed); #lobby goes back",
            layout=widgets.Layout(width="auto"),
        )
        top = widgets.HBox(
            [
                self.status_view,
                self.room_input,
                self.join_button,
                self.close_button,
                self.reconnect_button,
            ]
        )
        middle = widgets.HBox([self.log_view, self.members_view])
        bottom = widgets.HBox([self.input, self.send_button])
        self._parts: list[widgets.Widget] = [
            self.status_view,
            self.close_button,
            self.reconnect_button,
            self.log_view,
            self.members_view,
            self.input,
            self.send_button,
            self.room_input,
            self.join_button,
            top,
            middle,
            bottom,
        ]
        #: The panel as one widget, to display or to put in a layout.
        self.widget = _PanelBox(
            self,
            children=[top, middle, bottom],
            layout=widgets.Layout(flex="1 1 24em", min_width="20em", margin="2px 4px"),
        )
        self.status_view.layout.flex = "1 1 auto"
        for part, css_class in [
            (self.widget, "chat-panel"),
            (self.log_view, "chat-log"),
            (self.input, "chat-input"),
            (self.send_button, "chat-send"),
            (self.members_view, "chat-members"),
            (self.status_view, "chat-status"),
            (self.close_button, "chat-close"),
            (self.reconnect_button, "chat-reconnect"),
            (self.room_input, "chat-room-input"),
            (self.join_button, "chat-join"),
        ]:
            part.add_class(css_class)

        self.input.observe(self._on_input, "value")
        self.send_button.on_click(self._on_send_click)
        self.room_input.observe(self._on_room_input, "value")
        self.join_button.on_click(self._on_join_click)
        self.close_button.on_click(lambda _button: self.close())
        self.reconnect_button.on_click(lambda _button: self.reconnect())
        # Widget.close() on the panel's widget (Widget.close_all(), say)
        # sets its comm to None: end the connection with it.
        self.widget.observe(self._on_widget_comm, "comm")

        with self._lock:
            self._render_locked()
        self._connect()

    # --- Public methods -------------------------------------------------

    def send(self, text: str) -> None:
        """Send *text* as if typed: a chat line, or a command such as ``/me waves``.

        Several lines of text are sent as several lines. Raises
        :class:`ConnectionError` when the panel is not connected.
        """
        session = self._session
        if session is None:
            raise ConnectionError("the panel is not connected; call reconnect()")
        session.client.send(text)

    def join(self, room: str) -> None:
        """Ask to go to *room* (``"#maths"``; the ``#`` may be left out), as ``/join`` does.

        The server makes the room if needed; ``"#lobby"`` goes back. This
        returns at once: :attr:`room` and :attr:`members` change when the
        server's answer arrives (an error line if it refuses), so wait for
        that with :meth:`wait_for`. Raises :class:`ConnectionError` when the
        panel is not connected.
        """
        room = room.strip()
        if room and not room.startswith("#"):
            room = "#" + room
        self.send(f"/join {room}")

    def wait_for(
        self, predicate: Callable[[ServerLine], bool], timeout: float = TIMEOUT
    ) -> ServerLine:
        """Return the first line in :attr:`messages` for which *predicate* is true.

        Lines already received count, oldest first; otherwise wait until one
        arrives. Raises :class:`TimeoutError` after *timeout* seconds.
        Everything a line changes (members, name, room) is updated before it
        is visible here.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for received in self._messages:
                    if predicate(received.line):
                        return received.line
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no matching line arrived within {timeout:g} seconds")
                self._changed.wait(remaining)

    def close(self) -> None:
        """Close the connection and end the receiving thread (the Disconnect button).

        The panel stays on screen, disconnected; :meth:`reconnect` opens a
        new connection. Safe to call more than once.
        """
        with self._lock:
            session = self._session
            if session is None:
                return
            self._session = None
            self._lost_locked("Disconnected.")
        session.end(self.timeout, quit_grace=QUIT_GRACE)

    def reconnect(self) -> None:
        """Close the connection if it is open, then connect again (the Reconnect button)."""
        self.close()
        self._connect()

    @property
    def connected(self) -> bool:
        """Whether the panel has a connection open."""
        return self._session is not None

    @property
    def name(self) -> str | None:
        """Your name in the room as the server last said it (``None`` before that)."""
        return self._name

    @property
    def room(self) -> str | None:
        """The room you are in, as the server last said (``"#lobby"`` on arrival).

        ``None`` while disconnected. It changes once the server confirms a
        move (its "entered" notice), not when :meth:`join` asks for one.
        """
        return self._rooms.room

    @property
    def members(self) -> list[str]:
        """Who is in your room, in order of arrival, as the server's notices say.

        In a big room the server's list names only those who fit on one
        line; :attr:`member_count` counts everyone.
        """
        with self._lock:
            return list(self._members)

    @property
    def member_count(self) -> int:
        """How many are online, counting those the server's list left out."""
        with self._lock:
            return len(self._members) + self._unlisted

    @property
    def member_servers(self) -> dict[str, str]:
        """The server each member is on, as the server's lists say; empty on a server on its own."""
        with self._lock:
            return dict(self._servers)

    @property
    def server(self) -> str | None:
        """The tag of the server this panel is on, if it is one of several; else ``None``."""
        return self._server

    @property
    def linked(self) -> bool | None:
        """Whether the panel's server is linked to the others; ``None`` on a server on its own."""
        return self._linked

    @property
    def messages(self) -> tuple[Received, ...]:
        """The lines received (the last ``history`` of them), oldest first."""
        with self._lock:
            return tuple(self._messages)

    @property
    def log_lines(self) -> tuple[str, ...]:
        """The HTML of each line in the log, oldest first (times are local ``HH:MM:SS``)."""
        with self._lock:
            return tuple(self._log_lines)

    def __repr__(self) -> str:
        # No host, port or state: nbval compares this, and they change.
        return f"ChatPanel(name={self.requested_name!r})"

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        if self.widget.comm is None:  # closed: nothing left to show
            return {"text/plain": repr(self)}
        bundle = self.widget._repr_mimebundle_(**kwargs)
        bundle["text/plain"] = repr(self)
        return bundle

    # --- Private methods ------------------------------------------------

    def _connect(self) -> None:
        try:
            client = ChatClient(self.host, self.port, timeout=self.timeout)
        except OSError as error:
            reason = error.strerror or str(error) or type(error).__name__
            problem = f"Cannot connect to {self.host}:{self.port}: {reason}."
            with self._lock:
                self._add_local_locked("error", problem)
                self._render_locked()
            return
        session = _Session(client, self.requested_name)
        with self._lock:
            self._session = session
            self._name = None  # until the welcome says which guest we are
            self._rooms = RoomTracker()  # until the server says where we are
            self._members = []
            self._unlisted = 0
            self._servers, self._server, self._linked = {}, None, None
            self._render_locked()
        _open_sessions.add(session)
        if self.requested_name:
            # The server queues its welcome as it accepts us, before reading
            # a line from us, so the answer to /nick comes after the welcome.
            # OSError: the server hung up already; the receiving thread reports it.
            with contextlib.suppress(OSError):
                client.send(f"/nick {self.requested_name}")
        session.thread = threading.Thread(
            target=self._receive,
            args=(session,),
            name=f"ChatPanel({self.requested_name!r}) receiver",
            daemon=True,  # never keeps the kernel from exiting
        )
        session.thread.start()
        session.ready.wait(self.timeout)

    def _receive(self, session: _Session) -> None:
        """Handle each line until the connection ends; the receiving thread's body."""
        for text in session.client:
            if self._handle(session, parse_server_line(text)):
                try:
                    session.client.send("/who")
                except OSError:
                    break
        with self._lock:
            if self._session is session and not session.abandoned:
                # Not closed by us: the server hung up.
                self._session = None
                self._lost_locked("Disconnected: the server closed the connection.")
        _open_sessions.discard(session)
        session.client.close()
        session.ready.set()

    def _handle(self, session: _Session, line: ServerLine) -> bool:
        """Record *line*; return whether the member list needs a ``/who``."""
        with self._lock:
            if self._session is not session or session.abandoned:
                return False  # a line from a connection closed meanwhile
            resync = False
            part = self._rooms.track(line)
            if line.kind == "notice" and (notice := parse_notice(line.text)):
                resync = self._follow_notice_locked(session, *notice)
            elif line.kind == "error" and not session.name_settled:
                session.name_settled = True  # the server refused the name we asked for
            if session.name_settled and self._rooms.room is not None:
                session.ready.set()
            received = Received(time.strftime("%H:%M:%S"), line, part == "replayed")
            self._messages.append(received)
            self._log_lines.append(self._line_html(received, part=part))
            self._render_locked()
            self._changed.notify_all()
            return resync

    def _follow_notice_locked(self, session: _Session, event: str, fields: dict) -> bool:
        """Update name and members from a notice; return True if they look out of step."""
        name = fields.get("name")
        if event == "welcome":
            self._name = name
            if session.wanted_name in (None, name):
                session.name_settled = True
        elif event in ("members", "entered"):
            # Entering a room lists who is there, as /who does: the old
            # room's list goes.
            entries = [split_member(entry) for entry in fields["names"].split(", ")]
            self._members = [member for member, _ in entries if member]
            self._servers = {member: server for member, server in entries if server}
            self._unlisted = max(0, int(fields["count"]) - len(self._members))
        elif event == "joined":
            if name in self._members:
                return True
            self._members.append(name)
            if fields["server"]:
                self._servers[name] = fields["server"]
        elif event == "server":
            self._server = fields["server"]
            self._linked = fields["state"].startswith("linked")
        elif event in ("split", "linked"):
            self._linked = event == "linked"
            # Who is here changes wholesale: ask again once it is known.
            return event == "linked"
        elif event == "left":
            self._servers.pop(name, None)
            if name in self._members:
                self._members.remove(name)
            elif self._unlisted:
                self._unlisted -= 1  # one of those the list left out
            else:
                return True
        elif event == "announcing":
            return True  # a big room told nobody who came and went: ask again
        elif event == "renamed":
            if fields["old"] == self._name:
                self._name = name
                session.name_settled = True
            if fields["old"] in self._servers:
                self._servers[name] = self._servers.pop(fields["old"])
            if fields["old"] in self._members:
                self._members[self._members.index(fields["old"])] = name
            elif not self._unlisted:
                return True
        return False

    def _lost_locked(self, reason: str) -> None:
        self._rooms = RoomTracker()
        self._members = []
        self._unlisted = 0
        self._servers, self._server, self._linked = {}, None, None
        self._add_local_locked("notice", reason)
        self._render_locked()
        self._changed.notify_all()

    def _add_local_locked(self, kind: str, text: str) -> None:
        """Add a line of the panel's own (not from the server) to the log only."""
        received = Received(time.strftime("%H:%M:%S"), ServerLine(kind, text))
        self._log_lines.append(self._line_html(received, local=True))

    def _line_html(self, received: Received, *, local: bool = False, part: str = "live") -> str:
        """Return one log line as HTML; every piece of text is escaped.

        *part* is the line's part in a replay (see :data:`PART_CLASSES`).
        """
        line, me = received.line, self._name
        own = line.kind == "private-sent" or (
            line.kind in ("message", "action") and line.name is not None and line.name == me
        )
        classes = ["chat-line", LINE_CLASSES[line.kind]]
        if own:
            classes.append("chat-own")
        if local:
            classes.append("chat-local")
        if part in PART_CLASSES:
            classes.append(PART_CLASSES[part])
        name = html.escape(line.name or "")
        text = html.escape(line.text)
        if line.kind == "message":
            body = f'<span class="chat-name">{name}</span>: {text}'
        elif line.kind == "action":
            body = f'* <span class="chat-name">{name}</span> {text}'
        elif line.kind == "private":
            me_html = html.escape(me or "you")
            body = (
                f'<span class="chat-label">private</span><span class="chat-name">{name}</span>'
                f" → {me_html}: {text}"
            )
        elif line.kind == "private-sent":
            me_html = html.escape(me or "you")
            body = (
                f'<span class="chat-label">private</span>{me_html} → '
                f'<span class="chat-name">{name}</span>: {text}'
            )
        else:
            body = text
        # A replayed message was said before it arrived, when nobody knows
        # (the server sends no times): "earlier" says so without colour.
        when = (
            '<span class="chat-label chat-earlier">earlier</span>'
            if received.replayed
            else f'<span class="chat-time">{html.escape(received.time)}</span>'
        )
        return f'<div class="{" ".join(classes)}">{when} {body}</div>'

    def _render_locked(self) -> None:
        """Show the current state in the widgets (caller holds the lock)."""
        lines = "".join(self._log_lines) or '<div class="chat-empty">No messages yet.</div>'
        self.log_view.value = (
            f'{_STYLE}<div class="chat-scroll"><div class="chat-lines">{lines}</div></div>'
        )
        connected = self._session is not None
        if connected:
            dot = '<span class="chat-status-on">●</span>'
            status = (
                f"connected as <b>{html.escape(self._name)}</b>" if self._name else "connecting…"
            )
        else:
            dot = '<span class="chat-status-off">○</span>'
            status = "disconnected"
        if connected and self._server is not None:
            link = "linked" if self._linked else "not linked: this server only"
            status += f" · server {html.escape(self._server)}, {link}"
        self.status_view.value = f"{dot} {status}"
        members = "".join(
            f'<div class="chat-member{" chat-own" if member == self._name else ""}">'
            f"{html.escape(member)}{self._server_html(member)}</div>"
            for member in self._members
        )
        if self._unlisted:
            members += f'<div class="chat-members-more">and {self._unlisted} more</div>'
        count = len(self._members) + self._unlisted
        title = f"Online ({count})" if connected else "Offline"
        if connected and self._rooms.room:
            title = f'<span class="chat-room">{html.escape(self._rooms.room)}</span> · {title}'

        self.members_view.value = f'<div class="chat-members-title">{title}</div>{members}'
        self.input.disabled = not connected
        self.send_button.disabled = not connected
        self.room_input.disabled = not connected
        self.join_button.disabled = not connected
        self.close_button.disabled = not connected

    def _server_html(self, member: str) -> str:
        server = self._servers.get(member)
        if server is None:
            return ""
        return f' <span class="chat-member-server">@{html.escape(server)}</span>'

    def _on_input(self, change: dict) -> None:
        # Clearing the box after a send changes its value too; that change
        # must not send anything.
        if not self._clearing_input and change["new"]:
            self._submit(self.input, self.send)

    def _on_send_click(self, _button: widgets.Button) -> None:
        self._submit(self.input, self.send)

    def _on_room_input(self, change: dict) -> None:
        if not self._clearing_input and change["new"]:
            self._submit(self.room_input, self.join)

    def _on_join_click(self, _button: widgets.Button) -> None:
        self._submit(self.room_input, self.join)

    def _submit(self, box: widgets.Text, act: Callable[[str], None]) -> None:
        """Hand what *box* holds to *act* (send it, or join it), once, and empty the box."""
        text = box.value
        if not text:
            return  # already handed over: Enter (or leaving the box) came first
        with self._lock:
            self._clearing_input = True
            try:
                box.value = ""
            finally:
                self._clearing_input = False
        if not text.strip():
            return
        try:
            act(text)
        except OSError as error:  # ConnectionError (not connected) is one too
            with self._lock:
                self._add_local_locked("error", f"Not sent: {error}.")
                self._render_locked()

    def _on_widget_comm(self, change: dict) -> None:
        if change["new"] is None:
            self.close()
            for part in self._parts:
                part.close()


# Every connection whose receiving thread still runs. A kernel shutting down
# runs atexit handlers (nbval's kill does not: notebooks end with a clean-up
# cell); a plain registry works where weakref finalizers may never run.
_open_sessions: set[_Session] = set()


@atexit.register
def _end_open_sessions(budget: float = 2.0) -> None:
    """End every open connection at exit, waiting *budget* seconds in all."""
    deadline = time.monotonic() + budget
    for session in list(_open_sessions):
        session.abandoned = True
        session.end(max(0.0, deadline - time.monotonic()))
    _open_sessions.clear()
