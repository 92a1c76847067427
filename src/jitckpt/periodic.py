"""The periodic backstop: ordinary checkpoints every N steps or T seconds,
written in the background.

JIT checkpoints need a surviving replica. When none survives (every rank
lost at once, a power cut), the job must fall back to an older checkpoint
(promise P6). The training loop pays only for a copy of the state at a step
boundary (tensor clones); serialization and the atomic write happen on a
writer thread. In DDP every replica holds the same state, so rank 0 alone
writes. If the previous write is still running when the next one is due,
the new one is skipped (and logged) rather than queued, so a slow disk never
stalls training or piles up memory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from jitckpt.archive import Archive
from jitckpt.errors import CheckpointWriteError
from jitckpt.storage import Storage


class PeriodicSaver:
    """Decides when a periodic checkpoint is due and writes it in the background.

    Args:
        storage: where checkpoints go (the run directory's).
        every_steps: save when the completed step count is a multiple of this.
        every_s: save when this many seconds passed since the last save.
        manifest: builds the manifest for a step (kind is set here).
        events: the event log.
        keep: periodic checkpoints kept (older ones are removed).
    """

    def __init__(
        self,
        storage: Storage,
        every_steps: int | None,
        every_s: float | None,
        manifest: Callable[[int], dict[str, Any]],
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

    def due(self, step: int) -> bool:
        if self.every_steps and step % self.every_steps == 0:
            return True
        return bool(self.every_s) and time.monotonic() - self._last >= self.every_s  # type: ignore[operator]

    def save(self, step: int, snapshot: Callable[[], dict[str, Any]]) -> None:
        if self._writer is not None and self._writer.is_alive():
            self.events.emit(
                "periodic_skipped", step=step, reason="previous periodic save still writing"
            )
            return
        started = time.monotonic()
        tree = snapshot()
        blocked = time.monotonic() - started
        self._last = time.monotonic()
        self._writer = threading.Thread(
            target=self._write, args=(step, tree, blocked), name="jitckpt-periodic", daemon=True
        )
        self._writer.start()

    def _write(self, step: int, tree: dict[str, Any], blocked_s: float) -> None:
        started = time.monotonic()
        try:
            payload = Archive(tree)
            manifest = dict(self.manifest(step), kind="periodic")
            path = self.storage.write(manifest, payload)
        except (CheckpointWriteError, Exception) as exc:  # noqa: BLE001 - the backstop must say it is off, not vanish
            self.events.emit("periodic_failed", step=step, error=f"{type(exc).__name__}: {exc}")
            print(f"jitckpt: periodic checkpoint of step {step} failed: {exc}", flush=True)
            return
        self.events.emit(
            "save",
            kind="periodic",
            step=step,
            path=str(path),
            bytes=payload.size,
            blocked_s=blocked_s,
            duration=time.monotonic() - started,
        )
        self.storage.prune("periodic", self.keep)

    def wait(self, timeout: float | None = None) -> None:
        """Let a write in flight finish (at the end of training)."""
        if self._writer is not None:
            self._writer.join(timeout)
