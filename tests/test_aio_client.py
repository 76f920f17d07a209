"""The asyncio client API against every engine, and ChatClient's programmatic side.

The last tests hold every chatlib client (these two and the course's
:class:`~chatlib.lessons.LineClient`) to the same rules for the lines at the
edges: a last line without its newline, and the longest line there is.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from chatlib.aio_client import connect
from chatlib.chat import Limits
from chatlib.client import ChatClient
from chatlib.lessons import LineClient
from chatlib.protocol import CLIENT_MAX_LINE
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
            await lines_until(async_client, "*** You are in #lobby (1 here): guest1")
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


# --- Every client, at the edges ----------------------------------------------


@contextlib.contextmanager
def server_sending(data: bytes) -> Iterator[int]:
    """Serve one client: send it *data*, then close. Yield the port to connect to."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(data)

        thread = threading.Thread(target=serve, name="server_sending", daemon=True)
        thread.start()
        yield listener.getsockname()[1]
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "the client never connected"


def read_with_chat_client(port: int) -> list[str]:
    with ChatClient("127.0.0.1", port) as client:
        client._sock.settimeout(TIMEOUT)  # a hung test fails instead (recv times out: the end)
        return list(client)


def read_with_async_client(port: int) -> list[str]:
    async def read() -> list[str]:
        async with await connect("127.0.0.1", port) as client:
            return [line async for line in client]

    return asyncio.run(asyncio.wait_for(read(), TIMEOUT))


def read_with_line_client(port: int) -> list[str]:
    with LineClient(("127.0.0.1", port), timeout=TIMEOUT) as client:
        return client.read_to_end()


CLIENTS = [read_with_chat_client, read_with_async_client, read_with_line_client]


@pytest.mark.parametrize("read_all", CLIENTS)
def test_a_last_line_without_newline_is_kept(read_all: Callable[[int], list[str]]):
    # nc sends one when the user presses Ctrl-D mid-line; a server may too.
    with server_sending(b"hello\nlast words") as port:
        assert read_all(port) == ["hello", "last words"]


@pytest.mark.parametrize("read_all", CLIENTS)
def test_a_line_of_client_max_line_bytes_arrives_and_a_longer_one_is_dropped(
    read_all: Callable[[int], list[str]],
):
    longest = b"x" * CLIENT_MAX_LINE
    too_long = b"y" * (CLIENT_MAX_LINE + 1)
    with server_sending(longest + b"\n" + too_long + b"\nafter\n") as port:
        assert read_all(port) == [longest.decode(), "after"]
