"""Shared-memory staging (jitckpt.storage.staging) against another local
user: a private per-user directory that nobody else can plant in, read or
swap; names that two copies of one run directory do not share; a full
shared memory that sends the JIT checkpoint to the run directory; the
launcher's wait for the persisters; and a cleanup that leaves a live
writer's temporary directory alone.

The attacks run as root, with a forked child that setuid()s to another uid
(nobody, 65534) playing the other user; they skip when not root."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_restorer import rank_context, restore, save_at, tiny_model

from jitckpt import storage
from jitckpt.errors import CheckpointWriteError
from jitckpt.events import read_events
from jitckpt.storage import directory as directory_module
from jitckpt.storage.rundir import prepare_run_dir, run_id
from jitckpt.storage.staging import (
    Staging,
    StagingUnsafe,
    _alive,
    remove_persisted,
    run_key,
    settle,
    user_root,
)

OTHER_UID = 65534
SHM = Path("/dev/shm")
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: a forked child setuid()s to play another local user"
)


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Path]:
    """A directory every user may write, sticky, like /dev/shm."""
    path = Path(tempfile.mkdtemp(prefix="jitckpt-test-", dir=SHM if SHM.is_dir() else tmp_path))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def as_other_user(action: Callable[[], object]) -> object:
    """Run ``action`` in a forked child as uid 65534; its result, or the
    exception it raised (as the child's traceback text), comes back. The
    child starts no thread and imports nothing (this process may hold
    torch's threads: only plain system calls are safe after fork)."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(reader)
        try:
            os.setgroups([])
            os.setgid(OTHER_UID)
            os.setuid(OTHER_UID)
            outcome = repr(action())
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            outcome = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        os.write(writer, outcome.encode())
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        result = pipe.read()
    os.waitpid(pid, 0)
    return result


def durable_run(tmp_path: Path) -> tuple[Path, storage.DirectoryStorage, str]:
    run_dir = prepare_run_dir(tmp_path / "run")
    durable = storage.run_storage(run_dir)
    identity = run_id(run_dir)
    for step in (2, 4):
        durable.write(manifest(step, identity), b"durable-%d" % step)
    return run_dir, durable, identity


def manifest(step: int, identity: str | None) -> storage.Manifest:
    return storage.Manifest(kind="jit", step=step, world_size=1, attempt=0, run_id=identity)


def durable_names(durable: storage.DirectoryStorage) -> list[str]:
    return [c.name for c in durable.candidates()]


# -- the other user plants before the job ------------------------------------------------
@needs_root
def test_a_planted_checkpoints_symlink_is_refused_and_nothing_is_lost(
    tmp_path: Path, shared: Path
) -> None:
    run_dir, durable, identity = durable_run(tmp_path)
    before = durable_names(durable)
    mine = shared / f"jitckpt-{os.geteuid()}"
    run_root = mine / run_key(run_dir, identity)

    def plant() -> str:
        os.makedirs(run_root, mode=0o777)
        os.chmod(mine, 0o777)
        os.symlink(durable.root, run_root / "checkpoints")
        return "planted"

    assert as_other_user(plant) == "'planted'"
    with pytest.raises(StagingUnsafe, match=f"belongs to uid {OTHER_UID}"):
        Staging(shared, identity, durable, run_dir)
    assert Staging.open(shared, identity, durable, run_dir) is None  # staging off, said
    assert durable_names(durable) == before


@needs_root
def test_a_planted_symlink_as_the_users_directory_is_refused(tmp_path: Path, shared: Path) -> None:
    run_dir, durable, identity = durable_run(tmp_path)
    theirs = shared / "theirs"

    def plant() -> str:
        theirs.mkdir(mode=0o777)
        os.symlink(theirs, shared / "jitckpt-0")
        return "planted"

    assert as_other_user(plant) == "'planted'"
    with pytest.raises(StagingUnsafe, match="not a directory"):
        Staging(shared, identity, durable, run_dir)
    assert list(theirs.iterdir()) == [], "nothing was written through the symlink"


@needs_root
def test_a_planted_checkpoint_without_run_id_is_never_seen(tmp_path: Path, shared: Path) -> None:
    run_dir, durable, identity = durable_run(tmp_path)
    run_root = shared / f"jitckpt-{os.geteuid()}" / run_key(run_dir, identity)

    def plant() -> str:
        planted = run_root / "checkpoints" / manifest(99, None).name
        os.makedirs(planted, mode=0o700)
        (planted / "state.pt").write_bytes(b"42")
        (planted / "manifest.json").write_bytes(manifest(99, None).to_bytes())
        return "planted"

    assert as_other_user(plant) == "'planted'"
    assert Staging.open(shared, identity, durable, run_dir) is None
    # And inside a private directory of this user, a staged copy without
    # this run's id is refused by the restorer (test_restorer.py).


def test_tidying_staging_never_removes_the_durable_copy_it_compares_with(tmp_path: Path) -> None:
    """The deletion the planted symlink caused: staging seen through a link
    to the run directory's checkpoints finds each durable copy "persisted"
    (same checksum) and must not remove it."""
    _run_dir, durable, identity = durable_run(tmp_path)
    before = durable_names(durable)
    through_link = tmp_path / "linked"
    os.symlink(durable.root, through_link)
    assert remove_persisted(storage.DirectoryStorage(through_link), durable, identity) == []
    assert durable_names(durable) == before


# -- the other user against a job's private staging ----------------------------------------
@needs_root
def test_staged_files_are_private_and_cannot_be_read_planted_or_swapped(
    tmp_path: Path, shared: Path
) -> None:
    run_dir, durable, identity = durable_run(tmp_path)
    staging = Staging(shared, identity, durable, run_dir)
    path = staging.storage.write(manifest(6, identity), b"secret-weights")
    for entry in [staging.root, *staging.root.rglob("*")]:
        mode = stat.S_IMODE(entry.lstat().st_mode)
        assert mode == (0o700 if entry.is_dir() else 0o600), (entry, oct(mode))
    mine = user_root(shared)
    assert stat.S_IMODE(mine.stat().st_mode) == 0o700
    tmp = staging.storage.root / f".tmp-{manifest(8, identity).name}-{os.getpid()}"

    def attack() -> list[str]:
        refused = []
        for name, attempt in (
            ("read manifest", lambda: (path / "manifest.json").read_bytes()),
            ("list", lambda: os.listdir(mine)),
            ("plant checkpoint", lambda: (staging.storage.root / "step-000000099-jit").mkdir()),
            ("swap temporary", lambda: os.symlink("/etc", tmp)),
            ("replace root", lambda: os.rename(mine, shared / "gone")),
        ):
            try:
                attempt()
            except PermissionError:
                refused.append(name)
        return refused

    assert as_other_user(attack) == repr(
        ["read manifest", "list", "plant checkpoint", "swap temporary", "replace root"]
    )
    assert staging.storage.write(manifest(8, identity), b"next").parent == staging.storage.root


def test_a_swapped_temporary_directory_is_never_written_through(tmp_path: Path) -> None:
    """Defence in depth (no other user can reach a private staging
    directory): the temporary directory replaced by a symlink, before the
    write or while it runs, never makes the write touch another file."""
    target = tmp_path / "victim"
    target.mkdir()
    (target / "state.pt").write_bytes(b"precious")
    store = storage.DirectoryStorage(tmp_path / "checkpoints")
    store.root.mkdir()
    m = manifest(3, "r")
    tmp = store.root / f".tmp-{m.name}-{os.getpid()}"
    os.symlink(target, tmp)  # planted before the write
    assert store.write(m, b"new").name == m.name
    assert (target / "state.pt").read_bytes() == b"precious"

    m = manifest(4, "r")
    tmp = store.root / f".tmp-{m.name}-{os.getpid()}"

    def swap(point: str) -> None:
        if point == "tmp_created":  # while the write runs
            os.rename(tmp, tmp_path / "moved")
            os.symlink(target, tmp)

    with pytest.raises(CheckpointWriteError, match="replaced while it was written"):
        store.write(m, b"new", on_point=swap)
    assert sorted(p.name for p in target.iterdir()) == ["state.pt"]
    assert (target / "state.pt").read_bytes() == b"precious"
    assert [c.step for c in store.candidates()] == [3]
    assert not os.path.lexists(tmp)


def test_two_copies_of_a_run_directory_do_not_share_staging(tmp_path: Path, shared: Path) -> None:
    run_dir, durable, identity = durable_run(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    assert run_id(copy) == identity
    first = Staging(shared, identity, durable, run_dir)
    staged = first.storage.write(manifest(6, identity), b"unpersisted")
    second = Staging(shared, identity, storage.run_storage(copy), copy)
    assert second.root != first.root
    assert second.storage.candidates() == []
    second.remove_persisted()
    second.remove_all()
    assert first.storage.find(staged.name) is not None


# -- full shared memory ------------------------------------------------------------------
def test_a_full_staging_sends_the_jit_checkpoint_to_the_run_directory(
    tmp_path: Path, shared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = rank_context(tmp_path / "run", *tiny_model(0))
    ctx.staging = Staging(shared, ctx.run_id, ctx.storage, ctx.run_dir)
    real = directory_module._write_file

    def full(directory: int, path: Path, *args: object, **kwargs: object) -> tuple[int, str]:
        if str(path).startswith(str(shared)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(directory, path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(directory_module, "_write_file", full)
    path = save_at(ctx, 3)
    assert path.parent == ctx.storage.root
    assert ctx.storage.find(path.name) is not None
    events = read_events(ctx.run_dir)
    full_events = [e for e in events if e["event"] == "staging_full"]
    assert len(full_events) == 1 and "disk full" in full_events[0]["error"], events
    saves = [e for e in events if e["event"] == "save"]
    assert [(e["staged"], e["persister_pid"]) for e in saves] == [(False, None)]
    assert ctx.staging.storage.candidates() == []
    assert not list(ctx.staging.storage.root.iterdir()), "the partial staged copy is gone"


# -- the launcher's end of a job -----------------------------------------------------------
def test_settle_waits_for_the_persisters_then_frees_what_they_persisted(
    tmp_path: Path, shared: Path
) -> None:
    run_dir, durable, identity = durable_run(tmp_path)
    staging = Staging(shared, identity, durable, run_dir)
    persisted = staging.storage.write(manifest(6, identity), b"six")
    unpersisted = staging.storage.write(manifest(8, identity), b"eight")
    # A persister still copying step 6 for 0.3 s.
    copier = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(0.3)"], start_new_session=True
    )
    said: list[str] = []
    started = time.monotonic()
    durable.write(manifest(6, identity), b"six")
    removed = settle({copier.pid: staging.record()}, timeout=5, say=said.append)
    copier.wait()
    assert removed == [persisted.name]
    assert 0.2 < time.monotonic() - started < 5
    assert said and "waiting up to 5 s for 1 persister" in said[0]
    assert [c.name for c in staging.storage.candidates()] == [unpersisted.name]
    # Bounded: a persister that never ends is named and left.
    stuck = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        said.clear()
        settle({stuck.pid: staging.record()}, timeout=0.2, say=said.append)
        assert "still running after 0.2 s" in said[-1]
    finally:
        stuck.kill()
        stuck.wait()
    durable.write(manifest(8, identity), b"eight")
    settle({stuck.pid: staging.record()}, timeout=1)
    assert not staging.root.exists(), "an empty run staging directory is removed"


# -- startup cleanup -----------------------------------------------------------------------
# Another process (fresh: forking this one, which has torch's threads, may
# deadlock) writes checkpoint step 5 and pauses with half its payload
# written until a line arrives on its stdin.
SLOW_WRITER = """
import sys
from jitckpt.storage import DirectoryStorage, Manifest

def pause(point):
    if point == "payload_half":
        print("ready", flush=True)
        sys.stdin.readline()

manifest = Manifest(kind="jit", step=5, world_size=1, attempt=0, run_id="r")
DirectoryStorage(sys.argv[1]).write(manifest, b"x" * 4096, on_point=pause)
"""


@contextlib.contextmanager
def paused_writer(store: storage.DirectoryStorage) -> Iterator[subprocess.Popen[str]]:
    """The writer, paused; ``writer.stdin.close()`` lets it finish."""
    writer = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITER, str(store.root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "ready\n"
        yield writer
    finally:
        if writer.stdin is not None and not writer.stdin.closed:
            writer.stdin.close()
        writer.wait(30)


def test_cleanup_leaves_a_live_writers_directory_and_removes_a_dead_ones(tmp_path: Path) -> None:
    store = storage.DirectoryStorage(tmp_path / "checkpoints")
    with paused_writer(store) as writer:
        (live,) = [p for p in store.root.glob(".tmp-*") if p.is_dir()]
        assert store.remove_stale_temporaries() == []
        assert live.is_dir() and (live / "state.pt").exists()
    assert writer.returncode == 0
    assert [c.step for c in store.candidates()] == [5]
    assert list(store.root.glob(".tmp-*")) == []
    # A writer that died midway: its directory and lock go.
    shutil.rmtree(store.root)
    with paused_writer(store) as dead:
        dead.kill()
    leftovers = sorted(p.name for p in store.root.glob(".tmp-*"))
    assert len(leftovers) == 2, leftovers  # the directory and its lock file
    assert [p.name for p in store.remove_stale_temporaries()] == [leftovers[0]]
    assert list(store.root.glob(".tmp-*")) == []


def test_a_staged_checkpoint_without_this_runs_id_is_refused_on_restore(
    tmp_path: Path, shared: Path
) -> None:
    ctx = rank_context(tmp_path / "run", *tiny_model(0))
    durable_copy = save_at(ctx, 3)
    ctx.staging = Staging(shared, ctx.run_id, ctx.storage, ctx.run_dir)
    planted = ctx.staging.storage.root / durable_copy.name
    shutil.copytree(durable_copy, planted)
    forged = storage.read_manifest(planted).replace(run_id=None)
    (planted / "manifest.json").write_bytes(forged.to_bytes())
    assert restore(ctx) == 3
    refused = [e for e in read_events(ctx.run_dir) if e["event"] == "checkpoint_refused"]
    assert [(e["path"], "no run id" in e["reason"]) for e in refused] == [(str(planted), True)]
    (restored,) = [e for e in read_events(ctx.run_dir) if e["event"] == "restore"]
    assert restored["source"] == "durable"


def test_a_writer_never_removes_another_live_writers_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two writers of one temporary name (another node's persister with the
    same pid on a shared filesystem): the second fails, the first's
    directory stays."""
    store = storage.DirectoryStorage(tmp_path / "checkpoints")
    with paused_writer(store) as writer:
        (theirs,) = [p for p in store.root.glob(".tmp-*") if p.is_dir()]
        # This process takes their name: their lock is held, so it backs off.
        with monkeypatch.context() as patch, pytest.raises(CheckpointWriteError):
            patch.setattr(os, "getpid", lambda: writer.pid)
            store.write(manifest(5, "r"), b"mine")
        assert theirs.is_dir() and theirs.with_name(theirs.name + ".lock").exists()
    assert writer.returncode == 0 and [c.step for c in store.candidates()] == [5]
    assert store.read_verified(store.candidates()[0]) == b"x" * 4096


def test_startup_cleanup_during_a_persisters_copy_leaves_it_alone(
    tmp_path: Path, shared: Path
) -> None:
    """Issue 16's multi-node loss: rank 0's startup cleanup ran while a
    persister wrote its copy to the run directory (256 MB, mid-write) and
    removed it. Here a real persister copies 128 MB while the cleanup runs
    as soon as its temporary directory appears."""
    run_dir, durable, identity = durable_run(tmp_path)
    staging = Staging(shared, identity, durable, run_dir)
    staged = staging.storage.write(manifest(6, identity), os.urandom(1 << 20) * 128)
    persister = staging.persist_in_background(staged, rank=1, attempt=0)
    seen, removed = 0, []
    deadline = time.monotonic() + 60
    while _alive(persister) and time.monotonic() < deadline:
        if any(p.is_dir() for p in durable.root.glob(".tmp-*")):
            seen += 1
            removed += durable.remove_stale_temporaries()
        time.sleep(0.001)
    print(f"cleanup ran {seen} times during the persister's write; removed {removed}")
    assert seen > 0, "the persister's write was never caught in flight"
    assert removed == []
    events = [e["event"] for e in read_events(run_dir) if e.get("role") == "persister"]
    assert events == ["persisted"]
    found = durable.find(staged.name)
    assert found is not None and found.checksum == staging.storage.find(staged.name).checksum
