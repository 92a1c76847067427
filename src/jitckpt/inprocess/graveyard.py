"""The graveyard: abandoned process groups and pending collectives, dropped
off the training thread.

A gloo group with a pending call cannot be dropped on the training thread:
its destructor waits for the call, which only ends at the group's timeout or
once every peer has closed its old connections (docs/platform.md, "Three
rules: locks, dropping groups, private copies", rule 2). A recovery therefore hands what it abandons
to a :class:`Graveyard`, whose background thread drops each item
``RELEASE_DELAY_S`` after it was kept, when the peers have re-formed.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

# How long an item is kept before the background thread drops it: long
# enough for every peer to have re-formed (their old connections close,
# which ends our pending gloo call instead of waiting for the group timeout).
RELEASE_DELAY_S = 1.0
# How long the end of training waits for the graveyard: RELEASE_DELAY_S and
# the drops, ~1.0-1.1 s after the last recovery when run alone, but a drop
# also waits for peers still dropping their own (3 s left one blocked in 2 of
# 5 full test runs, 10 s none in many). A drop still blocked after that waits
# for a call only the group's timeout ends (Graveyard); the process then
# ends without Python's finalization (jitckpt.process_exit).
SETTLE_TIMEOUT_S = 10.0


# The graveyard's threads (its timer, and each drop).
GRAVEYARD_THREAD = "jitckpt-graveyard"
# The name gloo gives the event-loop thread of each group's transport.
GLOO_LOOP_THREAD = "gloo_tcp_loop"


def quiet_abandoned_loops() -> int:
    """Give the gloo event-loop threads alive now the lowest CPU priority
    (SCHED_IDLE); returns how many. Called when a recovery's notice
    arrives, before the new group exists, so every such thread belongs to a
    group formed before the failure: the default group, which the recovery
    abandons, or a group the script made itself (a recovery does not re-form
    those; one that includes the dead rank is broken). Why: an abandoned
    group's loop can spin on a connection to a *survivor* that still holds
    bytes for a call this rank gave up (gloo waits for a receive buffer that
    will never be posted, and its level-triggered epoll reports the socket
    at once again): measured 270 ms of CPU in the 0.37 s after a recovery,
    half of this 2-core machine, until the group is dropped about a second
    later. SCHED_IDLE lets it run only on an otherwise idle core."""
    quieted = 0
    try:
        threads = os.listdir("/proc/self/task")
    except OSError:
        return 0
    for tid in threads:
        try:
            with open(f"/proc/self/task/{tid}/comm") as handle:
                if handle.read().strip() != GLOO_LOOP_THREAD:
                    continue
            os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))
            quieted += 1
        except (OSError, AttributeError):
            continue  # the thread ended, or no SCHED_IDLE here: only speed is at stake
    return quieted


def resource_counts() -> dict[str, int]:
    """This process's threads (native ones included), open file descriptors
    and resident memory (KiB): what a recovery must give back."""
    counts = {"threads": -1, "fds": -1, "rss_kb": -1}
    try:
        counts["threads"] = len(os.listdir("/proc/self/task"))
        counts["fds"] = len(os.listdir("/proc/self/fd"))
        with open("/proc/self/statm") as handle:
            counts["rss_kb"] = int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        pass
    return counts


class Graveyard:
    """Holds abandoned groups and pending work and drops them off the
    training thread (the module docstring): each item ``RELEASE_DELAY_S``
    after it was kept, on a thread of its own, so that a drop that blocks
    holds up nothing else. (One can block until the group's timeout: a
    pending receive whose peer died in the middle of a message is not always
    woken by gloo, docs/platform.md; nothing but that timeout ends it.)
    ``on_release(what, held_s, drop_s)`` is called after each drop: how long
    the item was held (from ``keep`` to the end of its drop) and how long the
    drop itself blocked (a gloo group's destructor waits for its pending
    call, which ends once the peers have closed their old connections)."""

    def __init__(self, on_release: Any = None) -> None:
        self._items: list[tuple[float, float, Any]] = []
        self._dropping = 0
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._on_release = on_release or (lambda what, held_s, drop_s: None)

    def keep(self, item: Any) -> None:
        now = time.monotonic()
        with self._lock:
            self._items.append((now + RELEASE_DELAY_S, now, item))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._release, name=GRAVEYARD_THREAD, daemon=True
                )
                self._thread.start()

    def __len__(self) -> int:
        """Items kept and not dropped yet (those being dropped included)."""
        with self._lock:
            return len(self._items) + self._dropping

    def _release(self) -> None:
        while True:
            with self._lock:
                if not self._items:
                    self._thread = None
                    return
                due = self._items[0][0]
            time.sleep(max(0.0, due - time.monotonic()))
            # No local name here refers to the item: the drop thread must
            # hold the last reference, or the drop would happen here.
            with self._lock:
                holder = [self._items.pop(0)]
                self._dropping += 1
            threading.Thread(
                target=self._drop, args=(holder,), name=GRAVEYARD_THREAD, daemon=True
            ).start()

    def _drop(self, holder: list[tuple[float, float, Any]]) -> None:
        _, kept, item = holder.pop()
        what = type(item[0] if isinstance(item, tuple) else item).__name__
        dropping = time.monotonic()
        # This frame holds the last reference: the drop happens here and may
        # block until the pending gloo call ends.
        del item
        done = time.monotonic()
        with self._lock:
            self._dropping -= 1
            self._lock.notify_all()
        try:
            self._on_release(what, done - kept, done - dropping)
        except Exception:  # noqa: BLE001 - a report must not stop the releases
            pass

    def join(self, timeout: float) -> bool:
        """Wait until everything kept is dropped (or ``timeout``); True if so."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._items or self._dropping:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                # Woken by each finished drop; items not due yet: poll.
                self._lock.wait(min(left, 0.05))
            return True
