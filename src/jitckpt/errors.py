"""Exceptions that jitckpt raises to users. Each message names the file or
setting at fault and what to do about it."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from jitckpt.protocol import EXIT_FATAL, ControlDir


class JitckptError(Exception):
    """Base class of every error jitckpt raises on purpose."""


class RunDirError(JitckptError):
    """The run directory cannot hold checkpoints (missing parent, a file,
    not writable). Raised before training starts."""


class CheckpointError(JitckptError):
    """A checkpoint on disk is unusable: partial, corrupt, foreign or stale."""


class CheckpointMismatchError(CheckpointError):
    """A valid checkpoint does not fit the model or job it is loaded into.
    Nothing is loaded or overwritten when this is raised."""


class CheckpointWriteError(JitckptError):
    """A checkpoint could not be written (disk full, I/O error). The partial
    copy is removed; older checkpoints are untouched. ``errno`` is the
    failed call's, when one failed."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno

    @property
    def full(self) -> bool:
        """The filesystem (or the user's quota on it) was full."""
        import errno

        return self.errno in (errno.ENOSPC, errno.EDQUOT)


class UsageError(JitckptError, TypeError):
    """jitckpt was handed something it cannot work with (a loader that cannot
    say its position, ...). Raised before training starts; no restart can get
    past it, so the launcher stops (exit 78) instead of retrying."""


class FaultSpecError(JitckptError, ValueError):
    """A fault-injection SPEC does not parse."""


class InjectedFault(RuntimeError):
    """Raised by ``--inject raise@...``: stands for a bug in the user's step."""


def exit_fatal(message: str, rank: int | str) -> NoReturn:
    """Print the error, tell the launcher not to restart (no attempt can get
    past this: jitckpt.protocol.ControlDir.report_fatal) and exit EXIT_FATAL."""
    print(f"jitckpt: error: {message}", file=sys.stderr, flush=True)
    control = ControlDir.from_env()
    if control is not None:
        control.report_fatal(rank, message)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_FATAL)
