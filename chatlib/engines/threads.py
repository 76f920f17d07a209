"""The threaded engine: one thread reads from each client, one writes to it.

This is the classic design, made safe: a reader thread per client blocks in
``recv()`` as in any textbook chat server, but nobody ever blocks sending to
someone else. Each client also has a writer thread that sleeps until the
room queues something for it, then sends its whole backlog at once; a
client that stops reading only ever stalls its own writer, and the room
drops it once its queue passes the send-queue limit.

All calls into the room happen under one lock, so the room itself needs no
locking and every client sees the messages in the same order.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from chatlib.engines.base import ServerBase, peer_name
from chatlib.protocol import READ_SIZE
from chatlib.room import Connection, State

__all__ = ["ChatServer"]

#: How long a leaving client's writer may take to send its last lines.
LINGER = 1.0


class _Client:
    """The socket and the two threads that serve one connection."""

    def __init__(self, sock: socket.socket, lock: threading.Lock) -> None:
        self.sock = sock
        self.peer = peer_name(sock)
        #: Notified whenever the room has something new for this client.
        self.wakeup = threading.Condition(lock)
        self.reader: threading.Thread | None = None
        self.writer: threading.Thread | None = None


class ChatServer(ServerBase):
    """A chat server with a reader and a writer thread per client.

    Use it as a context manager (it serves in a background thread)::

        with ChatServer(port=0) as server:
            print(server.address)

    or call :meth:`serve_forever` in a thread of your own and :meth:`stop`
    from another.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self._clients: dict[Connection, _Client] = {}
        self._stopping = threading.Event()

    # --- Public methods -------------------------------------------------

    def serve_forever(self) -> None:
        """Accept clients until :meth:`stop` is called."""
        self._log_listening()
        try:
            while True:
                sock, _ = self._listener.accept()
                if self._stopping.is_set():
                    sock.close()  # the wake-up call from stop()
                    return
                self._accept(sock)
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
        if self._thread is None:
            self._listener.close()
        else:
            self._wake_acceptor()
            self._join_server_thread(LINGER)
        with self._lock:
            self.room.shut_down()
            self._act_on_ready()
            clients = list(self._clients.values())
        deadline = time.monotonic() + LINGER
        for client in clients:
            client.reader.join(max(0.0, deadline - time.monotonic()))
        # Whoever is left neither reads nor sends: cut them off.
        for client in clients:
            _shut_down(client.sock)
        for client in clients:
            client.reader.join(LINGER)

    # --- Private methods ------------------------------------------------

    def _accept(self, sock: socket.socket) -> None:
        # Chat lines are small and people wait for them: send each at once
        # instead of letting Nagle's algorithm hold it back for more.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = _Client(sock, self._lock)
        with self._lock:
            conn = self.room.connect(client.peer)
            self._clients[conn] = client
            client.reader = threading.Thread(target=self._read, args=(conn, client), daemon=True)
            client.writer = threading.Thread(target=self._write, args=(conn, client), daemon=True)
            client.reader.start()
            client.writer.start()
            self._act_on_ready()
        self._log_connected(client.peer)

    def _read(self, conn: Connection, client: _Client) -> None:
        """Feed the room what the client sends; the reader thread's body."""
        try:
            while conn.state is State.OPEN:
                data = client.sock.recv(READ_SIZE)
                with self._lock:
                    if data:
                        self.room.receive_data(conn, data, time.monotonic())
                    else:
                        self.room.receive_eof(conn, time.monotonic())
                    self._act_on_ready()
                if not data:
                    break
                self._wait_while_throttled(conn)
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
                self._act_on_ready()

    def _write(self, conn: Connection, client: _Client) -> None:
        """Send the client its backlog whenever there is one; the writer's body."""
        try:
            while True:
                with self._lock:
                    data = conn.data_to_send()
                    while not data and conn.state is State.OPEN:
                        client.wakeup.wait()
                        data = conn.data_to_send()
                if not data:
                    break  # CLOSING and all written, or CLOSED
                client.sock.sendall(data)
        except OSError:
            pass
        # Wake the reader if it is still blocked in recv(): on Linux,
        # close() from another thread would not.
        _shut_down(client.sock)

    def _finish(self, conn: Connection, client: _Client) -> None:
        """Close the client's connection once both its threads are done."""
        client.writer.join(LINGER)
        if client.writer.is_alive():
            _shut_down(client.sock)  # a client that reads nothing keeps sendall() blocked
            client.writer.join()
        with self._lock:
            del self._clients[conn]
            self.room.connection_lost(conn)
            self._act_on_ready()
        client.sock.close()
        self._log_disconnected(client.peer)

    def _act_on_ready(self) -> None:
        """Wake the writers of clients with news; cut off the dropped ones."""
        for conn in self.room.take_ready():
            client = self._clients.get(conn)
            if client is not None:
                client.wakeup.notify()
                if conn.state is State.CLOSED:
                    _shut_down(client.sock)

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
