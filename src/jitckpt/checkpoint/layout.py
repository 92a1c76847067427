"""The one interface behind which DDP and sharded models differ.

A whole-state model (DDP, or one process) and a sharded one (FSDP2, HSDP)
differ in who can write a JIT checkpoint, how the periodic backstop runs,
how a checkpoint is verified and loaded, and where a step's gradient
reduction can be observed. JitCheckpoint talks to a :class:`Layout` and
never asks which one it has.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from jitckpt.checkpoint.context import RankContext
from jitckpt.checkpoint.ddp import DdpLayout
from jitckpt.checkpoint.saver import JitSaver
from jitckpt.checkpoint.sharded import ShardedLayout
from jitckpt.comm import Recovery
from jitckpt.errors import JitckptError, exit_fatal
from jitckpt.state.mesh import check_layout, layout_of

DDP_LAYOUT = {"type": "ddp"}


class Layout(Protocol):
    """How one kind of model is saved, checked and loaded."""

    saver: JitSaver

    def save_jit(self, reason: str, wait_s: float | None) -> Path | None:
        """Save the last completed step now (``reason`` "manual" for a save
        the script asked for; else a detector's cause). ``wait_s``: how long
        to wait for the loop to reach a clean state (None: the default)."""
        ...

    def start_periodic(self, every: int | None, every_s: float | None, keep: int) -> None:
        """Turn the periodic backstop on (after the restore)."""
        ...

    def record_boundary(self, step: int, snapshot: Mapping[str, Any]) -> None:
        """Called at every step boundary, before the step tracker's (which
        may park the loop for a saver): what the saver may need of it."""
        ...

    def after_boundary(self, step: int, snapshot: Mapping[str, Any], resumed_at: int) -> None:
        """Called at every step boundary, after the step tracker's: the
        periodic backstop's turn."""
        ...

    def before_update(self) -> None:
        """Called before every optimizer step, before the tracker's gate."""
        ...

    def update_begins(self) -> None:
        """Called before every optimizer step, after the tracker's gate."""
        ...

    def update_ends(self) -> None:
        """Called after every optimizer step."""
        ...

    def finish(self) -> None:
        """Training ended: let a periodic write in flight finish."""
        ...

    def load(self, payload: Mapping[str, Any], path: Path) -> None:
        """Load a verified checkpoint into the live state."""
        ...

    def audit_digest(self) -> str | None:
        """Deterministic mode: the digest of the live state (restore event)."""
        ...

    def install_reduction_hooks(
        self, model: torch.nn.Module, on_bucket: Callable[[], None]
    ) -> None:
        """Observe the step's gradient reduction: progress for the watchdog,
        the ``allreduce`` injection phase."""
        ...

    @property
    def watches_peer_failures(self) -> bool:
        """Whether ranks that noticed nothing must join a peer's save."""
        ...


def check(layout: Layout, saved: dict[str, Any], where: str) -> None:
    """Refuse a checkpoint whose layout cannot be mapped onto this job's."""
    check_layout(saved, layout.saver.layout, where)


def layout_for(
    ctx: RankContext,
    model: torch.nn.Module,
    recovery: Recovery | None,
    save_every_s: float | None,
) -> Layout:
    """The layout of ``model``. A setting a sharded model cannot honour is a
    fatal error (exit 78): no attempt of the same command gets past it."""
    try:
        mesh = layout_of(model)
        if mesh is not None and save_every_s:
            raise JitckptError(
                "save_every_s: time-based periodic saves would need the ranks of a sharded "
                "model to agree on when to save; use save_every (steps)"
            )
    except JitckptError as exc:
        exit_fatal(str(exc), ctx.rank)
    if mesh is None:
        return DdpLayout(ctx, JitSaver(ctx, dict(DDP_LAYOUT)), model, recovery)
    return ShardedLayout(ctx, JitSaver(ctx, mesh.to_manifest()), mesh)
