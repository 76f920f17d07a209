"""chatlib: a multi-client TCP chat, built to be read and learned from.

The pieces, in the order the course meets them:

- :mod:`chatlib.protocol` — framing, sanitising and commands (sans-I/O);
- :mod:`chatlib.chat` — the chat: who is here, in which room, and who gets what (sans-I/O);
- :mod:`chatlib.engines` — servers that drive the chat over real sockets,
  with threads, a ``selectors`` loop, or ``asyncio``;
- :mod:`chatlib.client` and :mod:`chatlib.aio_client` — clients;
- :mod:`chatlib.widget` — a chat panel for JupyterLab.
"""

__version__ = "0.1.0"
