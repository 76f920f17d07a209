"""The load generator: thousands of client sockets in one process, one ``selectors`` loop.

Every benchmark line carries a marker, ``<phase> <sender> <seq>`` with fixed
widths, for example ``m 0003 00000017``. A chat server relays it as
``<guest4> m 0003 00000017``, Redis as a RESP message whose payload is
``<bench> m 0003 00000017``: either way the receiver's bytes contain
``> m `` once per delivery, and ``> m 0003 `` once per line from sender 3.
So a receiver never splits lines: it reads big chunks and counts markers with
``bytes.count`` (:class:`MarkerCounter`).

That, and reading the clients that only receive in batches (every
``read_interval``) while the senders are read at once, keeps the load
generator cheap enough to measure a server written in C; docs/benchmarks.md
shows the check.
"""

from __future__ import annotations

import collections
import itertools
import os
import re
import selectors
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from time import perf_counter
from typing import Any

from chatlib.bench.servers import HOST, Server, StopResult, raise_open_files_limit
from chatlib.protocol import parse_notice, parse_server_line, split_member

__all__ = [
    "CrowdResult",
    "FanoutResult",
    "MarkerCounter",
    "ScaleResult",
    "ServerGroup",
    "message_text",
    "resp_command",
    "run_crowd",
    "run_fanout",
    "run_fanout_alternating",
    "run_scale",
    "wait_until_linked",
]

# One read takes whatever the kernel has queued, up to this much: when the load
# generator falls behind, it reads more per call instead of making more calls.
# Reads go into one reused buffer (recv_into): here, recv(256 KiB) cost 17 us more
# per call than recv_into, allocating and trimming a fresh 256 KiB bytes each time.
_RECV_SIZE = 256 * 1024
# Connections opened but not yet greeted. Kept below the usual listen backlogs
# (asyncio's 100, socket.listen()'s 128) so that no SYN is dropped: a dropped SYN
# costs a 1 s retransmit.
_CONNECT_BATCH = 64
# How long to wait for stragglers after the senders stop.
_DRAIN_TIMEOUT = 10.0
# How often the registration check repeats its broadcast (see _LoadGen.sync).
_SYNC_INTERVAL = 0.05
# The settle check: the server is done once nothing arrives for this long.
_QUIET = 0.5
# A crowd keeps being read this long after the last greeting before its memory
# is taken: long enough for the server to act on what the greetings started.
_CROWD_READ = 1.0
_MAX_SENDERS = 9999  # the sender field is four digits wide
# run_fanout_alternating's slices last about this long: shorter than the bursts
# of other work seen on a shared machine (a test run, seconds long), so that
# they hit every server alike, and long enough that a slice's ramp-down (the
# last copies draining) is a small part of it.
_SLICE_S = 0.5
_REPORT_EVERY = 5.0  # seconds between progress lines in long waits
# A copy of a measured line, as the exact count (exact=True) reads it back:
# the sender and its line's number.
_MEASURED_COPY = re.compile(rb"> m (\d{4}) (\d{8})")

Progress = Callable[[str], None]


class MarkerCounter:
    """Count a marker in a byte stream that arrives in arbitrary chunks.

    TCP may split the stream anywhere, marker included, so the last
    ``len(marker) - 1`` bytes are kept and searched again with the next chunk.
    They are too short to hold a whole marker, so nothing is counted twice.
    """

    __slots__ = ("_keep", "_tail", "count", "marker")

    def __init__(self, marker: bytes) -> None:
        if len(marker) < 2:
            raise ValueError("marker must be at least 2 bytes long")
        # "aa" in "a" + "a" + "a" would count twice: the kept tail would be both
        # the end of one match and the start of the next.
        if any(marker[:k] == marker[-k:] for k in range(1, len(marker))):
            raise ValueError(f"marker {marker!r} overlaps itself")
        self.marker = marker
        self.count = 0
        self._keep = len(marker) - 1
        self._tail = b""

    def feed(self, chunk: bytes | bytearray, size: int | None = None) -> int:
        """Count the markers completed by *chunk* (its first *size* bytes); return how many.

        *chunk* may be a reused buffer: nothing keeps a reference to it.
        """
        end = len(chunk) if size is None else size
        # Markers that straddle the previous chunk and this one; the rest are inside.
        head = self._tail + chunk[: min(self._keep, end)]
        found = head.count(self.marker) + chunk.count(self.marker, 0, end)
        if end >= self._keep:
            self._tail = bytes(chunk[end - self._keep : end])
        else:
            self._tail = head[-self._keep :]
        self.count += found
        return found


def resp_command(*args: bytes | str) -> bytes:
    """Encode a Redis command as RESP: an array of bulk strings.

    >>> resp_command("PUBLISH", "chat", "hi")
    b'*3\\r\\n$7\\r\\nPUBLISH\\r\\n$4\\r\\nchat\\r\\n$2\\r\\nhi\\r\\n'
    """
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def message_text(phase: bytes, sender: int, seq: int) -> bytes:
    """Return the text of benchmark line *seq* from *sender* in *phase* (one letter).

    The fields have fixed widths, so ``> m 0003 `` cannot match sender 30 or 300.
    """
    return b"%s %04d %08d" % (phase, sender, seq)


@dataclass
class FanoutResult:
    """What :func:`run_fanout` measured on one server."""

    server: str
    mode: str  #: "typing" (one line in flight per sender) or "pipelined"
    clients: int
    senders: int
    window: int  #: lines each sender keeps in flight
    seconds: float  #: from the first send to the last delivery
    messages: int  #: lines sent (each should reach every client)
    deliveries: int  #: copies counted at the clients
    lost: int  #: copies that never arrived; anything but 0 is a bug
    deliveries_per_s: float
    p50_ms: float  #: median time from a sender's send to its own copy
    p99_ms: float
    loadgen_cpu: float  #: share of one core the load generator used (1.0 = saturated)
    server_cpu: float | None  #: the same for the server process (or all of a group's), if known
    #: With ``exact=True``: copies that came twice or more (else None).
    duplicates: int | None = None
    #: With ``exact=True``: clients that saw the lines in another order than
    #: the first client did (else None). One server, or one broker, sets one
    #: order for everyone, so anything but 0 is a bug.
    disordered: int | None = None


@dataclass
class ServerGroup:
    """Chat servers that make one chat (on one broker): a load spreads its clients over them.

    Client *i* connects to ``servers[i % len(servers)]``, so the clients, and
    the senders among them, are spread evenly. Pass one to
    :func:`run_fanout_alternating` (with ``exact=True``, to check every copy)
    once :func:`wait_until_linked` says the servers see each other.
    """

    name: str
    servers: Sequence[Server]
    #: The broker's own process, if it is to be counted in ``server_cpu``.
    broker: Server | None = None
    protocol: str = field(default="chat", init=False)

    def __post_init__(self) -> None:
        if not self.servers or any(server.protocol != "chat" for server in self.servers):
            raise ValueError("a group is one or more chat servers")

    @property
    def address(self) -> tuple[str, int]:
        """The first server's (host, port)."""
        return self.servers[0].address

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Every server's (host, port), in the order clients are spread over them."""
        return [server.address for server in self.servers]

    def cpu_seconds(self) -> float | None:
        """Return the CPU time the servers (and the broker, if given) used so far, or None."""
        processes = [*self.servers, *([self.broker] if self.broker else [])]
        times = [server.cpu_seconds() for server in processes]
        if any(seconds is None for seconds in times):
            return None
        return sum(times)  # type: ignore[arg-type]

    def output(self, limit: int = 4000) -> str:
        """Return the last output of each server (*limit* bytes each), each under its port."""
        return "\n".join(
            f"[{server.port}] {server.output(limit).strip()}" for server in self.servers
        )


@dataclass
class ScaleResult:
    """What :func:`run_scale` measured on one server."""

    server: str
    clients: int
    rss_before_kib: int | None  #: server memory before the clients connected
    rss_after_kib: int | None  #: ... and once they were all in and the server settled
    kib_per_client: float | None
    connect_s: float  #: connecting every client and letting the server settle
    broadcast_ms: list[float] = field(default_factory=list)  #: one line until all had it
    broadcast_median_ms: float = 0.0
    loadgen_cpu: float = 0.0  #: share of one core the load generator used in the broadcasts
    stop: StopResult | None = None  #: SIGTERM with every client connected, if asked for


@dataclass
class CrowdResult:
    """What :func:`run_crowd` measured on one server; :meth:`to_json` flattens it."""

    server: str
    clients: int
    connect_s: float  #: from the first connect to the last client's greeting
    kib_per_client: float | None  #: server memory added per client, 1 s after the last greeting
    broadcast_ms: float  #: one line, from its send until every client had its copy
    stop: StopResult | None = None  #: SIGTERM with every client connected, if asked for
    rss_before_kib: int | None = None  #: server memory before the first connect
    rss_after_kib: int | None = None  #: ... and 1 s after the last greeting
    loadgen_cpu: float = 0.0  #: share of one core the load generator used while connecting
    server_cpu: float | None = None  #: the same for the server process, if known

    def to_json(self) -> dict[str, Any]:
        """Return one flat row of plain data: the stop as ``stop_s``, ``stop_status``...

        ``stop_s`` and the other stop fields are None when the run did not stop
        the server. A list of these rows is what a table or a plot wants.
        """
        row = {name: value for name, value in asdict(self).items() if name != "stop"}
        stop = self.stop
        row["stop_s"] = None if stop is None else stop.seconds
        row["stop_status"] = None if stop is None else stop.status
        row["stop_killed"] = None if stop is None else stop.killed
        return row


def run_fanout(
    server: Server,
    *,
    clients: int = 100,
    senders: int = 10,
    window: int = 1,
    duration: float = 3.0,
    warmup: float = 0.5,
    read_interval: float = 0.002,
    timeout: float = 60.0,
    progress: Progress | None = None,
) -> FanoutResult:
    """Measure how fast *server* relays lines from *senders* to all *clients*.

    Each of the first *senders* clients keeps *window* lines in flight: with
    ``window=1`` it sends a line, waits for its own copy, sends the next (people
    typing); with more it pipelines. After *warmup* seconds the measured phase
    runs for *duration* seconds, then waits for every copy still on its way.
    Deliveries are counted at the receivers, and latency from a sender's send to
    its own copy, which the server sends out along with everyone else's.

    Senders are read as soon as they have data; the other clients every
    *read_interval* seconds (0: at once too), which keeps the load generator's
    cost per line well below the server's. *timeout* bounds connecting and the
    registration check.
    """
    (result,) = run_fanout_alternating(
        [server],
        clients=clients,
        senders=senders,
        window=window,
        duration=duration,
        warmup=warmup,
        read_interval=read_interval,
        timeout=timeout,
        progress=progress,
    )
    return result


def run_fanout_alternating(
    servers: Sequence[Server | ServerGroup],
    *,
    clients: int = 100,
    senders: int = 10,
    window: int = 1,
    duration: float = 3.0,
    warmup: float = 0.5,
    read_interval: float = 0.002,
    timeout: float = 60.0,
    exact: bool = False,
    progress: Progress | None = None,
) -> list[FanoutResult]:
    """Measure :func:`run_fanout` on several *servers* in turns; return one result each.

    Every server gets its own *clients*, all connected and warmed up first;
    then the measured *duration* is cut into slices of about half a second,
    and the servers take them in turn (A, B, A, B...), each slice ending when
    its last copy has arrived. A burst of other work on the machine then
    slows every server alike, which two runs one after the other cannot
    promise: their ratio is what this is for. A result sums its server's
    slices; its latencies are those of all its slices together.

    A :class:`ServerGroup` gets its *clients* spread over its servers. With
    *exact*, every client keeps the bytes of the measured lines, and each copy
    is checked afterwards: ``lost`` counts the (sender, line) pairs a client
    never got, whatever else it got twice, and the result's ``duplicates``
    and ``disordered`` say the rest. It costs the load generator a copy of
    every byte: give it to every server compared, or to none.
    """
    if not 1 <= senders <= min(clients, _MAX_SENDERS):
        raise ValueError(f"senders must be between 1 and min(clients, {_MAX_SENDERS})")
    if window < 1:
        raise ValueError("window must be at least 1")
    gens = []
    try:
        deadline = perf_counter() + timeout
        for server in servers:
            gens.append(gen := _LoadGen(server, progress, exact=exact))
            gen.connect(clients, deadline)
            gen.add_senders(senders, read_interval)
            gen.sync(deadline)
        for gen in gens if warmup > 0 else ():
            gen.run_phase(b"w", warmup, window)
        slices = max(1, round(duration / _SLICE_S)) if len(gens) > 1 else 1
        parts: list[list[tuple[FanoutResult, list[float]]]] = [[] for _ in gens]
        for _slice in range(slices):
            for gen, part in zip(gens, parts, strict=True):
                part.append((gen.run_phase(b"m", duration / slices, window), gen.latencies))
        return [_merged(part) for part in parts]
    finally:
        for gen in gens:
            gen.close()


def run_scale(
    server: Server,
    *,
    clients: int = 5000,
    broadcasts: int = 5,
    timeout: float = 300.0,
    stop: bool = False,
    stop_timeout: float = 10.0,
    progress: Progress | None = None,
) -> ScaleResult:
    """Connect *clients* idle clients to *server*; measure its memory and one broadcast.

    Memory is the server's resident set before connecting and once every client
    is greeted and nothing more arrives. Then one client (for Redis, a publisher)
    sends a line, *broadcasts* times, and each time the clock runs until every
    client has its copy. *timeout* bounds all that.

    With *stop*, the run ends by stopping the server (:meth:`Server.terminate`,
    so only a server :func:`start_server` started) while every client is still
    connected, killing it after *stop_timeout* s; the result's ``stop`` says
    how that went. The clients neither read nor close meanwhile.
    """
    if clients < 1 or broadcasts < 1:
        raise ValueError("clients and broadcasts must be at least 1")
    if stop and server.process is None:
        raise ValueError(f"stop=True needs a server that start_server started, not {server.name}")
    gen = _LoadGen(server, progress)
    try:
        start = perf_counter()
        deadline = start + timeout
        rss_before = server.rss_kib()
        gen.connect(clients, deadline)
        gen.settle(deadline)
        connect_s = perf_counter() - start
        rss_after = server.rss_kib()
        gen.add_senders(1)
        gen.sync(deadline)
        gen.settle(deadline)  # let the check's extra lines go by
        cpu_before = _own_cpu_seconds()
        wall_before = perf_counter()
        times = [gen.broadcast_once(seq, deadline) * 1000 for seq in range(broadcasts)]
        loadgen_cpu = (_own_cpu_seconds() - cpu_before) / (perf_counter() - wall_before)
        stopped = _terminate_connected(gen, clients, stop_timeout) if stop else None
    finally:
        gen.close()
    return ScaleResult(
        server=server.name,
        clients=clients,
        rss_before_kib=rss_before,
        rss_after_kib=rss_after,
        kib_per_client=_per_client(rss_before, rss_after, clients),
        connect_s=connect_s,
        broadcast_ms=times,
        broadcast_median_ms=statistics.median(times),
        loadgen_cpu=loadgen_cpu,
        stop=stopped,
    )


def run_crowd(
    server: Server,
    *,
    clients: int = 5000,
    timeout: float = 300.0,
    stop: bool = True,
    stop_timeout: float = 10.0,
    progress: Progress | None = None,
) -> CrowdResult:
    """Connect *clients* clients to *server* all at once; time it, weigh it, broadcast once.

    Unlike :func:`run_scale`, nothing waits for the server to settle, since a
    crowd arriving at once does not wait either: the connect time runs from the
    first connect to the last greeting (for Redis, the SUBSCRIBE reply). The
    clients keep reading for one second more, then the server's memory is
    taken, and one client (for Redis, a publisher) sends one line; the
    broadcast time runs until every client has its copy, behind whatever the
    server still had queued for them (join notices, say). That is the point:
    it is what the last person in a crowd waits for.

    With *stop* (the default), the run ends by stopping the server
    (:meth:`Server.terminate`, so only a server :func:`start_server` started)
    with every client still connected, killing it after *stop_timeout* s. The
    clients neither read nor close meanwhile. *timeout* bounds the rest.
    """
    if clients < 1:
        raise ValueError("clients must be at least 1")
    if stop and server.process is None:
        raise ValueError(f"stop=True needs a server that start_server started, not {server.name}")
    gen = _LoadGen(server, progress)
    try:
        rss_before = server.rss_kib()
        server_cpu_before = server.cpu_seconds()
        cpu_before = _own_cpu_seconds()
        start = perf_counter()
        deadline = start + timeout
        gen.connect(clients, deadline)
        connect_s = perf_counter() - start
        loadgen_cpu = (_own_cpu_seconds() - cpu_before) / connect_s
        server_cpu = _share(server_cpu_before, server.cpu_seconds(), connect_s)
        # Redis's publisher connects now, so that the broadcast below times the
        # broadcast and not Redis accepting one more client.
        gen.add_senders(1)
        gen.keep_reading(_CROWD_READ)
        rss_after = server.rss_kib()
        broadcast_ms = gen.broadcast_once(0, deadline) * 1000
        stopped = _terminate_connected(gen, clients, stop_timeout) if stop else None
    finally:
        gen.close()
    return CrowdResult(
        server=server.name,
        clients=clients,
        connect_s=connect_s,
        kib_per_client=_per_client(rss_before, rss_after, clients),
        broadcast_ms=broadcast_ms,
        stop=stopped,
        rss_before_kib=rss_before,
        rss_after_kib=rss_after,
        loadgen_cpu=loadgen_cpu,
        server_cpu=server_cpu,
    )


def wait_until_linked(group: ServerGroup, timeout: float = 20.0) -> float:
    """Return once every server of *group* lists users of all of them; return the seconds taken.

    One probe client connects to each server and asks ``/who`` until every
    server's answer lists a user of every server (a guest's name ends in
    its server's tag, ``guest1-3fa2``, and a member list gives each
    member's server, ``guest1-3fa2@3fa2``). Raises :class:`TimeoutError` after
    *timeout* seconds, saying what each server saw. The probes leave at the
    end, which the servers tell each other before anything is measured.
    """
    start = perf_counter()
    deadline = start + timeout
    probes: list[_Probe] = []
    try:
        for server in group.servers:
            probes.append(_Probe(server.address, deadline))
        tags = [_tag(probe.wait_for_notice("welcome", deadline)["name"]) for probe in probes]
        while True:
            seen = []
            for probe in probes:
                probe.send(b"/who\n")
                # A cluster lists each member with its server: guest1-3fa2@3fa2.
                entries = probe.wait_for_notice("members", deadline)["names"].split(", ")
                seen.append({split_member(entry)[1] for entry in entries})
            if all(set(tags) <= tags_seen for tags_seen in seen):
                return perf_counter() - start
            if perf_counter() + _SYNC_INTERVAL > deadline:
                views = "; ".join(
                    f"{server.port} sees {sorted(tags_seen)}"
                    for server, tags_seen in zip(group.servers, seen, strict=True)
                )
                raise TimeoutError(
                    f"{group.name}: servers {sorted(tags)} not linked after {timeout:g} s: {views}"
                )
            time.sleep(_SYNC_INTERVAL)  # between two rounds of /who, not instead of one
    finally:
        for probe in probes:
            probe.close()


class _Probe:
    """A plain blocking client that reads the server's lines one by one."""

    def __init__(self, address: tuple[str, int], deadline: float) -> None:
        if address[0] != HOST:
            raise ValueError(f"the benchmark only talks to {HOST}, not {address[0]}")
        self.sock = socket.create_connection(address, timeout=max(0.1, deadline - perf_counter()))
        self.lines = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def wait_for_notice(self, event: str, deadline: float) -> dict[str, str]:
        """Read lines until the notice *event* (see chatlib.protocol.NOTICES); return its fields."""
        while True:
            remaining = deadline - perf_counter()
            if remaining <= 0:
                raise TimeoutError(f"no {event!r} notice from {self.sock.getpeername()}")
            self.sock.settimeout(remaining)
            raw = self.lines.readline()
            if not raw:
                raise ConnectionError("a server closed a probe's connection")
            line = parse_server_line(raw.decode(errors="replace").rstrip("\r\n"))
            notice = parse_notice(line.text) if line.kind == "notice" else None
            if notice is not None and notice[0] == event:
                return notice[1]

    def close(self) -> None:
        self.lines.close()
        self.sock.close()


def _tag(name: str) -> str:
    """Return the server's tag in a guest's name: ``3fa2`` for ``guest1-3fa2``."""
    return name.rpartition("-")[2]


# Private: the load generator itself.


class _Conn:
    """One client socket and what it has counted so far."""

    __slots__ = ("ready", "record", "seen", "sender", "sock")

    def __init__(self, sock: socket.socket, ready: bool = False) -> None:
        self.sock = sock
        self.ready = ready  # the server has said something to it
        self.seen: MarkerCounter | None = None  # copies of the current phase's lines
        self.sender: _Sender | None = None
        self.record: bytearray | None = None  # every byte of the measured phase, if exact


class _Sender:
    """A client that sends, and times each of its lines until its own copy comes back."""

    __slots__ = ("frame", "inflight", "latencies", "own", "phase", "sending", "seq", "sid", "sock")

    def __init__(self, sid: int, sock: socket.socket, frame: Callable[[bytes], bytes]) -> None:
        self.sid = sid
        self.sock = sock  # the client's own socket, or for Redis its publisher connection
        self.frame = frame
        self.phase = b"s"
        self.seq = 0
        self.sending = False
        self.own: MarkerCounter | None = None
        self.inflight: collections.deque[float] = collections.deque()  # send times
        self.latencies: list[float] = []

    def start(self, phase: bytes) -> None:
        self.phase = phase
        self.seq = 0
        self.sending = True
        self.own = MarkerCounter(b"> %s %04d " % (phase, self.sid))
        self.inflight.clear()
        self.latencies = []

    def send(self, count: int) -> None:
        """Send *count* more lines in one write."""
        lines = range(self.seq, self.seq + count)
        data = b"".join(self.frame(message_text(self.phase, self.sid, n)) for n in lines)
        self.inflight.extend(itertools.repeat(perf_counter(), count))
        self.seq += count
        _send_all(self.sock, data)

    def on_echoes(self, count: int, now: float) -> None:
        """Record *count* of our own lines coming back; send as many new ones."""
        for _ in range(min(count, len(self.inflight))):
            self.latencies.append(now - self.inflight.popleft())
        if self.sending:
            self.send(count)


class _LoadGen:
    """Client sockets on one server, and the loop that reads them."""

    def __init__(
        self, server: Server | ServerGroup, progress: Progress | None, exact: bool = False
    ) -> None:
        self.server = server
        self.addresses = server.addresses if isinstance(server, ServerGroup) else [server.address]
        self.exact = exact
        self.progress = progress or (lambda message: None)
        self.selector = selectors.DefaultSelector()  # read as soon as data arrives
        self.batched = selectors.DefaultSelector()  # read every read_interval seconds
        self.read_interval = 0.0
        self.next_batch = 0.0
        self.buffer = bytearray(_RECV_SIZE)
        self.conns: list[_Conn] = []
        self.senders: list[_Sender] = []
        if server.protocol == "redis":
            self.hello = resp_command("SUBSCRIBE", "chat")
            self.frame = _redis_frame
        else:
            self.hello = b""  # a chat server greets first
            self.frame = _chat_frame
        self.ready = 0  # clients the server has said something to
        self.target = 1  # reached counts the clients whose seen.count is >= target
        self.reached = 0
        self.bytes_in = 0
        self.started = perf_counter()
        self.latencies: list[float] = []  # the last phase's, sorted

    def close(self) -> None:
        for selector in (self.selector, self.batched):
            for key in list(selector.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]
            selector.close()

    def connect(self, count: int, deadline: float) -> None:
        """Open *count* client sockets; return once the server has greeted every one."""
        soft, _hard = raise_open_files_limit()
        if 0 < soft < count + 100:
            raise OSError(f"{count} clients need more open files than the limit of {soft}")
        name = self.server.name
        next_report = perf_counter() + _REPORT_EVERY
        while self.ready < count:
            while len(self.conns) < count and len(self.conns) - self.ready < _CONNECT_BATCH:
                conn = _Conn(self._open(len(self.conns)))
                if self.hello:
                    _send_all(conn.sock, self.hello)
                self.conns.append(conn)
                self.selector.register(conn.sock, selectors.EVENT_READ, conn)
            now = perf_counter()
            if now > deadline:
                raise TimeoutError(
                    f"{name}: {self.ready} of {count} clients greeted after {self._elapsed()}"
                )
            if now > next_report:
                self.progress(f"{name}: connecting {count} clients... {self.ready}/{count}")
                next_report = now + _REPORT_EVERY
            self._poll(min(0.1, deadline - now))

    def add_senders(self, count: int, read_interval: float = 0.0) -> None:
        """Make the first *count* clients senders (for Redis, each with its own publisher).

        With a *read_interval*, the other clients are read in batches, that often.
        """
        self.read_interval = read_interval
        for conn in self.conns[count:] if read_interval else ():
            self.selector.unregister(conn.sock)
            self.batched.register(conn.sock, selectors.EVENT_READ, conn)
        for sid, conn in enumerate(self.conns[:count]):
            sock = conn.sock
            if self.server.protocol == "redis":
                # A subscribed connection may not publish: give the sender a second one,
                # whose replies (the receiver counts) are read and dropped.
                sock = self._open()
                selector = self.batched if read_interval else self.selector
                selector.register(sock, selectors.EVENT_READ, _Conn(sock, ready=True))
            conn.sender = _Sender(sid, sock, self.frame)
            self.senders.append(conn.sender)

    def sync(self, deadline: float) -> None:
        """Repeat a broadcast until every client has received one.

        A greeted client is not necessarily in the room yet: a server may greet
        before it adds the client to the list a broadcast walks. Once a client
        has received a broadcast, it gets every later one.
        """
        self._count(b"s", target=1)
        sender = self.senders[0]
        seq = 0
        next_send = perf_counter()
        while self.reached < len(self.conns):
            now = perf_counter()
            if now > deadline:
                missing = len(self.conns) - self.reached
                raise TimeoutError(
                    f"{self.server.name}: {missing} clients got no broadcast in {self._elapsed()}"
                )
            if now >= next_send:
                _send_all(sender.sock, self.frame(message_text(b"s", sender.sid, seq)))
                seq += 1
                next_send = now + _SYNC_INTERVAL
            self._poll(min(next_send, deadline) - now)

    def settle(self, deadline: float) -> None:
        """Read until nothing has arrived for a while: the server has sent all it had."""
        last_data = perf_counter()
        bytes_seen = self.bytes_in
        next_report = last_data + _REPORT_EVERY
        while (now := perf_counter()) - last_data < _QUIET:
            mib = self.bytes_in / 2**20
            if now > deadline:
                raise TimeoutError(
                    f"{self.server.name}: still sending after {self._elapsed()}, {mib:.0f} MiB read"
                )
            if now > next_report:
                self.progress(f"{self.server.name}: waiting for quiet... {mib:.0f} MiB read")
                next_report = now + _REPORT_EVERY
            self._poll(last_data + _QUIET - now)
            if self.bytes_in != bytes_seen:
                bytes_seen = self.bytes_in
                last_data = perf_counter()

    def keep_reading(self, seconds: float) -> None:
        """Read whatever arrives for *seconds*, so that no server blocks on a full buffer."""
        end = perf_counter() + seconds
        while (now := perf_counter()) < end:
            self._poll(end - now)

    def run_phase(self, phase: bytes, duration: float, window: int) -> FanoutResult:
        """Send for *duration* s with *window* lines in flight per sender; count every copy."""
        clients = len(self.conns)
        self._count(phase)
        exact = self.exact and phase == b"m"
        for conn in self.conns if exact else ():
            conn.record = bytearray()
        for sender in self.senders:
            sender.start(phase)
        cpu_before = _own_cpu_seconds()
        server_cpu_before = self.server.cpu_seconds()
        start = perf_counter()
        stop_at = start + duration
        for sender in self.senders:
            sender.send(window)
        delivered = 0
        last_delivery = start
        sent = None  # known once the senders stop
        while True:
            now = perf_counter()
            if sent is None and now >= stop_at:
                for sender in self.senders:
                    sender.sending = False
                sent = sum(sender.seq for sender in self.senders)
            if sent is not None and (
                delivered >= sent * clients or now >= stop_at + _DRAIN_TIMEOUT
            ):
                break
            got = self._poll((stop_at if sent is None else stop_at + _DRAIN_TIMEOUT) - now)
            if got:
                delivered += got
                last_delivery = perf_counter()
        wall = perf_counter() - start
        loadgen_cpu = (_own_cpu_seconds() - cpu_before) / wall
        server_cpu = _share(server_cpu_before, self.server.cpu_seconds(), wall)
        assert all(conn.seen is not None for conn in self.conns)
        duplicates = disordered = None
        if exact:
            lost, duplicates, disordered = self._check_copies()
        else:
            lost = sum(max(0, sent - conn.seen.count) for conn in self.conns)  # type: ignore[union-attr]
        latencies = sorted(itertools.chain.from_iterable(s.latencies for s in self.senders))
        self.latencies = latencies
        seconds = last_delivery - start
        return FanoutResult(
            server=self.server.name,
            mode="typing" if window == 1 else "pipelined",
            clients=clients,
            senders=len(self.senders),
            window=window,
            seconds=seconds,
            messages=sent,
            deliveries=delivered,
            lost=lost,
            deliveries_per_s=delivered / seconds if seconds > 0 else 0.0,
            p50_ms=_percentile(latencies, 0.50) * 1000,
            p99_ms=_percentile(latencies, 0.99) * 1000,
            loadgen_cpu=loadgen_cpu,
            server_cpu=server_cpu,
            duplicates=duplicates,
            disordered=disordered,
        )

    def broadcast_once(self, seq: int, deadline: float) -> float:
        """Send one line from the first sender; return the seconds until every client had it."""
        self._count(b"b", target=1)
        sender = self.senders[0]
        start = perf_counter()
        _send_all(sender.sock, self.frame(message_text(b"b", sender.sid, seq)))
        while self.reached < len(self.conns):
            now = perf_counter()
            if now > deadline:
                missing = len(self.conns) - self.reached
                raise TimeoutError(
                    f"{self.server.name}: {missing} clients missed a broadcast ({self._elapsed()})"
                )
            self._poll(deadline - now)
        return perf_counter() - start

    # Private methods

    def _check_copies(self) -> tuple[int, int, int]:
        """Check every client's record of the measured phase; return (lost, duplicates, disordered).

        Each client must have every line each sender sent (its own included)
        exactly once, in the order the first client saw them. The records
        are dropped afterwards.
        """
        expected = {
            (b"%04d" % sender.sid, b"%08d" % seq)
            for sender in self.senders
            for seq in range(sender.seq)
        }
        lost = duplicates = disordered = 0
        first_seen: dict[tuple[bytes, bytes], int] | None = None
        for conn in self.conns:
            assert conn.record is not None
            copies = _MEASURED_COPY.findall(conn.record)
            conn.record = None
            distinct = dict.fromkeys(copies)  # in order of arrival, each once
            duplicates += len(copies) - len(distinct)
            lost += len(expected - distinct.keys())
            if first_seen is None:
                first_seen = {copy: place for place, copy in enumerate(distinct)}
                continue
            # Compared on the lines both have: a lost line is counted once, above.
            places = [first_seen[copy] for copy in distinct if copy in first_seen]
            disordered += places != sorted(places)
        return lost, duplicates, disordered

    def _open(self, index: int = 0) -> socket.socket:
        """Connect a client to the server, or to a group's server number *index* (wrapping)."""
        sock = socket.create_connection(self.addresses[index % len(self.addresses)], timeout=10.0)
        # Our lines must leave at once, not wait for an ACK: measure the server, not Nagle.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        return sock

    def _elapsed(self) -> str:
        return f"{perf_counter() - self.started:.0f} s"

    def _count(self, phase: bytes, target: int = 0) -> None:
        """Start counting *phase*'s lines at every client, from zero."""
        marker = b"> " + phase + b" "
        for conn in self.conns:
            conn.seen = MarkerCounter(marker)
        self.target = target or 2**62
        self.reached = 0

    def _poll(self, timeout: float) -> int:
        """Wait up to *timeout* s for data, read it; return the deliveries counted."""
        delivered = 0
        if self.read_interval:
            now = perf_counter()
            if now >= self.next_batch:
                delivered += self._read(self.batched.select(0))
                self.next_batch = now + self.read_interval
            timeout = min(timeout, self.next_batch - now)
        return delivered + self._read(self.selector.select(timeout))

    def _read(self, ready: list[tuple[selectors.SelectorKey, int]]) -> int:
        """Read each ready socket once; return the deliveries counted."""
        delivered = 0
        buffer = self.buffer
        for key, _events in ready:
            conn = key.data
            try:
                size = conn.sock.recv_into(buffer)
            except BlockingIOError:
                continue
            except OSError as error:
                raise ConnectionError(f"{self.server.name}: {error}") from error
            if not size:
                raise ConnectionError(f"{self.server.name} closed a client's connection")
            self.bytes_in += size
            if conn.record is not None:
                conn.record += memoryview(buffer)[:size]
            if not conn.ready:
                conn.ready = True
                self.ready += 1
            seen = conn.seen
            if seen is not None:
                found = seen.feed(buffer, size)
                if found:
                    delivered += found
                    if seen.count >= self.target > seen.count - found:
                        self.reached += 1
            sender = conn.sender
            if sender is not None and sender.own is not None:
                echoes = sender.own.feed(buffer, size)
                if echoes:
                    sender.on_echoes(echoes, perf_counter())
        return delivered


def _chat_frame(text: bytes) -> bytes:
    return text + b"\n"


def _redis_frame(text: bytes) -> bytes:
    # "<bench> " makes Redis deliveries carry the same "> m " marker as chat lines.
    return resp_command(b"PUBLISH", b"chat", b"<bench> " + text)


def _send_all(sock: socket.socket, data: bytes) -> None:
    # A sender has at most a window of short lines in flight, far less than a
    # socket's send buffer: a short write means the server stopped reading.
    try:
        sent = sock.send(data)
    except BlockingIOError:
        sent = 0
    if sent != len(data):
        raise ConnectionError("the server stopped reading: a client's send buffer is full")


def _merged(parts: list[tuple[FanoutResult, list[float]]]) -> FanoutResult:
    """Return one result for a server's slices (each with its sorted latencies)."""
    if len(parts) == 1:
        return parts[0][0]
    results = [result for result, _ in parts]
    latencies = sorted(itertools.chain.from_iterable(lat for _, lat in parts))
    seconds = sum(r.seconds for r in results)
    deliveries = sum(r.deliveries for r in results)

    def weighted(share: Callable[[FanoutResult], float | None]) -> float | None:
        shares = [share(r) for r in results]
        if any(value is None for value in shares):
            return None
        return sum(v * r.seconds for v, r in zip(shares, results, strict=True)) / seconds  # type: ignore[operator]

    first = results[0]
    return FanoutResult(
        server=first.server,
        mode=first.mode,
        clients=first.clients,
        senders=first.senders,
        window=first.window,
        seconds=seconds,
        messages=sum(r.messages for r in results),
        deliveries=deliveries,
        lost=sum(r.lost for r in results),
        duplicates=_summed([r.duplicates for r in results]),
        disordered=_summed([r.disordered for r in results]),
        deliveries_per_s=deliveries / seconds if seconds > 0 else 0.0,
        p50_ms=_percentile(latencies, 0.50) * 1000,
        p99_ms=_percentile(latencies, 0.99) * 1000,
        loadgen_cpu=weighted(lambda r: r.loadgen_cpu) or 0.0,
        server_cpu=weighted(lambda r: r.server_cpu),
    )


def _summed(counts: list[int | None]) -> int | None:
    """Return the sum of *counts*, or None if any is None (not counted)."""
    return None if any(count is None for count in counts) else sum(counts)  # type: ignore[arg-type]


def _terminate_connected(gen: _LoadGen, clients: int, timeout: float) -> StopResult:
    """SIGTERM *gen*'s server with every client still connected; return how that went."""
    # Clients that never end their side are the slowest kind to stop with:
    # each holds its goodbye open for the server's whole linger.
    gen.progress(f"{gen.server.name}: SIGTERM with {clients} clients connected...")
    return gen.server.terminate(timeout)


def _per_client(rss_before: int | None, rss_after: int | None, clients: int) -> float | None:
    """Return the KiB the server grew by per client, if its memory is known."""
    if rss_before is None or rss_after is None:
        return None
    return (rss_after - rss_before) / clients


def _share(before: float | None, after: float | None, seconds: float) -> float | None:
    """Return the share of one core used between two CPU-time readings, if both are known."""
    if before is None or after is None:
        return None
    return (after - before) / seconds


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _percentile(ordered: list[float], fraction: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]
