"""Exceptions that jitckpt raises to users. Each message names the file or
setting at fault and what to do about it."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn


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
    copy is removed; older checkpoints are untouched."""


class FaultSpecError(JitckptError, ValueError):
    """A fault-injection SPEC does not parse."""


class InjectedFault(RuntimeError):
    """Raised by ``--inject raise@...``: stands for a bug in the user's step."""


# Exit status of a worker (and of ``jitckpt run``) that stopped after saving a
# JIT checkpoint because of a preemption: EX_TEMPFAIL from sysexits.h, "try
# again later". Schedulers requeue on it; running the same command resumes.
EXIT_SAVED_AND_STOPPED = 75
# Exit status of a worker that hit an error no restart can fix (a checkpoint
# that does not fit the model, an unusable run directory). The launcher stops
# restarting when a worker reports one.
EXIT_FATAL = 78  # EX_CONFIG


def exit_fatal(message: str, rank: int | str) -> NoReturn:
    """Print the error, tell the launcher not to restart (a file in its
    control directory: no attempt can get past this) and exit EXIT_FATAL."""
    print(f"jitckpt: error: {message}", file=sys.stderr, flush=True)
    control = os.environ.get("JITCKPT_CONTROL_DIR")
    if control:
        Path(control, f"fatal-{rank}").write_text(message)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_FATAL)
