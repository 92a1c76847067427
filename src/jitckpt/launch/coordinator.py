"""The agent's side of in-process recovery: decide whether a failure can be
recovered without restarting the healthy workers, start the replacement,
and watch the recovery to its end.

The workers' side is jitckpt.inprocess; the two meet only in the store keys
of jitckpt.protocol. A recovery that cannot complete must never leave the
job waiting: one that is not done within ``deadline_s`` (a survivor blocked
in a collective jitckpt cannot wake, a replacement that never arrives) is
abandoned for the restart path, saying which ranks never finished it; the
same rank failing again before it completes the step it was recovered at is
a persistent fault after MAX_SAME_FAULT_TRIES recoveries, not a transient
one, and the restart path takes over too.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from jitckpt import protocol

# In-process recoveries allowed per attempt before the restart path takes
# over: a failure that strikes every replacement again (a bug, not a fault)
# must not loop forever.
MAX_INPROCESS_RECOVERIES = 50
# In-process recoveries of one rank failing again at the same step before
# the restart path takes over: a fault that survives a fresh process (a bad
# batch, a poisoned input) is not transient, and retrying in process would
# only delay the restart.
MAX_SAME_FAULT_TRIES = 2
# How long a recovery may take, from the notice to every rank done, before
# the agent abandons it for the restart path. A fresh replacement starts in
# ~0.1-0.2 s from the warm pool (2-3 s cold, more on a loaded machine) and
# the survivors reach the step's all-reduce within a step time; past this, a
# rank is stuck where no notice reaches it.
RECOVERY_DEADLINE_S = 20.0
# After a recovery, how long the agent holds back work of its own (starting a
# new spare) while the replacement redoes the step, unless every rank has
# completed that step sooner: on a machine with few cores a spare's start
# takes CPU from the redo, the part of the recovery everyone waits for.
REDO_HOLD_S = 5.0


def in_process_refusal(
    *,
    failed_ranks: list[int],
    recovering: int | None,
    replaced: set[int],
    finished: int,
    workers: int,
    fatal: bool,
    recoveries: int,
    not_capable: Callable[[], list[int]],
    repeated: dict[int, tuple[int, int | None]] | None = None,
) -> str | None:
    """Why a failure of ``failed_ranks`` cannot be recovered in process (the
    reason the launcher prints), or None when it can.

    Args:
        recovering: the generation of a recovery under way, if any.
        replaced: the ranks whose replacement joins in that recovery.
        finished: local workers that failed now or finished earlier.
        workers: local workers in all.
        fatal: a worker reported an error no restart can fix.
        recoveries: in-process recoveries in this attempt so far.
        not_capable: the ranks that have not said they can recover in
            process (asked last: it reads the store).
        repeated: rank -> (recoveries of it that did not get past their
            step, that step), for the failed ranks.
    """
    if recovering is not None:
        who = ", ".join(
            f"rank {rank} ({'its replacement' if rank in replaced else 'a survivor'})"
            for rank in sorted(failed_ranks)
        )
        return f"{who} failed during in-process recovery {recovering}"
    if finished >= workers:
        return "no surviving worker"
    if fatal:
        return "a worker reported a fatal error"
    if recoveries >= MAX_INPROCESS_RECOVERIES:
        return f"{MAX_INPROCESS_RECOVERIES} in-process recoveries in this attempt"
    for rank, (tries, step) in sorted((repeated or {}).items()):
        if tries >= MAX_SAME_FAULT_TRIES:
            at = f" at step {step}" if step is not None else ""
            return (
                f"rank {rank} failed again{at} after {tries} in-process recoveries of it: "
                f"a persistent fault, not a transient one"
            )
    missing = not_capable()
    if missing:
        return (
            f"rank(s) {missing} not ready for it (it needs a DDP model, one backward per "
            f"step, and a failure after training started)"
        )
    return None


@dataclass
class Recovery:
    """A recovery under way."""

    generation: int
    replaced: dict[int, int]  # local rank -> global rank of each replaced worker
    began: float  # time.monotonic() of the notice


@dataclass
class Coordinator:
    """The agent's bookkeeping of the in-process recoveries of one attempt.

    Args:
        store: the attempt's keys (jitckpt.protocol.attempt_prefix).
        world_size: ranks of the job.
        deadline_s: how long a recovery may take (RECOVERY_DEADLINE_S).
    """

    store: Any
    world_size: int
    deadline_s: float = RECOVERY_DEADLINE_S
    current: Recovery | None = None
    recoveries: int = 0
    # global rank -> the last generation that replaced it
    last_replaced_in: dict[int, int] = field(default_factory=dict)
    # global rank -> recoveries of it in a row that did not get past their step
    repeats: dict[int, int] = field(default_factory=dict)
    # The last recovery's generation and when it was done (time.monotonic()),
    # until its step is redone (or REDO_HOLD_S passed).
    redoing: tuple[int, float] | None = None

    def repeated(self, ranks: list[int]) -> dict[int, tuple[int, int | None]]:
        """For each failed rank: how many recoveries of it in a row never
        completed the step they resumed at (this failure included), and that
        step. Updates the count."""
        out: dict[int, tuple[int, int | None]] = {}
        for rank in ranks:
            generation = self.last_replaced_in.get(rank)
            step = None
            if generation is not None and not self._progressed(generation):
                self.repeats[rank] = self.repeats.get(rank, 0) + 1
                step = self._step_of(generation)
            else:
                self.repeats[rank] = 0
            out[rank] = (self.repeats[rank], step)
        return out

    def _progressed(self, generation: int, ranks: int = 1) -> bool:
        """At least ``ranks`` ranks completed the step ``generation`` resumed at."""
        key = protocol.INPROC_PROGRESSED_COUNTER.format(generation=generation)
        return int(self.store.add(key, 0)) >= ranks

    def _step_of(self, generation: int) -> int | None:
        key = protocol.INPROC_STEP_KEY.format(generation=generation)
        if not self.store.check([key]):
            return None
        value = self.store.get(key)
        try:
            return int(value.decode())
        except (UnicodeDecodeError, ValueError):
            print(f"jitckpt: ignoring a malformed {key}: {value[:80]!r}", file=sys.stderr)
            return None

    def begin(self, replaced: dict[int, int]) -> int:
        """Publish the notice of a new recovery of the ``replaced`` workers
        (local rank -> global rank); returns its generation."""
        generation = int(self.store.add(protocol.INPROC_GENERATION_COUNTER, 1))
        now = time.time()
        notice = {
            "generation": generation,
            "dead": sorted(replaced.values()),
            "t": now,
            "failure_t": now,  # when this agent saw the exit
        }
        self.store.set(protocol.INPROC_NOTICE_KEY.format(generation=generation), json.dumps(notice))
        self.current = Recovery(generation, dict(replaced), time.monotonic())
        self.recoveries += 1
        for rank in replaced.values():
            self.last_replaced_in[rank] = generation
        return generation

    def assign_spare(self, spare_id: str, rank: int, local_rank: int, generation: int) -> None:
        assignment = {"rank": rank, "local_rank": local_rank, "generation": generation}
        self.store.set(protocol.INPROC_SPARE_KEY.format(spare=spare_id), json.dumps(assignment))

    def check(self) -> str | None:
        """Follow the recovery under way: None while it goes well (or is
        done), else why it is abandoned (past its deadline)."""
        current = self.current
        if current is None:
            return None
        done = protocol.INPROC_DONE_COUNTER.format(generation=current.generation)
        if int(self.store.add(done, 0)) >= self.world_size:
            self.redoing = (current.generation, time.monotonic())
            self.current = None
            return None
        waited = time.monotonic() - current.began
        if waited <= self.deadline_s:
            return None
        missing = [
            rank
            for rank in range(self.world_size)
            if not self.store.check(
                [protocol.INPROC_RANK_DONE_KEY.format(generation=current.generation, rank=rank)]
            )
        ]
        return (
            f"in-process recovery {current.generation} not done after {waited:.0f} s: rank(s) "
            f"{missing} never finished it (blocked in a collective a recovery cannot wake, "
            f"such as a plain torch.distributed call in the step? ckpt.all_reduce is woken)"
        )

    def busy(self) -> bool:
        """A recovery is under way, or its replacement still redoes the step
        it resumed at: the agent's own work can wait (REDO_HOLD_S)."""
        if self.current is not None:
            return True
        if self.redoing is None:
            return False
        generation, done_at = self.redoing
        if time.monotonic() - done_at > REDO_HOLD_S or self._progressed(
            generation, self.world_size
        ):
            self.redoing = None
            return False
        return True

    def interrupted(self, ranks: list[int]) -> int | None:
        """The generation of the recovery under way that the failure of
        ``ranks`` interrupts, or None: a failed rank that had finished its own
        part of the recovery (a replacement that received its state and then
        failed) fails after it, not during it."""
        current = self.current
        if current is None:
            return None
        finished = all(
            self.store.check(
                [protocol.INPROC_RANK_DONE_KEY.format(generation=current.generation, rank=rank)]
            )
            for rank in ranks
        )
        return None if finished else current.generation

    def kill_requests(self, ranks: list[int]) -> list[int]:
        """The ranks a survivor asked to have killed (they hang), among
        ``ranks``; each request is consumed. A request made before the last
        recovery may name a rank that a replacement holds now: only one made
        in the current generation counts."""
        generation = int(self.store.add(protocol.INPROC_GENERATION_COUNTER, 0))
        wanted = []
        for rank in ranks:
            key = protocol.INPROC_KILL_KEY.format(rank=rank)
            if not self.store.check([key]):
                continue
            value = self.store.get(key)
            self.store.delete_key(key)
            try:
                asked_in = protocol.parse_kill_request(value, rank, self.world_size)
            except ValueError as exc:
                print(
                    f"jitckpt: ignoring a malformed request to kill rank {rank}: {exc}",
                    file=sys.stderr,
                    flush=True,
                )
                continue
            if asked_in == generation:
                wanted.append(rank)
        return wanted
