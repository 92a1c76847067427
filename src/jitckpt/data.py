"""Data position: where the loader is, saved with every checkpoint.

torchdata's StatefulDataLoader restores its position exactly, also with
worker processes, and its state does not depend on the rank: rank 0's state
loaded into rank 1's loader continues rank 1's own shard (PLATFORM.md), so a
survivor's checkpoint serves every rank. The epoch is the sampler's
(``DistributedSampler.epoch``, set by ``set_epoch``): samplers shuffle by it
but do not store it, so it is saved beside the loader state. Loops should
take the epoch from the sampler, e.g.::

    def endless(loader):
        while True:
            yield from loader
            loader.sampler.set_epoch(loader.sampler.epoch + 1)
"""

from __future__ import annotations

from typing import Any


class DataPosition:
    """state_dict()/load_state_dict() over a loader and its sampler's epoch."""

    def __init__(self, loader: Any) -> None:
        if not (hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict")):
            raise TypeError(
                f"jitckpt needs a loader with state_dict()/load_state_dict() to resume at the "
                f"exact batch; got {type(loader).__name__}. Use "
                f"torchdata.stateful_dataloader.StatefulDataLoader (a drop-in for DataLoader)."
            )
        self.loader = loader
        sampler = getattr(loader, "sampler", None)
        self.sampler = sampler if hasattr(sampler, "set_epoch") else None

    def state_dict(self) -> dict[str, Any]:
        epoch = getattr(self.sampler, "epoch", None) if self.sampler is not None else None
        return {"epoch": epoch, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.sampler is not None and state.get("epoch") is not None:
            self.sampler.set_epoch(int(state["epoch"]))
        self.loader.load_state_dict(state["loader"])
