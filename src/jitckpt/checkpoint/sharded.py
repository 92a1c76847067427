"""Saving and loading a sharded model (FSDP2 ``fully_shard`` on a 1-D mesh,
HSDP on a 2-D replicate x shard mesh).

A rank holds only its shards, so a JIT checkpoint needs one surviving
holder of every shard, all at the same step: the survivors agree on the
writers through the store (jitckpt.checkpoint.writers), and the writers
save together with DCP on a fresh group; one of them commits the directory
(jitckpt.checkpoint.saver). After SIGTERM or a peer's failure each rank
parks only at a step boundary, so that every shard is saved at the same
step (StepTracker.freeze_at_boundary). The periodic backstop is a
collective save at the step boundary (every rank writes its shards). A
checkpoint loads onto whatever mesh the new job has (docs/sharded.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from jitckpt import attempt
from jitckpt import events as ev
from jitckpt.checkpoint.context import RankContext
from jitckpt.checkpoint.saver import JitSaver
from jitckpt.checkpoint.writers import agree_on_writers, announce
from jitckpt.state.digest import checkpoint_digest, state_digest
from jitckpt.state.mesh import MeshLayout, load_tensors, writers_group


class ShardedLayout:
    """A model sharded with ``fully_shard`` (see the module docstring).

    Args:
        ctx: the rank's shared context.
        saver: writes the checkpoints.
        mesh: which rank holds which shard.
    """

    # A rank that raised before any collective broke leaves its peers
    # blocked in a healthy collective: their heartbeat threads must bring
    # them into the save of every shard (jitckpt.detect.watchdog).
    watches_peer_failures = True

    def __init__(self, ctx: RankContext, saver: JitSaver, mesh: MeshLayout) -> None:
        self.ctx = ctx
        self.saver = saver
        self.mesh = mesh
        self.every: int | None = None
        self.keep = 0

    def _all_ranks(self) -> list[int]:
        return list(range(self.ctx.world_size))

    def _saved_digest(self, path: Path) -> str | None:
        # Deterministic mode: the state as written, read back whole (the
        # writers' group is too small to gather it from memory).
        return checkpoint_digest(path) if self.ctx.deterministic else None

    # -- the JIT save ------------------------------------------------------------------
    def save_jit(self, reason: str, wait_s: float | None) -> Path | None:
        """The survivors agree on one writer per shard through the store, the
        writers save together on a fresh group. A manual save is a
        collective of all ranks."""
        ctx = self.ctx
        tracker = ctx.tracker
        if reason == "manual":
            frozen = tracker.freeze_clean(0.0)
            try:
                if frozen is None or frozen[1] is None:
                    self.saver.skipped("manual save outside a clean step")
                    return None
                position, snapshot = frozen
                return self.saver.write_shards(
                    position.completed,
                    snapshot,
                    "jit",
                    reason,
                    None,
                    self._all_ranks(),
                    self._saved_digest,
                )
            finally:
                tracker.unfreeze()
        # Only after SIGTERM or a peer's failure may the loop still be
        # running: let it reach its next step boundary so that all ranks stop
        # at the same step. Other detectors found it blocked.
        if not ctx.uses_store:
            # One process without a launcher: it holds every shard itself.
            frozen = tracker.freeze_at_boundary(0.0)
            if frozen is None or frozen[1] is None:
                return None
            return self.saver.write_shards(
                frozen[0].completed, frozen[1], "jit", reason, None, [0], self._saved_digest
            )
        store = attempt.side_store()
        announce(store, ctx.rank)
        running = reason in ("sigterm", "peer_failure")
        wait = (ctx.dirty_wait() if wait_s is None else wait_s) if running else 0.0
        frozen = tracker.freeze_at_boundary(wait)
        step = None
        if frozen is not None and frozen[1] is not None:
            step = frozen[0].completed
        self.saver.mark_saving()
        decision, decided = agree_on_writers(store, self.mesh, ctx.rank, step)
        if decided:
            ctx.events.emit(ev.JIT_PLAN, **decision.as_dict())
        if decision.step is None:
            if decided:
                ctx.events.warn(
                    ev.JIT_IMPOSSIBLE,
                    reason=decision.reason,
                    lost_shard=decision.lost_shard,
                    held_by=self.mesh.holders(decision.lost_shard)
                    if decision.lost_shard is not None
                    else None,
                    next="the job resumes from the newest periodic checkpoint",
                )
            return None
        if ctx.rank not in decision.writers or frozen is None:
            return None
        group = writers_group(decision.writers)
        return self.saver.write_shards(
            decision.step, frozen[1], "jit", reason, group, decision.writers, self._saved_digest
        )

    # -- the periodic backstop ---------------------------------------------------------
    def start_periodic(self, every: int | None, every_s: float | None, keep: int) -> None:
        self.every = every
        self.keep = keep

    def record_boundary(self, step: int, snapshot: Mapping[str, Any]) -> None:
        pass

    def after_boundary(self, step: int, snapshot: Mapping[str, Any], resumed_at: int) -> None:
        if self.every and step > resumed_at and step % self.every == 0:
            # Every rank holds only its shards: a collective save at the
            # boundary (synchronous; the DDP backstop's rank-0 copy does not apply).
            if self.saver.write_shards(
                step, snapshot, "periodic", None, None, self._all_ranks(), self._saved_digest
            ):
                self.ctx.storage.prune("periodic", self.keep)

    def before_update(self) -> None:
        pass

    def update_begins(self) -> None:
        pass

    def update_ends(self) -> None:
        pass

    def finish(self) -> None:
        pass

    # -- restore -----------------------------------------------------------------------
    def load(self, payload: Mapping[str, Any], path: Path) -> None:
        state = self.ctx.state
        # Everything that can be refused is checked before DCP overwrites the
        # model and optimizer.
        state.check(payload, str(path))
        load_tensors(state.model, state.optimizer, path)
        state.restore(payload, str(path), tensors=False)

    def audit_digest(self) -> str | None:
        # A collective (the shards are gathered): only the restore path, where
        # the new group is healthy, calls this.
        if not self.ctx.deterministic:
            return None
        return state_digest(self.ctx.state.model, self.ctx.state.optimizer)

    # -- observing the gradient reduction ------------------------------------------------
    def install_reduction_hooks(
        self, model: torch.nn.Module, on_bucket: Callable[[], None]
    ) -> None:
        # FSDP2 calls this after each module's gradient reduction
        # (reduce-scatter, plus the replicas' all-reduce in HSDP): progress
        # inside backward for the watchdog, and the "allreduce" phase.
        from torch.distributed.fsdp import FSDPModule

        def on_reduced(*_: Any) -> None:
            on_bucket()

        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_all_reduce_hook(on_reduced)


_ = dist  # the writers' group type is torch.distributed's
