"""The attempt timeline and goodput of `jitckpt report`
(jitckpt.analysis.timeline), from a hand-made event log; bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jitckpt.analysis.timeline import build


def test_directory_without_event_log_is_an_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "jitckpt", "report", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "has no events.jsonl" in done.stderr and str(tmp_path) in done.stderr


def event(t: float, name: str, attempt: int | None = None, **fields: object) -> dict:
    record: dict = {"t": t, "event": name, "launch": "L", **fields}
    if attempt is not None:
        record["attempt"] = attempt
    return record


def test_goodput_of_a_hand_made_log() -> None:
    # Attempt 0 trains steps 0..3 from t=1 to the boundary of step 4 at 4.5
    # (detected at 5.5, 1.0 s after that boundary); the failure at 5 loses
    # 0.5 s. Attempt 1 restores step 4 (8.5 .. 9) and finishes 8 steps at 13.
    log = [
        event(0.1, "start", 0, rank=0, process_start=0.0),
        event(1.0, "fresh_start", 0, rank=0),
        event(5.0, "fault_injected", 0, rank=1, spec="kill@step=4,rank=1", step=4),
        event(5.2, "worker_failed", failed_rank=1),
        event(
            5.5, "detect", 0, rank=0, cause="collective_error", completed=4, since_boundary_s=1.0
        ),
        event(6.0, "save", 0, rank=0, step=4),
        event(8.2, "start", 1, rank=0, process_start=8.0),
        event(9.0, "restore", 1, rank=0, step=4, kind="jit", duration=0.5),
        event(13.0, "finish", 1, rank=0, step=8),
        event(14.0, "job_end", outcome="finished", status=0),
    ]
    result = build(log)
    assert result["wall_s"] == pytest.approx(14.0)
    # kept: 1 .. 4.5 and 9 .. 13
    assert result["kept_training_s"] == pytest.approx(3.5 + 4.0)
    assert result["goodput"] == pytest.approx(7.5 / 14.0)
    totals = result["phase_totals_s"]
    assert totals == pytest.approx(
        {
            "startup": 1.0 + 0.5,
            "restore": 0.5,
            "training kept": 7.5,
            "training lost": 0.5,
            "detection": 0.5,
            "save": 0.5,
            "restart": 2.0,
            "exit": 1.0,
        }
    )
    assert [a["kept_steps"] for a in result["attempts"]] == [4, 4]
