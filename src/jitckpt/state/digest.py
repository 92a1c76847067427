"""A SHA-256 over all parameters and optimizer state in a fixed order, so
two runs can be compared bitwise with one line of text."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

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
    from jitckpt.state import mesh as sharded

    if sharded.layout_of(model) is not None:
        return sharded.full_digest(model, optimizer)
    hasher = hashlib.sha256()
    for name, tensor in unwrap(model).state_dict().items():
        _feed(hasher, f"model.{name}", tensor)
    _feed(hasher, "optimizer", optimizer.state_dict())
    return hasher.hexdigest()
