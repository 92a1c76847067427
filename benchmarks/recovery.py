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
  from a warm process when jitckpt.warmpool exists) plus any --jitckpt-arg;
* ``torchrun-periodic-kill``: the baseline, plain ``torch.distributed.run
  --max-restarts 3`` running benchmarks/periodic_baseline.py (the same model,
  data and optimizer; rank 0 torch.saves a checkpoint every --save-every
  steps; every rank resumes from the newest one). This script SIGKILLs rank 2
  as soon as it has logged step K-1 done, i.e. early in step K, placed in the
  middle of a checkpoint interval (the average case).

With ``--inprocess`` (or by name in ``--modes``), three more modes run the
example with ``--deterministic`` (in-process recovery needs it), rank 2
SIGKILLed in the backward of step S as above:

* ``jitckpt-restart-det-kill``: ``--recovery restart``, the restart path;
* ``jitckpt-inproc-spare-kill``: ``--spares 1``: the survivors keep running
  and a hot spare takes rank 2 (jitckpt.inprocess);
* ``jitckpt-inproc-fresh-kill``: no spare: a fresh process (forked from the
  warm pool) takes rank 2.

An in-process drill measures from the fault (``fault_injected``) to the
step after the recovery completed by every rank (``inproc_step_done``), with
jitckpt.summary's parts: detect (until the agent's notice), unblock (until
the last survivor left the broken all-reduce), re-form and transfer (the
slowest rank's), redo (the step redone, until the last rank completed the
next one). Goals on this machine: hot spare <= 0.5 s, fresh spawn <= 3 s. A
drill fails if the failure took the restart path or the replacement was not
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

detection, save and end-to-end (``recovery_s``) are jitckpt.summary's
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
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import source_state, standalone_launch

from jitckpt import proctag

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "train_gpt.py"
BASELINE_WORKER = Path(__file__).resolve().parent / "periodic_baseline.py"
BASELINE_LOG = "baseline.jsonl"  # periodic_baseline.LOG_FILE
TAG_VAR = "JITCKPT_BENCH_TAG"

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
# How often the baseline's log is polled for the step to kill in.
POLL_INTERVAL_S = 0.01
# Rounds of SIGKILL over the tagged processes during cleanup (an agent killed
# mid-restart may have spawned a worker after the first scan).
KILL_ROUNDS = 20

JIT_PARTS = ("detection", "save", "teardown", "startup", "restore", "first_step")
PART_LABELS = {
    "detection": "detect",
    "save": "save",
    "teardown": "teardown",
    "startup": "startup",
    "restore": "restore",
    "first_step": "1st step",
}


# In-process recovery (jitckpt.inprocess): parts as jitckpt.summary's
# summarize_in_process names them; goals on this machine, end to end.
INPROC_PARTS = ("detect", "unblock", "reform", "transfer", "redo")
INPROC_LABELS = {
    "detect": "detect",
    "unblock": "unblock",
    "reform": "re-form",
    "transfer": "transfer",
    "redo": "redo",
}
SPARE_GOAL_S = 0.5
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
    goal_s: float | None = None


MODES = (
    Mode("jitckpt-kill", "jitckpt kill", "kill"),
    Mode("jitckpt-hang", "jitckpt hang", "hang"),
    Mode("torchrun-periodic-kill", "torchrun+periodic kill", None),
    # --inprocess: the same kill, in deterministic mode (which in-process
    # recovery needs), through the restart path and the in-process one.
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
        goal_s=SPARE_GOAL_S,
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
    "jitckpt-inproc-fresh-kill",
)


def parts_of(mode: Mode) -> tuple[str, ...]:
    return INPROC_PARTS if mode.replacement else JIT_PARTS


class DrillError(RuntimeError):
    """A drill that did not produce a measurement (the job failed or hung)."""


# -- processes ------------------------------------------------------------------------
def tagged_pids(tag: str) -> list[int]:
    """Processes whose environment carries this benchmark's tag."""
    return proctag.tagged_pids(TAG_VAR, tag)


def kill_tagged(tag: str) -> list[int]:
    """SIGKILL every process with the tag, by pid, until none is left."""
    return proctag.kill_tagged(TAG_VAR, tag, rounds=KILL_ROUNDS)


class Job:
    """One launcher process (and, through the tag, everything it starts),
    output to a log file."""

    def __init__(
        self, command: list[str], tag: str, log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.tag = tag
        self.log_path = log_path
        env = dict(os.environ, **(env or {}))
        env[TAG_VAR] = tag
        # Temporary files of the launcher (its control directory, the warm
        # pool's socket) go to the drill's directory, which the benchmark
        # removes, also when it had to SIGKILL the launcher.
        scratch = log_path.parent / "tmp"
        scratch.mkdir(exist_ok=True)
        env["TMPDIR"] = str(scratch)
        env.setdefault("OMP_NUM_THREADS", "1")
        env["PYTHONUNBUFFERED"] = "1"
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )

    def wait(self, deadline: float) -> int:
        try:
            return self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise DrillError("the job ran past the drill timeout") from None

    def close(self) -> None:
        kill_tagged(self.tag)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()

    def output_tail(self, chars: int = 3000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        lines = [line for line in text.splitlines() if "set_vital" not in line]
        return "\n".join(lines)[-chars:]


# -- jitckpt drills -------------------------------------------------------------------
def jit_breakdown(events: list[dict[str, Any]], failure: dict[str, Any]) -> dict[str, Any]:
    """The parts of one jitckpt recovery (see the module docstring) from the
    event log and jitckpt.summary's record of the failure."""
    for key in ("detection_s", "save_s", "restart_s", "recovery_s"):
        if failure.get(key) is None:
            raise DrillError(f"the summary has no {key}: {failure}")
    detects = [e for e in events if e["event"] == "detect"]
    t_detect = min(e["t"] for e in detects)
    t_fail = t_detect - failure["detection_s"]
    t_saved = t_detect + failure["save_s"]
    restart_begin = next(
        (e for e in events if e["event"] == "restart_begin" and e["t"] >= t_fail), None
    )
    restart = next((e for e in events if e["event"] == "restart" and e["t"] >= t_fail), None)
    if restart is None:
        raise DrillError("no agent restart event after the failure")
    t_restarted = restart["t"]
    t_restore_begin = t_saved + failure["restart_s"]
    restores = [e for e in events if e["event"] == "restore" and e["t"] > t_restarted]
    t_restored = max(e["t"] for e in restores)
    t_first_step = t_fail + failure["recovery_s"]
    starts = [e for e in events if e["event"] == "start" and e["t"] > t_restarted]
    parts = {
        "detection": failure["detection_s"],
        "save": failure["save_s"],
        "teardown": t_restarted - t_saved,
        "startup": t_restore_begin - t_restarted,
        "restore": t_restored - t_restore_begin,
        "first_step": t_first_step - t_restored,
    }
    hang_timeouts = [e["timeout_s"] for e in detects if e.get("cause") == "hang"]
    first_hang = min(
        (e for e in detects if e.get("cause") == "hang"), key=lambda e: e["t"], default=None
    )
    return {
        "parts": parts,
        "extra": {
            # Agent: last save -> restart_begin (noticing the exits) and its
            # own restart (stop, rendezvous, spawn).
            "agent_notice_s": (restart_begin["t"] - t_saved) if restart_begin else None,
            "agent_restart_s": restart.get("duration"),
            # New processes -> the slowest one has built everything and
            # created JitCheckpoint (imports, group, model, optimizer).
            "spawn_to_ready_s": (max(e["t"] for e in starts) - t_restarted) if starts else None,
            "hang_timeouts_s": hang_timeouts,
        },
        "hang_timeout_s": first_hang["timeout_s"] if first_hang else None,
    }


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
    from jitckpt.events import read_events
    from jitckpt.summary import summarize

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
    (``inproc_step_done``), with jitckpt.summary's parts (they overlap a
    little: re-form and transfer are each the slowest rank's)."""
    from jitckpt.events import read_events
    from jitckpt.summary import summarize, summarize_in_process

    job = run_jit_job(mode, plan, run_dir, tag, timeout_s, launch_args)
    events = read_events(run_dir / "run")
    if summarize(events):
        reasons = [e.get("reason") for e in events if e["event"] == "inproc_fallback"]
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
    return {
        "parts": {part: record[f"{part}_s"] for part in INPROC_PARTS},
        "recovery_s": record["recovery_s"],
        "iterations_lost": record["iterations_lost"],
        "regain_s": record["recovery_s"] if record["iterations_lost"] == 1 else None,
        "goal_s": mode.goal_s,
        "hang_timeout_s": None,
        "extra": {},
        "summary": record,
        "params_m": _params_m(output),
        "warm_pool_messages": sorted(set(re.findall(r"^jitckpt\.warmpool: .*$", output, re.M))),
    }


# -- baseline drills ------------------------------------------------------------------
class LogTail:
    """Reads the JSON lines appended to a file since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def new_records(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        return [json.loads(line) for line in lines if line.strip()]


def read_records(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn line of the killed rank
    return sorted(records, key=lambda r: r["t"])


def kill_rank_at(
    job: Job,
    log: Path,
    step: int,
    deadline: float,
    rank: int = FAIL_RANK,
    attempt: int = 0,
    delay_s: float = 0.0,
) -> float:
    """SIGKILL ``rank`` of ``attempt`` as soon as it has logged step
    ``step - 1`` done (plus ``delay_s``, to land at another point of step
    ``step``); returns the wall time of the kill."""
    tail = LogTail(log)
    pid: int | None = None
    while time.monotonic() < deadline:
        for record in tail.new_records():
            if record.get("rank") != rank or record.get("attempt") != attempt:
                continue
            if record["event"] == "start":
                pid = int(record["pid"])
            elif record["event"] == "step" and record["step"] >= step - 1:
                if pid is None or pid not in tagged_pids(job.tag):
                    raise DrillError(f"rank {rank}'s pid {pid} is not a process of this job")
                time.sleep(delay_s)
                killed_at = time.time()
                os.kill(pid, signal.SIGKILL)
                return killed_at
        if job.proc.poll() is not None:
            raise DrillError(f"the job ended (status {job.proc.returncode}) before step {step}")
        time.sleep(POLL_INTERVAL_S)
    raise DrillError(f"rank {rank} did not reach step {step} before the drill timeout")


def baseline_breakdown(
    records: list[dict[str, Any]], t_fail: float, attempt: int = 0
) -> dict[str, Any]:
    """The parts of one torchrun + periodic checkpoint recovery from the
    workers' log (see the module docstring): the failure of ``attempt``."""
    first = [r for r in records if r.get("attempt") == attempt]
    second = [r for r in records if r.get("attempt") == attempt + 1]
    starts = [r for r in second if r["event"] == "start"]
    restores = [r for r in second if r["event"] == "restore"]
    steps = [r for r in second if r["event"] == "step"]
    if not starts or not steps:
        raise DrillError("the restarted attempt logged no start or no step")
    t_spawned = max(r.get("process_start") or r["t"] for r in starts)
    if restores:
        t_restore_begin = max(r["t"] - r["duration"] for r in restores)
        t_restored = max(r["t"] for r in restores)
        resumed = int(restores[0]["step"])
    else:  # no checkpoint yet: a fresh start, nothing to load
        fresh = [r for r in second if r["event"] == "fresh_start"]
        t_restore_begin = t_restored = max(r["t"] for r in fresh)
        resumed = 0
    t_first_step = min(r["t"] for r in steps)
    begun = max((int(r["step"]) for r in first if r["event"] == "step"), default=-1) + 1
    regained = [r["t"] for r in steps if r["step"] == begun]
    saves = [r["duration"] for r in first if r["event"] == "save"]
    return {
        "parts": {
            "detection": None,
            "save": None,
            "teardown": t_spawned - t_fail,
            "startup": t_restore_begin - t_spawned,
            "restore": t_restored - t_restore_begin,
            "first_step": t_first_step - t_restored,
        },
        "recovery_s": t_first_step - t_fail,
        "iterations_lost": begun + 1 - resumed,
        "regain_s": (min(regained) - t_fail) if regained else None,
        "extra": {
            "failed_step": begun,
            "resumed_step": resumed,
            "periodic_save_s": saves,
            "spawn_to_ready_s": max(r["t"] for r in starts) - t_spawned,
        },
    }


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
        t_fail = kill_rank_at(job, log, plan.baseline_kill_step, deadline)
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


# -- statistics and report ------------------------------------------------------------
def stats(values: Sequence[float | None]) -> dict[str, float] | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    return {"min": min(present), "median": statistics.median(present), "max": max(present)}


def aggregate(drills: list[dict[str, Any]]) -> dict[str, Any]:
    """Per mode: min/median/max of every part and of the end-to-end time."""
    result: dict[str, Any] = {}
    for mode in MODES:
        runs = [d for d in drills if d["mode"] == mode.name]
        ok = [d for d in runs if d["ok"]]
        entry: dict[str, Any] = {"drills": len(runs), "ok": len(ok)}
        entry["parts"] = {p: stats([d["parts"][p] for d in ok]) for p in parts_of(mode)}
        for key in ("recovery_s", "iterations_lost", "regain_s", "goal_s"):
            entry[key] = stats([d[key] for d in ok])
        with_goal = [d for d in ok if d["goal_s"] is not None]
        entry["goal_met"] = sum(d["recovery_s"] <= d["goal_s"] for d in with_goal)
        entry["goal_drills"] = len(with_goal)
        result[mode.name] = entry
    return result


def _median(entry: dict[str, float] | None, fmt: str = "{:.2f}") -> str:
    return "-" if entry is None else fmt.format(entry["median"])


def _goal(mode: Mode, entry: dict[str, Any]) -> str:
    if mode.fault is None:
        return "none (baseline)"
    if not entry["goal_drills"]:
        return "-"
    limit = entry["goal_s"]["median"]
    met = entry["recovery_s"]["median"] <= limit
    how = (
        ""
        if mode.fault == "kill" or mode.goal_s
        else f" (timeout {limit - HANG_GOAL_MARGIN_S:.2f} + 5)"
    )
    return (
        f"<= {limit:.2f} s{how}: {'met' if met else 'NOT met'}, "
        f"{entry['goal_met']}/{entry['goal_drills']} drills"
    )


def _header(labels: dict[str, str], parts: Sequence[str]) -> str:
    return (
        f"{'mode':<23} {'ok':>4} "
        + " ".join(f"{labels[p]:>8}" for p in parts)
        + f" {'end-to-end (min..max)':>23} {'lost':>5}"
    )


def _row(mode: Mode, entry: dict[str, Any], fmt: str) -> str:
    """A table row: mode, drills, median parts, end to end, iterations lost."""
    recovery = entry["recovery_s"]
    span = (
        f"{fmt.format(recovery['median'])} "
        f"({fmt.format(recovery['min'])}..{fmt.format(recovery['max'])})"
        if recovery
        else "-"
    )
    return (
        f"{mode.label:<23} {entry['ok']:>2}/{entry['drills']:<1} "
        + " ".join(f"{_median(entry['parts'][p], fmt):>8}" for p in parts_of(mode))
        + f" {span:>23} {_median(entry['iterations_lost'], '{:g}'):>5}"
    )


def report(result: dict[str, Any]) -> str:
    modes = result["modes"]
    config = result["config"]
    params = next((d["params_m"] for d in result["drills"] if d.get("params_m")), None)
    model = f"example GPT ({params:.2f}M params)" if params else "example GPT"
    lines = [
        "",
        f"Recovery from a failure of rank {FAIL_RANK} of {NPROC}: {model}, gloo, "
        f"{os.cpu_count()} CPUs, jitckpt at {result['source']}",
        f"jitckpt run {' '.join(config['jitckpt_args']) or '(default options)'}: fault in the "
        f"{FAIL_PHASE} of step {config['fail_step']}; baseline: SIGKILL "
        f"early in step {config['baseline_kill_step']}, checkpoint every {config['save_every']} steps",
        "medians over the successful drills, in seconds; the parts add up to end-to-end",
    ]
    if any(modes[m.name]["drills"] for m in MODES if not m.replacement):
        lines += ["", _header(PART_LABELS, JIT_PARTS) + f" {'regain':>7}  goal"]
    for mode in MODES:
        entry = modes[mode.name]
        if not entry["drills"] or mode.replacement:
            continue
        lines.append(
            _row(mode, entry, "{:.2f}") + f" {_median(entry['regain_s']):>7}  {_goal(mode, entry)}"
        )
    inproc = [m for m in MODES if m.replacement and modes[m.name]["drills"]]
    if inproc:
        lines += [
            "",
            "in-process recovery (--deterministic; survivors keep running): failure to the "
            "next step completed by every rank",
            _header(INPROC_LABELS, INPROC_PARTS) + "  goal",
        ]
    for mode in inproc:
        entry = modes[mode.name]
        lines.append(_row(mode, entry, "{:.3f}") + f"  {_goal(mode, entry)}")
    lines += ["", "min / median / max per part, seconds:"]
    for mode in MODES:
        entry = modes[mode.name]
        if not entry["ok"]:
            continue
        cells = []
        labels = {**PART_LABELS, **INPROC_LABELS}
        for part in (*parts_of(mode), "recovery_s"):
            s = entry["parts"].get(part) if part != "recovery_s" else entry["recovery_s"]
            if s is not None:
                label = "end-to-end" if part == "recovery_s" else labels[part]
                cells.append(f"{label} {s['min']:.2f}/{s['median']:.2f}/{s['max']:.2f}")
        lines.append(f"  {mode.label:<23} " + ", ".join(cells))
    failed = [d for d in result["drills"] if not d["ok"]]
    for drill in failed:
        first_line = drill["error"].splitlines()[0] if drill["error"] else "?"
        lines.append(f"  FAILED {drill['mode']} drill {drill['drill']}: {first_line}")
    return "\n".join(lines)


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
        },
        "source": source_state(),
        "source_at_start": source_before,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "drills": drills,
    }
    result["modes"] = aggregate(drills)
    result["wall_s"] = time.monotonic() - started
    result["load_avg_before"], result["load_avg_after"] = load_before, os.getloadavg()[0]
    print(report(result))
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
