"""In-process recovery: survivors keep running, one process replaces the dead rank.

The launcher (jitckpt.agent) sees a worker exit and publishes a *notice* for
the next group generation in the store; it starts a replacement (a hot spare
or a fresh process) for the dead rank only. On every survivor a watcher
thread reads the notice and wakes the training thread, which is waiting in
the deterministic all-reduce hook (jitckpt.comm) on a gloo call that will
never return (nothing cancels it: PLATFORM.md). The training thread then,
inside the hook:

1. keeps the broken group alive and forms a new default group over
   ``PrefixStore(.../gen_G)`` with the replacement at the dead rank's index
   (``new_group`` cannot: it needs a working default group). The old group is
   dropped later by a background thread: its destructor waits for the
   pending gloo call (PLATFORM.md, rule 2);
2. exchanges positions: each survivor says which step's all-reduce it waits
   for. Healthy ranks are at most one all-reduce apart (the next one needs
   everybody). The most advanced consistent step wins: a rank one behind
   receives the reduced gradient it missed from the lowest rank ahead, the
   replacement receives the whole state (model, optimizer, scheduler, data
   position) of that step from the same rank, point to point, nobody else;
3. reduces the gradient of the step in flight on the new group. The
   replacement redoes that step from its start (``steps()`` begins there).

DDP keeps its object: its reducer is pointed at a private placeholder group
(it needs one only for its bucket-rebuild broadcast, which the canonical
all-reduce makes irrelevant: the reduced buffer does not depend on the bucket
layout), and its ``process_group`` at the new group (buffer broadcasts).
"""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from jitckpt import distributed
from jitckpt.comm import NOTICE_TIMEOUT_S
from jitckpt.events import EventLog
from jitckpt.state.training import TrainingState, decode
from jitckpt.tracker import StepTracker

# Set by `jitckpt run` when in-process recovery is on (see the launcher).
ENABLED_ENV = "JITCKPT_INPROCESS"

# Store keys under the attempt's prefix (jitckpt.distributed.attempt_store).
GENERATION_COUNTER = "inproc/generation"
NOTICE_KEY = "inproc/notice/{generation}"
CAPABLE_KEY = "inproc/capable/{rank}"
DONE_COUNTER = "inproc/done/{generation}"
SPARE_KEY = "inproc/spare/{spare}"
KILL_KEY = "inproc/kill/{rank}"

# The watcher's store wait is cut into slices this long so that it notices a
# stop request (end of training) and never sits in a store call at exit.
WATCH_SLICE = timedelta(seconds=0.5)
# How long the old group is kept before the background thread drops it:
# long enough for every peer to have re-formed (their old connections close,
# which ends our pending gloo call instead of waiting for the group timeout).
RELEASE_DELAY_S = 1.0
# How long the end of training waits for the graveyard (RELEASE_DELAY_S and
# the drops: ~1.0-1.1 s after the last recovery here).
SETTLE_TIMEOUT_S = 10.0
# A position meaning "no state at all" (a replacement).
NO_STATE = -1


def placeholder_group() -> dist.ProcessGroup:
    """A one-rank group that never communicates (jitckpt.detached)."""
    from jitckpt.inprocess.detached import DetachedGroup

    return DetachedGroup(0, 1)


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
    """Holds abandoned groups and pending work and drops them from a
    background thread, never from the training thread (PLATFORM.md, rule 2).

    ``on_release(what, held_s, drop_s)`` is called after each drop: how long
    the item was held (from ``keep`` to the end of its drop) and how long the
    drop itself blocked (a gloo group's destructor waits for its pending
    call, which ends once the peers have closed their old connections)."""

    def __init__(self, on_release: Any = None) -> None:
        self._items: list[tuple[float, float, Any]] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._on_release = on_release or (lambda what, held_s, drop_s: None)

    def keep(self, item: Any) -> None:
        now = time.monotonic()
        with self._lock:
            self._items.append((now + RELEASE_DELAY_S, now, item))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._release, name="jitckpt-graveyard", daemon=True
                )
                self._thread.start()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def _release(self) -> None:
        while True:
            with self._lock:
                if not self._items:
                    self._thread = None
                    return
                due, _, _ = self._items[0]
            time.sleep(max(0.0, due - time.monotonic()))
            with self._lock:
                _, kept, item = self._items[0]
            what = type(item[0] if isinstance(item, tuple) else item).__name__
            dropping = time.monotonic()
            # The list's reference is the last one: the drop happens here and
            # may block until the pending gloo call ends.
            with self._lock:
                self._items.pop(0)
            del item
            done = time.monotonic()
            try:
                self._on_release(what, done - kept, done - dropping)
            except Exception:  # noqa: BLE001 - a report must not stop the releases
                pass

    def join(self, timeout: float) -> bool:
        """Wait until everything kept is dropped (or ``timeout``); True if so."""
        deadline = time.monotonic() + timeout
        while True:
            thread = self._thread
            if thread is None or not thread.is_alive():
                return len(self) == 0
            thread.join(max(0.0, deadline - time.monotonic()))
            if time.monotonic() >= deadline:
                return len(self) == 0 and not thread.is_alive()


class InProcessRecovery:
    """One rank's side of in-process recovery (see the module docstring).

    Args:
        rank, world_size: this rank's place in the job.
        model: the DistributedDataParallel model.
        state: what the replacement receives.
        tracker: the loop's step tracker (boundary snapshot of the source).
        events: the event log.
        pause_watchdog, resume_watchdog: hang detection is suspended while a
            recovery runs (a fresh replacement takes seconds to start).
        inject: the fault injector's ``at(phase, step)``; its ``recovery``
            phase fires once the new group has exchanged positions, before
            any state moves (a failure during the recovery itself).
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        model: torch.nn.Module,
        state: TrainingState,
        tracker: StepTracker,
        events: EventLog,
        pause_watchdog: Any,
        resume_watchdog: Any,
        inject: Any = None,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.model = model
        self.state = state
        self.tracker = tracker
        self.events = events
        self._pause_watchdog = pause_watchdog
        self._resume_watchdog = resume_watchdog
        self._inject = inject or (lambda phase, step: None)
        self.generation = 0
        self._cond = threading.Condition()
        self._notice: dict[str, Any] | None = None
        self._waiters: set[threading.Event] = set()
        self._graveyard = Graveyard(
            lambda what, held_s, drop_s: events.emit(
                "inproc_released", what=what, held_s=held_s, drop_s=drop_s
            )
        )
        self._placeholder: dist.ProcessGroup | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._recovered_at_step: int | None = None
        self._reducer_stale = False
        # Groups replaced by a recovery, held until nothing but the graveyard
        # refers to them.
        self._retired: list[dist.ProcessGroup] = []
        self.recoveries = 0

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        """Say this rank can recover in process and start watching for notices
        (those after the generation this rank joined)."""
        store = distributed.attempt_store()
        store.set(CAPABLE_KEY.format(rank=self.rank), "1")
        self._watcher = threading.Thread(
            target=self._watch, args=(distributed.side_store(),), name="jitckpt-inproc", daemon=True
        )
        self._watcher.start()

    def settle(self, timeout: float = SETTLE_TIMEOUT_S) -> dict[str, int]:
        """At the end of training, before anything stops: wait for the
        graveyard to drop what it holds, then count this process's threads
        and fds (compare with the ``resources`` event at the start)."""
        released = self._graveyard.join(timeout)
        return {**resource_counts(), "graveyard_left": 0 if released else len(self._graveyard)}

    def stop(self, join_timeout: float = 2.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._watcher is not None and self._watcher.is_alive():
            self._watcher.join(join_timeout)
        self._graveyard.join(join_timeout)

    def _watch(self, store: dist.Store) -> None:
        while not self._stop.is_set():
            with self._cond:
                # One notice at a time: the next is for the next generation.
                self._cond.wait_for(lambda: self._notice is None or self._stop.is_set())
                key = NOTICE_KEY.format(generation=self.generation + 1)
            if self._stop.is_set():
                return
            try:
                store.wait([key], WATCH_SLICE)
                notice = json.loads(store.get(key).decode())
            except Exception:  # noqa: BLE001 - a timeout slice, or a store that is gone
                continue
            notice["seen"] = time.time()
            self._pause_watchdog()
            self.events.emit("inproc_notice", generation=notice["generation"], dead=notice["dead"])
            with self._cond:
                self._notice = notice
                waiters = list(self._waiters)
                self._cond.notify_all()
            for event in waiters:
                event.set()

    # -- called by the all-reduce hook (jitckpt.comm) ----------------------------------
    def pending(self) -> bool:
        return self._notice is not None

    def add_waiter(self, event: threading.Event) -> None:
        with self._cond:
            self._waiters.add(event)
            if self._notice is not None:
                event.set()

    def remove_waiter(self, event: threading.Event) -> None:
        with self._cond:
            self._waiters.discard(event)

    def wait_notice(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._notice is not None, timeout)

    def request_kill(self, ranks: list[int]) -> None:
        """Ask the launcher to kill hung peers (jitckpt.agent serves it)."""
        store = distributed.attempt_store()
        for rank in ranks:
            store.set(KILL_KEY.format(rank=rank), json.dumps({"generation": self.generation}))

    def all_reduce(self, tensor: torch.Tensor, op: Any) -> bool:
        """A collective the script makes in its step (JitCheckpoint.all_reduce):
        waited for from Python like the gradient all-reduce, so a recovery
        wakes it. Reduces a private copy and copies back only on success
        (PLATFORM.md, rule 3); returns False, the tensor unchanged, when a
        recovery interrupts it: the loop goes on to the next all-reduce,
        where the recovery takes place."""
        if self.pending():
            return False
        flat = tensor.detach().clone()
        woken = threading.Event()
        self.add_waiter(woken)
        try:
            work = dist.all_reduce(flat, op=op, group=dist.group.WORLD, async_op=True)
            done = work.get_future()  # type: ignore[union-attr]
            done.add_done_callback(lambda _, woken=woken: woken.set())
            woken.wait()
        finally:
            self.remove_waiter(woken)
        if done.done():
            try:
                done.wait()
            except Exception:
                if not self.wait_notice(NOTICE_TIMEOUT_S):
                    raise
            else:
                tensor.copy_(flat)
                return True
        self.abandon((work, done, flat))
        self.events.emit("inproc_collective_abandoned", kind="all_reduce")
        return False

    def abandon(self, leftover: Any) -> None:
        self._graveyard.keep(leftover)

    def recover(self, step: int, last_reduced: torch.Tensor | None) -> torch.Tensor | None:
        """A survivor's recovery, from inside the all-reduce of ``step``.
        Returns the reduced gradient of ``step`` if a peer had it already
        (this rank was one behind), else None: reduce on the new group."""
        notice = self._notice
        assert notice is not None
        unblocked = time.time()
        reform_s = self._reform(int(notice["generation"]), replacement=False)
        started = time.monotonic()
        positions = self._positions(step)
        target = max(positions)
        self._inject("recovery", target)
        source = positions.index(target)
        received: torch.Tensor | None = None
        sent = 0
        if self.rank == source:
            for peer, position in enumerate(positions):
                if position == NO_STATE:
                    sent += self._send_state(peer, target)
                elif position < target:
                    if last_reduced is None:
                        raise RuntimeError("in-process recovery: no reduced gradient to send")
                    dist.send(last_reduced, peer)
                    sent += last_reduced.numel() * last_reduced.element_size()
        elif positions[self.rank] < target:
            received = torch.empty_like(last_reduced) if last_reduced is not None else None
            if received is None:
                raise RuntimeError("in-process recovery: behind without a gradient buffer")
            dist.recv(received, source)
        role = "source" if self.rank == source else "behind" if received is not None else "survivor"
        self._finish(notice, role, target, unblocked, reform_s, time.monotonic() - started, sent)
        return received

    # -- a replacement joining ---------------------------------------------------------
    def join(self, notice: dict[str, Any]) -> int:
        """Join generation ``notice["generation"]`` as the dead rank's
        replacement and receive the state; returns the step to start from."""
        generation = int(notice["generation"])
        key = NOTICE_KEY.format(generation=generation)
        notice = {**json.loads(distributed.attempt_store().get(key).decode()), **notice}
        self.generation = generation - 1
        self._notice = notice
        notice.setdefault("seen", time.time())
        self._pause_watchdog()
        unblocked = time.time()
        reform_s = self._reform(int(notice["generation"]), replacement=True)
        started = time.monotonic()
        positions = self._positions(NO_STATE)
        target = max(positions)
        if target == NO_STATE:
            raise RuntimeError("in-process recovery: no rank has a state to send")
        self._inject("recovery", target)
        source = positions.index(target)
        received = self._receive_state(source)
        self._finish(
            notice, "replacement", target, unblocked, reform_s, time.monotonic() - started, received
        )
        return target

    # -- the steps -------------------------------------------------------------------
    def _reform(self, generation: int, replacement: bool) -> float:
        started = time.monotonic()
        old = dist.group.WORLD
        if old is not None:
            self._retired.append(old)
        distributed.form_group(generation, self.rank, self.world_size)
        ddp = self.model
        if isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            # The reducer is re-pointed at the next step boundary: this runs
            # inside its comm hook, under the reducer's own lock.
            self._reducer_stale = not replacement
            ddp.process_group = dist.group.WORLD  # type: ignore[assignment]
        del old
        if not self._reducer_stale:
            self._bury_retired()
        return time.monotonic() - started

    def _bury_retired(self) -> None:
        while self._retired:
            self._graveyard.keep(self._retired.pop())

    def _positions(self, step: int) -> list[int]:
        mine = torch.tensor([step], dtype=torch.int64)
        gathered = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine)
        return [int(t.item()) for t in gathered]

    def _send_state(self, peer: int, step: int) -> int:
        snapshot = self.tracker.boundary_snapshot or {}
        payload = self.state.capture(step, self.rank, snapshot)
        data = torch.frombuffer(payload.to_bytearray(), dtype=torch.uint8)
        dist.send(torch.tensor([data.numel()], dtype=torch.int64), peer)
        dist.send(data, peer)
        return data.numel()

    def _receive_state(self, source: int) -> int:
        size = torch.zeros(1, dtype=torch.int64)
        dist.recv(size, source)
        data = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.recv(data, source)
        payload = decode(data.numpy().tobytes(), f"state from rank {source}")
        self.state.restore(payload, f"state from rank {source}")
        return data.numel()

    def _finish(
        self,
        notice: dict[str, Any],
        role: str,
        step: int,
        unblocked: float,
        reform_s: float,
        transfer_s: float,
        nbytes: int,
    ) -> None:
        generation = int(notice["generation"])
        self.events.emit(
            "inproc_recovered",
            generation=generation,
            role=role,
            step=step,
            dead=notice.get("dead"),
            failure_t=notice.get("failure_t"),
            notice_t=notice.get("t"),
            seen_t=notice.get("seen"),
            unblocked_t=unblocked,
            reform_s=reform_s,
            transfer_s=transfer_s,
            bytes=nbytes,
        )
        distributed.attempt_store().add(DONE_COUNTER.format(generation=generation), 1)
        self.recoveries += 1
        self._recovered_at_step = step
        with self._cond:
            self.generation = generation
            self._notice = None
            self._cond.notify_all()
        self._resume_watchdog()

    def on_boundary(self, step: int) -> None:
        """Called at every step boundary, outside backward."""
        if self._reducer_stale:
            # The reducer's reference would keep the broken group alive for
            # good; its only remaining use of a group is the bucket-rebuild
            # broadcast, which a one-rank placeholder satisfies (a
            # replacement's reducer was built on its own placeholder).
            if self._placeholder is None:
                self._placeholder = placeholder_group()
            self.model.reducer._update_process_group(self._placeholder)  # type: ignore[operator, union-attr]
            self._reducer_stale = False
            self._bury_retired()
        if self._recovered_at_step is not None and step == self._recovered_at_step + 1:
            self.events.emit(
                "inproc_step_done", generation=self.generation, step=step, **resource_counts()
            )
            self._recovered_at_step = None


def applies(model: torch.nn.Module, *, deterministic: bool, uses_store: bool) -> bool:
    """In-process recovery is on for this rank: the launcher enabled it and
    the all-reduce goes through the deterministic hook it relies on."""
    return (
        os.environ.get(ENABLED_ENV) == "1"
        and deterministic
        and uses_store
        and isinstance(model, torch.nn.parallel.DistributedDataParallel)
    )


def joining() -> dict[str, Any] | None:
    """For a spare (after its assignment) or a fresh replacement: the rank it
    takes and the generation it joins; None for an ordinary worker."""
    role = distributed.role()
    if role == "replacement":
        return {
            "rank": int(os.environ["RANK"]),
            "generation": int(os.environ[distributed.JOIN_GENERATION_ENV]),
        }
    if role != "spare":
        return None
    assignment = await_spare_assignment()
    return {"rank": int(assignment["rank"]), "generation": int(assignment["generation"])}


_assignment: dict[str, Any] | None = None


def await_spare_assignment() -> dict[str, Any]:
    """A hot spare blocks here until the launcher assigns it a rank (once:
    jitckpt.init_process_group waits, JitCheckpoint reads the answer); RANK
    and LOCAL_RANK then say the rank it takes."""
    global _assignment
    if _assignment is not None:
        return _assignment
    spare = os.environ[distributed.SPARE_ID_ENV]
    control = os.environ.get("JITCKPT_CONTROL_DIR")
    if control:
        # Listed with the workers, so that a node fault kills spares too.
        Path(control, "pids").mkdir(exist_ok=True)
        Path(control, "pids", f"spare-{spare}").write_text(str(os.getpid()))
    assignment = await_assignment(spare)
    os.environ["RANK"] = str(assignment["rank"])
    os.environ["LOCAL_RANK"] = str(assignment["local_rank"])
    if control:
        Path(control, "pids", f"spare-{spare}").unlink(missing_ok=True)
    _assignment = assignment
    return assignment


def await_assignment(spare: str) -> dict[str, Any]:
    """Wait for the launcher's assignment of spare ``spare`` in the store."""
    store = distributed.attempt_store()
    key = SPARE_KEY.format(spare=spare)
    while True:
        try:
            store.wait([key], timedelta(seconds=60))
            break
        except Exception:  # noqa: BLE001 - no failure yet: keep waiting
            continue
    return dict(json.loads(store.get(key).decode()))
