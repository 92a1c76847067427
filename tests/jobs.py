"""Shared helpers: launching real jobs and cleaning up every process they start.

Workers started by torch.distributed.elastic run in their own sessions, so
killing the launcher's process group would orphan them. Every process a test
starts therefore carries a unique JITCKPT_TEST_TAG in its environment, and
cleanup kills every process whose environment holds that tag, by pid.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from jitckpt import proctag

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "train_gpt.py"
TINY = Path(__file__).resolve().parent / "tiny_train.py"
# Upper bound for one launch in a test (a failure-free 4-rank launch takes
# 5-10 s here, each restart another 5-10 s).
LAUNCH_TIMEOUT_S = 240
TAG_VAR = "JITCKPT_TEST_TAG"


def kill_tagged(tag: str) -> list[int]:
    """SIGKILL every process that carries the tag; returns their pids."""
    return proctag.kill_tagged(TAG_VAR, tag)


@dataclass
class Launch:
    returncode: int
    output: str
    seconds: float
    leftovers: list[int]  # tagged processes still alive when the command returned (then killed)

    def resumed_steps(self) -> list[int]:
        return [int(m) for m in re.findall(r"^jitckpt: resumed from step (\d+)", self.output, re.M)]


def run_tagged(
    cmd: list[str], timeout: float = LAUNCH_TIMEOUT_S, env: dict[str, str] | None = None
) -> Launch:
    """Run a command to completion with a tag; kill whatever it left behind."""
    tag = uuid.uuid4().hex
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env[TAG_VAR] = tag
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=full_env,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tagged(tag)
        output, _ = proc.communicate()
        pytest.fail(
            f"command timed out after {timeout} s: {' '.join(cmd)}\n{output.decode(errors='replace')[-5000:]}"
        )
    finally:
        leftovers = kill_tagged(tag)
    text = output.decode(errors="replace")
    return Launch(proc.returncode, text, time.monotonic() - started, leftovers)


def jitckpt_run(
    *args: str, nproc: int = 4, timeout: float = LAUNCH_TIMEOUT_S, env: dict[str, str] | None = None
) -> Launch:
    cmd = [
        sys.executable,
        "-m",
        "jitckpt",
        "run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        *args,
    ]
    return run_tagged(cmd, timeout=timeout, env=env)


def show(launch: Launch) -> str:
    """Output tail for assertion messages."""
    lines = [
        line
        for line in launch.output.splitlines()
        if "UserWarning" not in line and "set_vital" not in line
    ]
    return "\n".join(lines[-60:])
