"""The selectors engine: one thread waits on every client at once.

This is the classic ``select()`` chat server, and what asyncio does
underneath. Every socket is non-blocking and registered with a selector;
one thread asks it which sockets are ready, reads from those that have data,
and only then, once per turn of the loop, writes to every client the chat
has news for: each gets its whole backlog in one ``send()``, however many
lines arrived for it during the turn.

Whatever the kernel does not take stays in the client's ``unsent`` buffer
until its socket is writable again, and nothing more is taken from the chat
meanwhile: a client that stops reading makes its backlog grow in the chat,
which drops it once the two together pass the send-queue limit.

Only this thread calls the chat, so the chat needs no lock; in exchange,
nothing here may block, or every client waits.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable

from chatlib.chat import LINGER, Connection, State
from chatlib.engines.base import (
    ACCEPT_RETRY_DELAY,
    NO_SIGNAL,
    ServerBase,
    out_of_resources,
    reset_on_close,
    set_keepalive,
    set_nodelay,
)
from chatlib.protocol import READ_SIZE
from chatlib.trace import Accepted, Closed, Ready, Received, Sent

__all__ = ["ChatServer"]

_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


class _Client:
    """The socket of one connection, and what the kernel has not taken yet."""

    __slots__ = ("events", "peer", "sock", "timer_at", "unsent")

    def __init__(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        self.sock = sock
        self.peer = peer
        #: The part of the last backlog that ``send()`` did not take.
        self.unsent: bytes | memoryview = b""
        #: What the selector watches this socket for; 0 when unregistered.
        self.events = 0
        #: The deadline a timer is set for, so that each is set once.
        self.timer_at: float | None = None


class ChatServer(ServerBase):
    """A chat server with one thread and a hand-written event loop.

    Use it as a context manager (it serves in a background thread)::

        with ChatServer(port=0) as server:
            print(server.address)

    or call :meth:`serve_forever` in a thread of your own and :meth:`stop`
    from another.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._listener.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._clients: dict[Connection, _Client] = {}
        # (when, tie-breaker, callback, args), earliest first: the chat's
        # deadlines and the accept retry. The tie-breaker keeps heapq from
        # ever comparing two callbacks.
        self._timers: list[tuple[float, int, Callable[..., None], tuple]] = []
        self._timer_ids = itertools.count()
        # stop() writes a byte to the first socket, which select() watches.
        # A socket pair rather than os.pipe(): Windows selects on sockets only.
        self._wakeup, self._wakeup_sender = socket.socketpair()
        self._wakeup.setblocking(False)
        self._wakeup_sender.setblocking(False)
        # What the broker link said, for the loop to tell the chat: (news, args).
        self._broker_news: deque[tuple[str, tuple]] = deque()
        # serve_forever() and stop() agree under this lock on who closes the
        # sockets, even when stop() comes first.
        self._lock = threading.Lock()
        self._serving = False
        self._stopping = threading.Event()
        self._stopped = threading.Event()

    # --- Public methods -------------------------------------------------

    def serve_forever(self) -> None:
        """Serve clients until :meth:`stop` is called."""
        with self._lock:
            if self._stopping.is_set():
                return  # stop() came first and closed everything
            self._serving = True
        self._log_listening()
        self._selector.register(self._listener, _READ)
        self._selector.register(self._wakeup, _READ)
        if self.link is not None:
            self.link.start()
        try:
            while not self._stopping.is_set():
                self._run_once(self._time_to_next_timer())
            # Stop accepting and say goodbye. Every leaving client has a
            # deadline, so the loop ends within LINGER; it goes on sending
            # and closing meanwhile.
            self._selector.unregister(self._wakeup)
            with contextlib.suppress(KeyError):  # not registered while paused
                self._selector.unregister(self._listener)
            self.chat.shut_down(time.monotonic())
            self._act_on_ready()
            while self._clients:
                self._run_once(self._time_to_next_timer())
        finally:
            # Only if the loop died: nobody must be left holding a socket.
            for conn, client in list(self._clients.items()):
                self.chat.connection_lost(conn)
                self._finish(conn, client)
            if self.link is not None:
                self.link.stop()  # after the goodbye, which it publishes first
            self._close()
            self._stopped.set()

    def stop(self) -> None:
        """Say goodbye to every client, close every socket, end the loop."""
        with self._lock:
            if self._stopping.is_set():
                return
            self._stopping.set()
            serving = self._serving
        if not serving:
            self._close()  # serve_forever() never ran, and now never will
            return
        self._wake_loop()
        self._stopped.wait(2 * LINGER)
        self._join_server_thread(LINGER)

    # --- Private methods ------------------------------------------------

    def _accept(self, sock: socket.socket, address: tuple) -> None:
        set_nodelay(sock)
        set_keepalive(sock)
        sock.setblocking(False)
        client = _Client(sock, address[:2])
        conn = self.chat.connect(client.peer, time.monotonic())
        self._clients[conn] = client
        if self._trace is not None:
            self._trace(Accepted(client.peer))
        self._log_connected(client.peer)

    def _read(self, conn: Connection, client: _Client) -> None:
        """Feed the chat what one ``recv()`` returns; the socket is readable."""
        try:
            data = client.sock.recv(READ_SIZE)
        except BlockingIOError:
            return  # nothing after all; select() will tell us again
        except OSError:
            self.chat.connection_lost(conn)  # reset by the peer
            return
        if self._trace is not None:
            self._trace(Received(client.peer, data))
        if data:
            self.chat.receive_data(conn, data, time.monotonic())
        else:
            self.chat.receive_eof(conn, time.monotonic())

    def _write(self, conn: Connection, client: _Client) -> None:
        """Send the client its backlog, as much as the kernel takes now.

        Called for each client the chat has news for, once per turn of the
        loop, and whenever a socket with unsent bytes becomes writable.
        """
        try:
            if client.unsent:
                client.unsent = self._send_some(client, client.unsent)
            if not client.unsent:
                # Only now take more from the chat, so that a client that
                # does not read costs one backlog here at most.
                client.unsent = self._send_some(client, conn.data_to_send())
        except OSError:
            self.chat.connection_lost(conn)  # reset by the peer, or a broken pipe
            return
        self.chat.data_unsent(conn, len(client.unsent))

    def _send_some(self, client: _Client, data: bytes | memoryview) -> bytes | memoryview:
        """Send what the kernel takes of *data* now; return the rest."""
        if not data:
            return b""
        try:
            sent = client.sock.send(data, NO_SIGNAL)
        except BlockingIOError:
            sent = 0
        if self._trace is not None and sent:
            self._trace(Sent(client.peer, bytes(data[:sent])))
        # A memoryview, so that the rest of a large backlog is never copied.
        return memoryview(data)[sent:] if sent < len(data) else b""

    def _end_our_side(self, conn: Connection, client: _Client) -> None:
        """Send our end of the stream after the goodbye; the client reads it all first."""
        try:
            client.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.chat.connection_lost(conn)  # the peer is gone already
            return
        self.chat.eof_sent(conn)

    def _finish(self, conn: Connection, client: _Client) -> None:
        """Close a ``CLOSED`` connection's socket and forget it."""
        del self._clients[conn]
        if client.events:
            self._selector.unregister(client.sock)  # before close(): it needs the fd
        if conn.cut_off:
            reset_on_close(client.sock)
        client.sock.close()
        if self._trace is not None:
            self._trace(Closed(client.peer, conn.cut_off))
        self._log_disconnected(client.peer)

    def _act_on_ready(self) -> None:
        """Carry out what the chat decided for every connection with news."""
        # Acting on one connection may give news to others (closing one
        # tells the rest): go on until there is none.
        while ready := self.chat.take_ready():
            for conn in ready:
                client = self._clients.get(conn)
                if client is not None:  # None: finished earlier in this batch
                    self._act_on(conn, client)

    def _act_on(self, conn: Connection, client: _Client) -> None:
        """Do what the connection's state asks for (see ``chatlib.chat.LIFECYCLE``)."""
        if conn.state is not State.CLOSED and not client.unsent:
            self._write(conn, client)
        # Otherwise _write takes the backlog once the socket drains.
        if conn.state is State.CLOSING and not client.unsent:
            self._end_our_side(conn, client)
        if conn.state is State.CLOSED:
            self._finish(conn, client)
            return
        if conn.deadline is not None and conn.deadline != client.timer_at:
            client.timer_at = conn.deadline
            self._call_at(conn.deadline, self._deadline_reached, conn, client)
        self._watch(conn, client)

    def _deadline_reached(self, conn: Connection, client: _Client) -> None:
        if conn in self._clients:  # the chat ignores deadlines that have moved
            self.chat.deadline_reached(conn, time.monotonic())

    def _from_broker(self, news: str, *args: object) -> None:
        # From the link's threads: queue it, and wake select() as stop() does.
        self._broker_news.append((news, args))
        self._wake_loop()

    def _drain_broker_news(self) -> None:
        while self._broker_news:
            news, args = self._broker_news.popleft()
            self._tell_chat(news, args, time.monotonic())

    def _wake_loop(self) -> None:
        # select() has no portable way to be interrupted from another
        # thread, but it returns as soon as one of its sockets is readable.
        # (If the send fails, the pair is full, so a wake-up is pending
        # anyway, or closed, so the loop is gone.)
        with contextlib.suppress(OSError):
            self._wakeup_sender.send(b"\0")

    # --- The event loop (what asyncio provides) ---------------------------

    def _run_once(self, timeout: float | None) -> None:
        """Wait up to *timeout* seconds for sockets, handle them, then write."""
        ready = self._selector.select(timeout)
        if self._trace is not None:
            # Clients only: the listener and the wake-up socket carry no data.
            peers = tuple(
                key.data.peer for key, events in ready if key.data is not None and events & _READ
            )
            self._trace(Ready(peers))
        for key, events in ready:
            if key.fileobj is self._listener:
                self._accept_waiting()
            elif key.fileobj is self._wakeup:
                self._wakeup.recv(64)  # stop() or the broker link woke us
                self._drain_broker_news()
            else:
                conn = key.data
                client = self._clients[conn]
                if events & _READ:
                    self._read(conn, client)
                if events & _WRITE and conn.state is not State.CLOSED:
                    self._write(conn, client)
                    self._act_on(conn, client)  # the chat has no news of this
        self._run_timers()
        self._act_on_ready()

    def _accept_waiting(self) -> None:
        """Accept every client waiting in the listener's backlog."""
        while True:
            try:
                sock, address = self._listener.accept()
            except BlockingIOError:
                return  # the backlog is empty
            except OSError as error:
                if out_of_resources(error):
                    # The listener stays readable: stop watching it a while.
                    self._log_accept_paused(error)
                    self._selector.unregister(self._listener)
                    when = time.monotonic() + ACCEPT_RETRY_DELAY
                    self._call_at(when, self._accept_again)
                return  # otherwise that client gave up before we got to it
            self._accept(sock, address)

    def _accept_again(self) -> None:
        if not self._stopping.is_set():
            self._selector.register(self._listener, _READ)

    def _watch(self, conn: Connection, client: _Client) -> None:
        """Tell the selector what to wait for on the client's socket now."""
        events = (_READ if conn.reading else 0) | (_WRITE if client.unsent else 0)
        if events == client.events:
            return
        if not client.events:
            self._selector.register(client.sock, events, conn)
        elif not events:
            self._selector.unregister(client.sock)
        else:
            self._selector.modify(client.sock, events, conn)
        client.events = events

    def _call_at(self, when: float, callback: Callable[..., None], *args: object) -> None:
        """Have the loop call ``callback(*args)`` at *when* (``time.monotonic()``)."""
        heapq.heappush(self._timers, (when, next(self._timer_ids), callback, args))

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, callback, args = heapq.heappop(self._timers)
            callback(*args)

    def _time_to_next_timer(self) -> float | None:
        """Return how long select() may wait: until the next timer, or forever."""
        if not self._timers:
            return None
        return max(0.0, self._timers[0][0] - time.monotonic())

    def _close(self) -> None:
        self._listener.close()
        self._selector.close()
        self._wakeup.close()
        self._wakeup_sender.close()
