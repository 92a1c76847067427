"""The README's main command (scripts/demo.sh), shortened, end to end."""

from __future__ import annotations

from pathlib import Path

from jobs import REPO, run_tagged, show


def test_demo_script_trains_fails_saves_resumes_and_summarizes(tmp_path: Path) -> None:
    run_dir = tmp_path / "demo"
    launch = run_tagged(
        ["bash", str(REPO / "scripts" / "demo.sh")],
        env={"JITCKPT_SKIP_INSTALL": "1", "DEMO_STEPS": "24", "DEMO_RUN_DIR": str(run_dir)},
    )
    assert launch.returncode == 0, show(launch)
    out = launch.output
    assert "jitckpt: resumed from step 12 (jit checkpoint" in out, show(launch)
    assert "jitckpt summary for" in out and "1 failure(s)" in out and "iterations lost: 1" in out
    assert "valid  step-000000012-jit" in out
    assert (run_dir / "digest.txt").read_text().strip()
