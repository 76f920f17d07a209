"""The threaded engine: a reader thread per client, and one sender for all.

This is the classic design, made safe and fast. As in any textbook chat
server, each client has a thread that blocks in ``recv()`` and hands what
arrives to the room. But no thread ever waits to send to someone else:

- one *sender* thread writes out what the room queued, to every client that
  has news, with sends that never block. While it works, more lines pile up,
  and the next round sends each client all of them in one ``send()``;
- what the kernel will not take at once (the client is slow, or not reading)
  goes to that client's own *writer* thread, which may block in
  ``sendall()``: that delays this one client, whose lines meanwhile pile up
  in the room until the send-queue limit drops it.

All calls into the room happen under one lock, so the room itself needs no
locking and every client sees the messages in the same order.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from chatlib.engines.base import (
    ACCEPT_RETRY_DELAY,
    LINGER,
    ServerBase,
    out_of_resources,
    set_nodelay,
)
from chatlib.protocol import READ_SIZE
from chatlib.room import Connection, State

__all__ = ["ChatServer"]

# A send that returns at once with what the kernel takes, even on a
# blocking socket. Windows has no such flag: there every write goes through
# the client's writer thread, which is correct, only slower.
_DONT_WAIT = getattr(socket, "MSG_DONTWAIT", 0)


class _Client:
    """The socket of one connection, its two threads, and who writes to it."""

    def __init__(self, sock: socket.socket, peer: tuple[str, int], lock: threading.Lock) -> None:
        self.sock = sock
        self.peer = peer
        #: Notified when the writer has work, or must stop.
        self.wakeup = threading.Condition(lock)
        self.reader: threading.Thread | None = None
        self.writer: threading.Thread | None = None
        #: Whether the writer thread owns this client's output for now, and
        #: what it must send first. The sender leaves such a client alone.
        self.slow = False
        self.unsent = b""
        #: Set once the reader has stopped, so the writer stops waiting too.
        self.reader_done = False


class ChatServer(ServerBase):
    """A chat server with a reader and a writer thread per client, and a sender.

    Use it as a context manager (it serves in a background thread)::

        with ChatServer(port=0) as server:
            print(server.address)

    or call :meth:`serve_forever` in a thread of your own and :meth:`stop`
    from another.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        #: Notified whenever the room may have news for the sender.
        self._news = threading.Condition(self._lock)
        self._clients: dict[Connection, _Client] = {}
        self._sender: threading.Thread | None = None
        self._stopping = threading.Event()

    # --- Public methods -------------------------------------------------

    def serve_forever(self) -> None:
        """Accept clients until :meth:`stop` is called."""
        self._sender = threading.Thread(target=self._send, daemon=True)
        self._sender.start()
        self._log_listening()
        try:
            while True:
                try:
                    sock, address = self._listener.accept()
                except OSError as error:
                    if self._stopping.is_set():
                        raise
                    if out_of_resources(error):
                        self._log_accept_paused(error)
                        self._stopping.wait(ACCEPT_RETRY_DELAY)
                    continue  # otherwise that client gave up before we got to it
                if self._stopping.is_set():
                    sock.close()  # the wake-up call from stop()
                    return
                self._accept(sock, address)
        except OSError:
            if not self._stopping.is_set():
                raise
        finally:
            self._listener.close()

    def stop(self) -> None:
        """Say goodbye to every client, close every socket, end every thread."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        # serve_forever() may run in our background thread, in a thread of
        # the caller's, or not at all: wake it wherever it is, then make
        # sure the listener is closed.
        self._wake_acceptor()
        self._join_server_thread(LINGER)
        self._listener.close()
        with self._lock:
            self.room.shut_down()
            self._news.notify()
            clients = list(self._clients.values())
        # One deadline for all: joining thousands of clients one by one,
        # each with its own timeout, would take forever.
        deadline = time.monotonic() + LINGER
        for client in clients:
            client.reader.join(max(0.0, deadline - time.monotonic()))
        # Whoever is left neither reads nor sends: cut them off.
        for client in clients:
            _shut_down(client.sock)
        deadline = time.monotonic() + LINGER
        for client in clients:
            client.reader.join(max(0.0, deadline - time.monotonic()))
        if self._sender is not None:
            with self._lock:
                self._news.notify()  # nothing left to send: the sender sees _stopping
            self._sender.join(LINGER)

    # --- Private methods ------------------------------------------------

    def _accept(self, sock: socket.socket, address: tuple) -> None:
        set_nodelay(sock)
        # The address accept() returned, not getpeername(): that fails once
        # a client has reset the connection before we accepted it.
        client = _Client(sock, address[:2], self._lock)
        with self._lock:
            conn = self.room.connect(client.peer)
            self._clients[conn] = client
            client.reader = threading.Thread(target=self._read, args=(conn, client), daemon=True)
            client.writer = threading.Thread(target=self._write, args=(conn, client), daemon=True)
            # The writer first: a reader that fails at once joins it in _finish.
            client.writer.start()
            client.reader.start()
            self._news.notify()
        self._log_connected(client.peer)

    def _read(self, conn: Connection, client: _Client) -> None:
        """Feed the room what the client sends; the reader thread's body."""
        try:
            while True:
                data = client.sock.recv(READ_SIZE)
                if conn.state is not State.OPEN:
                    # It has had its goodbye: drop what it still sends until
                    # it ends. Closing with input unread would send a reset,
                    # which can destroy the goodbye before it is read.
                    if not data:
                        break
                    continue
                with self._lock:
                    if data:
                        self.room.receive_data(conn, data, time.monotonic())
                    else:
                        self.room.receive_eof(conn, time.monotonic())
                    self._news.notify()
                # Even after the end of the stream: its last lines may wait.
                self._wait_while_throttled(conn)
                if not data:
                    break
        except OSError:
            pass  # reset by the peer, or shut down by us: either way, done
        self._finish(conn, client)

    def _wait_while_throttled(self, conn: Connection) -> None:
        # This thread serves only this client, so making it sleep delays
        # nobody else, and TCP pushes back on the flooder while we do.
        while conn.resume_at is not None:
            if self._stopping.wait(conn.resume_at - time.monotonic()):
                return
            with self._lock:
                self.room.resume(conn, time.monotonic())
                self._news.notify()

    def _send(self) -> None:
        """Write out what the room queues, round after round; the sender's body."""
        while True:
            with self._lock:
                while not (ready := self.room.take_ready()):
                    if self._stopping.is_set() and not self._clients:
                        return
                    self._news.wait()
                output = self._act_on_ready(ready)
            # Outside the lock: readers go on feeding the room meanwhile,
            # and their lines make up the next round.
            for client, data in output:
                self._send_now(client, data)

    def _send_now(self, client: _Client, data: bytes) -> None:
        """Send what the kernel takes at once; hand the rest to the client's writer."""
        try:
            sent = client.sock.send(data, _DONT_WAIT) if _DONT_WAIT else 0
        except BlockingIOError:
            sent = 0
        except OSError:
            _shut_down(client.sock)  # the reader sees it and finishes the client
            return
        if sent < len(data):
            with self._lock:
                self._hand_to_writer(client, data[sent:])

    def _write(self, conn: Connection, client: _Client) -> None:
        """Send what the sender could not, blocking if need be; the writer's body."""
        try:
            while True:
                with self._lock:
                    # A leaving client may still read: wait for the sender to
                    # hand over its goodbye. A reset one gets nothing more.
                    client.wakeup.wait_for(
                        lambda: (
                            client.slow
                            or conn.state is State.CLOSED
                            or (client.reader_done and conn.state is State.OPEN)
                        )
                    )
                    if not client.slow or conn.state is State.CLOSED:
                        break
                    # Only now take more from the room: what waits there
                    # counts against the send queue, what we hold does not.
                    data = client.unsent + conn.data_to_send()
                    client.unsent = b""
                    if not data:
                        if conn.state is State.CLOSING:
                            break
                        client.slow = False  # all sent: the sender takes over again
                        continue
                client.sock.sendall(data)
            if conn.state is State.CLOSING:
                self._close_gracefully(client)
        except OSError:
            pass
        # Wake the reader if it is still blocked in recv(): on Linux,
        # close() from another thread would not.
        _shut_down(client.sock)

    def _close_gracefully(self, client: _Client) -> None:
        """Send our end of the stream and give the client LINGER seconds to end its own."""
        client.sock.shutdown(socket.SHUT_WR)
        with self._lock:
            client.wakeup.wait_for(lambda: client.reader_done, LINGER)

    def _finish(self, conn: Connection, client: _Client) -> None:
        """Close the client's connection once both its threads are done."""
        with self._lock:
            # After a reset the client is still OPEN: nothing else would
            # wake its writer.
            client.reader_done = True
            client.wakeup.notify()
        client.writer.join(LINGER)
        if client.writer.is_alive():
            _shut_down(client.sock)  # a client that reads nothing keeps sendall() blocked
            client.writer.join()
        with self._lock:
            del self._clients[conn]
            self.room.connection_lost(conn)
            self._news.notify()
        client.sock.close()
        self._log_disconnected(client.peer)

    def _act_on_ready(self, ready: list[Connection]) -> list[tuple[_Client, bytes]]:
        """Take the backlog of every client with news; cut off the dropped ones.

        Runs under the lock. Returns what the sender should write; leaving
        clients go to their writers, which end them once all is sent.
        """
        output = []
        for conn in ready:
            client = self._clients.get(conn)
            if client is None:
                continue  # gone already
            if conn.state is State.CLOSED:
                # Dropped: wake its writer, even from inside sendall().
                _shut_down(client.sock)
                client.wakeup.notify()
            elif client.slow:
                continue  # its writer takes the backlog when it can
            elif conn.state is State.CLOSING:
                self._hand_to_writer(client, conn.data_to_send())
            elif data := conn.data_to_send():
                output.append((client, data))
        return output

    def _hand_to_writer(self, client: _Client, unsent: bytes) -> None:
        client.slow = True
        client.unsent = unsent
        client.wakeup.notify()

    def _wake_acceptor(self) -> None:
        # accept() has no portable way to be interrupted from another
        # thread (close() does not do it on Linux), so connect to ourselves.
        host, port = self.address
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        try:
            socket.create_connection((host, port), timeout=1).close()
        except OSError:
            self._listener.close()


def _shut_down(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already shut down, or the peer is gone
        sock.shutdown(socket.SHUT_RDWR)
