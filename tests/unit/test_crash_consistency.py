"""Crash consistency of a checkpoint write: the writing process is SIGKILLed
at every point of a save (after each file it writes, and in the middle of the
payload); afterwards restore picks the new checkpoint only if it is complete,
otherwise the previous one, and never a torn one."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from jitckpt import storage
from jitckpt.state.archive import Archive

PAYLOAD_OLD = os.urandom(1 << 20)
PAYLOAD_NEW = os.urandom(3 << 20)


def manifest(step: int) -> storage.Manifest:
    return storage.Manifest(kind="jit", step=step, world_size=4, writer_rank=0, attempt=0)


def newest_valid(run_dir: Path) -> tuple[int, bytes] | None:
    for candidate, data, problem in storage.run_storage(run_dir).iter_valid():
        if problem is None and data is not None:
            return candidate.step, data
    return None


# The real payload: a tensor archive written chunk by chunk from tensors.
ARCHIVE_NEW = Archive({"w": torch.arange(3 << 18, dtype=torch.float32), "step": 3})


@pytest.mark.parametrize("payload", ["bytes", "archive"])
@pytest.mark.parametrize("point", storage.WRITE_POINTS)
def test_killed_writer_never_leaves_a_torn_checkpoint(
    tmp_path: Path, point: str, payload: str
) -> None:
    storage.run_storage(tmp_path).write(manifest(2), PAYLOAD_OLD)
    new = PAYLOAD_NEW if payload == "bytes" else ARCHIVE_NEW
    expected = PAYLOAD_NEW if payload == "bytes" else ARCHIVE_NEW.to_bytes()

    def die_at(name: str) -> None:
        if name == point:
            os.kill(os.getpid(), signal.SIGKILL)

    pid = os.fork()
    if pid == 0:  # the writer: dies at `point`
        try:
            storage.run_storage(tmp_path).write(manifest(3), new, on_point=die_at)
        finally:
            os._exit(1)  # never reached when the kill fires
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL

    chosen = newest_valid(tmp_path)
    if point == "renamed":
        assert chosen == (3, expected), "a renamed checkpoint is complete"
    else:
        assert chosen == (2, PAYLOAD_OLD), (
            f"killed at {point}: the previous checkpoint must be used"
        )
        assert [c.step for c in storage.run_storage(tmp_path).candidates()] == [2], (
            "a torn save is never a candidate"
        )
    storage.run_storage(tmp_path).remove_stale_temporaries()
    assert not list(storage.checkpoints_dir(tmp_path).glob(".tmp-*"))
