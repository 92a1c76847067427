"""Checkpoints as directories on a filesystem: atomic writes, verification,
retention (:class:`DirectoryStorage`, the one implementation of
jitckpt.storage.base.Storage).

A checkpoint is a directory ``<root>/step-<N>-<kind>-a<attempt>-r<rank>``
holding ``state.pt`` (the payload, a jitckpt.state.archive) and
``manifest.json`` (jitckpt.storage.manifest, written last). A sharded checkpoint (jitckpt.checkpoint.sharded) holds more files,
written by several ranks into one temporary directory (:meth:`~DirectoryStorage.temporary`)
and committed by one of them (:meth:`~DirectoryStorage.commit`), which lists
every file with its size and checksum in the manifest. It is written under a temporary name, every file and the
directory fsynced, then renamed into place, and the parent directory
fsynced: a checkpoint exists only once it is complete, and a writer killed
mid-save leaves at most a ``.tmp-*`` directory that readers ignore and the
next job start removes, unless its writer is alive: a writer holds a lock
on ``.tmp-<name>-<pid>.lock`` (fcntl, so it holds across nodes on a shared
filesystem that supports locks) while its temporary directory exists, and
the cleanup skips a locked one. A failed write (a full disk) removes its
temporary directory and leaves every older checkpoint as it was. Files are
created through the temporary directory's file descriptor, never following
a symlink and never over an existing file.

It serves the durable run directory and host shared memory for staging
alike. An object store would implement the same interface, with a manifest
object written last playing the part of the rename.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import queue
import shutil
import threading
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from jitckpt.errors import CheckpointError, CheckpointWriteError
from jitckpt.storage.base import Candidate, Payload, WritePointHook
from jitckpt.storage.files import open_regular, read_regular, regular_size
from jitckpt.storage.manifest import MANIFEST, PAYLOAD, FileEntry, Manifest, read_manifest

CHECKPOINTS_DIR = "checkpoints"
_READ_CHUNK = 1 << 24


class _Bytes:
    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data
        self.size = len(data)

    def chunks(self) -> Iterable[bytes | bytearray | memoryview]:
        return (self.data,)


def checkpoints_dir(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def fsync_path(path: Path) -> None:
    """fsync a directory (or file) by path: its entries are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Flags of every file a write creates: through the directory's descriptor,
# never an existing file, never through a symlink.
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _write_file(
    directory: int,
    path: Path,
    payload: Payload,
    on_point: WritePointHook | None = None,
    mode: int = 0o666,
) -> tuple[int, str]:
    """Write, fsync, and return (size, crc32 hex). ``on_point("payload_half")``
    fires with exactly half the bytes on disk (mid-file for a crash test).
    The checksum is computed by a second thread while this one writes (both
    release the GIL): a JIT save to shared memory would otherwise spend as
    long on the CRC as on the copy."""
    half = payload.size // 2 if on_point is not None else -1
    written = 0
    checksum = _Crc32Thread()
    try:
        fd = os.open(path.name, _CREATE, mode, dir_fd=directory)
        with open(fd, "wb") as handle:
            for chunk in payload.chunks():
                view = memoryview(chunk).cast("B")
                for start in range(0, len(view), _PIECE):
                    piece = view[start : start + _PIECE]
                    checksum.feed(piece)
                    if written <= half < written + len(piece):
                        cut = half - written
                        handle.write(piece[:cut])
                        handle.flush()
                        on_point("payload_half")  # type: ignore[misc]
                        handle.write(piece[cut:])
                    else:
                        handle.write(piece)
                    written += len(piece)
            handle.flush()
            os.fsync(handle.fileno())
    finally:
        crc = checksum.result()
    if written != payload.size:
        raise CheckpointWriteError(f"{path}: wrote {written} bytes, expected {payload.size}")
    return written, f"{crc:08x}"


# Pieces the writer and the checksum thread hand over (big enough that the
# hand-over costs nothing, small enough that the two overlap).
_PIECE = 1 << 23


class _Crc32Thread:
    """A running CRC32 over pieces fed in order, computed on its own thread."""

    def __init__(self) -> None:
        self._pieces: queue.Queue[memoryview | None] = queue.Queue(maxsize=8)
        self._crc = 0
        self._thread = threading.Thread(target=self._run, name="jitckpt-crc32", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (piece := self._pieces.get()) is not None:
            self._crc = zlib.crc32(piece, self._crc)

    def feed(self, piece: memoryview) -> None:
        self._pieces.put(piece)

    def result(self) -> int:
        self._pieces.put(None)
        self._thread.join()
        return self._crc


class DirectoryStorage:
    """Checkpoints as directories under ``root`` on a filesystem."""

    def __init__(self, root: str | os.PathLike[str], private: bool = False) -> None:
        self.root = Path(root)
        self.location = str(self.root)
        # Staging in shared memory is private (0600 files, 0700 directories);
        # the run directory follows the umask.
        self.file_mode = 0o600 if private else 0o666
        self.dir_mode = 0o700 if private else 0o777
        # Checkpoints this process wrote or verified whole, by the identity of
        # their files (inode, size, mtime): pruning does not read them again.
        self._known_good: set[tuple[object, ...]] = set()

    def write(
        self,
        manifest: Manifest,
        payload: Payload | bytes | bytearray,
        on_point: WritePointHook | None = None,
    ) -> Path:
        """Write one checkpoint atomically and return its directory.
        The manifest's file table is filled in here. ``on_point(name)`` is called at each
        of WRITE_POINTS (fault injection and crash tests). Raises
        CheckpointWriteError (with nothing left behind) if the write fails."""
        body: Payload = _Bytes(payload) if isinstance(payload, (bytes, bytearray)) else payload
        point = on_point or (lambda _name: None)
        name = manifest.name
        final = self.root / name
        tmp = self.root / f".tmp-{name}-{os.getpid()}"
        locked = False  # the temporary directory is this writer's to remove
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=self.dir_mode)
            with _WriterLock(tmp, self.file_mode):
                locked = True
                _remove(tmp)  # a leftover of this pid's earlier life
                with self._new_dir(tmp) as directory:
                    point("tmp_created")
                    size, crc = _write_file(
                        directory, tmp / PAYLOAD, body, on_point, self.file_mode
                    )
                    point("payload_written")
                    self._publish(
                        directory, tmp, final, manifest, {PAYLOAD: FileEntry(size, crc)}, point
                    )
        except OSError as exc:
            if locked:
                _remove(tmp)
            raise CheckpointWriteError(self._explain(exc, name, body.size), exc.errno) from None
        point("renamed")
        fsync_path(self.root)
        self._remember(final)
        return final

    def temporary(self, manifest: Manifest) -> Path:
        """The temporary directory of a multi-writer checkpoint: a name every
        writer derives from the same manifest fields (kind, step, attempt,
        committing rank), so they meet there without talking. Created empty
        (a leftover of an interrupted save of the same name is removed)."""
        tmp = self.root / f".tmp-{manifest.name}-shared"
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=self.dir_mode)
            tmp.mkdir(exist_ok=True, mode=self.dir_mode)
        except OSError as exc:
            raise CheckpointWriteError(self._explain(exc, tmp.name, 0), exc.errno) from None
        return tmp

    def commit(self, tmp: Path, manifest: Manifest, payload: Payload | bytes) -> Path:
        """Finish a multi-writer checkpoint whose other files are already in
        ``tmp`` (written and fsynced by their writers): write ``payload`` as
        state.pt, list every file with size and CRC32, write the manifest
        last, fsync, rename into place. Same guarantees as :meth:`write`."""
        body: Payload = _Bytes(payload) if isinstance(payload, (bytes, bytearray)) else payload
        name = manifest.name
        final = self.root / name
        try:
            with _Dir(tmp) as directory:
                files: dict[str, FileEntry] = {}
                size, crc = _write_file(directory, tmp / PAYLOAD, body, None, self.file_mode)
                files[PAYLOAD] = FileEntry(size, crc)
                for path in sorted(tmp.iterdir()):
                    if path.name in (PAYLOAD, MANIFEST) or not path.is_file():
                        continue
                    files[path.name] = FileEntry(path.stat().st_size, _file_crc32(path))
                self._publish(directory, tmp, final, manifest, files, lambda _name: None)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointWriteError(self._explain(exc, name, body.size), exc.errno) from None
        fsync_path(self.root)
        self._remember(final)
        return final

    def _identity(self, path: Path) -> tuple[object, ...] | None:
        """What identifies a checkpoint's files on disk, None if unreadable."""
        try:
            return tuple(
                (f.name, st.st_ino, st.st_size, st.st_mtime_ns)
                for f in sorted(path.iterdir())
                for st in (f.lstat(),)
            )
        except OSError:
            return None

    def _remember(self, path: Path) -> None:
        identity = self._identity(path)
        if identity is not None:
            self._known_good.add((str(path), identity))

    def _is_known_good(self, path: Path) -> bool:
        return (str(path), self._identity(path)) in self._known_good

    def _publish(
        self,
        directory: int,
        tmp: Path,
        final: Path,
        manifest: Manifest,
        files: dict[str, FileEntry],
        point: WritePointHook,
    ) -> None:
        """The end of every write: the manifest (file table added) last, the
        directory fsynced, then renamed into place. Raises OSError."""
        body = _Bytes(manifest.replace(files=files).to_bytes())
        _write_file(directory, tmp / MANIFEST, body, None, self.file_mode)
        point("manifest_written")
        os.fsync(directory)
        if not os.path.samestat(os.lstat(tmp), os.fstat(directory)):
            raise OSError(errno.EEXIST, f"{tmp} was replaced while it was written")
        if not os.path.lexists(final):
            os.rename(tmp, final)
            return
        # The same step rewritten (a manual save twice): the old copy steps
        # aside under a name that is still a candidate, the new one takes its
        # place, then the old one goes. A crash at any point leaves a
        # complete copy that a reader takes.
        aside = final.with_name(f"{final.name}.replaced-{os.getpid()}")
        _remove(aside)
        os.rename(final, aside)
        os.rename(tmp, final)
        fsync_path(final.parent)
        _remove(aside)

    def _new_dir(self, path: Path) -> _Dir:
        """Create ``path`` and open it (never through a symlink)."""
        os.mkdir(path, self.dir_mode)
        return _Dir(path)

    def verify_files(self, candidate: Candidate) -> None:
        """Check size and checksum of every file the manifest lists (a
        sharded checkpoint's tensor files are read by torch.distributed.checkpoint,
        which does not check them)."""
        self.check_sizes(candidate)
        assert candidate.manifest is not None
        for name, entry in candidate.manifest.files.items():
            file_path = candidate.path / name
            expected = entry.checksum
            actual = (
                f"crc32:{_file_crc32(file_path, entry.size)}"
                if entry.crc32 is not None
                else _checksum(read_regular(file_path, entry.size), expected)
            )
            if actual != expected:
                raise CheckpointError(
                    f"{file_path}: checksum mismatch ({actual}, manifest says {expected}): "
                    f"the file is corrupt"
                )
        self._remember(candidate.path)

    def _explain(self, exc: OSError, name: str, size: int) -> str:
        where = f"checkpoint {name} in {self.root}"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            try:
                free = shutil.disk_usage(self.root).free
                room = f"; {free / 1e6:.1f} MB free, {size / 1e6:.1f} MB needed"
            except OSError:
                room = ""
            return (
                f"disk full while writing {where} ({exc.strerror}{room}). The partial copy was "
                f"removed and older checkpoints are untouched. Free space there or point "
                f"--run-dir at a larger volume."
            )
        return (
            f"could not write {where}: {exc.strerror or exc}. The partial copy was removed "
            f"and older checkpoints are untouched."
        )

    def candidates(self) -> list[Candidate]:
        """Every checkpoint, newest step first. Temporary directories of
        interrupted saves are not candidates."""
        found: list[Candidate] = []
        if not self.root.is_dir():
            return found
        for path in self.root.iterdir():
            if path.name.startswith(".") or path.is_symlink() or not path.is_dir():
                continue
            found.append(_candidate(path))
        found.sort(key=Candidate.sort_key)
        return found

    def find(self, name: str) -> Candidate | None:
        path = self.root / Path(name).name
        return _candidate(path) if path.is_dir() and not path.is_symlink() else None

    def read_verified(self, candidate: Candidate) -> bytearray:
        """The payload's bytes, after checking size and checksum."""
        if candidate.manifest is None:
            raise CheckpointError(candidate.problem or f"{candidate.path}: no manifest")
        entry = candidate.manifest.files.get(PAYLOAD)
        file_path = candidate.path / PAYLOAD
        if entry is None:
            raise CheckpointError(f"{candidate.path / MANIFEST}: lists no {PAYLOAD}")
        data = read_regular(file_path, entry.size)
        expected = entry.checksum
        actual = _checksum(data, expected)
        if actual != expected:
            raise CheckpointError(
                f"{file_path}: checksum mismatch ({actual}, manifest says {expected}): "
                f"the file is corrupt"
            )
        return data

    def check_sizes(self, candidate: Candidate) -> None:
        """The cheap check: every listed file exists with its recorded size."""
        if candidate.manifest is None:
            raise CheckpointError(candidate.problem or f"{candidate.path}: no manifest")
        for name, entry in candidate.manifest.files.items():
            file_path = candidate.path / name
            size = regular_size(file_path)
            if size != entry.size:
                raise CheckpointError(
                    f"{file_path}: truncated or padded: {size} bytes, manifest says {entry.size}"
                )

    def iter_valid(self) -> Iterator[tuple[Candidate, bytearray | None, str | None]]:
        """Candidates newest first, each with its verified payload or the
        reason it was refused."""
        for candidate in self.candidates():
            if candidate.problem is not None or candidate.manifest is None:
                yield candidate, None, candidate.problem
                continue
            try:
                yield candidate, self.read_verified(candidate), None
            except CheckpointError as exc:
                yield candidate, None, str(exc)

    def remove_stale_temporaries(self) -> list[Path]:
        """Remove ``.tmp-*`` leftovers of saves that were killed midway;
        returns what was removed. Called at startup, when a save of this
        node's last attempt is over, but a persister (of this node or
        another) may still be writing: a temporary directory whose writer
        holds its lock is left alone, and so is one whose lock cannot be
        checked (a filesystem without locks)."""
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        for path in sorted(self.root.glob(".tmp-*")):
            lock = path if path.name.endswith(_LOCK) else path.with_name(path.name + _LOCK)
            if not _WriterLock.abandoned(lock):
                continue
            if path != lock:
                _remove(path)
                removed.append(path)
            if not os.path.lexists(lock.with_name(lock.name[: -len(_LOCK)])):
                lock.unlink(missing_ok=True)
        return removed

    def prune(self, kind: str, keep: int, keep_from_step: int | None = None) -> list[Path]:
        """Remove all but the ``keep`` newest steps of one kind; returns what
        was removed. Several ranks' copies of one step count as one step, and
        only checkpoints that verify (every file's size and checksum) count:
        corrupt newer copies never cause a valid older one to go. Nothing at
        or after ``keep_from_step`` (the step just restored) is removed. Only
        the copies needed to find the ``keep`` newest valid steps are read,
        and of those only the ones this process has not written or verified
        already (files unchanged since)."""
        if keep <= 0:
            return []
        of_kind = [
            c for c in self.candidates() if c.manifest is not None and c.manifest.kind == kind
        ]
        kept: set[int] = set()
        for candidate in of_kind:  # newest first
            if len(kept) == keep:
                break
            if candidate.step in kept:
                continue
            try:
                if not self._is_known_good(candidate.path):
                    self.verify_files(candidate)
            except CheckpointError:
                continue
            kept.add(candidate.step)
        if len(kept) < keep:
            return []
        cutoff = min(kept)
        if keep_from_step is not None:
            cutoff = min(cutoff, keep_from_step)
        removed = []
        for candidate in of_kind:
            if candidate.step < cutoff:
                # Renamed away first: a process that ends mid-removal leaves a
                # .tmp-* directory (ignored, removed at the next start), not
                # half a checkpoint.
                doomed = self.root / f".tmp-pruned-{candidate.name}-{os.getpid()}"
                try:
                    os.rename(candidate.path, doomed)
                except OSError:
                    continue
                shutil.rmtree(doomed, ignore_errors=True)
                removed.append(candidate.path)
        return removed


_LOCK = ".lock"


class _WriterLock:
    """The lock a writer holds on ``<tmp>.lock`` while its temporary
    directory ``tmp`` exists: created before the directory, released
    (and removed) after the rename, so a cleanup that sees the directory
    and can take the lock knows its writer is gone. An fcntl lock: the
    kernel drops it when the writer dies, and NFS carries it across nodes."""

    def __init__(self, tmp: Path, mode: int) -> None:
        self.path = tmp.with_name(tmp.name + _LOCK)
        self.mode = mode
        self.fd = -1

    def __enter__(self) -> _WriterLock:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        self.fd = os.open(self.path, flags, self.mode)
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                os.close(self.fd)
                raise  # held: another writer of this very name
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)

    @staticmethod
    def abandoned(lock: Path) -> bool:
        """Whether no live writer holds ``lock`` (a missing lock file is an
        older jitckpt's leftover, or a writer already done)."""
        try:
            fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # held by a live writer, or not checkable
        finally:
            os.close(fd)
        return True


class _Dir:
    """An open directory (a context manager of its descriptor), never
    reached through a symlink."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def __enter__(self) -> int:
        return self.fd

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def _remove(path: Path) -> None:
    """Remove a directory tree or whatever else is at ``path`` (a symlink
    itself, never what it points to); nothing there is fine."""
    if os.path.islink(path) or os.path.isfile(path):
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _file_crc32(path: Path, size: int | None = None) -> str:
    """The CRC32 of a regular file (of ``size`` bytes when given; a link,
    a FIFO or a device is refused by open_regular before any read)."""
    crc = 0
    with os.fdopen(open_regular(path, size), "rb") as handle:
        while chunk := handle.read(_READ_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def run_storage(run_dir: str | os.PathLike[str]) -> DirectoryStorage:
    """The durable storage of a run directory."""
    return DirectoryStorage(checkpoints_dir(run_dir))


def _checksum(data: bytes | bytearray, like: str) -> str:
    if like.startswith("sha256:"):
        return "sha256:" + hashlib.sha256(data).hexdigest()
    crc = 0
    view = memoryview(data)
    for start in range(0, len(view), _READ_CHUNK):
        crc = zlib.crc32(view[start : start + _READ_CHUNK], crc)
    return f"crc32:{crc:08x}"


def _candidate(path: Path) -> Candidate:
    try:
        return Candidate(path, read_manifest(path), None)
    except CheckpointError as exc:
        return Candidate(path, None, str(exc))
