"""The learner's copies of the notebooks (tools/student.py, ``make student``).

First the tool itself, on small notebooks made here: what it takes out, what
it keeps, and how it refuses. Then the proof that matters to a learner
(marker ``student``): the learner's copy of every notebook runs top to
bottom, and the only cells that fail are the checks, each saying that its
exercise is not written yet. So an exercise cell with its stub still runs,
and nothing outside the exercises needs what an exercise defines.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import ROOT, load_tool

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
# Each cell may start servers and wait on them; none should take anywhere near this.
CELL_TIMEOUT = 180

student = load_tool("student")


def _code(source: str, tags: tuple[str, ...] = (), outputs: list | None = None) -> dict:
    return {
        "cell_type": "code",
        "execution_count": 1 if outputs else None,
        "metadata": {"tags": list(tags)} if tags else {},
        "outputs": outputs or [],
        "source": textwrap.dedent(source).strip("\n").splitlines(keepends=True),
    }


def _result(text: str) -> dict:
    return {
        "output_type": "execute_result",
        "execution_count": 1,
        "metadata": {},
        "data": {"text/plain": text},
    }


def _notebook(*cells: dict) -> dict:
    return {
        "cells": list(cells),
        "metadata": {"widgets": {"state": {"model-1": {}}}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }


EXERCISE = """
    def read_lines(chunks, max_line):
        \"\"\"Return the complete lines in chunks.\"\"\"
        ### BEGIN SOLUTION
        return [line for chunk in chunks for line in chunk.split(b"\\n")]
        ### END SOLUTION
"""


def _lesson() -> dict:
    return _notebook(
        _code("2 + 2", outputs=[_result("4")]),
        _code(EXERCISE, ("exercise",), [_result("None")]),
        _code("lessons.check_read_lines(read_lines)", ("check",), [_result("'all passed'")]),
    )


def _source(cell: dict) -> str:
    return "".join(cell["source"])


# --- The tool, on notebooks made here ------------------------------------------


def test_a_region_becomes_the_stub_at_the_markers_indentation():
    source = textwrap.dedent(EXERCISE).strip("\n")
    stripped, regions = student.strip_solutions(source)
    assert regions == 1
    assert stripped == textwrap.dedent(
        '''
        def read_lines(chunks, max_line):
            """Return the complete lines in chunks."""
            # YOUR CODE HERE
            raise NotImplementedError()'''
    ).strip("\n")
    namespace: dict = {}
    exec(stripped, namespace)  # the stub defines the function, which then refuses to run
    with pytest.raises(NotImplementedError):
        namespace["read_lines"]([], 10)


def test_each_method_of_a_class_keeps_its_own_stub():
    source = textwrap.dedent(
        """
        class Ring:
            def __init__(self, kept):
                ### BEGIN SOLUTION
                self.kept = kept
                ### END SOLUTION

            def add(self, line):
                if line:
                    ### BEGIN SOLUTION
                    self.lines.append(line)
                    ### END SOLUTION
                return None
        """
    )
    stripped, regions = student.strip_solutions(source)
    assert regions == 2
    assert "self.kept" not in stripped and "append" not in stripped
    assert "        # YOUR CODE HERE\n        raise NotImplementedError()\n" in stripped
    assert "            # YOUR CODE HERE\n            raise NotImplementedError()\n" in stripped
    assert stripped.endswith("            raise NotImplementedError()\n        return None\n")


def test_exercise_and_check_outputs_are_cleared_and_the_rest_kept():
    teacher = _lesson()
    learner = student.learner_copy(teacher)
    lesson, exercise, check = learner["cells"]
    assert lesson["outputs"] == [_result("4")] and lesson["execution_count"] == 1
    for cell in (exercise, check):
        assert cell["outputs"] == [] and cell["execution_count"] is None
    assert _source(check) == "lessons.check_read_lines(read_lines)"
    assert learner["metadata"] == teacher["metadata"], "widget state is kept"
    assert "BEGIN SOLUTION" in _source(teacher["cells"][1]), "the teacher's copy is left alone"


def _write_teachers_copy(folder: Path, notebook: dict) -> Path:
    path = folder / "teacher" / "01-lesson.ipynb"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(notebook), encoding="utf-8")
    return path


def test_a_copy_already_there_is_kept_unless_forced(tmp_path):
    teacher = _write_teachers_copy(tmp_path, _lesson())
    out = tmp_path / "student"
    assert student.write_learner_copies([teacher], out) == [f"wrote {out / teacher.name}"]
    copy = out / teacher.name
    copy.write_text("the learner's work", encoding="utf-8")
    report = student.write_learner_copies([teacher], out)
    assert report == [f"kept {copy}: it may hold your work (--force overwrites it)"]
    assert copy.read_text(encoding="utf-8") == "the learner's work"
    student.write_learner_copies([teacher], out, force=True)
    assert "NotImplementedError" in copy.read_text(encoding="utf-8")


def test_the_command_line_says_what_it_kept(tmp_path, capsys):
    teacher = _write_teachers_copy(tmp_path, _lesson())
    out = tmp_path / "student"
    assert student.main([str(teacher), "--out", str(out)]) == 0
    assert student.main([str(teacher), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"wrote {out / teacher.name}",
        f"kept {out / teacher.name}: it may hold your work (--force overwrites it)",
    ]


@pytest.mark.parametrize(
    ("cells", "message"),
    [
        (
            [_code("def f():\n    ### BEGIN SOLUTION\n    return 1", ("exercise",))],
            r"cell 1, line 2: ### BEGIN SOLUTION has no ### END SOLUTION after it",
        ),
        (
            [_code("def f():\n    return 1\n    ### END SOLUTION", ("exercise",))],
            r"cell 1, line 3: ### END SOLUTION without a ### BEGIN SOLUTION before it",
        ),
        (
            [_code("def f():\n    return 1", ("exercise",))],
            r"cell 1 is tagged exercise but has no ### BEGIN SOLUTION",
        ),
        (
            [_code("x = 1"), _code("lessons.check_f(f)", ("check",))],
            r"cell 2 is tagged check but does not come right after an exercise cell",
        ),
    ],
    ids=["begin-without-end", "end-without-begin", "exercise-without-region", "stray-check"],
)
def test_a_broken_notebook_is_refused_with_a_clear_message(tmp_path, capsys, cells, message):
    teacher = _write_teachers_copy(tmp_path, _notebook(*cells))
    with pytest.raises(student.NotebookError, match=message):
        student.learner_copy(json.loads(teacher.read_text(encoding="utf-8")), str(teacher))
    out = tmp_path / "student"
    with pytest.raises(SystemExit) as exit_info:
        student.main([str(teacher), "--out", str(out)])
    assert exit_info.value.code == 1
    assert str(teacher) in capsys.readouterr().err
    assert not (out / teacher.name).exists(), "nothing is written from a broken notebook"


# --- Every learner's copy, executed -------------------------------------------


@pytest.fixture(scope="module")
def learner_folder(tmp_path_factory) -> Path:
    """Write every learner's copy into a folder laid out like the repository.

    The notebooks open ``../docs/`` (08 reads its benchmark data there) and
    link ``../chatlib/``, so the copies sit one level under a folder that
    has both, as ``student/`` does at the repository's root.
    """
    course = tmp_path_factory.mktemp("course")
    for name in ("docs", "chatlib"):
        (course / name).symlink_to(ROOT / name, target_is_directory=True)
    folder = course / "student"
    student.write_learner_copies(NOTEBOOKS, folder)
    return folder


def _errors(cell) -> list:
    return [out for out in cell.get("outputs", []) if out["output_type"] == "error"]


@pytest.mark.student
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_learner_copy_executes_and_only_its_checks_fail(path, learner_folder):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(learner_folder / path.name, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        allow_errors=True,
        resources={"metadata": {"path": str(learner_folder)}},
    )
    env = dict(os.environ, JUPYTER_PLATFORM_DIRS="1")
    # The kernel is started as plain "python": make it this environment's, and
    # make it import this checkout's chatlib.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    client.execute(env=env)

    def tagged(tag: str) -> list[int]:
        return [i for i, cell in enumerate(notebook.cells) if tag in cell.metadata.get("tags", [])]

    failed = [i for i, cell in enumerate(notebook.cells) if _errors(cell)]
    checks = tagged("check")
    # Cells that raise on purpose in the lesson raise in the learner's copy too.
    assert failed == sorted(checks + tagged("raises-exception")), (
        f"{path.name}: cells {failed} failed; only the checks, cells {checks}, should: "
        + "; ".join(
            f"cell {i}: {out['ename']}: {out['evalue']}"
            for i in failed
            if i not in checks
            for out in _errors(notebook.cells[i])
        )
    )
    assert checks, f"{path.name}: the learner's copy has no check cells, so no exercises"
    for index in checks:
        (error,) = _errors(notebook.cells[index])
        assert error["ename"] == "CheckFailed" and "is not written yet" in error["evalue"], (
            f"{path.name}: check cell {index} should say its exercise is not written yet, "
            f"not {error['ename']}: {error['evalue']}"
        )
