"""The step tracker (jitckpt.tracker): clean and dirty windows, freezing."""

from __future__ import annotations

import threading
import time

from jitckpt.tracker import StepTracker


def test_tracker_freeze_waits_for_the_dirty_window_to_end() -> None:
    tracker = StepTracker()
    tracker.boundary(0)
    tracker.optimizer_pre_hook()
    result: list = []

    def saver() -> None:
        result.append(tracker.freeze_clean(timeout=5))

    thread = threading.Thread(target=saver)
    thread.start()
    time.sleep(0.05)
    assert not result, "must not capture while the optimizer step runs"
    loop = threading.Thread(target=tracker.boundary, args=(1,))
    loop.start()  # parks at the gate after publishing the clean state
    thread.join(5)
    assert result and result[0][0].completed == 1 and not result[0][0].dirty
    assert loop.is_alive(), "the training thread is held while the state is saved"
    tracker.unfreeze()
    loop.join(5)
    assert not loop.is_alive()


def test_tracker_freeze_gives_up_on_a_stuck_dirty_window() -> None:
    tracker = StepTracker()
    tracker.boundary(3)
    tracker.optimizer_pre_hook()
    started = time.monotonic()
    assert tracker.freeze_clean(timeout=0.2) is None
    assert time.monotonic() - started >= 0.2
