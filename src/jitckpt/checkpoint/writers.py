"""Who writes the JIT checkpoint of a sharded model (FSDP2, HSDP).

In DDP every rank holds the whole state, so any survivor can write it alone.
Here a rank holds one shard, so a JIT checkpoint needs, for every shard
index, one surviving rank that holds it at the same step. After a failure
the survivors agree on such a set through the c10d store (never through a
collective on the broken group): each posts the step of its clean state,
the first to post decides (:func:`choose_writers`) and publishes the
writers, and the writers form a fresh group among themselves and save with
DCP (docs/platform.md, "Saving after a failed collective": a new group with
``use_local_synchronization`` works after a peer died, ``dcp.save`` on the
broken default group does not). When no rank holds some shard any more
(FSDP without replicas, a whole replica group lost with its peer), no JIT
checkpoint can exist: the ranks say so and the job resumes from the
periodic backstop (docs/promises.md, P6).

A rank is usable as a writer when it is alive (it posted within
REPORT_WINDOW_S) and its state is clean: sharded parameters and optimizer
state change only in optimizer.step(), and a collective that failed
mid-flight (all-gather, reduce-scatter, all-reduce) only ever writes the
unsharded or gradient buffers, never them. A rank that raised inside its own
optimizer step is dirty and does not post.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from jitckpt import protocol
from jitckpt.detect.watchdog import read_suspects
from jitckpt.state.mesh import MeshLayout

# The longest the deciding rank collects the survivors' reports before it
# chooses the writers. It stops as soon as every rank has posted or is dead
# (its heartbeat stale: jitckpt.detect.watchdog, about 1 s after its death).
# Survivors detect a failure at different times: ring neighbours of a dead
# rank within milliseconds, others when the launcher's SIGTERM reaches them
# (0.1-0.2 s: docs/platform.md, "How the elastic agent reacts to a worker
# exit") and after SIGTERM a rank first lets its loop reach the next step
# boundary (up to 1 s or 3 step times, jitckpt.checkpoint.saver).
REPORT_WINDOW_S = 10.0
# How often the decider looks at the posts and heartbeats meanwhile.
REPORT_POLL_S = 0.05
# How long a survivor waits for the decision; bounds a decider that died.
DECISION_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Decision:
    """The writers of a JIT checkpoint (``step`` set), or why there is none."""

    step: int | None
    writers: list[int]
    reason: str | None = None
    lost_shard: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "writers": self.writers,
            "reason": self.reason,
            "lost_shard": self.lost_shard,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Decision:
        return cls(data["step"], list(data["writers"]), data.get("reason"), data.get("lost_shard"))


def choose_writers(layout: MeshLayout, reports: dict[int, int]) -> Decision:
    """Pick one reporting rank per shard, all at the same step, the newest
    step for which every shard has one. ``reports``: rank -> completed steps
    of its clean state. Ranks of the replica with the most reporters come
    first (fewest replica groups in the writers' group)."""
    for step in sorted(set(reports.values()), reverse=True):
        ready = {rank for rank, done in reports.items() if done == step}
        order = sorted(range(layout.replicas), key=lambda r: (-len(ready & set(layout.grid[r])), r))
        writers = []
        for shard in range(layout.shards):
            holder = next(
                (layout.grid[r][shard] for r in order if layout.grid[r][shard] in ready), None
            )
            if holder is None:
                break
            writers.append(holder)
        else:
            return Decision(step, sorted(writers))
    lost = [s for s in range(layout.shards) if not set(layout.holders(s)) & set(reports)]
    if lost:
        return Decision(None, [], f"no surviving replica of shard {lost[0]}", lost[0])
    steps = {
        s: sorted({reports[r] for r in layout.holders(s) if r in reports})
        for s in range(layout.shards)
    }
    return Decision(
        None,
        [],
        "the surviving replicas hold their shards at different steps "
        + ", ".join(f"shard {s} at step {'/'.join(map(str, v))}" for s, v in steps.items())
        + " (a failure between the last gradient reduction of one shard and another's)",
    )


def announce(store: Any, rank: int) -> None:
    """Say at once that this rank is alive and will post (it may first wait
    for its loop to reach a step boundary): the decider waits for it even if
    its heartbeat stops (a rank whose loop was unwound by an exception stops
    its heartbeat thread). The first to announce also sets protocol.FAILURE_KEY, which
    brings the peers that noticed nothing into the save (jitckpt.detect.watchdog)."""
    store.set(f"{protocol.SHARDED_KEY}/coming/{rank}", "1")
    store.compare_set(protocol.FAILURE_KEY, "", str(rank))


def agree_on_writers(
    store: Any, layout: MeshLayout, rank: int, step: int | None
) -> tuple[Decision, bool]:
    """Post this rank's clean step (None: nothing to offer), wait for the
    decision and return it, with whether this rank decided. Only the store
    is used: it lives in the launcher, not in any peer."""
    world = sum(len(row) for row in layout.grid)
    if step is not None:
        store.set(f"{protocol.SHARDED_KEY}/report/{rank}", str(step))
    store.add(f"{protocol.SHARDED_KEY}/posted", 1)
    decider = store.compare_set(f"{protocol.SHARDED_KEY}/decider", "", str(rank)).decode() == str(
        rank
    )
    if decider:
        deadline = time.monotonic() + REPORT_WINDOW_S
        while time.monotonic() < deadline and not _all_accounted(store, world, rank):
            time.sleep(REPORT_POLL_S)
        reports = {
            r: int(store.get(f"{protocol.SHARDED_KEY}/report/{r}").decode())
            for r in range(world)
            if store.check([f"{protocol.SHARDED_KEY}/report/{r}"])
        }
        decision = choose_writers(layout, reports)
        store.set(
            f"{protocol.SHARDED_KEY}/decision",
            json.dumps(dict(decision.as_dict(), reports=reports)),
        )
        return decision, True
    store.wait([f"{protocol.SHARDED_KEY}/decision"], timedelta(seconds=DECISION_TIMEOUT_S))
    return Decision.from_dict(
        json.loads(store.get(f"{protocol.SHARDED_KEY}/decision").decode())
    ), False


def _all_accounted(store: Any, world: int, rank: int) -> bool:
    """Every rank has posted, or is dead by its heartbeat and never said it
    would post."""
    if store.add(f"{protocol.SHARDED_KEY}/posted", 0) >= world:
        return True
    posted = {r for r in range(world) if store.check([f"{protocol.SHARDED_KEY}/report/{r}"])}
    coming = {r for r in range(world) if store.check([f"{protocol.SHARDED_KEY}/coming/{r}"])}
    dead = {r for r, kind in read_suspects(store, world, rank).items() if kind == "dead"}
    return posted | (dead - coming) >= set(range(world))
