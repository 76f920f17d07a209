"""The course map in notebook 00 and the README is written from the notebooks.

``tools/course_map.py`` reads each notebook's title, goals and finished
modules; these tests check that the written maps are current, and that the
reader takes what a notebook states, so a retitled or added notebook shows
up in the map instead of drifting from it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import ROOT, load_tool

course_map = load_tool("course_map")


def _notebook(path: Path, first: str, last: str) -> Path:
    cells = [
        {"cell_type": "markdown", "metadata": {}, "source": first},
        {"cell_type": "markdown", "metadata": {}, "source": last},
    ]
    path.write_text(json.dumps({"cells": cells}), encoding="utf-8")
    return path


def test_the_maps_in_notebook_00_and_the_readme_are_current():
    stale = [str(path.relative_to(ROOT)) for path in course_map.stale()]
    assert not stale, f"{stale}: run python tools/course_map.py"


def test_every_notebook_is_on_the_map_in_order_with_its_goals_and_code():
    course = course_map.lessons()
    files = [lesson.file for lesson in course]
    assert files == sorted(path.name for path in (ROOT / "notebooks").glob("[0-9]*.ipynb"))
    for lesson in course:
        assert lesson.goals, f"{lesson.file} states no goals"
        assert lesson.modules, f"{lesson.file}'s last cell names no chatlib module"
        for module in lesson.modules:
            assert (ROOT / module).exists(), f"{lesson.file} names {module}, which is missing"


def test_a_goal_wrapped_onto_two_lines_is_read_whole(tmp_path):
    first = (
        "# 03 · Broadcasting\n\n[Course map](00-course-map.ipynb)\n\n## Goals\n\n"
        "By the end you can …\n\n- write the naive loop;\n- show how one client\n"
        "  stalls a room.\n"
    )
    last = "The finished version of this lesson lives in `chatlib/chat.py`."
    lesson = course_map.read_lesson(_notebook(tmp_path / "03-broadcasting.ipynb", first, last))
    assert lesson == course_map.Lesson(
        "03-broadcasting.ipynb",
        "03 · Broadcasting",
        ["write the naive loop", "show how one client stalls a room"],
        ["chatlib/chat.py"],
    )


def test_a_renamed_notebook_makes_the_map_stale():
    course = course_map.lessons()
    renamed = [course[0]._replace(title="00 · A new title"), *course[1:]]
    assert set(course_map.stale(renamed)) == {course_map.COURSE_MAP, course_map.README}
    assert "00 · A new title" in course_map.stale(renamed)[course_map.README]


def test_a_notebook_without_a_title_line_is_refused(tmp_path):
    path = _notebook(tmp_path / "05-x.ipynb", "Event loops\n\n## Goals\n", "`chatlib/chat.py`")
    with pytest.raises(ValueError, match="first line should be"):
        course_map.read_lesson(path)
