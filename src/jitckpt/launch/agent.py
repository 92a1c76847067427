"""The elastic agent behind ``jitckpt run``: torchrun's LocalElasticAgent with
these changes for JIT checkpointing.

* Workers that ignore SIGTERM are killed after ``term_grace_s`` instead of
  torchrun's fixed 30 s when the job restarts (--shutdown-timeout does not
  apply there: docs/platform.md, "The fixed 30 s SIGKILL grace on restart").
  The grace stretches while a worker reports that it is still writing its
  JIT checkpoint, up to MAX_SAVE_WAIT_S.
* Workers build their group under a store prefix unique to the rendezvous
  round.
* Every worker failure and restart is written to the run's event log.
* A worker that reports a fatal error (a checkpoint that does not fit the
  model, an unusable run directory) stops the restarts: no attempt can
  succeed, and the user should see the error at once.
* With in-process recovery on, each worker runs in its own process context
  (jitckpt.launch.workers) and a failed worker is replaced alone while the
  others keep running (jitckpt.launch.coordinator decides and follows each
  recovery; jitckpt.inprocess is the workers' side); when that cannot apply,
  the agent says why and takes the restart path.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.distributed.elastic.agent.server.api import RunResult, WorkerGroup, WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from jitckpt import compat, protocol
from jitckpt import events as ev
from jitckpt.events import EventLog
from jitckpt.launch.coordinator import RECOVERY_DEADLINE_S, Coordinator, in_process_refusal
from jitckpt.launch.workers import WorkerProcesses


def worker_group_run_id(agent: LocalElasticAgent) -> str | None:
    """The rendezvous run id, which workers log as their launch id."""
    try:
        return agent.get_worker_group().spec.rdzv_handler.get_run_id()
    except Exception:  # noqa: BLE001 - only used to label events
        return None


# The longest the agent waits for savers before SIGKILL, however long the
# save: a bound for a writer stuck on dead storage.
MAX_SAVE_WAIT_S = 300.0


class JitAgent(LocalElasticAgent):
    def __init__(
        self,
        *args: Any,
        control_dir: Path,
        term_grace_s: float,
        inprocess: bool = False,
        spares: int = 0,
        recovery_timeout_s: float = RECOVERY_DEADLINE_S,
        exit_wait_s: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.control_dir = control_dir
        self.control = protocol.ControlDir(control_dir)
        self.term_grace_s = term_grace_s
        self.inprocess = inprocess
        self.spares = spares
        self.recovery_timeout_s = recovery_timeout_s
        self.exit_wait_s = exit_wait_s
        self._events: EventLog | None = None
        self.fatal_message: str | None = None
        self._coordinator: Coordinator | None = None

    def events(self) -> EventLog | None:
        """The run's event log, once a worker has said where the run dir is."""
        if self._events is None:
            run_dir = self.control.run_dir()
            if run_dir is not None:
                self._events = EventLog(run_dir, rank="agent", launch=worker_group_run_id(self))
        return self._events

    def _start_workers(self, worker_group: WorkerGroup) -> dict[int, Any]:
        # Workers build their process group under a store prefix unique to
        # this rendezvous round: membership changes restart workers without
        # counting a restart, so TORCHELASTIC_RESTART_COUNT alone can repeat.
        os.environ[protocol.RDZV_ROUND_ENV] = str(
            compat.rendezvous_round(worker_group.spec.rdzv_handler)
        )
        self.control.clear_attempt_markers()
        if self.inprocess:
            pids = self._start_workers_apart(worker_group)
        else:
            pids = super()._start_workers(worker_group)
        # When one worker fails, the process context closes its siblings with
        # close()'s default 30 s SIGKILL grace (--shutdown-timeout does not apply
        # there: docs/platform.md, "The fixed 30 s SIGKILL grace on restart"). Ours is shorter, but stretches while a worker
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

    def _start_workers_apart(self, worker_group: WorkerGroup) -> dict[int, Any]:
        """LocalElasticAgent builds every worker's arguments and environment;
        its one call to start_processes is diverted so that each worker gets
        a process context of its own (jitckpt.launch.workers)."""
        spares = self.spares

        def start_apart(**launch: Any) -> WorkerProcesses:
            return WorkerProcesses(launch, spares)

        with compat.divert_start_processes(start_apart):
            pids = super()._start_workers(worker_group)
        restart_count = worker_group.spec.max_restarts - self._remaining_restarts
        client = dist.TCPStore(
            host_name=str(worker_group.master_addr),
            port=int(worker_group.master_port or 0),
            is_master=False,
            timeout=timedelta(seconds=30),
            wait_for_workers=False,
        )
        prefix = protocol.attempt_prefix(os.environ[protocol.RDZV_ROUND_ENV], restart_count)
        self._coordinator = Coordinator(
            dist.PrefixStore(prefix, client),
            worker_group.workers[0].world_size,
            self.recovery_timeout_s,
        )
        return pids

    def _terminate_patiently(self, pcontext: Any, death_sig: signal.Signals) -> None:
        """Signal every live worker, then wait up to the grace, longer (up to
        MAX_SAVE_WAIT_S) while any live worker reports a save in progress."""
        handlers = compat.subprocess_handlers(pcontext)
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
                handler.proc.poll() is None and self.control.is_saving(local_rank)
                for local_rank, handler in handlers.items()
            )
            if waited > MAX_SAVE_WAIT_S or (waited > self.term_grace_s and not saving):
                return
            time.sleep(0.02)

    def _stop_workers(self, worker_group: WorkerGroup) -> None:
        # timeout=None routes the close through _terminate_patiently (above).
        # Older torch (2.11) has no timeout parameter and closes with none.
        if compat.shutdown_takes_timeout(self):
            self._shutdown(timeout=None)  # type: ignore[arg-type]
        else:
            self._shutdown()

    def _monitor_workers(self, worker_group: WorkerGroup) -> RunResult:
        if isinstance(self._pcontext, WorkerProcesses):
            result = self._monitor_apart(worker_group, self._pcontext)
        else:
            result = super()._monitor_workers(worker_group)
            local = {w.global_rank: w.local_rank for w in worker_group.workers}
            if (
                result.state == WorkerState.FAILED
                and result.failures
                and all(self.control.finished(local[rank]) for rank in result.failures)
            ):
                result = self._failed_after_finish(
                    worker_group, {local[rank]: f for rank, f in result.failures.items()}
                )
        if result.state in (WorkerState.FAILED, WorkerState.UNHEALTHY):
            events = self.events()
            if events is not None:
                for rank, failure in sorted(result.failures.items()):
                    events.emit(
                        ev.WORKER_FAILED,
                        failed_rank=rank,
                        exitcode=failure.exitcode,
                        worker_pid=failure.pid,
                        restarts_left=self._remaining_restarts,
                    )
            fatal = self.control.fatal_messages()
            if fatal:
                self.fatal_message = fatal[0]
                self._remaining_restarts = 0
        return result

    def _failed_after_finish(
        self, worker_group: WorkerGroup, failures: dict[int, ProcessFailure]
    ) -> RunResult:
        """Workers that failed after their training loop was complete: no
        restart or recovery would redo anything (a restart would train again
        from the last checkpoint), so the job ends, failed, saying so."""
        ranks = {
            local_rank: worker_group.workers[local_rank].global_rank for local_rank in failures
        }
        said = ", ".join(
            f"rank {ranks[local_rank]} (exit status {failure.exitcode})"
            for local_rank, failure in sorted(failures.items())
        )
        self.fatal_message = (
            f"{said} failed after finishing training; training is complete, so nothing is "
            f"restarted: see the worker's output for what failed after the training loop"
        )
        self._remaining_restarts = 0
        return RunResult(
            state=WorkerState.FAILED,
            failures={ranks[local_rank]: failure for local_rank, failure in failures.items()},
        )

    def _restart_workers(self, worker_group: WorkerGroup) -> None:
        started = time.time()
        events = self.events()
        if events is not None:
            events.emit(ev.RESTART_BEGIN, restarts_left=self._remaining_restarts)
        super()._restart_workers(worker_group)
        if events is not None:
            events.emit(
                ev.RESTART, duration=time.time() - started, restarts_left=self._remaining_restarts
            )

    # -- in-process recovery ----------------------------------------------------------
    def _monitor_apart(self, worker_group: WorkerGroup, procs: WorkerProcesses) -> RunResult:
        coordinator = self._coordinator
        assert coordinator is not None
        procs.wait_for_exit(self.exit_wait_s)
        self._serve_kill_requests(worker_group, procs, coordinator)
        procs.reap_spares()
        if not coordinator.busy():
            # Not during a recovery or its redo: a starting spare would take
            # CPU from it.
            procs.refill_spares()
        failures = procs.poll(finished=self.control.finished)
        # First: a recovery that just ended is over before a failure is judged.
        stalled = coordinator.check()
        if not failures:
            if procs.all_ended():
                procs.close()  # the spares
                if procs.failed_after_finish:
                    return self._failed_after_finish(worker_group, procs.failed_after_finish)
                return RunResult(
                    state=WorkerState.SUCCEEDED,
                    return_values={w.global_rank: None for w in worker_group.workers},
                )
            if stalled is None:
                return RunResult(state=WorkerState.HEALTHY)
            # Nobody exited, but the recovery will not end: every worker restarts.
            self._fall_back(stalled, [])
            return RunResult(state=WorkerState.UNHEALTHY)
        failed = {
            local_rank: worker_group.workers[local_rank].global_rank for local_rank in failures
        }
        replaced = set(coordinator.current.replaced.values()) if coordinator.current else set()
        reason = in_process_refusal(
            failed_ranks=sorted(failed.values()),
            recovering=coordinator.interrupted(sorted(failed.values())),
            replaced=replaced,
            finished=len(failures) + len(procs.ended()),
            workers=len(procs.contexts),
            fatal=bool(self.control.fatal_messages()),
            recoveries=coordinator.recoveries,
            repeated=coordinator.repeated(sorted(failed.values())),
            not_capable=lambda: [
                rank
                for rank in range(coordinator.world_size)
                if not coordinator.store.check([protocol.INPROC_CAPABLE_KEY.format(rank=rank)])
            ],
        )
        if reason is None:
            self._recover_in_process(worker_group, procs, failures, coordinator)
            return RunResult(state=WorkerState.HEALTHY)
        self._fall_back(reason, sorted(failed.values()))
        return RunResult(
            state=WorkerState.FAILED,
            failures={failed[local_rank]: failure for local_rank, failure in failures.items()},
        )

    def _fall_back(self, reason: str, failed_ranks: list[int]) -> None:
        events = self.events()
        if events is not None:
            events.emit(
                ev.INPROC_FALLBACK, path="restart", reason=reason, failed_ranks=failed_ranks
            )
        if self.control.fatal_messages():
            return  # nothing restarts; the launcher says why when the job ends
        then = (
            "restarting all workers"
            if self._remaining_restarts > 0
            else "no restarts left (--max-restarts)"
        )
        print(
            f"jitckpt: in-process recovery does not apply ({reason}); {then}",
            file=sys.stderr,
            flush=True,
        )

    def _recover_in_process(
        self,
        worker_group: WorkerGroup,
        procs: WorkerProcesses,
        failures: dict[int, ProcessFailure],
        coordinator: Coordinator,
    ) -> None:
        dead = {local_rank: worker_group.workers[local_rank].global_rank for local_rank in failures}
        generation = coordinator.begin(dead)
        # Wake the survivors' watchers at once (the notice is in the store).
        for local_rank, context in procs.contexts.items():
            if local_rank not in dead and local_rank not in procs.ended():
                for handler in compat.subprocess_handlers(context).values():
                    if handler.proc.poll() is None:
                        try:
                            handler.proc.send_signal(protocol.NOTICE_SIGNAL)
                        except ProcessLookupError:
                            pass
        events = self.events()
        for local_rank, rank in dead.items():
            spare = procs.take_spare()
            if spare is not None:
                coordinator.assign_spare(spare.spare_id, rank, local_rank, generation)
                procs.adopt(local_rank, spare)
                kind = "spare"
            else:
                procs.spawn_replacement(local_rank, generation)
                kind = "fresh"
            worker = worker_group.workers[local_rank]
            worker.id = procs.pids()[local_rank]
            if events is not None:
                events.emit(
                    ev.INPROC_BEGIN,
                    generation=generation,
                    failed_rank=rank,
                    exitcode=failures[local_rank].exitcode,
                    worker_pid=failures[local_rank].pid,
                    replacement=kind,
                    replacement_pid=worker.id,
                )

    def _serve_kill_requests(
        self, worker_group: WorkerGroup, procs: WorkerProcesses, coordinator: Coordinator
    ) -> None:
        """Survivors that see a peer hang ask for it to be killed: the kill
        turns a hang into the exit that in-process recovery handles."""
        ranks = {worker_group.workers[i].global_rank: i for i in procs.contexts}
        for rank in coordinator.kill_requests(sorted(ranks)):
            for handler in compat.subprocess_handlers(procs.contexts[ranks[rank]]).values():
                if handler.proc.poll() is None:
                    handler.proc.kill()
