"""An asyncio chat client: ``async for`` over what the server sends.

::

    client = await connect("127.0.0.1", 5050, name="alice")
    await client.send("hello")
    async for line in client:
        print(line)
    await client.close()

It uses the same framing and sanitising as every other part of chatlib
(:class:`~chatlib.protocol.LineFramer`).
"""

from __future__ import annotations

import asyncio
import contextlib

from chatlib.protocol import (
    CLIENT_MAX_LINE,
    DEFAULT_HOST,
    DEFAULT_PORT,
    READ_SIZE,
    LineFramer,
    encode_line,
)

__all__ = ["AsyncChatClient", "connect"]


class AsyncChatClient:
    """A connection to a chat server, driven by an asyncio event loop.

    Create it with :func:`connect`. One task may iterate over it while
    others call :meth:`send`.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._framer = LineFramer(CLIENT_MAX_LINE)

    async def send(self, text: str) -> None:
        """Send *text*, one wire line per line of text, and wait until it is buffered.

        ``drain()`` makes a sender wait while the server is not reading, so
        a fast producer cannot grow this process's buffers without bound.
        """
        self._writer.write(b"".join(encode_line(line) for line in text.splitlines()))
        await self._writer.drain()

    async def receive_line(self) -> str | None:
        """Wait for the next whole line and return it; ``None`` at the end."""
        while (line := self._framer.next_line()) is None:
            try:
                data = await self._reader.read(READ_SIZE)
            except ConnectionError:
                data = b""
            if not data:
                return self._framer.finish()
            self._framer.feed(data)
        return line

    def __aiter__(self) -> AsyncChatClient:
        return self

    async def __anext__(self) -> str:
        line = await self.receive_line()
        if line is None:
            raise StopAsyncIteration
        return line

    async def close(self) -> None:
        """Close the connection and wait until it is closed."""
        self._writer.close()
        # If the server reset the connection first, it is closed all the same.
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()

    async def __aenter__(self) -> AsyncChatClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def connect(
    host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, name: str | None = None
) -> AsyncChatClient:
    """Connect to a chat server and return an :class:`AsyncChatClient`.

    With *name*, ask for that name at once (``/nick NAME``); the server's
    answer arrives like any other line.
    """
    # asyncio turns Nagle's algorithm off (TCP_NODELAY) on its own.
    reader, writer = await asyncio.open_connection(host, port)
    client = AsyncChatClient(reader, writer)
    if name:
        await client.send(f"/nick {name}")
    return client
