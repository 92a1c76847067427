"""The warm pool's zygote (``python -u -m jitckpt.launch.warmpool serve``):
imports torch once, then forks one worker per client request.

It blocks SIGTERM before importing anything heavy (threads started by
imports inherit the mask; see jitckpt.detect.signals), imports
:data:`PRELOAD_MODULES`, then serves from a single-threaded select loop. It
never starts a thread: ``fork()`` copies only the calling thread, so any
lock another thread held would stay locked forever in the child. See
jitckpt.launch.warmpool for the whole design and the lifetimes.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import sys

from jitckpt.launch.wire import (
    REQUEST_TIMEOUT_S,
    Request,
    read_request,
    say,
    send_message,
    startup_env,
)

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
# Reap interval when the kernel lacks pidfd_open (Linux < 5.3).
POLL_INTERVAL_S = 0.02
# Exit status of a forked child that could not become the worker.
EXIT_SETUP_FAILED = 127


class _Worker:
    def __init__(self, pid: int, conn: socket.socket | None, pidfd: int | None) -> None:
        self.pid = pid
        self.conn = conn
        self.pidfd = pidfd


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
        self.startup_env = startup_env(
            {k: v for k, v in os.environ.items() if k not in preload_env}
        )
        self.workers: dict[int, _Worker] = {}
        self.use_pidfd = hasattr(os, "pidfd_open")
        self.selector: selectors.BaseSelector = selectors.DefaultSelector()
        self.selector.register(listener, selectors.EVENT_READ, "accept")
        self.selector.register(lifeline_fd, selectors.EVENT_READ, "lifeline")

    def serve(self) -> Request | None:
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

    def _accept(self) -> Request | None:
        try:
            conn, _addr = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return None
        conn.settimeout(REQUEST_TIMEOUT_S)
        try:
            request = read_request(conn)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            say(f"dropping a bad request: {exc}")
            conn.close()
            return None
        refusal = self._refusal(request)
        if refusal is not None:
            request.close_fds()
            send_message(conn, {"refused": refusal})
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
            send_message(conn, {"refused": f"fork failed: {exc}"})
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

    def _refusal(self, request: Request) -> str | None:
        if request.executable != sys.executable:
            return f"interpreter {request.executable} is not the pool's {sys.executable}"
        wanted = startup_env(request.env)
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
        if send_message(conn, {"pid": pid}):
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
            send_message(worker.conn, {"status": status})
            self._close_conn(worker)
        del self.workers[worker.pid]

    def _become_worker(self, conn: socket.socket, request: Request) -> None:
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
        # As `python -m jitckpt.launch.bootstrap` run in the client's cwd would have it;
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
            say(f"preloading {name} failed: {exc!r}")
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    if cuda is not None and cuda.is_initialized():
        # fork() after CUDA initialisation gives children a broken context.
        raise RuntimeError("CUDA was initialised while preloading; cannot fork workers")
    return {key: value for key, value in os.environ.items() if before.get(key) != value}


def serve_main(argv: list[str]) -> None:
    """``serve LISTEN_FD LIFELINE_FD``: the zygote's main program."""
    from jitckpt import process_exit
    from jitckpt.detect import signals
    from jitckpt.launch import bootstrap

    listen_fd, lifeline_fd = (int(a) for a in argv)
    # Before any import that may start threads: they inherit this mask, and
    # so does every forked worker (see jitckpt.detect.signals).
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
    else:
        # The zygote, done: nothing of it needs finalizing (jitckpt.process_exit).
        process_exit.end_process(0)
