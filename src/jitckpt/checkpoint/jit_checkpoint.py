"""JitCheckpoint: the object a training script creates (one line) to get
just-in-time checkpointing.

It restores the newest valid checkpoint on start, tracks the loop's step
boundaries and optimizer steps, and when the rank fails (a collective errors
because a peer died, its own exception, SIGTERM from the launcher or a
scheduler) it saves the state of the last completed step and ends the
process, so the launcher can restart the job from there. See
ARCHITECTURE.md for how detection, saving and restoring fit together.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist

from jitckpt import distributed
from jitckpt._version import __version__
from jitckpt.checkpoint.gpu import DeviceSteps, SideStreamCopy, on_cuda
from jitckpt.checkpoint.periodic import PeriodicSaver
from jitckpt.comm import CanonicalAllreduce, observed_allreduce_hook
from jitckpt.detect import signals
from jitckpt.detect.watchdog import Heartbeat, Watchdog, read_suspects
from jitckpt.errors import (
    EXIT_SAVED_AND_STOPPED,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointWriteError,
    InjectedFault,
    JitckptError,
    RunDirError,
    exit_fatal,
)
from jitckpt.events import EventLog
from jitckpt.inject import ENV_VAR as INJECT_ENV
from jitckpt.inject import Injector, parse_specs
from jitckpt.inprocess import recovery as inprocess
from jitckpt.state import mesh as sharded
from jitckpt.state import rng
from jitckpt.state.archive import Archive
from jitckpt.state.data import DataPosition
from jitckpt.state.digest import state_digest
from jitckpt.state.training import Stateful, TrainingState, check_signature, decode, model_signature
from jitckpt.storage import directory as storage
from jitckpt.storage.rundir import prepare_run_dir, run_id
from jitckpt.storage.staging import Staging, resolve_stage_dir
from jitckpt.tracker import Position, StepTracker

# How long a saver waits for the loop to leave its dirty window (optimizer
# step .. next step boundary) before giving up on this rank's copy. The
# window is normally local compute of a few milliseconds; it only lasts
# longer if the loop blocks in a collective placed after optimizer.step().
# The wait is this floor or 3 median step times, whichever is longer.
DIRTY_WAIT_FLOOR_S = 1.0
DIRTY_WAIT_STEPS = 3.0
# How long a hang detector may spend reading heartbeats to name suspects
# before it saves anyway.
SUSPECTS_DEADLINE_S = 1.0
# How long a rank waits for a checkpoint staged on another node to reach
# durable storage (its persister is copying it).
PERSIST_WAIT_S = 120.0
# Exit status of a rank that saved (or tried to) after a failure it saw.
EXIT_AFTER_FAILURE = 1
# Substrings of errors raised by a collective whose peer died.
_COLLECTIVE_ERROR_MARKERS = (
    "gloo",
    "Gloo",
    "NCCL",
    "Connection reset",
    "Connection closed",
    "Broken pipe",
)


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def classify_exception(exc: BaseException) -> str:
    if isinstance(exc, InjectedFault):
        return "exception"
    if isinstance(exc, getattr(dist, "DistError", ())):
        return "collective_error"
    text = str(exc)
    if isinstance(exc, RuntimeError) and any(
        marker in text for marker in _COLLECTIVE_ERROR_MARKERS
    ):
        return "collective_error"
    return "exception"


class JitCheckpoint:
    """Just-in-time checkpointing for one rank of a data-parallel job.

    Args:
        run_dir: directory for checkpoints and the event log; created if
            missing. Every rank of the job must see the same directory.
        model: the model, usually wrapped in DistributedDataParallel, or
            sharded with FSDP2 ``fully_shard`` on a 1-D or 2-D (HSDP) mesh
            (see jitckpt.sharded: JIT saves then need one surviving replica
            of every shard).
        optimizer: its optimizer (step pre/post hooks are registered on it).
        scheduler: optional LR scheduler, saved and restored with the state.
        loader: optional StatefulDataLoader; its position and its sampler's
            epoch are saved at every step boundary (see jitckpt.data).
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
            armed once a step has completed (see jitckpt.watchdog). Wrap
            long work outside the step (evaluation) in :meth:`paused`.
        save_every, save_every_s: the periodic backstop (off by default):
            also checkpoint every N steps / T seconds, asynchronously, for
            failures no replica survives (see jitckpt.periodic). For a
            sharded model only ``save_every``, and the save is a
            collective at the step boundary (every rank writes its shards).
        keep_periodic, keep_jit: how many steps of each kind to keep on disk.
        stage_dir: stage JIT saves in this directory of host shared memory
            (e.g. "/dev/shm"; default: $JITCKPT_STAGE_DIR, else off) and
            persist them to run_dir in the background (see jitckpt.staging).
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
    ) -> None:
        self._ready = False
        self._forwards_in_step = 0
        self._fail_lock = threading.RLock()
        self._previous_excepthook = sys.excepthook
        sys.excepthook = self._excepthook
        self.run_dir = prepare_run_dir(run_dir)
        self.run_id = run_id(self.run_dir)
        self.storage = storage.run_storage(self.run_dir)
        stage_root = resolve_stage_dir(stage_dir)
        self.staging = (
            Staging(stage_root, self.run_id, self.storage, self.run_dir) if stage_root else None
        )
        # A spare or replacement joins a running job: it learns its rank here
        # (a spare waits for it) and takes its state from a peer, not storage.
        self._joining = inprocess.joining()
        if self._joining is not None:
            self.rank, self.world_size = self._joining["rank"], int(os.environ["WORLD_SIZE"])
            _adopt_rank(loader, self.rank)
        else:
            self.rank, self.world_size = _rank_and_world()
        self.attempt = distributed.attempt()
        self.deterministic = deterministic
        self.seed = seed
        self.events = EventLog(
            self.run_dir,
            rank=self.rank,
            attempt=self.attempt,
            launch=distributed.launch_id(),
            pid=os.getpid(),
        )
        self.tracker = StepTracker()
        self._data = DataPosition(loader) if loader is not None else None
        self.scheduler = scheduler
        self.state = TrainingState(
            model, optimizer, scheduler, scaler, self._data, dict(extras or {})
        )
        self.periodic: PeriodicSaver | None = None
        try:
            self.layout = sharded.layout_of(model)
            if self.layout is not None and save_every_s:
                raise JitckptError(
                    "save_every_s: time-based periodic saves would need the ranks of a sharded "
                    "model to agree on when to save; use save_every (steps)"
                )
        except JitckptError as exc:
            exit_fatal(str(exc), self.rank)
        self._sharded_every = save_every if self.layout is not None else None
        self.keep_periodic = keep_periodic
        self.injector = Injector(
            parse_specs(os.environ.get(INJECT_ENV)),
            self.run_dir,
            self.rank,
            self.events,
            self.tracker,
        )
        self._device_steps = DeviceSteps(self.state) if on_cuda(model) else None
        if deterministic and self._device_steps is not None:
            # Reseeding is not enough on a GPU: some kernels (atomics in
            # scatter/index backward) sum in a varying order. cuBLAS needs its
            # workspace pinned before its first use for the same reason.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self._distributed = dist.is_available() and dist.is_initialized()
        self.watchdog = Watchdog(self.tracker, self._on_hang, hang_timeout_s)
        self.recovery = (
            inprocess.InProcessRecovery(
                self.rank,
                self.world_size,
                model,
                self.state,
                self.tracker,
                self.events,
                pause_watchdog=lambda: self.watchdog.pause(),
                resume_watchdog=lambda: self.watchdog.resume(),
                inject=lambda phase, step: self.injector.at(phase, step),
            )
            if inprocess.applies(model, deterministic=deterministic, uses_store=self._uses_store())
            else None
        )
        self._install_hooks(model, optimizer, scaler)
        signals.install()
        signals.set_callback(self._on_signal)
        self._announce()
        if self._joining is not None:
            if self.recovery is None:
                raise RuntimeError("a spare or replacement needs in-process recovery")
            self.start_step = self.recovery.join(self._joining)
            self._resumed = False
        else:
            self.start_step = self._restore()
            self._resumed = self.start_step > 0
        if self.recovery is not None:
            self.recovery.start()
        self.keep_jit = keep_jit
        self.periodic = (
            PeriodicSaver(
                self.storage, save_every, save_every_s, self._manifest, self.events, keep_periodic
            )
            if (save_every or save_every_s) and self.rank == 0 and self.layout is None
            else None
        )
        self.heartbeat = (
            Heartbeat(
                distributed.side_store(),
                self.rank,
                self.tracker,
                self._on_peer_failure if self.layout is not None else None,
            )
            if self._uses_store()
            else None
        )
        self._ready = True

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
        step = self.start_step
        self.watchdog.start()
        if self.heartbeat is not None:
            self.heartbeat.start()
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
            self.events.emit("loop_left", step=step)
            raise
        # Resources after every recovery's leftovers are dropped, counted
        # before the side threads stop (as the baseline was).
        resources = self.recovery.settle() if self.recovery is not None else {}
        self._stop_watching()
        if self.periodic is not None:
            self.periodic.wait()
        if self.staging is not None:
            self.staging.remove_all()
        self._ready = False
        signals.set_callback(None)
        self.events.emit(
            "finish", step=total, median_step_s=self.tracker.median_step_time(), **resources
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
        if not self._distributed or self.world_size == 1:
            return True
        if self.recovery is None:
            dist.all_reduce(tensor, op=op)
            return True
        return self.recovery.all_reduce(tensor, op)

    def save(self, reason: str = "manual", *, wait_s: float | None = None) -> Path | None:
        """Save the state of the last completed step now (JIT kind). Returns the
        checkpoint directory, or None if no clean state could be had."""
        with self._fail_lock:  # one save at a time (a manual save racing SIGTERM)
            return self._save(reason, wait_s)

    def _save(self, reason: str, wait_s: float | None) -> Path | None:
        if self.layout is not None:
            return self._save_sharded(reason, wait_s)
        started = time.monotonic()
        wait = self._dirty_wait() if wait_s is None else wait_s
        frozen = self.tracker.freeze_clean(wait)
        try:
            if self._device_steps is not None:
                # On a GPU the host's position says little about the device's:
                # the device's own record decides (jitckpt.gpu).
                captured = self._capture_from_device(wait)
            else:
                captured = self._capture_from_host(frozen)
            if captured is None:
                return None
            completed, payload = captured
            if reason != "manual":
                self._mark_saving()
            manifest = dict(self._manifest(completed), kind="jit", reason=reason)
            target = self.staging.storage if self.staging is not None else self.storage
            try:
                path = target.write(
                    manifest,
                    payload,
                    on_point=lambda point: (
                        self.injector.at("save", completed) if point == "payload_written" else None
                    ),
                )
            except CheckpointWriteError as exc:
                self._warn("save_failed", step=completed, error=str(exc))
                return None
            persister = (
                self.staging.persist_in_background(path, self.rank, self.attempt)
                if self.staging is not None
                else None
            )
            self.events.emit(
                "save",
                kind="jit",
                step=completed,
                path=str(path),
                bytes=payload.size,
                staged=self.staging is not None,
                persister_pid=persister,
                duration=time.monotonic() - started,
                digest=self._audit_digest(),
            )
            return path
        finally:
            if reason == "manual":
                self.tracker.unfreeze()

    def _capture_from_host(self, frozen: tuple[Position, Any] | None) -> tuple[int, Archive] | None:
        if frozen is None:
            self._warn(
                "save_skipped",
                reason="state not clean: the loop stayed between optimizer.step() and the "
                "next step boundary (a collective placed after optimizer.step()?)",
            )
            return None
        position, snapshot = frozen
        if snapshot is None:
            self._warn("save_skipped", reason="no step boundary passed yet in this process")
            return None
        if self.scheduler is not None and snapshot.get("scheduler_epoch") != getattr(
            self.scheduler, "last_epoch", None
        ):
            self._warn("save_skipped", reason="scheduler stepped without an optimizer step")
            return None
        return position.completed, self.state.capture(position.completed, self.rank, snapshot)

    def _capture_from_device(self, wait_s: float) -> tuple[int, Archive] | None:
        assert self._device_steps is not None
        choice = self._device_steps.choose(wait_s)
        if isinstance(choice, str):
            self._warn("save_skipped", reason=choice)
            return None
        mark, ready = choice
        copy = SideStreamCopy(ready)
        tree = self.state.tree(mark.step, self.rank, mark.snapshot, mark.host_view)
        payload = Archive(tree, to_host=copy)
        copy.finish()
        return mark.step, payload

    def _audit_digest(self) -> str | None:
        """Deterministic mode logs a digest of the state saved and of the state
        restored, so a drill can prove they are the same. Off otherwise: it
        hashes every byte (0.2 s for 300 MB) on the save's critical path."""
        if not self.deterministic or self._device_steps is not None:
            return None  # on a GPU it would copy on the (maybe blocked) compute stream
        # For a sharded model a collective (the shards are gathered): only the
        # restore path, where the new group is healthy, calls this then.
        return state_digest(self.state.model, self.state.optimizer)

    def _mark_saving(self) -> None:
        """Tell the launcher a save is under way, so it waits for it before
        SIGKILL (the marker dies with this attempt)."""
        control = os.environ.get("JITCKPT_CONTROL_DIR")
        if control:
            Path(control, "saving").mkdir(exist_ok=True)
            Path(control, "saving", os.environ.get("LOCAL_RANK", str(self.rank))).touch()

    def _warn(self, event: str, **data: Any) -> None:
        """An event the user must also see on stderr (P6: say so)."""
        self.events.emit(event, **data)
        detail = "; ".join(f"{k}: {v}" for k, v in data.items())
        print(
            f"jitckpt: rank {self.rank}: {event.replace('_', ' ')}: {detail}",
            file=sys.stderr,
            flush=True,
        )

    def _manifest(self, step: int) -> dict[str, Any]:
        return {
            "step": step,
            "world_size": self.world_size,
            "writer_rank": self.rank,
            "attempt": self.attempt,
            "layout": self._layout(),
            "created": time.time(),
            "torch_version": torch.__version__,
            "jitckpt_version": __version__,
            "run_id": self.run_id,
            "model_signature": model_signature(self.state.model),
        }

    def _layout(self) -> dict[str, Any]:
        return self.layout.to_manifest() if self.layout is not None else {"type": "ddp"}

    # -- sharded models (jitckpt.sharded) ----------------------------------------
    def _save_sharded(self, reason: str, wait_s: float | None) -> Path | None:
        """A JIT save of a sharded model: the survivors agree on one writer
        per shard through the store, the writers save together on a fresh
        group. A manual save is a collective of all ranks."""
        if reason == "manual":
            frozen = self.tracker.freeze_clean(0.0)
            try:
                if frozen is None or frozen[1] is None:
                    self._warn("save_skipped", reason="manual save outside a clean step")
                    return None
                position, snapshot = frozen
                return self._write_sharded(
                    position.completed, snapshot, "jit", reason, None, list(range(self.world_size))
                )
            finally:
                self.tracker.unfreeze()
        # Only after SIGTERM or a peer's failure may the loop still be
        # running: let it reach its next step boundary so that all ranks stop
        # at the same step (StepTracker.freeze_at_boundary). Other detectors
        # found it blocked.
        if not self._uses_store():
            # One process without a launcher: it holds every shard itself.
            frozen = self.tracker.freeze_at_boundary(0.0)
            if frozen is None or frozen[1] is None:
                return None
            return self._write_sharded(frozen[0].completed, frozen[1], "jit", reason, None, [0])
        store = distributed.side_store()
        sharded.announce(store, self.rank)
        running = reason in ("sigterm", "peer_failure")
        wait = (self._dirty_wait() if wait_s is None else wait_s) if running else 0.0
        frozen = self.tracker.freeze_at_boundary(wait)
        step = None
        if frozen is not None and frozen[1] is not None:
            step = frozen[0].completed
        self._mark_saving()
        assert self.layout is not None
        decision, decided = sharded.agree_on_writers(store, self.layout, self.rank, step)
        if decided:
            self.events.emit("jit_plan", **decision.as_dict())
        if decision.step is None:
            if decided:
                self._warn(
                    "jit_impossible",
                    reason=decision.reason,
                    lost_shard=decision.lost_shard,
                    held_by=self.layout.holders(decision.lost_shard)
                    if decision.lost_shard is not None
                    else None,
                    next="the job resumes from the newest periodic checkpoint",
                )
            return None
        if self.rank not in decision.writers or frozen is None:
            return None
        group = sharded.writers_group(decision.writers)
        return self._write_sharded(decision.step, frozen[1], "jit", reason, group, decision.writers)

    def _write_sharded(
        self,
        step: int,
        snapshot: Mapping[str, Any],
        kind: str,
        reason: str | None,
        group: dist.ProcessGroup | None,
        writers: list[int],
    ) -> Path | None:
        """Every writer saves its shards into one temporary directory; the
        lowest one commits it (non-tensor state, checksums, manifest, rename)."""
        started = time.monotonic()
        committer = min(writers)
        manifest = dict(
            self._manifest(step),
            kind=kind,
            writer_rank=committer,
            writer_ranks=writers,
            **({"reason": reason} if reason else {}),
        )
        try:
            tmp = self.storage.temporary(manifest)
            sharded.save_tensors(
                sharded.tensor_state(self.state.model, self.state.optimizer), tmp, group
            )
            if self.rank != committer:
                self.events.emit(
                    "shards_written", kind=kind, step=step, duration=time.monotonic() - started
                )
                return None
            payload = Archive(self.state.tree(step, self.rank, snapshot, tensors=False))
            path = self.storage.commit(tmp, manifest, payload)
        except CheckpointWriteError as exc:
            self._warn("save_failed", kind=kind, step=step, error=str(exc))
            return None
        written = storage.read_manifest(path)["files"]
        self.events.emit(
            "save",
            kind=kind,
            step=step,
            path=str(path),
            bytes=sum(entry["size"] for entry in written.values()),
            writers=writers,
            staged=False,
            duration=time.monotonic() - started,
            # Deterministic mode: the state as written, read back whole (the
            # writers' group is too small to gather it from memory).
            digest=sharded.checkpoint_digest(path) if self.deterministic else None,
        )
        return path

    def _on_reduced(self, *_: Any) -> None:
        self.tracker.progress += 1
        self.injector.at("allreduce")

    # -- step boundaries and hooks ----------------------------------------------
    def _boundary(self, step: int) -> None:
        self._forwards_in_step = 0
        if self.deterministic:
            rng.reseed(self.seed, step, self.rank)
        snapshot = {
            "data": self._data.state_dict() if self._data is not None else None,
            "rng": None if self.deterministic else rng.capture(),
            "scheduler_epoch": getattr(self.scheduler, "last_epoch", None),
        }
        if self._device_steps is not None:
            self._device_steps.boundary(step, snapshot)
        self.tracker.boundary(step, snapshot)
        if self.recovery is not None:
            self.recovery.on_boundary(step)
            if step == self.start_step + 2:
                # The baseline of this process's threads and fds: side
                # threads started, DDP's buckets rebuilt (second forward).
                self.events.emit("resources", step=step, **inprocess.resource_counts())
        if self._resumed and step == self.start_step + 1:
            self.events.emit("first_step_done", step=step)
            if self.rank == 0:
                # The resume worked: older JIT copies are no longer needed.
                self.storage.prune("jit", self.keep_jit, keep_from_step=self.start_step)
            if self.staging is not None and os.environ.get("LOCAL_RANK", "0") == "0":
                self.staging.remove_persisted()
        if self.periodic is not None and step > self.start_step and self.periodic.due(step):
            self.periodic.save(step, self.state.tree(step, self.rank, snapshot), self._updated)
        if self._sharded_every and step > self.start_step and step % self._sharded_every == 0:
            # Every rank holds only its shards: a collective save at the
            # boundary (synchronous; the DDP backstop's rank-0 copy does not apply).
            if self._write_sharded(
                step, snapshot, "periodic", None, None, list(range(self.world_size))
            ):
                self.storage.prune("periodic", self.keep_periodic)
        self.injector.at("data", step)

    def _before_update(self, *_: Any) -> None:
        if self.periodic is not None:
            self.periodic.hold_update()

    def _updated(self) -> set[int]:
        """Storage addresses of the tensors only optimizer.step() changes."""
        return self.state.updated_by_optimizer()

    def _count_gradient(self, _parameter: Any) -> None:
        self.tracker.progress += 1

    def _reseed_forward(self, *_: Any) -> None:
        # One stream per forward of the step: micro-batches of gradient
        # accumulation must not share dropout masks.
        self._forwards_in_step += 1
        rng.reseed(
            self.seed, self.tracker.position().in_progress, self.rank, stream=self._forwards_in_step
        )

    def _install_hooks(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: Any
    ) -> None:
        injector = self.injector
        tracker = self.tracker
        if injector.wants("optimizer"):
            # Before the tracker's hook: a fault "in the optimizer phase" strikes
            # after the all-reduce and before any parameter changes.
            optimizer.register_step_pre_hook(lambda *_: injector.at("optimizer"))
        # A periodic save copies the parameters and optimizer state while the
        # next forward and backward run; the update waits for that copy.
        optimizer.register_step_pre_hook(self._before_update)
        optimizer.register_step_pre_hook(self.tracker.optimizer_pre_hook)
        optimizer.register_step_post_hook(self.tracker.optimizer_post_hook)
        if self._device_steps is not None:
            steps = self._device_steps
            optimizer.register_step_pre_hook(lambda *_: steps.before_update())
            optimizer.register_step_post_hook(lambda *_: steps.after_update())
        if scaler is not None:
            # GradScaler.update changes its state after the step; it must count
            # as dirty like the optimizer step itself (an instance attribute,
            # so it never leaks into scaler.state_dict()).
            original_update = scaler.update

            def tracked_update(*args: Any, **kwargs: Any) -> Any:
                self.tracker.enter_dirty()
                return original_update(*args, **kwargs)

            scaler.update = tracked_update
        if self.deterministic:
            # Reseed again when the forward starts: a data loader draws from the
            # global RNG when its iterator is created, which a resumed run does
            # at a different step than an uninterrupted one. Reseeding here keeps
            # the model's randomness (dropout) a function of (step, rank) alone.
            model.register_forward_pre_hook(self._reseed_forward)

        def on_forward(*_: Any) -> None:
            tracker.progress += 1
            injector.at("forward")

        def on_backward(*_: Any) -> None:
            tracker.progress += 1
            injector.at("backward")

        def watch_output(_module: Any, _args: Any, output: Any) -> None:
            # Backward has begun when the gradient of the output is computed.
            if not torch.is_grad_enabled():
                return
            tensors = (
                [output]
                if isinstance(output, torch.Tensor)
                else list(output.values() if isinstance(output, dict) else output)
            )
            for tensor in tensors:
                if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                    tensor.register_hook(on_backward)
                    break

        def on_bucket() -> None:
            tracker.progress += 1
            injector.at("allreduce")

        model.register_forward_pre_hook(on_forward)
        model.register_forward_hook(watch_output)
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            if self.deterministic:
                reducer = CanonicalAllreduce(
                    list(model.parameters()),
                    on_bucket,
                    self.recovery,
                    lambda: tracker.position().completed,
                )
                model.register_comm_hook(None, reducer.hook)
            elif injector.wants("allreduce"):
                model.register_comm_hook(None, observed_allreduce_hook(on_bucket))
            else:
                # Keep DDP's built-in C++ all-reduce (a Python hook costs ~1 ms
                # a step here: it launches from Python and adds a division pass
                # DDP otherwise fuses into its bucket copy). The watchdog's
                # progress inside backward comes from gradient accumulation
                # instead: a rank hung in backward has accumulated fewer.
                for parameter in model.parameters():
                    if parameter.requires_grad:
                        parameter.register_post_accumulate_grad_hook(self._count_gradient)
        elif self.layout is not None:
            # FSDP2 calls this after each module's gradient reduction
            # (reduce-scatter, plus the replicas' all-reduce in HSDP): progress
            # inside backward for the watchdog, and the "allreduce" phase.
            from torch.distributed.fsdp import FSDPModule

            for module in model.modules():
                if isinstance(module, FSDPModule):
                    module.set_all_reduce_hook(self._on_reduced)
        elif self.world_size > 1:
            self.events.emit("warning", detail="model is not DistributedDataParallel")

    def _uses_store(self) -> bool:
        return self._distributed and self.world_size > 1 and "MASTER_ADDR" in os.environ

    def _announce(self) -> None:
        if self._uses_store():
            distributed.attempt_store().set(f"pid/{self.rank}", str(os.getpid()))
        control = os.environ.get("JITCKPT_CONTROL_DIR")
        if control:
            # The launcher's private directory on this node: the node fault
            # injector kills every worker listed here.
            Path(control, "pids").mkdir(exist_ok=True)
            Path(control, "pids", str(self.rank)).write_text(str(os.getpid()))
            if self.rank == 0 or not Path(control, "run_dir").exists():
                Path(control, "run_dir").write_text(str(self.run_dir.resolve()))
        self.events.emit(
            "start",
            world_size=self.world_size,
            process_start=_process_start_time(),
            signal_mechanism=signals.mechanism(),
            joined=self._joining is not None,
        )

    # -- restore ------------------------------------------------------------------
    def _restore(self) -> int:
        started = time.monotonic()
        chosen, payload = self._choose_checkpoint()
        if chosen is None:
            self.events.emit("fresh_start")
            return 0
        path, manifest = chosen.path, chosen.manifest
        assert manifest is not None
        saved_layout = manifest.get("layout", {"type": "ddp"})
        sharded.check_layout(saved_layout, self._layout(), str(path))
        check_signature(manifest["model_signature"], self.state.model, str(path))
        self.injector.at("restore", int(manifest["step"]))
        if payload is None:
            payload = decode(self.storage.read_verified(chosen), str(path / storage.PAYLOAD))
        try:
            if self.layout is not None:
                # Everything that can be refused is checked before DCP
                # overwrites the model and optimizer.
                self.state.check(payload, str(path))
                sharded.load_tensors(self.state.model, self.state.optimizer, path)
            self.state.restore(payload, str(path), tensors=self.layout is None)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - a torch load error, made actionable
            raise CheckpointMismatchError(
                f"checkpoint {path} could not be loaded into this job's components "
                f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}). "
                f"Pass the same optimizer, scheduler, loader and extras as the run that "
                f"wrote it, or start a new run with a different --run-dir. Nothing on disk "
                f"was changed."
            ) from None
        saved_rng = payload.get("rng")
        if not self.deterministic:
            if saved_rng and saved_rng["rank"] == self.rank:
                rng.restore(saved_rng["state"])
            else:
                # Another rank's generator state must not be copied here (two
                # ranks would draw the same dropout masks): derive a fresh one.
                rng.reseed(torch.initial_seed(), int(manifest["step"]), self.rank)
        step = int(payload["step"])
        self.events.emit(
            "restore",
            step=step,
            kind=manifest["kind"],
            path=str(path),
            source=self._source(chosen),
            duration=time.monotonic() - started,
            saved_world_size=int(manifest["world_size"]),
            digest=self._audit_digest(),
        )
        if self.rank == 0:
            print(
                f"jitckpt: resumed from step {step} ({manifest['kind']} checkpoint, {path})",
                flush=True,
            )
        return step

    def _source(self, candidate: storage.Candidate) -> str:
        staged = self.staging is not None and candidate.path.parent == self.staging.storage.root
        return "staged" if staged else "durable"

    def _sources(self) -> list[storage.DirectoryStorage]:
        """Where checkpoints are looked for, preferred first."""
        staged = [self.staging.storage] if self.staging is not None else []
        return [*staged, self.storage]

    def _choose_checkpoint(self) -> tuple[storage.Candidate | None, dict[str, Any] | None]:
        """Rank 0 picks the newest valid checkpoint and tells the others
        through the store, so every rank loads the same one."""
        use_store = self._uses_store()
        key = "restore/choice"
        if self.rank != 0 and use_store:
            store = distributed.attempt_store()
            store.wait([key], distributed.RESTORE_CHOICE_TIMEOUT)
            choice = json.loads(store.get(key).decode())
            if "error" in choice:
                raise CheckpointError(f"rank 0 could not choose a checkpoint: {choice['error']}")
            if not choice["name"]:
                return None, None
            return self._resolve(choice["name"], choice["checksum"]), None
        try:
            chosen, payload = self._newest_valid()
        except JitckptError as exc:
            if use_store:
                distributed.attempt_store().set(key, json.dumps({"error": str(exc)}))
            raise
        if use_store:
            choice = {
                "name": chosen.name if chosen else None,
                "checksum": chosen.checksum if chosen else None,
            }
            distributed.attempt_store().set(key, json.dumps(choice))
        self.storage.remove_stale_temporaries()
        return chosen, payload

    def _resolve(self, name: str, checksum: str) -> storage.Candidate:
        """Rank 0's choice, found in this rank's own storage. Only a name
        travels: each rank checks it holds the very checkpoint rank 0
        verified. A copy staged on another node appears in durable storage
        once its persister is done, so it is waited for, bounded."""
        deadline = time.monotonic() + PERSIST_WAIT_S
        while True:
            for source in self._sources():
                found = source.find(name)
                if found is not None and found.checksum == checksum:
                    return found
                if found is not None and found.manifest is not None:
                    raise CheckpointError(
                        f"{found.path}: differs from the checkpoint rank 0 chose (another "
                        f"checksum); do all ranks see the same --run-dir?"
                    )
            if self.staging is None or time.monotonic() > deadline:
                raise CheckpointError(
                    f"{self.storage.root / name}: chosen by rank 0 but not present on this rank; "
                    f"do all ranks see the same --run-dir (a shared filesystem at the same path)?"
                )
            time.sleep(0.05)

    def _newest_valid(self) -> tuple[storage.Candidate | None, dict[str, Any] | None]:
        """The newest checkpoint that verifies and decodes safely, decoded.
        Staged copies come first among copies of the same step."""
        ranked = sorted(
            (
                (candidate.sort_key(), preference, source, candidate)
                for preference, source in enumerate(self._sources())
                for candidate in source.candidates()
            ),
            key=lambda entry: (entry[0], entry[1]),
        )
        for _key, _preference, source, candidate in ranked:
            problem, payload = candidate.problem, None
            recorded = (candidate.manifest or {}).get("run_id")
            if problem is None and recorded not in (None, self.run_id):
                problem = (
                    f"written by another run (run id {recorded}; this run directory's is "
                    f"{self.run_id}): copied in from elsewhere? Not loaded. To continue that "
                    f"run, use its own run directory (or a full copy of it)"
                )
            if problem is None:
                try:
                    data = source.read_verified(candidate)
                    payload = decode(data, str(candidate.path / storage.PAYLOAD))
                    if len(candidate.manifest["files"]) > 1:  # type: ignore[index]
                        # Sharded: DCP reads the tensor files without checking them.
                        source.verify_files(candidate)
                except CheckpointError as exc:
                    problem = str(exc)
            if problem is not None or candidate.manifest is None or payload is None:
                self.events.emit("checkpoint_refused", path=str(candidate.path), reason=problem)
                print(
                    f"jitckpt: refusing checkpoint {candidate.path}: {problem}",
                    file=sys.stderr,
                    flush=True,
                )
                continue
            manifest = candidate.manifest
            sharded.check_layout(
                manifest.get("layout", {"type": "ddp"}), self._layout(), str(candidate.path)
            )
            check_signature(
                manifest.get("model_signature", {}), self.state.model, str(candidate.path)
            )
            return candidate, payload
        return None, None

    # -- failures -------------------------------------------------------------------
    def _dirty_wait(self) -> float:
        median = self.tracker.median_step_time() or 0.0
        return max(DIRTY_WAIT_FLOOR_S, DIRTY_WAIT_STEPS * median)

    def _on_hang(self, stalled_s: float, timeout_s: float) -> bool:
        """The watchdog fired. Returns True to keep watching (in-process
        recovery of a hung peer is under way), else the process ends."""
        if self.recovery is not None and self.recovery.pending():
            return True
        # Naming suspects needs the store, whose host may be the node that
        # died: bounded, best effort, and never in the way of the save.
        found: dict[int, str] = {}
        if self.heartbeat is not None:
            store = self.heartbeat.store
            reader = threading.Thread(
                target=lambda: found.update(read_suspects(store, self.world_size, self.rank)),
                name="jitckpt-suspects",
                daemon=True,
            )
            reader.start()
            reader.join(SUSPECTS_DEADLINE_S)
        suspects = dict(found)
        described = (
            ", ".join(f"rank {r} {kind}" for r, kind in sorted(suspects.items())) or "none named"
        )
        if self.recovery is not None and suspects and self.rank not in suspects:
            # A peer hangs and this rank is healthy: have the launcher kill the
            # peer, which turns the hang into an exit it recovers from in process.
            self.events.emit(
                "detect",
                cause="hang",
                detail=f"no progress for {stalled_s:.2f} s; suspects: {described}",
                inprocess=True,
                suspects={str(r): kind for r, kind in suspects.items()},
                stalled_s=stalled_s,
                timeout_s=timeout_s,
                median_step_s=self.tracker.median_step_time(),
                **self.tracker.position().as_dict(),
            )
            self.recovery.request_kill(sorted(suspects))
            return True
        self._fail(
            "hang",
            f"no progress for {stalled_s:.2f} s (timeout {timeout_s:.2f} s); suspects: {described}",
            EXIT_AFTER_FAILURE,
            on_main_thread=False,
            suspects={str(r): kind for r, kind in suspects.items()},
            stalled_s=stalled_s,
            timeout_s=timeout_s,
        )
        return False

    def _on_peer_failure(self, who: str) -> None:
        self._fail(
            "peer_failure",
            f"rank {who} entered its failure path",
            EXIT_AFTER_FAILURE,
            on_main_thread=False,
        )

    def _on_signal(self, signum: int) -> None:
        self._fail(
            "sigterm", f"received signal {signum}", EXIT_SAVED_AND_STOPPED, on_main_thread=False
        )

    def _excepthook(
        self, exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
    ) -> None:
        if isinstance(exc, (RunDirError, CheckpointError)):
            self._report_fatal(exc)
        if not self._ready:
            self._previous_excepthook(exc_type, exc, tb)
            return
        traceback.print_exception(exc_type, exc, tb)
        cause = classify_exception(exc)
        self._fail(cause, f"{exc_type.__name__}: {exc}", EXIT_AFTER_FAILURE, on_main_thread=True)

    def _report_fatal(self, exc: BaseException) -> None:
        """Tell the launcher not to restart: no attempt can get past this."""
        exit_fatal(str(exc), self.rank if hasattr(self, "rank") else os.getpid())

    def _fail(
        self, cause: str, detail: str, exit_code: int, *, on_main_thread: bool, **extra: Any
    ) -> None:
        # The first detector saves; any later one (the launcher's SIGTERM
        # arriving while a collective error is being handled) waits for it.
        # Whatever goes wrong while saving, the process must still exit: a
        # detector thread that died here would leave the loop frozen and the
        # job waiting for gloo's timeout.
        with self._fail_lock:
            try:
                position = self.tracker.position()
                self.events.emit(
                    "detect",
                    cause=cause,
                    detail=detail[:500],
                    **position.as_dict(),
                    # For `jitckpt report` and `simulate --from-run`: the step
                    # time, and when the last completed step ended.
                    median_step_s=self.tracker.median_step_time(),
                    since_boundary_s=self.tracker.seconds_since_boundary(),
                    **extra,
                )
                if self._ready:
                    # The training thread cannot leave its dirty window while it
                    # runs this very handler, so don't wait for it there.
                    self._save(cause, 0.0 if on_main_thread else None)
                else:
                    self._warn("save_skipped", reason="failure before the first step boundary")
            except BaseException as exc:  # noqa: BLE001 - exiting matters more
                try:
                    self._warn("save_failed", error=f"{type(exc).__name__}: {exc}")
                except BaseException:  # noqa: BLE001
                    pass
            finally:
                try:
                    self.events.emit("exit", code=exit_code)
                    self.events.close()
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(exit_code)


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
