"""In-process recovery drills: real `jitckpt run` jobs at 4 ranks on gloo in
deterministic mode; a fault is injected and the failed rank alone is
replaced (a hot spare, or a fresh process) while the survivors keep running.
The final digest must equal a failure-free run's, the survivors' pids must
not change, and at most one iteration may be lost per failure."""

from __future__ import annotations

from pathlib import Path

import pytest
from jobs import EXAMPLE, Launch, jitckpt_run, show

from jitckpt.events import read_events
from jitckpt.summary import summarize, summarize_in_process

STEPS = 12
FAIL_STEP = 6


def train_args(run_dir: Path, digest: Path, steps: int = STEPS) -> list[str]:
    return [
        str(EXAMPLE), "--steps", str(steps), "--run-dir", str(run_dir), "--digest", str(digest),
        "--log-every", "1", "--deterministic",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference_digest(tmp_path_factory: pytest.TempPathFactory) -> str:
    base = tmp_path_factory.mktemp("reference")
    launch = jitckpt_run(*train_args(base / "run", base / "digest"))
    assert launch.returncode == 0, show(launch)
    return (base / "digest").read_text().strip()


def check_in_process(
    run_dir: Path,
    digest: Path,
    reference: str,
    launch: Launch,
    resumed: list[int],
    replacement: str,
) -> list[dict]:
    """Finished, bitwise equal, no restart, one recovery per failure at the
    expected steps, each losing at most one iteration, survivors unchanged."""
    assert launch.returncode == 0, show(launch)
    assert digest.read_text().strip() == reference, "final state differs from the failure-free run"
    events = read_events(run_dir)
    assert summarize(events) == [], "no failure may take the restart path"
    assert launch.resumed_steps() == [], show(launch)
    # A spare or replacement learns its rank before the script reads it: only
    # the real rank 0 prints the header (a spare used to see itself as rank 0).
    assert launch.output.count("GPT with") == 1, show(launch)
    recoveries = summarize_in_process(events)
    assert [r["resumed_step"] for r in recoveries] == resumed, recoveries
    original = {e["rank"]: e["pid"] for e in events if e["event"] == "start" and not e["joined"]}
    for recovery in recoveries:
        assert recovery["replacement"] == replacement, recovery
        assert recovery["iterations_lost"] is not None and recovery["iterations_lost"] <= 1
        assert recovery["recovery_s"] is not None, recovery
    # Survivors never restart: every rank that did not fail kept its first pid.
    failed = {r["failed_rank"] for r in recoveries}
    finishers = {e["rank"]: e["pid"] for e in events if e["event"] == "finish"}
    for rank, pid in finishers.items():
        if rank not in failed:
            assert pid == original[rank], (rank, pid, original[rank])
    return recoveries


def drill(
    tmp_path: Path, reference: str, resumed: list[int], replacement: str, *flags: str
) -> None:
    launch = jitckpt_run(*flags, *train_args(tmp_path / "run", tmp_path / "digest"))
    check_in_process(tmp_path / "run", tmp_path / "digest", reference, launch, resumed, replacement)


@pytest.mark.parametrize(
    ("phase", "resumed"),
    [("forward", FAIL_STEP), ("backward", FAIL_STEP), ("allreduce", FAIL_STEP), ("optimizer", FAIL_STEP + 1)],
)  # fmt: skip
def test_kill_with_a_hot_spare(
    tmp_path: Path, reference_digest: str, phase: str, resumed: int
) -> None:
    spec = f"kill@step={FAIL_STEP},rank=2,phase={phase}"
    drill(tmp_path, reference_digest, [resumed], "spare", "--spares", "1", "--inject", spec)


def test_kill_without_spares_spawns_a_fresh_process(tmp_path: Path, reference_digest: str) -> None:
    spec = f"kill@step={FAIL_STEP},rank=2,phase=forward"
    drill(tmp_path, reference_digest, [FAIL_STEP], "fresh", "--inject", spec)


def test_hang_in_backward_with_a_hot_spare(tmp_path: Path, reference_digest: str) -> None:
    spec = f"hang@step={FAIL_STEP},rank=2,phase=backward"
    drill(tmp_path, reference_digest, [FAIL_STEP], "spare", "--spares", "1", "--inject", spec)


def test_three_failures_refill_the_spare_pool(tmp_path: Path, reference_digest: str) -> None:
    drill(
        tmp_path, reference_digest, [3, 6, 9], "spare", "--spares", "1",
        "--inject", "kill@step=3,rank=1,phase=backward",
        "--inject", "kill@step=6,rank=2,phase=allreduce",
        "--inject", "kill@step=9,rank=1,phase=forward",
    )  # fmt: skip


@pytest.mark.parametrize(("victim", "rank"), [("its replacement", 2), ("a survivor", 1)])
def test_failure_during_recovery_falls_back_to_restart(
    tmp_path: Path, reference_digest: str, victim: str, rank: int
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
    assert digest.read_text().strip() == reference_digest, "final state differs"
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
