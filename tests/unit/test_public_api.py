"""The public names (README, the examples, user scripts) survive any
reorganisation: the package's lazy names, the JitCheckpoint members scripts
use, and the CLI's commands."""

from __future__ import annotations

import importlib
import inspect

import pytest

import jitckpt
from jitckpt.checkpoint import JitCheckpoint


@pytest.mark.parametrize("name", jitckpt.__all__)
def test_every_public_name_resolves(name: str) -> None:
    assert getattr(jitckpt, name) is not None


def test_the_lazy_table_points_at_the_defining_modules() -> None:
    for name, module in jitckpt._LAZY.items():
        assert getattr(importlib.import_module(module), name) is getattr(jitckpt, name)


def test_jitckpt_checkpoint_members_scripts_use() -> None:
    for method in ("steps", "save", "paused", "all_reduce"):
        assert inspect.isfunction(getattr(JitCheckpoint, method)), method
    for prop in ("rank", "world_size", "attempt", "run_dir", "run_id", "deterministic"):
        assert isinstance(getattr(JitCheckpoint, prop), property), prop
    parameters = inspect.signature(JitCheckpoint).parameters
    assert list(parameters)[:3] == ["run_dir", "model", "optimizer"]
    for keyword in (
        "scheduler", "loader", "scaler", "extras", "deterministic", "seed", "hang_timeout_s",
        "save_every", "save_every_s", "keep_periodic", "keep_jit", "stage_dir",
    ):  # fmt: skip
        assert parameters[keyword].kind is inspect.Parameter.KEYWORD_ONLY, keyword


def test_importing_jitckpt_loads_no_torch() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", "import sys, jitckpt; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.strip() == "False", done.stderr
