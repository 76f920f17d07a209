"""The link from one server to the others, on Redis pub/sub: bytes out, bytes in, and news.

A :class:`RedisLink` carries a server's events (see :mod:`chatlib.cluster`)
to every server on one Redis, itself included, and hands back what comes,
in Redis's order. It decides nothing: it tells its engine what happened
through a callback, ``deliver(news, *args)``, where *news* names the
:class:`~chatlib.chat.Chat` method the engine calls on its own thread, with
its clock:

- ``"broker_connected"`` with every room's history: subscribed, and publishing;
- ``"receive_broker_messages"`` with the events that came, as a list of
  bytes: all that were waiting, so that the engine is woken once for them
  and its clients get them in one write;
- ``"broker_lost"`` with the reason: the connection failed, or Redis
  dropped us (a subscriber that falls behind past Redis's
  ``client-output-buffer-limit pubsub`` is disconnected);
- ``"broker_tick"``, every :data:`~chatlib.cluster.HEARTBEAT` seconds.

Two threads of its own, whatever the engine: a *reader* blocked on the
subscription, which also connects and reconnects with backoff, and a
*writer* that publishes each batch the chat hands over with one round trip
(a pipeline) and keeps the heartbeat.

Rooms' history is kept on Redis too, as one stream per room capped at
:data:`~chatlib.history.HISTORY_KEPT` entries (``XADD ... MAXLEN ~``): a
line to keep is added and published by one Lua script, which Redis runs
whole before anything else, so the stream's order is the channel's. The
entry's id goes out inside the event (``hid``). Once subscribed, the
reader reads every room's stream and hands it over with
``"broker_connected"``: a server that joins late, or again after a split,
replays the same history as everyone. redis-py's blocking client is used
rather than ``redis.asyncio``: the same link then serves all three engines,
each of which already has a way to be woken from another thread.

It needs redis-py, which chatlib's ``redis`` extra installs:
``pip install -e '.[redis]'`` in chatlib's folder.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from chatlib.cluster import HEARTBEAT, Outgoing
from chatlib.history import HISTORY_KEPT

try:
    import redis
except ImportError:  # the extra is not installed: RedisLink() says so
    redis = None

__all__ = [
    "BACKOFF",
    "CHANNEL",
    "HISTORY_IDLE_EXPIRY",
    "OUTGOING_LIMIT",
    "BrokerError",
    "RedisLink",
]

#: The pub/sub channel every server of one chat publishes and listens on.
CHANNEL = "chatlib:events"

#: The history of a room whose last member left is dropped by that member's
#: server; a room whose servers all died without a word is dropped this
#: many seconds after its last line.
HISTORY_IDLE_EXPIRY = 24 * 3600

_HISTORY_KEY = "chatlib:history:"  # and the room's key
_HISTORY_ROOMS = "chatlib:history-rooms"  # the set of those keys

# KEYS: the room's stream, the set of streams. ARGV: the channel, the event,
# the cap, the expiry. The entry's id is spliced in as the event's first
# field: every event is a JSON object, "{...}".
_KEEP_AND_PUBLISH = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'event', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('SADD', KEYS[2], KEYS[1])
return redis.call('PUBLISH', ARGV[1], '{"hid":"' .. id .. '",' .. string.sub(ARGV[2], 2))
"""

#: Waits between tries to reconnect: from the first to the longest, doubling.
BACKOFF = (0.1, 5.0)

# How long the reader waits for a message before it checks whether to stop.
_POLL = 0.2

# The most messages handed over at once: a bound on what one turn of the
# engine's loop does for the broker before it serves its clients again.
_BATCH = 256

#: Messages that may wait for the writer. More means that Redis does not
#: take what this server publishes (paused, or far too slow): the link counts
#: as failed, as a client past its send queue does, and reconnects.
OUTGOING_LIMIT = 100_000


class BrokerError(Exception):
    """A broker that cannot be used as given, with a message for the user."""


class RedisLink:
    """A server's link to the other servers through the Redis at *url*.

    *deliver* is called from the link's threads; it must hand the news to
    the engine's thread without blocking (see the module's docstring).
    """

    def __init__(self, url: str, deliver: Callable[..., None], channel: str = CHANNEL) -> None:
        if redis is None:
            raise BrokerError(
                "--broker needs redis-py, chatlib's redis extra:"
                " pip install -e '.[redis]' in chatlib's folder"
            )
        try:
            # Timeouts, so that a Redis that vanishes without a reset cannot
            # hold a thread forever; a pub/sub connection waits with its own.
            self._pool = redis.ConnectionPool.from_url(
                url, socket_connect_timeout=2.0, socket_timeout=5.0, socket_keepalive=True
            )
        except ValueError as error:
            raise BrokerError(f"--broker {url}: {error}") from None
        self._deliver = deliver
        self._channel = channel
        self._keep_and_publish = redis.Redis(connection_pool=self._pool).register_script(
            _KEEP_AND_PUBLISH
        )
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._outgoing: list[Outgoing] = []
        # Bumped by the reader at each new subscription; the writer drops what
        # was queued before it, as the chat treats all of that as undelivered.
        self._generation = 0
        self._connected = False
        self._broken = threading.Event()  # the writer saw the connection fail
        self._stopping = threading.Event()
        self._threads = [
            threading.Thread(target=self._read, name="chatlib broker reader", daemon=True),
            threading.Thread(target=self._write, name="chatlib broker writer", daemon=True),
        ]

    def start(self) -> None:
        """Connect (and keep reconnecting) in the background."""
        for thread in self._threads:
            thread.start()

    def publish(self, messages: list[Outgoing]) -> None:
        """Queue *messages* (see :data:`chatlib.cluster.Outgoing`) in order; never blocks.

        While the link is down they are dropped: the chat delivers its own
        lines itself once it hears of the failure.
        """
        with self._lock:
            if not self._connected:
                return
            if len(self._outgoing) + len(messages) > OUTGOING_LIMIT:
                self._broken.set()  # the reader reconnects; the chat hears of it
                return
            self._outgoing.extend(messages)
            self._wakeup.notify()

    def stop(self, timeout: float = 1.0) -> None:
        """Publish what is queued (the goodbye), disconnect, end both threads."""
        self._stopping.set()
        with self._lock:
            self._wakeup.notify()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread.ident is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
        self._pool.disconnect()

    # --- The reader -------------------------------------------------------

    def _read(self) -> None:
        delay = BACKOFF[0]
        while not self._stopping.is_set():
            pubsub = redis.Redis(connection_pool=self._pool).pubsub(ignore_subscribe_messages=True)
            try:
                # Subscribed first, then the history read: a line kept meanwhile
                # comes twice, and its id tells the chat it has it already.
                pubsub.subscribe(self._channel)
                history = self._read_history()
                self._broken.clear()
                with self._lock:
                    self._generation += 1
                    self._outgoing.clear()
                    self._connected = True
                self._deliver("broker_connected", history)
                delay = BACKOFF[0]
                self._listen(pubsub)
            except (redis.RedisError, OSError) as error:
                reason = str(error) or type(error).__name__
            else:
                reason = "the link was closed"
            finally:
                pubsub.close()
            with self._lock:
                was_connected, self._connected = self._connected, False
            if was_connected and not self._stopping.is_set():
                self._deliver("broker_lost", reason)
            if self._stopping.wait(delay):
                return
            delay = min(2 * delay, BACKOFF[1])

    def _read_history(self) -> dict[str, list[tuple[str, bytes]]]:
        """Return every room's history on Redis: room key -> (entry id, event), oldest first."""
        client = redis.Redis(connection_pool=self._pool)
        history = {}
        for key in client.smembers(_HISTORY_ROOMS):
            entries = client.xrevrange(key, count=HISTORY_KEPT)
            if not entries:  # expired, or dropped
                client.srem(_HISTORY_ROOMS, key)
                continue
            room = key.decode()[len(_HISTORY_KEY) :]
            history[room] = [(hid.decode(), fields[b"event"]) for hid, fields in reversed(entries)]
        return history

    def _listen(self, pubsub: redis.client.PubSub) -> None:
        """Hand every message on to the chat until the link fails or stops."""
        while not self._stopping.is_set():
            if self._broken.is_set():
                raise redis.ConnectionError("publishing failed")
            batch = []
            message = pubsub.get_message(timeout=_POLL)
            while message is not None and len(batch) < _BATCH:
                if message["type"] == "message":
                    batch.append(message["data"])
                message = pubsub.get_message(timeout=0)  # what else has come: no wait
            if message is not None and message["type"] == "message":
                batch.append(message["data"])
            if batch:
                self._deliver("receive_broker_messages", batch)

    # --- The writer -------------------------------------------------------

    def _write(self) -> None:
        client = redis.Redis(connection_pool=self._pool)
        next_tick = time.monotonic() + HEARTBEAT
        while True:
            with self._lock:
                while not self._outgoing and not self._stopping.is_set():
                    wait = next_tick - time.monotonic()
                    if wait <= 0:
                        break
                    self._wakeup.wait(wait)
                batch, self._outgoing = self._outgoing, []
                generation = self._generation
            if batch:
                self._publish(client, batch, generation)
            if self._stopping.is_set():
                return
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + HEARTBEAT
                self._deliver("broker_tick")

    def _publish(self, client: redis.Redis, batch: list[Outgoing], generation: int) -> None:
        pipeline = client.pipeline(transaction=False)
        for room, event in batch:
            if room is None:
                pipeline.publish(self._channel, event)
            elif event is None:
                pipeline.delete(_HISTORY_KEY + room)
                pipeline.srem(_HISTORY_ROOMS, _HISTORY_KEY + room)
            else:
                keys = [_HISTORY_KEY + room, _HISTORY_ROOMS]
                args = [self._channel, event, HISTORY_KEPT, HISTORY_IDLE_EXPIRY]
                self._keep_and_publish(keys=keys, args=args, client=pipeline)
        try:
            with self._lock:
                if generation != self._generation:
                    return  # queued on a link that has failed since
            pipeline.execute()
        except (redis.RedisError, OSError):
            # The reader hears of it and reconnects; the chat delivers its own.
            self._broken.set()
