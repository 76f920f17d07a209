"""Run the whole comparison, print it as tables, and check the project's targets."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from chatlib.bench.loadgen import (
    CrowdResult,
    FanoutResult,
    Progress,
    ScaleResult,
    ServerGroup,
    run_crowd,
    run_fanout_alternating,
    run_scale,
    wait_until_linked,
)
from chatlib.bench.servers import (
    CHATLIB_ENGINES,
    SERVER_KINDS,
    STORE_SUFFIX,
    Server,
    ServerError,
    StopResult,
    available_servers,
    raise_open_files_limit,
    start_server,
)

__all__ = [
    "CLUSTER_ENGINE",
    "CLUSTER_SIZES",
    "CROWD_SIZES",
    "TARGETS",
    "THREADS_CROWD_UP_TO",
    "BenchReport",
    "TargetCheck",
    "check_targets",
    "format_report",
    "machine_info",
    "run_bench",
]

#: What chatlib's engines must reach, measured side by side in one run.
TARGETS = {
    "clients": 100,  # the fan-out targets are checked with this many clients...
    "senders": 10,  # ... and senders
    "window": 16,  # ... and, pipelined, this many lines in flight per sender
    "share_of_redis": 0.8,  # typing deliveries/s, each engine vs Redis pub/sub
    "pipelined_share_of_redis": 0.6,  # pipelined deliveries/s, each engine vs Redis
    "times_naive": 2.0,  # typing deliveries/s, each engine vs the naive server
    "store_share": 0.8,  # typing deliveries/s, each engine with --store vs without
    "idle_clients": 5000,  # the scale targets are checked with this many clients
    "asyncio_kib_per_client": 4.0,
    "asyncio_broadcast_ms": 100.0,
    "stop_s": 2.0,  # SIGTERM with idle_clients connected: every engine exits 0 within this
    # The crowd ("Fast at scale"): selectors and asyncio, at each of two sizes,
    # against Redis at the same size in the same run...
    "crowd_clients": 5000,
    "crowd_clients_most": 10000,
    "crowd_connect_x_redis": 2.0,  # all connected within this many times Redis's time
    "crowd_kib_per_client": 4.0,
    "crowd_broadcast_x_redis": 1.5,  # one broadcast reaches all within this times Redis's
    # ... and threads, a thread per client, at the smaller size on its own terms.
    "threads_crowd_clients": 5000,
    "threads_connect_s": 15.0,
    "threads_kib_per_client": 24.0,
}

#: The crowd sizes ``run_bench`` and ``python -m chatlib.bench --crowd`` run by default.
CROWD_SIZES = (1000, 5000, 10000)

#: The biggest crowd the threaded engine is given. Its threads and their
#: stacks make thousands of clients costly (docs/engines.md, "Which one to
#: pick"); 10,000 would measure that again, only slower.
THREADS_CROWD_UP_TO = 5000

#: The engine the cluster scenario runs, unless told otherwise.
CLUSTER_ENGINE = "asyncio"

#: How many servers share one Redis in the cluster scenario: each size is a cluster.
CLUSTER_SIZES = (2, 3)

# How long the servers of a cluster may take to see each other's users.
_LINK_TIMEOUT = 20.0

# The naive servers are the fan-out baseline; a crowd would measure their
# thread per client again, as it does for threads.
_NO_CROWD = ("naive", "naive-nagle")


@dataclass
class BenchReport:
    """Everything one :func:`run_bench` measured, by server name."""

    settings: dict[str, Any]
    machine: dict[str, str]
    typing: dict[str, FanoutResult] = field(default_factory=dict)
    pipelined: dict[str, FanoutResult] = field(default_factory=dict)
    scale: dict[str, ScaleResult] = field(default_factory=dict)
    crowd: list[CrowdResult] = field(default_factory=list)  #: one per (server, size), in run order
    #: The cluster scenario's typing runs: one server alone, Redis alone, and
    #: each cluster (``"asyncio x2"``: two servers on one Redis), by name.
    cluster: dict[str, FanoutResult] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  #: why a server has no numbers
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Return the report as plain data, targets included.

        ``crowd`` is a list of flat rows (:meth:`CrowdResult.to_json`), one per
        server and size: ``server``, ``clients``, ``connect_s``,
        ``kib_per_client``, ``broadcast_ms``, ``stop_s``...
        """
        data = asdict(self)
        data["crowd"] = [result.to_json() for result in self.crowd]
        data["targets"] = [asdict(check) for check in check_targets(self)]
        return data

    def crowd_result(self, server: str, clients: int) -> CrowdResult | None:
        """Return the crowd run of *server* with *clients*, or None if there was none."""
        for result in self.crowd:
            if result.server == server and result.clients == clients:
                return result
        return None


@dataclass
class TargetCheck:
    """One target: passed (True/False), or None when this run could not check it."""

    target: str
    passed: bool | None
    detail: str


def run_bench(
    servers: Sequence[str] | None = None,
    *,
    clients: int = 100,
    senders: int = 10,
    window: int = 16,
    duration: float = 3.0,
    warmup: float = 0.5,
    idle_clients: int = 5000,
    broadcasts: int = 5,
    scale_timeout: float = 300.0,
    crowd: Sequence[int] = CROWD_SIZES,
    store: bool = True,
    cluster_clients: int = 100,
    cluster_engine: str = CLUSTER_ENGINE,
    pin: bool = True,
    progress: Progress | None = None,
) -> BenchReport:
    """Measure each of *servers* (default: all available) in turn; return the report.

    Each server gets a fresh process for the fan-out runs with *clients*
    (typing, then pipelined with *window* lines in flight; 0 skips them); with
    *store*, each chatlib engine gets a second process beside the first, with
    ``--store`` on a fresh SQLite file (``engine+store`` in the report), and
    the two take turns in slices of the same runs
    (:func:`~chatlib.bench.loadgen.run_fanout_alternating`). Then a fresh
    process for the scale run with *idle_clients* (0 skips it), bounded by
    *scale_timeout* seconds, which ends by timing the server's exit after
    SIGTERM with every client still connected. Then one more process for each
    size in *crowd* (:func:`run_crowd`, also bounded by *scale_timeout*; an
    empty *crowd* skips it): threads only up to :data:`THREADS_CROWD_UP_TO`,
    the naive servers never. Last, the cluster scenario (0 *cluster_clients*
    skips it): the typing fan-out with *cluster_clients* on one
    *cluster_engine* server, on Redis pub/sub, and spread over each of
    :data:`CLUSTER_SIZES` servers linked through that Redis, every copy
    checked (``exact``). With *pin*, the servers run on one CPU and this
    process on another, for the duration of the call.
    """
    if cluster_engine not in CHATLIB_ENGINES:
        raise ValueError(
            f"the cluster runs one of {', '.join(CHATLIB_ENGINES)}, not {cluster_engine}"
        )
    say = progress or (lambda message: None)
    names = list(servers) if servers is not None else available_servers()
    settings = {
        "servers": names,
        "clients": clients,
        "senders": senders,
        "window": window,
        "duration": duration,
        "warmup": warmup,
        "idle_clients": idle_clients,
        "broadcasts": broadcasts,
        "scale_timeout": scale_timeout,
        "crowd": sorted({size for size in crowd if size > 0}),
        "store": store,
        "cluster_clients": cluster_clients,
        "cluster_engine": cluster_engine,
        "cluster_sizes": list(CLUSTER_SIZES),
    }
    report = BenchReport(settings=settings, machine=machine_info())
    if store and clients > 0 and set(names) & set(CHATLIB_ENGINES):
        # Where the file lives matters: tmpfs would hide every write to disk.
        report.notes.append(
            f"{STORE_SUFFIX}: the engine with --store on a fresh SQLite file under "
            f"{tempfile.gettempdir()} (WAL, synchronous=NORMAL)"
        )
    if servers is None:
        for name in SERVER_KINDS:
            if name not in names:
                why = "no redis-server" if name == "redis" else "no chatlib.server"
                report.notes.append(f"{name} skipped: {why} on this machine")
    _soft, hard = raise_open_files_limit()
    if 0 < hard < idle_clients + clients + 100:
        report.notes.append(
            f"the open-files hard limit ({hard}) is too low for {idle_clients} clients; "
            "raise it (ulimit -Hn, as root) or pass a smaller --idle-clients"
        )
    most = max(settings["crowd"], default=0)
    if 0 < hard < most + 100:
        report.notes.append(
            f"the open-files hard limit ({hard}) is too low for a crowd of {most} clients; "
            "raise it (ulimit -Hn, as root) or pass smaller --crowd sizes"
        )
    with _pinned(pin) as cpus:
        server_cpu, loadgen_cpu = cpus
        if server_cpu is not None:
            report.notes.append(
                f"servers ran on CPU {server_cpu}, the load generator on CPU {loadgen_cpu}"
            )
        load_before = _load_average()
        for name in names:
            if clients > 0:
                _measure_fanout(
                    report, name, server_cpu, say, store=store and name in CHATLIB_ENGINES
                )
            if idle_clients > 0 and name not in report.errors:
                _measure_scale(report, name, server_cpu, say)
            for size in _crowd_sizes(name, settings["crowd"]):
                if name in report.errors:
                    break  # a bigger crowd would fail too, after a longer wait
                _measure_crowd(report, name, size, server_cpu, say)
        if cluster_clients > 0:
            if shutil.which("redis-server"):
                _measure_cluster(report, server_cpu, say)
            else:
                report.notes.append("cluster skipped: no redis-server on this machine")
    # Others' work on the machine skews everything; say how busy it was.
    report.notes.append(f"load average (1 min): {load_before} before, {_load_average()} after")
    return report


def check_targets(report: BenchReport) -> list[TargetCheck]:
    """Check chatlib's engines against :data:`TARGETS`, as far as *report* allows."""
    checks = []
    s = report.settings
    sizes = (s["clients"], s["senders"])
    # At other sizes the ratios are shown, but they neither pass nor fail.
    right_size = sizes == (TARGETS["clients"], TARGETS["senders"])
    off_size = "" if right_size else ", at {} clients and {} senders".format(*sizes)
    window = s.get("window", TARGETS["window"])
    right_window = right_size and window == TARGETS["window"]
    off_window = off_size or ("" if right_window else f", with {window} lines in flight")
    modes = (
        ("typing", report.typing, TARGETS["share_of_redis"], right_size, off_size),
        (
            "pipelined",
            report.pipelined,
            TARGETS["pipelined_share_of_redis"],
            right_window,
            off_window,
        ),
    )
    times = TARGETS["times_naive"]
    for engine in CHATLIB_ENGINES:
        for mode, results, share, judged, off in modes:
            redis = results.get("redis")
            result = results.get(engine)
            targets = [f"{engine}: {mode} deliveries/s >= {share:.0%} of Redis"]
            if mode == "typing":
                targets.append(f"{engine}: typing deliveries/s >= {times:g}x naive")
            if result is None:
                why = report.errors.get(engine, "not run")
                failed = engine in report.errors
                checks += [TargetCheck(t, False if failed else None, why) for t in targets]
                continue
            checks.append(
                _check_ratio(targets[0], result, redis, "Redis", share, "{:.0%}", judged, off)
            )
            if mode == "typing":
                naive = results.get("naive")
                checks.append(
                    _check_ratio(targets[1], result, naive, "naive", times, "{:.1f}x", judged, off)
                )
    checks += [_check_store(report, engine, right_size, off_size) for engine in CHATLIB_ENGINES]

    wanted = TARGETS["idle_clients"]
    kib, ms = TARGETS["asyncio_kib_per_client"], TARGETS["asyncio_broadcast_ms"]
    memory = f"asyncio: < {kib:g} KiB per idle client at {wanted} clients"
    reach = f"asyncio: one broadcast reaches {wanted} idle clients in < {ms:g} ms"
    scale = report.scale.get("asyncio")
    if scale is None:
        skipped = "not run" if report.settings["idle_clients"] else "scale run skipped"
        why = report.errors.get("asyncio", skipped)
        failed = "asyncio" in report.errors
        checks.append(TargetCheck(memory, False if failed else None, why))
        checks.append(TargetCheck(reach, False if failed else None, why))
    elif scale.clients < wanted:
        why = f"measured with {scale.clients} clients; run with --idle-clients {wanted}"
        checks.append(TargetCheck(memory, None, why))
        checks.append(TargetCheck(reach, None, why))
    else:
        if scale.kib_per_client is None:
            checks.append(TargetCheck(memory, None, "no memory figures on this system"))
        else:
            detail = f"{scale.kib_per_client:.2f} KiB"
            checks.append(TargetCheck(memory, scale.kib_per_client < kib, detail))
        median = scale.broadcast_median_ms
        checks.append(TargetCheck(reach, median < ms, f"median {median:.1f} ms"))

    checks += _check_crowd(report)
    checks += [_check_stop(report, engine) for engine in CHATLIB_ENGINES]

    checks += _check_cluster(report)
    results = [*report.typing.values(), *report.pipelined.values()]
    lossy = [f"{r.server} ({r.mode}): {r.lost}" for r in results if r.lost]
    if not results:
        checks.append(TargetCheck("every server: no lost deliveries", None, "no fan-out runs"))
    else:
        detail = "; ".join(lossy) if lossy else f"{len(results)} runs"
        checks.append(TargetCheck("every server: no lost deliveries", not lossy, detail))
    return checks


def format_report(report: BenchReport) -> str:
    """Return the report as plain-text tables, with the targets at the end."""
    s = report.settings
    m = report.machine
    lines = [
        f"chatlib bench on {m['cpus']} CPUs ({m['cpu']}), {m['system']}, "
        f"Python {m['python']}, {m['redis']}",
        *(f"note: {note}" for note in report.notes),
    ]
    fanout = (("typing", report.typing), ("pipelined", report.pipelined))
    for mode, results in fanout if s["clients"] > 0 else ():
        in_flight = 1 if mode == "typing" else s["window"]
        lines += [
            "",
            f"Fan-out, {mode}: {s['clients']} clients, {s['senders']} senders, "
            f"{in_flight} line{'s' if in_flight > 1 else ''} in flight per sender, "
            f"{s['duration']:g} s",
        ]
        lines += _fanout_table(results)
    if s["idle_clients"] > 0:
        lines += [
            "",
            f"Connection scale: {s['idle_clients']} idle clients; broadcast: median of "
            f"{s['broadcasts']}, one line until every client has read it",
            "Stop: from SIGTERM, every client still connected (none reads or closes), "
            "until the server's process exited",
        ]
        lines += _scale_table(report.scale)
    if s.get("crowd"):
        sizes = s["crowd"]
        servers = [name for name in s["servers"] if name not in _NO_CROWD]
        limits = ""
        if "threads" in servers and sizes != _crowd_sizes("threads", sizes):
            limits = f" (threads: {_sizes_text(_crowd_sizes('threads', sizes)) or 'none'})"
        lines += [
            "",
            f"Crowd: {_sizes_text(sizes)} clients connecting at once{limits}, a fresh server "
            "each time, nobody waiting for it to settle",
            "connect: from the first connect to the last greeting; KiB/client: 1 s later; "
            "broadcast: one line until every client had it; CPU: while connecting",
        ]
        lines += _crowd_table(report.crowd)
    if s.get("cluster_clients", 0) > 0:
        lines += _cluster_section(report)
    if report.errors:
        lines += ["", "Errors"]
        lines += [f"  {name}: {error}" for name, error in report.errors.items()]
    lines += ["", "Targets"]
    marks = {True: "PASS", False: "FAIL", None: "n/a "}
    lines += [f"  {marks[c.passed]}  {c.target} ({c.detail})" for c in check_targets(report)]
    return "\n".join(lines)


def machine_info() -> dict[str, str]:
    """Describe this machine: CPUs, CPU model, system, Python and redis-server versions."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.partition(":")[2].strip()
                    break
    except OSError:
        pass
    redis = "no redis-server"
    if executable := shutil.which("redis-server"):
        version = subprocess.run([executable, "--version"], capture_output=True, text=True)
        redis = " ".join(version.stdout.split()[:3]) or "redis-server (unknown version)"
    return {
        "cpus": str(os.cpu_count()),
        "cpu": cpu,
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "redis": redis,
    }


# Private helpers


def _check_ratio(
    target: str,
    result: FanoutResult,
    baseline: FanoutResult | None,
    baseline_name: str,
    wanted: float,
    shown_as: str,
    judged: bool,
    off: str,
) -> TargetCheck:
    """Check *result*'s deliveries/s against at least *wanted* times *baseline*'s.

    The ratio is shown formatted with *shown_as*; unless *judged* (the run had
    the targets' sizes), it neither passes nor fails.
    """
    if baseline is None:
        return TargetCheck(target, None, f"{baseline_name} not run")
    ratio = result.deliveries_per_s / baseline.deliveries_per_s
    return TargetCheck(target, ratio >= wanted if judged else None, shown_as.format(ratio) + off)


def _check_cluster(report: BenchReport) -> list[TargetCheck]:
    """Check that every copy in the cluster scenario arrived, once, in one order everywhere."""
    target = "cluster: every line reaches every client on every server, once, in one order"
    if not report.settings.get("cluster_clients"):
        return [TargetCheck(target, None, "cluster skipped")]
    failed = [name for name in report.errors if name.startswith("cluster: ")]
    if failed:
        return [TargetCheck(target, False, "; ".join(f"{n}: {report.errors[n]}" for n in failed))]
    if not report.cluster:
        return [TargetCheck(target, None, "not run")]
    bad = [
        f"{name}: {r.lost} lost, {r.duplicates} twice, {r.disordered} out of order"
        for name, r in report.cluster.items()
        if r.lost or r.duplicates or r.disordered
    ]
    detail = "; ".join(bad) or f"{sum(r.deliveries for r in report.cluster.values()):,} copies"
    return [TargetCheck(target, not bad, detail)]


def _check_store(report: BenchReport, engine: str, judged: bool, off: str) -> TargetCheck:
    """Check *engine*'s typing deliveries/s with ``--store`` against its own without."""
    share = TARGETS["store_share"]
    target = f"{engine}: typing deliveries/s with --store >= {share:.0%} of without"
    name = engine + STORE_SUFFIX
    result = report.typing.get(name)
    if result is not None:
        return _check_ratio(
            target, result, report.typing.get(engine), engine, share, "{:.0%}", judged, off
        )
    if name in report.errors:
        return TargetCheck(target, False, report.errors[name])
    skipped = "not run" if report.settings.get("store", True) else "not run: --no-store"
    return TargetCheck(target, None, skipped)


def _check_stop(report: BenchReport, engine: str) -> TargetCheck:
    wanted, seconds = TARGETS["idle_clients"], TARGETS["stop_s"]
    target = f"{engine}: SIGTERM with {wanted} clients connected exits 0 within {seconds:g} s"
    scale = report.scale.get(engine)
    crowd = _crowd_to_judge_stop(report, engine, wanted)
    if scale is not None and scale.stop is not None:
        stop, clients, source, option = scale.stop, scale.clients, "", "--idle-clients"
    elif crowd is not None and crowd.stop is not None:
        # Without a scale run, a crowd's stop stands in: the same SIGTERM, with
        # every client connected and none reading.
        stop, clients, source, option = crowd.stop, crowd.clients, "crowd: ", "--crowd"
    else:
        ran = report.settings["idle_clients"] or report.settings.get("crowd")
        skipped = "not run" if ran else "scale and crowd runs skipped"
        failed = engine in report.errors
        return TargetCheck(target, False if failed else None, report.errors.get(engine, skipped))
    passed = not stop.killed and stop.status == 0 and stop.seconds <= seconds
    if clients >= wanted:
        more = f" with {clients} clients" if clients > wanted else ""
        return TargetCheck(target, passed, f"{source}{_stop_text(stop)}{more}")
    # More clients only make stopping slower: a miss with fewer is a miss.
    detail = f"{source}{_stop_text(stop)} with {clients} clients; run with {option} {wanted}"
    return TargetCheck(target, None if passed else False, detail)


def _crowd_to_judge_stop(report: BenchReport, engine: str, wanted: int) -> CrowdResult | None:
    """Return the crowd run closest to *wanted* clients from above, else the biggest."""
    runs = sorted(
        (r for r in report.crowd if r.server == engine and r.stop is not None),
        key=lambda r: r.clients,
    )
    at_least = [r for r in runs if r.clients >= wanted]
    if at_least:
        return at_least[0]
    return runs[-1] if runs else None


def _check_crowd(report: BenchReport) -> list[TargetCheck]:
    """Check the crowd targets: selectors and asyncio against Redis, threads on its own."""
    kib, connect_x = TARGETS["crowd_kib_per_client"], TARGETS["crowd_connect_x_redis"]
    broadcast_x = TARGETS["crowd_broadcast_x_redis"]
    checks = []
    n = TARGETS["threads_crowd_clients"]
    seconds, threads_kib = TARGETS["threads_connect_s"], TARGETS["threads_kib_per_client"]
    checks += [
        _crowd_check(
            report,
            "threads",
            n,
            f"threads: a crowd of {n:,} all connected within {seconds:g} s",
            lambda r: (r.connect_s <= seconds, f"{r.connect_s:.2f} s"),
        ),
        _crowd_check(
            report,
            "threads",
            n,
            f"threads: < {threads_kib:g} KiB per client in a crowd of {n:,}",
            lambda r: _memory(r, threads_kib),
        ),
    ]
    for n in (TARGETS["crowd_clients"], TARGETS["crowd_clients_most"]):
        redis = report.crowd_result("redis", n)
        for engine in ("selectors", "asyncio"):
            checks += [
                _crowd_check(
                    report,
                    engine,
                    n,
                    f"{engine}: a crowd of {n:,} all connected within {connect_x:g}x Redis's time",
                    lambda r, redis=redis, n=n: _vs_redis(
                        r.connect_s, redis and redis.connect_s, connect_x, "s", n
                    ),
                ),
                _crowd_check(
                    report,
                    engine,
                    n,
                    f"{engine}: < {kib:g} KiB per client in a crowd of {n:,}",
                    lambda r: _memory(r, kib),
                ),
                _crowd_check(
                    report,
                    engine,
                    n,
                    f"{engine}: a broadcast reaches a crowd of {n:,} within {broadcast_x:g}x "
                    "Redis's time",
                    lambda r, redis=redis, n=n: _vs_redis(
                        r.broadcast_ms, redis and redis.broadcast_ms, broadcast_x, "ms", n
                    ),
                ),
            ]
    return checks


def _crowd_check(
    report: BenchReport,
    engine: str,
    clients: int,
    target: str,
    judge: Callable[[CrowdResult], tuple[bool | None, str]],
) -> TargetCheck:
    """Judge *engine*'s crowd of *clients*: failed, not run, or what *judge* says."""
    result = report.crowd_result(engine, clients)
    if result is not None:
        return TargetCheck(target, *judge(result))
    if engine in report.errors:
        return TargetCheck(target, False, report.errors[engine])
    if clients not in report.settings.get("crowd", ()):
        return TargetCheck(target, None, f"not run; run with --crowd {clients}")
    return TargetCheck(target, None, "not run")


def _memory(result: CrowdResult, kib: float) -> tuple[bool | None, str]:
    if result.kib_per_client is None:
        return None, "no memory figures on this system"
    return result.kib_per_client < kib, f"{result.kib_per_client:.2f} KiB"


def _vs_redis(
    value: float, redis: float | None, times: float, unit: str, clients: int
) -> tuple[bool | None, str]:
    digits = 1 if unit == "ms" else 2  # as the crowd table shows them
    if redis is None:
        return None, f"{value:.{digits}f} {unit}; Redis not run with {clients:,}"
    ratio = value / redis if redis > 0 else float("inf")
    shown = f"{value:.{digits}f} {unit}, {ratio:.2f}x Redis's {redis:.{digits}f} {unit}"
    return ratio <= times, shown


def _measure_fanout(
    report: BenchReport, name: str, cpu: int | None, say: Progress, *, store: bool = False
) -> None:
    """Run the fan-out on *name*; with *store*, on it and on *name*+store, in turns."""
    s = report.settings
    servers = [_start(report, name, cpu, say)]
    if store:
        servers.append(_start(report, name, cpu, say, store=True))
    running = [server for server in servers if server is not None]
    if not running:
        return
    names = ", ".join(server.name for server in running)
    with contextlib.ExitStack() as stack:
        for server in running:
            stack.enter_context(server)
        try:
            for window, results in ((1, report.typing), (s["window"], report.pipelined)):
                mode = "typing" if window == 1 else "pipelined"
                say(f"{names}: {mode}, {s['clients']} clients, {s['senders']} senders...")
                # With a store, both servers take turns: their ratio is the
                # point, and a burst of other work on the machine must not
                # fall on one of them only.
                measured = run_fanout_alternating(
                    running,
                    clients=s["clients"],
                    senders=s["senders"],
                    window=window,
                    duration=s["duration"],
                    warmup=s["warmup"],
                    progress=say,
                )
                for result in measured:
                    results[result.server] = result
                    say(f"{result.server}: {result.deliveries_per_s:,.0f} deliveries/s")
        except OSError as error:  # ConnectionError and TimeoutError included
            for server in running:
                _record_error(report, server.name, "fan-out", error, server, say)
        for server in running:
            _note_exit(report, server)


def _measure_scale(report: BenchReport, name: str, cpu: int | None, say: Progress) -> None:
    s = report.settings
    server = _start(report, name, cpu, say)
    if server is None:
        return
    with server:
        try:
            say(f"{name}: connecting {s['idle_clients']} idle clients...")
            result = run_scale(
                server,
                clients=s["idle_clients"],
                broadcasts=s["broadcasts"],
                timeout=s["scale_timeout"],
                stop=True,
                progress=say,
            )
            report.scale[name] = result
            say(f"{name}: one broadcast to all in {result.broadcast_median_ms:.1f} ms")
            assert result.stop is not None
            say(f"{name}: stop after SIGTERM: {_stop_text(result.stop)}")
        except (OSError, ServerError) as error:
            _record_error(report, name, "scale", error, server, say)
        _note_exit(report, server)


def _measure_crowd(
    report: BenchReport, name: str, size: int, cpu: int | None, say: Progress
) -> None:
    server = _start(report, name, cpu, say)
    if server is None:
        return
    with server:
        try:
            say(f"{name}: a crowd of {size:,} clients at once...")
            result = run_crowd(
                server, clients=size, timeout=report.settings["scale_timeout"], progress=say
            )
            report.crowd.append(result)
            assert result.stop is not None
            say(
                f"{name}: {size:,} connected in {result.connect_s:.2f} s, broadcast in "
                f"{result.broadcast_ms:.1f} ms, stop after SIGTERM: {_stop_text(result.stop)}"
            )
        except (OSError, ServerError) as error:
            _record_error(report, name, f"crowd of {size}", error, server, say)
        _note_exit(report, server)


def _measure_cluster(report: BenchReport, cpu: int | None, say: Progress) -> None:
    """Run the typing fan-out on one server, on Redis, and on each cluster over that Redis.

    One redis-server serves as the Redis row and as every cluster's broker.
    The clusters run one after the other, each stopped before the next
    starts: servers on one Redis make one chat, so two clusters up at once
    would be one cluster of five.
    """
    s = report.settings
    engine = s["cluster_engine"]
    clients = s["cluster_clients"]
    runs = {
        "clients": clients,
        "senders": min(s["senders"], clients),
        "duration": s["duration"],
        "warmup": s["warmup"],
        "exact": True,
        "progress": say,
    }
    with contextlib.ExitStack() as stack:
        broker = _start(report, "redis", cpu, say, errors_as="cluster: redis")
        alone = _start(report, engine, cpu, say, errors_as=f"cluster: {engine}")
        for server in (broker, alone):
            if server is not None:
                stack.enter_context(server)
        measured = [server for server in (alone, broker) if server is not None]
        say(f"cluster: {', '.join(server.name for server in measured)}, typing, in turns...")
        try:
            # The two baselines take turns, as a server and its store do.
            for result in run_fanout_alternating(measured, **runs):
                report.cluster[result.server] = result
                say(f"cluster: {result.server}: {result.deliveries_per_s:,.0f} deliveries/s")
        except OSError as error:
            for server in measured:
                _record_error(report, f"cluster: {server.name}", "fan-out", error, server, say)
        if broker is None:
            return  # no cluster without its broker; the error is recorded
        for size in s["cluster_sizes"]:
            _measure_one_cluster(report, f"{engine} x{size}", engine, size, broker, cpu, runs, say)
        for server in measured:
            _note_exit(report, server)


def _measure_one_cluster(
    report: BenchReport,
    name: str,
    engine: str,
    size: int,
    broker: Server,
    cpu: int | None,
    runs: dict[str, Any],
    say: Progress,
) -> None:
    """Start *size* servers on *broker*, wait until they are linked, measure, stop them.

    The result's server CPU is theirs and the broker's together: what the
    whole cluster cost.
    """
    label = f"cluster: {name}"
    url = f"redis://{broker.host}:{broker.port}/0"
    with contextlib.ExitStack() as stack:
        servers = []
        for _ in range(size):
            server = _start(report, engine, cpu, say, broker=url, errors_as=label)
            if server is None:
                return  # the ExitStack stops those already started
            servers.append(stack.enter_context(server))
        group = ServerGroup(name, servers, broker=broker)
        try:
            linked_s = wait_until_linked(group, _LINK_TIMEOUT)
            report.notes.append(
                f"{name}: every server listed every other's users after {linked_s:.2f} s"
            )
            say(f"{label}: linked; typing, {runs['clients']} clients spread over {size}...")
            (result,) = run_fanout_alternating([group], **runs)
            report.cluster[name] = result
            say(f"{label}: {result.deliveries_per_s:,.0f} deliveries/s, {result.lost} lost")
        except OSError as error:  # TimeoutError and ConnectionError included
            _record_error(report, label, "fan-out", error, group, say)
        for server in servers:
            _note_exit(report, server)


def _crowd_sizes(name: str, sizes: Sequence[int]) -> list[int]:
    """Return the crowd sizes server *name* runs, of *sizes*."""
    if name in _NO_CROWD:
        return []
    if name == "threads":
        return [size for size in sizes if size <= THREADS_CROWD_UP_TO]
    return list(sizes)


def _sizes_text(sizes: Sequence[int]) -> str:
    """Return ``1,000, 5,000 and 10,000`` for (1000, 5000, 10000)."""
    words = [f"{size:,}" for size in sizes]
    return " and ".join(filter(None, [", ".join(words[:-1]), *words[-1:]]))


def _start(
    report: BenchReport,
    name: str,
    cpu: int | None,
    say: Progress,
    *,
    store: bool = False,
    broker: str | None = None,
    errors_as: str | None = None,
) -> Server | None:
    """Start a server; on failure, record why under *errors_as* (default: its name)."""
    label = errors_as or (name + STORE_SUFFIX if store else name)
    say(f"{label}: starting the server...")
    try:
        return start_server(name, store=store, cpu=cpu, broker=broker)
    except ServerError as error:
        report.errors[label] = str(error)
        say(f"{label}: {error}")
        return None


def _record_error(
    report: BenchReport,
    name: str,
    run: str,
    error: Exception,
    server: Server | ServerGroup,
    say: Progress,
) -> None:
    message = f"{run}: {type(error).__name__}: {error}"
    tail = server.output(limit=600).strip().splitlines()[-3:]
    if tail:
        message += " -- the server's last output: " + " | ".join(tail)
    report.errors[name] = message
    say(f"{name}: {message}")


def _note_exit(report: BenchReport, server: Server) -> None:
    status = server.stop()
    if status not in (0, None):
        report.notes.append(f"{server.name} exited with status {status} after SIGTERM")


def _load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):  # Windows has none
        return "?"


@contextmanager
def _pinned(pin: bool) -> Iterator[tuple[int | None, int | None]]:
    """Yield (server CPU, load generator CPU), this process pinned to the latter meanwhile."""
    if not pin or not hasattr(os, "sched_setaffinity"):
        yield (None, None)
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        yield (None, None)
        return
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpus[1]})
    try:
        yield (cpus[0], cpus[1])
    finally:
        os.sched_setaffinity(0, saved)


def _fanout_table(results: dict[str, FanoutResult]) -> list[str]:
    redis = results.get("redis")
    naive = results.get("naive")
    # The column shows only when there are rows with a store to hold against their engine's.
    stored = any(name.endswith(STORE_SUFFIX) for name in results)
    rows = [
        (
            "server",
            "deliveries/s",
            "% of Redis",
            "x naive",
            *(["vs no store"] if stored else []),
            "p50 ms",
            "p99 ms",
            "lost",
            "server CPU",
            "loadgen CPU",
        )
    ]
    for name, r in results.items():
        plain = results.get(name.removesuffix(STORE_SUFFIX))
        vs_plain = "-"
        if name.endswith(STORE_SUFFIX) and plain is not None:
            vs_plain = f"{r.deliveries_per_s / plain.deliveries_per_s:.0%}"
        rows.append(
            (
                name,
                f"{r.deliveries_per_s:,.0f}",
                f"{r.deliveries_per_s / redis.deliveries_per_s:.0%}" if redis else "-",
                f"{r.deliveries_per_s / naive.deliveries_per_s:.1f}x" if naive else "-",
                *([vs_plain] if stored else []),
                f"{r.p50_ms:.2f}",
                f"{r.p99_ms:.2f}",
                str(r.lost),
                _percent(r.server_cpu),
                _percent(r.loadgen_cpu),
            )
        )
    return _table(rows) if len(rows) > 1 else ["  (no results)"]


def _scale_table(results: dict[str, ScaleResult]) -> list[str]:
    rows = [
        (
            "server",
            "KiB/client",
            "RSS MiB before -> after",
            "connect+settle s",
            "broadcast ms",
            "(each)",
            "loadgen CPU",
            "stop after SIGTERM",
        )
    ]
    for name, r in results.items():
        rss = "-"
        if r.rss_before_kib is not None and r.rss_after_kib is not None:
            rss = f"{r.rss_before_kib / 1024:.1f} -> {r.rss_after_kib / 1024:.1f}"
        rows.append(
            (
                name,
                "-" if r.kib_per_client is None else f"{r.kib_per_client:.2f}",
                rss,
                f"{r.connect_s:.1f}",
                f"{r.broadcast_median_ms:.1f}",
                " ".join(f"{t:.0f}" for t in r.broadcast_ms),
                _percent(r.loadgen_cpu),
                "-" if r.stop is None else _stop_text(r.stop),
            )
        )
    return _table(rows) if len(rows) > 1 else ["  (no results)"]


def _cluster_section(report: BenchReport) -> list[str]:
    """Return the cluster section: the table, the hop's cost per cluster, and any loss, loudly."""
    s = report.settings
    engine, results = s["cluster_engine"], report.cluster
    clients = s["cluster_clients"]
    senders = min(s["senders"], clients)
    lines = [
        "",
        f"Cluster: typing, {clients} clients and {senders} senders, {s['duration']:g} s: "
        f"one {engine} server, Redis pub/sub, and {engine} servers on that Redis, the "
        "clients spread evenly; every copy checked (lost: a line a client never got)",
    ]
    rows = [
        (
            "setup",
            "chat servers",
            "deliveries/s",
            f"vs one {engine}",
            "p50 ms",
            "p99 ms",
            "lost",
            "twice",
            "out of order",
            "server CPU",
            "loadgen CPU",
        )
    ]
    alone = results.get(engine)
    for name, r in results.items():
        servers = "-" if name == "redis" else name.rpartition(" x")[2] if " x" in name else "1"
        rows.append(
            (
                name,
                servers,
                f"{r.deliveries_per_s:,.0f}",
                f"{r.deliveries_per_s / alone.deliveries_per_s:.2f}x" if alone else "-",
                f"{r.p50_ms:.2f}",
                f"{r.p99_ms:.2f}",
                str(r.lost),
                "-" if r.duplicates is None else str(r.duplicates),
                "-" if r.disordered is None else str(r.disordered),
                _percent(r.server_cpu),
                _percent(r.loadgen_cpu),
            )
        )
    lines += _table(rows) if len(rows) > 1 else ["  (no results)"]
    clusters = [(name, r) for name, r in results.items() if " x" in name]
    for name, r in clusters if alone else ():
        lines.append(
            f"  {name}: the broker hop costs {alone.deliveries_per_s / r.deliveries_per_s:.1f}x: "
            f"{r.deliveries_per_s / alone.deliveries_per_s:.2f}x one {engine} server's "
            f"deliveries/s, p50 {r.p50_ms / alone.p50_ms:.1f}x and p99 "
            f"{r.p99_ms / alone.p99_ms:.1f}x its latency"
        )
    if clusters:
        cpus = report.machine["cpus"]
        pinned = any(note.startswith("servers ran on CPU") for note in report.notes)
        where = "every server and Redis shared one CPU" if pinned else f"all shared {cpus} CPUs"
        lines.append(
            f"  On this machine ({cpus} CPUs) {where}, so a cluster cannot be faster than one "
            "server: each line costs every server its fan-out plus a trip through Redis. This "
            "measures what the hop costs, not how a cluster on several machines scales."
        )
    for name, r in results.items():
        if r.lost or r.duplicates or r.disordered:
            lines.append(
                f"  !!! {name}: {r.lost} LOST deliveries, {r.duplicates} twice, "
                f"{r.disordered} clients out of order: a bug, not a measurement"
            )
    return lines


def _crowd_table(results: list[CrowdResult]) -> list[str]:
    rows = [
        (
            "server",
            "clients",
            "connect s",
            "x Redis",
            "KiB/client",
            "broadcast ms",
            "x Redis",
            "stop after SIGTERM",
            "server CPU",
            "loadgen CPU",
        )
    ]
    redis = {r.clients: r for r in results if r.server == "redis"}
    # By size, then in run order: each row sits next to the Redis row it is compared with.
    for r in sorted(results, key=lambda r: r.clients):
        ref = redis.get(r.clients)
        rows.append(
            (
                r.server,
                f"{r.clients:,}",
                f"{r.connect_s:.2f}",
                f"{r.connect_s / ref.connect_s:.2f}x" if ref and ref.connect_s else "-",
                "-" if r.kib_per_client is None else f"{r.kib_per_client:.2f}",
                f"{r.broadcast_ms:.1f}",
                f"{r.broadcast_ms / ref.broadcast_ms:.2f}x" if ref and ref.broadcast_ms else "-",
                "-" if r.stop is None else _stop_text(r.stop),
                _percent(r.server_cpu),
                _percent(r.loadgen_cpu),
            )
        )
    return _table(rows) if len(rows) > 1 else ["  (no results)"]


def _stop_text(stop: StopResult) -> str:
    if stop.killed:
        return f"killed after {stop.seconds:.1f} s"
    return f"{stop.seconds:.2f} s, exit {stop.status}"


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{share:.0%}"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    """Align *rows*: the first column left, the others right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        out.append("  " + "  ".join(cells))
    return out
