"""Step boundaries taken from the data (jitckpt.checkpoint.loop): one per
optimizer step, before the next draw; one when a pass ends; none inside a
gradient accumulation; the hang watchdog paused between passes."""

from __future__ import annotations

import pytest
from torch.utils.data import DataLoader, DistributedSampler

from jitckpt import process_exit
from jitckpt.checkpoint.loop import BatchLoop
from jitckpt.state.passes import PassPosition
from jitckpt.tracker import StepTracker


class Owner:
    """Records what the loop asks of JitCheckpoint."""

    def __init__(self, position: PassPosition, tracker: StepTracker, start_step: int = 0) -> None:
        self.start_step = start_step
        self.position, self.tracker = position, tracker
        self.boundaries: list[tuple[int, int, int]] = []  # (step, pass, consumed)
        self.finished: int | None = None
        self.started = 0
        self.loaded_again = 0

    def _start_loop(self, total: int | None) -> None:
        self.started += 1

    def _boundary(self, step: int) -> None:
        state = self.position.state_dict()
        self.boundaries.append((step, state["pass"], state["consumed"]))
        self.tracker.boundary(step)

    def _finish(self, step: int) -> None:
        self.finished = step

    def _stop_watching(self) -> None:
        pass

    def _load_again(self) -> None:
        self.loaded_again += 1


class Watchdog:
    def __init__(self) -> None:
        self.paused = 0

    def pause(self) -> None:
        self.paused += 1

    def resume(self) -> None:
        self.paused -= 1


def make(batches: int, start_step: int = 0):  # type: ignore[no-untyped-def]
    data = list(range(batches * 2))
    loader = DataLoader(
        data, batch_size=2, sampler=DistributedSampler(data, num_replicas=1, rank=0)
    )
    position, tracker, watchdog = PassPosition(loader), StepTracker(start_step), Watchdog()
    owner = Owner(position, tracker, start_step)
    loop = BatchLoop(owner, position, tracker, watchdog, None)  # type: ignore[arg-type]
    return loop, loader, owner, tracker, watchdog


def step(tracker: StepTracker) -> None:
    tracker.optimizer_pre_hook()
    tracker.optimizer_post_hook()


@pytest.fixture(autouse=True)
def _no_leftover_end_hooks():  # type: ignore[no-untyped-def]
    yield
    process_exit.script_ended(1)


def test_one_boundary_per_optimizer_step_and_one_when_a_pass_ends() -> None:
    loop, loader, owner, tracker, watchdog = make(3)
    for _epoch in loop.epochs(2):
        for _batch in loop.batches(loader):
            step(tracker)
        assert watchdog.paused == 1  # between passes
    assert owner.boundaries == [
        (0, 0, 0), (1, 0, 1), (2, 0, 2), (3, 0, 3),  # the last: the draw that ended pass 0
        (3, 1, 0),  # the same step again where pass 1 starts (a per-epoch scheduler step)
        (4, 1, 1), (5, 1, 2), (6, 1, 3),
    ]  # fmt: skip
    assert owner.finished == 6 and watchdog.paused == 0 and owner.started == 1


def test_gradient_accumulation_makes_one_step_of_several_batches() -> None:
    loop, loader, owner, tracker, _ = make(4)
    for _epoch in loop.epochs(1):
        for index, _batch in enumerate(loop.batches(loader)):
            if index % 2 == 1:
                step(tracker)
    assert owner.boundaries == [(0, 0, 0), (1, 0, 2), (2, 0, 4)]
    assert owner.finished == 2


def test_a_resumed_loop_starts_at_the_saved_step_and_batch() -> None:
    loop, loader, owner, tracker, _ = make(3)
    for _epoch in loop.epochs(2):
        for _batch in loop.batches(loader):
            step(tracker)
    saved = PassPosition(loader)
    saved.begin_pass(1)
    saved.consumed(2)
    resumed, loader2, owner2, tracker2, _ = make(3, start_step=5)
    resumed.position.load_state_dict(saved.state_dict())
    drawn = []
    for epoch in resumed.epochs(2):
        for batch in resumed.batches(loader2):
            drawn.append((epoch, batch.tolist()))
            step(tracker2)
    assert drawn == [(1, [b.tolist() for b in loader2][2])]  # only the last batch of epoch 1
    assert owner2.boundaries == [(5, 1, 2), (6, 1, 3)]
    assert owner2.finished == 6 == owner.finished


def test_without_epochs_the_clean_end_of_the_script_finishes() -> None:
    loop, loader, owner, tracker, _ = make(2)
    for _epoch in range(2):
        for _batch in loop.batches(loader):
            step(tracker)
    assert owner.finished is None
    process_exit.script_ended(0)
    assert owner.finished == 4


def test_a_fast_forward_loads_the_state_again_and_replays_idle_passes() -> None:
    """Without ckpt.epochs() a resumed script meets its passes from the first:
    a pass with no step (a peek at one batch) is replayed, trained passes
    before the saved one yield nothing, and at the saved one the restored
    state is loaded again (the script's code in between ran on it)."""
    loop, loader, owner, tracker, _ = make(3)
    next(iter(loop.batches(loader)))  # pass 0: a peek, no step
    for _epoch in range(2):
        for _batch in loop.batches(loader):
            step(tracker)
    saved = loop.position.state_dict()
    assert saved["idle"] == [0] and saved["pass"] == 2

    resumed, loader2, owner2, tracker2, _ = make(3, start_step=6)
    resumed.position.load_state_dict({**saved, "pass": 2, "consumed": 1})
    assert len(list(resumed.batches(loader2))) == 3  # the peek's pass, whole
    assert owner2.loaded_again == 0
    assert list(resumed.batches(loader2)) == []  # pass 1: trained, skipped
    assert owner2.loaded_again == 0
    assert len(list(resumed.batches(loader2))) == 2  # pass 2 from its batch 1
    assert owner2.loaded_again == 1
