"""The hooks that tell JitCheckpoint where the training loop is.

Registered on the script's own objects through torch's extension points
(optimizer step pre/post hooks, module forward pre/post hooks, a tensor
hook on the forward's output, DDP comm hooks or gradient-accumulation
hooks), so the loop needs no call of its own inside a step. Each hook does
three small things: it moves the step tracker (clean/dirty window,
progress for the hang watchdog), it gives the fault injector its phases
(forward, backward, allreduce, optimizer), and in deterministic mode it
reseeds the generators at the start of each forward.
"""

from __future__ import annotations

from typing import Any

import torch

from jitckpt import events as ev
from jitckpt.checkpoint.context import RankContext
from jitckpt.checkpoint.layout import Layout
from jitckpt.state import rng


class LoopHooks:
    """Installs the loop's hooks (see the module docstring).

    Args:
        ctx: the rank's shared context.
        layout: the model's layout (its update and reduction hooks).
    """

    def __init__(self, ctx: RankContext, layout: Layout) -> None:
        self.ctx = ctx
        self.layout = layout
        self._forwards_in_step = 0
        self._backwards_in_step = 0
        self._warned_untracked = False

    def new_step(self) -> None:
        """Called at every step boundary."""
        self._forwards_in_step = 0
        self._backwards_in_step = 0

    def install(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: Any
    ) -> None:
        ctx, layout = self.ctx, self.layout
        injector, tracker = ctx.injector, ctx.tracker
        if injector.wants("optimizer"):
            # Before the tracker's hook: a fault "in the optimizer phase" strikes
            # after the all-reduce and before any parameter changes.
            optimizer.register_step_pre_hook(lambda *_: injector.at("optimizer"))
        optimizer.register_step_pre_hook(self._check_loop_tracked)
        optimizer.register_step_pre_hook(lambda *_: layout.before_update())
        optimizer.register_step_pre_hook(tracker.optimizer_pre_hook)
        optimizer.register_step_post_hook(tracker.optimizer_post_hook)
        optimizer.register_step_pre_hook(lambda *_: layout.update_begins())
        optimizer.register_step_post_hook(lambda *_: layout.update_ends())
        if scaler is not None:
            # GradScaler.update changes its state after the step; it must count
            # as dirty like the optimizer step itself (an instance attribute,
            # so it never leaks into scaler.state_dict()).
            original_update = scaler.update

            def tracked_update(*args: Any, **kwargs: Any) -> Any:
                tracker.enter_dirty()
                return original_update(*args, **kwargs)

            scaler.update = tracked_update
        if ctx.deterministic:
            # Reseed again when the forward starts: a data loader draws from the
            # global RNG when its iterator is created, which a resumed run does
            # at a different step than an uninterrupted one. Reseeding here keeps
            # the model's randomness (dropout) a function of (step, rank) alone.
            model.register_forward_pre_hook(self._reseed_forward)

        def on_forward(*_: Any) -> None:
            tracker.progress += 1
            injector.at("forward")

        recovery = getattr(layout, "recovery", None)

        def on_backward(*_: Any) -> None:
            tracker.progress += 1
            self._backwards_in_step += 1
            if self._backwards_in_step == 2 and recovery is not None:
                # Gradient accumulation: a replacement redoes a step from its
                # first micro-batch while the survivors wait in a later one's
                # collectives; in-process recovery cannot line them up.
                recovery.withdraw(
                    "several backward passes per optimizer step (gradient accumulation)"
                )
            injector.at("backward")

        def watch_output(_module: Any, _args: Any, output: Any) -> None:
            # Backward has begun when the gradient of the output is computed.
            if not torch.is_grad_enabled():
                return
            tensors = (
                [output]
                if isinstance(output, torch.Tensor)
                else list(output.values() if isinstance(output, dict) else output)
            )
            for tensor in tensors:
                if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                    tensor.register_hook(on_backward)
                    break

        def on_bucket() -> None:
            tracker.progress += 1
            injector.at("allreduce")

        model.register_forward_pre_hook(on_forward)
        model.register_forward_hook(watch_output)
        layout.install_reduction_hooks(model, on_bucket)

    def _check_loop_tracked(self, *_: Any) -> None:
        # A loop that is not inside ckpt.steps() trains with nothing tracked:
        # a failure would find no clean state and the job would restart from
        # its last checkpoint (or step 0). Say so once, at the first step.
        if self._warned_untracked or self.ctx.tracker.passed_a_boundary():
            return
        self._warned_untracked = True
        self.ctx.events.warn(
            ev.LOOP_NOT_TRACKED,
            fix="iterate the training loop with `for step in ckpt.steps(total_steps):`, or "
            "its batches with `for batch in ckpt.batches(loader):` (README, 'The change to a "
            "training script'); without it no JIT checkpoint can be taken",
        )

    def _reseed_forward(self, *_: Any) -> None:
        # One stream per forward of the step: micro-batches of gradient
        # accumulation must not share dropout masks.
        self._forwards_in_step += 1
        ctx = self.ctx
        rng.reseed(
            ctx.seed, ctx.tracker.position().in_progress, ctx.rank, stream=self._forwards_in_step
        )
