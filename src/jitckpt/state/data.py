"""Data position: where the loader is, saved with every checkpoint.

torchdata's StatefulDataLoader restores its position exactly, also with
worker processes, and its state does not depend on the rank: rank 0's state
loaded into rank 1's loader continues rank 1's own shard (docs/platform.md,
"Data loader position and randomness in dataset workers"), so a
survivor's checkpoint serves every rank. The epoch is the sampler's
(``DistributedSampler.epoch``, set by ``set_epoch``): samplers shuffle by it
but do not store it, so it is saved beside the loader state. Loops should
take the epoch from the sampler, e.g.::

    def endless(loader):
        while True:
            yield from loader
            loader.sampler.set_epoch(loader.sampler.epoch + 1)

When the world size changes (a node is lost, or one returns) the rule is:

* The per-rank batch size stays; the global batch becomes batch x new world
  size. Steps, and so the LR schedule, continue from the resumed step.
* The epoch's sample order (the permutation of ``(seed, epoch)``) stays. The
  position is kept in *samples of that order already consumed*:
  ``start + batches x batch size x old world size``. The rest of the order is
  split among the new ranks the way DistributedSampler splits a whole epoch
  (rank r takes every new-world-size-th sample from r, the tail padded by
  repeating its beginning). No sample of the epoch is skipped or repeated
  beyond DistributedSampler's own padding.

This needs :class:`ElasticDistributedSampler`; a plain DistributedSampler
cannot start mid-order, so resuming it at another world size is refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DistributedSampler

from jitckpt.errors import CheckpointMismatchError, UsageError


class ElasticDistributedSampler(DistributedSampler):  # type: ignore[type-arg]
    """DistributedSampler that can continue an epoch at another world size.

    Identical to DistributedSampler while ``start`` is 0. ``start`` is the
    number of samples of this epoch's order consumed before the current
    partition began; jitckpt sets it on a resume at another world size, and
    ``set_epoch`` resets it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.start = 0

    def epoch_order(self) -> list[int]:
        size = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            return torch.randperm(size, generator=generator).tolist()
        return list(range(size))

    def _remaining(self) -> list[int]:
        order = self.epoch_order()[self.start :]
        if self.drop_last:
            return order[: len(order) - len(order) % self.num_replicas]
        padding = -len(order) % self.num_replicas
        if order and padding:
            order += (order * math.ceil(padding / len(order)))[:padding]
        return order

    def __iter__(self) -> Iterator[int]:
        return iter(self._remaining()[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        return len(self._remaining()) // self.num_replicas


def check_world_size(state: dict[str, Any], loader: Any, sampler: Any, where: str) -> None:
    """Refuse a saved position of another world size that this loader
    cannot continue (the rule in the module docstring)."""
    saved, current = state.get("world_size"), getattr(sampler, "num_replicas", None)
    if saved is None or current is None or saved == current:
        return
    if not isinstance(sampler, ElasticDistributedSampler):
        raise CheckpointMismatchError(
            f"checkpoint {where} was written at world size {saved}, this job has {current}, "
            f"and the loader's {type(sampler).__name__} cannot continue an epoch at another "
            f"world size. Use jitckpt.ElasticDistributedSampler (exact data position), or "
            f"relaunch with {saved} ranks."
        )
    if state.get("batch_size") != getattr(loader, "batch_size", None):
        raise CheckpointMismatchError(
            f"checkpoint {where} used batch size {state.get('batch_size')} per rank, this "
            f"loader uses {getattr(loader, 'batch_size', None)}; the data position "
            f"rule keeps the per-rank batch size."
        )


class DataPosition:
    """state_dict()/load_state_dict() over a loader, its sampler's epoch and,
    with an ElasticDistributedSampler, the place in the epoch's order."""

    def __init__(self, loader: Any) -> None:
        if not (hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict")):
            raise UsageError(
                f"jitckpt needs a loader with state_dict()/load_state_dict() to resume at the "
                f"exact batch; got {type(loader).__name__}. Use "
                f"torchdata.stateful_dataloader.StatefulDataLoader (a drop-in for DataLoader)."
            )
        self.loader = loader
        sampler = getattr(loader, "sampler", None)
        self.sampler = sampler if hasattr(sampler, "set_epoch") else None

    def _world_size(self) -> int | None:
        return getattr(self.sampler, "num_replicas", None)

    def state_dict(self) -> dict[str, Any]:
        sampler = self.sampler
        return {
            "epoch": getattr(sampler, "epoch", None) if sampler is not None else None,
            "start": getattr(sampler, "start", 0),
            "world_size": self._world_size(),
            "batch_size": getattr(self.loader, "batch_size", None),
            "loader": self.loader.state_dict(),
        }

    def check(self, state: dict[str, Any], where: str) -> None:
        """Refuse, before anything is loaded, a position this loader cannot take."""
        check_world_size(state, self.loader, self.sampler, where)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sampler = self.sampler
        if sampler is not None and state.get("epoch") is not None:
            sampler.set_epoch(int(state["epoch"]))
        saved_world, current_world = state.get("world_size"), self._world_size()
        if saved_world is None or saved_world == current_world:
            if isinstance(sampler, ElasticDistributedSampler):
                sampler.start = int(state.get("start") or 0)
            self.loader.load_state_dict(state["loader"])
            return
        # Another world size: continue the same epoch order after the samples
        # all old ranks consumed; the loader starts a fresh pass over the rest.
        assert isinstance(sampler, ElasticDistributedSampler)  # check() refused the rest
        batches = int(state["loader"].get("_num_yielded", 0))
        consumed = int(state.get("start") or 0) + batches * int(state["batch_size"]) * int(
            saved_world
        )
        sampler.start = min(consumed, len(sampler.dataset))  # type: ignore[arg-type]
