"""Sharded models (FSDP2 ``fully_shard`` on a 1-D mesh, HSDP on a 2-D
replicate x shard mesh): the mesh layout, its checks, and the tensor state
read and written with torch.distributed.checkpoint (DCP).

In DDP every rank holds the whole state; here a rank holds one shard, and
:class:`MeshLayout` says which rank holds which. DCP writes every rank's
shards into one directory and reads them back onto whatever mesh the new job
has (resharding), so a job may shrink or grow between attempts
(docs/platform.md, "FSDP2 and HSDP on CPU, and resharding with DCP"). Who
writes a JIT checkpoint of a sharded model is decided in
jitckpt.checkpoint.sharded.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from jitckpt import protocol
from jitckpt.errors import CheckpointError, CheckpointMismatchError, JitckptError, exit_fatal

# Collective timeout of the writers' fresh group: a writer that dies during
# the save fails the save after this long instead of gloo's 30 minutes.
WRITERS_GROUP_TIMEOUT = timedelta(seconds=60)
# Mesh dimension names a 2-D mesh may have (fully_shard replicates over dim 0
# and shards over dim 1); a 1-D mesh may have any name.
HSDP_DIM_NAMES = ("replicate", "shard")


@dataclass(frozen=True)
class MeshLayout:
    """Which global rank holds which shard: ``grid[replica][shard]``."""

    grid: tuple[tuple[int, ...], ...]
    dim_names: tuple[str, ...]

    @property
    def type(self) -> str:
        return "hsdp" if len(self.dim_names) == 2 else "fsdp"

    @property
    def replicas(self) -> int:
        return len(self.grid)

    @property
    def shards(self) -> int:
        return len(self.grid[0])

    def holders(self, shard: int) -> list[int]:
        """Ranks that hold ``shard``, replica 0 first."""
        return [row[shard] for row in self.grid]

    def shard_of(self, rank: int) -> int:
        for row in self.grid:
            if rank in row:
                return row.index(rank)
        raise ValueError(f"rank {rank} is not in the mesh {self.grid}")

    def to_manifest(self) -> dict[str, Any]:
        shape = [self.replicas, self.shards] if self.type == "hsdp" else [self.shards]
        return {"type": self.type, "mesh_shape": shape, "mesh_dim_names": list(self.dim_names)}


def dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed tensors
        return None
    return DTensor


def layout_of(model: torch.nn.Module) -> MeshLayout | None:
    """The mesh of a model sharded with fully_shard, or None (not sharded).
    Raises JitckptError for a mesh jitckpt cannot save (more than 2-D)."""
    dtensor = dtensor_type()
    for parameter in model.parameters():
        if dtensor is not None and isinstance(parameter, dtensor):
            mesh: Any = getattr(parameter, "device_mesh")  # noqa: B009 - a DTensor's
            ranks = mesh.mesh.tolist()
            names = tuple(mesh.mesh_dim_names or ("shard",) * mesh.ndim)
            if mesh.ndim == 1:
                return MeshLayout((tuple(ranks),), names)
            if mesh.ndim == 2:
                return MeshLayout(tuple(tuple(row) for row in ranks), names)
            raise JitckptError(
                f"jitckpt saves models sharded on a 1-D (FSDP) or 2-D replicate x shard "
                f"(HSDP) mesh; this model's mesh is {mesh.ndim}-D {tuple(mesh.shape)} "
                f"{names}."
            )
    return None


# The layout types whose model and optimizer are stored with DCP.
SHARDED_TYPES = ("fsdp", "hsdp")


def check_layout(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """Refuse, before anything is loaded, a checkpoint whose layout cannot
    be mapped onto this job's. DCP reshards between any FSDP and HSDP meshes
    (the tensors' global shapes are checked by the model signature); the
    whole-state DDP payload and sharded checkpoints do not convert."""
    saved_type = saved.get("type")
    current_type = current.get("type")
    sharded_types = SHARDED_TYPES
    if saved_type == current_type == "ddp":
        return
    if saved_type in sharded_types and current_type in sharded_types:
        dims = saved.get("mesh_dim_names") or []
        shape = saved.get("mesh_shape") or []
        if (
            len(shape) == len(dims)
            and 1 <= len(shape) <= 2
            and all(isinstance(n, int) and n > 0 for n in shape)
        ):
            return
        raise CheckpointMismatchError(
            f"checkpoint {where} records a mesh this version cannot read (shape {shape}, "
            f"dimensions {dims}); only 1-D FSDP and 2-D replicate x shard meshes map onto "
            f"a new mesh. Nothing was loaded."
        )
    raise CheckpointMismatchError(
        f"checkpoint {where} was written by a {describe(saved)} job and cannot be mapped "
        f"onto this {describe(current)} job: "
        + (
            "a sharded checkpoint loads only into a model sharded with fully_shard"
            if saved_type in sharded_types
            else "a DDP checkpoint loads only into a DDP (or unwrapped) model"
        )
        + ". Nothing was loaded or overwritten; resume with the parallelism that wrote it, "
        "or start a new run with a different --run-dir."
    )


def describe(layout: dict[str, Any]) -> str:
    kind = str(layout.get("type", "unknown")).upper()
    if layout.get("mesh_shape"):
        return (
            f"{kind} (mesh {tuple(layout['mesh_shape'])} {tuple(layout.get('mesh_dim_names', ()))})"
        )
    return kind


def init_device_mesh(
    device_type: str, mesh_shape: tuple[int, ...], *, mesh_dim_names: tuple[str, ...] | None = None
) -> Any:
    """``torch.distributed.device_mesh.init_device_mesh`` after checking the
    mesh fits the job: its ranks must be exactly WORLD_SIZE, and it must be
    1-D or 2-D replicate x shard. A mesh that does not fit is a fatal error
    (exit 78, no restart): no attempt of the same command can get past it,
    and torch's own error would surface only later, on some ranks."""
    world = (
        dist.get_world_size()
        if dist.is_initialized()
        else int(os.environ.get(protocol.WORLD_SIZE_ENV, "1"))
    )
    shape = tuple(int(n) for n in mesh_shape)
    problem = None
    if not shape or any(n <= 0 for n in shape):
        problem = f"every mesh dimension must be a positive size, got {shape}"
    elif len(shape) > 2:
        problem = f"jitckpt supports 1-D (FSDP) and 2-D replicate x shard (HSDP) meshes, got {len(shape)}-D {shape}"
    elif len(shape) == 2 and tuple(mesh_dim_names or ()) != HSDP_DIM_NAMES:
        problem = f"a 2-D mesh must be named {HSDP_DIM_NAMES} (fully_shard replicates over dimension 0), got {mesh_dim_names}"
    elif math.prod(shape) != world:
        names = mesh_dim_names or ("shard",) * len(shape)
        spelled = ",".join(f"{n}={s}" for n, s in zip(names, shape, strict=False))
        problem = (
            f"the mesh {spelled} has {math.prod(shape)} ranks but this job has {world} "
            f"(WORLD_SIZE); choose sizes whose product is {world}"
        )
    if problem is not None:
        exit_fatal(f"device mesh: {problem}", int(os.environ.get(protocol.RANK_ENV, "0")))
    from torch.distributed.device_mesh import init_device_mesh as torch_init_device_mesh

    return torch_init_device_mesh(device_type, shape, mesh_dim_names=mesh_dim_names)


def tensor_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Model and optimizer state keyed by parameter names, sharded as the
    model is (DTensors): what DCP writes and reads. Reading it runs no
    collective."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def save_tensors(state: dict[str, Any], directory: Path, group: dist.ProcessGroup | None) -> None:
    """Every rank of ``group`` writes its shards into ``directory``; the
    group's lowest rank writes DCP's metadata after all have written."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    dcp.save(state, storage_writer=FileSystemWriter(str(directory)), process_group=group)


def writers_group(writers: list[int]) -> dist.ProcessGroup:
    """A fresh gloo group of the writers only (the others need not call)."""
    group = dist.new_group(
        writers, backend="gloo", timeout=WRITERS_GROUP_TIMEOUT, use_local_synchronization=True
    )
    assert group is not None
    return group


def load_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Load a sharded checkpoint onto this job's mesh (every rank calls:
    DCP reads each rank's part of every tensor, whatever mesh wrote it),
    through a reader that runs no code from the checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from jitckpt.state.dcp_read import SafePlanner, SafeReader
    from jitckpt.state.training import SAFE_REFUSAL

    state = tensor_state(model, optimizer)
    # Never DCP's own reader: it unpickles .metadata (jitckpt.state.dcp_read).
    try:
        dcp.load(state, storage_reader=SafeReader(directory), planner=SafePlanner())
    except dcp.api.CheckpointException as exc:
        # DCP wraps what its reader raised; a refusal of SafePlanner's stays one.
        if SAFE_REFUSAL in str(exc):
            found = str(exc)[str(exc).index("DCP entry") :].splitlines()[0]
            raise CheckpointError(f"{directory}: {found}") from None
        raise
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )
