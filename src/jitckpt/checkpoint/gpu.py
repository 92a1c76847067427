"""Capturing a CUDA model's state while its GPU may be stuck.

On a GPU the training thread runs ahead of the device: when it reaches the
boundary of step k, the kernels of step k-1 (its all-reduce, its optimizer
update) may not have run yet, and when a peer dies the device's compute
stream blocks behind the all-reduce that never completes. Any copy to the
host on that stream (``tensor.cpu()``) would block with it. So:

* At every boundary, and before and after every optimizer step, a CUDA
  event is recorded on the compute stream (a few microseconds each). At
  every boundary the host-side part of the state (the optimizer's CPU step
  counters, the LR in its param groups, the scheduler) is copied, with the
  CUDA tensors held by reference: those change only on the device.
* A save picks the newest step whose state the device actually holds: the
  boundary of step K (the host's latest) if its event completes within the
  wait; otherwise, if the device got past the previous optimizer update (a
  collective after optimizer.step() is stuck), still K; otherwise, if the
  device has not started the previous update (the gradient all-reduce is
  stuck), the previous boundary K-1. A device stopped inside an update
  holds no consistent state: the save is skipped and says so.
* The copy to the host runs on a side stream that waits only for that
  event, so it completes while the compute stream stays blocked.

The wait bounds the one assumption: a device that has not reached an event
within it is taken as stuck, not slow.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from jitckpt.state.training import TrainingState, clone_tensors


def on_cuda(model: torch.nn.Module) -> bool:
    return any(p.is_cuda for p in model.parameters())


def _event() -> torch.cuda.Event:
    event = torch.cuda.Event()
    event.record()
    return event


def _reached(event: torch.cuda.Event | None, wait_s: float = 0.0) -> bool:
    if event is None:
        return False
    deadline = time.monotonic() + wait_s
    while not event.query():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.001)
    return True


@dataclass
class StepMark:
    """What is known about one step boundary on the device."""

    step: int
    snapshot: Any  # the boundary snapshot (data position, RNG)
    host_view: dict[str, Any]  # model/optimizer/... with CUDA tensors by reference
    reached: torch.cuda.Event  # recorded at the boundary
    update_started: torch.cuda.Event | None = None
    update_done: torch.cuda.Event | None = None


class DeviceSteps:
    """The last two step boundaries as the device sees them."""

    def __init__(self, state: TrainingState) -> None:
        self.state = state
        self._marks: deque[StepMark] = deque(maxlen=2)

    # -- the training thread ------------------------------------------------------
    def boundary(self, step: int, snapshot: Any) -> None:
        view = clone_tensors(self.state.components(), lambda t: not t.is_cuda)
        self._marks.append(StepMark(step, snapshot, view, _event()))

    def before_update(self) -> None:
        if self._marks:
            self._marks[-1].update_started = _event()

    def after_update(self) -> None:
        if self._marks:
            self._marks[-1].update_done = _event()

    # -- the saver ------------------------------------------------------------------
    def choose(self, wait_s: float) -> tuple[StepMark, torch.cuda.Event] | str:
        """The newest consistent step and the event its copy must wait for,
        or why there is none."""
        if not self._marks:
            return "no step boundary passed yet in this process"
        newest = self._marks[-1]
        if _reached(newest.reached, wait_s):
            return newest, newest.reached
        if len(self._marks) < 2:
            return "the device has not reached the first step boundary"
        previous = self._marks[0]
        if _reached(previous.update_done):
            return newest, previous.update_done  # type: ignore[return-value]
        if _reached(previous.reached) and not _reached(previous.update_started):
            return previous, previous.reached
        return (
            f"the device stopped inside the optimizer update of step {previous.step}: "
            f"no consistent state on this rank"
        )


# Copy into pinned host memory (fast, asynchronous) or pageable memory (a
# fallback should pinning ever wait for the blocked device): set by
# $JITCKPT_GPU_COPY=pinned|pageable; scripts/gpu_check.py measures both.
COPY_MODE_ENV = "JITCKPT_GPU_COPY"


class SideStreamCopy:
    """Copies CUDA tensors to host memory on a side stream that waits only
    for ``after``; call :meth:`finish` before reading the copies. PyTorch's
    side streams are created non-blocking, so they do not wait for the
    legacy default stream either."""

    def __init__(self, after: torch.cuda.Event) -> None:
        self.stream = torch.cuda.Stream()
        self.stream.wait_event(after)
        self.pinned = os.environ.get(COPY_MODE_ENV, "pinned") != "pageable"

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_cuda:
            return tensor.detach()
        with torch.cuda.stream(self.stream):
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=self.pinned)
            host.copy_(tensor.detach(), non_blocking=self.pinned)
        return host

    def finish(self) -> None:
        self.stream.synchronize()
