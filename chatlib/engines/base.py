"""What every engine shares: the listening socket, the log, the life cycle.

An engine is the I/O half of a chat server: it owns the sockets and moves
bytes between them and a :class:`~chatlib.chat.Chat`, which decides
everything else. The three engines (:mod:`~chatlib.engines.threads`,
:mod:`~chatlib.engines.selectors`, :mod:`~chatlib.engines.asyncio`) differ
only in how they wait for sockets to be ready.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import secrets
import socket
import struct
import threading
from types import TracebackType

from chatlib.chat import Chat, Limits
from chatlib.cluster import Cluster
from chatlib.history import HistoryStore
from chatlib.protocol import DEFAULT_HOST, DEFAULT_PORT
from chatlib.trace import Trace

__all__ = [
    "ACCEPT_RETRY_DELAY",
    "KEEPALIVE",
    "NO_SIGNAL",
    "ServerBase",
    "create_listener",
    "log",
    "out_of_resources",
    "reset_on_close",
    "set_keepalive",
    "set_nodelay",
]

#: The server's log. Nothing is printed unless the application configures
#: logging (``python -m chatlib.server`` does), so a server running inside a
#: notebook stays quiet.
log = logging.getLogger("chatlib.server")

#: Connections the kernel may hold for us before we accept() them. The
#: socketserver default of 5 drops clients that arrive in a burst.
BACKLOG = 1024

#: Flags for every send(): a send to a peer that has reset the connection
#: raises EPIPE instead of killing the process with SIGPIPE. Python ignores
#: SIGPIPE, but an application embedding the server may not. Linux has the
#: flag; elsewhere it is 0 and Python's default keeps the process safe.
NO_SIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)

_RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, with a zero timeout

#: How long to stop accepting once the process is out of file descriptors
#: or memory; asyncio waits as long. The client waits in the backlog.
ACCEPT_RETRY_DELAY = 1.0


def create_listener(host: str, port: int) -> socket.socket:
    """Return a socket listening on *host*:*port* (port 0 picks a free one).

    ``socket.create_server`` sets ``SO_REUSEADDR`` on POSIX, so a restarted
    server can bind while old connections linger in TIME_WAIT; it leaves it
    off on Windows, where the option would let two servers share a port.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=BACKLOG)


def set_nodelay(sock: socket.socket) -> None:
    """Turn Nagle's algorithm off on a client's socket (``TCP_NODELAY``).

    Chat lines are small and people wait for them: send each at once
    instead of holding it back until the previous one is acknowledged,
    which delayed ACKs can make take 40 ms. On macOS and the BSDs this
    fails (EINVAL, ECONNRESET) if the client is gone already; the next
    read or write on the socket says so.
    """
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


#: TCP keepalive for every client: after this many seconds of silence, probe
#: every so many seconds, and give up after so many unanswered probes. A peer
#: that vanished without a word (a laptop shut, a Wi-Fi network left) is then
#: found within two minutes, not the kernel's default of over two hours.
KEEPALIVE = {"idle": 60, "interval": 10, "probes": 5}

_KEEPALIVE_OPTIONS = [
    # macOS names the idle time TCP_KEEPALIVE; Windows has all three since 10.
    (getattr(socket, "TCP_KEEPIDLE", getattr(socket, "TCP_KEEPALIVE", None)), "idle"),
    (getattr(socket, "TCP_KEEPINTVL", None), "interval"),
    (getattr(socket, "TCP_KEEPCNT", None), "probes"),
]


def set_keepalive(sock: socket.socket) -> None:
    """Turn TCP keepalive on for a client's socket, with :data:`KEEPALIVE`'s times.

    A client whose machine is gone never sends a reset: without probes its
    connection would hold a place in the chat for as long as the server
    runs. Where the platform lacks an option, its default applies.
    """
    with contextlib.suppress(OSError):  # the peer may be gone already
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, setting in _KEEPALIVE_OPTIONS:
            if option is not None:
                sock.setsockopt(socket.IPPROTO_TCP, option, KEEPALIVE[setting])


def reset_on_close(sock: socket.socket) -> None:
    """Make closing *sock* send a reset: for a client that is cut off.

    A plain close() of a socket with unsent bytes leaves the kernel trying
    to deliver them, for minutes, to a client that may never read. With
    ``SO_LINGER`` set to zero, close() sends a reset instead and frees
    everything at once.
    """
    with contextlib.suppress(OSError):  # the peer may be gone already
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)


def out_of_resources(error: OSError) -> bool:
    """Return whether an ``accept()`` error is the server's trouble, not the client's.

    Out of file descriptors or memory, the client stays in the backlog and
    the listener stays ready: an engine that tries again at once only spins.
    Any other error means that this one client gave up.
    """
    return error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class ServerBase:
    """The parts of a chat server that do not depend on the engine.

    The listening socket is bound in the constructor, so :attr:`address`
    is known (and "address already in use" is raised) before anything
    runs. Subclasses provide :meth:`serve_forever` and :meth:`stop`.

    *trace*, if given, is called with a :mod:`chatlib.trace` event at each
    accept, wait, read, write and close, from the engine's own thread(s).

    *broker*, a ``redis://HOST:PORT/DB`` URL, joins this server to every
    other server on that Redis to make one chat (see :mod:`chatlib.cluster`).
    The link's news reaches the chat on the engine's own thread, through
    the engine's way of being woken (:meth:`_from_broker`).
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        limits: Limits | None = None,
        store: HistoryStore | None = None,
        trace: Trace | None = None,
        broker: str | None = None,
    ) -> None:
        #: The link to the other servers, or ``None`` for a server on its own.
        self.link = None
        cluster = None
        if broker is not None:
            if store is not None:
                # Every server would keep every line, and reload Redis's on each link.
                raise ValueError("a server with a broker keeps its history on Redis: no store")
            from chatlib.redis_link import RedisLink  # only a cluster needs redis-py

            self.link = RedisLink(broker, self._from_broker)
            # New for every run: a restarted server numbers its events from 1 again.
            cluster = Cluster(secrets.token_hex(4), self.link)
        self._listener = create_listener(host, port)
        #: ``(host, port)`` the server listens on; the real port if *port* was 0.
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        #: The chat the engine drives; its history goes to *store* (in memory if ``None``).
        self.chat = Chat((limits or Limits()).for_listener(self.address[0]), store, cluster)
        self._thread: threading.Thread | None = None
        # Tested at every point an event could be built: None costs nothing else.
        self._trace = trace

    # --- Public methods -------------------------------------------------

    def serve_forever(self) -> None:
        """Serve clients until :meth:`stop` is called (from another thread)."""
        raise NotImplementedError

    def stop(self) -> None:
        """Say goodbye to every client, close every socket, end every thread."""
        raise NotImplementedError

    def start(self) -> ServerBase:
        """Run :meth:`serve_forever` in a background thread and return self."""
        self._thread = threading.Thread(
            target=self.serve_forever, name=f"{type(self).__module__} server", daemon=True
        )
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        """Return whether the background thread from :meth:`start` still serves."""
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> ServerBase:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        host, port = self.address
        return f"<{type(self).__module__}.{type(self).__name__} on {host}:{port}>"

    # --- Private methods ------------------------------------------------

    def _log_listening(self) -> None:
        host, port = self.address
        engine = type(self).__module__.rpartition(".")[2]  # chatlib.engines.threads: threads
        log.info("[LISTENING] Server (%s engine) is listening on %s:%s", engine, host, port)

    def _log_connected(self, peer: tuple[str, int]) -> None:
        log.info("[NEW CONNECTION] %s connected.", peer)

    def _log_disconnected(self, peer: tuple[str, int]) -> None:
        log.info("[DISCONNECTED] %s disconnected.", peer)

    def _log_accept_paused(self, error: OSError) -> None:
        log.warning("[PAUSED] Cannot accept: %s; trying again in %g s.", error, ACCEPT_RETRY_DELAY)

    def _from_broker(self, news: str, *args: object) -> None:
        """Have the engine's thread call the chat's method *news* with *args* and its clock.

        Called from the link's threads (see :mod:`chatlib.redis_link`); each
        engine wakes itself its own way.
        """
        raise NotImplementedError

    def _tell_chat(self, news: str, args: tuple, now: float) -> None:
        """Call the chat's method *news* with *args* and *now*, on the engine's thread."""
        getattr(self.chat, news)(*args, now)

    def _join_server_thread(self, timeout: float) -> None:
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
