"""In-process recovery: survivors keep running, one process replaces the dead rank.

The launcher (jitckpt.launch.agent) sees a worker exit and publishes a *notice* for
the next group generation in the store; it starts a replacement (a hot spare
or a fresh process) for the dead rank only. On every survivor a watcher
thread reads the notice and wakes the training thread, which is waiting in
the deterministic all-reduce hook (jitckpt.comm) on a gloo call that will
never return (nothing cancels a pending gloo call:
docs/platform.md). The training thread then,
inside the hook:

1. keeps the broken group alive and forms a new default group over
   ``PrefixStore(.../gen_G)`` with the replacement at the dead rank's index
   (``new_group`` cannot: it needs a working default group). The old group is
   dropped later by a background thread: its destructor waits for the
   pending gloo call (jitckpt.inprocess.graveyard);
2. exchanges positions: each survivor says where it waits (a step's
   forward-time buffer broadcast or its all-reduce). Healthy ranks are at
   most one all-reduce apart (the next one needs everybody). The most
   advanced position wins: a rank behind receives what it would otherwise
   wait for from peers past it (the reduced gradient it missed, the buffers
   of a forward broadcast the others left: TransferPlan) from the lowest
   rank ahead, the replacement receives the whole state (model, optimizer,
   scheduler, data position) of that step from the same rank, point to
   point, nobody else;
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
import sys
import threading
import time
from typing import Any, Protocol

import torch
import torch.distributed as dist

from jitckpt import attempt, compat, process_exit, protocol
from jitckpt import events as ev
from jitckpt.comm import interruptible_all_reduce
from jitckpt.detect import signals
from jitckpt.events import EventLog
from jitckpt.inprocess.graveyard import (
    SETTLE_TIMEOUT_S,
    Graveyard,
    quiet_abandoned_loops,
    resource_counts,
)
from jitckpt.inprocess.plan import NO_STATE, plan_transfer
from jitckpt.state import rng
from jitckpt.state.training import TrainingState, decode
from jitckpt.tracker import StepTracker

# The launcher signals the survivors when it publishes a notice
# (protocol.NOTICE_SIGNAL); the watcher also looks at the store this often,
# should a signal ever not arrive (one cheap check, no blocking store call,
# so it never sits in one at exit).
WATCH_FALLBACK_S = 1.0


def placeholder_group() -> dist.ProcessGroup:
    """A one-rank group that never communicates (jitckpt.inprocess.detached)."""
    from jitckpt.inprocess.detached import DetachedGroup

    return DetachedGroup(0, 1)


def form_group(generation: int, rank: int, world_size: int) -> None:
    """Make the default group a new one, over keys private to ``generation``,
    with the script's backend and options. The caller keeps a reference to
    the old group: destroying the registry entry is instant, dropping a gloo
    group with pending work is not (jitckpt.inprocess.graveyard)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    backend, extra = attempt.group_settings()
    store = dist.PrefixStore(
        protocol.generation_prefix(attempt.prefix(), generation), attempt.base_store()
    )
    dist.init_process_group(  # type: ignore[call-overload]
        backend, store=store, rank=rank, world_size=world_size, **extra
    )


class ForwardBuffers(Protocol):
    """The buffers of a step's forward-time broadcast, sent to a rank that
    reaches that forward after the others left it (jitckpt.comm.BufferBroadcast)."""

    def send(self, step: int, peers: list[int]) -> int: ...
    def receive(self, step: int, source: int) -> None: ...


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
                ev.INPROC_RELEASED, what=what, held_s=held_s, drop_s=drop_s
            )
        )
        self._placeholder: dist.ProcessGroup | None = None
        # The model's buffers as DDP's forward-time broadcast leaves them,
        # when it has any (jitckpt.comm.BufferBroadcast): ranks behind the
        # others' forward receive them in a recovery (TransferPlan.buffers_to).
        self.forward_buffers: ForwardBuffers | None = None
        self._stop = threading.Event()
        # Set by the launcher's notice signal (and at stop).
        self._poke = threading.Event()
        self._watcher: threading.Thread | None = None
        self._recovered_at_step: int | None = None
        self._broadcast_paused = False
        self._reducer_stale = False
        # Groups replaced by a recovery, held until nothing but the graveyard
        # refers to them.
        self._retired: list[dist.ProcessGroup] = []
        self.recoveries = 0
        # A replacement's received state, to load once more after a
        # fast-forward through the script's own code (Restorer.load_again).
        self.load_again: Any = None
        self._withdrawn = False
        # Futures of abandoned collectives (jitckpt.process_exit).
        self._abandoned: list[Any] = []
        process_exit.register(self.unsafe_to_finalize)

    # -- lifecycle ------------------------------------------------------------------
    def withdraw(self, reason: str) -> None:
        """This rank can no longer recover in process (``reason``): a failure
        from now on takes the restart path, and the launcher says why."""
        if self._withdrawn:
            return
        self._withdrawn = True
        attempt.store().delete_key(protocol.INPROC_CAPABLE_KEY.format(rank=self.rank))
        self.events.emit(ev.INPROC_WITHDRAWN, reason=reason)
        if self.rank == 0:
            print(
                f"jitckpt: in-process recovery is off for this job from here on: {reason}; a "
                f"failure restarts every worker from the JIT checkpoint",
                file=sys.stderr,
                flush=True,
            )

    def start(self) -> None:
        """Say this rank can recover in process and start watching for notices
        (those after the generation this rank joined)."""
        store = attempt.store()
        store.set(protocol.INPROC_CAPABLE_KEY.format(rank=self.rank), "1")
        self._watcher = threading.Thread(
            target=self._watch, args=(attempt.side_store(),), name="jitckpt-inproc", daemon=True
        )
        self._watcher.start()
        signals.set_notice_callback(self._poke.set)

    def settle(self, timeout: float = SETTLE_TIMEOUT_S) -> dict[str, int]:
        """At the end of training, before anything stops: wait for the
        graveyard to drop what it holds, then count this process's threads
        and fds (compare with the ``resources`` event at the start)."""
        deadline = time.monotonic() + timeout
        released = self._graveyard.join(timeout)
        # An abandoned call ends (with an error) once its peers drop the old
        # group, about RELEASE_DELAY_S after the recovery; until then its
        # future pins that group and its threads. Wait for them, then let go.
        while self.unsafe_to_finalize() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._drop_ended()
        return {**resource_counts(), "graveyard_left": 0 if released else len(self._graveyard)}

    def stop(self, join_timeout: float = 2.0) -> None:
        signals.set_notice_callback(None)
        self._stop.set()
        self._poke.set()
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
                key = protocol.INPROC_NOTICE_KEY.format(generation=self.generation + 1)
            self._poke.wait(WATCH_FALLBACK_S)
            self._poke.clear()
            if self._stop.is_set():
                return
            try:
                if not store.check([key]):
                    continue
                notice = json.loads(store.get(key).decode())
            except Exception:  # noqa: BLE001 - a store that is gone: try again
                continue
            notice["seen"] = time.time()
            # Every group alive now includes the dead rank: abandoned.
            quiet_abandoned_loops()
            self._pause_watchdog()
            self.events.emit(ev.INPROC_NOTICE, generation=notice["generation"], dead=notice["dead"])
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
        """Ask the launcher to kill hung peers (jitckpt.launch.agent serves it)."""
        store = attempt.store()
        for rank in ranks:
            store.set(
                protocol.INPROC_KILL_KEY.format(rank=rank),
                protocol.kill_request(self.generation, self.rank),
            )

    def all_reduce(self, tensor: torch.Tensor, op: Any) -> bool:
        """A collective the script makes in its step (JitCheckpoint.all_reduce),
        woken by a recovery like the gradient all-reduce
        (jitckpt.comm.interruptible_all_reduce). Returns False, the tensor
        unchanged, when a recovery interrupts it: the loop goes on to the next
        all-reduce, where the recovery takes place."""
        if self.pending():
            return False
        reduced = interruptible_all_reduce(self, tensor, op)
        if reduced is None:
            self.events.emit(ev.INPROC_COLLECTIVE_ABANDONED, kind="all_reduce")
            return False
        tensor.copy_(reduced)
        return True

    def abandon(self, futures: list[Any], leftover: Any) -> None:
        """Take what an interrupted collective leaves: ``futures`` carry
        jitckpt's Python callbacks and may still fail at any time (watched
        until the process ends: jitckpt.process_exit); ``leftover`` (the work
        and its buffers) goes to the graveyard."""
        self._drop_ended()
        with self._cond:
            self._abandoned += futures
        self._graveyard.keep(leftover)

    def _drop_ended(self) -> None:
        """Let go of abandoned calls that ended: a kept future pins its group."""
        with self._cond:
            self._abandoned = [f for f in self._abandoned if not f.done()]

    def unsafe_to_finalize(self) -> bool:
        """True while an abandoned call may still fail (and run a Python
        callback on gloo's thread): see jitckpt.process_exit."""
        with self._cond:
            return any(not future.done() for future in self._abandoned)

    def recover(self, position: int, last_reduced: torch.Tensor | None) -> torch.Tensor | None:
        """A survivor's recovery, from where it waits (``position``: the
        forward of a step, or the reduction of its gradients). Returns the
        reduced gradient of that step if a peer had it already (this rank
        was one all-reduce behind), else None: do the collective again on
        the new group."""
        notice = self._notice
        assert notice is not None
        unblocked = time.time()
        reform_s = self._reform(int(notice["generation"]), replacement=False)
        started = time.monotonic()
        plan = plan_transfer(self._positions(position))
        self._inject("recovery", plan.step)
        received: torch.Tensor | None = None
        sent = 0
        if self.rank == plan.source:
            for peer in plan.replacements:
                sent += self._send_state(peer, plan.step)
            for peer in plan.gradient_to:
                if last_reduced is None:
                    raise RuntimeError("in-process recovery: no reduced gradient to send")
                dist.send(last_reduced, peer)
                sent += last_reduced.numel() * last_reduced.element_size()
            if plan.buffers_to and self.forward_buffers is not None:
                sent += self.forward_buffers.send(plan.step, plan.buffers_to)
        elif self.rank in plan.gradient_to:
            if last_reduced is None:
                raise RuntimeError("in-process recovery: behind without a gradient buffer")
            received = torch.empty_like(last_reduced)
            dist.recv(received, plan.source)
        if self.rank in plan.buffers_to and self.forward_buffers is not None:
            self.forward_buffers.receive(plan.step, plan.source)
        role = plan.role(self.rank)
        self._finish(notice, role, plan.step, unblocked, reform_s, time.monotonic() - started, sent)
        return received

    # -- a replacement joining ---------------------------------------------------------
    def join(self, notice: dict[str, Any]) -> int:
        """Join generation ``notice["generation"]`` as the dead rank's
        replacement and receive the state; returns the step to start from."""
        generation = int(notice["generation"])
        key = protocol.INPROC_NOTICE_KEY.format(generation=generation)
        notice = {**json.loads(attempt.store().get(key).decode()), **notice}
        self.generation = generation - 1
        self._notice = notice
        notice.setdefault("seen", time.time())
        self._pause_watchdog()
        unblocked = time.time()
        reform_s = self._reform(int(notice["generation"]), replacement=True)
        started = time.monotonic()
        plan = plan_transfer(self._positions(NO_STATE))
        self._inject("recovery", plan.step)
        received = self._receive_state(plan.source)
        if plan.at_reduce:
            self._skip_redo_broadcast()
        self._finish(
            notice,
            "replacement",
            plan.step,
            unblocked,
            reform_s,
            time.monotonic() - started,
            received,
        )
        return plan.step

    # -- the steps -------------------------------------------------------------------
    def _reform(self, generation: int, replacement: bool) -> float:
        started = time.monotonic()
        old = dist.group.WORLD
        if old is not None:
            self._retired.append(old)
        form_group(generation, self.rank, self.world_size)
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

    def _skip_redo_broadcast(self) -> None:
        """The replacement redoes a step whose forward the survivors are
        past: its DDP must not broadcast buffers at that forward (nobody
        would meet it there), and need not: it received the buffers as that
        broadcast left them (jitckpt.state.buffers). From the next step on
        everyone broadcasts again."""
        ddp = self.model
        if isinstance(ddp, torch.nn.parallel.DistributedDataParallel) and ddp.broadcast_buffers:
            ddp.broadcast_buffers = False
            self._broadcast_paused = True

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
        # Received straight into the buffer the archive is decoded from (its
        # tensors are views of it): no copy between the wire and load_state_dict.
        buffer = bytearray(int(size.item()))
        data = torch.frombuffer(buffer, dtype=torch.uint8)
        dist.recv(data, source)
        where = f"state from rank {source}"
        payload = decode(buffer, where)
        self.state.restore(payload, where)
        # The source's generator state is its own: copying it would give two
        # ranks the same dropout masks. As on a restore: a stream derived from
        # (seed, step, rank). (Deterministic mode reseeds at every boundary.)
        rng.reseed(torch.initial_seed(), int(payload["step"]), self.rank)

        def load_again() -> None:  # as Restorer.load_again
            self.state.restore(payload, where, data=False)
            rng.reseed(torch.initial_seed(), int(payload["step"]), self.rank)

        self.load_again = load_again
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
            ev.INPROC_RECOVERED,
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
        store = attempt.store()
        if role == "source":
            store.set(protocol.INPROC_STEP_KEY.format(generation=generation), str(step))
        store.set(protocol.INPROC_RANK_DONE_KEY.format(generation=generation, rank=self.rank), "1")
        store.add(protocol.INPROC_DONE_COUNTER.format(generation=generation), 1)
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
            compat.repoint_reducer(self.model, self._placeholder)
            self._reducer_stale = False
            self._bury_retired()
        if self._broadcast_paused and (
            self._recovered_at_step is None or step > self._recovered_at_step
        ):
            self.model.broadcast_buffers = True  # type: ignore[assignment]  # the redone step is over
            self._broadcast_paused = False
        if self._recovered_at_step is not None and step == self._recovered_at_step + 1:
            # The step the recovery resumed at is done: a failure from here on
            # is not the same fault again (jitckpt.launch.coordinator).
            attempt.store().add(
                protocol.INPROC_PROGRESSED_COUNTER.format(generation=self.generation), 1
            )
            self.events.emit(
                ev.INPROC_STEP_DONE, generation=self.generation, step=step, **resource_counts()
            )
            self._recovered_at_step = None


def applies(model: torch.nn.Module, *, uses_store: bool) -> bool:
    """In-process recovery is on for this rank: the launcher enabled it, the
    job has a store, and the model is DDP (whose reduction jitckpt then
    does itself: jitckpt.comm.ChunkedAllreduce), in either mode."""
    return (
        os.environ.get(protocol.INPROCESS_ENV) == "1"
        and uses_store
        and isinstance(model, torch.nn.parallel.DistributedDataParallel)
    )
