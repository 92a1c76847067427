"""The docs stand on their own and stay true to the code: every
dotted ``jitckpt.<module>.<name>`` a doc or docstring names exists, every citation of a doc
section names a heading that exists, and nothing cites files outside the
repository."""

from __future__ import annotations

import importlib
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", *patterns], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    return [REPO / name for name in out if (REPO / name).exists()]


# Frameworks an integration module imports that need not be installed
# (jitckpt.integrations.torchtitan): a module that fails to import for want
# of one of them still exists.
OPTIONAL_PEERS = ("torchtitan",)


def resolves(reference: str) -> bool:
    parts = reference.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError as exc:
            if (exc.name or "").split(".")[0] in OPTIONAL_PEERS:
                return True
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def test_every_named_module_and_object_exists() -> None:
    missing = []
    for path in tracked("*.py", "*.md"):
        if "torchft" in path.name:
            continue  # imports an optional peer at module level
        text = path.read_text()
        for match in re.finditer(r"(?<![\w/.-])jitckpt(?:\.[A-Za-z_]\w*)+", text):
            if not resolves(match.group(0)):
                line = text[: match.start()].count("\n") + 1
                missing.append(f"{path.relative_to(REPO)}:{line}: {match.group(0)}")
    assert missing == []


def headings(doc: Path) -> set[str]:
    return {
        line.lstrip("#").strip() for line in doc.read_text().splitlines() if line.startswith("#")
    }


def test_every_cited_doc_section_exists() -> None:
    """Citations read ``docs/<name>.md, "Heading"`` (in comments they may wrap
    over lines) or ``docs/promises.md, PN``."""
    problems = []
    for path in tracked("*.py", "*.md", "*.sh"):
        # Join comment and docstring lines so a citation that wraps still reads whole.
        text = re.sub(r"\s*\n\s*(#\s*)?", " ", path.read_text())
        for match in re.finditer(r'docs/([a-z-]+\.md),? "([^"]+)"', text):
            doc = REPO / "docs" / match.group(1)
            if not doc.exists():
                problems.append(f"{path.relative_to(REPO)}: no {doc.name}")
            elif match.group(2) not in headings(doc):
                problems.append(f"{path.relative_to(REPO)}: no section {match.group(2)!r}")
        for match in re.finditer(r"docs/promises\.md, (P\d)", text):
            if not any(
                h.startswith(match.group(1) + " ") for h in headings(REPO / "docs/promises.md")
            ):
                problems.append(f"{path.relative_to(REPO)}: no promise {match.group(1)}")
    assert problems == []


def test_nothing_cites_files_outside_the_repository() -> None:
    outside = [
        str(path.relative_to(REPO))
        for path in tracked("*.py", "*.md", "*.sh", "*.toml", "*.txt")
        if re.search(r"PLATFORM\.md|DESIGN\.md|\.\./shared", path.read_text())
        and path.name != "test_docs.py"
    ]
    assert outside == []


def test_every_named_repository_file_exists() -> None:
    """``tests/drills/test_fsdp.py``, ``docs/sharded.md``...: files a doc or
    comment points the reader to."""
    missing = []
    pattern = (
        r"(?<![\w/.-])((?:tests|docs|benchmarks|scripts|examples|src)/[\w/.-]*\w\.(?:py|md|sh))"
    )
    for path in tracked("*.py", "*.md", "*.sh"):
        text = path.read_text()
        for match in re.finditer(pattern, text):
            if not (REPO / match.group(1)).exists():
                line = text[: match.start()].count("\n") + 1
                missing.append(f"{path.relative_to(REPO)}:{line}: {match.group(1)}")
    assert missing == []
