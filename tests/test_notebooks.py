"""Check the course's structure: names, navigation, sections, and hygiene.

nbval (``make test``) re-runs every notebook and compares its outputs; these
tests check what nbval does not: that the notebooks form one course with one
naming scheme and one layout, and that their links lead somewhere (tests/test_course_map.py
checks the course map in notebook 00 and the README).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import re
import sqlite3
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
NAME = re.compile(r"(?P<number>\d{2})-[a-z0-9]+(?:-[a-z0-9]+)*\.ipynb")
TITLE = re.compile(r"# (?P<number>\d{2}) · (?P<title>\S.*)")
LINK = re.compile(r"\[(?P<text>[^\]]+)\]\((?P<target>[^)\s]+)\)")
# nbgrader's markers around each exercise's solution (tools/student.py takes it out).
BEGIN_SOLUTION = "### BEGIN SOLUTION"
END_SOLUTION = "### END SOLUTION"
CHECK_CALL = re.compile(r"(await )?lessons\.check_\w+\(\w+\)")
FINISHED = "The finished version of this lesson lives in `chatlib/"
TOOL_MARKER = re.compile(r"^\s*#\s*NBVAL_", re.MULTILINE)


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _source(cell: dict) -> str:
    source = cell["source"]
    return source if isinstance(source, str) else "".join(source)


def _markdown(nb: dict) -> list[str]:
    return [_source(cell) for cell in nb["cells"] if cell["cell_type"] == "markdown"]


def _title(path: Path) -> str:
    """Return "NN · Title" from the notebook's first line."""
    first_line = _source(_load(path)["cells"][0]).splitlines()[0]
    match = TITLE.fullmatch(first_line)
    assert match, f"{path.name}: the first line should be '# NN · Title', not {first_line!r}"
    return f"{match['number']} · {match['title']}"


def _heading_index(nb: dict, heading: str) -> int:
    """Return the index of the first cell with a markdown line equal to *heading*."""
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "markdown" and heading in _source(cell).splitlines():
            return index
    return -1


def _is_expected_error(cell: dict) -> bool:
    tags = cell.get("metadata", {}).get("tags", [])
    return "raises-exception" in tags


by_name = pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ has no .ipynb files"


def test_names_follow_one_scheme_numbered_from_00_without_gaps():
    numbers = []
    for path in NOTEBOOKS:
        match = NAME.fullmatch(path.name)
        assert match, f"{path.name} does not match NN-kebab-title.ipynb"
        numbers.append(int(match["number"]))
    assert numbers == list(range(len(NOTEBOOKS))), f"notebook numbers {numbers} are not 00, 01, …"


@by_name
def test_kernel_is_the_plain_python3_kernel(path):
    spec = _load(path)["metadata"]["kernelspec"]
    assert spec["name"] == "python3"
    assert spec["display_name"] == "Python 3 (ipykernel)"


@by_name
def test_first_cell_has_title_navigation_and_goals(path):
    nb = _load(path)
    first = nb["cells"][0]
    assert first["cell_type"] == "markdown", f"{path.name}: the first cell should be markdown"
    lines = [line for line in _source(first).splitlines() if line.strip()]
    assert _title(path).startswith(path.name[:2] + " · "), "the title's number is the file's"
    nav_links = LINK.findall(lines[1])
    assert nav_links, f"{path.name}: the second line should be the navigation line"
    assert ("Course map", "00-course-map.ipynb") in nav_links
    assert lines[2] == "## Goals", f"{path.name}: the navigation line is followed by ## Goals"
    assert lines[3] == "By the end you can …", f"{path.name}: Goals start 'By the end you can …'"
    bullets = [line for line in lines[4:] if line.startswith("- ")]
    assert 3 <= len(bullets) <= 5, f"{path.name}: Goals should have 3 to 5 bullets"


@by_name
def test_navigation_links_lead_to_the_neighbours_by_their_titles(path):
    index = NOTEBOOKS.index(path)
    nav = [line for line in _source(_load(path)["cells"][0]).splitlines() if line.strip()][1]
    links = LINK.findall(nav)
    for _, target in links:
        assert (NOTEBOOKS_DIR / target).exists(), f"{path.name}: nav link to missing {target}"
    # [← previous] · [Course map] · [next →], each neighbour named by its own title.
    expected = [("Course map", "00-course-map.ipynb")]
    if index > 0:
        previous = NOTEBOOKS[index - 1]
        expected.insert(0, (f"← {_title(previous)}", previous.name))
    if index + 1 < len(NOTEBOOKS):
        following = NOTEBOOKS[index + 1]
        expected.append((f"{_title(following)} →", following.name))
    assert links == expected, f"{path.name}: the navigation line should link {expected}"


@by_name
def test_sections_come_in_order_and_end_with_clean_up(path):
    nb = _load(path)
    cells = nb["cells"]
    positions = [_heading_index(nb, h) for h in ("## Summary", "## Exercises", "## Clean up")]
    assert -1 not in positions, f"{path.name}: needs ## Summary, ## Exercises and ## Clean up"
    assert positions == sorted(positions), f"{path.name}: Summary, Exercises, Clean up, in order"
    clean_up = positions[2]
    assert cells[clean_up + 1]["cell_type"] == "code", "## Clean up is followed by a code cell"
    last = cells[-1]
    assert last["cell_type"] == "markdown" and _source(last).startswith(FINISHED), (
        f"{path.name}: the last cell should say '{FINISHED}…'"
    )


@by_name
def test_finished_code_named_at_the_end_exists(path):
    last = _source(_load(path)["cells"][-1])
    named = re.findall(r"`(chatlib/[^`]+)`", last)
    assert named
    for module in named:
        assert (ROOT / module).exists(), f"{path.name} points to {module}, which does not exist"


def _tags(cell: dict) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def _marked_regions(source: str) -> int | None:
    """Return how many solution regions *source* marks, or None if the markers do not pair up."""
    regions, inside = 0, False
    for line in source.splitlines():
        marker = line.strip()
        if marker == BEGIN_SOLUTION:
            if inside:
                return None
            inside = True
        elif marker == END_SOLUTION:
            if not inside:
                return None
            inside, regions = False, regions + 1
    return None if inside else regions


@by_name
def test_exercises_are_marked_and_each_is_followed_by_its_check(path):
    nb = _load(path)
    cells = nb["cells"]
    exercises = [index for index, cell in enumerate(cells) if "exercise" in _tags(cell)]
    assert 2 <= len(exercises) <= 3, f"{path.name}: two or three cells tagged exercise"
    heading = _heading_index(nb, "## Exercises")
    for index in exercises:
        cell = cells[index]
        assert index > heading, f"{path.name}: an exercise cell before ## Exercises"
        assert cell["cell_type"] == "code", f"{path.name}: cell {index} is tagged exercise"
        regions = _marked_regions(_source(cell))
        assert regions, (
            f"{path.name}: exercise cell {index} needs its solution between {BEGIN_SOLUTION!r} "
            f"and {END_SOLUTION!r} lines, in pairs"
        )
        assert index + 1 < len(cells) and "check" in _tags(cells[index + 1]), (
            f"{path.name}: exercise cell {index} is not followed by a cell tagged check"
        )
        check = cells[index + 1]
        assert CHECK_CALL.fullmatch(_source(check).strip()), (
            f"{path.name}: a check cell holds just the call, e.g. "
            f"lessons.check_read_lines(read_lines), not {_source(check)!r}"
        )
    checks = [index for index, cell in enumerate(cells) if "check" in _tags(cell)]
    assert checks == [index + 1 for index in exercises], (
        f"{path.name}: a check cell without an exercise"
    )


@by_name
def test_no_solution_markers_outside_the_exercises(path):
    for index, cell in enumerate(_load(path)["cells"]):
        source = _source(cell)
        if "exercise" not in _tags(cell):
            assert BEGIN_SOLUTION not in source and END_SOLUTION not in source, (
                f"{path.name}: cell {index} has solution markers but is not tagged exercise"
            )
        assert "# Solution" not in source, f"{path.name}: cell {index} has an old solution header"


@by_name
def test_has_a_try_it_in_a_terminal_box(path):
    assert any(
        line.startswith("> **Try it in a terminal**")
        for text in _markdown(_load(path))
        for line in text.splitlines()
    ), f"{path.name}: needs a '> **Try it in a terminal**' box"


@by_name
def test_code_cells_were_run_in_order_and_kept_their_outputs(path):
    counts = []
    for cell in _load(path)["cells"]:
        if cell["cell_type"] != "code":
            continue
        count = cell.get("execution_count")
        assert isinstance(count, int), f"{path.name}: a code cell has no execution count"
        counts.append(count)
        errors = [out for out in cell.get("outputs", []) if out["output_type"] == "error"]
        if _is_expected_error(cell):
            assert errors, f"{path.name}: a cell marked to raise has no error output"
        else:
            assert not errors, f"{path.name}: error output in {_source(cell)[:60]!r}"
    assert counts == list(range(1, len(counts) + 1)), f"{path.name}: run it top to bottom, once"


@by_name
def test_no_run_magic_or_star_imports(path):
    for cell in _load(path)["cells"]:
        if cell["cell_type"] == "code":
            source = _source(cell)
            assert not re.search(r"^\s*%run\b", source, re.MULTILINE), f"{path.name} uses %run"
            assert not re.search(r"\bimport\s+\*", source), f"{path.name} uses import *"


@by_name
def test_markers_for_the_tools_are_tags_not_comments_for_the_learner(path):
    # A learner reads every comment; nbval reads tags (nbval-ignore-output,
    # raises-exception) as well as it reads "# NBVAL_..." lines.
    for cell in _load(path)["cells"]:
        if cell["cell_type"] == "code":
            assert not TOOL_MARKER.search(_source(cell)), f"{path.name}: {_source(cell)[:60]!r}"


@by_name
def test_no_print_from_threads_marker_of_trouble(path):
    # ipykernel 7 sends a background thread's output to whichever cell ran
    # last, so nbval would fail at random: stored outputs must not contain
    # the tell-tale "Exception in thread" banner either.
    for cell in _load(path)["cells"]:
        for out in cell.get("outputs", []):
            text = out.get("text", "")
            text = text if isinstance(text, str) else "".join(text)
            assert "Exception in thread" not in text, f"{path.name}: a thread printed a traceback"


# The exercises' self-checks: nbval shows that each accepts the notebook's
# solution; these show that each also turns a plausible wrong answer down.


def _split_lines(chunks, max_line):
    # Decodes each chunk on its own and ignores the limit: two classic mistakes.
    text = "".join(chunk.decode("utf-8", errors="replace") for chunk in chunks)
    return text.split("\n")[:-1]


def _recv_once(sock, n):
    return sock.recv(n)


def _nick_without_newline(sock, reader, name):
    # The server waits for the end of the line; the check must not wait for ever.
    sock.sendall(f"/nick {name}".encode())
    return reader.readline()


def _first_line_after_who(sock, reader):
    sock.sendall(b"/who\n")
    return reader.readline()[len("*** Online (2): ") :].rstrip("\n").split(", ")


def _forward_pieces(conn, clients, lock):
    # Forwards whatever recv() returned: pieces of lines, mixed with other clients' lines.
    with lock:
        clients.append(conn)
    with contextlib.suppress(OSError):
        while data := conn.recv(1024):
            with lock:
                everyone = list(clients)
            for other in everyone:
                with contextlib.suppress(OSError):
                    other.sendall(data)
    with lock:
        clients.remove(conn)
    conn.close()


class _NeverFull:
    def __init__(self, cap):
        self._chunks = []

    def put(self, data):
        self._chunks.append(data)
        return True

    def take(self):
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data


class _SharedDict:
    def __init__(self):
        self._names = {}

    def add(self, name):
        self._names[name] = True

    def remove(self, name):
        del self._names[name]

    def snapshot(self):
        return self._names  # the live dict, not a copy


def _everyone_hears_everything(rooms, sender, line):
    return {name for names in rooms.values() for name in names}


class _UnboundedRing:
    def __init__(self, kept):
        self._lines = []

    def add(self, line):
        self._lines.append(line)

    def recent(self, count):
        return self._lines[-count:]


def _oldest_from_file(path, room, count):
    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = db.execute(
            "SELECT line FROM messages WHERE room = ? ORDER BY id LIMIT ?", (room, count)
        ).fetchall()
    return [line for (line,) in rows]


def _lines_without_last(sock):
    data = b""
    while chunk := sock.recv(1024):
        data += chunk
    return data.decode().split("\n")[:-1]


def _echo_dropping_the_rest(sock):
    while True:
        yield "read", sock
        data = sock.recv(65536)
        if not data:
            break
        yield "write", sock
        sock.send(data)  # what the kernel does not take is lost
    sock.close()


async def _ask_first_line(address, name, text):
    # Returns the first line that comes, the server's welcome, not the relay.
    from chatlib import aio_client

    client = await aio_client.connect(*address, name=name)
    try:
        await client.send(text)
        return await client.receive_line()
    finally:
        await client.close()


def _broadcast_to_everyone(writers, data, sendq):
    # Never waits, but never drops anyone either: a stuck client's backlog grows for ever.
    for writer in writers:
        writer.write(data)


async def _send_queued_without_drain(writer, queue):
    # Writes without waiting: a client that never reads gets the whole queue in memory.
    while (data := await queue.get()) is not None:
        writer.write(data)
    writer.close()
    await writer.wait_closed()


def _ended_by_first_recv(sock):
    return "goodbye" if sock.recv(1024) == b"" else "reset"


class _DoorThatNeverCountsOut:
    def __init__(self, max_per_address):
        self._most = max_per_address
        self._inside = {}

    def admit(self, address):
        if self._most and self._inside.get(address, 0) >= self._most:
            return False
        self._inside[address] = self._inside.get(address, 0) + 1
        return True

    def leave(self, address):
        pass  # forgets to count the connection out


def _classify_stars_first(raw):
    # "*" is tried before "*** ", so every notice comes out as a private message.
    for prefix, kind, name_ends in [
        ("<", "message", "> "),
        ("-> *", "private-sent", "* "),
        ("*", "private", "* "),
        ("*** ", "notice", None),
        ("* ", "action", " "),
        ("!!! ", "error", None),
    ]:
        if raw.startswith(prefix):
            rest = raw[len(prefix) :]
            if name_ends is None:
                return kind, None, rest
            name, _, text = rest.partition(name_ends)
            return kind, name, text
    return "other", None, raw


def _line_html_unescaped(raw):
    from chatlib.protocol import parse_server_line
    from chatlib.widget import LINE_CLASSES

    return f'<div class="chat-line {LINE_CLASSES[parse_server_line(raw).kind]}">{raw}</div>'


def _percentile_past_the_end(samples, fraction):
    return sorted(samples)[int(fraction * len(samples))]


def _lost_by_counting_lines(sent, received):
    said = sum(len(texts) for texts in sent.values())
    return said * len(received) - sum(len(lines) for lines in received.values())


def _measure_pipelined(name, clients):
    from chatlib.bench import run_fanout, start_server

    with start_server(name) as server:
        return run_fanout(server, clients=clients, senders=5, window=16, duration=0.2, warmup=0.1)


def _drop_while_looping(queues, data):
    dropped = []
    for name, queue in queues.items():
        if not queue.put(data):
            del queues[name]  # changes the dict under the loop
            dropped.append(name)
    return dropped


def _missing_counted_from_one(events):
    # As if every server were heard from its first event on, and as if repeats were news.
    lost = {}
    for origin in dict.fromkeys(origin for origin, _ in events):
        numbers = [seq for sender, seq in events if sender == origin]
        lost[origin] = max(numbers) - len(set(numbers))
    return lost


def _give_way_by_exact_name(holders):
    # The right rule on names as spelt: erin and ERIN, or alice and a1ice, never clash.
    keeper = {}
    for origin in sorted(holders):
        for name in holders[origin]:
            keeper.setdefault(name, origin)
    return {
        (origin, name)
        for origin, names in holders.items()
        for name in names
        if keeper[name] != origin
    }


@pytest.mark.parametrize(
    ("check", "wrong"),
    [
        ("check_read_lines", _split_lines),
        ("check_recv_exactly", _recv_once),
        ("check_choose_name", _nick_without_newline),
        ("check_who_is_online", _first_line_after_who),
        ("check_serve_client", _forward_pieces),
        ("check_safe_clients", _SharedDict),
        ("check_bounded_queue", _NeverFull),
        ("check_broadcast", _drop_while_looping),
        ("check_read_to_end", _lines_without_last),
        ("check_send_some", lambda sock, data: sock.send(data) and b""),
        ("check_echo_task", _echo_dropping_the_rest),
        ("check_how_it_ended", _ended_by_first_recv),
        ("check_door", _DoorThatNeverCountsOut),
        ("check_classify", _classify_stars_first),
        ("check_line_html", _line_html_unescaped),
        ("check_percentile", _percentile_past_the_end),
        ("check_lost_copies", _lost_by_counting_lines),
        ("check_measure", _measure_pipelined),
        (
            "check_audience",
            lambda rooms, sender, line: {n for names in rooms.values() for n in names},
        ),
        ("check_ring", _UnboundedRing),
        ("check_recent_from_file", _oldest_from_file),
        ("check_ask", _ask_first_line),
        ("check_stream_broadcast", _broadcast_to_everyone),
        ("check_send_queued", _send_queued_without_drain),
        # Lines only one client saw (its welcome, a private message) make them differ.
        ("check_same_order", lambda transcript_a, transcript_b: transcript_a == transcript_b),
        ("check_missing", _missing_counted_from_one),
        ("check_give_way", _give_way_by_exact_name),
    ],
)
def test_exercise_checks_reject_wrong_answers(check, wrong):
    lessons = pytest.importorskip("chatlib.lessons")
    with pytest.raises(AssertionError):
        result = getattr(lessons, check)(wrong)
        if inspect.iscoroutine(result):  # an async check, for an async exercise
            asyncio.run(result)
