"""Write the course map from the notebooks themselves, so that it cannot drift.

Each notebook opens with its title (``# NN · Title``) and its goals, and ends
by naming the modules of ``chatlib`` that hold its finished code. This script
reads those three things from every ``notebooks/NN-*.ipynb`` and writes them
into the two places a learner looks for the map:

- notebook 00, between the ``<!-- course map -->`` comment lines of its
  "How the notebooks and chatlib fit together" cell;
- the README, as the list under ``## Course map``.

Run ``python tools/course_map.py`` after adding, renaming or retitling a
notebook; ``--check`` only reports what is out of date (the tests run it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
README = ROOT / "README.md"
COURSE_MAP = NOTEBOOKS / "00-course-map.ipynb"

BEGIN = "<!-- course map: written by tools/course_map.py from the notebooks -->"
END = "<!-- end of course map -->"
TITLE = re.compile(r"# (?P<number>\d{2}) · (?P<title>\S.*)")
MODULE = re.compile(r"`(chatlib/[^`]+)`")
README_SECTION = re.compile(r"(^## Course map\n\n.*?\n\n)(.*?)(?=\n## )", re.MULTILINE | re.DOTALL)


class Lesson(NamedTuple):
    """What the map says of one notebook."""

    file: str
    title: str
    goals: list[str]
    modules: list[str]


def _source(cell: dict) -> str:
    source = cell["source"]
    return source if isinstance(source, str) else "".join(source)


def read_lesson(path: Path) -> Lesson:
    """Return *path*'s title, goals and finished modules, as the notebook states them."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    lines = _source(cells[0]).splitlines()
    match = TITLE.fullmatch(lines[0])
    if not match:
        raise ValueError(f"{path.name}: the first line should be '# NN · Title', not {lines[0]!r}")
    goals: list[str] = []
    for line in lines[lines.index("## Goals") :]:
        if line.startswith("- "):
            goals.append(line[2:])
        elif line.startswith("  ") and goals:  # a goal wrapped onto the next line
            goals[-1] += " " + line.strip()
    goals = [goal.rstrip(";.") for goal in goals]
    modules = MODULE.findall(_source(cells[-1]))
    return Lesson(path.name, f"{match['number']} · {match['title']}", goals, modules)


def lessons() -> list[Lesson]:
    """Return every notebook of the course, in order."""
    return [read_lesson(path) for path in sorted(NOTEBOOKS.glob("[0-9][0-9]-*.ipynb"))]


def notebook_map(course: list[Lesson]) -> str:
    """Return the map for notebook 00: each notebook, its goals and its code."""
    parts = []
    for lesson in course:
        code = ", ".join(f"`{module}`" for module in lesson.modules)
        goals = "".join(f"\n  - {goal}" for goal in lesson.goals)
        parts.append(f"- **[{lesson.title}]({lesson.file})** · finished code in {code}{goals}")
    return "\n".join([BEGIN, *parts, END])


def readme_map(course: list[Lesson]) -> str:
    """Return the README's list: each notebook's title, linked, and its code."""
    rows = []
    for lesson in course:
        code = ", ".join(f"`{module}`" for module in lesson.modules)
        rows.append(f"- [{lesson.title}](notebooks/{lesson.file}) · {code}")
    return "\n".join(rows) + "\n"


def _with_notebook_map(text: str, course: list[Lesson]) -> str:
    """Return notebook 00's JSON text with its map replaced."""
    nb = json.loads(text)
    for cell in nb["cells"]:
        source = _source(cell)
        if BEGIN in source:
            before, _, rest = source.partition(BEGIN)
            _, _, after = rest.partition(END)
            new = before + notebook_map(course) + after
            cell["source"] = new.splitlines(keepends=True)
            # The same layout as nbformat and nbstripout write.
            return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
    raise ValueError(f"{COURSE_MAP.name} has no {BEGIN!r} line")


def _with_readme_map(text: str, course: list[Lesson]) -> str:
    """Return the README with its course map list replaced."""
    new, found = README_SECTION.subn(lambda m: m[1] + readme_map(course), text, count=1)
    if not found:
        raise ValueError("README.md has no '## Course map' section with a list")
    return new


def stale(course: list[Lesson] | None = None) -> dict[Path, str]:
    """Return the files whose map is out of date, with what they should hold."""
    course = lessons() if course is None else course
    out_of_date = {}
    for path, rewrite in ((COURSE_MAP, _with_notebook_map), (README, _with_readme_map)):
        old = path.read_text(encoding="utf-8")
        new = rewrite(old, course)
        if new != old:
            out_of_date[path] = new
    return out_of_date


def main(argv: list[str] | None = None) -> int:
    """Write the maps (or, with ``--check``, list the stale ones); return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale maps")
    args = parser.parse_args(argv)
    out_of_date = stale()
    for path, new in out_of_date.items():
        name = path.relative_to(ROOT)
        if args.check:
            print(f"{name}: the course map is out of date; run python tools/course_map.py")
        else:
            path.write_text(new, encoding="utf-8")
            print(f"{name}: course map written")
    return 1 if args.check and out_of_date else 0


if __name__ == "__main__":
    sys.exit(main())
