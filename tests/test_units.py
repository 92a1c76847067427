"""Unit tests of the pieces that need no processes: spec parsing, storage,
step tracking, the summary arithmetic."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from jitckpt import storage
from jitckpt.analysis.summary import summarize
from jitckpt.errors import CheckpointError, FaultSpecError
from jitckpt.inject import FaultSpec, parse_spec, parse_specs
from jitckpt.tracker import StepTracker


def test_parse_spec_defaults_and_fields() -> None:
    assert parse_spec("kill@step=5,rank=2") == FaultSpec("kill", 5, 2, "forward")
    assert parse_spec(" term@rank=0,step=7,phase=optimizer ") == FaultSpec(
        "term", 7, 0, "optimizer"
    )
    assert [str(s) for s in parse_specs("kill@step=1,rank=0;raise@step=2,rank=1,phase=data")] == [
        "kill@step=1,rank=0,phase=forward",
        "raise@step=2,rank=1,phase=data",
    ]


@pytest.mark.parametrize(
    "bad",
    ["kill", "kill@", "kill@step=1,rank=0,step=2", "kill@step=-1,rank=0", "kill@step=1,rank=0,"],
)
def test_parse_spec_rejects(bad: str) -> None:
    with pytest.raises(FaultSpecError, match=repr(bad.strip())[1:-1].replace("[", r"\[")):
        parse_spec(bad)


def manifest(step: int, rank: int = 0) -> storage.Manifest:
    return storage.Manifest(kind="jit", step=step, world_size=1, writer_rank=rank, attempt=0)


def test_write_is_atomic_and_verified(tmp_path: Path) -> None:
    path = storage.run_storage(tmp_path).write(manifest(3), b"payload-bytes")
    assert path.name == "step-000000003-jit-a0-r0"
    store = storage.run_storage(tmp_path)
    found = store.find(path.name)
    assert found is not None and found.manifest.files["state.pt"].size == len(b"payload-bytes")
    assert store.read_verified(found) == b"payload-bytes"
    assert not list(storage.checkpoints_dir(tmp_path).glob(".tmp-*"))


def test_interrupted_write_leaves_no_candidate(tmp_path: Path) -> None:
    storage.run_storage(tmp_path).write(manifest(1), b"old")

    def die(point: str) -> None:
        if point == "payload_written":
            raise KeyboardInterrupt  # stands for the process dying before the manifest

    with pytest.raises(KeyboardInterrupt):
        storage.run_storage(tmp_path).write(manifest(2), b"new", on_point=die)
    found = storage.run_storage(tmp_path).candidates()
    assert [c.step for c in found] == [1]
    storage.run_storage(tmp_path).remove_stale_temporaries()
    assert not list(storage.checkpoints_dir(tmp_path).glob(".tmp-*"))


def test_garbled_and_foreign_manifests_are_refused_with_reasons(tmp_path: Path) -> None:
    good = storage.run_storage(tmp_path).write(manifest(1), b"x")
    garbled = storage.run_storage(tmp_path).write(manifest(2), b"y")
    (garbled / storage.MANIFEST).write_text("{not json")
    foreign = storage.run_storage(tmp_path).write(manifest(3), b"z")
    data = json.loads((foreign / storage.MANIFEST).read_text())
    data["format"] = "someone-else/9"
    (foreign / storage.MANIFEST).write_text(json.dumps(data))
    results = [(c.step, problem) for c, _, problem in storage.run_storage(tmp_path).iter_valid()]
    assert results[0] == (1, None)
    problems = sorted(p for _, p in results[1:])
    assert any("not valid JSON" in p and str(garbled) in p for p in problems)
    assert any("not a jitckpt/1 manifest" in p and str(foreign) in p for p in problems)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        (good / storage.PAYLOAD).write_bytes(b"q")
        store = storage.run_storage(tmp_path)
        store.read_verified(store.find(good.name))


def test_newest_step_wins_then_lowest_rank(tmp_path: Path) -> None:
    for step, rank in [(4, 3), (5, 2), (5, 1), (3, 0)]:
        storage.run_storage(tmp_path).write(manifest(step, rank), b"p")
    assert [
        (c.step, c.manifest.writer_rank) for c in storage.run_storage(tmp_path).candidates()
    ] == [
        (5, 1),
        (5, 2),
        (4, 3),
        (3, 0),
    ]


def test_tracker_freeze_waits_for_the_dirty_window_to_end() -> None:
    tracker = StepTracker()
    tracker.boundary(0)
    tracker.optimizer_pre_hook()
    result: list = []

    def saver() -> None:
        result.append(tracker.freeze_clean(timeout=5))

    thread = threading.Thread(target=saver)
    thread.start()
    time.sleep(0.05)
    assert not result, "must not capture while the optimizer step runs"
    loop = threading.Thread(target=tracker.boundary, args=(1,))
    loop.start()  # parks at the gate after publishing the clean state
    thread.join(5)
    assert result and result[0][0].completed == 1 and not result[0][0].dirty
    assert loop.is_alive(), "the training thread is held while the state is saved"
    tracker.unfreeze()
    loop.join(5)
    assert not loop.is_alive()


def test_tracker_freeze_gives_up_on_a_stuck_dirty_window() -> None:
    tracker = StepTracker()
    tracker.boundary(3)
    tracker.optimizer_pre_hook()
    started = time.monotonic()
    assert tracker.freeze_clean(timeout=0.2) is None
    assert time.monotonic() - started >= 0.2


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
