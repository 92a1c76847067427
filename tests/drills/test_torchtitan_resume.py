"""torchtitan's CheckpointManager with jitckpt.integrations.torchtitan
(tests/drills/torchtitan_train.py: torchtitan's own checkpoint manager,
optimizer and scheduler containers and data loader around a small FSDP2
model, 2 ranks on gloo; a stand-in for its Trainer, which needs CUDA): a
failure is saved by the survivor as torchtitan's own ``step-N``, torchtitan's
own resume loads it, and the run ends in the state of a run without the
failure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jobs import jitckpt_run, show

pytest.importorskip(
    "torchtitan.components.checkpoint",
    reason="torchtitan (0.3, --no-deps, with tyro, einops, spmd_types) is not installed",
)

from jitckpt.analysis.summary import summarize  # noqa: E402
from jitckpt.events import read_events  # noqa: E402
from jitckpt.integrations.export import MARKER  # noqa: E402
from jitckpt.protocol import EXIT_SAVED_AND_STOPPED  # noqa: E402

SCRIPT = Path(__file__).resolve().parent / "torchtitan_train.py"
STEPS = 30


def run(base: Path, *flags: str):  # type: ignore[no-untyped-def]
    return jitckpt_run(
        *flags,
        str(SCRIPT),
        "--dump-folder",
        str(base / "out"),
        "--steps",
        str(STEPS),
        "--digest",
        str(base / "digest"),
        nproc=2,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    base = tmp_path_factory.mktemp("torchtitan-reference")
    launch = run(base)
    assert launch.returncode == 0, show(launch)
    assert launch.resumed_steps() == []
    return (base / "digest").read_text()


def exported_steps(base: Path) -> list[int]:
    """The step-N directories jitckpt wrote (torchtitan's own have no marker)."""
    found = []
    for directory in (base / "out" / "checkpoint").glob("step-*"):
        marker = directory / MARKER
        if marker.is_file():
            assert json.loads(marker.read_text())["kind"] == "jit"
            assert (directory / ".metadata").is_file()
            found.append(int(directory.name.split("-")[1]))
    return sorted(found)


def test_a_rank_killed_in_backward_is_saved_as_step_n_and_resumed(
    tmp_path: Path, reference: str
) -> None:
    launch = run(tmp_path, "--inject", "kill@step=14,rank=1,phase=backward")
    assert launch.returncode == 0, show(launch)
    resumed = launch.resumed_steps()
    assert resumed in ([13], [14]), show(launch)
    assert exported_steps(tmp_path) == resumed
    assert f"Training starts at step {resumed[0] + 1}" in launch.output
    [failure] = summarize(read_events(tmp_path / "out" / "jitckpt"))
    assert failure["resumed_step"] == resumed[0] and failure["iterations_lost"] <= 1, failure
    assert (tmp_path / "digest").read_text() == reference


def test_a_preemption_stops_with_75_and_the_same_command_resumes(
    tmp_path: Path, reference: str
) -> None:
    flags = ("--inject", "term@step=14,rank=1,phase=backward")
    first = run(tmp_path, *flags)
    assert first.returncode == EXIT_SAVED_AND_STOPPED, show(first)
    written = exported_steps(tmp_path)
    # After SIGTERM the ranks go on to a boundary they all reach
    # (jitckpt.checkpoint.sharded): a step or a few later.
    assert len(written) == 1 and 13 <= written[0] < STEPS, written
    second = run(tmp_path, *flags)
    assert second.returncode == 0, show(second)
    assert second.resumed_steps() == written, show(second)
    assert (tmp_path / "digest").read_text() == reference
