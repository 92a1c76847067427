"""The package's shape: no import cycles, no module over 600 lines, and each
package imports only what its docstring allows (ARCHITECTURE.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "jitckpt"
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, *, top_level_only: bool = False) -> set[str]:
    """jitckpt modules (and external top-level packages) that ``name``
    imports, at any depth of its code unless ``top_level_only``."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                base = ".".join(anchor[: len(anchor) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in MODULES else base)
    return found


def jitckpt_imports(name: str) -> set[str]:
    """The jitckpt modules ``name`` imports (a package imported as such
    counts as its ``__init__``)."""
    return {m for m in imports_of(name) if m in MODULES and m != name}


def test_the_module_table_is_complete() -> None:
    assert "jitckpt.checkpoint.jit_checkpoint" in MODULES and "jitckpt.protocol" in MODULES
    assert len(MODULES) > 50


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    return cycles


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    """Function-level (lazy) imports count too: a cycle hidden in a
    function is still one concern reaching back into another."""
    cycles = find_cycles({name: jitckpt_imports(name) for name in MODULES})
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_module_is_over_600_lines() -> None:
    long = {
        name: n
        for name, path in MODULES.items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}, f"split these by concern: {long}"


def test_every_package_says_what_it_owns_and_may_import() -> None:
    for name, path in MODULES.items():
        if path.name == "__init__.py" and name != "jitckpt":
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            assert "import" in doc.lower() and len(doc) > 150, (
                f"{name}: docstring must say its rules"
            )


# What each part of the package may import from jitckpt (prefixes). The
# launcher meets the worker runtime only through jitckpt.protocol (and prints
# the torch-free end-of-run summary); analysis and storage are torch-free;
# state knows nothing of failures, storage or launchers.
VOCABULARY = (
    "jitckpt._version",
    "jitckpt.errors",
    "jitckpt.events",
    "jitckpt.protocol",
    "jitckpt.inject",
)
ALLOWED = {
    "jitckpt.storage": (*VOCABULARY, "jitckpt.storage"),
    "jitckpt.analysis": (*VOCABULARY, "jitckpt.analysis", "jitckpt.storage"),
    "jitckpt.detect": (*VOCABULARY, "jitckpt.detect", "jitckpt.tracker"),
    "jitckpt.state": (*VOCABULARY, "jitckpt.state", "jitckpt.compat"),
    "jitckpt.launch": (
        *VOCABULARY,
        "jitckpt.launch",
        "jitckpt.compat",
        "jitckpt.detect.signals",
        "jitckpt.analysis.summary",
        "jitckpt.process_exit",
        # In a worker only, when the script calls init_process_group
        # (launch.adopt): the group is jitckpt's, and under --transparent
        # the script's objects are followed from there.
        "jitckpt.distributed",
        "jitckpt.checkpoint.transparent",
        "jitckpt.storage.staging",
    ),
    "jitckpt.inprocess": (
        *VOCABULARY,
        "jitckpt.inprocess",
        "jitckpt.attempt",
        "jitckpt.comm",
        "jitckpt.compat",
        "jitckpt.detect.signals",
        "jitckpt.state",
        "jitckpt.tracker",
        "jitckpt.process_exit",
    ),
    "jitckpt.testing": ("jitckpt.testing",),
    # The framework integrations: the public JitCheckpoint and what it is
    # made of, never the launcher's side (jitckpt.integrations docstring).
    "jitckpt.integrations": (
        *VOCABULARY,
        "jitckpt.integrations",
        "jitckpt.checkpoint",
        "jitckpt.state",
        "jitckpt.storage.directory",
    ),
    # The leaves and small shared modules (ARCHITECTURE.md, layers 1-2).
    "jitckpt.compat": (),
    "jitckpt.tracker": (),
    "jitckpt.comm": (),
    "jitckpt.attempt": ("jitckpt.protocol",),
    "jitckpt.protocol": (),
    "jitckpt.errors": ("jitckpt.protocol",),
    "jitckpt.events": (),
    "jitckpt.process_exit": (),
}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_it_may(package: str) -> None:
    allowed = ALLOWED[package]
    wrong = {
        f"{name} -> {target}"
        for name in MODULES
        if name == package or name.startswith(package + ".")
        for target in jitckpt_imports(name)
        if not any(target == a or target.startswith(a + ".") for a in allowed)
    }
    assert wrong == set(), sorted(wrong)


TORCH_FREE = (
    "jitckpt",
    "jitckpt._version",
    "jitckpt.cli",
    "jitckpt.errors",
    "jitckpt.events",
    "jitckpt.protocol",
    "jitckpt.inject",
    "jitckpt.tracker",
    "jitckpt.compat",
    "jitckpt.storage",
    "jitckpt.analysis",
    "jitckpt.detect",
    "jitckpt.testing",
    "jitckpt.process_exit",
    "jitckpt.launch.bootstrap",
    "jitckpt.launch.adopt",
    "jitckpt.launch.warmclient",
    "jitckpt.launch.wire",
    "jitckpt.launch.warmpool",
    "jitckpt.launch.zygote",
)


def test_torch_free_modules_import_no_torch_at_module_level() -> None:
    heavy = ("torch", "numpy", "torchdata", "matplotlib")
    wrong = {
        f"{name} -> {target}"
        for name in MODULES
        if any(name == t or name.startswith(t + ".") for t in TORCH_FREE if t != "jitckpt")
        or name == "jitckpt"
        for target in imports_of(name, top_level_only=True)
        if target.split(".")[0] in heavy
    }
    assert wrong == set(), sorted(wrong)


def test_worker_bootstrap_and_warm_pool_client_import_no_torch() -> None:
    """What runs in a worker before torch is imported: the bootstrap (it
    must block SIGTERM while the process has one thread) and the warm-pool
    client (a restart must not pay for torch twice). Checked for real, in
    a fresh interpreter."""
    code = (
        "import sys\n"
        "import jitckpt.launch.bootstrap, jitckpt.launch.warmclient, jitckpt.storage.persist\n"
        "import jitckpt.protocol, jitckpt.detect.signals\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy'))\n"
        "print(heavy)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_test_modules_have_unique_basenames() -> None:
    """pytest imports test modules by basename (no packages under tests/):
    two of one name stop the whole run at collection."""
    names = [path.name for path in (SRC.parent / "tests").rglob("test_*.py")]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    assert duplicated == [], duplicated
