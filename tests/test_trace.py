"""The trace hook (``chatlib.trace``): off by default, free when off, and it changes nothing.

Over real sockets on 127.0.0.1, against every engine: the same scripted conversation gives
the same transcript with and without a trace, the events tell what really happened on
each connection, and without a hook no event is ever built.
"""

from __future__ import annotations

import importlib
import inspect

from chatlib import trace
from chatlib.chat import Limits
from chatlib.engines.base import ServerBase
from chatlib.server import create_server
from tests.conftest import TEST_LIMITS
from tests.helpers import LineClient, wait_until


def converse(address: tuple[str, int]) -> list[str]:
    """Hold a scripted chat, each step awaited; return what alice and bob received."""
    alice = LineClient(address)
    alice.welcome()
    alice.say("/nick alice")
    alice.expect(f"*** {alice.name} is now known as alice.")
    bob = LineClient(address)
    bob.welcome()
    alice.expect(f"*** {bob.name} joined.")
    bob.say("/nick bob")
    for client in (alice, bob):
        client.expect(f"*** {bob.name} is now known as bob.")
    alice.say("hi bob")
    for client in (alice, bob):
        client.expect("<alice> hi bob")
    bob.say("/me waves")
    for client in (alice, bob):
        client.expect("* bob waves")
    alice.say("/msg bob psst")
    alice.expect("-> *bob* psst")
    bob.expect("*alice* psst")
    alice.say("/quit")
    alice.read_to_eof()
    bob.expect("*** alice left.")
    bob.close()
    alice.close()
    return [f"alice| {line}" for line in alice.received] + [f"bob| {line}" for line in bob.received]


def serve(engine: str, hook: trace.Trace | None = None):
    return create_server(engine, "127.0.0.1", 0, limits=Limits(**TEST_LIMITS), trace=hook)


def test_a_trace_changes_no_transcript(engine, health):
    with serve(engine) as server:
        untraced = converse(server.address)
    recorder = trace.Recorder()
    with serve(engine, recorder) as server:
        traced = converse(server.address)
    assert traced == untraced
    assert any(isinstance(event, trace.Sent) for event in recorder.events)


def test_the_events_are_what_happened_on_each_connection(engine, health):
    recorder = trace.Recorder()
    with serve(engine, recorder) as server:
        alice, bob = LineClient(server.address), LineClient(server.address)
        for client in (alice, bob):
            client.welcome()
        alice.expect(f"*** {bob.name} joined.")
        alice.say("hello")
        bob.expect(f"<{alice.name}> hello")
        peers = {client: client.sock.getsockname()[:2] for client in (alice, bob)}
        alice.say("/quit")
        alice.read_to_eof()
        alice.close()
        bob.expect(f"*** {alice.name} left.")
        bob.close()
        for peer in peers.values():
            wait_until(lambda peer=peer: isinstance(recorder.of(peer)[-1], trace.Closed))

    for client, peer in peers.items():
        events = recorder.of(peer)
        assert events[0] == trace.Accepted(peer), events[:3]
        closed = [event for event in events if isinstance(event, trace.Closed)]
        assert closed == [events[-1]], closed
        # Every read follows a wait that found its socket ready, one wait per read.
        ready = False
        for event in events:
            if isinstance(event, trace.Ready):
                ready = True
            elif isinstance(event, trace.Received):
                assert ready, f"a read from {peer} with no wait before it: {events}"
                ready = False
        # The writes carry the bytes the client read, in order (bob may not read the last).
        sent = recorder.sent_to(peer).decode().splitlines()
        assert sent[: len(client.received)] == client.received
    assert recorder.sent_to(peers[alice]).decode().splitlines() == alice.received
    assert recorder.of(peers[alice])[-1] == trace.Closed(peers[alice], cut_off=False)
    assert recorder.received_from(peers[alice]) == b"hello\n/quit\n"
    assert trace.Received(peers[bob], b"") in recorder.of(peers[bob])  # its end of stream
    assert recorder.received_from(peers[bob]) == b""

    # Ready, then read, then write: alice's line reaches bob after the server read it.
    read_at = recorder.events.index(trace.Received(peers[alice], b"hello\n"))
    sent_at = next(
        index
        for index, event in enumerate(recorder.events)
        if isinstance(event, trace.Sent)
        and event.peer == peers[bob]
        and f"<{alice.name}> hello".encode() in event.data
    )
    assert read_at < sent_at


def test_tracing_is_off_by_default_and_builds_nothing(engine, health, monkeypatch):
    assert inspect.signature(ServerBase).parameters["trace"].default is None
    assert inspect.signature(create_server).parameters["trace"].default is None
    module = importlib.import_module(f"chatlib.engines.{engine}")
    built = []

    def record(name):
        return lambda *fields: built.append(name)

    # Every kind of event the engine can build, swapped for one that says it was built.
    for kind in trace.EVENTS:
        monkeypatch.setattr(module, kind.__name__, record(kind.__name__))
    # No trace argument at all: off must be what a server gets by default.
    with create_server(engine, "127.0.0.1", 0, limits=Limits(**TEST_LIMITS)) as server:
        converse(server.address)
    assert built == []
