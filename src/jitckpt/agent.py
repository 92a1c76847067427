"""The elastic agent behind ``jitckpt run``: torchrun's LocalElasticAgent with
these changes for JIT checkpointing.

* Workers that ignore SIGTERM are killed after ``term_grace_s`` instead of
  torchrun's fixed 30 s when the job restarts (PLATFORM.md: --shutdown-timeout
  does not apply there). The grace stretches while a worker reports that it
  is still writing its JIT checkpoint, up to MAX_SAVE_WAIT_S.
* Workers build their group under a store prefix unique to the rendezvous
  round.
* Every worker failure and restart is written to the run's event log.
* A worker that reports a fatal error (a checkpoint that does not fit the
  model, an unusable run directory) stops the restarts: no attempt can
  succeed, and the user should see the error at once.
"""

from __future__ import annotations

import inspect
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from torch.distributed.elastic.agent.server.api import RunResult, WorkerGroup, WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

from jitckpt.events import EventLog


def worker_group_run_id(agent: LocalElasticAgent) -> str | None:
    """The rendezvous run id, which workers log as their launch id."""
    try:
        return agent.get_worker_group().spec.rdzv_handler.get_run_id()
    except Exception:  # noqa: BLE001 - only used to label events
        return None


# Workers touch a file here while they write a JIT checkpoint.
SAVING_DIR = "saving"
# The longest the agent waits for savers before SIGKILL, however long the
# save: a bound for a writer stuck on dead storage.
MAX_SAVE_WAIT_S = 300.0


class JitAgent(LocalElasticAgent):
    def __init__(self, *args: Any, control_dir: Path, term_grace_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.control_dir = control_dir
        self.term_grace_s = term_grace_s
        self._events: EventLog | None = None
        self.fatal_message: str | None = None

    def events(self) -> EventLog | None:
        """The run's event log, once a worker has said where the run dir is."""
        if self._events is None:
            run_dir_file = self.control_dir / "run_dir"
            if run_dir_file.exists():
                self._events = EventLog(
                    run_dir_file.read_text().strip(),
                    rank="agent",
                    launch=worker_group_run_id(self),
                )
        return self._events

    def _start_workers(self, worker_group: WorkerGroup) -> dict[int, Any]:
        # Workers build their process group under a store prefix unique to
        # this rendezvous round: membership changes restart workers without
        # counting a restart, so TORCHELASTIC_RESTART_COUNT alone can repeat.
        state = getattr(
            getattr(worker_group.spec.rdzv_handler, "_state_holder", None), "state", None
        )
        os.environ["JITCKPT_RDZV_ROUND"] = str(getattr(state, "round", "na"))
        shutil.rmtree(self.control_dir / SAVING_DIR, ignore_errors=True)
        pids = super()._start_workers(worker_group)
        # When one worker fails, the process context closes its siblings with
        # close()'s default 30 s SIGKILL grace (PLATFORM.md: --shutdown-timeout
        # does not apply there). Ours is shorter, but stretches while a worker
        # is writing its JIT checkpoint (a large state takes seconds): killing
        # every saver mid-write would leave no checkpoint at all. Explicit
        # timeouts (the agent's own shutdown on a signal) are kept.
        pcontext = self._pcontext
        if pcontext is not None:
            original_close = pcontext.close

            def close(death_sig: Any = None, timeout: float | None = None) -> None:
                if timeout is None:
                    self._terminate_patiently(pcontext, death_sig or signal.SIGTERM)
                    timeout = 0.1  # only stragglers are left for SIGKILL
                original_close(death_sig, timeout)  # type: ignore[arg-type]

            pcontext.close = close  # type: ignore[method-assign]
        return pids

    def _terminate_patiently(self, pcontext: Any, death_sig: signal.Signals) -> None:
        """Signal every live worker, then wait up to the grace, longer (up to
        MAX_SAVE_WAIT_S) while any live worker reports a save in progress."""
        handlers = dict(getattr(pcontext, "subprocess_handlers", {}))
        procs = [h.proc for h in handlers.values()]
        for proc in procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(death_sig)
                except ProcessLookupError:
                    pass
        started = time.monotonic()
        while any(proc.poll() is None for proc in procs):
            waited = time.monotonic() - started
            saving = any(
                handler.proc.poll() is None
                and (self.control_dir / SAVING_DIR / str(local_rank)).exists()
                for local_rank, handler in handlers.items()
            )
            if waited > MAX_SAVE_WAIT_S or (waited > self.term_grace_s and not saving):
                return
            time.sleep(0.02)

    def _stop_workers(self, worker_group: WorkerGroup) -> None:
        # timeout=None routes the close through _terminate_patiently (above).
        # Older torch (2.11) has no timeout parameter and closes with none.
        if "timeout" in inspect.signature(self._shutdown).parameters:
            self._shutdown(timeout=None)  # type: ignore[arg-type]
        else:
            self._shutdown()

    def _monitor_workers(self, worker_group: WorkerGroup) -> RunResult:
        result = super()._monitor_workers(worker_group)
        if result.state in (WorkerState.FAILED, WorkerState.UNHEALTHY):
            events = self.events()
            if events is not None:
                for rank, failure in sorted(result.failures.items()):
                    events.emit(
                        "worker_failed",
                        failed_rank=rank,
                        exitcode=failure.exitcode,
                        worker_pid=failure.pid,
                        restarts_left=self._remaining_restarts,
                    )
            fatal = sorted(self.control_dir.glob("fatal-*"))
            if fatal:
                self.fatal_message = fatal[0].read_text()
                self._remaining_restarts = 0
        return result

    def _restart_workers(self, worker_group: WorkerGroup) -> None:
        started = time.time()
        events = self.events()
        if events is not None:
            events.emit("restart_begin", restarts_left=self._remaining_restarts)
        super()._restart_workers(worker_group)
        if events is not None:
            events.emit(
                "restart", duration=time.time() - started, restarts_left=self._remaining_restarts
            )
