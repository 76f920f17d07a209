"""Write the learner's copy of the course notebooks: the exercises without their solutions.

The notebooks in ``notebooks/`` are the teacher's copies. Each exercise cell
(tagged ``exercise``) holds its solution between nbgrader's markers::

    def read_lines(chunks, max_line):
        ### BEGIN SOLUTION
        ...
        ### END SOLUTION

In the learner's copy each marked region, markers included, becomes
``# YOUR CODE HERE`` and ``raise NotImplementedError()`` at the markers'
indentation, and the cells tagged ``exercise`` or ``check`` lose their
outputs, so the learner sees no answer. Everything else (outputs, widget
state) is kept as stored: the lesson still reads as it ran.

A copy already in the folder is never overwritten without ``--force``: it may
hold the learner's work. Usage, from the repository's root::

    python tools/student.py [--force] [--out student] [notebooks/01-sockets.ipynb ...]

nbgrader's own ``generate_assignment`` would need its course-directory layout
and database; the markers are nbgrader's, so a teacher can still use it.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
STUB = ("# YOUR CODE HERE", "raise NotImplementedError()")
# Their outputs would give the answer away (a check's "all 6 checks passed").
CLEARED_TAGS = frozenset({"exercise", "check"})


class NotebookError(ValueError):
    """A teacher's notebook breaks the exercise convention; the message says where."""


def _tags(cell: dict) -> set[str]:
    return set(cell.get("metadata", {}).get("tags", []))


def _source(cell: dict) -> str:
    source = cell["source"]
    return source if isinstance(source, str) else "".join(source)


def strip_solutions(source: str, where: str = "the cell") -> tuple[str, int]:
    """Return *source* with every marked region replaced by the stub, and how many there were.

    The stub's two lines take the ``### BEGIN SOLUTION`` line's indentation.
    Raise :class:`NotebookError`, naming *where* and the line, if a marker has
    no partner or regions nest.
    """
    kept: list[str] = []
    begun_at = 0  # the line number of the open region's BEGIN marker, 0 outside one
    regions = 0
    lines = source.splitlines(keepends=True)
    for number, line in enumerate(lines, start=1):
        marker = line.strip()
        if marker == BEGIN:
            if begun_at:
                raise NotebookError(
                    f"{where}, line {number}: {BEGIN} inside the region begun on line {begun_at}"
                )
            begun_at = number
            indent = line[: len(line) - len(line.lstrip())]
            kept += [f"{indent}{STUB[0]}\n", f"{indent}{STUB[1]}\n"]
        elif marker == END:
            if not begun_at:
                raise NotebookError(f"{where}, line {number}: {END} without a {BEGIN} before it")
            begun_at = 0
            regions += 1
            if not line.endswith("\n"):  # the region ended the cell: so does the stub
                kept[-1] = kept[-1].rstrip("\n")
        elif not begun_at:
            kept.append(line)
    if begun_at:
        raise NotebookError(f"{where}, line {begun_at}: {BEGIN} has no {END} after it")
    return "".join(kept), regions


def learner_copy(notebook: dict, name: str = "the notebook") -> dict:
    """Return the learner's copy of *notebook* (a parsed .ipynb); leave *notebook* as it is.

    Raise :class:`NotebookError` if a marker is unbalanced, an ``exercise``
    cell has no marked region, or a ``check`` cell does not come right after
    an ``exercise`` cell. *name* says which notebook, in those messages.
    """
    copied = copy.deepcopy(notebook)
    previous_tags: set[str] = set()
    for number, cell in enumerate(copied["cells"], start=1):
        tags = _tags(cell) if cell["cell_type"] == "code" else set()
        where = f"{name}, cell {number}"
        if cell["cell_type"] == "code":
            source, regions = strip_solutions(_source(cell), where)
            if "exercise" in tags and not regions:
                raise NotebookError(
                    f"{where} is tagged exercise but has no {BEGIN} ... {END} region"
                )
            if "check" in tags and "exercise" not in previous_tags:
                raise NotebookError(
                    f"{where} is tagged check but does not come right after an exercise cell"
                )
            cell["source"] = source.splitlines(keepends=True)
            if tags & CLEARED_TAGS:
                cell["outputs"] = []
                cell["execution_count"] = None
        previous_tags = tags
    return copied


def _shown(path: Path) -> Path:
    """Return *path* relative to the working directory if it is under it, as a person types it."""
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path


def write_learner_copies(paths: list[Path], folder: Path, *, force: bool = False) -> list[str]:
    """Write the learner's copy of each notebook in *paths* into *folder*; return what was done.

    Every notebook is converted before any is written, so a broken one
    leaves the folder as it was. A copy already in *folder* is kept (it may
    hold the learner's work) unless *force* is true. Each returned line says
    what happened to one notebook.
    """
    copies = {}
    for path in paths:
        notebook = json.loads(path.read_text(encoding="utf-8"))
        copies[path.name] = learner_copy(notebook, str(path))
    folder.mkdir(parents=True, exist_ok=True)
    report = []
    for name, notebook in copies.items():
        target = folder / name
        if target.exists() and not force:
            report.append(f"kept {_shown(target)}: it may hold your work (--force overwrites it)")
            continue
        # Written as nbformat writes notebooks, so a diff shows only real changes.
        text = json.dumps(notebook, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
        target.write_text(text, encoding="utf-8")
        report.append(f"wrote {_shown(target)}")
    return report


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "notebooks",
        nargs="*",
        type=Path,
        help="teacher's notebooks to copy (default: notebooks/[0-9]*.ipynb)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "student",
        help="folder for the learner's copies (default: student/ at the repository's root)",
    )
    parser.add_argument(
        "--force", action="store_true", help="overwrite copies already there (and any work in them)"
    )
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
    try:
        report = write_learner_copies(paths, args.out, force=args.force)
    except NotebookError as error:
        parser.exit(1, f"{parser.prog}: {error}\n")
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
