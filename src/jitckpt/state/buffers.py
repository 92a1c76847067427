"""Model buffers (BatchNorm running statistics...) as the failure-free run
uses them at each step.

Parameters change only in the optimizer step, so any survivor's copy is the
state of its last completed step. Buffers are different: the forward itself
updates them (BatchNorm's running mean, variance and batch count), each rank
with its own batch, and DDP (``broadcast_buffers=True``, its default)
overwrites every rank's buffers with rank 0's at the start of each forward.
So the buffers a failure-free run uses for step ``s`` are rank 0's as they
are when forward ``s`` begins, which every rank holds right after that
broadcast; until then only rank 0 holds them (its own, at the boundary).

A :class:`BufferSnapshots` copies the buffers right after the broadcast (a
forward pre-hook on the module inside DDP, at the first forward of each
step; BatchNorm's buffers are a few floats per channel). A save of step
``s`` then takes:

* the snapshot of step ``s`` when forward ``s`` had begun: exact on any rank;
* else (the failure struck before forward ``s``) the live buffers, which are
  exact on rank 0 only; another rank's copy is marked inexact, and restore
  prefers an exact copy of the same step.

Without the broadcast (``broadcast_buffers=False``, or a model outside DDP)
each rank's buffers are its own and a copy is that rank's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from jitckpt.state.training import unwrap


class BufferSnapshots:
    """Buffers as broadcast at the start of the current step (see the
    module docstring).

    Args:
        model: the model (DDP or a plain module).
        step_in_progress: the index of the step the loop is working on.
    """

    def __init__(self, model: torch.nn.Module, step_in_progress: Callable[[], int]) -> None:
        inner = unwrap(model)
        persistent = set(inner.state_dict().keys())
        self.names = [name for name, _ in inner.named_buffers() if name in persistent]
        self.broadcast = bool(
            self.names
            and isinstance(model, torch.nn.parallel.DistributedDataParallel)
            and model.broadcast_buffers
        )
        self._inner = inner
        self._step_in_progress = step_in_progress
        self.step: int | None = None
        self.values: dict[str, torch.Tensor] = {}
        if self.broadcast:
            inner.register_forward_pre_hook(self._after_broadcast)

    def _after_broadcast(self, *_: Any) -> None:
        step = self._step_in_progress()
        if self.step == step:
            return  # a later micro-batch of gradient accumulation
        self.values = {name: buffer.detach().clone() for name, buffer in self.live().items()}
        self.step = step

    def of_step(self, step: int) -> dict[str, torch.Tensor] | None:
        """The snapshot, if it is step ``step``'s (an in-process recovery
        sends it to a rank that has yet to reach that forward:
        jitckpt.comm.BufferBroadcast)."""
        return self.values if self.broadcast and self.step == step else None

    def live(self) -> dict[str, torch.Tensor]:
        """The model's buffers now, by name (the snapshot's names)."""
        buffers = dict(self._inner.named_buffers())
        return {name: buffers[name] for name in self.names}

    def for_step(self, step: int, rank: int) -> tuple[dict[str, torch.Tensor] | None, bool | None]:
        """The buffers to save with the state of ``step``: (replacements for
        the model's state dict, or None to take the live buffers; whether the
        copy is the failure-free run's, None when that does not apply)."""
        if not self.broadcast:
            return None, None
        values = self.of_step(step)
        return (values, True) if values is not None else (None, rank == 0)
