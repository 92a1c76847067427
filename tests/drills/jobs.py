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
from datetime import timedelta
from pathlib import Path

import pytest

from jitckpt.analysis.summary import summarize, summarize_in_process
from jitckpt.events import read_events
from jitckpt.testing import proctag

REPO = Path(__file__).resolve().parents[2]
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


# Upper bound for one agent of a two-node job (a node loss, then a restart).
NODE_TIMEOUT_S = 240


def two_nodes(inject: str, *script: str) -> tuple[list[int], str]:
    """Two `jitckpt run` agents of 2 ranks each (--nnodes=1:2, c10d rendezvous
    on 127.0.0.1) running ``script``, with the fault ``inject``. Returns the
    agents' exit statuses, sorted, and the tails of their outputs.

    The rendezvous store lives outside both agents (is_host=false), like a
    head node's: the test hosts it, so either node may be the one to die."""
    import torch.distributed as dist

    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60)
    )
    tag = uuid.uuid4().hex
    env = dict(os.environ, JITCKPT_TEST_TAG=tag, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable, "-m", "jitckpt", "run",
        "--nnodes", "1:2", "--nproc-per-node", "2",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{store.port}", "--rdzv-id", tag,
        "--rdzv-conf", "is_host=false,keep_alive_interval=1,keep_alive_max_attempt=2,last_call_timeout=3",
        "--inject", inject,
        *script,
    ]  # fmt: skip
    agents = [
        subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
        for _ in range(2)
    ]
    outputs = []
    try:
        for agent in agents:
            out, _ = agent.communicate(timeout=NODE_TIMEOUT_S)
            outputs.append(out.decode(errors="replace"))
    finally:
        kill_tagged(tag)
    return sorted(agent.returncode for agent in agents), "\n".join(o[-4000:] for o in outputs)


# The example GPT drills: 4 ranks, deterministic mode, this many steps.
EXAMPLE_STEPS = 12
# Their per-rank batch: a quarter of the example's, so a step takes about a
# third of the time (12 steps: 4.5 s a launch instead of 6.4 s here). Bitwise
# equality means as much at any batch size.
EXAMPLE_BATCH = 4


def example_args(run_dir: Path, digest: Path, steps: int = EXAMPLE_STEPS) -> list[str]:
    """The example GPT in deterministic mode, logging every step."""
    return [
        *default_mode_example_args(run_dir, digest, steps),
        "--deterministic", "--batch-size", str(EXAMPLE_BATCH),
    ]  # fmt: skip


def default_mode_example_args(run_dir: Path, digest: Path, steps: int = EXAMPLE_STEPS) -> list[str]:
    """The example GPT in the default mode at its own batch size: default
    mode is not bitwise, and its drills compare loss curves, which the
    example's batch keeps steady enough for a tight band."""
    return [
        str(EXAMPLE), "--steps", str(steps), "--run-dir", str(run_dir), "--digest", str(digest),
        "--log-every", "1",
    ]  # fmt: skip


# -- what a recovered run must show ----------------------------------------------
def check_recovered(
    run_dir: Path,
    digest: Path,
    reference: str,
    expected_resume: list[int | None],
    launch: Launch,
    printed: list[int] | None = None,
    new_save: list[bool] | None = None,
) -> None:
    """Completed, bitwise equal to the reference, resumed at the expected steps
    (one per failure; ``printed``: the resumes rank 0 announced, if fewer),
    each losing at most one iteration and, unless ``new_save`` says otherwise
    for it, leaving a fresh JIT checkpoint."""
    assert launch.returncode == 0, show(launch)
    assert digest.read_text().strip() == reference, "final state differs from the failure-free run"
    assert launch.resumed_steps() == (expected_resume if printed is None else printed), show(launch)
    failures = summarize(read_events(run_dir))
    assert len(failures) == len(expected_resume), failures
    for index, (failure, step) in enumerate(zip(failures, expected_resume, strict=True)):
        if step is None:
            continue  # the next attempt may have died before any rank finished its restore
        assert failure["resumed_step"] == step
        assert failure["restored_kind"] == "jit"
        assert failure["iterations_lost"] is not None and failure["iterations_lost"] <= 1, failure
        if new_save is None or new_save[index]:
            assert failure["save_copies"] >= 1, failure


def check_in_process(
    run_dir: Path,
    digest: Path,
    reference: str | None,
    launch: Launch,
    resumed: list[int],
    replacement: str | None,
    header: str = "GPT with",
) -> list[dict]:
    """Finished, bitwise equal (unless ``reference`` is None: default mode),
    no restart, one recovery per failure at the expected steps, each losing
    at most one iteration, survivors unchanged."""
    assert launch.returncode == 0, show(launch)
    if reference is not None:
        assert digest.read_text().strip() == reference, (
            "final state differs from the failure-free run"
        )
    events = read_events(run_dir)
    assert summarize(events) == [], "no failure may take the restart path"
    assert launch.resumed_steps() == [], show(launch)
    # A spare or replacement learns its rank before the script reads it: only
    # the real rank 0 prints the header (a spare used to see itself as rank 0).
    assert launch.output.count(header) == 1, show(launch)
    recoveries = summarize_in_process(events)
    assert [r["resumed_step"] for r in recoveries] == resumed, recoveries
    original = {e["rank"]: e["pid"] for e in events if e["event"] == "start" and not e["joined"]}
    for recovery in recoveries:
        assert replacement is None or recovery["replacement"] == replacement, recovery
        assert recovery["iterations_lost"] is not None and recovery["iterations_lost"] <= 1
        assert recovery["recovery_s"] is not None, recovery
    # Survivors never restart: every rank that did not fail kept its first pid.
    failed = {r["failed_rank"] for r in recoveries}
    finishers = {e["rank"]: e["pid"] for e in events if e["event"] == "finish"}
    for rank, pid in finishers.items():
        if rank not in failed:
            assert pid == original[rank], (rank, pid, original[rank])
    return recoveries


CNN = REPO / "examples" / "train_cnn.py"
CNN_PLAIN = REPO / "examples" / "train_cnn_plain.py"
# The CNN drills: 4 ranks, deterministic mode, 3 epochs of 4 batches per
# rank (512 images, batch 32): 12 steps, epoch boundaries after steps 3 and 7.
CNN_STEPS = 12
CNN_DATA = ("--epochs", "3", "--samples", "512")


def cnn_args(run_dir: Path, digest: Path) -> list[str]:
    """The CNN example (an epoch loop over a plain DataLoader; BatchNorm,
    dropout, SGD, OneCycleLR, clipping) in deterministic mode, logging every
    step."""
    return [
        str(CNN), *CNN_DATA, "--run-dir", str(run_dir), "--digest", str(digest),
        "--log-every", "1", "--deterministic",
    ]  # fmt: skip


def transparent_args(run_dir: Path, digest: Path) -> list[str]:
    """The CNN example's plain twin, unchanged, under ``--transparent
    --deterministic``: the same training as :func:`cnn_args`."""
    return [
        "--transparent", "--run-dir", str(run_dir), "--deterministic",
        str(CNN_PLAIN), *CNN_DATA, "--digest", str(digest), "--log-every", "1",
    ]  # fmt: skip


def logged_losses(output: str) -> dict[int, float]:
    """The examples' "step N  loss X" lines (rank 0's loss of each step)."""
    return {int(s): float(v) for s, v in re.findall(r"^step\s+(\d+)\s+loss ([\d.]+)", output, re.M)}


def assert_loss_continues(output: str, reference: str, since: int, band: float) -> None:
    """Default mode is not bitwise: after a recovery at ``since`` the loss of
    every step stays within ``band`` of the failure-free run's (a jump back
    towards the untrained loss would not)."""
    got, expected = logged_losses(output), logged_losses(reference)
    assert set(got) == set(expected), (sorted(got), sorted(expected))
    off = {step: round(got[step] - expected[step], 4) for step in expected if step >= since}
    assert all(abs(d) <= band for d in off.values()), off
