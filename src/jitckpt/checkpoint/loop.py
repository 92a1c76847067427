"""Step boundaries taken from the data: ``ckpt.batches(loader)``,
``ckpt.epochs(total)`` and transparent mode.

The usual training script loops over epochs and, inside, over a plain
DataLoader; it counts no steps itself. The boundaries come from where its
batches are drawn: before drawing a batch, if the optimizer (or a
GradScaler update) changed the state since the last boundary, one step has
completed and the state is clean: that is a step boundary. Drawing the
batch after a pass's last one (the draw that ends the pass) is one too, so
work between epochs (an evaluation with its collectives) runs in a clean
state. Several batches per optimizer step (gradient accumulation) make one
step: the position saved is the one before the step's first batch.

The step count is the optimizer's; the data position is the pass and the
batches consumed in it (jitckpt.state.passes), which a resume skips
without loading them. Between passes the hang watchdog is paused: what a
script does between epochs (evaluation, its own checkpoint) is no step.
"""

from __future__ import annotations

import atexit
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from jitckpt import process_exit
from jitckpt.detect.watchdog import Watchdog
from jitckpt.state.passes import PassPosition, skipping
from jitckpt.tracker import StepTracker

# The reseed stream of a pass's iterator in deterministic mode (a loader
# draws its workers' base seed from the global generator when an iterator
# is made): a function of the pass alone, so a resumed pass draws the same.
PASS_STREAM = 1_000_003


class LoopOwner(Protocol):
    """What the loop needs of JitCheckpoint (its methods, not its parts)."""

    start_step: int

    def _start_loop(self, total: int | None) -> None: ...

    def _load_again(self) -> None: ...

    def _boundary(self, step: int) -> None: ...

    def _finish(self, step: int) -> None: ...

    def _stop_watching(self) -> None: ...


class BatchLoop:
    """Marks the boundaries of a loop that draws its batches through it.

    Args:
        owner: the JitCheckpoint whose boundaries these are.
        position: the live data position (bound to the training loader).
        tracker, watchdog: the rank's step tracker and hang watchdog.
        reseed_pass: deterministic mode's reseed for a new pass (or None).
    """

    def __init__(
        self,
        owner: LoopOwner,
        position: PassPosition,
        tracker: StepTracker,
        watchdog: Watchdog,
        reseed_pass: Callable[[int], None] | None,
    ) -> None:
        self.owner = owner
        self.position = position
        self.tracker = tracker
        self.watchdog = watchdog
        self.reseed_pass = reseed_pass
        self.step = owner.start_step
        self.started = False
        self.finished = False
        self._paused = False  # the watchdog, between passes
        self._stepped = False  # an optimizer step in the current pass
        self._epoch: int | None = None

    # -- ckpt.epochs() ----------------------------------------------------------------
    def epochs(self, total: int) -> Iterator[int]:
        """Epochs from the resumed one (0 on a fresh start) to ``total - 1``;
        the job's training ends with the last."""
        resumed = self.position.resume_pass()
        for epoch in range(resumed if resumed is not None else 0, total):
            self._epoch = epoch
            yield epoch
        self._epoch = None
        self.finish()

    # -- ckpt.batches() and transparent mode's passes ----------------------------------
    def batches(self, loader: Any) -> Iterator[Any]:
        """One pass over ``loader``, the training loader, marking boundaries."""
        skip = self.begin(loader, self._epoch)
        if skip is None:
            return  # before the resume point: fast-forwarded, nothing loaded
        if self.replaying():
            yield from skipping(loader, 0)  # an idle pass before the resume point
            return
        yield from self.pass_over(skipping(loader, skip), skip)

    def replaying(self) -> bool:
        """Whether the pass just begun lies before the resume point (an idle
        pass replayed as it was: no boundaries in it)."""
        return self.position.resume is not None

    def begin(self, loader: Any, pass_index: int | None, *, replace: bool = False) -> int | None:
        """A pass over the training loader begins: how many of its batches
        to skip, or None to fast-forward past all of it
        (PassPosition.begin_pass)."""
        position = self.position
        stepped = self._stepped or self.tracker.position().dirty
        if position.pass_index >= 0 and self.started and not stepped:
            position.mark_idle(position.pass_index)
        self._stepped = False
        position.bind(loader, replace=replace)
        skip = position.begin_pass(pass_index)
        if position.just_resumed and position.fast_forwarded:
            # The script's own code between the skipped passes ran on the
            # restored state (a per-epoch scheduler step, ...): load it again.
            self.owner._load_again()
        if skip is not None and self.reseed_pass is not None:
            self.reseed_pass(position.pass_index)
        return skip

    def pass_over(self, source: Iterator[Any], consumed: int) -> Iterator[Any]:
        """Yield ``source``'s batches, a boundary check before each draw."""
        first = True
        try:
            while True:
                self.before_draw(consumed, first)
                first = False
                try:
                    batch = next(source)
                except StopIteration:
                    break
                consumed += 1
                yield batch
        finally:
            # The pass ended, or the loop left it (a `break`, an exception):
            # either way what follows until the next draw is no step.
            self.between_passes()

    def before_draw(self, consumed: int, first_of_pass: bool = False) -> None:
        """A batch is about to be drawn, ``consumed`` of this pass before it."""
        self.position.consumed(consumed)
        if self._paused:
            self.watchdog.resume()
            self._paused = False
        if not self.started:
            self.started = True
            self.owner._start_loop(None)
            process_exit.on_script_end(self._script_ended)
            atexit.register(self._at_exit)
            self.owner._boundary(self.step)
        elif self.tracker.position().dirty:
            self.step += 1
            self._stepped = True
            self.owner._boundary(self.step)
        elif first_of_pass:
            # Same step, taken again where the new pass starts: what the
            # script did between the passes (a per-epoch scheduler step)
            # is then part of the boundary's state.
            self.owner._boundary(self.step)

    def between_passes(self) -> None:
        if self.started and not self._paused and not self.finished:
            self.watchdog.pause()
            self._paused = True

    # -- the end ----------------------------------------------------------------------
    def finish(self) -> None:
        """Training is over: the job's last step is the last boundary, plus
        an optimizer step since (a pass ended without a further draw)."""
        if self.finished:
            return
        self.finished = True
        process_exit.forget_script_end(self._script_ended)
        atexit.unregister(self._at_exit)
        if self._paused:
            self.watchdog.resume()
            self._paused = False
        if not self.started:
            self.owner._start_loop(None)  # nothing left to train (a finished run resumed)
        elif self.tracker.position().dirty:
            self.step += 1
            self.owner._boundary(self.step)
        self.owner._finish(self.step)

    def _at_exit(self) -> None:
        # Without jitckpt's bootstrap (torchrun, plain python) nothing says
        # how the script ended: the side threads stop, nothing is marked.
        if not self.finished:
            self.owner._stop_watching()

    def _script_ended(self, status: int) -> None:
        # A loop without ckpt.epochs() ends with its script: cleanly (status
        # 0) means training finished; otherwise only the side threads stop.
        if status == 0:
            self.finish()
        else:
            self.owner._stop_watching()
