"""Worker processes for in-process recovery: one elastic process context per
worker, plus hot spares.

torchrun's agent starts all local workers in one process context, and that
context closes every sibling as soon as one worker fails (healthy siblings
got exit -15: docs/platform.md, "One process context closes its siblings"). In-process recovery needs the survivors to
keep running, so each worker (and each spare) gets a context of its own,
started with elastic's ``start_processes`` and the very arguments and
environment LocalElasticAgent built for it. :class:`WorkerProcesses` offers
the part of the PContext interface the agent uses (``pids``, ``close``,
``subprocess_handlers``) and the operations recovery needs: poll each
worker, hand a dead worker's slot to a spare or a fresh process, keep the
spare pool full.

A spare runs the training script like a worker (through the warm pool when
it is on) with ``JITCKPT_ROLE=spare``: it imports torch, builds the model and
optimizer, and blocks in ``JitCheckpoint`` until the agent assigns it a rank
(jitckpt.inprocess.join).
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import signal
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, start_processes
from torch.distributed.elastic.multiprocessing.api import PContext, RunProcsResult
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from jitckpt import compat, protocol

# Each worker has a process context of its own, so elastic's line for a
# failed context ("failed (exitcode: -9) local_rank: 0 (pid: ...)") names
# local rank 0 for every worker. WorkerProcesses.poll says it with the
# worker's real rank instead, and this filter drops elastic's.
_ELASTIC_API_LOGGER = "torch.distributed.elastic.multiprocessing.api"


class _OwnContextFailureLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("failed (exitcode")


_QUIET = _OwnContextFailureLine()


def describe_exit(exitcode: int) -> str:
    """An exit status as a person reads it: 'killed by SIGKILL', 'exit status 1'."""
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit status {exitcode}"


@dataclass
class Spare:
    spare_id: str
    context: PContext


class WorkerProcesses:
    """The local workers of one attempt, each in its own process context.

    Args:
        launch: the keyword arguments LocalElasticAgent passed to
            ``start_processes`` for all workers (entrypoint, args and envs by
            local rank, logs spec, start method...).
        spares: how many hot spares to keep running.
    """

    def __init__(self, launch: dict[str, Any], spares: int) -> None:
        logging.getLogger(_ELASTIC_API_LOGGER).addFilter(_QUIET)
        self._launch = launch
        self._serial = itertools.count()
        self._tag = uuid.uuid4().hex[:8]
        self.envs: dict[int, dict[str, str]] = dict(launch["envs"])
        self.args: dict[int, tuple[Any, ...]] = dict(launch["args"])
        self.contexts: dict[int, PContext] = {
            local_rank: self._start(local_rank, self.envs[local_rank], {})
            for local_rank in self.envs
        }
        self.succeeded: set[int] = set()
        self.failed_after_finish: dict[int, ProcessFailure] = {}
        self._pidfds: dict[int, int] = {}
        self.spares_wanted = spares
        self.spares: list[Spare] = []
        self.refill_spares()

    # -- starting ----------------------------------------------------------------------
    def _start(self, local_rank: int, env: dict[str, str], extra: dict[str, str]) -> PContext:
        launch = self._launch
        prefixes = launch.get("log_line_prefixes")
        return start_processes(
            name=launch["name"],
            entrypoint=launch["entrypoint"],
            args={0: self.args[local_rank]},
            envs={0: {**env, **extra}},
            logs_specs=self._logs(f"{local_rank}-{next(self._serial)}", local_rank),
            log_line_prefixes={0: prefixes[local_rank]} if prefixes else None,
            start_method=launch.get("start_method", "spawn"),
            numa_options=launch.get("numa_options"),
            duplicate_stdout_filters=launch.get("duplicate_stdout_filters"),
            duplicate_stderr_filters=launch.get("duplicate_stderr_filters"),
        )

    def _logs(self, name: str, local_rank: int) -> DefaultLogsSpecs:
        # Every context gets its own log directory: a logs spec clears its
        # attempt directory when a context starts, which would delete the
        # files of contexts started before it.
        base = self._launch["logs_specs"]

        def pick(value: Any) -> Any:
            return value.get(local_rank, value.get(0)) if isinstance(value, dict) else value

        redirects, tee = compat.logs_spec_streams(base)
        return DefaultLogsSpecs(
            log_dir=os.path.join(base.root_log_dir, f"jitckpt-{self._tag}-{name}"),
            redirects=pick(redirects),
            tee=pick(tee),
        )

    def refill_spares(self) -> None:
        """Start spares until the pool is full (they warm up in the background)."""
        while len(self.spares) < self.spares_wanted:
            spare_id = f"{self._tag}-{next(self._serial)}"
            context = self._start(
                0,
                self.envs[min(self.envs)],
                {protocol.ROLE_ENV: protocol.ROLE_SPARE, protocol.SPARE_ID_ENV: spare_id},
            )
            self.spares.append(Spare(spare_id, context))

    def reap_spares(self) -> None:
        """Drop spares that died (they are replaced by the next refill)."""
        alive = []
        for spare in self.spares:
            if spare.context.wait(0) is None:
                alive.append(spare)
            else:
                spare.context.close()
        self.spares = alive

    # -- recovery ------------------------------------------------------------------
    def take_spare(self) -> Spare | None:
        return self.spares.pop(0) if self.spares else None

    def adopt(self, local_rank: int, spare: Spare) -> None:
        """A spare takes over a dead worker's slot."""
        self.contexts[local_rank] = spare.context

    def spawn_replacement(self, local_rank: int, generation: int) -> None:
        self.contexts[local_rank] = self._start(
            local_rank,
            self.envs[local_rank],
            {
                protocol.ROLE_ENV: protocol.ROLE_REPLACEMENT,
                protocol.JOIN_GENERATION_ENV: str(generation),
            },
        )

    def poll(
        self, finished: Callable[[int], bool] = lambda local_rank: False
    ) -> dict[int, ProcessFailure]:
        """Failures of workers that are still counted, by local rank; workers
        that exited successfully are remembered in ``succeeded``, and those
        that failed after ``finished(local_rank)`` (their training loop was
        complete) in ``failed_after_finish``."""
        failures: dict[int, ProcessFailure] = {}
        for local_rank, context in self.contexts.items():
            if local_rank in self.succeeded or local_rank in self.failed_after_finish:
                continue
            result: RunProcsResult | None = context.wait(0)
            if result is None:
                continue
            if not result.is_failed():
                self.succeeded.add(local_rank)
            elif finished(local_rank):
                self.failed_after_finish[local_rank] = next(iter(result.failures.values()))
            else:
                failures[local_rank] = next(iter(result.failures.values()))
        for local_rank, failure in sorted(failures.items()):
            rank = self.envs[local_rank].get(protocol.RANK_ENV, f"local {local_rank}")
            print(
                f"jitckpt: rank {rank} {describe_exit(failure.exitcode)}",
                file=sys.stderr,
                flush=True,
            )
        return failures

    def wait_for_exit(self, timeout: float) -> None:
        """Block until a worker's process exits or ``timeout`` passes, so that
        the next poll sees an exit within a millisecond instead of up to a
        poll interval later. Waits on pidfds (Linux 5.3+); without them it
        sleeps."""
        live = {pid for local_rank, pid in self.pids().items() if local_rank not in self.ended()}
        for pid in set(self._pidfds) - live:
            os.close(self._pidfds.pop(pid))
        for pid in live - set(self._pidfds):
            try:
                self._pidfds[pid] = os.pidfd_open(pid)
            except (AttributeError, OSError):
                continue  # gone already (poll sees it), or no pidfds here
        if self._pidfds:
            select.select(list(self._pidfds.values()), [], [], timeout)
        else:
            time.sleep(timeout)

    def ended(self) -> set[int]:
        """The local ranks whose worker exited for good (not to be replaced)."""
        return self.succeeded | set(self.failed_after_finish)

    def all_ended(self) -> bool:
        return self.ended() == set(self.contexts)

    # -- the PContext interface the agent uses ----------------------------------------
    def pids(self) -> dict[int, int]:
        return {
            local_rank: next(iter(context.pids().values()))
            for local_rank, context in self.contexts.items()
        }

    @property
    def subprocess_handlers(self) -> dict[Any, Any]:
        handlers: dict[Any, Any] = {}
        for local_rank, context in self.contexts.items():
            for handler in compat.subprocess_handlers(context).values():
                handlers[local_rank] = handler
        for spare in self.spares:
            for handler in compat.subprocess_handlers(spare.context).values():
                handlers[f"spare-{spare.spare_id}"] = handler
        return handlers

    def close(self, death_sig: Any = None, timeout: int = 30) -> None:
        logging.getLogger(_ELASTIC_API_LOGGER).removeFilter(_QUIET)
        for fd in self._pidfds.values():
            os.close(fd)
        self._pidfds = {}
        for context in [*self.contexts.values(), *(s.context for s in self.spares)]:
            context.close(death_sig, timeout)  # type: ignore[arg-type]
        self.spares = []
