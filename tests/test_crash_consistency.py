"""Crash consistency of a checkpoint write: the writing process is SIGKILLed
at every point of a save (after each file it writes, and in the middle of the
payload); afterwards restore picks the new checkpoint only if it is complete,
otherwise the previous one, and never a torn one."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from jitckpt import storage

PAYLOAD_OLD = os.urandom(1 << 20)
PAYLOAD_NEW = os.urandom(3 << 20)


def manifest(step: int) -> dict:
    return {"kind": "jit", "step": step, "world_size": 4, "writer_rank": 0, "attempt": 0}


def newest_valid(run_dir: Path) -> tuple[int, bytes] | None:
    for candidate, data, problem in storage.iter_valid(run_dir):
        if problem is None and data is not None:
            return candidate.step, data
    return None


@pytest.mark.parametrize("point", storage.WRITE_POINTS)
def test_killed_writer_never_leaves_a_torn_checkpoint(tmp_path: Path, point: str) -> None:
    storage.write_checkpoint(tmp_path, manifest(2), PAYLOAD_OLD)

    def die_at(name: str) -> None:
        if name == point:
            os.kill(os.getpid(), signal.SIGKILL)

    pid = os.fork()
    if pid == 0:  # the writer: dies at `point`
        try:
            storage.write_checkpoint(tmp_path, manifest(3), PAYLOAD_NEW, on_point=die_at)
        finally:
            os._exit(1)  # never reached when the kill fires
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL

    chosen = newest_valid(tmp_path)
    if point == "renamed":
        assert chosen == (3, PAYLOAD_NEW), "a renamed checkpoint is complete"
    else:
        assert chosen == (2, PAYLOAD_OLD), (
            f"killed at {point}: the previous checkpoint must be used"
        )
        assert [c.step for c in storage.candidates(tmp_path)] == [2], (
            "a torn save is never a candidate"
        )
    storage.remove_stale_temporaries(tmp_path)
    assert not list(storage.checkpoints_dir(tmp_path).glob(".tmp-*"))
