"""The per-failure summary (jitckpt.analysis.summary), from hand-made event logs."""

from __future__ import annotations

import pytest

from jitckpt.analysis.summary import summarize


def test_summary_counts_lost_iterations_and_durations() -> None:
    events = [
        {"t": 0.0, "event": "start", "attempt": 0, "launch": "L", "rank": 0, "process_start": 0.0},
        {
            "t": 10.0,
            "event": "fault_injected",
            "attempt": 0,
            "launch": "L",
            "rank": 2,
            "spec": "kill@step=6,rank=2,phase=optimizer",
            "step": 6,
        },
        {
            "t": 10.02,
            "event": "detect",
            "attempt": 0,
            "launch": "L",
            "rank": 1,
            "cause": "collective_error",
            "completed": 7,
        },
        {"t": 10.05, "event": "save", "attempt": 0, "launch": "L", "rank": 1, "step": 7},
        {"t": 10.06, "event": "worker_failed", "rank": "agent", "failed_rank": 2, "exitcode": -9},
        {
            "t": 15.0,
            "event": "start",
            "attempt": 1,
            "launch": "L",
            "rank": 0,
            "process_start": 13.05,
        },
        {
            "t": 16.0,
            "event": "restore",
            "attempt": 1,
            "launch": "L",
            "rank": 0,
            "step": 7,
            "kind": "jit",
            "duration": 0.2,
        },
        {"t": 16.5, "event": "first_step_done", "attempt": 1, "launch": "L", "rank": 0, "step": 8},
    ]
    (failure,) = summarize(events)
    assert failure["resumed_step"] == 7
    assert failure["iterations_lost"] == 1
    assert failure["detection_s"] == pytest.approx(0.02)
    assert failure["save_s"] == pytest.approx(0.03)
    assert failure["spawn_s"] == pytest.approx(3.0)
    assert failure["restart_s"] == pytest.approx(15.8 - 10.05)
    assert failure["recovery_s"] == pytest.approx(6.5)
    assert failure["failed_ranks"] == [2]


def _write_events(run_dir, events) -> None:
    import json

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def test_a_failure_the_job_never_came_back_from_is_said_in_words(tmp_path) -> None:
    """No restore after the failure (the job gave up): the summary says so
    instead of printing "None" anywhere."""
    from jitckpt.analysis.summary import format_summary

    _write_events(
        tmp_path,
        [
            {"t": 0.0, "event": "start", "attempt": 0, "launch": "L", "rank": 0},
            {"t": 1.0, "event": "detect", "attempt": 0, "launch": "L", "rank": 0,
             "cause": "exception", "completed": 3},
            {"t": 1.1, "event": "worker_failed", "rank": "agent", "failed_rank": 0,
             "exitcode": 1},
        ],
    )  # fmt: skip
    text = format_summary(tmp_path, "failed")
    assert "None" not in text, text
    assert "not resumed (no rank restored a state after it)" in text, text
    assert "no checkpoint restored" in text, text


def test_an_injected_fault_that_never_fired_is_named(tmp_path) -> None:
    from jitckpt.analysis.summary import format_summary

    fired = "kill@step=3,rank=1,phase=forward"
    missed = "kill@step=99,rank=2,phase=backward"
    _write_events(
        tmp_path,
        [
            {"t": 0.0, "event": "start", "attempt": 0, "launch": "L", "rank": 0},
            {"t": 1.0, "event": "fault_injected", "attempt": 0, "launch": "L", "rank": 1,
             "spec": fired, "kind": "kill", "step": 3, "phase": "forward"},
        ],
    )  # fmt: skip
    text = format_summary(tmp_path, "finished", [fired, missed])
    assert f"injected fault {missed} never fired" in text, text
    assert f"injected fault {fired} never fired" not in text, text
