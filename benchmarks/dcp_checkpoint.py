"""Periodic asynchronous checkpoints with torch.distributed.checkpoint (DCP).

What a job without JIT checkpointing would use today: every rank calls
``dcp.async_save`` every N steps, which stages the state to host memory
while the loop waits and writes it in a background thread. Used by
benchmarks/periodic_baseline.py (``--checkpoint dcp``, the baseline that
restarts from these) and benchmarks/overhead.py (the ``dcp_async`` mode,
what one save costs the loop).

Choices, each as torchtitan makes them:

* the writes' collectives run on a gloo group of their own: the default
  group carries DDP's all-reduces from the training thread, and two threads
  must not issue collectives on one gloo group;
* at most one save in flight: the next save first waits for the previous
  one (that wait counts as blocking);
* a checkpoint is complete once its ``.metadata`` exists (DCP's coordinator
  writes it after every rank's data), so a rank killed mid-write leaves a
  directory that restore skips.

Parameters and optimizer state go through DCP's state-dict API; the
scheduler, loader and epoch, small Python objects, travel as one pickled
blob (DCP stores a non-tensor value whole).
"""

from __future__ import annotations

import pickle
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

DIR_PREFIX = "dcp-"
METADATA = ".metadata"


class DcpCheckpointer:
    """Asynchronous DCP saves of a DDP job's training objects.

    ``objects`` holds ``model`` (the module inside DDP), ``optimizer``,
    ``scheduler`` and ``loader`` (a StatefulDataLoader whose sampler holds
    the epoch). Every rank must construct it (it creates a process group)
    and call :meth:`save` at the same steps."""

    def __init__(self, run_dir: Path, objects: dict[str, Any]) -> None:
        import torch.distributed as dist

        self.run_dir = run_dir
        self.objects = objects
        self.group = dist.new_group(backend="gloo")
        self._pending: Future[Any] | None = None

    def _state(self, completed: int) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        model, optimizer = self.objects["model"], self.objects["optimizer"]
        extra = {
            "step": completed,
            "epoch": self.objects["loader"].sampler.epoch,
            "scheduler": self.objects["scheduler"].state_dict(),
            "loader": self.objects["loader"].state_dict(),
        }
        return {
            "model": get_model_state_dict(model),
            "optimizer": get_optimizer_state_dict(model, optimizer),
            "extra": pickle.dumps(extra),
        }

    def save(self, completed: int) -> float:
        """Start the checkpoint of ``completed`` steps; returns the seconds
        the caller was blocked (waiting for the previous save, staging)."""
        import torch.distributed.checkpoint as dcp

        started = time.perf_counter()
        self.wait()
        path = self.run_dir / f"{DIR_PREFIX}{completed:09d}"
        self._pending = dcp.async_save(
            self._state(completed), checkpoint_id=str(path), process_group=self.group
        )
        return time.perf_counter() - started

    def wait(self) -> None:
        """Let the save in flight finish."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def newest(self) -> Path | None:
        """The complete checkpoint with the most steps (names are zero padded)."""
        done = [p for p in sorted(self.run_dir.glob(f"{DIR_PREFIX}*")) if (p / METADATA).exists()]
        return done[-1] if done else None

    def restore(self, path: Path) -> int:
        """Load every object's state from ``path``; returns the completed steps."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        state = self._state(0)  # the layout to load into
        dcp.load(state, checkpoint_id=str(path), process_group=self.group)
        model, optimizer = self.objects["model"], self.objects["optimizer"]
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
        extra = pickle.loads(state["extra"])
        # The sampler shuffles by its epoch but does not store it.
        self.objects["loader"].sampler.set_epoch(extra["epoch"])
        self.objects["loader"].load_state_dict(extra["loader"])
        self.objects["scheduler"].load_state_dict(extra["scheduler"])
        return int(extra["step"])
