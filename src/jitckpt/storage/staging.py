"""Shared-memory staging of JIT checkpoints.

A JIT save runs while the job is failing: the faster it ends, the sooner
the job restarts and the smaller the chance that the saver dies too. With
staging on, the save goes to host shared memory (``/dev/shm``) at memory
speed, and a detached persister process (jitckpt.storage.persist) copies it to the
durable run directory, where other nodes and later jobs find it. A restore
on the same node prefers the staged copy (valid and the same checksum);
otherwise it reads the durable one.

Shared memory is shared by every local user, so staging lives in a private
directory: ``STAGE_DIR/jitckpt-<uid>`` (mode 0700, owned by this user, not a
symlink; anything else turns staging off with a warning, never follows it),
then one directory per run directory, named by the run directory's device
and inode and the run id (``run-<dev>-<ino>-<run id>``): two copies of one
run directory (same run id) never share staged checkpoints. Staged files
are 0600, directories 0700. A JIT save that finds shared memory full is
written to the run directory instead (jitckpt.checkpoint.saver).

A staged copy lives only while it may be useful: once a resumed job has
completed a step and the copy is persisted, it is removed, and the whole
staging directory of the run goes at normal exit. At the end of a job,
preempted or not, the launcher waits (bounded) for the persisters and
removes the staged copies that are persisted (:func:`settle`). Shared
memory is RAM: a node keeps at most the copies of one failure.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from jitckpt.errors import RunDirError
from jitckpt.storage.directory import CHECKPOINTS_DIR, DirectoryStorage

STAGE_ENV = "JITCKPT_STAGE_DIR"
# How long the launcher waits at the end of a job for the persisters still
# copying staged checkpoints (a few GB take seconds; a wedged filesystem
# must not hold the job's exit forever).
PERSIST_WAIT_S = 60.0


class StagingUnsafe(RunDirError):
    """A staging directory that another user could control (not ours, not
    private, a symlink): staging is turned off instead of using it."""


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


def private_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700) or check the one there: a real directory
    (not a symlink), owned by this user, with no access for group or
    others. Raises StagingUnsafe otherwise."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StagingUnsafe(f"cannot create {path}: {exc.strerror or exc}") from None
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise StagingUnsafe(f"{path} is not a directory (a symlink or a file someone planted)")
    if info.st_uid != os.geteuid():
        raise StagingUnsafe(f"{path} belongs to uid {info.st_uid}, not to this user")
    if info.st_mode & 0o077:
        raise StagingUnsafe(f"{path} is open to other users (mode {info.st_mode & 0o777:o})")
    return path


def user_root(stage_dir: Path) -> Path:
    """This user's private directory under the shared staging directory.
    The shared directory must keep others from replacing it: not writable
    by others, or sticky (as /dev/shm and /tmp are)."""
    shared = os.stat(stage_dir)
    if shared.st_mode & 0o002 and not shared.st_mode & stat.S_ISVTX:
        raise StagingUnsafe(
            f"{stage_dir} is writable by every user and not sticky: another user could "
            f"replace jitckpt's directory there"
        )
    return private_dir(stage_dir / f"jitckpt-{os.geteuid()}")


def run_key(run_dir: Path, run_id: str) -> str:
    """The staging name of one run directory: its device and inode (a copy
    of the run directory has other ones) and its run id (a new run
    directory at a reused inode has another one)."""
    info = os.stat(run_dir)
    return f"run-{info.st_dev}-{info.st_ino}-{run_id}"


class Staging:
    """The staged checkpoints of one run directory on this node, in this
    user's private staging directory (raises StagingUnsafe if it is not
    private; see :meth:`open`)."""

    def __init__(self, stage_dir: Path, run_id: str, durable: DirectoryStorage, run_dir: Path):
        self.root = private_dir(user_root(stage_dir) / run_key(run_dir, run_id))
        self.storage = DirectoryStorage(private_dir(self.root / CHECKPOINTS_DIR), private=True)
        self.durable = durable
        self.run_dir = run_dir
        self.run_id = run_id

    @classmethod
    def open(
        cls, stage_dir: Path, run_id: str, durable: DirectoryStorage, run_dir: Path
    ) -> Staging | None:
        """Staging of this run, or None (said on stderr) when the staging
        directory is not safe to use: JIT saves then go to the run directory."""
        try:
            return cls(stage_dir, run_id, durable, run_dir)
        except StagingUnsafe as exc:
            print(
                f"jitckpt: staging off, JIT checkpoints go to the run directory: {exc}",
                file=sys.stderr,
                flush=True,
            )
            return None

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
        """Remove staged copies of this run whose durable copy is in place
        (same checksum); returns their names. Unpersisted copies stay."""
        return remove_persisted(self.storage, self.durable, self.run_id)

    def remove_all(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def record(self) -> str:
        """What the launcher needs to tidy this run's staging (:func:`settle`)."""
        return "\n".join((str(self.root), str(self.durable.root), self.run_id))


def settle(
    persisters: dict[int, str],
    timeout: float = PERSIST_WAIT_S,
    say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> list[str]:
    """The launcher's end of a job (finished, failed or preempted): wait up
    to ``timeout`` for the persisters (pid -> :meth:`Staging.record`), then
    in each run's staging directory remove the persisted copies, the
    temporary directories no live writer holds, and the directories left
    empty. Returns the names of the copies removed. A copy not persisted
    stays (the resubmitted job on this node resumes from it)."""
    deadline = time.monotonic() + timeout
    running = [pid for pid in persisters if _alive(pid)]
    if running:
        say(
            f"jitckpt: waiting up to {timeout:g} s for {len(running)} persister(s) to copy "
            f"staged checkpoints to the run directory"
        )
    while running and time.monotonic() < deadline:
        time.sleep(0.05)
        running = [pid for pid in running if _alive(pid)]
    if running:
        say(
            f"jitckpt: persisters {', '.join(map(str, running))} still running after "
            f"{timeout:g} s; their staged copies stay in shared memory"
        )
    removed: list[str] = []
    for record in sorted(set(persisters.values())):
        try:
            root, durable, run_id = record.split("\n")
            staged = DirectoryStorage(Path(root) / CHECKPOINTS_DIR, private=True)
        except ValueError:
            continue
        staged.remove_stale_temporaries()
        removed += remove_persisted(staged, DirectoryStorage(durable), run_id)
        for empty in (staged.root, Path(root)):
            try:
                os.rmdir(empty)
            except OSError:
                break  # copies not persisted stay
    return removed


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def remove_persisted(staged: DirectoryStorage, durable: DirectoryStorage, run_id: str) -> list[str]:
    """Remove the staged copies of run ``run_id`` whose durable copy is in
    place (same checksum, another directory); returns their names."""
    removed = []
    for candidate in staged.candidates():
        if candidate.manifest is None or candidate.manifest.run_id != run_id:
            continue
        found = durable.find(candidate.name)
        if found is None or found.checksum != candidate.checksum or found.checksum is None:
            continue
        if os.path.samefile(found.path, candidate.path):
            continue  # one directory seen twice: never remove the durable copy
        shutil.rmtree(candidate.path, ignore_errors=True)
        removed.append(candidate.name)
    return removed
