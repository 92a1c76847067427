"""Sharded models (FSDP2 ``fully_shard`` on a 1-D mesh, HSDP on a 2-D
replicate x shard mesh): the layout, who writes a JIT checkpoint, and saving
and loading with torch.distributed.checkpoint (DCP).

In DDP every rank holds the whole state, so any survivor can write it alone.
Here a rank holds one shard, so a JIT checkpoint needs, for every shard
index, one surviving rank that holds it at the same step. After a failure
the survivors agree on such a set through the c10d store (never through a
collective on the broken group): each posts the step of its clean state,
the first to post decides (:func:`choose_writers`) and publishes the
writers, and the writers form a fresh group among themselves
(``new_group(..., use_local_synchronization=True)``: PLATFORM.md measured
that this works after a peer died, and that ``dcp.save`` on the broken
default group fails) and save with DCP into one temporary directory. The
lowest writer then adds the non-tensor state (``state.pt``), checksums every
file and commits the directory atomically (jitckpt.storage). When no rank
holds some shard any more (FSDP without replicas, a whole replica group
lost with its peer), no JIT checkpoint can exist: the ranks say so and the
job resumes from the periodic backstop (promise P6).

A rank is usable as a writer when it is alive (it posted within
REPORT_WINDOW_S) and its state is clean: sharded parameters and optimizer
state change only in optimizer.step(), and a collective that failed
mid-flight (all-gather, reduce-scatter, all-reduce) only ever writes the
unsharded or gradient buffers, never them. A rank that raised inside its own
optimizer step is dirty and does not post.

Restore loads with DCP onto whatever mesh the new job has (resharding), so a
job may shrink or grow between attempts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist

from jitckpt.detect.watchdog import FAILURE_KEY, read_suspects
from jitckpt.errors import CheckpointMismatchError, JitckptError, exit_fatal
from jitckpt.state.digest import feed_tensor

# The longest the deciding rank collects the survivors' reports before it
# chooses the writers. It stops as soon as every rank has posted or is dead
# (its heartbeat stale: jitckpt.watchdog, about 1 s after its death).
# Survivors detect a failure at different times: ring neighbours of a dead
# rank within milliseconds, others when the launcher's SIGTERM reaches them
# (0.1-0.2 s, PLATFORM.md) and after SIGTERM a rank first lets its loop reach
# the next step boundary (up to 1 s or 3 step times, jitckpt.checkpoint).
REPORT_WINDOW_S = 10.0
# How often the decider looks at the posts and heartbeats meanwhile.
REPORT_POLL_S = 0.05
# How long a survivor waits for the decision; bounds a decider that died.
DECISION_TIMEOUT_S = 30.0
# Collective timeout of the writers' fresh group: a writer that dies during
# the save fails the save after this long instead of gloo's 30 minutes.
WRITERS_GROUP_TIMEOUT = timedelta(seconds=60)
# Mesh dimension names a 2-D mesh may have (fully_shard replicates over dim 0
# and shards over dim 1); a 1-D mesh may have any name.
HSDP_DIM_NAMES = ("replicate", "shard")
_KEY = "jit/sharded"


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


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed tensors
        return None
    return DTensor


def layout_of(model: torch.nn.Module) -> MeshLayout | None:
    """The mesh of a model sharded with fully_shard, or None (not sharded).
    Raises JitckptError for a mesh jitckpt cannot save (more than 2-D)."""
    dtensor = _dtensor_type()
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


def check_layout(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """Refuse, before anything is loaded, a checkpoint whose layout cannot
    be mapped onto this job's. DCP reshards between any FSDP and HSDP meshes
    (the tensors' global shapes are checked by the model signature); the
    whole-state DDP payload and sharded checkpoints do not convert."""
    saved_type = saved.get("type")
    current_type = current.get("type")
    sharded_types = ("fsdp", "hsdp")
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
        dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
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
        exit_fatal(f"device mesh: {problem}", int(os.environ.get("RANK", "0")))
    from torch.distributed.device_mesh import init_device_mesh as torch_init_device_mesh

    return torch_init_device_mesh(device_type, shape, mesh_dim_names=mesh_dim_names)


# -- who writes a JIT checkpoint -----------------------------------------------
@dataclass(frozen=True)
class Decision:
    """The writers of a JIT checkpoint (``step`` set), or why there is none."""

    step: int | None
    writers: list[int]
    reason: str | None = None
    lost_shard: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "writers": self.writers,
            "reason": self.reason,
            "lost_shard": self.lost_shard,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Decision:
        return cls(data["step"], list(data["writers"]), data.get("reason"), data.get("lost_shard"))


def choose_writers(layout: MeshLayout, reports: dict[int, int]) -> Decision:
    """Pick one reporting rank per shard, all at the same step, the newest
    step for which every shard has one. ``reports``: rank -> completed steps
    of its clean state. Ranks of the replica with the most reporters come
    first (fewest replica groups in the writers' group)."""
    for step in sorted(set(reports.values()), reverse=True):
        ready = {rank for rank, done in reports.items() if done == step}
        order = sorted(range(layout.replicas), key=lambda r: (-len(ready & set(layout.grid[r])), r))
        writers = []
        for shard in range(layout.shards):
            holder = next(
                (layout.grid[r][shard] for r in order if layout.grid[r][shard] in ready), None
            )
            if holder is None:
                break
            writers.append(holder)
        else:
            return Decision(step, sorted(writers))
    lost = [s for s in range(layout.shards) if not set(layout.holders(s)) & set(reports)]
    if lost:
        return Decision(None, [], f"no surviving replica of shard {lost[0]}", lost[0])
    steps = {
        s: sorted({reports[r] for r in layout.holders(s) if r in reports})
        for s in range(layout.shards)
    }
    return Decision(
        None,
        [],
        "the surviving replicas hold their shards at different steps "
        + ", ".join(f"shard {s} at step {'/'.join(map(str, v))}" for s, v in steps.items())
        + " (a failure between the last gradient reduction of one shard and another's)",
    )


def announce(store: Any, rank: int) -> None:
    """Say at once that this rank is alive and will post (it may first wait
    for its loop to reach a step boundary): the decider waits for it even if
    its heartbeat stops (a rank whose loop was unwound by an exception stops
    its heartbeat thread). The first to announce also sets FAILURE_KEY, which
    brings the peers that noticed nothing into the save (jitckpt.watchdog)."""
    store.set(f"{_KEY}/coming/{rank}", "1")
    store.compare_set(FAILURE_KEY, "", str(rank))


def agree_on_writers(
    store: Any, layout: MeshLayout, rank: int, step: int | None
) -> tuple[Decision, bool]:
    """Post this rank's clean step (None: nothing to offer), wait for the
    decision and return it, with whether this rank decided. Only the store
    is used: it lives in the launcher, not in any peer."""
    world = sum(len(row) for row in layout.grid)
    if step is not None:
        store.set(f"{_KEY}/report/{rank}", str(step))
    store.add(f"{_KEY}/posted", 1)
    decider = store.compare_set(f"{_KEY}/decider", "", str(rank)).decode() == str(rank)
    if decider:
        deadline = time.monotonic() + REPORT_WINDOW_S
        while time.monotonic() < deadline and not _all_accounted(store, world, rank):
            time.sleep(REPORT_POLL_S)
        reports = {
            r: int(store.get(f"{_KEY}/report/{r}").decode())
            for r in range(world)
            if store.check([f"{_KEY}/report/{r}"])
        }
        decision = choose_writers(layout, reports)
        store.set(f"{_KEY}/decision", json.dumps(dict(decision.as_dict(), reports=reports)))
        return decision, True
    store.wait([f"{_KEY}/decision"], timedelta(seconds=DECISION_TIMEOUT_S))
    return Decision.from_dict(json.loads(store.get(f"{_KEY}/decision").decode())), False


def _all_accounted(store: Any, world: int, rank: int) -> bool:
    """Every rank has posted, or is dead by its heartbeat and never said it
    would post."""
    if store.add(f"{_KEY}/posted", 0) >= world:
        return True
    posted = {r for r in range(world) if store.check([f"{_KEY}/report/{r}"])}
    coming = {r for r in range(world) if store.check([f"{_KEY}/coming/{r}"])}
    dead = {r for r, kind in read_suspects(store, world, rank).items() if kind == "dead"}
    return posted | (dead - coming) >= set(range(world))


# -- saving and loading ----------------------------------------------------------
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
    DCP reads each rank's part of every tensor, whatever mesh wrote it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = tensor_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )


def _flat(state: dict[str, Any]) -> dict[str, Any]:
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    flat, _mapping = flatten_state_dict(state)
    return flat


def _hash(tensors: dict[str, torch.Tensor]) -> str:
    hasher = hashlib.sha256()
    for key in sorted(tensors):
        hasher.update(key.encode())
        feed_tensor(hasher, tensors[key])
    return hasher.hexdigest()


def full_digest(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """SHA-256 of every tensor of the model and optimizer state, whole
    (gathered from the shards: a collective, every rank must call), keyed
    as DCP keys them: the same on any mesh, and equal to
    :func:`checkpoint_digest` of a checkpoint of the same state."""
    dtensor = _dtensor_type()
    full: dict[str, torch.Tensor] = {}
    value: Any
    for key, value in sorted(_flat(tensor_state(model, optimizer)).items()):
        if dtensor is not None and isinstance(value, dtensor):
            full[key] = cast(Any, value).full_tensor()
        elif isinstance(value, torch.Tensor):
            full[key] = value
    return _hash(full)


def checkpoint_digest(directory: Path) -> str:
    """:func:`full_digest` of a sharded checkpoint, read back whole in this
    process (no group needed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(directory))
    metadata = reader.read_metadata()
    tensors = {
        key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata)
    }
    dcp.load(tensors, storage_reader=reader, no_dist=True)
    return _hash(tensors)
