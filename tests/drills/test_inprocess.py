"""In-process recovery drills: real `jitckpt run` jobs at 4 ranks on gloo in
deterministic mode; a fault is injected and the failed rank alone is
replaced (a hot spare, or a fresh process) while the survivors keep running.
The final digest must equal a failure-free run's, the survivors' pids must
not change, and at most one iteration may be lost per failure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jobs import (
    EXAMPLE_STEPS,
    TINY,
    Launch,
    assert_loss_continues,
    check_in_process,
    default_mode_example_args,
    example_args,
    jitckpt_run,
    show,
)

from jitckpt.analysis.summary import summarize, summarize_in_process
from jitckpt.events import read_events

STEPS = EXAMPLE_STEPS
FAIL_STEP = 6


def train_args(run_dir: Path, digest: Path, steps: int = STEPS) -> list[str]:
    return example_args(run_dir, digest, steps)


def drill(
    tmp_path: Path, reference: str, resumed: list[int], replacement: str, *flags: str
) -> None:
    launch = jitckpt_run(*flags, *train_args(tmp_path / "run", tmp_path / "digest"))
    check_in_process(tmp_path / "run", tmp_path / "digest", reference, launch, resumed, replacement)


def test_kill_in_the_optimizer_step_with_a_hot_spare(
    tmp_path: Path, example_reference: str
) -> None:
    """The survivors had finished step 6's update: they continue from 7, and
    so does the spare. (The other phases: test_kills_in_backward_allreduce_...).
    Workers start cold (no warm pool): such survivors aborted at exit when
    an abandoned gloo call failed during finalization (jitckpt.process_exit),
    and the launcher took that for a new failure."""
    spec = f"kill@step={FAIL_STEP},rank=2,phase=optimizer"
    drill(
        tmp_path, example_reference, [FAIL_STEP + 1], "spare",
        "--spares", "1", "--no-warm-pool", "--inject", spec,
    )  # fmt: skip


def test_kill_without_spares_spawns_a_fresh_process(tmp_path: Path, example_reference: str) -> None:
    spec = f"kill@step={FAIL_STEP},rank=2,phase=forward"
    drill(tmp_path, example_reference, [FAIL_STEP], "fresh", "--inject", spec)


def test_hang_in_backward_with_a_hot_spare(tmp_path: Path, example_reference: str) -> None:
    spec = f"hang@step={FAIL_STEP},rank=2,phase=backward"
    drill(tmp_path, example_reference, [FAIL_STEP], "spare", "--spares", "1", "--inject", spec)


def test_kills_in_backward_allreduce_and_forward_each_take_a_refilled_spare(
    tmp_path: Path, example_reference: str
) -> None:
    """Three failures in three phases of a step, one spare: the pool is
    refilled after each recovery, so each is replaced by a hot spare."""
    drill(
        tmp_path, example_reference, [3, 6, 9], "spare", "--spares", "1",
        "--inject", "kill@step=3,rank=1,phase=backward",
        "--inject", "kill@step=6,rank=2,phase=allreduce",
        "--inject", "kill@step=9,rank=1,phase=forward",
    )  # fmt: skip


@pytest.mark.parametrize(("victim", "rank"), [("its replacement", 2), ("a survivor", 1)])
def test_failure_during_recovery_falls_back_to_restart(
    tmp_path: Path, example_reference: str, victim: str, rank: int
) -> None:
    """Rank 2 dies; then, inside that recovery (new group formed, before any
    state moves), its replacement or a survivor dies too. The launcher must
    take the restart path, say why, and still end bitwise equal."""
    run_dir, digest = tmp_path / "run", tmp_path / "digest"
    launch = jitckpt_run(
        "--spares", "1",
        "--inject", f"kill@step={FAIL_STEP},rank=2,phase=forward",
        "--inject", f"kill@step={FAIL_STEP},rank={rank},phase=recovery",
        *train_args(run_dir, digest),
    )  # fmt: skip
    assert launch.returncode == 0, show(launch)
    assert digest.read_text().strip() == example_reference, "final state differs"
    reason = f"rank {rank} ({victim}) failed during in-process recovery 1"
    assert f"in-process recovery does not apply ({reason}); restarting all workers" in (
        launch.output
    ), show(launch)
    events = read_events(run_dir)
    fallbacks = [e for e in events if e["event"] == "inproc_fallback"]
    assert [(e["path"], e["reason"], e["failed_ranks"]) for e in fallbacks] == [
        ("restart", reason, [rank])
    ], fallbacks
    begun = [e for e in events if e["event"] == "inproc_begin"]
    assert [(e["generation"], e["failed_rank"]) for e in begun] == [(1, 2)], begun
    assert launch.resumed_steps() == [FAIL_STEP], show(launch)
    assert len(summarize(events)) == 1, "one failure, recovered by the restart path"


# Resource hygiene: the stated margin. One abandoned gloo group kept alive
# costs +3 threads and +7 fds here (docs/platform.md, "Three rules: locks,
# dropping groups, private copies"), so one leaked group, let
# alone ten, exceeds it.
THREAD_MARGIN = 1
FD_MARGIN = 2
# The one leftover the design allows (docs/platform.md, "An abandoned
# receive can wait for the whole group timeout"): a drop blocked in gloo
# until the group timeout holds its own thread and that group's threads and
# sockets (+2 threads and +2 fds in the runs where it was seen), nothing more.
STUCK_DROP_THREADS = 4
STUCK_DROP_FDS = 4


def test_repeated_recoveries_give_back_threads_and_fds(
    tmp_path: Path, example_reference: str
) -> None:
    """4 kills in one run of the example's steps (ranks 1-3 and 1, in
    forward, backward, allreduce and forward; rank 0 lives through all),
    one hot spare: every process that finishes has, once its graveyard is
    empty, the threads and fds it had before (its `resources` event two
    steps after it started), within the margin; everything kept was
    released, and each release is logged with how long it was held. The one
    exception is the documented one: on at most one process, one drop still
    blocked in an abandoned gloo receive, holding only its own resources."""
    phases = ("forward", "backward", "allreduce")
    kills = [(3 + 2 * i, 1 + i % 3, phases[i % 3]) for i in range(4)]
    assert kills[-1][0] + 3 <= STEPS  # steps after the last one: its graveyard empties
    specs = [arg for s, r, p in kills for arg in ("--inject", f"kill@step={s},rank={r},phase={p}")]
    run_dir, digest = tmp_path / "run", tmp_path / "digest"
    launch = jitckpt_run("--spares", "1", *specs, *train_args(run_dir, digest))
    recoveries = check_in_process(
        run_dir, digest, example_reference, launch, [s for s, _, _ in kills], None
    )
    # A kill can come before the refilled spare is up: a fresh process then.
    print("replacements:", [r["replacement"] for r in recoveries])
    assert "spare" in [r["replacement"] for r in recoveries]
    events = read_events(run_dir)
    baselines = {e["pid"]: e for e in events if e["event"] == "resources"}
    finishes = [e for e in events if e["event"] == "finish"]
    lines = []
    for finish in finishes:
        base = baselines[finish["pid"]]
        lines.append(
            f"rank {finish['rank']} pid {finish['pid']}: threads {base['threads']} -> "
            f"{finish['threads']}, fds {base['fds']} -> {finish['fds']}, rss "
            f"{base['rss_kb']} -> {finish['rss_kb']} KiB"
        )
    print("\n".join(lines))
    stuck = [finish for finish in finishes if finish["graveyard_left"]]
    # At most one process, with one drop blocked in an abandoned receive
    # (seen in about 1 full run in 5): everything else must be given back.
    assert len(stuck) <= 1 and all(f["graveyard_left"] == 1 for f in stuck), stuck
    for finish in finishes:
        base = baselines[finish["pid"]]
        extra_threads, extra_fds = (
            (STUCK_DROP_THREADS, STUCK_DROP_FDS) if finish["graveyard_left"] else (0, 0)
        )
        assert abs(finish["threads"] - base["threads"]) <= THREAD_MARGIN + extra_threads, lines
        assert abs(finish["fds"] - base["fds"]) <= FD_MARGIN + extra_fds, lines
    # Rank 0 lived through all of them: each recovery kept its old group and
    # its abandoned all-reduce, and each was dropped about RELEASE_DELAY_S later.
    released = [e for e in events if e["event"] == "inproc_released" and e["rank"] == 0]
    blocked = sum(f["graveyard_left"] for f in stuck if f["rank"] == 0)  # a group's drop
    groups = [e for e in released if e["what"] == "ProcessGroup"]
    assert len(groups) == len(kills) - blocked, released
    print(
        f"rank 0 released {len(released)} items, held {max(e['held_s'] for e in released):.2f} s at most"
    )


def test_user_collective_in_the_step_is_woken(tmp_path: Path) -> None:
    """Rank 2 dies in its optimizer step: the survivors have all-reduced the
    gradient and wait in the script's own loss all-reduce (ckpt.all_reduce),
    which the recovery wakes (it returns False, the loss stays local) instead
    of the gloo timeout or a restart; the recovery then happens in the next
    step's all-reduce and the run ends bitwise equal."""

    def run(name: str, *flags: str) -> tuple[Launch, Path]:
        run_dir = tmp_path / name
        launch = jitckpt_run(
            *flags, str(TINY), "--run-dir", str(run_dir), "--steps", "10", "--log-loss",
            "--digest", str(tmp_path / f"{name}-digest"),
        )  # fmt: skip
        assert launch.returncode == 0, show(launch)
        return launch, run_dir

    _, ref_dir = run("ref")
    launch, run_dir = run("run", "--spares", "1", "--inject", "kill@step=5,rank=2,phase=optimizer")
    assert (tmp_path / "run-digest").read_text() == (tmp_path / "ref-digest").read_text()
    events = read_events(run_dir)
    assert summarize(events) == [], "no failure may take the restart path"
    assert [r["resumed_step"] for r in summarize_in_process(events)] == [6]
    abandoned = {e["rank"] for e in events if e["event"] == "inproc_collective_abandoned"}
    assert abandoned == {0, 1, 3}, abandoned

    def losses(run_dir: Path) -> dict[tuple[int, int], tuple[float, bool]]:
        lines = (run_dir / "losses.jsonl").read_text().splitlines()
        return {(r["rank"], r["step"]): (r["loss"], r["reduced"]) for r in map(json.loads, lines)}

    expected, got = losses(ref_dir), losses(run_dir)
    assert set(got) == set(expected) - {(2, 5)}, "rank 2 died before logging step 5"
    for key, (loss, reduced) in got.items():
        if key[1] == 5:
            assert not reduced, (key, got[key])
        else:
            assert reduced and loss == expected[key][0], (key, got[key], expected[key])


def test_a_plain_collective_in_the_step_falls_back_within_seconds_saying_why(
    tmp_path: Path,
) -> None:
    """Rank 2 dies in its optimizer step while the survivors wait in the
    script's own plain torch.distributed.all_reduce of the loss, which no
    recovery notice reaches. Gloo fails it on the survivors within
    milliseconds, so the launcher falls back to the restart path at once
    and says why; never a wait for gloo's 30-minute timeout."""
    run_dir = tmp_path / "run"
    launch = jitckpt_run(
        "--spares", "1", "--inject", "kill@step=5,rank=2,phase=optimizer",
        str(TINY), "--run-dir", str(run_dir), "--steps", "8", "--plain-loss-all-reduce",
    )  # fmt: skip
    assert launch.returncode == 0, show(launch)
    events = read_events(run_dir)
    (fallback,) = [e for e in events if e["event"] == "inproc_fallback"]
    assert (
        "(a survivor)" in fallback["reason"]
        and "failed during in-process recovery 1" in (fallback["reason"])
    ), fallback
    assert f"in-process recovery does not apply ({fallback['reason']})" in launch.output
    (injected,) = [e for e in events if e["event"] == "fault_injected"]
    assert fallback["t"] - injected["t"] < 5.0


def test_a_recovery_that_never_ends_is_abandoned_after_the_timeout(tmp_path: Path) -> None:
    """The fresh replacement for rank 2 never joins (it stalls before its
    setup), so the survivors wait in the new group's formation. After
    --recovery-timeout the launcher abandons the recovery, names the ranks
    that never finished it, and the restart path resumes the run."""
    run_dir = tmp_path / "run"
    timeout_s = 4.0
    launch = jitckpt_run(
        "--recovery-timeout", str(timeout_s), "--inject", "kill@step=5,rank=2,phase=backward",
        str(TINY), "--run-dir", str(run_dir), "--steps", "8", "--stall-replacement",
    )  # fmt: skip
    assert launch.returncode == 0, show(launch)
    events = read_events(run_dir)
    (fallback,) = [e for e in events if e["event"] == "inproc_fallback"]
    assert fallback["reason"].startswith("in-process recovery 1 not done after"), fallback
    assert "rank(s) [0, 1, 2, 3] never finished it" in fallback["reason"], fallback
    (begin,) = [e for e in events if e["event"] == "inproc_begin"]
    # The deadline runs from the notice, which the agent publishes just before
    # it starts the replacement and logs inproc_begin (a few ms later).
    assert timeout_s - 0.2 <= fallback["t"] - begin["t"] <= timeout_s + 2.0
    assert launch.resumed_steps() == [5], show(launch)


def test_the_same_fault_again_at_the_same_step_takes_the_restart_path(tmp_path: Path) -> None:
    """Rank 2 dies at the start of step 6; its replacement dies there too,
    and so does the next one: a persistent fault. After MAX_SAME_FAULT_TRIES
    in-process recoveries the launcher restarts every worker and says why."""
    from jitckpt.launch.coordinator import MAX_SAME_FAULT_TRIES

    run_dir = tmp_path / "run"
    launch = jitckpt_run(
        "--spares", "1", "--max-restarts", "0",
        str(TINY), "--run-dir", str(run_dir), "--steps", "10", "--die-at", "6", "2",
    )  # fmt: skip
    assert launch.returncode != 0, "no restart was allowed: the job ends at the fallback"
    output = launch.output
    reason = (
        f"rank 2 failed again at step 6 after {MAX_SAME_FAULT_TRIES} in-process recoveries "
        "of it: a persistent fault, not a transient one"
    )
    # With --max-restarts 0 the fallback is the end of the job, and it says so.
    then = "no restarts left (--max-restarts)"
    assert f"in-process recovery does not apply ({reason}); {then}" in output, show(launch)
    begun = [e for e in read_events(run_dir) if e["event"] == "inproc_begin"]
    assert [e["failed_rank"] for e in begun] == [2] * MAX_SAME_FAULT_TRIES, begun


def test_default_mode_kill_and_hang_are_recovered_in_process(
    tmp_path: Path, default_mode_reference: str
) -> None:
    """Default (non-deterministic) mode, the example GPT, one hot spare: a
    kill in backward and a hang in the all-reduce, each recovered without
    restarting the survivors, at most one iteration lost each, and the loss
    goes on as in the failure-free run (not bitwise: another dropout stream
    for the replacement)."""
    run_dir, digest = tmp_path / "run", tmp_path / "digest"
    launch = jitckpt_run(
        "--spares", "1",
        "--inject", "kill@step=4,rank=2,phase=backward",
        "--inject", "hang@step=8,rank=1,phase=allreduce",
        *default_mode_example_args(run_dir, digest),
    )  # fmt: skip
    check_in_process(run_dir, digest, None, launch, [4, 8], "spare")
    assert "in-process recovery does not apply" not in launch.output, show(launch)
    assert_loss_continues(launch.output, default_mode_reference, since=4, band=0.05)


@pytest.mark.parametrize("recovery", ["in-process", "restart"])
def test_a_crash_after_the_training_loop_ends_the_job_without_training_again(
    tmp_path: Path, recovery: str
) -> None:
    """Rank 1 aborts after its loop completed (in the script's code after
    the loop, or at exit): nothing is left to recover, so neither path
    restarts or replaces it (a restart would train again from the last
    checkpoint, here from scratch). The job fails, saying so."""
    from jitckpt.protocol import EXIT_FATAL

    run_dir = tmp_path / "run"
    flags = ["--spares", "1"] if recovery == "in-process" else ["--recovery", "restart"]
    launch = jitckpt_run(
        *flags, str(TINY), "--run-dir", str(run_dir), "--steps", "6", "--crash-after-loop", "1",
        nproc=2,
    )  # fmt: skip
    assert launch.returncode == EXIT_FATAL, show(launch)
    assert (
        "rank 1 (exit status -6) failed after finishing training; training is complete"
        in launch.output
    ), show(launch)
    events = read_events(run_dir)
    assert launch.output.count("start_step") == 2, show(launch)  # two workers, started once
    kinds = {e["event"] for e in events}
    assert not kinds & {"inproc_begin", "restart_begin", "inproc_fallback"}, sorted(kinds)
    assert sorted(e["rank"] for e in events if e["event"] == "finish") == [0, 1]
