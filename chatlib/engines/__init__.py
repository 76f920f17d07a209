"""Chat server engines: the same room, driven by three kinds of I/O.

- :mod:`chatlib.engines.threads` — a reader and a writer thread per client,
  and one sender thread for all;
- :mod:`chatlib.engines.selectors` — one thread, a hand-written event loop;
- :mod:`chatlib.engines.asyncio` — one thread, asyncio's event loop.

Each module has a ``ChatServer`` class with the same methods, so a diff
between two of them shows exactly what changes from one model to the next.
"""
