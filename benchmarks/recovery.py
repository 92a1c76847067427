"""Recovery time after a rank failure: jitckpt's restart path against torchrun
with periodic checkpoints, in one command.

    python benchmarks/recovery.py                  # 5 drills per mode, about 7 minutes
    python benchmarks/recovery.py --quick          # 1 drill per mode, fewer steps (about 1.5 min)
    python benchmarks/recovery.py --json out.json  # also write every raw number
    python benchmarks/recovery.py --jitckpt-arg=--no-warm-pool   # cold worker starts
    python benchmarks/recovery.py --inprocess      # in-process recovery: 10 drills per mode, ~10 min

What it measures. Each *drill* is one real 4-rank job of the example GPT
(examples/train_gpt.py, 0.87M parameters, DDP over gloo, AdamW) in a fresh
run directory, in which rank 2 fails once; the drill measures the time from
that failure to the first training step completed after the job resumed.
Modes, one drill of each per round (rounds interleave the modes, so a change
in the machine's load touches all of them alike):

* ``jitckpt-kill``: ``jitckpt run --standalone --nproc-per-node 4 --inject
  kill@step=S,rank=2,phase=backward examples/train_gpt.py``: rank 2 SIGKILLs
  itself in the backward of step S;
* ``jitckpt-hang``: the same with ``hang@...``: rank 2 stops making progress
  (and ignores SIGTERM) in the backward of step S, so only jitckpt's watchdog
  can notice;
  both run ``jitckpt run`` with its default options (which fork workers
  from a warm process when jitckpt.launch.warmpool exists) plus any --jitckpt-arg;
* ``torchrun-periodic-kill``: the baseline, plain ``torch.distributed.run
  --max-restarts 3`` running benchmarks/periodic_baseline.py (the same model,
  data and optimizer; rank 0 torch.saves a checkpoint every --save-every
  steps; every rank resumes from the newest one). This script SIGKILLs rank 2
  as soon as it has logged step K-1 done, i.e. early in step K, placed in the
  middle of a checkpoint interval (the average case).

The first two modes take the restart path (``--recovery restart``). With
``--inprocess`` (or by name in ``--modes``), four more modes SIGKILL rank 2
in the backward of step S as above:

* ``jitckpt-restart-det-kill``: deterministic mode, ``--recovery restart``,
  the restart path;
* ``jitckpt-inproc-spare-kill``: deterministic mode, ``--spares 1``: the
  survivors keep running and a hot spare takes rank 2 (jitckpt.inprocess);
* ``jitckpt-inproc-default-spare-kill``: the same in the default mode;
* ``jitckpt-inproc-fresh-kill``: deterministic mode, no spare: a fresh
  process (forked from the warm pool) takes rank 2.

An in-process drill measures from the fault (``fault_injected``) to the
step after the recovery completed by every rank (``inproc_step_done``), with
jitckpt.analysis.summary's parts: detect (until the agent's notice), unblock (until
the last survivor left the broken all-reduce), re-form and transfer (the
slowest rank's), redo (the step redone, until the last rank completed the
next one). Goals on this machine: with a hot spare, end to end <= the
drill's median step time + 0.15 s, and the parts before the redo (failure
until the last rank recovered, ``before_redo_s``) <= 0.1 s; a fresh spawn,
end to end <= 3 s. A drill fails if the failure took the restart path or the replacement was not
of the mode's kind.

The parts of a recovery, on one wall clock (every process logs time.time()),
telescoping so that they add up exactly to the end-to-end time:

* detection: failure -> first rank that notices (jitckpt ``detect`` event);
  for a kill, ring neighbours' collective errors or the launcher's SIGTERM,
  for a hang, the watchdog's stall timeout;
* save: first detection -> last JIT checkpoint written (``save`` events);
* teardown: last save -> the agent's ``restart`` event ends, i.e. the agent
  saw the exits, stopped what was left (a hung rank gets --term-grace), held
  the rendezvous and spawned the new workers;
* startup: end of the agent's restart -> the last new rank begins its
  restore (python and torch imports, process group, model, optimizer and
  loader construction, JitCheckpoint set-up);
* restore: that moment -> the last rank has restored (choice of the
  checkpoint by rank 0, read, verify, load);
* first step: -> the first rank completes the first step after the resume
  (``first_step_done``).

detection, save and end-to-end (``recovery_s``) are jitckpt.analysis.summary's
numbers; its ``restart_s`` equals teardown + startup. Its ``restore_s`` (the
slowest rank's own restore duration, in the raw JSON) differs from the part
above, which runs from the last rank's restore start to the last rank's
restore end so that the parts add up. The baseline has no detection and no
save (nothing is saved at the failure: torchrun notices the exit within its
0.1 s monitor interval, SIGTERMs the rest and restarts all): its teardown
runs from the SIGKILL to the creation of the last new worker process, and
its startup, restore and first step are measured the same way from
benchmarks/periodic_baseline.py's log.

Iterations lost: the step in progress at the failure, plus one, minus the
step resumed from (jitckpt: 1; the baseline: the steps since its last
periodic checkpoint plus the partial one). ``regain`` is the time until the
step in progress at the failure is completed again, which charges the
baseline for recomputing what it lost (jitckpt, losing one iteration,
regains at its first step).

How to read it: the table gives per mode the median of every part over the
successful drills, the end-to-end median with min..max, and the goal:
jitckpt kill <= 5 s end to end; jitckpt hang <= the detection timeout + 5 s
(the timeout is ``timeout_s`` of the hang ``detect`` events: max(1.5 s, 4 x
the median step time)). The detail below it gives min / median / max of
every part. On this 2-CPU machine one 4-rank launch costs 5-10 s, most of it
process start, so startup dominates; other 4-rank jobs running at the same
time slow imports and steps alike: the report prints the load average, and
runs on a busy machine should be compared only with each other.

Cleanup: every process the benchmark starts carries a unique
JITCKPT_BENCH_TAG in its environment (torchrun's workers run in sessions of
their own, so a process group kill would miss them); after every drill, and
on any failure, Ctrl-C or SIGTERM, every process with that tag is SIGKILLed
by pid. No other process is touched.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import (
    BASELINE_LOG,
    BASELINE_WORKER,
    EXAMPLE,
    INPROC_PARTS,
    DrillError,
    Job,
    baseline_breakdown,
    jit_breakdown,
    kill_rank_at,
    kill_tagged,
    read_records,
    source_state,
    standalone_launch,
)
from recovery_report import aggregate, report

from jitckpt import events as ev

NPROC = 4
FAIL_RANK = 2
FAIL_PHASE = "backward"
# Goals of the project: a kill costs at most 5 s end to end; a hang at most
# the detection timeout plus the same 5 s.
KILL_GOAL_S = 5.0
HANG_GOAL_MARGIN_S = 5.0
DEFAULT_DRILLS = 5


@dataclass(frozen=True)
class Plan:
    """Steps of each drill. jitckpt fails at ``fail_step`` (enough completed
    steps for the watchdog's median step time) and runs ``steps_after`` more
    steps, so the job finishes soon after the resume and its exit status
    shows that the resume worked. The baseline is killed in step
    ``baseline_kill_step``, half a checkpoint interval after its last save,
    and ends one step after redoing it."""

    fail_step: int
    steps_after: int
    save_every: int
    baseline_kill_step: int


# Default: about 15-20 s per jitckpt drill and 40-60 s per baseline drill
# (its cold restart and 11 lost steps): 3 x 5 drills took 6.8 minutes at a
# load average of 6-8 on 2 CPUs.
DEFAULT_PLAN = Plan(fail_step=10, steps_after=3, save_every=20, baseline_kill_step=30)
# --quick: 1 drill per mode, about 90 s in all (2 min on a busy machine).
QUICK_PLAN = Plan(fail_step=5, steps_after=2, save_every=4, baseline_kill_step=6)
# Bound of one drill's job; a job still running after it counts as failed.
DEFAULT_DRILL_TIMEOUT_S = 240.0

# In-process recovery (jitckpt.inprocess; its parts are harness.INPROC_PARTS):
# goals on this machine. With a hot spare: end to end within one step time
# (the drill's median step) plus SPARE_GOAL_OVER_STEP_S, and the parts before
# the redo (failure until the last rank recovered) within
# BEFORE_REDO_GOAL_S; a fresh spawn: end to end.
SPARE_GOAL_OVER_STEP_S = 0.15
BEFORE_REDO_GOAL_S = 0.1
FRESH_GOAL_S = 3.0
INPROCESS_DRILLS = 10


@dataclass(frozen=True)
class Mode:
    name: str
    label: str
    fault: str | None  # jitckpt --inject kind; None for the baseline
    # More `jitckpt run` options, and the example's --deterministic.
    launch: tuple[str, ...] = ()
    deterministic: bool = False
    # Measured as an in-process recovery with this kind of replacement.
    replacement: str | None = None
    goal_s: float | None = None  # end to end; None: one step + SPARE_GOAL_OVER_STEP_S


MODES = (
    # The restart path (in-process recovery, the default where it applies,
    # has modes of its own below).
    Mode("jitckpt-kill", "jitckpt kill", "kill", ("--recovery", "restart")),
    Mode("jitckpt-hang", "jitckpt hang", "hang", ("--recovery", "restart")),
    Mode("torchrun-periodic-kill", "torchrun+periodic kill", None),
    # --inprocess: the same kill, in deterministic mode, through the restart
    # path and the in-process one; and in process in the default mode.
    Mode(
        "jitckpt-restart-det-kill",
        "jitckpt restart (det)",
        "kill",
        ("--recovery", "restart"),
        deterministic=True,
    ),
    Mode(
        "jitckpt-inproc-spare-kill",
        "in-process, hot spare",
        "kill",
        ("--spares", "1"),
        deterministic=True,
        replacement="spare",
    ),
    Mode(
        "jitckpt-inproc-default-spare-kill",
        "in-process, default mode",
        "kill",
        ("--spares", "1"),
        replacement="spare",
    ),
    Mode(
        "jitckpt-inproc-fresh-kill",
        "in-process, fresh spawn",
        "kill",
        ("--spares", "0"),
        deterministic=True,
        replacement="fresh",
        goal_s=FRESH_GOAL_S,
    ),
)
# Without --modes or --inprocess: the first three, as before.
DEFAULT_MODES = ("jitckpt-kill", "jitckpt-hang", "torchrun-periodic-kill")
INPROCESS_MODES = (
    "jitckpt-restart-det-kill",
    "jitckpt-inproc-spare-kill",
    "jitckpt-inproc-default-spare-kill",
    "jitckpt-inproc-fresh-kill",
)


# -- jitckpt drills -------------------------------------------------------------------
def run_jit_job(
    mode: Mode, plan: Plan, run_dir: Path, tag: str, timeout_s: float, launch_args: Sequence[str]
) -> Job:
    """One `jitckpt run` of the example with the mode's fault; raises
    DrillError unless it ends with status 0."""
    spec = f"{mode.fault}@step={plan.fail_step},rank={FAIL_RANK},phase={FAIL_PHASE}"
    command = standalone_launch(
        "jitckpt",
        NPROC,
        "--inject",
        spec,
        *mode.launch,
        *launch_args,
        str(EXAMPLE),
        "--steps",
        str(plan.fail_step + plan.steps_after),
        "--run-dir",
        str(run_dir / "run"),
        *(["--deterministic"] if mode.deterministic else []),
    )
    job = Job(command, tag, run_dir / "output.log")
    try:
        code = job.wait(time.monotonic() + timeout_s)
        if code != 0:
            raise DrillError(f"jitckpt run exited with status {code}")
    except DrillError as exc:
        raise DrillError(f"{exc}\n{job.output_tail()}") from None
    finally:
        job.close()
    return job


def _params_m(output: str) -> float | None:
    params = re.search(r"GPT with ([\d.]+)M parameters", output)
    return float(params.group(1)) if params else None


def jit_drill(
    mode: Mode, plan: Plan, run_dir: Path, tag: str, timeout_s: float, launch_args: Sequence[str]
) -> dict[str, Any]:
    from jitckpt.analysis.summary import summarize
    from jitckpt.events import read_events

    job = run_jit_job(mode, plan, run_dir, tag, timeout_s, launch_args)
    events = read_events(run_dir / "run")
    failures = summarize(events)
    if len(failures) != 1:
        raise DrillError(f"expected 1 failure in the event log, found {len(failures)}")
    failure = failures[0]
    breakdown = jit_breakdown(events, failure)
    lost = failure["iterations_lost"]
    goal = (
        KILL_GOAL_S
        if mode.fault == "kill"
        else (breakdown["hang_timeout_s"] or 0.0) + HANG_GOAL_MARGIN_S
    )
    output = job.output_tail(10**6)
    return {
        "parts": breakdown["parts"],
        "recovery_s": failure["recovery_s"],
        "iterations_lost": lost,
        # Resumed at the failed step: its first step is the failed one redone.
        "regain_s": failure["recovery_s"] if lost == 1 else None,
        "goal_s": goal,
        "hang_timeout_s": breakdown["hang_timeout_s"],
        "extra": breakdown["extra"],
        "summary": failure,
        "params_m": _params_m(output),
        # Workers fall back to a cold start, with one such line, when the
        # launcher's warm process pool cannot serve them.
        "warm_pool_messages": sorted(set(re.findall(r"^jitckpt\.warmpool: .*$", output, re.M))),
    }


def inproc_drill(
    mode: Mode, plan: Plan, run_dir: Path, tag: str, timeout_s: float, launch_args: Sequence[str]
) -> dict[str, Any]:
    """An in-process recovery: from the fault (``fault_injected``) to the
    last rank's completion of the step after the recovery
    (``inproc_step_done``), with jitckpt.analysis.summary's parts (they overlap a
    little: re-form and transfer are each the slowest rank's)."""
    from jitckpt.analysis.summary import summarize, summarize_in_process
    from jitckpt.events import read_events

    job = run_jit_job(mode, plan, run_dir, tag, timeout_s, launch_args)
    events = read_events(run_dir / "run")
    if summarize(events):
        reasons = [e.get("reason") for e in events if e["event"] == ev.INPROC_FALLBACK]
        raise DrillError(f"the failure took the restart path ({reasons})")
    recoveries = summarize_in_process(events)
    if len(recoveries) != 1 or recoveries[0]["recovery_s"] is None:
        raise DrillError(f"expected 1 complete in-process recovery, found {recoveries}")
    record = recoveries[0]
    if record["replacement"] != mode.replacement:
        raise DrillError(
            f"replacement was a {record['replacement']} process, not {mode.replacement}"
        )
    output = job.output_tail(10**6)
    step_s = statistics.median(
        e["median_step_s"] for e in events if e["event"] == ev.FINISH and e.get("median_step_s")
    )
    return {
        "parts": {part: record[f"{part}_s"] for part in INPROC_PARTS},
        "recovery_s": record["recovery_s"],
        # The parts before the redo, without their overlaps: from the
        # failure until the last rank recovered.
        "before_redo_s": record["recovery_s"] - record["redo_s"],
        "step_s": step_s,
        "iterations_lost": record["iterations_lost"],
        "regain_s": record["recovery_s"] if record["iterations_lost"] == 1 else None,
        "goal_s": mode.goal_s if mode.goal_s is not None else step_s + SPARE_GOAL_OVER_STEP_S,
        "hang_timeout_s": None,
        "extra": {},
        "summary": record,
        "params_m": _params_m(output),
        "warm_pool_messages": sorted(set(re.findall(r"^jitckpt\.warmpool: .*$", output, re.M))),
    }


# -- baseline drills ------------------------------------------------------------------
def baseline_drill(
    mode: Mode, plan: Plan, run_dir: Path, tag: str, timeout_s: float, launch_args: Sequence[str]
) -> dict[str, Any]:
    # One step past the killed one, which the restarted job must redo (regain).
    steps = plan.baseline_kill_step + 2
    command = standalone_launch(
        "torch.distributed.run",
        NPROC,
        "--max-restarts",
        "3",
        str(BASELINE_WORKER),
        "--steps",
        str(steps),
        "--run-dir",
        str(run_dir / "run"),
        "--save-every",
        str(plan.save_every),
    )
    log = run_dir / "run" / BASELINE_LOG
    job = Job(command, tag, run_dir / "output.log")
    deadline = time.monotonic() + timeout_s
    try:
        t_fail = kill_rank_at(job, log, plan.baseline_kill_step, deadline, FAIL_RANK)
        code = job.wait(deadline)
        if code != 0:
            raise DrillError(f"torchrun exited with status {code}")
    except DrillError as exc:
        raise DrillError(f"{exc}\n{job.output_tail()}") from None
    finally:
        job.close()
    result = baseline_breakdown(read_records(log), t_fail)
    result.update(
        goal_s=None, hang_timeout_s=None, summary=None, params_m=None, warm_pool_messages=[]
    )
    return result


# -- main -----------------------------------------------------------------------------
def run_drills(
    args: argparse.Namespace, plan: Plan, workdir: Path, tag: str
) -> list[dict[str, Any]]:
    runners: dict[str, Callable[..., dict[str, Any]]] = {
        mode.name: (
            inproc_drill if mode.replacement else jit_drill if mode.fault else baseline_drill
        )
        for mode in MODES
    }
    selected = [mode for mode in MODES if mode.name in args.modes]
    total = args.drills * len(selected)
    drills: list[dict[str, Any]] = []
    for index in range(args.drills):
        for mode in selected:
            run_dir = workdir / f"{mode.name}-{index}"
            run_dir.mkdir(parents=True)
            record: dict[str, Any] = {
                "mode": mode.name,
                "drill": index,
                "load_avg_before": os.getloadavg()[0],
            }
            started = time.monotonic()
            try:
                record.update(
                    runners[mode.name](mode, plan, run_dir, tag, args.timeout, args.jitckpt_arg)
                )
                record.update(ok=True, error=None)
            except DrillError as exc:
                record.update(ok=False, error=str(exc))
            except Exception:  # a drill that broke the analysis must not lose the others
                record.update(ok=False, error=traceback.format_exc())
            finally:
                kill_tagged(tag)
            record["wall_s"] = time.monotonic() - started
            drills.append(record)
            outcome = (
                f"recovery {record['recovery_s']:.2f} s, {record['iterations_lost']} lost"
                if record["ok"]
                else "FAILED: " + record["error"].splitlines()[0]
            )
            print(
                f"[{len(drills)}/{total}] {mode.label} #{index + 1}: {outcome} "
                f"(drill {record['wall_s']:.0f} s, load {record['load_avg_before']:.1f})",
                flush=True,
            )
    return drills


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--drills", type=int, help=f"drills per mode (default {DEFAULT_DRILLS}; --quick: 1)"
    )
    parser.add_argument("--quick", action="store_true", help="1 drill per mode, fewer steps")
    parser.add_argument("--json", type=Path, help="write every raw number to this file")
    parser.add_argument(
        "--modes",
        default=None,
        help="comma-separated subset of "
        + ", ".join(mode.name for mode in MODES)
        + f" (default: {', '.join(DEFAULT_MODES)})",
    )
    parser.add_argument(
        "--inprocess",
        action="store_true",
        help="in-process recovery against the restart path, on examples/train_gpt.py "
        f"--deterministic: modes {', '.join(INPROCESS_MODES)} (with --modes: added to them), "
        f"{INPROCESS_DRILLS} drills per mode unless --drills",
    )
    parser.add_argument(
        "--save-every",
        type=int,
        help=f"baseline: steps between periodic checkpoints (default {DEFAULT_PLAN.save_every})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_DRILL_TIMEOUT_S,
        help=f"seconds one drill may take (default {DEFAULT_DRILL_TIMEOUT_S:.0f})",
    )
    parser.add_argument(
        "--jitckpt-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra option for `jitckpt run` in the jitckpt drills (repeatable), e.g. "
        "--jitckpt-arg=--no-warm-pool",
    )
    parser.add_argument(
        "--keep-runs", action="store_true", help="keep the run directories and logs"
    )
    args = parser.parse_args(argv)
    if args.drills is None:
        args.drills = 1 if args.quick else INPROCESS_DRILLS if args.inprocess else DEFAULT_DRILLS
    if args.drills < 1:
        parser.error("--drills must be at least 1")
    if args.modes is None:
        names = [] if args.inprocess else list(DEFAULT_MODES)
    else:
        names = [name.strip() for name in args.modes.split(",") if name.strip()]
    if args.inprocess:
        names += [name for name in INPROCESS_MODES if name not in names]
    args.modes = names
    unknown = set(args.modes) - {mode.name for mode in MODES}
    if unknown or not args.modes:
        parser.error(f"--modes: unknown {sorted(unknown)}" if unknown else "--modes is empty")
    if args.save_every is not None and args.save_every < 1:
        parser.error("--save-every must be at least 1")
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    plan = QUICK_PLAN if args.quick else DEFAULT_PLAN
    if args.save_every is None:
        return plan
    # Keep the kill half an interval after the last periodic checkpoint.
    kill = args.save_every + max(1, args.save_every // 2)
    return Plan(plan.fail_step, plan.steps_after, args.save_every, kill)


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    # A SIGTERM to the benchmark must still run the cleanup below.
    signal.signal(signal.SIGTERM, _terminate)
    tag = uuid.uuid4().hex
    source_before = source_state()
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="jitckpt-recovery-"))
    try:
        drills = run_drills(args, plan, workdir, tag)
    except KeyboardInterrupt:
        print("recovery: interrupted", file=sys.stderr)
        return 130
    finally:
        leftovers = kill_tagged(tag)
        if leftovers:
            print(f"recovery: killed leftover processes {leftovers}", file=sys.stderr)
        if not args.keep_runs:
            shutil.rmtree(workdir, ignore_errors=True)
    result: dict[str, Any] = {
        "config": {
            "nproc": NPROC,
            "fail_rank": FAIL_RANK,
            "fail_phase": FAIL_PHASE,
            "drills": args.drills,
            "quick": args.quick,
            "fail_step": plan.fail_step,
            "steps_after": plan.steps_after,
            "save_every": plan.save_every,
            "baseline_kill_step": plan.baseline_kill_step,
            "jitckpt_args": args.jitckpt_arg,
            "modes": args.modes,
            "kill_goal_s": KILL_GOAL_S,
            "hang_goal_margin_s": HANG_GOAL_MARGIN_S,
            "before_redo_goal_s": BEFORE_REDO_GOAL_S,
        },
        "source": source_state(),
        "source_at_start": source_before,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "drills": drills,
    }
    result["modes"] = aggregate(drills, MODES)
    result["wall_s"] = time.monotonic() - started
    result["load_avg_before"], result["load_avg_after"] = load_before, os.getloadavg()[0]
    print(report(result, MODES))
    if result["source"] != source_before or result["source"].endswith("-dirty"):
        print(
            f"\nnote: measured an edited working tree (git describe {source_before} at the start, "
            f"{result['source']} at the end); other edits during the run may be mixed in"
        )
    messages = sorted({m for d in drills for m in d.get("warm_pool_messages") or []})
    for message in messages:
        print(f"note: a jitckpt drill printed: {message}")
    busiest = max([load_before, *(d["load_avg_before"] for d in drills)])
    print(
        f"\nwall time {result['wall_s']:.0f} s; 1-min load average {load_before:.1f} at the "
        f"start, {result['load_avg_after']:.1f} at the end, at most {busiest:.1f} before a "
        f"drill, on {os.cpu_count()} CPUs (a drill's own 4 ranks add about 4; more means other "
        "jobs shared the cores and the times are inflated)",
        flush=True,
    )
    if args.keep_runs:
        print(f"run directories and logs kept in {workdir}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0 if all(d["ok"] for d in drills) else 1


if __name__ == "__main__":
    sys.exit(main())
