"""A SHA-256 over all parameters and optimizer state in a fixed order, so
two runs can be compared bitwise with one line of text: of a DDP model, of
a sharded model (gathered from its shards), or of a sharded checkpoint."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, cast

import torch

from jitckpt import compat
from jitckpt.state.mesh import dtensor_type, layout_of, tensor_state
from jitckpt.state.training import unwrap


def feed_tensor(hasher: Any, value: torch.Tensor) -> None:
    """Hash a tensor's dtype, shape and bytes (on the host)."""
    tensor = value.detach().cpu().contiguous()
    hasher.update(str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode())
    if tensor.numel():
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def _feed(hasher: Any, name: str, value: Any) -> None:
    hasher.update(name.encode())
    if isinstance(value, torch.Tensor):
        feed_tensor(hasher, value)
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            _feed(hasher, f"{name}.{key}", value[key])
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _feed(hasher, f"{name}[{index}]", item)
    else:
        hasher.update(repr(value).encode())


def state_digest(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """For a model sharded with fully_shard the digest covers the whole
    state, gathered from the shards: every rank must call it (a collective),
    and every rank gets the same digest, whatever the mesh."""
    if layout_of(model) is not None:
        return full_digest(model, optimizer)
    hasher = hashlib.sha256()
    for name, tensor in unwrap(model).state_dict().items():
        _feed(hasher, f"model.{name}", tensor)
    _feed(hasher, "optimizer", optimizer.state_dict())
    return hasher.hexdigest()


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
    dtensor = dtensor_type()
    full: dict[str, torch.Tensor] = {}
    value: Any
    for key, value in sorted(compat.flatten_state_dict(tensor_state(model, optimizer)).items()):
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
