"""The elastic agent behind ``jitckpt run``: torchrun's LocalElasticAgent with
three changes for JIT checkpointing.

* Workers that ignore SIGTERM are killed after ``term_grace_s`` instead of
  torchrun's fixed 30 s when the job restarts (PLATFORM.md: --shutdown-timeout
  does not apply there). Healthy workers save within milliseconds of the
  SIGTERM, so the long grace only delays the restart.
* Every worker failure and restart is written to the run's event log.
* A worker that reports a fatal error (a checkpoint that does not fit the
  model, an unusable run directory) stops the restarts: no attempt can
  succeed, and the user should see the error at once.
"""

from __future__ import annotations

import os
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
        pids = super()._start_workers(worker_group)
        # When one worker fails, the process context closes its siblings with
        # close()'s default 30 s SIGKILL grace (PLATFORM.md: --shutdown-timeout
        # does not apply there). Make our grace the default; explicit timeouts
        # (the agent's own shutdown on a signal) are kept.
        pcontext = self._pcontext
        if pcontext is not None:
            original_close = pcontext.close
            grace = self.term_grace_s

            def close(death_sig: Any = None, timeout: float = grace) -> None:
                original_close(death_sig, timeout)  # type: ignore[arg-type]

            pcontext.close = close  # type: ignore[method-assign]
        return pids

    def _stop_workers(self, worker_group: WorkerGroup) -> None:
        self._shutdown(timeout=self.term_grace_s)  # type: ignore[arg-type]

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
