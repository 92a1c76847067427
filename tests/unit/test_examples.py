"""The user-level integration stays small: each example differs from its
plain twin (the same script without jitckpt) by at most five lines of code,
each marked "# jitckpt"."""

from __future__ import annotations

import ast
import difflib
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MAX_CHANGED_LINES = 5


def code_lines(path: Path) -> list[str]:
    """The file's lines after its module docstring."""
    source = path.read_text()
    body = ast.parse(source).body
    first = body[1] if body and isinstance(body[0], ast.Expr) else body[0]
    return source.splitlines()[first.lineno - 1 :]


@pytest.mark.parametrize("name", ["train_cnn", "train_gpt"])
def test_an_example_differs_from_its_plain_twin_by_at_most_five_marked_lines(name: str) -> None:
    plain = code_lines(EXAMPLES / f"{name}_plain.py")
    integrated = code_lines(EXAMPLES / f"{name}.py")
    diff = list(difflib.unified_diff(plain, integrated, lineterm="", n=0))
    added = [line[1:] for line in diff if line.startswith("+") and not line.startswith("+++")]
    added = [line for line in added if line.strip()]
    assert 0 < len(added) <= MAX_CHANGED_LINES, "\n".join(diff)
    assert all(line.rstrip().endswith("# jitckpt") for line in added), "\n".join(added)
