"""The warm pool's client (``python -u -m jitckpt.launch.warmpool client
SCRIPT ARGS...``): the process elastic starts, watches and signals.

It sends its argv, cwd, environment, umask and stdio to the zygote,
forwards the signals elastic sends to the real worker, and exits with the
worker's status, dying by the same signal when the worker was killed (so
elastic sees -9 for a SIGKILLed worker). With no zygote to answer it execs
the cold bootstrap itself (one line on stderr says so). It runs before
torch is imported and imports only the standard library (a test checks).
See jitckpt.launch.warmpool for the whole design.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import NoReturn

from jitckpt.launch.wire import Lines, say, send_request
from jitckpt.protocol import NOTICE_SIGNAL, WARMPOOL_SOCKET_ENV

# How long a client waits for the zygote to answer its request. The first
# workers of a launch connect while the zygote is still importing torch
# (2-6 s on a loaded 2-core machine); past this the client starts cold.
START_TIMEOUT_S = 60.0
# Signals the client passes on to its worker: elastic's death signal
# (SIGTERM, or the signal the agent itself received) and the user signals.
FORWARDED_SIGNALS = (
    signal.SIGTERM,
    NOTICE_SIGNAL,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


class _Forwarder:
    """Passes the client's signals on to the worker; holds those that arrive
    before the worker exists."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.pidfd: int | None = None
        self.pending: list[int] = []
        for signum in FORWARDED_SIGNALS:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.pid is None:
            self.pending.append(signum)
        else:
            self.send(signum)

    def attach(self, pid: int) -> None:
        # A pidfd names this very process even if it exits and its pid is
        # reused before we signal it; ESRCH means it is already gone.
        try:
            self.pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self.pidfd = None
        self.pid = pid
        pending, self.pending = self.pending, []
        for signum in pending:
            self.send(signum)

    def send(self, signum: int) -> None:
        try:
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, signum)
            elif self.pid is not None:
                os.kill(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def restore(self) -> None:
        for signum in FORWARDED_SIGNALS:
            signal.signal(
                signum,
                signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL,
            )


def _die_by_signal(signum: int) -> NoReturn:
    """Die by ``signum`` as the worker did, so elastic sees -signum."""
    import resource

    # The worker already dumped core if it was going to; not the client.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if signum not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)  # a signal whose default action is not to terminate


def _die_like(status: int) -> NoReturn:
    """Exit as the worker did: same code, or killed by the same signal."""
    if os.WIFSIGNALED(status):
        _die_by_signal(os.WTERMSIG(status))
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def _fall_back(argv: list[str], reason: str, forwarder: _Forwarder | None) -> NoReturn:
    if forwarder is not None:
        forwarder.restore()
        if forwarder.pending:
            # Told to stop before any worker existed: do what the signal asks.
            _die_by_signal(forwarder.pending[0])
    say(f"{reason}; starting this worker without the warm pool")
    os.execv(sys.executable, [sys.executable, "-u", "-m", "jitckpt.launch.bootstrap", *argv])


def client_main(argv: list[str]) -> NoReturn:
    """``client SCRIPT ARGS...`` (or ``client --module MOD ARGS...``)."""
    if not argv:
        say("usage: python -m jitckpt.launch.warmpool client SCRIPT [ARGS...]")
        os._exit(2)
    path = os.environ.get(WARMPOOL_SOCKET_ENV)
    if not path:
        _fall_back(argv, f"{WARMPOOL_SOCKET_ENV} is not set", None)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        _fall_back(argv, f"no warm pool at {path} ({exc.strerror or exc})", None)
    forwarder = _Forwarder()
    lines = Lines(sock)
    sock.settimeout(START_TIMEOUT_S)
    try:
        send_request(sock, argv)
    except OSError as exc:
        sock.close()
        _fall_back(argv, f"the warm pool did not take the request ({exc})", forwarder)
    reply = lines.next()
    if reply is None or "pid" not in reply:
        sock.close()
        why = reply.get("refused") if reply else "no answer (gone or timed out)"
        _fall_back(argv, f"the warm pool refused: {why}", forwarder)
    forwarder.attach(int(reply["pid"]))
    sock.settimeout(None)  # the worker runs as long as training does
    reply = lines.next()
    if reply is None or "status" not in reply:
        # The zygote died under the worker: nobody can report its status.
        forwarder.send(signal.SIGKILL)
        say(f"the warm pool exited while worker {forwarder.pid} ran; killed it")
        os._exit(1)
    _die_like(int(reply["status"]))
