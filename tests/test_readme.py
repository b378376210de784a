"""Every Python snippet of the README runs as written: copied into a session one after the other,
as a reader does (a name a later snippet uses must come from an earlier one)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_snippets(text: str) -> list[tuple[int, str]]:
    """(line, code) of every fenced ```python block, code dedented as it is in a list item."""
    snippets = []
    for match in re.finditer(r"^( *)```python\n(.*?)^\1```", text, flags=re.M | re.S):
        indent = len(match.group(1))
        code = "\n".join(line[indent:] for line in match.group(2).splitlines())
        snippets.append((text.count("\n", 0, match.start()) + 1, code))
    return snippets


def test_the_readme_has_its_snippets():
    assert len(python_snippets(README.read_text())) >= 4


def test_every_python_snippet_runs_as_written():
    pytest.importorskip("pytorch_metric_learning")
    namespace: dict = {"__name__": "readme"}
    for line, code in python_snippets(README.read_text()):
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as error:  # the snippet's line in the README, and what it raised
            pytest.fail(f"the README's snippet at line {line} raised {type(error).__name__}: {error}")
