"""The asyncio engine: one thread, asyncio's event loop, a protocol per client.

This is the selectors engine with the loop written for us. asyncio's loop
waits on a selector too, and calls a protocol object's methods when a
client's socket has data, when it ends, when the kernel stops or starts
taking what we write, and when it is closed; its transport keeps whatever
the kernel does not take yet. Protocol callbacks rather than streams: a
stream needs a task per client, parked in ``await reader.readline()``,
while a protocol is a small object with a few slots, so an idle client
costs little memory.

Writes are coalesced as in the selectors engine: a callback only feeds the
room and asks for one flush (``call_soon``) after everything else of this
turn of the loop, which gives each client its whole backlog in one
``transport.write()``. While a client's transport still holds bytes the
kernel has not taken, nothing more is taken from the chat for it, so its
backlog grows in the chat, which drops it past the send-queue limit.

Only the loop's thread calls the chat, so the chat needs no lock; in
exchange, no callback may block, or every client waits. The loop can be
one of its own, in a thread (:meth:`~ChatServer.serve_forever`, or the
``with`` block), or one that already runs, such as a JupyterLab kernel's
(``async with server:``, or :meth:`~ChatServer.start_serving` and
:meth:`~ChatServer.aclose`).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from types import TracebackType
from typing import Any

from chatlib.chat import LINGER, Connection, State
from chatlib.engines.base import (
    ACCEPT_RETRY_DELAY,
    ServerBase,
    out_of_resources,
    reset_on_close,
    set_keepalive,
    set_nodelay,
)
from chatlib.protocol import READ_SIZE
from chatlib.trace import Accepted, Closed, Ready, Received, Sent

__all__ = ["ChatServer"]


class _Client(asyncio.BufferedProtocol):
    """One connection: asyncio calls these methods when its socket has news.

    A buffered protocol rather than a plain one (``data_received``) so that
    we choose the read size, ``READ_SIZE`` as in the other engines, and
    every client reads into one buffer the server owns.
    """

    __slots__ = ("conn", "reading", "server", "timer", "transport", "writing_paused")

    def __init__(self, server: ChatServer) -> None:
        self.server = server
        self.conn: Connection | None = None
        self.transport: asyncio.Transport | None = None
        #: Set while the transport holds bytes the kernel has not taken.
        self.writing_paused = False
        #: Whether the transport is reading (asyncio starts it reading).
        self.reading = True
        #: The timer set for the connection's deadline, if any.
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.server._accept(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.server._read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.server._read(self.conn, self, nbytes)

    def eof_received(self) -> bool:
        self.server._read(self.conn, self, 0)
        return True  # keep the transport open: the client may read the goodbye

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.conn.state is not State.CLOSED:
            self.server._act_on(self.conn, self)  # the chat has no news of this

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None and self.conn.state is not State.CLOSED:
            # A reset, or a failed write: the chat decides what follows.
            self.server.chat.connection_lost(self.conn)
            self.server._act_on_ready_soon()


class ChatServer(ServerBase):
    """A chat server on asyncio's event loop, with a protocol per client.

    Use it as a context manager (it serves in a background thread)::

        with ChatServer(port=0) as server:
            print(server.address)

    or call :meth:`serve_forever` in a thread of your own and :meth:`stop`
    from another. On a loop that is already running, use it as an
    asynchronous context manager instead::

        async with ChatServer(port=0) as server:
            ...
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._clients: dict[Connection, _Client] = {}
        # One buffer for every read: each is handed to the chat (which
        # copies what it keeps) before the next one can start.
        self._read_buffer = memoryview(bytearray(READ_SIZE))
        self._act_scheduled = False
        # start_serving() and stop() agree under this lock on who closes the
        # listener, even when stop() comes first.
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._server: asyncio.Server | None = None
        self._shutdown: asyncio.Task | None = None
        self._closed: asyncio.Future | None = None
        self._all_gone: asyncio.Future | None = None
        self._previous_error_handler: Any = None
        self._accept_error_logged_at = float("-inf")
        self._accept_failed_at = float("-inf")

    # --- Public methods -------------------------------------------------

    def serve_forever(self) -> None:
        """Serve clients until :meth:`stop` is called, on a loop of its own.

        This blocks the calling thread; :meth:`start` runs it in a
        background thread.
        """
        asyncio.run(self._serve_until_stopped())

    def stop(self) -> None:
        """Say goodbye to every client, close every socket, end the loop.

        Call it from any thread but the loop's own: there, where it cannot
        wait without blocking the loop, it only starts the shutdown; use
        ``await server.aclose()`` instead.
        """
        with self._lock:
            if self._stopping.is_set():
                return
            self._stopping.set()
            loop = self._loop
        if loop is None:
            if self._thread is None:
                self._listener.close()  # never served, and now never will
        elif self._loop_thread == threading.get_ident():
            self._begin_shutdown()
            return
        else:
            loop.call_soon_threadsafe(self._begin_shutdown)
            self._stopped.wait(2 * LINGER)
        self._join_server_thread(LINGER)

    async def start_serving(self) -> None:
        """Start serving clients on the running loop, and return.

        The server serves in the background until :meth:`aclose`. If
        :meth:`stop` was called before, this does nothing.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._stopping.is_set():
                self._listener.close()
                return
            if self._loop is not None:
                raise RuntimeError("the server is serving already")
            self._loop = loop
            self._loop_thread = threading.get_ident()
        self._closed = loop.create_future()
        self._previous_error_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._handle_loop_error)
        self._server = await loop.create_server(
            lambda: _Client(self), sock=self._listener, start_serving=False
        )
        self._log_listening()
        await self._server.start_serving()
        if self.link is not None:
            self.link.start()

    async def aclose(self) -> None:
        """Say goodbye to every client, close every socket; return when done.

        Await it on the loop the server runs on.
        """
        with self._lock:
            self._stopping.set()
        if self._loop is None:
            self._listener.close()
            return
        self._begin_shutdown()
        await asyncio.shield(self._shutdown)

    async def __aenter__(self) -> ChatServer:
        await self.start_serving()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    # --- Private methods ------------------------------------------------

    def _accept(self, client: _Client) -> None:
        transport = client.transport
        peer = transport.get_extra_info("peername")
        if peer is None or self._stopping.is_set():
            # Reset before we got to it, or accepted just as we stopped.
            transport.abort()
            return
        # asyncio turns Nagle's algorithm off itself only for sockets whose
        # proto is IPPROTO_TCP, and socket.create_server() leaves it 0.
        set_nodelay(transport.get_extra_info("socket"))
        set_keepalive(transport.get_extra_info("socket"))
        # Pause writing as soon as the kernel refuses part of a write, as
        # the selectors engine keeps its "unsent" bytes: a slow client's
        # backlog then waits in the chat, which enforces the send queue.
        transport.set_write_buffer_limits(high=0)
        conn = self.chat.connect(peer[:2], self._loop.time())
        client.conn = conn
        self._clients[conn] = client
        if self._trace is not None:
            self._trace(Accepted(conn.peer))
        self._act_on_ready_soon()
        self._log_connected(conn.peer)

    def _read(self, conn: Connection, client: _Client, size: int) -> None:
        """Feed the chat what the transport has read (0 bytes: the end)."""
        # The loop's clock is time.monotonic(), like the other engines'; the
        # room and call_at() must use the same one.
        now = self._loop.time()
        data = bytes(self._read_buffer[:size])
        if self._trace is not None:
            # asyncio's loop calls one protocol per ready socket.
            self._trace(Ready((conn.peer,)))
            self._trace(Received(conn.peer, data))
        if data:
            self.chat.receive_data(conn, data, now)
        else:
            self.chat.receive_eof(conn, now)
        self._act_on_ready_soon()

    def _write(self, conn: Connection, client: _Client) -> None:
        """Hand the client's backlog to its transport in one ``write()``.

        Called for each client the chat has news for, once per turn of the
        loop, and when the transport has sent everything it held.
        """
        data = conn.data_to_send()
        if data:
            # One write, and never writelines(): from Python 3.12.0 until
            # 3.12.9 and 3.13.2 it ignored flow control (CVE-2024-12254).
            client.transport.write(data)
            if self._trace is not None:
                self._trace(Sent(conn.peer, data))
        self.chat.data_unsent(conn, client.transport.get_write_buffer_size())

    def _end_our_side(self, conn: Connection, client: _Client) -> None:
        """Send our end of the stream after the goodbye; the client reads it all first."""
        try:
            client.transport.write_eof()
        except OSError:
            # With nothing buffered, write_eof() calls shutdown() at once,
            # which raises ENOTCONN once the peer has reset the connection.
            self.chat.connection_lost(conn)
            return
        self.chat.eof_sent(conn)

    def _finish(self, conn: Connection, client: _Client) -> None:
        """Close a ``CLOSED`` connection's transport and forget it."""
        del self._clients[conn]
        if client.timer is not None:
            client.timer.cancel()
        if conn.cut_off:
            reset_on_close(client.transport.get_extra_info("socket"))
            client.transport.abort()
        else:
            client.transport.close()
        if self._trace is not None:
            self._trace(Closed(conn.peer, conn.cut_off))
        self._log_disconnected(conn.peer)
        if not self._clients and self._all_gone is not None and not self._all_gone.done():
            self._all_gone.set_result(None)

    def _act_on_ready(self) -> None:
        """Carry out what the chat decided for every connection with news."""
        self._act_scheduled = False
        # Acting on one connection may give news to others (closing one
        # tells the rest): go on until there is none.
        while ready := self.chat.take_ready():
            for conn in ready:
                client = self._clients.get(conn)
                if client is not None:  # None: finished earlier in this batch
                    self._act_on(conn, client)

    def _act_on(self, conn: Connection, client: _Client) -> None:
        """Do what the connection's state asks for (see ``chatlib.chat.LIFECYCLE``)."""
        if conn.state is not State.CLOSED and client.transport.is_closing():
            self.chat.connection_lost(conn)  # a write failed; connection_lost() is on its way
        if conn.state is not State.CLOSED and not client.writing_paused:
            self._write(conn, client)
        # Otherwise resume_writing() brings us back once the transport drains.
        if conn.state is State.CLOSING and not client.writing_paused:
            self._end_our_side(conn, client)
        if conn.state is State.CLOSED:
            self._finish(conn, client)
            return
        if conn.deadline is not None and (
            client.timer is None or client.timer.when() != conn.deadline
        ):
            if client.timer is not None:
                client.timer.cancel()
            client.timer = self._loop.call_at(conn.deadline, self._deadline_reached, conn, client)
        if conn.reading != client.reading:
            client.reading = conn.reading
            if client.reading:
                client.transport.resume_reading()
            else:
                client.transport.pause_reading()

    def _deadline_reached(self, conn: Connection, client: _Client) -> None:
        client.timer = None
        if conn in self._clients:  # the chat ignores deadlines that have moved
            self.chat.deadline_reached(conn, self._loop.time())
            self._act_on_ready_soon()

    def _from_broker(self, news: str, *args: object) -> None:
        # From the link's threads. A loop that has closed has nobody left to tell.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._take_broker_news, news, args)

    def _take_broker_news(self, news: str, args: tuple) -> None:
        self._tell_chat(news, args, self._loop.time())
        self._act_on_ready_soon()

    def _act_on_ready_soon(self) -> None:
        # Once per turn of the loop, after every callback of the turn: a
        # client gets all the lines of the turn in one write(). Two hops, not
        # one: the reads the loop finds in its next select() run after the
        # callbacks already waiting, so a single call_soon() would write before
        # them and their lines would wait for another write. As the selectors
        # engine reads everything ready before it writes, this takes twice
        # the lines per write() in a typing fan-out.
        if not self._act_scheduled:
            self._act_scheduled = True
            self._loop.call_soon(self._loop.call_soon, self._act_on_ready)

    def _begin_shutdown(self) -> None:
        if self._shutdown is None:
            self._shutdown = self._loop.create_task(self._shut_down())

    def _handle_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Log a failed accept() once per pause, and pass anything else on.

        Out of file descriptors, asyncio's accept loop reports every failed
        try of a burst, each with a traceback: thousands a second. It
        pauses accepting for a second as the other engines do; one line
        per pause says so. Once the server is closed, the retries asyncio
        still has due fail on the closed listener, and are dropped.
        """
        error = context.get("exception")
        if isinstance(error, OSError) and out_of_resources(error) and "socket" in context:
            now = self._accept_failed_at = loop.time()
            if now >= self._accept_error_logged_at + ACCEPT_RETRY_DELAY:
                self._accept_error_logged_at = now
                self._log_accept_paused(error)
        elif (
            isinstance(error, ValueError)
            and self._listener.fileno() == -1
            and "_start_serving" in context.get("message", "")
        ):
            # asyncio schedules its retry of accept() once per failed try of a
            # burst (CPython gh-151615), and closing the server cancels none:
            # each then fails on the closed listener. Nothing is wrong.
            pass
        elif self._previous_error_handler is not None:
            self._previous_error_handler(loop, context)
        else:
            loop.default_exception_handler(context)

    # --- Life cycle on the loop -------------------------------------------

    async def _serve_until_stopped(self) -> None:
        await self.start_serving()
        if self._closed is not None:
            await self._closed

    async def _shut_down(self) -> None:
        """Stop accepting, say goodbye; every leaving client is gone within LINGER."""
        try:
            self._server.close()
            self.chat.shut_down(self._loop.time())
            self._act_on_ready()
            if self._clients:
                self._all_gone = self._loop.create_future()
                # Every client has a deadline of LINGER; the margin is for a
                # loop that runs late on a loaded machine.
                await asyncio.wait([self._all_gone], timeout=2 * LINGER)
            # Only if deadlines were missed: nobody must be left holding a socket.
            for conn, client in list(self._clients.items()):
                self.chat.connection_lost(conn)
                self._finish(conn, client)
            await asyncio.sleep(0)  # abort() calls connection_lost() on the next turn
            if self.link is not None:
                # After the goodbye, which it publishes first; it joins threads.
                await self._loop.run_in_executor(None, self.link.stop)
            await self._server.wait_closed()
            # Retries of accept() still due fail on the closed listener: let
            # them, while this engine's error handler is there to drop them.
            retries_due = self._accept_failed_at + ACCEPT_RETRY_DELAY - self._loop.time()
            if retries_due > 0:
                await asyncio.sleep(retries_due)
        finally:
            self._loop.set_exception_handler(self._previous_error_handler)
            self._stopped.set()
            self._closed.set_result(None)
