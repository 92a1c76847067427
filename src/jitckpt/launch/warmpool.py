"""A warm process pool ("zygote") for the workers of ``jitckpt run``.

Why: on any failure the elastic agent restarts every worker, and a fresh
worker spends most of its restart starting an interpreter and importing
torch (about 1.8 s each, CPU-bound; 4 ranks on 2 cores took ~6.5 s from spawn
to the script's first line), then ~1 s more on its first optimizer step for
a lazy ``torch._dynamo`` import (docs/platform.md, "Time from a failure to the first step after a restart"). A zygote pays for those
imports once per launch; every worker after that is a ``fork()`` of it, which
shares the imported modules copy-on-write and starts in milliseconds.

The pieces:

* launcher side, :func:`start_pool`: binds a Unix socket in a private temp
  directory (mode 0700), starts the zygote with the listening socket and a
  lifeline pipe, and exports the socket path in ``JITCKPT_WARMPOOL_SOCKET``
  so that the workers elastic starts inherit it. The socket exists before the
  launcher goes on, so workers started while the zygote still imports torch
  wait in the listen backlog instead of falling back.
* the zygote (``python -u -m jitckpt.launch.warmpool serve``, jitckpt.launch.zygote): blocks SIGTERM
  before importing anything heavy (threads started by imports inherit the
  mask; see jitckpt.detect.signals), imports :data:`PRELOAD_MODULES`, then serves
  one fork per connection from a single-threaded select loop. It never starts
  a thread: ``fork()`` copies only the calling thread, so any lock another
  thread held would stay locked forever in the child.
* the client (``python -u -m jitckpt.launch.warmpool client SCRIPT ARGS...``,
  jitckpt.launch.warmclient), the
  process elastic starts, watches and signals: it sends its argv, cwd,
  environment, umask and stdin/stdout/stderr (SCM_RIGHTS) to the zygote,
  forwards the signals elastic sends to the real worker, and exits with the
  worker's status, dying by the same signal when the worker was killed (so
  elastic sees -9 for a SIGKILLed worker). It imports only the standard
  library. With no zygote to answer it execs ``python -u -m jitckpt.launch.bootstrap``
  itself (one line on stderr says so).
* the worker (the forked child): its own session like elastic's workers, the
  client's stdio, cwd, umask and environment, then ``jitckpt.launch.bootstrap.main``,
  the same path a cold worker takes (the signal thread is installed while the
  child has its one thread).

Lifetimes: the zygote reaps its workers and reports each exit status to the
client; when a client's connection closes (the agent SIGKILLed it after the
grace) the zygote SIGKILLs that worker, so a worker never outlives its
client. When the launcher closes the lifeline, or dies, the zygote kills any
worker left and exits.

Known differences from a cold worker: ``/proc/PID/environ`` and
``/proc/PID/cmdline`` of a worker show the zygote's (the launcher's
environment when the pool started), not the environment set after the fork;
the string hash seed is the zygote's; CUDA must not be initialised in the
zygote (it never is: only imports run there). Environment variables that the
interpreter or native libraries read once at start-up (jitckpt.launch.wire.startup_env)
must be the same for zygote and worker, otherwise the zygote refuses and the
client falls back to a cold start.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import TYPE_CHECKING

from jitckpt.launch.wire import say, startup_env
from jitckpt.protocol import WARMPOOL_SOCKET_ENV

if TYPE_CHECKING:
    import subprocess

# How long the launcher waits for the zygote to exit before SIGKILLing it.
SHUTDOWN_TIMEOUT_S = 5.0
# Listen backlog: more than the workers one node ever starts at once.
LISTEN_BACKLOG = 256
# The longest path a Unix socket can be bound to (sun_path is 108 bytes on
# Linux, the terminating NUL included).
MAX_SOCKET_PATH = 107
# Set once a start failed and said why: the launcher tries again later
# (under the workers' final environment), which would say it twice.
_start_failed = False


class WarmPool:
    """A running zygote, as the launcher holds it."""

    def __init__(
        self,
        socket_path: str,
        directory: str,
        process: subprocess.Popen[bytes],
        lifeline_fd: int,
        startup: dict[str, str],
    ) -> None:
        self.socket_path = socket_path
        self.directory = directory
        self.process = process
        self.lifeline_fd = lifeline_fd
        # The start-up variables the zygote imported torch under: a worker
        # whose own differ is refused (it would start cold).
        self.startup = startup

    @staticmethod
    def client_args(worker_args: list[str]) -> list[str]:
        """Interpreter arguments that run ``worker_args`` (``SCRIPT ARGS...`` or
        ``--module MOD ARGS...``, as for jitckpt.launch.bootstrap) through the pool."""
        return ["-u", "-m", "jitckpt.launch.warmpool", "client", *worker_args]

    def close(self, *, unused: bool = False) -> None:
        """Stop the zygote (it kills any worker left) and remove its socket.
        ``unused``: no worker was ever started through it, so it may be
        SIGKILLed at once instead of waited for (a zygote still importing
        reads its lifeline only once it serves)."""
        import shutil
        import subprocess

        if unused:
            self.process.kill()
        if self.lifeline_fd >= 0:
            os.close(self.lifeline_fd)  # EOF on the lifeline: the zygote exits
            self.lifeline_fd = -1
        try:
            self.process.wait(SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            # Still importing (it reads the lifeline only once it serves).
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)
        if os.environ.get(WARMPOOL_SOCKET_ENV) == self.socket_path:
            del os.environ[WARMPOOL_SOCKET_ENV]


def start_pool(env: dict[str, str] | None = None) -> WarmPool | None:
    """Start a zygote and export its socket path; None (after one line on
    stderr) when it cannot be started, and workers then start cold. The
    zygote imports torch under ``env`` (default: this process's environment),
    which must hold the start-up variables the workers will have
    (OMP_NUM_THREADS in particular: jitckpt.launch.wire.startup_env)."""
    import subprocess
    import tempfile

    global _start_failed
    if _start_failed:
        return None  # said once already
    directory = tempfile.mkdtemp(prefix="jitckpt-warmpool-")  # mode 0700
    path = os.path.join(directory, "zygote.sock")
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        # A deep TMPDIR: a Unix socket's path has a small fixed limit.
        os.rmdir(directory)
        directory = tempfile.mkdtemp(prefix="jitckpt-warmpool-", dir="/tmp")
        path = os.path.join(directory, "zygote.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lifeline_r, lifeline_w = os.pipe()
    try:
        listener.bind(path)
        listener.listen(LISTEN_BACKLOG)
        process = subprocess.Popen(
            [
                sys.executable,
                "-u",
                "-m",
                "jitckpt.launch.warmpool",
                "serve",
                str(listener.fileno()),
                str(lifeline_r),
            ],
            pass_fds=(listener.fileno(), lifeline_r),
            env=env,
            stdin=subprocess.DEVNULL,
            # Terminal signals (Ctrl-C) go to the launcher, which stops the
            # workers and then the zygote, in that order.
            start_new_session=True,
        )
    except OSError as exc:
        os.close(lifeline_w)
        import shutil

        shutil.rmtree(directory, ignore_errors=True)
        say(f"cannot start the warm pool ({exc}); workers start cold")
        _start_failed = True
        return None
    finally:
        listener.close()
        os.close(lifeline_r)
    os.environ[WARMPOOL_SOCKET_ENV] = path
    return WarmPool(path, directory, process, lifeline_w, startup_env(dict(env or os.environ)))


def main(argv: list[str]) -> None:
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command == "client":
        from jitckpt.launch.warmclient import client_main

        client_main(rest)
    elif command == "serve":
        from jitckpt.launch.zygote import serve_main

        serve_main(rest)
    else:
        say("usage: python -m jitckpt.launch.warmpool {client SCRIPT [ARGS...] | serve FD FD}")
        raise SystemExit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
