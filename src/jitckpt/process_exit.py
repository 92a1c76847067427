"""Ending a jitckpt process without Python's finalization: a worker (where
finalizing can be unsafe, and is always slow), the launcher and the warm
pool's zygote.

Slow: finalizing an interpreter that has imported torch took 0.5-0.6 s here
(measured: end of script to process reaped; 0.02 s with ``os._exit``), and
a 4-rank launch ended 0.75 s sooner when its workers skipped it, paid by
every job and every restart.

Unsafe: an in-process recovery abandons the old group's pending gloo calls
(nothing cancels them: docs/platform.md, "Nothing cancels a pending gloo
call"). Such a call ends only when a peer's process exits and closes its
connections, and jitckpt waits on these calls from Python, through a
callback on their futures. If a peer exits while this interpreter is
finalizing, gloo's thread fails the call and must take the GIL to run (or
free) that callback; CPython ends a thread that asks for the GIL during
finalization with ``pthread_exit``, whose unwinding through C++ calls
``std::terminate``: the process aborts (SIGABRT, "terminate called after
throwing an instance of 'gloo::IoException'") after training finished, and
the launcher sees a failed worker. Measured: every cold-started survivor
whose abandoned call had not ended by the end of its script.

So the worker's entry point (jitckpt.launch.bootstrap) ends the process as
Python would (non-daemon threads joined, atexit handlers run, the script's
open files and stdio flushed, the same exit status) but with ``os._exit``,
which skips the teardown of modules and objects. What a script loses is what
Python does not promise at exit anyway: ``__del__`` of objects still alive.
``JITCKPT_FINALIZE=1`` asks for the full finalization, which the worker then
gets unless a registered check (:func:`register`) says it is unsafe.

The launcher (``jitckpt run``) and the zygote always end this way: once
they are done (workers stopped, the event log written line by line, output
flushed) nothing of theirs is left to finalize.

Torch-free and stdlib-only: the bootstrap imports it before torch.
"""

from __future__ import annotations

import atexit
import gc
import io
import os
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

# Set to 1 in a worker's environment to have Python finalize it as usual.
FINALIZE_ENV = "JITCKPT_FINALIZE"

_checks: list[Callable[[], bool]] = []
_lock = threading.Lock()


def register(check: Callable[[], bool]) -> None:
    """Add ``check()``: True while finalizing the interpreter is unsafe."""
    with _lock:
        _checks.append(check)


def unregister(check: Callable[[], bool]) -> None:
    with _lock:
        if check in _checks:
            _checks.remove(check)


def unsafe() -> bool:
    """Whether any registered check says finalization is unsafe now (a check
    that fails counts as unsafe: skipping finalization loses nothing the
    atexit handlers and flushed stdio do not cover)."""
    with _lock:
        checks = list(_checks)
    for check in checks:
        try:
            if check():
                return True
        except Exception:  # noqa: BLE001 - see the docstring
            return True
    return False


def finalize_wanted() -> bool:
    """The worker should end through Python's finalization: asked for
    (FINALIZE_ENV) and safe now."""
    return os.environ.get(FINALIZE_ENV) == "1" and not unsafe()


_script_end: list[Callable[[int], None]] = []


def on_script_end(callback: Callable[[int], None]) -> None:
    """Call ``callback(status)`` when the script run by jitckpt's bootstrap
    has ended by itself (returned, or raised SystemExit): a loop whose end is
    the script's end (jitckpt.checkpoint.loop) finishes there."""
    with _lock:
        _script_end.append(callback)


def forget_script_end(callback: Callable[[int], None]) -> None:
    with _lock:
        if callback in _script_end:
            _script_end.remove(callback)


def script_ended(status: int) -> None:
    """The bootstrap's call: the script ended with ``status``."""
    with _lock:
        callbacks = list(_script_end)
        _script_end.clear()
    for callback in callbacks:
        callback(status)


def status_of(exc: SystemExit, *, quiet: bool = False) -> int:
    """The exit status Python gives ``SystemExit(code)`` (printing a
    non-integer code to stderr, as Python does, unless ``quiet``)."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    if not quiet:
        print(code, file=sys.stderr)
    return 1


def end_process(status: int) -> NoReturn:
    """End the process as the end of the script would, minus finalization."""
    current = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not current and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    flush_open_files()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def flush_open_files() -> None:
    """Flush every open, writable Python file object (what finalization does
    as it frees them): a script's unclosed log or results file keeps what it
    wrote."""
    for obj in gc.get_objects():
        # type(), not isinstance(): isinstance reads __class__, which some
        # objects (torch's deprecated aliases) answer with a warning.
        if issubclass(type(obj), (io.BufferedWriter, io.BufferedRandom, io.TextIOWrapper)):
            try:
                if not obj.closed and obj.writable():
                    obj.flush()
            except (OSError, ValueError):
                continue  # a broken pipe, a full disk: as finalization, go on
