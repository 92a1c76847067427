"""Hang detection: heartbeats in the c10d store and a watchdog thread.

A hung rank leaves every other rank blocked in its next collective until the
process-group timeout (30 minutes by default in gloo), and torchrun never
notices (docs/platform.md, "What surviving ranks see when a peer hangs"). Every rank therefore watches its own progress counter
(the step tracker's, bumped at boundaries, forward, backward, each gradient
bucket and the optimizer step): when it has not moved for ``timeout`` the
rank declares a hang, names suspects from the heartbeats, and the JIT save
runs from this thread while the training thread stays blocked.

Suspects come from the heartbeats every rank publishes to the store: a rank
whose heartbeat is stale is *dead*; a rank whose heartbeat is live but whose
progress is behind the most advanced rank is *hung* (its side threads run
while its training thread is stuck): heartbeats alone cannot name a hung
rank, a per-bucket counter can (docs/platform.md, "Detecting a hang and
naming the hung rank").
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

from jitckpt import protocol
from jitckpt.tracker import StepTracker

# Timeout = max(HANG_TIMEOUT_FLOOR_S, HANG_TIMEOUT_STEPS x median step time),
# unless the user passes hang_timeout_s. The floor keeps scheduler noise on
# a loaded host from looking like a hang when steps take milliseconds; the
# multiple lets a straggler be several steps slow before it counts as hung.
HANG_TIMEOUT_FLOOR_S = 1.5
HANG_TIMEOUT_STEPS = 4.0
# How often the watchdog looks at the progress counter.
CHECK_INTERVAL_S = 0.1
# How often each rank publishes its heartbeat, and when one counts as stale.
HEARTBEAT_INTERVAL_S = 0.25
STALE_AFTER_S = 1.0


# Before a step has completed in this process there is no step time to
# judge by (the first step may compile or warm up for long): a generous fixed
# timeout still beats gloo's 30 minutes.
FIRST_STEP_TIMEOUT_S = 300.0


def hang_timeout(tracker: StepTracker, override: float | None) -> float:
    """The stall that counts as a hang."""
    if override is not None:
        return override
    median = tracker.median_step_time()
    if median is None:
        return FIRST_STEP_TIMEOUT_S
    return max(HANG_TIMEOUT_FLOOR_S, HANG_TIMEOUT_STEPS * median)


class Heartbeat:
    """Publishes ``hb/<rank>`` = {t, progress, completed} every interval;
    progress counts from the start of the step ``completed``. With
    ``on_peer_failure``, also watches protocol.FAILURE_KEY and calls it once, from a
    thread of its own, with the rank that set the key."""

    def __init__(
        self,
        store: Any,
        rank: int,
        tracker: StepTracker,
        on_peer_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.rank = rank
        self.tracker = tracker
        self.on_peer_failure = on_peer_failure
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jitckpt-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, join_timeout: float = 2.0) -> None:
        """Stop and wait for the thread. It must not be inside a store call
        when the interpreter shuts down: a daemon thread that returns from
        C++ into a finalizing interpreter is unwound through a noexcept frame
        and the process aborts ("terminate called without an active
        exception", seen at the end of a run)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(join_timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            record = {
                "t": time.time(),
                "progress": self.tracker.progress - self.tracker.step_start_progress,
                "completed": self.tracker.position().completed,
            }
            try:
                self.store.set(protocol.HEARTBEAT_KEY.format(rank=self.rank), json.dumps(record))
                if self.on_peer_failure is not None and self.store.check([protocol.FAILURE_KEY]):
                    who = self.store.get(protocol.FAILURE_KEY).decode()
                    callback, self.on_peer_failure = self.on_peer_failure, None
                    threading.Thread(
                        target=callback, args=(who,), name="jitckpt-peer-failure", daemon=True
                    ).start()
            except Exception:  # noqa: BLE001 - a lost store shows up as stale heartbeats elsewhere
                pass
            self._stop.wait(HEARTBEAT_INTERVAL_S)


def read_suspects(store: Any, world_size: int, own_rank: int) -> dict[int, str]:
    """Ranks that look dead (stale or missing heartbeat) or hung (live but
    behind the most advanced rank's progress)."""
    now = time.time()
    beats: dict[int, dict[str, Any] | None] = {}
    for rank in range(world_size):
        try:
            key = protocol.HEARTBEAT_KEY.format(rank=rank)
            beats[rank] = json.loads(store.get(key).decode()) if store.check([key]) else None
        except Exception:  # noqa: BLE001
            beats[rank] = None
    live = {r: b for r, b in beats.items() if b is not None and now - b["t"] <= STALE_AFTER_S}
    suspects = {r: "dead" for r in beats if r not in live}
    if live:
        # Compare by (completed steps, progress points within them).
        front = max((b["completed"], b["progress"]) for b in live.values())
        for rank, beat in live.items():
            if (beat["completed"], beat["progress"]) < front:
                suspects[rank] = "hung"
    return suspects


class Watchdog:
    """Calls ``on_hang(stalled_s, timeout_s)`` from its own thread when this
    rank's progress has been stuck for longer than the timeout; it keeps
    watching (from zero) if that returns True, else it stops."""

    def __init__(
        self,
        tracker: StepTracker,
        on_hang: Callable[[float, float], bool | None],
        timeout_override: float | None = None,
    ) -> None:
        self.tracker = tracker
        self.on_hang = on_hang
        self.timeout_override = timeout_override
        self._paused = 0
        self._pauses = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jitckpt-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def pause(self) -> None:
        # Counted, so that a pause shorter than the check interval still
        # restarts the stall clock (a recovery of a few ms is not a stall).
        self._pauses += 1
        self._paused += 1

    def resume(self) -> None:
        self._paused -= 1

    def _run(self) -> None:
        seen = self.tracker.progress
        pauses = self._pauses
        changed = time.monotonic()
        while not self._stop.wait(CHECK_INTERVAL_S):
            now = time.monotonic()
            progress = self.tracker.progress
            if progress != seen or self._paused or self._pauses != pauses:
                seen, changed, pauses = progress, now, self._pauses
                continue
            timeout = hang_timeout(self.tracker, self.timeout_override)
            if now - changed > timeout:
                if not self.on_hang(now - changed, timeout):
                    return
                changed = time.monotonic()
