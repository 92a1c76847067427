"""The periodic backstop: ordinary checkpoints every N steps or T seconds,
written in the background.

JIT checkpoints need a surviving replica. When none survives (every rank
lost at once, a power cut), the job must fall back to an older checkpoint
(docs/promises.md, P6). The training loop pays at most for a copy of the state: parameters and
optimizer state are copied by a writer thread while the next forward and
backward run (only optimizer.step() waits for the copy), and the atomic
write happens on that thread too. In DDP every replica holds the same state, so rank 0 alone
writes. If the previous write is still running when the next one is due,
the new one is skipped (and logged) rather than queued, so a slow disk never
stalls training or piles up memory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from jitckpt import events as ev
from jitckpt.state.archive import Archive
from jitckpt.state.training import clone_tensors
from jitckpt.storage.base import Storage
from jitckpt.storage.manifest import Manifest


class ReusedBuffers:
    """Host copies kept from one periodic save to the next. Copying into
    memory that is already mapped runs at memcpy speed; a fresh clone first
    faults in every page (benchmarks/storage.py measures both). A save reuses
    them only after the previous write finished (saves never overlap), and
    tensors are visited in the same order each time, so the i-th copy of a
    save reuses the i-th buffer when its shape and dtype still match."""

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []
        self._next = 0

    def rewind(self) -> None:
        self._next = 0

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        index, self._next = self._next, self._next + 1
        if index < len(self._buffers):
            buffer = self._buffers[index]
            if buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
                buffer = self._buffers[index] = torch.empty(
                    tensor.shape, dtype=tensor.dtype, device="cpu"
                )
        else:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
            self._buffers.append(buffer)
        return buffer.copy_(tensor.detach())


class PeriodicSaver:
    """Decides when a periodic checkpoint is due and writes it in the background.

    Args:
        storage: where checkpoints go (the run directory's).
        every_steps: save when the completed step count is a multiple of this.
        every_s: save when this many seconds passed since the last save.
        manifest: builds the manifest of a periodic checkpoint of a step.
        events: the event log.
        keep: periodic checkpoints kept (older ones are removed).
    """

    def __init__(
        self,
        storage: Storage,
        every_steps: int | None,
        every_s: float | None,
        manifest: Callable[[int], Manifest],
        events: Any,
        keep: int,
    ) -> None:
        self.storage = storage
        self.every_steps = every_steps
        self.every_s = every_s
        self.manifest = manifest
        self.events = events
        self.keep = keep
        self._last = time.monotonic()
        self._writer: threading.Thread | None = None
        self._copied: threading.Event | None = None
        self._blocked_s = 0.0
        self._buffers = ReusedBuffers()

    def due(self, step: int) -> bool:
        if self.every_steps and step % self.every_steps == 0:
            return True
        return bool(self.every_s) and time.monotonic() - self._last >= self.every_s  # type: ignore[operator]

    def save(self, step: int, tree: dict[str, Any], updated: Callable[[], set[int]]) -> None:
        """Save the state ``tree`` (live tensors) of a step boundary.

        Tensors that the next forward may change (buffers, loader and RNG
        state) are copied now; parameters and optimizer state (``updated()``:
        their storage addresses) change only in optimizer.step(), so they are
        copied by the writer thread while forward and backward run, and the
        update waits for that copy (:meth:`hold_update`). The loop blocks
        only for whatever of the copy the forward and backward did not hide.
        """
        if self._writer is not None and self._writer.is_alive():
            self.events.emit(
                ev.PERIODIC_SKIPPED, step=step, reason="previous periodic save still writing"
            )
            return
        started = time.monotonic()
        deferred = updated()
        now = clone_tensors(tree, lambda t: t.untyped_storage().data_ptr() not in deferred)
        self._copied = threading.Event()
        self._blocked_s = time.monotonic() - started
        self._last = time.monotonic()
        self._writer = threading.Thread(
            target=self._write,
            args=(step, now, deferred, self._copied),
            name="jitckpt-periodic",
            daemon=True,
        )
        self._writer.start()

    def hold_update(self) -> None:
        """Called before optimizer.step(): wait until the writer has its copy."""
        copied = self._copied
        if copied is not None and not copied.is_set():
            started = time.monotonic()
            copied.wait()
            self._blocked_s += time.monotonic() - started
        self._copied = None

    def _write(
        self, step: int, tree: dict[str, Any], deferred: set[int], copied: threading.Event
    ) -> None:
        started = time.monotonic()
        try:
            self._buffers.rewind()
            tree = clone_tensors(
                tree, lambda t: t.untyped_storage().data_ptr() in deferred, self._buffers.copy
            )
        except Exception as exc:  # noqa: BLE001 - the update must never wait forever
            copied.set()
            self._failed(step, exc)
            return
        copied.set()
        copy_s = time.monotonic() - started
        try:
            payload = Archive(tree)
            path = self.storage.write(self.manifest(step), payload)
        except Exception as exc:  # noqa: BLE001 - the backstop must say it is off, not vanish
            self._failed(step, exc)
            return
        self.events.emit(
            ev.SAVE,
            kind="periodic",
            step=step,
            path=str(path),
            bytes=payload.size,
            blocked_s=self._blocked_s,
            copy_s=copy_s,
            duration=time.monotonic() - started,
        )
        self.storage.prune("periodic", self.keep)

    def _failed(self, step: int, exc: Exception) -> None:
        self.events.emit(ev.PERIODIC_FAILED, step=step, error=f"{type(exc).__name__}: {exc}")
        print(f"jitckpt: periodic checkpoint of step {step} failed: {exc}", flush=True)

    def wait(self, timeout: float | None = None) -> None:
        """Let a write in flight finish (at the end of training)."""
        if self._writer is not None:
            self._writer.join(timeout)
