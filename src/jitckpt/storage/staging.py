"""Shared-memory staging of JIT checkpoints.

A JIT save runs while the job is failing: the faster it ends, the sooner
the job restarts and the smaller the chance that the saver dies too. With
staging on, the save goes to host shared memory (``/dev/shm``) at memory
speed, and a detached persister process (jitckpt.storage.persist) copies it to the
durable run directory, where other nodes and later jobs find it. A restore
on the same node prefers the staged copy (valid and the same checksum);
otherwise it reads the durable one.

A staged copy lives only while it may be useful: once a resumed job has
completed a step and the copy is persisted, it is removed, and the whole
staging directory of the run goes at normal exit. Shared memory is RAM:
a node keeps at most the copies of one failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from jitckpt.errors import RunDirError
from jitckpt.storage.directory import CHECKPOINTS_DIR, DirectoryStorage

STAGE_ENV = "JITCKPT_STAGE_DIR"


def resolve_stage_dir(stage_dir: str | os.PathLike[str] | None) -> Path | None:
    """The staging directory asked for (argument, else $JITCKPT_STAGE_DIR),
    checked; None when staging is off."""
    chosen = stage_dir if stage_dir is not None else os.environ.get(STAGE_ENV) or None
    if chosen is None:
        return None
    path = Path(chosen)
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise RunDirError(
            f"staging directory {path} is not a writable directory; pass an existing "
            f"directory in host shared memory (usually /dev/shm) or turn staging off"
        )
    return path


class Staging:
    """The staged checkpoints of one run on this node."""

    def __init__(self, stage_dir: Path, run_id: str, durable: DirectoryStorage, run_dir: Path):
        self.root = stage_dir / f"jitckpt-{run_id}"
        self.storage = DirectoryStorage(self.root / CHECKPOINTS_DIR)
        self.durable = durable
        self.run_dir = run_dir

    def persist_in_background(self, staged: Path, rank: int, attempt: int) -> int:
        """Start a detached process that copies ``staged`` to durable
        storage; returns its pid. Detached (own session) so that it outlives
        this process, which is about to exit, and the launcher's cleanup of
        the worker's process group."""
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jitckpt.storage.persist",
                str(staged),
                str(self.durable.root),
                str(self.run_dir),
                "--rank",
                str(rank),
                "--attempt",
                str(attempt),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        return process.pid

    def remove_persisted(self) -> list[str]:
        """Remove staged copies whose durable copy is in place (same
        checksum); returns their names. Unpersisted copies stay."""
        removed = []
        for candidate in self.storage.candidates():
            durable = self.durable.find(candidate.name)
            if durable is not None and durable.checksum == candidate.checksum is not None:
                shutil.rmtree(candidate.path, ignore_errors=True)
                removed.append(candidate.name)
        return removed

    def remove_all(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
