"""The event catalogue (jitckpt.events.CATALOGUE) is the one list of event
names and fields: every writer uses its constants and fields, the readers
never spell an event name, and docs/events.md is its table."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from jitckpt import events as ev

REPO = Path(__file__).resolve().parents[2]
# The baselines log records of their own (not jitckpt events), in files that
# deliberately import nothing of jitckpt.
OWN_RECORDS = {"periodic_baseline.py", "torchft_train.py", "drills_torchft.py", "dcp_checkpoint.py"}


def sources() -> list[Path]:
    files = sorted((REPO / "src" / "jitckpt").rglob("*.py")) + sorted(
        (REPO / "benchmarks").glob("*.py")
    )
    return [p for p in files if p.name not in OWN_RECORDS]


def emit_calls(tree: ast.AST) -> list[ast.Call]:
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("emit", "warn")
        and node.args
    ]


def test_every_event_written_is_in_the_catalogue_with_its_fields() -> None:
    problems = []
    seen = set()
    for path in sources():
        if path.name == "events.py":
            continue
        for call in emit_calls(ast.parse(path.read_text())):
            where = f"{path.relative_to(REPO)}:{call.lineno}"
            name = call.args[0]
            if not (
                isinstance(name, ast.Attribute)
                and isinstance(name.value, ast.Name)
                and name.value.id == "ev"
            ):
                problems.append(f"{where}: event name {ast.unparse(name)} is not an ev constant")
                continue
            event = getattr(ev, name.attr, None)
            if event not in ev.CATALOGUE:
                problems.append(f"{where}: ev.{name.attr} is not in the catalogue")
                continue
            seen.add(event)
            fields = set(ev.CATALOGUE[event].fields)
            for keyword in call.keywords:
                if keyword.arg is not None and keyword.arg not in fields:
                    problems.append(f"{where}: {event} has no field {keyword.arg!r}")
    assert problems == []
    assert seen == set(ev.CATALOGUE), f"catalogued but never written: {set(ev.CATALOGUE) - seen}"


def test_readers_name_events_by_constant() -> None:
    """A comparison with ``record["event"]`` (or ``.get("event")``) never
    uses a string literal outside the catalogue."""
    problems = []
    for path in sources():
        if path.name == "events.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]
            reads_event = any(
                (isinstance(s, ast.Subscript) and ast.unparse(s.slice) == "'event'")
                or (isinstance(s, ast.Call) and ast.unparse(s).endswith(".get('event')"))
                for s in sides
            )
            if not reads_event:
                continue
            literals = [
                n.value
                for s in sides
                for n in ast.walk(s)
                if isinstance(n, ast.Constant) and n.value in ev.CATALOGUE
            ]
            if literals:
                problems.append(f"{path.relative_to(REPO)}:{node.lineno}: {literals}")
    assert problems == []


def test_docs_events_md_is_the_catalogue() -> None:
    assert (REPO / "docs" / "events.md").read_text() == ev.catalogue_markdown(), (
        "regenerate it: python -m jitckpt.events > docs/events.md"
    )


def test_warn_writes_the_event_and_says_it_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = ev.EventLog(tmp_path, rank=3)
    log.warn(ev.SAVE_SKIPPED, reason="no step boundary passed yet")
    log.close()
    (record,) = ev.read_events(tmp_path)
    assert record["event"] == "save_skipped" and record["rank"] == 3
    assert (
        "jitckpt: rank 3: save skipped: reason: no step boundary passed yet"
        in capsys.readouterr().err
    )


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    log = ev.EventLog(tmp_path, rank=0)
    log.emit(ev.START, world_size=1)
    log.close()
    with open(tmp_path / ev.EVENTS_FILE, "a") as handle:
        handle.write('{"t": 2, "event": "sa')  # a writer killed mid-line
    assert [e["event"] for e in ev.read_events(tmp_path)] == ["start"]
