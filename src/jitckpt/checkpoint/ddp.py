"""Saving and loading a whole-state model: DDP (every rank holds the whole
state) or a single process.

Any survivor can write the JIT checkpoint alone, from its own memory: the
state of its last completed step, read while the step tracker holds the
loop still (jitckpt.tracker). On a GPU the device's own record decides
which step that is, and the copy runs on a side stream a blocked compute
stream cannot hold up (jitckpt.checkpoint.gpu). The periodic backstop is
written by rank 0 alone, in the background (jitckpt.checkpoint.periodic).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from jitckpt import compat
from jitckpt import events as ev
from jitckpt.checkpoint.context import RankContext
from jitckpt.checkpoint.gpu import DeviceSteps, SideStreamCopy, on_cuda
from jitckpt.checkpoint.periodic import PeriodicSaver
from jitckpt.checkpoint.saver import JitSaver
from jitckpt.comm import BufferBroadcast, ChunkedAllreduce, Recovery, observed_allreduce_hook
from jitckpt.state.archive import Archive
from jitckpt.state.digest import state_digest
from jitckpt.tracker import Position


class DdpLayout:
    """A whole-state model (see the module docstring).

    Args:
        ctx: the rank's shared context.
        saver: writes the checkpoints.
        model: the model (DistributedDataParallel, or a plain module).
        recovery: in-process recovery, if on: the deterministic all-reduce
            hands a failed step's reduction over to it.
    """

    watches_peer_failures = False

    def __init__(
        self,
        ctx: RankContext,
        saver: JitSaver,
        model: torch.nn.Module,
        recovery: Recovery | None,
    ) -> None:
        self.ctx = ctx
        self.saver = saver
        self.recovery = recovery
        self.device_steps = DeviceSteps(ctx.state) if on_cuda(model) else None
        self.periodic: PeriodicSaver | None = None

    # -- the JIT save ------------------------------------------------------------------
    def save_jit(self, reason: str, wait_s: float | None) -> Path | None:
        ctx = self.ctx
        started = time.monotonic()
        wait = ctx.dirty_wait() if wait_s is None else wait_s
        if reason == "sigterm" and ctx.buffers.broadcast and ctx.rank == 0:
            # Rank 0's buffers are everyone's (DDP broadcasts them at every
            # forward). Saved at once, a preempted rank 0 may stop one step
            # behind its peers: its gradients already sent, they finish the
            # step and save it with their own buffers, and no copy of that
            # newest step holds the failure-free run's. Its loop is healthy:
            # let it reach the next boundary first (bounded by the same wait).
            frozen = ctx.tracker.freeze_at_boundary(wait)
        else:
            frozen = ctx.tracker.freeze_clean(wait)
        try:
            if self.device_steps is not None:
                # On a GPU the host's position says little about the device's:
                # the device's own record decides (jitckpt.checkpoint.gpu).
                captured = self._capture_from_device(wait)
            else:
                captured = self._capture_from_host(frozen)
            if captured is None:
                return None
            completed, payload = captured
            if reason != "manual":
                self.saver.mark_saving()
            _, exact = ctx.buffers.for_step(completed, ctx.rank)
            return self.saver.write(
                completed, payload, reason, started, self.audit_digest, exact_buffers=exact
            )
        finally:
            if reason == "manual":
                ctx.tracker.unfreeze()

    def _capture_from_host(self, frozen: tuple[Position, Any] | None) -> tuple[int, Archive] | None:
        ctx = self.ctx
        if frozen is None:
            self.saver.skipped(
                "state not clean: the loop stayed between optimizer.step() and the "
                "next step boundary (a collective placed after optimizer.step()?)"
            )
            return None
        position, snapshot = frozen
        if snapshot is None:
            self.saver.skipped("no step boundary passed yet in this process")
            return None
        scheduler = ctx.state.scheduler
        if scheduler is not None and snapshot.get("scheduler_epoch") != getattr(
            scheduler, "last_epoch", None
        ):
            self.saver.skipped("scheduler stepped without an optimizer step")
            return None
        return position.completed, ctx.state.capture(position.completed, ctx.rank, snapshot)

    def _capture_from_device(self, wait_s: float) -> tuple[int, Archive] | None:
        assert self.device_steps is not None
        choice = self.device_steps.choose(wait_s)
        if isinstance(choice, str):
            self.saver.skipped(choice)
            return None
        mark, ready = choice
        copy = SideStreamCopy(ready)
        buffers, _ = self.ctx.buffers.for_step(mark.step, self.ctx.rank)
        tree = self.ctx.state.tree(
            mark.step, self.ctx.rank, mark.snapshot, mark.host_view, buffers=buffers
        )
        payload = Archive(tree, to_host=copy)
        copy.finish()
        return mark.step, payload

    def audit_digest(self) -> str | None:
        """Deterministic mode logs a digest of the state saved and of the state
        restored, so a drill can prove they are the same. Off otherwise: it
        hashes every byte (0.2 s for 300 MB) on the save's critical path."""
        if not self.ctx.deterministic or self.device_steps is not None:
            return None  # on a GPU it would copy on the (maybe blocked) compute stream
        return state_digest(self.ctx.state.model, self.ctx.state.optimizer)

    # -- the periodic backstop ---------------------------------------------------------
    def start_periodic(self, every: int | None, every_s: float | None, keep: int) -> None:
        # Every replica holds the same state: rank 0 alone writes.
        if (every or every_s) and self.ctx.rank == 0:
            self.periodic = PeriodicSaver(
                self.ctx.storage,
                every,
                every_s,
                lambda step: self.saver.manifest(
                    step, "periodic", exact_buffers=self.ctx.buffers.for_step(step, 0)[1]
                ),
                self.ctx.events,
                keep,
            )

    def record_boundary(self, step: int, snapshot: Mapping[str, Any]) -> None:
        if self.device_steps is not None:
            self.device_steps.boundary(step, snapshot)

    def after_boundary(self, step: int, snapshot: Mapping[str, Any], resumed_at: int) -> None:
        periodic = self.periodic
        if periodic is not None and step > resumed_at and periodic.due(step):
            state = self.ctx.state
            periodic.save(
                step, state.tree(step, self.ctx.rank, snapshot), state.updated_by_optimizer
            )

    def before_update(self) -> None:
        # A periodic save copies the parameters and optimizer state while the
        # next forward and backward run; the update waits for that copy.
        if self.periodic is not None:
            self.periodic.hold_update()

    def update_begins(self) -> None:
        if self.device_steps is not None:
            self.device_steps.before_update()

    def update_ends(self) -> None:
        if self.device_steps is not None:
            self.device_steps.after_update()

    def finish(self) -> None:
        if self.periodic is not None:
            self.periodic.wait()

    # -- restore -----------------------------------------------------------------------
    def load(self, payload: Mapping[str, Any], path: Path) -> None:
        self.ctx.state.restore(payload, str(path))

    # -- observing the gradient reduction ------------------------------------------------
    def install_reduction_hooks(
        self, model: torch.nn.Module, on_bucket: Callable[[], None]
    ) -> None:
        ctx = self.ctx
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            if ctx.deterministic or self.recovery is not None:
                # jitckpt's own reduction: a layout every rank shares (exact
                # resumes; a replacement with a fresh DDP meets the survivors'
                # collectives), waited for where a recovery can wake it.
                reducer = ChunkedAllreduce(
                    reduced_parameters(model),
                    on_bucket,
                    self.recovery,
                    lambda: ctx.tracker.position().completed,
                )
                model.register_comm_hook(None, reducer.hook)
                if self.recovery is not None and ctx.buffers.broadcast:
                    # DDP's buffer broadcast at each forward is a collective
                    # too: a survivor waiting there must be woken as well.
                    buffers = BufferBroadcast(
                        self.recovery,
                        lambda: ctx.tracker.position().completed,
                        reducer.last_flat,
                        ctx.buffers,
                    )
                    compat.register_buffer_hook(model, buffers.hook)
                    self.recovery.forward_buffers = buffers
            elif ctx.injector.wants("allreduce"):
                model.register_comm_hook(None, observed_allreduce_hook(on_bucket))
            else:
                # Keep DDP's built-in C++ all-reduce (a Python hook costs ~1 ms
                # a step here: it launches from Python and adds a division pass
                # DDP otherwise fuses into its bucket copy). The watchdog's
                # progress inside backward comes from gradient accumulation
                # instead: a rank hung in backward has accumulated fewer.
                tracker = ctx.tracker

                def count_gradient(_parameter: Any) -> None:
                    tracker.progress += 1

                for parameter in model.parameters():
                    if parameter.requires_grad:
                        parameter.register_post_accumulate_grad_hook(count_gradient)
        elif ctx.world_size > 1:
            ctx.events.emit(ev.WARNING, detail="model is not DistributedDataParallel")


def reduced_parameters(ddp: torch.nn.parallel.DistributedDataParallel) -> list[torch.nn.Parameter]:
    """The parameters DDP reduces (those that need a gradient and are not
    ignored), in the model's order."""
    ignored = set(getattr(ddp, "parameters_to_ignore", ()))
    return [
        parameter
        for name, parameter in ddp.module.named_parameters()
        if parameter.requires_grad and name not in ignored
    ]
