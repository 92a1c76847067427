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

import ctypes
import hashlib
import random
from typing import Any

import numpy as np
import torch
from numpy.random.mtrand import get_bit_generator


class _NumpyCapture:
    """numpy's global random state, copied only when it may have changed.

    ``np.random.get_state()`` costs ~50 us (it copies the 624-word key
    element by element), more than the rest of a step boundary, while most
    training scripts never draw from numpy's global generator. Its
    MT19937 state (key and position, 2,500 bytes) is read through the
    generator's documented ctypes interface in under a microsecond: while
    those bytes are unchanged, nothing was drawn and the last snapshot still
    holds. The one part outside those bytes is the legacy generator's
    cached second Gaussian; a snapshot with one cached is never reused (a
    draw that takes it moves no key bytes). Only ``np.random.set_state`` to
    a state with the same key and position but a cached Gaussian would get
    past this.
    """

    KEY_AND_POSITION = 624 * 4 + 4  # mt19937_state: uint32 key[624]; int pos

    def __init__(self) -> None:
        self._raw: bytes | None = None
        self._state: Any = None

    def __call__(self) -> Any:
        raw = self._read_raw()
        if raw is not None and raw == self._raw and not self._state[3]:  # has_gauss
            return self._state
        self._state = np.random.get_state()
        self._raw = raw
        return self._state

    def _read_raw(self) -> bytes | None:
        generator = get_bit_generator()  # replaceable: look it up each time
        if type(generator) is not np.random.MT19937:
            return None
        return ctypes.string_at(generator.ctypes.state_address, self.KEY_AND_POSITION)


_numpy_state = _NumpyCapture()


def capture() -> dict[str, Any]:
    """Cheap snapshot taken at every step boundary (no conversions here)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _numpy_state(),
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
