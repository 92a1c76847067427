"""The README's main command (scripts/demo.sh), shortened, end to end: the
restart path (JIT save, resume, summary, checkpoint table), then the same
failure recovered in process by a hot spare."""

from __future__ import annotations

from pathlib import Path

from jobs import REPO, run_tagged, show


def test_demo_script_trains_fails_saves_resumes_and_summarizes(tmp_path: Path) -> None:
    run_dir = tmp_path / "demo"
    launch = run_tagged(
        ["bash", str(REPO / "scripts" / "demo.sh")],
        env={"JITCKPT_SKIP_INSTALL": "1", "DEMO_STEPS": "12", "DEMO_RUN_DIR": str(run_dir)},
    )
    assert launch.returncode == 0, show(launch)
    out = launch.output
    restart, _, inprocess = out.partition("== 2. in process")
    assert "jitckpt: resumed from step 6 (jit checkpoint" in restart, show(launch)
    assert "jitckpt summary for" in restart and "1 failure(s)" in restart
    assert "iterations lost: 1" in restart and "valid  step-000000006-jit" in restart
    assert (run_dir / "digest.txt").read_text().strip()
    assert "resumed from step" not in inprocess, "nothing restarts in process"
    assert "1 in-process recovery(ies) (survivors kept running)" in inprocess, show(launch)
    assert "rank 2 replaced by a spare process" in inprocess
    assert "resumed at step 6, iterations lost: 1" in inprocess
    # The dead worker named by its rank (elastic's own line would say
    # "local_rank: 0": each worker has a process context of its own).
    assert "jitckpt: rank 2 killed by SIGKILL" in inprocess, show(launch)
    assert "local_rank: 0" not in inprocess, show(launch)
    assert (tmp_path / "demo-inprocess" / "digest.txt").read_text().strip()
    # The console tells the failure's story; the survivors' tracebacks of the
    # collective the dead rank broke are in the worker logs it names.
    assert "Traceback (most recent call last)" not in out, show(launch)
    assert "UserWarning" not in out, show(launch)
    # Survivors that saw their collective break (not all do: the launcher's
    # SIGTERM can reach a rank first) say so in one line each, and their
    # tracebacks are in the logs the summary names.
    broke = restart.count("a collective failed, as it does when a peer fails")
    assert broke >= restart.count(":collective_error"), show(launch)
    logs = sorted((run_dir / "logs").glob("attempt-0-rank-*.log"))
    assert len(logs) == broke and all("Traceback" in log.read_text() for log in logs), logs
    named = f"worker detail (the tracebacks of collectives a failed peer broke): {run_dir}/logs/"
    assert (named in restart) == (broke > 0), show(launch)
