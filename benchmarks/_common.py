"""Helpers shared by the benchmark scripts (imported as a sibling module:
the scripts run as ``python benchmarks/NAME.py``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def source_state() -> str:
    """The commit the measured jitckpt comes from, marked if the tree is edited."""
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def standalone_launch(launcher: str, nproc: int, *args: str) -> list[str]:
    """A single-node job of ``nproc`` ranks: ``launcher`` is the module that
    launches it, "torch.distributed.run" (torchrun) or "jitckpt" (which
    takes ``run`` first)."""
    verb = ["run"] if launcher == "jitckpt" else []
    return [
        sys.executable,
        "-m",
        launcher,
        *verb,
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        *args,
    ]
