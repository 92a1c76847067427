"""The CNN example (examples/train_cnn.py: BatchNorm, dropout, SGD with
momentum, OneCycleLR, gradient clipping), 4 ranks, deterministic mode:
every failure ends bitwise equal to the failure-free run, BatchNorm's
running statistics included, on the restart path and in process.

BatchNorm makes this the hard case: forward updates its buffers with each
rank's own batch and DDP broadcasts rank 0's at the start of every forward
(jitckpt.state.buffers), and in process a survivor may wait in that
broadcast when its peer dies (jitckpt.comm.BufferBroadcast). A kill in
backward and a hang on the restart path, on the same training, are
tests/drills/test_transparent.py's (transparent mode shares this loop's
boundaries and data position)."""

from __future__ import annotations

from pathlib import Path

from jobs import (
    assert_loss_continues,
    check_in_process,
    check_recovered,
    cnn_args,
    jitckpt_run,
    show,
)

from jitckpt.events import read_events
from jitckpt.protocol import EXIT_SAVED_AND_STOPPED

RESTART = ("--recovery", "restart")


def run(tmp_path: Path, *flags: str):  # type: ignore[no-untyped-def]
    return jitckpt_run(*flags, *cnn_args(tmp_path / "run", tmp_path / "digest"))


def test_restart_path_kills_in_forward_and_optimizer(tmp_path: Path, cnn_reference: str) -> None:
    launch = run(
        tmp_path, *RESTART,
        "--inject", "kill@step=3,rank=2,phase=forward",
        "--inject", "kill@step=8,rank=1,phase=optimizer",
    )  # fmt: skip
    check_recovered(tmp_path / "run", tmp_path / "digest", cnn_reference, [3, 9], launch)


def test_in_process_kills_in_forward_optimizer_and_backward(
    tmp_path: Path, cnn_reference: str
) -> None:
    """A kill before the forward's buffer broadcast (the survivors recover
    there), after the update (the survivors wait in the next forward's
    broadcast) and in backward (in the gradient all-reduce)."""
    launch = run(
        tmp_path, "--spares", "1",
        "--inject", "kill@step=3,rank=2,phase=forward",
        "--inject", "kill@step=6,rank=1,phase=optimizer",
        "--inject", "kill@step=9,rank=3,phase=backward",
    )  # fmt: skip
    check_in_process(
        tmp_path / "run", tmp_path / "digest", cnn_reference, launch, [3, 7, 9], "spare", "CNN with"
    )
    assert "in-process recovery does not apply" not in launch.output, show(launch)


def test_in_process_hang_in_backward(tmp_path: Path, cnn_reference: str) -> None:
    launch = run(tmp_path, "--spares", "1", "--inject", "hang@step=6,rank=2,phase=backward")
    check_in_process(
        tmp_path / "run", tmp_path / "digest", cnn_reference, launch, [6], "spare", "CNN with"
    )


def test_preemption_saves_stops_and_resumes(tmp_path: Path, cnn_reference: str) -> None:
    """SIGTERM to every rank mid-step, with a hot spare configured: the job
    saves and stops (75); the same command resumes and ends bitwise equal
    (rank 0's copy, or any copy taken after the step's buffer broadcast,
    holds the failure-free run's BatchNorm statistics)."""
    flags = ("--spares", "1", "--inject", "term@step=6,rank=0,phase=backward")
    first = run(tmp_path, *flags)
    assert first.returncode == EXIT_SAVED_AND_STOPPED, show(first)
    saves = [e for e in read_events(tmp_path / "run") if e["event"] == "save"]
    assert {e["rank"] for e in saves} == {0, 1, 2, 3}
    second = run(tmp_path, *flags)
    resumed = max(e["step"] for e in saves)
    check_recovered(tmp_path / "run", tmp_path / "digest", cnn_reference, [resumed], second)


def test_default_mode_kill_and_hang_in_process(tmp_path: Path) -> None:
    """Default mode (no reseeding, no bitwise promise), BatchNorm included:
    a kill in forward and a hang in backward, recovered in process, the
    loss within the failure-free run's band afterwards."""

    def args(name: str) -> list[str]:
        return [
            a
            for a in cnn_args(tmp_path / name, tmp_path / f"{name}.digest")
            if a != "--deterministic"
        ]

    reference = jitckpt_run(*args("ref"))
    assert reference.returncode == 0, show(reference)
    launch = jitckpt_run(
        "--spares", "1",
        "--inject", "kill@step=4,rank=2,phase=forward",
        "--inject", "hang@step=8,rank=3,phase=backward",
        *args("run"),
    )  # fmt: skip
    check_in_process(
        tmp_path / "run", tmp_path / "run.digest", None, launch, [4, 8], "spare", "CNN with"
    )
    assert "in-process recovery does not apply" not in launch.output, show(launch)
    assert_loss_continues(launch.output, reference.output, since=4, band=0.25)
