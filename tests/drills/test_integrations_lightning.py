"""PyTorch Lightning with jitckpt's Callback (examples/train_lightning.py: a
tiny MLP, synthetic data, 2 ranks of DDP on gloo): a failure is saved by
the survivors as a Lightning checkpoint (``last-jitckpt-step=N.ckpt`` in
the ModelCheckpoint's directory), and Lightning's own
``fit(ckpt_path="last")`` resumes from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from jobs import REPO, jitckpt_run, show

from jitckpt.analysis import timeline
from jitckpt.analysis.summary import summarize
from jitckpt.events import read_events
from jitckpt.protocol import EXIT_SAVED_AND_STOPPED

pytest.importorskip("lightning")

EXAMPLE = REPO / "examples" / "train_lightning.py"
STEPS = 30
# One launch: two Lightning imports (~8 s each here) and 30 tiny steps.
TIMEOUT_S = 120


def run(tmp_path: Path, *flags: str):  # type: ignore[no-untyped-def]
    return jitckpt_run(
        *flags, str(EXAMPLE), "--output-dir", str(tmp_path / "out"), nproc=2, timeout=TIMEOUT_S
    )


def events(tmp_path: Path) -> list[dict]:
    return read_events(tmp_path / "out" / "jitckpt")


def finished_steps(tmp_path: Path) -> set[int]:
    return {e["step"] for e in events(tmp_path) if e["event"] == "finish"}


def check_checkpoint(path: Path, step: int) -> None:
    """What Lightning's resume reads is all there, for that step."""
    checkpoint = torch.load(path, weights_only=False)
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks"):
        assert checkpoint[key], key
    assert checkpoint["global_step"] == step
    assert checkpoint["hyper_parameters"] == {"features": 16, "hidden": 32, "lr": 0.05}
    progress = checkpoint["loops"]["fit_loop"]["epoch_loop.automatic_optimization.optim_progress"]
    assert progress["optimizer"]["step"]["total"]["completed"] == step
    assert checkpoint["jitckpt"]["kind"] == "jit" and checkpoint["jitckpt"]["step"] == step


def test_a_rank_killed_in_backward_is_saved_as_a_lightning_checkpoint_and_resumed(
    tmp_path: Path,
) -> None:
    launch = run(tmp_path, "--inject", "kill@step=12,rank=1,phase=backward")
    assert launch.returncode == 0, show(launch)
    resumed = launch.resumed_steps()
    assert resumed in ([11], [12]), show(launch)
    assert f"last-jitckpt-step={resumed[0]}.ckpt, loaded by the framework" in launch.output
    [failure] = summarize(events(tmp_path))
    assert failure["resumed_step"] == resumed[0] and failure["restored_kind"] == "jit", failure
    assert failure["iterations_lost"] is not None and failure["iterations_lost"] <= 1, failure
    exported = [e for e in events(tmp_path) if e["event"] == "exported"]
    assert [e["step"] for e in exported] == resumed, exported
    assert finished_steps(tmp_path) == {STEPS}, show(launch)
    # The report sees both attempts train: the steps before the failure kept.
    attempts = timeline.build(events(tmp_path))["attempts"]
    assert [(a["start_step"], a["kept_steps"]) for a in attempts] == [
        (0, resumed[0]),
        (resumed[0], STEPS - resumed[0]),
    ], attempts
    # Lightning's own checkpoints stay; the failure's export, stale once
    # training went past it, is gone.
    names = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert names == [f"epoch=3-step={STEPS}.ckpt", "last.ckpt"], names


def test_a_preemption_stops_with_75_and_the_same_command_resumes(tmp_path: Path) -> None:
    flags = ("--inject", "term@step=12,rank=1,phase=backward")
    first = run(tmp_path, *flags)
    assert first.returncode == EXIT_SAVED_AND_STOPPED, show(first)
    directory = tmp_path / "out" / "checkpoints"
    written = sorted(int(p.stem.split("=")[1]) for p in directory.glob("last-jitckpt-step=*"))
    assert written and set(written) <= {11, 12, 13, 14}, written
    check_checkpoint(directory / f"last-jitckpt-step={max(written)}.ckpt", max(written))
    # Lightning's "last" takes the newest file: the highest step is made it.
    newest = max(directory.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    assert newest.name == f"last-jitckpt-step={max(written)}.ckpt", newest
    second = run(tmp_path, *flags)
    assert second.returncode == 0, show(second)
    assert second.resumed_steps() == [max(written)], show(second)
    assert finished_steps(tmp_path) == {STEPS}, show(second)
    restores = [e for e in events(tmp_path) if e["event"] == "restore"]
    assert {e["kind"] for e in restores} == {"jit"}, json.dumps(restores)
