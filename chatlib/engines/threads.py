"""The threaded engine: a reader thread per client, and one sender for all.

This is the classic design, made safe and fast. As in any textbook chat
server, each client has a thread that blocks in ``recv()`` and hands what
arrives to the chat. But no thread ever waits to send to someone else:

- one *sender* thread writes out what the chat queued, to every client that
  has news, with sends that never block. While it works, more lines pile up,
  and the next round sends each client all of them in one ``send()``. A
  reader that has fed the chat a read's worth in one round waits for that
  round to be sent before it reads again, so a flooder cannot outrun the
  sender;
- what the kernel will not take at once (the client is slow, or not reading)
  goes to that client's own *writer* thread, started the first time it is
  needed, which may block in ``sendall()``: that delays this one client,
  whose lines meanwhile pile up in the chat until the send-queue limit drops
  it. A client that keeps up costs one thread, its reader;
- the sender also keeps every connection's deadline: it cuts off a leaving
  client still there when it passes, so no thread waits without a bound,
  and it lets the chat close idle clients whose readers wait in ``recv()``;
- the *acceptor* answers a full server's refusals itself, with a selector,
  so a client turned away costs no thread of its own (Apache's event MPM
  hands its lingering closes to its listener thread the same way).

All calls into the chat happen under one lock, so the chat itself needs no
locking and every client sees the messages in the same order.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import selectors
import socket
import threading
import time
from collections.abc import Callable

from chatlib.chat import LINGER, Connection, State
from chatlib.engines.base import (
    ACCEPT_RETRY_DELAY,
    NO_SIGNAL,
    ServerBase,
    log,
    out_of_resources,
    reset_on_close,
    set_keepalive,
    set_nodelay,
)
from chatlib.protocol import READ_SIZE
from chatlib.trace import Accepted, Closed, Ready, Received, Sent

__all__ = ["ChatServer"]

# A send that returns at once with what the kernel takes, even on a
# blocking socket. Windows has no such flag: there every write goes through
# the client's writer thread, which is correct, only slower.
_DONT_WAIT = getattr(socket, "MSG_DONTWAIT", 0)


class _Client:
    """The socket of one connection, its two threads, and who writes to it."""

    __slots__ = (
        "peer",
        "read_round",
        "read_this_round",
        "reader",
        "sending",
        "slow",
        "sock",
        "timer_at",
        "unsent",
        "wakeup",
        "writer",
    )

    def __init__(self, sock: socket.socket, peer: tuple[str, int], lock: threading.Lock) -> None:
        self.sock = sock
        self.peer = peer
        #: Notified when the connection's state or deadline may have changed,
        #: when its writer has work, and when the sender is done with it.
        self.wakeup = threading.Condition(lock)
        self.reader: threading.Thread | None = None
        #: Started by the sender the first time the kernel refuses part of a send.
        self.writer: threading.Thread | None = None
        #: Whether the writer thread owns this client's output for now, and
        #: what it must send first. The sender leaves such a client alone.
        self.slow = False
        self.unsent = b""
        #: Set while the sender writes to the socket: nobody closes it meanwhile.
        self.sending = False
        #: The deadline the sender keeps for it, so that each is kept once.
        self.timer_at: float | None = None
        #: How many bytes its reader fed the chat for the sender's round
        #: ``read_round``: past one read's worth, it waits for that round.
        self.read_round = -1
        self.read_this_round = 0


class ChatServer(ServerBase):
    """A chat server with a reader thread per client (and a writer for slow ones), and a sender.

    Use it as a context manager (it serves in a background thread)::

        with ChatServer(port=0) as server:
            print(server.address)

    or call :meth:`serve_forever` in a thread of your own and :meth:`stop`
    from another.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._listener.setblocking(False)
        self._lock = threading.Lock()
        #: Notified whenever the chat may have news for the sender.
        self._news = threading.Condition(self._lock)
        #: Notified when the sender has finished a round.
        self._round_sent = threading.Condition(self._lock)
        self._round = 0  # the round that takes what the chat queues now
        self._rounds_sent = -1
        self._clients: dict[Connection, _Client] = {}
        # (deadline, tie-breaker, connection), earliest first.
        self._deadlines: list[tuple[float, int, Connection]] = []
        self._deadline_ids = itertools.count()
        # The acceptor's selector: the listener, the wake-up socket, and the
        # clients it turned away, until they end their side or time out.
        self._selector = selectors.DefaultSelector()
        self._turned_away: dict[socket.socket, Connection] = {}
        self._wakeup, self._wakeup_sender = socket.socketpair()
        self._wakeup.setblocking(False)
        self._wakeup_sender.setblocking(False)
        self._sender: threading.Thread | None = None
        self._stopping = threading.Event()
        self._acceptor_done = threading.Event()

    # --- Public methods -------------------------------------------------

    def serve_forever(self) -> None:
        """Accept clients until :meth:`stop` is called."""
        if self._stopping.is_set():
            return  # stop() came first and closed everything
        self._sender = threading.Thread(target=self._send, daemon=True)
        self._sender.start()
        if self.link is not None:
            self.link.start()
        self._log_listening()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wakeup, selectors.EVENT_READ)
        try:
            while not self._stopping.is_set():
                for key, _ in self._selector.select(self._time_to_next_refusal_deadline()):
                    if key.fileobj is self._listener:
                        self._accept_waiting()
                    elif key.fileobj is self._wakeup:
                        self._wakeup.recv(64)  # stop() woke us
                    else:
                        self._drain_turned_away(key.fileobj)
                self._close_late_turned_away()
        finally:
            for sock in list(self._turned_away):
                self._close_turned_away(sock)
            self._close_door()
            self._acceptor_done.set()

    def stop(self) -> None:
        """Say goodbye to every client, close every socket, end every thread."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        # serve_forever() may run in our background thread, in a thread of
        # the caller's, or not at all: wake it wherever it is.
        with contextlib.suppress(OSError):
            self._wakeup_sender.send(b"\0")
        if self._sender is None:
            self._close_door()  # serve_forever() never ran, and now never will
            return
        # It admits nobody once _stopping is set, so the goodbye below
        # reaches every member.
        self._acceptor_done.wait(LINGER)
        with self._lock:
            self.chat.shut_down(time.monotonic())
            self._news.notify()
            clients = list(self._clients.values())
        # Every leaving client has a deadline of LINGER, which the sender
        # keeps; the margin is for a machine that runs late. One deadline
        # for all: joining thousands one by one would take forever.
        deadline = time.monotonic() + 2 * LINGER
        for client in clients:
            if client.reader is not None:  # None: its start failed, and it is gone
                client.reader.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._news.notify()  # nothing left to send: the sender sees _stopping
        self._sender.join(LINGER)
        if self.link is not None:
            self.link.stop()  # after the goodbye, which it publishes first

    # --- Private methods ------------------------------------------------

    def _accept(self, sock: socket.socket, address: tuple) -> None:
        set_nodelay(sock)
        set_keepalive(sock)
        # Blocking, whatever socket.setdefaulttimeout() an application set:
        # a timeout would drop idle clients.
        sock.settimeout(None)
        # The address accept() returned, not getpeername(): that fails once
        # a client has reset the connection before we accepted it.
        client = _Client(sock, address[:2], self._lock)
        with self._lock:
            if self._stopping.is_set():
                # Accepted just as we stopped: stop() says goodbye to the chat
                # once we are done here, and this one would miss it.
                sock.close()
                return
            conn = self.chat.connect(client.peer, time.monotonic())
            if self._trace is not None:
                self._trace(Accepted(client.peer))
            turned_away = conn.state is not State.OPEN
            if not turned_away:
                self._clients[conn] = client
                client.reader = self._start_thread(conn, client, self._read)
                self._news.notify()
        self._log_connected(client.peer)
        if turned_away:
            self._turn_away(conn, sock)
        elif client.reader is None:
            self._finish(conn, client)  # refused: no thread would ever finish it

    def _start_thread(
        self, conn: Connection, client: _Client, body: Callable[[Connection, _Client], None]
    ) -> threading.Thread | None:
        """Start *body* for the client in a thread; on failure, cut the client off.

        Runs under the lock, which also keeps the sender from writing the
        welcome before a new member's reader runs: whoever reads it may count.
        """
        thread = threading.Thread(target=body, args=(conn, client), daemon=True)
        try:
            thread.start()
        except RuntimeError as error:  # "can't start new thread": only this client pays
            log.warning("[REFUSED] %s: %s.", client.peer, error)
            self.chat.connection_lost(conn)
            return None
        return thread

    def _read(self, conn: Connection, client: _Client) -> None:
        """Feed the chat what the client sends; the reader thread's body."""
        try:
            while True:
                with self._lock:
                    if conn.state is State.CLOSED:
                        break
                    if not conn.reading:
                        # Over its flood budget, or past its end of stream:
                        # wait for the deadline (this thread serves only this
                        # client, and TCP pushes back on it meanwhile), or
                        # for the goodbye to go out.
                        timeout = (
                            None if conn.deadline is None else conn.deadline - time.monotonic()
                        )
                        if timeout is None or timeout > 0:
                            client.wakeup.wait(timeout)
                        else:
                            self.chat.deadline_reached(conn, time.monotonic())
                            self._news.notify()
                        continue
                data = client.sock.recv(READ_SIZE)
                with self._lock:
                    if self._trace is not None:
                        # Each reader waits on its own socket: one at a time.
                        self._trace(Ready((client.peer,)))
                        self._trace(Received(client.peer, data))
                    if conn.state is State.CLOSED:
                        break  # cut off while we waited: there is nobody to tell
                    if data:
                        self.chat.receive_data(conn, data, time.monotonic())
                    else:
                        self.chat.receive_eof(conn, time.monotonic())
                    self._news.notify()
                    if client.read_round != self._round:
                        client.read_round, client.read_this_round = self._round, 0
                    client.read_this_round += len(data)
                    if client.read_this_round >= READ_SIZE:
                        # Read no more until the sender has offered what this
                        # round took from us to the kernel: what the chat
                        # holds stays bounded (about one read's fan-out per
                        # reader), and the sender cannot be outrun. A client
                        # that types never waits here.
                        this_round = self._round
                        self._round_sent.wait_for(lambda r=this_round: self._rounds_sent >= r)
        except OSError:
            with self._lock:  # reset by the peer, or cut off by us
                self.chat.connection_lost(conn)
                self._news.notify()
        self._finish(conn, client)

    def _send(self) -> None:
        """Write out what the chat queues, round after round; the sender's body."""
        while True:
            with self._lock:
                while not (ready := self.chat.take_ready()):
                    # Nothing waits to be sent: the round under way is done.
                    self._rounds_sent = self._round
                    self._round += 1
                    self._round_sent.notify_all()
                    if self._stopping.is_set() and not self._clients:
                        return
                    if not self._reach_deadlines():
                        self._news.wait(self._time_to_next_deadline())
                output = self._act_on_ready(ready)
                this_round = self._round
                self._round += 1
            # Outside the lock: readers go on feeding the chat meanwhile,
            # and their lines make up the next round.
            for conn, client, data, last in output:
                self._send_now(conn, client, data, last)
            with self._lock:
                for conn, client, _, _ in output:
                    client.sending = False
                    if conn.state is State.CLOSED:
                        client.wakeup.notify_all()  # _finish() waits to close the socket
                self._rounds_sent = this_round
                self._round_sent.notify_all()

    def _send_now(self, conn: Connection, client: _Client, data: bytes, last: bool) -> None:
        """Send what the kernel takes at once; hand the rest to the client's writer.

        *last* says that *data* ends with the goodbye: once it is all sent,
        our side of the stream ends.
        """
        try:
            sent = client.sock.send(data, _DONT_WAIT | NO_SIGNAL) if _DONT_WAIT and data else 0
            if self._trace is not None and sent:
                self._trace(Sent(client.peer, data[:sent]))
            if sent == len(data) and last:
                self._end_our_side(conn, client)
                return
        except BlockingIOError:
            sent = 0
        except OSError:
            with self._lock:  # reset by the peer, or a broken pipe
                self.chat.connection_lost(conn)
            return
        if sent < len(data):
            with self._lock:
                client.slow = True
                client.unsent = data[sent:]
                self.chat.data_unsent(conn, len(client.unsent))
                if client.writer is None and conn.state is not State.CLOSED:
                    client.writer = self._start_thread(conn, client, self._write)
                client.wakeup.notify_all()

    def _write(self, conn: Connection, client: _Client) -> None:
        """Send what the sender could not, blocking if need be; the writer's body."""
        try:
            while True:
                with self._lock:
                    client.wakeup.wait_for(lambda: client.slow or conn.state is State.CLOSED)
                    if conn.state is State.CLOSED:
                        return
                    # Only now take more from the chat, so that a client that
                    # does not read costs one backlog here at most.
                    data = client.unsent + conn.data_to_send()
                    client.unsent = b""
                    self.chat.data_unsent(conn, len(data))
                    if conn.state is State.CLOSED:
                        return  # that backlog was past the send queue
                    if not data and conn.state is State.OPEN:
                        client.slow = False  # all sent: the sender takes over again
                        continue
                if data:
                    # A deadline bounds this: once the client is leaving, the
                    # sender cuts it off then, which ends sendall() at once.
                    client.sock.sendall(data, NO_SIGNAL)
                    if self._trace is not None:
                        self._trace(Sent(client.peer, data))
                else:
                    self._end_our_side(conn, client)
                    return
        except OSError:
            with self._lock:
                self.chat.connection_lost(conn)
                self._news.notify()

    def _end_our_side(self, conn: Connection, client: _Client) -> None:
        """Send our end of the stream after the goodbye; the client reads it all first."""
        try:
            client.sock.shutdown(socket.SHUT_WR)
        except OSError:
            with self._lock:
                self.chat.connection_lost(conn)  # the peer is gone already
                self._news.notify()
            return
        with self._lock:
            self.chat.eof_sent(conn)
            self._news.notify()

    def _finish(self, conn: Connection, client: _Client) -> None:
        """Close a ``CLOSED`` connection's socket once nobody uses it, and forget it."""
        # Wake the writer wherever it is, even inside sendall(): on Linux,
        # close() from another thread would not.
        _cut(client.sock)
        with self._lock:
            # Once the sender is done with it, nobody starts a writer for a
            # CLOSED connection: this is the last one it will ever have.
            client.wakeup.wait_for(lambda: not client.sending)
            writer = client.writer
        if writer is not None:
            writer.join()
        with self._lock:
            del self._clients[conn]
            if not self._clients and self._stopping.is_set():
                self._news.notify()  # the sender may stop once the last one is gone
        if conn.cut_off:
            reset_on_close(client.sock)
        client.sock.close()
        if self._trace is not None:
            self._trace(Closed(client.peer, conn.cut_off))
        self._log_disconnected(client.peer)

    def _act_on_ready(
        self, ready: list[Connection]
    ) -> list[tuple[Connection, _Client, bytes, bool]]:
        """Carry out what the chat decided for every connection with news.

        Runs under the lock. Returns what the sender should write; a slow
        client's writer takes its backlog itself.
        """
        output = []
        for conn in ready:
            client = self._clients.get(conn)
            if client is None:
                continue  # finished already, or turned away at the door
            if conn.state is not State.OPEN:
                # Its reader or writer may wait for the way out to go on.
                client.wakeup.notify_all()
            if conn.state is State.CLOSED:
                _cut(client.sock)  # the reader and the writer wake, and finish it
                continue
            # The reader keeps a flood deadline itself; the sender keeps them
            # all, for the idle timeout of a reader blocked in recv().
            if conn.deadline is not None and conn.deadline != client.timer_at:
                client.timer_at = conn.deadline
                heapq.heappush(self._deadlines, (conn.deadline, next(self._deadline_ids), conn))
            if client.slow:
                continue  # its writer takes the backlog when it can
            data = conn.data_to_send()
            # Whether this is the goodbye is decided now, under the lock: a
            # client may leave while the sender writes its earlier lines.
            last = conn.state is State.CLOSING
            if data or last:
                client.sending = True
                output.append((conn, client, data, last))
        return output

    def _from_broker(self, news: str, *args: object) -> None:
        # From the link's threads, which may call the chat under the lock as readers do.
        with self._lock:
            self._tell_chat(news, args, time.monotonic())
            self._news.notify()

    def _reach_deadlines(self) -> bool:
        """Tell the chat about every deadline that has passed; return whether any had."""
        now = time.monotonic()
        passed = False
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, conn = heapq.heappop(self._deadlines)
            self.chat.deadline_reached(conn, now)
            passed = True
        return passed

    def _time_to_next_deadline(self) -> float | None:
        if not self._deadlines:
            return None
        return max(0.0, self._deadlines[0][0] - time.monotonic())

    # --- The door: accepting, and turning away -----------------------------

    def _accept_waiting(self) -> None:
        """Accept every client waiting in the listener's backlog."""
        while not self._stopping.is_set():
            try:
                sock, address = self._listener.accept()
            except BlockingIOError:
                return  # the backlog is empty
            except OSError as error:
                if out_of_resources(error):
                    # The listener stays readable: wait a while instead of spinning.
                    self._log_accept_paused(error)
                    self._stopping.wait(ACCEPT_RETRY_DELAY)
                return  # otherwise that client gave up before we got to it
            self._accept(sock, address)

    def _turn_away(self, conn: Connection, sock: socket.socket) -> None:
        """Send a client the chat refused its line and our end of stream, and drain it."""
        sock.setblocking(False)
        try:
            # A fresh socket's buffer always takes one short line.
            refusal = conn.data_to_send()
            sent = sock.send(refusal, NO_SIGNAL)
            if self._trace is not None and sent:
                self._trace(Sent(conn.peer, refusal[:sent]))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            with self._lock:
                self.chat.connection_lost(conn)
        else:
            with self._lock:
                self.chat.eof_sent(conn)
        self._turned_away[sock] = conn
        if conn.state is State.CLOSED:
            self._close_turned_away(sock)
        else:
            self._selector.register(sock, selectors.EVENT_READ)

    def _drain_turned_away(self, sock: socket.socket) -> None:
        """Read and drop what a turned-away client sends, until it ends its side."""
        conn = self._turned_away[sock]
        try:
            data = sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""  # reset: as good as ended
        else:
            if self._trace is not None:
                self._trace(Ready((conn.peer,)))
                self._trace(Received(conn.peer, data))
        if not data:
            with self._lock:
                self.chat.receive_eof(conn, time.monotonic())
            self._close_turned_away(sock)

    def _close_late_turned_away(self) -> None:
        now = time.monotonic()
        late = [sock for sock, conn in self._turned_away.items() if conn.deadline <= now]
        for sock in late:
            with self._lock:
                self.chat.deadline_reached(self._turned_away[sock], now)
            self._close_turned_away(sock)

    def _close_turned_away(self, sock: socket.socket) -> None:
        conn = self._turned_away.pop(sock)
        with contextlib.suppress(KeyError):
            self._selector.unregister(sock)
        cut_off = conn.cut_off or conn.state is not State.CLOSED
        if cut_off:
            reset_on_close(sock)
        sock.close()
        if self._trace is not None:
            self._trace(Closed(conn.peer, cut_off))
        self._log_disconnected(conn.peer)

    def _time_to_next_refusal_deadline(self) -> float | None:
        if not self._turned_away:
            return None
        earliest = min(conn.deadline for conn in self._turned_away.values())
        return max(0.0, earliest - time.monotonic())

    def _close_door(self) -> None:
        self._selector.close()
        self._listener.close()
        self._wakeup.close()
        self._wakeup_sender.close()


def _cut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already shut down, or the peer is gone
        sock.shutdown(socket.SHUT_RDWR)
