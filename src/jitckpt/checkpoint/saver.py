"""JitSaver: turns a captured training state into a checkpoint.

What to capture, at which step and by which ranks is the layout's decision
(jitckpt.checkpoint.ddp, jitckpt.checkpoint.sharded); the saver writes it:
the manifest, the atomic write to the run directory or to shared-memory
staging with a detached persister, the multi-writer commit of a sharded
checkpoint, the marker that makes the launcher wait for a save in
progress, and the ``save`` event. A write that fails (a full disk) is
reported and leaves older checkpoints untouched; it never raises into the
failure path.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from jitckpt import events as ev
from jitckpt import protocol
from jitckpt._version import __version__
from jitckpt.checkpoint.context import RankContext
from jitckpt.errors import CheckpointWriteError
from jitckpt.state.archive import Archive
from jitckpt.state.mesh import save_tensors, tensor_state
from jitckpt.state.training import model_signature
from jitckpt.storage.manifest import Manifest, read_manifest

Digest = Callable[[], str | None]


class JitSaver:
    """Writes the checkpoints of one rank.

    Args:
        ctx: the rank's shared context.
        layout: the manifest's description of the parallel layout.
    """

    def __init__(self, ctx: RankContext, layout: dict[str, Any]) -> None:
        self.ctx = ctx
        self.layout = layout

    def manifest(self, step: int, kind: str, **fields: Any) -> Manifest:
        ctx = self.ctx
        return Manifest(
            kind=kind,
            step=step,
            world_size=ctx.world_size,
            writer_rank=fields.pop("writer_rank", ctx.rank),
            attempt=ctx.attempt,
            layout=self.layout,
            model_signature=model_signature(ctx.state.model),
            run_id=ctx.run_id,
            created=time.time(),
            torch_version=torch.__version__,
            jitckpt_version=__version__,
            **fields,
        )

    def skipped(self, reason: str) -> None:
        """No clean state to save on this rank: say why (returns None)."""
        self.ctx.events.warn(ev.SAVE_SKIPPED, reason=reason)

    def mark_saving(self) -> None:
        """Tell the launcher a save is under way, so it waits for it before
        SIGKILL (the marker dies with this attempt)."""
        control = protocol.ControlDir.from_env()
        if control is not None:
            control.mark_saving(os.environ.get(protocol.LOCAL_RANK_ENV, str(self.ctx.rank)))

    def write(
        self,
        step: int,
        payload: Archive,
        reason: str,
        started: float,
        digest: Digest,
        exact_buffers: bool | None = None,
    ) -> Path | None:
        """Write the whole state of ``step`` (a JIT checkpoint) to staging if
        on, else to the run directory; returns its directory, or None if the
        write failed (reported)."""
        ctx = self.ctx
        manifest = self.manifest(step, "jit", reason=reason, exact_buffers=exact_buffers)
        staging = ctx.staging
        try:
            try:
                path = (staging.storage if staging else ctx.storage).write(
                    manifest, payload, on_point=self._save_point(step)
                )
            except CheckpointWriteError as exc:
                if staging is None or not exc.full:
                    raise
                # Shared memory is full: the run directory still takes it.
                ctx.events.warn(ev.STAGING_FULL, step=step, error=str(exc))
                staging = None
                path = ctx.storage.write(manifest, payload, on_point=self._save_point(step))
        except CheckpointWriteError as exc:
            ctx.events.warn(ev.SAVE_FAILED, step=step, error=str(exc))
            return None
        persister = None
        if staging is not None:
            persister = staging.persist_in_background(path, ctx.rank, ctx.attempt)
            control = protocol.ControlDir.from_env()
            if control is not None:
                control.record_persister(persister, staging.record())
        ctx.events.emit(
            ev.SAVE,
            kind="jit",
            step=step,
            path=str(path),
            bytes=payload.size,
            staged=staging is not None,
            persister_pid=persister,
            duration=time.monotonic() - started,
            digest=digest(),
        )
        self._export(step, payload.tree, path)
        return path

    def _export(self, step: int, tree: Any, path: Path) -> None:
        """Hand the checkpoint to a framework integration (RankContext.on_saved).
        Its failure is reported, never fatal: jitckpt's own copy stands."""
        ctx = self.ctx
        if ctx.on_saved is None:
            return
        started = time.monotonic()
        try:
            exported = ctx.on_saved(step, tree, path)
        except Exception as exc:  # noqa: BLE001 - any failure of the export is reported
            ctx.events.warn(ev.EXPORT_FAILED, step=step, error=f"{type(exc).__name__}: {exc}")
            return
        ctx.events.emit(
            ev.EXPORTED, step=step, path=str(exported), duration=time.monotonic() - started
        )

    def _save_point(self, step: int) -> Callable[[str], None]:
        """The write points of a JIT save: the injector's ``save`` phase."""
        injector = self.ctx.injector
        return lambda point: injector.at("save", step) if point == "payload_written" else None

    def write_shards(
        self,
        step: int,
        snapshot: Mapping[str, Any],
        kind: str,
        reason: str | None,
        group: dist.ProcessGroup | None,
        writers: list[int],
        digest: Callable[[Path], str | None],
    ) -> Path | None:
        """A sharded checkpoint: every writer saves its shards (DCP) into one
        temporary directory; the lowest one commits it (non-tensor state,
        checksums, manifest, rename). Returns the directory on the
        committing rank, else None."""
        ctx = self.ctx
        started = time.monotonic()
        committer = min(writers)
        manifest = self.manifest(
            step,
            kind,
            writer_rank=committer,
            writer_ranks=writers,
            **({"reason": reason} if reason else {}),
        )
        try:
            tmp = ctx.storage.temporary(manifest)
            save_tensors(tensor_state(ctx.state.model, ctx.state.optimizer), tmp, group)
            if ctx.rank != committer:
                ctx.events.emit(
                    ev.SHARDS_WRITTEN, kind=kind, step=step, duration=time.monotonic() - started
                )
                return None
            payload = Archive(ctx.state.tree(step, ctx.rank, snapshot, tensors=False))
            path = ctx.storage.commit(tmp, manifest, payload)
        except CheckpointWriteError as exc:
            ctx.events.warn(ev.SAVE_FAILED, kind=kind, step=step, error=str(exc))
            return None
        ctx.events.emit(
            ev.SAVE,
            kind=kind,
            step=step,
            path=str(path),
            bytes=read_manifest(path).size,
            writers=writers,
            staged=False,
            duration=time.monotonic() - started,
            digest=digest(path),
        )
        if kind == "jit":
            # The committing writer hands it to an integration; the tree has
            # no model or optimizer (they are in the shards): the
            # integration reads them from the live objects if it can.
            self._export(step, payload.tree, path)
        return path
