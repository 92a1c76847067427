"""Opening the files of a checkpoint for reading, refusing what is not a
regular file of the expected size before a byte is read.

A checkpoint directory is input like any other: a FIFO in place of a
payload would block a reader for ever, a symlink to ``/dev/zero`` or a
sparse file of 64 GB would make it allocate without bound, and a link
could point outside the run directory. Every read of a checkpoint file goes
through :func:`open_regular`: the file is opened with ``O_NOFOLLOW`` (a
symlink is refused) and ``O_NONBLOCK`` (a FIFO does not block the open),
``fstat`` must say it is a regular file, and its size is checked against
what the manifest records (or a bound) before anything is read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from jitckpt.errors import CheckpointError

_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def open_regular(path: Path, size: int | None = None, limit: int | None = None) -> int:
    """A read-only descriptor of ``path``, a regular file (not a symlink, a
    FIFO, a device or a directory) of exactly ``size`` bytes (when given) and
    of at most ``limit`` bytes (when given); CheckpointError otherwise, with
    nothing read. The caller closes it."""
    try:
        fd = os.open(path, _FLAGS)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file missing") from None
    except OSError as exc:
        # ELOOP: a symlink (O_NOFOLLOW); ENXIO: a FIFO or socket with no writer.
        raise CheckpointError(
            f"{path}: cannot be opened as a regular file ({exc.strerror}); a checkpoint's "
            f"files are never links, pipes or devices: refused"
        ) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(
                f"{path}: not a regular file ({_kind(info.st_mode)}); a checkpoint's files "
                f"are never links, pipes or devices: refused"
            )
        if size is not None and info.st_size != size:
            raise CheckpointError(
                f"{path}: truncated or padded: {info.st_size} bytes, manifest says {size}"
            )
        if limit is not None and info.st_size > limit:
            raise CheckpointError(
                f"{path}: {info.st_size} bytes, more than the {limit} this version ever "
                f"writes there (garbled or forged): refused"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: Path, size: int | None = None, limit: int | None = None) -> bytearray:
    """The bytes of ``path`` after :func:`open_regular`'s checks; exactly
    the size checked (a file that changes while read is refused)."""
    fd = open_regular(path, size, limit)
    try:
        expected = os.fstat(fd).st_size
        data = bytearray(expected)
        view = memoryview(data)
        got = 0
        while got < expected:
            n = os.readv(fd, [view[got:]])
            if n == 0:
                break
            got += n
        extra = os.read(fd, 1) if got == expected else b""
    finally:
        os.close(fd)
    if got != expected or extra:
        raise CheckpointError(f"{path}: changed size while read ({got} of {expected} bytes)")
    return data


def regular_size(path: Path) -> int:
    """The size of ``path`` without opening it, CheckpointError if it is
    missing or not a regular file (a symlink is not followed)."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file missing") from None
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(
            f"{path}: not a regular file ({_kind(info.st_mode)}); a checkpoint's files are "
            f"never links, pipes or devices: refused"
        )
    return info.st_size


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a plain file"
