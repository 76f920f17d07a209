"""Keep the packaging files consistent with each other and with the course's rules.

These tests read pyproject.toml, environment.yml, the Makefile, .ci/run, the README
and notebooks/sanitize.cfg; none of them imports chatlib.
"""

from __future__ import annotations

import ast
import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "chatlib"
# The widget and the broker link are the modules allowed a third-party import:
# ipywidgets, reached only through the `notebooks` extra, and redis-py, through
# the `redis` extra (without it, --broker is one clear error).
NOT_STDLIB_ONLY = {PACKAGE / "widget.py", PACKAGE / "redis_link.py"}
# Test tools that the conda route must also provide; the rest comes from `pip -e .[test]`.
CONDA_TEST_TOOLS = {"pytest", "nbval"}
# PyPI names that conda-forge spells otherwise: its "redis" is the server, redis-py the client.
CONDA_NAMES = {"redis": "redis-py"}


@pytest.fixture(scope="module")
def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the stdlib from Python 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def environment() -> dict:
    import yaml  # the test extra installs it: a missing install must fail, not skip

    return yaml.safe_load((ROOT / "environment.yml").read_text(encoding="utf-8"))


def _normalise(name: str) -> str:
    """Return a package name in PEP 503 form, which matches conda-forge's for our packages."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _split_requirement(spec: str) -> tuple[str, tuple[int, ...] | None]:
    """Split `name[extra]>=1.2,<3` (pip) or `name>=1.2` (conda) into (name, lower bound)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
    assert match, f"cannot parse requirement {spec!r}"
    bound = re.search(r">=\s*([0-9]+(?:\.[0-9]+)*)", spec)
    lower = tuple(int(part) for part in bound.group(1).split(".")) if bound else None
    return _normalise(match.group(1)), lower


def _conda_requirements(environment: dict) -> dict[str, tuple[int, ...] | None]:
    return dict(
        _split_requirement(dep) for dep in environment["dependencies"] if isinstance(dep, str)
    )


def _extra(pyproject: dict, name: str) -> dict[str, tuple[int, ...] | None]:
    return dict(
        _split_requirement(req) for req in pyproject["project"]["optional-dependencies"][name]
    )


# (a) environment.yml and pyproject.toml agree


def test_split_requirement_reads_pip_and_conda_forms():
    assert _split_requirement("ipykernel>=7.1") == ("ipykernel", (7, 1))
    assert _split_requirement("chatlib[notebooks]") == ("chatlib", None)
    assert _split_requirement("Foo_Bar >= 2.0, <3") == ("foo-bar", (2, 0))
    assert _split_requirement("python>=3.10") == ("python", (3, 10))


def test_environment_covers_notebooks_extra_and_test_tools(pyproject, environment):
    conda = _conda_requirements(environment)
    wanted = _extra(pyproject, "notebooks") | {
        name: bound for name, bound in _extra(pyproject, "test").items() if name in CONDA_TEST_TOOLS
    }
    assert set(wanted) >= CONDA_TEST_TOOLS
    wanted = {CONDA_NAMES.get(name, name): bound for name, bound in wanted.items()}
    missing = sorted(set(wanted) - set(conda))
    assert not missing, f"environment.yml lacks {missing} (in pyproject.toml's extras)"
    for name, pip_bound in wanted.items():
        conda_bound = conda[name]
        if conda_bound is not None and pip_bound is not None:
            assert conda_bound >= pip_bound, (
                f"{name}: environment.yml allows >={conda_bound}, "
                f"but pyproject.toml needs >={pip_bound}"
            )


def test_ipykernel_floor_is_7_1_in_both(pyproject, environment):
    # ipykernel 7.0.x raised LookupError when a widget was updated from a thread.
    assert _extra(pyproject, "notebooks")["ipykernel"] == (7, 1)
    assert _conda_requirements(environment)["ipykernel"] == (7, 1)


def test_environment_python_matches_requires_python(pyproject, environment):
    floor = re.fullmatch(r">=\s*(\d+)\.(\d+)", pyproject["project"]["requires-python"])
    assert floor, "requires-python should be a plain >=X.Y"
    assert _conda_requirements(environment)["python"] == (int(floor[1]), int(floor[2]))


def test_environment_installs_this_package_with_test_extra(environment):
    assert environment["name"] == "chatlib"
    assert environment["channels"] == ["conda-forge"]
    assert "pip" in _conda_requirements(environment)
    pip_sections = [dep["pip"] for dep in environment["dependencies"] if isinstance(dep, dict)]
    assert pip_sections == [["-e .[test]"]]


def test_test_extra_pulls_in_notebooks_extra_and_tools(pyproject):
    test_extra = _extra(pyproject, "test")
    assert "chatlib[notebooks]" in pyproject["project"]["optional-dependencies"]["test"]
    for tool in ("pytest", "pytest-timeout", "hypothesis", "nbval", "playwright", "ruff", "pyyaml"):
        assert tool in test_extra, f"{tool} missing from the test extra"


# (b) the core is stdlib-only


def test_core_has_no_runtime_dependencies(pyproject):
    assert pyproject["project"].get("dependencies", []) == []


def _top_level_imports(source: str, filename: str = "<string>") -> set[str]:
    """Return the top-level names of absolute imports in `source`."""
    names = set()
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names


def _non_stdlib(names: set[str]) -> set[str]:
    return {name for name in names if name not in sys.stdlib_module_names and name != "chatlib"}


def test_import_checker_catches_third_party_imports():
    source = "import os.path\nimport numpy as np\nfrom yaml import safe_load\nfrom . import room\n"
    source += "from chatlib.protocol import x\ndef f():\n    import ipywidgets\n"
    assert _non_stdlib(_top_level_imports(source)) == {"numpy", "yaml", "ipywidgets"}


def _core_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p not in NOT_STDLIB_ONLY)


def test_core_imports_only_the_stdlib():
    modules = _core_modules()
    assert modules, "found no chatlib modules to check"
    offenders = {}
    for path in modules:
        found = _non_stdlib(_top_level_imports(path.read_text(encoding="utf-8"), str(path)))
        if found:
            offenders[str(path.relative_to(ROOT))] = sorted(found)
    assert not offenders, f"third-party imports outside {sorted(NOT_STDLIB_ONLY)}: {offenders}"


def test_every_subpackage_has_an_init():
    # setuptools' find_packages skips a folder without __init__.py, so a wheel
    # (unlike the editable install) would silently lack its modules.
    folders = {path.parent for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts}
    missing = sorted(
        str(folder.relative_to(ROOT)) for folder in folders if not (folder / "__init__.py").exists()
    )
    assert not missing, f"folders without __init__.py: {missing}"


@pytest.mark.parametrize(
    ("script", "target"),
    [("chatlib-server", "chatlib.server:main"), ("chatlib-client", "chatlib.client:main")],
)
def test_console_scripts_point_at_main_functions(pyproject, script, target):
    assert pyproject["project"]["scripts"][script] == target
    module, _, function = target.partition(":")
    path = ROOT.joinpath(*module.split(".")).with_suffix(".py")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert function in defined, f"{module} defines no {function}()"


# (c) CI and README point at the same two commands


def _code_lines(text: str) -> list[str]:
    stripped = (line.strip() for line in text.splitlines())
    return [line for line in stripped if line and not line.startswith("#")]


def test_ci_runs_make_test():
    ci = ROOT / ".ci" / "run"
    assert os.access(ci, os.X_OK), ".ci/run must be executable"
    lines = _code_lines(ci.read_text(encoding="utf-8"))
    assert lines and lines[-1].startswith("make test"), "the last step of .ci/run must be make test"
    assert "set -euo pipefail" in lines


def test_readme_shows_make_test_and_make_lab():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first_screen = "\n".join(readme.splitlines()[:30])
    for command in ("make lab", "make test"):
        assert re.search(rf"^{command}\b", first_screen, re.MULTILINE), f"{command} not up front"
    for heading in ("## Course map", "## Protocol", "## Project layout", "## Tests"):
        assert heading in readme


# (d) make test really runs the notebooks under nbval


def test_make_test_runs_notebooks_with_nbval():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL"}}
    dry_run = subprocess.run(
        ["make", "--dry-run", "--always-make", "test"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "pip install" in dry_run and ".[test]" in dry_run
    assert "ruff check chatlib tests notebooks" in dry_run
    assert re.search(r"-m pytest tests\b", dry_run)
    nbval = [line for line in dry_run.splitlines() if "--nbval" in line and "pytest" in line]
    assert nbval, "make test never runs pytest --nbval"
    assert any(
        "--nbval-sanitize-with notebooks/sanitize.cfg" in line and "notebooks/" in line
        for line in nbval
    )
    assert "--nbval-lax" not in dry_run, "the notebooks are checked strictly"


# notebooks/sanitize.cfg


def _sanitize_patterns() -> list[tuple[str, str]]:
    cfg = ROOT / "notebooks" / "sanitize.cfg"
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(cfg, encoding="utf-8")
    assert parser.sections(), "sanitize.cfg has no sections"
    return [(parser[s]["regex"], parser[s]["replace"]) for s in parser.sections()]


def _sanitize(text: str) -> str:
    for regex, replace in _sanitize_patterns():
        text = re.sub(regex, replace, text)
    return text


def test_nbval_reads_sanitize_cfg_as_configparser_does():
    # nbval parses the file with its own regex, not configparser: a stray space or a
    # missing `replace:` line would silently drop a pattern.
    from nbval import plugin  # the test extra installs it

    text = (ROOT / "notebooks" / "sanitize.cfg").read_text(encoding="utf-8")
    assert text.isascii(), "nbval opens the file with the locale's encoding"
    assert plugin.get_sanitize_patterns(text) == _sanitize_patterns()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            "[LISTENING] Server is listening on 127.0.0.1:5050",
            "[LISTENING] Server is listening on 127.0.0.1:PORT",
        ),
        ("laddr=('127.0.0.1', 54321)", "laddr=('127.0.0.1', PORT)"),
        ("http://localhost:8888/lab", "http://localhost:PORT/lab"),
        (
            "python -m chatlib.client --port 43567 --name carol",
            "python -m chatlib.client --port PORT --name carol",
        ),
        ("[::1]:5050 and 0.0.0.0:80", "[::1]:PORT and 0.0.0.0:PORT"),
        ("<socket.socket fd=3 at 0x7f3a2c1d5E40>", "<socket.socket fd=3 at 0xADDR>"),
        ("[14:03:59] alice: hi", "[HH:MM:SS] alice: hi"),
        ("sent at 14:03:59.123456", "sent at HH:MM:SS"),
        (
            "took 12 ms, 0.5s, 3.25 s, 40 us, 40 \u00b5s",
            "took DURATION, DURATION, DURATION, DURATION, DURATION",
        ),
        (
            "Online (2): alice@8fe9, guest3-b76c@b76c; You are on server 8fe9 (linked)",
            "Online (2): alice@TAG, guest3-TAG@TAG; You are on server TAG (linked)",
        ),
        # Left alone: counts whose unit merely starts with s, and plain numbers.
        ("5 seconds, 2 sessions, 3 messages", "5 seconds, 2 sessions, 3 messages"),
        ("alice: 1 + 1 = 2", "alice: 1 + 1 = 2"),
        ("bob@home, the server room is open", "bob@home, the server room is open"),
    ],
)
def test_sanitize_cfg_replaces_volatile_values(raw, expected):
    assert _sanitize(raw) == expected
