"""The asyncio client API against every engine, and ChatClient's programmatic side."""

from __future__ import annotations

import asyncio

import pytest

from chatlib.aio_client import connect
from chatlib.client import ChatClient
from chatlib.room import Limits
from chatlib.server import ENGINES, create_server

TIMEOUT = 10


@pytest.fixture(params=ENGINES)
def server(request):
    with create_server(request.param, "127.0.0.1", 0, Limits(rate=0)) as server:
        yield server


async def lines_until(client, last: str) -> list[str]:
    """Collect lines with ``async for`` until *last* arrives (bounded)."""

    async def collect() -> list[str]:
        lines = []
        async for line in client:
            lines.append(line)
            if line == last:
                return lines
        raise AssertionError(f"connection ended before {last!r}; got {lines}")

    return await asyncio.wait_for(collect(), TIMEOUT)


def test_two_async_clients_chat(server):
    async def chat() -> tuple[list[str], list[str]]:
        async with await connect(*server.address, name="ann") as ann:
            await lines_until(ann, "*** guest1 is now known as ann.")
            async with await connect(*server.address, name="ben") as ben:
                await lines_until(ben, "*** guest2 is now known as ben.")
                await ann.send("hello ben\n/msg ben psst")
                seen_by_ben = await lines_until(ben, "*ann* psst")
                await ben.send("/quit")
                rest_for_ben = await lines_until(ben, "*** Bye, ben!")
                assert await ben.receive_line() is None  # then the end of the stream
            seen_by_ann = await lines_until(ann, "*** ben left.")
        return seen_by_ann, seen_by_ben + rest_for_ben

    seen_by_ann, seen_by_ben = asyncio.run(chat())
    assert "<ann> hello ben" in seen_by_ben
    assert "<ann> hello ben" in seen_by_ann
    assert "-> *ben* psst" in seen_by_ann


def test_async_and_threaded_clients_share_a_room(server):
    async def chat() -> list[str]:
        async with await connect(*server.address) as async_client:
            await lines_until(async_client, "*** Online (1): guest1")
            with ChatClient(*server.address) as sync_client:
                sync_client.send("from the threaded client")
                return await lines_until(async_client, "<guest2> from the threaded client")

    assert asyncio.run(chat())[-1] == "<guest2> from the threaded client"


def test_server_lines_are_sanitised_on_the_way_in_too():
    """A client never trusts the server: escapes from a rogue server arrive inert."""

    async def rogue(reader, writer):
        writer.write(b"*** hi \x1b[2J\x9b31m \xff\n")
        await writer.drain()
        writer.close()

    async def run() -> list[str]:
        rogue_server = await asyncio.start_server(rogue, "127.0.0.1", 0)
        async with rogue_server:
            port = rogue_server.sockets[0].getsockname()[1]
            async with await connect("127.0.0.1", port) as client:
                return [line async for line in client]

    assert asyncio.run(run()) == ["*** hi ^[[2J\ufffd31m \ufffd"]
