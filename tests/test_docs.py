"""Keep the docs in step with the code they describe.

docs/engines.md draws the life of a connection from ``chatlib.chat.LIFECYCLE``, and
docs/protocol.md documents every limit of ``chatlib.chat.Limits``: when the code changes,
these tests fail and say what the docs must show instead. They open no socket.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from chatlib.chat import LIFECYCLE, Limits, State

DOCS = Path(__file__).resolve().parent.parent / "docs"


def lifecycle_diagram() -> list[str]:
    """Return the mermaid diagram of LIFECYCLE, line by line, as docs/engines.md must show it.

    A state nothing leads to is where connections start; a state with no way out is where
    they end.
    """
    targets = {target for events in LIFECYCLE.values() for target in events.values()}
    lines = ["stateDiagram-v2"]
    lines += [f"    [*] --> {state.name}" for state in LIFECYCLE if state not in targets]
    for state, events in LIFECYCLE.items():
        for event, target in events.items():
            lines.append(f"    {state.name} --> {target.name}: {event}")
    lines += [f"    {state.name} --> [*]" for state, events in LIFECYCLE.items() if not events]
    return lines


def mermaid_blocks(text: str) -> list[list[str]]:
    """Return the lines of every ```mermaid block in *text*."""
    blocks = re.findall(r"^```mermaid\n(.*?)^```[ \t]*$", text, flags=re.MULTILINE | re.DOTALL)
    return [block.splitlines() for block in blocks]


def section(text: str, title: str) -> str:
    """Return the body of the ``## title`` section of a Markdown *text*."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"no '## {title}' section"
    return match[1]


def test_the_lifecycle_diagram_in_engines_md_is_drawn_from_the_room():
    text = (DOCS / "engines.md").read_text(encoding="utf-8")
    diagrams = [block for block in mermaid_blocks(text) if block[:1] == ["stateDiagram-v2"]]
    expected = lifecycle_diagram()
    paste = "\n".join(["```mermaid", *expected, "```"])
    assert len(diagrams) == 1, (
        f"docs/engines.md should hold one stateDiagram-v2 block, not {len(diagrams)}; "
        f"chatlib.chat.LIFECYCLE draws this one:\n{paste}"
    )
    assert diagrams[0] == expected, (
        "docs/engines.md's diagram no longer matches chatlib.chat.LIFECYCLE; "
        f"replace it with:\n{paste}"
    )


def test_every_state_has_a_row_in_engines_md():
    text = section((DOCS / "engines.md").read_text(encoding="utf-8"), "The life of a connection")
    missing = [state.name for state in State if f"| `{state.name}` |" not in text]
    assert not missing, f"'The life of a connection' has no table row for {missing}"


def test_every_limit_is_documented_in_protocol_md():
    text = section((DOCS / "protocol.md").read_text(encoding="utf-8"), "Limits")
    options = ["--" + limit.name.replace("_", "-") for limit in dataclasses.fields(Limits)]
    missing = [option for option in options if f"`{option}`" not in text]
    assert not missing, f"the Limits section of docs/protocol.md does not mention {missing}"
