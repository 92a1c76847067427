"""Failure drills: real `jitckpt run` jobs at 4 ranks on gloo, a fault
injected at a step and phase, compared with a failure-free run of the same
command. Deterministic mode: the final digests must be identical."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from jobs import (
    EXAMPLE_STEPS,
    assert_loss_continues,
    check_recovered,
    default_mode_example_args,
    example_args,
    jitckpt_run,
    kill_tagged,
    show,
)

from jitckpt.events import read_events
from jitckpt.protocol import EXIT_SAVED_AND_STOPPED

STEPS = EXAMPLE_STEPS
FAIL_STEP = 6
# These drills are of the restart path (in-process recovery, the default
# where it applies, has its own in test_inprocess.py).
RESTART = ("--recovery", "restart")


def train_args(
    run_dir: Path, digest: Path, steps: int = STEPS, deterministic: bool = True
) -> list[str]:
    if deterministic:
        return example_args(run_dir, digest, steps)
    return default_mode_example_args(run_dir, digest, steps)


# A failure in every phase of a step, one launch per kind (four attempts):
# (phase, step, victim rank, resumed step). After the optimizer step the
# survivors had finished the update: the job resumes at the next step.
PHASES = [
    ("forward", 2, 2, 2),
    ("backward", 4, 2, 4),
    ("allreduce", 6, 1, 6),
    ("optimizer", 8, 1, 9),
]
RESUMED = [resumed for _, _, _, resumed in PHASES]
VICTIMS = [rank for _, _, rank, _ in PHASES]


def phase_specs(kind: str) -> list[str]:
    return [
        "--max-restarts", str(len(PHASES)),
        *(
            arg
            for phase, step, rank, _ in PHASES
            for arg in ("--inject", f"{kind}@step={step},rank={rank},phase={phase}")
        ),
    ]  # fmt: skip


def test_kill_in_every_phase_resumes_exactly(tmp_path: Path, example_reference: str) -> None:
    """A SIGKILL in each phase of a step (forward, backward, the gradient
    all-reduce, the optimizer step): resumed at the failed step, or the
    next one when the survivors had finished the optimizer step."""
    launch = jitckpt_run(
        *RESTART, *phase_specs("kill"), *train_args(tmp_path / "run", tmp_path / "digest")
    )
    check_recovered(tmp_path / "run", tmp_path / "digest", example_reference, RESUMED, launch)
    # Killed by SIGKILL, the victim wrote nothing; the survivors' copies were used.
    saves = [e for e in read_events(tmp_path / "run") if e["event"] == "save"]
    for attempt, victim in enumerate(VICTIMS):
        savers = {e["rank"] for e in saves if e["attempt"] == attempt}
        assert savers and victim not in savers, (attempt, savers)


def test_raise_in_forward_resumes_exactly(tmp_path: Path, example_reference: str) -> None:
    launch = jitckpt_run(
        *RESTART,
        "--inject",
        f"raise@step={FAIL_STEP},rank=1,phase=forward",
        *train_args(tmp_path / "run", tmp_path / "digest"),
    )
    check_recovered(tmp_path / "run", tmp_path / "digest", example_reference, [FAIL_STEP], launch)
    assert "InjectedFault" in launch.output
    # The raising rank's own state was clean (forward): it saved too.
    saves = [e for e in read_events(tmp_path / "run") if e["event"] == "save"]
    assert 1 in {e["rank"] for e in saves}


def test_preemption_saves_stops_and_resumes_on_rerun(
    tmp_path: Path, example_reference: str
) -> None:
    args = [
        "--inject",
        f"term@step={FAIL_STEP},rank=0,phase=forward",
        *train_args(tmp_path / "run", tmp_path / "digest"),
    ]
    first = jitckpt_run(*args)
    assert first.returncode == EXIT_SAVED_AND_STOPPED, show(first)
    assert not (tmp_path / "digest").exists(), "a preempted job must not finish"
    events = read_events(tmp_path / "run")
    saves = [e for e in events if e["event"] == "save"]
    assert {e["rank"] for e in saves} == {0, 1, 2, 3}, "every rank is healthy and saves"
    saved_steps = {e["step"] for e in saves}
    assert saved_steps <= {FAIL_STEP, FAIL_STEP + 1}, saved_steps
    assert all(e["cause"] == "sigterm" for e in events if e["event"] == "detect")
    # The scheduler requeues the same command; the injection does not fire again.
    second = jitckpt_run(*args)
    check_recovered(
        tmp_path / "run", tmp_path / "digest", example_reference, [max(saved_steps)], second
    )


def test_resume_without_deterministic_mode_continues_the_loss_curve(
    tmp_path: Path, default_mode_reference: str
) -> None:
    """Default mode on the restart path: resumed at the failed step, and the
    loss of every later step within a small band of the failure-free run's
    (not bitwise: the restarted ranks draw fresh dropout streams), so no jump
    back towards the untrained loss."""
    launch = jitckpt_run(
        *RESTART,
        "--inject", f"kill@step={FAIL_STEP},rank=3,phase=backward",
        *train_args(tmp_path / "run", tmp_path / "digest", deterministic=False),
    )  # fmt: skip
    assert launch.returncode == 0, show(launch)
    assert launch.resumed_steps() == [FAIL_STEP]
    assert_loss_continues(launch.output, default_mode_reference, since=FAIL_STEP, band=0.05)


def test_hang_in_every_phase_is_detected_and_resumes_exactly(
    tmp_path: Path, example_reference: str
) -> None:
    run_dir = tmp_path / "run"
    launch = jitckpt_run(*RESTART, *phase_specs("hang"), *train_args(run_dir, tmp_path / "digest"))
    check_recovered(run_dir, tmp_path / "digest", example_reference, RESUMED, launch)
    events = read_events(run_dir)
    for attempt, victim in enumerate(VICTIMS):
        hung_at = next(
            e["t"] for e in events if e["event"] == "fault_injected" and e["attempt"] == attempt
        )
        hangs = [
            e
            for e in events
            if e["event"] == "detect" and e["cause"] == "hang" and e["attempt"] == attempt
        ]
        assert hangs, f"the watchdog must detect the hang of attempt {attempt}"
        median = max(e["median_step_s"] for e in hangs)
        detected = min(e["t"] for e in hangs)
        assert detected - hung_at <= max(2.0, 5 * median), (detected - hung_at, median)
        # The watchdogs name the hung rank from the heartbeats.
        assert all(e["suspects"] == {str(victim): "hung"} for e in hangs), [
            e["suspects"] for e in hangs
        ]


def test_kill_during_the_jit_save_leaves_the_other_copies(
    tmp_path: Path, example_reference: str
) -> None:
    run_dir = tmp_path / "run"
    launch = jitckpt_run(
        *RESTART,
        "--inject", f"kill@step={FAIL_STEP},rank=2,phase=backward",
        "--inject", f"kill@step={FAIL_STEP},rank=1,phase=save",
        *train_args(run_dir, tmp_path / "digest"),
    )  # fmt: skip
    check_recovered(run_dir, tmp_path / "digest", example_reference, [FAIL_STEP], launch)
    events = read_events(run_dir)
    assert any(e["event"] == "fault_injected" and e["phase"] == "save" for e in events)
    restored = {e["path"] for e in events if e["event"] == "restore"}
    assert len(restored) == 1 and not any("-r1" in p or "-r2" in p for p in restored), restored


def test_kill_during_restore_then_the_next_attempt_succeeds(
    tmp_path: Path, example_reference: str
) -> None:
    run_dir = tmp_path / "run"
    launch = jitckpt_run(
        *RESTART,
        "--inject", f"kill@step={FAIL_STEP},rank=2,phase=backward",
        "--inject", f"kill@step={FAIL_STEP},rank=0,phase=restore",
        *train_args(run_dir, tmp_path / "digest"),
    )  # fmt: skip
    # Two failures. The attempt that restores is killed while restoring: its
    # other ranks may or may not finish their own restore before the launcher
    # stops them, so the first failure's resumed step is not asserted. Rank 0
    # announces only the resume it lived through.
    check_recovered(
        run_dir,
        tmp_path / "digest",
        example_reference,
        [None, FAIL_STEP],
        launch,
        printed=[FAIL_STEP],
        # The second failure strikes before any step after the resume: the
        # checkpoint being restored still covers it, nothing new is saved.
        new_save=[True, False],
    )
    restore_faults = [
        e
        for e in read_events(run_dir)
        if e["event"] == "fault_injected" and e["phase"] == "restore"
    ]
    assert len(restore_faults) == 1 and restore_faults[0]["attempt"] == 1


def test_second_failure_on_the_first_step_after_resume(
    tmp_path: Path, example_reference: str
) -> None:
    run_dir = tmp_path / "run"
    launch = jitckpt_run(
        *RESTART,
        "--inject", f"kill@step={FAIL_STEP},rank=2,phase=forward",
        # Unreachable in the first attempt (step 6's all-reduce never completes);
        # it strikes the first step after the resume.
        "--inject", f"kill@step={FAIL_STEP},rank=1,phase=optimizer",
        *train_args(run_dir, tmp_path / "digest"),
    )  # fmt: skip
    check_recovered(
        run_dir, tmp_path / "digest", example_reference, [FAIL_STEP, FAIL_STEP + 1], launch
    )


def test_optimizer_phase_race_resolves_to_one_step(tmp_path: Path, example_reference: str) -> None:
    """Rank 2 dies after the all-reduce of step 6; rank 3 fails before its
    optimizer step (it saves step 6) while ranks 0 and 1 finish it (they save
    step 7). Every rank must load the same, newest checkpoint."""
    run_dir = tmp_path / "run"
    launch = jitckpt_run(
        *RESTART,
        "--inject", f"kill@step={FAIL_STEP},rank=2,phase=optimizer",
        "--inject", f"raise@step={FAIL_STEP},rank=3,phase=optimizer",
        *train_args(run_dir, tmp_path / "digest"),
    )  # fmt: skip
    events = read_events(run_dir)
    saved = {e["rank"]: e["step"] for e in events if e["event"] == "save"}
    assert saved.get(3) == FAIL_STEP and saved.get(0) == FAIL_STEP + 1, saved
    check_recovered(run_dir, tmp_path / "digest", example_reference, [FAIL_STEP + 1], launch)
    restores = [e for e in events if e["event"] == "restore"]
    assert len(restores) == 4 and len({e["path"] for e in restores}) == 1
    assert {e["step"] for e in restores} == {FAIL_STEP + 1}


def test_rank_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    """A SIGSTOPped rank runs nothing (no watchdog, no signal thread): the
    others detect the hang and save, and the launcher SIGKILLs the stopped
    rank --term-grace seconds after its SIGTERM instead of torchrun's 30 s."""
    run_dir = tmp_path / "run"
    log = tmp_path / "log"
    grace = 2.0
    tag = uuid.uuid4().hex
    cmd = [
        sys.executable, "-m", "jitckpt", "run", "--standalone", "--nproc-per-node", "4", "--term-grace", str(grace), *RESTART,
        *train_args(run_dir, tmp_path / "digest"),
    ]  # fmt: skip
    env = dict(os.environ, JITCKPT_TEST_TAG=tag, OMP_NUM_THREADS="1")
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not re.search(
            r"^step\s+3 ", log.read_text(errors="replace"), re.M
        ):
            time.sleep(0.05)
        # A few steps are done, so the watchdogs are armed.
        (pid,) = [
            e["pid"] for e in read_events(run_dir) if e["event"] == "start" and e["rank"] == 3
        ]
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.time()
        proc.wait(timeout=240)
    finally:
        kill_tagged(tag)
    output = log.read_bytes()
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    events = read_events(run_dir)
    hangs = [
        e for e in events if e["event"] == "detect" and e["cause"] == "hang" and e["attempt"] == 0
    ]
    assert hangs and all(
        e["suspects"].get("3") == "dead" or e["suspects"].get("3") == "hung" for e in hangs
    ), hangs
    killed = [e for e in events if e["event"] == "worker_failed" and e["failed_rank"] == 3]
    assert killed and killed[0]["exitcode"] == -signal.SIGKILL, killed
    restart = next(e for e in events if e["event"] == "restart")
    # Detection (~1.5 s) + grace (2 s) + agent bookkeeping, far below 30 s.
    assert restart["t"] - stopped_at < 1.5 + grace + 6.0, restart["t"] - stopped_at
    assert [e["step"] for e in events if e["event"] == "restore"]
