"""A warm process pool ("zygote") for the workers of ``jitckpt run``.

Why: on any failure the elastic agent restarts every worker, and a fresh
worker spends most of its restart starting an interpreter and importing
torch (about 1.8 s each, CPU-bound; 4 ranks on 2 cores took ~6.5 s from spawn
to the script's first line), then ~1 s more on its first optimizer step for
a lazy ``torch._dynamo`` import (PLATFORM.md). A zygote pays for those
imports once per launch; every worker after that is a ``fork()`` of it, which
shares the imported modules copy-on-write and starts in milliseconds.

The pieces:

* launcher side, :func:`start_pool`: binds a Unix socket in a private temp
  directory (mode 0700), starts the zygote with the listening socket and a
  lifeline pipe, and exports the socket path in ``JITCKPT_WARMPOOL_SOCKET``
  so that the workers elastic starts inherit it. The socket exists before the
  launcher goes on, so workers started while the zygote still imports torch
  wait in the listen backlog instead of falling back.
* the zygote (``python -u -m jitckpt.warmpool serve``): blocks SIGTERM
  before importing anything heavy (threads started by imports inherit the
  mask; see jitckpt.signals), imports :data:`PRELOAD_MODULES`, then serves
  one fork per connection from a single-threaded select loop. It never starts
  a thread: ``fork()`` copies only the calling thread, so any lock another
  thread held would stay locked forever in the child.
* the client (``python -u -m jitckpt.warmpool client SCRIPT ARGS...``), the
  process elastic starts, watches and signals: it sends its argv, cwd,
  environment, umask and stdin/stdout/stderr (SCM_RIGHTS) to the zygote,
  forwards the signals elastic sends to the real worker, and exits with the
  worker's status, dying by the same signal when the worker was killed (so
  elastic sees -9 for a SIGKILLed worker). It imports only the standard
  library. With no zygote to answer it execs ``python -u -m jitckpt.bootstrap``
  itself (one line on stderr says so).
* the worker (the forked child): its own session like elastic's workers, the
  client's stdio, cwd, umask and environment, then ``jitckpt.bootstrap.main``,
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
interpreter or native libraries read once at start-up (:func:`_startup_env`)
must be the same for zygote and worker, otherwise the zygote refuses and the
client falls back to a cold start.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import struct
import sys
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    import selectors
    import subprocess

# Environment variable holding the zygote's socket path; set by the launcher.
SOCKET_ENV = "JITCKPT_WARMPOOL_SOCKET"
# Modules the zygote imports before it serves. Everything a worker imports
# later is paid per restart; these cover torch's ~1.8 s, the lazy
# torch._dynamo import of the first optimizer step (~1 s) and jitckpt itself.
# A module that fails to import is skipped (the worker will then report it).
PRELOAD_MODULES = (
    "torch",
    "torch.distributed",
    "torch.nn.parallel",
    "torch.optim",
    "torch._dynamo",
    "torchdata.stateful_dataloader",
    "numpy",
    "jitckpt.checkpoint",
)
# How long a client waits for the zygote to answer its request. The first
# workers of a launch connect while the zygote is still importing torch
# (2-6 s on a loaded 2-core machine); past this the client starts cold.
START_TIMEOUT_S = 60.0
# How long the zygote waits for a connected client to send its request; a
# client that stalls longer is dropped (it then falls back on its own).
REQUEST_TIMEOUT_S = 5.0
# Bound on sending a few bytes to a client (it only ever reads them).
SEND_TIMEOUT_S = 1.0
# How long the launcher waits for the zygote to exit before SIGKILLing it.
SHUTDOWN_TIMEOUT_S = 5.0
# Listen backlog: more than the workers one node ever starts at once.
LISTEN_BACKLOG = 256
# Reap interval when the kernel lacks pidfd_open (Linux < 5.3).
POLL_INTERVAL_S = 0.02
# Signals the client passes on to its worker: elastic's death signal
# (SIGTERM, or the signal the agent itself received) and the user signals.
FORWARDED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
# Exit status of a forked child that could not become the worker.
EXIT_SETUP_FAILED = 127
# Variables read once when the interpreter or a native library starts: a
# forked worker keeps the zygote's values, so a request whose values differ
# is refused. Every PYTHON* variable counts, as do these and *_NUM_THREADS.
_STARTUP_ENV_NAMES = frozenset({"LD_PRELOAD", "LD_LIBRARY_PATH", "MALLOC_CONF"})
# -u is given on both command lines; the variable makes no difference.
_STARTUP_ENV_IGNORED = frozenset({"PYTHONUNBUFFERED"})
_HEADER = struct.Struct("!I")
_MAX_REQUEST_BYTES = 16 << 20


def _startup_env(env: dict[str, str]) -> dict[str, str]:
    return {
        key: value
        for key, value in env.items()
        if key not in _STARTUP_ENV_IGNORED
        and (key.startswith("PYTHON") or key in _STARTUP_ENV_NAMES or key.endswith("_NUM_THREADS"))
    }


def _say(message: str) -> None:
    try:
        sys.stderr.write(f"jitckpt.warmpool: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


# -- launcher side --------------------------------------------------------------


class WarmPool:
    """A running zygote, as the launcher holds it."""

    def __init__(
        self, socket_path: str, directory: str, process: subprocess.Popen[bytes], lifeline_fd: int
    ) -> None:
        self.socket_path = socket_path
        self.directory = directory
        self.process = process
        self.lifeline_fd = lifeline_fd

    @staticmethod
    def client_args(worker_args: list[str]) -> list[str]:
        """Interpreter arguments that run ``worker_args`` (``SCRIPT ARGS...`` or
        ``--module MOD ARGS...``, as for jitckpt.bootstrap) through the pool."""
        return ["-u", "-m", "jitckpt.launch.warmpool", "client", *worker_args]

    def close(self) -> None:
        """Stop the zygote (it kills any worker left) and remove its socket."""
        import shutil
        import subprocess

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
        if os.environ.get(SOCKET_ENV) == self.socket_path:
            del os.environ[SOCKET_ENV]


def start_pool() -> WarmPool | None:
    """Start a zygote and export its socket path; None (after one line on
    stderr) when it cannot be started, and workers then start cold. Start it
    after the workers' environment is settled (OMP_NUM_THREADS in particular):
    the zygote imports torch under the environment it is started with."""
    import subprocess
    import tempfile

    directory = tempfile.mkdtemp(prefix="jitckpt-warmpool-")  # mode 0700
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
            stdin=subprocess.DEVNULL,
            # Terminal signals (Ctrl-C) go to the launcher, which stops the
            # workers and then the zygote, in that order.
            start_new_session=True,
        )
    except OSError as exc:
        os.close(lifeline_w)
        import shutil

        shutil.rmtree(directory, ignore_errors=True)
        _say(f"cannot start the warm pool ({exc}); workers start cold")
        return None
    finally:
        listener.close()
        os.close(lifeline_r)
    os.environ[SOCKET_ENV] = path
    return WarmPool(path, directory, process, lifeline_w)


# -- zygote -------------------------------------------------------------------


# Plain classes, not dataclasses: the client imports this module and
# dataclasses costs it ~20 ms (inspect, ast, dis).
class _Request:
    def __init__(self, fds: list[int]) -> None:
        self.argv: list[str] = []
        self.cwd = ""
        self.env: dict[str, str] = {}
        self.umask = 0o022
        self.executable = ""
        self.fds = fds

    def close_fds(self) -> None:
        for fd in set(self.fds):
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []


class _Worker:
    def __init__(self, pid: int, conn: socket.socket | None, pidfd: int | None) -> None:
        self.pid = pid
        self.conn = conn
        self.pidfd = pidfd


def _read_request(conn: socket.socket) -> _Request:
    data, fds, _flags, _addr = socket.recv_fds(conn, 65536, 3)
    request = _Request(list(fds))
    try:
        while len(data) < _HEADER.size:
            chunk = conn.recv(65536)
            if not chunk:
                raise ValueError("client closed before its request")
            data += chunk
        (size,) = _HEADER.unpack_from(data)
        if size > _MAX_REQUEST_BYTES:
            raise ValueError(f"request of {size} bytes")
        while len(data) < _HEADER.size + size:
            chunk = conn.recv(65536)
            if not chunk:
                raise ValueError("client closed during its request")
            data += chunk
        body = json.loads(data[_HEADER.size : _HEADER.size + size])
        request.argv = [str(a) for a in body["argv"]]
        request.cwd = str(body["cwd"])
        request.env = {str(k): str(v) for k, v in body["env"].items()}
        request.umask = int(body["umask"])
        request.executable = str(body["executable"])
        if len(request.fds) != 3 or not request.argv:
            raise ValueError(f"{len(request.fds)} fds, argv {request.argv!r}")
    except BaseException:
        request.close_fds()
        raise
    return request


def _send(conn: socket.socket, message: dict[str, Any]) -> bool:
    try:
        conn.settimeout(SEND_TIMEOUT_S)
        conn.sendall(json.dumps(message).encode() + b"\n")
        return True
    except OSError:
        return False


def _peer_closed(conn: socket.socket) -> bool:
    """True when the client hung up after sending its request (it timed out
    and fell back): forking a worker for it would only start a duplicate."""
    import select

    readable, _, _ = select.select([conn], [], [], 0)
    if not readable:
        return False
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class _Zygote:
    def __init__(
        self, listener: socket.socket, lifeline_fd: int, preload_env: dict[str, str]
    ) -> None:
        import selectors

        self.owner_pid = os.getpid()
        self.listener = listener
        self.listener.setblocking(False)
        self.lifeline_fd = lifeline_fd
        self.preload_env = preload_env
        self.startup_env = _startup_env(
            {k: v for k, v in os.environ.items() if k not in preload_env}
        )
        self.workers: dict[int, _Worker] = {}
        self.use_pidfd = hasattr(os, "pidfd_open")
        self.selector: selectors.BaseSelector = selectors.DefaultSelector()
        self.selector.register(listener, selectors.EVENT_READ, "accept")
        self.selector.register(lifeline_fd, selectors.EVENT_READ, "lifeline")

    def serve(self) -> _Request | None:
        """Serve until the lifeline closes (returns None, in the zygote) or
        until this process is a freshly forked worker (returns its request)."""
        while True:
            timeout = None if self.use_pidfd else POLL_INTERVAL_S
            for key, _events in self.selector.select(timeout):
                tag = key.data
                if tag == "lifeline":
                    return None
                if tag == "accept":
                    request = self._accept()
                    if request is not None:
                        return request  # only ever in the forked child
                else:
                    kind, worker = tag
                    if worker.pid not in self.workers:
                        continue  # reaped earlier in this batch
                    if kind == "exit":
                        self._reap(worker)
                    else:
                        self._client_event(worker)
            if not self.use_pidfd:
                for worker in list(self.workers.values()):
                    self._reap(worker, block=False)

    def _accept(self) -> _Request | None:
        try:
            conn, _addr = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return None
        conn.settimeout(REQUEST_TIMEOUT_S)
        try:
            request = _read_request(conn)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            _say(f"dropping a bad request: {exc}")
            conn.close()
            return None
        refusal = self._refusal(request)
        if refusal is not None:
            request.close_fds()
            _send(conn, {"refused": refusal})
            conn.close()
            return None
        if _peer_closed(conn):
            request.close_fds()
            conn.close()
            return None
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            # EAGAIN/ENOMEM: this worker starts cold; the running ones are
            # untouched (an exception here would end the pool and them).
            request.close_fds()
            _send(conn, {"refused": f"fork failed: {exc}"})
            conn.close()
            return None
        if pid == 0:
            try:
                self._become_worker(conn, request)
            except BaseException:
                import traceback

                traceback.print_exc()
                os._exit(EXIT_SETUP_FAILED)
            return request
        request.close_fds()
        self._track(pid, conn)
        return None

    def _refusal(self, request: _Request) -> str | None:
        if request.executable != sys.executable:
            return f"interpreter {request.executable} is not the pool's {sys.executable}"
        wanted = _startup_env(request.env)
        if wanted != self.startup_env:
            names = sorted(
                key
                for key in wanted.keys() | self.startup_env.keys()
                if wanted.get(key) != self.startup_env.get(key)
            )
            return f"start-up environment differs from the pool's: {', '.join(names)}"
        return None

    def _track(self, pid: int, conn: socket.socket) -> None:
        import selectors

        pidfd = None
        if self.use_pidfd:
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                self.use_pidfd = False  # e.g. ENOSYS: poll instead, for all
        worker = _Worker(pid, conn, pidfd)
        self.workers[pid] = worker
        if pidfd is not None:
            self.selector.register(pidfd, selectors.EVENT_READ, ("exit", worker))
        if _send(conn, {"pid": pid}):
            self.selector.register(conn, selectors.EVENT_READ, ("client", worker))
        else:
            self._drop_client(worker)

    def _client_event(self, worker: _Worker) -> None:
        assert worker.conn is not None
        try:
            data = worker.conn.recv(4096, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop_client(worker)

    def _drop_client(self, worker: _Worker) -> None:
        """The client is gone: its worker must not outlive it. The pid is
        still ours (an unreaped child), so it cannot name another process."""
        try:
            os.kill(worker.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._close_conn(worker)

    def _close_conn(self, worker: _Worker) -> None:
        if worker.conn is not None:
            try:
                self.selector.unregister(worker.conn)
            except (KeyError, ValueError):
                pass
            worker.conn.close()
            worker.conn = None

    def _reap(self, worker: _Worker, block: bool = True) -> None:
        try:
            pid, status = os.waitpid(worker.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            pid, status = worker.pid, 255 << 8
        if pid == 0:
            return
        if worker.pidfd is not None:
            self.selector.unregister(worker.pidfd)
            os.close(worker.pidfd)
            worker.pidfd = None
        if worker.conn is not None:
            _send(worker.conn, {"status": status})
            self._close_conn(worker)
        del self.workers[worker.pid]

    def _become_worker(self, conn: socket.socket, request: _Request) -> None:
        """In the forked child: drop every zygote resource, take on the
        client's stdio, cwd, umask and environment. Never unregister from the
        selector here: the epoll instance is shared with the zygote, closing
        our fd is enough."""
        os.setsid()  # elastic starts each worker in its own session too
        self.selector.close()
        self.listener.close()
        os.close(self.lifeline_fd)
        for worker in self.workers.values():
            if worker.conn is not None:
                worker.conn.close()
            if worker.pidfd is not None:
                os.close(worker.pidfd)
        # Our own connection too: if the zygote dies, the client must see EOF.
        conn.close()
        for target, fd in enumerate(request.fds):
            os.dup2(fd, target)
        for fd in set(request.fds):
            if fd > 2:
                os.close(fd)
        request.fds = []
        os.chdir(request.cwd)
        os.umask(request.umask)
        os.environ.clear()
        os.environ.update(request.env)
        for key, value in self.preload_env.items():
            os.environ.setdefault(key, value)  # as the worker's own imports would
        # As `python -m jitckpt.bootstrap` run in the client's cwd would have it;
        # bootstrap replaces it with the script's directory for a script.
        sys.path[0] = request.cwd
        # numpy seeds its global RNG from the OS when imported: a cold worker
        # gets its own stream, a forked one would share the zygote's. (Python's
        # `random` reseeds itself after fork; torch's default seed is fixed.)
        numpy_random = sys.modules.get("numpy.random")
        if numpy_random is not None:
            numpy_random.seed()
        gc.enable()

    def shutdown(self) -> None:
        """In the zygote, on the way out: no worker may outlive the pool."""
        for worker in list(self.workers.values()):
            try:
                os.kill(worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for worker in list(self.workers.values()):
            self._reap(worker)  # its client learns it was killed, and mirrors that
        # The launcher removes the directory too; this covers a launcher that
        # was SIGKILLed. New clients then find no socket and start cold.
        path = self.listener.getsockname()
        if isinstance(path, str) and path:
            for remove, target in ((os.unlink, path), (os.rmdir, os.path.dirname(path))):
                try:
                    remove(target)
                except OSError:
                    pass
        self.selector.close()
        self.listener.close()


def _preload() -> dict[str, str]:
    """Import PRELOAD_MODULES; returns the environment variables the imports
    set (torch sets TORCHINDUCTOR_CACHE_DIR), which a cold worker would have."""
    import importlib

    before = dict(os.environ)
    for name in PRELOAD_MODULES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # the worker imports it again and reports
            _say(f"preloading {name} failed: {exc!r}")
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    if cuda is not None and cuda.is_initialized():
        # fork() after CUDA initialisation gives children a broken context.
        raise RuntimeError("CUDA was initialised while preloading; cannot fork workers")
    return {key: value for key, value in os.environ.items() if before.get(key) != value}


def serve_main(argv: list[str]) -> None:
    """``serve LISTEN_FD LIFELINE_FD``: the zygote's main program."""
    from jitckpt.detect import signals
    from jitckpt.launch import bootstrap

    listen_fd, lifeline_fd = (int(a) for a in argv)
    # Before any import that may start threads: they inherit this mask, and
    # so does every forked worker (see jitckpt.signals).
    signal.pthread_sigmask(signal.SIG_BLOCK, signals.HANDLED_SIGNALS)
    listener = socket.socket(fileno=listen_fd)
    # Python's recipe for fork without exec (gc module docs): no collections
    # while preloading, then freeze everything preloaded so that collections
    # in the workers never write to (and so copy) the zygote's pages.
    gc.disable()
    preload_env = _preload()
    gc.freeze()
    zygote = _Zygote(listener, lifeline_fd, preload_env)
    try:
        request = zygote.serve()
    finally:
        # The forked child unwinds through here too: only the zygote cleans up.
        if os.getpid() == zygote.owner_pid:
            zygote.shutdown()
    if request is not None:
        # The worker: from here on exactly what a cold bootstrap does.
        bootstrap.main(request.argv)


# -- client ---------------------------------------------------------------------


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


class _Lines:
    """JSON-lines reader on the client's socket; None on EOF or error."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def next(self) -> dict[str, Any] | None:
        while b"\n" not in self.buffer:
            try:
                chunk = self.sock.recv(4096)
            except OSError:  # reset, or socket.timeout
                return None
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        return message


def _stdio_fds() -> list[int]:
    """The client's fds 0-2, with /dev/null standing in for a closed one."""
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            fds.append(os.open(os.devnull, os.O_RDWR))
    return fds


def _send_request(sock: socket.socket, argv: list[str]) -> None:
    mask = os.umask(0)
    os.umask(mask)
    body = json.dumps(
        {
            "argv": argv,
            "cwd": os.getcwd(),
            "env": dict(os.environ),
            "umask": mask,
            "executable": sys.executable,
        }
    ).encode()
    data = _HEADER.pack(len(body)) + body
    # The fds travel with the first bytes; a signal may cut sendmsg short.
    sent = socket.send_fds(sock, [data], _stdio_fds())
    if sent < len(data):  # (sending nothing to a zygote that has answered is EPIPE)
        sock.sendall(data[sent:])


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
    _say(f"{reason}; starting this worker without the warm pool")
    os.execv(sys.executable, [sys.executable, "-u", "-m", "jitckpt.launch.bootstrap", *argv])


def client_main(argv: list[str]) -> NoReturn:
    """``client SCRIPT ARGS...`` (or ``client --module MOD ARGS...``)."""
    if not argv:
        _say("usage: python -m jitckpt.warmpool client SCRIPT [ARGS...]")
        os._exit(2)
    path = os.environ.get(SOCKET_ENV)
    if not path:
        _fall_back(argv, f"{SOCKET_ENV} is not set", None)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        _fall_back(argv, f"no warm pool at {path} ({exc.strerror or exc})", None)
    forwarder = _Forwarder()
    lines = _Lines(sock)
    sock.settimeout(START_TIMEOUT_S)
    try:
        _send_request(sock, argv)
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
        _say(f"the warm pool exited while worker {forwarder.pid} ran; killed it")
        os._exit(1)
    _die_like(int(reply["status"]))


def main(argv: list[str]) -> None:
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command == "client":
        client_main(rest)
    elif command == "serve":
        serve_main(rest)
    else:
        _say("usage: python -m jitckpt.warmpool {client SCRIPT [ARGS...] | serve FD FD}")
        raise SystemExit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
