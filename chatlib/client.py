"""A chat client: :class:`ChatClient` for programs, and a terminal program.

Run ``python -m chatlib.client --name alice``. A background thread prints
what arrives while you type; on a terminal, the line you are typing is
redrawn below each incoming message instead of being overwritten, the
prompt names the room you are in (``#lobby> ``), and the recent messages
replayed as you enter a room are shown dim. Piped output is the server's
lines, exactly. Leave with ``/quit``, ``exit``, Ctrl-D or Ctrl-C; the end of
piped input leaves too.

:class:`~chatlib.protocol.RoomTracker` follows, from the server's notices,
which room you are in and which lines are replays.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator

from chatlib.protocol import (
    CLIENT_MAX_LINE,
    DEFAULT_HOST,
    DEFAULT_PORT,
    READ_SIZE,
    LineFramer,
    RoomTracker,
    encode_line,
    parse_command,
    parse_notice,
    parse_server_line,
)

__all__ = ["ChatClient", "main"]


class ChatClient:
    """A blocking connection to a chat server.

    One thread may receive (iterate over the client, or call
    :meth:`receive_line`) while others call :meth:`send`; :meth:`close`
    from any thread wakes the receiver. Incoming lines are framed and
    sanitised by :class:`~chatlib.protocol.LineFramer`, so they are safe to
    print even if the server is not.
    """

    def __init__(
        self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, timeout: float = 5.0
    ) -> None:
        """Connect to *host*:*port*, waiting at most *timeout* seconds.

        Raises :class:`OSError` (``ConnectionRefusedError`` when nothing
        listens there) if the connection cannot be made.
        """
        self.address = (host, port)
        self._sock = socket.create_connection(self.address, timeout=timeout)
        self._sock.settimeout(None)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._framer = LineFramer(CLIENT_MAX_LINE)
        self._send_lock = threading.Lock()

    def send(self, text: str) -> None:
        """Send *text* to the server, one wire line per line of text."""
        data = b"".join(encode_line(line) for line in text.splitlines())
        with self._send_lock:
            self._sock.sendall(data)

    def receive_line(self) -> str | None:
        """Block until a whole line arrives and return it; ``None`` at the end.

        The end is the server closing the connection, or :meth:`close`.
        A connection reset also ends it (the caller cannot do better).
        """
        while (line := self._framer.next_line()) is None:
            try:
                data = self._sock.recv(READ_SIZE)
            except OSError:
                data = b""
            if not data:
                return self._framer.finish()
            self._framer.feed(data)
        return line

    def __iter__(self) -> Iterator[str]:
        """Yield each line received until the connection ends."""
        while (line := self.receive_line()) is not None:
            yield line

    def close(self) -> None:
        """Close the connection; a thread blocked receiving sees the end."""
        # shutdown() first: on Linux, close() alone does not wake a thread
        # blocked in recv() on the same socket. OSError: already gone.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- The terminal program -------------------------------------------------

#: What the prompt ends with, after the room's name: ``#lobby> ``.
PROMPT = "> "

#: How long a terminal waits for the server to say which room we are in
#: before it draws the first prompt (without a room) anyway.
FIRST_PROMPT_WAIT = 2.0

# Select Graphic Rendition "faint" and back to normal intensity (ECMA-48):
# replayed messages are dim, live ones as the terminal shows text.
_DIM, _UNDIM = "\x1b[2m", "\x1b[22m"

#: How long the client waits, after leaving, for a server that has gone
#: quiet to close the connection (see :meth:`_Listener.wait_for_goodbye`).
QUIT_GRACE = 1.0


class _Terminal:
    """Print incoming lines without clobbering the line being typed.

    *styled*: whether replayed lines may be dimmed with an escape sequence;
    only output to a terminal is, so that piped output stays the server's
    lines as they came.
    """

    def __init__(self, interactive: bool, styled: bool = False) -> None:
        self.interactive = interactive
        self.styled = styled
        #: The room the prompt names; set by show() when the room changes.
        self.room: str | None = None
        self._lock = threading.Lock()
        self._prompt_shown = False  # is input() waiting behind a prompt?
        self._readline = None
        if interactive:
            try:
                import readline  # missing on Windows; and only a terminal needs it
            except ImportError:
                pass
            else:
                # Called once input() has drawn its prompt and readline reads
                # keys. (Some libedit builds lack the hook: lines are then
                # printed plainly, as on Windows.)
                if hasattr(readline, "set_pre_input_hook"):
                    readline.set_pre_input_hook(self._reading_keys)
                    self._readline = readline
        self._drawing_prompt = False  # read_line() holds the lock meanwhile

    def _reading_keys(self) -> None:
        # The prompt is drawn and readline owns the line: show() may redraw it.
        self._prompt_shown = True
        self._drawing_prompt = False
        self._lock.release()

    @property
    def prompt(self) -> str:
        """The prompt to draw now: ``#lobby> ``, or ``> `` before the room is known."""
        return f"{self.room or ''}{PROMPT}"

    def show(self, line: str, *, replayed: bool = False, room: str | None = None) -> None:
        """Print *line*; dim it if *replayed*; from now on the prompt names *room*, if given.

        The room changes under the same lock as the printing, so the prompt
        redrawn here and the one read_line() draws next name the room the
        server last gave.
        """
        with self._lock:
            if room is not None:
                self.room = room
            if replayed and self.styled:
                line = f"{_DIM}{line}{_UNDIM}"
            if self._readline is None or not self._prompt_shown:
                sys.stdout.write(line + "\n")
            else:
                # Erase the prompt line, print the message, then draw the
                # prompt again with whatever the user has typed so far.
                # After a /join, readline keeps the prompt input() gave it
                # until Enter (Python's readline module cannot change it), so
                # a redraw readline does itself (Ctrl-L, or jumping back along
                # a long line) may show the old room's name for that line.
                typed = self._readline.get_line_buffer()
                sys.stdout.write(f"\r\x1b[K{line}\n{self.prompt}{typed}")
            sys.stdout.flush()

    def read_line(self) -> str:
        """Return the next line typed (or piped); raise EOFError at the end."""
        if self._readline is not None:
            # No line may be shown while input() draws the prompt and readline
            # takes over the terminal: it would split the prompt, or be redrawn
            # before keys typed meanwhile reach readline. _reading_keys()
            # releases the lock once readline reads.
            self._lock.acquire()
            self._drawing_prompt = True
            try:
                return input(self.prompt)
            finally:
                if self._drawing_prompt:  # input() ended before readline read a key
                    self._drawing_prompt = False
                    self._lock.release()
                with self._lock:
                    self._prompt_shown = False
        if self.interactive:
            return input(self.prompt)
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")


class _Listener:
    """Show what the server sends; note when it last spoke and when it hung up.

    *asked_name*: the name the client asked for as it connected (``--name``).
    """

    def __init__(
        self, client: ChatClient, terminal: _Terminal, asked_name: str | None = None
    ) -> None:
        self.client = client
        self.terminal = terminal
        # The server greets every connection as a guest and invites it to
        # choose a name, before it reads the /nick we sent: on a terminal that
        # invitation only confuses someone who chose one. Its answer to /nick
        # follows. Piped output stays every line the server sent.
        self._hide_welcome = bool(asked_name) and terminal.interactive
        self.rooms = RoomTracker()
        #: Set once the server has closed the connection.
        self.ended = threading.Event()
        #: Set once the server has said which room we are in, or has closed.
        self.placed = threading.Event()
        self.last_heard = time.monotonic()

    def run(self) -> None:
        """Show each line until the connection ends; the receiving thread's body."""
        for line in self.client:
            self.last_heard = time.monotonic()
            parsed = parse_server_line(line)
            part = self.rooms.track(parsed)
            if self._hide_welcome and parsed.kind == "notice":
                self._hide_welcome = False  # the welcome is the first notice
                if (notice := parse_notice(parsed.text)) and notice[0] == "welcome":
                    continue
            self.terminal.show(line, replayed=part == "replayed", room=self.rooms.room)
            if self.rooms.room is not None:
                self.placed.set()
        self.ended.set()
        self.placed.set()

    def wait_for_goodbye(self, grace: float) -> None:
        """Wait until the server closes, or has said nothing for *grace* seconds.

        A server still working through our earlier lines (flood control
        delays them) keeps answering them; one that is never going to close
        falls silent, and then we leave without its goodbye.
        """
        started = time.monotonic()
        # Polled: run() updates last_heard without waking anyone.
        while not self.ended.wait(0.1):
            if time.monotonic() - max(started, self.last_heard) > grace:
                return


def _type(
    client: ChatClient,
    listener: _Listener,
    leaving: threading.Event,
    input_ended: threading.Event,
) -> None:
    """Send each line read until the input ends, then set *input_ended*.

    Reading goes on after a line that leaves: if the server does not take
    it as one, the user is still in the room, and the end of the input must
    still end the client.
    """
    terminal = listener.terminal
    if terminal.interactive:
        # readline keeps the prompt it was given until Enter, so the first
        # one should already name the room; a server that never says which
        # room (not chatlib's) gets a bare prompt after a moment.
        listener.placed.wait(FIRST_PROMPT_WAIT)
    try:
        while True:
            line = terminal.read_line()
            # The server's own parser: client and server agree on which lines leave.
            if parse_command(line).name == "quit":
                leaving.set()
            client.send(line)
    except EOFError:
        input_ended.set()
    except OSError:
        pass  # the server went away: the receiver sees the end too, and main() says so


def _leave(client: ChatClient, listener: _Listener, leaving: threading.Event) -> None:
    """Say ``/quit`` unless a line that leaves went out already, then wait for the goodbye."""
    if not leaving.is_set():
        leaving.set()
        with contextlib.suppress(OSError):  # the server may be gone already
            client.send("/quit")
    listener.wait_for_goodbye(QUIT_GRACE)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m chatlib.client",
        description="Chat from the terminal. Type a line to say it; /help lists the commands; "
        "/quit, exit, Ctrl-D or Ctrl-C leaves.",
    )
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help="server address (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="server port (default: %(default)s)"
    )
    parser.add_argument("--name", help="the name to chat under (default: a guest name)")
    return parser.parse_args(argv)


def _styled_output() -> bool:
    """Return whether stdout is a terminal that may be sent a style (dim text).

    Not when piped or redirected (programs reading the output get the plain
    lines), on a terminal that says it is dumb, or when the user asked for
    no colour (``NO_COLOR``, https://no-color.org).
    """
    return (
        sys.stdout.isatty() and os.environ.get("TERM") != "dumb" and not os.environ.get("NO_COLOR")
    )


def main(argv: list[str] | None = None) -> int:
    """Run the terminal client; return the exit status."""
    args = _parse_args(argv)
    # Ctrl-C only sets a flag, so that it can never land halfway through
    # starting a thread; the loop below acts on it.
    interrupted = threading.Event()
    signal.signal(signal.SIGINT, lambda signum, frame: interrupted.set())
    try:
        client = ChatClient(args.host, args.port)
    except OSError as error:
        reason = error.strerror or str(error)
        print(f"Cannot connect to {args.host}:{args.port}: {reason}.", file=sys.stderr)
        return 1
    if args.name:
        client.send(f"/nick {args.name}")

    terminal = _Terminal(
        interactive=sys.stdin.isatty() and sys.stdout.isatty(), styled=_styled_output()
    )
    listener = _Listener(client, terminal, args.name)
    leaving = threading.Event()  # we asked the server to let us go
    input_ended = threading.Event()  # Ctrl-D, or the end of piped input
    receiver = threading.Thread(target=listener.run, daemon=True)
    typist = threading.Thread(
        target=_type, args=(client, listener, leaving, input_ended), daemon=True
    )
    receiver.start()
    typist.start()
    # Wait in short slices: on Windows a wait without a timeout is not
    # interrupted by Ctrl-C, so the signal handler would not run.
    while not listener.ended.wait(0.2):
        if interrupted.is_set() or input_ended.is_set():
            _leave(client, listener, leaving)
            break
    client.close()
    if not leaving.is_set():
        terminal.show("*** Disconnected: the server closed the connection.")
    if terminal.interactive:
        sys.stdout.write("\r\x1b[K")  # no prompt left dangling
    if typist.is_alive():
        # We still sit in input(). Nothing portable wakes a thread blocked
        # reading stdin, and finalising the interpreter under it aborts
        # ("could not acquire lock for <stdin>"), so leave without that.
        sys.stdout.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
