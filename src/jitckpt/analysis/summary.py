"""Failure-by-failure summary of a run, computed from its event log.

A failure belongs to the attempt in which it happened; its recovery is the
restore of the next attempt. Durations:

* detection: first detection by a survivor minus the failure (the injected
  fault's time, else the first worker exit the agent saw, else detection);
* save: last JIT save written minus first detection;
* restart: from the last save until the slowest rank of the next attempt
  begins its restore (process spawn, imports, group init, model build);
  ``spawn_s`` is the part until the first new process exists;
* restore: slowest rank's restore in the next attempt;
* recovery: first completed step after the resume minus the failure.

Iterations lost: the highest iteration any rank had begun, plus one, minus
the step resumed from. A failure in iteration i that resumes at i loses one
(the partial iteration i); so does one during i's optimizer step that
resumes at i+1 while survivors had begun i+1.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jitckpt import events as ev
from jitckpt.events import read_events
from jitckpt.storage.rundir import LOGS_DIR


def _first(events: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((e for e in events if e["event"] == name), None)


def attempt_groups(events: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Worker events grouped by attempt, in order of appearance. The key is
    (launch, attempt), launch being the rendezvous run id shared by all
    nodes; a job re-submitted under the same id counts attempts from 0 again,
    so a rank starting twice under one key opens a new group."""
    groups: list[list[dict[str, Any]]] = []
    current: dict[tuple[Any, int], tuple[list[dict[str, Any]], set[Any]]] = {}
    for event in sorted(events, key=lambda e: e.get("t", 0.0)):
        if not isinstance(event.get("attempt"), int):
            continue
        key = (event.get("launch"), event["attempt"])
        group = current.get(key)
        # A replacement that joins in process (jitckpt.inprocess) is not a new attempt.
        restarted = event["event"] == ev.START and not event.get("joined")
        if group is None or (restarted and event.get("rank") in group[1]):
            group = ([], set())
            current[key] = group
            groups.append(group[0])
        if event["event"] == ev.START:
            group[1].add(event.get("rank"))
        group[0].append(event)
    return groups


def _claimed_in_process(events: list[dict[str, Any]]) -> set[int]:
    """Indexes of events that belong to in-process recoveries: everything the
    replaced process logged about its failure, and survivors' in-process
    detections. What is left is the restart path's."""
    claimed = {i for i, e in enumerate(events) if e.get("inprocess")}
    for begin in (e for e in events if e["event"] == ev.INPROC_BEGIN):
        starts = [
            e
            for e in events
            if e["event"] == ev.START
            and e.get("rank") == begin["failed_rank"]
            and e["t"] <= begin["t"]
        ]
        if not starts:
            continue
        pid = starts[-1].get("pid")
        claimed |= {
            i
            for i, e in enumerate(events)
            if e.get("pid") == pid
            and e["event"] in (ev.FAULT_INJECTED, ev.DETECT, ev.SAVE, ev.SAVE_SKIPPED, ev.EXIT)
            and e["t"] <= begin["t"]
        }
    return claimed


def summarize_in_process(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per in-process recovery (group generation). Parts:
    detect (failure until the launcher published the notice), unblock
    (notice until the last survivor left the broken collective), re-form
    (new group), transfer (state and gradients to the ranks behind), redo
    (until every rank completed the step after the recovery)."""
    records = []
    for begin in (e for e in events if e["event"] == ev.INPROC_BEGIN):
        generation = begin["generation"]
        recovered = [
            e
            for e in events
            if e["event"] == ev.INPROC_RECOVERED
            and e["generation"] == generation
            and begin["t"] - 1 <= e["t"]
        ]
        done = [
            e
            for e in events
            if e["event"] == ev.INPROC_STEP_DONE
            and e["generation"] == generation
            and e["t"] >= begin["t"]
        ]
        injected = [
            e
            for e in events
            if e["event"] == ev.FAULT_INJECTED
            and e.get("rank") == begin["failed_rank"]
            and begin["t"] - 30 <= e["t"] <= begin["t"]
        ]
        failure_t = injected[-1]["t"] if injected else begin["t"]
        survivors = [e for e in recovered if e["role"] != "replacement"]
        resumed = max((e["step"] for e in recovered), default=None)
        begun = [e["step"] for e in injected] + ([resumed] if resumed is not None else [])
        complete = len(done) >= len(recovered) > 0
        records.append(
            {
                "generation": generation,
                "fault": injected[-1]["spec"] if injected else None,
                "failed_rank": begin["failed_rank"],
                "replacement": begin["replacement"],
                "replacement_pid": next(
                    (e["pid"] for e in recovered if e["role"] == "replacement"), None
                ),
                "survivor_pids": sorted(e["pid"] for e in survivors),
                "detect_s": begin["t"] - failure_t,
                "unblock_s": max(e["unblocked_t"] for e in survivors) - begin["t"]
                if survivors
                else None,
                "reform_s": max((e["reform_s"] for e in recovered), default=None),
                "transfer_s": max((e["transfer_s"] for e in recovered), default=None),
                "redo_s": max(e["t"] for e in done) - max(e["t"] for e in recovered)
                if complete
                else None,
                "resumed_step": resumed,
                "iterations_lost": max(begun) + 1 - resumed if resumed is not None else None,
                "recovery_s": max(e["t"] for e in done) - failure_t if complete else None,
            }
        )
    return records


def summarize(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Failures that took the restart path."""
    claimed = _claimed_in_process(events)
    events = [e for i, e in enumerate(events) if i not in claimed]
    attempts = attempt_groups(events)
    # Agent events carry no attempt: attach worker failures by time.
    agent_failures = [e for e in events if e["event"] == ev.WORKER_FAILED]
    failures = []
    for index, evs in enumerate(attempts):
        attempt = evs[0]["attempt"]
        detects = [e for e in evs if e["event"] == ev.DETECT]
        injected = [e for e in evs if e["event"] == ev.FAULT_INJECTED]
        if not detects and not injected:
            continue
        attempt_start = min(e["t"] for e in evs)
        attempt_end = max(e["t"] for e in evs)
        nxt = attempts[index + 1] if index + 1 < len(attempts) else []
        next_start = nxt[0]["t"] if nxt else float("inf")
        exits = [e for e in agent_failures if attempt_start <= e["t"] <= next_start]
        candidates = (
            [e["t"] for e in injected] or [e["t"] for e in exits] or [e["t"] for e in detects]
        )
        failure_t = min(candidates)
        # JIT saves only: a periodic save earlier in the attempt is not part
        # of the recovery (with a sharded model that lost a shard it is the
        # only save, and would make the save duration negative).
        saves = [e for e in evs if e["event"] == ev.SAVE and e.get("kind") != "periodic"]
        impossible = _first(evs, ev.JIT_IMPOSSIBLE)
        restores = [e for e in nxt if e["event"] == ev.RESTORE]
        starts = [e["process_start"] or e["t"] for e in nxt if e["event"] == ev.START]
        restore_begins = [e["t"] - e["duration"] for e in restores]
        first_step = _first(nxt, ev.FIRST_STEP_DONE)
        begun = [int(e["completed"]) for e in detects] + [int(e["step"]) for e in injected]
        resumed = restores[0]["step"] if restores else None
        last_save_t = max((e["t"] for e in saves), default=attempt_end)
        record: dict[str, Any] = {
            "attempt": attempt,
            # Which group of attempt_groups() (attempt numbers repeat when a
            # stopped job is submitted again), and when the failure happened.
            "attempt_group": index,
            "failure_t": failure_t,
            "fault": injected[0]["spec"] if injected else None,
            # Ranks that died without jitckpt's orderly exit (survivors that
            # saved and exited are not failures).
            "failed_ranks": sorted(
                {e["failed_rank"] for e in exits}
                - {e["rank"] for e in evs if e["event"] == ev.EXIT}
            )
            or sorted({e["rank"] for e in injected}),
            "detections": [
                {"rank": e["rank"], "cause": e["cause"], "after_s": e["t"] - failure_t}
                for e in detects
            ],
            "detection_s": (min(e["t"] for e in detects) - failure_t) if detects else None,
            "saved_steps": sorted({e["step"] for e in saves}),
            "save_copies": len(saves),
            "save_s": (max(e["t"] for e in saves) - min(e["t"] for e in detects))
            if saves and detects
            else None,
            "restart_s": (max(restore_begins) - last_save_t) if restore_begins else None,
            "spawn_s": (min(starts) - last_save_t) if starts else None,
            "restore_s": max(e["duration"] for e in restores) if restores else None,
            "restored_kind": restores[0]["kind"] if restores else None,
            "resumed_step": resumed,
            "iterations_lost": (max(begun) + 1 - resumed)
            if (begun and resumed is not None)
            else None,
            "recovery_s": (first_step["t"] - failure_t) if first_step else None,
            # Why no JIT checkpoint could be written (a sharded model lost
            # every replica of a shard: jitckpt.checkpoint.sharded).
            "jit_impossible": impossible["reason"] if impossible else None,
        }
        failures.append(record)
    return failures


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def _resumed(step: int | None, lost: int | None) -> str:
    """Where training went on after a failure, never "None": a failure the
    job did not come back from (it gave up, or was stopped) says so."""
    if step is None:
        return "not resumed (no rank restored a state after it)"
    return f"resumed at step {step}, iterations lost: {'-' if lost is None else lost}"


def never_fired(events: list[dict[str, Any]], requested: Sequence[str]) -> list[str]:
    """The fault specs asked for that no rank ever injected in this run
    directory (a spec fires once per run directory, in any launch)."""
    fired = {e.get("spec") for e in events if e["event"] == ev.FAULT_INJECTED}
    return [spec for spec in requested if spec not in fired]


def format_summary(
    run_dir: str | os.PathLike[str], outcome: str | None = None, requested: Sequence[str] = ()
) -> str:
    """The launcher's closing summary. ``requested``: the fault specs of
    ``--inject``/JITCKPT_INJECT, so that one that never fired is said."""
    events = read_events(run_dir)
    failures = summarize(events)
    attempts = len({e["attempt"] for e in events if isinstance(e.get("attempt"), int)})
    lines = [
        f"jitckpt summary for {run_dir}: {outcome or 'run'}, {attempts} attempt(s), {len(failures)} failure(s)"
    ]
    recoveries = summarize_in_process(events)
    if recoveries:
        lines.append(f"  {len(recoveries)} in-process recovery(ies) (survivors kept running):")
    for r in recoveries:
        lines.append(
            f"  recovery {r['generation']}: {r['fault'] or 'worker exit'}, rank {r['failed_rank']} "
            f"replaced by a {r['replacement']} process (pid {r['replacement_pid']})"
        )
        lines.append(
            f"    detect {_fmt(r['detect_s'])}, unblock {_fmt(r['unblock_s'])}, re-form "
            f"{_fmt(r['reform_s'])}, transfer {_fmt(r['transfer_s'])}, redo {_fmt(r['redo_s'])}"
        )
        lines.append(
            f"    {_resumed(r['resumed_step'], r['iterations_lost'])}; "
            f"failure to next completed step {_fmt(r['recovery_s'])}"
        )
    for index, f in enumerate(failures, 1):
        lines.append(
            f"  failure {index} (attempt {f['attempt']}): {f['fault'] or 'detected failure'}"
            + (f", failed rank(s) {f['failed_ranks']}" if f["failed_ranks"] else "")
        )
        causes = ", ".join(f"r{d['rank']}:{d['cause']}" for d in f["detections"])
        lines.append(f"    detection {_fmt(f['detection_s'])} ({causes})")
        lines.append(
            f"    save      {_fmt(f['save_s'])} (step {f['saved_steps'] or '-'}, {f['save_copies']} copies)"
        )
        lines.append(
            f"    restart   {_fmt(f['restart_s'])} (new processes after {_fmt(f['spawn_s'])})"
        )
        restored = (
            f"{f['restored_kind']} checkpoint" if f["restored_kind"] else "no checkpoint restored"
        )
        lines.append(f"    restore   {_fmt(f['restore_s'])} ({restored})")
        lines.append(
            f"    {_resumed(f['resumed_step'], f['iterations_lost'])}; "
            f"failure to next completed step {_fmt(f['recovery_s'])}"
        )
        if f["jit_impossible"]:
            fallback = (
                f"resuming from {f['restored_kind']} checkpoint at step {f['resumed_step']}"
                if f["restored_kind"]
                else "no older checkpoint to resume from"
            )
            lines.append(f"    {f['jit_impossible']}; {fallback}")
    logs = Path(run_dir) / LOGS_DIR
    if failures and logs.is_dir() and any(logs.iterdir()):
        lines.append(
            f"  worker detail (the tracebacks of collectives a failed peer broke): {logs}/"
        )
    for spec in never_fired(events, requested):
        lines.append(
            f"  injected fault {spec} never fired: that rank never reached that phase of "
            f"that step (steps are counted by the loop's ckpt.steps(); is the run that "
            f"long, and is its loop inside ckpt.steps()?)"
        )
    return "\n".join(lines)


def print_summary(
    run_dir: str | os.PathLike[str], outcome: str | None = None, requested: Sequence[str] = ()
) -> None:
    print(format_summary(run_dir, outcome, requested), flush=True)
