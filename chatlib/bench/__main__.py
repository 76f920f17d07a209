"""Command line: ``python -m chatlib.bench``. See ``--help`` and docs/benchmarks.md."""

from __future__ import annotations

import argparse
import json
import sys

from chatlib.bench.report import (
    CLUSTER_ENGINE,
    CLUSTER_SIZES,
    CROWD_SIZES,
    THREADS_CROWD_UP_TO,
    format_report,
    run_bench,
)
from chatlib.bench.servers import CHATLIB_ENGINES, SERVER_KINDS, available_servers

# --quick: small enough for CI and notebooks, big enough to exercise every path.
_QUICK = {
    "clients": 20,
    "senders": 4,
    "duration": 1.0,
    "warmup": 0.2,
    "idle_clients": 500,
    "crowd": (200,),
    "cluster_clients": 12,  # 6 per server in a cluster of 2, 4 in one of 3
}

# What --cluster-only turns off: everything else.
_ONLY_CLUSTER = {"clients": 0, "idle_clients": 0, "crowd": ()}


def _sizes(text: str) -> tuple[int, ...]:
    """Parse ``--crowd``: comma-separated client counts; 0 and empty items are dropped."""
    try:
        sizes = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of numbers: {text!r}"
        ) from None
    if any(size < 0 for size in sizes):
        raise argparse.ArgumentTypeError(f"a crowd cannot be negative: {text!r}")
    return tuple(sorted(size for size in sizes if size > 0))


def _shown(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float | int) else str(value)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the tables; return 0, or 1 if a server failed to run."""
    parser = argparse.ArgumentParser(
        prog="python -m chatlib.bench",
        description="Compare chat servers on 127.0.0.1: chatlib's engines, a naive "
        "thread-per-client server and Redis pub/sub. Every run is bounded in time. "
        "docs/benchmarks.md explains the numbers.",
    )
    parser.add_argument(
        "--servers",
        help=f"comma-separated, from {','.join(SERVER_KINDS)} (default: those available here: "
        f"{','.join(available_servers())})",
    )
    add = parser.add_argument
    add(
        "--clients",
        type=int,
        default=100,
        help="clients in the fan-out runs; 0 skips them (%(default)s)",
    )
    add("--senders", type=int, default=10, help="how many of them send (%(default)s)")
    add("--window", type=int, default=16, help="lines in flight when pipelined (%(default)s)")
    add("--duration", type=float, default=3.0, help="seconds measured per run (%(default)s)")
    add("--warmup", type=float, default=0.5, help="seconds before measuring (%(default)s)")
    add(
        "--idle-clients",
        type=int,
        default=5000,
        help="clients in the scale run, which ends by timing a SIGTERM; 0 skips it (%(default)s)",
    )
    add("--broadcasts", type=int, default=5, help="broadcasts timed at scale (%(default)s)")
    add(
        "--crowd",
        metavar="SIZES",
        type=_sizes,
        default=CROWD_SIZES,
        help="comma-separated crowd sizes: for each, a fresh server gets that many clients "
        "connecting at once, then one broadcast and a SIGTERM; threads runs only those up to "
        f"{THREADS_CROWD_UP_TO:,}, the naive servers none; '' or 0 skips it "
        f"(default: {_shown(CROWD_SIZES)})",
    )
    add(
        "--store",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run each chatlib engine's fan-out also with the server's --store on a fresh "
        "SQLite file (engine+store in the tables), the two taking turns; --no-store "
        "skips it (default: on)",
    )
    add(
        "--cluster-clients",
        type=int,
        default=100,
        help="clients in the cluster scenario: the typing fan-out on one server, on Redis "
        f"alone, and spread over {' and over '.join(map(str, CLUSTER_SIZES))} servers "
        "linked through that Redis; 0 skips it (%(default)s)",
    )
    add(
        "--cluster-engine",
        choices=CHATLIB_ENGINES,
        default=CLUSTER_ENGINE,
        help="the engine the cluster scenario runs (%(default)s)",
    )
    add(
        "--cluster-only",
        action="store_true",
        help="run only the cluster scenario: "
        + ", ".join(
            f"--{k.replace('_', '-')} {_shown(v) or repr('')}" for k, v in _ONLY_CLUSTER.items()
        ),
    )
    add(
        "--scale-timeout",
        type=float,
        default=300.0,
        help="seconds allowed per scale or crowd run (%(default)s)",
    )
    add(
        "--quick",
        action="store_true",
        help="small sizes for CI and notebooks: "
        + ", ".join(f"--{k.replace('_', '-')} {_shown(v)}" for k, v in _QUICK.items()),
    )
    add(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not pin the server and the load generator to separate CPUs",
    )
    add("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**_QUICK)
        args = parser.parse_args(argv)  # explicit options still win over --quick
    if args.cluster_only:
        if args.cluster_clients <= 0:
            parser.error("--cluster-only with --cluster-clients 0 leaves nothing to run")
        for name, value in _ONLY_CLUSTER.items():
            setattr(args, name, value)
    servers = None  # all available
    if args.servers:
        servers = [name.strip() for name in args.servers.split(",") if name.strip()]
        unknown = sorted(set(servers) - set(SERVER_KINDS))
        if unknown:
            parser.error(f"unknown server(s): {', '.join(unknown)}")

    report = run_bench(
        servers,
        clients=args.clients,
        senders=args.senders,
        window=args.window,
        duration=args.duration,
        warmup=args.warmup,
        idle_clients=args.idle_clients,
        broadcasts=args.broadcasts,
        scale_timeout=args.scale_timeout,
        crowd=args.crowd,
        store=args.store,
        cluster_clients=args.cluster_clients,
        cluster_engine=args.cluster_engine,
        pin=args.pin,
        progress=lambda message: print(message, file=sys.stderr, flush=True),
    )
    print(format_report(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(report.to_json(), out, indent=2)
    # A missed target is in the text; the exit status says whether everything ran.
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
