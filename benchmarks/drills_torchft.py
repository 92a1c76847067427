"""torchft 0.2.0 beside jitckpt: many SIGKILLs of one replica group in one job.

The job: torchft's Rust lighthouse (``torchft_lighthouse``, bound to
127.0.0.1, ``--heartbeat_timeout_ms`` as given, 1000 by default: the
survivor's stall after a death is about that timeout) and ``groups``
replica groups, each a one-rank torchrun (``--max-restarts``) running
benchmarks/torchft_train.py, which logs every step. Each failure: once
every group has committed ``settle`` steps together, the benchmark SIGKILLs
the worker of the last group at a random point of a step (after it logged a
step, a delay drawn uniformly from one step time), then waits until the
restarted worker has healed from a peer and committed a step with every
group again.

Per failure, from the log (group 0 is the survivor):

* ``recovery_s``: failure -> end of the first committed step (of any
  group) that began after the failure;
* ``iterations_lost``: the survivor's steps after the failure that did not
  commit, plus the steps training went back: when the survivor crashed
  too, the first group back has no live peer to heal from and trains from
  step 0 again;
* ``survived``: the survivor kept running (no new process) and training did
  not go back;
* parts: ``replica_restart`` (failure -> the killed group's new process
  logs ``start``), ``replica_back`` (failure -> its first committed step
  after healing); ``degraded_steps``: the survivor's committed steps
  without the killed group (half the global batch).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import DrillError, Job, read_records, standalone_launch, tagged_pids

TRAIN = Path(__file__).resolve().parent / "torchft_train.py"
LOG_FILE = "torchft.jsonl"  # torchft_train.LOG_FILE (not imported: it needs torch)
LIGHTHOUSE = "torchft_lighthouse"
# Steps every group commits together before the next kill.
SETTLE_STEPS = 3
# A job this many steps long does not end before the drills are done; the
# benchmark stops it.
ENDLESS_STEPS = 1_000_000


def torchft_available() -> str | None:
    """Why the torchft drills cannot run here, or None if they can."""
    try:
        import torchft  # noqa: F401
    except ImportError as exc:
        return f"torchft is not installed (benchmarks/install_peers.sh): {exc}"
    if lighthouse_binary() is None:
        return f"the {LIGHTHOUSE} binary of the torchft wheel is not on PATH"
    return None


def lighthouse_binary() -> str | None:
    beside_python = Path(sys.executable).parent / LIGHTHOUSE
    return str(beside_python) if beside_python.exists() else shutil.which(LIGHTHOUSE)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class TorchftJob:
    """The lighthouse and the replica groups, all under one tag."""

    def __init__(
        self, groups: int, workdir: Path, tag: str, heartbeat_ms: int, restarts: int, grads: str
    ) -> None:
        self.run_dir = workdir / "run"
        self.log = self.run_dir / LOG_FILE
        self.jobs: list[Job] = []
        port = free_port()
        binary = lighthouse_binary()
        assert binary is not None
        self.jobs.append(
            Job(
                [
                    binary,
                    "--bind",
                    f"127.0.0.1:{port}",
                    "--min_replicas",
                    "1",
                    "--heartbeat_timeout_ms",
                    str(heartbeat_ms),
                ],
                tag,
                workdir / "lighthouse.log",
            )
        )
        env = {"TORCHFT_LIGHTHOUSE": f"http://127.0.0.1:{port}"}
        for group in range(groups):
            command = standalone_launch(
                "torch.distributed.run",
                1,
                "--max-restarts",
                str(restarts),
                str(TRAIN),
                "--steps",
                str(ENDLESS_STEPS),
                "--run-dir",
                str(self.run_dir),
                "--group",
                str(group),
                "--groups",
                str(groups),
                "--grads",
                grads,
            )
            self.jobs.append(Job(command, tag, workdir / f"group{group}.log", env=env))
        self.tag = tag

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.log) if self.log.exists() else []

    def wait_for(
        self, deadline: float, wanted: Callable[[list[dict[str, Any]]], bool], what: str
    ) -> list[dict[str, Any]]:
        while time.monotonic() < deadline:
            records = self.records()
            if wanted(records):
                return records
            for job in self.jobs:
                if job.proc.poll() is not None:
                    raise DrillError(f"{job.log_path.name}: exited ({job.proc.returncode})")
            time.sleep(0.05)
        raise DrillError(f"timed out waiting for {what}")

    def close(self) -> None:
        for job in self.jobs:
            job.close()

    def output_tail(self) -> str:
        return "\n".join(f"== {job.log_path.name}\n{job.output_tail(1500)}" for job in self.jobs)


def steps_of(records: list[dict[str, Any]], group: int) -> list[dict[str, Any]]:
    return [r for r in records if r.get("group") == group and r["event"] == "step"]


def settled(groups: int, since: float) -> Callable[[list[dict[str, Any]]], bool]:
    """Every group has committed SETTLE_STEPS steps with all groups since ``since``."""

    def check(records: list[dict[str, Any]]) -> bool:
        return all(
            sum(
                r["committed"] and r["participants"] == groups and r["t"] > since
                for r in steps_of(records, group)
            )
            >= SETTLE_STEPS
            for group in range(groups)
        )

    return check


def kill_victim(job: TorchftJob, victim: int, rng: random.Random, deadline: float) -> float:
    """SIGKILL the victim group's current worker at a random point of a step."""
    records = job.records()
    starts = [r for r in records if r.get("group") == victim and r["event"] == "start"]
    pid = int(starts[-1]["pid"])
    times = [r["t"] for r in steps_of(records, victim)][-10:]
    step_s = statistics.median(b - a for a, b in zip(times, times[1:], strict=False))
    seen = len(steps_of(records, victim))
    job.wait_for(deadline, lambda rs: len(steps_of(rs, victim)) > seen, "the victim's next step")
    time.sleep(rng.uniform(0.0, step_s))
    if pid not in tagged_pids(job.tag):
        raise DrillError(f"the victim's pid {pid} is not a process of this job")
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    return killed_at


def steps_begun_after(
    records: list[dict[str, Any]], group: int, t_fail: float
) -> list[tuple[float, dict[str, Any]]]:
    """(begin, record) of the group's steps that ended after the failure; a
    step begins when the group's previous record (a step, or its start)
    was written."""
    own = [r for r in records if r.get("group") == group]
    return [
        (previous["t"], record)
        for previous, record in zip(own, own[1:], strict=False)
        if record["event"] == "step" and record["t"] > t_fail
    ]


def analyse(
    records: list[dict[str, Any]], t_fail: float, until: float, groups: int
) -> dict[str, Any]:
    """One failure's record from the log up to ``until`` (the next failure),
    see the module docstring."""
    victim = groups - 1
    records = [r for r in records if r["t"] < until]
    survivor = [r for r in records if r.get("group") == 0]
    before = [r for r in survivor if r["t"] <= t_fail and r["event"] == "step" and r["committed"]]
    step_before = before[-1]["step"] if before else 0
    restarted = any(r["event"] == "start" and r["t"] > t_fail for r in survivor)
    after = [item for group in range(groups) for item in steps_begun_after(records, group, t_fail)]
    committed = [record for _, record in after if record["committed"]]
    # Training goes on: the first step of any group begun after the failure and kept.
    recovery = min(
        (record for began, record in after if record["committed"] and began >= t_fail),
        key=lambda r: r["t"],
        default=None,
    )
    end = recovery["t"] if recovery else until
    uncommitted = sum(
        not record["committed"] and record["t"] <= end
        for _, record in steps_begun_after(records, 0, t_fail)
    )
    # A group that restarted alone, with no live peer to heal from, trains
    # from step 0 again: everything since the start is lost.
    lowest = min((r["step"] for r in committed), default=step_before + 1)
    rollback = max(0, step_before + 1 - lowest)
    victim_starts = [
        r for r in records if r.get("group") == victim and r["event"] == "start" and r["t"] > t_fail
    ]
    back = next(
        (
            r
            for r in committed
            if r.get("group") == victim and victim_starts and r["t"] > victim_starts[0]["t"]
        ),
        None,
    )
    degraded = sum(r["participants"] < groups for r in committed if r.get("group") == 0)
    return {
        "survived": recovery is not None and not restarted and rollback == 0,
        "recovery_s": recovery["t"] - t_fail if recovery else None,
        "iterations_lost": uncommitted + rollback,
        "survivor_restarted": restarted,
        "step_before": step_before,
        "lowest_step_after": lowest,
        "degraded_steps": degraded,
        "parts": {
            "replica_restart": victim_starts[0]["t"] - t_fail if victim_starts else None,
            "replica_back": back["t"] - t_fail if back else None,
        },
    }


def torchft_job(
    failures: int,
    groups: int,
    workdir: Path,
    tag: str,
    timeout_s: float,
    heartbeat_ms: int = 1000,
    grads: str = "ddp",
    seed: int = 0,
) -> dict[str, Any]:
    """One torchft job whose last replica group is SIGKILLed ``failures`` times."""
    unavailable = torchft_available()
    if unavailable:
        return {"failures": [], "planned": failures, "error": None, "skipped": unavailable}
    rng = random.Random(seed)
    deadline = time.monotonic() + timeout_s
    job = TorchftJob(groups, workdir, tag, heartbeat_ms, restarts=failures + 2, grads=grads)
    kills: list[float] = []
    error = None
    try:
        since = 0.0
        for _ in range(failures):
            job.wait_for(deadline, settled(groups, since), "every group to train together")
            since = kill_victim(job, groups - 1, rng, deadline)
            kills.append(since)
        job.wait_for(deadline, settled(groups, since), "the last killed group to come back")
    except DrillError as exc:
        error = f"{exc}\n{job.output_tail()}"
    finally:
        job.close()
    records = job.records()
    ends = [*kills[1:], float("inf")]
    results = [
        analyse(records, t_fail, until, groups) for t_fail, until in zip(kills, ends, strict=False)
    ]
    return {
        "failures": results,
        "planned": failures,
        "error": error,
        "heartbeat_timeout_ms": heartbeat_ms,
        "groups": groups,
        "grads": grads,
    }
