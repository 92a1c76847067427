"""A run's time, phase by phase, and its goodput, from the event log.

Each attempt (one set of worker processes) is cut into consecutive phases:

* startup: its first process starts .. the slowest rank begins its restore
  (imports, process group, model build); a fresh start has no restore;
* restore: .. the slowest rank has loaded the checkpoint (training can
  only start when every rank can take part in the first collective);
* training kept: .. the step boundary of the last step that was kept;
* training lost: .. the failure (work thrown away: the partial iteration,
  or more if an older checkpoint had to be used);
* detection: .. the first survivor notices; save: .. the last JIT copy is
  written; restart: .. the next attempt's first process starts (old
  processes end, the agent restarts the group);
* exit: the end of the last attempt .. the launcher's job_end.

A step is *kept* if no later attempt runs it again: attempt a kept the steps
from where it started up to the smallest step any later attempt resumed
from (the last attempt: up to where it finished, or to its newest save).

Goodput = (sum of the "training kept" phases) / (wall time), wall time being
from the first worker process start to job_end, summed over launches (a job
stopped and submitted again does not count the time between them). Startup,
restore, the lost partial iteration, detection, save and restart are all
non-goodput. The phases of a launch add up to its wall time.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from jitckpt import events as ev
from jitckpt.analysis.summary import attempt_groups, summarize

PHASES = (
    "startup",
    "restore",
    "training kept",
    "training lost",
    "detection",
    "save",
    "restart",
    "exit",
)


@dataclass(frozen=True)
class Phase:
    name: str
    start: float  # absolute time (epoch seconds)
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


def _times(events: list[dict[str, Any]], name: str) -> list[float]:
    return [e["t"] for e in events if e["event"] == name]


def _attempt_start(evs: list[dict[str, Any]]) -> float:
    starts = [
        e["t"] if e.get("process_start") is None else e["process_start"]
        for e in evs
        if e["event"] == ev.START
    ]
    return min(starts or [e["t"] for e in evs])


def _start_step(evs: list[dict[str, Any]]) -> int | None:
    """Step the attempt began at: its restore's, 0 on a fresh start, None
    when no rank got that far."""
    restores = [e for e in evs if e["event"] == ev.RESTORE]
    if restores:
        return int(restores[0]["step"])
    return 0 if any(e["event"] == ev.FRESH_START for e in evs) else None


def _boundary_time(
    evs: list[dict[str, Any]], step: int, start_step: int, loop_start: float, training_end: float
) -> float:
    """When the attempt's loop passed the boundary of ``step``: logged by
    detectors (since_boundary_s) or at the finish; else estimated from the
    median step time, else by sharing the training span among the steps."""
    finishes = [e for e in evs if e["event"] == ev.FINISH and e.get("step") == step]
    if finishes:
        return max(e["t"] for e in finishes)
    if step <= start_step:
        return loop_start
    logged = [
        e["t"] - e["since_boundary_s"]
        for e in evs
        if e["event"] == ev.DETECT
        and e.get("completed") == step
        and e.get("since_boundary_s") is not None
    ]
    if logged:
        estimate = max(logged)  # the step ends when its slowest rank passes it
    else:
        step_times = [e["median_step_s"] for e in evs if e.get("median_step_s")]
        begun = max([int(e["completed"]) for e in evs if e["event"] == ev.DETECT] or [step])
        if step_times:
            estimate = loop_start + (step - start_step) * statistics.median(step_times)
        else:
            share = (step - start_step) / max(1, begun + 1 - start_step)
            estimate = loop_start + share * (training_end - loop_start)
    return min(max(estimate, loop_start), training_end)


def build(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Attempts with their phases, per-failure records (summary.summarize),
    wall time, kept training time and goodput."""
    failures = summarize(events)
    by_group = {f["attempt_group"]: f for f in failures}
    groups = attempt_groups(events)
    job_ends = {e.get("launch"): e["t"] for e in events if e["event"] == ev.JOB_END}
    starts = [_start_step(evs) for evs in groups]
    attempts: list[dict[str, Any]] = []
    walls: dict[Any, list[float]] = {}  # launch -> [first start, end]
    for index, evs in enumerate(groups):
        launch = evs[0].get("launch")
        begin = _attempt_start(evs)
        nxt = groups[index + 1] if index + 1 < len(groups) else None
        same_launch_next = nxt is not None and nxt[0].get("launch") == launch
        launch_end = job_ends.get(launch, max(e["t"] for e in evs))
        end = _attempt_start(nxt) if (nxt is not None and same_launch_next) else launch_end
        failure = by_group.get(index)
        start_step = starts[index]
        loop_marks = _times(evs, ev.RESTORE) + _times(evs, ev.FRESH_START)
        loop_start = max(loop_marks) if loop_marks else None
        restore_begins = [e["t"] - e["duration"] for e in evs if e["event"] == ev.RESTORE]
        finished = [e for e in evs if e["event"] == ev.FINISH]
        if failure is not None:
            training_end = failure["failure_t"]
        elif finished:
            training_end = max(e["t"] for e in finished)
        else:
            training_end = max(e["t"] for e in evs)
        later = [s for s in starts[index + 1 :] if s is not None]
        if later:
            kept_upto = min(later)
        elif finished:
            kept_upto = int(finished[0]["step"])
        else:
            kept_upto = max((int(e["step"]) for e in evs if e["event"] == ev.SAVE), default=-1)
        marks: list[tuple[str, float]] = []
        if loop_start is not None and start_step is not None:
            kept_upto = max(kept_upto, start_step)
            kept_end = _boundary_time(evs, kept_upto, start_step, loop_start, training_end)
            marks += [
                ("startup", max(restore_begins, default=loop_start)),
                ("restore", loop_start),
                ("training kept", kept_end),
                ("training lost", training_end),
            ]
        else:
            marks.append(("startup", training_end))
        if failure is not None:
            detects = _times(evs, ev.DETECT)
            saves = _times(evs, ev.SAVE)
            first_detect = min(detects, default=training_end)
            marks += [
                ("detection", first_detect),
                ("save", max(saves, default=first_detect)),
                ("restart" if same_launch_next else "exit", end),
            ]
        else:
            marks.append(("exit", end))
        phases = _chain(begin, marks)
        attempts.append(
            {
                "attempt": evs[0]["attempt"],
                "launch": launch,
                "start_step": start_step,
                "kept_steps": (kept_upto - start_step) if start_step is not None else 0,
                "failure": failures.index(failure) if failure is not None else None,
                "phases": phases,
            }
        )
        span = walls.setdefault(launch, [begin, end])
        span[0], span[1] = min(span[0], begin), max(span[1], end)
    wall = sum(end - begin for begin, end in walls.values())
    totals = {name: 0.0 for name in PHASES}
    for attempt in attempts:
        for phase in attempt["phases"]:
            totals[phase.name] += phase.duration
    kept = totals["training kept"]
    return {
        "t0": min((a["phases"][0].start for a in attempts), default=0.0),
        "wall_s": wall,
        "kept_training_s": kept,
        "goodput": kept / wall if wall > 0 else None,
        "phase_totals_s": totals,
        "attempts": attempts,
        "failures": failures,
    }


def _chain(begin: float, marks: list[tuple[str, float]]) -> list[Phase]:
    """Consecutive phases ending at each mark; a mark earlier than the one
    before it (clock skew between processes) gives an empty phase."""
    phases = []
    start = begin
    for name, end in marks:
        end = max(start, end)
        phases.append(Phase(name, start, end))
        start = end
    return phases
