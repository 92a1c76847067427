"""The benchmarks' harness: what the scripts in benchmarks/ share, in one
module they import as a sibling (each runs as ``python benchmarks/<script>.py``).
Its users: recovery.py and recovery_report.py (the recovery benchmark and
its report), drills.py and drills_torchft.py (the recovery drills of
suite.py), suite.py (the tag and the cleanup), suite_report.py (the part
names), overhead.py and storage.py (launching and provenance).

* Launching and provenance: ``standalone_launch`` (the command of a
  single-node job under torchrun or ``jitckpt run``), ``source_state`` (the
  commit the measured jitckpt comes from), and the paths of the example
  (``EXAMPLE``) and of the torchrun baseline (``BASELINE_WORKER``, which
  logs to ``BASELINE_LOG``).
* Processes: every process a recovery benchmark starts carries its tag in
  the environment variable ``TAG_VAR`` (torchrun's workers run in sessions
  of their own, so a process group kill would miss them); ``tagged_pids``
  finds them and ``kill_tagged`` SIGKILLs them by pid. ``Job`` is one
  launcher process under a tag, its output in a log file; ``DrillError`` is
  a drill that produced no measurement.
* Logs: ``LogTail`` follows a JSON-lines log as it grows, ``read_records``
  reads one whole (skipping a killed rank's torn line), ``kill_rank_at``
  SIGKILLs a rank of the baseline once it has logged a given step.
* Breakdowns: ``jit_breakdown`` (from jitckpt's event log) and
  ``baseline_breakdown`` (from the baseline's log) split one recovery into
  its parts, ``JIT_PARTS`` (labelled ``PART_LABELS``), which add up to the
  end-to-end time; recovery.py's docstring defines them. In-process
  recoveries have parts of their own, ``INPROC_PARTS`` (``INPROC_LABELS``).
* ``stats``: min / median / max of the values that are present.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jitckpt import events as ev
from jitckpt.testing import proctag

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "train_gpt.py"
BASELINE_WORKER = Path(__file__).resolve().parent / "periodic_baseline.py"
BASELINE_LOG = "baseline.jsonl"  # periodic_baseline.LOG_FILE


class BaselineRecord:
    """The names of periodic_baseline.py's own log records. They mirror
    jitckpt's event names on purpose (the same breakdown applies) but are
    not jitckpt events: the baseline imports nothing of jitckpt."""

    START = "start"
    FRESH_START = "fresh_start"
    RESTORE = "restore"
    SAVE = "save"
    STEP = "step"


TAG_VAR = "JITCKPT_BENCH_TAG"
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


# In-process recovery (jitckpt.inprocess): parts as jitckpt.analysis.summary's
# summarize_in_process names them.
INPROC_PARTS = ("detect", "unblock", "reform", "transfer", "redo")
INPROC_LABELS = {
    "detect": "detect",
    "unblock": "unblock",
    "reform": "re-form",
    "transfer": "transfer",
    "redo": "redo",
}


# -- launching -----------------------------------------------------------------------
def source_state() -> str:
    """The commit the measured jitckpt comes from, marked if the tree is edited."""
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def standalone_launch(launcher: str, nproc: int, *args: str) -> list[str]:
    """A single-node job of ``nproc`` ranks: ``launcher`` is the module that
    launches it, "torch.distributed.run" (torchrun) or "jitckpt" (which
    takes ``run`` first)."""
    verb = ["run"] if launcher == "jitckpt" else []
    return [
        sys.executable,
        "-m",
        launcher,
        *verb,
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        *args,
    ]


# -- processes ------------------------------------------------------------------------
class DrillError(RuntimeError):
    """A drill that did not produce a measurement (the job failed or hung)."""


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


# -- logs ----------------------------------------------------------------------------
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
    rank: int,
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
            if record["event"] == BaselineRecord.START:
                pid = int(record["pid"])
            elif record["event"] == BaselineRecord.STEP and record["step"] >= step - 1:
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


# -- breakdowns ----------------------------------------------------------------------
def jit_breakdown(events: list[dict[str, Any]], failure: dict[str, Any]) -> dict[str, Any]:
    """The parts of one jitckpt recovery (see benchmarks/recovery.py's
    docstring) from the event log and jitckpt.analysis.summary's record of the
    failure."""
    for key in ("detection_s", "save_s", "restart_s", "recovery_s"):
        if failure.get(key) is None:
            raise DrillError(f"the summary has no {key}: {failure}")
    detects = [e for e in events if e["event"] == ev.DETECT]
    t_detect = min(e["t"] for e in detects)
    t_fail = t_detect - failure["detection_s"]
    t_saved = t_detect + failure["save_s"]
    restart_begin = next(
        (e for e in events if e["event"] == ev.RESTART_BEGIN and e["t"] >= t_fail), None
    )
    restart = next((e for e in events if e["event"] == ev.RESTART and e["t"] >= t_fail), None)
    if restart is None:
        raise DrillError("no agent restart event after the failure")
    t_restarted = restart["t"]
    t_restore_begin = t_saved + failure["restart_s"]
    restores = [e for e in events if e["event"] == ev.RESTORE and e["t"] > t_restarted]
    t_restored = max(e["t"] for e in restores)
    t_first_step = t_fail + failure["recovery_s"]
    starts = [e for e in events if e["event"] == ev.START and e["t"] > t_restarted]
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


def baseline_breakdown(
    records: list[dict[str, Any]], t_fail: float, attempt: int = 0
) -> dict[str, Any]:
    """The parts of one torchrun + periodic checkpoint recovery from the
    workers' log (see benchmarks/recovery.py's docstring): the failure of
    ``attempt``."""
    first = [r for r in records if r.get("attempt") == attempt]
    second = [r for r in records if r.get("attempt") == attempt + 1]
    starts = [r for r in second if r["event"] == BaselineRecord.START]
    restores = [r for r in second if r["event"] == BaselineRecord.RESTORE]
    steps = [r for r in second if r["event"] == BaselineRecord.STEP]
    if not starts or not steps:
        raise DrillError("the restarted attempt logged no start or no step")
    t_spawned = max(r.get("process_start") or r["t"] for r in starts)
    if restores:
        t_restore_begin = max(r["t"] - r["duration"] for r in restores)
        t_restored = max(r["t"] for r in restores)
        resumed = int(restores[0]["step"])
    else:  # no checkpoint yet: a fresh start, nothing to load
        fresh = [r for r in second if r["event"] == BaselineRecord.FRESH_START]
        t_restore_begin = t_restored = max(r["t"] for r in fresh)
        resumed = 0
    t_first_step = min(r["t"] for r in steps)
    begun = (
        max((int(r["step"]) for r in first if r["event"] == BaselineRecord.STEP), default=-1) + 1
    )
    regained = [r["t"] for r in steps if r["step"] == begun]
    saves = [r["duration"] for r in first if r["event"] == BaselineRecord.SAVE]
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


# -- statistics ----------------------------------------------------------------------
def stats(values: Sequence[float | None]) -> dict[str, float] | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    return {"min": min(present), "median": statistics.median(present), "max": max(present)}
