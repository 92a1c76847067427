"""JitCheckpoint: the object a training script creates (one line) to get
just-in-time checkpointing.

It restores the newest valid checkpoint on start, tracks the loop's step
boundaries and optimizer steps, and when the rank fails (a collective errors
because a peer died, its own exception, SIGTERM from the launcher or a
scheduler, a hang) it saves the state of the last completed step and ends
the process, so the launcher can restart the job from there; with
in-process recovery the survivors keep running instead.

JitCheckpoint only composes; each concern has its own part:

* the layout (jitckpt.checkpoint.layout): DDP or sharded, what to capture,
  who writes, how to load; its saver (jitckpt.checkpoint.saver) writes;
* the restorer (jitckpt.checkpoint.restorer): which checkpoint to resume from;
* the failure path (jitckpt.checkpoint.failure): every detector's one exit;
* the loop hooks (jitckpt.checkpoint.hooks): where the loop is;
* detection (jitckpt.detect) and in-process recovery (jitckpt.inprocess).

See ARCHITECTURE.md for how they fit together.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from jitckpt import attempt, protocol
from jitckpt import events as ev
from jitckpt.checkpoint.context import RankContext
from jitckpt.checkpoint.failure import FailurePath
from jitckpt.checkpoint.framework import FrameworkResume
from jitckpt.checkpoint.gpu import on_cuda
from jitckpt.checkpoint.hooks import LoopHooks
from jitckpt.checkpoint.layout import Layout, layout_for
from jitckpt.checkpoint.loop import PASS_STREAM, BatchLoop
from jitckpt.checkpoint.restorer import Restorer
from jitckpt.detect import signals
from jitckpt.detect.watchdog import Heartbeat, Watchdog
from jitckpt.errors import UsageError
from jitckpt.events import EventLog
from jitckpt.inject import Injector, parse_specs
from jitckpt.inprocess import join
from jitckpt.inprocess.graveyard import resource_counts
from jitckpt.inprocess.recovery import InProcessRecovery, applies
from jitckpt.state import rng
from jitckpt.state.buffers import BufferSnapshots
from jitckpt.state.data import DataPosition
from jitckpt.state.passes import PassPosition
from jitckpt.state.training import Stateful, TrainingState
from jitckpt.storage.directory import run_storage
from jitckpt.storage.rundir import prepare_run_dir, read_finished, record_finished, run_id
from jitckpt.storage.staging import Staging, resolve_stage_dir
from jitckpt.tracker import StepTracker


class JitCheckpoint:
    """Just-in-time checkpointing for one rank of a data-parallel job.

    Args:
        run_dir: directory for checkpoints and the event log; created if
            missing. Every rank of the job must see the same directory.
        model: the model, usually wrapped in DistributedDataParallel, or
            sharded with FSDP2 ``fully_shard`` on a 1-D or 2-D (HSDP) mesh
            (see jitckpt.checkpoint.sharded: JIT saves then need one
            surviving replica of every shard).
        optimizer: its optimizer (step pre/post hooks are registered on it).
        scheduler: optional LR scheduler, saved and restored with the state.
        loader: optional StatefulDataLoader; its position and its sampler's
            epoch are saved at every step boundary (see jitckpt.state.data).
        scaler: optional torch.amp.GradScaler.
        extras: more objects with state_dict()/load_state_dict(), by name.
            Their state is read when the saver runs, so they should change
            only after optimizer.step() (in the dirty window), like a
            scheduler does.
        deterministic: reseed python/numpy/torch at every step boundary from
            (seed, step, rank) and all-reduce gradients tensor by tensor, so a
            resumed run is bitwise equal to an uninterrupted one (slower).
        seed: base seed of deterministic mode.
        hang_timeout_s: a rank whose loop makes no progress for this long
            declares a hang. Default: max(1.5 s, 4 x the median step time),
            armed once a step has completed (see jitckpt.detect.watchdog). Wrap
            long work outside the step (evaluation) in :meth:`paused`.
        save_every, save_every_s: the periodic backstop (off by default):
            also checkpoint every N steps / T seconds, asynchronously, for
            failures no replica survives (see jitckpt.checkpoint.periodic). For a
            sharded model only ``save_every``, and the save is a
            collective at the step boundary (every rank writes its shards).
        keep_periodic, keep_jit: how many steps of each kind to keep on disk.
        stage_dir: stage JIT saves in this directory of host shared memory
            (e.g. "/dev/shm"; default: $JITCKPT_STAGE_DIR, else off) and
            persist them to run_dir in the background (see jitckpt.storage.staging).
        on_saved, resumed_by_framework: for framework integrations
            (jitckpt.integrations): ``on_saved(step, state, directory)`` runs
            once a JIT checkpoint is written (to write it in the framework's
            own layout too; ``state`` is the saved tree: model, optimizer,
            scheduler, rng...); ``resumed_by_framework`` says the framework restored
            the state from its own checkpoint, so nothing is loaded here and
            the steps start where it says. Step boundaries then come from the
            framework's step-end hook (:meth:`step_done`).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        scheduler: Stateful | None = None,
        loader: Any = None,
        scaler: Any = None,
        extras: Mapping[str, Stateful] | None = None,
        deterministic: bool = False,
        seed: int = 0,
        hang_timeout_s: float | None = None,
        save_every: int | None = None,
        save_every_s: float | None = None,
        keep_periodic: int = 2,
        keep_jit: int = 2,
        stage_dir: str | os.PathLike[str] | None = None,
        on_saved: Callable[[int, Any, Path], Any] | None = None,
        resumed_by_framework: FrameworkResume | None = None,
    ) -> None:
        # First: an unusable run directory or checkpoint must stop the
        # restarts (exit 78) from here on.
        self.failure = FailurePath()
        # A spare or replacement joins a running job: it learns its rank here
        # (a spare waits for it) and takes its state from a peer, not storage.
        self._joining = join.joining()
        self.ctx = ctx = self._context(
            run_dir, model, optimizer, scheduler, loader, scaler, extras, deterministic, seed,
            stage_dir,
        )  # fmt: skip
        ctx.on_saved = on_saved
        self.failure.bind(ctx.rank, ctx.world_size, ctx.events, ctx.tracker, self._save)
        if deterministic and on_cuda(model):
            # Reseeding is not enough on a GPU: some kernels (atomics in
            # scatter/index backward) sum in a varying order. cuBLAS needs its
            # workspace pinned before its first use for the same reason.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.watchdog = Watchdog(ctx.tracker, self.failure.on_hang, hang_timeout_s)
        self.recovery = self._recovery(model)
        self.failure.recovery = self.recovery
        self.layout: Layout = layout_for(ctx, model, self.recovery, save_every_s)
        self.hooks = LoopHooks(ctx, self.layout)
        self.hooks.install(model, optimizer, scaler)
        signals.install()
        signals.set_callback(self.failure.on_signal)
        self._announce()
        self.restorer = Restorer(ctx, self.layout, keep_jit)
        if self._joining is not None:
            if self.recovery is None:
                raise RuntimeError("a spare or replacement needs in-process recovery")
            self.start_step = self.recovery.join(self._joining)
        elif resumed_by_framework is not None:
            self.start_step = resumed_by_framework.step
            resumed_by_framework.announce(ctx)
        else:
            self.start_step = self.restorer.restore()
        self._resumed = self._joining is None and self.start_step > 0
        self._loop: BatchLoop | None = None
        self._loop_started = False
        self._holds_payload = self.start_step > 0  # until the first boundary (_load_again)
        if self.recovery is not None:
            self.recovery.start()
        self.layout.start_periodic(save_every, save_every_s, keep_periodic)
        self.heartbeat = (
            Heartbeat(
                attempt.side_store(),
                ctx.rank,
                ctx.tracker,
                self.failure.on_peer_failure if self.layout.watches_peer_failures else None,
            )
            if ctx.uses_store
            else None
        )
        self.failure.heartbeat_store = self.heartbeat.store if self.heartbeat else None
        self.failure.ready = True

    def _context(
        self,
        run_dir: str | os.PathLike[str],
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Stateful | None,
        loader: Any,
        scaler: Any,
        extras: Mapping[str, Stateful] | None,
        deterministic: bool,
        seed: int,
        stage_dir: str | os.PathLike[str] | None,
    ) -> RankContext:
        """Who this rank is, where its checkpoints go, what its state is."""
        directory = prepare_run_dir(run_dir)
        identity = run_id(directory)
        storage = run_storage(directory)
        stage_root = resolve_stage_dir(stage_dir)
        staging = Staging.open(stage_root, identity, storage, directory) if stage_root else None
        if self._joining is not None:
            rank = int(self._joining["rank"])
            world_size = int(os.environ[protocol.WORLD_SIZE_ENV])
            _adopt_rank(loader, rank)
        else:
            rank, world_size = attempt.rank_and_world()
        events = EventLog(
            directory,
            rank=rank,
            attempt=attempt.number(),
            launch=protocol.launch_id(),
            pid=os.getpid(),
        )
        tracker = StepTracker()
        data = data_position(loader)
        state = TrainingState(model, optimizer, scheduler, scaler, data, dict(extras or {}))
        buffers = BufferSnapshots(model, lambda: tracker.position().in_progress)
        state.saved_buffers = lambda step, rank: buffers.for_step(step, rank)[0]
        injector = Injector(
            parse_specs(os.environ.get(protocol.INJECT_ENV)), directory, rank, events, tracker
        )
        return RankContext(
            rank=rank,
            world_size=world_size,
            attempt=attempt.number(),
            run_dir=directory,
            run_id=identity,
            deterministic=deterministic,
            seed=seed,
            uses_store=attempt.uses_store(world_size),
            events=events,
            tracker=tracker,
            state=state,
            storage=storage,
            staging=staging,
            injector=injector,
            buffers=buffers,
        )

    def _recovery(self, model: torch.nn.Module) -> InProcessRecovery | None:
        ctx = self.ctx
        if not applies(model, uses_store=ctx.uses_store):
            return None
        return InProcessRecovery(
            ctx.rank,
            ctx.world_size,
            model,
            ctx.state,
            ctx.tracker,
            ctx.events,
            pause_watchdog=self.watchdog.pause,
            resume_watchdog=self.watchdog.resume,
            inject=ctx.injector.at,
        )

    # -- conveniences for scripts and tests ----------------------------------------------
    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def world_size(self) -> int:
        return self.ctx.world_size

    @property
    def attempt(self) -> int:
        """The restart attempt of this process (0 on the first start)."""
        return self.ctx.attempt

    @property
    def run_dir(self) -> Path:
        return self.ctx.run_dir

    @property
    def run_id(self) -> str:
        return self.ctx.run_id

    @property
    def deterministic(self) -> bool:
        return self.ctx.deterministic

    @property
    def events(self) -> EventLog:
        return self.ctx.events

    @property
    def tracker(self) -> StepTracker:
        return self.ctx.tracker

    @property
    def state(self) -> TrainingState:
        return self.ctx.state

    # -- public API ------------------------------------------------------------
    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Suspend hang detection for work that is not a training step
        (evaluation, a long log upload) and may outlast the hang timeout."""
        self.watchdog.pause()
        try:
            yield
        finally:
            self.watchdog.resume()

    def steps(self, total: int) -> Iterator[int]:
        """Iterate the step indices ``start_step .. total-1``, marking each step
        boundary (the points where the state is complete)."""
        if isinstance(self.ctx.state.data, PassPosition):
            raise UsageError(
                "a plain DataLoader has no state_dict(), so its position is followed through "
                "the loop over it: write `for batch in ckpt.batches(loader):` (and `for epoch in "
                "ckpt.epochs(total_epochs):`) instead of ckpt.steps(), or use "
                "torchdata.stateful_dataloader.StatefulDataLoader (a drop-in for DataLoader) "
                "with ckpt.steps()."
            )
        step = self.start_step
        self._start_loop(total)
        try:
            while step < total:
                self._boundary(step)
                yield step
                step += 1
            self._boundary(total)
        except GeneratorExit:
            # The loop was left early: a `break`, or an exception unwinding the
            # loop body (Python closes the generator before sys.excepthook
            # runs, so the failure path must stay armed). Only hang detection
            # stops: nothing after the loop is a training step.
            self._stop_watching()
            self.ctx.events.emit(ev.LOOP_LEFT, step=step)
            raise
        self._finish(total)

    def epochs(self, total: int) -> Iterator[int]:
        """Iterate the epochs ``resumed epoch .. total-1`` of a loop over a
        plain DataLoader (replaces ``range(total)``); inside, iterate the
        loader through :meth:`batches`. Training ends with the last epoch."""
        return self._batch_loop().epochs(total)

    def batches(self, loader: Any) -> Iterator[Any]:
        """One pass over ``loader`` (replaces ``loader`` in ``for batch in
        loader``): the step boundaries of the loop are taken before each
        batch is drawn (jitckpt.checkpoint.loop), and a resume skips the
        batches the saved step had consumed without loading them. The
        loader must be the one given to JitCheckpoint(loader=...)."""
        loop = self._batch_loop()
        position = loop.position
        if position.loader is not None and position.loader is not loader:
            raise UsageError(
                "ckpt.batches() iterates the training loader given to JitCheckpoint(loader=...); "
                "iterate other loaders (evaluation) directly."
            )
        return loop.batches(loader)

    def _batch_loop(self) -> BatchLoop:
        if self._loop is None:
            position = self.ctx.state.data
            if not isinstance(position, PassPosition):
                raise UsageError(
                    "ckpt.batches()/ckpt.epochs() need the plain DataLoader they iterate: pass it "
                    "as JitCheckpoint(..., loader=loader). A StatefulDataLoader keeps its own "
                    "position: loop over it with ckpt.steps()."
                )
            ctx = self.ctx
            reseed = (
                (lambda index: rng.reseed(ctx.seed, index, ctx.rank, stream=PASS_STREAM))
                if ctx.deterministic
                else None
            )
            self._loop = BatchLoop(self, position, ctx.tracker, self.watchdog, reseed)
        return self._loop

    def step_done(self, step: int) -> None:
        """For integrations: ``step`` steps are complete and the state is
        clean (the framework's step-end hook, after its optimizer and
        scheduler steps); the first call, at the start of training, begins
        the loop."""
        if not self._loop_started:
            self._start_loop(None)
        self._boundary(step)

    def finish(self, step: int) -> None:
        """For integrations: training ended after ``step`` steps."""
        if not self._loop_started:
            self._start_loop(None)
        self._finish(step)

    def _load_again(self) -> None:
        """Load the restored (or received) state once more: the loop
        fast-forwarded through the script's own code between passes, which
        ran on it (jitckpt.checkpoint.loop)."""
        again = self.restorer.load_again or (
            self.recovery.load_again if self.recovery is not None else None
        )
        if again is not None:
            again()

    def _start_loop(self, total: int | None) -> None:
        """The training loop begins: say whether it redoes a finished run,
        then start watching for hangs and peers."""
        self._loop_started = True
        if self._resumed:
            self._say_if_finished_before(total)
        self.watchdog.start()
        if self.heartbeat is not None:
            self.heartbeat.start()

    def _finish(self, total: int) -> None:
        """Training completed ``total`` steps."""
        # Resources after every recovery's leftovers are dropped, counted
        # before the side threads stop (as the baseline was). Settling can
        # take seconds (an abandoned call ends when its peer exits) and is no
        # step: hang detection must not fire meanwhile (peers that finished
        # stopped their heartbeats and would be named dead and killed).
        self.watchdog.pause()
        resources = self.recovery.settle() if self.recovery is not None else {}
        self._stop_watching()
        self.layout.finish()
        if self.ctx.staging is not None:
            self.ctx.staging.remove_all()
        self.failure.ready = False
        signals.set_callback(None)
        self.ctx.events.emit(
            ev.FINISH, step=total, median_step_s=self.ctx.tracker.median_step_time(), **resources
        )
        if self.ctx.rank == 0:
            with contextlib.suppress(OSError):  # only a later message depends on it
                record_finished(self.ctx.run_dir, total, os.environ.get(protocol.CONTROL_DIR_ENV))
        # A failure from here on is no training failure (protocol.ControlDir).
        control = protocol.ControlDir.from_env()
        if control is not None:
            control.mark_finished(os.environ.get(protocol.LOCAL_RANK_ENV, str(self.ctx.rank)))

    def _say_if_finished_before(self, total: int | None) -> None:
        # The same command on a run directory whose run finished resumes its
        # newest checkpoint (which may be far from the end: a JIT save of an
        # old failure) and trains again from there. Say so, and what to do.
        # Rank 0 only: it alone recorded the end (a file of a few bytes).
        if self.ctx.rank != 0:
            return
        finished = read_finished(self.ctx.run_dir)
        if finished is None:
            return
        finished_step, launch = finished
        if launch is not None and launch == os.environ.get(protocol.CONTROL_DIR_ENV):
            return  # this very launch finished it (not a re-run)
        if self.start_step >= finished_step and (total is None or total > self.start_step):
            return  # training a finished run for longer from its end: nothing is redone
        self.ctx.events.emit(
            ev.RERUN_OF_FINISHED, step=self.start_step, total=total, finished_step=finished_step
        )
        if total is None:  # an epoch loop: its end is in epochs, not steps
            work = f"training goes on from step {self.start_step}"
        elif self.start_step >= total:
            work = "nothing to train"
        else:
            work = f"steps {self.start_step}..{total - 1} are trained again"
        print(
            f"jitckpt: the run in {self.ctx.run_dir} had finished ({finished_step} steps); "
            f"this job resumes its checkpoint of step {self.start_step}: {work}. To start "
            f"a new run, use a new --run-dir (or move this one away).",
            file=sys.stderr,
            flush=True,
        )

    def _stop_watching(self) -> None:
        self.watchdog.stop()
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.recovery is not None:
            self.recovery.stop()

    def all_reduce(self, tensor: torch.Tensor, op: Any = None) -> bool:
        """All-reduce ``tensor`` in place over the job's group (``op``:
        ``dist.ReduceOp.SUM`` by default), for what the step computes to log
        or monitor (a loss average), never for the training state.

        Use it instead of ``dist.all_reduce`` in the loop: with in-process
        recovery a survivor blocked in a plain collective on the broken group
        would wait for the gloo timeout, whereas this one is woken by the
        recovery. It returns True once reduced; False, with the tensor left
        at its local value, when a recovery interrupted it (that step's
        logged value is then this rank's own). Without in-process recovery
        it is ``dist.all_reduce``; in a single process it does nothing."""
        if op is None:
            op = dist.ReduceOp.SUM
        if not (dist.is_available() and dist.is_initialized()) or self.world_size == 1:
            return True
        if self.recovery is None:
            dist.all_reduce(tensor, op=op)
            return True
        return self.recovery.all_reduce(tensor, op)

    def save(self, reason: str = "manual", *, wait_s: float | None = None) -> Path | None:
        """Save the state of the last completed step now (JIT kind). Returns the
        checkpoint directory, or None if no clean state could be had."""
        return self._save(reason, wait_s)

    def _save(self, reason: str, wait_s: float | None) -> Path | None:
        with self.failure.lock:  # one save at a time (a manual save racing SIGTERM)
            return self.layout.save_jit(reason, wait_s)

    # -- step boundaries -------------------------------------------------------------------
    def _boundary(self, step: int) -> None:
        ctx = self.ctx
        if self._holds_payload:
            # Past the resume point: the restored payload is not needed again.
            self._holds_payload = False
            self.restorer.load_again = None
            if self.recovery is not None:
                self.recovery.load_again = None
        self.hooks.new_step()
        if ctx.deterministic:
            rng.reseed(ctx.seed, step, ctx.rank)
        snapshot = {
            "data": ctx.state.data.state_dict() if ctx.state.data is not None else None,
            "rng": None if ctx.deterministic else rng.capture(),
            "scheduler_epoch": getattr(ctx.state.scheduler, "last_epoch", None),
        }
        self.layout.record_boundary(step, snapshot)
        ctx.tracker.boundary(step, snapshot)
        if self.recovery is not None:
            self.recovery.on_boundary(step)
            if step == self.start_step + 2:
                # The baseline of this process's threads and fds: side
                # threads started, DDP's buckets rebuilt (second forward).
                ctx.events.emit(ev.RESOURCES, step=step, **resource_counts())
        if self._resumed and step == self.start_step + 1:
            ctx.events.emit(ev.FIRST_STEP_DONE, step=step)
            self.restorer.after_first_step(self.start_step)
        self.layout.after_boundary(step, snapshot, self.start_step)
        ctx.injector.at("data", step)

    def _announce(self) -> None:
        ctx = self.ctx
        if ctx.uses_store:
            attempt.store().set(protocol.PID_KEY.format(rank=ctx.rank), str(os.getpid()))
        control = protocol.ControlDir.from_env()
        if control is not None:
            # The launcher's private directory on this node: the node fault
            # injector kills every worker listed there, and the agent opens the
            # event log in the run directory named there.
            control.record_pid(ctx.rank, os.getpid())
            control.record_run_dir(ctx.run_dir, overwrite=ctx.rank == 0)
        ctx.events.emit(
            ev.START,
            world_size=ctx.world_size,
            process_start=_process_start_time(),
            signal_mechanism=signals.mechanism(),
            joined=self._joining is not None,
        )


def data_position(loader: Any) -> DataPosition | PassPosition | None:
    """How the position of ``loader`` is kept: its own state_dict()
    (StatefulDataLoader), or the pass and batches consumed (a plain
    DataLoader, looped over with ckpt.batches())."""
    if loader is None:
        return None
    if isinstance(loader, PassPosition):
        return loader
    if hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict"):
        return DataPosition(loader)
    return PassPosition(loader)


def _adopt_rank(loader: Any, rank: int) -> None:
    """A hot spare built its loader before it knew its rank: the sampler
    splits the data by the rank it read then (DistributedSampler keeps it as
    an attribute and uses it only when an epoch's iterator starts)."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, torch.utils.data.DistributedSampler):
        sampler.rank = rank


def _process_start_time() -> float | None:
    """Wall-clock time this process was created (Linux), for restart timing."""
    try:
        with open("/proc/self/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])
        with open("/proc/uptime") as handle:
            uptime = float(handle.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
