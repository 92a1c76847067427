"""Step tracking: where the training loop is, and whether its state is clean.

Model and optimizer state change only between the optimizer step of
iteration i and the start of iteration i+1 (optimizer.step, scheduler.step,
scaler.update, user code). We call that window *dirty*; the rest of the
iteration (data, forward, backward, all-reduce) is *clean*: the state then is
exactly "after ``completed`` iterations". Any state captured while the loop
is clean is a consistent checkpoint of step ``completed``.

A saver that wants a consistent state *freezes* the tracker: the loop's gates
(step boundary, optimizer pre-hook, scaler.update) then park the training
thread, so the state cannot move while it is copied. The training thread is
usually blocked in a failed collective anyway; the gates cover preemption,
where every rank is healthy and still running.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

# Step times kept for the median (enough to ride out a slow first step).
STEP_TIME_WINDOW = 50


@dataclass(frozen=True)
class Position:
    """Where the loop is, as seen by a detector or saver."""

    completed: int  # iterations whose updates are fully applied
    dirty: bool  # inside optimizer step .. next boundary
    optimizer_started: bool
    optimizer_finished: bool

    @property
    def in_progress(self) -> int:
        """Index of the iteration the loop is working on."""
        return self.completed

    def as_dict(self) -> dict[str, Any]:
        return {
            "completed": self.completed,
            "dirty": self.dirty,
            "optimizer_started": self.optimizer_started,
            "optimizer_finished": self.optimizer_finished,
        }


class StepTracker:
    def __init__(self, start_step: int = 0) -> None:
        self._cond = threading.Condition()
        self._completed = start_step
        self._dirty = False
        self._optimizer_started = False
        self._optimizer_finished = False
        self._frozen = False
        # Park only at step boundaries (sharded layouts, see freeze_at_boundary).
        self._frozen_at_boundary = False
        # Bumped at every point the loop passes (boundary, forward, backward,
        # each gradient bucket, optimizer step): the hang watchdog's measure of
        # progress. A plain int: one writer (the training thread), and readers
        # only compare values.
        self.progress = 0
        self.step_start_progress = 0
        self._last_boundary: float | None = None
        self._step_times: deque[float] = deque(maxlen=STEP_TIME_WINDOW)
        # Opaque data captured at the boundary (loader position, RNG): the
        # saver stores it with the model state of the same step.
        self.boundary_snapshot: Any = None

    # -- called by the training thread -------------------------------------------
    def boundary(self, completed: int, snapshot: Any = None) -> None:
        """Start of iteration ``completed``: the state is clean again."""
        now = time.monotonic()
        self.progress += 1
        # Progress within the step is what ranks compare (a rank that joined
        # later, a replacement, counted from zero).
        self.step_start_progress = self.progress
        with self._cond:
            if self._last_boundary is not None:
                self._step_times.append(now - self._last_boundary)
            self._last_boundary = now
            self._completed = completed
            self._dirty = False
            self._optimizer_started = False
            self._optimizer_finished = False
            self.boundary_snapshot = snapshot
            self._cond.notify_all()
            # Park only after publishing the clean state: a saver waiting in
            # freeze_clean() for the dirty window to end is woken by it.
            while self._frozen_at_boundary:
                self._cond.wait()
            self._gate()

    def enter_dirty(self) -> None:
        """The loop is about to change model/optimizer state."""
        with self._cond:
            self._gate()
            self._dirty = True

    def optimizer_pre_hook(self, *_: Any) -> None:
        self.progress += 1
        with self._cond:
            self._gate()
            self._dirty = True
            self._optimizer_started = True

    def optimizer_post_hook(self, *_: Any) -> None:
        self.progress += 1
        self._optimizer_finished = True

    def _gate(self) -> None:
        # Park the training thread while a saver holds the state. The saver
        # ends the process when it is done, so this normally never returns.
        while self._frozen:
            self._cond.wait()

    # -- called by detectors and savers -------------------------------------------
    def position(self) -> Position:
        with self._cond:
            return Position(
                self._completed, self._dirty, self._optimizer_started, self._optimizer_finished
            )

    def freeze_clean(self, timeout: float) -> tuple[Position, Any] | None:
        """Stop the loop at its next gate and wait up to ``timeout`` seconds for
        a clean state. Returns the clean position with the boundary snapshot
        of the same step, or None if the loop stayed dirty (e.g. blocked in a
        collective placed after optimizer.step)."""
        with self._cond:
            self._frozen = True
            self._cond.wait_for(lambda: not self._dirty, timeout=timeout)
            if self._dirty:
                return None
            position = Position(
                self._completed, self._dirty, self._optimizer_started, self._optimizer_finished
            )
            return position, self.boundary_snapshot

    def freeze_at_boundary(self, timeout: float) -> tuple[Position, Any] | None:
        """Let the loop run on to its next step boundary (up to ``timeout``
        seconds) and park it there; then as :meth:`freeze_clean`.

        For sharded layouts, where every shard must be saved at the same
        step: a rank parked at its optimizer gate (step i not applied) while
        a peer that was already inside its optimizer step goes on to i+1
        would leave shards of two different steps. Parking only at
        boundaries lets every rank that can finish step i do so; a rank that
        cannot (blocked in a collective of step i+1) is clean at i+1."""
        with self._cond:
            start = self._completed
            self._frozen_at_boundary = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._completed > start, timeout=timeout)
            self._frozen = True
            if self._dirty:
                return None
            position = Position(
                self._completed, self._dirty, self._optimizer_started, self._optimizer_finished
            )
            return position, self.boundary_snapshot

    def unfreeze(self) -> None:
        with self._cond:
            self._frozen_at_boundary = False
            self._frozen = False
            self._cond.notify_all()

    def passed_a_boundary(self) -> bool:
        """Whether the loop ever marked a step boundary (ckpt.steps())."""
        return self._last_boundary is not None

    def median_step_time(self) -> float | None:
        times = list(self._step_times)
        return statistics.median(times) if times else None

    def seconds_since_boundary(self) -> float | None:
        """Time since the loop last passed a step boundary: a detector logs it
        so that the report knows when the last kept step ended."""
        last = self._last_boundary
        return None if last is None else time.monotonic() - last
