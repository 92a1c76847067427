"""The Hugging Face Trainer with jitckpt's TrainerCallback
(examples/train_hf.py: a tiny GPT-2 from a config, synthetic tokens, 2 ranks
on gloo): a failure is saved by the survivors as the Trainer's own
``checkpoint-N``, and the Trainer's own resume takes it."""

from __future__ import annotations

import json
from pathlib import Path

from jobs import REPO, jitckpt_run, show

from jitckpt.analysis.summary import summarize
from jitckpt.events import read_events
from jitckpt.protocol import EXIT_SAVED_AND_STOPPED

EXAMPLE = REPO / "examples" / "train_hf.py"
STEPS = 30


def run(tmp_path: Path, *flags: str):  # type: ignore[no-untyped-def]
    return jitckpt_run(*flags, str(EXAMPLE), "--output-dir", str(tmp_path / "out"), nproc=2)


def finished_steps(tmp_path: Path) -> set[int]:
    events = read_events(tmp_path / "out" / "jitckpt")
    return {e["step"] for e in events if e["event"] == "finish"}


def check_checkpoint(directory: Path, step: int) -> None:
    """What the Trainer's resume reads is all there, for that step."""
    for name in ("model.safetensors", "config.json", "optimizer.pt", "scheduler.pt"):
        assert (directory / name).is_file(), name
    state = json.loads((directory / "trainer_state.json").read_text())
    assert state["global_step"] == step
    assert json.loads((directory / "jitckpt-export.json").read_text())["kind"] == "jit"


def test_a_rank_killed_in_backward_is_saved_as_checkpoint_n_and_resumed(tmp_path: Path) -> None:
    launch = run(tmp_path, "--inject", "kill@step=12,rank=1,phase=backward")
    assert launch.returncode == 0, show(launch)
    resumed = launch.resumed_steps()
    assert resumed in ([11], [12]), show(launch)
    check_checkpoint(tmp_path / "out" / f"checkpoint-{resumed[0]}", resumed[0])
    # The survivor's own random state is there; the dead rank's is not.
    assert (tmp_path / "out" / f"checkpoint-{resumed[0]}" / "rng_state_0.pth").is_file()
    [failure] = summarize(read_events(tmp_path / "out" / "jitckpt"))
    assert failure["resumed_step"] == resumed[0] and failure["iterations_lost"] <= 1, failure
    assert finished_steps(tmp_path) == {STEPS}, show(launch)


def test_a_preemption_stops_with_75_and_the_same_command_resumes(tmp_path: Path) -> None:
    flags = ("--inject", "term@step=12,rank=1,phase=backward")
    first = run(tmp_path, *flags)
    assert first.returncode == EXIT_SAVED_AND_STOPPED, show(first)
    written = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "out").glob("checkpoint-*"))
    assert written and set(written) <= {11, 12, 13}, written
    second = run(tmp_path, *flags)
    assert second.returncode == 0, show(second)
    assert second.resumed_steps() == [max(written)], show(second)
    assert finished_steps(tmp_path) == {STEPS}, show(second)
