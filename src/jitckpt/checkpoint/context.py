"""What the parts of one rank's JitCheckpoint share.

JitCheckpoint builds one :class:`RankContext` and hands it to each part
(the layout's saver and loader, the restorer, the failure path, the loop
hooks), so that no part reaches back into JitCheckpoint and none needs a
long list of constructor arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jitckpt.events import EventLog
from jitckpt.inject import Injector
from jitckpt.state.buffers import BufferSnapshots
from jitckpt.state.training import TrainingState
from jitckpt.storage.directory import DirectoryStorage
from jitckpt.storage.staging import Staging
from jitckpt.tracker import StepTracker

# How long a saver waits for the loop to leave its dirty window (optimizer
# step .. next step boundary) before giving up on this rank's copy. The
# window is normally local compute of a few milliseconds; it only lasts
# longer if the loop blocks in a collective placed after optimizer.step().
# The wait is this floor or 3 median step times, whichever is longer.
DIRTY_WAIT_FLOOR_S = 1.0
DIRTY_WAIT_STEPS = 3.0


@dataclass
class RankContext:
    """One rank of the job, as every part of its JitCheckpoint sees it.

    Args:
        rank, world_size: this rank's place in the job.
        attempt: the restart attempt (0 on the first start).
        run_dir, run_id: the run directory and its identity.
        deterministic, seed: deterministic mode and its base seed.
        uses_store: ranks coordinate through the launcher's store (a group
            of several ranks under a launcher).
        events: this process's event log.
        tracker: the loop's step tracker.
        state: what a checkpoint holds.
        storage: the durable checkpoints of the run directory.
        staging: shared-memory staging on this node, if on.
        injector: the fault injector.
        buffers: the model's buffers as the failure-free run uses them.
        on_saved: called with (step, state tree, directory) once a JIT
            checkpoint is written (a framework integration exports it in its
            own layout); returns where it wrote.
    """

    rank: int
    world_size: int
    attempt: int
    run_dir: Path
    run_id: str
    deterministic: bool
    seed: int
    uses_store: bool
    events: EventLog
    tracker: StepTracker
    state: TrainingState
    storage: DirectoryStorage
    staging: Staging | None
    injector: Injector
    buffers: BufferSnapshots
    on_saved: Callable[[int, Any, Path], Any] | None = None

    def dirty_wait(self) -> float:
        """How long a saver waits for the loop to leave its dirty window."""
        median = self.tracker.median_step_time() or 0.0
        return max(DIRTY_WAIT_FLOOR_S, DIRTY_WAIT_STEPS * median)
