"""Random-number state of python, numpy and torch for one rank.

Two ways to make randomness survive a restart:

* capture/restore: the state at the step boundary is saved with the
  checkpoint. It belongs to the rank that wrote the checkpoint, so it is
  only restored on that rank; other ranks reseed (below).
* deterministic mode reseeds all generators at every step boundary from
  (seed, step, rank). The stream is then a pure function of the step, so a
  resumed run draws exactly what an uninterrupted run draws, on every rank,
  whichever rank's checkpoint was loaded (runs with RNG reseeded per (step,
  rank) are bitwise equal: docs/platform.md, "Bitwise-identical runs and
  DDP's bucket order").
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch


def capture() -> dict[str, Any]:
    """Cheap snapshot taken at every step boundary (no conversions here)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def to_checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    """A snapshot in a form that loads with weights_only=True (numpy's key
    array becomes a tensor)."""
    name, keys, pos, has_gauss, cached = state["numpy"]
    out = dict(state)
    out["numpy"] = [
        name,
        torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        pos,
        has_gauss,
        cached,
    ]
    return out


def restore(state: dict[str, Any]) -> None:
    """Restore a snapshot written by to_checkpoint()."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def derived_seed(seed: int, step: int, rank: int, stream: int = 0) -> int:
    digest = hashlib.sha256(f"jitckpt:{seed}:{step}:{rank}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def reseed(seed: int, step: int, rank: int, stream: int = 0) -> None:
    """Seed python, numpy and torch from (seed, step, rank, stream)."""
    value = derived_seed(seed, step, rank, stream)
    random.seed(value)
    np.random.seed(value % (1 << 32))
    torch.manual_seed(value)
