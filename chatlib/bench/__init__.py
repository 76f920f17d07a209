"""Benchmark chatlib's engines side by side with a naive server and Redis pub/sub.

Run ``python -m chatlib.bench`` (``--help`` for the options), or drive it from
Python::

    from chatlib.bench import (
        ServerGroup, run_crowd, run_fanout, run_fanout_alternating, run_scale,
        start_server, wait_until_linked,
    )

    with start_server("asyncio") as server:
        typing = run_fanout(server, clients=100, senders=10)
        scale = run_scale(server, clients=1000)
    print(typing.deliveries_per_s, typing.p99_ms, scale.kib_per_client)

    with start_server("asyncio") as server:  # a crowd wants a fresh server
        crowd = run_crowd(server, clients=1000)  # stops the server at the end
    print(crowd.connect_s, crowd.kib_per_client, crowd.broadcast_ms, crowd.stop)

    # An engine with and without a history store, taking turns on the machine.
    with start_server("asyncio") as plain, start_server("asyncio", store=True) as stored:
        without, with_store = run_fanout_alternating([plain, stored])
    print(with_store.deliveries_per_s / without.deliveries_per_s)

    # Two servers on one Redis: the clients spread over both, every copy checked.
    with start_server("redis") as redis:
        url = f"redis://127.0.0.1:{redis.port}/0"
        with start_server("asyncio", broker=url) as a, start_server("asyncio", broker=url) as b:
            pair = ServerGroup("asyncio x2", [a, b])
            wait_until_linked(pair)
            (linked,) = run_fanout_alternating([pair], exact=True)
    print(linked.deliveries_per_s, linked.lost, linked.disordered)

Every server runs in its own process on 127.0.0.1 and the load generator in
this one; docs/benchmarks.md explains what each number means.
"""

from chatlib.bench.loadgen import (
    CrowdResult,
    FanoutResult,
    MarkerCounter,
    ScaleResult,
    ServerGroup,
    message_text,
    resp_command,
    run_crowd,
    run_fanout,
    run_fanout_alternating,
    run_scale,
    wait_until_linked,
)
from chatlib.bench.report import (
    CLUSTER_ENGINE,
    CLUSTER_SIZES,
    CROWD_SIZES,
    TARGETS,
    THREADS_CROWD_UP_TO,
    BenchReport,
    TargetCheck,
    check_targets,
    format_report,
    machine_info,
    run_bench,
)
from chatlib.bench.servers import (
    CHATLIB_ENGINES,
    HOST,
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
    "CHATLIB_ENGINES",
    "CLUSTER_ENGINE",
    "CLUSTER_SIZES",
    "CROWD_SIZES",
    "HOST",
    "SERVER_KINDS",
    "STORE_SUFFIX",
    "TARGETS",
    "THREADS_CROWD_UP_TO",
    "BenchReport",
    "CrowdResult",
    "FanoutResult",
    "MarkerCounter",
    "ScaleResult",
    "Server",
    "ServerError",
    "ServerGroup",
    "StopResult",
    "TargetCheck",
    "available_servers",
    "check_targets",
    "format_report",
    "machine_info",
    "message_text",
    "raise_open_files_limit",
    "resp_command",
    "run_bench",
    "run_crowd",
    "run_fanout",
    "run_fanout_alternating",
    "run_scale",
    "start_server",
    "wait_until_linked",
]
