"""Turns SIGTERM into a call on a side thread, even while the main thread is
stuck inside a gloo collective.

A Python ``signal.signal`` handler runs only between bytecodes of the main
thread, so it never runs in a rank blocked in gloo (docs/platform.md,
"SIGTERM in a rank blocked in gloo").
Two mechanisms, chosen by what the process looks like when it is installed:

* ``sigwait`` (preferred): SIGTERM is blocked with ``pthread_sigmask`` in the
  main thread before any other thread exists, so every later thread inherits
  the mask, and a dedicated thread collects it with ``sigwait``. The worker
  bootstrap of ``jitckpt run`` installs it as its very first action.
* ``wakeup-fd`` (fallback, when threads already exist, e.g. a script started
  by plain torchrun that imported torch first): a blocked mask would not
  cover the older threads, and one of them would take the default action
  (die). Instead a C-level handler is installed and ``signal.set_wakeup_fd``
  makes it write the signal number to a pipe that a side thread reads; that
  write happens in whichever thread the kernel picked.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable

from jitckpt.protocol import NOTICE_SIGNAL

# SIGTERM: the launcher's or a scheduler's stop; NOTICE_SIGNAL: the launcher
# published an in-process recovery notice.
HANDLED_SIGNALS = (signal.SIGTERM, NOTICE_SIGNAL)

_lock = threading.Lock()
_callback: Callable[[int], None] | None = None
_notice_callback: Callable[[], None] | None = None
_mechanism: str | None = None


def _default_action(signum: int) -> None:
    # No training state registered yet (still importing, building the model):
    # nothing to save, so behave like the default disposition would.
    sys.stderr.flush()
    os._exit(128 + signum)


def set_callback(callback: Callable[[int], None] | None) -> None:
    """Route handled signals to ``callback(signum)`` (called on a side thread)."""
    global _callback
    with _lock:
        _callback = callback


def set_notice_callback(callback: Callable[[], None] | None) -> None:
    """Route NOTICE_SIGNAL to ``callback()`` (on a side thread); without one
    it is ignored (no recovery to wake yet)."""
    global _notice_callback
    with _lock:
        _notice_callback = callback


def _dispatch(signum: int) -> None:
    with _lock:
        callback = _callback
        notice = _notice_callback
    if signum == NOTICE_SIGNAL:
        if notice is not None:
            notice()
        return
    (callback or _default_action)(signum)


def mechanism() -> str | None:
    return _mechanism


def install() -> str:
    """Install the signal thread once per process; returns the mechanism used.
    Must be called from the main thread."""
    global _mechanism
    if _mechanism is not None:
        return _mechanism
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("jitckpt.detect.signals.install() must run on the main thread")
    # A child this process forks (a DataLoader worker) has no signal thread:
    # SIGTERM must kill it as usual, or multiprocessing's terminate() at the
    # end of training would wait for it forever.
    os.register_at_fork(after_in_child=_default_signals_in_child)
    if _native_thread_count() == 1:
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        threading.Thread(target=_sigwait_loop, name="jitckpt-sigwait", daemon=True).start()
        _mechanism = "sigwait"
    else:
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, lambda *_: None)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        threading.Thread(
            target=_wakeup_loop, args=(read_fd,), name="jitckpt-sigwakeup", daemon=True
        ).start()
        _mechanism = "wakeup-fd"
    return _mechanism


def _default_signals_in_child() -> None:
    global _mechanism
    _mechanism = None
    try:
        signal.set_wakeup_fd(-1)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
    except ValueError:  # forked from a thread other than the main one
        pass
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)


def _sigwait_loop() -> None:
    while True:
        signum = signal.sigwait(HANDLED_SIGNALS)
        _dispatch(signum)


def _wakeup_loop(read_fd: int) -> None:
    while True:
        data = os.read(read_fd, 64)
        for signum in data:
            if signum in HANDLED_SIGNALS:
                _dispatch(signum)


def _native_thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()
