"""The failure path: every detector of a rank ends in one save-then-exit.

A rank learns of a failure in one of four ways: an exception leaves the
training script (its own bug, or a collective that failed because a peer
died), SIGTERM (the launcher restarting the job, or a scheduler's
preemption), the hang watchdog, or a sharded peer that entered its failure
path. Each ends in :meth:`FailurePath.fail`, under one lock: log the
detection, save the state of the last completed step, exit. Whatever goes
wrong while saving, the process still exits: a detector thread that died
would leave the loop frozen and the job waiting for gloo's timeout.

With in-process recovery on, a hang of a peer is not this rank's failure:
it asks the launcher to kill the hung rank, which turns the hang into an
exit that is recovered from without restarting this process.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import torch.distributed as dist

from jitckpt import events as ev
from jitckpt import protocol
from jitckpt.detect.watchdog import read_suspects
from jitckpt.errors import CheckpointError, InjectedFault, RunDirError, UsageError, exit_fatal
from jitckpt.events import EventLog
from jitckpt.storage.rundir import worker_log
from jitckpt.tracker import StepTracker

# How long a hang detector may spend reading heartbeats to name suspects
# before it saves anyway.
SUSPECTS_DEADLINE_S = 1.0
# Substrings of errors raised by a collective whose peer died.
COLLECTIVE_ERROR_MARKERS = (
    "gloo",
    "Gloo",
    "NCCL",
    "Connection reset",
    "Connection closed",
    "Broken pipe",
)

# Substrings of a collective's error that say the connection to a peer was
# lost: the echo of that peer's failure on a survivor, whose traceback goes
# to the worker log. Any other collective error (a size mismatch, a timeout)
# may be the script's own, and keeps its traceback on the console.
PEER_LOST_MARKERS = (
    "Connection reset",
    "Connection closed",
    "Broken pipe",
    "Connection refused",
    "remote process exited",
)

# Substrings of CUDA errors that poison the process's CUDA context: every
# later CUDA call fails, so this process can neither read its state from the
# device nor go on; only a new process can (in-process recovery replaces it).
CUDA_POISON_MARKERS = (
    "device-side assert",
    "illegal memory access",
    "an illegal instruction",
    "misaligned address",
    "unspecified launch failure",
    "CUDA error: an illegal",
)

Save = Callable[[str, float | None], Path | None]


class HungPeers(Protocol):
    """What the failure path needs from in-process recovery."""

    def pending(self) -> bool: ...
    def request_kill(self, ranks: list[int]) -> None: ...


def classify_exception(exc: BaseException) -> str:
    """The detection cause of an exception that left the script:
    ``cuda_error`` (this process's CUDA context is poisoned: it must be
    replaced, and cannot save), ``collective_error`` (a peer died under a
    collective), else ``exception`` (this rank's own failure, an injected
    one included)."""
    if isinstance(exc, InjectedFault):
        return "exception"
    if isinstance(exc, RuntimeError) and any(m in str(exc) for m in CUDA_POISON_MARKERS):
        return "cuda_error"
    if isinstance(exc, getattr(dist, "DistError", ())):
        return "collective_error"
    text = str(exc)
    if isinstance(exc, RuntimeError) and any(marker in text for marker in COLLECTIVE_ERROR_MARKERS):
        return "collective_error"
    return "exception"


def peer_lost(exc: BaseException) -> bool:
    """Whether a collective's error says a peer's connection was lost (the
    expected echo of its failure), not a fault of this rank's call."""
    return any(marker in str(exc) for marker in PEER_LOST_MARKERS)


def describe_suspects(suspects: dict[int, str]) -> str:
    return ", ".join(f"rank {r} {kind}" for r, kind in sorted(suspects.items())) or "none named"


class FailurePath:
    """One rank's detectors and its single exit.

    It exists from the first line of JitCheckpoint: an exception raised while
    the run directory is checked or a checkpoint is chosen must already stop
    the restarts (exit 78). :meth:`bind` gives it the rank and what it needs
    to save once those exist; it saves only once :attr:`ready` is set (before
    the first step boundary there is nothing to save, and an exception is the
    script's to report).
    """

    def __init__(self) -> None:
        self.rank: int | None = None
        self.world_size = 1
        self.events: EventLog | None = None
        self.tracker: StepTracker | None = None
        self._save: Save | None = None
        # One save at a time: the first detector saves; a later one (the
        # launcher's SIGTERM arriving while a collective error is handled, or a
        # manual save racing SIGTERM) waits for it.
        self.lock = threading.RLock()
        self.ready = False
        self.recovery: HungPeers | None = None
        self.heartbeat_store: Any = None
        self._previous_excepthook = sys.excepthook
        sys.excepthook = self.on_exception

    def bind(
        self, rank: int, world_size: int, events: EventLog, tracker: StepTracker, save: Save
    ) -> None:
        """Args:
        rank, world_size: this rank's place in the job.
        events: the event log.
        tracker: the loop's step tracker (the position a detection logs).
        save: the JIT save, ``save(reason, wait_s)``; called under
            :attr:`lock`, which a manual save also takes.
        """
        self.rank, self.world_size = rank, world_size
        self.events, self.tracker, self._save = events, tracker, save

    # -- the detectors -----------------------------------------------------------------
    def on_exception(
        self, exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
    ) -> None:
        if isinstance(exc, (RunDirError, CheckpointError, UsageError)):
            # No attempt can get past this: tell the launcher not to restart.
            exit_fatal(str(exc), self.rank if self.rank is not None else os.getpid())
        if not self.ready:
            self._previous_excepthook(exc_type, exc, tb)
            return
        cause = classify_exception(exc)
        if cause == "collective_error" and peer_lost(exc):
            self._report_collective_error(exc_type, exc, tb)
        else:
            traceback.print_exception(exc_type, exc, tb)
        self.fail(
            cause,
            f"{exc_type.__name__}: {exc}",
            protocol.EXIT_AFTER_FAILURE,
            on_main_thread=True,
        )

    def _report_collective_error(
        self, exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
    ) -> None:
        """A collective that failed because a peer died is the expected
        echo of that failure on every survivor, not a failure of its own:
        one line on the console, the traceback in the worker's log."""
        assert self.events is not None
        where = worker_log(
            Path(self.events.path).parent, self.events.fields.get("attempt"), self.rank
        )
        try:
            where.parent.mkdir(exist_ok=True)
            with open(where, "a") as log:
                # Attempts restart at 0 in each launch: tell their entries apart.
                log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}\n")
                traceback.print_exception(exc_type, exc, tb, file=log)
        except OSError:
            traceback.print_exception(exc_type, exc, tb)  # the console, then
            return
        first = next((line for line in str(exc).splitlines() if line.strip()), "")
        # gloo's messages start with its source location and end in advice
        # meant for the reader of a traceback: keep what happened.
        first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0]
        print(
            f"jitckpt: rank {self.rank}: a collective failed, as it does when a peer fails "
            f"({exc_type.__name__}: {first[:160]}); saving the last completed step; "
            f"details in {where}",
            file=sys.stderr,
            flush=True,
        )

    def on_signal(self, signum: int) -> None:
        self.fail(
            "sigterm",
            f"received signal {signum}",
            protocol.EXIT_SAVED_AND_STOPPED,
            on_main_thread=False,
        )

    def on_peer_failure(self, who: str) -> None:
        self.fail(
            "peer_failure",
            f"rank {who} entered its failure path",
            protocol.EXIT_AFTER_FAILURE,
            on_main_thread=False,
        )

    def on_hang(self, stalled_s: float, timeout_s: float) -> bool:
        """The watchdog fired. Returns True to keep watching (in-process
        recovery of a hung peer is under way), else the process ends."""
        recovery = self.recovery
        if recovery is not None and recovery.pending():
            return True
        assert self.events is not None and self.tracker is not None
        suspects = self._read_suspects()
        described = describe_suspects(suspects)
        if recovery is not None and suspects and self.rank not in suspects:
            # A peer hangs and this rank is healthy: have the launcher kill the
            # peer, which turns the hang into an exit it recovers from in process.
            self.events.emit(
                ev.DETECT,
                cause="hang",
                detail=f"no progress for {stalled_s:.2f} s; suspects: {described}",
                inprocess=True,
                suspects={str(r): kind for r, kind in suspects.items()},
                stalled_s=stalled_s,
                timeout_s=timeout_s,
                median_step_s=self.tracker.median_step_time(),
                **self.tracker.position().as_dict(),
            )
            recovery.request_kill(sorted(suspects))
            return True
        self.fail(
            "hang",
            f"no progress for {stalled_s:.2f} s (timeout {timeout_s:.2f} s); suspects: {described}",
            protocol.EXIT_AFTER_FAILURE,
            on_main_thread=False,
            suspects={str(r): kind for r, kind in suspects.items()},
            stalled_s=stalled_s,
            timeout_s=timeout_s,
        )
        return False

    def _read_suspects(self) -> dict[int, str]:
        """Naming suspects needs the store, whose host may be the node that
        died: bounded, best effort, and never in the way of the save."""
        found: dict[int, str] = {}
        store = self.heartbeat_store
        if store is not None and self.rank is not None:
            rank = self.rank
            reader = threading.Thread(
                target=lambda: found.update(read_suspects(store, self.world_size, rank)),
                name="jitckpt-suspects",
                daemon=True,
            )
            reader.start()
            reader.join(SUSPECTS_DEADLINE_S)
        return dict(found)

    # -- the one exit ------------------------------------------------------------------
    def fail(
        self, cause: str, detail: str, exit_code: int, *, on_main_thread: bool, **extra: Any
    ) -> None:
        assert self.events is not None and self.tracker is not None and self._save is not None
        with self.lock:
            try:
                position = self.tracker.position()
                self.events.emit(
                    ev.DETECT,
                    cause=cause,
                    detail=detail[:500],
                    **position.as_dict(),
                    # For `jitckpt report` and `simulate --from-run`: the step
                    # time, and when the last completed step ended.
                    median_step_s=self.tracker.median_step_time(),
                    since_boundary_s=self.tracker.seconds_since_boundary(),
                    **extra,
                )
                if cause == "cuda_error":
                    # Any copy from the device would fail too: the other ranks
                    # (whose devices are healthy) save.
                    self.events.warn(
                        ev.SAVE_SKIPPED,
                        reason="this process's CUDA context is poisoned; the other ranks save",
                    )
                elif self.ready:
                    # The training thread cannot leave its dirty window while it
                    # runs this very handler, so don't wait for it there.
                    self._save(cause, 0.0 if on_main_thread else None)
                else:
                    self.events.warn(
                        ev.SAVE_SKIPPED, reason="failure before the first step boundary"
                    )
            except BaseException as exc:  # noqa: BLE001 - exiting matters more
                try:
                    self.events.warn(ev.SAVE_FAILED, error=f"{type(exc).__name__}: {exc}")
                except BaseException:  # noqa: BLE001
                    pass
            finally:
                try:
                    self.events.emit(ev.EXIT, code=exit_code)
                    self.events.close()
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(exit_code)
