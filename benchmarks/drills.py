"""Many failures in one job: the recovery drills of benchmarks/suite.py.

benchmarks/recovery.py launches a job per failure, which costs a cold
launch (5-10 s here) each time. The suite needs at least 10 failures per
system within minutes, so here one job takes all of them, one after the
other, each recovery measured on its own:

* jitckpt (``kill`` or ``hang``): ``jitckpt run`` with one ``--inject`` per
  failure, the last rank failing in the backward of steps ``first``,
  ``first + gap``, ...; every failure's parts come from the event log
  (harness.jit_breakdown on the events of the failed attempt and the
  next);
* torchrun + periodic DCP checkpoints: ``torch.distributed.run
  --max-restarts`` running benchmarks/periodic_baseline.py ``--checkpoint
  dcp``; in every attempt the benchmark SIGKILLs the last rank half a
  checkpoint interval after the checkpoint it resumed from, at a random
  point of the step (harness.baseline_breakdown per attempt).

Every failure becomes one record: ``survived`` (the job completed a step
after it), ``recovery_s`` (failure to the end of the first step that began
after it and was kept), ``iterations_lost`` and ``parts``. torchft's drills
(benchmarks/drills_torchft.py) give the same record.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import (
    BASELINE_LOG,
    BASELINE_WORKER,
    EXAMPLE,
    BaselineRecord,
    DrillError,
    Job,
    baseline_breakdown,
    jit_breakdown,
    kill_rank_at,
    read_records,
    standalone_launch,
)

from jitckpt.analysis.summary import attempt_groups, summarize
from jitckpt.events import read_events

FAIL_PHASE = "backward"


def failure_window(events: list[dict[str, Any]], group: int) -> list[dict[str, Any]]:
    """The events of attempt group ``group`` and the next one (the failure
    and its recovery), agent events included by time."""
    groups = attempt_groups(events)
    begin = min(e["t"] for e in groups[group])
    end = max(e["t"] for e in groups[group + 1]) if group + 1 < len(groups) else float("inf")
    return [e for e in events if begin <= e["t"] <= end]


def jitckpt_job(
    fault: str, failures: int, ranks: int, workdir: Path, tag: str, timeout_s: float, gap: int
) -> dict[str, Any]:
    """One ``jitckpt run`` in which the last rank fails ``failures`` times."""
    first = gap + 2  # steps for the watchdog's median step time
    fail_steps = [first + index * gap for index in range(failures)]
    specs = [f"{fault}@step={s},rank={ranks - 1},phase={FAIL_PHASE}" for s in fail_steps]
    run_dir = workdir / "run"
    command = standalone_launch(
        "jitckpt",
        ranks,
        # These drills measure the restart path (JIT save, restart, restore).
        "--recovery",
        "restart",
        "--max-restarts",
        str(failures + 1),
        *(arg for spec in specs for arg in ("--inject", spec)),
        str(EXAMPLE),
        "--steps",
        str(fail_steps[-1] + 3),
        "--run-dir",
        str(run_dir),
    )
    job = Job(command, tag, workdir / "output.log")
    error = finish(job, time.monotonic() + timeout_s, lambda: None)
    events = read_events(run_dir)
    records = []
    for failure in summarize(events):
        record: dict[str, Any] = {"fault": failure.get("fault")}
        try:
            window = failure_window(events, failure["attempt_group"])
            breakdown = jit_breakdown(window, failure)
            record.update(
                survived=True,
                recovery_s=failure["recovery_s"],
                iterations_lost=failure["iterations_lost"],
                parts=breakdown["parts"],
                hang_timeout_s=breakdown["hang_timeout_s"],
            )
        except (DrillError, KeyError, ValueError, TypeError) as exc:
            record.update(survived=False, error=f"{type(exc).__name__}: {exc}")
        records.append(record)
    return {"failures": records, "planned": failures, "error": error}


def torchrun_dcp_job(
    failures: int,
    ranks: int,
    save_every: int,
    workdir: Path,
    tag: str,
    timeout_s: float,
    seed: int = 0,
) -> dict[str, Any]:
    """One torchrun job with periodic DCP checkpoints; its last rank is
    SIGKILLed once per attempt, ``failures`` times."""
    rng = random.Random(seed)
    kill_offset = save_every + save_every // 2  # mid-interval after the resumed checkpoint
    steps = save_every * failures + kill_offset + 2
    run_dir = workdir / "run"
    command = standalone_launch(
        "torch.distributed.run",
        ranks,
        "--max-restarts",
        str(failures + 1),
        str(BASELINE_WORKER),
        "--steps",
        str(steps),
        "--run-dir",
        str(run_dir),
        "--save-every",
        str(save_every),
        "--checkpoint",
        "dcp",
    )
    log = run_dir / BASELINE_LOG
    job = Job(command, tag, workdir / "output.log")
    deadline = time.monotonic() + timeout_s
    kills: list[float] = []

    def kill_every_attempt() -> None:
        for attempt in range(failures):
            resumed = resumed_step(log, attempt, deadline)
            delay = rng.uniform(0.0, step_time(log, attempt, resumed, deadline))
            kills.append(
                kill_rank_at(
                    job, log, resumed + kill_offset, deadline, ranks - 1, attempt, delay_s=delay
                )
            )

    error = finish(job, deadline, kill_every_attempt)
    records_log = read_records(log) if log.exists() else []
    records = []
    for attempt, t_fail in enumerate(kills):
        try:
            result = baseline_breakdown(records_log, t_fail, attempt)
            records.append(
                {
                    "survived": True,
                    "recovery_s": result["recovery_s"],
                    "iterations_lost": result["iterations_lost"],
                    "parts": result["parts"],
                    "regain_s": result["regain_s"],
                }
            )
        except (DrillError, KeyError, ValueError) as exc:
            records.append({"survived": False, "error": f"{type(exc).__name__}: {exc}"})
    return {"failures": records, "planned": failures, "error": error}


def finish(job: Job, deadline: float, drive: Callable[[], None]) -> str | None:
    """Run ``drive`` (the kills) while the job runs, wait for the job's end
    and stop whatever is left of it; returns what went wrong, or None."""
    try:
        drive()
        code = job.wait(deadline)
        if code != 0:
            return f"the launcher exited with status {code}\n{job.output_tail()}"
        return None
    except DrillError as exc:
        return f"{exc}\n{job.output_tail()}"
    finally:
        job.close()


def wait_for_record(log: Path, deadline: float, wanted: Any) -> dict[str, Any]:
    """The first record of the log for which ``wanted(record)`` holds, once written."""
    while time.monotonic() < deadline:
        if log.exists():
            found = next((r for r in read_records(log) if wanted(r)), None)
            if found is not None:
                return found
        time.sleep(0.05)
    raise DrillError("the job did not get as far as expected before the timeout")


def resumed_step(log: Path, attempt: int, deadline: float) -> int:
    """The step ``attempt`` of the baseline resumed from, once it is logged."""
    record = wait_for_record(
        log,
        deadline,
        lambda r: (
            r.get("attempt") == attempt
            and r["event"] in (BaselineRecord.RESTORE, BaselineRecord.FRESH_START)
        ),
    )
    return int(record["step"]) if record["event"] == BaselineRecord.RESTORE else 0


def step_time(log: Path, attempt: int, after: int, deadline: float) -> float:
    """Median time between the steps rank 0 logged in ``attempt`` from step
    ``after`` on (waits for 4 of them), for the kill's delay."""
    wait_for_record(
        log,
        deadline,
        lambda r: r.get("attempt") == attempt and r["event"] == "step" and r["step"] >= after + 3,
    )
    times = [
        r["t"]
        for r in read_records(log)
        if r["event"] == "step" and r.get("rank") == 0 and r.get("attempt") == attempt
    ]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return statistics.median(gaps) if gaps else 0.0
